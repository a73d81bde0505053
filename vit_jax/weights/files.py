"""Weights files in and out: released vit_jax / big_vision .npz, timm / Hugging Face
.safetensors and a run's workdir into our parameter tree; our params out as a released-layout
.npz; and the transfer merge (`load_pretrained`: new head, position embeddings resized to the
new grid, pretraining-only parts dropped). Key layouts are in `vit_jax.weights.formats`."""
import flax
import flax.linen as nn
import jax
import numpy as np
import scipy.ndimage

from vit_jax.scale import sharding
from vit_jax.storage import paths
from vit_jax.weights import formats, train_state
from vit_jax.models import mae


def _flatten(params) -> dict:
  """{'a/b': leaf} of a params tree; leaves stay what they are (boxed, jax.Array, numpy)."""
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(params), sep='/')


def _is_box(leaf) -> bool:
  return isinstance(leaf, nn.meta.AxisMetadata)  # nn.LogicallyPartitioned from model.init


def _unbox(leaf):
  return leaf.unbox() if _is_box(leaf) else leaf


def _host_flat(params) -> dict:
  """{'a/b': np.ndarray}: unboxed, fetched from the devices (from every process's devices when
  the arrays span processes: then every process must call it)."""
  return {k: np.asarray(v) for k, v in _flatten(sharding.to_host(nn.unbox(params))).items()}


def save_npz(params, path: str) -> None:
  """Writes params in the released vit_jax layout: one float array per '/'-joined key.

  `params`: unboxed or boxed (`model.init(...)['params']`), scanned or not, numpy or jax arrays.
  Scanned blocks are written per layer (`encoderblock_{i}`) and bfloat16 as float32 (exact, and
  every reader knows float32; numpy would store bfloat16 as opaque 2-byte records), so other
  tools read the file. Sharded across processes, every process must call it; process 0 writes.
  """
  flat = {k: v.astype(np.float32) if v.dtype.kind == 'V' else v  # bfloat16 is kind 'V'
          for k, v in _host_flat(params).items()}
  if jax.process_index() == 0:
    with paths.resolve(path).open('wb') as f:
      np.savez(f, **formats.unscan(flat))


def load(path: str, num_heads: int | None = None) -> dict:
  """Loads weights into our (unscanned) parameter tree; never unpickles.

  `path`: a vit_jax or big_vision .npz, timm / Hugging Face .safetensors (the layout is detected
  from the keys), or the workdir of an earlier run (its newest checkpoint's params). PyTorch
  files do not record the number of heads: it is taken from the width of the named variants
  unless given. Unknown or missing keys raise, naming them.
  """
  if paths.resolve(path).is_dir():
    flat = formats.unscan(train_state.restore_params(path))
  else:
    flat, _ = formats.to_vit_jax(formats.read_flat(path), path, num_heads)
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
  grid = _zoom(grid, (new_side / old_side, new_side / old_side, 1))
  return np.concatenate([head, grid.reshape(1, new_side * new_side, -1)], axis=1)


def _zoom(value: np.ndarray, factors) -> np.ndarray:
  """Linear interpolation by `factors` per axis, in at least float32 (scipy takes no bfloat16
  or float16), cast back to `value`'s dtype."""
  wide = value.astype(np.promote_types(value.dtype, np.float32))
  return scipy.ndimage.zoom(wide, factors, order=1).astype(value.dtype)


def _resize_to(key: str, value: np.ndarray, shape: tuple) -> np.ndarray:
  """Grid-shaped leaves follow a new image size: 1D/2D position embeddings, relative biases."""
  if key.endswith('/pos_embedding'):
    return resize_posemb(value, shape[1])
  if key.endswith(('/pos_embedding_x', '/pos_embedding_y', '/relative_bias')) and (
      value.ndim == len(shape)):
    return _zoom(value, np.divide(shape, value.shape))
  return value


def _like(leaf, value: np.ndarray):
  """`value` as the kind of array `leaf` is: a jax.Array with leaf's sharding (built per shard,
  so it works when the array spans processes), else numpy; re-boxed where leaf is boxed."""
  array = _unbox(leaf)
  value = np.asarray(value).astype(array.dtype)
  if isinstance(array, jax.Array):
    value = jax.make_array_from_callback(value.shape, array.sharding, lambda index: value[index])
  return leaf.replace_boxed(value) if _is_box(leaf) else value


def load_pretrained(path: str, init_params, num_heads: int | None = None, *,
                    new_head: bool = True):
  """Pretrained weights for transfer into the tree of `init_params`.

  `path`: anything `load` reads, or the workdir of an earlier run (its newest checkpoint). Head
  (and pre_logits where the target has none) come from `init_params` (with new_head=False they
  must come from the checkpoint: predict); parts only pretraining uses (an MAE decoder, masked
  patch prediction's mask embedding and head) are dropped; position embeddings (and
  relative-position biases) are resized to the target grid; every other leaf must match in name
  and shape. Scanned or not, on either side, is converted to the target's form.

  `init_params` may be boxed (`model.init(...)['params']`) or not, numpy, jax arrays (sharded,
  also across processes) or `jax.ShapeDtypeStruct`s (with new_head=False: every leaf is then
  read); the result has the same kind of leaves (numpy for ShapeDtypeStructs), dtypes and
  shardings.
  """
  target = _flatten(init_params)
  shapes = {k: _unbox(v) for k, v in target.items()}  # .shape / .dtype, never fetched
  scanned = formats.is_scanned(shapes)
  if num_heads is None:
    query = next((v for k, v in shapes.items() if k.endswith(
        formats.ATTN + '/query/kernel')), None)
    num_heads = None if query is None else query.shape[-2]  # (..., D, heads, D / heads)
  loaded = _host_flat(load(path, num_heads))
  if scanned:
    loaded = formats.scan(loaded)
  fresh = ('head',) if new_head else ()
  merged, problems = {}, []
  for key, leaf in target.items():
    top, shape = key.split('/')[0], shapes[key].shape
    if top in fresh or key not in loaded:
      if top not in ('head', 'pre_logits') or not new_head:
        problems.append(f'missing in checkpoint: {key}')
      merged[key] = leaf
      continue
    try:
      restored = _resize_to(key, loaded[key], shape)
    except ValueError as e:
      problems.append(f'{key}: {e}')
      continue
    if restored.shape != tuple(shape):
      problems.append(f'shape mismatch for {key}: checkpoint {restored.shape}, model {shape}')
      continue
    merged[key] = _like(leaf, restored)
  unused = sorted(k for k in loaded if k not in target and k.split('/')[0] not in
                  fresh + ('pre_logits',) + mae.PRETRAINING_ONLY)
  problems += [f'not in model: {k}' for k in unused]
  if problems:
    raise ValueError(f'cannot load {path} into this model:\n  ' + '\n  '.join(problems))
  tree = flax.traverse_util.unflatten_dict(merged, sep='/')
  return flax.core.freeze(tree) if isinstance(init_params, flax.core.FrozenDict) else tree
