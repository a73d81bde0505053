"""Class names for a classifier's outputs: a text file, a tfds dataset's label names (WordNet
ids become readable names) or those of the dataset a training run used."""
import json
import os
import re
import sys

from vit_jax.cli import errors
from vit_jax.storage import paths

# Keras' table of the ILSVRC-2012 classes (WordNet id and name per class index).
_IMAGENET_CLASS_INDEX = ('https://storage.googleapis.com/download.tensorflow.org/data/'
                         'imagenet_class_index.json')


def _imagenet_class_index() -> dict:
  """{"0": ["n01440764", "tench"], ...}: fetched once into ~/.cache/vit_jax (XDG_CACHE_HOME)."""
  cache = paths.user_cache_path('imagenet_class_index.json')
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


def _tfds_label_names(name: str, data_dir: str | None = None) -> list[str] | None:
  """The label names of tfds dataset `name`; None when there is no dataset of that name."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from vit_jax.data import sources  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  try:
    # By name, not through tfds.list_builders(): listing also asks GCS for community datasets,
    # which offline prints a Google-auth warning about the metadata server.
    builder = tfds.builder(name, data_dir=data_dir or None)
  except ValueError:  # DatasetNotFoundError, or not a dataset name at all
    return None
  features = builder.info.features
  label = features['label'] if 'label' in features.keys() else None
  if not isinstance(label, tfds.features.ClassLabel):
    raise errors.UserError(f'tfds dataset {name} has no class label names')
  names = list(label.names)
  # Many builders (cifar10, ...) learn their names while preparing: until then tfds gives
  # the indices '0', '1', ... as names.
  if names == [str(i) for i in range(len(names))] and not builder.is_prepared():
    raise errors.UserError(
        f'tfds knows the class names of {name} only once it is prepared, and it is not in '
        f'{builder.data_dir}: prepare it (tfds build {name}) or give a text file with one name '
        'per line')
  return _names_for_wordnet_ids(names)


def read_labels(spec: str, flag: str = '--labels') -> list[str] | None:
  """Label names from a text file (one per line) or a tfds dataset name; None for ''."""
  if not spec:
    return None
  if paths.resolve(spec).is_file():
    return [line.strip() for line in paths.resolve(spec).read_text().splitlines() if line.strip()]
  try:
    names = _tfds_label_names(spec)
  except errors.UserError as e:
    raise errors.UserError(f'{flag}={spec}: {e}') from None
  if names is None:
    raise errors.UserError(f'{flag}={spec}: no such file, and no tfds dataset of that name')
  return names


def run_labels(run: dict) -> list[str] | None:
  """The class names of the tfds dataset a training run (its config.json) read, if any."""
  data = run.get('data', {})
  if not data.get('name') or data.get('path'):  # record files carry class ids only
    return None
  try:
    return _tfds_label_names(data['name'], data.get('data_dir'))
  except errors.UserError:
    return None
