"""gcp-storage-emulator on loopback, as the tests' GCS (a helper for the conftest fixture).

The emulator answers object downloads without the `x-goog-generation` header real GCS sends;
tensorstore reads an object's generation from it before it updates the object (Orbax's OCDBT
manifest is written several times per checkpoint) and fails with "Malformed StorageGeneration"
without it, so downloads here carry it as GCS's do.
"""
import logging
import socket

from gcp_storage_emulator import server as emulator_server
from gcp_storage_emulator.handlers import objects


def _with_generation_header(download):
  def handler(request, response, storage, *args, **kwargs):
    download(request, response, storage, *args, **kwargs)
    try:
      obj = storage.get_file_obj(request.params['bucket_name'], request.params['object_id'])
    except Exception:  # pylint: disable=broad-except  (not found: the 404 is already set)
      return
    response['x-goog-generation'] = str(obj['generation'])
  return handler


def _patch_downloads() -> None:
  if getattr(objects.download, 'with_generation', False):
    return
  patched = _with_generation_header(objects.download)
  patched.with_generation = True
  for _, handlers in emulator_server.HANDLERS:
    for method, fn in list(handlers.items()):
      if fn is objects.download:
        handlers[method] = patched
  objects.download = patched  # objects.get (alt=media) calls it by this name


def start(bucket: str):
  """(server, 'http://127.0.0.1:PORT') serving `bucket` in memory; stop with server.stop()."""
  _patch_downloads()
  logging.getLogger('gcp_storage_emulator').setLevel(logging.CRITICAL)  # 404s are expected
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  server = emulator_server.create_server('127.0.0.1', port, in_memory=True,
                                         default_bucket=bucket)
  server.start()
  return server, f'http://127.0.0.1:{port}'
