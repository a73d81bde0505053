"""tf.data pipelines: source -> per-process share -> preprocess -> batch -> global jax.Array.

Training order and augmentation are a pure function of (seed, step): the shuffled, repeated
stream is enumerated, each example's random ops are seeded from its index, and a resumed run
skips the examples already consumed, so it sees exactly the batches an uninterrupted run would.
"""
import math
from typing import Iterator

import jax
import numpy as np
import tensorflow as tf
from jax.experimental import multihost_utils

from vit_jax import sharding
from vit_jax.data import ops, sources

# tf.data must not take the accelerator memory JAX needs.
tf.config.set_visible_devices([], 'GPU')


def local_batch_size(global_batch: int) -> int:
  if global_batch % jax.process_count():
    raise ValueError(f'batch_size={global_batch} is not divisible by the number of processes '
                     f'({jax.process_count()})')
  return global_batch // jax.process_count()


def _source(data_config, split: str, process_index: int | None = None,
            process_count: int | None = None) -> sources.Source:
  """Record files when data.path is set, else the tfds dataset data.name."""
  if data_config.get('path'):
    return sources.records_source(data_config.path, split, process_index, process_count)
  if data_config.get('name'):
    return sources.tfds_source(data_config.name, split, data_config.get('data_dir') or None,
                               process_index, process_count)
  raise ValueError('config.data needs either path (record files from vit_jax.data.make_records) '
                   'or name (a tensorflow-datasets dataset)')


def _seed_base(seed: int, process_index: int):
  return tf.constant(seed * 1_000_003 + process_index, tf.int64)


def _with_seed(seed: int, process_index: int):
  """Attaches a stateless seed (seed, process, example index); batch seeds use -1 - step."""
  def fn(index, example):
    example = dict(example)
    example[ops.SEED_KEY] = tf.stack([_seed_base(seed, process_index), index])
    return example
  return fn


# An always-decodable image preprocessed in place of one that fails (corrupt or truncated).
_STAND_IN_SIDE = 256


def _stand_in_image() -> tf.Tensor:
  return tf.io.encode_jpeg(tf.fill([_STAND_IN_SIDE, _STAND_IN_SIDE, 3], tf.constant(128, tf.uint8)))


def _skip_failures(preprocess):
  """Per example: preprocess, or, when that fails (e.g. a corrupt image), preprocess a grey
  stand-in with VALID_KEY = 0 so that the batches stay aligned with steps (exact resume).
  The failure is logged; _fill_skipped then replaces stand-ins with real examples."""
  stand_in = _stand_in_image()

  def per_example(example):
    real = tf.data.Dataset.from_tensors(example).map(
        lambda ex: dict(preprocess(ex), **{VALID_KEY: tf.constant(1.)})).ignore_errors(
            log_warning=True)
    substitute = tf.data.Dataset.from_tensors(example).map(
        lambda ex: dict(preprocess(dict(ex, image=stand_in)), **{VALID_KEY: tf.constant(0.)}))
    return real.concatenate(substitute).take(1)

  def apply(ds):
    return ds.interleave(per_example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return apply


VALID_KEY = '_valid'
SKIPPED_KEY = 'skipped'


def _fill_skipped(batch: dict) -> dict:
  """Rows whose example failed take copies of the batch's good rows; counts them."""
  valid = batch.pop(VALID_KEY) > 0
  size = tf.shape(valid)[0]

  def fill():
    good = tf.where(valid)[:, 0]
    tf.debugging.assert_positive(tf.size(good), 'every example of a batch failed to preprocess')
    rows = tf.where(valid, tf.range(size, dtype=tf.int64),
                    tf.gather(good, tf.range(size, dtype=tf.int64) % tf.size(good, tf.int64)))
    return {k: tf.gather(v, rows) for k, v in batch.items()}
  batch = tf.cond(tf.reduce_all(valid), lambda: dict(batch), fill)
  batch[SKIPPED_KEY] = size - tf.reduce_sum(tf.cast(valid, tf.int32))
  return batch


def _options() -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True
  options.threading.private_threadpool_size = 0
  options.experimental_optimization.map_parallelization = True
  return options


def _to_global(batch: dict, mesh) -> dict:
  batch_sharding = sharding.batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(batch_sharding, v) for k, v in batch.items()}


def _keep_model_inputs(example: dict) -> dict:
  return {k: v for k, v in example.items() if k in ('image', 'labels', VALID_KEY)}


def train_dataset(config, start_step: int = 0, process_index: int | None = None,
                  process_count: int | None = None) -> tf.data.Dataset:
  """This process's batches {'image', 'labels', 'skipped'} (numpy-ready) from `start_step` on.

  Example i of the shuffled, repeated stream is preprocessed with seed (seed, process, i) and
  batch ops (mixup) with (seed, process, -1 - step), so any step's batch is a pure function of
  the config: a resumed run skips the consumed examples unread and continues bit-for-bit.
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  data = config.data
  source = _source(data, data.train_split, process_index, process_count)
  if config.batch_size % process_count:
    raise ValueError(f'batch_size={config.batch_size} is not divisible by the number of '
                     f'processes ({process_count})')
  batch = config.batch_size // process_count
  preprocess, batch_ops = ops.parse_preprocess(config.pp_train)
  ds = source.dataset
  if data.get('cache', False):
    ds = ds.cache()
  ds = ds.shuffle(data.get('shuffle_buffer', 10_000), seed=config.seed,
                  reshuffle_each_iteration=True).repeat()
  ds = ds.enumerate().skip(start_step * batch).map(_with_seed(config.seed, process_index))
  ds = ds.apply(_skip_failures(lambda ex: _keep_model_inputs(preprocess(ex))))
  ds = ds.batch(batch, drop_remainder=True).enumerate(start=start_step)

  def finish(step, local):
    local = _fill_skipped(local)
    if batch_ops is not None:
      skipped = local.pop(SKIPPED_KEY)
      local[ops.SEED_KEY] = tf.stack([_seed_base(config.seed, process_index), -1 - step])
      local = dict(batch_ops(local), **{SKIPPED_KEY: skipped})
      local.pop(ops.SEED_KEY)
    return local
  ds = ds.map(finish, num_parallel_calls=tf.data.AUTOTUNE)
  return ds.prefetch(data.get('prefetch', 2)).with_options(_options())


class TrainIterator:
  """Global batches {'image', 'labels'}; counts the examples skipped because they failed."""

  def __init__(self, dataset: tf.data.Dataset, mesh):
    self._batches = dataset.as_numpy_iterator()
    self._mesh = mesh
    self.skipped = 0  # by this process, since this iterator started

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    local = next(self._batches)
    self.skipped += int(local.pop(SKIPPED_KEY))
    return _to_global(local, self._mesh)

  def skipped_images(self) -> int:
    """Skipped by all processes since the start (every process must call it: a collective)."""
    if jax.process_count() == 1:
      return self.skipped
    return int(np.sum(multihost_utils.process_allgather(np.array(self.skipped))))


def train_iterator(config, mesh, start_step: int = 0) -> TrainIterator:
  """Yields global batches {'image', 'labels'} from step `start_step` on."""
  return TrainIterator(train_dataset(config, start_step), mesh)


def eval_batches(config, mesh, split: str) -> tuple[int, Iterator[dict]]:
  """(num_batches, iterator) over a whole split, padded with mask=0 examples.

  Every process yields the same number of batches (collectives need it), however unevenly
  the split divides. Examples that fail to preprocess get mask=0 (left out of the metrics).
  """
  data = config.data
  source = _source(data, split)
  batch = local_batch_size(config.get('eval_batch_size', config.batch_size))
  preprocess = ops.get_preprocess_fn(config.pp_eval)
  num_batches = math.ceil(source.num_examples_max / batch)

  def with_mask(ex):
    ex = dict(ex)
    return dict(ex, mask=ex.pop(VALID_KEY))
  ds = source.dataset.map(lambda ex: dict(ex, **{ops.SEED_KEY: tf.constant([0, 0], tf.int64)}))
  ds = ds.apply(_skip_failures(lambda ex: _keep_model_inputs(preprocess(ex)))).map(with_mask)
  padding = ds.take(1).map(lambda ex: dict(ex, mask=tf.constant(0.))).cache().repeat()
  ds = ds.concatenate(padding).take(num_batches * batch).batch(batch)
  ds = ds.prefetch(2).with_options(_options())

  def iterate():
    for local in ds.as_numpy_iterator():
      yield _to_global(local, mesh)
  return num_batches, iterate()
