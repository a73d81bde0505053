"""Start-up checks: everything a run will use, checked before anything compiles or trains.

A mistake that would otherwise surface at the first evaluation (hours in with a recipe's
`eval_every`) or never (silently dropped pixels, out-of-range class ids) stops the run here with
one or two lines naming the config key, file, split or value and the fix.
"""
import contextlib
import io
import os
import re
import socket
import sys
import uuid

from absl import logging
import jax
import orbax.checkpoint as ocp
import tensorflow_datasets as tfds

from vit_jax import models
from vit_jax.cli import errors
from vit_jax.storage import paths
from vit_jax.weights import train_state
from vit_jax.data import ops, pipeline, sources
from vit_jax.train import tasks


class PreflightError(errors.UserError):
  """A run that cannot succeed, found before step 1."""


def check(config, workdir: str, model, mesh) -> None:
  """Raises PreflightError for the first problem found; returns None when the run can start."""
  # First: it leaves nothing behind, and a bucket out of reach is named before any other work.
  _check_workdir_writable(workdir)
  _check_batch_sizes(config, mesh)
  _check_image_size(config, model)
  for key, spec in _preprocessing(config):
    _check_preprocessing(config, key, spec)
  for data, split, key in _splits(config):
    _check_split(config, data, split, key)
  for key, spec, split in _model_inputs(config):
    _check_model_inputs(config, key, spec, split)
  if config.get('init_from') and not paths.resolve(config.init_from).exists():
    raise PreflightError(f'init_from={config.init_from}: no such file or directory; give a '
                         'released .npz / .safetensors file or an earlier run\'s workdir')


def _check_batch_sizes(config, mesh) -> None:
  batch_devices = mesh.shape['data'] * mesh.shape['fsdp']  # the batch is split over both
  for key in ('batch_size', 'eval_batch_size'):
    value = config.get(key) or config.batch_size
    for count, what in ((jax.process_count(), 'processes'), (batch_devices,
                                                               'batch-sharding devices')):
      if value % count:
        raise PreflightError(f'{key}={value} is not divisible by the {count} {what} (mesh '
                             f'{dict(mesh.shape)}); use a multiple of {count}, e.g. '
                             f'{max(count, value // count * count)}')


def _check_image_size(config, model) -> None:
  pixels = models.pixels_per_token(model)
  if config.image_size % pixels:
    raise PreflightError(
        f'image_size={config.image_size} is not a multiple of the patch size {pixels} of '
        f'{config.model.name}: {config.image_size % pixels} pixels per side would be dropped; '
        f'use e.g. image_size={config.image_size // pixels * pixels or pixels}')


def _preprocessing(config) -> list:
  specs = [('pp_train', config.pp_train)]
  if config.data.get('eval_split'):
    specs.append(('pp_eval', config.pp_eval))
  if config.get('fewshot') and config.fewshot.get('dataset'):
    specs.append(('fewshot.pp', config.fewshot.pp))
  return specs


def _check_preprocessing(config, key: str, spec: str) -> None:
  try:
    ops.parse_preprocess(spec) if key == 'pp_train' else ops.get_preprocess_fn(spec)
  except ValueError as e:
    raise PreflightError(f'{key}: {e}') from None
  if not tasks.get(config).has_labels or key == 'fewshot.pp':
    return
  for k in re.findall(r'\bonehot\(\s*(\d+)', spec):
    if int(k) != config.num_classes:
      raise PreflightError(f'{key} has onehot({k}) but num_classes={config.num_classes}; make '
                           'them equal (the labels and the head must have the same classes)')


def _model_inputs(config) -> list:
  """(key, preprocessing string, split it reads) of what reaches the model."""
  inputs = [('pp_train', config.pp_train, config.data.train_split)]
  if config.data.get('eval_split'):
    inputs.append(('pp_eval', config.pp_eval, config.data.eval_split))
  return inputs


def _check_model_inputs(config, key: str, spec: str, split: str) -> None:
  """The examples `spec` makes of `split` hold what the model and the loss take: images of
  image_size, and labels over num_classes where the task has labels. Traced on the split's
  record parser, so nothing is read or decoded."""
  example = pipeline.example_spec(pipeline.source(config.data, split), spec)
  size = config.image_size
  image = example.get('image')
  if image is None:
    raise PreflightError(f'{key}={spec!r} gives no \'image\'; the model needs one')
  if image.shape.is_fully_defined() and tuple(image.shape) != (size, size, 3):
    raise PreflightError(f'{key} gives images of shape {tuple(image.shape)} but the model takes '
                         f'({size}, {size}, 3) (image_size={size}); resize or crop to {size}')
  if tasks.get(config).has_labels and 'labels' not in example:
    raise PreflightError(f'{key}={spec!r} gives no \'labels\' for the loss; end it with '
                         f'onehot({config.num_classes}) (or another label op)')


def _splits(config) -> list:
  """(data config, split, config key) of every split the run reads."""
  splits = [(config.data, config.data.train_split, 'data.train_split')]
  if config.data.get('eval_split'):
    splits.append((config.data, config.data.eval_split, 'data.eval_split'))
  if config.get('fewshot') and config.fewshot.get('dataset'):
    fewshot_data = {'name': config.fewshot.dataset, 'data_dir': config.data.get('data_dir', '')}
    splits += [(fewshot_data, config.fewshot.train_split, 'fewshot.train_split'),
               (fewshot_data, config.fewshot.test_split, 'fewshot.test_split')]
  return splits


def _check_split(config, data, split: str, key: str) -> None:
  if data.get('path'):
    try:
      info = sources.read_record_info(data['path'], split)
    except (FileNotFoundError, errors.UserError) as e:
      hint = _record_split_hint(config, data['path'], split, key)
      raise PreflightError(f'{key}={split!r}: {hint or e}') from None
    if info['num_examples'] == 0:
      raise PreflightError(f'{key}={split!r}: {sources.record_info_path(data["path"], split)} '
                           'lists 0 examples; write the split again with make_records')
    _check_record_classes(config, data, split, key, info)
    return
  if not data.get('name'):
    return  # the pipeline's own error names both keys
  with _tfds_warnings_hidden():  # of the version folder it is about to prepare
    try:  # a data_dir only a mount can serve, or storage that does not answer
      builder = sources.tfds_builder(data['name'], data.get('data_dir') or None)
    except errors.UserError as e:
      raise PreflightError(str(e)) from None
    builder = _prepare(builder)
  try:
    sources.check_random_access(builder)
  except ValueError as e:
    raise PreflightError(f'{key}={split!r}: {e}') from None
  try:
    num_examples = builder.info.splits[split].num_examples
  except (KeyError, ValueError) as e:
    raise PreflightError(f'{key}={split!r}: tfds dataset {data["name"]} has no such split '
                         f'(it has {sorted(builder.info.splits)}): {e}') from None
  if num_examples == 0:
    raise PreflightError(f'{key}={split!r}: tfds dataset {data["name"]} has 0 examples there')


def _record_split_hint(config, path: str, split: str, key: str) -> str | None:
  """When `path` holds other splits than `split` (make_records wrote a SPLIT.json for each), the
  key to set to one of them: a user with train and val records wants data.eval_split=val,
  not to write a 'test' split."""
  if paths.resolve(sources.record_info_path(path, split)).exists():
    return None  # the split is there; what is wrong with it is the reader's message
  splits = paths.within_deadline(
      lambda: sorted(p.name[:-len('.json')] for p in paths.resolve(path).glob('*.json')),
      f'listing record set {path}')
  others = [s for s in splits if key == 'data.train_split' or s != config.data.train_split]
  if not others:
    return None
  return (f'{path} has no split {split!r}, only {", ".join(splits)}: set --config.{key}='
          f'{others[0]} (or write {split!r}: python -m vit_jax.data.make_records --output={path} '
          f'--split={split} ...)')


def _check_record_classes(config, data, split: str, key: str, info: dict) -> None:
  """The classes the records declare against the config's: more would train out of range;
  fewer in the training split usually mean a config left at another dataset's head (an
  18,291-way head on 3 classes). An evaluation split may lack some classes."""
  configured = config.data.get('num_classes') or config.get('num_classes')
  declared = info.get('num_classes', 0)
  if not configured or not declared or declared == configured:
    return
  if declared > configured or key == 'data.train_split':
    raise PreflightError(
        f'{sources.record_info_path(data["path"], split)} declares num_classes={declared} but '
        f'the config has data.num_classes={configured}; set --config.data.num_classes='
        f'{declared} (or write the records with make_records --num_classes={configured})')


@contextlib.contextmanager
def _tfds_warnings_hidden():
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)
  try:
    yield
  finally:
    logging.set_verbosity(verbosity)


def _prepare(builder):
  """The builder to read the dataset with, prepared first where it is not (on process 0 only:
  `sources.prepare_tfds`), saying so in one line. tfds's own progress bars are shown on a
  terminal only (in a log file they are control codes); its "Downloading and preparing dataset
  Unknown size" line is left out for the project's builders, which download nothing."""
  offline, out = _builds_offline(builder), sys.stdout

  def before_preparing(builder):
    _check_can_prepare(builder)
    if not sys.stderr.isatty():
      tfds.disable_progress_bar()
    # Past process 0, a process prepares only what its host's disk lacks (prepare_tfds).
    process = jax.process_index()
    who, whose = (f'process {process}: ', ', this host\'s own copy') if process else ('', '')
    print(f'{who}preparing tfds dataset {builder.name} in {builder.data_dir_root}{whose} '
          f'(once; {"made locally, no download" if offline else "downloads it first"})',
          file=out, flush=True)
  with contextlib.redirect_stdout(io.StringIO()) if offline else contextlib.nullcontext():
    return sources.prepare_tfds(builder, before_preparing=before_preparing)


def _builds_offline(builder) -> bool:
  """The project's own tfds builders make their data locally, without downloads."""
  return type(builder).__module__.startswith('vit_jax.')


def _online(timeout_s: float = 3.) -> bool:
  try:
    socket.create_connection(('storage.googleapis.com', 443), timeout=timeout_s).close()
    return True
  except OSError:
    return False


def _check_can_prepare(builder) -> None:
  """An unprepared dataset on an offline machine: say so now instead of retrying downloads."""
  if _builds_offline(builder) or _online():
    return
  raise PreflightError(
      f'tfds dataset {builder.name} is not prepared in data_dir {builder.data_dir_root} and this '
      f'machine is offline; prepare it where there is internet (python -c "import '
      f'tensorflow_datasets as tfds; tfds.builder(\'{builder.name}\', data_dir=DIR)'
      f'.download_and_prepare(file_format=\'array_record\')") and copy DIR here, or set '
      f'--config.data.data_dir to it')


# A gs:// workdir whose storage cannot be reached, or does not answer, is named within this long.
WORKDIR_PROBE_S = 20.


def _check_workdir_writable(workdir: str) -> None:
  """Writes and removes a file of its own in the workdir or, where the workdir does not exist
  yet, a folder of its own in the nearest folder that does (where it would be made). Nothing
  is made or removed that another process starting at the same time could use (the tasks of
  a SLURM job on one shared folder), and a run that stops later in its start-up leaves the
  filesystem as it found it."""
  directory = paths.resolve(workdir)
  probe = f'.write_probe_{uuid.uuid4().hex}'
  try:
    if paths.is_remote(directory):
      _probe_bucket(directory / probe, workdir)
      return
    existing = next(d for d in [directory, *directory.parents] if d.exists())
    if existing == directory:
      (directory / probe).write_text('ok')
      (directory / probe).unlink()
    else:
      (existing / probe).mkdir()
      (existing / probe).rmdir()
  except OSError as e:
    raise PreflightError(f'--workdir={workdir} is not writable ({e}); choose a folder or '
                         'bucket this machine can write to') from None


def _probe_bucket(probe, workdir: str) -> None:
  """Writes and removes `probe`, within WORKDIR_PROBE_S; an endpoint that does not take a
  connection is named at once."""
  def write_and_remove():
    probe.write_text('ok')
    probe.unlink()
  try:
    paths.check_reachable(str(probe), f'--workdir={workdir}')
    paths.within_deadline(write_and_remove, f'--workdir={workdir}', WORKDIR_PROBE_S)
  except errors.UserError as e:  # out of reach, or no answer in time
    raise PreflightError(str(e)) from None


def check_workdir_model(manager: ocp.CheckpointManager, step: int, abstract_params,
                        workdir: str) -> None:
  """A workdir whose checkpoint holds another model (a re-run with another model.name) is named
  with its first mismatched parameter, before Orbax fails on it in hundreds of lines."""
  saved = train_state.saved_param_shapes(manager, step)
  wanted = train_state.flat_shapes(abstract_params)
  # A shape mismatch says more than a missing name, so those come first.
  for key in sorted(set(saved) | set(wanted), key=lambda k: (k not in saved or k not in wanted, k)):
    if saved.get(key) != wanted.get(key):
      raise PreflightError(
          f'--workdir={workdir} holds a checkpoint (step {step}) of a different model: parameter '
          f'{key} is {saved.get(key, "absent")} there but {wanted.get(key, "absent")} in this '
          f'config\'s model; use a new --workdir, '
          'or the config that run used')
