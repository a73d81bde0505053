"""An HTTP proxy in front of the GCS emulator that behaves like GCS under load: latency per request
and a share of requests refused (503, 429, or the connection dropped) before they reach the
emulator. It counts what passes: requests, bytes uploaded (request bodies), requests in flight.

    proxy = gcs_proxy.Proxy(emulator_url, latency_s=0.05, refuse_share=0.05).start()
    ... point STORAGE_EMULATOR_HOST (and TENSORSTORE_GCS_HTTP_URL) at proxy.url ...
    proxy.stats(); proxy.stop()

Faults for one kind of request, by a substring of its decoded target (path and query, object
names unquoted; a multipart upload, whose object name is in its body, with ` name=<object>`
added): `fault = proxy.add_fault('metrics.jsonl', stall_s=60)` holds those requests
for 60 s before serving them (`math.inf`: until `fault.remove()`, `proxy.clear_faults()` or
`proxy.stop()`); `status=503` answers them with that status instead of serving them;
`lose_response=True` serves them (the emulator acts) and then drops the connection before the
answer; `methods=('POST',)` and `times=N` narrow it. `fault.hits` counts the requests it took.

`python -m tests.gcs_proxy --latency_ms=50` serves an emulator behind a proxy in its own process
(the benchmark's harness, so that it does not share the measured process's interpreter) and
prints the proxy's URL; `GET /_proxy/stats[?latency_ms=L][&reset=1]` sets the latency, resets
the counters and answers with them as JSON.

Clients keep their connections to the proxy (HTTP/1.1); the emulator, single-threaded and
HTTP/1.0 with a listen backlog of 5, gets at most `upstream_connections` requests at once.
"""
import argparse
import asyncio
import dataclasses
import json
import random
import re
import sys
import threading
import urllib.parse

_REFUSALS = ('503', '429', 'reset')


@dataclasses.dataclass
class Fault:
  """What `Proxy.add_fault` returns; see the module's docstring."""
  matches: str
  stall_s: float = 0.
  status: int | None = None
  lose_response: bool = False
  methods: tuple | None = None
  times: int | None = None
  hits: int = 0
  removed: bool = False

  def applies(self, method: str, target: str) -> bool:
    """target: decoded, as the module's docstring says."""
    return (not self.removed and self.matches in target
            and (self.methods is None or method in self.methods)
            and (self.times is None or self.hits < self.times))

  def remove(self) -> None:
    self.removed = True


class Proxy:

  def __init__(self, target_url: str, latency_s: float = 0., refuse_share: float = 0.,
               seed: int = 0, upstream_connections: int = 4):
    target = urllib.parse.urlparse(target_url)
    self._target = (target.hostname, target.port)
    self.latency_s, self.refuse_share = latency_s, refuse_share
    self._random = random.Random(seed)
    self._upstream_connections = upstream_connections
    self._loop = asyncio.new_event_loop()
    self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                    name='gcs-proxy')
    self.reset_stats()
    self.url = None
    self.faults = []

  def add_fault(self, matches: str, **how) -> Fault:
    fault = Fault(matches, **how)
    self.faults.append(fault)
    return fault

  def clear_faults(self) -> None:
    """Removes every fault: the requests they hold go on (dropping them from the list alone
    would leave those requests held for good, each waking every 0.05 s)."""
    for fault in self.faults:
      fault.remove()
    self.faults.clear()

  def reset_stats(self) -> None:
    """Counts from now on (requests in flight now stay counted as such)."""
    self.in_flight = getattr(self, 'in_flight', 0)
    self.connections = getattr(self, 'connections', 0)
    self.requests = self.bytes_uploaded = self.max_in_flight = 0
    self.max_connections = self.connections
    self.in_flight_sum = 0  # in flight as each request arrives (itself included), summed
    self.refused = dict.fromkeys(_REFUSALS, 0)

  def stats(self) -> dict:
    return {'requests': self.requests, 'bytes_uploaded': self.bytes_uploaded,
            'refused': dict(self.refused), 'max_in_flight': self.max_in_flight,
            'mean_in_flight': round(self.in_flight_sum / max(self.requests, 1), 1),
            'max_connections': self.max_connections}

  def start(self) -> 'Proxy':
    self._thread.start()
    self._server = asyncio.run_coroutine_threadsafe(self._serve(), self._loop).result()
    port = self._server.sockets[0].getsockname()[1]
    self.url = f'http://127.0.0.1:{port}'
    return self

  def stop(self) -> None:
    async def close():
      self._server.close()
      others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
      for task in others:  # clients' kept connections
        task.cancel()
      await asyncio.gather(*others, return_exceptions=True)
    asyncio.run_coroutine_threadsafe(close(), self._loop).result()
    self._loop.call_soon_threadsafe(self._loop.stop)
    self._thread.join(timeout=5)

  async def _serve(self):
    self._upstream = asyncio.Semaphore(self._upstream_connections)
    return await asyncio.start_server(self._client, '127.0.0.1', 0, backlog=1024)

  async def _client(self, reader, writer):
    self.connections += 1
    self.max_connections = max(self.max_connections, self.connections)
    try:
      while await self._one_request(reader, writer):
        pass
    except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
      pass  # the client went away, or the proxy stops
    finally:
      self.connections -= 1
      writer.close()

  async def _one_request(self, reader, writer) -> bool:
    """Serves one request; False when the connection should close."""
    head = await reader.readuntil(b'\r\n\r\n')
    request_line, *header_lines = head.decode('latin-1').split('\r\n')[:-2]
    method, target, _ = request_line.split(' ', 2)
    headers = [tuple(x.strip() for x in line.split(':', 1)) for line in header_lines]
    get = {k.lower(): v for k, v in headers}.get
    if get('expect', '').lower() == '100-continue':
      writer.write(b'HTTP/1.1 100 Continue\r\n\r\n')
    body = await _read_body(reader, get)
    described = urllib.parse.unquote(target) + _uploaded_name(target, body)
    if method == 'GET' and target.startswith('/_proxy/'):  # the harness's own controls
      query = dict(urllib.parse.parse_qsl(urllib.parse.urlparse(target).query))
      if 'latency_ms' in query:
        self.latency_s = float(query['latency_ms']) / 1e3
      if 'reset' in query:
        self.reset_stats()
      return await _respond(writer, 200, 'OK', [('Content-Type', 'application/json')],
                            json.dumps(self.stats()).encode())
    self.requests += 1
    self.in_flight += 1
    self.max_in_flight = max(self.max_in_flight, self.in_flight)
    self.in_flight_sum += self.in_flight
    try:
      fault = next((f for f in self.faults if f.applies(method, described)), None)
      if fault is not None:
        fault.hits += 1
        stalled = 0.
        while stalled < fault.stall_s and not fault.removed:  # a removed fault lets them go
          await asyncio.sleep(min(0.05, fault.stall_s - stalled))
          stalled += 0.05
        if fault.status is not None:
          return await _respond(writer, fault.status, 'Fault', [('Content-Type',
                                'application/json')], json.dumps({'error': {
                                    'code': fault.status, 'message': 'test proxy fault'}}).encode())
      if self._random.random() < self.refuse_share:
        refusal = self._random.choice(_REFUSALS)
        self.refused[refusal] += 1
        await asyncio.sleep(self.latency_s)
        if refusal == 'reset':
          writer.transport.abort()
          return False
        message = json.dumps({'error': {'code': int(refusal), 'message': 'refused by the '
                                        'test proxy (transient)'}}).encode()
        return await _respond(writer, int(refusal), 'Service Unavailable' if refusal == '503'
                              else 'Too Many Requests',
                              [('Content-Type', 'application/json')], message)
      self.bytes_uploaded += len(body)
      await asyncio.sleep(self.latency_s)
      status, reason, response_headers, response_body = await self._forward(
          method, target, headers, body)
      if fault is not None and fault.lose_response:  # done upstream, but the client never hears
        writer.transport.abort()
        return False
      keep = await _respond(writer, status, reason, response_headers, response_body)
      return keep and get('connection', '').lower() != 'close'
    finally:
      self.in_flight -= 1

  async def _forward(self, method, target, headers, body):
    skip = {'connection', 'content-length', 'transfer-encoding', 'expect', 'keep-alive'}
    lines = [f'{method} {target} HTTP/1.1'] + [f'{k}: {v}' for k, v in headers
                                                if k.lower() not in skip]
    lines += [f'Content-Length: {len(body)}', 'Connection: close', '', '']
    async with self._upstream:
      reader, writer = await asyncio.open_connection(*self._target)
      writer.write('\r\n'.join(lines).encode('latin-1') + body)
      await writer.drain()
      response = await reader.read()
      writer.close()
    head, _, response_body = response.partition(b'\r\n\r\n')
    status_line, *header_lines = head.decode('latin-1').split('\r\n')
    _, status, reason = (status_line.split(' ', 2) + [''])[:3]
    response_headers = [tuple(x.strip() for x in line.split(':', 1)) for line in header_lines]
    response_headers = [(k, v) for k, v in response_headers if k.lower() not in skip]
    return int(status), reason, response_headers, response_body


def _uploaded_name(target: str, body: bytes) -> str:
  """' name=<object>' of a multipart upload (JSON metadata first, then the data); '' else."""
  if 'uploadType=multipart' not in target:
    return ''
  match = re.search(rb'"name"\s*:\s*"([^"]*)"', body[:4096])
  return f' name={match.group(1).decode("utf-8", "replace")}' if match else ''


async def _read_body(reader, get) -> bytes:
  if get('content-length'):
    return await reader.readexactly(int(get('content-length')))
  if get('transfer-encoding', '').lower() != 'chunked':
    return b''
  chunks = []
  while size := int((await reader.readuntil(b'\r\n')).split(b';')[0], 16):
    chunks.append(await reader.readexactly(size))
    await reader.readuntil(b'\r\n')
  await reader.readuntil(b'\r\n')  # no trailers are sent by the clients used here
  return b''.join(chunks)


async def _respond(writer, status: int, reason: str, headers, body: bytes) -> bool:
  lines = [f'HTTP/1.1 {status} {reason}'] + [f'{k}: {v}' for k, v in headers]
  lines += [f'Content-Length: {len(body)}', '', '']
  writer.write('\r\n'.join(lines).encode('latin-1') + body)
  await writer.drain()
  return True


def main(proxy_class=None):
  """Serves the emulator behind `proxy_class` (a Proxy subclass; Proxy by default)."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--bucket', default='bench-bucket', help='bucket the emulator serves')
  parser.add_argument('--latency_ms', type=float, default=0., help='added to every request')
  parser.add_argument('--refuse_share', type=float, default=0.,
                      help='share of requests refused (503, 429, dropped connection)')
  args = parser.parse_args()
  from tests import gcs_emulator  # pylint: disable=g-import-not-at-top
  server, emulator_url = gcs_emulator.start(args.bucket)
  proxy = (proxy_class or Proxy)(emulator_url, args.latency_ms / 1e3, args.refuse_share).start()
  print(proxy.url, flush=True)
  try:
    sys.stdin.read()  # serves until stdin closes (the parent ends)
  finally:
    proxy.stop()
    server.stop()


if __name__ == '__main__':
  main()
