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
one positioned read (`os.pread` of L + 1 tokens; GCS: seek + read) found from the index in O(1),
so a host reads only its rows' chunks, holds no whole document, and restores by seeking. Records
(ArrayRecord, TFRecord) would be whole documents (tens of MB for a PG-19 book, read at once) or
chunks (which freezes the chunk length at preparation time). Here the chunk length is chosen when
reading, as with the on-the-fly path. `meta.json` is written last: a folder without it is
incomplete.

The chunking at read time (`chunk_at`) is the numpy twin of `tasks.preprocessors.chunk_tokens`;
`tests/test_prepared.py` checks that both give the same batches.
"""

from __future__ import annotations

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


class PreparedSplit:
  """Read access to a prepared split: the index in memory, tokens read on demand.

  Shard files are opened on first use only, so a host opens just the shards its rows' documents
  live in. `reads` counts the positioned reads per document ordinal (tests and the benchmark use
  it to show what a host or a restore read).
  """

  def __init__(self, path: str):
    self.path = str(path)
    meta_path = _join(self.path, META_FILE)
    if not exists(meta_path):
      raise FileNotFoundError(
        f'No prepared split at {self.path!r} (no {META_FILE}; an interrupted preparation leaves '
        'none). Write it with `python -m tasks.prepare --task=TASK --split=SPLIT --out=ROOT`.'
      )
    with open_file(meta_path, 'r') as f:
      self.meta = json.loads(f.read())
    if self.meta.get('format_version') != FORMAT_VERSION:
      raise ValueError(
        f'Prepared split {self.path!r} has format version {self.meta.get("format_version")}, this '
        f'code reads {FORMAT_VERSION}: prepare it again.'
      )
    with open_file(_join(self.path, INDEX_FILE), 'rb') as f:
      self.index = np.load(f, allow_pickle=False)
    if self.index.dtype != INDEX_DTYPE or len(self.index) != self.meta['num_documents']:
      raise ValueError(f'Prepared split {self.path!r}: index does not match {META_FILE}.')
    self.dtype = np.dtype(self.meta['token_dtype'])
    self._files: dict[int, Any] = {}
    self.reads = np.zeros(len(self.index), np.int64)

  @property
  def num_documents(self) -> int:
    return len(self.index)

  @property
  def fingerprint(self) -> int:
    return int(self.meta['fingerprint'])

  @property
  def opened_shards(self) -> list[int]:
    return sorted(self._files)

  def _file(self, shard: int):
    f = self._files.get(shard)
    if f is None:
      path = _join(self.path, self.meta['shards'][shard])
      f = open_file(path, 'rb')
      self._files[shard] = f
    return f

  def read(self, ordinal: int, start: int, stop: int) -> np.ndarray:
    """Tokens [start, stop) of document `ordinal` (one positioned read)."""
    rec = self.index[ordinal]
    if not 0 <= start <= stop <= int(rec['length']):
      raise IndexError(f'[{start}, {stop}) outside document {ordinal} ({rec["length"]} tokens).')
    self.reads[ordinal] += 1
    itemsize = self.dtype.itemsize
    pos = (int(rec['offset']) + start) * itemsize
    size = (stop - start) * itemsize
    f = self._file(int(rec['shard']))
    if isinstance(f, io.BufferedReader):
      data = os.pread(f.fileno(), size, pos)
    else:
      f.seek(pos)
      data = f.read(size)
    if len(data) != size:
      raise ValueError(f'Prepared split {self.path!r}: shard {rec["shard"]} is truncated.')
    return np.frombuffer(data, self.dtype)

  def document(self, ordinal: int) -> np.ndarray:
    """All tokens of a document (tests and tools)."""
    return self.read(ordinal, 0, int(self.index[ordinal]['length'])).astype(np.int32)

  def close(self) -> None:
    for f in self._files.values():
      f.close()
    self._files.clear()
