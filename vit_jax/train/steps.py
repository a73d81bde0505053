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


def train_step(state: TrainState, batch: dict, *, model, tx, loss_fn, rng) -> tuple:
  """One optimizer step on a global batch {'image', 'labels'}; returns (state, metrics)."""
  dropout_rng = jax.random.fold_in(rng, state.step)

  def loss_of(params):
    logits = model.apply({'params': params}, batch['image'], train=True,
                         rngs={'dropout': dropout_rng})
    return jnp.mean(loss_fn(logits, batch['labels']))

  loss, grads = jax.value_and_grad(loss_of)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {'train_loss': loss, 'grad_norm': optax.tree.norm(grads)}
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params, batch: dict, *, model, loss_fn) -> dict:
  """Sums over the real (mask=1) examples of a padded batch: top-1 hits, loss, count.

  A hit is a top-1 class among the labels: accuracy for one-hot labels, prec@1 for multi-hot.
  """
  logits = model.apply({'params': params}, batch['image'], train=False)
  mask = batch['mask']
  labels = batch['labels']
  correct = jnp.take_along_axis(labels, jnp.argmax(logits, -1)[:, None], axis=-1)[:, 0] > 0
  return {'correct': jnp.sum(correct * mask),
          'loss': jnp.sum(loss_fn(logits, labels) * mask),
          'count': jnp.sum(mask)}
