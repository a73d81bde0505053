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

Record sets written before the offsets file existed get it with `--index_only --output=OUT
--split=SPLIT` (reads the files once).
"""
import concurrent.futures
import csv
import io
import json
import os
import re
import sys

import numpy as np
import tensorflow as tf
import tqdm
from absl import app, flags

from vit_jax import paths, records_io, startup
from vit_jax.data import sources


def read_labels_csv(path: str) -> list[tuple[int, str, list[int]]]:
  """(line number, image, class ids) per row; a malformed row is an error naming its line."""
  rows = []
  with io.StringIO(paths.resolve(path).read_text(encoding='utf-8'), newline='') as f:
    reader = csv.reader(f)
    header = next(reader, None)
    if header is None or [h.strip() for h in header] != ['image', 'labels']:
      raise ValueError(f'{path}:1: expected the header "image,labels", got {header}')
    for row in reader:
      line = reader.line_num
      if not row:
        continue
      if len(row) != 2 or not row[0].strip():
        raise ValueError(f'{path}:{line}: expected "image,labels", got {row}')
      try:
        labels = [int(x) for x in row[1].split()]
      except ValueError:
        raise ValueError(f'{path}:{line}: labels must be space-separated class ids, '
                         f'got {row[1]!r}') from None
      if not labels or min(labels) < 0:
        raise ValueError(f'{path}:{line}: need at least one class id >= 0, got {row[1]!r}')
      rows.append((line, row[0].strip(), labels))
  return rows


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


def write_records(image_dir: str, labels_csv: str, output: str, num_shards: int,
                  split: str = 'train', num_classes: int = 0, log=sys.stderr) -> dict:
  """Writes the shards and SPLIT.json; returns the summary (also stored in SPLIT.json)."""
  if num_shards < 1:
    raise ValueError(f'num_shards={num_shards} must be >= 1')
  if not paths.resolve(image_dir).is_dir():
    raise FileNotFoundError(f'--image_dir={image_dir}: no such folder (the CSV\'s image paths are '
                            'relative to it)')
  rows = read_labels_csv(labels_csv)
  max_label = max((max(labels) for _, _, labels in rows), default=-1)
  if num_classes and max_label >= num_classes:
    line = next(line for line, _, labels in rows if max(labels) >= num_classes)
    raise ValueError(f'{labels_csv}:{line}: class id {max_label} >= num_classes={num_classes}')
  paths.resolve(output).mkdir(parents=True, exist_ok=True)
  writers = [records_io.writer(
      paths.resolve(output) / sources.record_file_name(split, i, num_shards))
             for i in range(num_shards)]
  shard_sizes = [0] * num_shards
  shard_offsets = [[0] for _ in range(num_shards)]
  missing, corrupt, classes = [], [], set()
  workers = min(32, os.cpu_count() or 1)
  # The decoders' own complaints (libjpeg, TF's C++ logging) go to file descriptor 2 from the
  # worker threads, through the progress bar: captured, and our one line per skipped file is
  # said after the bar instead.
  with startup.native_stderr_captured() as native, \
      concurrent.futures.ThreadPoolExecutor(workers) as pool:
    loaded = pool.map(lambda row: _load(image_dir, row), rows)
    bar_file = native.terminal if log is sys.stderr else log
    for line, name, labels, data, error in tqdm.tqdm(loaded, total=len(rows), unit='img',
                                                     desc=f'{split} records', file=bar_file):
      if data is None:
        (missing if error == 'missing' else corrupt).append((line, name, error))
        continue
      shard = sum(shard_sizes) % num_shards
      record = _example(data, labels)
      writers[shard].write(record)
      shard_sizes[shard] += 1
      shard_offsets[shard].append(shard_offsets[shard][-1] + len(record) +
                                  records_io.FRAMING_BYTES)
      classes.update(labels)
  native.replay(noise=_DECODER_NOISE)
  for line, name, error in sorted(missing + corrupt):
    what = 'not found in ' + image_dir if error == 'missing' else f'unreadable ({error})'
    print(f'{labels_csv}:{line}: skipping {name}: {what}', file=log)
  for w in writers:
    w.close()
  summary = {
      'num_examples': sum(shard_sizes), 'shard_sizes': shard_sizes,
      'num_classes': num_classes or max_label + 1, 'classes_seen': len(classes),
      'skipped_missing': len(missing), 'skipped_corrupt': len(corrupt),
      'skipped': [{'line': line, 'image': name, 'error': error}
                  for line, name, error in missing + corrupt],
  }
  sources.write_record_offsets(output, split,
                               np.concatenate([np.array(o, np.int64) for o in shard_offsets]))
  paths.resolve(sources.record_info_path(output, split)).write_text(json.dumps(summary, indent=1))
  print(f'wrote {summary["num_examples"]} images to {output}/'
        f'{sources.record_file_name(split, 0, num_shards).replace("00000-", "*-")}; '
        f'skipped {len(missing) + len(corrupt)} ({len(missing)} missing, {len(corrupt)} '
        f'corrupt); classes: {len(classes)} seen, num_classes={summary["num_classes"]}',
        file=log)
  return summary


def write_index(output: str, split: str, log=sys.stderr) -> int:
  """Writes SPLIT.offsets.npy for a record set that lacks it; returns the number of records."""
  info_path = paths.resolve(sources.record_info_path(output, split))
  if not info_path.exists():
    raise FileNotFoundError(f'{info_path} is missing: --output={output} --split={split} holds no '
                            'record set written by make_records')
  sizes = json.loads(info_path.read_text())['shard_sizes']
  files = [str(paths.resolve(output) / sources.record_file_name(split, i, len(sizes)))
           for i in range(len(sizes))]
  sources.write_record_offsets(output, split, sources.record_offsets(files, sizes))
  print(f'wrote {sources.record_offsets_path(output, split)} ({sum(sizes)} records)', file=log)
  return sum(sizes)


def define_flags() -> None:
  """The command's flags: defined when run as a program, so importing this module defines none."""
  flags.DEFINE_string('image_dir', None, 'Folder the CSV image paths are relative to.')
  flags.DEFINE_string('labels', None, 'CSV file with header "image,labels".')
  flags.DEFINE_string('output', None, 'Output folder (the trainer\'s data.path).')
  flags.DEFINE_integer('num_shards', 1, 'Record files to write; a multiple of the number of '
                       'training processes.')
  flags.DEFINE_string('split', 'train', 'Split name (train_split / eval_split).')
  flags.DEFINE_integer('num_classes', 0, 'Number of classes; 0 = largest id + 1.')
  flags.DEFINE_bool('index_only', False, 'Only write SPLIT.offsets.npy for the record set in '
                    '--output (one written before the trainer read records by index).')
  flags.mark_flags_as_required(['output'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  if f.index_only:
    write_index(f.output, f.split)
    return
  if not (f.image_dir and f.labels):
    raise app.UsageError('--image_dir and --labels are required (or --index_only)')
  write_records(f.image_dir, f.labels, f.output, f.num_shards, f.split, f.num_classes)


if __name__ == '__main__':
  define_flags()
  app.run(main)
