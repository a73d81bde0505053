"""Where a run's time goes: goodput by cause across restarts, profiles by flag, hangs named,
step-time spikes and stragglers."""
import collections
import dataclasses
import io
import json
import math
import os
import re
import socket
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from tests import gcs_proxy as proxies
from vit_jax import checkpoint
from vit_jax.cli import errors
from vit_jax.train import goodput, hangs, step_times, timeline, trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOST = socket.gethostname()


class FakeClock:

  def __init__(self):
    self.now = 1000.

  def __call__(self) -> float:
    return self.now

  def advance(self, seconds: float) -> None:
    self.now += seconds


def _timeline(workdir, start_step, started, clock) -> timeline.Timeline:
  options = timeline.Options(profile_steps=None, profile_every_process=False, hang_dump_s=0,
                             hang_exit_s=0)
  return timeline.Timeline(options, workdir, start_step, 0, started, clock=clock)


def _steps(run, clock, steps, input_s, train_s) -> None:
  """The loop's calls for `steps`, each waiting `input_s` for its batch and computing `train_s`."""
  for step in steps:
    run.next_step(step, None)
    clock.advance(input_s)
    run.phase('train')
    clock.advance(train_s)


def test_a_killed_run_and_its_resume_are_accounted_by_cause(tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(goodput, 'HEARTBEAT_S', 0.)  # a record at every step: the kill's point
  workdir, clock = str(tmp_path), FakeClock()
  # Run 1 started 12 s ago (imports, data...), compiles 5 s, checkpoints step 3 (2 s), computes
  # steps 4 and 5 (1.5 s each) and is killed waiting for step 6's batch.
  first = _timeline(workdir, 0, time.time() - 12, clock)
  _steps(first, clock, [1], input_s=1., train_s=5.)
  _steps(first, clock, [2, 3], input_s=0., train_s=1.)
  first.phase('checkpoint', 3)
  clock.advance(2.)
  _steps(first, clock, [4, 5], input_s=.5, train_s=1.)
  first.next_step(6, None)
  clock.advance(30.)  # the kill comes later: no record counts this
  # Run 2 resumes from step 3 after 7 s of start-up, to step 10, and saves it (2 s).
  second = _timeline(workdir, 3, time.time() - 7, clock)
  _steps(second, clock, [4], input_s=1., train_s=5.)
  _steps(second, clock, range(5, 11), input_s=0., train_s=1.)
  second.phase('checkpoint', 10)
  clock.advance(2.)
  second.phase('shutdown')
  clock.advance(.5)
  second.close()
  last_line = capsys.readouterr().out.splitlines()[-1]
  assert last_line.startswith('goodput ') and '2 runs, 1 restart, 2 steps redone' in last_line

  done = subprocess.run([sys.executable, '-m', 'vit_jax.goodput', workdir], cwd=REPO,
                        capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr
  report = json.loads(done.stdout.splitlines()[-1])
  assert report['restarts'] == 1 and report['steps_redone'] == 2
  badput = report['badput_s']
  # Steps 4 and 5 of run 1 and their input waits: redone by run 2.
  assert badput['lost'] == pytest.approx(3., abs=1e-3)
  assert report['productive_s'] == pytest.approx(2. + 6., abs=1e-3)  # steps 2-3, 5-10
  assert badput['compile'] == pytest.approx(10., abs=1e-3)
  assert badput['checkpoint'] == pytest.approx(4., abs=1e-3)
  assert badput['input'] == pytest.approx(2., abs=1e-3)  # the first batches; step 4's is lost
  assert badput['shutdown'] == pytest.approx(.5, abs=1e-3)
  # Start-up counts from each process's start (12 s and 7 s before its timeline).
  assert badput['startup'] == pytest.approx(19., abs=1.)
  assert report['wall_s'] == pytest.approx(report['productive_s'] + sum(badput.values()),
                                           abs=2e-3)
  assert report['wall_s'] == pytest.approx(19. + 13. + 14.5, abs=1.)
  table = done.stdout.splitlines()
  assert 'killed' in table[1] and '2 steps redone' in table[1] and 'ended' in table[2]


def test_a_process_counts_from_its_start():
  started = goodput.process_start_time()
  done = subprocess.run([sys.executable, '-c', 'import time; time.sleep(1.); from vit_jax.train '
                         'import goodput; print(time.time() - goodput.process_start_time())'],
                        cwd=REPO, capture_output=True, text=True, timeout=60)
  assert 1. <= float(done.stdout) < 60.  # its sleep before the import counts
  assert started <= time.time() - 1.  # this test process started well before


def test_a_hang_is_dumped_each_interval_with_the_blocked_frame_then_exits(tmp_path, capsys):
  clock, exits, records = FakeClock(), [], []
  released = threading.Event()

  def read_records_that_never_come():
    released.wait()
  reader = threading.Thread(target=read_records_that_never_come, name='reader')
  reader.start()
  try:
    watch = hangs.HangWatch(str(tmp_path), 5., 12., on_hang=records.append, clock=clock,
                            end=exits.append, thread=False)
    dumped = lambda: sorted(os.listdir(tmp_path / 'hangs')) if (tmp_path / 'hangs').exists() \
        else []
    clock.advance(100.)
    watch.check()  # not armed before a first step finished (compilation)
    watch.step_done(7)
    clock.advance(4.9)
    watch.check()
    assert dumped() == []
    clock.advance(.1)
    watch.check()
    assert dumped() == [f'step7-process0-{HOST}-1.txt']
    clock.advance(4.9)
    watch.check()
    clock.advance(.1)
    watch.check()
    assert dumped() == [f'step7-process0-{HOST}-1.txt', f'step7-process0-{HOST}-2.txt']
    watch.pause()  # an evaluation: nothing is expected of the steps meanwhile
    clock.advance(100.)
    watch.check()
    assert len(dumped()) == 2 and not exits
    watch.step_done(8)
    clock.advance(12.)
    watch.check()
    assert exits == [hangs.EXIT_STATUS] and records == [False, False, True]
  finally:
    released.set()
    reader.join()
  text = (tmp_path / 'hangs' / f'step7-process0-{HOST}-1.txt').read_text()
  assert text.startswith(f'hang: no training step finished for 5 s on process0-{HOST} after '
                         'step 7; dump 1')
  assert 'Thread reader' in text and 'in read_records_that_never_come\n    released.wait()' in text
  assert 'in stacks' not in text  # the watch's own thread is left out
  err = capsys.readouterr().err
  assert err.count('hang: no training step finished') == 3  # the log has them all
  assert f'exiting with status {hangs.EXIT_STATUS}' in err


def test_bad_values_are_named_before_any_work(quickstart_config):
  for key, value, message in (('profile_steps', '5:2', "profile_steps='5:2': give START:END"),
                              ('profile_steps', 'x', "profile_steps='x': give START:END"),
                              ('profile_steps', '7:9', "profile_steps='7:9': the run ends at "
                               'step 6 (total_steps)'),
                              ('hang_dump_s', -2., 'hang_dump_s=-2: give seconds, 0 for off, or '
                               '-1 for the default'),
                              ('hang_exit_s', -1., 'hang_exit_s=-1: give seconds, 0 for off')):
    config = quickstart_config.copy_and_resolve_references()
    config[key] = value
    with pytest.raises(errors.UserError, match=f'^{re.escape(message)}'):
      trainer.train_and_evaluate(config, '/nonexistent/never/written')
  assert timeline.options(quickstart_config).profile_steps is None
  quickstart_config.profile_steps = '6'
  assert timeline.options(quickstart_config).profile_steps == (6, 6)


def test_hang_thresholds_default_past_compilation_scale_steps():
  assert hangs.dump_threshold(0, 1.) is None
  assert hangs.dump_threshold(30, 1.) == 30
  assert hangs.dump_threshold(-1, None) == hangs.AUTO_MIN_S
  assert hangs.dump_threshold(-1, 120.) == 1200.


def test_a_step_three_times_the_running_median_is_named_with_its_host():
  warned = []
  times = step_times.StepTimes('process 3 (vm-3)', warn=warned.append)
  for step in range(1, 11):
    times.add(step, 1., 0.)
  times.add(11, 3., 0.)  # 3x: not more
  times.add(12, 3.5, 2.5)
  assert warned == ['step 12 took 3.5 s, 3.5x the running median 1 s (process 3 (vm-3); of it '
                    '2.5 s waiting for input)']
  fast = step_times.StepTimes('process 0', warn=warned.append)
  for step in range(1, 12):
    fast.add(step, .01, 0.)
    fast.add(step, .9, 0., logged=True)  # logging steps are compared among themselves
  fast.add(12, .2, 0.)  # 20x, but 0.19 s: noise on a shared CPU
  fast.add(12, 1.2, 0., logged=True)
  assert len(warned) == 1 and fast.median == .01
  assert list(times.take_interval()) == [12., 16.5, 2.5] and not times.take_interval().any()


def test_the_slowest_host_is_the_one_its_input_holds_back():
  hosts = ['process 0 (a)', 'process 1 (b)', 'process 2 (c)']
  figures = np.array([[10, 5., .1], [10, 5.2, 2.], [10, 5.1, .2]])
  assert step_times.slowest_host(figures, hosts, 40) == (
      'slowest host up to step 40: process 1 (b) waited 0.2 s per step for input (the other '
      'hosts 0.015 s, median); steps took 0.51 s (median over hosts)')
  assert step_times.slowest_host(np.zeros((3, 3)), hosts, 40) is None


def xla_modules(xplane) -> collections.Counter:
  """XLA modules run in a trace: the `hlo_module` of its events."""
  found = collections.Counter()
  for plane in jax.profiler.ProfileData.from_file(str(xplane)).planes:
    for line in plane.lines:
      for event in line.events:
        found.update(v for k, v in event.stats if k == 'hlo_module')
  return found


@dataclasses.dataclass
class _StallOnceSeen(proxies.Fault):
  """Holds the requests it matches (until removed) once a request naming `seen` has come."""
  seen: str = ''
  stall_s: float = math.inf
  armed: bool = False

  def applies(self, method: str, target: str) -> bool:
    self.armed = self.armed or self.seen in target
    return self.armed and super().applies(method, target)


def _read_lines(process, lines: list) -> threading.Thread:
  """Collects the process's output lines as they come, in a thread."""
  def read():
    for line in process.stdout:
      lines.append(line.rstrip('\n'))
  reader = threading.Thread(target=read, daemon=True)
  reader.start()
  return reader


def _until(condition, process, lines, timeout=300.) -> None:
  """Polls `condition()` until it holds; fails if the process ends or the time is up first."""
  deadline = time.time() + timeout
  while not condition():
    assert process.poll() is None and time.time() < deadline, '\n'.join(lines[-100:])
    time.sleep(.1)


def _logged_steps(lines) -> list:
  return [int(line.split()[1].split('/')[0]) for line in lines
          if line.startswith('step ') and '| train_loss' in line]


@pytest.mark.slow
def test_a_read_that_stops_answering_is_named_and_the_killed_run_counted_on_resume(
    gcs_bucket, gcs_proxy, quickstart_config, tmp_path):
  from etils import epath  # pylint: disable=g-import-not-at-top
  from tests import test_records, test_resume  # pylint: disable=g-import-not-at-top
  from vit_jax.data import make_records  # pylint: disable=g-import-not-at-top
  root = f'{gcs_bucket}/stalled'
  rows = test_records.write_multilabel_images(str(tmp_path / 'images'), 32, size=16)
  test_records.write_csv(tmp_path / 'labels.csv', rows)
  make_records.write_records(str(tmp_path / 'images'), str(tmp_path / 'labels.csv'),
                             f'{root}/records', 2, split='train', log=io.StringIO())
  config = quickstart_config
  config.data.path, config.data.eval_split = f'{root}/records', ''
  config.num_classes, config.pp_train = 6, config.pp_train.replace('onehot(10)', 'onehot(6)')
  config.update(dict(total_steps=200, log_every=1, checkpoint_every=100, eval_every=0,
                     profile_steps='2:3', hang_dump_s=5.))
  workdir = f'{root}/run'
  command = [sys.executable, '-m', 'vit_jax.main', f'--workdir={workdir}',
             f'--config={test_resume._write_config(config, tmp_path / "config.py")}']  # pylint: disable=protected-access
  hangs_folder = epath.Path(workdir) / 'hangs'
  dumps = lambda: sorted(p.name for p in hangs_folder.iterdir()) if hangs_folder.exists() else []

  # Run 1: the records' reads stop answering once it saves its checkpoint at step 100; it goes
  # on with the batches read before, its hang is dumped twice, 5 s apart, then it is killed.
  fault = _StallOnceSeen('stalled/records/train-', methods=('GET',),
                         seen='stalled/run/checkpoints/100')
  gcs_proxy.faults.append(fault)
  lifetimes, lines = [], []
  started = time.time()
  process = test_resume._start(command)  # pylint: disable=protected-access
  lifetimes.append([started, time.time()])
  reader = _read_lines(process, lines)
  try:
    _until(lambda: len(dumps()) >= 2, process, lines)
    _until(lambda: checkpoint.latest_complete_step(checkpoint.make_manager(workdir)) == 100,
           process, lines)
  finally:
    process.kill()
    process.wait()
    reader.join()
    gcs_proxy.clear_faults()
  lifetimes[0].append(time.time())
  assert fault.hits > 0
  killed_at = max(_logged_steps(lines))
  assert 100 < killed_at < config.total_steps
  # Only the stall is named: after the last step, on this host, with the read's frame.
  assert dumps()[:2] == [f'step{killed_at}-process0-{HOST}-1.txt',
                         f'step{killed_at}-process0-{HOST}-2.txt']
  assert all(name.startswith(f'step{killed_at}-') for name in dumps())
  text = (hangs_folder / dumps()[0]).read_text()
  assert text.startswith(f'hang: no training step finished for 5 s on process0-{HOST} after '
                         f'step {killed_at}; dump 1')
  assert 'vit_jax/storage/paths.py' in text and 'in read\n' in text, text
  assert '\n'.join(lines).count('hang: no training step finished for') >= 2  # in the log too

  # Run 2, the same command: resumes at step 100 and ends with the goodput of both runs.
  started = time.time()
  process = test_resume._start(command)  # pylint: disable=protected-access
  lifetimes.append([started, time.time()])
  rc, output = test_resume._finish(process)  # pylint: disable=protected-access
  lifetimes[1].append(time.time())
  assert rc == 0, output
  assert f'resuming from {workdir}/checkpoints/100' in output
  assert output.splitlines()[-1].startswith('goodput '), output[-2000:]

  done = subprocess.run([sys.executable, '-m', 'vit_jax.goodput', workdir], cwd=REPO,
                        capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr
  report = json.loads(done.stdout.splitlines()[-1])
  assert report['restarts'] == 1 and report['steps_redone'] == killed_at - 100
  assert report['badput_s']['lost'] > 0
  assert report['wall_s'] == pytest.approx(report['productive_s'] +
                                           sum(report['badput_s'].values()), rel=.02)
  # Each run counts from its process's start to its last record, within its lifetime.
  for (before, after, ended), records in zip(lifetimes, goodput.read_runs(workdir)):
    assert before - .05 <= records[-1]['started'] <= after
    assert records[-1]['t'] <= ended
  assert report['wall_s'] <= sum(ended - before for before, _, ended in lifetimes)

  # Run 1 traced steps 2-3 on gs:// (through a local folder).
  folder = epath.Path(workdir) / 'plugins' / 'profile' / 'steps_2-3'
  assert sorted(p.name for p in folder.iterdir()) == [f'{HOST}.trace.json.gz',
                                                      f'{HOST}.xplane.pb']
  (tmp_path / 'trace.xplane.pb').write_bytes((folder / f'{HOST}.xplane.pb').read_bytes())
  assert xla_modules(tmp_path / 'trace.xplane.pb')['jit_train_step'] > 0
