"""Mistakes a user can make and fix, and how the command-line programs report them.

A `UserError`'s message names the flag, config key, file or value at fault and the fix. Every
program (`main`, `predict`, `inspect`, `export`, `aot`, `make_records`) prints it as one line,
`error: ...`, and exits with status 1: a traceback would only bury the line that matters.
"""
import contextlib
import sys


class UserError(ValueError):
  """Something the user gave (a flag, a config key, a file, data) that cannot work as given."""


@contextlib.contextmanager
def reported_as_one_line(prefix: str = ''):
  """Turns a UserError raised inside into `error: <prefix><message>` on stderr and exit 1."""
  try:
    yield
  except UserError as e:
    sys.exit(f'error: {prefix}{e}')
