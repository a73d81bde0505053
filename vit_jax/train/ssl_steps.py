"""Loss and eval step of self-supervised objectives (MAE and masked patch prediction, in
`vit_jax.train.tasks`), and the pixel-target helpers MAE uses.

An objective maps (model, params, images, rngs) to per-example sums {'loss', 'count', ...} over
the patches it scores (masked ones for MAE, corrupted ones for masked patch prediction). Training
divides the batch's loss sum by its count; evaluation sums both over a split first, so padded
(mask=0) examples and uneven batches do not bias the result.
"""
import jax
import jax.numpy as jnp


def normalise_patches(patches: jax.Array, eps: float = 1e-6) -> jax.Array:
  """Per-patch zero mean, unit variance: MAE's norm_pix_loss targets."""
  mean = patches.mean(axis=-1, keepdims=True)
  var = patches.var(axis=-1, keepdims=True)
  return (patches - mean) / jnp.sqrt(var + eps)


def masked_mse(pred, target, mask) -> dict:
  """Per-example sum of per-patch MSE over masked patches only, and the masked-patch count."""
  per_patch = jnp.mean((pred - target)**2, axis=-1)
  return {'loss': jnp.sum(per_patch * mask, axis=-1), 'count': jnp.sum(mask, axis=-1)}


def objective_loss(params, batch: dict, rng, *, model, objective) -> jax.Array:
  """The batch's loss sum over its count (the batch loss `steps.train_step` takes); masks and
  dropout drawn from `rng`."""
  mask_rng, dropout_rng = jax.random.split(rng)
  sums = objective(model, params, batch['image'], mask_rng=mask_rng, train=True,
                   dropout_rng=dropout_rng)
  return jnp.sum(sums['loss']) / jnp.maximum(jnp.sum(sums['count']), 1.)


def eval_step(params, batch: dict, *, model, objective, rng) -> dict:
  """Sums of the objective's entries over the real (mask=1) examples of a padded batch."""
  sums = objective(model, params, batch['image'], mask_rng=rng, train=False)
  return {k: jnp.sum(v * batch['mask']) for k, v in sums.items()}
