"""The end of a program, bounded: exit handlers get a limit, the interpreter's teardown none.

Python's own exit garbage-collects every module (TensorFlow, JAX, XLA's objects) after the exit
handlers: seconds on a quiet machine, but a Ctrl-C'd quickstart at load 14 on 2 CPU cores spent
over 30 s there after its checkpoint was written. A program whose work is stored (checkpoints
committed, logs closed) leaves through `exit_now` instead. Imports nothing heavy: flag errors
leave through it too.
"""
import atexit
import os
import sys
import threading

# The exit handlers (JAX's distributed shutdown, ...) get this long.
EXIT_HANDLERS_S = 30.


def exit_now(code=0):
  """Runs the exit handlers (at most EXIT_HANDLERS_S) and ends the process with `code` as
  sys.exit takes it: None or an int status, or a message for stderr (status 1)."""
  if isinstance(code, str):
    print(code, file=sys.stderr)
    code = 1
  sys.stdout.flush()
  sys.stderr.flush()
  handlers = threading.Thread(target=atexit._run_exitfuncs, daemon=True,  # pylint: disable=protected-access
                              name='exit handlers')
  handlers.start()
  handlers.join(EXIT_HANDLERS_S)
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code or 0)  # pylint: disable=protected-access
