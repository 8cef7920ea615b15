"""Prepared splits (`tasks.prepare`, `tasks.prepared`, `tasks.prepared_stream`)."""

from __future__ import annotations

import collections
import dataclasses
import json
import os

import gin
import numpy as np
import pytest
from stream_batches import DatasetConfig, assert_batches_equal

import tasks
from tasks import prepare, prepared
from tasks.prepared_stream import PreparedStreamIterator
from tasks.streaming import DocumentStreamIterator


@pytest.fixture(scope='module')
def books_root(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('prepared'))
  prepare.prepare('local_books', 'validation', root)
  return root


@pytest.mark.parametrize('chunk_length', [300, 4096])
def test_prepared_equals_on_the_fly_local_books(books_root, chunk_length):
  """The same batches from `python -m tasks.prepare` output as from the seqio task on the fly."""
  data = prepare.open_for_task(books_root, 'local_books', 'validation')
  assert data.meta['num_tokens'] == 138525 and data.num_documents == 3
  kw = dict(split='validation', batch_size=2, chunk_length=chunk_length, shuffle=False)
  # Evaluation: one finite pass.
  fly = list(DocumentStreamIterator('local_books', repeat=False, **kw))
  kw.pop('split')
  ours = list(PreparedStreamIterator(data, repeat=False, **kw))
  assert_batches_equal(fly, ours)
  assert sum(float(b['decoder_loss_weights'].sum()) for b in ours) == 138525
  # Training without shuffling, across epoch boundaries.
  steps = 2 * len(fly) + 5
  fly_it = DocumentStreamIterator('local_books', split='validation', repeat=True, **kw)
  ours_it = PreparedStreamIterator(data, repeat=True, **kw)
  assert_batches_equal([next(fly_it) for _ in range(steps)], [next(ours_it) for _ in range(steps)])


def test_t5x_data_reads_prepared_split_when_root_is_set(books_root):
  from melodi_t5x import t5x_data

  cfg = DatasetConfig(split='validation', shuffle=False)
  fly = list(t5x_data.get_eval_datasets(cfg, 0, 1)['local_books'])
  gin.parse_config(f"tasks.PreparedDataConfig.root = '{books_root}'")
  try:
    stream = t5x_data.make_stream(cfg, 0, 1, finite=True)
    assert isinstance(stream, PreparedStreamIterator)
    ours = list(t5x_data.get_eval_datasets(cfg, 0, 1)['local_books'])
    with pytest.raises(FileNotFoundError, match='python -m tasks.prepare --task=local_books'):
      t5x_data.make_stream(dataclasses.replace(cfg, split='test'), 0, 1, finite=True)
  finally:
    gin.clear_config()
  assert len(fly) == len(ours)
  for x, y in zip(fly, ours):
    assert set(x) == set(y)
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


# -- synthetic prepared splits ------------------------------------------------------------------

L = 8


def write_synthetic(path, num_docs=30, max_chunks=5, seed=0, shard_tokens=40):
  rng = np.random.default_rng(seed)
  docs = [
    (500 + k, rng.integers(3, 100, size=int(rng.integers(1, max_chunks * L + 1))))
    for k in range(num_docs)
  ]
  prepared.write_split(str(path), docs, vocab_size=100, shard_tokens=shard_tokens)
  return {d: t for d, t in docs}


def row_documents(batches, rows):
  """Per row, the documents it read, as {document_id: concatenated targets}, in order."""
  out = collections.defaultdict(list)
  for b in batches:
    for r in range(rows):
      if b['row_valid'][r]:
        out[(r, int(b['document_id'][r]), int(b['chunk_index'][r]))] = b['decoder_target_tokens'][r]
  return out


@pytest.mark.parametrize('shuffle', [False, True])
@pytest.mark.parametrize('cut', [7, 75])
def test_restore_is_exact_and_reads_nothing_before(tmp_path, shuffle, cut):
  # 60 documents of 1-5 chunks on 3 rows: an epoch is about 60 steps; cut=75 is in epoch 1 and
  # the 25 steps after the cut stay in that epoch.
  write_synthetic(tmp_path, num_docs=60)
  kw = dict(batch_size=3, chunk_length=L, seed=4, shuffle=shuffle)
  it = PreparedStreamIterator(str(tmp_path), **kw)
  for _ in range(cut):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(25)]
  assert max(b['document_id'].max() for b in expected) >= 500

  data = prepared.PreparedSplit(str(tmp_path))
  fresh = PreparedStreamIterator(data, **kw)
  fresh.set_state(state)
  assert data.reads.sum() == 0 and data.opened_shards == []  # restoring read no token
  if not shuffle:
    # Delete every shard holding only documents before the saved rows: the restore never reads
    # them.
    first = min(row['ordinal'] for row in state['rows'] if row is not None)
    needed = set(data.index['shard'][first:])
    for s, name in enumerate(data.meta['shards']):
      if s not in needed:
        os.remove(os.path.join(str(tmp_path), name))
  assert_batches_equal(expected, [next(fresh) for _ in range(25)])
  if not shuffle:
    assert not data.reads[:first].any()
  if cut == 75:
    assert state['epoch'] == 1


def test_epoch_reads_every_document_once_in_seeded_order(tmp_path):
  docs = write_synthetic(tmp_path)
  order = {}
  for seed in (0, 1):
    it = PreparedStreamIterator(str(tmp_path), batch_size=3, chunk_length=L, seed=seed)
    started = []
    while len(started) < 2 * len(docs):
      b = next(it)
      started += [int(d) for d, s in zip(b['document_id'], b['start_of_sequence']) if s]
    # Documents start in schedule order: the first len(docs) are epoch 0, the next epoch 1.
    assert (
      sorted(started[: len(docs)]) == sorted(docs) == sorted(started[len(docs) : 2 * len(docs)])
    )
    assert started[: len(docs)] != started[len(docs) : 2 * len(docs)]
    order[seed] = started
    again = PreparedStreamIterator(str(tmp_path), batch_size=3, chunk_length=L, seed=seed)
    assert [int(d) for d in next(again)['document_id']] == started[:3]  # a function of the seed
  assert order[0] != order[1]


def test_two_hosts_read_every_document_once_and_equal_one_host(tmp_path):
  docs = write_synthetic(tmp_path)
  hosts = [prepared.PreparedSplit(str(tmp_path)) for _ in range(2)]
  its = [
    PreparedStreamIterator(
      hosts[h], batch_size=2, chunk_length=L, shuffle=False, repeat=False, shard_id=h, num_shards=2
    )
    for h in range(2)
  ]
  per_host = [list(it) for it in its]
  assert len(per_host[0]) == len(per_host[1])  # every host runs the same number of steps
  one = list(
    PreparedStreamIterator(str(tmp_path), batch_size=4, chunk_length=L, shuffle=False, repeat=False)
  )
  joined = [{k: np.concatenate([a[k], b[k]]) for k in a} for a, b in zip(*per_host)]
  assert_batches_equal(one, joined)  # the global batch does not depend on the host count
  chunks = collections.Counter()
  for b in joined:
    for d, c, v in zip(b['document_id'], b['chunk_index'], b['row_valid']):
      if v:
        chunks[(int(d), int(c))] += 1
  assert chunks == {(d, c): 1 for d, t in docs.items() for c in range(-(-len(t) // L))}
  read = [set(np.flatnonzero(h.reads)) for h in hosts]
  assert not read[0] & read[1] and read[0] | read[1] == set(range(len(docs)))
  for h in hosts:  # each document read once: one positioned read per chunk, by one host
    np.testing.assert_array_equal(sum(x.reads for x in hosts), -(-hosts[0].index['length'] // L))
    del h
  total = sum(float(b['decoder_loss_weights'].sum()) for b in joined)
  assert total == sum(len(t) for t in docs.values())


def test_resume_on_other_host_count_continues_and_other_batch_refused(tmp_path):
  write_synthetic(tmp_path)
  kw = dict(chunk_length=L, seed=2)
  one = PreparedStreamIterator(str(tmp_path), batch_size=4, **kw)
  for _ in range(11):
    next(one)
  state = one.get_state()
  expected = [next(one) for _ in range(9)]
  two = [
    PreparedStreamIterator(str(tmp_path), batch_size=2, shard_id=h, num_shards=2, **kw)
    for h in range(2)
  ]
  for it in two:
    it.set_state(state)
  got = [
    {k: np.concatenate([a[k], b[k]]) for k in a}
    for a, b in zip(*[[next(it) for _ in range(9)] for it in two])
  ]
  assert_batches_equal(expected, got)
  other = PreparedStreamIterator(str(tmp_path), batch_size=3, **kw)
  with pytest.raises(ValueError, match='global batch of 4 rows'):
    other.set_state(state)
  fly = DocumentStreamIterator([], batch_size=4, chunk_length=L, repeat=False)
  with pytest.raises(ValueError, match='on-the-fly stream'):
    one.set_state(fly.get_state())


def test_workers_and_finalize_give_every_document(tmp_path):
  texts = ['alpha beta', 'gamma', 'delta epsilon zeta', 'eta', 'theta iota']
  for i, t in enumerate(texts):
    (tmp_path / f'd{i}.txt').write_text(t)
  tasks.configure('text_corpus', test_files=str(tmp_path / '*.txt'), vocabulary_task='local_books')
  try:
    root = str(tmp_path / 'out')
    single = prepare.prepare('text_corpus', 'test', root + '1')
    for w in range(2):
      prepare.prepare('text_corpus', 'test', root, worker=w, num_workers=2)
    meta = prepare.finalize('text_corpus', 'test', root, num_workers=2)
    a = prepared.PreparedSplit(prepare.split_dir(root + '1', 'text_corpus', 'test'))
    b = prepared.PreparedSplit(prepare.split_dir(root, 'text_corpus', 'test'))
    assert meta['num_documents'] == single['num_documents'] == 5
    by_id = {int(a.index[i]['document_id']): list(a.document(i)) for i in range(5)}
    assert {int(b.index[i]['document_id']): list(b.document(i)) for i in range(5)} == by_id
    vocab = tasks.vocabulary('local_books')
    assert sorted(vocab.decode(t) for t in by_id.values()) == sorted(texts)
  finally:
    tasks.reset_config('text_corpus')


def test_bench_stream_small(tmp_path):
  from tasks import bench_stream

  out = tmp_path / 'bench.json'
  bench_stream.main(
    [
      '--num_docs=40',
      '--min_tokens=100',
      '--max_tokens=20000',
      '--seconds=0.2',
      '--repeats=1',
      '--hosts=1',
      '--batch_size=2',
      '--chunk_length=512',
      f'--json={out}',
    ]
  )
  result = json.loads(out.read_text())
  for key in ('tokens_per_sec', 'restore_sec_start', 'restore_sec_late', 'peak_rss_bytes'):
    assert result[key] > 0, key
  assert result['documents'] == 40
  assert result['restore_late_step'] >= 0.8 * result['epoch_steps']


def test_restore_refuses_changed_data(tmp_path):
  write_synthetic(tmp_path / 'a', seed=0)
  write_synthetic(tmp_path / 'b', seed=1)
  it = PreparedStreamIterator(str(tmp_path / 'a'), batch_size=2, chunk_length=L)
  for _ in range(5):
    next(it)
  other = PreparedStreamIterator(str(tmp_path / 'b'), batch_size=2, chunk_length=L)
  with pytest.raises(ValueError, match='data_fingerprint'):
    other.set_state(it.get_state())
  state = it.get_state()
  row = next(r for r in state['rows'] if r is not None)
  row['checksum'] += 1
  with pytest.raises(ValueError, match='the data changed'):
    PreparedStreamIterator(str(tmp_path / 'a'), batch_size=2, chunk_length=L).set_state(state)
