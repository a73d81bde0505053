"""Our train step against timm's PyTorch ViT on the same model, batch, resolution and optimizer.

    python -m benchmarks.compare_timm --model=ViT-S_16 --batch_size=16 --image_size=224 --rounds=5

Both run in this process and alternate step by step (ours, timm, ours, timm, ...), so that a
machine shared with other jobs loads both alike; the ratio is the median over rounds of
timm's step time / ours (> 1: we are faster). Each step is a full AdamW training step with
gradient clipping at global norm 1 on a fixed random batch.

Needs torch and timm, which are not dependencies of vit_jax (see benchmarks/README.md):
    pip install torch==2.13.0
    pip install --no-deps timm torchvision
    pip install huggingface_hub safetensors pyyaml pillow
"""
import json
import statistics
import sys
import time
import types

from absl import app, flags

from vit_jax import benchmark
from vit_jax.models import registry

benchmark.define_flags()
FLAGS = flags.FLAGS  # --model, --batch_size, --image_size, ... from vit_jax.benchmark
_ROUNDS = flags.DEFINE_integer('rounds', 5, 'Timed (ours, timm) step pairs after one warm-up.')

_TIMM_SIZES = {'Ti': 'tiny', 'S': 'small', 'B': 'base', 'L': 'large', 'H': 'huge'}


def import_timm():
  """timm, importable with CPU torch: the registry's torchvision registers CUDA-only meta
  kernels from this module at import; timm needs none of them."""
  sys.modules.setdefault('torchvision._meta_registrations',
                         types.ModuleType('torchvision._meta_registrations'))
  import timm  # pylint: disable=g-import-not-at-top
  return timm


class TimmTrainStep:
  """timm's ViT with torch AdamW (weight decay 1e-4) and clipping; calling it runs one step."""

  def __init__(self, model_name: str, batch_size: int, image_size: int, num_classes: int):
    import torch  # pylint: disable=g-import-not-at-top
    self.torch = torch
    patch_size = registry.model_config(model_name)['patch_size']  # also checks the name
    size = model_name.split('-')[-1].split('_')[0]
    if size not in _TIMM_SIZES:
      raise ValueError(f'--model={model_name!r} has no timm counterpart; sizes: {_TIMM_SIZES}')
    timm_name = f'vit_{_TIMM_SIZES[size]}_patch{patch_size}_224'
    self.model = import_timm().create_model(timm_name, pretrained=False, img_size=image_size,
                                            num_classes=num_classes)
    self.model.train()
    self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-3, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(0)
    self.images = torch.rand(batch_size, 3, image_size, image_size, generator=generator) * 2 - 1
    self.labels = torch.arange(batch_size) % num_classes

  def __call__(self):
    self.optimizer.zero_grad(set_to_none=True)
    loss = self.torch.nn.functional.cross_entropy(self.model(self.images), self.labels)
    loss.backward()
    self.torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
    self.optimizer.step()
    self.loss = loss.detach().item()


def torch_matmul_times(n: int, repeats: int = 3) -> list:
  import torch  # pylint: disable=g-import-not-at-top
  a, b = torch.randn(n, n), torch.randn(n, n)
  torch.mm(a, b)
  return benchmark.time_calls(lambda: torch.mm(a, b), repeats)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  batch_size, image_size = FLAGS.batch_size, FLAGS.image_size
  config = benchmark.benchmark_config(FLAGS.model, batch_size, image_size, FLAGS.num_classes)
  ours = benchmark.TrainStep(config)
  theirs = TimmTrainStep(FLAGS.model, batch_size, image_size, FLAGS.num_classes)
  ours()
  theirs()
  n = FLAGS.peak_matmul_size
  jax_peak_times, torch_peak_times = benchmark.matmul_times(n), torch_matmul_times(n)
  our_times, their_times = [], []
  for round_index in range(_ROUNDS.value):
    our_times += benchmark.time_calls(ours, 1)
    their_times += benchmark.time_calls(theirs, 1)
    print(f'round {round_index}: ours {our_times[-1]:.3f} s, timm {their_times[-1]:.3f} s',
          flush=True)
  jax_peak_times += benchmark.matmul_times(n)
  torch_peak_times += torch_matmul_times(n)

  flops = ours.model_flops_per_step()
  ratios = [t / o for o, t in zip(our_times, their_times)]
  jax_peak = 2 * n**3 / statistics.median(jax_peak_times)
  torch_peak = 2 * n**3 / statistics.median(torch_peak_times)
  result = {'model': FLAGS.model, 'batch_size': batch_size, 'image_size': image_size,
            'rounds': _ROUNDS.value, 'compile_time_s': round(ours.compile_time, 2)}
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
                 'date': time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})
  for key, value in result.items():
    print(f'{key:>32}: {value}')
  print(json.dumps(result))


if __name__ == '__main__':
  app.run(main)
