"""BiT ResNet classifiers from the registry: layout, shapes, training and transfer."""
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vit_jax import inspect, models
from vit_jax.weights import files, model_from_weights
from vit_jax.models import bit, mae


def _flat(params):
  return flax.traverse_util.flatten_dict(nn.unbox(params), sep='/')


def test_r50x1_has_resnet50s_parameter_count_and_bit_names():
  # Same layers as torchvision's resnet50 (GroupNorm's scale/bias in place of BatchNorm's):
  # torchvision counts 25,557,032 parameters for 1000 classes.
  model = models.get_model('BiT-R50x1', num_classes=1000)
  shapes = _flat(jax.eval_shape(lambda: model.init(jax.random.key(0),
                                                   jnp.zeros((1, 224, 224, 3))))['params'])
  assert sum(np.prod(s.shape) for s in shapes.values()) == 25_557_032
  assert shapes['conv_root/kernel'].shape == (7, 7, 3, 64)
  assert shapes['block4/unit3/conv3/kernel'].shape == (1, 1, 512, 2048)
  assert shapes['block4/unit1/conv_proj/kernel'].shape == (1, 1, 1024, 2048)
  assert shapes['head/kernel'].shape == (2048, 1000)
  assert {k.split('/')[0] for k in shapes} == {'conv_root', 'gn_root', 'block1', 'block2',
                                               'block3', 'block4', 'head'}


# Two stages keep the compiles small; the parameter count above checks all four.
SMALL = dict(stage_sizes=(1, 1))


def test_any_image_size_gives_logits_and_features():
  model = models.get_model('BiT-R14x1', num_classes=7, **SMALL)
  images = jax.random.uniform(jax.random.key(0), (2, 33, 33, 3), minval=-1, maxval=1)
  params = nn.unbox(jax.jit(model.init)(jax.random.key(1), images)['params'])
  assert np.all(jax.jit(model.apply)({'params': params}, images) == 0)  # zero-initialised head
  params['head']['kernel'] = jnp.ones_like(params['head']['kernel'])
  logits = jax.jit(model.apply)({'params': params}, images)
  features = jax.jit(models.get_model('BiT-R14x1', num_classes=None, **SMALL).apply)(
      {'params': params}, images)
  assert logits.shape == (2, 7) and features.shape == (2, 512)
  np.testing.assert_allclose(logits, np.repeat(features.sum(-1, keepdims=True), 7, -1),
                             rtol=1e-5)
  assert models.pixels_per_token(model) == 1  # preflight accepts any image size


def test_bad_names_and_options_are_refused():
  with pytest.raises(ValueError, match=r'depths \[14, 26, 50, 101, 152\]'):
    models.get_model('BiT-R18x1')
  with pytest.raises(ValueError, match=r"unknown model option\(s\) \['num_layers'\]"):
    models.get_model('BiT-R14x1', num_layers=4)
  with pytest.raises(ValueError, match='needs a ViT'):
    mae.get_model('mae', 'BiT-R14x1')


def test_trains_and_transfers_into_a_new_head(tmp_path):
  """Loss falls on a fixed batch; the trained weights (saved as .npz) load into a model with
  another head, from the boxed `model.init` output, as fine-tuning does, and predict rebuilds
  the architecture from them."""
  model = models.get_model('BiT-R14x1', num_classes=4, **SMALL)
  images = jax.random.uniform(jax.random.key(0), (8, 16, 16, 3), minval=-1, maxval=1)
  labels = jax.nn.one_hot(jnp.arange(8) % 4, 4)
  params = nn.unbox(jax.jit(model.init)(jax.random.key(1), images)['params'])
  tx = optax.adam(1e-3)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state):
    def loss_fn(p):
      return optax.softmax_cross_entropy(model.apply({'params': p}, images, train=True),
                                         labels).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state, loss

  losses = []
  for _ in range(8):
    params, opt_state, loss = step(params, opt_state)
    losses.append(float(loss))
  assert losses[0] == pytest.approx(np.log(4), rel=1e-4) and losses[-1] < 0.5 * losses[0]

  path = str(tmp_path / 'bit.npz')
  files.save_npz(params, path)
  target = models.get_model('BiT-R14x1', num_classes=10, **SMALL)
  boxed = jax.jit(target.init)(jax.random.key(2), jnp.zeros((1, 24, 24, 3)))['params']
  loaded = _flat(files.load_pretrained(path, boxed))
  trained, fresh = _flat(params), _flat(boxed)
  assert loaded['head/kernel'].shape == (512, 10)
  np.testing.assert_array_equal(loaded['head/kernel'], fresh['head/kernel'])
  for key in trained:
    if not key.startswith('head/'):
      np.testing.assert_array_equal(loaded[key], trained[key], err_msg=key)

  built, built_params, _ = model_from_weights.build(path)
  assert isinstance(built, bit.ResNet) and built.stage_sizes == (1, 1)
  np.testing.assert_allclose(jax.jit(built.apply)({'params': built_params}, images),
                             jax.jit(model.apply)({'params': params}, images), rtol=1e-5,
                             atol=1e-6)
  with pytest.raises(ValueError, match='holds a ResNet'):
    inspect.analyse(path, [])
