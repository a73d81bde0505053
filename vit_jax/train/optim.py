"""Optax optimizers and learning-rate schedules from config."""
import math

import jax
import jax.numpy as jnp
import optax
from absl import logging

from vit_jax.cli import errors


def make_schedule(config) -> optax.Schedule:
  """Linear warmup to `base_lr`, then 'cosine', 'linear', 'rsqrt' or 'constant' decay."""
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


def make_optimizer(config) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """optimizer.name: 'adam'/'adamw' (decoupled weight decay, same thing), 'sgd' (momentum),
  'adafactor'; global-norm clipping when optimizer.grad_clip_norm > 0."""
  o = config.optimizer
  schedule = make_schedule(config)
  name = o.name
  wd = o.get('weight_decay', 0.)
  if name in ('adam', 'adamw'):
    tx = optax.adamw(schedule, b1=o.get('b1', 0.9), b2=o.get('b2', 0.999),
                     weight_decay=wd, mask=_decay_mask)
  elif name == 'sgd':
    tx = optax.chain(optax.add_decayed_weights(wd, mask=_decay_mask) if wd else optax.identity(),
                     optax.sgd(schedule, momentum=o.get('momentum', 0.9),
                               nesterov=o.get('nesterov', False)))
  elif name == 'adafactor':
    tx = optax.adafactor(schedule, weight_decay_rate=wd or None, weight_decay_mask=_decay_mask)
  else:
    raise errors.UserError(f"unknown optimizer.name={name!r}; choose 'adam', 'adamw', 'sgd' or "
                           "'adafactor'")
  clip = o.get('grad_clip_norm', 0.)
  if clip:
    tx = optax.chain(optax.clip_by_global_norm(clip), tx)
  return tx, schedule
