"""Prepared splits on `gs://` through the GCS emulator (`tasks.gcs_emulator`): the read-ahead's
requests and bytes, restore by seeking, errors, and the benchmark's GCS mode at tiny size."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from stream_batches import assert_batches_equal

from tasks import gcs_emulator, prepared
from tasks.prepared_stream import PreparedStreamIterator

L = 64  # chunk length
ROWS, HOSTS = 3, 2


def write_corpus(path, num_docs=40, seed=0, shard_tokens=20000):
  """Documents of 1 to 40 chunks (uint16 tokens), several shards."""
  rng = np.random.default_rng(seed)
  docs = [(k, rng.integers(3, 1000, size=int(rng.integers(1, 40 * L)))) for k in range(num_docs)]
  prepared.write_split(str(path), docs, vocab_size=1000, shard_tokens=shard_tokens)


@pytest.fixture(scope='module')
def emulator():
  return gcs_emulator.shared(latency_ms=5)


@pytest.fixture
def bucket(tmp_path, emulator):
  """A fresh bucket (a local folder the emulator serves): (gs:// URL, local folder)."""
  local = tmp_path / 'bucket'
  local.mkdir()
  name = f'test-{os.getpid()}-{abs(hash(str(tmp_path))) % 10**8}'
  url = gcs_emulator.add_bucket(emulator, name, str(local))
  return url, local


def stream(path, **kw):
  args = dict(batch_size=ROWS, chunk_length=L, seed=3, shard_id=0, num_shards=HOSTS)
  args.update(kw)
  return PreparedStreamIterator(path, **args)


def test_gcs_stream_equals_local_and_fetches_at_most_what_it_uses(bucket, emulator):
  url, local = bucket
  write_corpus(local / 'split')
  gcs = prepared.PreparedSplit(f'{url}/split')
  # Small requests and a short lookahead, so that 150 steps cover many of them.
  it = stream(gcs, block_bytes=512, lookahead_steps=8, max_buffer_bytes=8192)
  emulator.reset()
  got = [next(it) for _ in range(150)]
  it.reader.wait()
  stats = emulator.stats()
  local_it = stream(str(local / 'split'))
  assert_batches_equal([next(local_it) for _ in range(150)], got)
  # Bytes used: each chunk's real tokens, plus the previous chunk's last token after chunk 0.
  used = it.reader.bytes_used
  assert used == 2 * sum(
    int(b['decoder_loss_weights'].sum()) + int((b['row_valid'] & (b['chunk_index'] > 0)).sum())
    for b in got
  )
  # Every byte served was a token request of this stream (meta and index were read before).
  assert stats['bytes_served'] == gcs.bytes_fetched
  assert stats['media_requests'] == gcs.requests
  # No read amplification: what the emulator served is at most 1.25 x what the batches used
  # (the unread rest is the read-ahead of the steps not taken).
  assert stats['bytes_served'] <= 1.25 * used, (stats, used)
  # Large sequential requests: far fewer requests than chunk reads (one per row and step).
  assert stats['media_requests'] < 0.5 * gcs.reads.sum()


def test_gcs_restore_seeks_and_reads_nothing_before(bucket, emulator):
  url, local = bucket
  write_corpus(local / 'split', shard_tokens=4000)
  kw = dict(shuffle=False, block_bytes=1024, lookahead_steps=4)  # stays in epoch 0
  first = stream(f'{url}/split', **kw)
  for _ in range(60):  # mid-epoch: the rows read documents 16-24 of 40
    next(first)
  state = first.get_state()
  expected = [next(first) for _ in range(30)]

  # Shards holding only documents before the saved rows are deleted: a replay would need them.
  data = prepared.PreparedSplit(f'{url}/split')
  start = min(row['ordinal'] for row in state['rows'] if row is not None)
  needed = set(data.index['shard'][start:])
  removed = [name for s, name in enumerate(data.meta['shards']) if s not in needed]
  assert removed, 'the position must be past the first shard'
  for name in removed:
    os.remove(local / 'split' / name)

  emulator.reset()
  restored = stream(data, **kw)
  restored.set_state(state)
  assert emulator.stats()['requests'] == 0  # restoring requests nothing
  got = [next(restored) for _ in range(30)]
  assert_batches_equal(expected, got)
  assert not data.reads[:start].any()
  restored.reader.wait()
  assert emulator.stats()['bytes_served'] <= 1.25 * restored.reader.bytes_used

  # Without read-ahead, the first step after the restore requests exactly its rows' chunks.
  plain = prepared.PreparedSplit(f'{url}/split')
  once = stream(plain, shuffle=False, block_bytes=2, lookahead_steps=0)
  once.set_state(state)
  emulator.reset()
  batch = next(once)
  rows = int(batch['row_valid'].sum())
  stats = emulator.stats()
  assert stats['media_requests'] == rows
  assert stats['bytes_served'] == once.reader.bytes_used
  # Each row's chunk: its real tokens, plus the previous chunk's last token after chunk 0.
  chunk_bytes = 2 * (
    int(batch['decoder_loss_weights'].sum())
    + int((batch['row_valid'] & (batch['chunk_index'] > 0)).sum())
  )
  assert stats['bytes_served'] == chunk_bytes


def test_missing_shard_and_bad_paths_raise_clear_errors(bucket, emulator):
  url, local = bucket
  write_corpus(local / 'split', num_docs=6, shard_tokens=10**6)
  data = prepared.PreparedSplit(f'{url}/split')
  os.remove(local / 'split' / data.meta['shards'][0])
  with pytest.raises(FileNotFoundError, match='shard tokens-00000.bin is missing'):
    next(stream(data))
  with pytest.raises(FileNotFoundError, match='No prepared split at'):
    prepared.PreparedSplit(f'{url}/nothing-here')
  with pytest.raises(ValueError, match='No bucket'):
    prepared.kvstore_spec('gs:///x')
  with pytest.raises(ValueError, match='lookahead_steps must be >= 0'):
    stream(str(local / 'split'), lookahead_steps=-1)
  with pytest.raises(ValueError, match='block_bytes must be >= 2'):
    stream(f'{url}/split', block_bytes=1)


def test_kvstore_spec():
  assert prepared.kvstore_spec('gs://b/some/dir/') == {
    'driver': 'gcs',
    'bucket': 'b',
    'path': 'some/dir/',
  }
  assert prepared.kvstore_spec('gs://b') == {'driver': 'gcs', 'bucket': 'b', 'path': ''}
  spec = prepared.kvstore_spec('relative/dir')
  assert spec == {'driver': 'file', 'path': os.path.abspath('relative/dir') + '/'}


def test_bench_stream_gcs_small(tmp_path):
  from tasks import bench_stream

  out = tmp_path / 'bench.json'
  bench_stream.main(
    [
      '--storage=gcs_emulator',
      '--latency_ms=20',
      '--num_docs=60',
      '--min_tokens=100',
      '--max_tokens=20000',
      '--seconds=0.5',
      '--warmup_sec=0.3',
      '--repeats=1',
      '--chunk_length=256',
      '--block_bytes=8192',
      '--lookahead_steps=32',
      f'--json={out}',
    ]
  )
  result = json.loads(out.read_text())
  assert set(result['layouts']) == {'v5e_4x8', 'v6e_4x8'}
  for layout in result['layouts'].values():
    assert layout['tokens_per_s_per_host'] > 0 and layout['requests_per_step'] > 0
    assert 0 < layout['bytes_used_per_step'] <= 4 * 257 * 2  # 4 rows of L + 1 uint16 tokens
    assert 0 < layout['amplification'] <= 1.25
  for key in ('tokens_per_s_per_host', 'bytes_fetched_per_step', 'bytes_used_per_step'):
    assert result[key] == result['layouts']['v6e_4x8'][key] > 0
  assert result['requests_per_step'] > 0 and result['restore_late_chunk_reads'] <= 4
