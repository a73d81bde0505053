"""Preprocessing ops, registered by name and composed from a string.

    get_preprocess_fn("decode|resize(16)|value_range(-1, 1)|onehot(10)")

Each op factory takes the arguments written in the string and returns a function
`dict -> dict` on one example (tf tensors). Random ops draw from `data['_seed']`, a stateless
seed the pipeline derives from (config seed, process, example index), so every run with the same
seed sees the same augmentations and resumes exactly. Unknown ops and bad arguments fail when the
string is parsed, naming the op.
"""
import ast
import inspect
from typing import Callable

import tensorflow as tf

_REGISTRY: dict[str, Callable] = {}

SEED_KEY = '_seed'


def register(name: str):
  def wrap(factory):
    if name in _REGISTRY:
      raise ValueError(f'preprocessing op {name!r} is registered twice')
    _REGISTRY[name] = factory
    return factory
  return wrap


def registered_ops() -> list[str]:
  return sorted(_REGISTRY)


def _parse_op(spec: str):
  """'name(1, b=2)' -> (name, args, kwargs), literals only."""
  try:
    call = ast.parse(spec.strip(), mode='eval').body
  except SyntaxError as e:
    raise ValueError(f'cannot parse preprocessing op {spec!r}: {e.msg}') from None
  if isinstance(call, ast.Name):
    return call.id, (), {}
  if not isinstance(call, ast.Call) or not isinstance(call.func, ast.Name):
    raise ValueError(f'preprocessing op {spec!r} should look like name or name(args)')
  try:
    args = tuple(ast.literal_eval(a) for a in call.args)
    kwargs = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
  except ValueError:
    raise ValueError(f'preprocessing op {call.func.id!r}: arguments must be literals, '
                     f'got {spec!r}') from None
  return call.func.id, args, kwargs


def get_op(spec: str) -> Callable:
  name, args, kwargs = _parse_op(spec)
  if name not in _REGISTRY:
    raise ValueError(f'unknown preprocessing op {name!r} in {spec!r}; '
                     f'known ops: {", ".join(registered_ops())}')
  factory = _REGISTRY[name]
  try:
    inspect.signature(factory).bind(*args, **kwargs)
  except TypeError as e:
    raise ValueError(f'preprocessing op {name!r}: bad arguments in {spec!r}: {e}') from None
  return factory(*args, **kwargs)


def get_preprocess_fn(spec: str) -> Callable:
  """Composes the ops of a '|'-separated string into one function."""
  ops = [get_op(s) for s in spec.split('|') if s.strip()]

  def preprocess(data):
    data = dict(data)
    for op in ops:
      data = op(data)
    return data
  return preprocess


def _split_seed(data):
  """Returns a fresh stateless seed for this op and advances the example's seed."""
  seeds = tf.random.experimental.stateless_split(data[SEED_KEY], num=2)
  data[SEED_KEY] = seeds[0]
  return seeds[1]


# --- image ops ---------------------------------------------------------------------------------

@register('decode')
def decode(channels: int = 3, key: str = 'image'):
  """Decodes JPEG/PNG/GIF/BMP bytes to uint8 with `channels` channels (1 or 3 -> RGB)."""
  def fn(data):
    image = data[key]
    if image.dtype == tf.string:
      image = tf.io.decode_image(image, channels=channels, expand_animations=False)
    elif image.shape[-1] != channels and channels == 3:
      image = tf.image.grayscale_to_rgb(image)
    data[key] = image
    return data
  return fn


@register('resize')
def resize(size, method: str = 'bilinear', antialias: bool = False, key: str = 'image'):
  """Resizes to size (int or (h, w)), keeping the input dtype."""
  hw = (size, size) if isinstance(size, int) else tuple(size)

  def fn(data):
    image = data[key]
    resized = tf.image.resize(image, hw, method=method, antialias=antialias)
    data[key] = tf.cast(tf.clip_by_value(resized, 0, 255), image.dtype) \
        if image.dtype == tf.uint8 else tf.cast(resized, image.dtype)
    return data
  return fn


@register('value_range')
def value_range(vmin: float = -1., vmax: float = 1., in_min: float = 0., in_max: float = 255.,
                key: str = 'image'):
  """Maps [in_min, in_max] linearly to [vmin, vmax] as float32."""
  def fn(data):
    image = tf.cast(data[key], tf.float32)
    data[key] = vmin + (image - in_min) * (vmax - vmin) / (in_max - in_min)
    return data
  return fn


@register('flip_lr')
def flip_lr(key: str = 'image'):
  def fn(data):
    data[key] = tf.image.stateless_random_flip_left_right(data[key], _split_seed(data))
    return data
  return fn


@register('random_crop')
def random_crop(size, pad: int = 0, key: str = 'image'):
  """Random (size x size) crop, after zero padding each side by `pad` pixels."""
  hw = (size, size) if isinstance(size, int) else tuple(size)

  def fn(data):
    image = data[key]
    if pad:
      image = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]])
    data[key] = tf.image.stateless_random_crop(
        image, (*hw, tf.shape(image)[-1]), _split_seed(data))
    return data
  return fn


@register('central_crop')
def central_crop(size, key: str = 'image'):
  hw = (size, size) if isinstance(size, int) else tuple(size)

  def fn(data):
    image = data[key]
    h, w = tf.shape(image)[0], tf.shape(image)[1]
    top, left = (h - hw[0]) // 2, (w - hw[1]) // 2
    data[key] = image[top:top + hw[0], left:left + hw[1]]
    return data
  return fn


# --- label ops ---------------------------------------------------------------------------------

@register('onehot')
def onehot(num_classes: int, key: str = 'label', key_result: str = 'labels',
           on: float = 1., off: float = 0., label_smoothing: float = 0.):
  """Integer label(s) -> (multi-)hot float vector; a list of labels gives a multi-hot vector."""
  if label_smoothing:
    on, off = 1. - label_smoothing + label_smoothing / num_classes, label_smoothing / num_classes

  def fn(data):
    labels = tf.cast(data[key], tf.int32)
    hot = tf.one_hot(labels, num_classes, on, off)
    if labels.shape.rank == 1:  # several labels: combine into one multi-hot vector
      hot = tf.reduce_max(hot, axis=0)
    data[key_result] = hot
    return data
  return fn


@register('keep')
def keep(*keys: str):
  """Drops every key but these (and the seed)."""
  def fn(data):
    return {k: v for k, v in data.items() if k in keys or k == SEED_KEY}
  return fn
