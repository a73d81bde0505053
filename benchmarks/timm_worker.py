"""timm's ViT training step in its own process, stepped on command by benchmarks.compare_timm.

    python -m benchmarks.timm_worker --model=ViT-S_16 --batch_size=16 --image_size=224

Reads one command per line on stdin and answers each with one JSON line on stdout:
`step` -> {"seconds": ..., "loss": ...}; `matmul N` -> {"seconds": [...]} for five (N, N) @ (N, N)
f32 torch matmuls; `quit` ends. A process of its own keeps torch's OpenMP threads, allocator and
environment apart from JAX's, so neither slows the other down between alternating steps.
"""
import argparse
import json
import sys
import time
import types

from vit_jax import benchmark
from vit_jax.models import registry

_TIMM_SIZES = {'Ti': 'tiny', 'S': 'small', 'B': 'base', 'L': 'large', 'H': 'huge'}


def import_timm():
  """timm, importable with CPU torch: the registry's torchvision registers CUDA-only meta
  kernels from this module at import; timm needs none of them."""
  sys.modules.setdefault('torchvision._meta_registrations',
                         types.ModuleType('torchvision._meta_registrations'))
  import timm  # pylint: disable=g-import-not-at-top
  return timm


def timm_model_name(model_name: str) -> str:
  """vit_jax's 'ViT-S_16' -> timm's 'vit_small_patch16_224'."""
  patch_size = registry.model_config(model_name)['patch_size']  # also checks the name
  size = model_name.split('-')[-1].split('_')[0]
  if size not in _TIMM_SIZES:
    raise ValueError(f'--model={model_name!r} has no timm counterpart; sizes: {_TIMM_SIZES}')
  return f'vit_{_TIMM_SIZES[size]}_patch{patch_size}_224'


class TimmTrainStep:
  """timm's ViT with torch AdamW (weight decay 1e-4) and clipping; calling it runs one step."""

  def __init__(self, model_name: str, batch_size: int, image_size: int, num_classes: int):
    import torch  # pylint: disable=g-import-not-at-top
    self.torch = torch
    self.model = import_timm().create_model(timm_model_name(model_name), pretrained=False,
                                            img_size=image_size, num_classes=num_classes)
    self.model.train()
    self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-3, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(0)
    self.images = torch.rand(batch_size, 3, image_size, image_size, generator=generator) * 2 - 1
    self.labels = torch.arange(batch_size) % num_classes
    self.loss = None

  def __call__(self):
    self.optimizer.zero_grad(set_to_none=True)
    loss = self.torch.nn.functional.cross_entropy(self.model(self.images), self.labels)
    loss.backward()
    self.torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
    self.optimizer.step()
    self.loss = loss.detach().item()


def torch_matmul_times(n: int, repeats: int = 5) -> list:
  """Seconds per (n, n) @ (n, n) float32 torch matmul, `repeats` runs (as JAX's are timed)."""
  import torch  # pylint: disable=g-import-not-at-top
  a, b = torch.randn(n, n), torch.randn(n, n)
  torch.mm(a, b)
  return benchmark.time_calls(lambda: torch.mm(a, b), repeats)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--model', default='ViT-S_16')
  parser.add_argument('--batch_size', type=int, default=16)
  parser.add_argument('--image_size', type=int, default=224)
  parser.add_argument('--num_classes', type=int, default=1000)
  args = parser.parse_args()
  step = TimmTrainStep(args.model, args.batch_size, args.image_size, args.num_classes)
  for line in sys.stdin:
    command = line.split()
    if command == ['step']:
      start = time.perf_counter()
      step()
      answer = {'seconds': time.perf_counter() - start, 'loss': step.loss}
    elif len(command) == 2 and command[0] == 'matmul':
      answer = {'seconds': torch_matmul_times(int(command[1]))}
    elif command == ['quit']:
      return
    else:
      answer = {'error': f'unknown command {line.strip()!r}'}
    print(json.dumps(answer), flush=True)


if __name__ == '__main__':
  main()
