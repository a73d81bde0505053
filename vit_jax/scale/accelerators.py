"""Accelerator targets by the names users type (`v4-64`, `v5litepod-16`, `h100-8`), as devices
that XLA can compile for on this machine, with each device's memory and peak bf16 rate.

TPU slices come from libtpu's topology descriptions (`pip install -e '.[tpu]'`); H100s from
jaxlib's CUDA plugin with a target description of the card (`pip install "jax[cuda12]==<jax
version>"`). Neither needs the hardware.
"""
import dataclasses
import importlib.util
import math
import os
import re

from jax.experimental import topologies


@dataclasses.dataclass(frozen=True)
class TpuGeneration:
  libtpu_name: str        # topology prefix libtpu knows: 'v5e' for v5litepod
  cores_per_chip: int     # the N of '<generation>-N' counts TensorCores for 2-core chips
  devices_per_chip: int   # devices JAX sees per chip (v4/v5p megacore: 1)
  torus_dims: int         # 2 (v2, v3, v5e, v6e) or 3 (v4, v5p)
  memory_gib: float       # HBM per device as XLA reports it
  peak_bf16_flops: float  # per device, from the vendor's spec sheet


TPU_GENERATIONS = {
    'v2': TpuGeneration('v2', 2, 2, 2, 7.48, 45e12 / 2),
    'v3': TpuGeneration('v3', 2, 2, 2, 15.48, 123e12 / 2),
    'v4': TpuGeneration('v4', 2, 1, 3, 30.75, 275e12),
    'v5p': TpuGeneration('v5p', 2, 1, 3, 95.74, 459e12),
    'v5litepod': TpuGeneration('v5e', 1, 1, 2, 15.75, 197e12),
    'v6e': TpuGeneration('v6e', 1, 1, 2, 31.25, 918e12),
}

# NVIDIA H100 80GB HBM3 (SXM): the device description XLA's GPU compiler needs to compile
# without the card (figures from NVIDIA's specification; memory as the driver reports it).
H100_TARGET_CONFIG = """
gpu_device_info {
  cuda_compute_capability { major: 9 minor: 0 }
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_block_optin: 232448
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: 84929347584
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}
platform_name: "CUDA"
runtime_version { major: 12 minor: 8 }
dnn_version_info { major: 9 minor: 7 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""
H100_MEMORY_GIB = 84929347584 / 2**30
H100_PEAK_BF16_FLOPS = 989e12  # dense
GPUS_PER_HOST = 8
# JAX preallocates this fraction of a GPU's memory unless XLA_PYTHON_CLIENT_MEM_FRACTION says.
JAX_GPU_MEMORY_FRACTION = 0.75

# Peak bf16 FLOP/s of one JAX device, by its device_kind (what MFU on an accelerator is against).
PEAK_BF16_FLOPS = {'TPU v2': TPU_GENERATIONS['v2'].peak_bf16_flops,
                   'TPU v3': TPU_GENERATIONS['v3'].peak_bf16_flops,
                   'TPU v4': TPU_GENERATIONS['v4'].peak_bf16_flops,
                   'TPU v5': TPU_GENERATIONS['v5p'].peak_bf16_flops,
                   'TPU v5 lite': TPU_GENERATIONS['v5litepod'].peak_bf16_flops,
                   'TPU v6 lite': TPU_GENERATIONS['v6e'].peak_bf16_flops,
                   'NVIDIA H100 80GB HBM3': H100_PEAK_BF16_FLOPS}

EXAMPLES = ('v2-8', 'v3-32', 'v4-64', 'v5litepod-16', 'v5p-128', 'v6e-16', 'h100-8', 'h100-16')


@dataclasses.dataclass(frozen=True)
class Target:
  """A slice (or several, data parallel over the data-center network) or GPU set."""
  name: str                 # as given, e.g. 'v4-64'
  platform: str             # 'tpu' or 'cuda'
  topology: str             # libtpu topology ('v4:2x4x4') or GPU layout ('1x2x8')
  num_devices: int          # over all slices
  device_memory_gib: float  # what a program may use per device
  peak_bf16_flops: float    # per device
  topology_options: tuple = ()  # further (name, value) arguments of get_topology_desc
  num_slices: int = 1

  def devices(self) -> list:
    """Compile-only devices of the target (no hardware needed)."""
    if self.platform == 'tpu':
      if importlib.util.find_spec('libtpu') is None:
        raise RuntimeError(f'compiling for {self.name} needs libtpu (no TPU needed): '
                           'pip install -e ".[tpu]"')
      # libtpu admits one process at a time; a trainer or test may hold it beside us.
      os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
      # Loading libtpu off a TPU VM warns that it cannot tell which VM it is on: say it.
      os.environ.setdefault('TPU_ACCELERATOR_TYPE', self.name)
      os.environ.setdefault('TPU_WORKER_HOSTNAMES', 'localhost')
      slices = {'num_slices': self.num_slices} if self.num_slices > 1 else {}
      return topologies.get_topology_desc(platform='tpu', topology_name=self.topology,
                                          **dict(self.topology_options), **slices).devices
    if importlib.util.find_spec('jax_cuda12_plugin') is None:
      raise RuntimeError(
          f'compiling for {self.name} needs jaxlib\'s CUDA plugin (about 5 GB; no GPU needed): '
          'pip install "jax[cuda12]==<the installed jax version>", then run with '
          'JAX_PLATFORMS=cpu')
    return topologies.get_topology_desc(platform='cuda', target_config=H100_TARGET_CONFIG,
                                        topology=self.topology).devices


def _torus(chips: int, dims: int) -> tuple:
  """The slice's chip grid as libtpu names it: 2x4, 4x4, ...; 2x2x1, 2x2x2, 2x2x4, 2x4x4."""
  doublings = [0, 1, 2] + [2, 1, 0] * 8 if dims == 3 else [1, 0] * 8
  shape = [1] * dims
  for axis in doublings[:int(math.log2(chips))]:
    shape[axis] *= 2
  return tuple(shape)


def get_target(name: str, num_slices: int = 1) -> Target:
  """'v4-64', 'v5litepod-16', 'h100-8', ... (num_slices of them for TPUs) -> Target;
  ValueError naming what is accepted."""
  if num_slices < 1:
    raise ValueError(f'--num_slices={num_slices}: give 1 or more slices')
  match = re.fullmatch(r'([a-z0-9]+?)-(\d+)', name.strip().lower())
  generation_name, count = (match[1], int(match[2])) if match else (None, 0)
  if generation_name == 'h100':
    if count < 1 or (count > GPUS_PER_HOST and count % GPUS_PER_HOST):
      raise ValueError(f'--topology={name}: use h100-N with N <= {GPUS_PER_HOST} or a multiple '
                       f'of {GPUS_PER_HOST} ({GPUS_PER_HOST} GPUs per host)')
    hosts, per_host = max(count // GPUS_PER_HOST, 1), min(count, GPUS_PER_HOST)
    fraction = float(os.environ.get('XLA_PYTHON_CLIENT_MEM_FRACTION', JAX_GPU_MEMORY_FRACTION))
    if num_slices > 1:
      raise ValueError(f'--num_slices={num_slices} is for TPU slices; for more H100s name them '
                       f'all: h100-{count * num_slices}')
    return Target(name, 'cuda', f'1x{hosts}x{per_host}', count, H100_MEMORY_GIB * fraction,
                  H100_PEAK_BF16_FLOPS)
  generation = TPU_GENERATIONS.get(generation_name)
  if generation is None:
    raise ValueError(f'--topology={name!r} is not a known accelerator type; use a TPU type as '
                     f'for the launcher\'s --accelerator_type ({", ".join(TPU_GENERATIONS)} '
                     f'followed by -N) or h100-N, e.g. {", ".join(EXAMPLES)}')
  chips, remainder = divmod(count, generation.cores_per_chip)
  smallest = 1 if generation.cores_per_chip == 1 else 4
  if remainder or chips < smallest or chips & (chips - 1) or chips == 2:
    unit = 'TensorCores (2 per chip)' if generation.cores_per_chip == 2 else 'chips'
    examples = [f'{generation_name}-{n * generation.cores_per_chip}'
                for n in (smallest, 4, 8, 16, 32) if n >= smallest]
    raise ValueError(f'--topology={name}: the N of {generation_name}-N counts {unit} and must '
                     f'make a power-of-two number of chips, at least {smallest}: '
                     f'{", ".join(dict.fromkeys(examples))}, ...')
  options = {}
  if generation.devices_per_chip == 1 and generation.cores_per_chip == 2:
    options['chip_config_name'] = 'megacore'  # one device per chip, as on the real slice
  if generation.torus_dims == 2 and chips in (1, 8):  # hosts of 1 and of 8 chips
    options['chips_per_host_bounds'] = (1, 1, 1) if chips == 1 else (2, 4, 1)
  shape = _torus(chips, generation.torus_dims)
  return Target(name, 'tpu', f'{generation.libtpu_name}:{"x".join(map(str, shape))}',
                chips * generation.devices_per_chip * num_slices, generation.memory_gib,
                generation.peak_bf16_flops, tuple(options.items()), num_slices)
