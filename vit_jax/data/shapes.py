"""Procedurally generated multi-label stroke images: a pretraining source available offline.

Each 16x16 grey image holds a random subset of NUM_SHAPES primitives (bars in four directions,
a ring, a corner, a dot cluster, an arc) at random places and sizes; the labels are the set of
primitives drawn. Used by benchmarks/transfer_demo.py to pretrain before few-label fine-tuning on
the handwritten digits.
"""
import numpy as np
import tensorflow_datasets as tfds

SIZE = 16
NUM_SHAPES = 8
SHAPE_NAMES = ('horizontal', 'vertical', 'diagonal', 'antidiagonal', 'ring', 'corner', 'dots',
               'arc')


def _draw(canvas: np.ndarray, shape: int, rng: np.random.RandomState) -> None:
  """Draws one primitive into canvas (float, [0, 1]) in place."""
  yy, xx = np.mgrid[:SIZE, :SIZE].astype(np.float32)
  cy, cx = rng.uniform(4, SIZE - 4, 2)
  half = rng.uniform(3, 6)
  width = rng.uniform(0.6, 1.2)
  if shape in (0, 1, 2, 3):  # bars: distance to a segment through (cy, cx)
    angle = (0., np.pi / 2, np.pi / 4, -np.pi / 4)[shape] + rng.uniform(-0.15, 0.15)
    dy, dx = np.sin(angle), np.cos(angle)
    along = (yy - cy) * dy + (xx - cx) * dx
    across = np.abs(-(yy - cy) * dx + (xx - cx) * dy)
    ink = (across < width) & (np.abs(along) < half)
  elif shape == 4:  # ring
    r = np.hypot(yy - cy, xx - cx)
    ink = np.abs(r - half * 0.7) < width
  elif shape == 5:  # corner: two bars meeting at (cy, cx)
    ink = (((np.abs(yy - cy) < width) & (xx >= cx) & (xx - cx < half)) |
           ((np.abs(xx - cx) < width) & (yy >= cy) & (yy - cy < half)))
  elif shape == 6:  # dots
    ink = np.zeros_like(yy, dtype=bool)
    for _ in range(3):
      py, px = rng.uniform(1, SIZE - 1, 2)
      ink |= np.hypot(yy - py, xx - px) < 1.0
  else:  # arc: upper half of a circle
    r = np.hypot(yy - cy, xx - cx)
    ink = (np.abs(r - half * 0.8) < width) & (yy < cy)
  np.maximum(canvas, ink.astype(np.float32) * rng.uniform(0.6, 1.0), out=canvas)


def make_example(rng: np.random.RandomState) -> tuple[np.ndarray, list[int]]:
  """(16x16x1 uint8 image, sorted labels); at least one primitive per image."""
  present = np.flatnonzero(rng.uniform(size=NUM_SHAPES) < 0.3)
  if not len(present):
    present = np.array([rng.randint(NUM_SHAPES)])
  canvas = np.zeros((SIZE, SIZE), np.float32)
  for shape in present:
    _draw(canvas, int(shape), rng)
  canvas += rng.normal(scale=0.05, size=canvas.shape)
  image = np.clip(canvas * 255, 0, 255).astype(np.uint8)[..., None]
  return image, [int(s) for s in present]


class SyntheticShapes(tfds.core.GeneratorBasedBuilder):
  """20,000 train / 1,000 test procedurally generated multi-label images (seeded)."""

  VERSION = tfds.core.Version('1.1.0')
  RELEASE_NOTES = {'1.0.0': 'Eight primitives, seeds 0 (train) and 1 (test).',
                   '1.1.0': 'Prepared as ArrayRecord: read by example index.'}
  SPLIT_SIZES = {'train': (20_000, 0), 'test': (1_000, 1)}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description='Multi-label images of stroke primitives: ' + ', '.join(SHAPE_NAMES),
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(SIZE, SIZE, 1)),
            'labels': tfds.features.Sequence(tfds.features.ClassLabel(names=SHAPE_NAMES)),
        }))

  def _split_generators(self, dl_manager):
    del dl_manager  # generated, nothing to download
    return {split: self._generate_examples(*sizes) for split, sizes in self.SPLIT_SIZES.items()}

  def _generate_examples(self, count: int, seed: int):
    rng = np.random.RandomState(seed)
    for i in range(count):
      image, labels = make_example(rng)
      yield i, {'image': image, 'labels': labels}
