"""FSDP keeps the batch sharded, and `python -m vit_jax.aot` reports what compiling for a TPU
slice shows: memory, fit, collectives, FLOPs. TPU compiles need libtpu (the [tpu] extra, which
CI installs). The command itself runs in tests/test_launch.py, as the launcher's fit check."""
import importlib.util
import re

import jax
import pytest

from configs import quickstart
from vit_jax import accelerators, aot
from vit_jax.train import trainer

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec('libtpu') is None,
                                  reason='needs libtpu: pip install -e ".[tpu]"')


def _small_config(batch_size, fsdp=1, **model):
  config = quickstart.get_config()
  config.model = dict(name='testing', **model)
  config.batch_size = batch_size
  config.mesh = dict(data=-1, fsdp=fsdp, model=1)
  return config


def _all_gather_shapes(hlo: str) -> list:
  """Result shapes (tuples of ints) of every all-gather in an HLO module's text."""
  shapes = []
  for result in re.findall(r'= (\S+?)(?:\{[^}]*\})? all-gather(?:-start)?\(', hlo):
    for dims in re.findall(r'\[([\d,]*)\]', result):
      shapes.append(tuple(int(d) for d in dims.split(',') if d))
  return shapes


def _compiled_hlo(config, devices=None) -> str:
  training = trainer.build(config, devices)
  step = trainer.jit_train_step(
      trainer.make_train_step(config, training, jax.random.key(0)), training)
  return step.lower(training.abstract_state,
                    trainer.abstract_batch(config, training.mesh)).compile().as_text()


@pytest.mark.parametrize('model', [{}, dict(scan_layers=True, remat_policy='full',
                                            dtype='bfloat16')], ids=['looped', 'scanned'])
def test_fsdp_gathers_parameters_never_the_batch(model):
  batch = 40  # no model dimension is 40 (or its per-device share 5)
  hlo = _compiled_hlo(_small_config(batch, fsdp=8, **model))
  shapes = _all_gather_shapes(hlo)
  assert shapes, 'fsdp=8 must gather the sharded parameters'
  assert any(16 in s for s in shapes)  # a parameter of hidden size 16, whole again
  batch_gathers = [s for s in shapes if s and s[0] == batch]
  assert not batch_gathers, f'all-gathers of the global batch: {batch_gathers}'


def test_targets_by_accelerator_type():
  expected = {'v2-8': ('v2:2x2', 8), 'v3-32': ('v3:4x4', 32), 'v4-8': ('v4:2x2x1', 4),
              'v4-64': ('v4:2x4x4', 32), 'v5p-128': ('v5p:4x4x4', 64),
              'v5litepod-1': ('v5e:1x1', 1), 'v5litepod-16': ('v5e:4x4', 16),
              'v6e-256': ('v6e:16x16', 256), 'h100-8': ('1x1x8', 8), 'h100-16': ('1x2x8', 16)}
  for name, (topology, devices) in expected.items():
    target = accelerators.get_target(name)
    assert (target.topology, target.num_devices) == (topology, devices), name
  assert accelerators.get_target('v4-64').device_memory_gib == 30.75
  for bad, message in (('v4-6', 'v4-8, v4-16'), ('v5litepod-3', 'counts chips'),
                       ('tpu-8', 'not a known accelerator type'), ('h100-12', 'multiple of 8')):
    with pytest.raises(ValueError, match=message):
      accelerators.get_target(bad)


def test_collectives_count_loop_bodies_by_trip_count():
  hlo = '\n'.join([
      '%cond (p: (s32[], f32[4])) -> pred[] {',
      '  %c = s32[]{:T(128)} constant(12)',
      '  ROOT %lt = pred[] compare(%gte, %c), direction=LT',
      '}',
      '%body (p: (s32[], f32[4])) -> (s32[], f32[4]) {',
      '  %ag = bf16[8,384]{1,0} all-gather(%x), dimensions={0}',
      '}',
      'ENTRY %main (a: f32[4]) -> f32[4] {',
      '  %w = (s32[], f32[4]) while(%t), condition=%cond, body=%body',
      '  %ar = f32[1000]{0} all-reduce(%y), to_apply=%add',
      '  %cp = (f32[256], f32[256], u32[]) collective-permute-start(%z)',
      '}'])
  assert aot.collectives(hlo) == {
      'all-gather': {'count': 12, 'bytes': 12 * 8 * 384 * 2},
      'all-reduce': {'count': 1, 'bytes': 4000},
      'collective-permute': {'count': 1, 'bytes': 1024}}


def test_find_batch_doubles_then_bisects(monkeypatch):
  compiled = []

  def check(config, target, devices, batch_size):
    compiled.append(batch_size)
    return {'fits': batch_size <= 200, 'required_gib': batch_size / 100}
  monkeypatch.setattr(aot, 'check', check)
  config = _small_config(16)
  largest, report = aot.find_batch(config, accelerators.get_target('v5litepod-8'),
                                   devices=jax.devices())
  assert largest == 200 and report['fits']
  assert compiled[:5] == [16, 32, 64, 128, 256]  # doubling, then bisection in steps of 8
  assert all(b % 8 == 0 for b in compiled)


def test_suggest_fix_tries_each_fix_alone_then_together(monkeypatch):
  tried = []

  def check(config, target, devices):
    tried.append((config.model.get('remat_policy', 'none'), config.mesh.fsdp,
                  config.get('accum_steps', 1)))
    return {'fits': tried[-1][0] == 'full' and tried[-1][2] >= 4, 'required_gib': 1.}
  monkeypatch.setattr(aot, 'check', check)
  fix, _ = aot.suggest_fix(_small_config(64), accelerators.get_target('v5litepod-8'),
                           devices=None)
  assert fix == {'model.remat_policy': 'full', 'mesh.data': 1, 'mesh.fsdp': -1, 'accum_steps': 4}
  assert tried == [('full', 1, 1), ('none', -1, 1), ('none', 1, 2), ('none', 1, 4),
                   ('none', 1, 8), ('full', -1, 1), ('full', -1, 2), ('full', -1, 4)]


@needs_libtpu
def test_tpu_slice_memory_fit_and_fsdp():
  target = accelerators.get_target('v5litepod-8')
  devices = target.devices()
  report = aot.check(_small_config(64), target, devices)
  assert report['fits'] and report['devices'] == 8
  assert 0 < report['state_gib'] < report['required_gib'] < 1
  assert report['flops_per_step'] > 0 and report['ideal_step_s'] > 0
  assert 'all-reduce' in report['collectives']  # data parallel: gradients are summed

  huge_head = _small_config(8)
  huge_head.num_classes = 100_000_000  # head + Adam moments: 19 GB per chip, 15.75 available
  report = aot.check(huge_head, target, devices)
  assert not report['fits'] and report['required_gib'] > 15.75
  assert 'exceeds available HBM' in report['xla_message']

  fsdp = _small_config(40, fsdp=8, scan_layers=True, dtype='bfloat16')
  shapes = _all_gather_shapes(_compiled_hlo(fsdp, devices))
  assert shapes and not [s for s in shapes if s and s[0] == 40]
