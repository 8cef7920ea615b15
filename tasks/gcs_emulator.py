"""A small GCS emulator for benchmarks and tests: local folders served over the GCS HTTP APIs.

  python tasks/gcs_emulator.py --root DIR [--latency_ms 50] [--port 0]

Every sub-folder of `--root` is a bucket (`gs://<folder>/...`). It is a real HTTP server on
127.0.0.1 speaking the parts of the GCS APIs that readers use, read-only:

  GET /storage/v1/b/<bucket>/o/<object>?alt=media   JSON API media download (tensorstore's `gcs`
                                                    kvstore); `Range: bytes=a-b` gives 206
  GET /storage/v1/b/<bucket>/o/<object>             JSON API object metadata (size, generation)
  GET /storage/v1/b/<bucket>/o?prefix=P             JSON API listing
  GET /<bucket>/<object>                            XML API download (TF's GCS filesystem), Range
  CONNECT <host>:443                                HTTPS proxy: the tunnel is answered by this
                                                    emulator with a self-signed certificate

TF's GCS filesystem (`tf.io.gfile`) has no endpoint setting; it reaches the emulator through the
proxy: `https_proxy=http://127.0.0.1:<port>`, `CURL_CA_BUNDLE=<cert>` (`tls_env`), which needs the
`openssl` command to make the certificate (`--tls_dir`).

Each storage request waits `latency_ms` before answering (GCS's time to first byte; requests
overlap, as on GCS). It counts requests and payload bytes: `GET /_emulator/stats` returns them,
`POST /_emulator/reset` zeroes them, `POST /_emulator/latency?ms=N` changes the latency.

The first line it prints is `port <N>`. `start()` runs it as a subprocess (stdlib only, so it does
not import the `tasks` package and its TensorFlow; the reader under test keeps the CPU of its own
process); `shared()` is the process's one emulator, pointed to by tensorstore, with `add_bucket`.
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import shutil
import ssl
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request

# Generation reported for every object: the emulator's objects do not change while it runs.
_GENERATION = '1'
# Bytes written to the socket per `write` call when serving a payload.
_COPY_BYTES = 1 << 20


class _Stats:
  """Request and byte counters shared by the server's threads."""

  def __init__(self):
    self.lock = threading.Lock()
    self.reset()

  def reset(self) -> None:
    self.requests = 0  # storage requests (not /_emulator)
    self.media_requests = 0  # downloads (JSON alt=media or XML)
    self.metadata_requests = 0  # metadata and listings
    self.bytes_served = 0  # payload bytes of the downloads

  def as_dict(self) -> dict[str, int]:
    return {
      'requests': self.requests,
      'media_requests': self.media_requests,
      'metadata_requests': self.metadata_requests,
      'bytes_served': self.bytes_served,
    }


def _parse_range(header: str | None, size: int) -> tuple[int, int] | None:
  """`bytes=a-b`, `bytes=a-` or `bytes=-n` as [start, stop); None for no (or an empty) range."""
  if not header or not header.startswith('bytes='):
    return None
  first, _, last = header[len('bytes=') :].split(',')[0].strip().partition('-')
  if not first:
    n = int(last)
    return max(0, size - n), size
  start = int(first)
  stop = min(size, int(last) + 1) if last else size
  return start, stop


class _Handler(http.server.BaseHTTPRequestHandler):
  protocol_version = 'HTTP/1.1'  # keep-alive, as GCS clients expect
  server: _Server

  def log_message(self, format, *args):  # noqa: A002  (quiet)
    del format, args

  # -- helpers ----------------------------------------------------------------------------------

  def _send(self, code: int, body: bytes, content_type: str, headers=()) -> None:
    self.send_response(code)
    self.send_header('Content-Type', content_type)
    self.send_header('Content-Length', str(len(body)))
    for k, v in headers:
      self.send_header(k, v)
    self.end_headers()
    if self.command != 'HEAD':
      self.wfile.write(body)

  def _json(self, code: int, obj) -> None:
    self._send(code, json.dumps(obj).encode(), 'application/json; charset=UTF-8')

  def _error(self, code: int, message: str) -> None:
    self._json(code, {'error': {'code': code, 'message': message}})

  def _object_path(self, bucket: str, name: str) -> str | None:
    """The local file of an object, None when the bucket or object does not exist."""
    if '/' in bucket or bucket in ('.', '..'):
      return None
    # A bucket may be a link to a folder elsewhere (`add_bucket`); objects stay inside it.
    bucket_dir = os.path.realpath(os.path.join(self.server.root, bucket))
    path = os.path.realpath(os.path.join(bucket_dir, name))
    if not path.startswith(bucket_dir + os.sep):
      return None
    return path if os.path.isfile(path) else None

  def _metadata(self, bucket: str, name: str, path: str) -> dict:
    st = os.stat(path)
    updated = time.strftime('%Y-%m-%dT%H:%M:%S.000Z', time.gmtime(st.st_mtime))
    return {
      'kind': 'storage#object',
      'bucket': bucket,
      'name': name,
      'size': str(st.st_size),
      'generation': _GENERATION,
      'metageneration': '1',
      'updated': updated,
      'timeCreated': updated,
      'contentType': 'application/octet-stream',
    }

  def _media(self, path: str) -> None:
    size = os.path.getsize(path)
    try:
      span = _parse_range(self.headers.get('Range'), size)
    except ValueError:
      self._error(400, f'bad Range header {self.headers.get("Range")!r}')
      return
    if span is not None and (span[0] >= size or span[0] >= span[1]):
      self._send(416, b'', 'text/plain', [('Content-Range', f'bytes */{size}')])
      return
    start, stop = span or (0, size)
    code = 206 if span is not None else 200
    headers = [
      ('x-goog-generation', _GENERATION),
      ('x-goog-metageneration', '1'),
      ('x-goog-stored-content-length', str(size)),
      ('Accept-Ranges', 'bytes'),
    ]
    if span is not None:
      headers.append(('Content-Range', f'bytes {start}-{stop - 1}/{size}'))
    self.send_response(code)
    self.send_header('Content-Type', 'application/octet-stream')
    self.send_header('Content-Length', str(stop - start))
    for k, v in headers:
      self.send_header(k, v)
    self.end_headers()
    if self.command == 'HEAD':
      return
    with self.server.stats.lock:  # counted before sending: a client that has it sees it counted
      self.server.stats.bytes_served += stop - start
    with open(path, 'rb') as f:
      pos = start
      while pos < stop:
        data = os.pread(f.fileno(), min(_COPY_BYTES, stop - pos), pos)
        if not data:
          break
        self.wfile.write(data)
        pos += len(data)

  def _count(self, kind: str) -> None:
    with self.server.stats.lock:
      self.server.stats.requests += 1
      if kind == 'media':
        self.server.stats.media_requests += 1
      else:
        self.server.stats.metadata_requests += 1

  # -- routes -----------------------------------------------------------------------------------

  def do_POST(self):  # noqa: N802
    url = urllib.parse.urlsplit(self.path)
    query = urllib.parse.parse_qs(url.query)
    length = int(self.headers.get('Content-Length') or 0)
    if length:
      self.rfile.read(length)
    if url.path == '/_emulator/reset':
      with self.server.stats.lock:
        self.server.stats.reset()
      self._json(200, {})
    elif url.path == '/_emulator/latency':
      self.server.latency_s = float(query['ms'][0]) / 1000
      self._json(200, {'latency_ms': self.server.latency_s * 1000})
    else:
      self._error(405, 'this emulator is read-only')

  def do_CONNECT(self):  # noqa: N802
    """HTTPS proxy tunnel: TLS with the emulator's certificate, then the same routes inside."""
    context = self.server.tls_context
    if context is None:
      self._error(405, 'start the emulator with --tls_dir to use it as an HTTPS proxy')
      return
    self.send_response(200, 'Connection established')
    self.end_headers()
    self.wfile.flush()
    try:
      tunnel = context.wrap_socket(self.connection, server_side=True)
      _Handler(tunnel, self.client_address, self.server)
    except (OSError, ssl.SSLError):
      pass
    self.close_connection = True

  def do_HEAD(self):  # noqa: N802
    self.do_GET()

  def do_GET(self):  # noqa: N802
    url = urllib.parse.urlsplit(self.path)
    query = urllib.parse.parse_qs(url.query)
    if url.path == '/_emulator/stats':
      with self.server.stats.lock:
        self._json(200, self.server.stats.as_dict())
      return
    parts = url.path.split('/')
    json_api = url.path.startswith('/storage/v1/b/')
    media = not json_api or query.get('alt') == ['media']
    self._count('media' if media else 'metadata')
    if self.server.latency_s > 0:
      time.sleep(self.server.latency_s)
    if json_api:
      # /storage/v1/b/<bucket>/o[/<object>]
      bucket = urllib.parse.unquote(parts[4]) if len(parts) > 4 else ''
      if len(parts) == 6 and parts[5] == 'o':
        self._list(bucket, query.get('prefix', [''])[0])
        return
      if len(parts) < 7 or parts[5] != 'o':
        self._error(404, f'unsupported path {url.path}')
        return
      name = urllib.parse.unquote('/'.join(parts[6:]))
    else:
      # /<bucket>/<object>
      bucket = urllib.parse.unquote(parts[1]) if len(parts) > 1 else ''
      name = urllib.parse.unquote('/'.join(parts[2:]))
    path = self._object_path(bucket, name) if bucket and name else None
    if path is None:
      self._error(404, f'No such object: {bucket}/{name}')
    elif media:
      self._media(path)
    else:
      self._json(200, self._metadata(bucket, name, path))

  def _list(self, bucket: str, prefix: str) -> None:
    bucket_dir = os.path.realpath(os.path.join(self.server.root, bucket))
    if not bucket or '/' in bucket or not os.path.isdir(bucket_dir):
      self._error(404, f'No such bucket: {bucket}')
      return
    items = []
    for dirpath, _, files in os.walk(bucket_dir):
      for f in files:
        name = os.path.relpath(os.path.join(dirpath, f), bucket_dir)
        if name.startswith(prefix):
          items.append(self._metadata(bucket, name, os.path.join(dirpath, f)))
    self._json(200, {'kind': 'storage#objects', 'items': sorted(items, key=lambda x: x['name'])})


class _Server(http.server.ThreadingHTTPServer):
  daemon_threads = True
  request_queue_size = 128

  def __init__(self, root: str, latency_s: float, port: int = 0, tls_dir: str | None = None):
    self.root = os.path.realpath(root)
    self.latency_s = latency_s
    self.stats = _Stats()
    self.tls_context = None
    if tls_dir:
      self.tls_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
      self.tls_context.load_cert_chain(*_certificate(tls_dir))
    super().__init__(('127.0.0.1', port), _Handler)


# Hosts TF's GCS filesystem talks to (metadata and media).
_TLS_HOSTS = ('storage.googleapis.com', 'www.googleapis.com')


def _certificate(tls_dir: str) -> tuple[str, str]:
  """A self-signed certificate for the GCS hosts (made once per folder): (cert, key) paths."""
  cert, key = os.path.join(tls_dir, 'cert.pem'), os.path.join(tls_dir, 'key.pem')
  if not os.path.exists(cert):
    names = ','.join(f'DNS:{h}' for h in _TLS_HOSTS)
    subprocess.run(
      ['openssl', 'req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-days', '2']
      + ['-subj', f'/CN={_TLS_HOSTS[0]}', '-addext', f'subjectAltName={names}']
      + ['-keyout', key, '-out', cert],
      check=True,
      capture_output=True,
    )
  return cert, key


# --------------------------------------------------------------------------------------------------
# Running it from another process.


class Emulator:
  """A running emulator subprocess (see `start`)."""

  def __init__(self, process: subprocess.Popen, port: int):
    self.tls_dir: str | None = None
    self.process = process
    self.port = port
    self.url = f'http://127.0.0.1:{port}'

  def _call(self, method: str, path: str) -> dict:
    request = urllib.request.Request(
      self.url + path, method=method, data=b'' if method == 'POST' else None
    )
    with urllib.request.urlopen(request, timeout=10) as response:
      return json.loads(response.read())

  def stats(self) -> dict[str, int]:
    """Requests and bytes served since the start or the last `reset`."""
    return self._call('GET', '/_emulator/stats')

  def reset(self) -> None:
    self._call('POST', '/_emulator/reset')

  def set_latency(self, ms: float) -> None:
    self._call('POST', f'/_emulator/latency?ms={ms}')

  def tls_env(self) -> dict[str, str]:
    """Environment that sends TF's GCS filesystem (libcurl) to this emulator through its proxy."""
    if not self.tls_dir:
      raise RuntimeError('The emulator has no TLS proxy (the openssl command was not found).')
    return {
      'https_proxy': self.url,
      'HTTPS_PROXY': self.url,
      'CURL_CA_BUNDLE': os.path.join(self.tls_dir, 'cert.pem'),
      'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'emulator',
      'NO_GCE_CHECK': 'true',
    }

  def stop(self) -> None:
    if self.process.poll() is None:
      self.process.terminate()
      try:
        self.process.wait(timeout=10)
      except subprocess.TimeoutExpired:
        self.process.kill()
        self.process.wait(timeout=10)


def point_tensorstore_at(url: str) -> None:
  """Makes this process's tensorstore `gcs` kvstore talk to `url`, with a fixed test token.

  tensorstore reads `TENSORSTORE_GCS_HTTP_URL` once, at its first GCS request, so this must run
  before any `gs://` read of the process (hence one emulator per process, `shared`).
  """
  os.environ['TENSORSTORE_GCS_HTTP_URL'] = url
  os.environ['STORAGE_EMULATOR_HOST'] = url
  # The emulator ignores credentials; a fixed token keeps tensorstore from looking for any.
  os.environ['GOOGLE_AUTH_TOKEN_FOR_TESTING'] = 'emulator'


def start(root: str, latency_ms: float = 50.0, timeout_s: float = 30.0) -> Emulator:
  """Starts the emulator on 127.0.0.1 (a free port) serving `root`; returns it once it listens.

  With the `openssl` command it is also an HTTPS proxy for TF's GCS filesystem (`tls_env`).
  """
  command = [sys.executable, os.path.abspath(__file__), '--root', str(root)]
  command += ['--latency_ms', str(latency_ms)]
  tls_dir = None
  if shutil.which('openssl'):
    tls_dir = os.path.join(root, '.tls')
    os.makedirs(tls_dir, exist_ok=True)
    command += ['--tls_dir', tls_dir]
  process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
  line = [None]

  def read_port():
    line[0] = process.stdout.readline()

  reader = threading.Thread(target=read_port, daemon=True)
  reader.start()
  reader.join(timeout_s)
  if not line[0] or not line[0].startswith('port '):
    process.kill()
    raise RuntimeError(f'The GCS emulator did not start within {timeout_s} s (got {line[0]!r}).')
  emulator = Emulator(process, int(line[0].split()[1]))
  emulator.tls_dir = tls_dir
  return emulator


_SHARED: dict[str, Emulator] = {}


def shared(latency_ms: float = 50.0) -> Emulator:
  """This process's emulator (one per process: tensorstore keeps its first endpoint).

  It serves a temporary folder; `add_bucket` links local folders into it as buckets. Its counters
  and latency are per call site to set (`reset`, `set_latency`); it stops when the process exits.
  """
  emulator = _SHARED.get('emulator')
  if emulator is None or emulator.process.poll() is not None:
    import atexit  # pylint: disable=g-import-not-at-top
    import tempfile  # pylint: disable=g-import-not-at-top

    root = tempfile.mkdtemp(prefix='gcs_emulator_')
    emulator = start(root, latency_ms)
    emulator.root = root
    atexit.register(shutil.rmtree, root, ignore_errors=True)  # runs after the stop below
    atexit.register(emulator.stop)
    _SHARED['emulator'] = emulator
    point_tensorstore_at(emulator.url)
  emulator.set_latency(latency_ms)
  return emulator


def add_bucket(emulator: Emulator, bucket: str, local_dir: str) -> str:
  """Serves `local_dir` as `gs://<bucket>` (a link in the emulator's root); returns that URL."""
  link = os.path.join(emulator.root, bucket)
  if os.path.lexists(link):
    os.remove(link)
  os.symlink(os.path.abspath(local_dir), link)
  return f'gs://{bucket}'


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--root', required=True, help='folder whose sub-folders are the buckets')
  parser.add_argument('--latency_ms', type=float, default=50.0, help='wait before each answer')
  parser.add_argument('--port', type=int, default=0, help='0: a free port')
  parser.add_argument('--tls_dir', default=None, help='HTTPS proxy: certificate made here')
  args = parser.parse_args(argv)
  if not os.path.isdir(args.root):
    raise SystemExit(f'--root {args.root!r} is not a folder.')
  try:
    server = _Server(args.root, args.latency_ms / 1000, args.port, args.tls_dir)
  except OSError as e:
    print(f'error {e}', flush=True)
    raise SystemExit(1) from e
  print(f'port {server.server_address[1]}', flush=True)
  server.serve_forever()


if __name__ == '__main__':
  main()
