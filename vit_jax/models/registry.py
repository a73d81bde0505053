"""Named model variants: get_model('ViT-B_16', num_classes=1000, **overrides)."""
import re

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

# A few-thousand-parameter ViT for tests.
TESTING = dict(patch_size=4, hidden_size=16, num_layers=2, mlp_dim=32, num_heads=2)

_VIT_NAME = re.compile(r'^ViT-(?P<size>[A-Za-z]+)_(?P<patch>\d+)$')


def model_config(name: str) -> dict:
  """The architecture keyword arguments that a model name stands for."""
  if name == 'testing':
    return dict(TESTING)
  match = _VIT_NAME.match(name)
  if not match or match['size'] not in VIT_SIZES:
    raise ValueError(f'unknown model name {name!r}; expected "testing" or "ViT-<size>_<patch>" '
                     f'with size in {sorted(VIT_SIZES)}, e.g. "ViT-B_16"')
  hidden, layers, mlp, heads = VIT_SIZES[match['size']]
  return dict(patch_size=int(match['patch']), hidden_size=hidden, num_layers=layers,
              mlp_dim=mlp, num_heads=heads)


def get_model(name: str, num_classes=1000, **overrides) -> vit.VisionTransformer:
  """Builds a named model; keyword overrides replace any architecture field."""
  kwargs = model_config(name)
  kwargs.update(overrides)
  fields = set(vit.VisionTransformer.__dataclass_fields__) - {'parent', 'name'}
  unknown = sorted(set(kwargs) - fields)
  if unknown:
    raise ValueError(f'unknown model option(s) {unknown} for {name!r}; known: {sorted(fields)}')
  return vit.VisionTransformer(num_classes=num_classes, **kwargs)
