"""tf.data pipelines: example index -> record -> preprocess -> batch -> global jax.Array.

Training input is a pure function of (seed, step). Row r of the global batch at step s is
example k = s * batch_size + r of the stream; in epoch e = k // N it is record
index_shuffle(k % N, seed=(seed, e)) of the split (a permutation per epoch, never materialised),
preprocessed with random ops seeded by (seed, k). Each process reads only the rows its devices
hold (`sharding.process_batch_rows`: on a TPU slice, several blocks scattered over the batch)
and places them on those devices. So a resumed run starts reading at its step (no replay), and
the global batches are the same on 1 process or 64, which lets a run preempted on one slice
shape resume on another.
"""
import collections
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

# Records fetched per read call (a call reads all of its byte ranges at once: see sources).
_READ_CHUNK = 64
# Global batches whose host-to-device copy is under way while the step before them runs.
_DEVICE_PREFETCH = 2


def source(data_config, split: str) -> sources.Source:
  """Record files when data.path is set, else the tfds dataset data.name."""
  if data_config.get('path'):
    return sources.records_source(data_config.path, split)
  if data_config.get('name'):
    return sources.tfds_source(data_config.name, split, data_config.get('data_dir') or None)
  raise ValueError('config.data needs either path (record files from vit_jax.data.make_records) '
                   'or name (a tensorflow-datasets dataset)')


def record_index(seed: int, num_examples: int):
  """Stream position k -> the record it reads: each epoch a fresh permutation of the split."""
  def fn(k):
    epoch, position = k // num_examples, k % num_examples
    return tf.random.experimental.index_shuffle(
        position, tf.stack([tf.constant(seed, tf.int64), epoch]), num_examples - 1)
  return fn


def _read(src: sources.Source, indices: tf.Tensor) -> tf.Tensor:
  records = tf.numpy_function(src.read, [indices], tf.string, stateful=False)
  return tf.ensure_shape(records, indices.shape)


def _examples(src: sources.Source, positions: tf.data.Dataset, record_of) -> tf.data.Dataset:
  """(k, record) for every stream position k of `positions`, read in parallel chunks."""
  ds = positions.map(lambda k: (k, record_of(k))).batch(_READ_CHUNK)
  ds = ds.map(lambda k, r: (k, _read(src, r)), num_parallel_calls=tf.data.AUTOTUNE,
              deterministic=True)
  return ds.unbatch()


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
_REAL_KEY = '_real'  # evaluation: False for the padding rows past the split's end


def _fill_skipped(batch: dict) -> dict:
  """Rows whose example failed take copies of the batch's good rows; marks them (SKIPPED_KEY,
  per row: the rows another process also holds are counted by one of them)."""
  valid = batch.pop(VALID_KEY) > 0
  size = tf.shape(valid)[0]

  def fill():
    good = tf.where(valid)[:, 0]
    tf.debugging.assert_positive(tf.size(good), 'every example of a batch failed to preprocess')
    rows = tf.where(valid, tf.range(size, dtype=tf.int64),
                    tf.gather(good, tf.range(size, dtype=tf.int64) % tf.size(good, tf.int64)))
    return {k: tf.gather(v, rows) for k, v in batch.items()}
  batch = tf.cond(tf.reduce_all(valid), lambda: dict(batch), fill)
  batch[SKIPPED_KEY] = tf.logical_not(valid)
  return batch


def _options() -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True
  options.threading.private_threadpool_size = 0
  options.experimental_optimization.map_parallelization = True
  return options


def _to_global(local: dict, mesh, global_batch: int) -> dict:
  """Global arrays from this process's rows (`sharding.process_batch_rows`, ascending).

  make_array_from_process_local_data (jax 0.10.2) hands each local device the block of
  `local` at the rank of its shard's first row among this process's shards: with the rows in
  ascending order that is the device's own block, also when the blocks are not adjacent.
  """
  batch_sharding = sharding.batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(batch_sharding, v, (global_batch,) + v.shape[1:])
          for k, v in local.items()}


def _keep_model_inputs(example: dict) -> dict:
  return {k: v for k, v in example.items() if k in ('image', 'labels', VALID_KEY)}


def _parsed_with_seed(src: sources.Source, seed: int):
  """(k, record) -> the parsed example, its random ops seeded by (seed, k)."""
  def fn(k, record):
    example = src.parse(record)
    example[ops.SEED_KEY] = tf.stack([tf.constant(seed, tf.int64), k])
    return example
  return fn


def train_dataset(config, start_step: int = 0, rows=None,
                  src: sources.Source | None = None) -> tf.data.Dataset:
  """The batches {'image', 'labels', 'skipped'} of rows `rows` (ascending ints; default every
  row) of every global batch from `start_step` on. Batch ops (mixup) mix within these rows,
  seeded by (seed, first row, step)."""
  data = config.data
  src = src or source(data, data.train_split)
  rows = np.arange(config.batch_size) if rows is None else np.asarray(rows, np.int64)
  if src.num_examples == 0:
    raise ValueError(f'{src.name} has no examples')
  preprocess, batch_ops = ops.parse_preprocess(config.pp_train)
  global_batch, local, first = config.batch_size, len(rows), int(rows[0])
  row_of = tf.constant(rows, tf.int64)

  def position(m):  # m-th example this process reads -> its stream position k
    step = start_step + m // local
    return step * global_batch + tf.gather(row_of, m % local)
  positions = tf.data.Dataset.range(2 ** 62).map(position)
  ds = _examples(src, positions, record_index(config.seed, src.num_examples))
  ds = ds.map(_parsed_with_seed(src, config.seed), num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.apply(_skip_failures(lambda ex: _keep_model_inputs(preprocess(ex))))
  ds = ds.batch(local, drop_remainder=True).enumerate(start=start_step)

  def finish(step, batch):
    batch = _fill_skipped(batch)
    if batch_ops is not None:
      skipped = batch.pop(SKIPPED_KEY)
      batch[ops.SEED_KEY] = tf.stack([tf.constant(config.seed, tf.int64) * 1_000_003 + first,
                                      -1 - step])
      batch = dict(batch_ops(batch), **{SKIPPED_KEY: skipped})
      batch.pop(ops.SEED_KEY)
    return batch
  ds = ds.map(finish, num_parallel_calls=tf.data.AUTOTUNE)
  return ds.prefetch(data.get('prefetch', 2)).with_options(_options())


class TrainIterator:
  """Global batches {'image', 'labels'}, copied to the devices `_DEVICE_PREFETCH` steps ahead;
  counts the examples skipped because they failed.

  dataset: the batches of this process's rows `rows`; it counts the skipped ones among
  `counted` (default all of them; see `sharding.process_counted_rows`)."""

  def __init__(self, dataset: tf.data.Dataset, mesh, global_batch: int, rows=None,
               counted=None):
    self._batches = dataset.as_numpy_iterator()
    self._mesh, self._global_batch = mesh, global_batch
    self._counts = (slice(None) if counted is None else
                    np.isin(np.asarray(rows), np.asarray(counted)))
    self._queue = collections.deque()
    self.skipped = 0  # counted by this process since this iterator started

  def __iter__(self):
    return self

  def _fetch(self) -> None:
    local = next(self._batches)
    skipped = int(np.sum(local.pop(SKIPPED_KEY)[self._counts]))
    # make_array_from_process_local_data starts the copies and returns: they overlap the step.
    self._queue.append((_to_global(local, self._mesh, self._global_batch), skipped))

  def __next__(self) -> dict:
    while len(self._queue) <= _DEVICE_PREFETCH:
      self._fetch()
    batch, skipped = self._queue.popleft()
    self.skipped += skipped
    return batch

  def skipped_images(self) -> int:
    """Skipped by all processes since the start (every process must call it: a collective)."""
    if jax.process_count() == 1:
      return self.skipped
    return int(np.sum(multihost_utils.process_allgather(np.array(self.skipped))))


def train_iterator(config, mesh, start_step: int = 0) -> TrainIterator:
  """Yields global batches {'image', 'labels'} from step `start_step` on."""
  rows = sharding.process_batch_rows(mesh, config.batch_size)
  counted = sharding.process_counted_rows(mesh, config.batch_size)
  return TrainIterator(train_dataset(config, start_step, rows), mesh, config.batch_size, rows,
                       counted)


def eval_batches(config, mesh, split: str) -> tuple[int, Iterator[dict]]:
  """(num_batches, iterator) over a whole split, padded with mask=0 examples.

  Global batch b holds examples b * eval_batch_size + row, in the split's order; each process
  reads its rows, and rows past the end repeat the last example with mask 0. Examples that fail
  to preprocess get mask=0 too (left out of the metrics).
  """
  src = source(config.data, split)
  global_batch = config.get('eval_batch_size', config.batch_size)
  rows = sharding.process_batch_rows(mesh, global_batch)
  row_of = tf.constant(rows, tf.int64)
  preprocess = ops.get_preprocess_fn(config.pp_eval)
  num_examples = src.num_examples
  num_batches = math.ceil(num_examples / global_batch)

  def position(m):
    return m // len(rows) * global_batch + tf.gather(row_of, m % len(rows))
  positions = tf.data.Dataset.range(num_batches * len(rows)).map(position)
  ds = _examples(src, positions, lambda k: tf.minimum(k, num_examples - 1))

  def parse(k, record):
    return dict(src.parse(record), **{ops.SEED_KEY: tf.constant([0, 0], tf.int64),
                                      _REAL_KEY: k < num_examples})

  def preprocess_keeping_real(example):
    return dict(_keep_model_inputs(preprocess(example)), **{_REAL_KEY: example[_REAL_KEY]})

  def with_mask(example):
    example = dict(example)
    real = tf.cast(example.pop(_REAL_KEY), tf.float32)
    return dict(example, mask=example.pop(VALID_KEY) * real)
  ds = ds.map(parse, num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.apply(_skip_failures(preprocess_keeping_real)).map(with_mask)
  ds = ds.batch(len(rows)).prefetch(2).with_options(_options())

  def iterate():
    for local in ds.as_numpy_iterator():
      yield _to_global(local, mesh, global_batch)
  return num_batches, iterate()
