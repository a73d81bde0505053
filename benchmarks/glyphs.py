r"""Characters rendered from real typefaces, written as JFT-style records: pretraining data for
the transfer demos that ships offline.

    python benchmarks/glyphs.py --output=/tmp/glyphs [--per_font=8]

Fonts are matplotlib's (DejaVu, STIX, Computer Modern) and those of the `font-*` packages the
`demo` extra installs (Roboto, Lato, Source Sans/Serif, ...), one per distinct (family, style),
kept when they draw every character. The label is the character: 10 digits, 26 capitals and
the 18 lowercase letters whose shape differs from their capital (54 classes). Each image is one
character at a random size (65-100% of the image), position, stroke weight, rotation, shear and
aspect, white on black like the handwritten digits, stored at 8 or 16 pixels. Every tenth font
is held out for the 'val' split; 'train' holds the others, in random order, and `--subsets=N,...` adds splits
'train_N' holding the first N of them (the data-size demo's growing pretraining sets).
Images go through `vit_jax.data.make_records`, as a user's own images would.
"""
import argparse
import csv
import glob
import importlib.metadata
import json
import os
import string
import sys

import numpy as np
import tqdm
from PIL import Image, ImageDraw, ImageFont

from vit_jax.data import make_records

CHARACTERS = string.digits + string.ascii_uppercase + ''.join(
    c for c in string.ascii_lowercase if c not in 'cosuvwxz')  # those look like their capitals
VAL_EVERY = 10  # every tenth font (sorted by name) is held out for 'val'
_CANVAS = 96
_FONT_PIXELS = 60


def _matplotlib_fonts() -> list[str]:
  import matplotlib  # pylint: disable=g-import-not-at-top
  folder = os.path.join(os.path.dirname(matplotlib.__file__), 'mpl-data', 'fonts', 'ttf')
  names = ('DejaVu*.ttf', 'STIXGeneral*.ttf', 'cm[rb]10.ttf', 'cmss10.ttf', 'cmti10.ttf',
           'cmtt10.ttf')
  return [f for pattern in names for f in glob.glob(os.path.join(folder, pattern))]


def _package_fonts() -> list[str]:
  found = []
  for dist in importlib.metadata.distributions():
    if (dist.metadata['Name'] or '').lower().startswith('font-'):
      found += [str(dist.locate_file(f)) for f in dist.files or []
                if str(f).lower().endswith(('.ttf', '.otf'))]
  return found


def _draws_every_character(path: str) -> bool:
  from fontTools import ttLib  # pylint: disable=g-import-not-at-top  (matplotlib depends on it)
  try:
    cmap = ttLib.TTFont(path, lazy=True).getBestCmap() or {}
  except Exception:  # pylint: disable=broad-except  (an unreadable font is skipped, not fatal)
    return False
  return all(ord(c) in cmap for c in CHARACTERS)


def font_files() -> list[str]:
  """One file per distinct (family, style) that draws every character, sorted by name."""
  chosen = {}
  for path in sorted(set(_matplotlib_fonts() + _package_fonts())):
    if not _draws_every_character(path):
      continue
    name = ImageFont.truetype(path, 12).getname()
    chosen.setdefault(name, path)  # .otf and .ttf of one face: the first one
  return [chosen[name] for name in sorted(chosen)]


def render(font: ImageFont.FreeTypeFont, char: str, rng: np.random.Generator,
           sizes: tuple = (8, 16)) -> np.ndarray:
  """One (S, S) uint8 image of `char`, S one of `sizes`, with random size, position, stroke,
  rotation, shear and aspect; the ink fills 65-100% of the longer side, its brightest pixel is
  white (thin strokes stay visible at 8 pixels)."""
  image = Image.new('L', (_CANVAS, _CANVAS))
  ImageDraw.Draw(image).text((_CANVAS // 2, _CANVAS // 2), char, fill=255, font=font,
                             anchor='mm', stroke_width=int(rng.integers(0, 4)), stroke_fill=255)
  shear = rng.uniform(-0.25, 0.25)
  image = image.transform(image.size, Image.Transform.AFFINE,
                          (1, shear, -shear * _CANVAS / 2, 0, 1, 0), Image.Resampling.BILINEAR)
  image = image.rotate(rng.uniform(-15, 15), Image.Resampling.BILINEAR)
  image = image.crop(image.getbbox())
  size = int(rng.choice(sizes))
  aspect = rng.uniform(0.75, 1.25)
  w, h = image.width * aspect, image.height
  scale = rng.uniform(0.65, 1.0) * size / max(w, h)
  w, h = max(1, round(w * scale)), max(1, round(h * scale))
  glyph = image.resize((w, h), Image.Resampling.BOX)
  out = Image.new('L', (size, size))
  out.paste(glyph, (int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1))))
  pixels = np.asarray(out, np.float32)
  return np.round(pixels * (255. / max(pixels.max(), 1.))).astype(np.uint8)


def _write_split(output: str, split: str, items: list, log) -> dict:
  """items: (png relative path, class id); CSV rows in that order, then make_records."""
  labels = os.path.join(output, f'{split}.csv')
  with open(labels, 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(['image', 'labels'])
    writer.writerows(items)
  return make_records.write_records(os.path.join(output, 'images'), labels, output,
                                    num_shards=1, split=split, num_classes=len(CHARACTERS),
                                    log=log)


def write_glyph_records(output: str, per_font: int = 8, subsets: tuple = (), seed: int = 0,
                        log=sys.stderr, sizes: tuple = (8, 16), jpeg_quality: int = 0) -> dict:
  """Renders `per_font` images of every character in every font (training fonts; two per
  character for held-out fonts) at `sizes` and writes the splits, as PNG or (jpeg_quality > 0)
  JPEG. Kept when `output` already holds the same request (glyphs.json), so the demos render
  once."""
  request = dict(per_font=per_font, subsets=sorted(subsets), seed=seed,
                 characters=CHARACTERS)
  if sizes != (8, 16) or jpeg_quality:  # the demos' renders keep their request (and folder)
    request.update(sizes=list(sizes), jpeg_quality=jpeg_quality)
  manifest = os.path.join(output, 'glyphs.json')
  if os.path.exists(manifest):
    with open(manifest) as f:
      done = json.load(f)
    if done['request'] == request:
      return done
  fonts = font_files()
  if len(fonts) < 2 * VAL_EVERY:
    raise RuntimeError(f'only {len(fonts)} usable fonts found; install the demo extra, which '
                       "brings the font packages: pip install -e '.[demo]'")
  rng = np.random.default_rng(seed)
  os.makedirs(os.path.join(output, 'images'), exist_ok=True)
  items = {'train': [], 'val': []}
  for i, path in enumerate(tqdm.tqdm(fonts, unit='font', desc='rendering glyphs', file=log)):
    split = 'val' if i % VAL_EVERY == VAL_EVERY - 1 else 'train'
    font = ImageFont.truetype(path, _FONT_PIXELS)
    for label, char in enumerate(CHARACTERS):
      for k in range(per_font if split == 'train' else 2):
        name = f'{i:03d}_{label:02d}_{k}.{"jpg" if jpeg_quality else "png"}'
        Image.fromarray(render(font, char, rng, sizes)).save(
            os.path.join(output, 'images', name), **({'quality': jpeg_quality} if jpeg_quality
                                                     else {}))
        items[split].append((name, label))
  order = rng.permutation(len(items['train']))
  items['train'] = [items['train'][j] for j in order]
  sizes = {split: _write_split(output, split, rows, log)['num_examples']
           for split, rows in items.items()}
  for n in sorted(subsets):
    if n > len(items['train']):
      raise ValueError(f'subset of {n} images asked for, but train holds {sizes["train"]}')
    sizes[f'train_{n}'] = _write_split(output, f'train_{n}', items['train'][:n],
                                       log)['num_examples']
  done = dict(request=request, splits=sizes, num_classes=len(CHARACTERS),
              fonts=[os.path.basename(f) for f in fonts],
              val_fonts=[os.path.basename(f) for f in fonts[VAL_EVERY - 1::VAL_EVERY]])
  with open(manifest, 'w') as f:
    json.dump(done, f, indent=1)
  return done


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--output', required=True)
  parser.add_argument('--per_font', type=int, default=8)
  parser.add_argument('--subsets', default='', help='comma-separated sizes of train_N splits')
  args = parser.parse_args()
  subsets = tuple(int(n) for n in args.subsets.split(',') if n)
  done = write_glyph_records(args.output, args.per_font, subsets)
  print(json.dumps({k: done[k] for k in ('splits', 'num_classes')}), f'{len(done["fonts"])} fonts')


if __name__ == '__main__':
  main()
