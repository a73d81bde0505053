import os
import subprocess
import sys

import pytest
from absl import flags
from ml_collections import config_flags


def _parse(*overrides):
  argv = ['prog', '--config=configs/quickstart.py', *overrides]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, 'config', flag_values=flag_values,
                                  lock_config=True, sys_argv=argv)
  flag_values(argv)
  return flag_values.config


def test_every_documented_key_is_present():
  config = _parse()
  for key in ('total_steps', 'batch_size', 'seed', 'log_every', 'eval_every',
              'checkpoint_every', 'init_from'):
    assert key in config, key
  assert set(config.mesh) == {'data', 'fsdp', 'model', 'dcn_data'}


def test_overrides_are_applied_with_types():
  config = _parse('--config.total_steps=7', '--config.mesh.data=2',
                  '--config.schedule.base_lr=0.5', '--config.init_from=/tmp/x.npz')
  assert (config.total_steps, config.mesh.data) == (7, 2)
  assert config.schedule.base_lr == 0.5 and config.init_from == '/tmp/x.npz'


def test_bad_key_is_an_error_naming_it():
  with pytest.raises(Exception, match='totl_steps'):
    _parse('--config.totl_steps=3')


def _main(*overrides, program='vit_jax.main', config='configs/quickstart.py',
          other='--workdir=/nonexistent/unused'):
  """`python -m vit_jax.main --config=configs/quickstart.py ... OVERRIDES`; fails in parsing."""
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  return subprocess.run(
      [sys.executable, '-m', program, f'--config={config}', other, *overrides],
      cwd=repo, capture_output=True, text=True, timeout=120,
      env=os.environ | {'VIT_JAX_HOST_TUNING': '0'})


@pytest.mark.parametrize('program, other', [('vit_jax.main', '--workdir=/nonexistent/unused'),
                                            ('vit_jax.aot', '--topology=v4-8')])
def test_an_argument_the_config_refuses_is_one_line(program, other):
  done = _main(program=program, config='configs/finetune.py:cifar11', other=other)
  assert done.returncode == 1
  assert done.stderr.splitlines() == [
      "error: configs/finetune.py: unknown dataset 'cifar11'; choose one of ('cifar10', "
      "'cifar100', 'imagenet2012', 'oxford_iiit_pet', 'oxford_flowers102')"]
  if program != 'vit_jax.main':
    return  # the same parser: once is enough
  done = _main(config='configs/quickstart.py:big')
  assert done.stderr.splitlines() == ['error: --config=configs/quickstart.py:big: get_config() '
                                      'takes 0 positional arguments but 1 was given']


def test_misspelt_key_on_the_command_line_is_two_lines_naming_it_and_the_fix():
  done = _main('--config.totl_steps=3')
  assert done.returncode == 2
  assert done.stderr.strip().splitlines() == [
      "--config.totl_steps: the config has no key 'totl_steps'.",
      'Did you mean "total_steps" instead of "totl_steps"?']
  done = _main('--config.model.depth=3')  # no close match: the keys it could be
  assert done.stderr.strip().splitlines()[1].startswith(
      'Keys under config.model: attention_dropout_rate, classifier,')


def test_bad_value_on_the_command_line_is_absl_s_two_lines():
  done = _main('--config.total_steps=abc')
  assert done.returncode == 1 and 'Traceback' not in done.stderr
  assert done.stderr.strip().splitlines() == [
      "FATAL Flags parsing error: flag --config.total_steps=abc: invalid literal for int() with "
      "base 10: 'abc'", 'Pass --helpshort or --helpfull to see help on flags.']


def test_model_name_and_mesh_mistakes_are_said_before_tensorflow_loads():
  """They used to wait for TensorFlow and the trainer's imports (12-21 s on 2 loaded cores)."""
  child = ('import sys\n'
           'from absl import flags\n'
           'from vit_jax import main\n'
           'argv = flags.FLAGS(sys.argv)\n'
           'for mistake in ("model", "mesh"):\n'
           '  if mistake == "mesh":\n'
           '    flags.FLAGS.config.model.name, flags.FLAGS.config.mesh.data = "testing", 16\n'
           '  try:\n'
           '    main.main(argv)\n'
           '  except SystemExit as e:\n'
           '    print(e.code.split(";")[0])\n'
           'print("tensorflow" in sys.modules)\n')
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  done = subprocess.run([sys.executable, '-c', child, '--config=configs/quickstart.py',
                         '--workdir=/x', '--config.model.name=ViT-X_16'], cwd=repo,
                        capture_output=True, text=True, timeout=120)
  assert done.stdout.splitlines() == [
      "error: unknown model name 'ViT-X_16'",
      "error: mesh {'data': 16, 'fsdp': 1, 'model': 1} needs 16 devices, but 8 are available",
      'False'], done.stderr
