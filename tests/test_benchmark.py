import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from vit_jax import benchmark
from vit_jax.cli import host_tuning
from vit_jax.scale import flops
from vit_jax.models import registry

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _vit_forward_flops(image_size, num_classes, patch_size, hidden_size, num_layers, mlp_dim,
                       num_heads):
  """Matmul FLOPs of one image through a class-token ViT, from the architecture alone."""
  del num_heads  # heads split the width; they do not change the count
  patches = (image_size // patch_size)**2
  tokens = patches + 1
  embed = 2 * patches * patch_size**2 * 3 * hidden_size
  qkv_and_out = 2 * tokens * hidden_size * 4 * hidden_size
  attention = 2 * 2 * tokens**2 * hidden_size  # q.k logits and weights.v
  mlp = 2 * 2 * tokens * hidden_size * mlp_dim
  head = 2 * hidden_size * num_classes
  return embed + num_layers * (qkv_and_out + attention + mlp) + head


@pytest.mark.slow
def test_benchmark_command_reports_json_with_exact_model_flops():
  command = [sys.executable, '-m', 'vit_jax.benchmark', '--model=testing', '--batch_size=8',
             '--image_size=16', '--steps=2', '--num_classes=10', '--peak_matmul_size=256']
  out = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, check=True)
  result = json.loads(out.stdout.strip().splitlines()[-1])

  assert result['model_flops_per_image'] == 3 * _vit_forward_flops(16, 10, **registry.TESTING)
  assert result['devices'] == 8  # conftest's host devices reach the child: the batch is sharded
  assert result['step_time_s'] > 0  # how fast is the machine's business, not the test's
  # MFU from the independent FLOP count and the measured rate, not from the JSON's own FLOPs;
  # a CPU runs this small a model far below its matmul peak, but above nothing. The JSON's
  # figures carry 6 significant digits, so the two agree to 1e-4 whatever the machine's speed
  # (an MFU rounded to 4 decimals, 0.0012 on a loaded machine, was 4% off).
  expected_mfu = (3 * _vit_forward_flops(16, 10, **registry.TESTING) * result['images_per_sec']
                  / (result['peak_gflops_per_sec'] * 1e9))
  assert result['mfu'] == pytest.approx(expected_mfu, rel=1e-4)
  assert 0 < result['mfu'] < 1
  assert result['peak_source'] == 'measured f32 matmul'  # CPU: no spec-sheet bf16 peak
  assert result['xla_flops_per_step'] > 0  # unscanned: XLA's count is a cross-check
  assert result['compile_time_s'] > 0 and result['peak_memory_mb'] > 0
  assert '--xla_force_host_platform_device_count=8' in result['xla_flags']
  # vit_jax's CPU defaults reach the program (vit_jax/cli/host_tuning.py).
  assert '--xla_cpu_experimental_ynn_fusion_type=' in result['xla_flags'].split()
  if host_tuning.transparent_huge_pages_mode() in ('always', 'madvise'):
    assert 'glibc.malloc.hugetlb=1' in result['glibc_tunables']


def test_rates_come_from_the_median_step():
  """The figures a run reports, from step times the test chooses: the median step (not the
  mean, which one slow step moves), its images/sec and FLOP/s, MFU against the peak given."""
  rates = benchmark.rate_figures(batch_size=8, model_flops_per_image=1e9,
                                 step_times=[2.0, 0.1, 0.25], peak_flops=400e9)
  assert (rates['step_time_s'], rates['step_time_min_s'], rates['step_time_max_s']) == (
      0.25, 0.1, 2.0)
  assert rates['images_per_sec'] == 32  # 8 images in 0.25 s
  assert rates['achieved_gflops_per_sec'] == 32  # 32 images of 1 GFLOP each per second
  assert (rates['peak_gflops_per_sec'], rates['mfu']) == (400, 0.08)


def test_compile_only_reports_scanned_depth_without_running():
  config = benchmark.benchmark_config('testing', 8, 16, 10, scan_layers=True, num_layers=3)
  result = benchmark.run(config, steps=2, compile_only=True)
  assert (result['num_layers'], result['scan_layers']) == (3, True)
  assert result['model_flops_per_image'] == 3 * _vit_forward_flops(
      16, 10, **(registry.TESTING | {'num_layers': 3}))
  assert result['compile_time_s'] > 0 and result['compiled_memory_mb'] > 0
  assert 'step_time_s' not in result
  assert 'xla_flops_per_step' not in result  # XLA counts a scanned body once: not reported


def test_matmul_flops_counts_scanned_layers_and_convolutions():
  def layers(x, kernels):
    x = jax.lax.conv_general_dilated(x, jnp.ones((4, 4, 3, 8)), (4, 4), 'VALID',
                                     dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    x = x.reshape(2, 16, 8)

    def body(h, kernel):
      return jnp.einsum('btd,de->bte', h, kernel), None
    return jax.lax.scan(body, x, kernels)[0]

  jaxpr = jax.make_jaxpr(layers)(jnp.ones((2, 16, 16, 3)), jnp.ones((5, 8, 8)))
  conv = 2 * (2 * 4 * 4 * 8) * (4 * 4 * 3)
  scanned = 5 * 2 * (2 * 16 * 8) * 8
  assert flops.matmul_flops(jaxpr) == conv + scanned
