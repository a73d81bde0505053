"""Step times: a warning for a step far slower than the running median (a spike: more than
SPIKE_FACTOR times it), and, on
several hosts, the slowest host named once per logging interval.

A step's time is the loop's, from one step's start to the next (its input wait included);
steps that evaluate, save a checkpoint or are traced are not timed, and a step that logs a line
(and so also fetches its metrics) is compared with the other logging steps only. In a synchronous
program every host's steps take as long as the slowest host's, so hosts are compared by what
each spends on its own: waiting for its input.
"""
import collections
import statistics
import sys

import numpy as np

SPIKE_FACTOR = 3.
# ... and at least this much longer than the median: on a shared CPU, steps of milliseconds
# vary threefold without anything to act on.
SPIKE_MIN_EXCESS_S = 0.5
WINDOW = 100  # steps the running median is taken over
MIN_HISTORY = 10  # steps timed before a spike can be told


def _warn(line: str) -> None:
  print(f'warning: {line}', file=sys.stderr, flush=True)


class StepTimes:
  """`add(step, seconds, input_s, logged)` for each timed step; `take_interval()` the figures
  since the last call, for the hosts' comparison."""

  def __init__(self, host: str, warn=_warn):
    self._host, self._warn = host, warn
    self._times = {False: collections.deque(maxlen=WINDOW),  # by whether the step logged
                   True: collections.deque(maxlen=WINDOW)}
    self._medians = {}
    self._interval = np.zeros(3)  # steps, seconds, input seconds

  def _median(self, logged: bool) -> float | None:
    if logged not in self._medians and self._times[logged]:
      self._medians[logged] = statistics.median(self._times[logged])
    return self._medians.get(logged)

  @property
  def median(self) -> float | None:
    """The running median of the steps that log no line (of those that do, if none)."""
    return self._median(False) or self._median(True)

  def add(self, step: int, seconds: float, input_s: float, logged: bool = False) -> None:
    median = self._median(logged)
    if (len(self._times[logged]) >= MIN_HISTORY and seconds > SPIKE_FACTOR * median
        and seconds - median >= SPIKE_MIN_EXCESS_S):
      self._warn(f'step {step} took {seconds:.3g} s, {seconds / median:.1f}x the running '
                 f'median {median:.3g} s ({self._host}; of it {input_s:.3g} s waiting for '
                 'input)')
    self._times[logged].append(seconds)
    self._medians.pop(logged, None)
    self._interval += (1, seconds, input_s)

  def take_interval(self) -> np.ndarray:
    """[steps, seconds, input seconds] timed since the last call."""
    interval, self._interval = self._interval, np.zeros(3)
    return interval


def slowest_host(figures: np.ndarray, hosts: list[str], step: int) -> str | None:
  """The line naming the host that waited longest for its input per step, from every host's
  `take_interval()` (rows in process order); None when no step was timed."""
  steps = figures[:, 0]
  if not np.all(steps > 0):
    return None
  step_s, input_s = figures[:, 1] / steps, figures[:, 2] / steps
  slowest = int(np.argmax(input_s))
  others = np.delete(input_s, slowest)
  return (f'slowest host up to step {step}: {hosts[slowest]} waited {input_s[slowest]:.3g} s '
          f'per step for input (the other hosts {np.median(others):.3g} s, median); steps '
          f'took {np.median(step_s):.3g} s (median over hosts)')
