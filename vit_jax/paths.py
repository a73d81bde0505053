"""Every path a user gives, local or gs://, goes through etils.epath (never os.path on a URL).

GCS emulator (tests, or a user's own): setting STORAGE_EMULATOR_HOST is all it takes. Google's
Python clients (gcsfs) read it; the libraries that do not are pointed at it here, at import,
before they read their environment:
- tensorstore (Orbax's arrays): TENSORSTORE_GCS_HTTP_URL + GOOGLE_AUTH_TOKEN_FOR_TESTING;
- etils.epath (Orbax's directories, our files): EPATH_USE_TF=false, i.e. gcsfs instead of
  TensorFlow's GCS filesystem, which has no endpoint setting at all;
- gcsfs: no zonal-bucket probe (a gRPC control-plane call the emulator does not serve), and no
  directory-listing cache: other processes (restarts, other hosts) add checkpoints meanwhile.
TensorFlow's own readers/writers (tf.summary, TFRecordWriter) cannot be pointed at it, so the
project writes TensorBoard events and record files through epath (`vit_jax.records_io`).
"""
import os

from etils import epath

EMULATOR_VARIABLE = 'STORAGE_EMULATOR_HOST'


def use_storage_emulator() -> None:
  host = os.environ.get(EMULATOR_VARIABLE)
  if not host:
    return
  url = host if '://' in host else f'http://{host}'
  os.environ.setdefault('TENSORSTORE_GCS_HTTP_URL', url)
  os.environ.setdefault('GOOGLE_AUTH_TOKEN_FOR_TESTING', 'storage-emulator')
  os.environ.setdefault('EPATH_USE_TF', 'false')
  # epath caches its TensorFlow check on first use: forget it, in case a gs:// path was used
  # before the variable was set (a test fixture starting the emulator mid-session).
  from etils.epath import gpath  # pylint: disable=g-import-not-at-top
  getattr(gpath._is_tf_installed, 'cache_clear', lambda: None)()  # pylint: disable=protected-access
  os.environ.setdefault('GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT', 'false')
  import fsspec  # pylint: disable=g-import-not-at-top
  fsspec.config.conf.setdefault('gcs', {})['use_listings_cache'] = False


use_storage_emulator()


def is_remote(path) -> bool:
  return '://' in os.fspath(path)


def resolve(path) -> epath.Path:
  """An absolute epath.Path: local paths made absolute, URLs left as they are."""
  return epath.Path(path) if is_remote(path) else epath.Path(os.path.abspath(path))


class AppendFile:
  """A text/bytes log that survives restarts: appends locally; on object stores, which cannot
  append, keeps the object's content and rewrites the whole object at every flush."""

  def __init__(self, path):
    self.path = epath.Path(path)
    self.path.parent.mkdir(parents=True, exist_ok=True)
    if is_remote(self.path):
      self._content = bytearray(self.path.read_bytes() if self.path.exists() else b'')
      self._file = None
    else:
      self._file = open(self.path, 'ab')  # noqa: SIM115 (closed by close())

  def write(self, data: bytes | str) -> None:
    data = data.encode('utf-8') if isinstance(data, str) else data
    if self._file is None:
      self._content += data
    else:
      self._file.write(data)

  def flush(self) -> None:
    if self._file is None:
      self.path.write_bytes(bytes(self._content))
    else:
      self._file.flush()

  def close(self) -> None:
    self.flush()
    if self._file is not None:
      self._file.close()

  @property
  def closed(self) -> bool:
    return self._file is not None and self._file.closed
