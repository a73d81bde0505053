"""Quickstart: a small ViT on scikit-learn's handwritten digits, on CPU in a few minutes.

    python -m vit_jax.main --config=configs/quickstart.py --workdir=/tmp/vit_quickstart

Expected: ~0.99 held-out accuracy on the 297 test digits (measured 0.9865 at step 1000, 0.929 at
step 500; 2m10s on 2 quiet CPU cores, start-up included).
"""
from vit_jax.train import defaults


def get_config():
  c = defaults.base_config()
  c.seed = 0
  c.total_steps = 1000
  c.batch_size = 64
  c.eval_batch_size = 128
  c.log_every = 50
  c.eval_every = 500
  c.checkpoint_every = 500
  c.keep_checkpoints = 3
  c.init_from = ''

  c.image_size = 16
  c.num_classes = 10
  c.data.update(name='sklearn_digits', train_split='train', eval_split='test')
  c.pp_train = ('decode|resize(16)|random_crop(16, pad=1)|value_range(-1, 1)|onehot(10)')
  c.pp_eval = 'decode|resize(16)|value_range(-1, 1)|onehot(10)'

  c.model.update(name='ViT-Ti_4', num_layers=4, classifier='token')
  c.loss = 'softmax_xent'
  c.optimizer.update(name='adamw', b1=0.9, b2=0.999, weight_decay=1e-4, grad_clip_norm=1.0)
  c.schedule.update(base_lr=1e-3, warmup_steps=100, decay_type='cosine')
  return c
