"""Evaluation for self-supervised pretraining: the objective over the eval split, and for MAE a
PNG grid (original / masked / reconstruction) in the workdir at each evaluation."""
import functools

import jax
import jax.numpy as jnp

from vit_jax.scale import sharding
from vit_jax.storage import paths
from vit_jax.data import pipeline
from vit_jax.models import mae
from vit_jax.train import evaluators, ssl_steps, visualize

# Masks at evaluation are drawn from this fixed key, so evaluations are comparable across steps.
EVAL_MASK_SEED = 0


class SelfSupervisedEvaluator:
  """`val_loss` (MAE: masked-patch MSE; masked patch prediction: colour cross-entropy) and, for
  masked patch prediction, `val_accuracy` of the colour of the corrupted patches."""

  def __init__(self, config, model, mesh, params_sharding, objective, prefix: str = 'val'):
    self.config, self.mesh, self.prefix = config, mesh, prefix
    self.split = config.data.eval_split
    self._step = sharding.jit_with_rules(
        functools.partial(ssl_steps.eval_step, model=model, objective=objective,
                          rng=jax.random.key(EVAL_MASK_SEED)),
        mesh, sharding.rules_from_config(config),
        in_shardings=(params_sharding, sharding.batch_sharding(mesh)),
        out_shardings=sharding.replicated(mesh))

  def run(self, params, step: int) -> dict:
    del step  # the sums do not depend on it
    totals, count = evaluators.sum_over_split(self._step, params, self.config, self.mesh,
                                              self.split)
    result = {f'{self.prefix}_loss': float(totals['loss']) / count}
    if 'correct' in totals:
      result[f'{self.prefix}_accuracy'] = float(totals['correct']) / count
    return result


def reconstruct(params, images, *, model, norm_pix_loss: bool, mask_rng):
  """(masked images, reconstructions) for MAE, in image space.

  With norm_pix_loss the model predicts per-patch normalised pixels: they are mapped back with
  each original patch's mean and std. Visible patches of the reconstruction are the originals
  pasted in (the loss never scores the model's output there).
  """
  pred, mask = model.apply({'params': params}, images, train=False, mask_rng=mask_rng)
  target = mae.patchify(images, model.patch_size)
  if norm_pix_loss:
    std = jnp.sqrt(target.var(axis=-1, keepdims=True) + 1e-6)
    pred = pred * std + target.mean(axis=-1, keepdims=True)
  grid = (images.shape[1] // model.patch_size, images.shape[2] // model.patch_size)
  masked = jnp.where(mask[..., None] > 0, 0., target)  # grey where masked
  pasted = jnp.where(mask[..., None] > 0, pred, target)
  return (mae.unpatchify(masked, model.patch_size, grid),
          mae.unpatchify(pasted, model.patch_size, grid))


class MaeEvaluator(SelfSupervisedEvaluator):
  """`val_loss`, and WORKDIR/mae_recon_{step}.png: rows original / masked / reconstruction of the
  first `num_images` eval images. Only process 0 writes the picture."""

  def __init__(self, config, model, mesh, params_sharding, objective, workdir: str,
               num_images: int = 8):
    super().__init__(config, model, mesh, params_sharding, objective)
    self.workdir, self.num_images = workdir, num_images
    self._reconstruct = jax.jit(
        functools.partial(reconstruct, model=model,
                          norm_pix_loss=config.get('norm_pix_loss', False),
                          mask_rng=jax.random.key(EVAL_MASK_SEED)),
        in_shardings=(params_sharding, sharding.replicated(mesh)),
        out_shardings=sharding.replicated(mesh))
    # The first images of a batch split over processes, replicated so every process holds them.
    self._first = jax.jit(lambda x: x[:num_images], out_shardings=sharding.replicated(mesh))

  def path(self, step: int) -> str:
    return str(paths.resolve(self.workdir) / f'mae_recon_{step}.png')

  def run(self, params, step: int) -> dict:
    result = super().run(params, step)
    _, batches = pipeline.eval_batches(self.config, self.mesh, self.split)
    first = self._first(next(batches)['image'])
    originals, (masked, recon) = jax.device_get((first, self._reconstruct(params, first)))
    if jax.process_index() == 0:
      visualize.write_png(self.path(step), [originals, masked, recon],
                          scale=max(1, 64 // originals.shape[1]))
    return result
