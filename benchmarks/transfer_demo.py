r"""The ViT paper's transfer claim in miniature, on 2 CPU cores in about 15 minutes.

    pip install -e '.[demo]'    # matplotlib and the font packages
    python benchmarks/transfer_demo.py --outdir=/tmp/transfer_demo

1. Render characters from ~90 real typefaces (`benchmarks/glyphs.py`: 54 classes, ~36,000
   images at 8-16 px, held-out fonts for 'val') and write them as records with make_records.
2. Pretrain the quickstart ViT on them at 16 px (softmax over the characters).
3. Fine-tune it at 24 px (position embeddings interpolated from the 4x4 to the 6x6 patch grid,
   new head) on 10 handwritten digits per class, against the same model trained from scratch on
   the same 100 digits with the same recipe. Every seed draws its own 100 digits.
Both arms are scored on the 297 held-out digits. The table (mean and standard deviation over
seeds, and whether the gain exceeds the spread) goes to the console and DIR/transfer.md, the plot
to DIR/transfer.png, the numbers to DIR/transfer.json.
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

ARMS = ('from scratch', 'pretrained on glyphs')


def verdict(scratch: list, transferred: list) -> str:
  """The gain of the means, said against the larger of the two arms' standard deviations."""
  (m0, s0), (m1, s1) = (seed_spread.mean_and_spread(scratch),
                        seed_spread.mean_and_spread(transferred))
  gain, spread = m1 - m0, max(s0, s1)
  if min(len(scratch), len(transferred)) < 2:
    return (f'gain {100 * gain:+.1f} points; one seed per arm: no spread to compare it with '
            '(--seeds=3 measures one)')
  relation = 'larger' if abs(gain) > spread else 'NOT larger'
  return (f'gain {100 * gain:+.1f} points; {relation} than the spread over seeds (largest '
          f'standard deviation {100 * spread:.1f} points)')


def write_plot(results: dict, path: str, title: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(5, 3.5))
  for i, arm in enumerate(ARMS):
    mean, spread = seed_spread.mean_and_spread(results[arm])
    ax.bar(i, 100 * mean, yerr=100 * spread, capsize=6, color=['#999999', '#3366cc'][i])
    ax.scatter([i] * len(results[arm]), [100 * a for a in results[arm]], color='black', zorder=3)
  ax.set_xticks(range(len(ARMS)), ARMS)
  ax.set_ylabel('held-out digit accuracy (%)')
  ax.set_title(title, fontsize=9)
  ax.set_ylim(0, 100)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--outdir', required=True, help='where the records, runs, table and plot '
                      'go (rendered glyphs are kept there and reused)')
  parser.add_argument('--pretrain_steps', type=int, default=1500,
                      help='pretraining steps of 128 glyphs')
  parser.add_argument('--finetune_steps', type=int, default=200,
                      help='fine-tuning steps on the 100 digits, each arm')
  parser.add_argument('--per_font', type=int, default=8, help='images per character and font')
  parser.add_argument('--seeds', type=int, default=3, help='digit draws (and fine-tuning seeds) '
                      'per arm; the verdict needs 2 or more')
  args = parser.parse_args()
  startup.begin()
  # The plot comes after ~15 minutes of training: fail now if matplotlib is missing.
  import matplotlib  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  from benchmarks import few_digits, glyphs  # pylint: disable=g-import-not-at-top
  from vit_jax.train import trainer  # pylint: disable=g-import-not-at-top
  os.makedirs(args.outdir, exist_ok=True)
  start = time.time()

  glyph_dir = os.path.join(args.outdir, 'glyphs')
  data = glyphs.write_glyph_records(glyph_dir, args.per_font)
  print(f'== {data["splits"]["train"]} glyph images from {len(data["fonts"])} fonts; '
        f'pretraining for {args.pretrain_steps} steps', flush=True)
  pretrain_dir = os.path.join(args.outdir, 'pretrain')
  pretrained = trainer.train_and_evaluate(
      few_digits.pretrain_config(few_digits.VIT, glyph_dir, 'train', args.pretrain_steps,
                                 data['num_classes']), pretrain_dir)

  results = {arm: [] for arm in ARMS}
  for seed in range(args.seeds):
    for arm, init_from in zip(ARMS, ('', pretrain_dir)):
      print(f'== {arm}, seed {seed}', flush=True)
      results[arm].append(few_digits.finetune(few_digits.VIT, args.outdir, seed,
                                              args.finetune_steps, init_from))

  minutes = (time.time() - start) / 60
  title = (f'{few_digits.PER_CLASS} labelled digits per class, {few_digits.IMAGE_SIZE}px, '
           f'{args.finetune_steps} steps;\npretrained {args.pretrain_steps} steps on '
           f'{data["splits"]["train"]} glyphs from {len(data["fonts"])} fonts')
  lines = [f'# Transfer demo: {title.replace(chr(10), " ")}', '',
           f'pretraining val_accuracy on held-out fonts: {pretrained["val_accuracy"]:.3f}', '',
           '| arm | ' + ' | '.join(f'seed {s}' for s in range(args.seeds)) + ' | mean ± std |',
           '|---|' + '---|' * (args.seeds + 1)]
  for arm, accs in results.items():
    mean, spread = seed_spread.mean_and_spread(accs)
    lines.append(f'| {arm} | ' + ' | '.join(f'{a:.3f}' for a in accs) +
                 f' | {mean:.3f} ± {spread:.3f} |')
  lines += ['', verdict(*results.values()), '', f'wall time: {minutes:.1f} min']
  table = '\n'.join(lines)
  print(table)
  with open(os.path.join(args.outdir, 'transfer.md'), 'w') as f:
    f.write(table + '\n')
  with open(os.path.join(args.outdir, 'transfer.json'), 'w') as f:
    json.dump({'results': results, 'pretrain': pretrained, 'minutes': minutes,
               'args': vars(args)}, f, indent=1)
  write_plot(results, os.path.join(args.outdir, 'transfer.png'), title)


if __name__ == '__main__':
  main()
