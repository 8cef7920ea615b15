"""Tests of the streaming perplexity bookkeeping and report files (no T5X needed)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from melodi_t5x import report


def _stream(rng, doc_lengths, batch, length):
  """Streams documents through rows (a row takes the next document when its own ends).

  Returns the batches `(nll, weights, document_id, chunk_index, row_valid)` and the truth: one
  `(document, position, nll)` per real token.
  """
  queue = list(range(len(doc_lengths)))
  current = [None] * batch  # per row: [doc, next chunk]
  batches, truth = [], []
  while True:
    for r in range(batch):
      if current[r] is None and queue:
        current[r] = [queue.pop(0), 0]
    if all(c is None for c in current):
      return batches, truth
    nll = rng.uniform(0.0, 5.0, (batch, length))
    weights = np.zeros((batch, length), np.float32)
    doc_id, chunk, valid = np.full(batch, -1), np.full(batch, -1), np.zeros(batch, bool)
    for r in range(batch):
      if current[r] is None:
        continue
      d, c = current[r]
      n = min(length, doc_lengths[d] - c * length)
      weights[r, :n] = 1
      doc_id[r], chunk[r], valid[r] = d, c, True
      truth.extend((d, c * length + i, nll[r, i]) for i in range(n))
      current[r] = [d, c + 1] if (c + 1) * length < doc_lengths[d] else None
    batches.append((nll, weights, doc_id, chunk, valid))


def test_accumulator_matches_direct_sum_and_counts_every_token_once():
  rng = np.random.default_rng(0)
  doc_lengths = [5, 40, 17, 64, 3, 33]
  batches, truth = _stream(rng, doc_lengths, batch=3, length=16)
  edges = report.default_bucket_edges(16)
  acc = report.PerplexityAccumulator(edges)
  for b in batches:
    acc.add(*b)
  assert acc.tokens == sum(doc_lengths) == len(truth)
  assert acc.documents == len(doc_lengths)
  assert acc.document_tokens() == dict(enumerate(doc_lengths))
  total = sum(x for _, _, x in truth)
  assert acc.perplexity == pytest.approx(math.exp(total / len(truth)), rel=1e-12)
  summary = acc.summary(task='t')
  for i, bucket in enumerate(summary['position_buckets']):
    hi = edges[i + 1] if i + 1 < len(edges) else 10**9
    vals = [x for _, p, x in truth if edges[i] <= p < hi]
    assert bucket['tokens'] == len(vals)
    if vals:
      assert bucket['perplexity'] == pytest.approx(math.exp(np.mean(vals)), rel=1e-12)
  assert sum(b['tokens'] for b in summary['position_buckets']) == acc.tokens


def test_default_bucket_edges():
  assert report.default_bucket_edges(4096)[:5] == [0, 4096, 8192, 16384, 32768]
  assert report.default_bucket_edges(10, max_position=50) == [0, 10, 20, 40]
  with pytest.raises(ValueError, match='segment_length'):
    report.default_bucket_edges(0)


def test_growing_buckets_reach_the_longest_document():
  rng = np.random.default_rng(1)
  # Longest document: 1000 tokens = chunk 62 at T=16, far beyond the 8 default buckets (64 * 16).
  doc_lengths = [1000, 7, 300, 16, 17]
  batches, truth = _stream(rng, doc_lengths, batch=2, length=16)
  acc = report.PerplexityAccumulator(report.default_bucket_edges(16, 17), grow=True)
  for b in batches:
    acc.add(*b)
  edges = acc.bucket_edges
  # Chunk 0, 1, 2-3, ..., 32-63: the last finite bucket ends after the last token (position 999).
  assert edges == [0, 16, 32, 64, 128, 256, 512, 1024]
  buckets = acc.summary()['position_buckets']
  assert buckets[-1] == {
    'start': 1024,
    'end': None,
    'tokens': 0,
    'nll_per_token': None,
    'perplexity': None,
  }
  for bucket in buckets[:-1]:
    vals = [x for _, p, x in truth if bucket['start'] <= p < bucket['end']]
    assert bucket['tokens'] == len(vals) > 0
    assert bucket['perplexity'] == pytest.approx(math.exp(np.mean(vals)), rel=1e-12)
  with pytest.raises(ValueError, match='two edges'):
    report.PerplexityAccumulator([0], grow=True)


def test_growing_buckets_merge_across_hosts():
  rng = np.random.default_rng(2)
  batches, _ = _stream(rng, [1000, 40], batch=1, length=16)  # host A: a long document
  other, _ = _stream(rng, [50], batch=1, length=16)  # host B: short documents only
  other = [(n, w, d + 10, c, v) for n, w, d, c, v in other]  # document ids of host B
  edges = report.default_bucket_edges(16, 17)
  one, host_a, host_b = (report.PerplexityAccumulator(edges, grow=True) for _ in range(3))
  for b in batches:
    one.add(*b)
    host_a.add(*b)
  for b in other:
    one.add(*b)
    host_b.add(*b)
  for first, second in ((host_a, host_b), (host_b, host_a)):
    combined = report.PerplexityAccumulator(list(first.bucket_edges), grow=True)
    combined.merge_state(first.get_state())
    combined.merge_state(second.get_state())
    got, want = combined.summary(), one.summary()
    assert (got['tokens'], got['documents'], got['chunks']) == (
      want['tokens'],
      want['documents'],
      want['chunks'],
    )
    assert got['perplexity'] == pytest.approx(want['perplexity'], rel=1e-12)
    assert [(b['start'], b['tokens']) for b in got['position_buckets']] == [
      (b['start'], b['tokens']) for b in want['position_buckets']
    ]
    for b, c in zip(got['position_buckets'], want['position_buckets']):
      assert b['perplexity'] == pytest.approx(c['perplexity'], rel=1e-12)


def test_accumulator_rejects_double_scoring_and_bad_weights():
  acc = report.PerplexityAccumulator([0, 4])
  nll = np.ones((1, 4))
  acc.add(nll, np.ones((1, 4)), [7], [0])
  with pytest.raises(ValueError, match='scored twice'):
    acc.add(nll, np.ones((1, 4)), [7], [0])
  with pytest.raises(ValueError, match='0 or 1'):
    acc.add(nll, np.full((1, 4), 0.5), [7], [1])
  with pytest.raises(ValueError, match='padding row'):
    acc.add(nll, np.ones((1, 4)), [7], [2], row_valid=[False])
  with pytest.raises(ValueError, match='bucket_edges'):
    report.PerplexityAccumulator([1, 2])


def test_write_report(tmp_path):
  acc = report.PerplexityAccumulator([0, 4, 8])
  acc.add(np.log(np.full((2, 4), 3.0)), np.ones((2, 4)), [0, 1], [0, 0], correct=np.eye(2, 4))
  acc.add(np.log(np.full((2, 4), 2.0)), np.array([[1, 1, 0, 0], [0] * 4]), [0, -1], [1, -1])
  paths = report.write_report(acc.summary(task='demo', checkpoint_step=5), str(tmp_path), 'demo')
  data = json.loads(open(paths['json']).read())
  assert data['tokens'] == 10 and data['documents'] == 2
  expected = math.exp((8 * math.log(3.0) + 2 * math.log(2.0)) / 10)
  assert data['perplexity'] == pytest.approx(expected)
  assert data['accuracy'] == pytest.approx(2 / 10)
  assert [b['tokens'] for b in data['position_buckets']] == [8, 2, 0]
  md = open(paths['md']).read()
  assert 'token-level perplexity' in md and '| [4, 8) | 2 |' in md
  assert open(paths['png'], 'rb').read(8) == b'\x89PNG\r\n\x1a\n'


@pytest.mark.parametrize('window', [4, 8, 16])
def test_window_positions_match_direct_sums(window):
  """Per-offset totals equal the sums over the truth's `position % W`, overall and merged."""
  rng = np.random.default_rng(window)
  doc_lengths = [5, 40, 17, 64, 3, 33, 48]
  batches, truth = _stream(rng, doc_lengths, batch=3, length=16)
  whole = report.PerplexityAccumulator([0, 16], grow=True, window_length=window)
  halves = [report.PerplexityAccumulator([0, 16], grow=True, window_length=window) for _ in '01']
  for i, b in enumerate(batches):
    whole.add(*b)
    halves[i % 2].add(*b)
  halves[0].merge_state(halves[1].get_state())
  for acc in (whole, halves[0]):
    rows = acc.summary()['window_positions']
    assert [r['start'] for r in rows] == list(range(window))
    for offset, row in enumerate(rows):
      vals = [x for _, p, x in truth if p % window == offset]
      assert row['tokens'] == len(vals)
      assert row['nll_per_token'] == pytest.approx(np.mean(vals), rel=1e-12)
  assert sum(r['tokens'] for r in whole.summary()['window_positions']) == len(truth)
  with pytest.raises(ValueError, match='window_length differs'):
    report.PerplexityAccumulator([0, 16], grow=True, window_length=2 * window).merge_state(
      whole.get_state()
    )


def test_window_bucket_edges_keep_offset_zero_alone_for_long_windows():
  assert report.window_bucket_edges(32) == list(range(32))
  edges = report.window_bucket_edges(512)
  assert edges[:3] == [0, 1, 10] and len(edges) <= 64 and edges[-1] < 512
  assert set(np.diff(edges[1:])) == {9}  # 511 offsets in at most 63 equal buckets
  assert report.window_bucket_edges(65, max_buckets=64) == [0, *range(1, 65, 2)]
  with pytest.raises(ValueError, match='window_length'):
    report.window_bucket_edges(0)


def test_report_lists_per_document_totals_and_window_table(tmp_path):
  rng = np.random.default_rng(3)
  batches, truth = _stream(rng, [9, 20, 4], batch=2, length=8)
  acc = report.PerplexityAccumulator([0, 8], grow=True, window_length=4)
  for b in batches:
    acc.add(*b)
  summary = acc.summary(task='demo')
  for d, tokens, nll in summary['per_document']:
    vals = [x for doc, _, x in truth if doc == d]
    assert tokens == len(vals) and nll == pytest.approx(sum(vals), rel=1e-12)
  assert [d for d, _, _ in summary['per_document']] == [0, 1, 2]
  paths = report.write_report(summary, str(tmp_path), 'demo')
  md = open(paths['md']).read()
  assert 'position in the window (W = 4)' in md and '| [0, 1) |' in md
