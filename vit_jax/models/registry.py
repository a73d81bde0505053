"""Named model variants: get_model('ViT-B_16', num_classes=1000, **overrides).

'ViT-<size>_<patch>' for size in Ti/S/B/L/H/g and any patch size; hybrids
'R<depth>+ViT-<size>_<patch>' where the ResNet stem's stride times the embedding's patch
(1 for the released hybrids) gives <patch>; 'testing' is a tiny ViT for tests.
"""
import re

import jax.numpy as jnp

from vit_jax.models import vit

# (hidden_size, num_layers, mlp_dim, num_heads), from the ViT paper (g from Zhai et al. 2022).
VIT_SIZES = {
    'Ti': (192, 12, 768, 3),
    'S': (384, 12, 1536, 6),
    'B': (768, 12, 3072, 12),
    'L': (1024, 24, 4096, 16),
    'H': (1280, 32, 5120, 16),
    'g': (1408, 40, 6144, 16),
}

# (ResNet depth, total patch size) -> stage sizes of the released hybrids. The stem strides 4,
# every stage after the first 2 more: 3 stages = 16, 4 stages = 32.
HYBRID_STAGES = {
    (50, 16): (3, 4, 9),
    (50, 32): (3, 4, 6, 3),
    (26, 32): (2, 2, 2, 2),
    (26, 16): (2, 2, 2),
}

# A few-thousand-parameter ViT for tests.
TESTING = dict(patch_size=4, hidden_size=16, num_layers=2, mlp_dim=32, num_heads=2)

_VIT_NAME = re.compile(r'^(R(?P<depth>\d+)\+)?ViT-(?P<size>[A-Za-z]+)_(?P<patch>\d+)$')
_DTYPE_FIELDS = ('dtype', 'param_dtype')


def model_config(name: str) -> dict:
  """The architecture keyword arguments that a model name stands for."""
  if name == 'testing':
    return dict(TESTING)
  match = _VIT_NAME.match(name)
  if not match or match['size'] not in VIT_SIZES:
    raise ValueError(f'unknown model name {name!r}; expected "testing", "ViT-<size>_<patch>" or '
                     f'"R50+ViT-<size>_<patch>" with size in {sorted(VIT_SIZES)}, e.g. "ViT-B_16"')
  hidden, layers, mlp, heads = VIT_SIZES[match['size']]
  config = dict(patch_size=int(match['patch']), hidden_size=hidden, num_layers=layers,
                mlp_dim=mlp, num_heads=heads)
  if match['depth']:
    key = (int(match['depth']), int(match['patch']))
    if key not in HYBRID_STAGES:
      raise ValueError(f'unknown hybrid {name!r}; known (ResNet depth, patch): '
                       f'{sorted(HYBRID_STAGES)}')
    config.update(resnet_layers=HYBRID_STAGES[key], patch_size=1)
  return config


def _dtype(key: str, value):
  """Accepts dtype strings from configs ('bfloat16', 'float32')."""
  try:
    return jnp.dtype(value)
  except TypeError:
    raise ValueError(f'model option {key}={value!r} is not a dtype name') from None


def get_model(name: str, num_classes=1000, **overrides) -> vit.VisionTransformer:
  """Builds a named model; keyword overrides replace any architecture field."""
  kwargs = model_config(name)
  kwargs.update(overrides)
  fields = set(vit.VisionTransformer.__dataclass_fields__) - {'parent', 'name'}
  unknown = sorted(set(kwargs) - fields)
  if unknown:
    raise ValueError(f'unknown model option(s) {unknown} for {name!r}; known: {sorted(fields)}')
  for key in _DTYPE_FIELDS:
    if key in kwargs:
      kwargs[key] = _dtype(key, kwargs[key])
  if kwargs.get('resnet_layers') is not None:
    kwargs['resnet_layers'] = tuple(kwargs['resnet_layers'])  # configs may hold lists
  return vit.VisionTransformer(num_classes=num_classes, **kwargs)


def pixels_per_token(model) -> int:
  """Image pixels per token side: the patch size, times a hybrid ResNet stem's downsampling."""
  resnet = getattr(model, 'resnet_layers', None)
  return model.patch_size * (4 * 2**(len(resnet) - 1) if resnet else 1)
