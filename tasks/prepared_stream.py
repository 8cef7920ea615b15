"""Document streaming from a prepared split: per-host reads, restore by seeking.

`PreparedStreamIterator` yields the same batches as `tasks.streaming.DocumentStreamIterator`
(same keys, dtypes and chunk layout; without shuffling, the very same batches on one host) but
reads a split written by `python -m tasks.prepare` (`tasks.prepared`).

The schedule is global. Epoch e reads the split's documents in one order, a deterministic function
of `(seed, e)` (a full permutation when shuffling; the prepared order otherwise). The global batch
has `G = batch_size * num_shards` rows; when a row's document ends, the row takes the next document
of that order at the next step (rows in increasing order). Document lengths are in the index, so
every host computes the whole schedule without reading tokens, and host `h` reads only the chunks
of its rows `[h * batch_size, (h + 1) * batch_size)`: L + 1 tokens per row and step. The chunks
of the next `lookahead_steps` steps are requested ahead (`tasks.prepared.ReadAhead`: per row, its
document in large sequential ranged requests), so the reads overlap the steps. Consequences:

- every document is read exactly once per epoch, by one row of one host; a finite stream
  (`repeat=False`, evaluation) emits every chunk once, and all hosts run the same number of steps
  (a host whose rows have no document left yields padded rows until every row is done);
- the state (`get_state`) is per global row: (epoch, position in the epoch's order, document
  ordinal, next chunk), plus the epoch and position of the next document to hand out. Restoring
  checks it against the index and seeks: its cost does not depend on the position (computing the
  epoch's permutation, O(documents), is the largest part) and it reads nothing before it;
- resuming on another number of hosts with the same global batch continues exactly (the global
  batches are identical); a different global batch size is refused with an error, since the saved
  position is per global row.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from clu.data import dataset_iterator

from tasks import prepared as prepared_lib
from tasks import streaming
from tasks.preprocessors import START_OF_DOCUMENT_ID

STATE_VERSION = 1
STATE_KIND = 'prepared'
# Steps planned ahead (their chunks requested) at most: with 4-8 rows of 4096 tokens, 256 steps
# are 8-16 MiB, enough to hide GCS's ~50 ms per request at thousands of steps per second.
DEFAULT_LOOKAHEAD_STEPS = 256


class _Position:
  """A position in the global schedule.

  rows: per global row, None or `[epoch, position in the epoch's order, ordinal, next chunk]`;
  epoch / next_position: of the next document to hand out; exhausted: a finite stream's end;
  step: batches produced.
  """

  def __init__(self, global_rows: int):
    self.rows: list[list[int] | None] = [None] * global_rows
    self.epoch = 0
    self.next_position = 0
    self.exhausted = False
    self.step = 0

  def copy(self) -> _Position:
    other = _Position(0)
    other.rows = [None if row is None else list(row) for row in self.rows]
    other.epoch, other.next_position = self.epoch, self.next_position
    other.exhausted, other.step = self.exhausted, self.step
    return other


class PreparedStreamIterator(streaming.ChunkStream):
  """Per-row document streaming over a prepared split, with a global, seekable schedule.

  Args:
    split: a `tasks.prepared.PreparedSplit` or the path of a prepared split.
    batch_size: rows per batch on this host (the global batch is `batch_size * num_shards`).
    chunk_length: tokens per chunk.
    seed: seed of the document order (one permutation per epoch when shuffling).
    shuffle: shuffle documents (training); False reads them in prepared order (evaluation).
    shard_id: this host.
    num_shards: number of hosts.
    repeat: True: endless epochs (training); False: one pass, padded rows at the end (eval).
    start_id: input token of a document's first position (as in `tasks.preprocessors`).
    name: name of the source for messages and the state (e.g. the task name).
    lookahead_steps: steps whose chunks are requested ahead of the current one (at most).
    block_bytes: bytes per request of a row's document (`tasks.prepared.ReadAhead`).
    max_buffer_bytes: requested but unread bytes above which no further step is planned.
  """

  # The schedule (and so the state and the document check) is the same on every host.
  GLOBAL_SCHEDULE = True

  def __init__(
    self,
    split: prepared_lib.PreparedSplit | str,
    *,
    batch_size: int,
    chunk_length: int,
    seed: int = 0,
    shuffle: bool = True,
    shard_id: int = 0,
    num_shards: int = 1,
    repeat: bool = True,
    start_id: int = START_OF_DOCUMENT_ID,
    name: str | None = None,
    lookahead_steps: int = DEFAULT_LOOKAHEAD_STEPS,
    block_bytes: int | None = None,
    max_buffer_bytes: int | None = None,
  ):
    if batch_size < 1:
      raise ValueError(f'batch_size must be >= 1, got {batch_size}.')
    if not 0 <= shard_id < num_shards:
      raise ValueError(f'Need 0 <= shard_id < num_shards, got {shard_id} and {num_shards}.')
    if chunk_length < 1:
      raise ValueError(f'chunk_length must be >= 1, got {chunk_length}.')
    if lookahead_steps < 0:
      raise ValueError(f'lookahead_steps must be >= 0, got {lookahead_steps}.')
    if isinstance(split, prepared_lib.PreparedSplit):
      self._data = split
    else:
      self._data = prepared_lib.PreparedSplit(split)
    self._batch_size = int(batch_size)
    self._chunk_length = int(chunk_length)
    self._seed = int(seed)
    self._shuffle = bool(shuffle)
    self._shard_id = int(shard_id)
    self._num_shards = int(num_shards)
    self._repeat = bool(repeat)
    self._start_id = int(start_id)
    self._name = name or self._data.meta.get('task') or self._data.path
    self._global_rows = self._batch_size * self._num_shards
    self._first_row = self._shard_id * self._batch_size
    index = self._data.index
    self._lengths = index['length'].astype(np.int64)
    self._num_chunks = -(-self._lengths // self._chunk_length)
    self._orders: dict[int, np.ndarray] = {}
    self._lookahead_steps = int(lookahead_steps)
    self._reader = prepared_lib.ReadAhead(self._data, block_bytes, max_buffer_bytes)
    self.reset()

  # ----------------------------------------------------------------------------------------------
  # Schedule.

  @property
  def data(self) -> prepared_lib.PreparedSplit:
    return self._data

  def order(self, epoch: int) -> np.ndarray:
    """Document ordinals of an epoch in reading order (a permutation when shuffling)."""
    order = self._orders.get(epoch)
    if order is None:
      n = self._data.num_documents
      if self._shuffle:
        rng = np.random.default_rng(np.random.SeedSequence([self._seed, epoch]))
        order = rng.permutation(n)
      else:
        order = np.arange(n)
      if len(self._orders) >= 3:  # rows span at most two epochs, the read-ahead one more
        self._orders.pop(min(self._orders))
      self._orders[epoch] = order
    return order

  def check_enough_documents(self, what: str = '') -> None:
    """Raises unless the split holds at least one document per global batch row (training).

    With fewer documents than rows a document would be streamed by several rows at once (its
    next epoch's copy). Every host computes the same answer, so all of them stop at the start.
    """
    n = self._data.num_documents
    if n < self._global_rows:
      raise ValueError(
        f'Prepared split {self._data.path!r} ({self._name}) has {n} document(s) for a global '
        f'batch of {self._global_rows} rows{what}: every row streams its own document, so the '
        'split needs at least as many documents as rows. Use a smaller batch (BATCH_SIZE) or add '
        'documents.'
      )

  def _take(self, p: _Position) -> list[int] | None:
    """The next document of the schedule as a row `[epoch, position, ordinal, next_chunk]`."""
    if p.exhausted:
      return None
    n = self._data.num_documents
    if p.next_position >= n:
      if not self._repeat or n == 0:
        if self._repeat:
          raise ValueError(f'Prepared split {self._data.path!r} ({self._name}) has no documents.')
        p.exhausted = True
        return None
      p.epoch += 1
      p.next_position = 0
    position = p.next_position
    p.next_position += 1
    return [p.epoch, position, int(self.order(p.epoch)[position]), 0]

  def _fill_rows(self, p: _Position) -> bool:
    for g in range(self._global_rows):
      if p.rows[g] is None:
        p.rows[g] = self._take(p)
    return any(row is not None for row in p.rows)

  def _advance_rows(self, p: _Position) -> None:
    for g, row in enumerate(p.rows):
      if row is not None:
        row[3] += 1
        if row[3] == self._num_chunks[row[2]]:
          p.rows[g] = None
    p.step += 1

  def _chunk_span(self, row: list[int]) -> tuple[int, int]:
    """Tokens [start, stop) that `chunk_at` reads for a row's next chunk (L + 1 but for chunk 0)."""
    c, n = row[3], self._chunk_length
    return max(c * n - 1, 0), min((c + 1) * n, int(self._lengths[row[2]]))

  def skip(self, steps: int) -> int:
    """Advances the schedule by up to `steps` batches without reading tokens; returns the count."""
    self._forget_plan()
    done = 0
    while done < steps and self._fill_rows(self._pos):
      self._advance_rows(self._pos)
      done += 1
    return done

  # ----------------------------------------------------------------------------------------------
  # Read-ahead.

  def _forget_plan(self) -> None:
    """Drops the planned steps and their requests (the position jumped)."""
    self._reader.clear()
    self._ahead: _Position | None = None
    self._planned = 0

  def _plan(self) -> None:
    """Requests the chunks of this host's rows for the next `lookahead_steps` steps.

    A copy of the position walks the schedule ahead of the stream (the schedule needs no tokens);
    planning stops early when the read-ahead buffer is full. Called with the current step's rows
    filled; `_planned` counts the planned steps from the current one on.
    """
    if self._ahead is None:
      self._ahead, self._planned = self._pos.copy(), 0
    while self._planned <= self._lookahead_steps and not self._reader.full():
      if not self._fill_rows(self._ahead):
        break
      for r in range(self._batch_size):
        row = self._ahead.rows[self._first_row + r]
        if row is not None:
          self._reader.want((row[0], row[1]), row[2], *self._chunk_span(row))
      self._advance_rows(self._ahead)
      self._planned += 1

  # ----------------------------------------------------------------------------------------------
  # DatasetIterator interface.

  def reset(self) -> None:
    """Goes back to the beginning of the stream."""
    self._pos = _Position(self._global_rows)
    self._forget_plan()

  def __next__(self) -> dict[str, np.ndarray]:
    if not self._fill_rows(self._pos):
      raise StopIteration
    self._plan()
    b, n = self._batch_size, self._chunk_length
    batch = streaming.padding_batch(b, n)
    index = self._data.index
    for r in range(b):
      row = self._pos.rows[self._first_row + r]
      if row is None:
        continue
      ordinal, c = row[2], row[3]
      length = int(self._lengths[ordinal])
      key = (row[0], row[1])
      targets, inputs = prepared_lib.chunk_at(
        lambda lo, hi, o=ordinal, k=key: self._reader.read(k, o, lo, hi),
        length,
        c,
        n,
        self._start_id,
      )
      streaming.put_row(
        batch,
        r,
        inputs=inputs,
        targets=targets,
        weights=np.arange(n) < length - c * n,  # real tokens, marked by position
        document_id=index[ordinal]['document_id'],
        chunk_index=c,
      )
    self._advance_rows(self._pos)
    if self._planned:
      self._planned -= 1
    else:  # nothing was planned (the buffer was full): the copy is behind, start it afresh
      self._ahead = None
    return batch

  @property
  def reader(self) -> prepared_lib.ReadAhead:
    """The read-ahead (its `bytes_used`; the split counts requests and bytes fetched)."""
    return self._reader

  # ----------------------------------------------------------------------------------------------
  # State.

  def _settings(self) -> dict[str, Any]:
    return {
      'data_fingerprint': self._data.fingerprint,
      'num_documents': self._data.num_documents,
      'global_batch_size': self._global_rows,
      'chunk_length': self._chunk_length,
      'seed': self._seed,
      'shuffle': self._shuffle,
      'repeat': self._repeat,
      'start_id': self._start_id,
    }

  def get_state(self) -> dict[str, Any]:
    """The position as a JSON-able dict (identical on every host)."""
    rows = []
    index = self._data.index
    for row in self._pos.rows:
      if row is None:
        rows.append(None)
        continue
      rec = index[row[2]]
      rows.append(
        {
          'epoch': row[0],
          'position': row[1],
          'ordinal': row[2],
          'next_chunk': row[3],
          'document_id': int(rec['document_id']),
          'checksum': int(rec['checksum']),
        }
      )
    return {
      'version': STATE_VERSION,
      'kind': STATE_KIND,
      'source': self._name,
      'settings': self._settings(),
      'topology': {'num_shards': self._num_shards, 'batch_size': self._batch_size},
      'step': self._pos.step,
      'epoch': self._pos.epoch,
      'next_position': self._pos.next_position,
      'exhausted': self._pos.exhausted,
      'rows': rows,
    }

  def set_state(self, state: Mapping[str, Any]) -> None:
    """Restores a position saved by `get_state` (by seeking; nothing before it is read)."""
    if state.get('kind') != STATE_KIND:
      raise ValueError(
        'This iterator state was written by the on-the-fly stream (tasks.streaming), whose '
        'document order differs from the prepared stream: resume with the setting that saved it '
        '(tasks.PreparedDataConfig.root unset), or start the data position afresh.'
      )
    if state.get('version') != STATE_VERSION:
      raise ValueError(f'Unsupported prepared-stream state version {state.get("version")!r}.')
    saved, current = dict(state['settings']), self._settings()
    if saved['global_batch_size'] != current['global_batch_size']:
      topo = state.get('topology', {})
      raise ValueError(
        f'The data position was saved with a global batch of {saved["global_batch_size"]} rows '
        f'({topo.get("num_shards")} host(s) x {topo.get("batch_size")}); the global batch is now '
        f'{current["global_batch_size"]} ({self._num_shards} x {self._batch_size}). The position '
        'is kept per global row: resume with the same global batch size (any number of hosts '
        'that divides it continues exactly).'
      )
    if saved != current:
      diff = {k: (saved.get(k), current.get(k)) for k in current if saved.get(k) != current.get(k)}
      raise ValueError(
        f'Iterator state was saved with other settings or data (saved, current): {diff}. Restore '
        'with the settings and the prepared split of the run that saved it.'
      )
    index = self._data.index
    rows: list[list[int] | None] = []
    for g, row in enumerate(state['rows']):
      if row is None:
        rows.append(None)
        continue
      epoch, position, ordinal = int(row['epoch']), int(row['position']), int(row['ordinal'])
      chunk = int(row['next_chunk'])
      ok = 0 <= ordinal < self._data.num_documents and 0 <= position < self._data.num_documents
      ok = ok and int(self.order(epoch)[position]) == ordinal
      ok = ok and (int(index[ordinal]['document_id']), int(index[ordinal]['checksum'])) == (
        int(row['document_id']),
        int(row['checksum']),
      )
      if not ok or not 0 <= chunk < self._num_chunks[ordinal]:
        raise ValueError(
          f'Row {g}: the saved document (epoch {epoch}, position {position}, ordinal {ordinal}, id '
          f'{row["document_id"]}, chunk {chunk}) does not match the prepared split: the data '
          'changed since the state was saved.'
        )
      rows.append([epoch, position, ordinal, chunk])
    pos = _Position(self._global_rows)
    pos.rows = rows
    pos.epoch = int(state['epoch'])
    pos.next_position = int(state['next_position'])
    pos.exhausted = bool(state['exhausted'])
    pos.step = int(state['step'])
    self._pos = pos
    self._forget_plan()


def make_task_stream(
  task_name: str,
  *,
  split: str,
  batch_size: int,
  chunk_length: int,
  seed: int = 0,
  shuffle: bool = True,
  shard_id: int = 0,
  num_shards: int = 1,
  repeat: bool = True,
) -> dataset_iterator.DatasetIterator:
  """A task's document stream: prepared if `tasks.PreparedDataConfig.root` is set, else on the fly.

  Same arguments as `tasks.streaming.DocumentStreamIterator` (batch_size: rows on this host). The
  on-the-fly stream (every host reads and tokenizes the whole split, restore replays) is meant for
  small local tasks; set the root for PG-19 / C4 scale.
  """
  from tasks import config as config_lib  # pylint: disable=g-import-not-at-top

  root = config_lib.PreparedDataConfig().root
  if root:
    import tasks  # pylint: disable=g-import-not-at-top
    from tasks import prepare  # pylint: disable=g-import-not-at-top
    from tasks import vocab as vocab_lib  # pylint: disable=g-import-not-at-top

    return PreparedStreamIterator(
      prepare.open_for_task(root, task_name, split),
      batch_size=batch_size,
      chunk_length=chunk_length,
      seed=seed,
      shuffle=shuffle,
      shard_id=shard_id,
      num_shards=num_shards,
      repeat=repeat,
      name=task_name,
      start_id=vocab_lib.start_of_document_id(tasks.vocabulary(task_name)),
    )
  return streaming.DocumentStreamIterator(
    task_name,
    split=split,
    batch_size=batch_size,
    chunk_length=chunk_length,
    seed=seed,
    shuffle=shuffle,
    shard_id=shard_id,
    num_shards=num_shards,
    repeat=repeat,
  )
