r"""Pretraining the largest ViTs on JFT-style record files: G/14, e/14 and 22B/14.

    python -m vit_jax.main --config=configs/pretrain_giant.py:G/14 --workdir=gs://BUCKET/vit_g \
      --config.data.path=gs://BUCKET/records --config.data.num_classes=29593

Check the fit on your slice before creating it (the launcher runs the same check):

    python -m vit_jax.aot --config=configs/pretrain_giant.py:G/14 --topology=v4-256

Recipe ("Scaling Vision Transformers", Zhai et al. 2022, as big_vision's released ViT-g/G
config sets it): 224px, sigmoid cross-entropy on multi-hot labels (JFT-3B: 29,593 classes; the
head's bias starts at -10), attention-pooling (MAP) head, inception crop + flip, batch 16,384,
the memory-saving Adafactor (`big_vision_adafactor`: factored second moment, momentum 0.9 kept
in bfloat16), base_lr 8e-4 with reciprocal-square-root decay (10k warmup steps, timescale 10k)
and a linear cooldown over the last 50k steps, decoupled weight decay 0.03 on the body and 3.0
on the head, gradient clipping at 1.0, 1M steps. ViT-e/14 (PaLI) follows the ViT-G recipe.
ViT-22B/14 (Dehghani et al. 2023) is its paper's block (registry `ViT-22B_14`: qk_norm,
parallel_block, no QKV or LayerNorm biases) at batch 65,536 for 177k steps (about 3 epochs of
its 4B images), on the same optimizer and schedule.

Sized for (compiled, benchmarks/README.md "The largest ViTs"; bf16 compute, scanned layers,
full remat, parameters and optimizer state sharded over every chip: `mesh.fsdp=-1`): G/14 on a
v4-256 (10.5 of 30.75 GiB per chip; the smallest slice that holds the recipe as shipped is a
v4-128, 20.3 GiB), e/14 on a v4-512 (7.7 GiB; smallest a v4-128, 27.7 GiB), 22B/14 on a
v4-2048 (20.8 GiB, also the smallest: a v4-1024 needs 38.0). The state is 6 bytes per
parameter over the whole slice; what stops fitting on smaller slices is the activations of the
larger per-chip batch, which `--config.accum_steps=K` divides by K at the same global batch.

Small on CPU (a few hundred images in RECORDS/train-* and RECORDS/val-*), the same recipe on
the quickstart's model with ViT-22B's block:

    python -m vit_jax.main --config=configs/pretrain_giant.py:22B/14 --workdir=/tmp/giant_small \
      --config.data.path=RECORDS --config.data.num_classes=K --config.model.name=ViT-Ti_16 \
      --config.model.qk_norm=True --config.model.parallel_block=True \
      --config.model.use_bias=False --config.image_size=64 --config.total_steps=200 \
      --config.batch_size=32 --config.schedule.warmup_steps=20 --config.schedule.cooldown_steps=20
"""
from vit_jax.train import defaults

# preset: (model name, global batch, total steps, the slice it is sized for); every preset
# shards parameters and optimizer state over all chips of the slice (mesh.fsdp=-1).
PRESETS = {'G/14': ('ViT-G_14', 16_384, 1_000_000, 'v4-256'),
           'e/14': ('ViT-e_14', 16_384, 1_000_000, 'v4-512'),
           '22B/14': ('ViT-22B_14', 65_536, 177_000, 'v4-2048')}
ARGS = tuple(PRESETS)


def get_config(arg: str = 'G/14'):
  if arg not in PRESETS:
    raise ValueError(f'configs/pretrain_giant.py: unknown preset {arg!r}; choose one of {ARGS}')
  model_name, batch_size, total_steps, _ = PRESETS[arg]
  c = defaults.base_config()
  c.seed = 0
  c.total_steps = total_steps
  c.batch_size = batch_size
  c.eval_batch_size = 4096
  c.log_every = 50
  c.eval_every = 10_000
  c.checkpoint_every = 1_000
  c.keep_checkpoints = 3
  c.init_from = ''

  c.image_size = 224
  c.data.update(train_split='train', eval_split='val')
  c.num_classes = 29_593  # JFT-3B's; = data.num_classes (one value)
  size, classes = c.get_ref('image_size').to_str(), c.get_ref('num_classes').to_str()
  c.pp_train = ('decode|inception_crop(' + size + ')|flip_lr|value_range(-1, 1)|onehot(' +
                classes + ')')
  c.pp_eval = ('decode|resize_small(256)|central_crop(' + size + ')|value_range(-1, 1)|onehot('
               + classes + ')')

  c.model.update(name=model_name, classifier='map', head_bias_init=-10., dtype='bfloat16',
                 scan_layers=True, remat_policy='full')
  c.loss = 'sigmoid_xent'
  c.optimizer.update(name='big_vision_adafactor', b1=0.9, b2=0.999, momentum_dtype='bfloat16',
                     weight_decay=0.03, head_weight_decay=3.0, grad_clip_norm=1.0)
  c.schedule.update(base_lr=8e-4, warmup_steps=10_000, decay_type='rsqrt', timescale=10_000,
                    cooldown_steps=50_000)
  c.mesh.update(data=1, fsdp=-1)
  return c
