"""Device mesh from config, logical-axis rules, and the shardings of params and activations.

Parameters and activations carry logical axis names (vit_jax/models/vit.py); `rules` map them to
the mesh axes ('data', 'fsdp', 'model'). With fsdp=1 and model=1 the same rules give pure data
parallelism. Activations keep their batch split over (data, fsdp) from input to loss, so FSDP
all-gathers parameters (layer by layer) and never the batch: without these constraints XLA was
free to follow the fsdp-sharded weights instead and gathered whole image batches to every device.
"""
import contextvars
import functools
import math
from typing import Sequence

import flax.linen as nn
import jax
from jax.experimental import mesh_utils
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vit_jax.cli import errors

MESH_AXES = ('data', 'fsdp', 'model')

# The batch dimension is split over every data-like axis.
BATCH_AXES = ('data', 'fsdp')

# logical axis -> mesh axis (None = replicated). config.sharding_rules come before these, so a
# rule there wins for the logical axis it names.
DEFAULT_RULES = (
    # parameters
    ('embed', 'fsdp'),
    ('mlp', 'model'),
    ('heads', 'model'),
    ('kv', None),
    ('classes', None),
    ('layers', None),  # the stacked axis of scanned blocks
    # activations
    ('activation_batch', BATCH_AXES),
    ('activation_length', None),
    ('activation_embed', None),
    ('activation_mlp', 'model'),
    ('activation_heads', 'model'),
    ('activation_kv', None),
    ('activation_classes', None),
)


def mesh_shape(mesh_config, num_devices: int) -> tuple:
  """(data, fsdp, model) sizes; one of them may be -1 = all remaining devices."""
  sizes = [int(mesh_config.get(axis, 1)) for axis in MESH_AXES]
  if sizes.count(-1) > 1:
    raise errors.UserError(f'at most one of mesh.{MESH_AXES} may be -1, got '
                           f'{dict(zip(MESH_AXES, sizes))}')
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if num_devices % known:
      raise errors.UserError(f'mesh {dict(zip(MESH_AXES, sizes))}: {num_devices} devices are not '
                             f'divisible by {known}')
    sizes[sizes.index(-1)] = num_devices // known
  if int(np.prod(sizes)) != num_devices:
    raise errors.UserError(f'mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} '
                           f'devices, but {num_devices} are available; set the config\'s mesh.* '
                           f'to use {num_devices} (e.g. --config.mesh.data=-1 for all of them)')
  return tuple(sizes)


def num_slices(devices: Sequence) -> int:
  """TPU slices the devices span (multi-slice jobs: `slice_index`; else 1)."""
  return len({getattr(d, 'slice_index', 0) for d in devices})


def dcn_data_size(mesh_config, devices: Sequence) -> int:
  """mesh.dcn_data: data parallelism across slices (-1 = all slices); it must span them all,
  since the ICI axes (data, fsdp, model) stay inside one slice."""
  slices = num_slices(devices)
  dcn = int(mesh_config.get('dcn_data', 1))
  if dcn == -1:
    return slices
  if dcn != slices:
    raise ValueError(f'mesh.dcn_data={dcn}, but the devices span {slices} slice(s): set '
                     f'--config.mesh.dcn_data=-1 (or {slices}); data parallelism across slices '
                     'is the only axis that may cross them')
  return dcn


def make_mesh(mesh_config, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The (data, fsdp, model) mesh in the order of the physical torus (rings for collectives).

  On several slices (mesh.dcn_data) the data axis is dcn_data blocks, one per slice, each
  laid out inside its slice as mesh.data/fsdp/model say: slice i holds the i-th contiguous
  1/dcn_data of every batch, and only gradients cross the slower network between slices.
  A process's devices need not be adjacent in the mesh: see `process_batch_rows`.
  """
  devices = jax.devices() if devices is None else list(devices)
  dcn = dcn_data_size(mesh_config, devices)
  shape = mesh_shape(mesh_config, len(devices) // dcn)
  if dcn == 1:
    device_grid = mesh_utils.create_device_mesh(
        shape, devices=devices, allow_split_physical_axes=True)
  else:
    device_grid = mesh_utils.create_hybrid_device_mesh(
        shape, (dcn, 1, 1), devices=devices, allow_split_physical_axes=True)
  return Mesh(device_grid, MESH_AXES)


def rules_from_config(config) -> tuple:
  """config.sharding_rules (pairs of logical axis, mesh axis or None), then DEFAULT_RULES."""
  rules = tuple((name, tuple(axes) if isinstance(axes, list) else axes)
                for name, axes in (config.get('sharding_rules', None) or ()))
  unknown = [axes for _, axes in rules
             if not set((axes,) if isinstance(axes, str) else axes or ()) <= set(MESH_AXES)]
  if unknown:
    raise errors.UserError(f'config.sharding_rules maps to {unknown}, which are not mesh axes; '
                           f'use {MESH_AXES} or None')
  return rules + DEFAULT_RULES


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def _batch_blocks(mesh: Mesh, global_batch: int) -> tuple[np.ndarray, int]:
  """(the block of the global batch each device holds, in an array shaped like mesh.devices;
  rows per block): `batch_sharding` cuts the batch into equal blocks over BATCH_AXES, in the
  order of those axes, and every device on the other axes (model) holds a copy of its block."""
  grid = np.indices(mesh.devices.shape)
  axes = [mesh.axis_names.index(a) for a in BATCH_AXES]
  sizes = [mesh.devices.shape[a] for a in axes]
  num_blocks = math.prod(sizes)
  if global_batch % num_blocks:
    raise ValueError(f'a global batch of {global_batch} does not split into the {num_blocks} '
                     f'batch-sharding devices of mesh {dict(mesh.shape)}; use a multiple of '
                     f'{num_blocks}')
  return np.ravel_multi_index([grid[a] for a in axes], sizes), global_batch // num_blocks


def _process_indices(mesh: Mesh) -> np.ndarray:
  return np.vectorize(lambda d: d.process_index, otypes=[int])(mesh.devices)


def _rows(blocks: np.ndarray, rows_per_block: int) -> np.ndarray:
  return (np.unique(blocks)[:, None] * rows_per_block + np.arange(rows_per_block)).reshape(-1)


def process_batch_rows(mesh: Mesh, global_batch: int,
                       process_index: int | None = None) -> np.ndarray:
  """The rows of a global batch that a process's devices hold (ascending): what its input
  pipeline reads. process_index: default this process.

  Reads only the mesh's device grid and each device's `process_index`, so it works for the
  devices of any slice. On a TPU slice the mesh follows the torus, and a host's devices sit
  at scattered mesh positions: its rows are then several blocks (host 0 of a v4-64 with
  mesh.data=-1 holds blocks 0, 4, 16 and 20 of 32); when the model axis spans hosts, several
  hosts hold, and read, the same rows.
  """
  process_index = jax.process_index() if process_index is None else process_index
  blocks, rows_per_block = _batch_blocks(mesh, global_batch)
  held = blocks[_process_indices(mesh) == process_index]
  if not held.size:
    raise ValueError(f'process {process_index} has no device in the mesh')
  return _rows(held, rows_per_block)


def process_counted_rows(mesh: Mesh, global_batch: int,
                         process_index: int | None = None) -> np.ndarray:
  """Those of `process_batch_rows` that this process counts in per-row statistics (e.g.
  images that failed to decode): each row is counted by the lowest-numbered process holding
  it, so a sum over processes counts every row once, also when hosts hold the same rows."""
  process_index = jax.process_index() if process_index is None else process_index
  blocks, rows_per_block = _batch_blocks(mesh, global_batch)
  processes = _process_indices(mesh)
  first_holder = np.full(blocks.max() + 1, np.iinfo(int).max)
  np.minimum.at(first_holder, blocks.reshape(-1), processes.reshape(-1))
  return _rows(np.flatnonzero(first_holder == process_index), rows_per_block)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def logical_to_sharding(logical_specs, mesh: Mesh, rules) -> object:
  """Maps a tree of logical PartitionSpecs to a tree of NamedShardings."""
  return nn.logical_to_mesh_sharding(logical_specs, mesh, rules)


def _fit_spec(spec: P, mesh_shape, shape: tuple) -> P:
  """Replicates every dimension whose size the mesh axes assigned to it do not divide.

  jit needs even shards; e.g. 12 heads over model=8 stay whole rather than failing to compile.
  """
  fitted = []
  for i, axes in enumerate(tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    size = math.prod(mesh_shape[a] for a in names)
    fitted.append(axes if shape[i] % size == 0 else None)
  return P(*fitted)


def _fit(named: NamedSharding, shape: tuple) -> NamedSharding:
  return NamedSharding(named.mesh, _fit_spec(named.spec, named.mesh.shape, shape))


# (mesh, rules) while `jit_with_rules` traces a function. Not flax's own logical-rules context:
# under it, flax re-checks every DenseGeneral kernel's init shape with the rules applied and
# fails on its flattened kernels (rank-3 names on a rank-2 value).
_ACTIVATION_LAYOUT = contextvars.ContextVar('activation_layout', default=None)


def constrain(x: jax.Array, logical_axes: tuple) -> jax.Array:
  """Shards activation `x` by logical axis names, one per dimension, with the mesh and rules of
  the `jit_with_rules` tracing it; elsewhere (a plain model.apply) it returns x unchanged."""
  layout = _ACTIVATION_LAYOUT.get()
  if layout is None:
    return x
  mesh, rules = layout
  spec = _fit_spec(nn.logical_to_mesh_axes(logical_axes, rules), mesh.shape, x.shape)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def gathered_over_fsdp(params, logical_axes):
  """Each parameter of `params` whole over the fsdp mesh axis (its other axes kept), by its
  logical names in `logical_axes` (a tree of PartitionSpecs), under `jit_with_rules`;
  elsewhere unchanged.

  The models gather each block's parameters this way before the block computes: one layer at
  a time, as plain all-gathers (their gradients summed back per layer). Left to itself, XLA's TPU
  compiler turned every FSDP matmul into a windowed loop over weight shards (collective
  matmul) that kept more activations live at once than the whole state FSDP saved (ViT-B/16,
  256 images per v5e chip: 1 GiB more at fsdp=16 than at fsdp=1; benchmarks/README.md).
  """
  if not gathers_over_fsdp():
    return params
  mesh, rules = _ACTIVATION_LAYOUT.get()

  def gather(x, names):
    spec = _fit_spec(nn.logical_to_mesh_axes(tuple(names), rules), mesh.shape, x.shape)
    spec = P(*(_without_fsdp(axes) for axes in spec))
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
  return jax.tree.map(gather, params, logical_axes)


def gathers_over_fsdp() -> bool:
  """Whether `gathered_over_fsdp` gathers anything: under `jit_with_rules`, on a mesh whose
  fsdp axis shards parameters (fsdp > 1)."""
  layout = _ACTIVATION_LAYOUT.get()
  return layout is not None and layout[0].shape['fsdp'] > 1


def _without_fsdp(axes):
  if axes is None or isinstance(axes, str):
    return None if axes == 'fsdp' else axes
  return tuple(a for a in axes if a != 'fsdp') or None


def jit_with_rules(fn, mesh: Mesh, rules, **jit_kwargs):
  """jax.jit(fn, **jit_kwargs), fn traced with `mesh` and the logical-axis `rules` in effect for
  the models' activation constraints (`constrain`)."""
  @functools.wraps(fn)
  def traced(*args, **kwargs):
    token = _ACTIVATION_LAYOUT.set((mesh, rules))
    try:
      return fn(*args, **kwargs)
    finally:
      _ACTIVATION_LAYOUT.reset(token)
  # A partial has no name of its own: the XLA module (jit_<name>, what profiles show) takes the
  # name of the function it binds.
  traced.__name__ = getattr(fn, '__name__', getattr(getattr(fn, 'func', None), '__name__',
                                                    'traced'))
  return jax.jit(traced, **jit_kwargs)


def param_shardings(boxed_tree, mesh: Mesh, rules):
  """NamedShardings for a tree of (possibly nn.Partitioned-boxed) abstract arrays.

  Works on whole train states: optimizer moments are boxed like the params they track, so FSDP
  and tensor parallelism shard them the same way.
  """
  shardings = logical_to_sharding(nn.get_partition_spec(boxed_tree), mesh, rules)
  return jax.tree.map(lambda s, a: _fit(s, a.shape), shardings, nn.unbox(boxed_tree))


def to_host(tree):
  """numpy copies of a tree of arrays, on every process, also when they are sharded across
  processes (FSDP spanning hosts), where device_get cannot reach the other hosts' shards: then
  every process must call it (a collective)."""
  if all(getattr(x, 'is_fully_addressable', True) for x in jax.tree.leaves(tree)):
    return jax.device_get(tree)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return multihost_utils.process_allgather(tree, tiled=True)


def to_global(host_tree, shardings):
  """Sharded jax.Arrays from numpy arrays that every process holds in full: each process places
  only its own devices' slices (no device_get / device_put of non-addressable arrays)."""
  return jax.tree.map(
      lambda x, s: jax.make_array_from_callback(x.shape, s, lambda index: x[index]),
      host_tree, shardings)
