"""Supervised classification: softmax or sigmoid cross-entropy on (multi-)hot labels."""
import functools

from vit_jax import models
from vit_jax.train import defaults, evaluators, steps
from vit_jax.train import tasks


class Classification(tasks.Task):
  name = 'classification'
  has_labels = True

  def model(self, config):
    return models.get_model(config.model.name, num_classes=config.num_classes,
                            **defaults.model_options(config.model))

  def batch_loss(self, config, model):
    return functools.partial(steps.classification_loss, model=model,
                             loss_fn=steps.get_loss_fn(config.loss))

  def evaluators(self, config, model, mesh, params_sharding, workdir):
    del workdir  # classification writes no files
    return evaluators.build(config, model, mesh, params_sharding)


tasks.register(Classification())
