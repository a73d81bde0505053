"""The largest ViTs: G/14, e/14 and 22B/14 presets with the papers' parameter counts, ViT-22B's
block options (qk_norm, parallel_block, use_bias) against an independent computation, through
save / load / predict, the scaling recipes' optimizer and schedule, and the variants learning."""
import importlib.util
import os

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import workdirs
from vit_jax import checkpoint, models
from vit_jax.models import registry, vit
from vit_jax.train import optim, trainer
from vit_jax.weights import model_from_weights

OPTIONS = ('qk_norm', 'parallel_block', 'use_bias')
VARIANTS = [dict(), dict(qk_norm=True), dict(parallel_block=True), dict(use_bias=False),
            dict(qk_norm=True, parallel_block=True, use_bias=False)]
_IDS = ['standard', 'qk_norm', 'parallel_block', 'no_bias', 'vit22b']


def _flat_shapes(model, image_size: int = 224) -> dict:
  variables = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, image_size, image_size, 3)), train=False))
  return {k: v.shape for k, v in
          flax.traverse_util.flatten_dict(nn.unbox(variables['params']), sep='/').items()}


def _millions(shapes: dict, keep=lambda key: True) -> float:
  return sum(np.prod(s) for k, s in shapes.items() if keep(k)) / 1e6


def test_presets_have_the_papers_parameter_counts():
  """Each paper counts its own way; ours match each within rounding (to 1M). Zhai et al.
  (ViT-G/14, 1,843M): every parameter, no head. PaLI (ViT-e/14, 3,926M): with the MAP head and
  JFT-3B's 29,593-class head it was trained with. Dehghani et al. (ViT-22B, 21,743M): the
  blocks' kernels (4 D^2 + 2 D MLP per layer)."""
  scanned = dict(scan_layers=True)  # one traced block: fast
  g = _flat_shapes(models.get_model('ViT-G_14', num_classes=None, **scanned))
  assert round(_millions(g)) == 1843
  e = _flat_shapes(models.get_model('ViT-e_14', num_classes=29_593, classifier='map', **scanned))
  assert round(_millions(e)) == 3926
  big = _flat_shapes(models.get_model('ViT-22B_14', num_classes=None, **scanned))
  assert round(_millions(big, lambda k: k.startswith('Transformer/encoderblock/') and
                         k.endswith('/kernel'))) == 21_743
  assert round(_millions(big)) == 21_751  # all of them: + embeddings, norms, MLP biases
  # Any patch size, as for the other sizes.
  assert registry.model_config('ViT-G_16')['patch_size'] == 16


def test_22b_preset_is_the_papers_block_and_overrides_turn_it_off():
  config = registry.model_config('ViT-22B_14')
  assert (config['hidden_size'], config['num_layers'], config['mlp_dim'], config['num_heads'],
          config['patch_size']) == (6144, 48, 24576, 48, 14)
  assert [config[o] for o in OPTIONS] == [True, True, False]
  model = models.get_model('ViT-22B_14', qk_norm=False, use_bias=True)
  assert (model.qk_norm, model.parallel_block, model.use_bias) == (False, True, True)
  assert all(o not in registry.model_config('ViT-G_14') for o in OPTIONS)


@pytest.mark.parametrize('options', VARIANTS, ids=_IDS)
def test_block_options_change_exactly_their_parameters(options):
  """Off, the released names and shapes; each option adds or drops only its own leaves."""
  standard = _flat_shapes(models.get_model('testing', num_classes=3), 16)
  shapes = _flat_shapes(models.get_model('testing', num_classes=3, **options), 16)
  block = 'Transformer/encoderblock_0/'
  attn = block + 'MultiHeadDotProductAttention_1/'
  added = {attn + f'{m}_norm/{p}' for m in ('query', 'key') for p in ('scale', 'bias')}
  if not options.get('use_bias', True):
    added = {k for k in added if k.endswith('scale')}
  dropped = set()
  if options.get('parallel_block'):
    dropped |= {block + 'LayerNorm_2/scale', block + 'LayerNorm_2/bias'}
  if not options.get('use_bias', True):
    dropped |= {block + 'LayerNorm_0/bias', block + 'LayerNorm_2/bias',
                'Transformer/encoder_norm/bias'}
    dropped |= {attn + f'{m}/bias' for m in ('query', 'key', 'value')}
  first_block = lambda keys: {k for k in keys if not k.startswith(  # noqa: E731
      'Transformer/encoderblock_1/')}
  assert first_block(set(shapes) - set(standard)) == (added if options.get('qk_norm') else set())
  assert first_block(set(standard) - set(shapes)) == dropped
  if options.get('qk_norm'):
    assert shapes[attn + 'query_norm/scale'] == (8,)  # the head's features, shared by heads


def _layer_norm(x, params, centred: bool):
  if centred:
    x = x - x.mean(-1, keepdims=True)
  x = x / np.sqrt((x**2).mean(-1, keepdims=True) + 1e-6) * params['scale']
  return x + params['bias'] if centred else x


def _reference_block(x, p, qk_norm, parallel_block, use_bias):
  """One encoder block in numpy, from the papers' equations."""
  norm = lambda v, q: _layer_norm(v, q, use_bias)  # noqa: E731
  gelu = lambda v: 0.5 * v * (1 + np.tanh(np.sqrt(2 / np.pi) * (v + 0.044715 * v**3)))  # noqa
  attn = p['MultiHeadDotProductAttention_1']
  y = norm(x, p['LayerNorm_0'])
  q, k, v = (np.einsum('bnd,dhk->bnhk', y, attn[m]['kernel']) +
             (attn[m]['bias'] if use_bias else 0.) for m in ('query', 'key', 'value'))
  if qk_norm:
    q, k = norm(q, attn['query_norm']), norm(k, attn['key_norm'])
  logits = np.einsum('bqhk,bshk->bhqs', q, k) / np.sqrt(q.shape[-1])
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  heads = np.einsum('bhqs,bshk->bqhk', weights, v)
  attended = np.einsum('bqhk,hkd->bqd', heads, attn['out']['kernel']) + attn['out']['bias']
  mlp_params = p['MlpBlock_3']
  mlp = lambda z: (gelu(z @ mlp_params['Dense_0']['kernel'] + mlp_params['Dense_0']['bias'])  # noqa
                   @ mlp_params['Dense_1']['kernel'] + mlp_params['Dense_1']['bias'])
  if parallel_block:
    return x + attended + mlp(y)
  x = x + attended
  return x + mlp(norm(x, p['LayerNorm_2']))


@pytest.mark.parametrize('options', VARIANTS, ids=_IDS)
def test_block_options_match_an_independent_computation(options):
  """Every combination computes the papers' block (the standard one with all options off)."""
  full = dict(dict(qk_norm=False, parallel_block=False, use_bias=True), **options)
  block = vit.Encoder1DBlock(mlp_dim=32, num_heads=2, **full)
  x = np.random.RandomState(0).standard_normal((2, 5, 16)).astype(np.float32)
  shapes = nn.unbox(jax.eval_shape(lambda: block.init(jax.random.key(0), x, None, True)))
  rng = np.random.RandomState(1)
  params = jax.tree_util.tree_map_with_path(
      lambda path, s: ((path[-1].key == 'scale') + 0.3 * rng.standard_normal(s.shape)).astype(
          np.float32), shapes['params'])
  ours, _ = block.apply({'params': params}, x, None, True)
  expected = _reference_block(x.astype(np.float64), jax.tree.map(np.float64, params), **full)
  np.testing.assert_allclose(ours, expected, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize('scan_layers', [False, True])
def test_options_survive_save_load_and_are_read_off_the_weights(tmp_path, scan_layers):
  """A ViT-22B-block model saved as .npz (unscanned, released names) loads back into the same
  tree, and predict / export / inspect rebuild the same model from the file alone."""
  options = dict(qk_norm=True, parallel_block=True, use_bias=False, classifier='map')
  model = models.get_model('testing', num_classes=3, scan_layers=scan_layers, **options)
  params = workdirs.random_params(model, 16)
  checkpoint.save_npz(params, str(tmp_path / 'w.npz'))
  loaded = checkpoint.load(str(tmp_path / 'w.npz'))
  assert model_from_weights.architecture(loaded) | options == model_from_weights.architecture(
      loaded)
  rebuilt, rebuilt_params, size = model_from_weights.build(str(tmp_path / 'w.npz'))
  assert size == 16 and [getattr(rebuilt, o) for o in OPTIONS] == [True, True, False]
  images = np.random.RandomState(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  np.testing.assert_allclose(rebuilt.apply({'params': rebuilt_params}, images),
                             model.apply({'params': params}, images), atol=1e-5)


def test_a_file_missing_a_leaf_other_blocks_have_names_it(tmp_path):
  model = models.get_model('testing', num_classes=3, qk_norm=True)
  params = flax.traverse_util.flatten_dict(workdirs.random_params(model, 16), sep='/')
  del params['Transformer/encoderblock_1/MultiHeadDotProductAttention_1/key_norm/scale']
  np.savez(tmp_path / 'w.npz', **params)
  with pytest.raises(ValueError, match=r"missing keys: \['Transformer/encoderblock_1/"
                     r"MultiHeadDotProductAttention_1/key_norm/scale'\]"):
    checkpoint.load(str(tmp_path / 'w.npz'))


def _optimizer_config(*overrides):
  return workdirs.quickstart_config('model.name=testing', 'optimizer.name=big_vision_adafactor',
                                    'optimizer.momentum_dtype=bfloat16', *overrides)


def test_big_vision_adafactor_factors_kernels_and_keeps_momentum_in_bf16():
  """Per kernel of rows x cols: rows + cols second-moment floats, momentum in bfloat16, and
  each state sharded by the names of the axes it kept (FSDP over 'embed')."""
  config = _optimizer_config('model.hidden_size=64', 'model.mlp_dim=128', 'mesh.data=2',
                             'mesh.fsdp=4', 'model.scan_layers=True')
  state = trainer.build(config).abstract_state
  flat = {jax.tree_util.keystr(p): x for p, x in
          jax.tree_util.tree_flatten_with_path(state.opt_state)[0]}
  mlp = "['Transformer']['encoderblock']['MlpBlock_3']['Dense_0']['kernel']"
  kernel = state.params['Transformer']['encoderblock']['MlpBlock_3']['Dense_0']['kernel']
  assert kernel.shape == (4, 64, 128)  # (layers, embed, mlp)
  (row,) = [x for k, x in flat.items() if k.endswith('.v_row' + mlp)]
  (col,) = [x for k, x in flat.items() if k.endswith('.v_col' + mlp)]
  (momentum,) = [x for k, x in flat.items() if k.endswith('.ema' + mlp)]
  assert (row.shape, col.shape) == ((4, 64), (4, 128))
  assert row.sharding.spec == jax.sharding.PartitionSpec(None, 'fsdp')
  assert momentum.dtype == jnp.bfloat16 and momentum.shape == kernel.shape
  assert momentum.sharding.spec == kernel.sharding.spec


def test_head_and_body_decay_at_their_own_rates():
  """With a zero gradient only the decoupled weight decay moves the parameters: kernels by
  lr * weight_decay, the head's kernel by lr * head_weight_decay, biases and norms not at all."""
  config = _optimizer_config('optimizer.weight_decay=0.03', 'optimizer.head_weight_decay=3.0',
                             'schedule.warmup_steps=0', 'schedule.decay_type=constant',
                             'schedule.base_lr=0.1')
  tx, _ = optim.make_optimizer(config)
  params = {'head': {'kernel': jnp.ones((4, 3)), 'bias': jnp.ones(3)},
            'Transformer': {'encoderblock_0': {'MlpBlock_3': {'Dense_0': {
                'kernel': jnp.ones((40, 64)), 'bias': jnp.ones(64)}}}}}
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  dense = updates['Transformer']['encoderblock_0']['MlpBlock_3']['Dense_0']
  np.testing.assert_allclose(updates['head']['kernel'], -0.1 * 3.0, rtol=1e-6)
  np.testing.assert_allclose(dense['kernel'], -0.1 * 0.03, rtol=1e-6)
  np.testing.assert_array_equal(updates['head']['bias'], 0.)
  np.testing.assert_array_equal(dense['bias'], 0.)


def test_rsqrt_schedule_with_warmup_and_cooldown():
  config = workdirs.quickstart_config(
      'total_steps=1000', 'schedule.base_lr=0.1', 'schedule.warmup_steps=100',
      'schedule.decay_type=rsqrt', 'schedule.timescale=100', 'schedule.cooldown_steps=200')
  schedule = optim.make_schedule(config)
  expected = {50: 0.05, 100: 0.1, 400: 0.1 / 2, 800: 0.1 / np.sqrt(8),
              900: 0.1 / np.sqrt(9) / 2, 1000: 0.}
  for step, lr in expected.items():
    assert float(schedule(step)) == pytest.approx(lr, rel=1e-5), step


def test_the_vit22b_block_learns(quickstart_config):
  """60 steps of the trainer's own step on one batch of 16 digits with ViT-22B's block
  (parallel, without biases, qk_norm; each option alone is checked against the equations
  above): the loss falls from chance (ln 10 = 2.30) below 0.5 (0.16 measured; a model that
  does not learn stays near 2.3). README has each variant's full quickstart, 3 seeds."""
  from vit_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  config = quickstart_config
  with config.unlocked():
    config.model = dict(name='testing', qk_norm=True, parallel_block=True, use_bias=False)
    config.total_steps = 60
    config.schedule.update(base_lr=1e-2, warmup_steps=3)
  training = trainer.build(config)
  batch = next(pipeline.train_iterator(config, training.mesh, 0))
  step = trainer.jit_train_step(
      trainer.make_train_step(config, training, jax.random.key(1)), training)
  state = training.init_fn(jax.random.key(0))
  losses = []
  for _ in range(config.total_steps):
    state, metrics = step(state, batch)
    losses.append(float(metrics['train_loss']))
  assert losses[0] > 2.0 and np.mean(losses[-3:]) < 0.5, losses[::5]


@pytest.fixture(scope='module')
def aot_tables():
  """benchmarks/aot_tables.py (a script: loaded once, as it defines absl flags)."""
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'benchmarks',
                      'aot_tables.py')
  spec = importlib.util.spec_from_file_location('aot_tables', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize('fits_from,documented,expected,compiled', [
    (64, 'v4-256', 'v4-128', ['v4-256', 'v4-128', 'v4-64']),  # halving while it fits
    (1024, 'v4-256', 'v4-2048', ['v4-256', 'v4-512', 'v4-1024', 'v4-2048']),  # doubling
    (4, 'v4-16', 'v4-8', ['v4-16', 'v4-8']),  # down to the generation's smallest slice
    (10**6, 'v4-256', None, ['v4-256', 'v4-512', 'v4-1024', 'v4-2048']),  # not within 3 doublings
])
def test_smallest_slice_compiles_each_slice_once(aot_tables, fits_from, documented, expected,
                                                 compiled):
  """The giants table's search: here a config fits a slice of at least `fits_from` chips."""
  check = lambda config, target: {'fits': target.num_devices >= fits_from}  # noqa: E731
  tried, smallest = aot_tables.smallest_slice(None, documented, check)
  assert smallest == expected and [name for name, _ in tried] == compiled
