"""Our train step against timm's PyTorch ViT on the same model, batch, resolution and optimizer.

    python -m benchmarks.compare_timm --model=ViT-S_16 --batch_size=16 --image_size=224 --rounds=5

Our step runs in this process, timm's in a worker process (benchmarks/timm_worker.py), and they
alternate in rounds: --steps_per_round steps of ours, then as many of timm's, so that a machine
shared with other jobs loads both alike while neither library's threads or allocator touch the
other's steps. A round's figure is the median of its steps: the first step after a switch pays
for the other process having used the memory (ours ran 1.5x slower on it here), which a
training run never does. The ratio is the median over rounds of timm's time / ours (> 1: we are
faster). Each step is a full AdamW training step with gradient clipping at global norm 1 on a
fixed random batch.

Ours runs with vit_jax's CPU defaults (vit_jax/cli/host_tuning.py); timm runs with torch's own,
that is without the huge-page malloc setting unless --timm_huge_pages.

Needs torch and timm, which are not dependencies of vit_jax (see benchmarks/README.md):
    pip install torch==2.13.0
    pip install --no-deps timm torchvision
    pip install huggingface_hub safetensors pyyaml pillow
"""
import json
import os
import statistics
import subprocess
import sys
import time

from absl import app, flags

from vit_jax import benchmark
from vit_jax.cli import host_tuning, startup

benchmark.define_flags()
FLAGS = flags.FLAGS  # --model, --batch_size, --image_size, ... from vit_jax.benchmark
_ROUNDS = flags.DEFINE_integer('rounds', 5, 'Timed rounds (ours, then timm) after one warm-up.')
_STEPS_PER_ROUND = flags.DEFINE_integer('steps_per_round', 3,
                                        'Steps of each in a round; the round keeps their median.')
_TIMM_HUGE_PAGES = flags.DEFINE_bool(
    'timm_huge_pages', False, 'Give the timm worker the huge-page malloc setting that vit_jax '
    'uses on CPU (default: torch as installed, without it).')


def worker_environ(huge_pages: bool) -> dict:
  """This process' environment for the timm worker, with or without the huge-page tunable."""
  env = dict(os.environ)
  tunables = [t for t in env.pop('GLIBC_TUNABLES', '').split(':')
              if t and not t.startswith('glibc.malloc.hugetlb')]
  if huge_pages:
    tunables.append(host_tuning.HUGE_PAGES_TUNABLE)
  if tunables:
    env['GLIBC_TUNABLES'] = ':'.join(tunables)
  return env


class TimmWorker:
  """The worker process; `step()` and `matmul_times(n)` run there and return its timings."""

  def __init__(self, model: str, batch_size: int, image_size: int, num_classes: int,
               huge_pages: bool):
    command = [sys.executable, '-m', 'benchmarks.timm_worker', f'--model={model}',
               f'--batch_size={batch_size}', f'--image_size={image_size}',
               f'--num_classes={num_classes}']
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    self.process = subprocess.Popen(command, cwd=repo_root, env=worker_environ(huge_pages),
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    self.loss = None

  def _ask(self, command: str) -> dict:
    self.process.stdin.write(command + '\n')
    self.process.stdin.flush()
    line = self.process.stdout.readline()
    if not line:
      raise RuntimeError(f'timm worker exited (code {self.process.wait()}) on {command!r}; '
                         'its error is printed above')
    answer = json.loads(line)
    if 'error' in answer:
      raise RuntimeError(answer['error'])
    return answer

  def step(self) -> float:
    answer = self._ask('step')
    self.loss = answer['loss']
    return answer['seconds']

  def matmul_times(self, n: int) -> list:
    return self._ask(f'matmul {n}')['seconds']

  def close(self) -> None:
    self.process.communicate('quit\n', timeout=60)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  batch_size, image_size = FLAGS.batch_size, FLAGS.image_size
  config = benchmark.benchmark_config(FLAGS.model, batch_size, image_size, FLAGS.num_classes)
  theirs = TimmWorker(FLAGS.model, batch_size, image_size, FLAGS.num_classes,
                      _TIMM_HUGE_PAGES.value)
  ours = benchmark.TrainStep(config)
  ours()
  theirs.step()
  n = FLAGS.peak_matmul_size
  jax_peak_times, torch_peak_times = benchmark.matmul_times(n), theirs.matmul_times(n)
  our_times, their_times = [], []
  for round_index in range(_ROUNDS.value):
    our_times.append(statistics.median(benchmark.time_calls(ours, _STEPS_PER_ROUND.value)))
    their_times.append(statistics.median(
        [theirs.step() for _ in range(_STEPS_PER_ROUND.value)]))
    print(f'round {round_index}: ours {our_times[-1]:.3f} s, timm {their_times[-1]:.3f} s',
          flush=True)
  jax_peak_times += benchmark.matmul_times(n)
  torch_peak_times += theirs.matmul_times(n)
  theirs.close()

  flops = ours.model_flops_per_step()
  ratios = [t / o for o, t in zip(our_times, their_times)]
  jax_peak = benchmark.matmul_peak(n, jax_peak_times)
  torch_peak = benchmark.matmul_peak(n, torch_peak_times)
  result = {'model': FLAGS.model, 'batch_size': batch_size, 'image_size': image_size,
            'rounds': _ROUNDS.value, 'steps_per_round': _STEPS_PER_ROUND.value,
            'compile_time_s': round(ours.compile_time, 2)}
  for name, times, peak in (('ours', our_times, jax_peak), ('timm', their_times, torch_peak)):
    step_time = statistics.median(times)
    result.update({
        f'{name}_step_time_s': round(step_time, 3),
        f'{name}_step_times_s': [round(t, 3) for t in times],
        f'{name}_images_per_sec': round(batch_size / step_time, 3),
        f'{name}_gflops_per_sec': round(flops / step_time / 1e9, 2),
        f'{name}_matmul_peak_gflops_per_sec': round(peak / 1e9, 2),
        f'{name}_mfu': round(flops / step_time / peak, 4),
    })
  result.update({'timm_over_ours': round(statistics.median(ratios), 3),
                 'timm_over_ours_per_round': [round(r, 3) for r in ratios],
                 'ours_loss': float(ours.metrics['train_loss']), 'timm_loss': theirs.loss,
                 'timm_huge_pages': _TIMM_HUGE_PAGES.value,
                 'xla_flags': os.environ.get('XLA_FLAGS', ''),
                 'glibc_tunables': os.environ.get('GLIBC_TUNABLES', ''),
                 'date': time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})
  for key, value in result.items():
    print(f'{key:>32}: {value}')
  print(json.dumps(result))


if __name__ == '__main__':
  startup.begin()
  app.run(main)
