"""Every path a user gives, local or gs://, and the one road gs:// takes, whatever is installed.

- Files (our logs, JSON, CSV and images, Orbax's directories and metadata) go through
  etils.epath on gcsfs. epath would pick TensorFlow's gfile whenever TensorFlow is installed (it
  is: tf.data) and gcsfs only without it; `EPATH_USE_TF=false`, set here for every process,
  makes it gcsfs always. gcsfs is its core filesystem (the GCS JSON API), not the experimental
  one that probes each bucket over gRPC for zonal buckets.
- Byte ranges (records, their index) and Orbax's arrays go through tensorstore's GCS kvstore.

Both retry transient errors (429, 5xx, dropped connections) with exponential backoff, and take a
GCE / Cloud TPU VM's credentials from its metadata server. Neither caches directory listings:
other processes (restarts, other hosts) add checkpoints meanwhile.

A GCS emulator (tests, or a user's own) changes endpoints only, never the road:
`STORAGE_EMULATOR_HOST=http://HOST:PORT`, which gcsfs reads; tensorstore is pointed at the same
URL here (TENSORSTORE_GCS_HTTP_URL, and GOOGLE_AUTH_TOKEN_FOR_TESTING for its auth).
"""
import functools
import os
import socket
import threading
import urllib.parse

from etils import epath
import fsspec

from vit_jax.cli import errors

EMULATOR_VARIABLE = 'STORAGE_EMULATOR_HOST'
# Range reads in flight per process on gs:// (GCS answers in tens of milliseconds: throughput
# comes from many requests at once; tensorstore keeps that many connections at most).
GCS_REQUESTS_IN_FLIGHT = 256


def _one_road() -> None:
  os.environ['EPATH_USE_TF'] = 'false'
  # epath caches its TensorFlow check on first use: forget it, should a gs:// path have been
  # used before this module was imported.
  from etils.epath import gpath  # pylint: disable=g-import-not-at-top
  getattr(gpath._is_tf_installed, 'cache_clear', lambda: None)()  # pylint: disable=protected-access
  fsspec.register_implementation('gs', 'gcsfs.core.GCSFileSystem', clobber=True)
  fsspec.register_implementation('gcs', 'gcsfs.core.GCSFileSystem', clobber=True)
  fsspec.config.conf.setdefault('gcs', {})['use_listings_cache'] = False


def use_storage_emulator() -> None:
  """Points tensorstore at STORAGE_EMULATOR_HOST, when it is set (gcsfs reads it itself)."""
  host = os.environ.get(EMULATOR_VARIABLE)
  if not host:
    return
  url = host if '://' in host else f'http://{host}'
  os.environ.setdefault('TENSORSTORE_GCS_HTTP_URL', url)
  os.environ.setdefault('GOOGLE_AUTH_TOKEN_FOR_TESTING', 'storage-emulator')


_one_road()
use_storage_emulator()


def user_cache_path(*parts: str) -> str:
  """A file under vit_jax's folder of this user's cache (~/.cache/vit_jax, or under
  XDG_CACHE_HOME): what was fetched or measured once and helps next time."""
  root = os.environ.get('XDG_CACHE_HOME') or os.path.expanduser('~/.cache')
  return os.path.join(root, 'vit_jax', *parts)


def is_remote(path) -> bool:
  return '://' in os.fspath(path)


def resolve(path) -> epath.Path:
  """An absolute epath.Path: local paths made absolute, URLs left as they are."""
  return epath.Path(path) if is_remote(path) else epath.Path(os.path.abspath(path))


def gcs():
  """The gcsfs filesystem epath uses for gs:// (whole-object operations: compose, pipe)."""
  return fsspec.filesystem('gs')


def gcs_endpoint() -> tuple[str, int]:
  """(host, port) that gs:// requests go to: STORAGE_EMULATOR_HOST's, else GCS's."""
  url = os.environ.get(EMULATOR_VARIABLE) or 'https://storage.googleapis.com'
  parsed = urllib.parse.urlparse(url if '://' in url else f'http://{url}')
  return parsed.hostname, parsed.port or (443 if parsed.scheme == 'https' else 80)


_CONNECT_S = 5.
_PROXY_VARIABLES = ('HTTPS_PROXY', 'https_proxy', 'HTTP_PROXY', 'http_proxy')


def check_reachable(url: str, flag: str) -> None:
  """Raises UserError naming `flag` when `url` is on gs:// and its endpoint does not take a
  connection within seconds (no network, a wrong emulator address): said at once, instead of
  after the client's retries and their tracebacks. Behind a proxy only the proxy is reached."""
  if not is_remote(url) or any(os.environ.get(v) for v in _PROXY_VARIABLES):
    return
  host, port = gcs_endpoint()
  try:
    socket.create_connection((host, port), timeout=_CONNECT_S).close()
  except OSError as e:
    raise errors.UserError(f'{flag}: cannot reach {host}:{port} ({e}); check this machine\'s '
                           'network') from None


def bucket_and_key(url) -> tuple[str, str]:
  """('bucket', 'path/to/object') of a gs:// URL."""
  parsed = urllib.parse.urlparse(os.fspath(url))
  if parsed.scheme != 'gs':
    raise ValueError(f'{url}: only local paths and gs:// are supported')
  return parsed.netloc, parsed.path.lstrip('/')


@functools.cache
def _kvstore(bucket: str):
  import tensorstore as ts  # pylint: disable=g-import-not-at-top
  return ts.KvStore.open({
      'driver': 'gcs', 'bucket': bucket,
      'context': {'gcs_request_concurrency': {'limit': GCS_REQUESTS_IN_FLIGHT}},
  }).result()


class RangeReader:
  """Byte ranges of files, many at once: os.pread on local files (kept open, no shared file
  position), tensorstore range GETs on gs:// (all of a call's ranges in flight together, on
  a bounded pool of connections; no file handles)."""

  def __init__(self):
    self._fds = {}
    self._lock = threading.Lock()

  def read(self, ranges: list[tuple[str, int, int]]) -> list[bytes]:
    """[(path, start, stop)] -> the bytes of each range, in order (each within its file)."""
    remote = [i for i, (path, _, _) in enumerate(ranges) if is_remote(path)]
    out = [None] * len(ranges)
    futures = {}
    for i in remote:
      path, start, stop = ranges[i]
      bucket, key = bucket_and_key(path)
      futures[i] = _kvstore(bucket).read(key, byte_range=slice(start, stop))
    for i, (path, start, stop) in enumerate(ranges):
      if i not in futures:
        out[i] = os.pread(self._fd(path), stop - start, start)
    for i, future in futures.items():
      result = future.result()
      if result.state != 'value':
        raise FileNotFoundError(f'{ranges[i][0]}: no such object')
      out[i] = result.value
    return out

  def _fd(self, path: str) -> int:
    fd = self._fds.get(path)
    if fd is None:
      with self._lock:
        fd = self._fds.get(path)
        if fd is None:
          fd = self._fds[path] = os.open(path, os.O_RDONLY)
    return fd

  def close(self) -> None:
    with self._lock:
      for fd in self._fds.values():
        os.close(fd)
      self._fds.clear()


def read_range(path, start: int, stop: int) -> bytes:
  """One byte range of one file (within it: gs:// refuses a range past the end)."""
  if is_remote(path):
    return RangeReader().read([(os.fspath(path), start, stop)])[0]
  with open(path, 'rb') as f:
    f.seek(start)
    return f.read(stop - start)


# Start-up reads of data (SPLIT.json, listings, a dataset's metadata) get this long to answer.
STARTUP_READ_DEADLINE_S = 300


def within_deadline(fn, what: str, seconds: float | None = None):
  """fn(), or UserError naming `what` when it has not returned within `seconds` (default
  STARTUP_READ_DEADLINE_S: a storage that does not answer, a bucket out of reach, a stale
  mount). The call is left running in a daemon thread, which does not keep the process alive."""
  seconds = STARTUP_READ_DEADLINE_S if seconds is None else seconds
  outcome = {}

  def call():
    try:
      outcome['value'] = fn()
    except BaseException as e:  # pylint: disable=broad-except  (raised again in the caller)
      outcome['error'] = e
  thread = threading.Thread(target=call, daemon=True, name='deadline')
  thread.start()
  thread.join(seconds)
  if thread.is_alive():
    raise errors.UserError(f'{what}: no answer after {seconds:g} s; check that this machine '
                           'reaches that storage (credentials, network, a mount)')
  if 'error' in outcome:
    raise outcome['error']
  return outcome['value']
