"""Prepared splits: a task's tokenized documents as flat token shards plus a document index.

A prepared split is a folder (written by `python -m tasks.prepare`, read by
`tasks.prepared_stream.PreparedStreamIterator`):

  meta.json                     format version, task, split, vocabulary (size and file CRC32),
                                number of documents and tokens, token dtype, shard file names,
                                fingerprint (CRC32 of the index), the task's settings
  index.npy                     one record per document, in document order (the ordinal):
                                  document_id  int64   the source's id (from position)
                                  shard        int32   index into meta['shards']
                                  offset       int64   first token in the shard (in tokens)
                                  length       int64   tokens (never 0: empty documents are dropped)
                                  checksum     uint32  CRC32 of the tokens (detects changed data)
  <name>.bin                    token shards: the documents' tokens back to back, little-endian
                                uint16 (vocabulary <= 65536) or int32

Why flat shards and not ArrayRecord/grain or seqio's TFRecord cache: MELODI reads a document
chunk by chunk over many steps and restores at any (document, chunk). With a flat file a chunk is
a byte range (L + 1 tokens) found from the index in O(1), so a host reads only its rows' chunks,
holds no whole document, and restores by seeking. Records
(ArrayRecord, TFRecord) would be whole documents (tens of MB for a PG-19 book, read at once) or
chunks (which freezes the chunk length at preparation time). Here the chunk length is chosen when
reading, as with the on-the-fly path. `meta.json` is written last: a folder without it is
incomplete.

The chunking at read time (`chunk_at`) is the numpy twin of `tasks.preprocessors.chunk_tokens`;
`tests/test_prepared.py` checks that both give the same batches.

Reading (`PreparedSplit`, `ReadAhead`) goes through tensorstore's kvstore, one code path for a
local folder (`file` driver) and `gs://` (`gcs` driver, the client orbax already uses for T5X's
checkpoints): byte-ranged, asynchronous requests. A stream reads each row's document ahead in
requests of `DEFAULT_BLOCK_BYTES` (never past the document's end), planned from the schedule
`lookahead_steps` ahead, so the requests run while the steps before them do and every fetched
byte is used (tasks/README.md has the measurements against a GCS emulator). Writing uses
`tf.io.gfile` for URLs.
"""

from __future__ import annotations

import collections
import io
import json
import os
import zlib
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

FORMAT_VERSION = 1
META_FILE = 'meta.json'
INDEX_FILE = 'index.npy'
INDEX_DTYPE = np.dtype(
  [
    ('document_id', '<i8'),
    ('shard', '<i4'),
    ('offset', '<i8'),
    ('length', '<i8'),
    ('checksum', '<u4'),
  ]
)
# Default shard size: 2**27 tokens (256 MiB as uint16).
DEFAULT_SHARD_TOKENS = 2**27


def _is_remote(path: str) -> bool:
  return '://' in str(path)


def _join(*parts: str) -> str:
  return os.path.join(*[str(p) for p in parts])


def open_file(path: str, mode: str):
  if _is_remote(path):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    return tf.io.gfile.GFile(path, mode)
  return open(path, mode)  # noqa: SIM115


def exists(path: str) -> bool:
  if _is_remote(path):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    return tf.io.gfile.exists(path)
  return os.path.exists(path)


def makedirs(path: str) -> None:
  if _is_remote(path):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    tf.io.gfile.makedirs(path)
  else:
    os.makedirs(path, exist_ok=True)


def token_dtype(vocab_size: int) -> np.dtype:
  """uint16 when every id fits, else int32."""
  return np.dtype('<u2') if vocab_size <= 2**16 else np.dtype('<i4')


def file_checksum(path: str | None) -> int | None:
  """CRC32 of a file's bytes (the vocabulary model), None when there is no file."""
  if not path or not exists(path):
    return None
  with open_file(path, 'rb') as f:
    return zlib.crc32(f.read())


# --------------------------------------------------------------------------------------------------
# Writing.


class ShardWriter:
  """Appends documents to token shards of at most `shard_tokens` tokens; collects their index.

  Args:
    out_dir: folder of the prepared split.
    vocab_size: vocabulary size (chooses the token dtype; ids must be in [0, vocab_size)).
    prefix: shard file name prefix (distinct per writer when several write one split).
    shard_tokens: tokens per shard before starting the next one.
  """

  def __init__(self, out_dir: str, vocab_size: int, prefix: str = 'tokens', shard_tokens=None):
    self._dir = str(out_dir)
    self._vocab_size = int(vocab_size)
    self._dtype = token_dtype(vocab_size)
    self._prefix = prefix
    self._shard_tokens = int(shard_tokens or DEFAULT_SHARD_TOKENS)
    self.shards: list[str] = []
    self.records: list[tuple[int, int, int, int, int]] = []
    self._file = None
    self._offset = 0
    makedirs(self._dir)

  def add(self, document_id: int, tokens: np.ndarray) -> bool:
    """Appends one document; returns False (and writes nothing) for an empty one."""
    tokens = np.asarray(tokens).reshape(-1)
    if not tokens.size:
      return False
    lo, hi = int(tokens.min()), int(tokens.max())
    if lo < 0 or hi >= self._vocab_size:
      raise ValueError(
        f'Document {document_id} has token ids in [{lo}, {hi}], outside the vocabulary '
        f'[0, {self._vocab_size}).'
      )
    if self._file is None or self._offset >= self._shard_tokens:
      self._next_shard()
    data = tokens.astype(self._dtype)
    self._file.write(data.tobytes())
    checksum = zlib.crc32(np.ascontiguousarray(tokens, np.int32).tobytes())
    self.records.append(
      (int(document_id), len(self.shards) - 1, self._offset, tokens.size, checksum)
    )
    self._offset += tokens.size
    return True

  def _next_shard(self) -> None:
    self.close()
    name = f'{self._prefix}-{len(self.shards):05d}.bin'
    self.shards.append(name)
    self._file = open_file(_join(self._dir, name), 'wb')
    self._offset = 0

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None


def write_index_and_meta(
  out_dir: str,
  records: np.ndarray,
  shards: Sequence[str],
  vocab_size: int,
  info: dict[str, Any],
) -> dict[str, Any]:
  """Writes `index.npy` then `meta.json` (last: it marks the split complete); returns the meta."""
  records = np.asarray(records, INDEX_DTYPE)
  with open_file(_join(out_dir, INDEX_FILE), 'wb') as f:
    np.save(f, records, allow_pickle=False)
  meta = {
    'format_version': FORMAT_VERSION,
    'vocab_size': int(vocab_size),
    'token_dtype': token_dtype(vocab_size).str,
    'num_documents': len(records),
    'num_tokens': int(records['length'].sum()) if len(records) else 0,
    'shards': list(shards),
    'fingerprint': zlib.crc32(records.tobytes()),
    **info,
  }
  with open_file(_join(out_dir, META_FILE), 'w') as f:
    f.write(json.dumps(meta, indent=2, sort_keys=True) + '\n')
  return meta


def write_split(
  out_dir: str,
  documents: Iterable[tuple[int, np.ndarray]],
  vocab_size: int,
  info: dict[str, Any] | None = None,
  shard_tokens: int | None = None,
) -> dict[str, Any]:
  """Writes `(document_id, tokens)` documents as a prepared split (empty ones dropped)."""
  writer = ShardWriter(out_dir, vocab_size, shard_tokens=shard_tokens)
  try:
    for doc_id, tokens in documents:
      writer.add(doc_id, tokens)
  finally:
    writer.close()
  return write_index_and_meta(out_dir, writer.records, writer.shards, vocab_size, info or {})


# --------------------------------------------------------------------------------------------------
# Reading.


def chunk_at(
  read, length: int, chunk: int, chunk_length: int, start_id: int
) -> tuple[np.ndarray, np.ndarray]:
  """Chunk `chunk` of a document of `length` tokens: `(targets [L], inputs [L])`, int32.

  `read(start, stop)` returns the document's tokens [start, stop). Same layout as
  `tasks.preprocessors.chunk_tokens`: targets 0-padded; inputs shifted right by one (the previous
  chunk's last token, or `start_id` for chunk 0), 0 on padding. The real tokens are the first
  min(L, length - chunk * L) positions; callers mark them by position, never by id.
  """
  lo = chunk * chunk_length
  hi = min(lo + chunk_length, length)
  if not 0 <= lo < length:
    raise IndexError(f'chunk {chunk} is outside a document of {length} tokens.')
  n = hi - lo
  targets = np.zeros(chunk_length, np.int32)
  inputs = np.zeros(chunk_length, np.int32)
  if chunk == 0:
    seg = np.asarray(read(0, hi), np.int32)
    inputs[0] = start_id
  else:
    seg = np.asarray(read(lo - 1, hi), np.int32)
    inputs[0] = seg[0]
    seg = seg[1:]
  targets[:n] = seg
  inputs[1:n] = seg[: n - 1]
  inputs[n:] = 0
  return targets, inputs


# Read-ahead defaults (per host). A block is one ranged request of a row's document (clipped at
# the document's end); 1 MiB is 128 steps of a 4096-token uint16 row, so a long document costs
# one request per 128 steps and a row, each with GCS's ~50 ms to first byte hidden behind the
# steps before it.
DEFAULT_BLOCK_BYTES = 1 << 20
# Fetched but not yet consumed bytes at most, per stream (the planner stops planning beyond it).
DEFAULT_BUFFER_BYTES = 64 << 20


def kvstore_spec(path: str) -> dict[str, Any]:
  """The tensorstore kvstore of a prepared split's folder: `gs://bucket/dir` or a local folder.

  GCS credentials are tensorstore's: Google application default credentials
  (`GOOGLE_APPLICATION_CREDENTIALS`, gcloud's, or the metadata server of the VM / GKE workload
  identity), anonymous without any. An emulator is used when `TENSORSTORE_GCS_HTTP_URL` (or
  `STORAGE_EMULATOR_HOST`, copied to it) is set before the first `gs://` read.
  """
  path = str(path)
  if path.startswith('gs://'):
    bucket, _, prefix = path[len('gs://') :].partition('/')
    if not bucket:
      raise ValueError(f'No bucket in the prepared split path {path!r} (expected gs://BUCKET/DIR).')
    emulator = os.environ.get('STORAGE_EMULATOR_HOST')
    if emulator and 'TENSORSTORE_GCS_HTTP_URL' not in os.environ:
      os.environ['TENSORSTORE_GCS_HTTP_URL'] = (
        emulator if '://' in emulator else f'http://{emulator}'
      )
    prefix = prefix.strip('/')
    return {'driver': 'gcs', 'bucket': bucket, 'path': prefix + '/' if prefix else ''}
  if _is_remote(path):
    import tensorstore as ts  # pylint: disable=g-import-not-at-top

    try:
      spec = ts.KvStore.Spec(path.rstrip('/') + '/').to_json()
    except ValueError as e:
      raise ValueError(
        f'Prepared split path {path!r}: tensorstore has no kvstore for this URL scheme ({e}). '
        'Use gs://BUCKET/DIR, another tensorstore URL (s3://, file://) or a local folder.'
      ) from e
    return spec
  return {'driver': 'file', 'path': os.path.abspath(path) + '/'}


class PreparedSplit:
  """Read access to a prepared split: the index in memory, tokens read on demand.

  Every read goes through one tensorstore kvstore (`kvstore_spec`: the `file` driver for a local
  folder, `gcs` for `gs://`), as byte-ranged requests: `read` is one request; a stream reads
  through a `ReadAhead`, whose requests are large, sequential per row and overlap the steps.

  Counters (tests and the benchmark use them): `reads` counts the positioned reads per document
  ordinal (what a host or a restore read, whatever the requests); `requests` and `bytes_fetched`
  count the token requests and their bytes; `opened_shards` lists the shards read from.
  """

  def __init__(self, path: str):
    import tensorstore as ts  # pylint: disable=g-import-not-at-top

    self.path = str(path)
    self._store = ts.KvStore.open(kvstore_spec(self.path)).result()
    meta = self._get(META_FILE)
    if meta is None:
      raise FileNotFoundError(
        f'No prepared split at {self.path!r} (no {META_FILE}; an interrupted preparation leaves '
        'none). Write it with `python -m tasks.prepare --task=TASK --split=SPLIT --out=ROOT`.'
      )
    self.meta = json.loads(meta)
    if self.meta.get('format_version') != FORMAT_VERSION:
      raise ValueError(
        f'Prepared split {self.path!r} has format version {self.meta.get("format_version")}, this '
        f'code reads {FORMAT_VERSION}: prepare it again.'
      )
    index = self._get(INDEX_FILE)
    if index is None:
      raise FileNotFoundError(f'Prepared split {self.path!r}: {INDEX_FILE} is missing.')
    self.index = np.load(io.BytesIO(index), allow_pickle=False)
    if self.index.dtype != INDEX_DTYPE or len(self.index) != self.meta['num_documents']:
      raise ValueError(f'Prepared split {self.path!r}: index does not match {META_FILE}.')
    self.dtype = np.dtype(self.meta['token_dtype'])
    self.reads = np.zeros(len(self.index), np.int64)
    self.requests = 0
    self.bytes_fetched = 0
    self._shards_read: set[int] = set()

  def _get(self, key: str) -> bytes | None:
    """A whole small object (meta, index), None when missing."""
    result = self._store.read(key).result()
    return None if result.state == 'missing' else bytes(result.value)

  @property
  def num_documents(self) -> int:
    return len(self.index)

  @property
  def fingerprint(self) -> int:
    return int(self.meta['fingerprint'])

  @property
  def opened_shards(self) -> list[int]:
    return sorted(self._shards_read)

  def fetch(self, ordinal: int, start: int, stop: int):
    """Starts one ranged request for tokens [start, stop) of document `ordinal`: a `Fetch`."""
    rec = self.index[ordinal]
    if not 0 <= start < stop <= int(rec['length']):
      raise IndexError(f'[{start}, {stop}) outside document {ordinal} ({rec["length"]} tokens).')
    shard = int(rec['shard'])
    itemsize = self.dtype.itemsize
    lo = (int(rec['offset']) + start) * itemsize
    hi = (int(rec['offset']) + stop) * itemsize
    self.requests += 1
    self.bytes_fetched += hi - lo
    self._shards_read.add(shard)
    name = self.meta['shards'][shard]
    return Fetch(self, name, start, stop, self._store.read(name, byte_range=slice(lo, hi)))

  def read(self, ordinal: int, start: int, stop: int) -> np.ndarray:
    """Tokens [start, stop) of document `ordinal` (one positioned read: one request)."""
    self.reads[ordinal] += 1
    if start == stop:
      if not 0 <= start <= int(self.index[ordinal]['length']):
        raise IndexError(f'[{start}, {stop}) outside document {ordinal}.')
      return np.zeros(0, self.dtype)
    return self.fetch(ordinal, start, stop).tokens()

  def document(self, ordinal: int) -> np.ndarray:
    """All tokens of a document (tests and tools)."""
    return self.read(ordinal, 0, int(self.index[ordinal]['length'])).astype(np.int32)

  def close(self) -> None:
    """Nothing stays open between reads (kept for callers that close a split)."""


class Fetch:
  """One ranged request in flight: tokens [start, stop) of a document (document coordinates)."""

  def __init__(self, split: PreparedSplit, shard_name: str, start: int, stop: int, future):
    self.split = split
    self.shard_name = shard_name
    self.start = start
    self.stop = stop
    self._future = future
    self._tokens: np.ndarray | None = None

  def tokens(self) -> np.ndarray:
    """The tokens (waits for the request)."""
    if self._tokens is None:
      result = self._future.result()
      size = (self.stop - self.start) * self.split.dtype.itemsize
      if result.state == 'missing':
        raise FileNotFoundError(
          f'Prepared split {self.split.path!r}: shard {self.shard_name} is missing.'
        )
      if len(result.value) != size:
        raise ValueError(
          f'Prepared split {self.split.path!r}: shard {self.shard_name} is truncated.'
        )
      self._tokens = np.frombuffer(result.value, self.split.dtype)
      self._future = None
    return self._tokens

  def cancel(self) -> None:
    if self._future is not None:
      self._future.cancel()


class _RowStream:
  """The requests of one document read by one row: contiguous fetches from `start` on."""

  def __init__(self, ordinal: int, start: int):
    self.ordinal = ordinal
    self.fetches: collections.deque[Fetch] = collections.deque()
    self.consumed = start  # tokens before this are no longer needed
    self.fetched_to = start  # requests cover [consumed, fetched_to)


class ReadAhead:
  """Read-ahead for a stream: each row's document in large sequential ranged requests, in flight
  while the steps before them run (tensorstore's requests are asynchronous).

  The stream calls `want(key, ordinal, start, stop)` for the chunks of the steps ahead (`key`
  names one read of a document by one row, e.g. its (epoch, position) in the schedule): a want
  beyond what is requested starts a request of `block_bytes` from there (clipped at the
  document's end, and at least up to `stop`). `read` then serves a chunk from the requests,
  waiting only if its request has not arrived. Requests never cross a document's end or start
  before the first wanted token, so every fetched byte is read by the stream unless it stops
  first (at most the buffer); a restore wants from the saved chunk on, reading nothing before it.

  Args:
    split: the prepared split.
    block_bytes: bytes per request (a multiple of the token size is used).
    max_buffer_bytes: `buffered_bytes` above which the stream plans no further ahead.
  """

  def __init__(self, split: PreparedSplit, block_bytes=None, max_buffer_bytes=None):
    block_bytes = DEFAULT_BLOCK_BYTES if block_bytes is None else int(block_bytes)
    max_buffer_bytes = DEFAULT_BUFFER_BYTES if max_buffer_bytes is None else int(max_buffer_bytes)
    if block_bytes < split.dtype.itemsize:
      raise ValueError(
        f'block_bytes must be >= {split.dtype.itemsize} (one token), got {block_bytes}.'
      )
    if max_buffer_bytes < 0:
      raise ValueError(f'max_buffer_bytes must be >= 0, got {max_buffer_bytes}.')
    self.split = split
    self.block_tokens = block_bytes // split.dtype.itemsize
    self.max_buffer_bytes = max_buffer_bytes
    self._streams: dict[Any, _RowStream] = {}
    self._buffered_tokens = 0
    self.bytes_used = 0  # bytes of the chunks served by `read`

  @property
  def buffered_bytes(self) -> int:
    """Requested (in flight or arrived) and not yet read bytes."""
    return self._buffered_tokens * self.split.dtype.itemsize

  def full(self) -> bool:
    return self.buffered_bytes >= self.max_buffer_bytes

  def want(self, key, ordinal: int, start: int, stop: int) -> None:
    """Makes sure requests cover tokens [start, stop) of document `ordinal` for `key`."""
    stream = self._streams.get(key)
    if stream is None or stream.ordinal != ordinal or start < stream.consumed:
      self.drop(key)
      stream = self._streams[key] = _RowStream(ordinal, start)
    length = int(self.split.index[ordinal]['length'])
    while stream.fetched_to < stop:
      lo = stream.fetched_to
      hi = min(length, max(stop, lo + self.block_tokens))
      stream.fetches.append(self.split.fetch(ordinal, lo, hi))
      stream.fetched_to = hi
      self._buffered_tokens += hi - lo

  def read(self, key, ordinal: int, start: int, stop: int) -> np.ndarray:
    """Tokens [start, stop) of document `ordinal` for `key`; what precedes `stop - 1` is freed.

    The next chunk of a row starts one token before this one's end (its first input), so that
    token is kept; at the document's end the row's requests are all released.
    """
    self.split.reads[ordinal] += 1
    self.want(key, ordinal, start, stop)
    stream = self._streams[key]
    parts = []
    for f in stream.fetches:
      if f.stop <= start:
        continue
      if f.start >= stop:
        break
      tokens = f.tokens()
      parts.append(tokens[max(start, f.start) - f.start : min(stop, f.stop) - f.start])
    out = parts[0] if len(parts) == 1 else np.concatenate(parts)
    self.bytes_used += (stop - start) * self.split.dtype.itemsize
    if stop >= int(self.split.index[ordinal]['length']):
      self.drop(key)
    else:
      keep = stop - 1
      self._buffered_tokens -= keep - stream.consumed
      stream.consumed = keep
      while stream.fetches and stream.fetches[0].stop <= keep:
        stream.fetches.popleft()
    return out

  def wait(self) -> None:
    """Waits for every request in flight (tests and benchmarks count what arrived)."""
    for stream in self._streams.values():
      for f in stream.fetches:
        f.tokens()

  def drop(self, key) -> None:
    """Forgets a row's requests (cancelling those still in flight)."""
    stream = self._streams.pop(key, None)
    if stream is not None:
      self._buffered_tokens -= stream.fetched_to - stream.consumed
      for f in stream.fetches:
        f.cancel()

  def clear(self) -> None:
    """Forgets every request (a reset or a restore)."""
    for key in list(self._streams):
      self.drop(key)
