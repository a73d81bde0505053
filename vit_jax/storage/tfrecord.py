"""TFRecord files written and read through `vit_jax.storage.paths` (local or gs://, one road).

TensorFlow's own TFRecordWriter / TFRecordDataset go through TensorFlow's filesystems, another
road to gs:// (see `vit_jax.storage.paths`); the framing is TensorFlow's, so files written here
are read by tf.data and TensorBoard as usual.
"""
import struct

import numpy as np
from tensorboard.summary.writer.record_writer import RecordWriter

from vit_jax.storage import paths

# Per record: 8-byte length, 4-byte length CRC, the data, 4-byte data CRC.
HEADER_BYTES = 12
FRAMING_BYTES = 16


def writer(path) -> RecordWriter:
  """A record writer on `path`: `write(bytes)`, `flush()`, `close()`."""
  return RecordWriter(paths.resolve(path).open('wb'))


def framed_length(header: bytes) -> int:
  """The bytes a record takes in its file (framing included), from its 12-byte header."""
  (length,) = struct.unpack('<Q', header[:8])
  return length + FRAMING_BYTES


def read(path) -> list[bytes]:
  """The records of one (small: a log) file, in order, from one read of the whole file."""
  return split(paths.resolve(path).read_bytes())


def split(data: bytes) -> list[bytes]:
  """The records framed in `data` (CRCs are left to TensorFlow's readers). A record cut short
  at the end (a writer killed mid-record) ends it."""
  records, position = [], 0
  while position + HEADER_BYTES <= len(data):
    end = position + framed_length(data[position:position + HEADER_BYTES])
    if end > len(data):
      break
    records.append(data[position + HEADER_BYTES:end - 4])
    position = end
  return records


def record_starts(path, num_records: int, file_size: int) -> np.ndarray:
  """Where each record of a file starts, plus its end (int64), from the 12-byte headers only
  (each payload is skipped, never read): one small range read per record."""
  starts = np.zeros(num_records + 1, np.int64)
  reader = paths.RangeReader()
  try:
    for i in range(num_records):
      position = int(starts[i])
      if position + HEADER_BYTES > file_size:
        raise ValueError(f'{path} ends after {i} records at byte {position}; expected '
                         f'{num_records}')
      header = reader.read([(str(path), position, position + HEADER_BYTES)])[0]
      starts[i + 1] = position + framed_length(header)
  finally:
    reader.close()
  if starts[-1] != file_size:
    raise ValueError(f'{path} holds more than {num_records} records ({file_size} bytes, the '
                     f'first {num_records} end at byte {starts[-1]})')
  return starts
