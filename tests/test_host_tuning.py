import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax.cli import host_tuning
from vit_jax.models import registry

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
THP_AVAILABLE = host_tuning.transparent_huge_pages_mode() in ('always', 'madvise')


def test_xla_cpu_flags_are_appended_unless_the_user_set_them():
  assert host_tuning.with_xla_cpu_flags('') == '--xla_cpu_experimental_ynn_fusion_type='
  assert (host_tuning.with_xla_cpu_flags('--xla_force_host_platform_device_count=8') ==
          '--xla_force_host_platform_device_count=8 --xla_cpu_experimental_ynn_fusion_type=')
  mine = '--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_DOT'
  assert host_tuning.with_xla_cpu_flags(mine) == mine


def test_huge_page_tunable_is_added_once_and_can_be_turned_off(monkeypatch):
  monkeypatch.setattr(host_tuning, 'transparent_huge_pages_mode', lambda: 'madvise')
  monkeypatch.setattr(sys, 'platform', 'linux')
  env = host_tuning.with_huge_pages({'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2', 'A': '1'})
  assert env == {'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1', 'A': '1'}
  assert host_tuning.with_huge_pages(env) is None  # already there: no second re-exec
  assert host_tuning.with_huge_pages({'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=0'}) is None
  assert host_tuning.with_huge_pages({'VIT_JAX_HOST_TUNING': '0'}) is None
  assert host_tuning.with_huge_pages({})['GLIBC_TUNABLES'] == 'glibc.malloc.hugetlb=1'
  monkeypatch.setattr(host_tuning, 'transparent_huge_pages_mode', lambda: 'never')
  assert host_tuning.with_huge_pages({}) is None


def test_transparent_huge_pages_mode_reads_the_bracketed_mode(tmp_path):
  path = tmp_path / 'enabled'
  path.write_text('always [madvise] never\n')
  assert host_tuning.transparent_huge_pages_mode(str(path)) == 'madvise'
  path.write_text('[always] madvise never\n')
  assert host_tuning.transparent_huge_pages_mode(str(path)) == 'always'
  assert host_tuning.transparent_huge_pages_mode(str(tmp_path / 'missing')) is None


def _run_apply(env):
  code = ('import os, sys; from vit_jax.cli import host_tuning; print("started", flush=True); '
          'host_tuning.apply(); '
          'print(os.environ.get("GLIBC_TUNABLES", ""), "|", os.environ.get("XLA_FLAGS", ""))')
  out = subprocess.run([sys.executable, '-c', code], cwd=REPO_ROOT, env=env, check=True,
                       capture_output=True, text=True).stdout.splitlines()
  return out.count('started'), out[-1]


def test_apply_reexecutes_once_with_the_tunable_and_sets_the_xla_flag():
  env = {k: v for k, v in os.environ.items() if k not in ('GLIBC_TUNABLES', 'XLA_FLAGS')}
  starts, settings = _run_apply(env)
  tunables, xla_flags = (s.strip() for s in settings.split('|'))
  assert xla_flags == '--xla_cpu_experimental_ynn_fusion_type='
  if THP_AVAILABLE:
    assert (starts, tunables) == (2, 'glibc.malloc.hugetlb=1')
  else:
    assert (starts, tunables) == (1, '')

  starts, settings = _run_apply(env | {'VIT_JAX_HOST_TUNING': '0'})
  assert (starts, settings.strip()) == (1, '|')


@pytest.mark.parametrize('dtype, tolerance', [('float32', 2e-5), ('bfloat16', 2e-2)])
def test_tuned_xla_cpu_path_gives_the_plain_paths_logits(dtype, tolerance):
  model = registry.get_model('testing', num_classes=10, dtype=dtype)
  images = jax.random.normal(jax.random.key(0), (4, 16, 16, 3))
  params = nn.unbox(model.init(jax.random.key(1), images, train=False)['params'])
  head = params['head']['kernel']  # zero-initialized: give the logits something to show
  params['head']['kernel'] = jax.random.normal(jax.random.key(2), head.shape, head.dtype)

  def logits(params, images):
    return model.apply({'params': params}, images, train=False).astype(jnp.float32)
  lowered = jax.jit(logits).lower(params, images)
  plain_program, tuned_program = lowered.compile(), lowered.compile(host_tuning.XLA_CPU_OPTIONS)
  # The two really are different programs: YNNPACK fusions only in jax's default one.
  assert '__ynn_fusion' in plain_program.as_text()
  assert '__ynn_fusion' not in tuned_program.as_text()
  plain, tuned = plain_program(params, images), tuned_program(params, images)
  scale = float(jnp.max(jnp.abs(plain)))
  assert scale > 0.1
  np.testing.assert_allclose(tuned, plain, atol=tolerance * scale)
