"""Preprocessing ops on real encoded images, checked against numpy."""
import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from vit_jax.data import ops, randaugment


def _coords_image(h=60, w=80):
  """R = column, G = row, B = 100: every pixel says where it came from."""
  y, x = np.mgrid[:h, :w]
  return np.stack([x, y, np.full_like(x, 100)], -1).astype(np.uint8)


def _natural(h=48, w=64, seed=0):
  rng = np.random.RandomState(seed)
  y, x = np.mgrid[:h, :w] / max(h, w)
  base = np.stack([np.sin(6 * x + c) * np.cos(4 * y - c) for c in range(3)], -1)
  return np.clip(127 + 100 * base + rng.normal(0, 10, (h, w, 3)), 0, 255).astype(np.uint8)


def _run(spec, image_bytes, seed=(1, 2), **extra):
  data = {'image': tf.constant(image_bytes), ops.SEED_KEY: tf.constant(seed, tf.int64), **extra}
  return {k: v.numpy() for k, v in ops.get_preprocess_fn(spec)(data).items()}


def test_decode_png_grey_rgba_and_jpeg_to_rgb():
  grey = _natural()[..., 0]
  out = _run('decode', tf.io.encode_png(grey[..., None]).numpy())['image']
  assert out.shape == (48, 64, 3)
  for c in range(3):
    np.testing.assert_array_equal(out[..., c], grey)
  rgba = np.concatenate([_natural(), np.full((48, 64, 1), 7, np.uint8)], -1)
  np.testing.assert_array_equal(_run('decode', tf.io.encode_png(rgba).numpy())['image'],
                                rgba[..., :3])
  buf = io.BytesIO()
  Image.fromarray(_natural()).save(buf, 'JPEG', quality=95)
  jpeg = _run('decode', buf.getvalue())['image']
  pil = np.asarray(Image.open(io.BytesIO(buf.getvalue())))
  assert np.abs(jpeg.astype(int) - pil).mean() < 1.5  # two JPEG decoders agree
  assert _run('decode(channels=1)', buf.getvalue())['image'].shape == (48, 64, 1)


def test_resize_methods_match_numpy():
  image = _natural(8, 8)
  png = tf.io.encode_png(image).numpy()
  nearest = _run("decode|resize(16, method='nearest')", png)['image']
  np.testing.assert_array_equal(nearest, image.repeat(2, 0).repeat(2, 1))
  area = _run("decode|resize(4, method='area')", png)['image']
  expected = image.reshape(4, 2, 4, 2, 3).astype(float).mean((1, 3))
  assert np.abs(area - expected).max() <= 0.5
  small = _run('decode|resize_small(24)', tf.io.encode_png(_natural(48, 64)).numpy())['image']
  assert small.shape == (24, 32, 3)
  with pytest.raises(ValueError, match="'resize'.*method='cubic'"):
    ops.get_preprocess_fn("resize(4, method='cubic')")


def test_value_range_central_crop_flip_and_random_crop():
  image = _coords_image()
  png = tf.io.encode_png(image).numpy()
  out = _run('decode|central_crop(20)|value_range(-1, 1)', png)['image']
  np.testing.assert_allclose(out, image[20:40, 30:50] / 127.5 - 1, atol=1e-6)
  flips = [_run('decode|flip_lr', png, seed=(0, s))['image'] for s in range(8)]
  assert all((f == image).all() or (f == image[:, ::-1]).all() for f in flips)
  assert any((f == image[:, ::-1]).all() for f in flips) and any((f == image).all() for f in flips)
  crop = _run('decode|random_crop(10, pad=2)', png, seed=(3, 4))['image']
  padded = np.pad(image, [(2, 2), (2, 2), (0, 0)])
  matches = [(i, j) for i in range(padded.shape[0] - 9) for j in range(padded.shape[1] - 9)
             if (padded[i:i + 10, j:j + 10] == crop).all()]
  assert len(matches) == 1


@pytest.mark.parametrize('fmt', ['png', 'jpeg'])
def test_inception_crop_area_and_aspect_in_range(fmt):
  image = _coords_image(120, 160)
  encoded = (tf.io.encode_png(image) if fmt == 'png' else tf.io.encode_jpeg(image, quality=100))
  spec = "decode|inception_crop(32, area_min=0.3, area_max=0.6, method='nearest')"
  areas = []
  for s in range(6):
    out = _run(spec, encoded.numpy(), seed=(5, s))['image']
    assert out.shape == (32, 32, 3)
    # Nearest resize keeps source coordinates: the crop spans x0..x1, y0..y1 (+- a pixel).
    width = int(out[:, -1, 0].mean()) - int(out[:, 0, 0].mean()) + 1
    height = int(out[-1, :, 1].mean()) - int(out[0, :, 1].mean()) + 1
    areas.append(width * height / (120 * 160))
    assert 3 / 4 - 0.1 <= width / height <= 4 / 3 + 0.1
  assert 0.3 - 0.05 <= min(areas) and max(areas) <= 0.6 + 0.05
  assert len({round(a, 3) for a in areas}) > 1


def test_fused_jpeg_crop_equals_decode_then_crop():
  buf = io.BytesIO()
  Image.fromarray(_natural(96, 128)).save(buf, 'JPEG', quality=90)
  fused = _run('decode|inception_crop(40)', buf.getvalue())['image']  # decode_and_crop_jpeg
  decoded = tf.io.decode_jpeg(buf.getvalue(), channels=3)
  separate = ops.get_op('inception_crop(40)')(
      {'image': decoded, ops.SEED_KEY: tf.constant([1, 2], tf.int64)})['image'].numpy()
  assert fused.shape == separate.shape == (40, 40, 3)
  assert np.abs(fused.astype(int) - separate).mean() < 1.0


def test_fast_decode_scales_large_jpeg_crops_and_decodes_small_ones_exactly():
  """inception_crop(..., fast_decode=True): a crop at least twice the output decodes at 1/2 or
  1/4 scale: the same crop to within half a pixel of the scaled image (r/2 source pixels), its
  pixels averaged over r x r blocks, which on textured content is about as far from an
  antialiased resize as the exact path's sampling; a smaller crop, and any PNG, as without."""
  y, x = np.mgrid[:192, :256]
  ramps = [np.repeat(ramp[..., None], 3, -1).astype(np.uint8) for ramp in (x, y)]  # grey
  textured = _natural(192, 256)
  for image in (*ramps, textured):
    jpeg = tf.io.encode_jpeg(image, quality=95).numpy()
    for s in range(4):
      def crop(spec, seed=(0, s)):
        return _run(f'decode|{spec}', jpeg, seed=seed)['image'].astype(float)
      small = 'inception_crop(40, area_max=0.08{})'  # sides < 80
      np.testing.assert_array_equal(crop(small.format(', fast_decode=True')),
                                    crop(small.format('')))
      large = 'inception_crop(40, area_min=0.6{})'  # sides >= 100: 1/2 or 1/4 scale
      exact, fast = crop(large.format('')), crop(large.format(', fast_decode=True'))
      assert not np.array_equal(exact, fast)
      if image is textured:
        reference = crop(large.format(', antialias=True'))
        assert np.abs(fast - reference).mean() <= np.abs(exact - reference).mean() + 1, s
      else:  # each pixel shows its source position: within r/2 <= 2, JPEG's 1, rounding's 1
        assert np.abs(fast - exact).max() <= 4 and np.abs(fast - exact).mean() <= 2.5, s
  png = tf.io.encode_png(textured).numpy()
  np.testing.assert_array_equal(_run('decode|inception_crop(40, fast_decode=True)', png)['image'],
                                _run('decode|inception_crop(40)', png)['image'])


@pytest.mark.parametrize('spec', [
    'inception_crop(40)|flip_lr|value_range(-1, 1)',  # decodes the crop itself
    'decode|resize(24, method="bicubic")|random_crop(20, pad=2)|value_range(0, 1)',
    'decode|resize_small(30)|central_crop(24)|value_range(-1, 1)'])
def test_a_resize_hands_value_range_the_same_numbers_as_floats(spec):
  """Fused (parse_preprocess: the resize keeps float32) and op by op (uint8 in between): equal."""
  buf = io.BytesIO()
  Image.fromarray(_natural(96, 128)).save(buf, 'JPEG', quality=90)
  data = {'image': tf.constant(buf.getvalue()), ops.SEED_KEY: tf.constant([3, 4], tf.int64)}
  op_by_op = dict(data)
  for op_spec in spec.split('|'):
    op_by_op = ops.get_op(op_spec)(op_by_op)
    assert op_spec.startswith('value_range') or op_by_op['image'].dtype in (tf.string, tf.uint8)
  fused = ops.get_preprocess_fn(spec)(dict(data))['image'].numpy()
  np.testing.assert_array_equal(fused, op_by_op['image'].numpy())
  resizing = next(op for op in spec.split('|') if op.startswith(('inception_crop', 'resize')))
  assert ops.get_op(resizing.replace(')', ', float_output=True)'))(
      ops.get_op('decode')(dict(data)))['image'].dtype == tf.float32


@pytest.mark.parametrize('spec, vmin, vmax, in_min, in_max', [
    ('value_range(-1, 1)', -1., 1., 0., 255.), ('value_range(0, 1)', 0., 1., 0., 255.),
    ('value_range(-0.5, 0.5, 10, 250)', -0.5, 0.5, 10., 250.),
    ('value_range(0, 255)', 0., 255., 0., 255.)])
def test_value_range_is_the_linear_map(spec, vmin, vmax, in_min, in_max):
  """Bit for bit the map vmin + (x - in_min) * (vmax - vmin) / (in_max - in_min) in float32,
  also where steps of it change nothing and are left out."""
  pixels = np.arange(256, dtype=np.float32).reshape(16, 16, 1)
  out = ops.get_op(spec)({'image': tf.constant(pixels.astype(np.uint8))})['image'].numpy()
  expected = (np.float32(vmin) + (pixels - np.float32(in_min)) * np.float32(vmax - vmin)
              / np.float32(in_max - in_min))
  np.testing.assert_array_equal(out, expected)


def test_onehot_multihot_and_label_smoothing():
  out = ops.get_op('onehot(5, label_smoothing=0.1)')({'label': tf.constant(2)})['labels']
  np.testing.assert_allclose(out, [0.02, 0.02, 0.92, 0.02, 0.02], atol=1e-6)
  multi = ops.get_op('onehot(6)')({'label': tf.constant([0, 4, 4])})['labels']
  np.testing.assert_array_equal(multi, [1, 0, 0, 0, 1, 0])


def test_randaugment_transforms_match_numpy():
  image = _natural(32, 32)
  x = image.astype(int)
  t = tf.constant(image)
  np.testing.assert_array_equal(randaugment.solarize(t, 128.), np.where(x >= 128, 255 - x, x))
  np.testing.assert_array_equal(randaugment.posterize(t, 3), x & 0b11100000)
  np.testing.assert_array_equal(randaugment.brightness(t, 0.5), np.round(x * 0.5))
  grey = np.round(x @ [0.2989, 0.587, 0.114])
  color = randaugment.color(t, 0.).numpy()
  assert np.abs(color[..., 0] - grey).max() <= 1 and (color[..., 0] == color[..., 2]).all()
  auto = randaugment.autocontrast(t).numpy()
  assert (auto.min((0, 1)) == 0).all() and (auto.max((0, 1)) == 255).all()
  eq = randaugment.equalize(t).numpy()
  np.testing.assert_array_equal(eq, np.asarray(__import__('PIL.ImageOps').ImageOps.equalize(
      Image.fromarray(image))))
  shifted = randaugment.translate_x(t, 5.).numpy()
  np.testing.assert_array_equal(shifted[:, 5:], image[:, :-5])
  assert (shifted[:, :5] == 128).all()
  rotated = randaugment.rotate(t, 90.).numpy().astype(int)  # bilinear at cos(pi/2) ~ 6e-17
  assert min(np.abs(rotated - np.rot90(image, k)).max() for k in (1, -1)) <= 1


def test_randaug_op_is_deterministic_and_changes_images():
  png = tf.io.encode_png(_natural()).numpy()
  a = _run('decode|randaug(2, 9)', png, seed=(0, 1))['image']
  b = _run('decode|randaug(2, 9)', png, seed=(0, 1))['image']
  np.testing.assert_array_equal(a, b)
  outs = [_run('decode|randaug(2, 9)', png, seed=(0, s))['image'] for s in range(6)]
  assert all(o.shape == (48, 64, 3) and o.dtype == np.uint8 for o in outs)
  assert sum(not (o == _natural()).all() for o in outs) >= 3
  with pytest.raises(ValueError, match="'randaug'"):
    ops.get_preprocess_fn('randaug(2, 30)')


def test_mixup_is_a_batch_op_mixing_neighbours():
  example_fn, batch_fn = ops.parse_preprocess('value_range(0, 1)|mixup(0.4)')
  images = np.random.RandomState(0).uniform(0, 255, (4, 5, 5, 3)).astype(np.float32)
  labels = np.eye(4, dtype=np.float32)
  batch = example_fn({'image': tf.constant(images)})
  out = batch_fn({'image': batch['image'], 'labels': tf.constant(labels),
                  ops.SEED_KEY: tf.constant([7, -1], tf.int64)})
  lam = float(out['labels'][0, 0])
  assert 0 < lam < 1
  x = images / 255.
  np.testing.assert_allclose(out['image'], lam * x + (1 - lam) * np.roll(x, 1, 0), atol=1e-6)
  np.testing.assert_allclose(out['labels'], lam * labels + (1 - lam) * np.roll(labels, 1, 0))
  with pytest.raises(ValueError, match="batch ops must come last"):
    ops.parse_preprocess('mixup|flip_lr')
  with pytest.raises(ValueError, match='batch ops'):
    ops.get_preprocess_fn('decode|mixup')
