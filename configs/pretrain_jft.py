"""Supervised pretraining on JFT-style record files: multi-label, sigmoid cross-entropy.

The ViT paper's recipe (Dosovitskiy et al. 2021): ViT-B/16 at 224, Adam b1=0.9 b2=0.999,
weight decay 0.1, batch 4096, 10k linear warmup then linear decay, evaluated by val_prec@1.
Records come from `python -m vit_jax.data.make_records` (splits 'train' and 'val'):

    python -m vit_jax.main --config=configs/pretrain_jft.py --workdir=DIR \
      --config.data.path=RECORDS --config.data.num_classes=18291

Small on CPU (a few hundred images in RECORDS/train-* and RECORDS/val-*):

    python -m vit_jax.main --config=configs/pretrain_jft.py --workdir=/tmp/jft_small \
      --config.data.path=RECORDS --config.data.num_classes=K --config.model.name=ViT-Ti_16 \
      --config.image_size=64 --config.total_steps=200 --config.batch_size=32 \
      --config.schedule.warmup_steps=20 --config.data.shuffle_buffer=1000

The preprocessing strings follow data.num_classes and image_size (field references), and so
does the model's head.
"""
import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.total_steps = 300_000  # ~7 epochs of JFT-300M at batch 4096
  c.batch_size = 4096
  c.eval_batch_size = 1024
  c.log_every = 100
  c.eval_every = 10_000
  c.checkpoint_every = 5_000
  c.keep_checkpoints = 3
  c.init_from = ''

  c.image_size = 224
  c.data = ml_collections.ConfigDict(dict(
      path='', name='', data_dir='', train_split='train', eval_split='val', num_classes=18_291,
      shuffle_buffer=250_000, prefetch=2))
  c.num_classes = c.data.get_ref('num_classes')
  size, classes = c.get_ref('image_size').to_str(), c.data.get_ref('num_classes').to_str()
  c.pp_train = ('decode|inception_crop(' + size + ')|flip_lr|value_range(-1, 1)|onehot(' +
                classes + ')')
  c.pp_eval = 'decode|resize(' + size + ')|value_range(-1, 1)|onehot(' + classes + ')'

  c.model = dict(name='ViT-B_16', representation_size=768, classifier='token')
  c.loss = 'sigmoid_xent'
  c.optimizer = dict(name='adam', b1=0.9, b2=0.999, weight_decay=0.1, grad_clip_norm=1.0)
  c.schedule = dict(base_lr=1e-3, warmup_steps=10_000, decay_type='linear', end_lr=1e-5)
  c.mesh = dict(data=-1, fsdp=1, model=1)
  return c
