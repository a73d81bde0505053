"""Released weight layouts -> our flat '/'-joined parameter names (the vit_jax .npz layout).

Readers never unpickle: `.npz` through np.load(allow_pickle=False), `.safetensors` through
safetensors. The layout is detected from the keys:
- vit_jax: our names as they are (GroupNorm params may be stored (1, 1, 1, C)).
- big_vision: optional `params/` prefix, top-level `pos_embedding` added before the class token,
  block modules numbered `LayerNorm_0/MultiHeadDotProductAttention_0/LayerNorm_1/MlpBlock_0`,
  optionally scanned (one stacked leaf per name under `Transformer/encoderblock/`).
- timm: PyTorch names, fused `attn.qkv`, (out, in) Linear and (D, C, P, P) conv layouts.
- hf: Hugging Face ViTModel / ViTForImageClassification, separate query/key/value.
"""
import re

import numpy as np

from vit_jax import paths
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
    r'Transformer/encoderblock_\d+/MlpBlock_3/Dense_[01]/(kernel|bias)',
    r'Transformer/encoder_norm/(scale|bias)', r'MAPHead_0/probe',
    r'MAPHead_0/MultiHeadDotProductAttention_0/(query|key|value|out)/(kernel|bias)',
    r'MAPHead_0/LayerNorm_0/(scale|bias)', r'MAPHead_0/MlpBlock_0/Dense_[01]/(kernel|bias)',
    r'(pre_logits|head)/(kernel|bias)', r'conv_root/kernel', r'gn_root/(scale|bias)',
    r'block\d+/unit\d+/conv([123]|_proj)/kernel', r'block\d+/unit\d+/gn([123]|_proj)/(scale|bias)',
    # An MAE / masked-patch run's own parts; transfer drops them.
    rf'({"|".join(PRETRAINING_ONLY)})(/.*)?')]

# Leaves every encoder block has.
BLOCK_LEAVES = tuple(
    [f'LayerNorm_{n}/{p}' for n in (0, 2) for p in ('scale', 'bias')] +
    [f'{ATTN}/{m}/{p}' for m in ('query', 'key', 'value', 'out') for p in ('kernel', 'bias')] +
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


# --- PyTorch (timm, Hugging Face) --------------------------------------------------------------

def _name(template: str, match) -> str:
  return template.format(**match.groupdict())


def _linear(target):
  def convert(m, v, heads):
    return {_name(target, m) + ('/kernel' if m['p'] == 'weight' else '/bias'):
            v.T if m['p'] == 'weight' else v}
  return convert


def _norm(target):
  def convert(m, v, heads):
    return {_name(target, m) + ('/scale' if m['p'] == 'weight' else '/bias'): v}
  return convert


def _copy(target):
  return lambda m, v, heads: {_name(target, m): v}


def _conv(target):
  def convert(m, v, heads):
    if m['p'] == 'weight':
      return {_name(target, m) + '/kernel': np.transpose(v, (2, 3, 1, 0))}  # (D,C,P,P) -> HWIO
    return {_name(target, m) + '/bias': v}
  return convert


def _heads_in(target):
  """A q/k/v Linear (D, D) -> DenseGeneral kernel (D, heads, D/heads), bias (heads, D/heads)."""
  def convert(m, v, heads):
    name = _name(target, m)
    if m['p'] == 'weight':
      return {name + '/kernel': v.T.reshape(v.shape[1], heads, -1)}
    return {name + '/bias': v.reshape(heads, -1)}
  return convert


def _heads_out(target):
  """The output Linear (D, D) -> kernel (heads, D/heads, D)."""
  def convert(m, v, heads):
    name = _name(target, m)
    if m['p'] == 'weight':
      return {name + '/kernel': v.T.reshape(heads, -1, v.shape[0])}
    return {name + '/bias': v}
  return convert


def _fused_qkv(target):
  """timm's fused attn.qkv (3D, D): q, k, v stacked along the output axis."""
  def convert(m, v, heads):
    out = {}
    for part, chunk in zip(('query', 'key', 'value'), np.split(v, 3, axis=0)):
      out.update(_heads_in(target + '/' + part)(m, chunk, heads))
    return out
  return convert


_P = r'\.(?P<p>weight|bias)'
_TIMM_BLOCK = r'blocks\.(?P<i>\d+)\.'
_TIMM_RULES = [
    (r'patch_embed\.proj' + _P, _conv('embedding')),
    (r'cls_token', _copy('cls')),
    (r'pos_embed', _copy(POSEMB)),
    (_TIMM_BLOCK + r'norm1' + _P, _norm(BLOCK + 'LayerNorm_0')),
    (_TIMM_BLOCK + r'attn\.qkv' + _P, _fused_qkv(BLOCK + ATTN)),
    (_TIMM_BLOCK + r'attn\.proj' + _P, _heads_out(BLOCK + ATTN + '/out')),
    (_TIMM_BLOCK + r'norm2' + _P, _norm(BLOCK + 'LayerNorm_2')),
    (_TIMM_BLOCK + r'mlp\.fc1' + _P, _linear(BLOCK + 'MlpBlock_3/Dense_0')),
    (_TIMM_BLOCK + r'mlp\.fc2' + _P, _linear(BLOCK + 'MlpBlock_3/Dense_1')),
    (r'norm' + _P, _norm('Transformer/encoder_norm')),
    (r'pre_logits\.fc' + _P, _linear('pre_logits')),
    (r'head' + _P, _linear('head')),
]
_HF_BLOCK = r'encoder\.layer\.(?P<i>\d+)\.'
_HF_RULES = [
    (r'embeddings\.patch_embeddings\.projection' + _P, _conv('embedding')),
    (r'embeddings\.cls_token', _copy('cls')),
    (r'embeddings\.position_embeddings', _copy(POSEMB)),
    (_HF_BLOCK + r'layernorm_before' + _P, _norm(BLOCK + 'LayerNorm_0')),
    (_HF_BLOCK + r'attention\.attention\.(?P<qkv>query|key|value)' + _P,
     _heads_in(BLOCK + ATTN + '/{qkv}')),
    (_HF_BLOCK + r'attention\.output\.dense' + _P, _heads_out(BLOCK + ATTN + '/out')),
    (_HF_BLOCK + r'layernorm_after' + _P, _norm(BLOCK + 'LayerNorm_2')),
    (_HF_BLOCK + r'intermediate\.dense' + _P, _linear(BLOCK + 'MlpBlock_3/Dense_0')),
    (_HF_BLOCK + r'output\.dense' + _P, _linear(BLOCK + 'MlpBlock_3/Dense_1')),
    (r'layernorm' + _P, _norm('Transformer/encoder_norm')),
    (r'pooler\.dense' + _P, _linear('pre_logits')),  # HF's tanh pooler = pre_logits
    (r'classifier' + _P, _linear('head')),
]


def _from_torch(flat: dict, rules, num_heads, path: str) -> dict:
  if num_heads is None:
    width = next((v.shape[0] for k, v in flat.items()
                  if k.endswith(('patch_embed.proj.bias', 'projection.bias'))), None)
    if width not in _HEADS_BY_WIDTH:
      raise ValueError(f'{path}: cannot tell the number of attention heads for width {width} '
                       '(PyTorch files do not record it); pass num_heads')
    num_heads = _HEADS_BY_WIDTH[width]
  out, unknown = {}, []
  for key, value in flat.items():
    key = key[len('vit.'):] if key.startswith('vit.') else key
    for pattern, convert in rules:
      match = re.fullmatch(pattern, key)
      if match:
        out.update(convert(match, np.asarray(value), num_heads))
        break
    else:
      unknown.append(key)
  if unknown:
    raise ValueError(f'{path}: keys with no ViT equivalent: {sorted(unknown)}')
  return out


# --- entry point -------------------------------------------------------------------------------

def check_layout(flat: dict, path: str) -> None:
  """Raises naming every unknown key and every leaf missing from a present block."""
  unknown = sorted(k for k in flat if not any(p.fullmatch(k) for p in _KNOWN))
  blocks = {int(m[1]) for k in flat for m in [re.match(r'Transformer/encoderblock_(\d+)/', k)] if m}
  resnet = 'conv_root/kernel' in flat and not any(k.startswith('Transformer/') for k in flat)
  required = (['conv_root/kernel', 'gn_root/scale', 'gn_root/bias'] if resnet else  # BiT
              ['embedding/kernel', 'Transformer/encoder_norm/scale',
               'Transformer/encoder_norm/bias'])
  if blocks:
    required += [BLOCK.format(i=i) + leaf for i in range(max(blocks) + 1) for leaf in BLOCK_LEAVES]
  missing = [k for k in required if k not in flat]
  if unknown or missing:
    raise ValueError(f'{path} is not a ViT or BiT checkpoint in a known layout:'
                     + (f'\n  unknown keys: {unknown}' if unknown else '')
                     + (f'\n  missing keys: {missing}' if missing else ''))


def to_vit_jax(flat: dict, path: str, num_heads=None) -> tuple[dict, str]:
  """(flat params in our layout, detected format name)."""
  fmt = detect(flat)
  if fmt == 'timm':
    flat = _from_torch(flat, _TIMM_RULES, num_heads, path)
  elif fmt == 'hf':
    flat = _from_torch(flat, _HF_RULES, num_heads, path)
  elif fmt == 'big_vision':
    flat = _from_big_vision(flat)
  flat = {k: (v.reshape(v.shape[-1]) if re.search(r'/gn(\d|_root|_proj)?/', '/' + k) and v.ndim == 4
              else v) for k, v in flat.items()}  # GroupNorm stored (1, 1, 1, C)
  check_layout(flat, path)
  return flat, fmt
