"""TensorBoard scalar events written through epath (local or gs://, emulator included).

TensorFlow's summary writer reaches GCS only through TensorFlow's own filesystem, which cannot be
pointed at an emulator; these are the same event files, written by `records_io`.
"""
import socket
import time

from tensorboard.compat.proto import event_pb2, summary_pb2

from vit_jax import paths, records_io


class EventWriter:
  """LOGDIR/events.out.tfevents.<time>.<host>: a new file per run start, as TensorFlow does."""

  def __init__(self, logdir):
    name = f'events.out.tfevents.{int(time.time())}.{socket.gethostname()}'
    self._records = records_io.writer(paths.resolve(logdir) / name, append=True)
    self._write(event_pb2.Event(wall_time=time.time(), file_version='brain.Event:2'))

  def _write(self, event) -> None:
    self._records.write(event.SerializeToString())

  def write_scalars(self, step: int, scalars: dict) -> None:
    summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=k, simple_value=float(v))
                                         for k, v in scalars.items()])
    self._write(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))
    self._records.flush()

  def close(self) -> None:
    self._records.close()
