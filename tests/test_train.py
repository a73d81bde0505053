import json
import logging
import os
import socket

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import test_goodput
from vit_jax import checkpoint, models
from vit_jax.scale import accelerators, flops, sharding
from vit_jax.train import trainer


def _fixed_batch(n=16, size=16, classes=10):
  rng = np.random.RandomState(0)
  return {'image': rng.uniform(-1, 1, (n, size, size, 3)).astype(np.float32),
          'labels': np.eye(classes, dtype=np.float32)[rng.randint(0, classes, n)]}


def test_train_steps_lower_loss_on_a_fixed_batch(quickstart_config):
  config = quickstart_config
  config.schedule = dict(base_lr=1e-2, warmup_steps=0, decay_type='constant')
  training = trainer.build(config)
  mesh = training.mesh
  state = training.init_fn(jax.random.key(0))
  step = jax.jit(trainer.make_train_step(config, training, jax.random.key(1)),
                 in_shardings=(training.state_sharding, sharding.batch_sharding(mesh)))
  batch = jax.device_put(_fixed_batch(), sharding.batch_sharding(mesh))
  losses = []
  for _ in range(15):
    state, metrics = step(state, batch)
    losses.append(float(metrics['train_loss']))
  assert len(mesh.devices.flat) == 8
  assert losses[0] == pytest.approx(np.log(10), rel=1e-3)  # zero-initialised head
  assert losses[-1] < 0.5 * losses[0]
  assert int(state.step) == 15


def test_checkpoint_save_restore_is_exact(quickstart_config, tmp_path):
  training = trainer.build(quickstart_config)
  state = training.init_fn(jax.random.key(3))
  state = state.replace(step=jax.device_put(jnp.asarray(5, jnp.int32), state.step.sharding))
  manager = checkpoint.make_manager(str(tmp_path))
  checkpoint.save_state(manager, 5, state)
  manager.wait_until_finished()
  restored = checkpoint.restore_state(checkpoint.make_manager(str(tmp_path)),
                                      training.abstract_state)
  assert int(restored.step) == 5
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert a.sharding == b.sharding


def test_npz_export_and_transfer_with_posemb_resize(quickstart_config, tmp_path):
  config = quickstart_config
  model = trainer.build_model(config)
  params = jax.tree.map(np.asarray, nn.unbox(
      model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))['params']))
  path = str(tmp_path / 'model.npz')
  checkpoint.save_npz(params, path)
  loaded = checkpoint.load(path)
  np.testing.assert_array_equal(loaded['Transformer']['encoderblock_1']['MlpBlock_3']['Dense_0']
                                ['kernel'],
                                params['Transformer']['encoderblock_1']['MlpBlock_3']['Dense_0']
                                ['kernel'])
  bigger = models.get_model('testing', num_classes=3)
  target = nn.unbox(
      bigger.init(jax.random.key(1), jnp.zeros((1, 32, 32, 3)))['params'])
  merged = checkpoint.load_pretrained(path, target)
  assert merged['Transformer']['posembed_input']['pos_embedding'].shape == (1, 65, 16)
  np.testing.assert_array_equal(merged['Transformer']['posembed_input']['pos_embedding'][0, 0],
                                params['Transformer']['posembed_input']['pos_embedding'][0, 0])
  assert merged['head']['kernel'].shape == (16, 3)
  with pytest.raises(ValueError, match='neither a square grid'):
    checkpoint.resize_posemb(np.zeros((1, 7, 4)), 17)


def _metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def test_quickstart_trains_evaluates_and_resumes(quickstart_config, tmp_path, caplog,
                                                 monkeypatch, capsys):
  # As on an accelerator whose peak is known (here 1 TFLOP/s per CPU device): lines carry mfu.
  monkeypatch.setitem(accelerators.PEAK_BF16_FLOPS, jax.devices()[0].device_kind, 1e12)
  workdir = str(tmp_path / 'run')
  config = quickstart_config
  config.total_steps = 3
  trainer.train_and_evaluate(config, workdir)
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['3']
  assert not os.path.exists(os.path.join(workdir, 'plugins'))  # no profile_steps: no trace
  config.total_steps, config.profile_steps = 6, '5:5'
  with caplog.at_level(logging.WARNING):
    trainer.train_and_evaluate(config, workdir)  # resumes from step 3
  # A plain line for the user (absl's format is for logs); at WARNING, the level the command
  # line shows, nothing alarming about a sound checkpoint.
  printed = capsys.readouterr()
  assert f'resuming from {workdir}/checkpoints/3 (step 3 of 6)\n' in printed.err
  assert 'resuming' not in caplog.text and 'Metadata file does not exist' not in caplog.text
  lines = _metrics(workdir)
  train_steps = [m['step'] for m in lines if 'train_loss' in m]
  assert train_steps == [2, 3, 4, 6]  # log_every=2, and each run's last step
  # The step's FLOPs, counted independently: 3 x the forward pass (no remat here).
  training = trainer.build(config)
  step_flops = 3 * config.batch_size * flops.forward_flops_per_image(
      training.model, training.abstract_state.params, config.image_size)
  for m in lines:
    if 'train_loss' in m:
      assert 'learning_rate' in m and np.isfinite(m['train_loss'])
      # The first step after a start is compilation: its loss counts, its time does not.
      timed = m['step'] != 4
      assert {'images_per_sec', 'input_wait_s', 'mfu'} <= set(m) if timed else not (
          {'images_per_sec', 'input_wait_s', 'mfu'} & set(m)), m
      if timed:
        assert m['input_wait_s'] >= 0
        steps_per_sec = m['images_per_sec'] / config.batch_size
        assert m['mfu'] == pytest.approx(step_flops * steps_per_sec / (8 * 1e12), rel=1e-6)
  evals = [m for m in lines if 'val_accuracy' in m]
  assert [m['step'] for m in evals] == [3, 6]
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['3', '6']
  assert os.listdir(os.path.join(workdir, 'tensorboard'))
  # Step 5's trace, where XProf looks, with the train step's XLA module; the last line says
  # the goodput of both runs (tests/test_goodput.py checks its figures).
  trace = os.path.join(workdir, 'plugins', 'profile', 'steps_5-5', f'{socket.gethostname()}')
  assert test_goodput.xla_modules(f'{trace}.xplane.pb')['jit_train_step'] > 0
  assert os.path.exists(f'{trace}.trace.json.gz')
  last_line = printed.out.splitlines()[-1]
  assert last_line.startswith('goodput ') and 'over 2 runs, 1 restart, 0 steps redone' in last_line


def test_quickstart_learns_the_digits_beyond_chance(quickstart_config, tmp_path):
  """60 steps of the tiny model: measured held-out accuracy 0.175 (chance 0.1) and loss 2.264
  (a zero head starts at ln 10 = 2.303)."""
  config = quickstart_config
  config.total_steps, config.eval_every, config.checkpoint_every, config.log_every = 60, 0, 0, 20
  config.schedule.base_lr = 3e-3
  last = trainer.train_and_evaluate(config, str(tmp_path / 'run'))
  assert last['val_accuracy'] > 0.14 and last['val_loss'] < np.log(10) - 0.02
