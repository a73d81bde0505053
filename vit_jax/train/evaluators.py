"""Evaluators run every `eval_every` steps and at the end; each returns {metric_name: value}."""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from vit_jax.scale import sharding
from vit_jax.data import pipeline
from vit_jax.train import fewshot, preemption, steps


_add = jax.jit(lambda a, b: jax.tree.map(jnp.add, a, b))


def sum_over_split(eval_step, params, config, mesh, split: str) -> tuple[dict, float]:
  """Adds up eval_step's per-batch sums over a whole (padded) split; returns (sums, count).

  The sums stay on the devices until the split is done: nothing waits for a batch's result,
  so reading batch b+1 overlaps evaluating batch b. A stop request ends it at any batch."""
  _, batches = pipeline.eval_batches(config, mesh, split)
  totals = None
  for batch in batches:
    preemption.check_evaluation()
    sums = eval_step(params, batch)
    totals = sums if totals is None else _add(totals, sums)
  totals = jax.device_get(totals)
  return totals, max(float(totals['count']), 1.)


class ClassificationEvaluator:
  """Top-1 over a whole split: `val_accuracy` (softmax) or `val_prec@1` (multi-label sigmoid)."""

  def __init__(self, config, model, mesh, params_sharding, prefix: str = 'val'):
    self.config, self.mesh, self.prefix = config, mesh, prefix
    self.split = config.data.eval_split
    self.metric = 'prec@1' if config.loss == 'sigmoid_xent' else 'accuracy'
    self._step = sharding.jit_with_rules(
        functools.partial(steps.eval_step, model=model,
                          loss_fn=steps.get_loss_fn(config.loss)),
        mesh, sharding.rules_from_config(config),
        in_shardings=(params_sharding, sharding.batch_sharding(mesh)),
        out_shardings=sharding.replicated(mesh))

  def run(self, params, step: int | None = None) -> dict:
    del step  # evaluators that write files (MAE's pictures) name them by the training step
    totals, count = sum_over_split(self._step, params, self.config, self.mesh, self.split)
    return {f'{self.prefix}_{self.metric}': float(totals['correct']) / count,
            f'{self.prefix}_loss': float(totals['loss']) / count}




class FewShotEvaluator:
  """Linear few-shot accuracy on frozen pre-logit features: `fewshot_<name>_<k>shot`."""

  def __init__(self, config, model, mesh, params_sharding):
    fs = config.fewshot
    self.mesh, self.fs = mesh, fs
    # Feature extraction reuses the eval pipeline with the few-shot dataset and preprocessing.
    self.data_config = config.copy_and_resolve_references()
    with self.data_config.unlocked():
      self.data_config.data = dict(name=fs.dataset, data_dir=config.data.get('data_dir', ''))
      self.data_config.pp_eval = fs.pp
    feature_model = model.clone(num_classes=None)
    self._features = sharding.jit_with_rules(
        lambda params, batch: (feature_model.apply({'params': params}, batch['image']),
                               batch['labels'], batch['mask']),
        mesh, sharding.rules_from_config(config),
        # Kept split over the batch: each device holds its own rows until they go to the host
        # (an all-gather onto every device would hold the split's features on each of them).
        in_shardings=(params_sharding, sharding.batch_sharding(mesh)),
        out_shardings=sharding.batch_sharding(mesh))

  def _extract(self, params, split: str):
    _, batches = pipeline.eval_batches(self.data_config, self.mesh, split)
    features, labels = [], []
    for batch in batches:
      preemption.check_evaluation()
      f, y, mask = sharding.to_host(self._features(params, batch))
      keep = mask > 0
      features.append(f[keep])
      labels.append(np.argmax(y[keep], axis=-1))
    return np.concatenate(features), np.concatenate(labels)

  def run(self, params, step: int | None = None) -> dict:
    del step  # evaluators that write files (MAE's pictures) name them by the training step
    train_x, train_y = self._extract(params, self.fs.train_split)
    test_x, test_y = self._extract(params, self.fs.test_split)
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    results = {}
    for shots in self.fs.shots:
      accuracies = []
      for seed in range(self.fs.get('seeds', 3)):
        idx = fewshot.select_shots(train_y, shots, seed)
        accuracies.append(fewshot.fewshot_accuracy(
            train_x[idx], train_y[idx], test_x, test_y, num_classes=num_classes,
            l2_reg=self.fs.get('l2_reg', 2.**10)))
      results[f'fewshot_{self.fs.get("name") or self.fs.dataset}_{shots}shot'] = float(
          np.mean(accuracies))
    return results


def build(config, model, mesh, params_sharding) -> list:
  """The evaluators a config asks for: classification on data.eval_split, few-shot if set."""
  evaluators = []
  if config.data.get('eval_split'):
    evaluators.append(ClassificationEvaluator(config, model, mesh, params_sharding))
  if config.get('fewshot') and config.fewshot.get('dataset'):
    evaluators.append(FewShotEvaluator(config, model, mesh, params_sharding))
  return evaluators
