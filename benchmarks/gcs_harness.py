"""The gcs comparison's harness: the GCS emulator behind tests/gcs_proxy.py, the proxy answering
byte-range reads of objects from its own copy of each (read whole from the emulator once).

    python -m benchmarks.gcs_harness --bucket=NAME    # prints the proxy's URL; serves until
                                                      # stdin closes (tests/gcs_proxy.py's flags)

GCS answers range reads at its own speed, latency aside; the emulator (single-threaded, one
connection per request behind the proxy) answers a few hundred a second on a busy core, so
that the comparison measured the emulator rather than the reader. Range reads are what the
pipeline sends once the records are uploaded; every other request (uploads, listings,
metadata) goes to the emulator, and the proxy's latency applies to all of them alike.
"""
import asyncio
import urllib.parse

from tests import gcs_proxy


class RangeServingProxy(gcs_proxy.Proxy):
  """gcs_proxy.Proxy answering `GET .../o/OBJECT?alt=media` with a Range header from memory."""

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self._objects = {}  # path -> future of (status, reason, headers, body) of the whole object

  async def _forward(self, method, target, headers, body):
    parsed = urllib.parse.urlparse(target)
    wanted = {k.lower(): v for k, v in headers}.get('range', '')
    if (method != 'GET' or dict(urllib.parse.parse_qsl(parsed.query)).get('alt') != 'media'
        or not wanted.startswith('bytes=')):
      return await super()._forward(method, target, headers, body)
    if parsed.path not in self._objects:
      self._objects[parsed.path] = asyncio.ensure_future(super()._forward(
          method, f'{parsed.path}?alt=media', [(k, v) for k, v in headers
                                               if k.lower() != 'range'], b''))
    status, reason, whole_headers, whole = await self._objects[parsed.path]
    if status != 200:
      del self._objects[parsed.path]
      return status, reason, whole_headers, whole
    start, _, stop = wanted[len('bytes='):].partition('-')
    start, stop = int(start), min(int(stop or len(whole) - 1), len(whole) - 1)
    kept = [(k, v) for k, v in whole_headers if k.lower() in ('content-type', 'x-goog-generation')]
    return 206, 'Partial Content', kept + [
        ('Content-Range', f'bytes {start}-{stop}/{len(whole)}')], whole[start:stop + 1]


def main():
  gcs_proxy.main(RangeServingProxy)


if __name__ == '__main__':
  main()
