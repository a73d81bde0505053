r"""The ViT paper's central figure in miniature: as pretraining data grows, does the ResNet (BiT)
or the ViT transfer better? On 2 CPU cores in about 45 minutes.

    pip install -e '.[demo]'    # matplotlib and the font packages
    python benchmarks/data_scaling.py --outdir=/tmp/data_scaling

The quickstart ViT (ViT-Ti_4, 4 layers) and BiT-R14x1 are each pretrained on three growing
subsets of the rendered glyphs (`benchmarks/glyphs.py`: 2,000, 8,000 and all ~36,000 images,
for 400, 800 and 1,600 steps of 128, so compute grows with data as in the paper's runs), then
fine-tuned on 10 handwritten digits per class at 24 px (`benchmarks/few_digits.py`), over seeds.
Transfer accuracy is plotted against pretraining set size and against pretraining compute
(3 x the forward FLOPs of every image seen, counted on the model's jaxpr; the paper's Figure 5
axis) in DIR/scaling.png; the table goes to the console and DIR/scaling.md, the numbers to
DIR/scaling.json.
"""
import argparse
import json
import os
import sys
import time

# Run as a script from a checkout: the repository root holds `benchmarks`.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Light imports only up here (--help answers at once); training's come in main().
from benchmarks import seed_spread  # noqa: E402  pylint: disable=g-import-not-at-top
from vit_jax.cli import startup  # noqa: E402  pylint: disable=g-import-not-at-top

BATCH_SIZE = 128


def training_flops_per_image(config) -> int:
  """3 x the forward pass's matmul and convolution FLOPs at the config's image size."""
  from vit_jax.scale import flops  # pylint: disable=g-import-not-at-top
  from vit_jax.train import trainer  # pylint: disable=g-import-not-at-top
  training = trainer.build(config)  # abstract state only: nothing is initialised
  return 3 * flops.forward_flops_per_image(training.model, training.abstract_state.params,
                                               config.image_size)


def write_plot(rows: list, path: str, title: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  from matplotlib import ticker  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 2, figsize=(9, 3.8), sharey=True)
  names = list(dict.fromkeys(r['model'] for r in rows))  # in the order they were trained
  for i, (name, colour) in enumerate(zip(names, ('#3366cc', '#cc6633'))):
    mine = [r for r in rows if r['model'] == name]
    means = [100 * r['mean'] for r in mine]
    spreads = [100 * r['std'] for r in mine]
    nudge = 1.03 ** (i - 0.5)  # the same set sizes: side by side, error bars apart
    for ax, key, shift in zip(axes, ('images', 'pretrain_tflops'), (nudge, 1.)):
      ax.errorbar([r[key] * shift for r in mine], means, yerr=spreads, marker='o', capsize=4,
                  color=colour, label=name)
  axes[0].set_xlabel('pretraining images (glyphs)')
  axes[1].set_xlabel('pretraining compute (TFLOP)')
  axes[0].set_ylabel('digit accuracy, 10 labels/class (%)')
  for ax, key, form in zip(axes, ('images', 'pretrain_tflops'), ('{:,.0f}', '{:.3g}')):
    ax.set_xscale('log')
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    ax.set_xticks(sorted({r[key] for r in rows}))
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda x, _, form=form: form.format(x)))
    ax.grid(alpha=0.3)
  axes[0].legend()
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--outdir', required=True, help='where the records, runs, table and plot '
                      'go (rendered glyphs are kept there and reused)')
  parser.add_argument('--subsets', default='2000,8000', help='smaller pretraining sets; the '
                      'largest is the whole train split')
  parser.add_argument('--steps', default='400,800,1600', help='pretraining steps per set')
  parser.add_argument('--finetune_steps', type=int, default=100,
                      help='fine-tuning steps on the 100 digits, per model and seed')
  parser.add_argument('--per_font', type=int, default=8, help='images per character and font')
  parser.add_argument('--seeds', type=int, default=3,
                      help='digit draws (and fine-tuning seeds) per model and set')
  args = parser.parse_args()
  startup.begin()
  # The plot comes after ~45 minutes of training: fail now if matplotlib is missing.
  import matplotlib  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  from benchmarks import few_digits, glyphs  # pylint: disable=g-import-not-at-top
  from vit_jax.train import trainer  # pylint: disable=g-import-not-at-top
  subsets = tuple(int(n) for n in args.subsets.split(','))
  steps = [int(n) for n in args.steps.split(',')]
  if len(steps) != len(subsets) + 1:
    raise ValueError(f'--steps={args.steps} needs one value per pretraining set '
                     f'({len(subsets) + 1}: --subsets and the whole train split)')
  os.makedirs(args.outdir, exist_ok=True)
  start = time.time()

  glyph_dir = os.path.join(args.outdir, 'glyphs')
  data = glyphs.write_glyph_records(glyph_dir, args.per_font, subsets)
  splits = [(f'train_{n}', n) for n in subsets] + [('train', data['splits']['train'])]
  rows = []
  for model in (few_digits.VIT, few_digits.RESNET):
    flops_per_image = None  # the same for every set: pretraining is always at 16 px
    for (split, images), num_steps in zip(splits, steps):
      config = few_digits.pretrain_config(model, glyph_dir, split, num_steps, data['num_classes'],
                                          BATCH_SIZE)
      flops_per_image = flops_per_image or training_flops_per_image(config)
      print(f'== {model["name"]}: pretraining on {images} glyphs for {num_steps} steps',
            flush=True)
      began = time.time()
      workdir = os.path.join(args.outdir, 'pretrain', f'{model["name"]}_{split}')
      pretrained = trainer.train_and_evaluate(config, workdir)
      seconds = time.time() - began
      accs = [few_digits.finetune(model, args.outdir, seed, args.finetune_steps, workdir)
              for seed in range(args.seeds)]
      mean, spread = seed_spread.mean_and_spread(accs)
      flops = flops_per_image * num_steps * BATCH_SIZE
      rows.append(dict(model=model['name'], images=images, steps=num_steps,
                       pretrain_tflops=flops / 1e12, pretrain_minutes=seconds / 60,
                       glyph_val_accuracy=pretrained['val_accuracy'], accuracies=accs,
                       mean=mean, std=spread))
      print(f'{model["name"]} {images} glyphs: digits {mean:.3f} ± {spread:.3f}', flush=True)

  minutes = (time.time() - start) / 60
  title = (f'pretrained on growing glyph sets (batch {BATCH_SIZE}), fine-tuned '
           f'{args.finetune_steps} steps on {few_digits.PER_CLASS} digits per class at '
           f'{few_digits.IMAGE_SIZE}px; mean ± std over {args.seeds} seeds')
  lines = [f'# Data scaling: {title}', '',
           '| model | pretraining images | steps | compute (TFLOP) | pretraining min | '
           'glyph val acc (held-out fonts) | digits: ' +
           ' / '.join(f'seed {s}' for s in range(args.seeds)) + ' | digits mean ± std |',
           '|---|---|---|---|---|---|---|---|']
  for r in rows:
    lines.append(f'| {r["model"]} | {r["images"]} | {r["steps"]} | {r["pretrain_tflops"]:.1f} '
                 f'| {r["pretrain_minutes"]:.1f} | {r["glyph_val_accuracy"]:.3f} | ' +
                 ' / '.join(f'{a:.3f}' for a in r['accuracies']) +
                 f' | {r["mean"]:.3f} ± {r["std"]:.3f} |')
  lines += ['', f'wall time: {minutes:.1f} min']
  table = '\n'.join(lines)
  print(table)
  with open(os.path.join(args.outdir, 'scaling.md'), 'w') as f:
    f.write(table + '\n')
  with open(os.path.join(args.outdir, 'scaling.json'), 'w') as f:
    json.dump({'rows': rows, 'minutes': minutes, 'args': vars(args)}, f, indent=1)
  write_plot(rows, os.path.join(args.outdir, 'scaling.png'), title)


if __name__ == '__main__':
  main()
