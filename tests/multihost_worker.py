"""One process of the 2-process CPU test in test_multihost.py (not a test itself).

    python tests/multihost_worker.py COORDINATOR_ADDRESS NUM_PROCESSES PROCESS_ID WORKDIR DATA_DIR \
        PRETRAINED_NPZ

Trains on fixed batches over a mesh spanning every process's devices, saves and restores an
Orbax checkpoint from all processes together, runs the real trainer for a few steps on the
digits (already prepared in the tfds DATA_DIR), fine-tunes with FSDP spanning both processes
from PRETRAINED_NPZ and from that run's workdir, exports each result to WORKDIR/<name>.npz, and
prints one JSON line with the losses.
"""
import json
import os
import sys

os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=4'
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402


def main(coordinator, num_processes, process_id, workdir, data_dir, pretrained_npz):
  jax.distributed.initialize(coordinator, int(num_processes), int(process_id))
  from tests import test_sharding  # pylint: disable=g-import-not-at-top
  from vit_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from vit_jax.train import trainer  # pylint: disable=g-import-not-at-top
  losses, state = test_sharding._train(  # pylint: disable=protected-access
      test_sharding._config(), test_sharding.MIXED, test_sharding._batches())
  manager = checkpoint.make_manager(os.path.join(workdir, 'fixed'))
  checkpoint.save_state(manager, 4, state)
  manager.wait_until_finished()
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          state)
  restored = checkpoint.restore_state(checkpoint.make_manager(os.path.join(workdir, 'fixed')),
                                      abstract)
  restored_equal = all(
      np.array_equal(np.asarray(a.addressable_data(0)), np.asarray(b.addressable_data(0)))
      for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)))
  config = test_sharding._config()  # pylint: disable=protected-access
  config.data.data_dir = data_dir
  config.update(dict(total_steps=2, batch_size=16, log_every=1, eval_every=0, checkpoint_every=2))
  config.mesh = test_sharding.MIXED
  last = trainer.train_and_evaluate(config, os.path.join(workdir, 'trainer'))
  from tests import test_multihost  # pylint: disable=g-import-not-at-top
  spans = [test_multihost.fine_tune_and_export(test_multihost.fine_tune_config(config, source),
                                               os.path.join(workdir, name),
                                               os.path.join(workdir, f'{name}.npz'))
           for name, source in (('from_npz', pretrained_npz),
                                ('from_workdir', os.path.join(workdir, 'trainer')))]
  print(json.dumps({'losses': losses.tolist(), 'restored_equal': restored_equal,
                    'process_count': jax.process_count(),
                    'trainer_loss': last['train_loss'],
                    'trainer_val_accuracy': last['val_accuracy'],
                    'fine_tuned_params_span_processes': spans}), flush=True)


if __name__ == '__main__':
  main(*sys.argv[1:])
