"""Training workdirs as a run leaves them, written without training: the run's config.json (the
quickstart's config with overrides, written as the trainer writes it) and an Orbax checkpoint of
the whole TrainState (params, Adam state, step), through the trainer's own checkpoint calls."""
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from vit_jax import checkpoint, models
from vit_jax.train import steps

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def quickstart_config(*overrides: str):
  """configs/quickstart.py's config with `overrides` ('model.name=testing', ...), parsed as
  `python -m vit_jax.main --config.KEY=VALUE` parses them."""
  from tests.test_configs import parse_as_main  # pylint: disable=g-import-not-at-top
  return parse_as_main(os.path.join(REPO, 'configs', 'quickstart.py'),
                       *(f'--config.{o}' for o in overrides))


def model_of(config, **options):
  """The model a run of `config` trains (its config.model options, `options` on top)."""
  kwargs = {k: v for k, v in config.model.to_dict().items() if k != 'name' and v is not None}
  return models.get_model(config.model.name, num_classes=config.num_classes,
                          **dict(kwargs, **options))


def random_params(model, image_size: int, seed: int = 0):
  """Random params of the model's shapes and param_dtype: normal values around init's (1 for
  LayerNorm scales, 0 elsewhere), none of them zero (a zero head would make every parity test
  pass). Shapes come from tracing init, so nothing is compiled."""
  shapes = nn.unbox(jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, image_size, image_size, 3)), train=False)['params']))
  rng = np.random.RandomState(seed)

  def draw(path, shape):
    centre = 1. if getattr(path[-1], 'key', '') == 'scale' else 0.
    return (centre + 0.2 * rng.standard_normal(shape.shape)).astype(shape.dtype)
  return jax.tree_util.tree_map_with_path(draw, shapes)


def write(workdir: str, config, params, step: int = 1) -> None:
  """config.json and checkpoints/<step>/ as the trainer writes them."""
  checkpoint.write_run_config(workdir, config)
  manager = checkpoint.make_manager(workdir, async_save=False)
  state = steps.TrainState(step=jnp.asarray(step, jnp.int32), params=params,
                           opt_state=optax.adam(1e-3).init(params))
  checkpoint.save_state(manager, step, state)
  manager.wait_until_finished()
  manager.close()
