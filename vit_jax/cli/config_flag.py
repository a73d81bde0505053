"""Parsing the command line of the programs that take a training config (`--config=FILE[:ARG]`
and `--config.KEY=VALUE`: main, aot): a missing config file, an argument the config refuses and
a misspelt key are said in one or two lines, before anything heavy is imported, instead of
absl's traceback."""
import os
import sys

from absl import app, flags


def _innermost_message(error: BaseException) -> str:
  """ml_collections wraps a KeyError('...Did you mean...') in AttributeErrors: its text."""
  while error.args and isinstance(error.args[0], BaseException):
    error = error.args[0]
  return str(error.args[0]) if error.args else str(error)


def _config_spec(argv: list[str]) -> str | None:
  return next((a.split('=', 1)[1] for a in argv if a.startswith('--config=')), None)


def _known_keys(culprit: str, argv: list[str]) -> str:
  """'Keys under config.model: ...' for the dict `--config.model.scan_layer=...` looked in."""
  path = culprit.split('=')[0].split('.')[1:-1]
  try:
    # The config as its file builds it, before the overrides: the flag failed before holding it.
    node = flags.FLAGS['config'].parser.parse(_config_spec(argv))
    for part in path:
      node = node[part]
    return f'Keys under {".".join(["config"] + path)}: {", ".join(sorted(node))}.'
  except Exception:  # pylint: disable=broad-except  (a hint only; the error is said already)
    return 'See the keys in the config file.'


def _config_file_error(argv: list[str]) -> str | None:
  """'--config=PATH: no such file ...' when the config file a user named does not exist."""
  spec = _config_spec(argv)
  if spec is None or os.path.isfile(spec.split(':', 1)[0]):
    return None
  shipped = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
      os.path.abspath(__file__)))), 'configs')
  names = sorted(n for n in os.listdir(shipped) if n.endswith('.py') and not n.startswith('_')) \
      if os.path.isdir(shipped) else []
  hint = f'; the shipped configs are configs/{{{",".join(names)}}}' if names else ''
  return f'--config={spec}: no such file {spec.split(":", 1)[0]!r}{hint}'


def _config_refusal(argv: list[str]) -> str | None:
  """What the config file's get_config said when it refused its argument (`finetune.py:cifar11`:
  a ValueError naming the choices; an argument a config does not take: a TypeError), as one
  line. ml_collections hands such errors to absl with their traceback in the text; other
  exceptions (a bug in a config file) keep their traceback."""
  spec = _config_spec(argv)
  if spec is None:
    return None
  try:
    flags.FLAGS['config'].parser.parse(spec)
  except (TypeError, ValueError) as e:
    message = str(e).strip().splitlines()[-1]  # the traceback's last line: 'ValueError: ...'
    message = message.split(': ', 1)[1] if message.startswith(type(e).__name__) else message
    path = spec.split(':', 1)[0]
    return message if message.startswith(path) else f'--config={spec}: {message}'
  return None


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing (an `app.run` flags_parser), with a missing config file, a config
  argument the file refuses and a misspelt config key said in one or two lines."""
  if message := _config_file_error(argv) or _config_refusal(argv):
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
