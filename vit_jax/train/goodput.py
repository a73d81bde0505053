"""Goodput: where a job's wall time went, by cause, across every start of its command.

Process 0 of each run (one start of the training command) appends records to
WORKDIR/goodput.jsonl as it goes (`vit_jax.storage.log_file`: appends on local disk, segments
joined by compose on gs://), each with the run's cumulative seconds per cause since its process
started. So a run that is killed (SIGKILL, a lost VM) leaves its time up to its last record,
at most HEARTBEAT_S before the kill (plus log_file's upload interval on gs://), and the run that
resumes it counts it.

A run's time goes to one cause at a time: start-up (imports, data preparation, restoring: from
the process's start to its first step), compilation (its first step), input (the loop waiting
for a batch), training (the other step time: productive), evaluation, checkpoint (blocking
save time), profile (writing a trace out) and shutdown (from its last step to its end).
Lost is computed when the records are read: the steps a run computed past the checkpoint the
next run resumed from, which that run computes again, with everything else that run spent
after that checkpoint (its evaluations, saves and input waits); start-up and compilation stay
what they were, as every run pays them.
"""
import json
import os
import socket
import threading
import time

from vit_jax.storage import log_file, paths

RECORDS = 'goodput.jsonl'
PRODUCTIVE = 'train'
CAUSES = ('startup', 'compile', 'input', PRODUCTIVE, 'eval', 'checkpoint', 'profile',
          'shutdown')
LOST = 'lost'
# What a later run computes again when it resumes from an earlier checkpoint (see above).
REDONE = ('input', PRODUCTIVE, 'eval', 'checkpoint', 'profile', 'shutdown')
# The events of records written between steps (a hang's record is written during one).
BOUNDARIES = ('input', 'eval', 'checkpoint', 'shutdown', 'end')
# Seconds between records while nothing else writes one: what a SIGKILL leaves uncounted.
HEARTBEAT_S = 10.
# At a step that logs a line, a record too (so that a killed run's steps_redone counts every
# step it logged), at most once per this many seconds (log_every=1 on fast steps).
LOGGED_STEP_RECORD_S = 1.


def process_start_time() -> float:
  """When this process started, in seconds since the epoch: the kernel's start time of the
  process (Linux; which an exec, such as vit_jax.cli.host_tuning's, keeps), else now."""
  try:
    with open('/proc/self/stat') as f:
      fields = f.read().rsplit(')', 1)[1].split()
    started_after_boot = int(fields[19]) / os.sysconf('SC_CLK_TCK')  # field 22: starttime
    age = time.clock_gettime(time.CLOCK_BOOTTIME) - started_after_boot
    return time.time() - max(age, 0.)
  except (OSError, ValueError, IndexError, AttributeError):
    return time.time()


class Recorder:
  """The run's seconds per cause (`enter(cause)` switches), written to WORKDIR/goodput.jsonl
  at least every HEARTBEAT_S while it goes, at every `record()`, and at `close()`.

  started: when the process started (`process_start_time()`); all the time before the first
  `enter` is start-up. writer: whether this process writes (process 0); the others keep the
  figures only. Thread-safe: the hang watch records from its own thread."""

  def __init__(self, workdir: str, start_step: int, started: float, writer: bool = True,
               clock=time.monotonic):
    self._clock, self.workdir = clock, workdir
    now = clock()
    self.started = started
    self._origin = now - max(time.time() - started, 0.)  # the process's start on `clock`
    self.run = (f'{time.strftime("%Y%m%d-%H%M%S", time.gmtime(started))}-{socket.gethostname()}'
                f'-{os.getpid()}')
    self.totals = dict.fromkeys(CAUSES, 0.)
    self.cause, self._since = 'startup', self._origin
    self.start_step = self.step = start_step
    self._lock = threading.Lock()
    self._last_record = -float('inf')
    self._file = log_file.LogFile(paths.resolve(workdir) / RECORDS) if writer else None

  def _count(self, now: float) -> None:
    self.totals[self.cause] += now - self._since
    self._since = now

  def enter(self, cause: str, step: int | None = None, record: bool = False) -> None:
    """From now on time goes to `cause`; `step`: the last step done, when it changed. Writes a
    record when asked or when the last is HEARTBEAT_S old."""
    with self._lock:
      now = self._clock()
      self._count(now)
      self.cause = cause
      if step is not None:
        self.step = step
      # Records only at step boundaries (a step given): see _cut.
      if record or (step is not None and now - self._last_record >= HEARTBEAT_S):
        self._write(cause, now)

  def due(self, seconds: float) -> bool:
    """Whether the last record is at least `seconds` old."""
    return self._clock() - self._last_record >= seconds

  def record(self, event: str, stored: bool = False) -> dict:
    """Writes a record now (the current cause counted up to now) and returns it; `stored`:
    returns once it is in storage (before the process ends on its own)."""
    with self._lock:
      now = self._clock()
      self._count(now)
      record = self._write(event, now)
    if stored and self._file is not None:
      self._file.sync()
    return record

  def _write(self, event: str, now: float) -> dict:
    record = {'run': self.run, 'started': round(self.started, 3),
              't': round(self.started + now - self._origin, 3), 'event': event,
              'step': self.step, 'start_step': self.start_step,
              'totals': {k: round(v, 3) for k, v in self.totals.items()}}
    self._last_record = now
    if self._file is not None:
      self._file.write(json.dumps(record) + '\n')
      self._file.flush()
    return record

  def close(self, event: str = 'end', timeout: float | None = None) -> dict | None:
    """The last record (`event`), written and stored within `timeout` seconds (LogFile.close's
    default when None); None on processes that do not write."""
    record = self.record(event)
    if self._file is None:
      return None
    self._file.close(timeout)
    return record


def read_runs(workdir: str) -> list[list[dict]]:
  """The records of WORKDIR/goodput.jsonl grouped by run, runs in the order they started; a
  line a kill cut short is left out. FileNotFoundError when there is no such file."""
  path = paths.resolve(workdir) / RECORDS
  if not path.exists():
    raise FileNotFoundError(f'{path}: no such file (a training run writes it as it goes)')
  runs = {}
  for line in path.read_text().splitlines():
    try:
      record = json.loads(line)
      runs.setdefault(record['run'], []).append(record)
    except (ValueError, KeyError, TypeError):
      continue
  return sorted(runs.values(), key=lambda records: records[0]['started'])


def _cut(records: list[dict], resumed_at: int) -> dict:
  """The totals of the run's last record at step `resumed_at` or before ({} when none): what
  it had spent when it held the state the next run resumed from. Those records are written
  at step boundaries, before any work on the next step, so the last of them comes after that
  step's evaluation and checkpoint."""
  before = [r for r in records if r['step'] <= resumed_at and r['event'] in BOUNDARIES]
  return before[-1]['totals'] if before else {}


def account(runs: list[list[dict]]) -> dict:
  """{'wall_s', 'productive_s', 'badput_s': {cause: s}, 'restarts', 'steps_redone',
  'goodput', 'runs': [a summary per run]} from `read_runs`' records."""
  badput = dict.fromkeys([c for c in CAUSES if c != PRODUCTIVE] + [LOST], 0.)
  productive, redone, summaries = 0., 0, []
  for i, records in enumerate(runs):
    last = records[-1]
    totals = dict.fromkeys(CAUSES, 0.) | last['totals']
    lost, steps_lost = 0., 0
    if i + 1 < len(runs):
      resumed_at = runs[i + 1][0]['start_step']
      if last['step'] > resumed_at:
        cut = _cut(records, resumed_at)
        for cause in REDONE:
          part = totals[cause] - cut.get(cause, 0.)
          totals[cause] -= part
          lost += part
        steps_lost = last['step'] - resumed_at
    productive += totals[PRODUCTIVE]
    for cause, seconds in totals.items():
      if cause != PRODUCTIVE:
        badput[cause] += seconds
    badput[LOST] += lost
    redone += steps_lost
    summaries.append({'run': last['run'], 'started': last['started'], 'ended': last['t'],
                      'wall_s': last['t'] - last['started'], 'steps': (last['start_step'],
                                                                       last['step']),
                      'end': last['event'], 'lost_s': lost, 'steps_redone': steps_lost})
  wall = sum(s['wall_s'] for s in summaries)
  return {'wall_s': wall, 'productive_s': productive, 'badput_s': badput,
          'restarts': max(len(runs) - 1, 0), 'steps_redone': redone,
          'goodput': productive / wall if wall else 0., 'runs': summaries}


def duration(seconds: float) -> str:
  """1h02m03s, 4m05s or 6.2s."""
  if seconds < 60:
    return f'{seconds:.1f}s'
  seconds = int(round(seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f'{h}h{m:02d}m{s:02d}s' if h else f'{m}m{s:02d}s'


def summary_line(report: dict) -> str:
  """One line: goodput, wall, runs, and the badput causes that took time."""
  runs, restarts = report['restarts'] + 1, ''
  if report['restarts']:
    restarts = (f', {report["restarts"]} restart{"s" * (report["restarts"] != 1)}, '
                f'{report["steps_redone"]} steps redone')
  causes = [f'{cause} {duration(s)}' for cause, s in report['badput_s'].items() if s >= 0.05]
  line = (f'goodput {report["goodput"]:.1%} of {duration(report["wall_s"])} wall over {runs} '
          f'run{"s" * (runs != 1)}{restarts}: training {duration(report["productive_s"])}')
  return f'{line}; {", ".join(causes)}' if causes else line
