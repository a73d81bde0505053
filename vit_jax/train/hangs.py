"""Hangs named: when no training step finishes for a while, every thread's Python stack.

A thread of its own checks the time since the last step. Past `dump_after_s` it writes every
thread's stack once to stderr (the run's log) and to WORKDIR/hangs/ (host and step in the name),
and again each further `dump_after_s` the hang lasts; past `exit_after_s` it ends the process
with EXIT_STATUS, for a supervisor to start it again (the run resumes from its last
checkpoint). The watch is off while nothing is expected to finish a step (before the first
step is compiled, during evaluations and checkpoint saves): it is armed by `step_done` and
disarmed by `pause`.
"""
import os
import socket
import sys
import threading
import time
import traceback

from absl import logging

from vit_jax.storage import paths

# EX_TEMPFAIL of sysexits.h: a temporary failure, worth starting again.
EXIT_STATUS = 75
# With hang_dump_s = -1: max(this many median step times, AUTO_MIN_S).
AUTO_MEDIANS = 10
AUTO_MIN_S = 600.


def dump_threshold(hang_dump_s: float, median_step_s: float | None) -> float | None:
  """Seconds without a step before a dump (None: off): hang_dump_s, or with -1 (the default)
  max(AUTO_MEDIANS median step times, AUTO_MIN_S)."""
  if hang_dump_s == 0:
    return None
  if hang_dump_s > 0:
    return hang_dump_s
  return max(AUTO_MEDIANS * (median_step_s or 0.), AUTO_MIN_S)


def stacks() -> str:
  """Every other thread's Python stack, most recent call last, with the thread's name; the
  main thread (the training loop) first."""
  names = {t.ident: t.name for t in threading.enumerate()}
  frames = sys._current_frames()  # pylint: disable=protected-access
  main = threading.main_thread().ident
  parts = []
  for ident in sorted(frames, key=lambda ident: ident != main):
    if ident != threading.get_ident():
      name = names.get(ident, 'a thread started outside Python (tf.data, tensorstore, ...)')
      parts.append(f'Thread {name} ({ident}):\n{"".join(traceback.format_stack(frames[ident]))}')
  return '\n'.join(parts)


class HangWatch:
  """See the module's docstring. `check()` does the work; a daemon thread calls it up to once a
  second (tests call it with their own clock and `thread=False`).

  on_hang(exiting): called before each dump is written (the goodput record); `end(status)`
  ends the process."""

  def __init__(self, workdir: str, dump_after_s: float, exit_after_s: float,
               process_index: int = 0, on_hang=None, clock=time.monotonic,
               end=os._exit, thread: bool = True):  # pylint: disable=protected-access
    self._folder = paths.resolve(workdir) / 'hangs'
    self.dump_after_s, self.exit_after_s = dump_after_s, exit_after_s
    self._host = f'process{process_index}-{socket.gethostname()}'
    self._on_hang, self._clock, self._end = on_hang or (lambda exiting: None), clock, end
    self._lock = threading.Lock()
    self._armed_at = None  # when the last step finished (None: not watching)
    self._step, self._dumps = 0, 0
    self.written = []  # the dump files written
    self._stop = threading.Event()
    self._thread = None
    if thread and (dump_after_s or exit_after_s):
      self._thread = threading.Thread(target=self._run, daemon=True, name='hang watch')
      self._thread.start()

  def step_done(self, step: int, dump_after_s: float | None = None) -> None:
    """A step finished: the clock starts again (and the threshold, when given, changes)."""
    with self._lock:
      self._armed_at, self._step, self._dumps = self._clock(), step, 0
      if dump_after_s is not None:
        self.dump_after_s = dump_after_s

  def pause(self) -> None:
    """Nothing to watch until the next `step_done` (evaluation, a checkpoint save)."""
    with self._lock:
      self._armed_at = None

  def check(self) -> None:
    with self._lock:
      if self._armed_at is None:
        return
      waited = self._clock() - self._armed_at
      dumps_due = int(waited // self.dump_after_s) if self.dump_after_s else 0
      exiting = bool(self.exit_after_s) and waited >= self.exit_after_s
      if dumps_due <= self._dumps and not exiting:
        return
      self._dumps = max(dumps_due, self._dumps + 1)
      step, dump = self._step, self._dumps
    self._on_hang(exiting)
    self._dump(step, dump, waited, exiting)
    if exiting:
      self._end(EXIT_STATUS)

  def _dump(self, step: int, dump: int, waited: float, exiting: bool) -> None:
    then = (f'exiting with status {EXIT_STATUS} (hang_exit_s={self.exit_after_s:g}) for a '
            'supervisor to start the run again' if exiting else
            f'dump {dump}; another every {self.dump_after_s:g} s while it lasts')
    text = (f'hang: no training step finished for {waited:.0f} s on {self._host} after step '
            f'{step}; {then}. Every thread\'s stack:\n\n{stacks()}')
    name = f'step{step}-{self._host}-{dump}.txt'
    sys.stderr.write(f'{text}\n')
    sys.stderr.flush()
    try:
      self._folder.mkdir(parents=True, exist_ok=True)
      (self._folder / name).write_text(text)
      self.written.append(self._folder / name)
    except OSError as e:  # the workdir out of reach: the log has it
      logging.error('could not write %s: %s', self._folder / name, e)

  def _run(self) -> None:
    while not self._stop.wait(self._poll_s()):
      try:
        self.check()
      except Exception:  # pylint: disable=broad-except  (the watch must outlive a bad write)
        logging.exception('hang watch')

  def _poll_s(self) -> float:
    limits = [s for s in (self.dump_after_s, self.exit_after_s) if s]
    return min([1.] + [s / 10 for s in limits])

  def close(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
