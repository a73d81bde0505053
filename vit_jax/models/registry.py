"""Named model variants: get_model('ViT-B_16', num_classes=1000, **overrides).

'ViT-<size>_<patch>' for size in Ti/S/B/L/H/g/G/e/22B and any patch size; hybrids
'R<depth>+ViT-<size>_<patch>' where the ResNet stem's stride times the embedding's patch
(1 for the released hybrids) gives <patch>; 'testing' is a tiny ViT for tests; BiT ResNets
'BiT-R<depth>x<width>' (the ViT paper's baseline) for depth in 14/26/50/101/152.
"""
import re

import jax.numpy as jnp

from vit_jax.cli import errors
from vit_jax.models import bit, vit

# (hidden_size, num_layers, mlp_dim, num_heads), from the ViT paper; g and G from Zhai et al.
# 2022 ("Scaling Vision Transformers"), e from PaLI (Chen et al. 2022), 22B from Dehghani et al.
# 2023 (their Table 1: G/14 1,843M, e/14 3,926M, 22B 21,743M parameters at 224px).
VIT_SIZES = {
    'Ti': (192, 12, 768, 3),
    'S': (384, 12, 1536, 6),
    'B': (768, 12, 3072, 12),
    'L': (1024, 24, 4096, 16),
    'H': (1280, 32, 5120, 16),
    'g': (1408, 40, 6144, 16),
    'G': (1664, 48, 8192, 16),
    'e': (1792, 56, 15360, 16),
    '22B': (6144, 48, 24576, 48),
}
# Architecture options a size stands for beyond its shape: ViT-22B is its paper's block
# (overrides turn any of them off).
SIZE_OPTIONS = {'22B': dict(qk_norm=True, parallel_block=True, use_bias=False)}

# (ResNet depth, total patch size) -> stage sizes of the released hybrids. The stem strides 4,
# every stage after the first 2 more: 3 stages = 16, 4 stages = 32.
HYBRID_STAGES = {
    (50, 16): (3, 4, 9),
    (50, 32): (3, 4, 6, 3),
    (26, 32): (2, 2, 2, 2),
    (26, 16): (2, 2, 2),
}

# BiT ResNet depth -> units per stage (3 convs each, + root conv + head = depth). R14 and R26
# are the small ones for CPUs (R26's stages are the R26+ViT hybrid's).
BIT_STAGES = {14: (1, 1, 1, 1), 26: (2, 2, 2, 2), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3),
              152: (3, 8, 36, 3)}

# A few-thousand-parameter ViT for tests.
TESTING = dict(patch_size=4, hidden_size=16, num_layers=2, mlp_dim=32, num_heads=2)

_VIT_NAME = re.compile(r'^(R(?P<depth>\d+)\+)?ViT-(?P<size>[A-Za-z0-9]+)_(?P<patch>\d+)$')
_BIT_NAME = re.compile(r'^BiT-R(?P<depth>\d+)x(?P<width>\d+)$')
_DTYPE_FIELDS = ('dtype', 'param_dtype')


def is_resnet(name: str) -> bool:
  """Whether `name` is a BiT ResNet (no tokens: no position embeddings, attention or MAE)."""
  return bool(_BIT_NAME.match(name))


def model_config(name: str) -> dict:
  """The architecture keyword arguments that a model name stands for."""
  if name == 'testing':
    return dict(TESTING)
  bit_match = _BIT_NAME.match(name)
  if bit_match:
    depth = int(bit_match['depth'])
    if depth not in BIT_STAGES or not int(bit_match['width']):
      raise errors.UserError(f'unknown BiT model {name!r}; depths {sorted(BIT_STAGES)}, '
                             'width >= 1, e.g. "BiT-R50x1"')
    return dict(stage_sizes=BIT_STAGES[depth], width_factor=int(bit_match['width']))
  match = _VIT_NAME.match(name)
  if not match or match['size'] not in VIT_SIZES:
    raise errors.UserError(f'unknown model name {name!r}; expected "testing", '
                           f'"ViT-<size>_<patch>", "R50+ViT-<size>_<patch>" with size in '
                           f'{sorted(VIT_SIZES)}, e.g. '
                           '"ViT-B_16", or "BiT-R<depth>x<width>", e.g. "BiT-R50x1"')
  hidden, layers, mlp, heads = VIT_SIZES[match['size']]
  config = dict(patch_size=int(match['patch']), hidden_size=hidden, num_layers=layers,
                mlp_dim=mlp, num_heads=heads, **SIZE_OPTIONS.get(match['size'], {}))
  if match['depth']:
    key = (int(match['depth']), int(match['patch']))
    if key not in HYBRID_STAGES:
      raise errors.UserError(f'unknown hybrid {name!r}; known (ResNet depth, patch): '
                             f'{sorted(HYBRID_STAGES)}')
    config.update(resnet_layers=HYBRID_STAGES[key], patch_size=1)
  return config


def _dtype(key: str, value):
  """Accepts dtype strings from configs ('bfloat16', 'float32')."""
  try:
    return jnp.dtype(value)
  except TypeError:
    raise errors.UserError(f'model option {key}={value!r} is not a dtype name') from None


def get_model(name: str, num_classes=1000, **overrides) -> vit.VisionTransformer | bit.ResNet:
  """Builds a named model; keyword overrides replace any architecture field."""
  kwargs = model_config(name)
  kwargs.update(overrides)
  cls = bit.ResNet if is_resnet(name) else vit.VisionTransformer
  fields = set(cls.__dataclass_fields__) - {'parent', 'name'}
  unknown = sorted(set(kwargs) - fields)
  if unknown:
    raise errors.UserError(f'unknown model option(s) {unknown} for {name!r}; known: '
                           f'{sorted(fields)}')
  for key in _DTYPE_FIELDS:
    if key in kwargs:
      kwargs[key] = _dtype(key, kwargs[key])
  for key in ('resnet_layers', 'stage_sizes'):
    if kwargs.get(key) is not None:
      kwargs[key] = tuple(kwargs[key])  # configs may hold lists
  return cls(num_classes=num_classes, **kwargs)


def pixels_per_token(model) -> int:
  """Image pixels per token side: the patch size, times a hybrid ResNet stem's downsampling;
  1 for a ResNet classifier, which takes any image size."""
  if isinstance(model, bit.ResNet):
    return 1
  resnet = getattr(model, 'resnet_layers', None)
  return model.patch_size * (4 * 2**(len(resnet) - 1) if resnet else 1)
