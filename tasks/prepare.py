r"""Prepares a task's split: tokenized documents as token shards plus an index (`tasks.prepared`).

The seqio task stays the definition (source, vocabulary, preprocessing): this runs the task's
preprocessors up to its cache point (`seqio.CacheDatasetPlaceholder`, before chunking) on the
unshuffled source and writes the tokenized documents to `<out>/<task>/<split>/`. Training and
evaluation read it when `tasks.PreparedDataConfig.root = '<out>'` is set.

One machine (small corpora, e.g. local_books in seconds, a folder of books in minutes):

  python -m tasks.prepare --task=local_books --split=train --out=/data/prepared

  python -m tasks.prepare --task=text_corpus --split=test --out=/data/prepared \
    --gin.tasks.TextCorpusConfig.test_files="'/data/austen/*.txt'" \
    --gin.tasks.TextCorpusConfig.vocabulary_task="'local_books'"

Several machines (PG-19, C4): K workers each tokenize 1/K of the documents (the source's
documents i, i + K, i + 2K, ...), then one command merges the indexes (no tokens are copied):

  python -m tasks.prepare --task=pg19_t5 --split=train --out=gs://b/prep --worker=i --num_workers=K
  python -m tasks.prepare --task=pg19_t5 --split=train --out=gs://b/prep --num_workers=K --finalize

The prepared order is then worker by worker (deterministic). Settings of the task (data_dir,
vocabulary, ...) come from gin flags as in t5x.train: `--gin_file`, `--gin.NAME=VALUE`,
`--gin_bindings`, `--gin_search_paths` (`--gin_param` is a deprecated spelling of `--gin_bindings`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from collections.abc import Iterator

import numpy as np

from tasks import prepared as prepared_lib

WORKER_DIR = 'worker-{:05d}-of-{:05d}'


class MissingPreparedSplitError(FileNotFoundError):
  """`tasks.PreparedDataConfig.root` is set but the split is not prepared there.

  A configuration error: training and evaluation refuse to start (the launcher's step runner does
  not retry it).
  """


def split_dir(root: str, task_name: str, split: str) -> str:
  """Folder of a prepared split under a root."""
  return os.path.join(str(root), task_name, split)


def task_documents(
  task_name: str, split: str, worker: int = 0, num_workers: int = 1
) -> Iterator[tuple[int, np.ndarray]]:
  """`(document_id, tokens)` of a task's split after its pre-cache preprocessing, unshuffled."""
  import seqio  # pylint: disable=g-import-not-at-top

  import tasks  # noqa: F401  # pylint: disable=g-import-not-at-top,unused-import

  task = seqio.get_mixture_or_task(task_name)
  if not isinstance(task, seqio.Task) or not task.supports_caching:
    raise ValueError(
      f'{task_name!r} is not a seqio task with a cache point (seqio.CacheDatasetPlaceholder '
      'before chunking); the tasks of this package have one.'
    )
  ds = task.source.get_dataset(split=split, shuffle=False)
  if num_workers > 1:
    ds = ds.shard(num_workers, worker)
  ds = task.preprocess_precache(ds)
  for ex in ds.as_numpy_iterator():
    yield int(ex['document_id']), np.asarray(ex['targets'])


def task_info(task_name: str, split: str) -> dict:
  """What the prepared split was made from (stored in meta.json and checked when read)."""
  import tasks  # pylint: disable=g-import-not-at-top
  from tasks import config as config_lib  # pylint: disable=g-import-not-at-top

  vocab = tasks.vocabulary(task_name)
  model_file = getattr(vocab, 'sentencepiece_model_file', None)
  settings = None
  if task_name in config_lib.CONFIG_CLASSES:
    settings = dataclasses.asdict(config_lib.get_config(task_name))
    settings.pop('chunk_length', None)  # chosen when reading
  return {
    'task': task_name,
    'split': split,
    'vocabulary_file': model_file,
    'vocabulary_checksum': prepared_lib.file_checksum(model_file),
    'task_settings': settings,
  }


def prepare(
  task_name: str,
  split: str,
  out_root: str,
  *,
  worker: int | None = None,
  num_workers: int = 1,
  shard_tokens: int | None = None,
) -> dict:
  """Writes one split (or one worker's part of it); returns the meta (or the part's summary)."""
  import tasks  # pylint: disable=g-import-not-at-top

  out = split_dir(out_root, task_name, split)
  vocab_size = tasks.vocabulary(task_name).vocab_size
  info = task_info(task_name, split)
  if worker is None:
    docs = task_documents(task_name, split)
    return prepared_lib.write_split(out, docs, vocab_size, info, shard_tokens=shard_tokens)
  if not 0 <= worker < num_workers:
    raise ValueError(f'Need 0 <= --worker < --num_workers, got {worker} and {num_workers}.')
  part = WORKER_DIR.format(worker, num_workers)
  writer = prepared_lib.ShardWriter(
    out, vocab_size, prefix=f'{part}/tokens', shard_tokens=shard_tokens
  )
  prepared_lib.makedirs(os.path.join(out, part))
  try:
    for doc_id, tokens in task_documents(task_name, split, worker, num_workers):
      writer.add(doc_id, tokens)
  finally:
    writer.close()
  records = np.asarray(writer.records, prepared_lib.INDEX_DTYPE)
  summary = {'shards': writer.shards, 'num_documents': len(records), 'info': info}
  with prepared_lib.open_file(os.path.join(out, part, 'index.npy'), 'wb') as f:
    np.save(f, records, allow_pickle=False)
  with prepared_lib.open_file(os.path.join(out, part, 'done.json'), 'w') as f:
    f.write(json.dumps(summary))
  return summary


def finalize(task_name: str, split: str, out_root: str, num_workers: int) -> dict:
  """Merges the workers' indexes into the split's index and meta (worker-major order)."""
  import tasks  # pylint: disable=g-import-not-at-top

  out = split_dir(out_root, task_name, split)
  shards: list[str] = []
  parts = []
  info = None
  for w in range(num_workers):
    part = os.path.join(out, WORKER_DIR.format(w, num_workers))
    done = os.path.join(part, 'done.json')
    if not prepared_lib.exists(done):
      raise FileNotFoundError(
        f'Worker {w} of {num_workers} has not finished ({done} is missing): run it with '
        f'--worker={w} --num_workers={num_workers}.'
      )
    with prepared_lib.open_file(done, 'r') as f:
      summary = json.loads(f.read())
    with prepared_lib.open_file(os.path.join(part, 'index.npy'), 'rb') as f:
      records = np.load(f, allow_pickle=False)
    records = records.copy()
    records['shard'] += len(shards)
    shards.extend(summary['shards'])
    parts.append(records)
    info = info or summary['info']
  records = np.concatenate(parts) if parts else np.zeros(0, prepared_lib.INDEX_DTYPE)
  info = dict(info or task_info(task_name, split), num_workers=num_workers)
  vocab_size = tasks.vocabulary(task_name).vocab_size
  return prepared_lib.write_index_and_meta(out, records, shards, vocab_size, info)


def open_for_task(root: str, task_name: str, split: str) -> prepared_lib.PreparedSplit:
  """Opens `<root>/<task>/<split>`, checking it was made with the task's current vocabulary."""
  import tasks  # pylint: disable=g-import-not-at-top

  path = split_dir(root, task_name, split)
  try:
    data = prepared_lib.PreparedSplit(path)
  except FileNotFoundError:
    raise MissingPreparedSplitError(
      f'tasks.PreparedDataConfig.root = {root!r}, but split {split!r} of task {task_name!r} is '
      f'not prepared there ({path}/meta.json is missing). Prepare it with `python -m '
      f'tasks.prepare --task={task_name} --split={split} --out={root}` (with the same task '
      'settings; every split of the task on a GKE cluster: `python -m xm_launch.launch '
      f'--sweep=prepare --task={task_name} --prepared_root={root} --project=... --zone=... '
      '--cluster=... --model_dir_root=...`), or unset tasks.PreparedDataConfig.root to read the '
      'task on the fly.'
    ) from None
  vocab = tasks.vocabulary(task_name)
  meta = data.meta
  checksum = prepared_lib.file_checksum(getattr(vocab, 'sentencepiece_model_file', None))
  if meta['vocab_size'] != vocab.vocab_size or (
    checksum is not None
    and meta.get('vocabulary_checksum') is not None
    and checksum != meta['vocabulary_checksum']
  ):
    raise ValueError(
      f'Prepared split {path!r} was tokenized with another vocabulary (size {meta["vocab_size"]}, '
      f'file {meta.get("vocabulary_file")!r}) than task {task_name!r} has now (size '
      f'{vocab.vocab_size}): prepare it again.'
    )
  return data


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--task', required=True, help='registered task, e.g. local_books')
  parser.add_argument('--split', required=True, help='train, validation or test')
  parser.add_argument('--out', required=True, help='root folder; writes <out>/<task>/<split>/')
  parser.add_argument('--worker', type=int, default=None, help='this worker (several machines)')
  parser.add_argument('--num_workers', type=int, default=1)
  parser.add_argument('--finalize', action='store_true', help="merge the workers' parts")
  parser.add_argument('--shard_tokens', type=int, default=None, help='tokens per shard file')
  from melodi_t5x import t5x_gin  # pylint: disable=g-import-not-at-top

  t5x_gin.add_gin_flags(parser, deprecated=('--gin_param',))
  args = t5x_gin.parse_args(parser, argv)

  import tasks  # noqa: F401  # pylint: disable=g-import-not-at-top,unused-import

  t5x_gin.parse_gin(args)
  start = time.time()
  if args.finalize:
    result = finalize(args.task, args.split, args.out, args.num_workers)
  else:
    result = prepare(
      args.task,
      args.split,
      args.out,
      worker=args.worker,
      num_workers=args.num_workers,
      shard_tokens=args.shard_tokens,
    )
  where = split_dir(args.out, args.task, args.split)
  print(
    f'{where}: {result["num_documents"]} documents'
    + (f', {result["num_tokens"]} tokens' if 'num_tokens' in result else '')
    + f', {len(result["shards"])} shard file(s), {time.time() - start:.1f} s'
  )


if __name__ == '__main__':
  main()
