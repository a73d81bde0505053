"""Optax optimizers and learning-rate schedules from config."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from absl import logging

from vit_jax.cli import errors


def make_schedule(config) -> optax.Schedule:
  """Linear warmup to `base_lr`, then 'cosine', 'linear', 'rsqrt' or 'constant' decay; with
  `cooldown_steps`, times a linear ramp to 0 over the last that many steps (big_vision's
  cooldown, which the scaling recipes put after their rsqrt decay)."""
  schedule = _warmup_and_decay(config)
  total, cooldown = config.total_steps, config.schedule.get('cooldown_steps', 0)
  if not cooldown:
    return schedule
  if cooldown >= total:  # a smoke run of a long recipe: as with warmup, run rather than fail
    logging.warning('schedule.cooldown_steps=%d >= total_steps=%d: no cooldown', cooldown, total)
    return schedule
  return lambda step: schedule(step) * jnp.clip((total - step) / cooldown, 0., 1.)


def _warmup_and_decay(config) -> optax.Schedule:
  s = config.schedule
  total, warmup = config.total_steps, s.get('warmup_steps', 0)
  base_lr, end_lr = s.base_lr, s.get('end_lr', 0.)
  if warmup >= total:
    # A smoke run (total_steps=5 on a recipe with 100 or 10k warmup steps) should run, not fail:
    # it warms up over the whole run, which is what its schedule asked for up to that step.
    logging.warning('schedule.warmup_steps=%d >= total_steps=%d: warming up over all %d steps '
                    '(no decay)', warmup, total, total)
    return optax.linear_schedule(0., base_lr, total)
  decay_steps = total - warmup
  decay_type = s.get('decay_type', 'cosine')
  if decay_type == 'cosine':
    # Written out rather than optax.cosine_decay_schedule, whose alpha = end_lr / base_lr has
    # no value at base_lr=0 (a frozen-weights run or an lr sweep's zero point).
    def decay(step):
      progress = jnp.clip(step / decay_steps, 0., 1.)
      return end_lr + (base_lr - end_lr) * 0.5 * (1. + jnp.cos(math.pi * progress))
  elif decay_type == 'linear':
    decay = optax.linear_schedule(base_lr, end_lr, decay_steps)
  elif decay_type == 'rsqrt':
    timescale = s.get('timescale', 10_000)
    decay = lambda step: base_lr * (1. + step / timescale) ** -0.5  # noqa: E731
  elif decay_type == 'constant':
    decay = optax.constant_schedule(base_lr)
  else:
    raise errors.UserError(f'unknown schedule.decay_type={decay_type!r}; '
                           "choose 'cosine', 'linear', 'rsqrt' or 'constant'")
  if not warmup:
    return decay
  return optax.join_schedules([optax.linear_schedule(0., base_lr, warmup), decay], [warmup])


# Optimizers whose weight decay is added to the update before the learning rate scales it.
DECOUPLED = ('adam', 'adamw', 'big_vision_adafactor')


def _param_name(path) -> str:
  """'Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel' for a leaf's tree path; the keys of
  boxes (nn.LogicallyPartitioned's `.value`) and other non-dict nodes are left out."""
  return '/'.join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def decays(name: str) -> bool:
  """Weight decay applies to kernels only (big_vision's default, `.*/kernel$`): never to biases,
  norms, cls, position embeddings, the MAP probe, relative-position tables or mask tokens. By
  name, so a scanned tree (every leaf one axis more) decays exactly what the unscanned one does."""
  return name.endswith('/kernel') or name == 'kernel'


def _decay_mask(params):
  return jax.tree_util.tree_map_with_path(lambda path, _: decays(_param_name(path)), params)


def _is_head(name: str) -> bool:
  return name.split('/')[0] == 'head'


def _masked_decay(rate: float, head: bool) -> optax.GradientTransformation:
  """Decoupled weight decay at `rate` on the kernels that are (head=True) or are not the head's."""
  return optax.add_decayed_weights(rate, mask=lambda params: jax.tree_util.tree_map_with_path(
      lambda path, _: decays(_param_name(path)) and _is_head(_param_name(path)) == head, params))


def _decoupled_weight_decay(o) -> list:
  """Weight decay added to the update before the learning rate scales it (as optax.adamw: the
  rate is relative to the learning rate): `weight_decay` on every kernel, or with
  `head_weight_decay` set, that on the head's kernel and `weight_decay` on the others (Zhai et
  al. 2022 decay the head 100x harder: 3.0 against 0.03)."""
  wd, head_wd = o.get('weight_decay', 0.), o.get('head_weight_decay', None)
  if head_wd is None:
    return [optax.add_decayed_weights(wd, mask=_decay_mask)] if wd else []
  return [_masked_decay(wd, head=False), _masked_decay(head_wd, head=True)]


def _big_vision_adafactor(o) -> optax.GradientTransformation:
  """The memory-saving Adafactor of "Scaling Vision Transformers" (Zhai et al. 2022; big_vision's
  `scale_by_adafactor`), before weight decay and learning rate: the second moment factored into
  row and column means (a kernel's state is its rows plus its columns, not its size), decayed
  by 1 - t^-0.8 up to `b2` (0.999); then momentum `b1` on the normalised update, kept in
  `momentum_dtype` (bfloat16 halves what Adam's first moment costs); no parameter-scale
  learning rates and no update clipping. Per parameter: 4 bytes of weights, 2 of momentum."""
  b2_cap = o.get('b2', 0.999)

  def second_moment_decay(step, exponent):
    return jnp.minimum(b2_cap, 1. - (jnp.asarray(step, jnp.float32) + 1.) ** -exponent)
  return optax.chain(
      optax.scale_by_factored_rms(factored=True, decay_rate=0.8, min_dim_size_to_factor=32,
                                  epsilon=1e-30, decay_rate_fn=second_moment_decay),
      optax.ema(o.get('b1', 0.9), debias=False,
                accumulator_dtype=jnp.dtype(o.get('momentum_dtype', None) or 'float32')))


def _state_names_its_axes(tx: optax.GradientTransformation) -> optax.GradientTransformation:
  """`tx` whose initial state names the axes its arrays have. Model parameters come boxed with
  their logical axis names, and optimizer states built by mapping over them inherit those boxes;
  a factored second moment keeps a kernel's row and column means, one axis fewer, in boxes that
  still name all of the kernel's axes, which no sharding fits. Such a state takes the names of
  the axes it kept (found by shape among the parameters of those names); the placeholder
  arrays of unfactored leaves are replicated."""
  def is_box(x):
    return isinstance(x, nn.LogicallyPartitioned)

  def init(params):
    state = tx.init(params)
    shapes = {}
    for p in jax.tree.leaves(params, is_leaf=is_box):
      if is_box(p):
        shapes.setdefault(p.names, set()).add(p.value.shape)

    def rename(x):
      if not is_box(x) or x.value.ndim == len(x.names):
        return x
      for shape in shapes.get(x.names, ()):
        for axis in range(len(shape)):
          if shape[:axis] + shape[axis + 1:] == x.value.shape:
            return x.replace(names=x.names[:axis] + x.names[axis + 1:])
      return x.replace(names=(None,) * x.value.ndim)
    return jax.tree.map(rename, state, is_leaf=is_box)
  return optax.GradientTransformation(init, tx.update)


def make_optimizer(config) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """optimizer.name: 'adam'/'adamw' (decoupled weight decay, same thing), 'sgd' (momentum),
  'adafactor' (optax's), 'big_vision_adafactor' (the scaling papers' memory-saving variant);
  global-norm clipping when optimizer.grad_clip_norm > 0."""
  o = config.optimizer
  schedule = make_schedule(config)
  name = o.name
  wd = o.get('weight_decay', 0.)
  if o.get('head_weight_decay', None) is not None and name not in DECOUPLED:
    raise errors.UserError(f'optimizer.head_weight_decay is for {", ".join(DECOUPLED)}, not '
                           f'optimizer.name={name!r}')
  if name in ('adam', 'adamw') and o.get('head_weight_decay', None) is None:
    tx = optax.adamw(schedule, b1=o.get('b1', 0.9), b2=o.get('b2', 0.999),
                     weight_decay=wd, mask=_decay_mask)
  elif name in DECOUPLED:
    scale = (optax.scale_by_adam(b1=o.get('b1', 0.9), b2=o.get('b2', 0.999))
             if name != 'big_vision_adafactor' else _big_vision_adafactor(o))
    tx = _state_names_its_axes(optax.chain(scale, *_decoupled_weight_decay(o),
                                           optax.scale_by_learning_rate(schedule)))
  elif name == 'sgd':
    tx = optax.chain(optax.add_decayed_weights(wd, mask=_decay_mask) if wd else optax.identity(),
                     optax.sgd(schedule, momentum=o.get('momentum', 0.9),
                               nesterov=o.get('nesterov', False)))
  elif name == 'adafactor':
    tx = _state_names_its_axes(optax.adafactor(schedule, weight_decay_rate=wd or None,
                                               weight_decay_mask=_decay_mask))
  else:
    raise errors.UserError(f"unknown optimizer.name={name!r}; choose 'adam', 'adamw', 'sgd', "
                           "'adafactor' or 'big_vision_adafactor'")
  clip = o.get('grad_clip_norm', 0.)
  if clip:
    tx = optax.chain(optax.clip_by_global_norm(clip), tx)
  return tx, schedule
