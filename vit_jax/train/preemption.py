"""Stop requests -> save and stop: SIGTERM (what Cloud TPU VMs and most schedulers send before
they take the machine) and Ctrl-C (SIGINT) both save at the next step and exit with status 0.
A second Ctrl-C exits at once, without saving; the newest complete checkpoint stays.

Multi-process runs use JAX's preemption sync service (started by jax.distributed.initialize):
every process learns of a SIGTERM sent to any of them and they all agree on the same step to
save at; a Ctrl-C is handed to that service as a SIGTERM to this process. A single process has
no such service, so the signal handlers set a flag instead.
"""
import os
import signal
import sys
import threading

import jax
from jax.experimental import multihost_utils

# The status a shell gives a program that SIGINT ended (128 + 2).
INTERRUPTED_EXIT_STATUS = 130


class PreemptionWatch:
  """`reached(step)` turns True at the step where every process should save and exit.

  Call it at every step on every process (the multi-process protocol needs that), and `close()`
  at the end to give the previous handlers back. `interrupted` says whether Ctrl-C asked.
  """

  def __init__(self):
    self._multiprocess = jax.process_count() > 1
    self._signalled = False
    self.interrupted = False
    self._previous = {}
    if threading.current_thread() is threading.main_thread():
      self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._on_interrupt)
      if not self._multiprocess:  # there JAX's service owns SIGTERM
        self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._on_sigterm)

  def close(self) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous = {}

  def _on_sigterm(self, signum, frame):
    del signum, frame
    print('\nSIGTERM: saving a checkpoint at the next step, then stopping', file=sys.stderr,
          flush=True)
    self._signalled = True

  def _on_interrupt(self, signum, frame):
    del signum, frame
    if self.interrupted:
      # os._exit: no thread (input readers, async checkpoint writers) can hold the process.
      # A checkpoint being written is left as Orbax's temporary directory, never restored.
      print('\nsecond Ctrl-C: exiting now, without saving', file=sys.stderr, flush=True)
      os._exit(INTERRUPTED_EXIT_STATUS)  # pylint: disable=protected-access
    self.interrupted = True
    print('\nCtrl-C: saving a checkpoint at the next step, then stopping (Ctrl-C again to exit '
          'at once, without saving)', file=sys.stderr, flush=True)
    if self._multiprocess:
      os.kill(os.getpid(), signal.SIGTERM)  # JAX's preemption service tells every process
    else:
      self._signalled = True

  def reached(self, step: int) -> bool:
    if self._multiprocess:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._signalled
