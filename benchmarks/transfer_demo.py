r"""A miniature of the ViT paper's transfer claim, on 2 CPU cores in under 20 minutes.

    python benchmarks/transfer_demo.py --outdir=/tmp/transfer_demo

1. Pretrain a small ViT (the quickstart's) on `synthetic_shapes`: 20,000 procedurally generated
   16px multi-label stroke images, sigmoid loss.
2. Fine-tune it on a few labelled handwritten digits (the first N training digits, about N/10 per
   class) at a higher resolution, 24px: position embeddings are interpolated from the 4x4 to the
   6x6 patch grid and the head is new.
3. Train the same architecture with the same recipe from scratch on the same few digits.
Both arms are evaluated on the 297 held-out digits, over several seeds. The table goes to the
console and DIR/transfer.md, the plot to DIR/transfer.png.
"""
import argparse
import json
import os
import sys
import time

import matplotlib  # the plot comes after ~20 minutes of training: fail now if it is missing
import numpy as np

# Run as a script from a checkout: the repository root holds `configs` and `vit_jax`.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import quickstart  # noqa: E402  pylint: disable=g-import-not-at-top
from vit_jax import host_tuning  # noqa: E402  pylint: disable=g-import-not-at-top
from vit_jax.train import trainer  # noqa: E402  pylint: disable=g-import-not-at-top


def pretrain_config(steps: int):
  c = quickstart.get_config()
  c.total_steps = steps
  c.eval_every = steps
  c.checkpoint_every = steps
  c.num_classes = 8
  c.data = dict(name='synthetic_shapes', data_dir='', train_split='train', eval_split='test')
  c.pp_train = 'decode|random_crop(16, pad=1)|flip_lr|value_range(-1, 1)|onehot(8, key="labels")'
  c.pp_eval = 'decode|value_range(-1, 1)|onehot(8, key="labels")'
  c.loss = 'sigmoid_xent'
  return c


def finetune_config(steps: int, num_labelled: int, seed: int, init_from: str):
  c = quickstart.get_config()
  c.seed = seed
  c.total_steps = steps
  c.eval_every = steps
  c.checkpoint_every = 0
  c.log_every = 50
  c.init_from = init_from
  c.image_size = 24
  c.data.train_split = f'train[:{num_labelled}]'
  c.pp_train = 'decode|resize(24)|random_crop(24, pad=2)|value_range(-1, 1)|onehot(10)'
  c.pp_eval = 'decode|resize(24)|value_range(-1, 1)|onehot(10)'
  c.schedule = dict(base_lr=1e-3, warmup_steps=20, decay_type='cosine')
  return c


def write_plot(results: dict, path: str, title: str) -> None:
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  names = list(results)
  means = [100 * np.mean(results[n]) for n in names]
  fig, ax = plt.subplots(figsize=(5, 3.5))
  ax.bar(names, means, color=['#999999', '#3366cc'])
  for i, name in enumerate(names):
    ax.scatter([i] * len(results[name]), [100 * a for a in results[name]], color='black', zorder=3)
  ax.set_ylabel('held-out digit accuracy (%)')
  ax.set_title(title, fontsize=9)
  ax.set_ylim(0, 100)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--outdir', required=True)
  parser.add_argument('--pretrain_steps', type=int, default=1500)
  parser.add_argument('--finetune_steps', type=int, default=200)
  parser.add_argument('--num_labelled', type=int, default=100)
  parser.add_argument('--seeds', type=int, default=2)
  args = parser.parse_args()
  os.makedirs(args.outdir, exist_ok=True)
  start = time.time()

  pretrain_dir = os.path.join(args.outdir, 'pretrain')
  print(f'== pretraining on synthetic_shapes for {args.pretrain_steps} steps', flush=True)
  pretrained = trainer.train_and_evaluate(pretrain_config(args.pretrain_steps), pretrain_dir)

  results = {'from scratch': [], 'transferred': []}
  for seed in range(args.seeds):
    for arm, init_from in (('from scratch', ''), ('transferred', pretrain_dir)):
      print(f'== {arm}, seed {seed}', flush=True)
      workdir = os.path.join(args.outdir, f'{arm.replace(" ", "_")}_seed{seed}')
      config = finetune_config(args.finetune_steps, args.num_labelled, seed, init_from)
      results[arm].append(trainer.train_and_evaluate(config, workdir)['val_accuracy'])

  minutes = (time.time() - start) / 60
  title = (f'{args.num_labelled} labelled digits, 24px, {args.finetune_steps} steps;\n'
           f'pretrain {args.pretrain_steps} steps on synthetic shapes')
  lines = [f'# Transfer demo: {title.replace(chr(10), " ")}', '',
           f'pretraining val_prec@1 on synthetic_shapes: {pretrained["val_prec@1"]:.3f}', '',
           '| arm | ' + ' | '.join(f'seed {s}' for s in range(args.seeds)) + ' | mean |',
           '|---|' + '---|' * (args.seeds + 1)]
  for arm, accs in results.items():
    lines.append(f'| {arm} | ' + ' | '.join(f'{a:.3f}' for a in accs) +
                 f' | {np.mean(accs):.3f} |')
  lines += ['', f'wall time: {minutes:.1f} min']
  table = '\n'.join(lines)
  print(table)
  with open(os.path.join(args.outdir, 'transfer.md'), 'w') as f:
    f.write(table + '\n')
  with open(os.path.join(args.outdir, 'transfer.json'), 'w') as f:
    json.dump({'results': results, 'pretrain': pretrained, 'minutes': minutes}, f)
  write_plot(results, os.path.join(args.outdir, 'transfer.png'), title)


if __name__ == '__main__':
  host_tuning.apply()
  main()
