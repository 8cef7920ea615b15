"""The training stream across host counts: resume on another process count, too few documents.

The data position is saved as T5X saves it: one file per process, named
`<checkpoint>/dataset/process_{i}-of-{n}/train_ds-{shard}-of-{shards}` (several processes) or
`<checkpoint>/dataset/train_ds-000-of-001` (one). A run resumed on another process count asks for
a file that was never written; it must still continue every row's document and chunk. The real
`t5x.train` version of this is in tests/test_t5x_multihost.py (slow).
"""

from __future__ import annotations

import numpy as np
import pytest
from stream_batches import DatasetConfig, assert_batches_equal

import tasks
from melodi_t5x import t5x_data

WORDS = 'the king queen castle river night sword crown letter garden storm ship island'.split()


CFG = DatasetConfig(
  mixture_or_task_name='text_corpus', task_feature_lengths={'targets': 16}, seed=3
)


@pytest.fixture
def corpus(tmp_path):
  """`count` text files of 20 to 120 words (2 to 10 chunks of 16 tokens)."""

  def make(count):
    folder = tmp_path / f'corpus{count}'
    folder.mkdir()
    rng = np.random.default_rng(count)
    for i in range(count):
      words = rng.choice(WORDS, size=int(rng.integers(20, 70)))
      (folder / f'doc{i:02d}.txt').write_text(' '.join(words) + '\n')
    tasks.configure('text_corpus', train_files=str(folder / '*.txt'), vocabulary_task='local_books')
    return folder

  yield make
  tasks.reset_config('text_corpus')


def _path(ckpt, process, processes):
  if processes == 1:
    (ckpt / 'dataset').mkdir(parents=True, exist_ok=True)
    return str(ckpt / 'dataset' / 'train_ds-000-of-001')
  folder = ckpt / 'dataset' / f'process_{process}-of-{processes}'
  folder.mkdir(parents=True, exist_ok=True)
  return str(folder / f'train_ds-{process:03d}-of-{processes:03d}')


def _hosts(processes, **kwargs):
  return [t5x_data.get_dataset(CFG, i, processes, **kwargs) for i in range(processes)]


def _global(hosts, steps):
  """`steps` global batches: the hosts' rows side by side."""
  out = []
  for _ in range(steps):
    batches = [next(h) for h in hosts]
    out.append({k: np.concatenate([b[k] for b in batches]) for k in batches[0]})
  return out


@pytest.mark.parametrize(
  'saved, resumed', [(2, 1), (1, 2), pytest.param(2, 4, marks=pytest.mark.slow)]
)
def test_resume_on_another_process_count_continues_every_row(corpus, tmp_path, saved, resumed):
  """Issue 16 item 1: 2 processes -> 1 raised FileNotFoundError in ChunkStream.restore."""
  corpus(10)
  steps, more = 5, 7
  hosts = _hosts(saved)
  _global(hosts, steps)
  ckpt = tmp_path / f'checkpoint_{steps}'
  for i, host in enumerate(hosts):
    host.save(_path(ckpt, i, saved))
  expected = _global(hosts, more)
  assert not all(b['start_of_sequence'].all() for b in expected)  # rows continue documents
  resumed_hosts = _hosts(resumed)
  for i, host in enumerate(resumed_hosts):
    host.restore(_path(ckpt, i, resumed))
  got = _global(resumed_hosts, more)
  assert_batches_equal(got, expected, keys=None)
  # Saved again on the new process count, it resumes on the first count too (same layout).
  ckpt2 = tmp_path / f'checkpoint_{steps + more}'
  for i, host in enumerate(resumed_hosts):
    host.save(_path(ckpt2, i, resumed))
  expected = _global(resumed_hosts, 3)
  back = _hosts(saved)
  for i, host in enumerate(back):
    host.restore(_path(ckpt2, i, saved))
  assert_batches_equal(_global(back, 3), expected, keys=None)


def test_stream_shards_fix_the_global_batch_for_any_process_count(corpus):
  corpus(10)
  one = _global(_hosts(1, stream_shards=2), 6)
  two = _global(_hosts(2, stream_shards=2), 6)
  assert_batches_equal(one, two, keys=None)


@pytest.mark.parametrize('processes', [1, 2])
def test_fewer_documents_than_rows_fails_on_every_host_at_start(corpus, processes):
  """Issue 16 item 6: the same document in several rows (silently), or one host stopping."""
  corpus(3)  # 3 documents, 4 rows
  for i in range(processes):  # every host, before any batch (no host waits for another)
    with pytest.raises(ValueError, match='at least as many documents as rows') as err:
      t5x_data.get_dataset(CFG, i, processes)
  print(err.value)
  corpus(1)  # fewer documents than hosts
  for i in range(processes):
    with pytest.raises(ValueError, match='has [01] document'):
      t5x_data.get_dataset(CFG, i, processes)


def test_prepared_stream_resumes_on_another_process_count(corpus, tmp_path):
  """The prepared stream's position is global: any process's file restores every host."""
  import gin  # pylint: disable=g-import-not-at-top

  from tasks import prepare  # pylint: disable=g-import-not-at-top

  corpus(10)
  root = str(tmp_path / 'prepared')
  prepare.prepare('text_corpus', 'train', root)
  gin.parse_config(f"tasks.PreparedDataConfig.root = '{root}'")
  try:
    hosts = _hosts(2)
    _global(hosts, 4)
    ckpt = tmp_path / 'checkpoint_4'
    for i, host in enumerate(hosts):
      host.save(_path(ckpt, i, 2))
    expected = _global(hosts, 5)
    one = _hosts(1)
    one[0].restore(_path(ckpt, 0, 1))
    assert_batches_equal(_global(one, 5), expected, keys=None)
    corpus_docs = 3  # fewer documents than the 4 global rows: every host stops at the start
    corpus(corpus_docs)
    prepare.prepare('text_corpus', 'train', root + '3')
    gin.parse_config(f"tasks.PreparedDataConfig.root = '{root}3'")
    for i in range(2):
      with pytest.raises(ValueError, match='3 document\\(s\\) for a global batch of 4 rows'):
        t5x_data.get_dataset(CFG, i, 2)
  finally:
    gin.clear_config()
