"""One process of the 2-process CPU test in test_multihost.py (not a test itself).

    python tests/multihost_worker.py COORDINATOR_ADDRESS NUM_PROCESSES PROCESS_ID WORKDIR DATA_DIR

Runs the real trainer on the digits (not yet prepared in the tfds DATA_DIR: process 0 prepares
them, the other waits) over a mesh spanning every process's devices, from scratch in WORKDIR/trainer and resuming the 1-process run the test
left at step 2 in WORKDIR/resumed; fine-tunes with FSDP spanning both processes from the first
run's workdir, exports the result to WORKDIR/from_workdir.npz, and prints one JSON line with what
the test compares.

The mesh interleaves the two processes' devices as a TPU slice's torus order does (CPU devices
would otherwise sit in one block per process): `MESH_ORDER` replaces what
mesh_utils.create_device_mesh returns, and everything else (mesh, rows, input, placement)
takes its production path.
"""
import json
import os
import sys

os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=4'
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
from jax.experimental import mesh_utils  # noqa: E402
import numpy as np  # noqa: E402

# (process, its n-th device) at each position of the mesh in row-major order. With the test's
# (data=2, fsdp=2, model=2) mesh the batch's 4 blocks sit on positions (0, 1), (2, 3), (4, 5),
# (6, 7): process 0 holds blocks 0, 1 and 3 (not one run of rows), process 1 blocks 1, 2 and
# 3, and blocks 1 and 3 are on both (the model axis spans the processes there).
MESH_ORDER = [(0, 0), (0, 1), (1, 0), (0, 2), (1, 1), (1, 2), (0, 3), (1, 3)]


def interleaved_device_mesh(mesh_shape, devices=None, **unused_kwargs):
  devices = jax.devices() if devices is None else devices
  by_process = {p: [d for d in devices if d.process_index == p] for p in (0, 1)}
  return np.array([by_process[p][n] for p, n in MESH_ORDER]).reshape(mesh_shape)


def count_preparations() -> list:
  """Records each tfds preparation this process starts (and lets it run)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  started, prepare = [], tfds.core.DatasetBuilder.download_and_prepare

  def recorded(builder, *args, **kwargs):
    started.append(builder.name)
    return prepare(builder, *args, **kwargs)
  tfds.core.DatasetBuilder.download_and_prepare = recorded
  return started


def main(coordinator, num_processes, process_id, workdir, data_dir):
  jax.distributed.initialize(coordinator, int(num_processes), int(process_id))
  mesh_utils.create_device_mesh = interleaved_device_mesh
  prepared_here = count_preparations()
  from tests import test_multihost  # pylint: disable=g-import-not-at-top
  from vit_jax.scale import sharding  # pylint: disable=g-import-not-at-top
  from vit_jax.train import trainer  # pylint: disable=g-import-not-at-top
  config = test_multihost.trainer_config(data_dir)
  rows = sharding.process_batch_rows(sharding.make_mesh(config.mesh), config.batch_size)
  last = trainer.train_and_evaluate(config, os.path.join(workdir, 'trainer'))
  trainer.train_and_evaluate(config, os.path.join(workdir, 'resumed'))
  spans = test_multihost.fine_tune_and_export(
      test_multihost.fine_tune_config(config, os.path.join(workdir, 'trainer')),
      os.path.join(workdir, 'from_workdir'), os.path.join(workdir, 'from_workdir.npz'))
  print(json.dumps({'process_count': jax.process_count(),
                    'rows': rows.tolist(),
                    'prepared_here': prepared_here,
                    'trainer_loss': last['train_loss'],
                    'trainer_val_accuracy': last['val_accuracy'],
                    'fine_tuned_params_span_processes': spans}), flush=True)


if __name__ == '__main__':
  main(*sys.argv[1:])
