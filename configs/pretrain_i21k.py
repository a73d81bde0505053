r"""Pretraining on ImageNet-21k as in the ViT paper, for ViT-B/16, L/16 or H/14.

    python -m vit_jax.main --config=configs/pretrain_i21k.py:B/16 --workdir=gs://BUCKET/i21k_b16

Recipe (paper, Table 3 and Appendix B): Adam b1=0.9 b2=0.999, batch 4096, 90 epochs
(~312k steps of 14.2M images), base_lr 1e-3, decoupled weight decay 0.03, linear warmup 10k
steps then linear decay, dropout 0.1, a tanh pre-logits layer as wide as the model, 224px,
sigmoid cross-entropy on the labels. Few-shot linear accuracy on cifar100 is logged during
training as big_vision does.

Expected: ViT-B/16 from this run fine-tuned with configs/finetune.py reaches 84.5% on imagenet2012
(384px, 20k steps), 99.0% on cifar10 and 92.1% on cifar100 (vit_jax README). The paper notes
ViT-L/16 on ImageNet-21k takes about 30 days on one 8-core TPUv3; plan for a pod slice
(e.g. v4-64 or larger) and use mesh.fsdp for L and H.

Sized for (compiled figures, benchmarks/README.md; bf16 compute, scanned layers): B/16 on a
v5litepod-16 (256 images per chip, full remat: 5.6 of 15.75 GiB per chip; saving the matmul
outputs would need 19.8), L/16 on a v4-64 with fsdp=8 (matmul outputs saved, 23.7 of 30.75 GiB:
a step 19% shorter at peak than full remat's 4.6 GiB), H/14 on a v4-64 with fsdp=8 (full remat,
9.4 of 30.75 GiB) or a v5p-128. Check
another slice before creating it: `python -m vit_jax.aot --config=configs/pretrain_i21k.py:H/14
--topology=v5p-128` (the launcher runs the same check).

The tfds name `imagenet21k` needs a manually prepared copy in your data_dir.
"""
from vit_jax.train import defaults

# preset: (model name, width = pre-logits size, FSDP ways, remat policy); sized by compiling
# for the slices in the docstring (benchmarks/README.md, "Presets on their slices").
PRESETS = {'B/16': ('ViT-B_16', 768, 1, 'full'), 'L/16': ('ViT-L_16', 1024, 8, 'dots_saveable'),
           'H/14': ('ViT-H_14', 1280, 8, 'full')}
ARGS = tuple(PRESETS)
NUM_CLASSES = 21_843


def get_config(arg: str = 'B/16'):
  if arg not in PRESETS:
    raise ValueError(f'configs/pretrain_i21k.py: unknown preset {arg!r}; choose one of {ARGS}')
  model_name, hidden, fsdp, remat = PRESETS[arg]
  c = defaults.pretraining_config()
  c.total_steps = 312_000

  c.image_size = 224
  c.num_classes = NUM_CLASSES
  c.data.update(name='imagenet21k', train_split='full[102400:]', eval_split='full[:102400]')
  c.pp_train = (f'decode|resize(256)|random_crop(224)|flip_lr|value_range(-1, 1)|'
                f'onehot({NUM_CLASSES})')
  c.pp_eval = f'decode|resize(224)|value_range(-1, 1)|onehot({NUM_CLASSES})'

  c.model.update(name=model_name, classifier='token', representation_size=hidden,
                 dropout_rate=0.1, dtype='bfloat16', scan_layers=True, remat_policy=remat)
  c.loss = 'sigmoid_xent'
  c.optimizer.update(name='adam', b1=0.9, b2=0.999, weight_decay=0.03, grad_clip_norm=1.0)
  c.schedule.update(base_lr=1e-3, warmup_steps=10_000, decay_type='linear', end_lr=1e-5)
  c.fewshot.update(dataset='cifar100', name='cifar100', train_split='train',
                   test_split='test', shots=[1, 5, 10, 25], seeds=3, l2_reg=2.**10,
                   pp='decode|resize(224)|value_range(-1, 1)|onehot(100)')
  c.mesh.fsdp = fsdp
  return c
