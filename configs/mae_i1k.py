"""MAE pretraining of ViT-B/16 on ImageNet-1k: the paper's recipe (He et al. 2021, Table 8).

    python -m vit_jax.main --config=configs/mae_i1k.py --workdir=gs://BUCKET/mae_b16 \\
        --config.data.data_dir=/gcs/BUCKET/tfds

(tfds data kept in gs://BUCKET/tfds, mounted at /gcs/BUCKET: `python -m launch.tpu_vm ...
--data_bucket=gs://BUCKET` mounts it on every worker; README, "Data location".)

800 epochs at batch 4096 (~250k steps); AdamW b1=0.9 b2=0.95, weight decay 0.05,
lr = 1.5e-4 * batch / 256 with 40 warmup epochs, cosine decay; 75% masking, per-patch normalised
pixel targets, a decoder of 8 blocks at width 512. The paper fine-tunes ViT-B to 83.6% top-1
(100 epochs, not this config). Not run here: this needs a TPU pod slice or a multi-GPU node.
Sized for a v4-32 (256 images per chip, bf16, scanned encoder with full remat: 17.7 of 30.75
GiB per chip; compiled figures in benchmarks/README.md). A v5litepod-16 needs 22.5 GiB per chip
without remat, more than its 15.75, and 13.8 with it (little headroom). Check a slice with `python -m vit_jax.aot
--config=configs/mae_i1k.py --topology=...`.
"""
from vit_jax.train import defaults

IMAGENET_TRAIN_IMAGES = 1_281_167


def get_config():
  c = defaults.pretraining_config()
  c.task = 'mae'
  steps_per_epoch = IMAGENET_TRAIN_IMAGES // c.batch_size
  c.total_steps = 800 * steps_per_epoch

  c.image_size = 224
  c.data.update(name='imagenet2012', train_split='train', eval_split='validation[:10000]')
  # MAE's only augmentation: random resized crop (scale 0.2-1) and horizontal flips.
  c.pp_train = 'decode|inception_crop(224, area_min=0.2)|flip_lr|value_range(-1, 1)'
  c.pp_eval = 'decode|resize_small(256)|central_crop(224)|value_range(-1, 1)'

  c.model.update(name='ViT-B_16', classifier='token', posemb='sincos2d', mask_ratio=0.75,
                 decoder_width=512, decoder_layers=8, decoder_mlp_dim=2048, decoder_heads=16,
                 dtype='bfloat16', scan_layers=True, remat_policy='full')
  c.norm_pix_loss = True
  c.optimizer.update(name='adamw', b1=0.9, b2=0.95, weight_decay=0.05)
  base_lr = 1.5e-4
  c.schedule.update(base_lr=base_lr * c.batch_size / 256, warmup_steps=40 * steps_per_epoch,
                    decay_type='cosine')
  return c
