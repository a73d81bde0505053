"""Self-supervised tasks in the sharded trainer: steps learn, MAE runs write pictures and
metrics, and a classifier takes its encoder from an MAE workdir."""
import json
import os

import flax
import jax
import numpy as np
import pytest
from PIL import Image

from vit_jax import checkpoint
from vit_jax.scale import sharding
from vit_jax.train import trainer

TINY_DECODER = dict(decoder_width=8, decoder_layers=1, decoder_mlp_dim=16, decoder_heads=2)


def _self_supervised(config, task):
  """The tiny quickstart config turned into `task` pretraining (images only, no labels)."""
  config.task = task
  config.model = dict(name='testing', **(TINY_DECODER if task == 'mae' else {}))
  config.pp_train = 'decode|resize(16)|value_range(-1, 1)'
  config.pp_eval = 'decode|resize(16)|value_range(-1, 1)'
  config.norm_pix_loss = True
  return config


@pytest.mark.parametrize('task', ['mae', 'masked_patch'])
def test_self_supervised_steps_lower_the_loss_on_a_fixed_batch(quickstart_config,
                                                               task):
  config = _self_supervised(quickstart_config, task)
  config.norm_pix_loss = False
  config.schedule = dict(base_lr=1e-2, warmup_steps=0, decay_type='constant')
  training = trainer.build(config)
  mesh = training.mesh
  state = training.init_fn(jax.random.key(0))
  step = jax.jit(trainer.make_train_step(config, training, jax.random.key(1)),
                 in_shardings=(training.state_sharding, sharding.batch_sharding(mesh)))
  # One colour per image, a little noise: the visible patches tell what the hidden ones hold.
  rng = np.random.RandomState(0)
  images = (rng.uniform(-0.9, 0.9, (16, 1, 1, 3)) +
            rng.normal(0, 0.02, (16, 16, 16, 3))).astype(np.float32)
  batch = jax.device_put({'image': images}, sharding.batch_sharding(mesh))
  losses = []
  for _ in range(10):
    state, metrics = step(state, batch)
    losses.append(float(metrics['train_loss']))
  if task == 'masked_patch':
    assert losses[0] == pytest.approx(np.log(512), rel=0.05)  # near-uniform over 512 colours
  assert losses[-1] < 0.7 * losses[0], losses


def _metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


@pytest.mark.slow
def test_mae_trainer_writes_pictures_and_its_encoder_transfers(quickstart_config, tmp_path):
  workdir = str(tmp_path / 'mae')
  config = _self_supervised(quickstart_config, 'mae')
  config.total_steps, config.eval_every, config.checkpoint_every = 2, 1, 2
  last = trainer.train_and_evaluate(config, workdir)
  lines = _metrics(workdir)
  assert [m['step'] for m in lines if 'val_loss' in m] == [1, 2]
  val_losses = [m['val_loss'] for m in lines if 'val_loss' in m]
  # The same masks at both evaluations: one step lowers the loss (measured 1.198 -> 1.187).
  assert val_losses[1] < val_losses[0] - 0.005 and np.isfinite(last['train_loss'])
  for step in (1, 2):
    picture = np.asarray(Image.open(os.path.join(workdir, f'mae_recon_{step}.png')))
    # 3 rows (original / masked / reconstruction) of 8 images, 16px enlarged 4x, 2px borders.
    assert picture.shape == (3 * 66 + 2, 8 * 66 + 2, 3)
  # Row 2 shows the masked images: 75% of each image's patches are flat grey.
  masked_row = picture[2 + 66:2 + 66 + 64, 2:2 + 64]
  grey_patches = sum((masked_row[r:r + 16, c:c + 16] == 128).all()
                     for r in range(0, 64, 16) for c in range(0, 64, 16))
  assert grey_patches == 12

  mae_params = checkpoint.load(workdir)
  assert 'decoder' in mae_params
  finetune = quickstart_config
  finetune.task = 'classification'
  finetune.model = dict(name='testing')
  finetune_model = trainer.build_model(finetune)
  target = flax.linen.unbox(finetune_model.init(jax.random.key(0), np.zeros((1, 16, 16, 3)),
                                                train=False)['params'])
  loaded = checkpoint.load_pretrained(workdir, jax.device_get(target))
  np.testing.assert_array_equal(loaded['embedding']['kernel'], mae_params['embedding']['kernel'])
  np.testing.assert_array_equal(loaded['head']['kernel'], np.zeros((16, 10)))  # a new head
  assert 'decoder' not in loaded
