"""Exact resume after SIGTERM (preemption save) and SIGKILL, and the NaN stop."""
import collections
import json
import os
import signal
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import io_callback

from tests import common
from vit_jax import checkpoint
from vit_jax.train import preemption, trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write_config(config, path) -> str:
  """A config file for `--config=` that rebuilds exactly `config`."""
  with open(path, 'w') as f:
    f.write('import json\nimport ml_collections\n\n\ndef get_config():\n'
            f'  return ml_collections.ConfigDict(json.loads({config.to_json()!r}))\n')
  return str(path)


def _checkpoint_names(workdir) -> list:
  directory = os.path.join(workdir, 'checkpoints')
  return os.listdir(directory) if os.path.isdir(directory) else []


def _complete_steps(workdir):
  return sorted(int(n) for n in _checkpoint_names(workdir) if n.isdigit())


def _steps_being_saved(workdir):
  """Steps whose Orbax temporary directory (`<step>.orbax-checkpoint-tmp...`) exists."""
  return sorted(int(n.split('.')[0]) for n in _checkpoint_names(workdir)
                if '.orbax-checkpoint-tmp' in n)


def _wait(process, condition, timeout=300):
  """Polls until `condition()` holds (True) or `process` ends or times out (False)."""
  deadline = time.time() + timeout
  while process.poll() is None and time.time() < deadline:
    if condition():
      return True
    time.sleep(0.01)
  return False


def _start(command):
  # The last restart runs in this process, on jax's own XLA CPU kernels; bit-identity needs the
  # program's runs on the same ones, so they go without vit_jax's CPU defaults (host_tuning).
  env = os.environ | {'VIT_JAX_HOST_TUNING': '0'}
  return subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, env=env)


def _finish(process, timeout=300):
  try:
    output, _ = process.communicate(timeout=timeout)
  finally:
    if process.poll() is None:
      process.kill()
      process.wait()
  return process.returncode, output


def _kill_during_a_save(process, workdir, after_step):
  """SIGKILLs `process` while it writes a checkpoint of a step past `after_step`; returns the
  temporary directories it left. The process is stopped (SIGSTOP) before the check that the
  save is still unfinished, so the kill cannot come after Orbax's final rename."""
  while _wait(process, lambda: any(s > after_step for s in _steps_being_saved(workdir))):
    process.send_signal(signal.SIGSTOP)
    if any(s > after_step for s in _steps_being_saved(workdir)):
      process.kill()
      break
    process.send_signal(signal.SIGCONT)  # that save finished in between: catch the next one
  rc, output = _finish(process)
  return rc, output, [n for n in _checkpoint_names(workdir) if '.orbax-checkpoint-tmp' in n]


def _final(workdir, config):
  abstract_state = trainer.build(config).abstract_state
  manager = checkpoint.make_manager(workdir)
  return checkpoint.restore_state(manager, abstract_state, config.total_steps)


# What a line measures of the machine (the values a restart may change; mfu only with a peak).
MEASURED = ('images_per_sec', 'input_wait_s', 'mfu')


def _metrics(workdir) -> list:
  """metrics.jsonl's lines without what they measure of the machine."""
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [{k: v for k, v in m.items() if k not in MEASURED} for m in map(json.loads, f)]


@pytest.mark.slow
def test_ctrl_c_then_sigkill_then_restart_reads_as_an_uninterrupted_run(quickstart_config,
                                                                        tmp_path):
  config = quickstart_config
  config.total_steps, config.batch_size = 8, 8
  # Checkpoints at every step, lines every 3: the runs stop inside a line's steps.
  config.log_every, config.checkpoint_every, config.eval_every = 3, 1, 0
  config.data.eval_split = ''  # no evaluation: this is about training state
  config.model = dict(name='testing', dropout_rate=0.1)  # the dropout rng must resume too
  # Uninterrupted, saving only at the end (how often a run saves does not change its numbers).
  reference = config.copy_and_resolve_references()
  reference.checkpoint_every = 0
  reference_dir = str(tmp_path / 'reference')
  trainer.train_and_evaluate(reference, reference_dir)

  workdir = str(tmp_path / 'interrupted')
  command = [sys.executable, '-m', 'vit_jax.main', f'--workdir={workdir}',
             f'--config={_write_config(config, tmp_path / "config.py")}']
  # Ctrl-C once the first checkpoint is complete (the run is in its loop): like SIGTERM, it
  # saves at the next step and exits with status 0, without a traceback.
  process = _start(command)
  _wait(process, lambda: _complete_steps(workdir))
  process.send_signal(signal.SIGINT)
  rc, output = _finish(process)
  assert rc == 0, output
  stopped_at = max(_complete_steps(workdir))
  # A plain line, not absl's 'W1203 14:21:10.940868 ... trainer.py:298]' in front.
  assert f'\nCtrl-C: saved step {stopped_at} to {workdir}/checkpoints; stopping' in output, output
  assert 'Traceback' not in output, output
  assert stopped_at < config.total_steps

  # It resumes; SIGKILL in the middle of a later save leaves that step's temporary directory.
  rc, output, left_behind = _kill_during_a_save(_start(command), workdir, stopped_at)
  assert rc == -signal.SIGKILL, output
  assert left_behind, 'the run ended before SIGKILL reached it during a save'
  killed_after = max(_complete_steps(workdir))
  assert stopped_at <= killed_after < config.total_steps

  # Restarting (what main runs) skips the temporary directory and ends exactly as the reference.
  trainer.train_and_evaluate(config, workdir)
  assert max(_complete_steps(workdir)) == config.total_steps
  state = _final(workdir, config)
  reference_state = _final(reference_dir, reference)
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(reference_state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Its logs read as if it had never stopped: each line the reference's, bit for bit (a line
  # a stop cut in two continues from the checkpoint's sums), in metrics.jsonl and TensorBoard.
  reference_metrics = _metrics(reference_dir)
  assert [m['step'] for m in reference_metrics] == [3, 6, 8]
  assert _metrics(workdir) == reference_metrics
  assert (common.tensorboard_scalars(os.path.join(workdir, 'tensorboard')) ==
          common.tensorboard_scalars(os.path.join(reference_dir, 'tensorboard')))


def test_a_stop_request_saves_a_step_the_device_has_nearly_reached(quickstart_config, tmp_path,
                                                                   monkeypatch):
  """The loop runs at most 2 steps ahead of the device, so a stop (SIGTERM, Ctrl-C) saves soon
  however slow the device. Here the device is certainly slower than the loop: each step ends in
  a host callback that holds it until the loop waits on that step (or the run stops; 20 s at
  most, which only a loop that never waits meets). At every stop check at most 2 dispatched
  steps are unfinished, and exactly 2 once the loop is that far ahead."""
  config = quickstart_config
  config.total_steps, config.batch_size = 8, 8
  config.log_every, config.checkpoint_every, config.eval_every = 100, 0, 0
  config.data.eval_split = ''
  waited_on = collections.defaultdict(threading.Event)  # step -> the loop waits on it
  dispatched, unfinished = [], {}  # dispatched[i] holds step i + 1

  def device_step_ends(metrics, step):
    waited_on[int(step)].wait(timeout=20)
    return metrics

  jit_train_step, block_until_ready = trainer.jit_train_step, jax.block_until_ready

  def on_a_slow_device(step_fn, training):
    step = jit_train_step(step_fn, training)
    held = jax.jit(lambda metrics, step: io_callback(device_step_ends, metrics, metrics, step))

    def slow_step(state, batch):
      state, metrics = step(state, batch)
      dispatched.append(held(metrics, len(dispatched) + 1))
      return state, dispatched[-1]
    return slow_step

  def loop_waits_on_the_device(tree):
    for i, metrics in enumerate(dispatched):
      if tree is metrics:
        waited_on[i + 1].set()
    return block_until_ready(tree)

  def reached(self, step):
    unfinished[step] = [i + 1 for i, m in enumerate(dispatched)
                        if not all(leaf.is_ready() for leaf in jax.tree.leaves(m))]
    if step == 6:  # stop here; nothing holds the device from now on
      for i in range(1, config.total_steps + 1):
        waited_on[i].set()
    return step == 6
  monkeypatch.setattr(trainer, 'jit_train_step', on_a_slow_device)
  monkeypatch.setattr(jax, 'block_until_ready', loop_waits_on_the_device)
  monkeypatch.setattr(preemption.PreemptionWatch, 'reached', reached)
  trainer.train_and_evaluate(config, str(tmp_path))
  assert unfinished == {1: [1], 2: [1, 2], 3: [2, 3], 4: [3, 4], 5: [4, 5], 6: [5, 6]}
  assert _complete_steps(str(tmp_path)) == [6]


def test_a_stop_inside_a_line_resumes_into_the_same_line(quickstart_config, tmp_path,
                                                         monkeypatch):
  """Stopped (a SIGTERM or Ctrl-C, as the watch reports it) at step 4 of lines every 3 steps,
  the resumed run's line at step 6 averages steps 4-6 as the uninterrupted run's does."""
  config = quickstart_config
  config.total_steps, config.batch_size = 8, 8
  config.log_every, config.checkpoint_every, config.eval_every = 3, 0, 0
  config.data.eval_split = ''
  trainer.train_and_evaluate(config, str(tmp_path / 'reference'))
  workdir = str(tmp_path / 'stopped')
  monkeypatch.setattr(preemption.PreemptionWatch, 'reached', lambda self, step: step == 4)
  trainer.train_and_evaluate(config, workdir)
  assert _complete_steps(workdir) == [4] and [m['step'] for m in _metrics(workdir)] == [3]
  monkeypatch.undo()
  trainer.train_and_evaluate(config, workdir)
  resumed, reference = _metrics(workdir), _metrics(str(tmp_path / 'reference'))
  assert [m['step'] for m in reference] == [3, 6, 8]
  assert resumed == reference  # train_loss, grad_norm: the same float64 sums, in step order


def test_sigterm_asks_to_stop_and_a_second_ctrl_c_exits_at_once(capsys):
  watch = preemption.PreemptionWatch()
  try:
    assert not watch.reached(1)
    os.kill(os.getpid(), signal.SIGTERM)
    assert watch.reached(2) and not watch.interrupted
    assert capsys.readouterr().err == ('\nSIGTERM: saving a checkpoint at the next step, then '
                                       'stopping\n')
  finally:
    watch.close()
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
  # Two Ctrl-C in a row, in a child (the second ends the process on the spot).
  child = ('import os, signal, time\n'
           'from vit_jax.train import preemption\n'
           'watch = preemption.PreemptionWatch()\n'
           'os.kill(os.getpid(), signal.SIGINT)\n'
           'print("first: stop requested", watch.reached(1), flush=True)\n'
           'os.kill(os.getpid(), signal.SIGINT)\n'
           'time.sleep(60)\n'
           'print("still running")\n')
  result = subprocess.run([sys.executable, '-c', child], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == preemption.INTERRUPTED_EXIT_STATUS, result
  assert result.stdout.splitlines() == ['first: stop requested True']
  assert 'Ctrl-C: saving a checkpoint at the next step' in result.stderr
  assert 'second Ctrl-C: exiting now, without saving' in result.stderr


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(quickstart_config,
                                                             tmp_path):
  config = quickstart_config
  config.total_steps, config.eval_every, config.checkpoint_every = 2, 0, 1
  config.data.eval_split = ''  # no evaluation: this is about training state
  # test_transfer's schedule: the same compiled step serves both (compilation cache).
  config.schedule = dict(base_lr=1e-3, warmup_steps=0, decay_type='constant')
  workdir = str(tmp_path / 'run')
  trainer.train_and_evaluate(config, workdir)
  config.total_steps, config.log_every = 5, 100  # logs only at the end: saves must check first
  config.schedule.base_lr = float('nan')  # injected: the update after step 2 makes params NaN
  with pytest.raises(FloatingPointError, match='after step 3'):
    trainer.train_and_evaluate(config, workdir)
  assert _complete_steps(workdir) == [1, 2]
  config.total_steps = 2
  state = _final(workdir, config)
  assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(state.params))
