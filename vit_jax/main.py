"""Entry point: python -m vit_jax.main --config=configs/quickstart.py --workdir=DIR."""
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from vit_jax.cli import errors, process_exit, startup

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


def _innermost_message(error: BaseException) -> str:
  """ml_collections wraps a KeyError('...Did you mean...') in AttributeErrors: its text."""
  while error.args and isinstance(error.args[0], BaseException):
    error = error.args[0]
  return str(error.args[0]) if error.args else str(error)


def _known_keys(culprit: str, argv: list[str]) -> str:
  """'Keys under config.model: ...' for the dict `--config.model.scan_layer=...` looked in."""
  path = culprit.split('=')[0].split('.')[1:-1]
  try:
    # The config as its file builds it, before the overrides: the flag failed before holding it.
    spec = next(a.split('=', 1)[1] for a in argv if a.startswith('--config='))
    node = flags.FLAGS['config'].parser.parse(spec)
    for part in path:
      node = node[part]
    return f'Keys under {".".join(["config"] + path)}: {", ".join(sorted(node))}.'
  except Exception:  # pylint: disable=broad-except  (a hint only; the error is said already)
    return 'See the keys in the config file.'


def _config_file_error(argv: list[str]) -> str | None:
  """'--config=PATH: no such file ...' when the config file a user named does not exist."""
  spec = next((a.split('=', 1)[1] for a in argv if a.startswith('--config=')), None)
  if spec is None or os.path.isfile(spec.split(':', 1)[0]):
    return None
  shipped = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs')
  names = sorted(n for n in os.listdir(shipped) if n.endswith('.py') and not n.startswith('_')) \
      if os.path.isdir(shipped) else []
  hint = f'; the shipped configs are configs/{{{",".join(names)}}}' if names else ''
  return f'--config={spec}: no such file {spec.split(":", 1)[0]!r}{hint}'


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a misspelt config key or a missing config file said in one or
  two lines, not a traceback."""
  if message := _config_file_error(argv):
    sys.exit(f'error: {message}')
  try:
    return app.parse_flags_with_usage(argv)  # absl's own: bad values are said in two lines
  except (AttributeError, KeyError) as e:  # raised by config_flags for a key the config lacks
    message = _innermost_message(e)
    key = message.splitlines()[0].strip('\'"')
    culprit = next((a for a in argv if a.startswith('--config.') and key in a.split('=')[0]),
                   '--config...')
    hint = ''.join(message.splitlines()[1:2]) or _known_keys(culprit, argv)
    print(f'{culprit.split("=")[0]}: the config has no key {key!r}.\n{hint}', file=sys.stderr)
    sys.exit(2)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  startup.quiet_logging()
  startup.import_tensorflow()
  import jax  # pylint: disable=g-import-not-at-top
  # jax.distributed must start before any JAX computation.
  if _DISTRIBUTED.value or _COORDINATOR.value or _NUM_PROCESSES.value:
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
  from vit_jax.train import preemption, trainer  # pylint: disable=g-import-not-at-top
  try:
    with errors.reported_as_one_line():  # the message is the whole story: no traceback
      trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except KeyboardInterrupt:  # from the training loop on, Ctrl-C saves and stops instead
    print('\nCtrl-C during start-up: stopped before the first step', file=sys.stderr,
          flush=True)
    os._exit(preemption.INTERRUPTED_EXIT_STATUS)  # pylint: disable=protected-access


if __name__ == '__main__':
  startup.begin()
  # Required only when run as a program: tests parse these modules' flags side by side.
  flags.mark_flags_as_required(['config', 'workdir'])
  try:
    app.run(main, flags_parser=parse_flags)
  except SystemExit as end:  # the run's work is stored: leave without the interpreter's teardown
    process_exit.exit_now(end.code)
