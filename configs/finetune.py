r"""Fine-tuning a pretrained ViT, with the paper's / vit_jax's defaults.

    python -m vit_jax.main --config=configs/finetune.py:cifar10 --workdir=gs://BUCKET/ft_c10 \
        --config.init_from=/path/to/ViT-B_16.npz

Recipe: SGD momentum 0.9, batch 512, no weight decay, global-norm clipping at 1.0, base_lr 0.03,
500 warmup steps then cosine decay, 384px with the patch size kept (position embeddings are
interpolated to the longer sequence), a new zero-initialised head, no pre-logits layer.

Expected top-1 with ViT-B/16 pretrained on ImageNet-21k (vit_jax README; 384px, batch 512):
cifar10 99.0% and cifar100 92.1% after 10k steps, imagenet2012 84.5% after 20k steps; a 500-step
run on cifar10 reaches 98.6%. Short schedules land 0.3-3 points lower, and 224px checkpoints
fine-tuned at 224px are not comparable with these. Those figures come from TPU runs
(8 TPUv3 cores); oxford_iiit_pet and oxford_flowers102 have no reference figure recorded here.

Sized for a v5litepod-8 (64 images per chip at 384px, bf16, scanned, full remat: 5.4 of 15.75
GiB per chip) or one 8-GPU H100 host (5.1 GiB per GPU); `python -m vit_jax.aot
--config=configs/finetune.py:cifar10 --topology=...` checks another.

Datasets come from tfds (imagenet2012 needs its manual download in your data_dir).
"""
from vit_jax.train import defaults

# dataset: (num_classes, train split, eval split, total steps)
DATASETS = {
    'cifar10': (10, 'train', 'test', 10_000),
    'cifar100': (100, 'train', 'test', 10_000),
    'imagenet2012': (1000, 'train', 'validation', 20_000),
    'oxford_iiit_pet': (37, 'train', 'test', 500),
    'oxford_flowers102': (102, 'train', 'test', 500),
}
ARGS = tuple(DATASETS)  # every accepted `configs/finetune.py:<arg>`


def get_config(arg: str = 'cifar10'):
  if arg not in DATASETS:
    raise ValueError(f'configs/finetune.py: unknown dataset {arg!r}; choose one of {ARGS}')
  num_classes, train_split, eval_split, total_steps = DATASETS[arg]
  c = defaults.base_config()
  c.seed = 0
  c.total_steps = total_steps
  c.batch_size = 512
  c.eval_batch_size = 512
  c.log_every = 50
  c.eval_every = 1000
  c.checkpoint_every = 1000
  c.keep_checkpoints = 2
  c.init_from = ''  # released .npz, timm/HF safetensors, or a pretraining workdir

  c.image_size = 384
  c.num_classes = num_classes
  c.data.update(name=arg, train_split=train_split, eval_split=eval_split)
  c.pp_train = (f'decode|resize(448)|random_crop(384)|flip_lr|value_range(-1, 1)|'
                f'onehot({num_classes})')
  c.pp_eval = f'decode|resize(384)|value_range(-1, 1)|onehot({num_classes})'

  # representation_size=None drops the pretraining pre-logits layer, as the paper does.
  c.model.update(name='ViT-B_16', classifier='token', representation_size=None,
                 dtype='bfloat16', scan_layers=True, remat_policy='full')
  c.loss = 'softmax_xent'
  c.optimizer.update(name='sgd', momentum=0.9, weight_decay=0., grad_clip_norm=1.0)
  c.schedule.update(base_lr=0.03, warmup_steps=500 if total_steps > 500 else 100,
                    decay_type='cosine')
  return c
