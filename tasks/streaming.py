"""Document streaming: batch row i reads one document's chunks in order on consecutive steps.

`DocumentStreamIterator` turns a stream of per-chunk examples (a seqio task of this package, or
any re-iterable source of chunk dicts laid out as in `tasks.preprocessors`) into numpy batches:

  decoder_input_tokens   int32   [B, L]  the chunk's `inputs` (shifted by one token)
  decoder_target_tokens  int32   [B, L]  the chunk's `targets`
  decoder_loss_weights   float32 [B, L]  1.0 exactly on real target tokens (targets != 0)
  start_of_sequence      bool    [B]     True on a document's first chunk (and on padded rows)
  document_id            int64   [B]     -1 on padded rows
  chunk_index            int32   [B]     -1 on padded rows
  row_valid              bool    [B]     False on padded rows (finite streams only)

When a row's document ends, the row takes the next document of the stream at the next step.
Shuffling is over documents (the source's file order with a per-epoch seed, then a buffer of
whole documents), never over chunks; everything is deterministic given `seed`. With
`repeat=False` (evaluation) the stream is finite: every chunk of every document is emitted exactly
once, rows without a document left are padded with `row_valid=False`, and iteration stops when no
row has data. Documents are sharded over `num_shards` hosts.

The position is explicit, JSON-able state (`get_state`/`set_state`, `save`/`restore` for T5X's
dataset checkpoints): the epoch, how many documents were taken from the stream, and for each row
which document (epoch and position in the stream) and which chunk comes next. Restoring re-reads
the document stream of the needed epochs up to the saved position (a document-level replay that
re-tokenizes those documents) and holds only the rows' documents and the shuffle buffer.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import json
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import numpy as np
from clu.data import dataset_iterator
from etils import epath

STATE_VERSION = 1
BATCH_KEYS = (
  'decoder_input_tokens',
  'decoder_target_tokens',
  'decoder_loss_weights',
  'start_of_sequence',
  'document_id',
  'chunk_index',
  'row_valid',
)


@dataclasses.dataclass
class Document:
  """One document's chunks. targets/inputs/weights: [C, L] int32 (weights 1 on real tokens)."""

  document_id: int
  targets: np.ndarray
  inputs: np.ndarray
  weights: np.ndarray
  epoch: int = -1
  ordinal: int = -1

  @property
  def num_chunks(self) -> int:
    return self.targets.shape[0]

  @property
  def checksum(self) -> int:
    """CRC32 of the document's target tokens (detects data that changed under a saved state)."""
    return zlib.crc32(np.ascontiguousarray(self.targets).tobytes())


@dataclasses.dataclass
class _Row:
  document: Document
  next_chunk: int


ChunkSource = Iterable[Mapping[str, Any]] | Callable[[], Iterable[Mapping[str, Any]]]


def group_chunks(chunks: Iterable[Mapping[str, Any]], chunk_length: int) -> Iterator[Document]:
  """Groups a stream of per-chunk examples (consecutive per document) into documents."""
  current_id = None
  targets: list[np.ndarray] = []
  inputs: list[np.ndarray] = []
  weights: list[np.ndarray] = []

  def flush():
    return Document(int(current_id), np.stack(targets), np.stack(inputs), np.stack(weights))

  for ex in chunks:
    index = int(ex['chunk_index'])
    doc_id = int(ex['document_id'])
    t = np.asarray(ex['targets'], np.int32)
    i = np.asarray(ex['inputs'], np.int32)
    # The chunker (tasks.preprocessors) marks real tokens; hand-built chunk streams without the
    # mark must not use id 0 for a real token.
    w = np.asarray(ex['loss_weights'], np.int32) if 'loss_weights' in ex else (t != 0)
    if t.shape != (chunk_length,) or i.shape != (chunk_length,):
      raise ValueError(
        f'Chunk of document {doc_id} has targets {t.shape} / inputs {i.shape}, expected '
        f'({chunk_length},): the chunk length of the source and of the iterator differ.'
      )
    if index == 0:
      if current_id is not None:
        yield flush()
      current_id, targets, inputs, weights = doc_id, [], [], []
    elif current_id is None or doc_id != current_id or index != len(targets):
      raise ValueError(
        f'Chunk {index} of document {doc_id} does not follow chunk {len(targets) - 1} of document '
        f'{current_id}: the chunks of a document must be consecutive and in order (do not shuffle '
        'the chunk stream; the iterator shuffles documents).'
      )
    targets.append(t)
    inputs.append(i)
    weights.append(w.astype(np.int32))
  if current_id is not None:
    yield flush()


def buffer_shuffle(
  items: Iterable[Any], buffer_size: int, rng: np.random.Generator
) -> Iterator[Any]:
  """Deterministic buffer shuffle (like tf.data's): yields a random buffered item per input."""
  buf: list[Any] = []
  for item in items:
    if len(buf) < buffer_size:
      buf.append(item)
      continue
    j = int(rng.integers(len(buf)))
    out, buf[j] = buf[j], item
    yield out
  while buf:
    j = int(rng.integers(len(buf)))
    buf[j], buf[-1] = buf[-1], buf[j]
    yield buf.pop()


def _epoch_seed(seed: int, epoch: int) -> int:
  """Seed of an epoch's file order; equal on every shard (seqio shards after reading)."""
  return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def check_token_ids(
  inputs: np.ndarray, targets: np.ndarray, vocab_size: int | None, document_ids: np.ndarray
) -> None:
  """Raises if a batch holds an id outside [0, vocab_size) (checked on the host, before the model).

  The embedding lookup on an accelerator cannot raise; an out-of-range id would silently read
  garbage (or wrap, with a modulo), so the stream stops instead.
  """
  if vocab_size is None or not inputs.size:
    return
  lo, hi = min(inputs.min(), targets.min()), max(inputs.max(), targets.max())
  if lo < 0 or hi >= vocab_size:
    bad = np.nonzero(
      ((inputs < 0) | (inputs >= vocab_size)).any(-1)
      | ((targets < 0) | (targets >= vocab_size)).any(-1)
    )[0]
    raise ValueError(
      f'token ids in [{lo}, {hi}] are outside the vocabulary [0, {vocab_size}) (documents '
      f'{sorted(set(document_ids[bad].tolist()))}): the data was tokenized with another '
      "vocabulary; re-tokenize it (or re-run tasks.prepare) with the task's vocabulary."
    )


def padding_batch(batch_size: int, chunk_length: int) -> dict[str, np.ndarray]:
  """A batch `[batch_size, chunk_length]` of padding rows, to be filled row by row by a stream."""
  b, n = batch_size, chunk_length
  return {
    'decoder_input_tokens': np.zeros((b, n), np.int32),
    'decoder_target_tokens': np.zeros((b, n), np.int32),
    'decoder_loss_weights': np.zeros((b, n), np.float32),
    'start_of_sequence': np.ones((b,), np.bool_),
    'document_id': np.full((b,), -1, np.int64),
    'chunk_index': np.full((b,), -1, np.int32),
    'row_valid': np.zeros((b,), np.bool_),
  }


def put_row(
  batch: dict[str, np.ndarray],
  row: int,
  *,
  inputs: np.ndarray,
  targets: np.ndarray,
  weights: np.ndarray,
  document_id: int,
  chunk_index: int,
) -> None:
  """Writes chunk `chunk_index` of a document (inputs, targets, weights: [L]) into a batch row."""
  batch['decoder_input_tokens'][row] = inputs
  batch['decoder_target_tokens'][row] = targets
  batch['decoder_loss_weights'][row] = weights
  batch['start_of_sequence'][row] = chunk_index == 0
  batch['document_id'][row] = document_id
  batch['chunk_index'][row] = chunk_index
  batch['row_valid'][row] = True


class ChunkStream(dataset_iterator.DatasetIterator):
  """What every per-row document stream shares: the batch layout and JSON state files.

  Subclasses set `_batch_size` and `_chunk_length` and implement `__next__`, `get_state` and
  `set_state`; T5X checkpoints the stream through `save` / `restore`.
  """

  _batch_size: int
  _chunk_length: int

  @property
  def batch_size(self) -> int:
    return self._batch_size

  @property
  def chunk_length(self) -> int:
    return self._chunk_length

  @property
  def element_spec(self) -> dict[str, dataset_iterator.ArraySpec]:
    batch = padding_batch(self._batch_size, self._chunk_length)
    return {k: dataset_iterator.ArraySpec(v.dtype.type, v.shape) for k, v in batch.items()}

  def get_next(self) -> dict[str, np.ndarray]:
    return next(self)

  def save(self, filename: epath.PathLike) -> None:
    """Writes the state as JSON (T5X calls this when it checkpoints the dataset)."""
    epath.Path(filename).write_text(json.dumps(self.get_state()))

  def restore(self, filename: epath.PathLike) -> None:
    """Reads a state written by `save`."""
    path = epath.Path(filename)
    if not path.exists():
      raise FileNotFoundError(f'No iterator state at {filename}.')
    self.set_state(json.loads(path.read_text()))


class DocumentStreamIterator(ChunkStream):
  """Per-row document streaming over chunked documents, with restorable position.

  Args:
    source: a seqio task name or `seqio.Task` producing chunk examples (e.g. 'local_books'), a
      `tf.data.Dataset` of chunk dicts, a sequence of chunk dicts, or a zero-argument callable
      returning a fresh iterable of chunk dicts. Chunk dicts hold `targets`, `inputs` ([L]),
      `document_id` and `chunk_index`; a document's chunks are consecutive and in order.
    split: split of a seqio task.
    batch_size: rows per batch (per host).
    chunk_length: tokens per chunk; for this package's tasks, None uses the task's setting.
    seed: seed of the document order (file order per epoch and shuffle buffer).
    shuffle: shuffle documents (training); False reads them in source order (evaluation).
    shuffle_buffer_size: documents held for shuffling (memory: ~8 bytes per token per document).
    shard_id: this host's shard.
    num_shards: number of hosts; each document goes to exactly one shard.
    repeat: True: endless epochs (training); False: one pass, padded rows at the end (eval).
  """

  def __init__(
    self,
    source: Any,
    *,
    split: str = 'train',
    batch_size: int,
    chunk_length: int | None = None,
    seed: int = 0,
    shuffle: bool = True,
    shuffle_buffer_size: int = 256,
    shard_id: int = 0,
    num_shards: int = 1,
    repeat: bool = True,
  ):
    if batch_size < 1:
      raise ValueError(f'batch_size must be >= 1, got {batch_size}.')
    if not 0 <= shard_id < num_shards:
      raise ValueError(f'Need 0 <= shard_id < num_shards, got {shard_id} and {num_shards}.')
    if shuffle and shuffle_buffer_size < 1:
      raise ValueError(f'shuffle_buffer_size must be >= 1, got {shuffle_buffer_size}.')
    self._split = split
    self._batch_size = batch_size
    self._seed = seed
    self._shuffle = shuffle
    self._shuffle_buffer_size = shuffle_buffer_size
    self._shard_id = shard_id
    self._num_shards = num_shards
    self._repeat = repeat
    self._task, self._chunk_source, self._source_name = self._resolve_source(source)
    self._vocab_size = None
    if self._task is not None and 'targets' in self._task.output_features:
      self._vocab_size = self._task.output_features['targets'].vocabulary.vocab_size
    self._chunk_length = self._resolve_chunk_length(chunk_length)
    self.reset()

  # ----------------------------------------------------------------------------------------------
  # Source handling.

  @staticmethod
  def _resolve_source(source: Any):
    import seqio  # pylint: disable=g-import-not-at-top

    if isinstance(source, str):
      import tasks  # noqa: F401  # pylint: disable=g-import-not-at-top,unused-import

      return seqio.get_mixture_or_task(source), None, source
    if isinstance(source, seqio.Task):
      return source, None, source.name
    try:
      import tensorflow as tf  # pylint: disable=g-import-not-at-top

      if isinstance(source, tf.data.Dataset):
        return None, source.as_numpy_iterator, 'tf.data.Dataset'
    except ImportError:  # pragma: no cover
      pass
    if callable(source):
      return None, source, getattr(source, '__name__', 'callable')
    if isinstance(source, collections.abc.Iterator):
      raise ValueError(
        'source is a one-shot iterator: it cannot be re-read for a new epoch or a restore. Pass a '
        'sequence, a tf.data.Dataset or a callable returning a fresh iterable.'
      )
    if isinstance(source, collections.abc.Iterable):
      return None, lambda: iter(source), type(source).__name__
    raise TypeError(f'Unsupported source {source!r}.')

  def _resolve_chunk_length(self, chunk_length: int | None) -> int:
    if chunk_length is None and self._task is not None:
      from tasks import config as config_lib  # pylint: disable=g-import-not-at-top

      if self._task.name in config_lib.CONFIG_CLASSES:
        chunk_length = config_lib.get_config(self._task.name).chunk_length
    if chunk_length is None:
      raise ValueError('chunk_length is required for this source.')
    if chunk_length < 1:
      raise ValueError(f'chunk_length must be >= 1, got {chunk_length}.')
    return int(chunk_length)

  def _source_documents(self, epoch: int) -> Iterator[Document]:
    """This shard's documents of one epoch in source (file-shuffled) order."""
    if self._task is not None:
      import seqio  # pylint: disable=g-import-not-at-top

      shard_info = (
        seqio.ShardInfo(self._shard_id, self._num_shards) if self._num_shards > 1 else None
      )
      # shuffle=True makes seqio shuffle the source files with the epoch's seed; its example
      # shuffle runs on chunks, so its buffer is 1 (a no-op): documents are shuffled below.
      ds = self._task.get_dataset(
        sequence_length={'targets': self._chunk_length},
        split=self._split,
        use_cached=False,
        shuffle=self._shuffle,
        shuffle_buffer_size=1 if self._shuffle else None,
        seed=_epoch_seed(self._seed, epoch) if self._shuffle else None,
        shard_info=shard_info,
        num_epochs=1,
      )
      yield from group_chunks(ds.as_numpy_iterator(), self._chunk_length)
      return
    docs = group_chunks(self._chunk_source(), self._chunk_length)
    for k, doc in enumerate(docs):
      if k % self._num_shards == self._shard_id:
        yield doc

  def _epoch_stream(self, epoch: int) -> Iterator[Document]:
    """The epoch's documents in final order, each tagged with (epoch, ordinal)."""
    docs = self._source_documents(epoch)
    if self._shuffle:
      rng = np.random.default_rng([self._seed, epoch, self._shard_id])
      docs = buffer_shuffle(docs, self._shuffle_buffer_size, rng)
    for ordinal, doc in enumerate(docs):
      doc.epoch, doc.ordinal = epoch, ordinal
      yield doc

  def _take_document(self) -> Document | None:
    """The next document of the stream (None when a finite stream is exhausted)."""
    while not self._exhausted:
      if self._stream is None:
        self._stream = self._epoch_stream(self._epoch)
      doc = next(self._stream, None)
      if doc is not None:
        self._next_ordinal += 1
        return doc
      if self._next_ordinal == 0 and self._repeat:
        raise ValueError(
          f'Source {self._source_name!r} (split {self._split!r}, shard {self._shard_id} of '
          f'{self._num_shards}) has no documents.'
        )
      self._stream = None
      if not self._repeat:
        self._exhausted = True
      else:
        self._epoch += 1
        self._next_ordinal = 0
    return None

  def check_enough_documents(self, what: str = '') -> None:
    """Raises unless this shard's split holds at least one document per batch row (training).

    Each row streams its own document; with fewer documents than rows the same document would
    be in several rows at once (a later epoch's copy), and a shard without documents would stop
    on its first batch while other hosts wait for it. Reads at most `batch_size` documents.
    """
    count = 0
    for _ in self._source_documents(0):
      count += 1
      if count >= self._batch_size:
        return
    raise ValueError(
      f'Source {self._source_name!r} (split {self._split!r}) has {count} document(s) in shard '
      f'{self._shard_id} of {self._num_shards}{what}, which streams {self._batch_size} batch '
      'rows: every row streams its own document, so each shard needs at least as many documents '
      'as rows. Use a smaller batch (BATCH_SIZE) or fewer hosts / stream shards, or add documents.'
    )

  # ----------------------------------------------------------------------------------------------
  # DatasetIterator interface.

  def reset(self) -> None:
    """Goes back to the beginning of the stream."""
    self._epoch = 0
    self._next_ordinal = 0
    self._exhausted = False
    self._stream: Iterator[Document] | None = None
    self._rows: list[_Row | None] = [None] * self._batch_size
    self._step = 0

  def __next__(self) -> dict[str, np.ndarray]:
    b = self._batch_size
    batch = padding_batch(b, self._chunk_length)
    for r in range(b):
      if self._rows[r] is None:
        doc = self._take_document()
        self._rows[r] = _Row(doc, 0) if doc is not None else None
    if not any(row is not None for row in self._rows):
      raise StopIteration
    for r, row in enumerate(self._rows):
      if row is None:
        continue
      c, doc = row.next_chunk, row.document
      put_row(
        batch,
        r,
        inputs=doc.inputs[c],
        targets=doc.targets[c],
        weights=doc.weights[c],
        document_id=doc.document_id,
        chunk_index=c,
      )
      row.next_chunk += 1
      if row.next_chunk == row.document.num_chunks:
        self._rows[r] = None
    self._step += 1
    check_token_ids(
      batch['decoder_input_tokens'],
      batch['decoder_target_tokens'],
      self._vocab_size,
      batch['document_id'],
    )
    return batch

  # ----------------------------------------------------------------------------------------------
  # State.

  def _settings(self) -> dict[str, Any]:
    return {
      'source': self._source_name,
      'split': self._split,
      'batch_size': self._batch_size,
      'chunk_length': self._chunk_length,
      'seed': self._seed,
      'shuffle': self._shuffle,
      'shuffle_buffer_size': self._shuffle_buffer_size if self._shuffle else None,
      'shard_id': self._shard_id,
      'num_shards': self._num_shards,
      'repeat': self._repeat,
    }

  def get_state(self) -> dict[str, Any]:
    """The position as a JSON-able dict."""
    rows = []
    for row in self._rows:
      if row is None:
        rows.append(None)
      else:
        d = row.document
        rows.append(
          {
            'epoch': d.epoch,
            'ordinal': d.ordinal,
            'document_id': d.document_id,
            'checksum': d.checksum,
            'next_chunk': row.next_chunk,
          }
        )
    return {
      'version': STATE_VERSION,
      'settings': self._settings(),
      'step': self._step,
      'epoch': self._epoch,
      'next_ordinal': self._next_ordinal,
      'exhausted': self._exhausted,
      'rows': rows,
    }

  def set_state(self, state: Mapping[str, Any]) -> None:
    """Restores a position saved by `get_state` (re-reads the stream up to it)."""
    if state.get('version') != STATE_VERSION:
      raise ValueError(f'Unsupported iterator state version {state.get("version")!r}.')
    saved, current = dict(state['settings']), self._settings()
    if saved != current:
      diff = {k: (saved.get(k), current.get(k)) for k in current if saved.get(k) != current.get(k)}
      raise ValueError(
        f'Iterator state was saved with other settings (saved, current): {diff}. Restore with '
        'the settings of the run that saved it.'
      )
    if len(state['rows']) != self._batch_size:
      raise ValueError(f'State has {len(state["rows"])} rows, batch_size is {self._batch_size}.')
    self.reset()
    epoch, next_ordinal = int(state['epoch']), int(state['next_ordinal'])
    wanted: dict[int, dict[int, list[int]]] = {}
    for r, row in enumerate(state['rows']):
      if row is not None:
        wanted.setdefault(int(row['epoch']), {}).setdefault(int(row['ordinal']), []).append(r)
    rows: list[_Row | None] = [None] * self._batch_size
    live = None
    for e in sorted(set(wanted) | {epoch}):
      need = wanted.get(e, {})
      stop = next_ordinal if e == epoch else max(need) + 1
      stream = self._epoch_stream(e)
      seen = 0
      while seen < stop:
        doc = next(stream, None)
        if doc is None:
          break
        seen += 1
        for r in need.get(doc.ordinal, []):
          saved_row = state['rows'][r]
          if (doc.document_id, doc.checksum) != (
            int(saved_row['document_id']),
            int(saved_row['checksum']),
          ):
            raise ValueError(
              f'Row {r}: document {doc.ordinal} of epoch {e} is now {doc.document_id} (checksum '
              f'{doc.checksum}), the saved state has {saved_row["document_id"]} (checksum '
              f'{saved_row["checksum"]}): the data changed since the state was saved.'
            )
          rows[r] = _Row(doc, int(saved_row['next_chunk']))
      missing = [r for rs in need.values() for r in rs if rows[r] is None]
      if missing or seen < stop and not (e == epoch and state['exhausted']):
        raise ValueError(
          f'Epoch {e} has fewer documents than the saved state needs (rows {missing}): the data '
          'changed since the state was saved.'
        )
      if e == epoch:
        live = stream
    self._rows = rows
    self._epoch = epoch
    self._next_ordinal = next_ordinal
    self._exhausted = bool(state['exhausted'])
    self._stream = None if self._exhausted else live
    self._step = int(state['step'])
