"""Top-5 classes for image files from a checkpoint.

    python -m vit_jax.predict --checkpoint=ViT-B_16.npz --labels=imagenet2012 cat.jpg dog.png
    python -m vit_jax.predict --checkpoint=/tmp/vit_quickstart digit.png

--checkpoint takes anything `checkpoint.load` reads (vit_jax / big_vision .npz, timm / HF
.safetensors, a training workdir). The architecture is read off the weights: depth, width, MLP
size, heads, patch size, hybrid ResNet stages, classifier, representation size, number of
classes, learned position embeddings and their grid (the image size); a training workdir also
gives its config (fixed sin-cos position embeddings, image size). --image_size resizes learned
position embeddings as fine-tuning does. --labels is a text file with one name per line or a
tfds dataset name whose label names are used (WordNet ids become readable class names).
"""
import json
import os
import re
import sys

from absl import app, flags

from vit_jax import paths, startup

_CHECKPOINT = flags.DEFINE_string('checkpoint', None, 'Weights file or training workdir.')
_MODEL = flags.DEFINE_string('model', None, "Model name, e.g. 'ViT-B_16'; optional: the weights "
                             'determine the architecture. Its options fill what they do not.')
_LABELS = flags.DEFINE_string('labels', '', 'Label names: a text file (one per line) or a tfds '
                              'dataset name. Empty: class indices only.')
_IMAGE_SIZE = flags.DEFINE_integer('image_size', 0, 'Input size; 0: the size the weights (or the '
                                   "run's config) were trained at.")
_POSEMB = flags.DEFINE_string('posemb', '', "Position embedding when the weights do not show it "
                              "(fixed 'sincos2d' or 'none'); empty: inferred.")
_TOP_K = flags.DEFINE_integer('top_k', 5, 'Classes shown per image.')

# Keras' table of the ILSVRC-2012 classes (WordNet id and name per class index).
_IMAGENET_CLASS_INDEX = ('https://storage.googleapis.com/download.tensorflow.org/data/'
                         'imagenet_class_index.json')


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
                 if 'pre_logits' in params else None)
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
  """Pixels per token times the learned grid side; None where the weights hold no grid."""
  from vit_jax import models  # pylint: disable=g-import-not-at-top
  pixels = models.pixels_per_token(model)
  if 'posembed_input' in params.get('Transformer', {}):
    tokens = params['Transformer']['posembed_input']['pos_embedding'].shape[1]
    return int(round((tokens - (1 if 'cls' in params else 0))**0.5)) * pixels
  if 'posembed_input' in params:
    return params['posembed_input']['pos_embedding_y'].shape[1] * pixels
  return None


def build(checkpoint_path: str, model_name: str | None = None, *, image_size: int = 0,
          posemb: str = '', require_head: bool = True):
  """(model, params, image size) for classifying with the weights at `checkpoint_path`; with
  require_head=False weights without a head give a model whose output is its features."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from vit_jax import checkpoint, models  # pylint: disable=g-import-not-at-top
  params = checkpoint.load(checkpoint_path)
  if 'head' not in params and require_head:
    raise ValueError(
        f'{checkpoint_path} has no classifier head: it holds '
        f'{"a self-supervised (MAE / masked patch) run" if "Transformer" in params else "no ViT"}'
        f"'s weights. Fine-tune it first, e.g. --config.init_from={checkpoint_path}")
  run = checkpoint.read_run_config(checkpoint_path)
  options = {k: v for k, v in run.get('model', {}).items() if k != 'name' and v is not None}
  options.update(architecture(params),
                 num_classes=params['head']['bias'].shape[0] if 'head' in params else None)
  options.update({'posemb': posemb} if posemb else {})
  resnet = 'Transformer' not in params
  if 'posemb' not in options and not resnet:
    raise ValueError(f'{checkpoint_path} holds no learned position embeddings: pass '
                     "--posemb=sincos2d or --posemb=none, as the model was trained")
  default_name = 'BiT-R50x1' if resnet else 'ViT-B_16'  # the weights set the architecture
  model = models.get_model(model_name or run.get('model', {}).get('name') or default_name,
                           **options)
  size = image_size or infer_image_size(model, params) or run.get('image_size') or 224
  abstract = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False)['params'])
  # As fine-tuning does: learned position embeddings resized to `size`, every shape checked.
  params = checkpoint.load_pretrained(checkpoint_path, nn.unbox(abstract), new_head=False)
  return model, params, size


def _imagenet_class_index() -> dict:
  """{"0": ["n01440764", "tench"], ...}: fetched once into ~/.cache/vit_jax (XDG_CACHE_HOME)."""
  cache = os.path.join(os.environ.get('XDG_CACHE_HOME') or os.path.expanduser('~/.cache'),
                       'vit_jax', 'imagenet_class_index.json')
  if not os.path.isfile(cache):
    import urllib.request  # pylint: disable=g-import-not-at-top
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    with urllib.request.urlopen(_IMAGENET_CLASS_INDEX, timeout=30) as response:
      text = response.read().decode()
    with open(cache + '.tmp', 'w') as f:
      f.write(text)
    os.replace(cache + '.tmp', cache)  # never a half-written cache
  with open(cache) as f:
    return json.load(f)


def _names_for_wordnet_ids(names: list[str]) -> list[str]:
  """ImageNet's tfds labels are WordNet ids (n01440764): the class names (tench) instead."""
  if not names or not all(re.fullmatch(r'n\d{8}', n) for n in names):
    return names
  try:
    index = _imagenet_class_index()
  except OSError as e:  # offline: the ids still identify the classes
    print(f'showing WordNet ids: could not fetch the class names ({e})', file=sys.stderr)
    return names
  readable = {wnid: name.replace('_', ' ') for wnid, name in index.values()}
  return [readable.get(n, n) for n in names]


def read_labels(spec: str) -> list[str] | None:
  """Label names from a text file (one per line) or a tfds dataset name; None for ''."""
  if not spec:
    return None
  if paths.resolve(spec).is_file():
    return [line.strip() for line in paths.resolve(spec).read_text().splitlines() if line.strip()]
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from vit_jax.data import sources  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  if spec not in tfds.list_builders():
    raise ValueError(f'--labels={spec}: no such file, and no tfds dataset of that name')
  return _names_for_wordnet_ids(list(tfds.builder(spec).info.features['label'].names))


def load_images(image_paths: list[str], size: int):
  """(images, the paths they came from, {path: why skipped}): decoded, resized and scaled to
  [-1, 1] by evaluation's ops; files that are missing or not images are skipped, not fatal."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  tf = startup.import_tensorflow()
  from vit_jax.data import ops  # pylint: disable=g-import-not-at-top
  preprocess = ops.get_preprocess_fn(f'decode|resize({size})|value_range(-1, 1)')
  images, kept, skipped = [], [], {}
  for path in image_paths:
    try:
      data = paths.resolve(path).read_bytes()
    except FileNotFoundError:
      skipped[path] = 'no such file'
      continue
    try:
      images.append(preprocess({'image': tf.constant(data)})['image'].numpy())
      kept.append(path)
    except tf.errors.InvalidArgumentError as e:
      # TF's eager message without its op wrapping: "{{function_node ...}} WHY [Op:DecodeImage]".
      why = re.sub(r'\{\{.*?\}\}\s*|\s*\[Op:.*$', '', e.message.splitlines()[0])
      skipped[path] = f'not a decodable image ({why})'
  return (np.stack(images) if images else None), kept, skipped


def predict(checkpoint_path: str, model_name: str | None, image_paths: list[str], *,
            labels=None, image_size: int = 0, posemb: str = '', top_k: int = 5):
  """({path: [(class index, probability, label or None)] for the top_k classes},
  {path: why it was skipped})."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  model, params, size = build(checkpoint_path, model_name, image_size=image_size, posemb=posemb)
  if labels is not None and len(labels) != model.num_classes:
    raise ValueError(f'{len(labels)} labels given for a {model.num_classes}-class head')
  images, kept, skipped = load_images(image_paths, size)
  if images is None:
    return {}, skipped
  probs = np.asarray(jax.nn.softmax(jax.jit(model.apply)({'params': params}, images)))
  results = {}
  for path, row in zip(kept, probs):
    top = np.argsort(-row)[:top_k]
    results[path] = [(int(c), float(row[c]), labels[c] if labels else None) for c in top]
  return results, skipped


def main(argv):
  paths = argv[1:]
  if not paths:
    raise app.UsageError('give image files to classify')
  startup.quiet_logging()
  startup.import_tensorflow()
  startup.start_jax()
  try:
    labels = read_labels(_LABELS.value)
  except ValueError as e:
    sys.exit(str(e))
  try:
    results, skipped = predict(_CHECKPOINT.value, _MODEL.value, paths, labels=labels,
                               image_size=_IMAGE_SIZE.value, posemb=_POSEMB.value,
                               top_k=_TOP_K.value)
  except (ValueError, FileNotFoundError) as e:  # the message names the file; add the flag
    sys.exit(f'--checkpoint={_CHECKPOINT.value}: {e}')
  for path in paths:
    if path in skipped:
      print(f'{path}: skipped, {skipped[path]}', file=sys.stderr)
      continue
    print(path)
    for cls, prob, label in results[path]:
      print(f'  {prob:7.2%}  {cls:5d}  {label or ""}'.rstrip())
  if skipped:
    sys.exit(1)  # like cat and ls: the rest was done, but not everything


if __name__ == '__main__':
  startup.begin()
  # Required only when run as a program: tests parse these modules' flags side by side.
  flags.mark_flags_as_required(['checkpoint'])
  app.run(main)
