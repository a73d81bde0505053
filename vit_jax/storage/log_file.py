"""An append-only log (metrics.jsonl, TensorBoard events) on local disk or gs://, written by a
background thread so that the training loop never waits on storage.

Object stores cannot append, and rewriting the whole object at every line uploads bytes that
grow with the square of the run's length (a 312k-step run: ~1.5 GB in 6,240 PUTs). Here the
bytes logged since the last upload go up once, as a segment object beside the log, which GCS
compose joins to the end of the log (server-side): what is uploaded grows linearly with the
run, and the log stays one whole object that `cat`, TensorBoard or json readers read as usual.
An upload happens at most every REMOTE_INTERVAL_S seconds (GCS takes about one update per second per
object), so a SIGKILL loses at most that much; `sync()` and `close()` write everything.
"""
import atexit
import hashlib
import os
import threading
import time

from absl import logging

from vit_jax.storage import paths

# Object stores: at most one upload (segment + compose) per log per this many seconds.
REMOTE_INTERVAL_S = 5.
# After a failed upload (storage out of reach beyond the client's own retries), wait this long;
# at close, give up after this many attempts.
_RETRY_AFTER_S = 10.
_ATTEMPTS_ON_CLOSE = 3


class LogFile:
  """`write(bytes)` buffers; `flush()` asks for the buffer to be written out (within the
  interval); `sync()` waits until all written so far is durable; `close()` syncs and stops."""

  def __init__(self, path):
    self.path = paths.resolve(path)
    self._remote = paths.is_remote(self.path)
    self._interval = REMOTE_INTERVAL_S if self._remote else 0.
    self.path.parent.mkdir(parents=True, exist_ok=True)
    if self._remote:
      # A name without 'tfevents' in it: TensorBoard must not read a segment as an event file.
      digest = hashlib.sha1(self.path.name.encode()).hexdigest()[:12]
      self._segment = self.path.parent / f'.segment-{digest}'
      self._exists = self.path.exists()
      if self._segment.exists():  # left by a run killed between an upload and its compose
        self._segment.unlink()
    else:
      self._file = open(self.path, 'ab')  # noqa: SIM115 (closed by close())
    self._pending = bytearray()
    self._accepted = self._durable = 0  # bytes given to write(); bytes written out
    self._asked = self._urgent = self._closing = False
    self._last_upload = 0.
    self._cond = threading.Condition()
    self._thread = threading.Thread(target=self._run, daemon=True,
                                    name=f'log writer {self.path.name}')
    self._thread.start()
    atexit.register(self.close)  # an exception ends the run: what was logged still lands

  def write(self, data: bytes | str) -> None:
    data = data.encode('utf-8') if isinstance(data, str) else data
    with self._cond:
      self._pending += data
      self._accepted += len(data)

  def flush(self) -> None:
    with self._cond:
      self._asked = True
      self._cond.notify_all()

  def sync(self) -> None:
    with self._cond:
      target, self._asked, self._urgent = self._accepted, True, True
      self._cond.notify_all()
      while self._durable < target and self._thread.is_alive():
        self._cond.wait(1.)

  def close(self) -> None:
    if not self._thread.is_alive():
      return
    with self._cond:
      self._closing = True
      self._cond.notify_all()
    self._thread.join()
    atexit.unregister(self.close)
    if self._remote:
      if self._segment.exists():
        self._segment.unlink()
    else:
      self._file.close()

  @property
  def closed(self) -> bool:
    return not self._thread.is_alive()

  def _next_data(self) -> bytes | None:
    """Waits until the buffer is due to be written out and takes it; None: closed and done."""
    with self._cond:
      while True:
        if self._pending and (self._closing or self._urgent):
          break
        if self._closing:
          return None
        wait = None
        if self._asked and self._pending:
          wait = self._last_upload + self._interval - time.monotonic()
          if wait <= 0:
            break
        self._cond.wait(wait)
      data = bytes(self._pending)
      self._pending.clear()
      self._asked = self._urgent = False
      return data

  def _run(self) -> None:
    failures = 0
    while (data := self._next_data()) is not None:
      try:
        self._append(data)
      except Exception as e:  # pylint: disable=broad-except  (kept and tried again)
        failures += 1
        with self._cond:
          self._pending[:0] = data
          if self._closing and failures >= _ATTEMPTS_ON_CLOSE:
            logging.error('could not write the last %d bytes of %s: %s', len(data), self.path, e)
            return
          logging.warning('could not write %d bytes to %s (trying again in %.0f s): %s',
                          len(data), self.path, _RETRY_AFTER_S, e)
          self._cond.wait(_RETRY_AFTER_S)
          self._urgent = True
        continue
      failures = 0
      with self._cond:
        self._durable += len(data)
        self._last_upload = time.monotonic()
        self._cond.notify_all()

  def _append(self, data: bytes) -> None:
    if not self._remote:
      self._file.write(data)
      self._file.flush()
      return
    gcs, log = paths.gcs(), str(self.path)
    if not self._exists:
      gcs.pipe_file(log, data)
      self._exists = True
      return
    gcs.pipe_file(str(self._segment), data)
    gcs.merge(log, [log, str(self._segment)])


def replace(path, data: bytes) -> None:
  """Replaces a log's content at once: a killed process leaves the old or the new content."""
  path = paths.resolve(path)
  if paths.is_remote(path):
    path.write_bytes(data)  # an object upload replaces the object whole, or not at all
    return
  partial = path.with_name(f'.{path.name}.partial')
  partial.write_bytes(data)
  os.replace(partial, path)
