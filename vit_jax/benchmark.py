"""Train-step speed and MFU of the real trainer step on synthetic data.

    python -m vit_jax.benchmark --model=ViT-S_16 --batch_size=16 --image_size=224 --steps=5

Builds the model, AdamW optimizer, sharded state and jitted step with the trainer's own functions,
so the figures are those of `python -m vit_jax.main`, minus the input pipeline. Prints one line per
figure and, last, one JSON object with them all.

Model FLOPs count the matmuls and convolutions of the forward pass (walked from its jaxpr, so any
model change is counted) times 3 for forward + backward, the usual MFU convention. On TPUs and
H100s the peak is the devices' bf16 rate from the vendor's spec sheet
(`accelerators.PEAK_BF16_FLOPS`). Elsewhere (CPU) it is what a large f32 matmul reaches through
JAX in the same process, so MFU there means "fraction of the matmul rate this machine gives JAX
right now", which also cancels some of the noise of a shared machine.
"""
import json
import os
import resource
import statistics
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import ml_collections

from vit_jax.cli import startup
from vit_jax.scale import accelerators, flops, sharding
from vit_jax.train import trainer


def define_flags() -> None:
  """The CLI's flags (benchmarks/compare_timm.py and xla_cpu_options.py reuse them); defined
  when run as a program, so importing this module defines none."""
  flags.DEFINE_string('model', 'ViT-S_16', 'Model name for vit_jax.models.get_model.')
  flags.DEFINE_integer('batch_size', 16, 'Global batch size.')
  flags.DEFINE_integer('image_size', 224, 'Square image side in pixels.')
  flags.DEFINE_integer('steps', 5, 'Timed train steps (after one untimed warm-up step).')
  flags.DEFINE_integer('num_classes', 1000, 'Classifier outputs.')
  flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'],
                    'Computation dtype of the model (parameters stay float32).')
  flags.DEFINE_integer('mesh_fsdp', 1, 'mesh.fsdp; mesh.data takes the rest.')
  flags.DEFINE_integer('mesh_model', 1, 'mesh.model; mesh.data takes the rest.')
  flags.DEFINE_integer('peak_matmul_size', 2048,
                       'N of the N^3 f32 matmul that measures the peak rate.')
  flags.DEFINE_bool('scan_layers', False, 'Scan over the encoder blocks (one compiled block).')
  flags.DEFINE_string('remat_policy', 'none', 'Rematerialization of the encoder blocks.')
  flags.DEFINE_integer('num_layers', 0, 'Encoder depth; 0: the named model\'s own.')
  flags.DEFINE_bool('compile_only', False, 'Only compile the step (from abstract shapes, so no '
                    'memory for the state) and report compile time, FLOPs and memory.')


def benchmark_config(model: str, batch_size: int, image_size: int, num_classes: int,
                     dtype: str = 'float32', mesh_fsdp: int = 1, mesh_model: int = 1,
                     **model_overrides):
  """A training config as the trainer reads it: AdamW with clipping, as the ViT recipes.
  model_overrides: architecture fields such as scan_layers=True or num_layers=2."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.total_steps = 10_000
  c.batch_size = batch_size
  c.image_size = image_size
  c.num_classes = num_classes
  c.model = dict(name=model, dtype=dtype, **model_overrides)
  c.loss = 'softmax_xent'
  c.optimizer = dict(name='adamw', b1=0.9, b2=0.999, weight_decay=1e-4, grad_clip_norm=1.0)
  c.schedule = dict(base_lr=1e-3, warmup_steps=100, decay_type='cosine')
  c.mesh = dict(data=-1, fsdp=mesh_fsdp, model=mesh_model)
  return c


def matmul_times(n: int, repeats: int = 5) -> list:
  """Seconds per (n, n) @ (n, n) float32 matmul on the default device, `repeats` runs."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  matmul = jax.jit(jnp.matmul)
  matmul(a, b).block_until_ready()
  return time_calls(lambda: matmul(a, b).block_until_ready(), repeats)


def matmul_peak(n: int, times: list) -> float:
  """FLOP/s of the fastest of the timed (n, n) @ (n, n) matmuls: a peak is what the machine
  can give."""
  return 2 * n**3 / min(times)


def time_calls(fn, repeats: int) -> list:
  """Seconds of each of `repeats` calls of fn (which must block until its work is done)."""
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return times


class TrainStep:
  """The trainer's compiled step on one fixed synthetic batch; calling it runs one step."""

  def __init__(self, config, compiler_options: dict | None = None):
    """compiler_options: XLA DebugOptions fields for this compilation only, e.g.
    {'xla_cpu_enable_fast_math': True}; lets one process compare XLA settings side by side."""
    self.config = config
    training = trainer.build(config)
    self.mesh, self.model, self.abstract_state = (
        training.mesh, training.model, training.abstract_state)
    init_fn = training.init_fn
    train_step = trainer.jit_train_step(
        trainer.make_train_step(config, training, jax.random.key(1)), training)
    abstract_batch = trainer.abstract_batch(config, self.mesh)
    start = time.perf_counter()
    self.compiled = train_step.lower(self.abstract_state, abstract_batch).compile(
        compiler_options)
    self.compile_time = time.perf_counter() - start
    self._init_fn = init_fn
    self.state = self.batch = self.metrics = None

  def materialize(self) -> None:
    """Builds the state and a fixed random batch (first call of the step does it too)."""
    self.state = self._init_fn(jax.random.key(0))
    size, n, classes = self.config.image_size, self.config.batch_size, self.config.num_classes
    images = jax.random.uniform(jax.random.key(2), (n, size, size, 3), jnp.float32, -1., 1.)
    labels = jax.nn.one_hot(jnp.arange(n) % classes, classes)
    self.batch = jax.device_put({'image': images, 'labels': labels},
                                sharding.batch_sharding(self.mesh))

  def __call__(self):
    if self.state is None:
      self.materialize()
    self.state, self.metrics = self.compiled(self.state, self.batch)
    jax.block_until_ready((self.state, self.metrics))

  def model_flops_per_step(self) -> int:
    """3 x forward matmul FLOPs (forward + backward) for the whole batch."""
    forward = flops.forward_flops_per_image(self.model, self.abstract_state.params,
                                      self.config.image_size)
    return 3 * forward * self.config.batch_size

  def compiled_memory_bytes(self) -> int:
    """XLA's account of the step's buffers per device: arguments + outputs - donated + temps."""
    memory = self.compiled.memory_analysis()
    return (memory.argument_size_in_bytes + memory.output_size_in_bytes
            - memory.alias_size_in_bytes + memory.temp_size_in_bytes)

  def peak_memory_bytes(self) -> int:
    """The device's peak where it keeps one (GPU); elsewhere XLA's account of the buffers."""
    device_stats = jax.devices()[0].memory_stats() or {}
    return device_stats.get('peak_bytes_in_use') or self.compiled_memory_bytes()


def compile_figures(config, step: TrainStep) -> dict:
  """What compiling alone tells: the model, compile time, FLOPs and XLA's memory account."""
  model = step.model
  figures = {
      'model': config.model.name, 'num_layers': model.num_layers,
      'scan_layers': model.scan_layers, 'remat_policy': model.remat_policy,
      'batch_size': config.batch_size, 'image_size': config.image_size,
      'dtype': config.model.dtype, 'platform': jax.devices()[0].platform,
      'devices': step.mesh.devices.size, 'mesh': dict(step.mesh.shape),
      'compile_time_s': round(step.compile_time, 3),
      'model_flops_per_image': step.model_flops_per_step() // config.batch_size,
      'compiled_memory_mb': round(step.compiled_memory_bytes() / 2**20, 1),
  }
  if not model.scan_layers:  # XLA counts a scanned body once: no cross-check there
    cost = step.compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    figures['xla_flops_per_step'] = float(cost.get('flops', -1.)) if cost else -1.
  return figures


def _significant(x: float, digits: int = 6) -> float:
  """x to `digits` significant figures: rates and ratios span 1e-4 (a CPU's MFU) to 1e4, and
  rounding them to fixed decimals loses most of the small ones' precision."""
  return float(f'{x:.{digits}g}')


def rate_figures(batch_size: int, model_flops_per_image: float, step_times: list,
                 peak_flops: float) -> dict:
  """Rates from the timed steps: the median step (one slow step, a machine's hiccup, does not
  move it), images/sec and FLOP/s at that step time, and MFU against `peak_flops`."""
  step_time = statistics.median(step_times)
  model_flops = model_flops_per_image * batch_size
  return {
      'step_time_s': _significant(step_time),
      'step_time_min_s': _significant(min(step_times)),
      'step_time_max_s': _significant(max(step_times)),
      'images_per_sec': _significant(batch_size / step_time),
      'achieved_gflops_per_sec': _significant(model_flops / step_time / 1e9),
      'peak_gflops_per_sec': _significant(peak_flops / 1e9),
      'mfu': _significant(model_flops / step_time / peak_flops),
  }


def run(config, steps: int, peak_matmul_size: int = 2048, compile_only: bool = False) -> dict:
  """Compiles and times the trainer's step; returns the figures (see the module docstring)."""
  step = TrainStep(config)
  result = compile_figures(config, step)
  if compile_only:
    return result
  step()  # warm-up: first-run allocations, thread start
  device_peak = accelerators.PEAK_BF16_FLOPS.get(jax.devices()[0].device_kind)
  if result['platform'] != 'cpu' and device_peak:
    step_times = time_calls(step, steps)
    peak, peak_source = device_peak * result['devices'], 'bf16 spec sheet'
  else:
    # Measured instead: timed before and after the steps, so that on a shared machine both see
    # about the same load. Host "devices" share the same cores; accelerators bring their own.
    peak_times = matmul_times(peak_matmul_size)
    step_times = time_calls(step, steps)
    peak_times += matmul_times(peak_matmul_size)
    peak = (matmul_peak(peak_matmul_size, peak_times)
            * (1 if result['platform'] == 'cpu' else result['devices']))
    peak_source = 'measured f32 matmul'
  rates = rate_figures(config.batch_size, result['model_flops_per_image'], step_times, peak)
  return result | {
      'steps': steps, **rates, 'peak_source': peak_source,
      'peak_memory_mb': round(step.peak_memory_bytes() / 2**20, 1),
      'peak_rss_mb': round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
      'train_loss': float(step.metrics['train_loss']),
  }


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  overrides = dict(scan_layers=f.scan_layers, remat_policy=f.remat_policy)
  if f.num_layers:
    overrides['num_layers'] = f.num_layers
  config = benchmark_config(f.model, f.batch_size, f.image_size, f.num_classes, f.dtype,
                            f.mesh_fsdp, f.mesh_model, **overrides)
  result = run(config, f.steps, f.peak_matmul_size, f.compile_only)
  result['xla_flags'] = os.environ.get('XLA_FLAGS', '')
  result['glibc_tunables'] = os.environ.get('GLIBC_TUNABLES', '')
  for key, value in result.items():
    print(f'{key:>24}: {value}')
  print(json.dumps(result))


if __name__ == '__main__':
  startup.begin()
  define_flags()
  app.run(main)
