"""Every config in configs/ loads, with each of its arguments, and builds a (tiny) run."""
import glob
import importlib
import os
import re

import jax.numpy as jnp
import pytest
import tensorflow as tf
from absl import flags
from ml_collections import config_flags

from vit_jax.data import ops
from vit_jax.models import mae, registry, vit
from vit_jax.train import defaults, tasks, trainer

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
  assert set(config.mesh) == {'data', 'fsdp', 'model', 'dcn_data'}
  assert config.schedule.get('warmup_steps', 0) < config.total_steps
  assert 0 < config.schedule.base_lr < 1
  _check_preprocessing_at_real_size(config)
  # The real model's patch grid fits the real image size; the built run uses the 'testing'
  # model at 16px.
  assert config.image_size % registry.model_config(config.model.name)['patch_size'] == 0
  with config.unlocked():
    config.model.name = 'testing'
    config.image_size = 16
    config.mesh = dict(data=-1, fsdp=1, model=1)
  training = trainer.build(config)
  params = training.abstract_state.params
  task = tasks.get(config)
  task.batch_loss(config, training.model)
  if task.has_labels:
    assert params['head']['kernel'].shape[-1] == config.num_classes
  else:  # self-supervised: encoder names as the classifier's, no class head
    assert 'head' not in params and 'Transformer' in params
  assert float(training.schedule(config.total_steps // 2)) > 0


def _check_preprocessing_at_real_size(config):
  """Every preprocessing string of `config` parses, runs on a JPEG of another size, and gives
  the image_size images (and num_classes labels) the model and the loss are built for."""
  jpeg = tf.io.encode_jpeg(tf.cast(tf.random.stateless_uniform(
      (300, 420, 3), (0, 1), maxval=256, dtype=tf.int32), tf.uint8))
  strings = {'pp_train': config.pp_train, 'pp_eval': config.pp_eval}
  if config.get('fewshot') and config.fewshot.get('dataset'):
    strings['fewshot.pp'] = config.fewshot.pp
  for key, spec in strings.items():
    example_fn, batch_fn = ops.parse_preprocess(spec)
    example = example_fn({'image': jpeg, 'label': tf.constant(1, tf.int64),
                          ops.SEED_KEY: tf.constant([0, 7], tf.int64)})
    image_size = config.image_size  # few-shot features come from the same model
    assert example['image'].shape == (image_size, image_size, 3), (key, spec)
    assert -1. <= float(tf.reduce_min(example['image'])) < float(
        tf.reduce_max(example['image'])) <= 1., (key, spec)
    if tasks.get(config).has_labels and key != 'fewshot.pp':
      assert example['labels'].shape == (config.num_classes,), (key, spec)
    if batch_fn is not None:
      batch = {k: tf.stack([v, v]) for k, v in example.items() if k != ops.SEED_KEY}
      batch = batch_fn(dict(batch, **{ops.SEED_KEY: tf.constant([0, -1], tf.int64)}))
      assert batch['image'].shape == (2, image_size, image_size, 3), (key, spec)


def test_unknown_preset_names_it():
  finetune = importlib.import_module('configs.finetune')
  with pytest.raises(ValueError, match='cifar11'):
    finetune.get_config('cifar11')


# Every option README documents, as a user types it, with the value it must set.
DOCUMENTED_OPTIONS = {
    'total_steps': ('7', 7), 'batch_size': ('32', 32), 'seed': ('3', 3), 'log_every': ('5', 5),
    'eval_every': ('0', 0), 'checkpoint_every': ('0', 0), 'init_from': ('/w/run', '/w/run'),
    'mesh.data': ('2', 2), 'mesh.fsdp': ('2', 2), 'mesh.model': ('-1', -1),
    'mesh.dcn_data': ('-1', -1),
    'accum_steps': ('2', 2), 'task': ('mae', 'mae'), 'image_size': ('32', 32),
    'data.name': ('cifar10', 'cifar10'), 'data.data_dir': ('/d', '/d'),
    'data.train_split': ('train[:10]', 'train[:10]'), 'data.eval_split': ('test', 'test'),
    'data.path': ('/records', '/records'), 'data.num_classes': ('12', 12),
    'data.prefetch': ('4', 4), 'pp_train': ('decode', 'decode'),
    'pp_eval': ('decode', 'decode'), 'schedule.base_lr': ('3e-3', 3e-3),
    'schedule.warmup_steps': ('20', 20), 'fewshot.dataset': ('cifar100', 'cifar100'),
    'fewshot.seeds': ('1', 1), 'model.name': ('ViT-S_4', 'ViT-S_4'),
    'model.classifier': ('gap', 'gap'), 'model.posemb': ('sincos2d', 'sincos2d'),
    'model.representation_size': ('8', 8), 'model.dropout_rate': ('0.1', 0.1),
    'model.attention_dropout_rate': ('0.1', 0.1), 'model.stochastic_depth': ('0.1', 0.1),
    'model.dtype': ('bfloat16', 'bfloat16'), 'model.param_dtype': ('float32', 'float32'),
    'model.scan_layers': ('True', True), 'model.remat_policy': ('full', 'full'),
    'model.mask_ratio': ('0.5', 0.5), 'model.decoder_width': ('64', 64),
    'model.decoder_layers': ('1', 1), 'model.decoder_mlp_dim': ('128', 128),
    'model.decoder_heads': ('2', 2), 'norm_pix_loss': ('True', True),
    'model.corrupt_ratio': ('0.4', 0.4), 'profile_steps': ('21:22', '21:22'),
    'profile_every_process': ('True', True), 'hang_exit_s': ('1800', 1800),
}


def parse_as_main(spec, *overrides):
  """`--config=SPEC --config.KEY=VALUE ...` through ml_collections' config_flags, as main does."""
  argv = ['main', f'--config={spec}', *overrides]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, '', flag_values=flag_values, lock_config=True,
                                  sys_argv=argv)
  flag_values(argv)
  return flag_values.config


@pytest.mark.parametrize('module,arg', list(_configs()))
def test_every_documented_option_is_settable_from_the_command_line(module, arg):
  spec = module.__file__ + (f':{arg}' if arg else '')
  config = parse_as_main(spec,
                         *(f'--config.{k}={v}' for k, (v, _) in DOCUMENTED_OPTIONS.items()))
  for key, (_, expected) in DOCUMENTED_OPTIONS.items():
    value = config
    for part in key.split('.'):
      value = value[part]
    assert value == expected, (key, value)


def test_the_option_list_covers_readme_and_every_model_field():
  fields = set()
  for cls in (vit.VisionTransformer, mae.MaskedAutoencoder, mae.MaskedPatchPredictor):
    fields |= set(cls.__dataclass_fields__) - {'parent', 'name', 'num_classes', 'resnet_layers'}
  # A new model field must be declared in defaults.MODEL_OPTIONS to reach the configs.
  assert fields == set(defaults.MODEL_OPTIONS)
  with open(os.path.join(CONFIG_DIR, '..', 'README.md')) as f:
    readme = f.read()
  in_readme = set(re.findall(r'--config\.([\w.]+)=', readme)) - {'model.KEY'}
  # README's model options paragraph ("Options (also `--config.model.KEY=VALUE`): ...").
  paragraph = readme[readme.index('Options (also `--config.model.KEY=VALUE`)'):]
  paragraph = paragraph[:paragraph.index('\n\n')]
  in_readme |= {f'model.{name}' for name in re.findall(r'`(\w+)', paragraph) if name in fields}
  assert {'model.scan_layers', 'model.remat_policy', 'init_from'} <= in_readme
  assert in_readme <= set(DOCUMENTED_OPTIONS)


def test_model_options_from_the_command_line_reach_the_model():
  config = parse_as_main(os.path.join(CONFIG_DIR, 'quickstart.py'),
                         '--config.model.name=testing',
                         '--config.model.scan_layers=True', '--config.model.remat_policy=full',
                         '--config.model.dtype=bfloat16', '--config.model.posemb=sincos2d',
                         '--config.model.dropout_rate=0.1', '--config.accum_steps=2')
  training = trainer.build(config)
  model = training.model
  assert (model.scan_layers, model.remat_policy, model.posemb, model.dropout_rate,
          model.num_layers) == (True, 'full', 'sincos2d', 0.1, 4)
  assert model.dtype == jnp.bfloat16
  transformer = training.abstract_state.params['Transformer']
  assert transformer['encoderblock']['MlpBlock_3']['Dense_0']['kernel'].shape[0] == 4  # stacked
  assert 'posembed_input' not in transformer  # sincos2d has no parameters


@pytest.mark.parametrize('name', ['pretrain_i21k', 'pretrain_jft', 'finetune', 'mae_i1k'])
def test_recipes_name_the_slice_they_are_sized_for(name):
  """Accelerator recipes compute in bf16 and say which slice their figures were compiled for."""
  module = importlib.import_module(f'configs.{name}')
  assert re.search(r'\b(v4|v5p|v5litepod|v6e)-\d+\b', module.__doc__), module.__doc__
  for arg in getattr(module, 'ARGS', (None,)):
    config = module.get_config(arg) if arg else module.get_config()
    assert config.model.dtype == 'bfloat16' and config.model.scan_layers
