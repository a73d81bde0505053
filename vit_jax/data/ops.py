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

from vit_jax.data import randaugment

_REGISTRY: dict[str, Callable] = {}
_BATCH_OPS: set[str] = set()

SEED_KEY = '_seed'


def register(name: str, batch: bool = False):
  """Registers an op factory; batch ops act on whole batches and come last in a string."""
  def wrap(factory):
    if name in _REGISTRY:
      raise ValueError(f'preprocessing op {name!r} is registered twice')
    _REGISTRY[name] = factory
    if batch:
      _BATCH_OPS.add(name)
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
  return _make_op(name, args, kwargs, spec)


def _make_op(name: str, args: tuple, kwargs: dict, spec: str) -> Callable:
  if name not in _REGISTRY:
    raise ValueError(f'unknown preprocessing op {name!r} in {spec!r}; '
                     f'known ops: {", ".join(registered_ops())}')
  factory = _REGISTRY[name]
  try:
    inspect.signature(factory).bind(*args, **kwargs)
  except TypeError as e:
    raise ValueError(f'preprocessing op {name!r}: bad arguments in {spec!r}: {e}') from None
  try:
    return factory(*args, **kwargs)
  except (TypeError, ValueError) as e:
    raise ValueError(f'preprocessing op {name!r}: bad arguments in {spec!r}: {e}') from None


def _fuse_decode_and_inception_crop(parsed: list) -> list:
  """'decode|inception_crop(...)' -> 'inception_crop(..., channels=c)', which decodes only the
  crop of a JPEG: the same pixels as decoding everything and cropping, in less time."""
  fused = []
  for entry in parsed:
    name, args, kwargs, spec = entry
    if name == 'inception_crop' and fused and fused[-1][0] == 'decode':
      decode_args = inspect.signature(decode).bind(*fused[-1][1], **fused[-1][2])
      decode_args.apply_defaults()
      crop_key = kwargs.get('key', 'image')
      if decode_args.arguments['key'] == crop_key and 'channels' not in kwargs:
        fused[-1] = (name, args, dict(kwargs, channels=decode_args.arguments['channels']), spec)
        continue
    fused.append(entry)
  return fused


# Ops ending in a resize of a uint8 image, and ops that only move pixels (any dtype, values
# kept) and so may stand between such a resize and a value_range.
_RESIZING = ('resize', 'resize_small', 'inception_crop')
_PIXEL_MOVING = ('flip_lr', 'random_crop', 'central_crop')


def _key(entry) -> str | None:
  """The key an op acts on; None where its name or arguments are wrong (_make_op says so)."""
  name, args, kwargs, _ = entry
  try:
    bound = inspect.signature(_REGISTRY[name]).bind(*args, **kwargs)
  except (KeyError, TypeError):
    return None
  bound.apply_defaults()
  return bound.arguments.get('key')


def _fuse_resize_into_value_range(parsed: list) -> list:
  """'resize(...)|flip_lr|value_range(...)' (any resizing op, any pixel-moving ops between):
  the resize hands on float32 holding the very numbers its uint8 result would, and
  value_range's cast has nothing to do. The same output, without a uint8 round trip of every
  pixel (a cast each way: ~0.2 ms of ~1.5 per ImageNet-size image)."""
  fused = list(parsed)
  for i, entry in enumerate(fused):
    key = _key(entry) if entry[0] == 'value_range' else None
    if key is None:
      continue
    j = i - 1
    while j >= 0 and fused[j][0] in _PIXEL_MOVING and _key(fused[j]) == key:
      j -= 1
    if (j >= 0 and fused[j][0] in _RESIZING and _key(fused[j]) == key
        and 'float_output' not in fused[j][2]):
      name, args, kwargs, spec = fused[j]
      fused[j] = (name, args, dict(kwargs, float_output=True), spec)
  return fused


def _compose(ops: list) -> Callable:
  def preprocess(data):
    data = dict(data)
    for op in ops:
      data = op(data)
    return data
  return preprocess


def parse_preprocess(spec: str) -> tuple[Callable, Callable | None]:
  """(per-example fn, per-batch fn or None) for a '|'-separated string.

  Batch ops (mixup) come after every per-example op; the pipeline applies them to each batch.
  """
  parsed = [(*_parse_op(s), s) for s in spec.split('|') if s.strip()]
  for (name, _, _, spec_i), nxt in zip(parsed, parsed[1:]):
    if name in _BATCH_OPS and nxt[0] not in _BATCH_OPS:
      raise ValueError(f'preprocessing op {nxt[0]!r} follows the batch op {name!r} in {spec!r}; '
                       'batch ops must come last')
  parsed = _fuse_resize_into_value_range(_fuse_decode_and_inception_crop(parsed))
  example_ops = [_make_op(*p) for p in parsed if p[0] not in _BATCH_OPS]
  batch_ops = [_make_op(*p) for p in parsed if p[0] in _BATCH_OPS]
  return _compose(example_ops), (_compose(batch_ops) if batch_ops else None)


def get_preprocess_fn(spec: str) -> Callable:
  """Composes the per-example ops of a '|'-separated string into one function."""
  example_fn, batch_fn = parse_preprocess(spec)
  if batch_fn is not None:
    raise ValueError(f'{spec!r} has batch ops ({", ".join(sorted(_BATCH_OPS))}); '
                     'they belong in pp_train, where the pipeline applies them per batch')
  return example_fn


def _split_seed(data):
  """Returns a fresh stateless seed for this op and advances the example's seed."""
  seeds = tf.random.experimental.stateless_split(data[SEED_KEY], num=2)
  data[SEED_KEY] = seeds[0]
  return seeds[1]


# --- image ops ---------------------------------------------------------------------------------

def _hw(size) -> tuple[int, int]:
  return (size, size) if isinstance(size, int) else tuple(size)


def _resize(image, hw, method: str, antialias: bool, float_output: bool = False):
  """tf.image.resize keeping the input dtype (uint8 rounded and clipped). float_output: uint8
  values (the same numbers, rounded alike) as float32, for a value_range that follows."""
  resized = tf.image.resize(image, hw, method=method, antialias=antialias)
  if image.dtype != tf.uint8 or resized.dtype == tf.uint8:  # 'nearest' keeps uint8
    return tf.cast(resized, tf.float32 if float_output else image.dtype)
  convex = method in _CONVEX_METHODS and not antialias  # within the input's range: no clip
  if float_output:
    return tf.floor(resized + 0.5) if convex else tf.clip_by_value(tf.round(resized), 0., 255.)
  if convex:
    return tf.cast(resized + 0.5, tf.uint8)
  return tf.saturate_cast(tf.round(resized), tf.uint8)


_RESIZE_METHODS = ('bilinear', 'nearest', 'bicubic', 'area', 'lanczos3', 'lanczos5', 'gaussian',
                   'mitchellcubic')


# Interpolations whose outputs are convex combinations of input pixels.
_CONVEX_METHODS = ('bilinear', 'nearest', 'area')


def _check_method(method: str):
  methods = _RESIZE_METHODS
  if method not in methods:
    raise ValueError(f'method={method!r}; choose one of {methods}')


@register('decode')
def decode(channels: int = 3, key: str = 'image'):
  """Decodes JPEG/PNG/GIF/BMP bytes to uint8 with `channels` channels (1 or 3 -> RGB)."""
  if channels not in (1, 3):
    raise ValueError(f'channels={channels}; choose 1 or 3')

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
def resize(size, method: str = 'bilinear', antialias: bool = False, float_output: bool = False,
           key: str = 'image'):
  """Resizes to size (int or (h, w)) with a tf.image.ResizeMethod, keeping the input dtype
  (float_output: see _fuse_resize_into_value_range)."""
  _check_method(method)
  hw = _hw(size)

  def fn(data):
    data[key] = _resize(data[key], hw, method, antialias, float_output)
    return data
  return fn


@register('resize_small')
def resize_small(size: int, method: str = 'bilinear', antialias: bool = False,
                 float_output: bool = False, key: str = 'image'):
  """Resizes the shorter side to `size`, keeping the aspect ratio (before a central crop)."""
  _check_method(method)

  def fn(data):
    image = data[key]
    h, w = tf.cast(tf.shape(image)[0], tf.float32), tf.cast(tf.shape(image)[1], tf.float32)
    scale = size / tf.minimum(h, w)
    hw = tf.cast(tf.round(tf.stack([h * scale, w * scale])), tf.int32)
    data[key] = _resize(image, tf.maximum(hw, size), method, antialias, float_output)
    return data
  return fn


@register('value_range')
def value_range(vmin: float = -1., vmax: float = 1., in_min: float = 0., in_max: float = 255.,
                key: str = 'image'):
  """Maps [in_min, in_max] linearly to [vmin, vmax] as float32."""
  # vmin + (image - in_min) * (vmax - vmin) / (in_max - in_min), with the steps that change
  # nothing (- 0, * 1, / 1, 0 +) left out: a pass over every pixel each.
  def fn(data):
    image = tf.cast(data[key], tf.float32)
    if in_min:
      image = image - in_min
    if vmax - vmin != 1:
      image = image * (vmax - vmin)
    if in_max - in_min != 1:
      image = image / (in_max - in_min)
    data[key] = image + vmin if vmin else image
    return data
  return fn


@register('flip_lr')
def flip_lr(key: str = 'image'):
  """Mirrors left-right with probability 1/2 (a cond: only the chosen branch touches pixels)."""
  def fn(data):
    image = data[key]
    flip = tf.random.stateless_uniform([], _split_seed(data)) < 0.5
    data[key] = tf.cond(flip, lambda: tf.reverse(image, [1]), lambda: image)
    return data
  return fn


@register('random_crop')
def random_crop(size, pad: int = 0, key: str = 'image'):
  """Random (size x size) crop, after zero padding each side by `pad` pixels."""
  hw = _hw(size)

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
  hw = _hw(size)

  def fn(data):
    image = data[key]
    h, w = tf.shape(image)[0], tf.shape(image)[1]
    top, left = (h - hw[0]) // 2, (w - hw[1]) // 2
    data[key] = image[top:top + hw[0], left:left + hw[1]]
    return data
  return fn


# libjpeg's DCT scalings: a JPEG decodes at 1/1, 1/2, 1/4 or 1/8 of its size (the inverse DCT
# of each 8x8 block computed at 8, 4, 2 or 1 pixels; decode_jpeg's `ratio`).
_DCT_RATIOS = (1, 2, 4, 8)


def _decode_crop_scaled(jpeg, begin, crop_size, hw, channels: int):
  """The crop (begin, crop_size) of a JPEG, decoded at the smallest DCT scale that leaves it at
  least hw (1/r with r the largest of _DCT_RATIOS with crop_size >= r * hw): about the crop's
  pixels r x r-averaged. decode_and_crop_jpeg takes its window in the scaled image's pixels
  (ceil(H / r) x ceil(W / r)), so the crop's edges are rounded to the nearest of those."""
  shape = tf.io.extract_jpeg_shape(jpeg)[:2]
  index = tf.add_n([tf.cast(tf.reduce_all(crop_size[:2] >= r * tf.constant(hw)), tf.int32)
                    for r in _DCT_RATIOS[1:]])  # of _DCT_RATIOS: those that fit are the first

  def scaled(r):
    def decode():
      limit = (shape + r - 1) // r
      top_left = tf.minimum((begin[:2] + r // 2) // r, limit - 1)
      bottom_right = tf.minimum((begin[:2] + crop_size[:2] + r // 2) // r, limit)
      window = tf.concat([top_left, tf.maximum(bottom_right - top_left, 1)], 0)
      return tf.io.decode_and_crop_jpeg(jpeg, window, channels=channels, ratio=r)
    return decode
  return tf.switch_case(index, [scaled(r) for r in _DCT_RATIOS])


@register('inception_crop')
def inception_crop(size, area_min: float = 0.05, area_max: float = 1.,
                   aspect_min: float = 3 / 4, aspect_max: float = 4 / 3,
                   method: str = 'bilinear', antialias: bool = False, channels: int = 3,
                   fast_decode: bool = False, float_output: bool = False, key: str = 'image'):
  """Random crop of area_min..area_max of the image, aspect (w/h) in aspect_min..aspect_max,
  resized to `size` (Szegedy et al. 2015, the usual ImageNet/JFT training crop).

  On still-encoded JPEG bytes only the crop is decoded (decode_and_crop_jpeg); other formats
  are decoded whole with `channels`. 'decode|inception_crop(...)' is fused into this.
  fast_decode: a JPEG crop at least twice `size` is decoded at a reduced DCT scale (1/2, 1/4,
  1/8: the largest that leaves it at least `size`), then resized: other pixels than the exact
  path's (an average of each r x r block where the exact path samples between pixels), the
  same crop to within a pixel of the scaled image; crops smaller than twice `size` are decoded
  exactly as without it.
  """
  _check_method(method)
  if not 0 < area_min <= area_max <= 1:
    raise ValueError(f'need 0 < area_min <= area_max <= 1, got {area_min}, {area_max}')
  if not 0 < aspect_min <= aspect_max:
    raise ValueError(f'need 0 < aspect_min <= aspect_max, got {aspect_min}, {aspect_max}')
  hw = _hw(size)

  def window(image_shape, seed):
    begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
        image_shape, tf.zeros([1, 0, 4], tf.float32), seed=seed, min_object_covered=0.,
        aspect_ratio_range=(aspect_min, aspect_max), area_range=(area_min, area_max),
        max_attempts=10, use_image_if_no_bounding_boxes=True)
    return begin, crop_size

  def crop_encoded(image, seed):
    def jpeg():
      begin, crop_size = window(tf.io.extract_jpeg_shape(image), seed)
      if fast_decode:
        return _decode_crop_scaled(image, begin, crop_size, hw, channels)
      return tf.io.decode_and_crop_jpeg(
          image, tf.stack([begin[0], begin[1], crop_size[0], crop_size[1]]), channels=channels)

    def other():
      decoded = tf.io.decode_image(image, channels=channels, expand_animations=False)
      begin, crop_size = window(tf.shape(decoded), seed)
      return tf.slice(decoded, begin, crop_size)
    return tf.cond(tf.io.is_jpeg(image), jpeg, other)

  def fn(data):
    image, seed = data[key], _split_seed(data)
    if image.dtype == tf.string:
      cropped = crop_encoded(image, seed)
    else:
      begin, crop_size = window(tf.shape(image), seed)
      cropped = tf.slice(image, begin, crop_size)
    data[key] = _resize(cropped, hw, method, antialias, float_output)
    return data
  return fn


@register('randaug')
def randaug(num_layers: int = 2, magnitude: float = 10., key: str = 'image'):
  """RandAugment (Cubuk et al. 2020) on uint8 images: `num_layers` ops drawn uniformly from
  randaugment.OPS, each at `magnitude` (0-10) with a random sign."""
  if not 0 <= magnitude <= randaugment.MAX_MAGNITUDE:
    raise ValueError(f'magnitude={magnitude}; choose 0..{randaugment.MAX_MAGNITUDE}')

  def fn(data):
    data[key] = randaugment.randaugment(data[key], num_layers, magnitude, _split_seed(data))
    return data
  return fn


# --- batch ops (applied by the pipeline to each batch; the batch's seed comes from its step) -----

@register('mixup', batch=True)
def mixup(alpha: float = 0.2, keys: tuple = ('image', 'labels')):
  """Mixes each example with its neighbour in the batch: x = lam*x + (1-lam)*roll(x, 1) for
  every key, one lam ~ Beta(alpha, alpha) per batch (Zhang et al. 2018)."""
  if alpha <= 0:
    raise ValueError(f'alpha={alpha} must be > 0')

  def fn(batch):
    gammas = tf.random.stateless_gamma([2], _split_seed(batch), alpha)
    lam = gammas[0] / (gammas[0] + gammas[1])
    for k in keys:
      x = tf.cast(batch[k], tf.float32)
      batch[k] = lam * x + (1. - lam) * tf.roll(x, 1, axis=0)
    return batch
  return fn


# --- label ops ---------------------------------------------------------------------------------

# Keys that name an example in the sources we read (TFDS ids, file names), first found wins.
_NAME_KEYS = ('tfds_id', 'id', 'image/id', 'file_name', 'filename', 'image/filename')


def _example_name(data: dict) -> list:
  """What tf.debugging.Assert prints to name an example: its id or file name, else the
  pipeline's per-example seed (its last entry is the example's index in the read order)."""
  for k in _NAME_KEYS:
    if k in data and data[k].dtype == tf.string and data[k].shape.rank == 0:
      return [f'{k}=', data[k]]
  if SEED_KEY in data:
    return ['with seed', data[SEED_KEY]]
  return ['(unnamed)']


@register('onehot')
def onehot(num_classes: int, key: str = 'label', key_result: str = 'labels',
           on: float = 1., off: float = 0., label_smoothing: float = 0.):
  """Integer label(s) -> (multi-)hot float vector; a list of labels gives a multi-hot vector."""
  if label_smoothing:
    on, off = 1. - label_smoothing + label_smoothing / num_classes, label_smoothing / num_classes

  def fn(data):
    labels = tf.cast(data[key], tf.int32)
    # An empty label list would give -inf targets (NaN loss), an id outside [0, num_classes) an
    # all-`off` target: both stop the input pipeline, with the example's labels and name.
    flat = tf.reshape(labels, [-1])
    valid = tf.logical_and(tf.size(flat) > 0, tf.reduce_all((flat >= 0) & (flat < num_classes)))
    check = tf.debugging.Assert(valid, [
        f"onehot({num_classes}): example", *_example_name(data),
        f"has '{key}' =", flat, f'(needs at least one id in [0, {num_classes}))'],
        summarize=20)
    with tf.control_dependencies([check]):
      labels = tf.identity(labels)
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
