"""Top-5 classes for image files (or folders of them) from a checkpoint.

    python -m vit_jax.predict --checkpoint=ViT-B_16.npz --labels=imagenet2012 cat.jpg dog.png
    python -m vit_jax.predict --checkpoint=/tmp/vit_quickstart digit.png photos/

--checkpoint takes anything `checkpoint.load` reads (vit_jax / big_vision .npz, timm / HF
.safetensors, a training workdir); the architecture is read off the weights
(`vit_jax.weights.model_from_weights`). A training workdir's config.json also gives its
preprocessing (`pp_eval`, label ops left out) and whether its classes are exclusive (softmax) or not
(`loss='sigmoid_xent'`: each class's own sigmoid). --image_size resizes learned position
embeddings as fine-tuning does. --labels is a text file with one name per line or a tfds
dataset name whose label names are used (WordNet ids become readable class names).
"""
import re
import sys

from absl import app, flags

from vit_jax.cli import errors, startup
from vit_jax.storage import paths

_CHECKPOINT = flags.DEFINE_string('checkpoint', None, 'Weights file or training workdir.')
_MODEL = flags.DEFINE_string('model', None, "Model name, e.g. 'ViT-B_16'; optional: the weights "
                             'determine the architecture. Its options fill what they do not.')
_LABELS = flags.DEFINE_string('labels', '', 'Label names: a text file (one per line) or a tfds '
                              'dataset name. Empty: class indices only (export: the names of a '
                              "workdir's tfds dataset).")
_IMAGE_SIZE = flags.DEFINE_integer('image_size', 0, 'Input size; 0: the size the weights (or the '
                                   "run's config) were trained at.")
_POSEMB = flags.DEFINE_string('posemb', '', "Position embedding when the weights do not show it "
                              "(fixed 'sincos2d' or 'none'); empty: inferred.")
_TOP_K = flags.DEFINE_integer('top_k', 5, 'Classes shown per image.')

# Ops of a pp_eval string that need an example's label; predict has images only.
_LABEL_OPS = ('onehot',)


def image_files(args: list[str]) -> list[str]:
  """Files to classify: each argument, or the files in it (sorted) when it is a folder."""
  files = []
  for arg in args:
    path = paths.resolve(arg)
    if path.is_dir():
      files += sorted(str(p) for p in path.iterdir() if p.is_file())
    else:
      files.append(arg)
  return files


def image_preprocessing(run: dict, size: int) -> str:
  """The run's pp_eval without its label ops when it gives `size`-pixel images, else
  decode|resize(size)|value_range(-1, 1) (what the released models expect)."""
  if run.get('pp_eval') and run.get('image_size') == size:
    return '|'.join(op for op in run['pp_eval'].split('|')
                    if op.split('(')[0].strip() not in _LABEL_OPS)
  return f'decode|resize({size})|value_range(-1, 1)'


def scores(run: dict, logits):
  """Class probabilities as the run was trained: sigmoids for multi-label (sigmoid_xent) runs,
  else a softmax over the classes."""
  import jax  # pylint: disable=g-import-not-at-top
  if run.get('loss') == 'sigmoid_xent':
    return jax.nn.sigmoid(logits)
  return jax.nn.softmax(logits)


def load_images(image_paths: list[str], size: int, pp: str = ''):
  """(images, the paths they came from, {path: why skipped}): preprocessed by `pp` (default:
  decoded, resized to `size` and scaled to [-1, 1] as evaluation does); files that are missing
  or not images are skipped, not fatal."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  tf = startup.import_tensorflow()
  from vit_jax.data import ops  # pylint: disable=g-import-not-at-top
  pp = pp or image_preprocessing({}, size)
  preprocess = ops.get_preprocess_fn(pp)
  images, kept, skipped = [], [], {}
  for path in image_paths:
    try:
      data = paths.resolve(path).read_bytes()
    except FileNotFoundError:
      skipped[path] = 'no such file'
      continue
    except OSError as e:  # a folder, no permission
      skipped[path] = f'unreadable ({e.strerror or e})'
      continue
    # What decoders and TF's C++ logging write about a file that is no image goes to file
    # descriptor 2: captured, and said once, as our own line about the skipped file.
    with startup.native_stderr_captured() as native:
      try:
        image = preprocess({'image': tf.constant(data),
                            ops.SEED_KEY: tf.constant([0, 0], tf.int64)})['image'].numpy()
      except tf.errors.InvalidArgumentError as e:
        # TF's eager message without its op wrapping: "{{function_node ...}} WHY [Op:...]".
        why = re.sub(r'\{\{.*?\}\}\s*|\s*\[Op:.*$', '', e.message.splitlines()[0])
        skipped[path] = f'not a decodable image ({why})'
        continue
    native.replay()
    if image.shape[:2] != (size, size):
      raise errors.UserError(f'preprocessing {pp!r} gives {image.shape[0]}x{image.shape[1]} '
                             f'images; the model takes {size}x{size}')
    images.append(image)
    kept.append(path)
  return (np.stack(images) if images else None), kept, skipped


def classify(model, params, run: dict, images, top_k: int = 5, labels=None) -> list:
  """[(class index, probability, label or None)] of the top_k classes of each image."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  probs = np.asarray(scores(run, jax.jit(model.apply)({'params': params}, images)))
  return [[(int(c), float(row[c]), labels[c] if labels else None)
           for c in np.argsort(-row)[:top_k]] for row in probs]


def predict(checkpoint_path: str, model_name: str | None, image_paths: list[str], *,
            labels=None, image_size: int = 0, posemb: str = '', top_k: int = 5):
  """({path: [(class index, probability, label or None)] for the top_k classes},
  {path: why it was skipped}); folders among `image_paths` stand for the files in them."""
  from vit_jax.weights import model_from_weights, train_state  # pylint: disable=g-import-not-at-top
  if top_k < 1:
    raise errors.UserError(f'--top_k={top_k}: show at least one class')
  model, params, size = model_from_weights.build(checkpoint_path, model_name,
                                                 image_size=image_size, posemb=posemb)
  if labels is not None and len(labels) != model.num_classes:
    raise errors.UserError(f'--labels gives {len(labels)} names for its {model.num_classes}-class '
                           'head')
  run = train_state.read_run_config(checkpoint_path)
  images, kept, skipped = load_images(image_files(image_paths), size,
                                      image_preprocessing(run, size))
  if images is None:
    return {}, skipped
  return dict(zip(kept, classify(model, params, run, images, top_k, labels))), skipped


def main(argv):
  if not argv[1:]:
    raise app.UsageError('give image files (or folders of them) to classify')
  startup.inference_program(argv, takes_arguments=True)
  files = image_files(argv[1:])
  if not files:
    sys.exit(f'error: no files to classify in {" ".join(argv[1:])}')
  from vit_jax.weights import labels as class_names  # pylint: disable=g-import-not-at-top
  with errors.reported_as_one_line():  # each message names the flag or file at fault
    results, skipped = predict(_CHECKPOINT.value, _MODEL.value, files,
                               labels=class_names.read_labels(_LABELS.value),
                               image_size=_IMAGE_SIZE.value, posemb=_POSEMB.value,
                               top_k=_TOP_K.value)
  for path in files:
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
