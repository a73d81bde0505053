"""Released-weight layouts: each file is written from our own params by an independent converter
to the external layout, then `checkpoint.load` must give back params with the same logits."""
import re

import flax
import flax.linen as nn
import jax
import ml_dtypes
import numpy as np
import pytest
import scipy.ndimage
from safetensors.numpy import save_file

from vit_jax import checkpoint, models

IMAGES = np.random.RandomState(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
HEADS = 2  # the 'testing' model's


def _params(model, seed=0):
  """Init, then random values everywhere (a zero head would make every parity test pass)."""
  params = nn.unbox(model.init(jax.random.key(seed), IMAGES, train=False)['params'])
  rng = np.random.RandomState(seed)
  return jax.tree.map(lambda x: np.asarray(x) + 0.2 * rng.standard_normal(x.shape).astype(
      np.float32), params)


def _flat(params):
  return flax.traverse_util.flatten_dict(params, sep='/')


def _unflat(flat):
  return flax.traverse_util.unflatten_dict(flat, sep='/')


def _logits(model, params):
  return np.asarray(jax.jit(model.apply)({'params': params}, IMAGES))


def _assert_same_logits(model, source, path, **load_kwargs):
  loaded = checkpoint.load(str(path), **load_kwargs)
  assert sorted(_flat(loaded)) == sorted(_flat(source))
  np.testing.assert_allclose(_logits(model, loaded), _logits(model, source), rtol=1e-5, atol=1e-5)


# --- converters from our layout to the external ones (written for these tests) ----------------

def _to_big_vision(flat, *, scanned=False, prefix=''):
  out = {}
  for key, value in flat.items():
    if key == 'Transformer/posembed_input/pos_embedding':
      out['pos_embedding'] = value[:, 1:]  # added to the patches before the class token
      continue
    key = (key.replace('/MultiHeadDotProductAttention_1/', '/MultiHeadDotProductAttention_0/')
           .replace('/LayerNorm_2/', '/LayerNorm_1/').replace('/MlpBlock_3/', '/MlpBlock_0/'))
    out[key] = value
  if scanned:
    stacked = {}
    for key in sorted(out):
      match = re.match(r'Transformer/encoderblock_(\d+)/(.*)', key)
      if match:
        stacked.setdefault(match[2], []).append((int(match[1]), out.pop(key)))
    for leaf, layers in stacked.items():
      out[f'Transformer/encoderblock/{leaf}'] = np.stack([v for _, v in sorted(layers)])
  return {prefix + k: v for k, v in out.items()}


def _torch_linear(kernel):
  """A (D, heads, D/heads) q/k/v kernel as a PyTorch Linear weight (out, in)."""
  return kernel.reshape(kernel.shape[0], -1).T


def _to_timm(flat):
  out = {'patch_embed.proj.weight': np.transpose(flat['embedding/kernel'], (3, 2, 0, 1)),
         'patch_embed.proj.bias': flat['embedding/bias'], 'cls_token': flat['cls'],
         'pos_embed': flat['Transformer/posembed_input/pos_embedding'],
         'norm.weight': flat['Transformer/encoder_norm/scale'],
         'norm.bias': flat['Transformer/encoder_norm/bias'],
         'head.weight': flat['head/kernel'].T, 'head.bias': flat['head/bias']}
  for i in range(2):
    b, t = f'Transformer/encoderblock_{i}/', f'blocks.{i}.'
    attn = b + 'MultiHeadDotProductAttention_1/'
    d = flat[attn + 'query/kernel'].shape[0]
    out[t + 'attn.qkv.weight'] = np.concatenate(
        [flat[attn + f'{m}/kernel'].reshape(d, d).T for m in ('query', 'key', 'value')])
    out[t + 'attn.qkv.bias'] = np.concatenate(
        [flat[attn + f'{m}/bias'].reshape(d) for m in ('query', 'key', 'value')])
    out[t + 'attn.proj.weight'] = flat[attn + 'out/kernel'].reshape(d, d).T
    out[t + 'attn.proj.bias'] = flat[attn + 'out/bias']
    for ours, theirs in (('LayerNorm_0', 'norm1'), ('LayerNorm_2', 'norm2')):
      out[t + theirs + '.weight'] = flat[b + ours + '/scale']
      out[t + theirs + '.bias'] = flat[b + ours + '/bias']
    for ours, theirs in (('Dense_0', 'fc1'), ('Dense_1', 'fc2')):
      out[t + f'mlp.{theirs}.weight'] = flat[b + f'MlpBlock_3/{ours}/kernel'].T
      out[t + f'mlp.{theirs}.bias'] = flat[b + f'MlpBlock_3/{ours}/bias']
  return {k: np.ascontiguousarray(v) for k, v in out.items()}


def _to_hf(flat):
  """Hugging Face ViTForImageClassification names, separate q/k/v, tanh pooler = pre_logits."""
  e = 'vit.embeddings.'
  out = {e + 'patch_embeddings.projection.weight':
         np.transpose(flat['embedding/kernel'], (3, 2, 0, 1)),
         e + 'patch_embeddings.projection.bias': flat['embedding/bias'],
         e + 'cls_token': flat['cls'],
         e + 'position_embeddings': flat['Transformer/posembed_input/pos_embedding'],
         'vit.layernorm.weight': flat['Transformer/encoder_norm/scale'],
         'vit.layernorm.bias': flat['Transformer/encoder_norm/bias'],
         'vit.pooler.dense.weight': flat['pre_logits/kernel'].T,
         'vit.pooler.dense.bias': flat['pre_logits/bias'],
         'classifier.weight': flat['head/kernel'].T, 'classifier.bias': flat['head/bias']}
  for i in range(2):
    b, t = f'Transformer/encoderblock_{i}/', f'vit.encoder.layer.{i}.'
    attn = b + 'MultiHeadDotProductAttention_1/'
    for m in ('query', 'key', 'value'):
      out[t + f'attention.attention.{m}.weight'] = _torch_linear(flat[attn + f'{m}/kernel'])
      out[t + f'attention.attention.{m}.bias'] = flat[attn + f'{m}/bias'].reshape(-1)
    out[t + 'attention.output.dense.weight'] = flat[attn + 'out/kernel'].reshape(
        -1, flat[attn + 'out/kernel'].shape[-1]).T
    out[t + 'attention.output.dense.bias'] = flat[attn + 'out/bias']
    for ours, theirs in (('LayerNorm_0', 'layernorm_before'), ('LayerNorm_2', 'layernorm_after')):
      out[t + theirs + '.weight'] = flat[b + ours + '/scale']
      out[t + theirs + '.bias'] = flat[b + ours + '/bias']
    for ours, theirs in (('Dense_0', 'intermediate.dense'), ('Dense_1', 'output.dense')):
      out[t + theirs + '.weight'] = flat[b + f'MlpBlock_3/{ours}/kernel'].T
      out[t + theirs + '.bias'] = flat[b + f'MlpBlock_3/{ours}/bias']
  return {k: np.ascontiguousarray(v) for k, v in out.items()}


# --- tests -------------------------------------------------------------------------------------

def test_npz_round_trip_is_exact(tmp_path):
  model = models.get_model('testing', num_classes=5, representation_size=8)
  params = _params(model)
  checkpoint.save_npz(params, str(tmp_path / 'p.npz'))
  loaded = _flat(checkpoint.load(str(tmp_path / 'p.npz')))
  assert loaded.keys() == _flat(params).keys()
  for key, value in _flat(params).items():
    np.testing.assert_array_equal(loaded[key], value)


@pytest.mark.parametrize('scanned,prefix', [(False, ''), (False, 'params/'), (True, 'params/')])
def test_big_vision_npz_gives_the_same_logits(tmp_path, scanned, prefix):
  model = models.get_model('testing', num_classes=5)
  params = _params(model)
  # big_vision gives the class token no position embedding: make the source agree.
  params['Transformer']['posembed_input']['pos_embedding'][:, 0] = 0.
  flat = _to_big_vision(_flat(params), scanned=scanned, prefix=prefix)
  if prefix:
    flat['opt/state/mu/head/kernel'] = np.zeros(3)  # a training checkpoint's optimizer state
  np.savez(tmp_path / 'bv.npz', **flat)
  _assert_same_logits(model, params, tmp_path / 'bv.npz')


def test_big_vision_map_head_and_gap_load(tmp_path):
  for overrides in (dict(classifier='map'), dict(classifier='gap')):
    model = models.get_model('testing', num_classes=5, **overrides)
    params = _params(model)
    flat = _flat(params)
    flat['Transformer/posembed_input/pos_embedding'] = np.concatenate(
        [np.zeros((1, 1, 16), np.float32), flat['Transformer/posembed_input/pos_embedding']], 1)
    bv = _to_big_vision(flat, scanned=True)
    assert bv['pos_embedding'].shape == (1, 16, 16)
    np.savez(tmp_path / 'bv.npz', **bv)
    _assert_same_logits(model, params, tmp_path / 'bv.npz')


def test_timm_fused_qkv_safetensors_give_the_same_logits(tmp_path):
  model = models.get_model('testing', num_classes=5)
  params = _params(model)
  save_file(_to_timm(_flat(params)), str(tmp_path / 'model.safetensors'))
  _assert_same_logits(model, params, tmp_path / 'model.safetensors', num_heads=HEADS)
  with pytest.raises(ValueError, match='num_heads'):
    checkpoint.load(str(tmp_path / 'model.safetensors'))  # width 16 is no named variant
  ti_width = models.get_model('testing', num_classes=5, hidden_size=192, num_heads=3)
  params = _params(ti_width)
  save_file(_to_timm(_flat(params)), str(tmp_path / 'ti.safetensors'))
  _assert_same_logits(ti_width, params, tmp_path / 'ti.safetensors')  # ViT-Ti's 3 heads


def test_hf_split_qkv_safetensors_give_the_same_logits(tmp_path):
  model = models.get_model('testing', num_classes=5, representation_size=16)
  params = _params(model)
  save_file(_to_hf(_flat(params)), str(tmp_path / 'model.safetensors'))
  _assert_same_logits(model, params, tmp_path / 'model.safetensors', num_heads=HEADS)


def test_released_hybrid_npz_with_4d_group_norm(tmp_path):
  model = models.get_model('testing', num_classes=5, resnet_layers=(1,), patch_size=1)
  params = _params(model)
  flat = _flat(params)
  assert flat['block1/unit1/conv_proj/kernel'].shape == (1, 1, 64, 256)
  released = {k: v.reshape(1, 1, 1, -1) if re.search(r'(^|/)gn', k) else v
              for k, v in flat.items()}
  assert released['gn_root/scale'].shape == (1, 1, 1, 64)
  np.savez(tmp_path / 'R50+ViT.npz', **released)
  _assert_same_logits(model, params, tmp_path / 'R50+ViT.npz')


def test_scanned_and_unscanned_load_each_other(tmp_path):
  plain = models.get_model('testing', num_classes=5)
  scanned = models.get_model('testing', num_classes=5, scan_layers=True)
  params = _params(plain)
  checkpoint.save_npz(params, str(tmp_path / 'plain.npz'))
  init_scanned = nn.unbox(scanned.init(jax.random.key(1), IMAGES)['params'])
  into_scanned = checkpoint.load_pretrained(str(tmp_path / 'plain.npz'), init_scanned)
  assert into_scanned['Transformer']['encoderblock']['LayerNorm_0']['scale'].shape == (2, 16)
  params_no_head = {**params, 'head': init_scanned['head']}
  np.testing.assert_allclose(_logits(scanned, into_scanned), _logits(plain, params_no_head),
                             rtol=1e-5, atol=1e-5)
  checkpoint.save_npz(into_scanned, str(tmp_path / 'from_scanned.npz'))
  with np.load(tmp_path / 'from_scanned.npz', allow_pickle=False) as npz:
    assert 'Transformer/encoderblock_1/LayerNorm_0/scale' in npz.files  # released layout
    assert not any(k.startswith('Transformer/encoderblock/') for k in npz.files)


def test_transfer_replaces_a_big_head_and_resizes_posemb(tmp_path):
  source = models.get_model('testing', num_classes=21843, representation_size=8)
  params = _params(source)
  pe = params['Transformer']['posembed_input']['pos_embedding']
  pe[:, 1:] = 0.25  # a constant grid stays constant when interpolated
  checkpoint.save_npz(params, str(tmp_path / 'i21k.npz'))
  target = models.get_model('testing', num_classes=10)  # 32px: 8x8 grid, no pre_logits
  init = nn.unbox(target.init(jax.random.key(1), np.zeros((1, 32, 32, 3)))['params'])
  merged = checkpoint.load_pretrained(str(tmp_path / 'i21k.npz'), init)
  assert merged['head']['kernel'].shape == (16, 10) and 'pre_logits' not in merged
  new_pe = merged['Transformer']['posembed_input']['pos_embedding']
  assert new_pe.shape == (1, 65, 16)
  np.testing.assert_array_equal(new_pe[0, 0], pe[0, 0])
  np.testing.assert_allclose(new_pe[0, 1:], 0.25, rtol=1e-6)
  relative = models.get_model('testing', num_classes=10, posemb='relative')
  small = nn.unbox(relative.init(jax.random.key(1), IMAGES)['params'])
  checkpoint.save_npz(small, str(tmp_path / 'rel.npz'))
  big = nn.unbox(relative.init(jax.random.key(1), np.zeros((1, 32, 32, 3)))['params'])
  merged = checkpoint.load_pretrained(str(tmp_path / 'rel.npz'), big)
  table = merged['Transformer']['encoderblock_0']['MultiHeadDotProductAttention_1']
  assert table['relative_bias'].shape == (15, 15, 2)


def test_bad_files_name_the_bad_keys(tmp_path):
  model = models.get_model('testing', num_classes=5)
  flat = _flat(_params(model))
  flat['Transformer/encoderblock_0/MlpBlock_3/Dense_7/kernel'] = np.zeros(2)
  del flat['Transformer/encoderblock_1/LayerNorm_2/bias']
  np.savez(tmp_path / 'bad.npz', **flat)
  with pytest.raises(ValueError, match=r'(?s)unknown keys.*Dense_7.*missing keys.*'
                                       r'encoderblock_1/LayerNorm_2/bias'):
    checkpoint.load(str(tmp_path / 'bad.npz'))
  timm = _to_timm(_flat(_params(model)))
  timm['blocks.0.ls1.gamma'] = np.zeros(2, np.float32)  # LayerScale: our ViT has none
  save_file(timm, str(tmp_path / 'odd.safetensors'))
  with pytest.raises(ValueError, match=r'blocks\.0\.ls1\.gamma'):
    checkpoint.load(str(tmp_path / 'odd.safetensors'), num_heads=HEADS)
  gap = models.get_model('testing', num_classes=5, classifier='gap')
  init = nn.unbox(gap.init(jax.random.key(1), IMAGES)['params'])
  checkpoint.save_npz(_params(model), str(tmp_path / 'token.npz'))
  with pytest.raises(ValueError, match='(?s)class-token.*not in model: cls'):
    checkpoint.load_pretrained(str(tmp_path / 'token.npz'), init)


@pytest.mark.parametrize('dtype', [ml_dtypes.bfloat16, np.float16], ids=['bfloat16', 'float16'])
def test_half_precision_files_resize_to_a_new_resolution(tmp_path, dtype):
  """scipy interpolates no bfloat16 or float16: resized in float32, cast back."""
  for posemb in ('learn', 'relative'):
    model = models.get_model('testing', num_classes=5, posemb=posemb)
    def shapes(size):
      return _flat(nn.unbox(jax.eval_shape(lambda: model.init(  # pylint: disable=cell-var-from-loop
          jax.random.key(1), np.zeros((1, size, size, 3))))['params']))
    rng = np.random.RandomState(0)
    half = {k: rng.standard_normal(s.shape).astype(dtype) for k, s in shapes(16).items()}
    np.savez(tmp_path / 'half.npz', **half)  # bfloat16 is stored as 2-byte records ('|V2')
    big = _unflat(shapes(32))  # 32px: an 8x8 grid instead of 4x4
    merged = _flat(checkpoint.load_pretrained(str(tmp_path / 'half.npz'), big))
    if posemb == 'learn':
      key = 'Transformer/posembed_input/pos_embedding'
      expected = checkpoint.resize_posemb(half[key].astype(np.float32), 65)
    else:
      key = 'Transformer/encoderblock_0/MultiHeadDotProductAttention_1/relative_bias'
      expected = scipy.ndimage.zoom(half[key].astype(np.float32), (15 / 7, 15 / 7, 1), order=1)
    assert merged[key].shape == expected.shape
    np.testing.assert_array_equal(merged[key], expected.astype(dtype).astype(np.float32))
