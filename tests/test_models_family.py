"""The model family: variant sizes, hybrids, heads, position embeddings, scan/remat, dtypes."""
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax import models
from vit_jax.weights import formats


def _abstract_params(model, image_size):
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                                jnp.zeros((1, image_size, image_size, 3)),
                                                train=False))
  return flax.traverse_util.flatten_dict(nn.unbox(variables['params']), sep='/')


def _init(model, images):
  return nn.unbox(model.init(jax.random.key(0), images, train=False)['params'])


def _jitter(params, seed=0):
  """Random non-zero values everywhere (the zero-initialised head would hide differences)."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(treedef, [x + 0.2 * jax.random.normal(k, x.shape, x.dtype)
                                      for x, k in zip(leaves, keys)])


IMAGES = jax.random.uniform(jax.random.key(1), (2, 16, 16, 3), minval=-1, maxval=1)


@pytest.mark.parametrize('name,millions', [('ViT-Ti_16', 5.7), ('ViT-B_16', 86.6),
                                           ('ViT-L_16', 304.3)])
def test_parameter_counts_match_the_paper(name, millions):
  shapes = _abstract_params(models.get_model(name, num_classes=1000), 224)
  assert sum(np.prod(s.shape) for s in shapes.values()) / 1e6 == pytest.approx(millions, abs=0.1)


def test_hybrid_r50_b16_has_the_released_layout():
  shapes = {k: v.shape for k, v in
            _abstract_params(models.get_model('R50+ViT-B_16', num_classes=1000), 224).items()}
  expected = {
      'conv_root/kernel': (7, 7, 3, 64), 'gn_root/scale': (64,), 'gn_root/bias': (64,),
      'block1/unit1/conv1/kernel': (1, 1, 64, 64), 'block1/unit1/conv2/kernel': (3, 3, 64, 64),
      'block1/unit1/conv3/kernel': (1, 1, 64, 256), 'block1/unit1/conv_proj/kernel':
      (1, 1, 64, 256), 'block1/unit1/gn_proj/scale': (256,), 'block1/unit3/gn3/bias': (256,),
      'block2/unit1/conv_proj/kernel': (1, 1, 256, 512), 'block2/unit4/conv2/kernel':
      (3, 3, 128, 128), 'block3/unit9/conv3/kernel': (1, 1, 256, 1024),
      'embedding/kernel': (1, 1, 1024, 768), 'Transformer/posembed_input/pos_embedding':
      (1, 197, 768)}
  for key, shape in expected.items():
    assert shapes[key] == shape, key
  assert 'block3/unit10/conv1/kernel' not in shapes and 'block4/unit1/conv1/kernel' not in shapes
  assert 'block1/unit2/conv_proj/kernel' not in shapes  # only where shape or stride changes
  stem = sum(np.prod(s) for k, s in shapes.items() if k.startswith(('block', 'conv_root', 'gn_')))
  # Bottleneck unit with w inner channels: 1x1 (in->w) + 3x3 (w->w) + 1x1 (w->4w) + 3 GroupNorms.
  unit = lambda cin, w: cin * w + 9 * w * w + w * 4 * w + 2 * (w + w + 4 * w)  # noqa: E731
  proj = lambda cin, w: cin * 4 * w + 2 * 4 * w  # noqa: E731
  expected_stem = (7 * 7 * 3 * 64 + 2 * 64
                   + unit(64, 64) + proj(64, 64) + 2 * unit(256, 64)
                   + unit(256, 128) + proj(256, 128) + 3 * unit(512, 128)
                   + unit(512, 256) + proj(512, 256) + 8 * unit(1024, 256))
  assert stem == expected_stem  # about 11.9M: ResNet-50 stages 1-3, stage 3 with 9 units
  r26 = _abstract_params(models.get_model('R26+ViT-S_32', num_classes=10), 224)
  assert r26['block4/unit2/conv3/kernel'].shape == (1, 1, 512, 2048)
  assert r26['Transformer/posembed_input/pos_embedding'].shape == (1, 50, 384)


@pytest.mark.parametrize('overrides,out_shape,extra_keys', [
    (dict(classifier='map'), (2, 7), ['MAPHead_0/probe',
                                      'MAPHead_0/MultiHeadDotProductAttention_0/query/kernel',
                                      'MAPHead_0/LayerNorm_0/scale',
                                      'MAPHead_0/MlpBlock_0/Dense_1/kernel']),
    (dict(posemb='learn2d', classifier='gap'), (2, 7),
     ['posembed_input/pos_embedding_y', 'posembed_input/pos_embedding_x']),
    (dict(posemb='relative'), (2, 7),
     ['Transformer/encoderblock_0/MultiHeadDotProductAttention_1/relative_bias']),
    (dict(posemb='sincos2d', classifier='gap'), (2, 7), []),
    (dict(posemb='none', classifier='unpooled'), (2, 16, 16), []),
])
def test_head_and_posemb_variants(overrides, out_shape, extra_keys):
  model = models.get_model('testing', num_classes=7, **overrides)
  params = _jitter(_init(model, IMAGES))
  flat = flax.traverse_util.flatten_dict(params, sep='/')
  for key in extra_keys:
    assert key in flat, key
  has_learned_1d = 'Transformer/posembed_input/pos_embedding' in flat
  assert has_learned_1d == (overrides.get('posemb', 'learn') == 'learn')
  apply = jax.jit(model.apply)
  out = apply({'params': params}, IMAGES)
  assert out.shape == out_shape and np.all(np.isfinite(out))
  if overrides.get('posemb') in ('sincos2d', 'none'):  # fixed or no position: same params
    other = 'none' if overrides['posemb'] == 'sincos2d' else 'sincos2d'
    moved = jax.jit(model.clone(posemb=other).apply)({'params': params}, IMAGES)
    assert np.max(np.abs(moved - out)) > 1e-3  # the sin-cos embedding changes the output
  if extra_keys:  # the variant's own parameters change the output
    flat[extra_keys[-1]] = flat[extra_keys[-1]] + 1.
    changed = apply({'params': flax.traverse_util.unflatten_dict(flat, sep='/')}, IMAGES)
    assert np.max(np.abs(changed - out)) > 1e-3


def test_learn2d_and_relative_shapes():
  flat = _abstract_params(models.get_model('ViT-S_16', posemb='learn2d'), 224)
  assert flat['posembed_input/pos_embedding_y'].shape == (1, 14, 1, 192)
  assert flat['posembed_input/pos_embedding_x'].shape == (1, 1, 14, 192)
  flat = _abstract_params(models.get_model('ViT-S_16', posemb='relative'), 224)
  assert flat['Transformer/encoderblock_0/MultiHeadDotProductAttention_1/relative_bias'].shape \
      == (27, 27, 6)


@pytest.mark.parametrize('remat_policy', ['none', 'dots_saveable'])
def test_scanned_blocks_equal_looped_blocks(remat_policy):
  looped = models.get_model('testing', num_classes=5, representation_size=8)
  scanned = models.get_model('testing', num_classes=5, representation_size=8, scan_layers=True,
                             remat_policy=remat_policy)
  params = _jitter(_init(looped, IMAGES))
  flat = formats.scan(flax.traverse_util.flatten_dict(params, sep='/'))
  assert flat['Transformer/encoderblock/MlpBlock_3/Dense_0/kernel'].shape == (2, 16, 32)
  stacked = flax.traverse_util.unflatten_dict(flat, sep='/')
  # The scanned model's own init has the same tree (and a leading 'layers' logical axis).
  boxed = scanned.init(jax.random.key(0), IMAGES, train=False)['params']
  assert jax.tree.structure(nn.unbox(boxed)) == jax.tree.structure(stacked)
  spec = nn.get_partition_spec(boxed)['Transformer']['encoderblock']['MultiHeadDotProductAttention_1']
  assert tuple(spec['query']['kernel']) == ('layers', 'embed', 'heads', 'kv')
  np.testing.assert_allclose(scanned.apply({'params': stacked}, IMAGES),
                             looped.apply({'params': params}, IMAGES), rtol=1e-5, atol=1e-5)
  grad = lambda m, p: jax.jit(jax.grad(  # noqa: E731
      lambda p: jnp.sum(m.apply({'params': p}, IMAGES) ** 2)))(p)
  g_loop = formats.scan(flax.traverse_util.flatten_dict(grad(looped, params), sep='/'))
  g_scan = flax.traverse_util.flatten_dict(grad(scanned, stacked), sep='/')
  for key, value in g_loop.items():
    np.testing.assert_allclose(g_scan[key], value, rtol=1e-4, atol=1e-5, err_msg=key)


def test_stochastic_depth_scanned_and_looped_train():
  for scan in (False, True):
    model = models.get_model('testing', num_classes=5, stochastic_depth=0.5, scan_layers=scan)
    params = _jitter(_init(model, IMAGES))
    run = jax.jit(lambda seed: model.apply(  # noqa: E731
        {'params': params}, IMAGES, train=True, rngs={'dropout': jax.random.key(seed)}))
    outs = [np.asarray(run(s)) for s in range(3)]
    assert any(np.max(np.abs(o - outs[0])) > 1e-4 for o in outs[1:])  # layers get dropped
    np.testing.assert_array_equal(model.apply({'params': params}, IMAGES),
                                  model.apply({'params': params}, IMAGES, train=False))


def test_bfloat16_compute_keeps_float32_params():
  model = models.get_model('testing', num_classes=5, dtype='bfloat16')
  params = _jitter(_init(model, IMAGES))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  reference = models.get_model('testing', num_classes=5).apply({'params': params}, IMAGES)
  out = model.apply({'params': params}, IMAGES)
  assert out.dtype == jnp.float32
  # bfloat16 compute rounds (so the output differs) but stays close to float32's.
  assert np.max(np.abs(out - reference)) > 1e-4
  np.testing.assert_allclose(out, reference, rtol=0.05, atol=0.05)
  with pytest.raises(ValueError, match='bfloat61'):
    models.get_model('testing', dtype='bfloat61')
  with pytest.raises(ValueError, match='R77'):
    models.get_model('R77+ViT-B_16')
