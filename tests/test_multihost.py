"""2 processes x 4 CPU devices (jax.distributed over loopback, gloo collectives) = 1 x 8."""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from tests import test_sharding

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one_and_checkpoint_together(tmp_path, tfds_data_dir):
  tfds.builder('sklearn_digits', data_dir=tfds_data_dir).download_and_prepare()  # once, here
  address = f'127.0.0.1:{_free_port()}'
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  workers = [subprocess.Popen(
      [sys.executable, os.path.join(REPO, 'tests', 'multihost_worker.py'), address, '2', str(i),
       str(tmp_path), tfds_data_dir], cwd=REPO, env=env, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outputs = []
  try:
    for worker in workers:
      outputs.append(worker.communicate(timeout=600)[0])
  finally:
    for worker in workers:  # never leave a process waiting for its peer
      if worker.poll() is None:
        worker.kill()
        worker.wait()
  assert [w.returncode for w in workers] == [0, 0], '\n\n'.join(outputs)
  results = [json.loads(out.strip().splitlines()[-1]) for out in outputs]
  reference_losses, _ = test_sharding._train(  # pylint: disable=protected-access
      test_sharding._config(), test_sharding.MIXED, test_sharding._batches())
  for result in results:
    assert result['process_count'] == 2 and result['restored_equal']
    np.testing.assert_allclose(result['losses'], reference_losses, rtol=1e-5)
    assert np.isfinite(result['trainer_loss']) and 0 <= result['trainer_val_accuracy'] <= 1
  # Both processes report the same (global) training loss and evaluation accuracy.
  assert results[0]['trainer_loss'] == results[1]['trainer_loss']
  assert results[0]['trainer_val_accuracy'] == results[1]['trainer_val_accuracy']
  with open(tmp_path / 'trainer' / 'metrics.jsonl') as f:  # written by process 0 only
    lines = [json.loads(line) for line in f]
  assert [m['step'] for m in lines if 'train_loss' in m] == [2]
  assert [m['step'] for m in lines if 'val_accuracy' in m] == [2]
  assert sorted(os.listdir(tmp_path / 'trainer' / 'checkpoints')) == ['2']
