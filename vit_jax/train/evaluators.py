"""Evaluators run every `eval_every` steps and at the end; each returns {metric_name: value}."""
import functools

import jax
import numpy as np

from vit_jax import sharding
from vit_jax.data import pipeline
from vit_jax.train import steps


class ClassificationEvaluator:
  """Top-1 over a whole split: `val_accuracy` (softmax) or `val_prec@1` (multi-label sigmoid)."""

  def __init__(self, config, model, mesh, params_sharding, prefix: str = 'val'):
    self.config, self.mesh, self.prefix = config, mesh, prefix
    self.split = config.data.eval_split
    self.metric = 'prec@1' if config.loss == 'sigmoid_xent' else 'accuracy'
    self._step = jax.jit(
        functools.partial(steps.eval_step, model=model,
                          loss_fn=steps.get_loss_fn(config.loss)),
        in_shardings=(params_sharding, sharding.batch_sharding(mesh)),
        out_shardings=sharding.replicated(mesh))

  def run(self, params) -> dict:
    _, batches = pipeline.eval_batches(self.config, self.mesh, self.split)
    totals = None
    for batch in batches:
      sums = self._step(params, batch)
      totals = sums if totals is None else jax.tree.map(np.add, totals, sums)
    totals = jax.device_get(totals)
    count = max(float(totals['count']), 1.)
    return {f'{self.prefix}_{self.metric}': float(totals['correct']) / count,
            f'{self.prefix}_loss': float(totals['loss']) / count}


def build(config, model, mesh, params_sharding) -> list:
  if not config.data.get('eval_split'):
    return []
  return [ClassificationEvaluator(config, model, mesh, params_sharding)]
