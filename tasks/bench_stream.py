r"""Data-path benchmark: throughput per host, restore time early vs late in an epoch, peak memory.

  python -m tasks.bench_stream [--json PATH]
  python -m tasks.bench_stream --storage=gcs_emulator [--latency_ms=50] [--reader=gfile] [--json P]

By default it writes a synthetic corpus of 20,000 documents with log-uniform lengths between 2k
and 200k tokens (token ids drawn directly, no text; about 0.9 billion tokens, 1.7 GB as uint16) to
a temporary folder through the prepared format (`tasks.prepared.ShardWriter`, 256 MiB shards),
then streams it as host 0 of `--hosts` hosts (paper setting: 32 rows of 4096 tokens per step on 4
hosts, i.e. 8 rows per host) with shuffling, and measures:

- `tokens_per_sec`: real (non-padding) target tokens per second of the streamed batches of one host
  (`padded_tokens_per_sec` counts every position of the batches);
- `restore_sec_start` / `restore_sec_late`: opening the split, restoring a state saved after the
  first step or late in the epoch (`--late_fraction` of its steps), and producing the next batch;
- `peak_rss_bytes`: the process's peak resident memory (`ru_maxrss`); `rss_after_imports_bytes`
  is the part taken by the imports alone (`import tasks` loads TensorFlow and seqio).

The corpus was just written, so its pages are in the OS cache: the throughput is the pipeline's
CPU cost, not the disk's.

`--storage=gcs_emulator` serves the corpus from `tasks.gcs_emulator` (a GCS HTTP server on
127.0.0.1 in its own process, answering each request after `--latency_ms`) and streams it as
`gs://` for the row layouts of the launcher's slices (`LAYOUTS`: v5e 4x8 and v6e 4x8, 8 hosts x 4
rows of `--chunk_length` tokens). After a `--warmup_sec` start (the read-ahead fills), it measures
for `--seconds` per layout: `tokens_per_s_per_host` (real target tokens), and per step
`requests_per_step` (GETs the emulator answered), `bytes_fetched_per_step` (payload bytes it
served), `bytes_used_per_step` (bytes of the chunks the batches were cut from: L + 1 tokens per row)
and `amplification` (fetched / used); `*_total` counts include the warm-up and the read-ahead left
unread at the end. `need_tokens_per_s_per_host` is a host's need at the fastest estimated train
step of the layout (docs/experiments.md cost table); `headroom` = measured / need.
`--reader=gfile` measures the former reader (one `tf.io.gfile` handle per shard, one synchronous
seek + read of L + 1 tokens per row and step; TF's GCS filesystem reaches the emulator through its
HTTPS proxy) for comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import tempfile
import time

import numpy as np

from tasks import prepared as prepared_lib
from tasks.prepared_stream import DEFAULT_LOOKAHEAD_STEPS, PreparedStreamIterator

# One host of the paper setting: 8 rows of 4096 tokens per step. Assumed step time of the paper
# model (12-13 layers, d=1024, 4096-token segments, batch 1 per core) on a TPU v3/v4 core: 0.2 s
# (an assumption, not a measurement: about 6 x 150M params x 4096 tokens + attention, ~4 TFLOP per
# core and step, at ~20 TFLOP/s sustained).
TPU_ROWS_PER_HOST = 8
TPU_TOKENS_PER_ROW = 4096
ASSUMED_TPU_STEP_SEC = 0.2
# Row layouts of the launcher's slices for the GCS mode: (hosts, rows per host, fastest estimated
# train step in seconds). v5e-32 and v6e-32 (4x8) are 8 hosts x 4 chips, one row per chip; the
# step times are the cost table's fastest model (Transformer-XL, docs/experiments.md), estimates.
LAYOUTS = {
  'v5e_4x8': (8, 4, 0.071),
  'v6e_4x8': (8, 4, 0.015),
}
# Bucket name under which the emulator serves the benchmark's corpus.
BENCH_BUCKET = 'melodi-bench'


class GfileSplit(prepared_lib.PreparedSplit):
  """The former reader, for the before/after comparison: `tf.io.gfile`, one handle per shard,
  each fetch a synchronous seek + read (with the stream's `block_bytes` at one token and no
  lookahead, a fetch is exactly one chunk's L + 1 tokens, as before)."""

  def __init__(self, path: str):
    super().__init__(path)
    self._handles = {}

  def fetch(self, ordinal: int, start: int, stop: int):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    rec = self.index[ordinal]
    shard = int(rec['shard'])
    handle = self._handles.get(shard)
    if handle is None:
      name = f'{self.path}/{self.meta["shards"][shard]}'
      handle = self._handles[shard] = tf.io.gfile.GFile(name, 'rb')
    itemsize = self.dtype.itemsize
    handle.seek((int(rec['offset']) + start) * itemsize)
    data = handle.read((stop - start) * itemsize)
    self.requests += 1
    self.bytes_fetched += len(data)
    self._shards_read.add(shard)
    return _Done(np.frombuffer(data, self.dtype), start, stop)

  def close(self) -> None:
    for handle in self._handles.values():
      handle.close()
    self._handles.clear()


class _Done:
  """A fetch that already happened (the gfile reader is synchronous)."""

  def __init__(self, tokens: np.ndarray, start: int, stop: int):
    self._tokens, self.start, self.stop = tokens, start, stop

  def tokens(self) -> np.ndarray:
    return self._tokens

  def cancel(self) -> None:
    pass


def timed_steps(it, seconds: float) -> tuple[int, int, float]:
  """Draws batches from `it` for `seconds`: (steps, real target tokens, elapsed seconds)."""
  steps = real = 0
  t0 = time.perf_counter()
  while time.perf_counter() - t0 < seconds:
    real += int(next(it)['decoder_loss_weights'].sum())
    steps += 1
  return steps, real, time.perf_counter() - t0


def write_corpus(path: str, num_docs: int, min_tokens: int, max_tokens: int, vocab_size: int):
  """Synthetic documents (log-uniform lengths) written as a prepared split; returns its meta."""
  rng = np.random.default_rng(0)
  lengths = np.exp(rng.uniform(np.log(min_tokens), np.log(max_tokens), num_docs)).astype(np.int64)
  writer = prepared_lib.ShardWriter(path, vocab_size)
  try:
    for k, n in enumerate(lengths):
      writer.add(k, rng.integers(3, vocab_size, size=int(n), dtype=np.int32))
  finally:
    writer.close()
  info = {'task': 'synthetic', 'split': 'train'}
  return prepared_lib.write_index_and_meta(path, writer.records, writer.shards, vocab_size, info)


def timed_restore(
  path: str, state, kw, split_class=prepared_lib.PreparedSplit
) -> tuple[float, int]:
  """Seconds to open the split, restore `state` and produce the next batch; tokens read."""
  start = time.perf_counter()
  data = split_class(path)
  it = PreparedStreamIterator(data, **kw)
  it.set_state(state)
  next(it)
  return time.perf_counter() - start, int(data.reads.sum())


def current_rss_bytes() -> int:
  """Resident memory now (Linux /proc; 0 elsewhere)."""
  try:
    with open('/proc/self/statm') as f:
      return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')
  except OSError:
    return 0


def run(args) -> dict:
  baseline_rss = current_rss_bytes()
  root = args.dir or tempfile.mkdtemp(prefix='bench_stream_')
  path = os.path.join(root, 'synthetic', 'train')
  try:
    t0 = time.perf_counter()
    meta = write_corpus(path, args.num_docs, args.min_tokens, args.max_tokens, args.vocab_size)
    prepare_sec = time.perf_counter() - t0
    kw = dict(
      batch_size=args.batch_size,
      chunk_length=args.chunk_length,
      seed=0,
      shuffle=True,
      shard_id=0,
      num_shards=args.hosts,
    )
    # Throughput of host 0.
    it = PreparedStreamIterator(path, **kw)
    next(it)
    start_state = it.get_state()
    steps, real, elapsed = timed_steps(it, args.seconds)
    padded = steps * args.batch_size * args.chunk_length
    shards_opened = len(it.data.opened_shards)
    # A late state: the schedule alone (document lengths from the index) finds it, no reads.
    chunks = int((-(-it.data.index['length'] // args.chunk_length)).sum())
    epoch_steps = chunks // (args.batch_size * args.hosts)
    late = PreparedStreamIterator(path, **kw)
    late.skip(int(args.late_fraction * epoch_steps))
    late_state = late.get_state()
    assert late_state['epoch'] == 0 and late.data.reads.sum() == 0
    start_times, late_times = [], []
    for _ in range(args.repeats):
      start_times.append(timed_restore(path, start_state, kw)[0])
      late_times.append(timed_restore(path, late_state, kw)[0])
    need = TPU_ROWS_PER_HOST * TPU_TOKENS_PER_ROW / ASSUMED_TPU_STEP_SEC
    result = {
      'tokens_per_sec': real / elapsed,
      'padded_tokens_per_sec': padded / elapsed,
      'steps_per_sec': steps / elapsed,
      'restore_sec_start': statistics.median(start_times),
      'restore_sec_late': statistics.median(late_times),
      'restore_late_step': late_state['step'],
      'epoch_steps': epoch_steps,
      'peak_rss_bytes': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
      'rss_after_imports_bytes': baseline_rss,
      'documents': meta['num_documents'],
      'corpus_tokens': meta['num_tokens'],
      'corpus_bytes': meta['num_tokens'] * np.dtype(meta['token_dtype']).itemsize,
      'shard_files': len(meta['shards']),
      'shards_opened_by_host0': shards_opened,
      'prepare_sec': prepare_sec,
      'hosts': args.hosts,
      'rows_per_host': args.batch_size,
      'chunk_length': args.chunk_length,
      'tpu_host_tokens_per_sec_needed': need,
      'assumed_tpu_step_sec': ASSUMED_TPU_STEP_SEC,
    }
    result['headroom_vs_tpu_host'] = result['padded_tokens_per_sec'] / need
    return result
  finally:
    if not args.dir:
      shutil.rmtree(root, ignore_errors=True)


def measure_gcs_layout(path: str, emulator, layout: str, args, split_class, stream_kw) -> dict:
  """Streams host 0 of `layout` from the emulator; throughput and requests / bytes per step."""
  hosts, rows, step_sec = LAYOUTS[layout]
  kw = dict(
    batch_size=rows,
    chunk_length=args.chunk_length,
    seed=0,
    shuffle=True,
    shard_id=0,
    num_shards=hosts,
    **stream_kw,
  )
  emulator.reset()
  data = split_class(path)
  it = PreparedStreamIterator(data, **kw)
  t0 = time.perf_counter()
  warmup_steps = 0
  while time.perf_counter() - t0 < args.warmup_sec or not warmup_steps:
    next(it)
    warmup_steps += 1
  before, used_before = emulator.stats(), it.reader.bytes_used
  steps, real, elapsed = timed_steps(it, args.seconds)
  after, used_after = emulator.stats(), it.reader.bytes_used
  fetched = after['bytes_served'] - before['bytes_served']
  used = used_after - used_before
  need = rows * args.chunk_length / step_sec
  result = {
    'hosts': hosts,
    'rows_per_host': rows,
    'chunk_length': args.chunk_length,
    'tokens_per_s_per_host': real / elapsed,
    'steps_per_s': steps / elapsed,
    'steps': steps,
    'requests_per_step': (after['requests'] - before['requests']) / steps,
    'bytes_fetched_per_step': fetched / steps,
    'bytes_used_per_step': used / steps,
    'amplification': fetched / used,
    'warmup_steps': warmup_steps,
    'requests_total': after['requests'],
    'bytes_fetched_total': after['bytes_served'],
    'bytes_used_total': used_after,
    'client_requests_total': data.requests,
    'client_bytes_fetched_total': data.bytes_fetched,
    'assumed_step_sec': step_sec,
    'need_tokens_per_s_per_host': need,
    'headroom': real / elapsed / need,
  }
  data.close()
  return result


def run_gcs(args) -> dict:
  """The GCS mode: the corpus served by the emulator, streamed as `gs://` per layout."""
  from tasks import gcs_emulator  # pylint: disable=g-import-not-at-top

  root = args.dir or tempfile.mkdtemp(prefix='bench_stream_')
  bucket_dir = os.path.join(root, BENCH_BUCKET)
  saved_env = {}
  local = os.path.join(bucket_dir, 'synthetic', 'train')
  try:
    t0 = time.perf_counter()
    if not os.path.exists(os.path.join(local, prepared_lib.META_FILE)):
      write_corpus(local, args.num_docs, args.min_tokens, args.max_tokens, args.vocab_size)
    prepare_sec = time.perf_counter() - t0
    emulator = gcs_emulator.shared(args.latency_ms)
    path = gcs_emulator.add_bucket(emulator, BENCH_BUCKET, bucket_dir) + '/synthetic/train'
    if args.reader == 'gfile':
      saved_env = {k: os.environ.get(k) for k in emulator.tls_env()}
      os.environ.update(emulator.tls_env())
      split_class = GfileSplit
      stream_kw = dict(lookahead_steps=0, block_bytes=4)  # one int32 or two uint16 tokens
    else:
      split_class = prepared_lib.PreparedSplit
      stream_kw = dict(
        lookahead_steps=args.lookahead_steps,
        block_bytes=args.block_bytes,
        max_buffer_bytes=args.max_buffer_bytes,
      )
    layouts = {}
    for layout in LAYOUTS:
      layouts[layout] = measure_gcs_layout(path, emulator, layout, args, split_class, stream_kw)
    # Restore through the emulator (open the split: meta + index, restore, first batch).
    hosts, rows, _ = LAYOUTS['v6e_4x8']
    kw = dict(batch_size=rows, chunk_length=args.chunk_length, seed=0, num_shards=hosts)
    late = PreparedStreamIterator(split_class(path), **kw, **stream_kw)
    chunks = int((-(-late.data.index['length'] // args.chunk_length)).sum())
    late.skip(int(args.late_fraction * chunks // (rows * hosts)))
    start = PreparedStreamIterator(split_class(path), **kw, **stream_kw)
    next(start)
    emulator.reset()
    restore_sec, late_reads = timed_restore(
      path, late.get_state(), {**kw, **stream_kw}, split_class
    )
    restore_requests = emulator.stats()['requests']
    result = {
      'storage': 'gcs_emulator',
      'reader': args.reader,
      'latency_ms': args.latency_ms,
      'layouts': layouts,
      'restore_sec_late': restore_sec,
      'restore_late_step': late.get_state()['step'],
      'restore_late_requests': restore_requests,
      'restore_late_chunk_reads': late_reads,
      'restore_sec_start': timed_restore(path, start.get_state(), {**kw, **stream_kw}, split_class)[
        0
      ],
      'peak_rss_bytes': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
      'prepare_sec': prepare_sec,
      'block_bytes': None if args.reader == 'gfile' else stream_kw['block_bytes'],
      'lookahead_steps': stream_kw['lookahead_steps'],
    }
    # The required keys at the top level: the layout with the fastest step (v6e 4x8).
    fastest = min(LAYOUTS, key=lambda name: LAYOUTS[name][2])
    for key in (
      'tokens_per_s_per_host',
      'bytes_fetched_per_step',
      'bytes_used_per_step',
      'requests_per_step',
      'amplification',
      'need_tokens_per_s_per_host',
      'headroom',
    ):
      result[key] = layouts[fastest][key]
    result['layout'] = fastest
    return result
  finally:
    for key, value in saved_env.items():  # the gfile reader's proxy settings
      if value is None:
        os.environ.pop(key, None)
      else:
        os.environ[key] = value
    if not args.dir:
      shutil.rmtree(root, ignore_errors=True)


def print_result(result: dict) -> None:
  for key, value in result.items():
    if key == 'layouts':
      for name, layout in value.items():
        print(f'{name}:')
        for k, v in layout.items():
          print(f'  {k}: {v:.4g}' if isinstance(v, float) else f'  {k}: {v}')
    else:
      print(f'{key}: {value:.4g}' if isinstance(value, float) else f'{key}: {value}')


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--json', default=None, help='write the results here')
  parser.add_argument('--num_docs', type=int, default=20000)
  parser.add_argument('--min_tokens', type=int, default=2000)
  parser.add_argument('--max_tokens', type=int, default=200000)
  parser.add_argument('--vocab_size', type=int, default=32128)
  parser.add_argument('--hosts', type=int, default=4, help='hosts sharing the global batch')
  parser.add_argument('--batch_size', type=int, default=8, help='rows per host')
  parser.add_argument('--chunk_length', type=int, default=4096)
  parser.add_argument('--seconds', type=float, default=20.0, help='throughput measurement')
  parser.add_argument('--late_fraction', type=float, default=0.9)
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--dir', default=None, help='keep the corpus here (default: temporary)')
  parser.add_argument(
    '--storage',
    choices=['local', 'gcs_emulator'],
    default='local',
    help='local: the corpus folder; gcs_emulator: gs:// served by tasks.gcs_emulator (LAYOUTS)',
  )
  parser.add_argument('--latency_ms', type=float, default=50.0, help='gcs_emulator: per request')
  parser.add_argument('--warmup_sec', type=float, default=2.0, help='gcs_emulator: before timing')
  parser.add_argument(
    '--reader',
    choices=['readahead', 'gfile'],
    default='readahead',
    help='gcs_emulator: readahead (tasks.prepared.ReadAhead) or the former tf.io.gfile reader',
  )
  parser.add_argument('--block_bytes', type=int, default=prepared_lib.DEFAULT_BLOCK_BYTES)
  parser.add_argument('--lookahead_steps', type=int, default=DEFAULT_LOOKAHEAD_STEPS)
  parser.add_argument('--max_buffer_bytes', type=int, default=prepared_lib.DEFAULT_BUFFER_BYTES)
  args = parser.parse_args(argv)
  if args.latency_ms < 0:
    parser.error(f'--latency_ms must be >= 0, got {args.latency_ms}.')
  if args.storage == 'local' and args.reader != 'readahead':
    parser.error('--reader=gfile compares readers on --storage=gcs_emulator only.')
  result = run_gcs(args) if args.storage == 'gcs_emulator' else run(args)
  print_result(result)
  if args.json:
    with open(args.json, 'w') as f:
      f.write(json.dumps(result, indent=2, sort_keys=True) + '\n')


if __name__ == '__main__':
  main()
