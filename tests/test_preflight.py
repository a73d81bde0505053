"""Start-up checks: each mistake a user makes stops the run before step 1, naming the culprit."""
import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import quickstart
from tests import test_resume
from vit_jax import checkpoint
from vit_jax.cli import config_flag, errors
from vit_jax.data import make_records, sources
from vit_jax.train import preflight, trainer


def _fails(config, workdir, *expected):
  with pytest.raises(preflight.PreflightError) as e:
    trainer.train_and_evaluate(config, str(workdir))
  message = str(e.value)
  assert len(message.splitlines()) <= 2, message
  for text in expected:
    assert text in message, message
  return message


@pytest.mark.parametrize('key, value, devices', [('batch_size', 63, '8 batch-sharding devices'),
                                                 ('eval_batch_size', 127, '8 batch-sharding')])
def test_batch_sizes_the_devices_do_not_divide(quickstart_config, tmp_path, key, value, devices):
  quickstart_config[key] = value
  _fails(quickstart_config, tmp_path, f'{key}={value}', devices)


def test_unknown_eval_op_and_onehot_other_than_num_classes(quickstart_config, tmp_path):
  quickstart_config.pp_eval = 'decode|resize(16)|value_range(-1, 1)|one_hot(10)'
  _fails(quickstart_config, tmp_path, 'pp_eval', "unknown preprocessing op 'one_hot'")
  quickstart_config.pp_eval = 'decode|resize(16)|value_range(-1, 1)|onehot(12)'
  _fails(quickstart_config, tmp_path, 'pp_eval has onehot(12) but num_classes=10')


def test_image_size_not_a_multiple_of_the_patch(quickstart_config, tmp_path):
  quickstart_config.image_size = 18  # the testing model's patch is 4
  _fails(quickstart_config, tmp_path, 'image_size=18', 'patch size 4', 'image_size=16')


def test_tfds_data_stored_as_tfrecord_names_the_conversion(quickstart_config, tmp_path):
  tfds.builder('sklearn_digits', data_dir=str(tmp_path / 'tfds')).download_and_prepare()
  quickstart_config.data.data_dir = str(tmp_path / 'tfds')
  _fails(quickstart_config, tmp_path / 'run', "data.train_split='train'", 'stored as tfrecord',
         'tfds convert_format --dataset_dir=', '--out_file_format=array_record')


def test_missing_tfds_split(quickstart_config, tmp_path):
  quickstart_config.data.eval_split = 'val'
  _fails(quickstart_config, tmp_path, "data.eval_split='val'", 'sklearn_digits', "'test'")


def _records(folder, split, num_classes, num_examples=1):
  """A split's SPLIT.json (and its one shard file) as make_records leaves them."""
  os.makedirs(folder, exist_ok=True)
  open(os.path.join(folder, sources.record_file_name(split, 0, 1)), 'wb').close()
  with open(sources.record_info_path(str(folder), split), 'w') as f:
    json.dump({'num_examples': num_examples, 'shard_sizes': [num_examples],
               'num_classes': num_classes}, f)
  sources.write_record_offsets(str(folder), split, np.zeros(num_examples + 1, np.int64))


def test_records_missing_val_split_and_classes_other_than_the_config(quickstart_config,
                                                                      tmp_path):
  config = quickstart_config
  config.data = dict(path=str(tmp_path / 'records'), train_split='train', eval_split='val',
                     num_classes=10)
  _records(tmp_path / 'records', 'train', num_classes=13)
  _fails(config, tmp_path / 'run', 'train.json declares num_classes=13 but the config has '
         'data.num_classes=10', '--config.data.num_classes=13')
  # Fewer: a config left at another dataset's head (pretrain_jft's 18,291 classes on 3).
  _records(tmp_path / 'records', 'train', num_classes=3)
  _fails(config, tmp_path / 'run', 'train.json declares num_classes=3 but the config has '
         'data.num_classes=10', '--config.data.num_classes=3')
  _records(tmp_path / 'records', 'train', num_classes=10)
  _fails(config, tmp_path / 'run', "data.eval_split='val'", 'val.json is missing')
  _records(tmp_path / 'records', 'val', num_classes=9)  # an evaluation split may lack a class
  config.data.eval_split = 'test'  # the default, where make_records wrote 'val'
  _fails(config, tmp_path / 'run', f"data.eval_split='test': {tmp_path / 'records'} has no split "
         "'test', only train, val: set --config.data.eval_split=val (or write 'test':")
  config.data.eval_split = 'val'
  config.pp_train = config.pp_eval = 'decode|resize(16)|value_range(-1, 1)'
  _fails(config, tmp_path / 'run', "pp_train='decode|resize(16)|value_range(-1, 1)' gives no "
         "'labels'", 'onehot(10)')
  assert not (tmp_path / 'run').exists()


def test_preprocessing_that_does_not_give_what_the_model_takes(quickstart_config, tmp_path):
  quickstart_config.pp_train = 'decode|resize(16)|value_range(-1, 1)'  # the labels forgotten
  _fails(quickstart_config, tmp_path / 'run', "pp_train='decode|resize(16)|value_range(-1, 1)'",
         "gives no 'labels'", 'onehot(10)')
  quickstart_config.pp_eval = 'decode|resize(24)|value_range(-1, 1)|onehot(10)'
  quickstart_config.pp_train = quickstart_config.pp_eval.replace('24', '16')
  _fails(quickstart_config, tmp_path / 'run', 'pp_eval gives images of shape (24, 24, 3) but the '
         'model takes (16, 16, 3) (image_size=16)')
  assert not (tmp_path / 'run').exists()  # nothing written by a start that failed


def test_model_name_and_mesh_mistakes_are_user_errors(quickstart_config, tmp_path):
  quickstart_config.model.name = 'ViT-Q_4'
  with pytest.raises(errors.UserError, match="unknown model name 'ViT-Q_4'"):
    trainer.train_and_evaluate(quickstart_config, str(tmp_path / 'run'))
  quickstart_config.model.name = 'testing'
  quickstart_config.mesh.data = 16
  with pytest.raises(errors.UserError, match=r"needs 16 devices, but 8 are available.*"
                                             r"--config.mesh.data=-1"):
    trainer.train_and_evaluate(quickstart_config, str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()


def test_a_config_file_that_does_not_exist_is_named():
  message = config_flag._config_file_error(['prog', '--config=configs/quickstrat.py:arg'])  # pylint: disable=protected-access
  assert message.startswith("--config=configs/quickstrat.py:arg: no such file "
                            "'configs/quickstrat.py'; the shipped configs are configs/{")
  assert 'quickstart.py' in message
  assert config_flag._config_file_error(['prog', f'--config={quickstart.__file__}']) is None  # pylint: disable=protected-access


def test_unprepared_tfds_dataset_offline(quickstart_config, tmp_path, monkeypatch):
  monkeypatch.setattr(preflight, '_online', lambda timeout_s=3.: False)  # as on a machine without
  quickstart_config.data.name = 'cifar10'                                # internet, every time
  _fails(quickstart_config, tmp_path / 'run', 'tfds dataset cifar10 is not prepared',
         str(quickstart_config.data.data_dir), 'download_and_prepare')


def test_missing_init_from_and_unwritable_workdir(quickstart_config, tmp_path):
  quickstart_config.init_from = str(tmp_path / 'ViT-B_16.npz')
  _fails(quickstart_config, tmp_path / 'run', f'init_from={tmp_path / "ViT-B_16.npz"}')
  quickstart_config.init_from = ''
  (tmp_path / 'a_file').write_text('')
  _fails(quickstart_config, tmp_path / 'a_file' / 'run', '--workdir=', 'is not writable')


def test_workdir_of_another_model(quickstart_config, tmp_path):
  manager = checkpoint.make_manager(str(tmp_path), async_save=False)
  other = {'step': jnp.zeros((), jnp.int32),
           'params': {'cls': jnp.zeros((1, 1, 32)), 'embedding': {'kernel': jnp.zeros((8, 8, 3, 32))}}}
  checkpoint.save_state(manager, 5, other)
  manager.close()
  _fails(quickstart_config, tmp_path, f'--workdir={tmp_path} holds a checkpoint (step 5) of a '
         'different model', 'cls is (1, 1, 32) there but (1, 1, 16)')


def test_make_records_without_the_image_folder(tmp_path):
  (tmp_path / 'labels.csv').write_text('image,labels\na.png,1\n')
  with pytest.raises(errors.UserError, match=f'--image_dir={tmp_path / "photos"}: no such folder'):
    make_records.write_records(str(tmp_path / 'photos'), str(tmp_path / 'labels.csv'),
                               str(tmp_path / 'out'), 1)


def test_cli_prints_the_message_without_a_traceback(quickstart_config, tmp_path):
  quickstart_config.eval_batch_size = 127
  config = test_resume._write_config(quickstart_config, tmp_path / 'config.py')  # pylint: disable=protected-access
  result = subprocess.run([sys.executable, '-m', 'vit_jax.main', f'--config={config}',
                           f'--workdir={tmp_path / "run"}'], cwd=test_resume.REPO,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1].startswith('error: eval_batch_size=127')
  assert 'Traceback' not in result.stderr
