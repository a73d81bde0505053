"""Meshes (data / FSDP / tensor parallel) agree; FSDP and TP really shard; accumulation; bf16;
which rows of a batch each host of a TPU slice (or of several slices) reads."""
import os

import jax
import numpy as np
import pytest

from tests import common, mock_tpu
from vit_jax import checkpoint
from vit_jax.scale import sharding
from vit_jax.train import steps, trainer


def _batches(n=16, size=16, classes=10):
  """Two random batches, alternating over four steps."""
  rng = np.random.RandomState(0)
  two = [{'image': rng.uniform(-1, 1, (n, size, size, 3)).astype(np.float32),
          'labels': np.eye(classes, dtype=np.float32)[rng.randint(0, classes, n)]}
         for _ in range(2)]
  return two * 2


def _train(config, mesh_config, batches, accum_steps=1):
  """Runs train_step over `batches` on a mesh; returns (losses, final state)."""
  config.mesh = mesh_config
  training = trainer.build(config)
  mesh = training.mesh
  config.accum_steps = accum_steps
  step = trainer.jit_train_step(trainer.make_train_step(config, training, jax.random.key(1)),
                                training)
  state = training.init_fn(jax.random.key(0))
  losses = []
  for batch in batches:
    state, metrics = step(state, jax.device_put(batch, sharding.batch_sharding(mesh)))
    losses.append(float(metrics['train_loss']))
  return np.array(losses), state


def _assert_params_close(params, reference_params, rtol):
  """All leaves but the attention key bias, whose gradient is zero in exact arithmetic (softmax
  ignores a shift shared by all keys): Adam turns its rounding noise into steps of size lr."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  for (path, a), b in zip(flat, jax.tree.leaves(reference_params)):
    if not jax.tree_util.keystr(path).endswith("['key']['bias']"):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=1e-6,
                                 err_msg=jax.tree_util.keystr(path))


def _mlp_kernel(tree):
  return tree['Transformer']['encoderblock_0']['MlpBlock_3']['Dense_0']['kernel']


DATA_PARALLEL = dict(data=8, fsdp=1, model=1)
MIXED = dict(data=2, fsdp=2, model=2)


def _config():
  from configs import quickstart  # pylint: disable=g-import-not-at-top
  config = quickstart.get_config()
  config.model = dict(name='testing')
  config.schedule = dict(base_lr=3e-3, warmup_steps=0, decay_type='constant')
  return config


@pytest.fixture(scope='module')
def reference():
  """(losses, state) of pure data parallelism in float32, without accumulation."""
  return _train(_config(), DATA_PARALLEL, _batches())


def test_data_fsdp_and_tensor_parallel_meshes_agree_and_shard(reference):
  runs = {'data': reference}
  runs.update({name: _train(_config(), mesh, _batches()) for name, mesh in (
      ('fsdp', dict(data=1, fsdp=8, model=1)),
      ('mixed', MIXED))})
  reference_losses, reference_state = reference
  assert reference_losses[2] < reference_losses[0]  # the same batch, one update pair later
  for name in ('fsdp', 'mixed'):
    losses, state = runs[name]
    np.testing.assert_allclose(losses, reference_losses, rtol=1e-4, err_msg=name)
    _assert_params_close(state.params, reference_state.params, rtol=1e-4)

  # The testing model's MLP kernel is (embed=16, mlp=32); adam's moments follow the params.
  def shard_shapes(state):
    moments = state.opt_state[1][0]  # clip_by_global_norm, then adamw's ScaleByAdamState
    return {_mlp_kernel(tree).addressable_shards[0].data.shape
            for tree in (state.params, moments.mu, moments.nu)}
  assert shard_shapes(runs['data'][1]) == {(16, 32)}  # replicated
  assert shard_shapes(runs['fsdp'][1]) == {(2, 32)}  # embed over fsdp=8
  assert shard_shapes(runs['mixed'][1]) == {(8, 16)}  # embed over fsdp=2, mlp over model=2


def test_scanned_remat_model_trains_on_a_mixed_mesh():
  config = _config()
  config.model = dict(name='testing', scan_layers=True, remat_policy='full')
  losses, state = _train(config, MIXED, _batches())
  assert losses[2] < losses[0]
  kernel = state.params['Transformer']['encoderblock']['MlpBlock_3']['Dense_0']['kernel']
  assert kernel.shape == (2, 16, 32)  # (layers, embed, mlp)
  assert kernel.addressable_shards[0].data.shape == (2, 8, 16)  # fsdp=2, model=2


def test_dimensions_the_mesh_does_not_divide_stay_replicated():
  config = _config()
  config.model = dict(name='testing', num_heads=1, hidden_size=12)  # 12 over fsdp=8 does not go
  config.mesh = dict(data=1, fsdp=8, model=1)
  abstract_state = trainer.build(config).abstract_state
  for kernel in (_mlp_kernel(abstract_state.params), _mlp_kernel(abstract_state.opt_state[1][0].mu),
                 abstract_state.params['head']['kernel']):
    assert kernel.sharding.spec[0] is None


def test_gradient_accumulation_equals_the_large_batch_step(reference):
  losses, state = reference
  accum_losses, accum_state = _train(_config(), DATA_PARALLEL, _batches(), accum_steps=2)
  np.testing.assert_allclose(accum_losses, losses, rtol=1e-5)
  _assert_params_close(accum_state.params, state.params, rtol=1e-4)
  with pytest.raises(ValueError, match='accum_steps=3'):
    steps._microbatches(_batches()[0], 3)  # pylint: disable=protected-access


def test_bfloat16_compute_keeps_float32_params_and_tracks_float32_loss(reference):
  losses, _ = reference
  config = _config()
  config.model = dict(name='testing', dtype='bfloat16')
  bf16_losses, state = _train(config, DATA_PARALLEL, _batches())
  assert {x.dtype for x in jax.tree.leaves(state.params)} == {np.dtype('float32')}
  np.testing.assert_allclose(bf16_losses, losses, rtol=2e-2)
  assert not np.array_equal(bf16_losses, losses)  # the option really changed the compute


def test_incomplete_step_directories_are_never_restored(reference, tmp_path):
  _, state = reference
  manager = checkpoint.make_manager(str(tmp_path))
  checkpoint.save_state(manager, 1, state)
  manager.wait_until_finished()
  directory = tmp_path / 'checkpoints'
  # What a kill during a save leaves (Orbax's temporary name), and a step without metadata.
  for partial in ('7.orbax-checkpoint-tmp-1700000000', '5'):
    os.makedirs(directory / partial / 'default')
    (directory / partial / 'default' / 'junk').write_text('half written')
  manager = checkpoint.make_manager(str(tmp_path))
  assert checkpoint.latest_complete_step(manager) == 1
  restored = checkpoint.restore_state(manager, jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state))
  np.testing.assert_array_equal(np.asarray(_mlp_kernel(restored.params)),
                                np.asarray(_mlp_kernel(state.params)))


def test_config_sharding_rules_come_before_the_defaults():
  config = _config()
  config.mesh = dict(data=1, fsdp=8, model=1)
  config.sharding_rules = [('embed', None)]  # this run: no FSDP
  kernel = _mlp_kernel(trainer.build(config).abstract_state.params)
  assert tuple(kernel.sharding.spec) == (None, 'model')  # (embed, mlp): embed no longer fsdp
  config.sharding_rules = [('embed', 'fsdp_typo')]
  with pytest.raises(ValueError, match="fsdp_typo.*not mesh axes"):
    trainer.build(config)


# Rows per host on TPU slices, listed as jax.devices() lists them there (tests/mock_tpu.py).
SLICES = ('v4-32', 'v4-64', 'v4-128', 'v4-256', 'v5p-128', 'v5litepod-16', 'v6e-64')
SLICE_MESHES = {'data': dict(data=-1), 'fsdp': dict(data=1, fsdp=-1),
                'data+model': dict(data=-1, model=4)}


def _rows_by_jax(mesh, global_batch: int, process: int) -> list:
  """The rows JAX's own index map gives the devices of `process` (batch_sharding)."""
  rows = set()
  for device, index in sharding.batch_sharding(mesh).devices_indices_map((global_batch,)).items():
    if device.process_index == process:
      rows.update(range(global_batch)[index[0]])
  return sorted(rows)


@pytest.mark.parametrize('slice_name', SLICES)
def test_every_tpu_host_reads_the_rows_its_devices_hold(slice_name):
  devices = mock_tpu.slice_devices(slice_name)
  processes = sorted({d.process_index for d in devices})
  global_batch = 2 * len(devices)
  for mesh_name, mesh_config in SLICE_MESHES.items():
    mesh = sharding.make_mesh(mesh_config, devices)
    read, counted = [], []
    for process in processes:
      rows = sharding.process_batch_rows(mesh, global_batch, process)
      assert rows.tolist() == _rows_by_jax(mesh, global_batch, process), (mesh_name, process)
      read.extend(rows)
      counted.extend(sharding.process_counted_rows(mesh, global_batch, process))
    assert set(read) == set(range(global_batch)), mesh_name  # the hosts cover the batch
    assert sorted(counted) == list(range(global_batch)), mesh_name  # each row counted once


def test_tpu_hosts_hold_scattered_blocks_and_share_rows_across_the_model_axis():
  devices = mock_tpu.slice_devices('v4-64')  # 2x4x4 chips, 8 hosts of 4
  mesh = sharding.make_mesh(dict(data=-1), devices)
  # The mesh follows the torus: host 0's chips are mesh positions 0, 4, 16 and 20 of 32.
  assert sharding.process_batch_rows(mesh, 64, 0).tolist() == [0, 1, 8, 9, 32, 33, 40, 41]
  mesh = sharding.make_mesh(dict(data=-1, model=4), mock_tpu.slice_devices('v5litepod-16'))
  # Each batch block sits on 4 chips of 2 hosts: both read it; the lower one counts it.
  rows = [sharding.process_batch_rows(mesh, 16, p).tolist() for p in range(4)]
  assert rows == [[0, 1, 2, 3, 4, 5, 6, 7]] * 2 + [[8, 9, 10, 11, 12, 13, 14, 15]] * 2
  counted = [sharding.process_counted_rows(mesh, 16, p).tolist() for p in range(4)]
  assert counted == [list(range(8)), [], list(range(8, 16)), []]


def test_several_slices_split_the_batch_into_one_block_per_slice():
  devices = mock_tpu.slice_devices('v5litepod-16', num_slices=2)  # 2 x 4 hosts of 4 chips
  mesh = sharding.make_mesh(dict(data=-1, dcn_data=-1), devices)
  assert dict(mesh.shape) == {'data': 32, 'fsdp': 1, 'model': 1}
  for process in range(8):
    rows = sharding.process_batch_rows(mesh, 64, process)
    in_slice = range(32) if process < 4 else range(32, 64)  # hosts 0-3 are slice 0's
    assert set(rows) <= set(in_slice) and len(rows) == 8
  fsdp = sharding.make_mesh(dict(data=1, fsdp=-1, dcn_data=2), devices)
  assert dict(fsdp.shape) == {'data': 2, 'fsdp': 16, 'model': 1}
  # Parameters are sharded inside a slice (fsdp), replicated across slices (data).
  assert {d.slice_index for d in fsdp.devices[0].reshape(-1)} == {0}
  assert {d.slice_index for d in fsdp.devices[1].reshape(-1)} == {1}
  with pytest.raises(ValueError, match='mesh.dcn_data=1, but the devices span 2 slice'):
    sharding.make_mesh(dict(data=-1), devices)


@common.needs_libtpu
def test_mock_slices_match_libtpus_topologies():
  """Which host drives which chip, as libtpu describes each slice (no TPU needed)."""
  from vit_jax.scale import accelerators  # pylint: disable=g-import-not-at-top
  for slice_name in SLICES:
    libtpu_devices = accelerators.get_target(slice_name).devices()
    mock_devices = mock_tpu.slice_devices(slice_name)
    assert ({tuple(d.coords): d.process_index for d in libtpu_devices} ==
            {d.coords: d.process_index for d in mock_devices}), slice_name
    assert {d.device_kind for d in libtpu_devices} == {mock_devices[0].device_kind}
