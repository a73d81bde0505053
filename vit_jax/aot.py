r"""Will this config fit on that slice? Compiles the real train step for a TPU slice or H100s on
this machine, before anyone creates (and pays for) the hardware.

    python -m vit_jax.aot --config=configs/pretrain_i21k.py:H/14 --topology=v4-64 \
        [--num_slices=N] [--config.KEY=VALUE ...] [--find_batch]

The step is built from the config exactly as `python -m vit_jax.main` builds it (model, optimizer,
shardings, task, accum_steps, remat, dtype) over the target's devices, lowered on abstract
shapes and compiled by XLA for that target. Printed per device: parameters + optimizer state,
temporaries, total against the device's memory, whether it fits, compile time, the collectives
of one step and their bytes, the step's matmul FLOPs (counted on its jaxpr) and the step time at
100% of the chips' peak bf16 rate, a lower bound. The last line is one JSON object. Exit status 0
when a report was produced, fitting or not. --num_slices=N compiles for N slices, data parallel
across them (mesh.dcn_data=N, as the TPU launcher sets it).

A compile takes seconds for small models and many minutes for large ones on a few cores (ViT-H/14
on a v4-64: 505 s on 2 cores). Each one says on stderr what it compiles and how long the same
shape took on this machine before (kept in ~/.cache/vit_jax/compile_times.json), then a line
every 30 s while it lasts; Ctrl-C or SIGTERM stop it at once with one line.

TPU slices need libtpu (`pip install -e '.[tpu]'`); H100s need jaxlib's CUDA plugin (see
README). XLA's TPU compiler refuses a program that does not fit; XLA's GPU compiler does not, so
for GPUs the total is compared with the memory JAX may use (XLA_PYTHON_CLIENT_MEM_FRACTION of
the card, 0.75 by default).
"""
import collections
import json
import math
import os
import re
import sys
import time

from absl import app, flags, logging
import jax
from ml_collections import config_flags

from vit_jax.cli import config_flag, errors, startup, waiting
from vit_jax.scale import accelerators, flops
from vit_jax.storage import paths
from vit_jax.train import defaults

GIB = 2**30
COLLECTIVES = ('all-gather', 'all-reduce', 'reduce-scatter', 'all-to-all', 'collective-permute')
# The deviceless GPU compile cannot pick Triton GEMM tilings for the attention output
# projection ("Couldn't find output tile sizes"): use cuBLAS there, for this check only.
GPU_COMPILER_OPTIONS = {'xla_gpu_enable_triton_gemm': False}
_HBM_SHORTFALL = re.compile(
    r'required for (?P<what>[\w ]+?) \((?P<need>[\d.]+)(?P<unit>[KMGT])\) exceeds available HBM')
_UNITS = {'K': 2**10, 'M': 2**20, 'G': 2**30, 'T': 2**40}


def _state_bytes_per_device(abstract_state) -> int:
  """Bytes of one device's shards of the sharded train state (params + optimizer state)."""
  return sum(x.dtype.itemsize * math.prod(x.sharding.shard_shape(x.shape))
             for x in jax.tree.leaves(abstract_state))


def _array_bytes(type_text: str) -> list:
  """Bytes of each array in an HLO type such as 'bf16[16,197,384]{...}' or a tuple of them."""
  sizes = []
  for dtype, dims in re.findall(r'\b(pred|[subf]\d+|bf16|f8e\w+)\[([\d,]*)\]', type_text):
    bits = 8 if dtype == 'pred' or dtype.startswith('f8') else int(re.sub(r'\D', '', dtype))
    sizes.append(math.prod(int(d) for d in dims.split(',') if d) * bits // 8)
  return sizes


def _computations(hlo: str) -> dict:
  """HLO module text -> {computation name: [instruction lines]}; the entry is '__entry__'."""
  computations, current = {}, None
  for line in hlo.splitlines():
    header = re.match(r'^(ENTRY )?%?([\w.\-]+) .*\{$', line)
    if header and not line.startswith(' '):
      current = '__entry__' if header[1] else header[2]
      computations[current] = []
    elif current and line.startswith('  '):
      computations[current].append(line.strip())
  return computations


def _trip_count(while_line: str, computations: dict) -> int | None:
  """A while loop's trip count: XLA's known_trip_count (GPU), else the bound its condition
  compares the counter with (TPU's HLO shows a scanned body once, without the count); None
  when neither can be read."""
  known = re.search(r'"known_trip_count":\{"n":"(\d+)"', while_line)
  if known:
    return int(known[1])
  condition = re.search(r'condition=%?([\w.\-]+)', while_line)
  body = computations.get(condition[1], []) if condition else []
  bounds = [int(c) for line in body  # e.g. 's32[]{:T(128)} constant(12)' (TPU layouts)
            for c in re.findall(r'[su]\d+\[\](?:\{[^}]*\})? constant\((\d+)\)', line)]
  return bounds[0] if len(bounds) == 1 else None


def _result_bytes(kind: str, type_text: str, is_start: bool) -> int:
  """Per-device bytes a collective produces, from its HLO result type. An async `-start` of
  all-gather or collective-permute returns (operands, results[, context scalars]): the
  results are the second half; all-reduce-start returns its results only. Several operands
  make a tuple: their bytes add up."""
  sizes = _array_bytes(type_text)
  if is_start and kind != 'all-reduce':
    contexts = len(re.findall(r'\b[su]32\[\]', type_text))  # collective-permute's
    sizes = sizes[:len(sizes) - contexts]
    sizes = sizes[len(sizes) // 2:]
  return sum(sizes)


def collectives(hlo: str) -> dict:
  """{kind: {'count', 'bytes'}} of the collectives one execution of the compiled module runs,
  loop bodies counted as many times as their loops run; bytes are the per-device results.

  A collective inside a loop whose trip count the HLO text does not show is counted once and
  listed under 'in_loops_of_unknown_trip_count': count and bytes are then lower bounds."""
  computations = _computations(hlo)
  totals = collections.defaultdict(lambda: {'count': 0, 'bytes': 0})
  pattern = re.compile(r'= (.*?) (' + '|'.join(COLLECTIVES) + r')(-start)?\(')

  def visit(name: str, times: int, unknown_trips: bool):
    for line in computations.get(name, ()):
      match = pattern.search(line)
      if match:
        totals[match[2]]['count'] += times
        totals[match[2]]['bytes'] += times * _result_bytes(match[2], match[1], bool(match[3]))
        if unknown_trips:
          figures = totals[match[2]]
          figures['in_loops_of_unknown_trip_count'] = (
              figures.get('in_loops_of_unknown_trip_count', 0) + 1)
      repeat = _trip_count(line, computations) if ' while(' in line else 1
      for callee in re.findall(r'(?:body|calls|to_apply)=%?([\w.\-]+)', line):
        if callee in computations and not callee.startswith(('fused_', 'wrapped_')):
          visit(callee, times * (repeat or 1), unknown_trips or repeat is None)
      branches = re.search(r'branch_computations=\{([^}]*)\}', line)
      for callee in (branches[1].replace('%', '').split(', ') if branches else ()):
        visit(callee.strip(), times, unknown_trips)
  visit('__entry__', 1, False)
  return dict(totals)


def _shortfall(error: Exception):
  """(required GiB, what XLA counted) from TPU's out-of-HBM compile error, or None."""
  match = _HBM_SHORTFALL.search(str(error))
  if not match:
    return None
  return float(match['need']) * _UNITS[match['unit']] / GIB, match['what']


def compile_shape(config, target: accelerators.Target, mesh, batch_size: int) -> list:
  """What decides how long XLA compiles the step: the key of its earlier compile times. Its
  first three entries (target, slices, model) are the fallback 'same model, other settings'."""
  return [target.name, target.num_slices,
          {'name': config.model.name, **defaults.model_options(config.model)},
          config.get('task', 'classification'), config.image_size, batch_size,
          dict(mesh.shape), config.get('accum_steps', 1)]


def _compile_times_path() -> str:
  return paths.user_cache_path('compile_times.json')


def _compile_times() -> dict:
  try:
    with open(_compile_times_path()) as f:
      return json.load(f)
  except (OSError, ValueError):
    return {}


def expected_compile_s(shape: list) -> tuple[float | None, str]:
  """(seconds, on what basis) an earlier compile of this shape (else of the same model for the
  same target) took on this machine; (None, why not) when there was none."""
  times = _compile_times()
  if (seconds := times.get(json.dumps(shape))) is not None:
    return seconds, 'an earlier compile of the same shape here took that'
  prefix = json.dumps(shape[:3])[:-1] + ','
  similar = [s for key, s in times.items() if key.startswith(prefix)]
  if similar:
    return similar[-1], (f'the last compile of {shape[2]["name"]} for {shape[0]} with other '
                         'settings here took that')
  return None, 'no earlier compile of it here to tell how long; big models take minutes'


def _record_compile_s(shape: list, seconds: float) -> None:
  """Keeps the time (the newest 500 shapes) for the next compile's estimate."""
  times = _compile_times()
  times.pop(json.dumps(shape), None)
  times[json.dumps(shape)] = round(seconds, 1)
  path = _compile_times_path()
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    own = f'{path}.{os.getpid()}.tmp'  # other processes may be writing theirs
    with open(own, 'w') as f:
      json.dump(dict(list(times.items())[-500:]), f, indent=0)
    os.replace(own, path)
  except OSError:
    pass  # an estimate only


def _trace_and_compile(step, args, target: accelerators.Target, progress: bool, shape: list):
  """(the traced step, its compiled executable or TPU's out-of-memory error). With `progress`
  (the program; tests call check() quietly): progress lines, a clean stop on Ctrl-C / SIGTERM,
  and the time recorded for the next compile's estimate."""
  options = GPU_COMPILER_OPTIONS if target.platform == 'cuda' else None

  def work():
    traced = step.trace(*args)  # its jaxpr also gives the FLOPs
    try:
      return traced, traced.lower().compile(options)
    except jax.errors.JaxRuntimeError as e:  # TPU: the program does not fit
      if 'RESOURCE_EXHAUSTED' not in str(e):
        raise
      return traced, e
  if not progress:
    return work()
  expected_s, basis = expected_compile_s(shape)
  slices = f' x {target.num_slices} slices' if target.num_slices > 1 else ''
  doing = (f'compiling the train step of {shape[2]["name"]} (global batch {shape[5]}) for '
           f'{target.name}{slices}, {target.num_devices} devices')
  start = time.perf_counter()
  try:
    return waiting.run_alive(work, doing, expected_s, basis)
  finally:
    _record_compile_s(shape, time.perf_counter() - start)


def check(config, target: accelerators.Target, devices=None,
          batch_size: int | None = None, progress: bool = False) -> dict:
  """Compiles the train step of `config` (at `batch_size`, default config.batch_size) for
  `target`; returns the report's figures. progress: say on stderr what compiles, for how long
  it should, and that it is alive (see `_trace_and_compile`)."""
  from vit_jax.train import trainer  # pylint: disable=g-import-not-at-top  (TensorFlow: ~10 s)
  devices = target.devices() if devices is None else devices
  batch_size = batch_size or config.batch_size
  training = trainer.build(config, devices)
  step = trainer.jit_train_step(
      trainer.make_train_step(config, training, jax.random.key(0)), training)
  batch = trainer.abstract_batch(config, training.mesh, batch_size)
  start = time.perf_counter()
  traced, compiled = _trace_and_compile(
      step, (training.abstract_state, batch), target, progress,
      compile_shape(config, target, training.mesh, batch_size))
  compile_s = time.perf_counter() - start
  state_gib = _state_bytes_per_device(training.abstract_state) / GIB
  report = {'topology': target.name, 'slices': target.num_slices, 'platform': target.platform,
            'devices': target.num_devices, 'mesh': dict(training.mesh.shape),
            'model': config.model.name, 'batch_size': batch_size,
            'per_device_batch': batch_size / math.prod(
                training.mesh.shape[a] for a in ('data', 'fsdp')),
            'device_memory_gib': round(target.device_memory_gib, 2),
            'state_gib': round(state_gib, 6)}
  if isinstance(compiled, Exception):
    required, what = _shortfall(compiled) or (float('nan'), '')
    if what.startswith('HLO temporaries'):  # XLA counted only the temporaries
      required += state_gib
    report |= {'fits': False, 'required_gib': round(required, 2), 'temp_gib': None,
               'compile_s': round(compile_s, 1), 'collectives': {},
               'xla_message': str(compiled).splitlines()[0][:300]}
  else:
    memory = compiled.memory_analysis()
    required = (memory.argument_size_in_bytes + memory.output_size_in_bytes
                - memory.alias_size_in_bytes + memory.temp_size_in_bytes) / GIB
    hlo = compiled.as_text()
    report |= {'fits': required <= target.device_memory_gib,
               'required_gib': round(required, 6),
               'temp_gib': round(memory.temp_size_in_bytes / GIB, 6),
               'compile_s': round(compile_s, 1),
               'collectives': collectives(hlo)}
    if target.platform == 'cuda':
      report['cudnn_fused_attention'] = '__cudnn$fmha' in hlo
  report['headroom_gib'] = round(target.device_memory_gib - report['required_gib'], 2)
  flops_per_step = flops.matmul_flops(traced.jaxpr)
  report['flops_per_step'] = flops_per_step
  report['ideal_step_s'] = flops_per_step / (target.num_devices * target.peak_bf16_flops)
  return report


# Batches above bisection's answer compiled as well: memory need not grow with the batch
# (XLA's choices change with the shapes), so a larger batch may fit where one between did not.
NEIGHBOURS_ABOVE = 2
# The rule every verdict follows, printed with find_batch's answer.
BOUNDARY_RULE = ('a batch fits when its total per device is at most the device memory (equal '
                 'fits); TPU: XLA compiled it (its compiler refuses what does not fit, and '
                 'reports the need rounded to 0.01 GiB, so a refused batch can read "15.75 of '
                 '15.75 GiB")')


def find_batch(config, target: accelerators.Target, devices=None, known: dict | None = None,
               out=None, progress: bool = False) -> tuple[int, dict, list]:
  """The largest global batch that fits (a multiple of the batch-sharding devices times
  accum_steps): doubling from config.batch_size, bisection, then the NEIGHBOURS_ABOVE batches
  above the answer. Each batch is compiled at most once (`known`: {batch: report} already
  compiled, e.g. the config's own); a line per compile with an ETA goes to `out` (stdout).
  Returns (batch, its report, notes): the notes say where memory was not monotonic in the
  batch (then the answer is the largest fitting batch among those compiled)."""
  from vit_jax.train import trainer  # pylint: disable=g-import-not-at-top
  devices = target.devices() if devices is None else devices
  mesh = trainer.build(config, devices).mesh
  unit = mesh.shape['data'] * mesh.shape['fsdp'] * config.get('accum_steps', 1)
  reports = {b // unit: r for b, r in (known or {}).items() if b % unit == 0}
  durations, remaining = [], [None]  # compiles still to come, when known

  def fits(units: int) -> bool:
    if units not in reports:
      start = time.perf_counter()
      reports[units] = check(config, target, devices, units * unit, progress)
      durations.append(time.perf_counter() - start)
      left = remaining[0]
      eta = ('' if left is None else
             f'; at most {left} more, ETA {left * sum(durations) / len(durations):.0f} s')
      report = reports[units]
      print(f'  batch {units * unit}: {report["required_gib"]:.2f} of '
            f'{target.device_memory_gib:.2f} GiB, {"fits" if report["fits"] else "no fit"} '
            f'(compile {len(durations)}, {durations[-1]:.0f} s{eta})', file=out or sys.stdout,
            flush=True)
    return reports[units]['fits']

  def bisect(low: int, high: int) -> int:  # low fits, high does not
    while high - low > 1:
      remaining[0] = math.ceil(math.log2(high - low)) - 1 + NEIGHBOURS_ABOVE
      middle = (low + high) // 2
      low, high = (middle, high) if fits(middle) else (low, middle)
    return low

  units = max(config.batch_size // unit, 1)
  if fits(units):
    low = units
    while fits(low * 2):
      low *= 2
    low = bisect(low, low * 2)
  else:
    high = units
    while high > 1 and not fits(high // 2):
      high //= 2
    if high == 1:
      return 0, reports[1], []
    low = bisect(high // 2, high)
  above = low + 1
  while above <= low + NEIGHBOURS_ABOVE:
    remaining[0] = low + NEIGHBOURS_ABOVE - above
    if fits(above):
      low = above  # a larger batch fits: look past it too
    above += 1
  return low * unit, reports[low], _not_monotonic(reports, unit)


def _not_monotonic(reports: dict, unit: int) -> list:
  """Pairs of compiled batches where the larger one needs less memory, as notes."""
  ordered = sorted((u, r) for u, r in reports.items() if r['required_gib'] == r['required_gib'])
  return [f'batch {b * unit} needs {rb["required_gib"]:.2f} GiB, less than batch {a * unit} '
          f'({ra["required_gib"]:.2f})'
          for (a, ra), (b, rb) in zip(ordered, ordered[1:])
          if rb['required_gib'] < ra['required_gib']]


def _with(config, overrides: dict):
  """A copy of config with dotted keys ('model.remat_policy') set."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    for key, value in overrides.items():
      *parents, leaf = key.split('.')
      node = config
      for parent in parents:
        node = node[parent]
      node[leaf] = value
  return config


def _fixes(config, num_devices: int):
  """Overrides that lower memory without changing the training recipe, most effective last:
  recompute activations, shard parameters and optimizer state over every device, accumulate
  gradients over microbatches (the same update: not a smaller batch, which would change it)."""
  if config.model.get('remat_policy', 'none') != 'full':
    yield {'model.remat_policy': 'full'}
  mesh = config.mesh
  if mesh.get('model', 1) == 1 and mesh.get('fsdp', 1) not in (-1, num_devices):
    yield {'mesh.data': 1, 'mesh.fsdp': -1}
  accum = config.get('accum_steps', 1)  # every task accumulates gradients
  for factor in (2, 4, 8):
    if config.batch_size % (accum * factor * num_devices) == 0:
      yield {'accum_steps': accum * factor}


def suggest_fix(config, target: accelerators.Target, devices,
                progress: bool = False) -> tuple[dict, dict] | None:
  """(overrides, report) of the first of `_fixes` with which the config fits on `target`, each
  alone first, then together; None if nothing does."""
  fixes = list(_fixes(config, target.num_devices))
  together = [dict(collections.ChainMap(*reversed(fixes[:n]))) for n in range(2, len(fixes) + 1)]
  for overrides in fixes + together:
    report = check(_with(config, overrides), target, devices, progress=progress)
    logging.info('with %s: %.2f GiB of %.2f', overrides, report['required_gib'],
                 target.device_memory_gib)
    if report['fits']:
      return overrides, report
  return None


def as_flags(overrides: dict) -> str:
  return ' '.join(f'--config.{key}={value}' for key, value in overrides.items())


def format_report(report: dict) -> str:
  """The human-readable lines above the JSON line."""
  verdict = ('fits' if report['fits'] else
             f'does NOT fit: {-report["headroom_gib"]:.2f} GiB short')
  lines = [
      f'{report["model"]} on {report["topology"]}'
      f'{" x %d slices" % report["slices"] if report.get("slices", 1) > 1 else ""} '
      f'({report["devices"]} devices, mesh '
      f'{report["mesh"]}), global batch {report["batch_size"]} '
      f'({report["per_device_batch"]:g} per device)',
      f'  per device: params + optimizer state {report["state_gib"]:.2f} GiB, temporaries '
      + (f'{report["temp_gib"]:.2f} GiB' if report['temp_gib'] is not None else 'n/a')
      + f', total {report["required_gib"]:.2f} GiB of {report["device_memory_gib"]:.2f} GiB: '
      + verdict,
      f'  compiled in {report["compile_s"]:.1f} s',
      f'  matmul FLOPs per step {report["flops_per_step"]:.3e}; at 100% of peak bf16 the step '
      f'takes at least {report["ideal_step_s"] * 1e3:.3g} ms (a lower bound)']
  for kind, figures in sorted(report['collectives'].items()):
    unknown = figures.get('in_loops_of_unknown_trip_count')
    lines.append(f'  {kind}: {"at least " if unknown else ""}{figures["count"]} per step, '
                 f'{figures["bytes"] / 2**20:.1f} MiB' +
                 (f' ({unknown} of them in loops whose trip count the HLO does not show, '
                  'counted once)' if unknown else ''))
  if 'cudnn_fused_attention' in report:
    lines.append(f'  cuDNN fused attention: {report["cudnn_fused_attention"]}')
  if 'xla_message' in report:
    lines.append(f'  XLA: {report["xla_message"]}')
  return '\n'.join(lines)


def define_flags() -> None:
  config_flags.DEFINE_config_file('config', None, 'Training config file (as for vit_jax.main).',
                                  lock_config=True)
  flags.DEFINE_string('topology', None, 'Target: a TPU accelerator type as for the launcher '
                      f'(e.g. {", ".join(accelerators.EXAMPLES[:-2])}) or h100-N.')
  flags.DEFINE_integer('num_slices', 1, 'Several slices of --topology, data parallel across '
                       'them (mesh.dcn_data=N unless the config sets -1 or N).')
  flags.DEFINE_bool('find_batch', False, 'Also search the largest global batch that fits.')
  flags.DEFINE_bool('suggest', True, 'When it does not fit, compile again with full remat, then '
                    'fsdp over every device, then accum_steps, until it fits, and say with what.')
  flags.mark_flags_as_required(['config', 'topology'])


def with_slices(config, num_slices: int):
  """`config` with data parallelism across `num_slices` slices, as the TPU launcher's
  --num_slices sets it: mesh.dcn_data 1 (the default) becomes num_slices; -1 (all slices) and
  num_slices stay; any other value contradicts --num_slices."""
  dcn_data = config.mesh.get('dcn_data', 1)
  if num_slices == 1 or dcn_data in (-1, num_slices):
    return config
  if dcn_data != 1:
    raise errors.UserError(f'--config.mesh.dcn_data={dcn_data} but --num_slices={num_slices}: '
                           f'data parallelism across slices spans them all (-1 or {num_slices})')
  return _with(config, {'mesh.dcn_data': num_slices})


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  try:
    target = accelerators.get_target(f.topology, f.num_slices)
    config = with_slices(f.config, f.num_slices)
    devices = target.devices()
  except (ValueError, RuntimeError) as e:
    sys.exit(f'error: {e}')
  slices = f' x {target.num_slices} slices' if target.num_slices > 1 else ''
  print(f'{config.model.name} for {target.name}{slices}: loading the trainer to build its train '
        'step', file=sys.stderr, flush=True)  # the imports alone take 5-20 s
  startup.import_tensorflow()  # the trainer's input pipeline imports it: without its chatter
  try:
    report = check(config, target, devices, progress=True)
  except ValueError as e:  # a config that cannot be built (mesh, model, optimizer, ...)
    sys.exit(f'error: {e}')
  print(format_report(report), flush=True)
  if not report['fits'] and f.suggest:
    print('  looking for a change that fits (one compile each):', flush=True)
    fix = suggest_fix(config, target, devices, progress=True)
    report['fix'] = fix and fix[0]
    print(f'  fits with {as_flags(fix[0])} ({fix[1]["required_gib"]:.2f} GiB per device)' if fix
          else '  no fix found among full remat, fsdp over all devices and accum_steps up to 8')
  if f.find_batch:
    print('  searching the largest global batch that fits (one compile per batch):', flush=True)
    largest, largest_report, notes = find_batch(config, target, devices,
                                                known={report['batch_size']: report},
                                                progress=True)
    report['largest_batch'] = largest
    print(f'  largest global batch that fits: {largest} '
          f'({largest_report["required_gib"]:.2f} GiB per device; {BOUNDARY_RULE})')
    if notes:
      report['largest_batch_note'] = 'memory is not monotonic in the batch'
      print('  memory is not monotonic in the batch, so the search cannot rule out a larger '
            'fitting batch between those compiled: ' + '; '.join(notes))
  print(json.dumps(report))


if __name__ == '__main__':
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')  # compile for the target, run nothing here
  startup.begin()
  define_flags()
  app.run(main, flags_parser=config_flag.parse_flags)
