"""Fine-tuning the quickstart from an exported .npz and from an earlier run's workdir."""
import flax
import numpy as np
import pytest

from vit_jax import checkpoint
from vit_jax.train import trainer


def _flat(params):
  return flax.traverse_util.flatten_dict(params, sep='/')


@pytest.mark.slow
def test_quickstart_fine_tunes_from_exported_npz_and_workdir(quickstart_config, tmp_path):
  config = quickstart_config
  config.total_steps, config.eval_every, config.checkpoint_every = 2, 0, 2
  # The pretraining and the final fine-tuning share this schedule, hence one compiled step.
  config.schedule = dict(base_lr=1e-3, warmup_steps=0, decay_type='constant')
  config.data.eval_split = ''  # only the final fine-tuning evaluates
  trainer.train_and_evaluate(config, str(tmp_path / 'pretrain'))
  pretrained = checkpoint.load(str(tmp_path / 'pretrain'))
  checkpoint.save_npz(pretrained, str(tmp_path / 'export.npz'))
  pretrained = _flat(pretrained)

  # With a zero learning rate the fine-tuned weights are exactly what init_from loaded.
  config.schedule = dict(base_lr=0., warmup_steps=0, decay_type='constant')
  config.init_from = str(tmp_path / 'export.npz')
  trainer.train_and_evaluate(config, str(tmp_path / 'from_npz'))
  tuned = _flat(checkpoint.load(str(tmp_path / 'from_npz')))
  for key, value in pretrained.items():
    if key.startswith('head/'):  # a fresh zero-initialised head
      np.testing.assert_array_equal(tuned[key], np.zeros_like(value))
    else:
      np.testing.assert_array_equal(tuned[key], value, err_msg=key)

  # A workdir gives the same initial weights as its export; then fine-tune for real.
  from_dir = _flat(checkpoint.load_pretrained(str(tmp_path / 'pretrain'), _unflat(tuned)))
  for key, value in tuned.items():
    np.testing.assert_array_equal(from_dir[key], value, err_msg=key)
  config.schedule = dict(base_lr=1e-3, warmup_steps=0, decay_type='constant')
  config.init_from, config.eval_every = str(tmp_path / 'pretrain'), 2
  config.data.eval_split = 'test'
  last = trainer.train_and_evaluate(config, str(tmp_path / 'finetune'))
  assert np.isfinite(last['train_loss']) and 0 <= last['val_accuracy'] <= 1
  assert np.any(_flat(checkpoint.load(str(tmp_path / 'finetune')))['head/kernel'] != 0)


def _unflat(flat):
  return flax.traverse_util.unflatten_dict(flat, sep='/')
