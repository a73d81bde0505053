"""FSDP keeps the batch sharded, and `python -m vit_jax.aot` reports what compiling for a TPU
slice shows: memory, fit, collectives, FLOPs. TPU compiles need libtpu (the [tpu] extra, which
CI installs). The command itself runs in tests/test_launch.py, as the launcher's fit check."""
import dataclasses
import json
import re

import jax
import pytest

from configs import quickstart
from tests import common
from vit_jax import aot
from vit_jax.cli import errors
from vit_jax.scale import accelerators
from vit_jax.train import trainer



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


def test_async_collectives_of_several_operands_count_all_results():
  hlo = '\n'.join([
      'ENTRY %main (a: f32[4]) -> f32[4] {',
      '  %ars = (f32[1000]{0}, f32[3000]{0}) all-reduce-start(%a, %b), to_apply=%add',
      '  %ags = ((f32[8]{0}, f32[4]{0}), (f32[64]{0}, f32[32]{0})) all-gather-start(%c, %d)',
      '  %ag1 = (bf16[8]{0}, bf16[64]{0}) all-gather-start(%e), dimensions={0}',
      '}'])
  assert aot.collectives(hlo) == {
      'all-reduce': {'count': 1, 'bytes': 16_000},  # both results, not the larger one
      'all-gather': {'count': 2, 'bytes': 64 * 4 + 32 * 4 + 64 * 2}}  # results, not operands


def test_unreadable_trip_counts_are_reported_not_taken_as_one():
  hlo = '\n'.join([
      '%cond (p: (s32[], f32[4])) -> pred[] {',
      '  ROOT %lt = pred[] compare(%gte, %bound), direction=LT',  # the bound is not a literal
      '}',
      '%body (p: (s32[], f32[4])) -> (s32[], f32[4]) {',
      '  %ar = f32[256]{0} all-reduce(%x), to_apply=%add',
      '}',
      'ENTRY %main (a: f32[4]) -> f32[4] {',
      '  %w = (s32[], f32[4]) while(%t), condition=%cond, body=%body',
      '}'])
  figures = aot.collectives(hlo)
  assert figures == {'all-reduce': {'count': 1, 'bytes': 1024,
                                    'in_loops_of_unknown_trip_count': 1}}
  report = {'model': 'm', 'topology': 't', 'devices': 1, 'mesh': {}, 'batch_size': 1,
            'per_device_batch': 1, 'state_gib': 0, 'temp_gib': 0, 'required_gib': 0,
            'device_memory_gib': 1, 'fits': True, 'headroom_gib': 1, 'compile_s': 0,
            'flops_per_step': 0, 'ideal_step_s': 0, 'collectives': figures}
  assert ('all-reduce: at least 1 per step, 0.0 MiB (1 of them in loops whose trip count the '
          'HLO does not show, counted once)') in aot.format_report(report)


def test_exact_state_and_gradient_bytes_of_a_data_parallel_step():
  """Parameters + Adam moments per device (fsdp=8), against the shards a real init places;
  gradient all-reduce bytes (data parallel): every float32 gradient once, plus the loss."""
  training = trainer.build(_small_config(64, fsdp=8))
  state = training.init_fn(jax.random.key(0))
  placed = sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(state))
  assert placed < sum(x.nbytes for x in jax.tree.leaves(state))  # really sharded
  state_bytes = aot._state_bytes_per_device  # pylint: disable=protected-access
  assert state_bytes(training.abstract_state) == placed
  config = _small_config(64)
  num_params = sum(x.size for x in jax.tree.leaves(trainer.build(config).abstract_state.params))
  assert aot.collectives(_compiled_hlo(config)) == {
      'all-reduce': {'count': 1, 'bytes': 4 * num_params + 4}}


def test_find_batch_compiles_each_batch_once_and_looks_above_its_answer(monkeypatch, capsys):
  """Memory that is not monotonic in the batch (as XLA's choices make it): 208 does not fit,
  216 does; bisection alone would answer 200."""
  compiled = []

  def check(config, target, devices, batch_size, progress=False):
    compiled.append(batch_size)
    required = 1.9 if batch_size == 216 else batch_size / 100
    return {'fits': required <= 2.0, 'required_gib': required}
  monkeypatch.setattr(aot, 'check', check)
  config = _small_config(16)
  known = {16: {'fits': True, 'required_gib': 0.16}}  # the report vit_jax.aot made first
  largest, report, notes = aot.find_batch(
      config, accelerators.get_target('v5litepod-8'), devices=jax.devices(), known=known)
  assert (largest, report['required_gib']) == (216, 1.9)
  assert compiled[:4] == [32, 64, 128, 256]  # doubling from the known 16, then bisection
  assert sorted(compiled) == sorted(set(compiled)) and 16 not in compiled  # each once
  assert all(b % 8 == 0 for b in compiled) and {208, 216, 224, 232} <= set(compiled)
  assert notes == ['batch 216 needs 1.90 GiB, less than batch 208 (2.08)']
  lines = capsys.readouterr().out.splitlines()
  assert len(lines) == len(compiled)
  assert lines[0].startswith('  batch 32: 0.32 of 15.75 GiB, fits (compile 1, ')
  assert all('ETA' in line for line in lines[4:])  # once bisection bounds what is left


def test_find_batch_on_real_compiles(capsys):
  """Compiled for this machine's 8 CPU devices (one image each at least) against a device
  memory set 20% above batch 8's need: 8 fits, 16 and 24 do not (each needs ~40% more)."""
  config = _small_config(8)
  target = accelerators.get_target('v5litepod-8')
  first = aot.check(config, target, jax.devices())
  target = dataclasses.replace(target, device_memory_gib=first['required_gib'] * 1.2)
  largest, report, notes = aot.find_batch(config, target, jax.devices(), known={8: first})
  assert (largest, report) == (8, first) and notes == []
  lines = capsys.readouterr().out.splitlines()
  assert [line.split(':')[0] for line in lines] == ['  batch 16', '  batch 24']
  assert all('no fit' in line for line in lines)


def test_suggest_fix_tries_each_fix_alone_then_together(monkeypatch):
  tried = []

  def check(config, target, devices, progress=False):
    tried.append((config.model.get('remat_policy', 'none'), config.mesh.fsdp,
                  config.get('accum_steps', 1)))
    return {'fits': tried[-1][0] == 'full' and tried[-1][2] >= 4, 'required_gib': 1.}
  monkeypatch.setattr(aot, 'check', check)
  fix, _ = aot.suggest_fix(_small_config(64), accelerators.get_target('v5litepod-8'),
                           devices=None)
  assert fix == {'model.remat_policy': 'full', 'mesh.data': 1, 'mesh.fsdp': -1, 'accum_steps': 4}
  assert tried == [('full', 1, 1), ('none', -1, 1), ('none', 1, 2), ('none', 1, 4),
                   ('none', 1, 8), ('full', -1, 1), ('full', -1, 2), ('full', -1, 4)]


@common.needs_libtpu
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
  hlo = _compiled_hlo(fsdp, devices)
  shapes = _all_gather_shapes(hlo)
  assert shapes and not [s for s in shapes if s and s[0] == 40]
  # Each block gathers its weights whole: XLA does not split its matmuls into windowed loops
  # over weight shards (12 such loops in the blocks before; they held extra activations).
  windowed = re.findall(r'^  %while\S* = .*windowed_dot_general.*$', hlo, re.MULTILINE)
  assert not [loop for loop in windowed if 'encoderblock' in loop]


@common.needs_libtpu
def test_two_slices_compile_with_data_parallelism_across_them():
  target = accelerators.get_target('v5litepod-16', num_slices=2)
  config = _small_config(64)  # mesh.dcn_data=1: --num_slices sets it, as the launcher does
  assert aot.with_slices(config, 1) is config
  for given in (-1, 2):
    config.mesh.dcn_data = given
    assert aot.with_slices(config, 2).mesh.dcn_data == given
  config.mesh.dcn_data = 3
  with pytest.raises(errors.UserError, match=r'dcn_data=3 but --num_slices=2: .*\(-1 or 2\)'):
    aot.with_slices(config, 2)
  config.mesh.dcn_data = 1
  report = aot.check(aot.with_slices(config, 2), target)
  assert (report['devices'], report['slices'], report['mesh']) == (
      32, 2, {'data': 32, 'fsdp': 1, 'model': 1})
  assert report['fits'] and report['per_device_batch'] == 2
  assert 'x 2 slices (32 devices' in aot.format_report(report)


def test_compiles_say_what_they_compile_and_how_long_the_same_shape_took(monkeypatch, tmp_path,
                                                                          capsys):
  """As `python -m vit_jax.aot` compiles (progress=True): compiled for this machine's 8 CPU
  devices; the times are kept in the user's cache (here a fresh one)."""
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path))
  target = accelerators.get_target('v5litepod-8')
  config = _small_config(8)
  aot.check(config, target, jax.devices(), progress=True)
  assert capsys.readouterr().err.splitlines() == [
      'compiling the train step of testing (global batch 8) for v5litepod-8, 8 devices (no '
      'earlier compile of it here to tell how long; big models take minutes)']
  with open(tmp_path / 'vit_jax' / 'compile_times.json') as f:
    (shape, seconds), = json.load(f).items()
  mesh = trainer.build(config).mesh
  assert json.loads(shape) == aot.compile_shape(config, target, mesh, 8)
  assert aot.expected_compile_s(json.loads(shape)) == (
      seconds, 'an earlier compile of the same shape here took that')
  config.batch_size = 16  # the same model and target, another batch
  assert aot.expected_compile_s(aot.compile_shape(config, target, mesh, 16)) == (
      seconds, 'the last compile of testing for v5litepod-8 with other settings here took that')
