"""Side-by-side step times of the train step compiled with different XLA CPU options.

    python -m benchmarks.xla_cpu_options --model=ViT-S_16 --batch_size=16 --rounds=4

Every variant is compiled in this one process (per-compilation `compiler_options`), then the
variants take one step each in turn, round after round. On a machine shared with other jobs the
load changes by the minute, so separate processes measured minutes apart differ by 2x for
identical programs; stepping in turn gives each variant the same load. 'baseline' runs twice:
the spread between its two copies is the noise floor. Prints per-variant medians and the median
over rounds of baseline time / variant time (> 1: faster), then one JSON line.
"""
import json
import statistics

from absl import app, flags

from vit_jax import benchmark
from vit_jax.cli import host_tuning, startup

benchmark.define_flags()
FLAGS = flags.FLAGS  # --model, --batch_size, --image_size, ... from vit_jax.benchmark
_ROUNDS = flags.DEFINE_integer('rounds', 4, 'Timed rounds (one step of every variant each).')
_VARIANTS = flags.DEFINE_list('variants', None, 'Subset of VARIANTS to run (default: all).')

# XLA DebugOptions, as compile(compiler_options=...) takes them: enum lists by full value name.
_YNN_ALL = 'LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_ELTWISE,LIBRARY_FUSION_TYPE_REDUCE'
VARIANTS = {
    'baseline': {},  # jax's own XLA CPU defaults
    'baseline_again': {},
    'eigen_dots': host_tuning.XLA_CPU_OPTIONS,  # what vit_jax's programs use on CPU
    'ynn_dot_eltwise_reduce': {'xla_cpu_experimental_ynn_fusion_type': _YNN_ALL},
    'fast_math': {'xla_cpu_enable_fast_math': True},
    'ynn_dot_eltwise_reduce+fast_math': {'xla_cpu_experimental_ynn_fusion_type': _YNN_ALL,
                                         'xla_cpu_enable_fast_math': True},
}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  names = _VARIANTS.value or list(VARIANTS)
  unknown = sorted(set(names) - set(VARIANTS))
  if unknown:
    raise app.UsageError(f'unknown --variants {unknown}; known: {sorted(VARIANTS)}')
  config = benchmark.benchmark_config(FLAGS.model, FLAGS.batch_size, FLAGS.image_size, 1000)
  steps = {}
  for name in names:
    steps[name] = benchmark.TrainStep(config, compiler_options=VARIANTS[name])
    steps[name]()  # warm-up
    print(f'{name}: compiled in {steps[name].compile_time:.1f} s', flush=True)
  times = {name: [] for name in names}
  for round_index in range(_ROUNDS.value):
    for name in names:
      times[name] += benchmark.time_calls(steps[name], 1)
    print(f'round {round_index}:', {n: round(t[-1], 3) for n, t in times.items()}, flush=True)
  flops = steps[names[0]].model_flops_per_step()
  result = {}
  for name, ts in times.items():
    median = statistics.median(ts)
    result[name] = {
        'step_time_s': round(median, 3),
        'gflops_per_sec': round(flops / median / 1e9, 1),
        'speedup_vs_first': round(statistics.median(
            [first / t for first, t in zip(times[names[0]], ts)]), 3),
        'step_times_s': [round(t, 3) for t in ts]}
    print(f'{name:>34}: {result[name]}')
  print(json.dumps(result))


if __name__ == '__main__':
  startup.begin(xla_flags=False)  # huge pages for all; 'baseline' keeps jax's XLA defaults
  app.run(main)
