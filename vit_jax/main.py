"""Entry point: python -m vit_jax.main --config=configs/quickstart.py --workdir=DIR."""
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from vit_jax import host_tuning

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Training config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where metrics and checkpoints go.')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None,
                                   'HOST:PORT of process 0 for multi-host runs.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Processes in a multi-host run.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process in a multi-host run.')
_DISTRIBUTED = flags.DEFINE_bool('distributed', False,
                                 'Start jax.distributed with the cluster auto-detected (Cloud TPU '
                                 'slice, SLURM, Open MPI): multi-host without the flags above.')
def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # Orbax and TF log a lot at INFO; -v 0 shows it
  import jax  # pylint: disable=g-import-not-at-top
  # jax.distributed must start before any JAX computation.
  if _DISTRIBUTED.value or _COORDINATOR.value or _NUM_PROCESSES.value:
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
  from vit_jax.train import preflight, trainer  # pylint: disable=g-import-not-at-top
  try:
    trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except preflight.PreflightError as e:  # the message is the whole story: no traceback
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  host_tuning.apply()
  # Required only when run as a program: tests parse these modules' flags side by side.
  flags.mark_flags_as_required(['config', 'workdir'])
  app.run(main)
