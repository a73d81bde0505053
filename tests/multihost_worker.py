"""One process of the 2-process CPU test in test_multihost.py (not a test itself).

    python tests/multihost_worker.py COORDINATOR_ADDRESS NUM_PROCESSES PROCESS_ID WORKDIR DATA_DIR

Runs the real trainer on the digits (already prepared in the tfds DATA_DIR) over a mesh spanning
every process's devices, from scratch in WORKDIR/trainer and resuming the 1-process run the test
left at step 2 in WORKDIR/resumed; fine-tunes with FSDP spanning both processes from the first
run's workdir, exports the result to WORKDIR/from_workdir.npz, and prints one JSON line with what
the test compares.
"""
import json
import os
import sys

os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=4'
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402


def main(coordinator, num_processes, process_id, workdir, data_dir):
  jax.distributed.initialize(coordinator, int(num_processes), int(process_id))
  from tests import test_multihost  # pylint: disable=g-import-not-at-top
  from vit_jax.train import trainer  # pylint: disable=g-import-not-at-top
  config = test_multihost.trainer_config(data_dir)
  last = trainer.train_and_evaluate(config, os.path.join(workdir, 'trainer'))
  trainer.train_and_evaluate(config, os.path.join(workdir, 'resumed'))
  spans = test_multihost.fine_tune_and_export(
      test_multihost.fine_tune_config(config, os.path.join(workdir, 'trainer')),
      os.path.join(workdir, 'from_workdir'), os.path.join(workdir, 'from_workdir.npz'))
  print(json.dumps({'process_count': jax.process_count(),
                    'trainer_loss': last['train_loss'],
                    'trainer_val_accuracy': last['val_accuracy'],
                    'fine_tuned_params_span_processes': spans}), flush=True)


if __name__ == '__main__':
  main(*sys.argv[1:])
