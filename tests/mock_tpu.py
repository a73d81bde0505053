"""A TPU slice's `jax.devices()` without TPUs, for testing mesh and input logic on a CPU.

Devices are listed as JAX's own mock in its tests/mesh_utils_test.py lists them (and as libtpu's
topology descriptions do; tests/test_sharding.py compares the two): each host (process) holds
2x2x1 chips, one device per chip (v4 and v5p in megacore mode, v5e, v6e), with `id`,
`platform='tpu'`, `device_kind`, `process_index`, `coords`, `core_on_chip` and, across
several slices, `slice_index`. `mesh_utils.create_device_mesh` and `jax.sharding.Mesh` take
them like real devices.
"""
import dataclasses
import itertools

from vit_jax.scale import accelerators

# device_kind as a slice's devices report it, by the accelerator type's generation.
DEVICE_KINDS = {'v4': 'TPU v4', 'v5p': 'TPU v5', 'v5litepod': 'TPU v5 lite',
                'v6e': 'TPU v6 lite'}
HOST_CHIPS = (2, 2, 1)  # the chips one host (process) drives


@dataclasses.dataclass(frozen=True)
class MockTpuDevice:
  id: int
  platform: str
  device_kind: str
  process_index: int
  coords: tuple
  core_on_chip: int = 0
  slice_index: int = 0


def torus(accelerator_type: str) -> tuple:
  """The chip grid (x, y, z) of a slice, as the accelerator targets name it: v4-64 -> 2x4x4."""
  topology = accelerators.get_target(accelerator_type).topology  # e.g. 'v4:2x4x4', 'v5e:4x4'
  shape = tuple(int(n) for n in topology.split(':')[1].split('x'))
  return shape + (1,) * (3 - len(shape))


def slice_devices(accelerator_type: str, num_slices: int = 1) -> list:
  """The devices of `num_slices` slices of `accelerator_type`, in jax.devices() order (by
  process, then by chip within its host); processes are numbered across slices."""
  generation = accelerator_type.rsplit('-', 1)[0]
  bounds = torus(accelerator_type)
  hosts = [b // h for b, h in zip(bounds, HOST_CHIPS)]
  hosts_per_slice = hosts[0] * hosts[1] * hosts[2]
  chips_per_slice = bounds[0] * bounds[1] * bounds[2]
  devices = []
  for slice_index in range(num_slices):
    # Hosts are numbered x fastest, then y, then z, as libtpu numbers them.
    for hz, hy, hx in itertools.product(*(range(n) for n in reversed(hosts))):
      process = slice_index * hosts_per_slice + hx + hosts[0] * (hy + hosts[1] * hz)
      for cz, cy, cx in itertools.product(*(range(n) for n in reversed(HOST_CHIPS))):
        coords = (hx * HOST_CHIPS[0] + cx, hy * HOST_CHIPS[1] + cy, hz * HOST_CHIPS[2] + cz)
        chip = coords[0] + bounds[0] * (coords[1] + bounds[1] * coords[2])
        devices.append(MockTpuDevice(slice_index * chips_per_slice + chip, 'tpu',
                                     DEVICE_KINDS[generation], process, coords, 0, slice_index))
  return devices
