r"""ViT-22B's block in miniature: the quickstart ViT on the offline digits, CPU, 3 seeds per arm.

    python -m benchmarks.vit22b_block stability --outdir=/tmp/vit22b_block
    python -m benchmarks.vit22b_block variants --outdir=/tmp/vit22b_block

`stability`: the quickstart's recipe at a learning rate HIGH_LR_FACTOR x its own, with and
without `qk_norm`: the plain model's attention logits grow and its training falls apart, the
one with LayerNorm on queries and keys trains (Dehghani et al. 2023, section 2; the small-scale
version of their divergence). `variants`: the quickstart's own recipe with the standard block,
`parallel_block` and `use_bias=False`, which should reach the same held-out accuracy.

Every run is the trainer's own (`trainer.train_and_evaluate`, the quickstart config with the
arm's model options); it checkpoints every PROBE_EVERY steps, and each checkpoint's largest
attention logit is read on the 128 first held-out digits (the attention layers sow it when
asked for their intermediates). A run whose loss turns NaN stops (the trainer refuses to go on)
and counts as diverged at that step. A finished run leaves its result in its workdir, and a
later invocation with the same outdir reuses it (the same arm, seed and learning rate). Prints
a table (mean and sample standard deviation over the seeds) and writes OUTDIR/<experiment>.json
and .md.
"""
import json
import os
import shutil
import time

from absl import app, flags, logging
import jax
import numpy as np

from benchmarks import seed_spread
from configs import quickstart
from vit_jax.cli import startup
from vit_jax.data import pipeline
from vit_jax.train import trainer
from vit_jax.weights import train_state

_OUTDIR = flags.DEFINE_string('outdir', '/tmp/vit22b_block', 'Where runs and results go.')
_SEEDS = flags.DEFINE_integer('seeds', 3, 'Seeds per arm.')

HIGH_LR_FACTOR = 10  # stability: x the quickstart's base_lr (1e-3)
PROBE_EVERY = 50  # steps between checkpoints whose attention logits are read
EXPERIMENTS = {
    'stability': {'plain': {}, 'qk_norm': {'qk_norm': True}},
    'variants': {'standard': {}, 'parallel_block': {'parallel_block': True},
                 'use_bias=False': {'use_bias': False}},
}


def config_for(experiment: str, options: dict, seed: int):
  c = quickstart.get_config()
  c.seed = seed
  c.checkpoint_every = PROBE_EVERY
  c.keep_checkpoints = c.total_steps // PROBE_EVERY
  c.eval_every = c.total_steps
  if experiment == 'stability':
    c.schedule.base_lr *= HIGH_LR_FACTOR
  c.model.update(options)
  return c


def max_attention_logits(config, workdir: str) -> dict:
  """{checkpointed step: the largest attention logit of any layer on the first held-out
  batch}, from the model's own attention layers (`max_attention_logit` intermediates)."""
  training = trainer.build(config)
  _, batches = pipeline.eval_batches(config, training.mesh, config.data.eval_split)
  images = next(batches)['image']
  apply = jax.jit(lambda params: training.model.apply(
      {'params': params}, images, mutable='intermediates')[1]['intermediates'])
  manager = train_state.make_manager(workdir, max_to_keep=config.keep_checkpoints)
  logits = {}
  for step in manager.all_steps():
    params = train_state.restore_state(manager, training.abstract_state, step).params
    sown = jax.tree_util.tree_flatten_with_path(apply(params))[0]
    logits[int(step)] = max(float(value) for path, value in sown
                            if 'max_attention_logit' in jax.tree_util.keystr(path))
  manager.close()
  return logits


def run(experiment: str, arm: str, options: dict, seed: int, outdir: str) -> dict:
  config = config_for(experiment, options, seed)
  workdir = os.path.join(outdir, experiment, f'{arm}_seed{seed}')
  done = os.path.join(workdir, 'result.json')
  if os.path.exists(done):  # an earlier invocation finished this run with the same recipe
    with open(done) as f:
      result = json.load(f)
    if (result['base_lr'], result['options']) == (config.schedule.base_lr, options):
      print(f'{experiment} {arm} seed {seed}: reused {done}', flush=True)
      return result
  shutil.rmtree(workdir, ignore_errors=True)
  start, diverged = time.time(), None
  try:
    trainer.train_and_evaluate(config, workdir)
  except FloatingPointError as e:  # a NaN loss or gradient: the trainer stops the run
    logging.warning('%s seed %d: %s', arm, seed, e)
    diverged = True
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    lines = [json.loads(line) for line in f]
  train = [m for m in lines if 'train_loss' in m]
  evals = [m for m in lines if 'val_accuracy' in m]
  logits = max_attention_logits(config, workdir)
  shutil.rmtree(os.path.join(workdir, 'checkpoints'), ignore_errors=True)  # metrics stay
  result = {'arm': arm, 'seed': seed, 'options': options, 'base_lr': config.schedule.base_lr,
            'diverged_after_step': train[-1]['step'] if diverged else None,
            'final_train_loss': None if diverged else train[-1]['train_loss'],
            'lowest_train_loss': min(m['train_loss'] for m in train),
            'val_accuracy': evals[-1]['val_accuracy'] if evals and not diverged else None,
            'max_attention_logit': max(logits.values()), 'attention_logits': logits,
            'train_loss': {m['step']: m['train_loss'] for m in train},
            'wall_s': round(time.time() - start, 1)}
  with open(done, 'w') as f:
    json.dump(result, f, indent=1)
  print(f'{experiment} {arm} seed {seed}: ' + ', '.join(
      f'{k} {v:.4g}' if isinstance(v, float) else f'{k} {v}' for k, v in result.items()
      if k in ('diverged_after_step', 'final_train_loss', 'val_accuracy', 'max_attention_logit',
               'wall_s')), flush=True)
  return result


def _figure(values) -> str:
  values = [v for v in values if v is not None]
  if not values:
    return 'n/a'
  mean, spread = seed_spread.mean_and_spread(values)
  return f'{mean:.3f} ± {spread:.3f}'


def table(experiment: str, results: list) -> list:
  lines = ['| arm | diverged | final train loss | held-out accuracy | largest attention logit '
           '| per seed (accuracy, largest logit) |', '|---|---|---|---|---|---|']
  for arm in EXPERIMENTS[experiment]:
    runs = [r for r in results if r['arm'] == arm]
    diverged = [r['diverged_after_step'] for r in runs if r['diverged_after_step']]
    per_seed = '; '.join(
        (f'diverged after step {r["diverged_after_step"]}' if r['diverged_after_step'] else
         f'{r["val_accuracy"]:.3f}') + f', {r["max_attention_logit"]:.1f}' for r in runs)
    lines.append(f'| {arm} | {len(diverged)} of {len(runs)} | '
                 f'{_figure(r["final_train_loss"] for r in runs)} | '
                 f'{_figure(r["val_accuracy"] for r in runs)} | '
                 f'{_figure(r["max_attention_logit"] for r in runs)} | {per_seed} |')
  return lines


def main(argv):
  if len(argv) != 2 or argv[1] not in EXPERIMENTS:
    raise app.UsageError(f'name one experiment: {sorted(EXPERIMENTS)}')
  experiment, outdir = argv[1], _OUTDIR.value
  start = time.time()
  results = [run(experiment, arm, options, seed, outdir)
             for seed in range(_SEEDS.value) for arm, options in EXPERIMENTS[experiment].items()]
  lines = table(experiment, results)
  recipe = quickstart.get_config()
  header = (f'{experiment}: configs/quickstart.py ({recipe.total_steps} steps of '
            f'{recipe.batch_size}), base_lr {results[0]["base_lr"]:g}, {_SEEDS.value} seeds, '
            f'mean ± sample std; {time.time() - start:.0f} s wall')
  print('\n'.join([header, ''] + lines))
  os.makedirs(outdir, exist_ok=True)
  with open(os.path.join(outdir, f'{experiment}.json'), 'w') as f:
    json.dump(results, f, indent=1)
  with open(os.path.join(outdir, f'{experiment}.md'), 'w') as f:
    f.write('\n'.join([header, ''] + lines) + '\n')


if __name__ == '__main__':
  startup.begin()
  app.run(main)
