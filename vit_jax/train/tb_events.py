"""TensorBoard scalar events written through `vit_jax.storage.tfrecord` (local or gs://, one road).

TensorFlow's summary writer reaches GCS only through TensorFlow's own filesystem (another road,
see `vit_jax.storage.paths`); these are the same event files, written in the background
(`vit_jax.storage.log_file`).

A resumed run shows as one continuous run: events an earlier run wrote past the restored step
are dropped from its files, and the new file starts with TensorBoard's own restart marker
(SessionLog START at the first new step: a TensorBoard that already read the orphaned steps
purges them; its data server does the same when a step comes again).
"""
import io
import itertools
import os
import socket
import time

from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.record_writer import RecordWriter

from vit_jax.storage import log_file, paths, tfrecord


# Event files this process has started (their names' last part).
_WRITERS = itertools.count()


def is_event_file(path) -> bool:
  return 'tfevents' in paths.resolve(path).name  # TensorBoard's own test


def drop_events_after(path, step: int) -> None:
  """Rewrites an event file without the events past `step` (and a record cut short at its
  end); removes it when no summary is left."""
  data = paths.resolve(path).read_bytes()
  events = [event_pb2.Event.FromString(r) for r in tfrecord.split(data)]
  kept = [e for e in events if e.step <= step]
  if not any(e.HasField('summary') for e in kept):
    paths.resolve(path).unlink()
    return
  out = io.BytesIO()
  writer = RecordWriter(out)
  for event in kept:
    writer.write(event.SerializeToString())
  if len(out.getvalue()) != len(data):  # events dropped, or a record cut short at the end
    log_file.replace(path, out.getvalue())


class EventWriter:
  """LOGDIR/events.out.tfevents.<time>.<host>.<pid>.<n>: a new file per run start, as TensorFlow
  does, never one that another writer (another process, or a start in the same second) has."""

  def __init__(self, logdir, start_step: int = 0):
    logdir = paths.resolve(logdir)
    if logdir.is_dir():
      for path in list(logdir.iterdir()):
        if log_file.is_segment(path):  # left by a run killed mid-upload
          path.unlink(missing_ok=True)
        elif is_event_file(path):
          drop_events_after(path, start_step)
    name = (f'events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}.'
            f'{next(_WRITERS)}')
    self._log = log_file.LogFile(logdir / name)
    self._records = RecordWriter(self._log)
    self._write(event_pb2.Event(wall_time=time.time(), file_version='brain.Event:2'))
    self._write(event_pb2.Event(wall_time=time.time(), step=start_step + 1,
                                session_log=event_pb2.SessionLog(
                                    status=event_pb2.SessionLog.START)))

  def _write(self, event) -> None:
    self._records.write(event.SerializeToString())

  def write_scalars(self, step: int, scalars: dict) -> None:
    summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=k, simple_value=float(v))
                                         for k, v in scalars.items()])
    self._write(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))
    self._records.flush()

  def flush(self, now: bool = False) -> None:
    self._log.flush(now)

  def sync(self, timeout: float | None = None, give_up=None) -> bool:
    return self._log.sync(timeout, give_up)

  def close(self, timeout: float | None = None) -> None:
    self._log.close(timeout)
