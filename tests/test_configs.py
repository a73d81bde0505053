"""Every config in configs/ loads, with each of its arguments, and builds a (tiny) run."""
import glob
import importlib
import os
import re

import pytest

from vit_jax.train import ssl_steps, steps, trainer

CONFIG_DIR = os.path.join(os.path.dirname(__file__), '..', 'configs')
DOCUMENTED_KEYS = ('total_steps', 'batch_size', 'seed', 'log_every', 'eval_every',
                   'checkpoint_every', 'init_from')


def _configs():
  for path in sorted(glob.glob(os.path.join(CONFIG_DIR, '*.py'))):
    name = os.path.basename(path)[:-3]
    if name == '__init__':
      continue
    module = importlib.import_module(f'configs.{name}')
    for arg in getattr(module, 'ARGS', (None,)):
      yield pytest.param(module, arg, id=f'{name}:{arg}' if arg else name)


@pytest.mark.parametrize('module,arg', list(_configs()))
def test_config_loads_and_builds_with_a_tiny_model(module, arg):
  config = module.get_config(arg) if arg else module.get_config()
  for key in DOCUMENTED_KEYS:
    assert key in config, f'{module.__name__} lacks {key}'
  assert set(config.mesh) == {'data', 'fsdp', 'model'}
  assert config.schedule.get('warmup_steps', 0) < config.total_steps
  assert 0 < config.schedule.base_lr < 1
  # Real sizes are checked abstractly; the built run uses the 'testing' model at 16px.
  with config.unlocked():
    config.model.name = 'testing'
    config.image_size = 16
    config.mesh = dict(data=-1, fsdp=1, model=1)
  training = trainer.build(config)
  params = training.abstract_state.params
  if config.get('task', 'classification') == 'classification':
    steps.get_loss_fn(config.loss)
    assert params['head']['kernel'].shape[-1] == config.num_classes
  else:  # self-supervised: encoder names as the classifier's, no class head
    ssl_steps.get_objective(config)
    assert 'head' not in params and 'Transformer' in params
  assert float(training.schedule(config.total_steps // 2)) > 0


def test_unknown_preset_names_it():
  finetune = importlib.import_module('configs.finetune')
  with pytest.raises(ValueError, match='cifar11'):
    finetune.get_config('cifar11')


@pytest.mark.parametrize('name', ['pretrain_i21k', 'pretrain_jft', 'finetune', 'mae_i1k'])
def test_recipes_name_the_slice_they_are_sized_for(name):
  """Accelerator recipes compute in bf16 and say which slice their figures were compiled for."""
  module = importlib.import_module(f'configs.{name}')
  assert re.search(r'\b(v4|v5p|v5litepod|v6e)-\d+\b', module.__doc__), module.__doc__
  for arg in getattr(module, 'ARGS', (None,)):
    config = module.get_config(arg) if arg else module.get_config()
    assert config.model.dtype == 'bfloat16' and config.model.scan_layers
