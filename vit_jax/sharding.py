"""Device mesh from config, logical-axis rules, and the shardings of params and batches.

Parameters carry logical axis names (vit_jax/models/vit.py); `rules` map them to the mesh axes
('data', 'fsdp', 'model'). With fsdp=1 and model=1 the same rules give pure data parallelism.
"""
import math
from typing import Sequence

import flax.linen as nn
import jax
from jax.experimental import mesh_utils
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ('data', 'fsdp', 'model')

# logical axis -> mesh axis (None = replicated). Override with config.sharding_rules.
DEFAULT_RULES = (
    ('embed', 'fsdp'),
    ('mlp', 'model'),
    ('heads', 'model'),
    ('kv', None),
    ('classes', None),
    ('layers', None),  # the stacked axis of scanned blocks
)

# The batch dimension is split over every data-like axis.
BATCH_AXES = ('data', 'fsdp')


def mesh_shape(mesh_config, num_devices: int) -> tuple:
  """(data, fsdp, model) sizes; one of them may be -1 = all remaining devices."""
  sizes = [int(mesh_config.get(axis, 1)) for axis in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f'at most one of mesh.{MESH_AXES} may be -1, got {dict(zip(MESH_AXES, sizes))}')
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f'mesh {dict(zip(MESH_AXES, sizes))}: {num_devices} devices are not '
                       f'divisible by {known}')
    sizes[sizes.index(-1)] = num_devices // known
  if int(np.prod(sizes)) != num_devices:
    raise ValueError(f'mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices, '
                     f'but {num_devices} are available')
  return tuple(sizes)


def make_mesh(mesh_config, devices: Sequence[jax.Device] | None = None) -> Mesh:
  devices = jax.devices() if devices is None else list(devices)
  shape = mesh_shape(mesh_config, len(devices))
  device_grid = mesh_utils.create_device_mesh(
      shape, devices=devices, allow_split_physical_axes=True)
  return Mesh(device_grid, MESH_AXES)


def rules_from_config(config) -> tuple:
  rules = config.get('sharding_rules', None)
  return tuple(tuple(r) for r in rules) if rules else DEFAULT_RULES


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def logical_to_sharding(logical_specs, mesh: Mesh, rules) -> object:
  """Maps a tree of logical PartitionSpecs to a tree of NamedShardings."""
  return nn.logical_to_mesh_sharding(logical_specs, mesh, rules)


def _fit(named: NamedSharding, shape: tuple) -> NamedSharding:
  """Replicates every dimension whose size the mesh axes assigned to it do not divide.

  jit needs even shards; e.g. 12 heads over model=8 stay whole rather than failing to compile.
  """
  spec = []
  for i, axes in enumerate(tuple(named.spec) + (None,) * (len(shape) - len(named.spec))):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    size = math.prod(named.mesh.shape[a] for a in names)
    spec.append(axes if shape[i] % size == 0 else None)
  return NamedSharding(named.mesh, P(*spec))


def param_shardings(boxed_tree, mesh: Mesh, rules):
  """NamedShardings for a tree of (possibly nn.Partitioned-boxed) abstract arrays.

  Works on whole train states: optimizer moments are boxed like the params they track, so FSDP
  and tensor parallelism shard them the same way.
  """
  shardings = logical_to_sharding(nn.get_partition_spec(boxed_tree), mesh, rules)
  return jax.tree.map(lambda s, a: _fit(s, a.shape), shardings, nn.unbox(boxed_tree))
