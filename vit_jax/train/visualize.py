"""PNG picture grids, so a user can look at what a self-supervised model learned."""
import numpy as np
from PIL import Image

from vit_jax.storage import paths


def to_uint8(images: np.ndarray) -> np.ndarray:
  """[-1, 1] floats -> [0, 255] uint8, clipped (reconstructions overshoot)."""
  return np.round((np.clip(images, -1., 1.) + 1.) * 127.5).astype(np.uint8)


def image_grid(rows: list, scale: int = 1, gap: int = 2) -> np.ndarray:
  """Rows of equally sized (B, H, W, 3) images in [-1, 1] -> one (H', W', 3) uint8 picture,
  each image enlarged `scale` times (nearest neighbour) with a `gap`-pixel white border."""
  b, h, w, c = rows[0].shape
  sh, sw = h * scale + gap, w * scale + gap
  grid = np.full((len(rows) * sh + gap, b * sw + gap, c), 255, np.uint8)
  for r, row in enumerate(rows):
    big = to_uint8(np.asarray(row)).repeat(scale, axis=1).repeat(scale, axis=2)
    for i in range(b):
      grid[gap + r * sh:(r + 1) * sh, gap + i * sw:(i + 1) * sw] = big[i]
  return grid


def write_png(path: str, rows: list, scale: int = 1) -> None:
  with paths.resolve(path).open('wb') as f:  # local or gs://
    Image.fromarray(image_grid(rows, scale)).save(f, format='PNG')
