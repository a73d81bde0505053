"""RandAugment (Cubuk et al. 2020) as plain TensorFlow ops on uint8 HxWx3 images.

The 14 transforms of the paper follow PIL's definitions (ImageOps / ImageEnhance), so that
magnitudes mean what they mean in the published recipes. Geometric transforms fill uncovered
pixels with grey (128).
"""
import math

import tensorflow as tf

MAX_MAGNITUDE = 10.
FILL = 128.
MAX_ROTATE_DEGREES = 30.
MAX_SHEAR = 0.3
MAX_TRANSLATE = 0.3  # fraction of the image side (100 px at 331 px in the paper)
MAX_ENHANCE = 0.9  # color / contrast / brightness / sharpness factor = 1 +- 0.9


def _to_uint8(x):
  return tf.cast(tf.clip_by_value(tf.round(x), 0., 255.), tf.uint8)


def _grey(image):
  """ITU-R 601 luma as PIL computes it for 'L', broadcast to RGB, as float."""
  return tf.broadcast_to(tf.image.rgb_to_grayscale(tf.cast(image, tf.float32)), tf.shape(image))


def blend(degenerate, image, factor):
  """PIL ImageEnhance: degenerate + factor * (image - degenerate), clipped to uint8."""
  degenerate, image = tf.cast(degenerate, tf.float32), tf.cast(image, tf.float32)
  return _to_uint8(degenerate + factor * (image - degenerate))


def color(image, factor):
  return blend(_grey(image), image, factor)


def contrast(image, factor):
  mean = tf.reduce_mean(tf.round(_grey(image)[..., 0]))
  return blend(tf.fill(tf.shape(image), mean), image, factor)


def brightness(image, factor):
  return blend(tf.zeros_like(image), image, factor)


def sharpness(image, factor):
  """Blends with the image smoothed by PIL's SMOOTH kernel; the 1-pixel border stays as is."""
  kernel = tf.constant([[1., 1., 1.], [1., 5., 1.], [1., 1., 1.]]) / 13.
  kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
  x = tf.cast(image, tf.float32)[None]
  smooth = tf.round(tf.nn.depthwise_conv2d(x, kernel, [1, 1, 1, 1], 'VALID'))[0]
  smooth = tf.pad(smooth, [[1, 1], [1, 1], [0, 0]])
  inner = tf.pad(tf.ones_like(smooth[1:-1, 1:-1]), [[1, 1], [1, 1], [0, 0]])
  degenerate = inner * smooth + (1. - inner) * tf.cast(image, tf.float32)
  return blend(degenerate, image, factor)


def solarize(image, threshold):
  """Inverts pixels at or above `threshold`."""
  return tf.where(tf.cast(image, tf.float32) >= threshold, 255 - image, image)


def posterize(image, bits):
  """Keeps the `bits` most significant bits of each channel."""
  shift = tf.cast(8 - bits, tf.uint8)
  return tf.bitwise.left_shift(tf.bitwise.right_shift(image, shift), shift)


def autocontrast(image):
  """Stretches each channel's [min, max] to [0, 255] (channels with one value stay)."""
  x = tf.cast(image, tf.float32)
  lo = tf.reduce_min(x, axis=[0, 1])
  hi = tf.reduce_max(x, axis=[0, 1])
  scale = tf.where(hi > lo, 255. / tf.maximum(hi - lo, 1.), 1.)
  offset = tf.where(hi > lo, lo, 0.)
  return _to_uint8((x - offset) * scale)


def _equalize_channel(channel):
  """PIL ImageOps.equalize for one uint8 channel."""
  hist = tf.histogram_fixed_width(tf.cast(channel, tf.int32), [0, 255], nbins=256)
  last_nonzero = tf.gather(hist, tf.reduce_max(tf.where(hist > 0)[:, 0]))
  step = (tf.reduce_sum(hist) - last_nonzero) // 255
  lut = (tf.concat([[0], tf.cumsum(hist)[:-1]], 0) + step // 2) // tf.maximum(step, 1)
  lut = tf.cast(tf.clip_by_value(lut, 0, 255), tf.uint8)
  return tf.where(step == 0, channel, tf.gather(lut, tf.cast(channel, tf.int32)))


def equalize(image):
  return tf.stack([_equalize_channel(image[..., c]) for c in range(3)], axis=-1)


def affine(image, matrix):
  """Output pixel (x, y) takes input ((a, b, c) . (x, y, 1), (d, e, f) . (x, y, 1))."""
  h, w = tf.shape(image)[0], tf.shape(image)[1]
  transform = tf.concat([tf.cast(matrix, tf.float32), tf.zeros([2])], 0)[None]
  out = tf.raw_ops.ImageProjectiveTransformV3(
      images=image[None], transforms=transform, output_shape=tf.stack([h, w]),
      fill_value=FILL, interpolation='BILINEAR', fill_mode='CONSTANT')
  return out[0]


def rotate(image, degrees):
  """Rotation about the image centre."""
  h, w = tf.cast(tf.shape(image)[0], tf.float32), tf.cast(tf.shape(image)[1], tf.float32)
  cx, cy = (w - 1.) / 2., (h - 1.) / 2.
  theta = degrees * math.pi / 180.
  cos, sin = tf.cos(theta), tf.sin(theta)
  return affine(image, tf.stack([cos, -sin, cx - cos * cx + sin * cy,
                                 sin, cos, cy - sin * cx - cos * cy]))


def shear_x(image, shear):
  return affine(image, tf.stack([1., shear, 0., 0., 1., 0.]))


def shear_y(image, shear):
  return affine(image, tf.stack([1., 0., 0., shear, 1., 0.]))


def translate_x(image, pixels):
  return affine(image, tf.stack([1., 0., -pixels, 0., 1., 0.]))


def translate_y(image, pixels):
  return affine(image, tf.stack([1., 0., 0., 0., 1., -pixels]))


def _apply_op(index, image, level, sign):
  """Applies OPS[index] at `level` in [0, 1] (sign in {-1, 1} for the symmetric ones)."""
  side = tf.cast(tf.shape(image)[:2], tf.float32)
  enhance = 1. + sign * MAX_ENHANCE * level
  branches = [
      lambda: image,
      lambda: autocontrast(image),
      lambda: equalize(image),
      lambda: rotate(image, sign * MAX_ROTATE_DEGREES * level),
      lambda: solarize(image, 256. - 256. * level),
      lambda: color(image, enhance),
      lambda: posterize(image, 8 - tf.cast(4. * level, tf.int32)),
      lambda: contrast(image, enhance),
      lambda: brightness(image, enhance),
      lambda: sharpness(image, enhance),
      lambda: shear_x(image, sign * MAX_SHEAR * level),
      lambda: shear_y(image, sign * MAX_SHEAR * level),
      lambda: translate_x(image, sign * MAX_TRANSLATE * level * side[1]),
      lambda: translate_y(image, sign * MAX_TRANSLATE * level * side[0]),
  ]
  return tf.switch_case(index, branches)


OPS = ('identity', 'autocontrast', 'equalize', 'rotate', 'solarize', 'color', 'posterize',
       'contrast', 'brightness', 'sharpness', 'shear_x', 'shear_y', 'translate_x', 'translate_y')


def randaugment(image, num_layers: int, magnitude: float, seed):
  """`num_layers` transforms drawn uniformly (with replacement) from OPS, at `magnitude`."""
  level = magnitude / MAX_MAGNITUDE
  shape = image.shape
  seeds = tf.random.experimental.stateless_split(seed, num=num_layers)
  for i in range(num_layers):
    op_seed, sign_seed = tf.unstack(tf.random.experimental.stateless_split(seeds[i], num=2))
    index = tf.random.stateless_uniform([], op_seed, 0, len(OPS), dtype=tf.int32)
    sign = tf.where(tf.random.stateless_uniform([], sign_seed) < 0.5, -1., 1.)
    image = _apply_op(index, image, level, sign)
    image.set_shape(shape)
  return image
