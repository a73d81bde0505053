"""Splits read by example index: any tensorflow-datasets dataset prepared as ArrayRecord (incl.
the offline digits) and the TFRecord files `python -m vit_jax.data.make_records` writes.

Random access is what makes the input a pure function of (seed, step): the pipeline computes
which record sits at position k of the training stream and reads just that one, so resuming at
step 100,000 reads one batch, not the 51M records before it, and each process reads only the
rows of the global batch its devices hold, whatever the number of processes.
"""
import collections
import contextlib
import fcntl
import functools
import io
import json
import os
import threading
import time

from absl import logging
import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from vit_jax.cli import errors
from vit_jax.storage import paths, tfrecord
from vit_jax.data import digits  # noqa: F401  (registers sklearn_digits)


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

# How long the processes wait for each other to prepare a dataset (a download can take hours);
# if one of them dies, jax.distributed ends the wait sooner.
PREPARE_WAIT_S = 48 * 3600


def prepare_tfds(builder, before_preparing=None):
  """Prepares a dataset that is not prepared yet, as ArrayRecord (random access); returns the
  builder to read it with. before_preparing(builder): a check run first (e.g. offline).

  On several processes, process 0 prepares first, so that a data_dir every host shares (a
  bucket mounted with gcsfuse, NFS) is prepared once. Then each process that does not find the
  dataset in its own data_dir (a folder on each host's own disk: the default
  ~/tensorflow_datasets on TPU VMs) prepares its own copy there, one process per folder at a
  time (a file lock: several processes of one host share its disk). Then each waits until
  every process has the data or one says why it cannot, through jax.distributed's key-value
  store, under keys named after the dataset, never after a data_dir (which may be another
  string on another host: another HOME).
  """
  if jax.process_count() == 1:
    _prepare_here(builder, before_preparing)
    return builder
  client = jax._src.distributed.global_state.client  # pylint: disable=protected-access
  return prepare_on_every_process(builder, before_preparing, client, jax.process_index(),
                                  jax.process_count())


def prepare_on_every_process(builder, before_preparing, client, process: int, processes: int):
  """prepare_tfds's protocol for `process` of `processes`, over a jax.distributed client (its
  key_value_set and blocking_key_value_get)."""
  config = builder.builder_config.name if builder.builder_config else ''
  key = f'vit_jax/tfds_prepared/{builder.name}/{config}/{builder.version}'
  deadline = time.monotonic() + PREPARE_WAIT_S

  def verdict_of(other: int) -> str:
    remaining_ms = max(int((deadline - time.monotonic()) * 1000), 1)
    return client.blocking_key_value_get(f'{key}/{other}', remaining_ms)

  try:
    if process and not builder.is_prepared():  # process 0 may be preparing a shared data_dir
      logging.info('process %d: waiting for process 0 to prepare %s', process, builder.name)
      if (verdict := verdict_of(0)) != _PREPARED:
        raise errors.UserError(f'process 0 could not prepare tfds dataset {builder.name} '
                               f'{verdict}')
      builder = _reloaded(builder)  # with the info process 0 wrote, should the folder be shared
    if not builder.is_prepared():  # process 0's copy is not on this host's disk: its own
      try:
        with _folder_lock(builder.data_dir_root):
          builder = _reloaded(builder)  # another process of this host may have prepared it
          _prepare_here(builder, before_preparing)
      except OSError as e:  # a read-only or full disk, a folder of another user
        raise errors.UserError(f'process {process} cannot prepare tfds dataset {builder.name} '
                               f'in data_dir {builder.data_dir_root}: {e}') from None
  except Exception as e:
    reason = str(e) if isinstance(e, errors.UserError) else f'{type(e).__name__}: {e}'
    client.key_value_set(f'{key}/{process}', f'in data_dir {builder.data_dir_root}: {reason}',
                         allow_overwrite=True)
    raise
  client.key_value_set(f'{key}/{process}', _PREPARED, allow_overwrite=True)
  for other in range(processes):
    if (verdict := verdict_of(other)) != _PREPARED:
      raise errors.UserError(f'process {other} could not prepare tfds dataset {builder.name} '
                             f'{verdict}')
  return builder


_PREPARED = 'prepared'


def _reloaded(builder):
  """The same builder made again: it reads the dataset's info as it is on disk now."""
  return type(builder)(data_dir=builder.data_dir_root, config=builder.builder_config,
                       version=builder.version)


@contextlib.contextmanager
def _folder_lock(data_dir: str):
  """Holds an exclusive lock on DATA_DIR/.vit_jax_prepare.lock (local or NFS folders)."""
  os.makedirs(data_dir, exist_ok=True)
  with open(os.path.join(data_dir, '.vit_jax_prepare.lock'), 'a') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)


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


def check_tfds_data_dir(data_dir: str | None) -> None:
  """A gs:// data_dir is refused naming the mount that serves it: ArrayRecord's reader opens
  local files only (given gs:// it blocks without an error)."""
  if not data_dir or not paths.is_remote(data_dir):
    return
  bucket, _, rest = data_dir.split('://', 1)[1].partition('/')
  folder = f'/gcs/{bucket}/{rest}'.rstrip('/')
  raise errors.UserError(
      f'data.data_dir={data_dir}: tfds datasets are read by example index with ArrayRecord\'s '
      f'reader, which opens local files only; mount the bucket with gcsfuse and give the '
      f'folder: on Cloud TPU VMs `python -m launch.tpu_vm ... --data_bucket=gs://{bucket}` '
      f'mounts it at /gcs/{bucket} on every worker, then pass --config.data.data_dir={folder}')


def tfds_builder(name: str, data_dir: str | None = None):
  """tfds.builder(name, data_dir), its metadata read within the start-up deadline."""
  check_tfds_data_dir(data_dir)

  def build():
    builder = tfds.builder(name, data_dir=data_dir)
    builder.is_prepared()
    return builder
  return paths.within_deadline(build, f'reading tfds dataset {name} in data_dir '
                               f'{data_dir or "(tfds default)"}')


# Sources are kept per process (functools.cache): every evaluation reads the same split, and a
# record source holds open files and a cache of its index that should not be made again.
@functools.cache
def tfds_source(name: str, split: str, data_dir: str | None = None) -> Source:
  """A tfds split (any split syntax, e.g. 'train[:90%]'), images left encoded for `decode`.

  The dataset must be prepared (start-up does it, once, before step 1: see preflight) and in
  ArrayRecord form; a TFRecord-prepared one is refused with the command that converts it.
  """
  # A no-op once prepared (start-up prepares); here for callers outside training.
  builder = prepare_tfds(tfds_builder(name, data_dir))
  check_random_access(builder)
  source = paths.within_deadline(
      lambda: tfds.data_source(name, split=split, data_dir=data_dir, download=False,
                               deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES),
      f'opening tfds dataset {name} split {split} in {builder.data_dir}')
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
  """Where each shard's record start offsets are kept: per shard its records' starts and its
  end (int64), shard after shard, one .npy array per split."""
  return str(paths.resolve(path) / f'{split}.offsets.npy')


def _index_only_command(path: str, split: str) -> str:
  return f'python -m vit_jax.data.make_records --index_only --output={path} --split={split}'


def read_record_info(path: str, split: str) -> dict:
  """The summary make_records writes beside the files (shard sizes, classes, skipped images),
  with 'files', once every shard and the offsets file are known to be there: one listing of
  the folder, no request per shard. Within the start-up deadline."""
  return paths.within_deadline(lambda: _read_record_info(path, split),
                               f'reading record set {path} (split {split})')


def _read_record_info(path: str, split: str) -> dict:
  info_path = record_info_path(path, split)
  if not paths.resolve(info_path).exists():
    raise FileNotFoundError(
        f'no records for split {split!r} in {path} ({info_path} is missing); write them with '
        f'python -m vit_jax.data.make_records --output={path} --split={split} ...')
  info = json.loads(paths.resolve(info_path).read_text())
  num_shards = len(info['shard_sizes'])
  names = [record_file_name(split, i, num_shards) for i in range(num_shards)]
  present = {p.name for p in paths.resolve(path).glob(f'{split}*')}
  missing = [n for n in names if n not in present]
  if missing:
    raise FileNotFoundError(f'{info_path} lists {num_shards} shards but '
                            f'{paths.resolve(path) / missing[0]} is missing ({len(missing)} '
                            'missing in all)')
  offsets_path = record_offsets_path(path, split)
  if paths.resolve(offsets_path).name not in present:
    raise FileNotFoundError(
        f'{offsets_path} is missing (record sets written before random access); write it once, '
        f'reading each file\'s record headers: {_index_only_command(path, split)}')
  info['files'] = [str(paths.resolve(path) / n) for n in names]
  return info


def offsets_header(num_entries: int) -> bytes:
  """The .npy header of an offsets file with `num_entries` int64 entries."""
  f = io.BytesIO()
  np.lib.format.write_array_header_1_0(f, {'descr': '<i8', 'fortran_order': False,
                                           'shape': (num_entries,)})
  return f.getvalue()


def write_record_offsets(path: str, split: str, offsets: np.ndarray) -> None:
  """Writes SPLIT.offsets.npy from an array (or a memory map) of all entries."""
  offsets = np.asarray(offsets, np.int64)
  with paths.resolve(record_offsets_path(path, split)).open('wb') as f:
    f.write(offsets_header(len(offsets)))
    for start in range(0, len(offsets), 1 << 20):
      f.write(offsets[start:start + (1 << 20)].tobytes())


class RecordIndex:
  """Entries of an offsets file, read a page at a time when needed and kept in a bounded cache
  (least recently used out): a process's memory for the index does not grow with the number of
  records (the whole array of 300M records would be 2.4 GB per host)."""

  PAGE_ENTRIES = 512  # 4 KiB pages
  CACHE_PAGES = 1024  # 4 MiB

  def __init__(self, path: str, num_entries: int, reader: paths.RangeReader, fix: str):
    self._path, self._reader = path, reader
    start = paths.read_range(path, 0, 10)  # magic string, version, header length (v1)
    size = int.from_bytes(start[8:10], 'little')
    header = io.BytesIO(start + paths.read_range(path, 10, 10 + size))
    try:
      version = np.lib.format.read_magic(header)
      shape, fortran, dtype = (np.lib.format.read_array_header_1_0(header) if version == (1, 0)
                               else np.lib.format.read_array_header_2_0(header))
    except ValueError as e:
      raise ValueError(f'{path} is not an offsets file ({e}); write it again: {fix}') from None
    if shape != (num_entries,) or fortran or dtype != np.dtype('<i8'):
      raise ValueError(f'{path} holds {shape} {dtype} entries but its SPLIT.json needs '
                       f'({num_entries},) int64 (the shards and their index disagree); write it '
                       f'again: {fix}')
    self._data_start, self._num_entries = header.tell(), num_entries
    self._pages = collections.OrderedDict()
    self._lock = threading.Lock()

  def __getitem__(self, entries: np.ndarray) -> np.ndarray:
    """The int64 values at `entries` (an array of positions)."""
    pages = entries // self.PAGE_ENTRIES
    wanted = np.unique(pages)
    with self._lock:
      cached = {int(p): self._pages[int(p)] for p in wanted if int(p) in self._pages}
    missing = [int(p) for p in wanted if int(p) not in cached]
    if missing:
      size = np.dtype(np.int64).itemsize
      ranges = [(self._path, self._data_start + p * self.PAGE_ENTRIES * size,
                 self._data_start + min((p + 1) * self.PAGE_ENTRIES, self._num_entries) * size)
                for p in missing]
      for p, data in zip(missing, self._reader.read(ranges)):
        cached[p] = np.frombuffer(data, '<i8')
    with self._lock:
      for p in wanted:
        self._pages[int(p)] = cached[int(p)]
        self._pages.move_to_end(int(p))
      while len(self._pages) > self.CACHE_PAGES:
        self._pages.popitem(last=False)
    values = np.empty(len(entries), np.int64)
    for p in wanted:
      here = pages == p
      values[here] = cached[int(p)][entries[here] % self.PAGE_ENTRIES]
    return values


class _RecordReader:
  """Records by global index from a set of TFRecord files: the index gives each record's byte
  range, `paths.RangeReader` reads all of a call's ranges at once."""

  def __init__(self, files: list[str], shard_sizes: list[int], index: RecordIndex,
               reader: paths.RangeReader, fix: str):
    self._files, self._index, self._reader, self._fix = files, index, reader, fix
    self._first = np.cumsum([0] + list(shard_sizes))  # global index of each file's record 0
    self._base = self._first + np.arange(len(files) + 1)  # where each file's entries start

  def read_many(self, indices: list[int]) -> list[bytes]:
    indices = np.asarray(indices, np.int64)
    files = np.searchsorted(self._first, indices, side='right') - 1
    entries = self._base[files] + indices - self._first[files]
    bounds = self._index[np.concatenate([entries, entries + 1])]
    starts, stops = bounds[:len(entries)], bounds[len(entries):]
    framed = self._reader.read([(self._files[f], int(a), int(b))
                                for f, a, b in zip(files, starts, stops)])
    return [self._unframed(data, int(i), int(f), int(b - a))
            for data, i, f, a, b in zip(framed, indices, files, starts, stops)]

  def read_one(self, index: int) -> bytes:
    return self.read_many([index])[0]

  def _unframed(self, framed: bytes, index: int, file: int, expected: int) -> bytes:
    """The record's payload; its framing must span exactly what the index says."""
    length = (tfrecord.framed_length(framed) if len(framed) >= tfrecord.HEADER_BYTES
              else -1)
    if length != expected or len(framed) != expected:
      raise ValueError(
          f'{self._files[file]}: record {index - self._first[file]} (example {index}) is '
          f'framed as {length} bytes but the offsets file says {expected}: the index is stale '
          f'(the shard was written again after it); write it again: {self._fix}')
    return framed[tfrecord.HEADER_BYTES:expected - 4]


def _parse_record(serialized):
  example = tf.io.parse_single_example(serialized, RECORD_FEATURES)
  return {'image': example['image'], 'label': tf.sparse.to_dense(example['labels'])}


@functools.cache
def records_source(path: str, split: str) -> Source:
  """A split written by make_records, images left encoded, read by record index."""
  info = read_record_info(path, split)
  sizes = info['shard_sizes']
  fix = _index_only_command(path, split)
  reader = paths.RangeReader()
  index = paths.within_deadline(
      lambda: RecordIndex(record_offsets_path(path, split), sum(sizes) + len(sizes), reader, fix),
      f'reading {record_offsets_path(path, split)}')
  records = _RecordReader(info['files'], sizes, index, reader, fix)
  return Source(sum(sizes), records.read_many, _parse_record, f'{path}:{split}')
