"""Top-5 classes for image files from a checkpoint.

    python -m vit_jax.predict --checkpoint=ViT-B_16.npz --model=ViT-B_16 \\
        --labels=imagenet2012 cat.jpg dog.png

--checkpoint takes anything `checkpoint.load` reads (vit_jax / big_vision .npz, timm / HF
.safetensors, a training workdir). The classifier, representation size, number of classes and
image size are read off the weights; --labels is a text file with one name per line or a tfds
dataset name whose label names are used.
"""
from absl import app, flags

from vit_jax import host_tuning, paths

_CHECKPOINT = flags.DEFINE_string('checkpoint', None, 'Weights file or training workdir.')
_MODEL = flags.DEFINE_string('model', None, "Model name, e.g. 'ViT-B_16' or 'R50+ViT-B_16'.")
_LABELS = flags.DEFINE_string('labels', '', 'Label names: a text file (one per line) or a tfds '
                              'dataset name. Empty: class indices only.')
_IMAGE_SIZE = flags.DEFINE_integer('image_size', 0, 'Input size; 0: from the position '
                                   'embeddings (224 when the weights have none).')
_POSEMB = flags.DEFINE_string('posemb', '', 'Position embedding when the weights do not show '
                              "it (fixed 'sincos2d' or 'none'); empty: inferred.")
_TOP_K = flags.DEFINE_integer('top_k', 5, 'Classes shown per image.')


def model_overrides(params: dict, posemb: str = '') -> dict:
  """Head-related model options that the weights determine."""
  if 'MAPHead_0' in params:
    classifier = 'map'
  else:
    classifier = 'token' if 'cls' in params else 'gap'
  block0 = params['Transformer'].get('encoderblock_0', {})
  inferred = ('learn' if 'posembed_input' in params['Transformer'] else
              'learn2d' if 'posembed_input' in params else
              'relative' if 'relative_bias' in block0.get('MultiHeadDotProductAttention_1', {})
              else 'none')
  return dict(num_classes=params['head']['bias'].shape[0], classifier=classifier,
              posemb=posemb or inferred,
              representation_size=params['pre_logits']['bias'].shape[0]
              if 'pre_logits' in params else None)


def infer_image_size(model, params: dict) -> int:
  """Pixels per token times the learned grid side (224 with no learned grid)."""
  from vit_jax import models  # pylint: disable=g-import-not-at-top
  pixels = models.pixels_per_token(model)
  if 'posembed_input' in params['Transformer']:
    tokens = params['Transformer']['posembed_input']['pos_embedding'].shape[1]
    return int(round((tokens - (1 if 'cls' in params else 0))**0.5)) * pixels
  if 'posembed_input' in params:
    return params['posembed_input']['pos_embedding_y'].shape[1] * pixels
  return 224


def read_labels(spec: str) -> list[str] | None:
  if not spec:
    return None
  if paths.resolve(spec).exists():
    return [line.strip() for line in paths.resolve(spec).read_text().splitlines() if line.strip()]
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from vit_jax.data import sources  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  return list(tfds.builder(spec).info.features['label'].names)


def load_images(image_paths: list[str], size: int):
  """Decoded, resized and scaled to [-1, 1] by the same ops as evaluation."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from vit_jax.data import ops  # pylint: disable=g-import-not-at-top
  preprocess = ops.get_preprocess_fn(f'decode|resize({size})|value_range(-1, 1)')
  return np.stack([preprocess({'image': tf.constant(paths.resolve(p).read_bytes())})['image'].numpy()
                   for p in image_paths])


def predict(checkpoint_path: str, model_name: str, image_paths: list[str], *, labels=None,
            image_size: int = 0, posemb: str = '', top_k: int = 5) -> list[list[tuple]]:
  """Per image: [(class index, probability, label or None)] for the top_k classes."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from vit_jax import checkpoint, models  # pylint: disable=g-import-not-at-top
  params = checkpoint.load(checkpoint_path)
  model = models.get_model(model_name, **model_overrides(params, posemb))
  if labels is not None and len(labels) != model.num_classes:
    raise ValueError(f'{len(labels)} labels given for a {model.num_classes}-class head')
  images = load_images(image_paths, image_size or infer_image_size(model, params))
  probs = np.asarray(jax.nn.softmax(jax.jit(model.apply)({'params': params}, images)))
  results = []
  for row in probs:
    top = np.argsort(-row)[:top_k]
    results.append([(int(c), float(row[c]), labels[c] if labels else None) for c in top])
  return results


def main(argv):
  paths = argv[1:]
  if not paths:
    raise app.UsageError('give image files to classify')
  results = predict(_CHECKPOINT.value, _MODEL.value, paths, labels=read_labels(_LABELS.value),
                    image_size=_IMAGE_SIZE.value, posemb=_POSEMB.value, top_k=_TOP_K.value)
  for path, top in zip(paths, results):
    print(path)
    for cls, prob, label in top:
      print(f'  {prob:7.2%}  {cls:5d}  {label or ""}'.rstrip())


if __name__ == '__main__':
  host_tuning.apply()
  # Required only when run as a program: tests parse these modules' flags side by side.
  flags.mark_flags_as_required(['checkpoint', 'model'])
  app.run(main)
