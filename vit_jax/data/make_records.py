"""Folder of images + CSV of labels -> sharded TFRecord files the trainer reads (`data.path`).

    python -m vit_jax.data.make_records --image_dir=DIR --labels=FILE.csv --output=OUT \
        --num_shards=N [--split=train] [--num_classes=K]

FILE.csv has a header `image,labels`; `image` is a path relative to DIR, `labels` the image's
class ids separated by spaces (`3 17 250`). Every image is decoded once here, as the trainer will
decode it, so a corrupt or truncated file is skipped and counted now instead of failing a run
later; a row naming a missing file is reported with its line number and skipped. Images are
stored as their original bytes (no re-encoding). Writes OUT/SPLIT-0000i-of-0000N.tfrecord
(tf.train.Example: `image` bytes, `labels` int64 list; examples dealt round-robin so shards are
even), OUT/SPLIT.json (shard sizes, number of classes, what was skipped) and OUT/SPLIT.offsets.npy
(where each record starts: the trainer reads records by index).

Memory stays bounded whatever the number of images: the CSV is read twice (checked whole, then
written) as a stream, images are loaded a bounded window ahead, and the offsets go through a
temporary file. Record sets written before the offsets file existed, or whose index is stale,
get it with `--index_only --output=OUT --split=SPLIT`: it reads each record's 12-byte header,
skipping its payload, shards in parallel.
"""
import collections
import concurrent.futures
import csv
import io
import json
import os
import re
import shutil
import sys
import tempfile

import numpy as np
import tensorflow as tf
import tqdm
from absl import app, flags

from vit_jax.cli import errors, startup
from vit_jax.storage import paths, tfrecord
from vit_jax.data import sources


def labels_csv_rows(path: str):
  """(line number, image, class ids) per row, streamed; a malformed row is a UserError naming
  its line."""
  with paths.resolve(path).open('rb') as raw, io.TextIOWrapper(raw, encoding='utf-8',
                                                               newline='') as f:
    reader = csv.reader(f)
    header = next(reader, None)
    if header is None or [h.strip() for h in header] != ['image', 'labels']:
      raise errors.UserError(f'{path}:1: expected the header "image,labels", got {header}')
    for row in reader:
      line = reader.line_num
      if not row:
        continue
      if len(row) != 2 or not row[0].strip():
        raise errors.UserError(f'{path}:{line}: expected "image,labels", got {row}')
      try:
        labels = [int(x) for x in row[1].split()]
      except ValueError:
        raise errors.UserError(f'{path}:{line}: labels must be space-separated class ids, '
                               f'got {row[1]!r}') from None
      if not labels or min(labels) < 0:
        raise errors.UserError(f'{path}:{line}: need at least one class id >= 0, got '
                               f'{row[1]!r}')
      yield line, row[0].strip(), labels


def _check_labels_csv(path: str, num_classes: int) -> tuple[int, int]:
  """(rows, largest class id), every row checked before any work is done."""
  rows, max_label = 0, -1
  for line, _, labels in labels_csv_rows(path):
    if num_classes and max(labels) >= num_classes:
      raise errors.UserError(f'{path}:{line}: class id {max(labels)} >= '
                             f'num_classes={num_classes}')
    rows, max_label = rows + 1, max(max_label, max(labels))
  return rows, max_label


def decode_error(data: bytes) -> str | None:
  """None if TensorFlow decodes the bytes completely (as the trainer will), else why not."""
  try:
    tf.io.decode_image(data, channels=3, expand_animations=False)
  except tf.errors.InvalidArgumentError as e:  # drop TF's '{{function_node ...}}' / '[Op:..]'
    return re.sub(r'\{\{.*?\}\}|\[Op:\w+\]', '', e.message).strip()
  return None


def _load(image_dir: str, row):
  line, name, labels = row
  path = paths.resolve(image_dir) / name
  if not path.is_file():
    return line, name, labels, None, 'missing'
  data = path.read_bytes()
  error = decode_error(data)
  return line, name, labels, (None if error else data), error


def _example(data: bytes, labels: list[int]) -> bytes:
  return tf.train.Example(features=tf.train.Features(feature={
      'image': tf.train.Feature(bytes_list=tf.train.BytesList(value=[data])),
      'labels': tf.train.Feature(int64_list=tf.train.Int64List(value=labels)),
  })).SerializeToString()


# What decoders write on their own about a file that `_load` reports as unreadable.
_DECODER_NOISE = ('Input file read error', 'Improper call to JPEG library', 'local_rendezvous.cc',
                  'Invalid JPEG data', 'Corrupt JPEG data', 'Premature end of JPEG file',
                  'libpng')


class _OffsetsFile:
  """SPLIT.offsets.npy assembled in a local temporary file, written where each shard's entries
  go (os.pwrite: nothing held in memory), then copied to the output (local or gs://)."""

  def __init__(self, shard_sizes: list[int]):
    self._starts = np.cumsum([0] + [n + 1 for n in shard_sizes])  # each shard's first entry
    self._file = tempfile.TemporaryFile()  # pylint: disable=consider-using-with
    self._file.write(sources.offsets_header(int(self._starts[-1])))
    self._data_start = self._file.tell()
    self._file.truncate(self._data_start + 8 * int(self._starts[-1]))  # zeros: every entry 0

  def put(self, shard: int, first_entry: int, values: np.ndarray) -> None:
    position = self._data_start + 8 * (int(self._starts[shard]) + first_entry)
    os.pwrite(self._file.fileno(), np.asarray(values, '<i8').tobytes(), position)

  def save(self, output: str, split: str) -> None:
    self._file.seek(0)
    with paths.resolve(sources.record_offsets_path(output, split)).open('wb') as out:
      shutil.copyfileobj(self._file, out, 1 << 20)
    self._file.close()


def _offsets_from_lengths(lengths, num_records: int, num_shards: int) -> _OffsetsFile:
  """The offsets of records dealt round-robin (record j to shard j % num_shards), from the
  framed length of each in the order written (a file of int64), a block of rows at a time."""
  shard_sizes = [(num_records - s + num_shards - 1) // num_shards for s in range(num_shards)]
  offsets = _OffsetsFile(shard_sizes)
  lengths.seek(0)
  totals = np.zeros(num_shards, np.int64)  # each shard's bytes so far
  done = 0  # rows of the deal written so far
  rows = max(1, (1 << 20) // num_shards)
  while (block := np.frombuffer(lengths.read(8 * rows * num_shards), np.int64)).size:
    full = -(-block.size // num_shards)
    padded = np.zeros(full * num_shards, np.int64)
    padded[:block.size] = block
    ends = np.cumsum(padded.reshape(full, num_shards), axis=0) + totals
    counts = np.where(np.arange(num_shards) < block.size - (full - 1) * num_shards, full,
                      full - 1)
    for shard in np.flatnonzero(counts):
      offsets.put(shard, 1 + done, ends[:counts[shard], shard])
      totals[shard] = ends[counts[shard] - 1, shard]
    done += full
  return offsets


def _loaded(image_dir: str, rows, workers: int):
  """_load of every row, in order, with at most a few rows per worker loaded ahead."""
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    window = collections.deque()
    for row in rows:
      window.append(pool.submit(_load, image_dir, row))
      if len(window) >= 4 * workers:
        yield window.popleft().result()
    while window:
      yield window.popleft().result()


def write_records(image_dir: str, labels_csv: str, output: str, num_shards: int,
                  split: str = 'train', num_classes: int = 0, log=sys.stderr) -> dict:
  """Writes the shards, SPLIT.offsets.npy and SPLIT.json; returns the summary (SPLIT.json's)."""
  if num_shards < 1:
    raise errors.UserError(f'--num_shards={num_shards} must be >= 1')
  if not paths.resolve(image_dir).is_dir():
    raise errors.UserError(f'--image_dir={image_dir}: no such folder (the CSV\'s image paths '
                           'are relative to it)')
  num_rows, max_label = _check_labels_csv(labels_csv, num_classes)
  paths.resolve(output).mkdir(parents=True, exist_ok=True)
  writers = [tfrecord.writer(
      paths.resolve(output) / sources.record_file_name(split, i, num_shards))
             for i in range(num_shards)]
  written = 0
  missing, corrupt, classes = [], [], set()
  workers = min(32, os.cpu_count() or 1)
  # The decoders' own complaints (libjpeg, TF's C++ logging) go to file descriptor 2 from the
  # worker threads, through the progress bar: captured, and our one line per skipped file is
  # said after the bar instead.
  with startup.native_stderr_captured() as native, tempfile.TemporaryFile() as lengths:
    bar_file = native.terminal if log is sys.stderr else log
    loaded = _loaded(image_dir, labels_csv_rows(labels_csv), workers)
    for line, name, labels, data, error in tqdm.tqdm(loaded, total=num_rows, unit='img',
                                                     desc=f'{split} records', file=bar_file):
      if data is None:
        (missing if error == 'missing' else corrupt).append((line, name, error))
        continue
      record = _example(data, labels)
      writers[written % num_shards].write(record)
      lengths.write(np.int64(len(record) + tfrecord.FRAMING_BYTES).tobytes())
      written += 1
      classes.update(labels)
    for w in writers:
      w.close()
    _offsets_from_lengths(lengths, written, num_shards).save(output, split)
  native.replay(noise=_DECODER_NOISE)
  for line, name, error in sorted(missing + corrupt):
    what = 'not found in ' + image_dir if error == 'missing' else f'unreadable ({error})'
    print(f'{labels_csv}:{line}: skipping {name}: {what}', file=log)
  shard_sizes = [(written - s + num_shards - 1) // num_shards for s in range(num_shards)]
  summary = {
      'num_examples': written, 'shard_sizes': shard_sizes,
      'num_classes': num_classes or max_label + 1, 'classes_seen': len(classes),
      'skipped_missing': len(missing), 'skipped_corrupt': len(corrupt),
      'skipped': [{'line': line, 'image': name, 'error': error}
                  for line, name, error in missing + corrupt],
  }
  paths.resolve(sources.record_info_path(output, split)).write_text(json.dumps(summary, indent=1))
  print(f'wrote {written} images to {output}/'
        f'{sources.record_file_name(split, 0, num_shards).replace("00000-", "*-")}; '
        f'skipped {len(missing) + len(corrupt)} ({len(missing)} missing, {len(corrupt)} '
        f'corrupt); classes: {len(classes)} seen, num_classes={summary["num_classes"]}',
        file=log)
  return summary


def write_index(output: str, split: str, log=sys.stderr) -> int:
  """Writes SPLIT.offsets.npy for a record set from its files' record headers (each payload
  skipped); returns the number of records."""
  info_path = paths.resolve(sources.record_info_path(output, split))
  if not info_path.exists():
    raise errors.UserError(f'{info_path} is missing: --output={output} --split={split} holds no '
                           'record set written by make_records')
  sizes = json.loads(info_path.read_text())['shard_sizes']
  files = [paths.resolve(output) / sources.record_file_name(split, i, len(sizes))
           for i in range(len(sizes))]
  offsets = _OffsetsFile(sizes)

  def index(shard: int) -> None:
    file = files[shard]
    offsets.put(shard, 0, tfrecord.record_starts(file, sizes[shard], file.stat().length))
  with concurrent.futures.ThreadPoolExecutor(min(32, len(sizes))) as pool:
    for _ in tqdm.tqdm(pool.map(index, range(len(sizes))), total=len(sizes), unit='shard',
                       desc=f'{split} index', file=log):
      pass
  offsets.save(output, split)
  print(f'wrote {sources.record_offsets_path(output, split)} ({sum(sizes)} records)', file=log)
  return sum(sizes)


def define_flags() -> None:
  """The command's flags: defined when run as a program, so importing this module defines none."""
  flags.DEFINE_string('image_dir', None, 'Folder the CSV image paths are relative to.')
  flags.DEFINE_string('labels', None, 'CSV file with header "image,labels".')
  flags.DEFINE_string('output', None, 'Output folder (the trainer\'s data.path).')
  flags.DEFINE_integer('num_shards', 1, 'Record files to write; any number works (training '
                       'reads each example by index, whatever file holds it): e.g. files of '
                       '100 MB to 1 GB.')
  flags.DEFINE_string('split', 'train', 'Split name (train_split / eval_split).')
  flags.DEFINE_integer('num_classes', 0, 'Number of classes; 0 = largest id + 1.')
  flags.DEFINE_bool('index_only', False, 'Only write SPLIT.offsets.npy for the record set in '
                    '--output (one written before the trainer read records by index).')
  flags.mark_flags_as_required(['output'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  if not f.index_only and not (f.image_dir and f.labels):
    raise app.UsageError('--image_dir and --labels are required (or --index_only)')
  with errors.reported_as_one_line():
    if f.index_only:
      write_index(f.output, f.split)
    else:
      write_records(f.image_dir, f.labels, f.output, f.num_shards, f.split, f.num_classes)


if __name__ == '__main__':
  define_flags()
  app.run(main)
