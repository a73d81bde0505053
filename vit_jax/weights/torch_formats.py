"""Our ViTs as PyTorch model folders: Hugging Face transformers and timm (`vit_jax.export`).

- 'hf': config.json + model.safetensors (+ preprocessor_config.json) that
  `transformers.ViTForImageClassification.from_pretrained(DIR)` loads;
- 'timm': timm's Hugging Face Hub layout, config.json (`architecture`, `num_classes`,
  `model_args`, `pretrained_cfg`) + model.safetensors, for `timm.create_model('local-dir:DIR',
  pretrained=True)` or `create_model(cfg['architecture'], num_classes=..., **cfg['model_args'])`
  and `load_state_dict`.

Both compute what our model computes: tanh-approximated GELU ('gelu_pytorch_tanh' in
transformers, 'gelu_tanh' in timm), LayerNorm eps 1e-6, images scaled to [-1, 1] (mean = std =
0.5). Fixed sin-cos and learned 2D position embeddings become the learned table holding the
same values; timm holds ViT-22B's qk_norm. What a target has no place for is refused before
anything is written, in one line naming the option (and the target that holds it, where one
does).
"""
import json

import flax
import numpy as np

from vit_jax.cli import errors
from vit_jax.storage import paths
from vit_jax.weights import formats

TARGETS = ('hf', 'timm')
_TIMM_POOL = {'token': 'token', 'gap': 'avg', 'map': 'map'}
_LIBRARY = {'hf': "transformers' ViTForImageClassification", 'timm': "timm's VisionTransformer"}


def refusal(model, target: str) -> str | None:
  """Why `target` cannot hold `model` (one line), or None when it can."""
  from vit_jax.models import vit  # pylint: disable=g-import-not-at-top
  neither = f"neither {_LIBRARY['hf']} nor {_LIBRARY['timm']} has one"
  if not isinstance(model, vit.VisionTransformer):
    return 'a BiT ResNet classifier: export writes ViTs only'
  if model.resnet_layers is not None:
    return (f'resnet_layers={tuple(model.resnet_layers)} (a hybrid ResNet stem): export writes '
            'plain ViTs only')
  if model.posemb == 'relative':
    return f"posemb='relative' (a learned bias per 2D offset in every layer): {neither}"
  if model.parallel_block:
    return ('parallel_block=True (attention and MLP side by side from one LayerNorm, as '
            f'ViT-22B): {neither}')
  if not model.use_bias:
    return ('use_bias=False (LayerNorms without bias and centering, no query/key/value biases, '
            f'as ViT-22B): {neither}')
  if model.representation_size is not None:
    return (f'representation_size={model.representation_size} (a tanh pre-logits layer): '
            f'{neither}; fine-tune without it (init_from drops it) and export that model')
  if model.classifier not in _TIMM_POOL or not model.num_classes:
    return f"classifier={model.classifier!r} has no classifier head to export"
  if target == 'hf' and model.qk_norm:
    return (f"qk_norm=True (LayerNorm on queries and keys): {_LIBRARY['hf']} has none; "
            '--to=timm holds it')
  if target == 'hf' and model.classifier != 'token':
    kind = 'the mean of the tokens' if model.classifier == 'gap' else 'attention pooling'
    return (f"classifier={model.classifier!r} ({kind}): {_LIBRARY['hf']} classifies the class "
            'token only; --to=timm holds it')
  return None


def _float32_unscanned(params) -> dict:
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params), sep='/')
  return {k: np.asarray(v, np.float32) for k, v in formats.unscan(flat).items()}


def _with_position_table(model, params, flat: dict, size: int, *, class_entry: bool) -> dict:
  """`flat` with the position embeddings the model adds as one learned table (the class
  token's entry, where the target wants one and our model has none there, zero); without any
  where the model adds none and the target needs no table."""
  from vit_jax.weights import model_from_weights  # pylint: disable=g-import-not-at-top
  if model.posemb == 'learn':
    return flat
  flat = {k: v for k, v in flat.items() if not k.startswith('posembed_input/')}  # learn2d's
  grid = (size // model.patch_size,) * 2
  table = model_from_weights.position_embeddings(model, params, grid)
  if table is None:  # posemb='none'
    if not class_entry:
      return flat
    table = np.zeros((grid[0] * grid[1], model.hidden_size), np.float32)
  table = np.asarray(table, np.float32)[None]
  if class_entry:
    table = np.concatenate([np.zeros_like(table[:, :1]), table], axis=1)
  return dict(flat, **{formats.POSEMB: table})


def _mlp_ratio(model) -> float:
  """timm builds MLPs of int(width * mlp_ratio) units: a ratio that gives mlp_dim exactly."""
  ratio = model.mlp_dim / model.hidden_size
  if int(model.hidden_size * ratio) != model.mlp_dim:
    ratio = (model.mlp_dim + 0.5) / model.hidden_size
  return ratio


def _class_names(model, labels) -> list[str] | None:
  if labels is not None and len(labels) != model.num_classes:
    raise errors.UserError(f'--labels gives {len(labels)} names for a {model.num_classes}-class '
                           'head')
  return list(labels) if labels is not None else None


def hf_folder(model, params, size: int, labels=None, multi_label: bool = False) -> dict:
  """{file name: bytes} of a transformers ViTForImageClassification folder."""
  flat = _with_position_table(model, params, _float32_unscanned(params), size, class_entry=True)
  tensors = formats.to_torch(flat, formats.HF_LAYOUT, formats.HF_PREFIX)
  names = _class_names(model, labels) or [f'LABEL_{i}' for i in range(model.num_classes)]
  config = {
      'architectures': ['ViTForImageClassification'], 'model_type': 'vit',
      'hidden_size': model.hidden_size, 'num_hidden_layers': model.num_layers,
      'num_attention_heads': model.num_heads, 'intermediate_size': model.mlp_dim,
      'hidden_act': 'gelu_pytorch_tanh', 'layer_norm_eps': 1e-6,
      'hidden_dropout_prob': 0.0, 'attention_probs_dropout_prob': 0.0,
      'image_size': size, 'patch_size': model.patch_size, 'num_channels': 3, 'qkv_bias': True,
      'id2label': {str(i): n for i, n in enumerate(names)},
      'label2id': {n: i for i, n in enumerate(names)},
      'problem_type': ('multi_label_classification' if multi_label else
                       'single_label_classification'),
      'torch_dtype': 'float32',
  }
  preprocessor = {
      'image_processor_type': 'ViTImageProcessor', 'do_resize': True,
      'size': {'height': size, 'width': size}, 'resample': 2,  # bilinear
      'do_rescale': True, 'rescale_factor': 1 / 255, 'do_normalize': True,
      'image_mean': [0.5] * 3, 'image_std': [0.5] * 3,  # [0, 1] -> [-1, 1]
  }
  return {'config.json': _json(config), 'preprocessor_config.json': _json(preprocessor),
          'model.safetensors': _safetensors(tensors)}


def timm_folder(model, params, size: int, labels=None) -> dict:
  """{file name: bytes} of a timm model folder (its Hugging Face Hub layout)."""
  token = model.classifier == 'token'
  flat = _with_position_table(model, params, _float32_unscanned(params), size, class_entry=token)
  tensors = formats.to_torch(flat, formats.TIMM_LAYOUT)
  pool = _TIMM_POOL[model.classifier]
  model_args = {
      'img_size': size, 'patch_size': model.patch_size, 'embed_dim': model.hidden_size,
      'depth': model.num_layers, 'num_heads': model.num_heads, 'mlp_ratio': _mlp_ratio(model),
      'global_pool': pool, 'class_token': token, 'no_embed_class': False,
      'pos_embed': 'none' if formats.POSEMB not in flat else 'learn',
      'qk_norm': model.qk_norm,  # timm's q_norm/k_norm: LayerNorm(head dim, eps 1e-6)
      'fc_norm': False,  # our encoder norm comes before pooling, on every token
      'act_layer': 'gelu_tanh',
  }
  config = {
      # Any ViT entry point: model_args set every architecture field.
      'architecture': 'vit_base_patch16_224', 'num_classes': model.num_classes,
      'num_features': model.hidden_size, 'global_pool': pool, 'model_args': model_args,
      'pretrained_cfg': {
          'input_size': [3, size, size], 'fixed_input_size': True,
          'interpolation': 'bilinear', 'crop_pct': 1.0, 'crop_mode': 'center',
          'mean': [0.5] * 3, 'std': [0.5] * 3, 'num_classes': model.num_classes,
          'first_conv': 'patch_embed.proj', 'classifier': 'head'},
  }
  names = _class_names(model, labels)
  if names:
    config['label_names'] = names
  return {'config.json': _json(config), 'model.safetensors': _safetensors(tensors)}


def _json(value) -> bytes:
  return (json.dumps(value, indent=2) + '\n').encode()


def _safetensors(tensors: dict) -> bytes:
  from safetensors.numpy import save  # pylint: disable=g-import-not-at-top
  return save({k: np.ascontiguousarray(v) for k, v in tensors.items()},
              metadata={'format': 'pt'})  # transformers reads PyTorch-format files only


def export(checkpoint_path: str, to: str, out: str, *, image_size: int = 0, posemb: str = '',
           model_name: str | None = None, labels=None) -> list[str]:
  """Writes the model at `checkpoint_path` (anything `checkpoint.load` reads) as a `to` ('hf'
  or 'timm') folder `out` (local or gs://); returns the file names written.

  The architecture is read off the weights (`vit_jax.weights.model_from_weights`, as predict does);
  `image_size` resizes learned position embeddings, `posemb` names fixed ones the file does not
  show. Class names: `labels`, else those of the tfds dataset a workdir's run read. Raises
  errors.UserError, before writing anything, for what the target cannot hold."""
  from vit_jax.weights import labels as class_names  # pylint: disable=g-import-not-at-top
  from vit_jax.weights import model_from_weights, train_state  # pylint: disable=g-import-not-at-top
  if to not in TARGETS:
    raise errors.UserError(f'--to={to}: choose one of {", ".join(TARGETS)}')
  if paths.resolve(out).is_file():
    raise errors.UserError(f'--out={out} is a file; give a folder for the model')
  model, params, size = model_from_weights.build(checkpoint_path, model_name,
                                                 image_size=image_size, posemb=posemb,
                                                 default_image_size=0)
  why = refusal(model, to)
  if why:
    raise errors.UserError(f'--to={to} cannot hold {checkpoint_path}: {why}')
  run = train_state.read_run_config(checkpoint_path)
  if labels is None:
    labels = class_names.run_labels(run)
    if labels is not None and len(labels) != model.num_classes:
      labels = None  # the run's head is not its dataset's classes (e.g. a bigger head)
  if to == 'hf':
    files = hf_folder(model, params, size, labels, run.get('loss') == 'sigmoid_xent')
  else:
    files = timm_folder(model, params, size, labels)
  try:
    folder = paths.resolve(out)
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
      (folder / name).write_bytes(data)
  except OSError as e:
    raise errors.UserError(f'--out={out}: {e.strerror or e}') from e
  return list(files)
