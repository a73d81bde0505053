"""MAE pretraining (He et al. 2021): pixels of the masked patches from the visible ones."""
import functools

from vit_jax.models import mae
from vit_jax.train import defaults, ssl_evaluators, ssl_steps
from vit_jax.train import tasks


def objective(model, params, images, *, mask_rng, train, dropout_rng=None,
              norm_pix_loss: bool = False) -> dict:
  """Per-example sums {'loss', 'count'}: MSE over the masked patches and how many there are."""
  pred, mask = model.apply({'params': params}, images, train=train, mask_rng=mask_rng,
                           rngs={'dropout': dropout_rng} if train else {})
  target = mae.patchify(images, model.patch_size)
  if norm_pix_loss:
    target = ssl_steps.normalise_patches(target)
  return ssl_steps.masked_mse(pred, target, mask)


class MaskedAutoencoding(tasks.Task):
  name = 'mae'

  def model(self, config):
    return mae.get_model('mae', config.model.name, **defaults.model_options(config.model))

  def objective(self, config):
    return functools.partial(objective, norm_pix_loss=config.get('norm_pix_loss', False))

  def batch_loss(self, config, model):
    return functools.partial(ssl_steps.objective_loss, model=model,
                             objective=self.objective(config))

  def evaluators(self, config, model, mesh, params_sharding, workdir):
    if not config.data.get('eval_split'):
      return []
    return [ssl_evaluators.MaeEvaluator(config, model, mesh, params_sharding,
                                        self.objective(config), workdir)]


tasks.register(MaskedAutoencoding())
