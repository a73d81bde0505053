"""Masked patch prediction (ViT paper, 5.4): the 3-bit mean colour of corrupted patches."""
import functools

import jax
import jax.numpy as jnp

from vit_jax.models import mae
from vit_jax.train import defaults, ssl_evaluators, ssl_steps
from vit_jax.train import tasks


def objective(model, params, images, *, mask_rng, train, dropout_rng=None) -> dict:
  """Per-example sums {'loss', 'correct', 'count'} over the corrupted patches."""
  logits, corrupted = model.apply({'params': params}, images, train=train, mask_rng=mask_rng,
                                  rngs={'dropout': dropout_rng} if train else {})
  targets = mae.mean_colour_classes(images, model.patch_size)
  xent = -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], axis=-1)[..., 0]
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  return {'loss': jnp.sum(xent * corrupted, axis=-1),
          'correct': jnp.sum(correct * corrupted, axis=-1),
          'count': jnp.sum(corrupted, axis=-1)}


class MaskedPatchPrediction(tasks.Task):
  name = 'masked_patch'

  def model(self, config):
    return mae.get_model('masked_patch', config.model.name,
                         **defaults.model_options(config.model))

  def batch_loss(self, config, model):
    return functools.partial(ssl_steps.objective_loss, model=model, objective=objective)

  def evaluators(self, config, model, mesh, params_sharding, workdir):
    del workdir  # writes no files
    if not config.data.get('eval_split'):
      return []
    return [ssl_evaluators.SelfSupervisedEvaluator(config, model, mesh, params_sharding,
                                                   objective)]


tasks.register(MaskedPatchPrediction())
