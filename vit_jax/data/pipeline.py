"""tf.data pipelines: source -> per-process share -> preprocess -> batch -> global jax.Array.

Training order and augmentation are a pure function of (seed, step): the shuffled, repeated
stream is enumerated, each example's random ops are seeded from its index, and a resumed run
skips the examples already consumed, so it sees exactly the batches an uninterrupted run would.
"""
import math
from typing import Iterator

import jax
import tensorflow as tf

from vit_jax import sharding
from vit_jax.data import ops, sources

# tf.data must not take the accelerator memory JAX needs.
tf.config.set_visible_devices([], 'GPU')


def local_batch_size(global_batch: int) -> int:
  if global_batch % jax.process_count():
    raise ValueError(f'batch_size={global_batch} is not divisible by the number of processes '
                     f'({jax.process_count()})')
  return global_batch // jax.process_count()


def _source(data_config, split: str) -> sources.Source:
  return sources.tfds_source(data_config.name, split, data_config.get('data_dir') or None)


def _with_seed(seed: int):
  """Attaches a stateless seed derived from (seed, process, example index)."""
  def fn(index, example):
    example = dict(example)
    example[ops.SEED_KEY] = tf.stack([tf.cast(seed * 1_000_003 + jax.process_index(), tf.int64),
                                      index])
    return example
  return fn


def _options() -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True
  options.threading.private_threadpool_size = 0
  options.experimental_optimization.map_parallelization = True
  return options


def _to_global(batch: dict, mesh) -> dict:
  batch_sharding = sharding.batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(batch_sharding, v) for k, v in batch.items()}


def train_iterator(config, mesh, start_step: int = 0) -> Iterator[dict]:
  """Yields global batches {'image', 'labels'} from step `start_step` on."""
  data = config.data
  source = _source(data, data.train_split)
  batch = local_batch_size(config.batch_size)
  preprocess = ops.get_preprocess_fn(config.pp_train)
  ds = source.dataset
  if data.get('cache', False):
    ds = ds.cache()
  ds = ds.shuffle(data.get('shuffle_buffer', 10_000), seed=config.seed,
                  reshuffle_each_iteration=True).repeat()
  ds = ds.enumerate().skip(start_step * batch).map(_with_seed(config.seed))
  ds = ds.map(lambda ex: _keep_model_inputs(preprocess(ex)), num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(batch, drop_remainder=True).prefetch(data.get('prefetch', 2))
  ds = ds.with_options(_options())
  for local in ds.as_numpy_iterator():
    yield _to_global(local, mesh)


def _keep_model_inputs(example: dict) -> dict:
  return {k: v for k, v in example.items() if k in ('image', 'labels')}


def eval_batches(config, mesh, split: str) -> tuple[int, Iterator[dict]]:
  """(num_batches, iterator) over a whole split, padded with mask=0 examples.

  Every process yields the same number of batches (collectives need it), however unevenly
  the split divides.
  """
  data = config.data
  source = _source(data, split)
  batch = local_batch_size(config.get('eval_batch_size', config.batch_size))
  preprocess = ops.get_preprocess_fn(config.pp_eval)
  num_batches = math.ceil(source.num_examples_max / batch)

  def add_mask(value):
    return lambda ex: dict(_keep_model_inputs(preprocess(dict(ex, **{ops.SEED_KEY: tf.constant(
        [0, 0], tf.int64)}))), mask=tf.constant(value, tf.float32))
  ds = source.dataset.map(add_mask(1.), num_parallel_calls=tf.data.AUTOTUNE)
  padding = source.dataset.take(1).map(add_mask(0.)).repeat()
  ds = ds.concatenate(padding).take(num_batches * batch).batch(batch)
  ds = ds.prefetch(2).with_options(_options())

  def iterate():
    for local in ds.as_numpy_iterator():
      yield _to_global(local, mesh)
  return num_batches, iterate()
