"""Released weight layouts <-> our flat '/'-joined parameter names (the vit_jax .npz layout).

Readers never unpickle: `.npz` through np.load(allow_pickle=False), `.safetensors` through
safetensors. The layout is detected from the keys:
- vit_jax: our names as they are (GroupNorm params may be stored (1, 1, 1, C)).
- big_vision: optional `params/` prefix, top-level `pos_embedding` added before the class token,
  block modules numbered `LayerNorm_0/MultiHeadDotProductAttention_0/LayerNorm_1/MlpBlock_0`,
  optionally scanned (one stacked leaf per name under `Transformer/encoderblock/`).
- timm: PyTorch names, fused `attn.qkv`, (out, in) Linear and (D, C, P, P) conv layouts; the
  attention-pooling head (`attn_pool`) too.
- hf: Hugging Face ViTModel / ViTForImageClassification, separate query/key/value.
The PyTorch layouts are tables read both ways: `to_torch` writes them (vit_jax.export).
"""
import re

import numpy as np

from vit_jax.storage import paths
from vit_jax.models.mae import PRETRAINING_ONLY

BLOCK = 'Transformer/encoderblock_{i}/'
ATTN = 'MultiHeadDotProductAttention_1'
POSEMB = 'Transformer/posembed_input/pos_embedding'
SCANNED = 'Transformer/encoderblock/'

# Our (= released vit_jax) layout, one pattern per parameter family.
_KNOWN = [re.compile(p) for p in (
    r'embedding/(kernel|bias)', r'cls', r'Transformer/posembed_input/pos_embedding',
    r'posembed_input/pos_embedding_(x|y)',
    r'Transformer/encoderblock_\d+/LayerNorm_[02]/(scale|bias)',
    r'Transformer/encoderblock_\d+/MultiHeadDotProductAttention_1/(query|key|value|out)/'
    r'(kernel|bias)',
    r'Transformer/encoderblock_\d+/MultiHeadDotProductAttention_1/relative_bias',
    r'(Transformer/encoderblock_\d+/MultiHeadDotProductAttention_1|'
    r'MAPHead_0/MultiHeadDotProductAttention_0)/(query|key)_norm/(scale|bias)',  # qk_norm
    r'Transformer/encoderblock_\d+/MlpBlock_3/Dense_[01]/(kernel|bias)',
    r'Transformer/encoder_norm/(scale|bias)', r'MAPHead_0/probe',
    r'MAPHead_0/MultiHeadDotProductAttention_0/(query|key|value|out)/(kernel|bias)',
    r'MAPHead_0/LayerNorm_0/(scale|bias)', r'MAPHead_0/MlpBlock_0/Dense_[01]/(kernel|bias)',
    r'(pre_logits|head)/(kernel|bias)', r'conv_root/kernel', r'gn_root/(scale|bias)',
    r'block\d+/unit\d+/conv([123]|_proj)/kernel', r'block\d+/unit\d+/gn([123]|_proj)/(scale|bias)',
    # An MAE / masked-patch run's own parts; transfer drops them.
    rf'({"|".join(PRETRAINING_ONLY)})(/.*)?')]

# Leaves every encoder block has. ViT-22B's options add some (qk_norm: query_norm, key_norm) and
# drop others (use_bias=False: LayerNorm and query/key/value biases; parallel_block: LayerNorm_2).
BLOCK_LEAVES = tuple(
    ['LayerNorm_0/scale'] +
    [f'{ATTN}/{m}/kernel' for m in ('query', 'key', 'value', 'out')] + [f'{ATTN}/out/bias'] +
    [f'MlpBlock_3/Dense_{n}/{p}' for n in (0, 1) for p in ('kernel', 'bias')])

# Hidden size -> heads of the named variants, for PyTorch files (which do not record heads).
_HEADS_BY_WIDTH = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16, 1408: 16}


_ZIP_MAGIC = (b'PK\x03\x04', b'PK\x05\x06')  # a .npz is a zip archive of .npy files
_NPY_MAGIC = b'\x93NUMPY'
_EXPECTED = 'expected a .npz of named arrays (vit_jax / big_vision) or a .safetensors file'


def _describe(head: bytes) -> str:
  """What a file's first bytes look like, for error messages: empty, text or binary."""
  if not head:
    return 'an empty file'
  if all(32 <= b < 127 or b in b'\t\r\n' for b in head):
    return f'text starting {head[:40].decode().splitlines()[0]!r}'
  return f'binary data starting {head[:12]!r}'


def _is_safetensors(head: bytes) -> bool:
  # 8-byte little-endian header length, then the JSON header.
  return head[8:9] == b'{'


def read_flat(path: str) -> dict:
  """{name: np.ndarray} from a .npz or .safetensors file (told apart by their first bytes).

  Anything else raises a ValueError naming the file, what was expected and what it holds.
  """
  with paths.resolve(path).open('rb') as f:
    head = f.read(64)
  if str(path).endswith('.safetensors') or _is_safetensors(head):
    from safetensors import SafetensorError  # pylint: disable=g-import-not-at-top
    from safetensors.numpy import load  # pylint: disable=g-import-not-at-top
    try:
      return dict(load(paths.resolve(path).read_bytes()))
    except (SafetensorError, ValueError) as e:
      raise ValueError(f'{path} is not a valid .safetensors file ({e}); found '
                       f'{_describe(head)}') from None
  if head.startswith(_NPY_MAGIC):
    raise ValueError(f'{path} is a single .npy array; {_EXPECTED}')
  if not head.startswith(_ZIP_MAGIC):
    raise ValueError(f'{path} is not a weights file: {_EXPECTED}; found {_describe(head)}')
  with paths.resolve(path).open('rb') as f, np.load(f, allow_pickle=False) as npz:
    flat = {}
    for key in npz.files:
      try:
        flat[key] = _numeric(npz[key])
      except ValueError:  # object arrays (pickles, never loaded), members that are not .npy
        raise ValueError(f'{path}: entry {key!r} is not a numeric array (it holds Python objects '
                         'or is not .npy data); weights files hold numeric arrays only') from None
    return flat


def _numeric(value: np.ndarray) -> np.ndarray:
  """np.savez writes bfloat16 as 2-byte void ('|V2'): those bytes are bfloat16 again."""
  if value.dtype.kind == 'V' and value.dtype.itemsize == 2:
    import ml_dtypes  # pylint: disable=g-import-not-at-top
    return value.view(ml_dtypes.bfloat16)
  return value


def detect(flat: dict) -> str:
  keys = list(flat)
  if any(k.endswith('patch_embed.proj.weight') for k in keys):
    return 'timm'
  if any(k.endswith('embeddings.patch_embeddings.projection.weight') for k in keys):
    return 'hf'
  if any(k.startswith('params/') for k in keys) or 'pos_embedding' in flat or any(
      k.startswith(SCANNED) or re.match(r'Transformer/encoderblock_\d+/MlpBlock_0/', k)
      for k in keys):
    return 'big_vision'
  return 'vit_jax'


# --- scanned <-> per-block ---------------------------------------------------------------------

def unscan(flat: dict) -> dict:
  """Splits stacked `Transformer/encoderblock/X` (layers, ...) into `encoderblock_{i}/X`."""
  out = {}
  for key, value in flat.items():
    if key.startswith(SCANNED):
      leaf = key[len(SCANNED):]
      for i, layer in enumerate(value):
        out[BLOCK.format(i=i) + leaf] = layer
    else:
      out[key] = value
  return out


def scan(flat: dict) -> dict:
  """Stacks `encoderblock_{i}/X` into `Transformer/encoderblock/X` with the layer leading."""
  blocks, out = {}, {}
  for key, value in flat.items():
    match = re.match(r'Transformer/encoderblock_(\d+)/(.*)', key)
    if match:
      blocks.setdefault(match[2], {})[int(match[1])] = value
    else:
      out[key] = value
  for leaf, layers in blocks.items():
    out[SCANNED + leaf] = np.stack([layers[i] for i in range(len(layers))])
  return out


def is_scanned(flat: dict) -> bool:
  return any(k.startswith(SCANNED) for k in flat)


# --- big_vision --------------------------------------------------------------------------------

_BIG_VISION_BLOCK_RENAMES = (('/MultiHeadDotProductAttention_0/', f'/{ATTN}/'),
                             ('/LayerNorm_1/', '/LayerNorm_2/'), ('/MlpBlock_0/', '/MlpBlock_3/'))


def _from_big_vision(flat: dict) -> dict:
  if any(k.startswith('params/') for k in flat):  # a training checkpoint: keep the params only
    flat = {k[len('params/'):]: v for k, v in flat.items() if k.startswith('params/')}
  flat = unscan(flat)
  out = {}
  for key, value in flat.items():
    if key.startswith('Transformer/encoderblock_'):
      for old, new in _BIG_VISION_BLOCK_RENAMES:
        key = key.replace(old, new)
    out[key] = value
  if 'pos_embedding' in out:
    # big_vision adds it to the patches before the class token is concatenated: the class
    # token's entry in our (1, N+1, D) table is therefore zero.
    posemb = out.pop('pos_embedding')
    if 'cls' in out:
      posemb = np.concatenate([np.zeros_like(posemb[:, :1]), posemb], axis=1)
    out[POSEMB] = posemb
  return out


# --- PyTorch (timm, Hugging Face), both ways ------------------------------------------------

def _same(value, heads=None):
  return value


# How a PyTorch module's parameters relate to ours: {its parameter: (ours, to ours(value, heads),
# to PyTorch(value))}. '' is a bare tensor (cls_token, pos_embed).
_TENSOR = {'': ('', _same, _same)}
_NORM = {'weight': ('scale', _same, _same), 'bias': ('bias', _same, _same)}
_LINEAR = {'weight': ('kernel', lambda v, h: v.T, lambda k: k.T), 'bias': ('bias', _same, _same)}
_CONV = {'weight': ('kernel', lambda v, h: np.transpose(v, (2, 3, 1, 0)),  # (D,C,P,P) <-> HWIO
                    lambda k: np.transpose(k, (3, 2, 0, 1))),
         'bias': ('bias', _same, _same)}
# A q/k/v Linear (D, D) <-> DenseGeneral kernel (D, heads, D/heads), bias (heads, D/heads).
_HEADS_IN = {'weight': ('kernel', lambda v, h: v.T.reshape(v.shape[1], h, -1),
                        lambda k: k.reshape(k.shape[0], -1).T),
             'bias': ('bias', lambda v, h: v.reshape(h, -1), lambda b: b.reshape(-1))}
# The attention's output Linear (D, D) <-> kernel (heads, D/heads, D).
_HEADS_OUT = {'weight': ('kernel', lambda v, h: v.T.reshape(h, -1, v.shape[0]),
                         lambda k: k.reshape(-1, k.shape[-1]).T),
              'bias': ('bias', _same, _same)}

_MAP = 'MAPHead_0/'
_MAP_ATTN = _MAP + 'MultiHeadDotProductAttention_0/'
# (PyTorch module, our module, parameter relation). A tuple of our modules is one PyTorch tensor
# holding theirs stacked along its first axis (timm's fused qkv). '{i}' is the block number.
TIMM_LAYOUT = (
    ('patch_embed.proj', 'embedding', _CONV),
    ('cls_token', 'cls', _TENSOR),
    ('pos_embed', POSEMB, _TENSOR),
    ('blocks.{i}.norm1', BLOCK + 'LayerNorm_0', _NORM),
    ('blocks.{i}.attn.qkv', tuple(f'{BLOCK}{ATTN}/{m}' for m in ('query', 'key', 'value')),
     _HEADS_IN),
    ('blocks.{i}.attn.q_norm', f'{BLOCK}{ATTN}/query_norm', _NORM),  # qk_norm=True
    ('blocks.{i}.attn.k_norm', f'{BLOCK}{ATTN}/key_norm', _NORM),
    ('blocks.{i}.attn.proj', f'{BLOCK}{ATTN}/out', _HEADS_OUT),
    ('blocks.{i}.norm2', BLOCK + 'LayerNorm_2', _NORM),
    ('blocks.{i}.mlp.fc1', BLOCK + 'MlpBlock_3/Dense_0', _LINEAR),
    ('blocks.{i}.mlp.fc2', BLOCK + 'MlpBlock_3/Dense_1', _LINEAR),
    ('norm', 'Transformer/encoder_norm', _NORM),
    ('attn_pool.latent', _MAP + 'probe', _TENSOR),  # global_pool='map'
    ('attn_pool.q', _MAP_ATTN + 'query', _HEADS_IN),
    ('attn_pool.kv', (_MAP_ATTN + 'key', _MAP_ATTN + 'value'), _HEADS_IN),
    ('attn_pool.q_norm', _MAP_ATTN + 'query_norm', _NORM),
    ('attn_pool.k_norm', _MAP_ATTN + 'key_norm', _NORM),
    ('attn_pool.proj', _MAP_ATTN + 'out', _HEADS_OUT),
    ('attn_pool.norm', _MAP + 'LayerNorm_0', _NORM),
    ('attn_pool.mlp.fc1', _MAP + 'MlpBlock_0/Dense_0', _LINEAR),
    ('attn_pool.mlp.fc2', _MAP + 'MlpBlock_0/Dense_1', _LINEAR),
    ('pre_logits.fc', 'pre_logits', _LINEAR),  # timm before 0.6
    ('head', 'head', _LINEAR),
)
# Hugging Face ViTModel names (ViTForImageClassification puts 'vit.' before all but the
# classifier). transformers 5 renames them on loading and back on saving.
HF_PREFIX = 'vit.'
HF_LAYOUT = (
    ('embeddings.patch_embeddings.projection', 'embedding', _CONV),
    ('embeddings.cls_token', 'cls', _TENSOR),
    ('embeddings.position_embeddings', POSEMB, _TENSOR),
    ('encoder.layer.{i}.layernorm_before', BLOCK + 'LayerNorm_0', _NORM),
    ('encoder.layer.{i}.attention.attention.query', f'{BLOCK}{ATTN}/query', _HEADS_IN),
    ('encoder.layer.{i}.attention.attention.key', f'{BLOCK}{ATTN}/key', _HEADS_IN),
    ('encoder.layer.{i}.attention.attention.value', f'{BLOCK}{ATTN}/value', _HEADS_IN),
    ('encoder.layer.{i}.attention.output.dense', f'{BLOCK}{ATTN}/out', _HEADS_OUT),
    ('encoder.layer.{i}.layernorm_after', BLOCK + 'LayerNorm_2', _NORM),
    ('encoder.layer.{i}.intermediate.dense', BLOCK + 'MlpBlock_3/Dense_0', _LINEAR),
    ('encoder.layer.{i}.output.dense', BLOCK + 'MlpBlock_3/Dense_1', _LINEAR),
    ('layernorm', 'Transformer/encoder_norm', _NORM),
    ('pooler.dense', 'pre_logits', _LINEAR),  # HF's tanh pooler = pre_logits
    ('classifier', 'head', _LINEAR),
)


def _pattern(template: str) -> str:
  """A regex for a name template: '{i}' becomes a block number."""
  return re.escape(template).replace(re.escape('{i}'), r'(?P<i>\d+)')


def _join(module: str, param: str, sep: str) -> str:
  return f'{module}{sep}{param}' if param else module


def _from_torch(flat: dict, layout, num_heads, path: str) -> dict:
  if num_heads is None:
    width = next((v.shape[0] for k, v in flat.items()
                  if k.endswith(('patch_embed.proj.bias', 'projection.bias'))), None)
    if width not in _HEADS_BY_WIDTH:
      raise ValueError(f'{path}: cannot tell the number of attention heads for width {width} '
                       '(PyTorch files do not record it); pass num_heads')
    num_heads = _HEADS_BY_WIDTH[width]
  out, unknown = {}, []
  for key, value in flat.items():
    key = key[len(HF_PREFIX):] if key.startswith(HF_PREFIX) else key
    for module, ours, relation in layout:
      match = re.fullmatch(_pattern(module) + r'(\.(?P<p>weight|bias))?', key)
      if match and (match['p'] or '') in relation:
        param, to_ours, _ = relation[match['p'] or '']
        names = (ours,) if isinstance(ours, str) else ours
        for name, part in zip(names, np.split(np.asarray(value), len(names))):
          out[_join(name.format(**match.groupdict()), param, '/')] = to_ours(part, num_heads)
        break
    else:
      unknown.append(key)
  if unknown:
    raise ValueError(f'{path}: keys with no ViT equivalent: {sorted(unknown)}')
  return out


def to_torch(flat: dict, layout, prefix: str = '', unprefixed=('classifier',)) -> dict:
  """Our flat (unscanned) params -> {PyTorch name: array} in `layout` (TIMM_LAYOUT, HF_LAYOUT),
  `prefix` before every name whose module is not in `unprefixed`. Leaves the layout has no
  place for raise, naming them."""
  out, used = {}, set()
  for module, ours, relation in layout:
    names = (ours,) if isinstance(ours, str) else ours
    for torch_param, (param, _, to_torch_layout) in relation.items():
      for key in flat:
        match = re.fullmatch(_pattern(_join(names[0], param, '/')), key)
        if not match:
          continue
        parts = [_join(name, param, '/').format(**match.groupdict()) for name in names]
        name = _join(module.format(**match.groupdict()), torch_param, '.')
        out[name if module in unprefixed else prefix + name] = np.concatenate(
            [to_torch_layout(np.asarray(flat[p])) for p in parts])
        used.update(parts)
  if set(flat) - used:
    raise ValueError(f'no place in this layout for: {sorted(set(flat) - used)}')
  return out


# --- entry point -------------------------------------------------------------------------------

def check_layout(flat: dict, path: str) -> None:
  """Raises naming every unknown key and every leaf missing from a present block: the leaves
  every block has, and those any block has (all blocks are alike)."""
  unknown = sorted(k for k in flat if not any(p.fullmatch(k) for p in _KNOWN))
  leaves = {}  # block number -> its leaf names
  for key in flat:
    match = re.match(r'Transformer/encoderblock_(\d+)/(.*)', key)
    if match:
      leaves.setdefault(int(match[1]), set()).add(match[2])
  resnet = 'conv_root/kernel' in flat and not any(k.startswith('Transformer/') for k in flat)
  required = (['conv_root/kernel', 'gn_root/scale', 'gn_root/bias'] if resnet else  # BiT
              ['embedding/kernel', 'Transformer/encoder_norm/scale'])
  if leaves:
    every_block = sorted(set(BLOCK_LEAVES).union(*leaves.values()))
    required += [BLOCK.format(i=i) + leaf for i in range(max(leaves) + 1) for leaf in every_block]
  missing = [k for k in required if k not in flat]
  if unknown or missing:
    raise ValueError(f'{path} is not a ViT or BiT checkpoint in a known layout:'
                     + (f'\n  unknown keys: {unknown}' if unknown else '')
                     + (f'\n  missing keys: {missing}' if missing else ''))


def to_vit_jax(flat: dict, path: str, num_heads=None) -> tuple[dict, str]:
  """(flat params in our layout, detected format name)."""
  fmt = detect(flat)
  if fmt == 'timm':
    flat = _from_torch(flat, TIMM_LAYOUT, num_heads, path)
  elif fmt == 'hf':
    flat = _from_torch(flat, HF_LAYOUT, num_heads, path)
  elif fmt == 'big_vision':
    flat = _from_big_vision(flat)
  flat = {k: (v.reshape(v.shape[-1]) if re.search(r'/gn(\d|_root|_proj)?/', '/' + k) and v.ndim == 4
              else v) for k, v in flat.items()}  # GroupNorm stored (1, 1, 1, C)
  check_layout(flat, path)
  return flat, fmt
