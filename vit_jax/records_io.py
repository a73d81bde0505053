"""TFRecord files written and read through epath, so that they reach any store epath reaches.

TensorFlow's own TFRecordWriter / TFRecordDataset go through TensorFlow's filesystems, which a
GCS emulator cannot stand in for (see `vit_jax.paths`); the framing is TensorFlow's, so files
written here are read by tf.data and TensorBoard as usual.
"""
import struct

from tensorboard.summary.writer.record_writer import RecordWriter

from vit_jax import paths

# Per record: 8-byte length, 4-byte length CRC, the data, 4-byte data CRC.
FRAMING_BYTES = 16


def writer(path, append: bool = False) -> RecordWriter:
  """A record writer on `path`: `write(bytes)`, `flush()`, `close()`. With append=True the file
  keeps what it holds and every flush makes the records so far durable (logs)."""
  if append:
    return RecordWriter(paths.AppendFile(path))
  return RecordWriter(paths.resolve(path).open('wb'))


def read(path):
  """The records of one file, in order (length-framed; CRCs are left to TensorFlow's readers)."""
  with paths.resolve(path).open('rb') as f:
    while header := f.read(12):
      (length,) = struct.unpack('<Q', header[:8])
      yield f.read(length)
      f.read(4)
