"""Entry point: python -m vit_jax.main --config=configs/quickstart.py --workdir=DIR."""
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from vit_jax.cli import config_flag, errors, startup

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


def _check_mesh_and_model_name(config) -> None:
  """The config's mesh against the devices and its model name, before TensorFlow and the
  trainer's libraries are imported (about 10 s on 2 cores): these mistakes are said in the
  seconds JAX and Flax take to import. The start-up checks (vit_jax.train.preflight) follow."""
  from vit_jax import models  # pylint: disable=g-import-not-at-top
  from vit_jax.scale import sharding  # pylint: disable=g-import-not-at-top
  sharding.make_mesh(config.mesh)
  models.model_config(config.model.name)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  startup.quiet_logging()
  import jax  # pylint: disable=g-import-not-at-top
  # jax.distributed must start before any JAX computation.
  if _DISTRIBUTED.value or _COORDINATOR.value or _NUM_PROCESSES.value:
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
  try:
    with errors.reported_as_one_line():  # the message is the whole story: no traceback
      _check_mesh_and_model_name(_CONFIG.value)
      startup.import_tensorflow()
      from vit_jax.train import goodput, trainer  # pylint: disable=g-import-not-at-top
      trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value,
                                 started=goodput.process_start_time())
  except KeyboardInterrupt:  # from the training loop on, Ctrl-C saves and stops instead
    from vit_jax.train import preemption  # pylint: disable=g-import-not-at-top
    print('\nCtrl-C during start-up: stopped before the first step', file=sys.stderr,
          flush=True)
    os._exit(preemption.INTERRUPTED_EXIT_STATUS)  # pylint: disable=protected-access


if __name__ == '__main__':
  startup.begin()
  # Required only when run as a program: tests parse these modules' flags side by side.
  flags.mark_flags_as_required(['config', 'workdir'])
  app.run(main, flags_parser=config_flag.parse_flags)
