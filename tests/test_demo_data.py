"""The transfer demos' data: glyphs rendered from fonts, and 10 labelled digits per class, both
written through make_records and read back by the trainer's record source."""
import csv
import os

import numpy as np
import pytest
from PIL import ImageFont

from benchmarks import few_digits, glyphs, seed_spread, transfer_demo
from vit_jax.data import digits, sources


def _labels(source) -> list[int]:
  records = source.read(np.arange(source.num_examples))
  return [int(source.parse(r)['label'].numpy()[0]) for r in records]


def test_fonts_draw_every_character_and_renders_vary():
  fonts = glyphs.font_files()  # matplotlib's alone give 23 faces (the demo extra adds ~70)
  assert len(fonts) >= 2 * glyphs.VAL_EVERY
  assert len(glyphs.CHARACTERS) == 54 and len(set(glyphs.CHARACTERS)) == 54
  rng = np.random.default_rng(0)
  font = ImageFont.truetype(fonts[0], 60)
  renders = [glyphs.render(font, '8', rng) for _ in range(20)]
  assert {r.shape for r in renders} == {(8, 8), (16, 16)}
  assert all(r.dtype == np.uint8 and r.max() == 255 for r in renders)
  ink = [np.mean(r > 64) for r in renders]
  assert 0.05 < min(ink) and max(ink) < 0.8  # a character, neither a speck nor a filled box
  again = glyphs.render(font, '8', np.random.default_rng(0))
  np.testing.assert_array_equal(again, renders[0])


def test_glyph_records_hold_every_font_and_class_and_are_written_once(tmp_path, monkeypatch):
  fonts = glyphs.font_files()[:20]
  monkeypatch.setattr(glyphs, 'font_files', lambda: fonts)
  out = str(tmp_path / 'glyphs')
  done = glyphs.write_glyph_records(out, per_font=1, subsets=(100,))
  train_fonts = len(fonts) - len(fonts) // glyphs.VAL_EVERY
  assert done['splits'] == {'train': train_fonts * 54, 'val': 2 * 2 * 54, 'train_100': 100}
  assert done['val_fonts'] == [os.path.basename(f) for f in (fonts[9], fonts[19])]
  train = sources.records_source(out, 'train')
  labels = _labels(train)
  assert np.bincount(labels).tolist() == [train_fonts] * 54
  subset = sources.records_source(out, 'train_100')
  assert _labels(subset) == labels[:100]  # the first 100 of the shuffled train split
  with open(os.path.join(out, 'train.csv')) as f:
    assert [int(r[1]) for r in list(csv.reader(f))[1:]] == labels
  stamp = os.path.getmtime(os.path.join(out, 'train.json'))
  assert glyphs.write_glyph_records(out, per_font=1, subsets=(100,)) == done
  assert os.path.getmtime(os.path.join(out, 'train.json')) == stamp


def test_each_seed_draws_ten_training_digits_per_class(tmp_path):
  images, targets, splits = digits.load_arrays()
  drawn = {}
  for seed in (0, 1):
    out = few_digits.write_digit_records(str(tmp_path / f'seed{seed}'), seed)
    train, test = sources.records_source(out, 'train'), sources.records_source(out, 'test')
    assert np.bincount(_labels(train)).tolist() == [few_digits.PER_CLASS] * 10
    assert _labels(test) == targets[splits['test']].tolist()
    with open(os.path.join(out, 'train.csv')) as f:
      drawn[seed] = {int(r[0][:4]) for r in list(csv.reader(f))[1:]}
    assert drawn[seed] <= set(splits['train'].tolist())  # never a test digit
  assert drawn[0] != drawn[1]


def test_verdict_compares_the_gain_with_the_spread():
  assert transfer_demo.verdict([0.5, 0.6, 0.7], [0.8, 0.85, 0.9]).startswith(
      'gain +25.0 points; larger than the spread')
  assert 'NOT larger' in transfer_demo.verdict([0.5, 0.7], [0.6, 0.65])
  # One seed has no spread: a -2 point "gain" is not said to exceed it (it used to be).
  assert transfer_demo.verdict([0.6], [0.58]) == ('gain -2.0 points; one seed per arm: no spread '
                                                  'to compare it with (--seeds=3 measures one)')
  assert seed_spread.mean_and_spread([0.5, 0.7]) == pytest.approx((0.6, 0.1414), abs=1e-4)
