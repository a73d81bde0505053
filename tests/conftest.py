"""Test setup: 8 host CPU devices so that sharding is exercised on one machine."""
import os

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import pytest  # noqa: E402


@pytest.fixture(scope='session')
def tfds_data_dir(tmp_path_factory):
  """A data_dir the digits builder prepares into once per test session."""
  return str(tmp_path_factory.mktemp('tfds'))


@pytest.fixture
def quickstart_config(tfds_data_dir):
  """The quickstart config shrunk to a few-second run with the 'testing' model."""
  from configs import quickstart  # pylint: disable=g-import-not-at-top
  config = quickstart.get_config()
  config.data.data_dir = tfds_data_dir
  config.model = dict(name='testing')
  config.total_steps = 6
  config.batch_size = 16
  config.eval_batch_size = 64
  config.log_every = 2
  config.eval_every = 3
  config.checkpoint_every = 3
  config.schedule.warmup_steps = 1
  return config
