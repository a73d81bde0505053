"""Splits read by example index: any tensorflow-datasets dataset prepared as ArrayRecord (incl.
the offline digits) and the TFRecord files `python -m vit_jax.data.make_records` writes.

Random access is what makes the input a pure function of (seed, step): the pipeline computes
which record sits at position k of the training stream and reads just that one, so resuming at
step 100,000 reads one batch, not the 51M records before it, and each process reads only the
rows of the global batch its devices hold, whatever the number of processes.
"""
import bisect
import concurrent.futures
import functools
import json
import os
import struct
import threading

from absl import logging
import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from vit_jax import errors, paths, records_io
from vit_jax.data import digits  # noqa: F401  (registers sklearn_digits)

# Reads in flight per process; records are small and latency (a disk seek, a GCS range read)
# dominates, so many at once.
READ_THREADS = 32


class Source:
  """A split: `read(indices)` gives serialized examples, `parse` turns one into a dict with
  'image' (encoded bytes) and 'label' (class id or ids). Counts the records it has read."""

  def __init__(self, num_examples: int, read_many, parse, name: str):
    self.num_examples, self.name = num_examples, name
    self._read_many, self.parse = read_many, parse
    self.records_read = 0
    self._count_lock = threading.Lock()

  def read(self, indices: np.ndarray) -> np.ndarray:
    records = self._read_many([int(i) for i in indices])
    with self._count_lock:
      self.records_read += len(records)
    return np.array(records, dtype=object)


# ---------------------------------------------------------------------------------------------
# tensorflow-datasets, prepared as ArrayRecord (random access through tfds.data_source).

# How long the other processes wait for process 0 to prepare a dataset (a download can take
# hours); if process 0 dies, jax.distributed ends the wait sooner.
PREPARE_WAIT_S = 48 * 3600


def prepare_tfds(builder, before_preparing=None):
  """Prepares a dataset that is not prepared yet, as ArrayRecord (random access); returns the
  builder to read it with. before_preparing(builder): a check run first (e.g. offline).

  On several processes only process 0 prepares: N hosts writing one folder would race. It
  tells the others through jax.distributed's key-value store when it is done (or why it
  failed); a process that does not see the dataset prepared waits for that, then checks that
  it sees it now: data_dir must be storage every host reads (gs://, or a shared mount).
  """
  if jax.process_count() == 1:
    _prepare_here(builder, before_preparing)
    return builder
  client = jax._src.distributed.global_state.client  # pylint: disable=protected-access
  key = f'vit_jax/tfds_prepared/{builder.data_dir}'
  if jax.process_index() == 0:
    try:
      _prepare_here(builder, before_preparing)
    except Exception as e:
      client.key_value_set(key, f'{type(e).__name__}: {e}', allow_overwrite=True)
      raise
    client.key_value_set(key, _PREPARED, allow_overwrite=True)
    return builder
  if builder.is_prepared():
    return builder
  logging.info('process %d: waiting for process 0 to prepare %s in %s', jax.process_index(),
               builder.name, builder.data_dir_root)
  verdict = client.blocking_key_value_get(key, PREPARE_WAIT_S * 1000)
  if verdict != _PREPARED:
    raise errors.UserError(f'process 0 could not prepare tfds dataset {builder.name} in '
                       f'{builder.data_dir_root}: {verdict}')
  builder = type(builder)(data_dir=builder.data_dir_root, config=builder.builder_config,
                          version=builder.version)  # with the info process 0 wrote
  if not builder.is_prepared():
    raise errors.UserError(
        f'process 0 prepared tfds dataset {builder.name} in data_dir {builder.data_dir_root}, '
        f'but process {jax.process_index()} does not find it there: on several hosts data_dir '
        'must be storage every host reads (gs://BUCKET/..., or a shared mount)')
  return builder


_PREPARED = 'prepared'


def _prepare_here(builder, before_preparing) -> None:
  if not builder.is_prepared():
    if before_preparing:
      before_preparing(builder)
    builder.download_and_prepare(file_format='array_record')


def check_random_access(builder) -> None:
  """A prepared dataset stored as anything but ArrayRecord is refused, naming the conversion."""
  file_format = str(getattr(builder.info.file_format, 'value', builder.info.file_format))
  if file_format != 'array_record':
    raise ValueError(
        f'tfds dataset {builder.name} in {builder.data_dir} is stored as {file_format}, which '
        f'cannot be read by example index (exact, constant-time resume needs that); convert it '
        f'once with: tfds convert_format --dataset_dir={builder.data_dir} '
        f'--out_file_format=array_record')


# Sources are kept per process (functools.cache): every evaluation reads the same split, and a
# record source holds open files, its offsets and a thread pool that should not be made again.
@functools.cache
def tfds_source(name: str, split: str, data_dir: str | None = None) -> Source:
  """A tfds split (any split syntax, e.g. 'train[:90%]'), images left encoded for `decode`.

  The dataset must be prepared (start-up does it, once, before step 1: see preflight) and in
  ArrayRecord form; a TFRecord-prepared one is refused with the command that converts it.
  """
  # A no-op once prepared (start-up prepares); here for callers outside training.
  builder = prepare_tfds(tfds.builder(name, data_dir=data_dir))
  check_random_access(builder)
  source = tfds.data_source(name, split=split, data_dir=data_dir, download=False,
                            deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
  features = builder.info.features
  decoders = {k: tfds.decode.SkipDecoding() for k, f in features.items()
              if isinstance(f, tfds.features.Image)}

  def parse(serialized):
    return dict(features.deserialize_example(serialized, decoders=decoders))
  return Source(len(source), source.__getitems__, parse, f'{name}:{split}')


# ---------------------------------------------------------------------------------------------
# Record files written by make_records: TFRecord shards + SPLIT.json + SPLIT.offsets.npy.

# tf.train.Example features of the record files; `labels` is read into the example's 'label'
# (a vector of class ids), so the same `onehot(K)` serves tfds and record sources.
RECORD_FEATURES = {
    'image': tf.io.FixedLenFeature([], tf.string),
    'labels': tf.io.VarLenFeature(tf.int64),
}


def record_file_name(split: str, shard: int, num_shards: int) -> str:
  return f'{split}-{shard:05d}-of-{num_shards:05d}.tfrecord'


def record_info_path(path: str, split: str) -> str:
  return str(paths.resolve(path) / f'{split}.json')


def record_offsets_path(path: str, split: str) -> str:
  """Where each shard's record start offsets are kept (int64, one array per split)."""
  return str(paths.resolve(path) / f'{split}.offsets.npy')


def read_record_info(path: str, split: str) -> dict:
  """The summary make_records writes beside the files: shard sizes, classes, skipped images."""
  info_path = record_info_path(path, split)
  if not paths.resolve(info_path).exists():
    raise FileNotFoundError(
        f'no records for split {split!r} in {path} ({info_path} is missing); write them with '
        f'python -m vit_jax.data.make_records --output={path} --split={split} ...')
  info = json.loads(paths.resolve(info_path).read_text())
  num_shards = len(info['shard_sizes'])
  files = [str(paths.resolve(path) / record_file_name(split, i, num_shards))
           for i in range(num_shards)]
  missing = [f for f in files if not paths.resolve(f).exists()]
  if missing:
    raise FileNotFoundError(f'{info_path} lists {num_shards} shards but {missing[0]} is missing '
                            f'({len(missing)} missing in all)')
  offsets_path = record_offsets_path(path, split)
  if not paths.resolve(offsets_path).exists():
    raise FileNotFoundError(
        f'{offsets_path} is missing (record sets written before random access); write it once, '
        f'reading each file\'s record headers: python -m vit_jax.data.make_records '
        f'--index_only --output={path} --split={split}')
  info['files'] = files
  return info


def record_offsets(files: list[str], shard_sizes: list[int]) -> np.ndarray:
  """Start offsets of every record of every file, in file order, plus each file's end: what
  random access needs, from the length fields of TensorFlow's record framing."""
  offsets = []
  for file, size in zip(files, shard_sizes):
    file_offsets = [0]
    for record in records_io.read(file):
      file_offsets.append(file_offsets[-1] + len(record) + records_io.FRAMING_BYTES)
    if len(file_offsets) - 1 != size:
      raise ValueError(f'{file} holds {len(file_offsets) - 1} records, its SPLIT.json says {size}')
    offsets.append(file_offsets)
  return np.array([o for file_offsets in offsets for o in file_offsets], np.int64)


def write_record_offsets(path: str, split: str, offsets: np.ndarray) -> None:
  with paths.resolve(record_offsets_path(path, split)).open('wb') as f:
    np.save(f, offsets, allow_pickle=False)


class _RecordReader:
  """Record i of a set of TFRecord files, by byte range: os.pread on local files (no shared file
  position, so threads read at once), a per-thread epath file elsewhere (gs://)."""

  def __init__(self, files: list[str], shard_sizes: list[int], offsets: np.ndarray):
    self._files = files
    self._first = np.cumsum([0] + list(shard_sizes))  # global index of each file's record 0
    self._offsets = offsets  # per file: size + 1 entries
    self._base = self._first + np.arange(len(files) + 1)  # where each file's entries start
    self._local = not any(paths.is_remote(f) for f in files)
    self._fds = [None] * len(files)
    self._lock = threading.Lock()
    self._thread = threading.local()
    self._pool = concurrent.futures.ThreadPoolExecutor(READ_THREADS)

  def _range(self, index: int) -> tuple[int, int, int]:
    file = bisect.bisect_right(self._first, index) - 1
    entry = self._base[file] + index - self._first[file]
    return file, int(self._offsets[entry]), int(self._offsets[entry + 1])

  def _bytes(self, file: int, start: int, stop: int) -> bytes:
    if self._local:
      if self._fds[file] is None:
        with self._lock:
          if self._fds[file] is None:
            self._fds[file] = os.open(self._files[file], os.O_RDONLY)
      return os.pread(self._fds[file], stop - start, start)
    handles = self._thread.__dict__.setdefault('handles', {})
    if file not in handles:
      handles[file] = paths.resolve(self._files[file]).open('rb')
    handles[file].seek(start)
    return handles[file].read(stop - start)

  def read_one(self, index: int) -> bytes:
    file, start, stop = self._range(index)
    framed = self._bytes(file, start, stop)
    (length,) = struct.unpack('<Q', framed[:8])
    return framed[12:12 + length]

  def read_many(self, indices: list[int]) -> list[bytes]:
    return list(self._pool.map(self.read_one, indices))


def _parse_record(serialized):
  example = tf.io.parse_single_example(serialized, RECORD_FEATURES)
  return {'image': example['image'], 'label': tf.sparse.to_dense(example['labels'])}


@functools.cache
def records_source(path: str, split: str) -> Source:
  """A split written by make_records, images left encoded, read by record index."""
  info = read_record_info(path, split)
  with paths.resolve(record_offsets_path(path, split)).open('rb') as f:
    offsets = np.load(f, allow_pickle=False)
  sizes = info['shard_sizes']
  if len(offsets) != sum(sizes) + len(sizes):
    raise ValueError(f'{record_offsets_path(path, split)} does not match {split}.json; write it '
                     f'again: python -m vit_jax.data.make_records --index_only --output={path} '
                     f'--split={split}')
  reader = _RecordReader(info['files'], sizes, offsets)
  return Source(sum(sizes), reader.read_many, _parse_record, f'{path}:{split}')
