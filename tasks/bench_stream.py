r"""Data-path benchmark: throughput per host, restore time early vs late in an epoch, peak memory.

  python -m tasks.bench_stream [--json PATH]

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
CPU cost, not the disk's (per host and step it reads 8 x 8 KiB at random offsets).
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
from tasks.prepared_stream import PreparedStreamIterator

# One host of the paper setting: 8 rows of 4096 tokens per step. Assumed step time of the paper
# model (12-13 layers, d=1024, 4096-token segments, batch 1 per core) on a TPU v3/v4 core: 0.2 s
# (an assumption, not a measurement: about 6 x 150M params x 4096 tokens + attention, ~4 TFLOP per
# core and step, at ~20 TFLOP/s sustained).
TPU_ROWS_PER_HOST = 8
TPU_TOKENS_PER_ROW = 4096
ASSUMED_TPU_STEP_SEC = 0.2


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


def timed_restore(path: str, state, kw) -> tuple[float, int]:
  """Seconds to open the split, restore `state` and produce the next batch; tokens read."""
  start = time.perf_counter()
  data = prepared_lib.PreparedSplit(path)
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
    steps = real = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < args.seconds:
      b = next(it)
      real += int(b['decoder_loss_weights'].sum())
      steps += 1
    elapsed = time.perf_counter() - t0
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
  args = parser.parse_args(argv)
  result = run(args)
  for key, value in result.items():
    print(f'{key}: {value:.4g}' if isinstance(value, float) else f'{key}: {value}')
  if args.json:
    with open(args.json, 'w') as f:
      f.write(json.dumps(result, indent=2, sort_keys=True) + '\n')


if __name__ == '__main__':
  main()
