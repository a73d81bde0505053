"""What did the model learn? The ViT paper's analysis figures for any checkpoint vit_jax loads.

    python -m vit_jax.inspect --checkpoint=WORKDIR_OR_FILE [--images=a.jpg,b.png] --out=DIR

Writes DIR/{filters,position_similarity,attention_distance,rollout}.png and DIR/inspect.json
with the numbers behind them:
- filters: the first principal components of the patch-embedding filters (paper Figure 7, left);
- position_similarity: cosine similarity of each patch's position embedding with every other
  patch's, one small map per patch (Figure 7, centre);
- attention_distance: per head and layer, the mean distance in pixels between a query patch and
  the patches it attends to, weighted by attention (Figure 7, right);
- rollout: attention rollout (Abnar & Zuidema 2020) of each image, from the output token to the
  input patches (Figure 6), with the top classes when the model has a head.
Without --images, the run's held-out split (a workdir's config.json: data + pp_eval) is used.
"""
import json
import re
import sys

import numpy as np
from absl import app, flags

from vit_jax import predict
from vit_jax.cli import errors, program_flags, startup
from vit_jax.storage import paths

# --checkpoint is predict's flag (a workdir, .npz, or timm / HF weights file): one definition.
_IMAGES = flags.DEFINE_list('images', [], 'Image files (default: the run\'s held-out split).')
_OUT = program_flags.OUT  # the PNGs and inspect.json
flags.declare_key_flag('checkpoint')
flags.declare_key_flag('out')
_NUM_IMAGES = flags.DEFINE_integer('num_images', 32, 'Held-out images for attention distance.')


# --- the numbers (numpy, each checked against an independent computation in the tests) -------

def filter_components(kernel: np.ndarray, num: int = 28) -> tuple[np.ndarray, np.ndarray]:
  """Principal components of the patch-embedding filters: kernel (p, p, C, D) holds D filters
  of p*p*C values. Returns (num, p, p, C) components and the variance ratio each explains."""
  p, q, c, d = kernel.shape
  filters = kernel.reshape(p * q * c, d).T.astype(np.float64)
  centred = filters - filters.mean(axis=0)
  _, singular, directions = np.linalg.svd(centred, full_matrices=False)
  num = min(num, len(singular))
  variance = singular**2
  return directions[:num].reshape(num, p, q, c), variance[:num] / variance.sum()


def position_similarity(posemb: np.ndarray, grid: tuple) -> np.ndarray:
  """(N, D) patch position embeddings -> (h, w, h, w) cosine similarity of each with every other."""
  unit = posemb / np.linalg.norm(posemb, axis=-1, keepdims=True)
  return (unit @ unit.T).reshape(*grid, *grid)


def _patch_distances(grid: tuple, patch_size: int) -> np.ndarray:
  yy, xx = np.meshgrid(np.arange(grid[0]), np.arange(grid[1]), indexing='ij')
  centres = np.stack([yy.ravel(), xx.ravel()], -1) * patch_size
  return np.linalg.norm(centres[:, None] - centres[None], axis=-1)


def mean_attention_distance(weights: np.ndarray, grid: tuple, patch_size: int,
                            num_prefix: int = 0) -> np.ndarray:
  """(B, heads, T, T) attention weights -> (heads,) mean pixel distance from a query patch to
  the patches it attends to (weights over patch keys renormalised; prefix tokens left out)."""
  patches = weights[:, :, num_prefix:, num_prefix:].astype(np.float64)
  patches = patches / patches.sum(-1, keepdims=True)
  distance = (patches * _patch_distances(grid, patch_size)).sum(-1)  # (B, heads, N)
  return distance.mean(axis=(0, 2))


def attention_rollout(weights_per_layer: list[np.ndarray]) -> np.ndarray:
  """Layers' (B, heads, T, T) weights -> (B, T, T) rollout: heads averaged, the residual path
  added as identity, rows renormalised, multiplied from the first layer to the last."""
  rollout = None
  for weights in weights_per_layer:
    a = weights.astype(np.float64).mean(axis=1)
    a = a + np.eye(a.shape[-1])
    a = a / a.sum(-1, keepdims=True)
    rollout = a if rollout is None else a @ rollout
  return rollout


def rollout_maps(rollout: np.ndarray, grid: tuple, num_prefix: int) -> np.ndarray:
  """(B, T, T) rollout -> (B, h, w): how much each patch flows into the output token (the class
  token, or the mean of the patch tokens without one), scaled to max 1 per image."""
  if num_prefix:
    flow = rollout[:, 0, num_prefix:]
  else:
    flow = rollout.mean(axis=1)
  flow = flow / np.maximum(flow.max(axis=-1, keepdims=True), 1e-12)
  return flow.reshape(-1, *grid)


# --- the model's side -----------------------------------------------------------------------

def attention_weights(model, params, images) -> list[np.ndarray]:
  """Each encoder layer's (B, heads, T, T) attention weights, sown by the model's own attention
  (a MAP head's attention sows too: it is no encoder layer, and left out)."""
  import jax  # pylint: disable=g-import-not-at-top
  _, state = jax.jit(lambda p, x: model.apply({'params': p}, x, mutable='intermediates'))(
      params, images)
  found = []

  def collect(path, leaf):
    names = [str(getattr(k, 'key', '')) for k in path]
    if 'attention_weights' in names and any(n.startswith('encoderblock') for n in names):
      found.append(('/'.join(names), np.asarray(leaf)))
  jax.tree_util.tree_map_with_path(collect, state['intermediates'])
  if len(found) == 1 and found[0][1].ndim == 5:  # scanned layers: (layers, B, heads, T, T)
    return list(found[0][1])
  # Layer order by block number, not by the string order of the names ('10' < '2').
  found.sort(key=lambda item: int(re.search(r'encoderblock_(\d+)', item[0]).group(1)))
  return [w for _, w in found]


def held_out_images(checkpoint: str, size: int, count: int) -> tuple[np.ndarray, list[str]]:
  """`count` images of the run's eval split through its pp_eval (a workdir's config.json), and
  their names ('test[0]', ...)."""
  tf = startup.import_tensorflow()
  import ml_collections  # pylint: disable=g-import-not-at-top
  from vit_jax.weights import train_state  # pylint: disable=g-import-not-at-top
  from vit_jax.data import ops, pipeline  # pylint: disable=g-import-not-at-top
  run = train_state.read_run_config(checkpoint)
  if not run.get('data', {}).get('eval_split'):
    raise errors.UserError(f'--checkpoint={checkpoint} is not a training workdir with an eval '
                           'split: give --images')
  data = ml_collections.ConfigDict(run['data'])
  source = pipeline.source(data, data.eval_split)
  preprocess = ops.get_preprocess_fn(run['pp_eval'])
  indices = np.arange(min(count, source.num_examples))
  images = [preprocess(dict(source.parse(tf.constant(r)), **{ops.SEED_KEY: tf.constant(
      [0, 0], tf.int64)}))['image'].numpy() for r in source.read(indices)]
  images = np.stack(images)
  if images.shape[1] != size:
    raise errors.UserError(f'{checkpoint}: pp_eval gives {images.shape[1]}px images, the model '
                           f'{size}px')
  return images, [f'{data.eval_split}[{i}]' for i in indices]


def analyse(checkpoint: str, image_paths: list[str], num_images: int = 32) -> dict:
  """All the numbers: {'filters', 'position_similarity', 'attention_distance', 'rollout', ...};
  'skipped': {path: why} for --images that are missing or no images."""
  import jax  # pylint: disable=g-import-not-at-top
  from vit_jax.weights import model_from_weights, train_state  # pylint: disable=g-import-not-at-top
  from vit_jax.models import vit  # pylint: disable=g-import-not-at-top
  if num_images < 1:
    raise errors.UserError(f'--num_images={num_images}: use at least one image')
  model, params, size = model_from_weights.build(checkpoint, require_head=False)
  if not isinstance(model, vit.VisionTransformer):
    raise errors.UserError(f'{checkpoint} holds a ResNet: it has no patch embedding, position '
                           'embeddings or attention to show; inspect works on plain ViTs')
  if model.resnet_layers:
    raise errors.UserError(f'{checkpoint} is a hybrid (ResNet stem): its patch embedding is not '
                           'a pixel filter bank; inspect works on plain ViTs')
  run = train_state.read_run_config(checkpoint)
  skipped = {}
  if image_paths:
    images, names, skipped = predict.load_images(image_paths, size,
                                                 predict.image_preprocessing(run, size))
    if images is None:
      raise errors.UserError('no readable --images: ' + '; '.join(
          f'{path}: {why}' for path, why in skipped.items()))
  else:
    images, names = held_out_images(checkpoint, size, num_images)
  grid = (size // model.patch_size,) * 2
  components, explained = filter_components(np.asarray(params['embedding']['kernel']))
  posemb = model_from_weights.position_embeddings(model, params, grid)
  weights = attention_weights(model, params, images)
  rollout = attention_rollout(weights)
  result = {
      'checkpoint': checkpoint, 'image_size': size, 'patch_size': model.patch_size,
      'grid': grid, 'images': names, 'skipped': skipped,
      'filter_components': components, 'filter_variance_explained': explained,
      'position_similarity': None if posemb is None else position_similarity(posemb, grid),
      'attention_distance': np.stack([mean_attention_distance(
          w, grid, model.patch_size, model.num_prefix_tokens) for w in weights]),
      'rollout': rollout_maps(rollout, grid, model.num_prefix_tokens),
      'image_pixels': images,
  }
  if model.num_classes:
    probs = np.asarray(predict.scores(run, jax.jit(model.apply)({'params': params}, images)))
    result['top_classes'] = {name: [(int(c), float(row[c])) for c in np.argsort(-row)[:3]]
                             for name, row in zip(names, probs)}
  return result


# --- pictures --------------------------------------------------------------------------------

def _pyplot():
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
  except ImportError:
    sys.exit("vit_jax.inspect draws with matplotlib: pip install -e '.[demo]'")
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def _to_unit(x: np.ndarray) -> np.ndarray:
  return (x - x.min()) / (x.max() - x.min() + 1e-12)


def draw(result: dict, out: str) -> list[str]:
  """The PNGs into `out` (local or gs://); returns their names."""
  plt = _pyplot()
  paths.resolve(out).mkdir(parents=True, exist_ok=True)
  written = []

  def save(fig, name):
    fig.tight_layout()
    with (paths.resolve(out) / name).open('wb') as f:
      fig.savefig(f, format='png', dpi=100)
    plt.close(fig)
    written.append(name)

  components = result['filter_components']
  cols = 7
  rows = int(np.ceil(len(components) / cols))
  fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.2, rows * 1.2))
  for ax, i in zip(np.ravel(axes), range(rows * cols)):
    ax.axis('off')
    if i < len(components):
      ax.imshow(_to_unit(components[i]), interpolation='nearest')
  fig.suptitle('RGB embedding filters (first principal components)')
  save(fig, 'filters.png')

  if result['position_similarity'] is not None:
    sim = result['position_similarity']
    h, w = sim.shape[:2]
    fig, axes = plt.subplots(h, w, figsize=(w * 0.7, h * 0.7), squeeze=False)
    for i in range(h):
      for j in range(w):
        axes[i, j].imshow(sim[i, j], vmin=-1, vmax=1, cmap='viridis')
        axes[i, j].axis('off')
    fig.suptitle('Position embedding similarity')
    save(fig, 'position_similarity.png')

  distance = result['attention_distance']
  fig, ax = plt.subplots(figsize=(4.5, 3.5))
  for layer, per_head in enumerate(distance):
    ax.scatter(np.full(len(per_head), layer), per_head, s=12)
  ax.set_xticks(range(len(distance)))
  ax.set_xlabel('network depth (layer)')
  ax.set_ylabel('mean attention distance (pixels)')
  ax.set_ylim(0, result['image_size'])
  save(fig, 'attention_distance.png')

  pixels, maps = result['image_pixels'], result['rollout']
  shown = min(len(pixels), 8)
  fig, axes = plt.subplots(2, shown, figsize=(shown * 1.6, 3.4), squeeze=False)
  for i in range(shown):
    image = (pixels[i] + 1) / 2
    upscale = np.kron(maps[i], np.ones((result['patch_size'],) * 2))
    axes[0, i].imshow(np.clip(image, 0, 1))
    axes[1, i].imshow(np.clip(image * upscale[..., None], 0, 1))
    title = ''
    if result.get('top_classes') and i < len(result['images']):
      title = ' '.join(f'{c}:{p:.0%}' for c, p in result['top_classes'][result['images'][i]][:2])
    axes[0, i].set_title(title, fontsize=7)
    axes[0, i].axis('off')
    axes[1, i].axis('off')
  fig.suptitle('Attention rollout')
  save(fig, 'rollout.png')
  return written


def summary(result: dict) -> dict:
  """The JSON: every number behind the pictures (images' pixels left out)."""
  def plain(x):
    return x.tolist() if isinstance(x, np.ndarray) else x
  return {k: plain(v) for k, v in result.items() if k != 'image_pixels'}


def main(argv):
  startup.inference_program(argv)
  _pyplot()  # before any work: the pictures need matplotlib
  with errors.reported_as_one_line():  # each message names the flag or file at fault
    try:
      paths.resolve(_OUT.value).mkdir(parents=True, exist_ok=True)
    except OSError as e:
      raise errors.UserError(f'--out={_OUT.value}: {e.strerror or e}') from e
    result = analyse(flags.FLAGS.checkpoint, _IMAGES.value, _NUM_IMAGES.value)
  for path, why in result['skipped'].items():
    print(f'{path}: skipped, {why}', file=sys.stderr)
  written = draw(result, _OUT.value)
  (paths.resolve(_OUT.value) / 'inspect.json').write_text(json.dumps(summary(result)))
  print(f'wrote {", ".join(written + ["inspect.json"])} to {_OUT.value}')


if __name__ == '__main__':
  startup.begin()
  flags.mark_flags_as_required(['checkpoint', 'out'])
  app.run(main)
