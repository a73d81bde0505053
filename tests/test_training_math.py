"""The training maths a run relies on (issue 17): each test fails on the code it was written for."""
import os
import re

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
import tensorflow as tf

from vit_jax import checkpoint, models
from vit_jax.weights import train_state
from vit_jax.data import ops
from vit_jax.models import mae, vit
from vit_jax.train import metrics_log, optim, steps, trainer

IMAGES = jnp.asarray(np.random.RandomState(0).uniform(-1, 1, (2, 16, 16, 3)), jnp.float32)
TINY_DECODER = dict(decoder_width=8, decoder_layers=1, decoder_mlp_dim=16, decoder_heads=2)


def _flat_shapes(params) -> dict:
  """{'a/b': (shape, logical names)} of a (boxed) params tree."""
  flat = flax.traverse_util.flatten_dict(
      jax.tree.map(lambda b: (b.value.shape, b.names), params,
                   is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)), sep='/')
  return flat


def _abstract_params(model):
  return jax.eval_shape(lambda: model.init(jax.random.key(0), IMAGES[:1]))['params']


def _optimizer_config(**optimizer):
  return ml_collections.ConfigDict(dict(
      total_steps=10, optimizer=dict(name='adamw', weight_decay=0.1, **optimizer),
      schedule=dict(base_lr=1e-3, warmup_steps=0, decay_type='constant')))


def _decayed_names(model) -> set:
  """Names of the leaves AdamW moves when the gradient is zero: those weight decay reaches."""
  # Boxed, as create_state has them; ones, so that decay moves every leaf it reaches (the head
  # starts at zero).
  tx, _ = optim.make_optimizer(_optimizer_config())

  @jax.jit
  def first_update():
    params = jax.tree.map(jnp.ones_like, model.init(jax.random.key(0), IMAGES[:1])['params'])
    zeros = jax.tree.map(jnp.zeros_like, params)
    return nn.unbox(tx.update(zeros, tx.init(params), params)[0])
  flat = flax.traverse_util.flatten_dict(first_update(), sep='/')
  return {re.sub(r'encoderblock_\d+', 'encoderblock', k) for k, v in flat.items()
          if np.any(np.asarray(v) != 0)}


@pytest.mark.parametrize('task', ['classification', 'mae'])
def test_weight_decay_reaches_the_same_kernels_scanned_and_unscanned(task):
  def build(scan):
    options = dict(classifier='map' if task == 'classification' else 'token', scan_layers=scan)
    if task == 'classification':
      return models.get_model('testing', num_classes=3, posemb='relative', **options)
    return mae.get_model('mae', 'testing', **TINY_DECODER, **options)
  unscanned, scanned = _decayed_names(build(False)), _decayed_names(build(True))
  assert scanned == unscanned
  all_names = {re.sub(r'encoderblock_\d+', 'encoderblock', k)
               for k in _flat_shapes(_abstract_params(build(False)))}
  assert unscanned == {k for k in all_names if k.endswith('/kernel')}
  # What the recipes exclude is there, and not decayed.
  excluded = ({'MAPHead_0/probe', 'Transformer/encoderblock/LayerNorm_0/scale',
               'Transformer/encoderblock/MultiHeadDotProductAttention_1/query/bias',
               'Transformer/encoderblock/MultiHeadDotProductAttention_1/relative_bias'}
              if task == 'classification' else
              {'cls', 'Transformer/posembed_input/pos_embedding', 'decoder/mask_token'})
  assert excluded <= all_names - unscanned


def _pretraining_encoder(params) -> dict:
  return {k: v for k, v in _flat_shapes(params).items()
          if k.split('/')[0] not in mae.PRETRAINING_ONLY}


@pytest.mark.parametrize('posemb', vit.POSEMBS)
def test_self_supervised_encoders_are_the_classifiers_for_every_option(posemb):
  for scan, remat, classifier in ((False, 'none', 'token'), (True, 'full', 'gap')):
    options = dict(posemb=posemb, scan_layers=scan, remat_policy=remat, classifier=classifier)
    encoder = _flat_shapes(_abstract_params(models.get_model('testing', num_classes=None,
                                                             **options)))
    assert _pretraining_encoder(_abstract_params(
        mae.get_model('masked_patch', 'testing', **options))) == encoder
    if posemb == 'relative':  # MAE's encoder sees a subset of the grid: refused, not ignored
      with pytest.raises(ValueError, match="posemb='relative'"):
        _abstract_params(mae.get_model('mae', 'testing', **TINY_DECODER, **options))
    else:
      assert _pretraining_encoder(_abstract_params(
          mae.get_model('mae', 'testing', **TINY_DECODER, **options))) == encoder


def test_mae_encoder_is_rematerialised_when_asked():
  def primitives(remat):
    model = mae.get_model('mae', 'testing', **TINY_DECODER, scan_layers=True, remat_policy=remat)
    params = nn.unbox(_abstract_params(model))
    loss = lambda p: jnp.sum(model.apply({'params': p}, IMAGES)[0])  # noqa: E731
    return str(jax.make_jaxpr(jax.grad(loss))(params))
  assert 'remat' not in primitives('none') and 'remat' in primitives('full')


def test_masked_patch_tokens_get_their_position_after_corruption():
  # No blocks: the encoder's output is LayerNorm (scale 1, bias 0) of its input tokens.
  model = mae.get_model('masked_patch', 'testing', posemb='sincos2d', classifier='gap',
                        num_layers=0, corrupt_ratio=0.9)
  params = jax.jit(model.init)(jax.random.key(0), IMAGES)['params']
  rng = jax.random.key(5)
  _, state = jax.jit(lambda p: model.apply(
      {'params': p}, IMAGES, mask_rng=rng, mutable=['intermediates'],
      capture_intermediates=lambda m, _: m.name == 'Transformer'))(params)
  encoded = np.asarray(state['intermediates']['Transformer']['__call__'][0])
  embedded = model.apply({'params': params}, IMAGES, method='embed').reshape(2, 16, -1)
  _, _, kind = mae.corrupt_patches(rng, embedded, jnp.zeros((1, 1, 16)), 0.9)
  kind = np.asarray(kind)
  assert (kind == mae.MASK_EMBEDDING).sum() > 5
  position = vit.posemb_sincos_2d(4, 4, 16)[0]

  def layer_norm(x):
    return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6)
  mask_embedding = np.asarray(nn.unbox(params['mask_embedding']))[0, 0]
  for i, j in zip(*np.nonzero(kind == mae.MASK_EMBEDDING)):
    np.testing.assert_allclose(encoded[i, j], layer_norm(mask_embedding + position[j]),
                               rtol=1e-4, atol=1e-4)


class _LogitsInImage(nn.Module):
  """Returns the first pixel's channels as logits: a model whose predictions a test chooses."""

  @nn.compact
  def __call__(self, images, *, train=False):
    return images[:, 0, 0, :]


def test_evaluation_hit_is_the_labels_maximum_also_with_label_smoothing():
  smooth = ops.get_preprocess_fn('onehot(3, label_smoothing=0.1)')
  labels = np.stack([smooth({'label': tf.constant(c)})['labels'].numpy() for c in (0, 1, 2, 0)])
  predicted = np.array([0, 2, 2, 1])  # hits: the first and the third
  images = np.zeros((4, 1, 1, 3), np.float32)
  images[np.arange(4), 0, 0, predicted] = 1.
  sums = steps.eval_step({}, {'image': images, 'labels': labels, 'mask': np.ones(4)},
                         model=_LogitsInImage(), loss_fn=steps.softmax_xent)
  assert float(sums['correct']) == 2.
  multi_hot = np.array([[1., 1., 0.], [0., 1., 1.], [0., 1., 1.], [1., 0., 1.]], np.float32)
  sums = steps.eval_step({}, {'image': images, 'labels': multi_hot, 'mask': np.ones(4)},
                         model=_LogitsInImage(), loss_fn=steps.sigmoid_xent)
  assert float(sums['correct']) == 3.


@pytest.mark.parametrize('label', [[], [1, 7], -1])
def test_labels_empty_or_out_of_range_stop_the_pipeline_naming_the_example(label):
  fn = ops.get_preprocess_fn('onehot(4)')
  ds = tf.data.Dataset.from_tensors({'label': tf.constant(label, tf.int64),
                                     'id': tf.constant('train_00042')}).map(fn)
  with pytest.raises(tf.errors.InvalidArgumentError, match=r'train_00042.*label'):
    list(ds)


def test_cosine_schedule_from_zero_and_to_end_lr():
  config = _optimizer_config()
  config.schedule = dict(base_lr=0., warmup_steps=2, decay_type='cosine')
  _, schedule = optim.make_optimizer(config)
  assert [float(schedule(s)) for s in range(10)] == [0.] * 10
  config.schedule = dict(base_lr=1e-3, end_lr=1e-5, warmup_steps=0, decay_type='cosine')
  _, schedule = optim.make_optimizer(config)
  expected = optax.cosine_decay_schedule(1e-3, 10, alpha=1e-2)
  np.testing.assert_allclose([schedule(s) for s in range(12)], [expected(s) for s in range(12)],
                             rtol=1e-5)


def test_zero_interval_acts_at_the_last_step_only_as_readme_says():
  assert [s for s in range(1, 11) if trainer._interval_hit(s, 0, 10)] == [10]
  assert [s for s in range(1, 11) if trainer._interval_hit(s, 4, 10)] == [4, 8, 10]
  with open(os.path.join(os.path.dirname(__file__), '..', 'README.md')) as f:
    readme = f.read()
  assert '`checkpoint_every` (each also acts at the last step; 0 = only there' in readme
  assert '0 = never' not in readme


def test_images_per_sec_counts_the_steps_before_an_evaluation_with_their_time():
  now = [0.]
  throughput = metrics_log.Throughput(batch_size=10, step=1, clock=lambda: now[0])
  now[0] = 1.  # steps 2..3 (1 s), then an evaluation of 30 s, then step 4 (1 s): log at 4
  throughput.exclude(30.)
  now[0] = 32.
  assert throughput.rate(4) == pytest.approx(3 * 10 / 2.)
  now[0] = 34.  # the next interval starts clean
  assert throughput.rate(6) == pytest.approx(2 * 10 / 2.)


def test_input_wait_and_mfu_over_the_steps_since_the_last_line():
  now = [0.]
  throughput = metrics_log.Throughput(batch_size=10, step=0, clock=lambda: now[0],
                                      flops_per_step=3e12, peak_flops=8 * 1e12)
  throughput.waited_for_input(0.25)
  throughput.waited_for_input(0.5)
  now[0] = 2.  # 4 steps in 2 s: 6e12 FLOP/s of a 8e12 peak
  assert throughput.figures(4) == {'images_per_sec': 20., 'input_wait_s': 0.75,
                                   'mfu': pytest.approx(0.75)}
  assert throughput.figures(4) == {'images_per_sec': None, 'input_wait_s': None, 'mfu': None}
  cpu = metrics_log.Throughput(batch_size=10, step=0, clock=lambda: now[0])  # no known peak
  now[0] = 3.
  assert cpu.figures(1)['mfu'] is None and cpu.figures(2)['input_wait_s'] == 0.


def test_loading_a_workdir_reads_its_newest_complete_step(tmp_path):
  manager = checkpoint.make_manager(str(tmp_path), async_save=False)
  for step in (1, 2):
    checkpoint.save_state(manager, step, {'params': {'w': np.full((2,), float(step))}})
  manager.close()
  os.rename(tmp_path / 'checkpoints' / '2' / train_state._STEP_METADATA,
            tmp_path / 'checkpoints' / '2' / 'moved')  # an interrupted copy of step 2
  np.testing.assert_array_equal(checkpoint.load(str(tmp_path))['w'], [1., 1.])


def test_every_task_accumulates_gradients(quickstart_config):
  config = quickstart_config
  config.task, config.accum_steps = 'mae', 2
  config.model = dict(name='testing', **TINY_DECODER)
  training = trainer.build(config)
  step = trainer.make_train_step(config, training, jax.random.key(1))
  batch = trainer.abstract_batch(config, training.mesh)
  state, metrics = jax.eval_shape(step, training.abstract_state, batch)
  assert metrics['train_loss'].shape == () and state.step.shape == ()
  jaxpr = str(jax.make_jaxpr(step)(training.abstract_state, batch))
  assert 'scan[' in jaxpr and 'length=2' in jaxpr  # the loop over the two microbatches
