"""Supervised pretraining on JFT-style record files: multi-label, sigmoid cross-entropy.

The ViT paper's recipe (Dosovitskiy et al. 2021) at 224px: Adam b1=0.9 b2=0.999, weight decay
0.1, batch 4096, 10k linear warmup then linear decay, a tanh pre-logits layer as wide as the
model, evaluated by val_prec@1. Presets `configs/pretrain_jft.py:B/16` (default), `:L/16`,
`:H/14` take the paper's base learning rates for ~7 JFT epochs (8e-4, 4e-4, 3e-4; Table 3) and
shard L and H with FSDP over 8 devices. Sized as configs/pretrain_i21k.py (bf16, scanned; full
remat but for L/16's saved matmul outputs): B/16 on a v5litepod-16 (6.2 of 15.75 GiB per chip),
L/16 and H/14 on a v4-64; check
yours with `python -m vit_jax.aot --config=configs/pretrain_jft.py:L/16 --topology=...`.
Records come from `python -m vit_jax.data.make_records` (splits 'train' and 'val'):

    python -m vit_jax.main --config=configs/pretrain_jft.py --workdir=DIR \
      --config.data.path=RECORDS --config.data.num_classes=18291

Small on CPU (a few hundred images in RECORDS/train-* and RECORDS/val-*):

    python -m vit_jax.main --config=configs/pretrain_jft.py --workdir=/tmp/jft_small \
      --config.data.path=RECORDS --config.data.num_classes=K --config.model.name=ViT-Ti_16 \
      --config.image_size=64 --config.total_steps=200 --config.batch_size=32 \
      --config.schedule.warmup_steps=20

The preprocessing strings follow data.num_classes and image_size (field references), and so
does the model's head.
"""
from vit_jax.train import defaults

# preset: (model name, width = pre-logits size, base learning rate, FSDP ways, remat policy);
# sized by compiling for the slices in the docstring (benchmarks/README.md).
PRESETS = {'B/16': ('ViT-B_16', 768, 8e-4, 1, 'full'),
           'L/16': ('ViT-L_16', 1024, 4e-4, 8, 'dots_saveable'),
           'H/14': ('ViT-H_14', 1280, 3e-4, 8, 'full')}
ARGS = tuple(PRESETS)


def get_config(arg: str = 'B/16'):
  if arg not in PRESETS:
    raise ValueError(f'configs/pretrain_jft.py: unknown preset {arg!r}; choose one of {ARGS}')
  model_name, width, base_lr, fsdp, remat = PRESETS[arg]
  c = defaults.pretraining_config(checkpoint_every=5_000)
  c.total_steps = 300_000  # ~7 epochs of JFT-300M at batch 4096

  c.image_size = 224
  c.data.update(train_split='train', eval_split='val')
  c.num_classes = 18_291  # = data.num_classes (one value)
  size, classes = c.get_ref('image_size').to_str(), c.get_ref('num_classes').to_str()
  c.pp_train = ('decode|inception_crop(' + size + ')|flip_lr|value_range(-1, 1)|onehot(' +
                classes + ')')
  c.pp_eval = 'decode|resize(' + size + ')|value_range(-1, 1)|onehot(' + classes + ')'

  c.model.update(name=model_name, representation_size=width, classifier='token',
                 dtype='bfloat16', scan_layers=True, remat_policy=remat)
  c.loss = 'sigmoid_xent'
  c.optimizer.update(name='adam', b1=0.9, b2=0.999, weight_decay=0.1, grad_clip_norm=1.0)
  c.schedule.update(base_lr=base_lr, warmup_steps=10_000, decay_type='linear', end_lr=1e-5)
  c.mesh.fsdp = fsdp
  return c
