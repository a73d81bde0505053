"""Exact resume after SIGTERM (preemption save) and SIGKILL, and the NaN stop."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from vit_jax import checkpoint, sharding
from vit_jax.train import optim, trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write_config(config, path) -> str:
  """A config file for `--config=` that rebuilds exactly `config`."""
  with open(path, 'w') as f:
    f.write('import json\nimport ml_collections\n\n\ndef get_config():\n'
            f'  return ml_collections.ConfigDict(json.loads({config.to_json()!r}))\n')
  return str(path)


def _complete_steps(workdir):
  directory = os.path.join(workdir, 'checkpoints')
  names = os.listdir(directory) if os.path.isdir(directory) else []
  return sorted(int(n) for n in names if n.isdigit())


def _run_until(command, workdir, sig, after_step, timeout=300):
  """Starts `command`; once a checkpoint past `after_step` exists sends `sig`; returns rc."""
  process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
  try:
    deadline = time.time() + timeout
    while sig is not None and process.poll() is None and time.time() < deadline:
      if any(s > after_step for s in _complete_steps(workdir)):
        process.send_signal(sig)
        break
      time.sleep(0.02)
    output, _ = process.communicate(timeout=timeout)
  finally:
    if process.poll() is None:
      process.kill()
      process.wait()
  return process.returncode, output


def _final(workdir, config):
  mesh = sharding.make_mesh(config.mesh)
  model = trainer.build_model(config)
  tx, _ = optim.make_optimizer(config)
  _, abstract_state, _ = trainer.create_state(config, model, tx, mesh, sharding.DEFAULT_RULES)
  manager = checkpoint.make_manager(workdir)
  state = checkpoint.restore_state(manager, abstract_state, config.total_steps)
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    losses = {m['step']: m['train_loss'] for m in map(json.loads, f) if 'train_loss' in m}
  return state, losses


@pytest.mark.slow
def test_sigterm_then_sigkill_then_restart_matches_an_uninterrupted_run(quickstart_config,
                                                                        tmp_path):
  config = quickstart_config
  config.total_steps, config.batch_size = 200, 32
  config.log_every, config.checkpoint_every, config.eval_every = 20, 20, 0
  config.model = dict(name='testing', dropout_rate=0.1)  # the dropout rng must resume too
  reference_dir = str(tmp_path / 'reference')
  trainer.train_and_evaluate(config, reference_dir)

  workdir = str(tmp_path / 'interrupted')
  command = [sys.executable, '-m', 'vit_jax.main', f'--workdir={workdir}',
             f'--config={_write_config(config, tmp_path / "config.py")}']
  rc, output = _run_until(command, workdir, signal.SIGTERM, after_step=0)
  assert rc == 0, output
  preempted_at = max(_complete_steps(workdir))
  assert 'preemption notice: saved step' in output and preempted_at < config.total_steps, output

  rc, output = _run_until(command, workdir, signal.SIGKILL, after_step=preempted_at)
  assert rc == -signal.SIGKILL, output
  killed_after = max(_complete_steps(workdir))
  assert killed_after < config.total_steps, 'the run ended before SIGKILL reached it'

  rc, output = _run_until(command, workdir, None, after_step=config.total_steps)
  assert rc == 0, output
  state, losses = _final(workdir, config)
  reference_state, reference_losses = _final(reference_dir, config)
  assert losses[config.total_steps] == reference_losses[config.total_steps]
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(reference_state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(quickstart_config, tmp_path):
  config = quickstart_config
  config.total_steps, config.eval_every, config.checkpoint_every = 2, 0, 1
  workdir = str(tmp_path / 'run')
  trainer.train_and_evaluate(config, workdir)
  config.total_steps, config.log_every = 5, 100  # logs only at the end: saves must check first
  config.schedule.base_lr = float('nan')  # injected: the update after step 2 makes params NaN
  with pytest.raises(FloatingPointError, match='after step 3'):
    trainer.train_and_evaluate(config, workdir)
  assert _complete_steps(workdir) == [1, 2]
  config.total_steps = 2
  state, _ = _final(workdir, config)
  assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(state.params))
