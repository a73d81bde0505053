"""The transfer demos' target task: scikit-learn's handwritten digits with 10 labels per class,
fine-tuned at 24 pixels, scored on the 297 held-out digits.

Each seed draws its own 100 training digits (10 per class, from the quickstart builder's train
split) and writes them, with the fixed test split, as records through `make_records`; the seed
also sets the fine-tune's initialisation and data order. Pretraining and fine-tuning configs are
the quickstart's recipe with the model and data swapped, so every arm differs only where the
demo says it does.
"""
import csv
import os
import shutil
import sys

import numpy as np
from PIL import Image

from configs import quickstart
from vit_jax.data import digits, make_records
from vit_jax.train import trainer

PER_CLASS = 10
IMAGE_SIZE = 24  # fine-tuning resolution; pretraining runs at the quickstart's 16
# The demos' architectures: the quickstart ViT, and the small BiT ResNet whose training step
# takes about as long on a CPU (61 and 23 MFLOPs per 16px image: the ResNet's convolutions
# run at a lower FLOP rate here).
VIT = dict(name='ViT-Ti_4', num_layers=4, classifier='token')
RESNET = dict(name='BiT-R14x1')


def write_digit_records(output: str, seed: int, log=sys.stderr) -> str:
  """Records 'train' (PER_CLASS digits of each class, drawn with `seed`) and 'test' (the 297
  held-out digits) in `output`; kept if already written."""
  if os.path.exists(os.path.join(output, 'test.json')):
    return output
  images, labels, splits = digits.load_arrays()
  rng = np.random.default_rng(seed)
  chosen = np.concatenate([rng.choice(splits['train'][labels[splits['train']] == c], PER_CLASS,
                                      replace=False) for c in range(10)])
  os.makedirs(os.path.join(output, 'images'), exist_ok=True)
  for split, indices in (('train', rng.permutation(chosen)), ('test', splits['test'])):
    rows = []
    for i in indices:
      name = f'{i:04d}.png'
      Image.fromarray(images[i, ..., 0]).save(os.path.join(output, 'images', name))
      rows.append((name, int(labels[i])))
    with open(os.path.join(output, f'{split}.csv'), 'w', newline='') as f:
      csv.writer(f).writerows([('image', 'labels')] + rows)
    make_records.write_records(os.path.join(output, 'images'), os.path.join(output, f'{split}.csv'),
                               output, num_shards=1, split=split, num_classes=10, log=log)
  return output


def _config(model: dict, data: dict, num_classes: int, image_size: int, steps: int, seed: int):
  c = quickstart.get_config()
  c.seed = seed
  c.total_steps = steps
  c.eval_every = steps
  c.checkpoint_every = steps
  c.log_every = min(100, steps)
  c.image_size = image_size
  c.num_classes = num_classes
  c.data.update(name='', **data)
  c.model.update(name=model['name'], num_layers=None, classifier=None)  # the quickstart's are ViT's
  c.model.update(model)
  return c


def pretrain_config(model: dict, glyph_dir: str, split: str, steps: int, num_classes: int,
                    batch_size: int = 128):
  """Glyph classification at 16 pixels (the renders carry the augmentation)."""
  c = _config(model, dict(path=glyph_dir, train_split=split, eval_split='val'), num_classes, 16,
              steps, seed=0)
  c.batch_size = batch_size
  c.pp_train = f'decode|resize(16)|random_crop(16, pad=1)|value_range(-1, 1)|onehot({num_classes})'
  c.pp_eval = f'decode|resize(16)|value_range(-1, 1)|onehot({num_classes})'
  c.schedule.update(base_lr=1e-3, warmup_steps=min(200, steps // 10), decay_type='cosine')
  return c


def finetune_config(model: dict, digit_dir: str, steps: int, seed: int, init_from: str = ''):
  """100 digits at 24 pixels; `init_from` a pretraining workdir ('' = from scratch)."""
  c = _config(model, dict(path=digit_dir, train_split='train', eval_split='test'), 10, IMAGE_SIZE,
              steps, seed)
  c.init_from = init_from
  c.pp_train = (f'decode|resize({IMAGE_SIZE})|random_crop({IMAGE_SIZE}, pad=2)|'
                'value_range(-1, 1)|onehot(10)')
  c.pp_eval = f'decode|resize({IMAGE_SIZE})|value_range(-1, 1)|onehot(10)'
  c.schedule.update(base_lr=1e-3, warmup_steps=20, decay_type='cosine')
  return c


def finetune(model: dict, outdir: str, seed: int, steps: int, init_from: str = '') -> float:
  """Held-out accuracy of `model` fine-tuned (or trained from scratch) on seed's 100 digits."""
  digit_dir = write_digit_records(os.path.join(outdir, f'digits_seed{seed}'), seed)
  arm = os.path.basename(init_from.rstrip('/')) if init_from else 'scratch'
  workdir = os.path.join(outdir, 'finetune', f'{model["name"]}_{arm}_seed{seed}')
  metrics = trainer.train_and_evaluate(finetune_config(model, digit_dir, steps, seed, init_from),
                                       workdir)
  shutil.rmtree(os.path.join(workdir, 'checkpoints'), ignore_errors=True)  # metrics.jsonl stays
  return float(metrics['val_accuracy'])
