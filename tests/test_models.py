import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax import models


def _shapes(model, image_size):
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                                jnp.zeros((1, image_size, image_size, 3)),
                                                train=False))
  return {k: v.shape for k, v in
          flax.traverse_util.flatten_dict(nn.unbox(variables['params']), sep='/').items()}


def test_vit_b16_has_released_names_and_shapes():
  shapes = _shapes(models.get_model('ViT-B_16', num_classes=1000), 224)
  block = 'Transformer/encoderblock_11'
  expected = {
      'embedding/kernel': (16, 16, 3, 768), 'embedding/bias': (768,), 'cls': (1, 1, 768),
      'Transformer/posembed_input/pos_embedding': (1, 197, 768),
      f'{block}/LayerNorm_0/scale': (768,),
      f'{block}/MultiHeadDotProductAttention_1/query/kernel': (768, 12, 64),
      f'{block}/MultiHeadDotProductAttention_1/key/bias': (12, 64),
      f'{block}/MultiHeadDotProductAttention_1/out/kernel': (12, 64, 768),
      f'{block}/MultiHeadDotProductAttention_1/out/bias': (768,),
      f'{block}/LayerNorm_2/bias': (768,),
      f'{block}/MlpBlock_3/Dense_0/kernel': (768, 3072),
      f'{block}/MlpBlock_3/Dense_1/kernel': (3072, 768),
      'Transformer/encoder_norm/scale': (768,),
      'head/kernel': (768, 1000), 'head/bias': (1000,),
  }
  for key, shape in expected.items():
    assert shapes[key] == shape, key
  assert 'Transformer/encoderblock_12/LayerNorm_0/scale' not in shapes
  assert abs(sum(np.prod(s) for s in shapes.values()) / 1e6 - 86.6) < 0.2  # paper: 86M


@pytest.mark.parametrize('classifier,out_shape', [('token', (2, 7)), ('gap', (2, 7)),
                                                  ('unpooled', (2, 16, 16))])
def test_output_shapes(classifier, out_shape):
  model = models.get_model('testing', num_classes=7, classifier=classifier)
  images = jax.random.uniform(jax.random.key(1), (2, 16, 16, 3), minval=-1, maxval=1)
  variables = model.init(jax.random.key(0), images, train=False)
  if classifier != 'unpooled':  # the head starts at zero: give it weights to see the features
    variables = flax.core.unfreeze(nn.unbox(variables))
    variables['params']['head']['kernel'] = jax.random.normal(jax.random.key(2), (16, 7))
  logits = model.apply(variables, images, train=False)
  assert logits.shape == out_shape
  assert np.all(np.isfinite(logits))
  # Different images give different outputs, so the shape is not of constants.
  assert np.max(np.abs(logits[0] - logits[1])) > 1e-3


def test_head_starts_at_zero_and_representation_layer():
  model = models.get_model('testing', num_classes=3, representation_size=8)
  images = jnp.ones((2, 16, 16, 3))
  params = nn.unbox(model.init(jax.random.key(0), images, train=False)['params'])
  assert params['pre_logits']['kernel'].shape == (16, 8)
  np.testing.assert_array_equal(model.apply({'params': params}, images), np.zeros((2, 3)))


def test_unknown_names_are_named_in_errors():
  with pytest.raises(ValueError, match='ViT-Q_16'):
    models.get_model('ViT-Q_16')
  with pytest.raises(ValueError, match='hiden_size'):
    models.get_model('testing', hiden_size=3)
