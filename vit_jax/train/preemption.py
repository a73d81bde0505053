"""Preemption notice (SIGTERM, what Cloud TPU VMs and most schedulers send) -> save and stop.

Multi-process runs use JAX's preemption sync service (started by jax.distributed.initialize):
every process learns of a SIGTERM sent to any of them and they all agree on the same step to save
at. A single process has no such service, so a Python signal handler sets a flag instead.
"""
import signal
import threading

import jax
from jax.experimental import multihost_utils


class PreemptionWatch:
  """`reached(step)` turns True at the step where every process should save and exit.

  Call it at every step on every process (the multi-process protocol needs that), and `close()`
  at the end to give the previous SIGTERM handler back.
  """

  def __init__(self):
    self._multiprocess = jax.process_count() > 1
    self._signalled = False
    self._previous = None
    if not self._multiprocess and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None

  def _on_sigterm(self, signum, frame):
    del signum, frame
    self._signalled = True

  def reached(self, step: int) -> bool:
    if self._multiprocess:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._signalled
