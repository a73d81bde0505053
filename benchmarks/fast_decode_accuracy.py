r"""Does inception_crop's fast_decode change what a model learns? The same pretraining with it
off and on, seed by seed.

    pip install -e '.[demo]'    # the font packages the glyphs are drawn from
    python -m benchmarks.fast_decode_accuracy --outdir=/tmp/fast_decode [--seeds=3 --steps=1500]

Renders the transfer demo's glyphs (`benchmarks/glyphs.py`: 54 characters from ~90 typefaces,
every tenth font held out for 'val') at 64 px as JPEGs (quality 90), and pretrains the
quickstart ViT on them at 16 px with
'decode|inception_crop(16, area_min=0.5, fast_decode=F)|value_range(-1, 1)|onehot(54)'
(batch 128, the transfer demo's pretraining recipe otherwise). With fast_decode every crop of
32 px or more (all of them here: at least half of a 64 px image) decodes at 1/2 or 1/4
scale. A seed sets the initialisation, the data order and the crop windows, so the two arms of
a seed differ only in how crops are decoded. Prints the held-out-font accuracy of each run, the
mean and standard deviation of each arm, and whether the difference of the means is within the
spread over seeds; writes DIR/fast_decode.json.
"""
import argparse
import json
import os
import time

from benchmarks import seed_spread
from vit_jax.cli import startup

ARMS = {'exact decode': False, 'fast_decode': True}
IMAGE_PIXELS, TRAIN_PIXELS = 64, 16


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--outdir', required=True,
                      help='where the glyph records (kept and reused) and the runs go')
  parser.add_argument('--steps', type=int, default=1500, help='pretraining steps of 128 glyphs')
  parser.add_argument('--per_font', type=int, default=4, help='images per character and font')
  parser.add_argument('--seeds', type=int, default=3, help='runs per arm')
  args = parser.parse_args()
  startup.begin()
  from benchmarks import few_digits, glyphs  # pylint: disable=g-import-not-at-top
  from vit_jax.train import trainer  # pylint: disable=g-import-not-at-top
  glyph_dir = os.path.join(args.outdir, 'glyphs')
  data = glyphs.write_glyph_records(glyph_dir, args.per_font, sizes=(IMAGE_PIXELS,),
                                    jpeg_quality=90)
  classes = data['num_classes']
  print(f'== {data["splits"]["train"]} glyph JPEGs of {IMAGE_PIXELS} px from '
        f'{len(data["fonts"])} fonts; {args.steps} steps per run', flush=True)
  results = {arm: [] for arm in ARMS}
  for seed in range(args.seeds):
    for arm, fast in ARMS.items():
      config = few_digits.pretrain_config(few_digits.VIT, glyph_dir, 'train', args.steps, classes)
      config.seed = seed
      config.pp_train = (f'decode|inception_crop({TRAIN_PIXELS}, area_min=0.5, '
                         f'fast_decode={fast})|value_range(-1, 1)|onehot({classes})')
      start = time.time()
      metrics = trainer.train_and_evaluate(
          config, os.path.join(args.outdir, f'{arm.replace(" ", "_")}_seed{seed}'))
      results[arm].append(float(metrics['val_accuracy']))
      print(f'== {arm}, seed {seed}: val_accuracy {results[arm][-1]:.4f} '
            f'({(time.time() - start) / 60:.1f} min)', flush=True)
  lines = ['| arm | ' + ' | '.join(f'seed {s}' for s in range(args.seeds)) + ' | mean ± std |',
           '|---|' + '---|' * (args.seeds + 1)]
  for arm, accs in results.items():
    mean, spread = seed_spread.mean_and_spread(accs)
    lines.append(f'| {arm} | ' + ' | '.join(f'{a:.3f}' for a in accs) +
                 f' | {mean:.3f} ± {spread:.3f} |')
  (exact, s0), (fast, s1) = (seed_spread.mean_and_spread(v) for v in results.values())
  within = abs(fast - exact) <= max(s0, s1)
  lines += ['', f'difference of the means {100 * (fast - exact):+.1f} points: '
            f'{"within" if within else "OUTSIDE"} the spread over seeds (largest standard '
            f'deviation {100 * max(s0, s1):.1f} points)']
  print('\n'.join(lines))
  with open(os.path.join(args.outdir, 'fast_decode.json'), 'w') as f:
    json.dump({'results': results, 'args': vars(args)}, f, indent=1)


if __name__ == '__main__':
  main()
