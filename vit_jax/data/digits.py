"""scikit-learn's handwritten digits (1,797 real 8x8 images) as a tensorflow-datasets builder.

The images ship inside scikit-learn, so nothing is downloaded: the builder prepares them into a
local data_dir on first use and from then on the quickstart reads them through the same
tfds -> tf.data path as imagenet2012 or cifar10.
"""
import numpy as np
import tensorflow_datasets as tfds

NUM_TEST = 297  # fixed held-out split: 1,500 train / 297 test
SPLIT_SEED = 0


def load_arrays() -> tuple[np.ndarray, np.ndarray, dict]:
  """(1797, 8, 8, 1) uint8 images, their labels, and {'train': indices, 'test': indices}: the
  builder's fixed split (the transfer demos draw their few labelled digits from 'train')."""
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  digits = load_digits()
  images = np.round(digits.images * (255. / 16.)).astype(np.uint8)[..., None]
  order = np.random.RandomState(SPLIT_SEED).permutation(len(images))
  return images, digits.target, {'train': np.sort(order[NUM_TEST:]),
                                 'test': np.sort(order[:NUM_TEST])}


class SklearnDigits(tfds.core.GeneratorBasedBuilder):
  """8x8 grayscale digits 0-9 (UCI optical recognition of handwritten digits, test part)."""

  VERSION = tfds.core.Version('1.1.0')
  RELEASE_NOTES = {'1.0.0': 'Fixed 1500/297 train/test split (permutation seed 0).',
                   '1.1.0': 'Prepared as ArrayRecord: read by example index.'}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description='scikit-learn load_digits: 1,797 8x8 images, 16 grey levels scaled to 0-255.',
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(8, 8, 1)),
            'label': tfds.features.ClassLabel(num_classes=10),
            'id': np.int64,
        }),
        supervised_keys=('image', 'label'),
        homepage='https://scikit-learn.org/stable/datasets/toy_dataset.html',
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    images, labels, splits = load_arrays()
    return {split: self._generate_examples(images, labels, indices)
            for split, indices in splits.items()}

  def _generate_examples(self, images, labels, indices):
    for i in indices:
      yield int(i), {'image': images[i], 'label': int(labels[i]), 'id': int(i)}
