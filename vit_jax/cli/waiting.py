"""Long waits a user sits through (XLA compiling for a slice: seconds to many minutes): said
before they start with the time they should take, shown alive while they last, and ended
cleanly by Ctrl-C or SIGTERM.

XLA compiles inside one C++ call that Python cannot interrupt, and libtpu installs a crash
handler for SIGTERM that prints a stack trace (`*** SIGTERM received ... FailureSignalHandler`).
`run_alive` therefore compiles in a worker thread while the calling (main) thread waits, prints
the lines and owns SIGINT and SIGTERM: either ends the process at once with one line.
"""
import os
import signal
import sys
import threading
import time
from typing import Callable, TypeVar

T = TypeVar('T')

# Exit statuses a shell gives a program that SIGINT / SIGTERM ended (128 + the signal).
_EXIT_STATUS = {signal.SIGINT: 130, signal.SIGTERM: 143}
_SIGNAL_NAMES = {signal.SIGINT: 'Ctrl-C', signal.SIGTERM: 'SIGTERM'}


def duration(seconds: float) -> str:
  """'8m25s', '1h02m00s'."""
  seconds = int(seconds)
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f'{h}h{m:02d}m{s:02d}s' if h else f'{m}m{s:02d}s'


def _stop_now(doing: str, out):
  def handler(signum, frame):
    del frame
    out.write(f'\nstopped by {_SIGNAL_NAMES[signum]} while {doing}\n')
    out.flush()
    sys.stdout.flush()
    # os._exit: the worker thread is inside XLA and cannot be joined; it writes nothing.
    os._exit(_EXIT_STATUS[signum])  # pylint: disable=protected-access
  return handler


def run_alive(work: Callable[[], T], doing: str, expected_s: float | None = None,
              basis: str = '', *, every_s: float = 30., out=None, clock=time.monotonic) -> T:
  """work()'s result (or its exception), computed in a worker thread. Meanwhile, to `out`
  (stderr): a line saying what it is `doing` and, where known, the `expected_s` it should take
  and on what `basis` (e.g. 'an earlier compile of the same shape'), then a line every
  `every_s` seconds with the time so far. In the main thread, Ctrl-C and SIGTERM print
  'stopped by ... while `doing`' and exit at once (status 130 / 143)."""
  out = out or sys.stderr
  expected = f', about {duration(expected_s)} expected' if expected_s is not None else ''
  result, done = {}, threading.Event()

  def worker():
    try:
      result['value'] = work()
    except BaseException as e:  # pylint: disable=broad-except  (re-raised in the caller)
      result['error'] = e
    finally:
      done.set()

  previous = {}
  if threading.current_thread() is threading.main_thread():
    for signum in _EXIT_STATUS:
      previous[signum] = signal.signal(signum, _stop_now(doing, out))
  try:
    out.write(f'{doing}{expected}{f" ({basis})" if basis else ""}\n')
    out.flush()
    start = clock()
    threading.Thread(target=worker, name='run_alive', daemon=True).start()
    while not done.wait(every_s):
      out.write(f'  ... {duration(clock() - start)} so far{expected}\n')
      out.flush()
  finally:
    for signum, handler in previous.items():
      signal.signal(signum, handler)
  if 'error' in result:
    raise result['error']
  return result['value']
