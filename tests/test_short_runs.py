"""Smoke runs as users start them: total_steps below the recipe's warmup, one step, re-runs."""
import json
import logging
import os

from tests import test_configs
from vit_jax.train import metrics_log, optim, trainer


def _quickstart(*overrides, spec='configs/quickstart.py'):
  """A config file with command-line overrides, parsed as `vit_jax.main` parses them."""
  return test_configs.parse_as_main(spec, *overrides)


def _train_lines(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [m for m in map(json.loads, f) if 'train_loss' in m]


def test_one_step_run_warms_up_logs_and_says_when_done(tfds_data_dir, tmp_path, caplog,
                                                       capsys):
  # The user's smoke run keeps the quickstart's 100 warmup steps; the rest only shrinks it.
  config = _quickstart('--config.total_steps=1', '--config.model.name=testing',
                       '--config.model.num_layers=2', '--config.batch_size=16',
                       '--config.eval_every=0', f'--config.data.data_dir={tfds_data_dir}')
  assert config.schedule.warmup_steps == 100
  workdir = str(tmp_path / 'run')
  with caplog.at_level(logging.WARNING):
    trainer.train_and_evaluate(config, workdir)
  assert 'schedule.warmup_steps=100 >= total_steps=1' in caplog.text
  assert [m['step'] for m in _train_lines(workdir)] == [1]
  assert 'step 1/1 | train_loss' in capsys.readouterr().out

  caplog.clear()
  with open(os.path.join(workdir, 'config.json')) as f:
    used = f.read()
  config.log_every = 7  # a flag of a rerun that trains nothing is not the run's config
  with caplog.at_level(logging.WARNING):
    trainer.train_and_evaluate(config, workdir)  # the same command again
  assert f'{workdir} is already at step 1 of 1: nothing to train' in capsys.readouterr().err
  assert len(_train_lines(workdir)) == 1
  with open(os.path.join(workdir, 'config.json')) as f:
    assert f.read() == used
  # Resuming to a larger total_steps: test_train.test_quickstart_trains_evaluates_and_resumes.


def test_eta_leaves_out_the_compiling_first_step(monkeypatch):
  now = [0.]
  monkeypatch.setattr(metrics_log.time, 'time', lambda: now[0])
  progress = metrics_log.Progress(total_steps=10, start_step=0)
  now[0] = 100.  # step 1 took 100 s, nearly all of it compilation
  progress.restart_clock(1)
  now[0] = 101.  # step 2 took 1 s: 8 more such steps remain
  assert progress.line(2, {}) == 'step 2/10 | elapsed 1m41s, ETA 0m08s'


def test_a_short_fine_tuning_run_warms_up_over_its_steps(caplog):
  config = _quickstart('--config.total_steps=400', spec='configs/finetune.py:cifar10')
  with caplog.at_level(logging.WARNING):
    _, schedule = optim.make_optimizer(config)
  assert caplog.text.count('schedule.warmup_steps=500 >= total_steps=400') == 1
  lrs = [float(schedule(step)) for step in (0, 200, 399)]
  assert lrs[0] == 0 and lrs[0] < lrs[1] < lrs[2] < config.schedule.base_lr
