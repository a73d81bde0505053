"""The model that a weights file or training workdir holds, rebuilt from the weights alone.

The architecture is read off the weights: depth, width, MLP size, heads, patch size, hybrid
ResNet stages, classifier, representation size, number of classes, learned position embeddings
and their grid (the image size), ViT-22B's block options (qk_norm, parallel_block, use_bias);
a training workdir's config.json adds what weights cannot show (fixed sin-cos position
embeddings, the image size, dtypes). predict, inspect and export
build their model here, so that all three read any checkpoint the same way.
"""
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax import models
from vit_jax.cli import errors
from vit_jax.weights import files, train_state
from vit_jax.models import vit


def _resnet_stages(params: dict) -> tuple[tuple, int]:
  """A ResNet's units per stage, from the unit names, and its width factor, from the root."""
  stages = sorted(int(k[len('block'):]) for k in params if re.fullmatch(r'block\d+', k))
  return (tuple(len(params[f'block{s}']) for s in stages),
          params['conv_root']['kernel'].shape[-1] // 64)


def architecture(params: dict) -> dict:
  """The model options that the weights determine."""
  if 'Transformer' not in params:  # a BiT ResNet classifier
    stages, width = _resnet_stages(params)
    return dict(stage_sizes=stages, width_factor=width)
  transformer = params['Transformer']
  blocks = sorted(int(k.split('_')[1]) for k in transformer if k.startswith('encoderblock_'))
  block0 = transformer[f'encoderblock_{blocks[0]}']
  attention = block0['MultiHeadDotProductAttention_1']
  kernel = params['embedding']['kernel']  # (P, P, C, D)
  options = dict(patch_size=kernel.shape[0], hidden_size=kernel.shape[-1],
                 num_layers=len(blocks),
                 mlp_dim=block0['MlpBlock_3']['Dense_0']['kernel'].shape[-1],
                 num_heads=attention['query']['kernel'].shape[1],
                 classifier='map' if 'MAPHead_0' in params else
                 'token' if 'cls' in params else 'gap',
                 representation_size=params['pre_logits']['bias'].shape[0]
                 if 'pre_logits' in params else None,
                 # ViT-22B's block: normed queries and keys, one LayerNorm, no QKV biases.
                 qk_norm='query_norm' in attention, parallel_block='LayerNorm_2' not in block0,
                 use_bias='bias' in attention['query'])
  if 'conv_root' in params:  # hybrid
    stages, width = _resnet_stages(params)
    options.update(resnet_layers=stages, resnet_width=width)
  if 'posembed_input' in transformer:
    options['posemb'] = 'learn'
  elif 'posembed_input' in params:
    options['posemb'] = 'learn2d'
  elif 'relative_bias' in attention:
    options['posemb'] = 'relative'
  return options


def infer_image_size(model, params: dict) -> int | None:
  """Pixels per token times the grid side that learned position embeddings (or relative
  position biases) were trained on; None where the weights hold no grid."""
  pixels = models.pixels_per_token(model)
  if 'posembed_input' in params.get('Transformer', {}):
    tokens = params['Transformer']['posembed_input']['pos_embedding'].shape[1]
    return int(round((tokens - (1 if 'cls' in params else 0))**0.5)) * pixels
  if 'posembed_input' in params:
    return params['posembed_input']['pos_embedding_y'].shape[1] * pixels
  block = next((v for k, v in params.get('Transformer', {}).items()
                if k.startswith('encoderblock')), {})
  relative = block.get('MultiHeadDotProductAttention_1', {}).get('relative_bias')
  if relative is not None:  # (2h - 1, 2w - 1, heads), or scanned (layers, ...)
    return (relative.shape[-3] + 1) // 2 * pixels
  return None


def build(checkpoint_path: str, model_name: str | None = None, *, image_size: int = 0,
          posemb: str = '', require_head: bool = True, default_image_size: int = 224):
  """(model, params, image size) for classifying with the weights at `checkpoint_path`; with
  require_head=False weights without a head give a model whose output is its features.

  The image size: `image_size`, else the learned position embeddings' grid, else the run's
  config, else `default_image_size` (0: refuse to guess).

  Raises errors.UserError naming what is wrong with the file or the options."""
  if image_size < 0:
    raise errors.UserError(f'image_size={image_size}: give a size in pixels (0: as trained)')
  try:
    params = files.load(checkpoint_path)
  except FileNotFoundError as e:
    raise errors.UserError(f'{checkpoint_path}: no such file or directory') from e
  except OSError as e:  # no permission, ...
    raise errors.UserError(f'{checkpoint_path}: {e.strerror or e}') from e
  except ValueError as e:  # the file is not weights, or not in a layout we know
    raise errors.UserError(str(e)) from e
  if 'head' not in params and require_head:
    raise errors.UserError(
        f'{checkpoint_path} has no classifier head: it holds '
        f'{"a self-supervised (MAE / masked patch) run" if "Transformer" in params else "no ViT"}'
        f"'s weights. Fine-tune it first, e.g. --config.init_from={checkpoint_path}")
  run = train_state.read_run_config(checkpoint_path)
  options = {k: v for k, v in run.get('model', {}).items() if k != 'name' and v is not None}
  options.update(architecture(params),
                 num_classes=params['head']['bias'].shape[0] if 'head' in params else None)
  options.update({'posemb': posemb} if posemb else {})
  resnet = 'Transformer' not in params
  if 'posemb' not in options and not resnet:
    raise errors.UserError(f'{checkpoint_path} holds no learned position embeddings: pass '
                           "--posemb=sincos2d or --posemb=none, as the model was trained")
  default_name = 'BiT-R50x1' if resnet else 'ViT-B_16'  # the weights set the architecture
  try:
    model = models.get_model(model_name or run.get('model', {}).get('name') or default_name,
                             **options)
  except ValueError as e:  # --model names something that does not exist
    raise errors.UserError(f'--model={model_name}: {e}' if model_name else str(e)) from e
  size = (image_size or infer_image_size(model, params) or run.get('image_size') or
          default_image_size)
  if not size:
    raise errors.UserError(f'{checkpoint_path} does not show the image size it was trained at '
                           '(no learned position-embedding grid, no run config.json): pass '
                           '--image_size')
  try:
    abstract = jax.eval_shape(lambda: model.init(
        jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False)['params'])
    # As fine-tuning does: learned position embeddings resized to `size`, every shape checked.
    params = files.load_pretrained(checkpoint_path, nn.unbox(abstract), new_head=False)
  except ValueError as e:  # an option the model refuses (--posemb=...), weights that do not fit
    raise errors.UserError(str(e)) from e
  return model, params, size


def position_embeddings(model, params, grid: tuple) -> np.ndarray | None:
  """The (h*w, D) position embeddings the model adds to its patches (learned, learned 2D or
  fixed sin-cos), without a class token's entry; None for relative or no position embeddings."""
  if model.posemb == 'learn':
    table = np.asarray(params['Transformer']['posembed_input']['pos_embedding'])[0]
    return table[model.num_prefix_tokens:]
  if model.posemb == 'learn2d':
    y = np.asarray(params['posembed_input']['pos_embedding_y'])[0]  # (h, 1, D/2)
    x = np.asarray(params['posembed_input']['pos_embedding_x'])[0]  # (1, w, D/2)
    both = np.concatenate([np.broadcast_to(y, (*grid, y.shape[-1])),
                           np.broadcast_to(x, (*grid, x.shape[-1]))], axis=-1)
    return both.reshape(grid[0] * grid[1], -1)
  if model.posemb == 'sincos2d':
    return vit.posemb_sincos_2d(*grid, model.hidden_size)[0]
  return None
