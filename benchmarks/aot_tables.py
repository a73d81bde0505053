r"""Compiled per-device memory on real targets, as Markdown tables for benchmarks/README.md.

    python benchmarks/aot_tables.py fsdp      # per-device GiB as mesh.fsdp grows, fixed batch
    python benchmarks/aot_tables.py recipes   # the i21k recipes without and with FSDP: where
                                              # the state's saving goes (state, temporaries)
    python benchmarks/aot_tables.py presets   # each preset on the slices it may run on
    python benchmarks/aot_tables.py giants    # configs/pretrain_giant.py on its slices and the
                                              # smallest slice of that generation it fits

Everything is compiled with `vit_jax.aot.check`, the check `python -m vit_jax.aot` and the
launcher run: TPU targets need `pip install -e '.[tpu]'`; the h100 rows need jaxlib's CUDA plugin
(about 5 GB: `pip install "jax[cuda12]==<jax version>"`) and are left out without it.
--targets limits the targets; --find_batch adds the largest global batch that fits (several
compiles per cell); --giants limits the giants table's presets (e.g. --giants=22B/14).
"""
import datetime
import importlib
import importlib.metadata
import importlib.util
import os
import sys

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402
import jax  # noqa: E402

from vit_jax import aot  # noqa: E402
from vit_jax.scale import accelerators  # noqa: E402

_TARGETS = flags.DEFINE_list('targets', None, 'Only these targets (e.g. v5litepod-16,h100-8).')
_FIND_BATCH = flags.DEFINE_bool('find_batch', False, 'Add the largest global batch that fits.')
_GIANTS = flags.DEFINE_list('giants', None, 'Only these configs/pretrain_giant.py presets.')

# (model, target, global batch, remat policy, fsdp sizes): the ViT-S/16 case, then the
# sizes FSDP is for, with full remat so that parameters and optimizer state weigh.
FSDP_CASES = (
    ('ViT-S_16', 'v5litepod-16', 256, 'none', (1, 4, 16)),
    ('ViT-B_16', 'v5litepod-16', 1024, 'full', (1, 4, 16)),
    ('ViT-H_14', 'v4-64', 1024, 'full', (1, 4, 8, 32)),
    ('ViT-S_16', 'h100-8', 256, 'none', (1, 8)),
    ('ViT-B_16', 'h100-8', 1024, 'full', (1, 8)),
    ('ViT-H_14', 'h100-8', 256, 'full', (1, 8)),
)
# (pretrain_i21k preset, its slice, fsdp sizes): the recipe as shipped but for mesh.fsdp.
RECIPE_FSDP = (
    ('B/16', 'v5litepod-16', (1, 16)),
    ('L/16', 'v4-64', (1, 8)),
    ('H/14', 'v4-64', (1, 8)),
)
# (config file, argument, targets): each preset's own slice first.
PRESETS = (
    ('pretrain_i21k', 'B/16', ('v5litepod-16', 'h100-8')),
    ('pretrain_i21k', 'L/16', ('v4-64', 'h100-16')),
    ('pretrain_i21k', 'H/14', ('v4-64', 'v5p-128', 'h100-16')),
    ('pretrain_jft', 'B/16', ('v5litepod-16',)),
    ('finetune', 'cifar10', ('v5litepod-8', 'h100-8')),
    ('mae_i1k', '', ('v5litepod-16', 'h100-8')),
)


def _target(target_name: str):
  """(Target, its devices), or None for a target --targets leaves out or this install cannot
  compile for (Target.devices names the missing plugin)."""
  if _TARGETS.value and target_name not in _TARGETS.value:
    return None
  target = accelerators.get_target(target_name)
  try:
    return target, target.devices()
  except RuntimeError as e:
    logging.warning('skipping %s: %s', target_name, e)
    return None


def _preset(config_name: str, arg: str):
  module = importlib.import_module(f'configs.{config_name}')
  return module.get_config(arg) if arg else module.get_config()


def _gib(report: dict) -> str:
  return f'{report["required_gib"]:.2f}' + ('' if report['fits'] else ' (no fit)')


def fsdp_table() -> list:
  from configs import pretrain_i21k  # pylint: disable=g-import-not-at-top
  all_fsdp = sorted({f for *_, sizes in FSDP_CASES for f in sizes})
  lines = ['| model, target, global batch, remat | ' + ' | '.join(f'fsdp={f}' for f in all_fsdp)
           + ' |', '|---|' + '---|' * len(all_fsdp)]
  for model, target_name, batch, remat, sizes in FSDP_CASES:
    if not (found := _target(target_name)):
      continue
    target, devices = found
    cells = {}
    for fsdp in sizes:
      config = pretrain_i21k.get_config('B/16')
      with config.unlocked():
        config.model = dict(name=model, dtype='bfloat16', scan_layers=True, remat_policy=remat)
        config.num_classes, config.loss = 1000, 'softmax_xent'
        config.batch_size, config.mesh = batch, dict(data=-1, fsdp=fsdp, model=1)
      report = aot.check(config, target, devices)
      logging.info('%s %s fsdp=%d: %s', model, target_name, fsdp, report)
      cells[fsdp] = _gib(report)
    lines.append(f'| {model}, {target_name}, {batch}, {remat} | ' +
                 ' | '.join(cells.get(f, '') for f in all_fsdp) + ' |')
  return lines


def recipes_table() -> list:
  """Per device: parameters + optimizer state, temporaries and total, at fsdp=1 and with FSDP,
  and how much of the state's saving reaches the total."""
  from configs import pretrain_i21k  # pylint: disable=g-import-not-at-top
  lines = ['| recipe, target | fsdp | state GiB | temporaries GiB | total GiB | total saved / '
           'state saved |', '|---|---|---|---|---|---|']
  for preset, target_name, sizes in RECIPE_FSDP:
    if not (found := _target(target_name)):
      continue
    target, devices = found
    first = None
    for fsdp in sizes:
      config = pretrain_i21k.get_config(preset)
      with config.unlocked():
        config.mesh = dict(data=-1, fsdp=fsdp, model=1)
      report = aot.check(config, target, devices)
      logging.info('%s %s fsdp=%d: %s', preset, target_name, fsdp, report)
      first = first or report
      state_saved = first['state_gib'] - report['state_gib']
      saved = (f'{(first["required_gib"] - report["required_gib"]) / state_saved:.0%}'
               if state_saved else '')
      temp = '' if report['temp_gib'] is None else f'{report["temp_gib"]:.2f}'
      lines.append(f'| pretrain_i21k:{preset}, {target_name} | {fsdp} | '
                   f'{report["state_gib"]:.2f} | {temp} | {_gib(report)} | {saved} |')
  return lines


def presets_table() -> list:
  lines = ['| preset | target | mesh | batch (per device) | GiB per device | headroom GiB | '
           'largest batch | ideal step | compile s |', '|---|---|---|---|---|---|---|---|---|']
  for config_name, arg, targets in PRESETS:
    for target_name in targets:
      if not (found := _target(target_name)):
        continue
      target, devices = found
      config = _preset(config_name, arg)
      report = aot.check(config, target, devices)
      largest = (aot.find_batch(config, target, devices, known={report['batch_size']: report})[0]
                 if _FIND_BATCH.value else '')
      logging.info('%s:%s on %s: %s', config_name, arg, target_name, report)
      mesh = 'x'.join(str(report['mesh'][a]) for a in ('data', 'fsdp', 'model'))
      lines.append(
          f'| {config_name}:{arg} | {target_name} | {mesh} | {report["batch_size"]} '
          f'({report["per_device_batch"]:g}) | {_gib(report)} | {report["headroom_gib"]:.2f} | '
          f'{largest} | {report["ideal_step_s"] * 1e3:.0f} ms | {report["compile_s"]:.0f} |')
  return lines


# Doublings tried above a documented slice that does not fit.
MAX_DOUBLINGS = 3


def _resized(target_name: str, factor: float) -> str:
  generation, count = target_name.rsplit('-', 1)
  return f'{generation}-{int(int(count) * factor)}'


def smallest_slice(config, documented: str, check=aot.check) -> tuple[list, str | None]:
  """Compiles `config` as shipped (its global batch; FSDP over every chip) on the `documented`
  slice, then on slices of the same generation half as large while it fits, or twice as large
  (MAX_DOUBLINGS times) while it does not. Returns ([(slice, report)] in compile order, the
  smallest slice it fits, or None)."""
  tried, name, smallest = [], documented, None
  while True:
    try:
      target = accelerators.get_target(name)
    except ValueError:  # below the generation's smallest slice
      return tried, smallest
    report = check(config, target)
    logging.info('on %s: %s', name, report)
    tried.append((name, report))
    if report['fits']:
      smallest, name = name, _resized(name, 1 / 2)
    elif smallest or len(tried) > MAX_DOUBLINGS:
      return tried, smallest
    else:
      name = _resized(name, 2)
    if name in dict(tried):  # the half of a slice reached by doubling: known not to fit
      return tried, smallest


def _collective_gib(report: dict) -> str:
  """All-gather / reduce-scatter / all-reduce GiB per device per step (n/a: no fit)."""
  if not report['fits']:
    return 'n/a'
  moved = report['collectives']
  return ' / '.join(f'{moved.get(k, {}).get("bytes", 0) / 2**30:.1f}'
                    for k in ('all-gather', 'reduce-scatter', 'all-reduce'))


def giants_table() -> list:
  from configs import pretrain_giant  # pylint: disable=g-import-not-at-top
  lines = ['| preset | slice | chips | batch per chip | state GiB | total GiB per chip | '
           'ideal step | all-gather / reduce-scatter / all-reduce GiB per chip per step | '
           'compile s |', '|---|---|---|---|---|---|---|---|---|']
  for arg in _GIANTS.value or pretrain_giant.ARGS:
    documented = pretrain_giant.PRESETS[arg][-1]
    tried, smallest = smallest_slice(pretrain_giant.get_config(arg), documented)
    for name, report in tried:
      notes = [n for n, hit in (('documented', name == documented),
                                ('smallest that fits', name == smallest)) if hit]
      lines.append(
          f'| {arg} | {name}{" (" + ", ".join(notes) + ")" if notes else ""} | '
          f'{report["devices"]} | {report["per_device_batch"]:g} | {report["state_gib"]:.2f} | '
          f'{_gib(report)} | {report["ideal_step_s"]:.2f} s | {_collective_gib(report)} | '
          f'{report["compile_s"]:.0f} |')
  return lines


def main(argv):
  tables = {'fsdp': fsdp_table, 'recipes': recipes_table, 'presets': presets_table,
            'giants': giants_table}
  if len(argv) != 2 or argv[1] not in tables:
    raise app.UsageError(f'name one table: {sorted(tables)}')
  versions = ', '.join(f'{p} {importlib.metadata.version(p)}' for p in ('jax', 'libtpu')
                       if importlib.util.find_spec(p.replace('-', '_')))
  print(f'Compiled {datetime.date.today()} with {versions}; data=-1 takes the devices fsdp '
        f'leaves; GiB per device = XLA\'s arguments + outputs - aliased + temporaries.')
  print('\n'.join(tables[argv[1]]()))


if __name__ == '__main__':
  jax.config.update('jax_platforms', 'cpu')
  app.run(main)
