"""Training checkpoints (Orbax) and released-format weights (.npz) import/export."""
import os

import flax
import jax
import numpy as np
import orbax.checkpoint as ocp
import scipy.ndimage

from vit_jax.models import mae


# --- training checkpoints ----------------------------------------------------------------------

def make_manager(workdir: str, *, max_to_keep: int = 3, save_interval_steps: int = 1,
                 async_save: bool = True) -> ocp.CheckpointManager:
  """CheckpointManager on WORKDIR/checkpoints/<step>/.

  Orbax writes each step to a temporary directory and renames it only when complete, so a run
  killed mid-save never restores a half-written step.
  """
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, save_interval_steps=save_interval_steps,
      enable_async_checkpointing=async_save, create=True)
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), 'checkpoints'),
                               options=options)


def save_state(manager: ocp.CheckpointManager, step: int, state, *, force: bool = False) -> bool:
  return manager.save(step, args=ocp.args.StandardSave(state), force=force)


def restore_state(manager: ocp.CheckpointManager, abstract_state, step: int | None = None):
  """Restores `step` (default: newest) into the shapes/shardings of `abstract_state`."""
  step = manager.latest_step() if step is None else step
  return manager.restore(step, args=ocp.args.StandardRestore(abstract_state))


# --- released .npz weights ---------------------------------------------------------------------

def _flatten(params) -> dict:
  return {k: np.asarray(v) for k, v in
          flax.traverse_util.flatten_dict(flax.core.unfreeze(params), sep='/').items()}


def save_npz(params, path: str) -> None:
  """Writes params in the released vit_jax layout: one array per '/'-joined key."""
  with open(path, 'wb') as f:
    np.savez(f, **_flatten(jax.device_get(params)))


def load_workdir(workdir: str) -> dict:
  """The params of the newest complete training checkpoint in WORKDIR/checkpoints, as numpy."""
  directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
  steps = ocp.utils.checkpoint_steps(directory) if os.path.isdir(directory) else []
  if not steps:
    raise ValueError(f'init_from={workdir!r} is a directory without a complete training '
                     f'checkpoint under {directory}')
  with ocp.CheckpointManager(directory) as manager:
    restored = manager.restore(max(steps), args=ocp.args.StandardRestore())
  return jax.tree.map(np.asarray, flax.core.unfreeze(restored['params']))


def load(path: str) -> dict:
  """Loads a released vit_jax .npz into our parameter tree (never unpickles)."""
  with np.load(path, allow_pickle=False) as npz:
    flat = {k: npz[k] for k in npz.files}
  return flax.traverse_util.unflatten_dict(flat, sep='/')


def resize_posemb(posemb: np.ndarray, target_tokens: int) -> np.ndarray:
  """Resizes (1, N[+1], D) position embeddings to (1, target_tokens, D) by 2D interpolation.

  Whether a class-token embedding leads is decided by an exact square test on both sides.
  """
  n, target = posemb.shape[1], target_tokens
  if n == target:
    return posemb

  def grid_and_extra(tokens, what):
    for extra in (0, 1):
      side = int(round(np.sqrt(tokens - extra)))
      if side * side == tokens - extra:
        return side, extra
    raise ValueError(f'{what} position embeddings have {tokens} tokens: neither a square grid '
                     'nor a square grid plus a class token')

  old_side, extra = grid_and_extra(n, 'checkpoint')
  new_side, new_extra = grid_and_extra(target, 'model')
  if new_extra != extra:
    raise ValueError(f'checkpoint position embeddings {"have" if extra else "lack"} a class-token '
                     f'entry but the model {"needs" if new_extra else "has"} none ({n} vs {target})')
  head, grid = posemb[:, :extra], posemb[0, extra:].reshape(old_side, old_side, -1)
  zoom = (new_side / old_side, new_side / old_side, 1)
  grid = scipy.ndimage.zoom(grid, zoom, order=1).reshape(1, new_side * new_side, -1)
  return np.concatenate([head, grid.astype(posemb.dtype)], axis=1)


def load_pretrained(path: str, init_params) -> dict:
  """Pretrained weights for transfer into the tree of `init_params`.

  `path` is a released .npz or the workdir of an earlier run (its newest checkpoint). Head (and
  pre_logits where the target has none) come from `init_params`; parts only pretraining uses
  (an MAE decoder, masked patch prediction's mask embedding and head) are dropped; position
  embeddings are resized to the target grid; every other leaf must match in name and shape.
  """
  loaded = _flatten(load_workdir(path) if os.path.isdir(path) else load(path))
  target = _flatten(init_params)
  merged, problems = {}, []
  for key, value in target.items():
    top = key.split('/')[0]
    if top == 'head' or key not in loaded:
      if top not in ('head', 'pre_logits'):
        problems.append(f'missing in checkpoint: {key}')
      merged[key] = value
      continue
    restored = loaded[key]
    if key.endswith('pos_embedding') and restored.shape != value.shape:
      restored = resize_posemb(restored, value.shape[1])
    if restored.shape != value.shape:
      problems.append(f'shape mismatch for {key}: checkpoint {restored.shape}, model {value.shape}')
    merged[key] = restored.astype(value.dtype)
  unused = sorted(k for k in loaded if k not in target
                  and k.split('/')[0] not in ('pre_logits',) + mae.PRETRAINING_ONLY)
  problems += [f'not in model: {k}' for k in unused]
  if problems:
    raise ValueError(f'cannot load {path} into this model:\n  ' + '\n  '.join(problems))
  return flax.traverse_util.unflatten_dict(merged, sep='/')
