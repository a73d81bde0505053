"""Training checkpoints: the whole TrainState through an Orbax CheckpointManager under
WORKDIR/checkpoints/<step>/, the run's config beside them, and a run's params read back as
numpy (for transfer from a workdir). Released weight files are `vit_jax.weights.files`."""
import json

from absl import logging
import flax
import jax
import numpy as np
import orbax.checkpoint as ocp

from vit_jax.storage import paths


def has_checkpoints(workdir: str) -> bool:
  """Whether WORKDIR has a checkpoint directory (complete steps or not), without creating it."""
  return (paths.resolve(workdir) / 'checkpoints').exists()


def make_manager(workdir: str, *, max_to_keep: int = 3, save_interval_steps: int = 1,
                 async_save: bool = True) -> ocp.CheckpointManager:
  """CheckpointManager on WORKDIR/checkpoints/<step>/.

  Orbax writes each step to a temporary directory and renames it only when complete, so a run
  killed mid-save never restores a half-written step.
  """
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, save_interval_steps=save_interval_steps,
      enable_async_checkpointing=async_save, create=True)
  # The handler named up front lets the manager read a step's metadata before any save or
  # restore (start-up checks it), without Orbax warning of missing metadata files.
  return ocp.CheckpointManager(paths.resolve(workdir) / 'checkpoints', options=options,
                               item_handlers=ocp.StandardCheckpointHandler())


def save_state(manager: ocp.CheckpointManager, step: int, state, *, force: bool = False) -> bool:
  return manager.save(step, args=ocp.args.StandardSave(state), force=force)


# Orbax writes this file into a step directory before it finalises (renames) it.
_STEP_METADATA = '_CHECKPOINT_METADATA'


def latest_complete_step(manager: ocp.CheckpointManager) -> int | None:
  """The newest step Orbax finished writing; None when there is none.

  Orbax never lists its temporary directories (`<step>.orbax-checkpoint-tmp-*`); a step directory
  without Orbax's metadata (e.g. left by an interrupted copy) is skipped too.
  """
  steps = sorted(manager.all_steps(), reverse=True)
  for step in steps:
    if (paths.resolve(manager.directory) / str(step) / _STEP_METADATA).exists():
      return step
    logging.warning('skipping incomplete checkpoint %s/%d', manager.directory, step)
  if steps:
    raise ValueError(f'{manager.directory} holds step directories {steps} but none is a complete '
                     'Orbax checkpoint; move them away to start from scratch')
  return None


def flat_shapes(params) -> dict:
  """{'/'-joined name: shape} of a params tree (arrays, ShapeDtypeStructs or Orbax metadata)."""
  return {k: tuple(v.shape) for k, v in
          flax.traverse_util.flatten_dict(flax.core.unfreeze(params), sep='/').items()}


def saved_param_shapes(manager: ocp.CheckpointManager, step: int) -> dict:
  """flat_shapes of the params a training checkpoint holds, read from its metadata only."""
  return flat_shapes(manager.item_metadata(step)['params'])


def restore_state(manager: ocp.CheckpointManager, abstract_state, step: int | None = None):
  """Restores `step` (default: newest complete) into the shapes/shardings of `abstract_state`."""
  step = latest_complete_step(manager) if step is None else step
  return manager.restore(step, args=ocp.args.StandardRestore(abstract_state))


# Beside the checkpoints: the run's config, for programs that rebuild its model (predict).
RUN_CONFIG = 'config.json'


def write_run_config(workdir: str, config) -> None:
  if jax.process_index() == 0:
    directory = paths.resolve(workdir)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / RUN_CONFIG).write_text(config.to_json_best_effort(indent=2))


def read_run_config(path: str) -> dict:
  """The config a training workdir was run with ({} for files, or runs from before it was kept)."""
  config_path = paths.resolve(path) / RUN_CONFIG
  if not config_path.is_file():
    return {}
  return json.loads(config_path.read_text())


def restore_params(workdir: str) -> dict:
  """The params of the newest complete Orbax checkpoint under WORKDIR[/checkpoints], as numpy."""
  ckpt_dir = paths.resolve(workdir) / 'checkpoints'
  ckpt_dir = ckpt_dir if ckpt_dir.is_dir() else paths.resolve(workdir)
  # Read through a manager (not a PyTreeCheckpointer on `<step>/default`), which finds Orbax's
  # metadata at the step level where the trainer's manager wrote it: no "Metadata file does
  # not exist" warning.
  manager = ocp.CheckpointManager(ckpt_dir, item_handlers=ocp.PyTreeCheckpointHandler())
  step = latest_complete_step(manager)
  if step is None:
    raise ValueError(f'{workdir} is a directory without a complete training checkpoint '
                     f'(looked in {ckpt_dir})')
  params_meta = manager.item_metadata(step).tree['params']
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), params_meta)
  restored = manager.restore(step, args=ocp.args.PyTreeRestore(
      item={'params': params_meta}, restore_args={'params': restore_args}, partial_restore=True))
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(restored['params']), sep='/')
