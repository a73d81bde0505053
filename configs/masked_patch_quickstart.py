"""Masked patch prediction (ViT paper, section 5.4) on the offline digits, on CPU.

    python -m vit_jax.main --config=configs/masked_patch_quickstart.py --workdir=/tmp/mpp

Half of each image's patch embeddings are corrupted (80% a learned mask embedding, 10% another
patch of the image, 10% kept); the model predicts their 3-bit mean colour (512 classes). Logs
val_loss and val_accuracy (colour of the corrupted patches). Fine-tune like the MAE quickstart:
`configs/quickstart.py --config.init_from=/tmp/mpp`.
"""
from configs import mae_quickstart


def get_config():
  c = mae_quickstart.get_config()
  c.task = 'masked_patch'
  c.model.update(mask_ratio=None, decoder_width=None, decoder_layers=None, decoder_mlp_dim=None,
                 decoder_heads=None, corrupt_ratio=0.5)  # MAE's decoder options do not apply
  c.optimizer.update(name='adamw', b1=0.9, b2=0.999, weight_decay=1e-4, grad_clip_norm=1.0)
  c.schedule.update(base_lr=1e-3, warmup_steps=100, decay_type='cosine')
  return c
