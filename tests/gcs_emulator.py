"""gcp-storage-emulator on loopback, as the tests' GCS (a helper for the conftest fixture).

Two things GCS does that the emulator does not, added here:
- Downloads carry the `x-goog-generation` header: tensorstore reads an object's generation from
  it before it updates the object (Orbax's OCDBT manifest is written several times per
  checkpoint) and fails with "Malformed StorageGeneration" without it.
- Uploads and composes honour the precondition `ifGenerationMatch` (0: the object must not
  exist), answering 412 otherwise: what makes a retried compose append once
  (vit_jax.storage.log_file).
"""
from http import HTTPStatus
import logging
import socket

from gcp_storage_emulator import server as emulator_server
from gcp_storage_emulator.exceptions import NotFound
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


def _uploaded_name(request) -> str:
  if 'name' in request.query:
    return request.query['name'][0]
  return request.data['meta'].get('name')  # a multipart upload's metadata


def _with_precondition(handler, object_name):
  def checked(request, response, storage, *args, **kwargs):
    wanted = request.query.get('ifGenerationMatch')
    if wanted:
      try:
        current = storage.get_file_obj(request.params['bucket_name'],
                                       object_name(request))['generation']
      except NotFound:
        current = '0'
      if str(current) != wanted[0]:
        response.status = HTTPStatus.PRECONDITION_FAILED
        response.json({'error': {'code': 412, 'message': 'Precondition Failed'}})
        return None
    return handler(request, response, storage, *args, **kwargs)
  return checked


def _replace(name: str, patched) -> None:
  original = getattr(objects, name)
  for _, handlers in emulator_server.HANDLERS:
    for method, fn in list(handlers.items()):
      if fn is original:
        handlers[method] = patched
  setattr(objects, name, patched)  # objects.get (alt=media) calls download by this name


# The emulator serves one connection at a time and read without a bound: a connection that
# never sent its request blocked every later one of the session.
_READ_TIMEOUT_S = 60


def _patch() -> None:
  if getattr(objects.download, 'patched', False):
    return
  emulator_server.RequestHandler.timeout = _READ_TIMEOUT_S  # socketserver's per-connection bound
  _replace('download', _with_generation_header(objects.download))
  _replace('insert', _with_precondition(objects.insert, _uploaded_name))
  _replace('compose', _with_precondition(objects.compose,
                                         lambda request: request.params['object_id']))
  objects.download.patched = True


def start(bucket: str):
  """(server, 'http://127.0.0.1:PORT') serving `bucket` in memory; stop with server.stop()."""
  _patch()
  logging.getLogger('gcp_storage_emulator').setLevel(logging.CRITICAL)  # 404s are expected
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  server = emulator_server.create_server('127.0.0.1', port, in_memory=True,
                                         default_bucket=bucket)
  server.start()
  return server, f'http://127.0.0.1:{port}'
