"""Test setup: 8 host CPU devices so that sharding is exercised on one machine.

XLA compilation dominates the suite's time on CPU, and many tests (and the subprocesses some of
them start) compile the very same programs: a persistent compilation cache, fresh for each test
session, compiles each of them once. It changes no result, only when the compiling happens.
"""
import atexit
import os
import shutil
import tempfile

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')  # not libtpu's or CUDA's, should the [tpu] extra be installed
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:  # set here, so subprocesses share it too
  _CACHE_DIR = tempfile.mkdtemp(prefix='vit_jax_test_xla_cache_')
  atexit.register(shutil.rmtree, _CACHE_DIR, ignore_errors=True)
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _CACHE_DIR
  os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
  os.environ['JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES'] = '-1'

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



@pytest.fixture(scope='session')
def gcs_proxy():
  """A GCS emulator on loopback for the whole session, behind tests/gcs_proxy.py: it counts
  requests and bytes uploaded, and adds latency or refuses requests when a test sets
  `latency_s` / `refuse_share` (put them back to 0 after).

  Only STORAGE_EMULATOR_HOST is set (to the proxy), as a user would; vit_jax.storage.paths points
  tensorstore at it (in this process and, through the environment, in subprocesses).
  """
  from tests import gcs_emulator, gcs_proxy as proxies  # pylint: disable=g-import-not-at-top
  from vit_jax.storage import paths  # pylint: disable=g-import-not-at-top
  server, url = gcs_emulator.start('test-bucket')
  proxy = proxies.Proxy(url).start()
  saved = dict(os.environ)
  os.environ[paths.EMULATOR_VARIABLE] = proxy.url
  paths.use_storage_emulator()
  try:
    yield proxy
  finally:
    os.environ.clear()
    os.environ.update(saved)
    proxy.stop()
    server.stop()


@pytest.fixture(scope='session')
def gcs_bucket(gcs_proxy):  # pylint: disable=redefined-outer-name,unused-argument
  """'gs://test-bucket' on the session's GCS emulator (see gcs_proxy)."""
  return 'gs://test-bucket'
