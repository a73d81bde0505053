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
import functools
import math
import os
from typing import Iterator

import jax
import numpy as np
import tensorflow as tf
from jax.experimental import multihost_utils

from vit_jax.scale import sharding
from vit_jax.data import ops, sources

# tf.data must not take the accelerator memory JAX needs.
tf.config.set_visible_devices([], 'GPU')

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


# tf.random.experimental.index_shuffle puts this before a [2] seed (its op takes 3 numbers);
# calling the op with it gives that function's permutations, for a whole batch of positions
# whose epochs (seeds) differ, which the function itself cannot take.
_INDEX_SHUFFLE_SEED_PREFIX = 498247692


def record_index(seed: int, num_examples: int):
  """Stream positions k (any shape) -> the records they read: in epoch e = k // N, position
  k % N of index_shuffle's permutation of the split for seed (seed, e). Each epoch a fresh
  permutation, never materialised."""
  def fn(k):
    k = tf.convert_to_tensor(k, tf.int64)
    flat = tf.reshape(k, [-1])

    def filled(value):
      return tf.fill(tf.shape(flat), tf.constant(value, tf.int64))
    seeds = tf.stack([filled(_INDEX_SHUFFLE_SEED_PREFIX), filled(seed), flat // num_examples], 1)
    records = tf.raw_ops.RandomIndexShuffle(index=flat % num_examples, seed=seeds,
                                            max_index=filled(num_examples - 1), rounds=4)
    return tf.reshape(records, tf.shape(k))
  return fn


def _read(src: sources.Source, indices: tf.Tensor) -> tf.Tensor:
  """The serialized records at `indices` (any shape): one call into the source for them all."""
  records = tf.numpy_function(src.read, [tf.reshape(indices, [-1])], tf.string, stateful=False)
  return tf.reshape(records, tf.shape(indices))


VALID_KEY = '_valid'
SKIPPED_KEY = 'skipped'


def _keep_model_inputs(example: dict) -> dict:
  return {k: v for k, v in example.items() if k in ('image', 'labels')}


def _preprocessed_batch(src: sources.Source, preprocess, seed_of):
  """(k, records) of one batch's rows (k ascending) -> the batch, preprocessed example by
  example in parallel, with VALID_KEY per row.

  An example that fails (a corrupt image, a bad label) is logged and dropped; its row takes a
  copy of a good row (failed row i: the (i mod good)-th good one) and VALID_KEY 0, so that
  batches stay aligned with steps (exact resume). Done per batch, not per example: one small
  dataset per step, where wrapping each example cost a third of the pipeline's time."""
  def one(k, record):
    example = src.parse(record)
    example[ops.SEED_KEY] = seed_of(k)
    return k, _keep_model_inputs(preprocess(example))

  def fill(k, good_k, good):
    n, m = tf.size(k), tf.size(good_k)
    tf.debugging.assert_positive(m, 'every example of a batch failed to preprocess')
    at = tf.minimum(tf.searchsorted(good_k, k), m - 1)
    valid = tf.equal(tf.gather(good_k, at), k)
    rows = tf.where(valid, at, tf.range(n) % m)
    batch = tf.cond(tf.equal(m, n), lambda: dict(good),  # the usual case: no copy
                    lambda: {key: tf.gather(value, rows) for key, value in good.items()})
    batch[VALID_KEY] = valid
    return batch

  def apply(k, records):
    good = (tf.data.Dataset.from_tensor_slices((k, records))
            .map(one, num_parallel_calls=_usable_cores(), deterministic=True)
            .ignore_errors(log_warning=True)
            .batch(2 ** 31 - 1))  # every survivor, in one element
    nothing = tf.nest.map_structure(  # when every example failed (fill then says so)
        lambda spec: tf.zeros([0] + [d or 0 for d in spec.shape[1:]], spec.dtype),
        good.element_spec)
    return (good.concatenate(tf.data.Dataset.from_tensors(nothing)).take(1)
            .map(lambda good_k, batch: fill(k, good_k, batch)))
  return apply


# Batches being preprocessed at once: the examples of a batch are preprocessed in parallel, so
# 2 keep every core busy across batch boundaries.
_BATCHES_AT_ONCE = 2
# Records one read asks for, at least: the source reads a call's records concurrently (range
# reads in flight together on gs://), and a call holds one of the reads' _BATCHES_AT_ONCE
# threads while it waits, so each call must carry enough reads on its own; small batches are
# read several to a call. Whole batches, and a bounded number of them (AUTOTUNE would scale the
# reads with the host's cores: on a 224-core TPU host, hundreds of batches of encoded images).
_RECORDS_PER_READ = 256


def _batches(src: sources.Source, preprocess, batch_numbers: tf.data.Dataset, locate, seed_of,
             batch_size: int):
  """For each batch number b: (b, the batch of rows `locate(b)` gives as (k, record indices),
  `locate` working on a vector of batch numbers). Reads whole batches, at least
  _RECORDS_PER_READ records a call; preprocesses the examples of two batches at once."""
  per_read = -(-_RECORDS_PER_READ // batch_size)
  ds = batch_numbers.batch(per_read).map(lambda b: (b, *locate(b)))
  ds = ds.map(lambda b, k, r: (b, k, _read(src, r)), num_parallel_calls=_BATCHES_AT_ONCE,
              deterministic=True)
  ds = _on_own_threads(ds, 'reads', _BATCHES_AT_ONCE).unbatch()
  build = _preprocessed_batch(src, preprocess, seed_of)
  return ds.interleave(
      lambda b, k, records: build(k, records).map(lambda batch: (b, batch)),
      cycle_length=_BATCHES_AT_ONCE, num_parallel_calls=_BATCHES_AT_ONCE, deterministic=True)


@functools.cache
def _thread_pool(name: str, num_threads: int) -> tf.Tensor:
  """A pool of threads for a stage of every pipeline of the process (made once: TensorFlow
  frees no such pool's threads, even when its resource is destroyed)."""
  with tf.init_scope():  # eager, should a pipeline be built inside a tf.function
    return tf.raw_ops.ThreadPoolHandle(num_threads=num_threads, display_name=name,
                                       shared_name=f'vit_jax_{name}_{num_threads}')


def _on_own_threads(ds: tf.data.Dataset, name: str, num_threads: int) -> tf.data.Dataset:
  """`ds` with its functions run on the pool `name`, not on tf.data's own pool.

  For the reads: tf.data's pool has a thread per core, and a read waiting on storage (tens of
  ms a request on gs://) held one; with one core, preprocessing stopped for every read (gs://
  at 50 ms per request: 0.61-0.67 of local on one core; on threads of their own, 0.84-0.92).
  TensorFlow dropped the Python wrapper of its ThreadPoolDataset; the op remains."""
  specs = tf.nest.flatten(ds.element_spec)
  variant = tf.raw_ops.ThreadPoolDataset(
      input_dataset=tf.data.experimental.to_variant(ds),
      thread_pool=_thread_pool(name, num_threads),
      output_types=[spec.dtype for spec in specs], output_shapes=[spec.shape for spec in specs])
  return tf.data.experimental.from_variant(variant, ds.element_spec)


def _usable_cores() -> int:
  """The cores this process may run on (its affinity mask: a pinned process or a container's
  share, not the machine's count): examples preprocessed in parallel per batch."""
  return max(1, len(os.sched_getaffinity(0)))


def _options() -> tf.data.Options:
  """Every pipeline's options. Autotuning is off: its model thread sleeps in periods that grow
  to 60 s, and TensorFlow 2.21 deletes an iterator (end of a run, Ctrl-C, every eval pass) only
  after that thread wakes, while holding the GIL: the process froze for up to a minute (seen at
  the end of the quickstart, 44 s). Parallelism is set explicitly instead (`_usable_cores`)."""
  options = tf.data.Options()
  options.deterministic = True
  options.autotune.enabled = False
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


def example_spec(src: sources.Source, spec: str) -> dict:
  """{key: tf.TensorSpec} of one example of `src` preprocessed by `spec` (per-example ops),
  found by tracing: nothing is read or decoded. Start-up checks it against the model."""
  preprocess, _ = ops.parse_preprocess(spec)

  @tf.function(input_signature=[tf.TensorSpec([], tf.string)])
  def one(record):
    example = src.parse(record)
    example[ops.SEED_KEY] = tf.constant([0, 0], tf.int64)
    return _keep_model_inputs(preprocess(example))
  return dict(one.get_concrete_function().structured_outputs)


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
  global_batch, first = config.batch_size, int(rows[0])
  row_of, record_of = tf.constant(rows, tf.int64), record_index(config.seed, src.num_examples)

  def locate(steps):  # this process's rows of global batches `steps`: positions, records
    k = steps[:, None] * global_batch + row_of
    return k, record_of(k)

  def seed_of(k):
    return tf.stack([tf.constant(config.seed, tf.int64), k])

  def finish(step, batch):
    skipped = tf.logical_not(batch.pop(VALID_KEY))  # per row: see TrainIterator's count
    if batch_ops is not None:
      batch[ops.SEED_KEY] = tf.stack([tf.constant(config.seed, tf.int64) * 1_000_003 + first,
                                      -1 - step])
      batch = batch_ops(batch)
      batch.pop(ops.SEED_KEY)
    return dict(batch, **{SKIPPED_KEY: skipped})
  steps = tf.data.Dataset.range(start_step, 2 ** 62)
  ds = _batches(src, preprocess, steps, locate, seed_of, len(rows))
  ds = ds.map(finish, num_parallel_calls=_BATCHES_AT_ONCE)
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

  def close(self) -> None:
    """Stops the input threads now: dropping the tf.data iterator cancels them. Left running
    at interpreter exit, they call into Python (the readers) after it has shut down, and the
    process can hang there."""
    self._queue.clear()
    self._batches = None

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

  def locate(b):
    k = b[:, None] * global_batch + row_of
    return k, tf.minimum(k, num_examples - 1)

  def with_mask(b, batch):
    k = b * global_batch + row_of
    real = tf.cast(k < num_examples, tf.float32)
    return dict(batch, mask=tf.cast(batch.pop(VALID_KEY), tf.float32) * real)
  ds = _batches(src, preprocess, tf.data.Dataset.range(num_batches), locate,
                lambda k: tf.constant([0, 0], tf.int64), len(rows))
  ds = ds.map(with_mask).prefetch(2).with_options(_options())

  def iterate():
    for local in ds.as_numpy_iterator():
      yield _to_global(local, mesh, global_batch)
  return num_batches, iterate()
