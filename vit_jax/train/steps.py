"""Pure train / eval step functions. The trainer jits them with shardings."""
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
  """Everything a run needs to continue: one pytree, checkpointed whole."""
  step: jax.Array
  params: Any
  opt_state: Any


def softmax_xent(logits, labels):
  return -jnp.sum(labels * jax.nn.log_softmax(logits), axis=-1)


def sigmoid_xent(logits, labels):
  return jnp.sum(optax.sigmoid_binary_cross_entropy(logits, labels), axis=-1)


LOSSES = {'softmax_xent': softmax_xent, 'sigmoid_xent': sigmoid_xent}


def get_loss_fn(name: str) -> Callable:
  if name not in LOSSES:
    raise ValueError(f'unknown loss={name!r}; choose one of {sorted(LOSSES)}')
  return LOSSES[name]


def _microbatches(batch: dict, accum_steps: int) -> dict:
  """(B, ...) -> (accum_steps, B / accum_steps, ...), microbatch i = rows i, i + accum_steps, ...

  Strided rows keep every microbatch spread over all devices of the sharded batch dimension
  (a device's contiguous block of rows holds a share of each microbatch), so no data moves.
  """
  def split(x):
    if x.shape[0] % accum_steps:
      raise ValueError(f'batch of {x.shape[0]} is not divisible by accum_steps={accum_steps}')
    x = x.reshape((x.shape[0] // accum_steps, accum_steps) + x.shape[1:])
    return jnp.swapaxes(x, 0, 1)
  return jax.tree.map(split, batch)


def train_step(state: TrainState, batch: dict, *, tx, batch_loss: Callable, rng,
               accum_steps: int = 1) -> tuple:
  """One optimizer step of any task on a global batch; returns (state, metrics).

  batch_loss(params, batch, rng) -> the batch's mean loss (the task's objective); `rng` is
  fold_in(rng, step), folded again per microbatch. With accum_steps > 1 the batch is processed
  as that many equal microbatches in a loop inside the step and their gradients averaged: the
  same update as one large batch, with the activation memory of a microbatch.
  """
  step_rng = jax.random.fold_in(rng, state.step)
  loss_and_grads = jax.value_and_grad(batch_loss)

  if accum_steps == 1:
    loss, grads = loss_and_grads(state.params, batch, step_rng)
  else:
    def accumulate(carry, micro):
      index, microbatch = micro
      loss, grads = loss_and_grads(state.params, microbatch, jax.random.fold_in(step_rng, index))
      return jax.tree.map(jnp.add, carry, (loss, grads)), None
    zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, state.params))
    (loss, grads), _ = jax.lax.scan(
        accumulate, zeros, (jnp.arange(accum_steps), _microbatches(batch, accum_steps)))
    loss, grads = jax.tree.map(lambda x: x / accum_steps, (loss, grads))
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {'train_loss': loss, 'grad_norm': optax.tree.norm(grads)}
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def classification_loss(params, batch: dict, rng, *, model, loss_fn) -> jax.Array:
  """Mean `loss_fn` of the logits against batch['labels']; `rng` drives dropout."""
  logits = model.apply({'params': params}, batch['image'], train=True, rngs={'dropout': rng})
  return jnp.mean(loss_fn(logits, batch['labels']))


def all_finite(tree) -> jax.Array:
  """True when no leaf of `tree` holds a NaN or Inf."""
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def eval_step(params, batch: dict, *, model, loss_fn) -> dict:
  """Sums over the real (mask=1) examples of a padded batch: top-1 hits, loss, count.

  A hit is a top-1 class holding the label's maximum: accuracy for one-hot labels, prec@1 for
  multi-hot, and the same with label smoothing (where every class holds a label > 0).
  """
  logits = model.apply({'params': params}, batch['image'], train=False)
  mask = batch['mask']
  labels = batch['labels']
  predicted = jnp.take_along_axis(labels, jnp.argmax(logits, -1)[:, None], axis=-1)[:, 0]
  correct = predicted >= jnp.max(labels, axis=-1)
  return {'correct': jnp.sum(correct * mask),
          'loss': jnp.sum(loss_fn(logits, labels) * mask),
          'count': jnp.sum(mask)}
