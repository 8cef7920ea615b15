"""Tests of the document-streaming batcher `tasks.streaming.DocumentStreamIterator`."""

from __future__ import annotations

import collections
import json

import numpy as np
import pytest
import seqio
import tensorflow as tf
from stream_batches import assert_batches_equal

import tasks
from tasks import sources
from tasks.streaming import DocumentStreamIterator

L = 8  # chunk length of the synthetic documents


def make_docs(num_docs: int, seed: int = 0, max_chunks: int = 5) -> dict[int, list[int]]:
  """Synthetic tokenized documents: id -> tokens (ids 3..99, lengths from 1 to max_chunks*L)."""
  rng = np.random.default_rng(seed)
  return {
    1000 + k: [int(x) for x in rng.integers(3, 100, size=int(rng.integers(1, max_chunks * L + 1)))]
    for k in range(num_docs)
  }


def chunk_dicts(docs: dict[int, list[int]]) -> list[dict[str, np.ndarray]]:
  ds = tf.data.Dataset.from_generator(
    lambda: (
      {'targets': np.asarray(t, np.int32), 'document_id': np.int64(d)} for d, t in docs.items()
    ),
    output_signature={
      'targets': tf.TensorSpec([None], tf.int32),
      'document_id': tf.TensorSpec([], tf.int64),
    },
  )
  return list(tasks.chunk_documents(ds, chunk_length=L).as_numpy_iterator())


@pytest.fixture(scope='module')
def docs() -> dict[int, list[int]]:
  return make_docs(23)


@pytest.fixture(scope='module')
def chunks(docs) -> list[dict[str, np.ndarray]]:
  return chunk_dicts(docs)


def take(it, n: int) -> list[dict[str, np.ndarray]]:
  return [next(it) for _ in range(n)]


def row_streams(batches, batch_size: int) -> list[list[tuple[int, int, bool, np.ndarray]]]:
  """Per row: the (document_id, chunk_index, start_of_sequence, targets) of valid steps."""
  rows = [[] for _ in range(batch_size)]
  for b in batches:
    for r in range(batch_size):
      if b['row_valid'][r]:
        rows[r].append(
          (
            int(b['document_id'][r]),
            int(b['chunk_index'][r]),
            bool(b['start_of_sequence'][r]),
            b['decoder_target_tokens'][r],
          )
        )
  return rows


def split_documents(stream):
  """Splits a row's stream into documents at chunk 0, checking the in-order invariant."""
  out = []
  for doc_id, index, sos, targets in stream:
    assert sos == (index == 0)
    if index == 0:
      out.append((doc_id, [targets]))
    else:
      assert out and out[-1][0] == doc_id and len(out[-1][1]) == index, 'row skipped or reordered'
      out[-1][1].append(targets)
  return out


def shard_documents(source, num_shards: int, **kwargs):
  """Per shard of a finite unshuffled stream of 2 rows: its documents (id, chunks' targets)."""
  out = []
  for shard in range(num_shards):
    it = DocumentStreamIterator(
      source,
      batch_size=2,
      shuffle=False,
      repeat=False,
      shard_id=shard,
      num_shards=num_shards,
      **kwargs,
    )
    out.append([d for stream in row_streams(list(it), 2) for d in split_documents(stream)])
  return out


# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize('batch_size', [1, 3, 5])
def test_finite_stream_emits_every_chunk_once_in_row_order(docs, chunks, batch_size):
  it = DocumentStreamIterator(
    chunks, batch_size=batch_size, chunk_length=L, shuffle=False, repeat=False
  )
  batches = list(it)
  with pytest.raises(StopIteration):
    next(it)
  seen = collections.Counter()
  for stream in row_streams(batches, batch_size):
    for doc_id, doc_chunks in split_documents(stream):
      tokens = np.concatenate(doc_chunks)
      n = len(docs[doc_id])
      np.testing.assert_array_equal(tokens[:n], docs[doc_id])  # whole document, in order
      assert not tokens[n:].any() and len(doc_chunks) == -(-n // L)
      seen[doc_id] += 1
  assert seen == {d: 1 for d in docs}  # every document once, complete
  total = sum(float(b['decoder_loss_weights'].sum()) for b in batches)
  assert total == sum(len(t) for t in docs.values())  # every token a weighted target once
  for b in batches:
    invalid = ~b['row_valid']
    assert not b['decoder_target_tokens'][invalid].any()
    assert not b['decoder_loss_weights'][invalid].any()
    assert b['start_of_sequence'][invalid].all() and (b['document_id'][invalid] == -1).all()
    np.testing.assert_array_equal(
      b['decoder_loss_weights'], (b['decoder_target_tokens'] != 0).astype(np.float32)
    )
  # Rows are only padded at the end: once a row is invalid it stays invalid.
  valid = np.stack([b['row_valid'] for b in batches])
  assert (np.diff(valid.astype(int), axis=0) <= 0).all()
  assert valid[-1].any()


def test_rows_take_next_document_when_one_ends(docs, chunks):
  it = DocumentStreamIterator(chunks, batch_size=3, chunk_length=L, shuffle=False, repeat=False)
  batches = list(it)
  order = list(docs)  # without shuffling, rows pull documents in source order
  first_steps = {}
  for t, b in enumerate(batches):
    for r in range(3):
      if b['row_valid'][r] and b['chunk_index'][r] == 0:
        first_steps[int(b['document_id'][r])] = (t, r)
  # Documents start in source order (ties within a step go to lower rows first).
  assert sorted(first_steps, key=lambda d: first_steps[d]) == order
  # The step after a row's last chunk, that row starts the next document.
  for stream in row_streams(batches, 3):
    for (d0, i0, _, _), (d1, i1, s1, _) in zip(stream, stream[1:]):
      if d1 != d0:
        assert i0 == -(-len(docs[d0]) // L) - 1 and i1 == 0 and s1


def test_element_spec_matches_batches(chunks):
  it = DocumentStreamIterator(chunks, batch_size=4, chunk_length=L, seed=1)
  b = next(it)
  for k, spec in it.element_spec.items():
    assert b[k].shape == spec.shape and b[k].dtype == np.dtype(spec.dtype), k


def test_shuffles_documents_not_chunks_and_is_deterministic(docs, chunks):
  def run(seed):
    return take(DocumentStreamIterator(chunks, batch_size=4, chunk_length=L, seed=seed), 40)

  a, b, c = run(7), run(7), run(8)
  assert_batches_equal(a, b)
  first = lambda bs: [
    int(d) for x in bs for d, i in zip(x['document_id'], x['chunk_index']) if i == 0
  ]
  assert first(a) != first(c)
  assert first(a) != list(docs)[: len(first(a))]  # not the source order
  for stream in row_streams(a, 4):  # each row still reads whole documents in order
    for doc_id, doc_chunks in split_documents(stream)[:-1]:
      np.testing.assert_array_equal(np.concatenate(doc_chunks)[: len(docs[doc_id])], docs[doc_id])


def test_repeat_covers_each_document_once_per_epoch(docs, chunks):
  it = DocumentStreamIterator(chunks, batch_size=2, chunk_length=L, seed=3, shuffle_buffer_size=5)
  starts = []
  while len(starts) < 3 * len(docs):
    b = next(it)
    starts += [int(d) for d, i in zip(b['document_id'], b['chunk_index']) if i == 0]
  for e in range(3):
    assert sorted(starts[e * len(docs) : (e + 1) * len(docs)]) == sorted(docs)
  assert starts[: len(docs)] != starts[len(docs) : 2 * len(docs)]  # reshuffled per epoch


def test_sharding_partitions_documents(docs, chunks):
  per_shard = [[d for d, _ in shard] for shard in shard_documents(chunks, 3, chunk_length=L)]
  all_docs = [d for s in per_shard for d in s]
  assert sorted(all_docs) == sorted(docs)  # disjoint and complete
  assert all(per_shard)


@pytest.mark.parametrize('cut', [0, 1, 6, 17, 40])
def test_restore_mid_epoch_continues_exactly(chunks, tmp_path, cut):
  """Save after `cut` steps, restore into a fresh iterator: the next steps are identical.

  23 documents of about 2.5 chunks on 4 rows: an epoch is about 15 steps, so cut 17 and 40 restore
  rows whose documents come from an earlier epoch than the stream position.
  """
  kwargs = dict(batch_size=4, chunk_length=L, seed=11, shuffle_buffer_size=6)
  reference = take(DocumentStreamIterator(chunks, **kwargs), cut + 25)
  it = DocumentStreamIterator(chunks, **kwargs)
  take(it, cut)
  path = tmp_path / 'train_ds-0-of-1'
  it.save(path)
  json.loads(path.read_text())  # plain JSON
  restored = DocumentStreamIterator(chunks, **kwargs)
  restored.restore(path)
  assert restored.get_state() == it.get_state()
  assert_batches_equal(take(restored, 25), reference[cut:])


def test_restore_finite_stream_midway_and_when_done(chunks):
  kwargs = dict(batch_size=3, chunk_length=L, shuffle=False, repeat=False)
  reference = list(DocumentStreamIterator(chunks, **kwargs))
  for cut in (5, len(reference) - 1, len(reference)):
    it = DocumentStreamIterator(chunks, **kwargs)
    take(it, cut)
    restored = DocumentStreamIterator(chunks, **kwargs)
    restored.set_state(json.loads(json.dumps(it.get_state())))
    assert_batches_equal(list(restored), reference[cut:])


def test_restore_errors(chunks):
  it = DocumentStreamIterator(chunks, batch_size=2, chunk_length=L, seed=1)
  take(it, 3)
  state = it.get_state()
  other = DocumentStreamIterator(chunks, batch_size=2, chunk_length=L, seed=2)
  with pytest.raises(ValueError, match='other settings.*seed'):
    other.set_state(state)
  changed_chunks = chunk_dicts(make_docs(23, seed=99))  # same ids, other tokens
  with pytest.raises(ValueError, match='data changed'):
    DocumentStreamIterator(changed_chunks, batch_size=2, chunk_length=L, seed=1).set_state(state)
  with pytest.raises(ValueError, match='one-shot iterator'):
    DocumentStreamIterator(iter(chunks), batch_size=2, chunk_length=L)
  with pytest.raises(ValueError, match='chunk length'):
    next(DocumentStreamIterator(chunks, batch_size=2, chunk_length=L + 1))


def test_rejects_shuffled_chunks(chunks):
  shuffled = [chunks[i] for i in np.random.default_rng(0).permutation(len(chunks))]
  with pytest.raises(ValueError, match='consecutive and in order'):
    list(DocumentStreamIterator(shuffled, batch_size=2, chunk_length=L, repeat=False))


# ------------------------------------------------------------------------------------------------
# On the local_books task.


def test_local_books_finite_eval_counts_every_token():
  length = 512
  task = seqio.get_mixture_or_task('local_books')
  vocab = seqio.SentencePieceVocabulary(tasks.get_config('local_books').vocabulary_path)
  expected = {}
  for doc_id, _, path in sources.local_books_split('test'):
    with open(path, encoding='utf-8') as f:
      expected[doc_id] = vocab.encode_tf(tf.constant(f.read())).numpy()
  counts = {}
  for shard in shard_documents(task, 2, split='test', chunk_length=length):
    for doc_id, doc_chunks in shard:
      tokens = np.concatenate(doc_chunks)
      np.testing.assert_array_equal(tokens[tokens != 0], expected[doc_id])
      counts[doc_id] = counts.get(doc_id, 0) + 1
  assert counts == {d: 1 for d in expected}


def test_local_books_training_restore():
  kwargs = dict(split='train', batch_size=3, chunk_length=256, seed=5, shuffle_buffer_size=8)
  reference = take(DocumentStreamIterator('local_books', **kwargs), 30)
  it = DocumentStreamIterator('local_books', **kwargs)
  take(it, 12)
  restored = DocumentStreamIterator('local_books', **kwargs)
  restored.set_state(it.get_state())
  assert_batches_equal(take(restored, 18), reference[12:])
  # The task's inputs are the targets shifted by one, also across chunks of a row.
  for prev, cur in zip(reference, reference[1:]):
    same = ~cur['start_of_sequence']
    np.testing.assert_array_equal(
      cur['decoder_input_tokens'][same, 0], prev['decoder_target_tokens'][same, -1]
    )
  first = reference[0]
  assert (first['decoder_input_tokens'][:, 0] == tasks.START_OF_DOCUMENT_ID).all()
