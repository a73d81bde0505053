"""What the training loop says at its phase boundaries, and who listens: goodput by cause
(goodput.py), the hang watch (hangs.py), step-time spikes and stragglers (step_times.py) and
the profiler (profile.py). The loop calls `next_step` at the top of each step and `phase` when
its time goes elsewhere (the step itself, an evaluation, a checkpoint, the end)."""
import socket
import time
from typing import NamedTuple

import jax
from jax.experimental import multihost_utils
import numpy as np

from vit_jax.cli import errors
from vit_jax.storage import paths
from vit_jax.train import goodput, hangs, profile, step_times

# The goodput line at a run's end reads every run's records back: at most this long.
READ_BACK_DEADLINE_S = 60.


class Options(NamedTuple):
  profile_steps: tuple[int, int] | None
  profile_every_process: bool
  hang_dump_s: float
  hang_exit_s: float


def options(config) -> Options:
  """The config's keys for this module, checked (a UserError names a bad one)."""
  for key in ('hang_dump_s', 'hang_exit_s'):
    if config[key] < 0 and not (key == 'hang_dump_s' and config[key] == -1):
      raise errors.UserError(f'{key}={config[key]:g}: give seconds, 0 for off'
                             + (', or -1 for the default' if key == 'hang_dump_s' else ''))
  steps = profile.parse_steps(config.profile_steps)
  if steps and steps[0] > config.total_steps:
    raise errors.UserError(f'profile_steps={config.profile_steps!r}: the run ends at step '
                           f'{config.total_steps} (total_steps)')
  return Options(steps, config.profile_every_process, config.hang_dump_s, config.hang_exit_s)


def _hostnames() -> list[str]:
  """'process I (HOST)' of every process, in process order (a collective)."""
  name = socket.gethostname().encode()[:64].ljust(64)
  if jax.process_count() == 1:
    return [f'process 0 ({name.decode().strip()})']
  names = multihost_utils.process_allgather(np.frombuffer(name, np.uint8))
  return [f'process {i} ({bytes(n).decode(errors="replace").strip()})'
          for i, n in enumerate(names)]


class Timeline:
  """One run's timeline, from `started` (its process's start); see the module's docstring.

  Every process makes one, at the same point (it may gather the hosts' names), and calls it at
  the same steps (stragglers are compared at logging steps, a collective)."""

  def __init__(self, opts: Options, workdir: str, start_step: int, log_every: int,
               started: float, clock=time.monotonic):
    self._clock, self._log_every = clock, log_every
    self._hosts = _hostnames()
    index = jax.process_index()
    self.goodput = goodput.Recorder(workdir, start_step, started, writer=index == 0, clock=clock)
    self.times = step_times.StepTimes(self._hosts[index])
    self._hang_dump_s = opts.hang_dump_s
    self.hangs = hangs.HangWatch(workdir, hangs.dump_threshold(opts.hang_dump_s, None),
                                 opts.hang_exit_s, index, on_hang=self._on_hang, clock=clock)
    self.profile = None
    if opts.profile_steps and (index == 0 or opts.profile_every_process):
      self.profile = profile.StepProfile(opts.profile_steps, workdir, start_step)
    self._compiled = False  # whether this process has run its first (compiling) step
    self._step_start = self._input_s = None  # of the step being timed (None: not timed)

  def _on_hang(self, exiting: bool) -> None:
    del exiting  # stored now either way: a hung run is often killed next
    self.goodput.record('hang', stored=True)

  def next_step(self, step: int, state) -> None:
    """`step` starts (its input first); the steps before it are dispatched, `state` their
    result."""
    done = step - 1
    logged = bool(self._log_every) and done % self._log_every == 0
    if self._step_start is not None and self._input_s is not None:
      self.times.add(done, self._clock() - self._step_start, self._input_s, logged)
    record = (self.goodput.cause not in ('input', goodput.PRODUCTIVE)  # after other work
              or logged and self.goodput.due(goodput.LOGGED_STEP_RECORD_S))
    if self.profile and self.profile.tracing and done >= self.profile.last:
      self.hangs.pause()
      self.goodput.enter('profile')
      record = self.profile.after(done, state) or record
    if logged and jax.process_count() > 1:
      figures = multihost_utils.process_allgather(self.times.take_interval())
      if jax.process_index() == 0 and (line := step_times.slowest_host(figures, self._hosts,
                                                                        done)):
        print(line, flush=True)
    if self._compiled:
      self.hangs.step_done(done, hangs.dump_threshold(self._hang_dump_s, self.times.median))
    self.goodput.enter('input', done, record=record)
    if self.profile:
      self.profile.before(step)
    traced = self.profile and self.profile.tracing  # not timed: the profiler slows it
    self._step_start, self._input_s = (None if traced else self._clock()), None

  def phase(self, cause: str, step: int | None = None) -> None:
    """From now on time goes to `cause`: 'train' (the step, after its input), 'eval' or
    'checkpoint' (after `step`), 'shutdown' (the loop is over)."""
    if cause == goodput.PRODUCTIVE:
      if self._step_start is not None:
        self._input_s = self._clock() - self._step_start
      if not self._compiled:
        cause, self._compiled, self._step_start = 'compile', True, None
    else:
      self.hangs.pause()
      self._step_start = None
    self.goodput.enter(cause, step, record=cause != goodput.PRODUCTIVE)

  def close(self, error: BaseException | None = None, timeout: float | None = None) -> None:
    """Ends the run's record (a trace in progress is written out) and prints the goodput of
    every run of the workdir so far (process 0); `error`: what ended the run, if anything."""
    self.hangs.close()
    if self.profile:
      self.profile.stop()
    if self.goodput.close('error' if error else 'end', timeout) is None:
      return
    try:
      runs = paths.within_deadline(lambda: goodput.read_runs(self.goodput.workdir),
                                   f'reading {goodput.RECORDS} back', READ_BACK_DEADLINE_S)
    except (OSError, errors.UserError) as e:  # storage out of reach: the records stay
      print(f'goodput: {e}', flush=True)
      return
    report = goodput.account(runs)
    print(f'{goodput.summary_line(report)} (python -m vit_jax.goodput {self.goodput.workdir} '
          'for the table)', flush=True)
