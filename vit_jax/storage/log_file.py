"""An append-only log (metrics.jsonl, TensorBoard events) on local disk or gs://, written by a
background thread so that the training loop never waits on storage.

Object stores cannot append, and rewriting the whole object at every line uploads bytes that
grow with the square of the run's length (a 312k-step run: ~1.5 GB in 6,240 PUTs). Here the
bytes logged since the last upload go up once, as a segment object beside the log, which GCS
compose joins to the end of the log (server-side): what is uploaded grows linearly with the
run, and the log stays one whole object that `cat`, TensorBoard or json readers read as usual.
An upload happens at most every REMOTE_INTERVAL_S seconds (GCS takes about one update per second per
object), so a SIGKILL loses at most that much.

Exactly once: each upload's segment has a name of its own (no other writer or upload shares
it; removed once joined), and the compose carries the precondition `ifGenerationMatch` = the
log's generation as this writer last stored it, so a compose that the client sends again after
a lost answer is refused (412) instead of appending twice; the writer then reads the log's end
to tell whether its bytes are there.

Retries are the client's alone (gcsfs: 429, 5xx and dropped connections, with exponential
backoff), each request limited to REQUEST_TIMEOUT_S; bytes an upload could not store go with the
next one. Nothing here waits without a bound: `sync(timeout)` says whether all was stored in
time, and `close(timeout)` writes what it could not store to a local file and raises
`NotStored` naming it.
"""
import atexit
import hashlib
import os
import sys
import tempfile
import threading
import time
import uuid

from absl import logging
import fsspec
from fsspec import asyn
import gcsfs

from vit_jax.cli import errors
from vit_jax.storage import paths

# Object stores: at most one upload (segment + compose) per log per this many seconds.
REMOTE_INTERVAL_S = 5.
# One attempt of one request to GCS (the client retries transient failures within its policy).
REQUEST_TIMEOUT_S = 10.
# How long close() waits for the last upload before it keeps the bytes in a local file.
CLOSE_TIMEOUT_S = 10.
# How often a waiting sync() looks at its give_up().
_POLL_S = 0.25
# Segment objects start with this (a name without 'tfevents': TensorBoard must not read one).
SEGMENT_PREFIX = '.segment-'


class NotStored(errors.UserError):
  """Logged bytes that could not be stored where the log is; a local file holds them."""


def _client():
  """gcsfs for the log uploads: each request limited to REQUEST_TIMEOUT_S (a stalled request is
  retried by the client like a dropped one, instead of holding the writer for minutes)."""
  return fsspec.filesystem('gs', requests_timeout=REQUEST_TIMEOUT_S)


def is_segment(path) -> bool:
  return paths.resolve(path).name.startswith(SEGMENT_PREFIX)


def remove_segments(directory) -> None:
  """Removes the segment objects left in `directory` by writers killed between an upload and
  its compose (call it where no writer is running: a run's start)."""
  directory = paths.resolve(directory)
  if paths.is_remote(directory) and directory.is_dir():
    for path in list(directory.iterdir()):
      if is_segment(path):
        path.unlink(missing_ok=True)


class LogFile:
  """`write(bytes)` buffers; `flush()` asks for the buffer to be written out (within the
  interval); `sync(timeout)` waits until all written so far is stored; `close(timeout)` stores
  the rest and stops."""

  def __init__(self, path):
    self.path = paths.resolve(path)
    self._remote = paths.is_remote(self.path)
    self._interval = REMOTE_INTERVAL_S if self._remote else 0.
    self.path.parent.mkdir(parents=True, exist_ok=True)
    if self._remote:
      self._bucket, self._key = paths.bucket_and_key(self.path)
      folder, _, name = self._key.rpartition('/')
      # This writer's own: no other writer, nor a restarted run, uses these names.
      self._segment_prefix = (f'{folder}/' if folder else '') + (
          f'{SEGMENT_PREFIX}{hashlib.sha1(name.encode()).hexdigest()[:12]}-'
          f'{uuid.uuid4().hex[:12]}-')
      self._uploads = 0
      stored = self._stored_object()
      self._generation = stored and stored['generation']  # None: the log does not exist yet
      self._size = int(stored['size']) if stored else 0
    else:
      self._file = open(self.path, 'ab')  # noqa: SIM115 (closed by close())
    self._pending = bytearray()
    self._in_flight = b''  # taken by the writer thread, not stored yet
    self._accepted = self._stored = self._failures = 0  # bytes given; stored; failed uploads
    self._failure = None  # the last upload's exception, while its bytes wait for the next one
    self._asked = self._urgent = self._closing = self._closed = False
    self._last_upload = 0.
    self._cond = threading.Condition()
    self._thread = threading.Thread(target=self._run, daemon=True,
                                    name=f'log writer {self.path.name}')
    self._thread.start()
    atexit.register(self._close_at_exit)  # an exception ends the run: what was logged lands

  def write(self, data: bytes | str) -> None:
    data = data.encode('utf-8') if isinstance(data, str) else data
    with self._cond:
      self._pending += data
      self._accepted += len(data)

  def flush(self, now: bool = False) -> None:
    """Asks for the buffer to be written out: within the interval, or `now`."""
    with self._cond:
      self._asked = True
      self._urgent = self._urgent or now
      self._cond.notify_all()

  def sync(self, timeout: float | None = None, give_up=None) -> bool:
    """Waits until everything written so far is stored: True; False when an upload failed
    (its bytes go with the next one), `timeout` seconds passed or give_up() turned True."""
    deadline = None if timeout is None else time.monotonic() + timeout
    with self._cond:
      target, failures = self._accepted, self._failures
      self._asked = self._urgent = True
      self._cond.notify_all()
      while self._stored < target:
        if (self._failures != failures or not self._thread.is_alive()
            or (give_up is not None and give_up())):
          return False
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
          return False
        self._cond.wait(min(_POLL_S, remaining or _POLL_S))
      return True

  def close(self, timeout: float | None = None) -> None:
    """Stores what is left within `timeout` seconds (default CLOSE_TIMEOUT_S); what it could
    not store goes to a local file, and NotStored names it."""
    timeout = CLOSE_TIMEOUT_S if timeout is None else timeout
    if self._closed:
      return
    self._closed = True
    atexit.unregister(self._close_at_exit)
    with self._cond:
      self._closing = True
      self._cond.notify_all()
    self._thread.join(timeout)
    with self._cond:
      missing, failure = bytes(self._in_flight) + bytes(self._pending), self._failure
      self._pending.clear()
    if not self._remote:
      self._file.close()
    if missing:
      reason = (_said(failure) if failure is not None and not self._thread.is_alive()
                else 'no answer in time')
      raise NotStored(f'the last {len(missing)} bytes logged to {self.path} could not be '
                      f'stored ({reason}); they are in {self._keep_locally(missing)}')

  def _close_at_exit(self) -> None:
    try:
      self.close()
    except NotStored as e:
      print(f'error: {e}', file=sys.stderr, flush=True)

  @property
  def closed(self) -> bool:
    return self._closed

  def _keep_locally(self, data: bytes) -> str:
    """Writes bytes that could not be stored to a file under the temporary directory."""
    name = str(self.path).replace('://', '/').lstrip('/')
    local = os.path.join(tempfile.gettempdir(), 'vit_jax_unstored', f'{name}.{os.getpid()}')
    os.makedirs(os.path.dirname(local), exist_ok=True)
    with open(local, 'ab') as f:
      f.write(data)
    return local

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
      self._in_flight = bytes(self._pending)
      self._pending.clear()
      self._asked = self._urgent = False
      return self._in_flight

  def _run(self) -> None:
    while (data := self._next_data()) is not None:
      try:
        self._append(data)
      except Exception as e:  # pylint: disable=broad-except  (the bytes go with the next upload)
        with self._cond:
          self._pending[:0], self._in_flight = data, b''
          self._failures += 1
          self._failure = e
          self._last_upload = time.monotonic()
          self._cond.notify_all()
          if self._closing:
            return  # close() keeps them in a local file
        logging.warning('could not store %d bytes of %s (they go with the next upload): %s',
                        len(data), self.path, _said(e))
        continue
      with self._cond:
        self._stored += len(data)
        self._in_flight = b''
        self._failure = None
        self._last_upload = time.monotonic()
        self._cond.notify_all()

  def _append(self, data: bytes) -> None:
    if not self._remote:
      self._file.write(data)
      self._file.flush()
      return
    gcs = _client()
    if self._generation is None:  # the first bytes of the log make it
      try:
        stored = asyn.sync(gcs.loop, gcsfs.core.simple_upload, gcs, self._bucket, self._key,
                           data, mode='create')  # ifGenerationMatch=0
      except FileExistsError:  # an answer lost, the upload sent again
        stored = self._landed(data)
    else:
      self._uploads += 1
      segment = f'{self._segment_prefix}{self._uploads}'
      part = asyn.sync(gcs.loop, gcsfs.core.simple_upload, gcs, self._bucket, segment, data)
      try:
        stored = gcs.call(
            'POST', 'b/{}/o/{}/compose', self._bucket, self._key, json_out=True,
            ifGenerationMatch=self._generation, headers={'Content-Type': 'application/json'},
            json={'kind': 'storage#composeRequest',
                  'sourceObjects': [{'name': self._key, 'generation': self._generation},
                                    {'name': segment, 'generation': part['generation']}],
                  'destination': {'name': self._key, 'bucket': self._bucket}})
      except FileExistsError:  # 412: the log is no longer the generation this writer stored
        stored = self._landed(data)
      finally:
        try:
          gcs.call('DELETE', 'b/{}/o/{}', self._bucket, segment)
        except OSError:
          pass  # a run's start removes what is left (remove_segments)
    self._generation, self._size = stored['generation'], int(stored['size'])

  def _stored_object(self) -> dict | None:
    """The log object's metadata (generation, size); None when it does not exist."""
    try:
      return _client().call('GET', 'b/{}/o/{}', self._bucket, self._key, json_out=True)
    except FileNotFoundError:
      return None

  def _landed(self, data: bytes) -> dict:
    """After a 412: whether this writer's own append is what changed the log (a retried
    request whose first answer was lost), by the log's size and end; else another writer
    changed it, and appending would mix two runs' lines."""
    stored = self._stored_object()
    if (stored and int(stored['size']) == self._size + len(data)
        and _client().cat_file(str(self.path), start=self._size) == data):
      return stored
    raise OSError(f'{self.path} was changed by another writer (generation '
                  f'{stored and stored["generation"]}, this writer stored {self._generation}); '
                  'is a second run writing to this workdir?')


def _said(error: Exception) -> str:
  """'TimeoutError' or 'OSError: what it says' (some errors say nothing)."""
  return f'{type(error).__name__}: {error}' if str(error) else type(error).__name__


def replace(path, data: bytes) -> None:
  """Replaces a file's content at once: a killed process leaves the old or the new content."""
  path = paths.resolve(path)
  if paths.is_remote(path):
    path.write_bytes(data)  # an object upload replaces the object whole, or not at all
    return
  partial = path.with_name(f'.{path.name}.partial')
  partial.write_bytes(data)
  os.replace(partial, path)
