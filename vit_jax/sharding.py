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

from vit_jax import errors

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


def make_mesh(mesh_config, devices: Sequence[jax.Device] | None = None) -> Mesh:
  devices = jax.devices() if devices is None else list(devices)
  shape = mesh_shape(mesh_config, len(devices))
  device_grid = mesh_utils.create_device_mesh(
      shape, devices=devices, allow_split_physical_axes=True)
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


def process_batch_rows(mesh: Mesh, global_batch: int) -> range:
  """The rows of a global batch this process's devices hold: what its input pipeline reads.

  Usually process i of P holds rows [i*B/P, (i+1)*B/P); when a mesh axis the batch is not split
  over (model) spans processes, several processes hold, and so read, the same rows.
  """
  rows = set()
  for index in batch_sharding(mesh).addressable_devices_indices_map((global_batch,)).values():
    rows.update(range(global_batch)[index[0]])
  start, stop = min(rows), max(rows) + 1
  if len(rows) != stop - start:
    raise ValueError(f'the devices of process {jax.process_index()} hold rows {sorted(rows)} of '
                     f'the global batch, not one contiguous block; order the mesh devices so '
                     f'that each process\'s devices are adjacent along the data/fsdp axes')
  return range(start, stop)


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
