"""Tests of the seqio tasks, the chunking preprocessor, settings and errors (no network)."""

from __future__ import annotations

import gzip
import json
import os
import pathlib
import re
import subprocess
import sys

import gin
import numpy as np
import pytest
import sentencepiece as spm
import seqio
import tensorflow as tf

import tasks
from tasks import config as config_lib
from tasks import preprocessors, sources, train_vocab

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _reset_settings():
  tasks.reset_config()
  yield
  tasks.reset_config()


class _Tokenizer:
  """Whole-document tokenization with the committed local_books model, independent of the tasks.

  `encode` uses the TF SentencePiece op (as seqio's pipeline does): tensorflow-text's op and the
  python sentencepiece package segment a few rare words differently (e.g. one token of Macbeth),
  so the python package serves only for decoding and the id layout.
  """

  def __init__(self):
    path = config_lib.LOCAL_BOOKS_VOCABULARY_PATH
    self.sp = spm.SentencePieceProcessor(model_file=path)
    self._vocab = seqio.SentencePieceVocabulary(path)

  def encode(self, text: str) -> list[int]:
    return self._vocab.encode_tf(tf.constant(text)).numpy().tolist()

  def decode(self, ids: list[int]) -> str:
    return self.sp.decode(ids)


@pytest.fixture(scope='module')
def local_sp() -> _Tokenizer:
  return _Tokenizer()


def _chunks(ds: tf.data.Dataset) -> list[dict[str, np.ndarray]]:
  return list(ds.as_numpy_iterator())


def _tokenized_docs(docs: dict[int, list[int]]) -> tf.data.Dataset:
  def gen():
    for doc_id, toks in docs.items():
      yield {'targets': np.asarray(toks, np.int32), 'document_id': np.int64(doc_id)}

  return tf.data.Dataset.from_generator(
    gen,
    output_signature={
      'targets': tf.TensorSpec([None], tf.int32),
      'document_id': tf.TensorSpec([], tf.int64),
    },
  )


# ------------------------------------------------------------------------------------------------
# Chunking.


@pytest.mark.parametrize('length', [1, 4, 7])
def test_chunk_boundaries_and_one_token_overlap(length):
  rng = np.random.default_rng(length)
  sizes = [1, length - 1, length, length + 1, 3 * length + 2, 0]
  docs = {
    100 + k: [int(x) for x in rng.integers(3, 50, size=n)] for k, n in enumerate(sizes) if n > 0
  }
  docs[999] = []  # empty documents are dropped
  out = _chunks(preprocessors.chunk_documents(_tokenized_docs(docs), chunk_length=length))
  by_doc: dict[int, list[dict]] = {}
  for ex in out:
    by_doc.setdefault(int(ex['document_id']), []).append(ex)
  assert set(by_doc) == {d for d, t in docs.items() if t}
  for doc_id, chunks in by_doc.items():
    toks = docs[doc_id]
    assert len(chunks) == -(-len(toks) // length)
    assert [int(c['chunk_index']) for c in chunks] == list(range(len(chunks)))
    assert [bool(c['start_of_sequence']) for c in chunks] == [True] + [False] * (len(chunks) - 1)
    targets = np.concatenate([c['targets'] for c in chunks])
    inputs = np.concatenate([c['inputs'] for c in chunks])
    assert all(c['targets'].shape == (length,) and c['targets'].dtype == np.int32 for c in chunks)
    # Every token is a target exactly once, in order; padding (0) only after the last token.
    np.testing.assert_array_equal(targets[: len(toks)], toks)
    assert not targets[len(toks) :].any()
    # Inputs: the start-of-document id, then each token predicts the next one.
    np.testing.assert_array_equal(inputs[: len(toks)], [tasks.START_OF_DOCUMENT_ID] + toks[:-1])
    assert not inputs[len(toks) :].any()
    for prev, cur in zip(chunks, chunks[1:]):
      assert cur['inputs'][0] == prev['targets'][-1]  # the one-token overlap


def test_sequence_length_sets_chunk_length():
  task = seqio.get_mixture_or_task('local_books')
  ds = task.get_dataset(
    sequence_length={'targets': 96}, split='validation', shuffle=False, use_cached=False
  )
  ex = next(ds.as_numpy_iterator())
  assert ex['targets'].shape == (96,) and ex['inputs'].shape == (96,)
  tasks.configure('local_books', chunk_length=40)
  ds = task.get_dataset(sequence_length=None, split='validation', shuffle=False)
  assert next(ds.as_numpy_iterator())['targets'].shape == (40,)


# ------------------------------------------------------------------------------------------------
# local_books.


def test_local_books_split_by_document():
  splits = {s: sources.local_books_split(s) for s in sources.SPLITS}
  ids = [d for s in splits.values() for d, _, _ in s]
  assert len(ids) == len(set(ids)) == 38
  assert sorted(n for _, n, _ in splits['validation']) == sorted(sources.LOCAL_BOOKS_VALIDATION)
  assert sorted(n for _, n, _ in splits['test']) == sorted(sources.LOCAL_BOOKS_TEST)
  assert len(splits['train']) == 32


def test_local_books_vocabulary_layout(local_sp):
  vocab = tasks.vocabulary('local_books')
  assert vocab.vocab_size == local_sp.sp.get_piece_size() == 4096
  assert (vocab.pad_id, vocab.eos_id, vocab.unk_id) == (0, 1, 2)
  assert local_sp.sp.bos_id() == -1
  assert local_sp.sp.id_to_piece(3) == '\n'


def test_no_token_lost_or_duplicated_over_a_split(local_sp):
  """Whole validation split: chunk targets == the text tokenized independently, per document."""
  length = 256
  task = seqio.get_mixture_or_task('local_books')
  ds = task.get_dataset(sequence_length={'targets': length}, split='validation', shuffle=False)
  got: dict[int, list[np.ndarray]] = {}
  for ex in ds.as_numpy_iterator():
    got.setdefault(int(ex['document_id']), []).append(ex['targets'])
  expected_total = 0
  for doc_id, name, path in sources.local_books_split('validation'):
    text = pathlib.Path(path).read_text(encoding='utf-8')
    ids = local_sp.encode(text)
    expected_total += len(ids)
    targets = np.concatenate(got[doc_id])
    real = targets[targets != 0]
    assert len(real) == len(ids), name
    np.testing.assert_array_equal(real, ids)
    assert not targets[len(ids) :].any()
    assert local_sp.decode(real.tolist()) == text  # lossless: newlines and spaces kept
  assert set(got) == {d for d, _, _ in sources.local_books_split('validation')}
  assert sum(int((np.concatenate(c) != 0).sum()) for c in got.values()) == expected_total


@pytest.mark.slow
def test_import_needs_no_data_and_vocab_found_from_any_directory(tmp_path):
  code = (
    'import tasks, seqio\n'
    'print(sorted(n for n in seqio.TaskRegistry.names() if n in tasks.TASK_NAMES))\n'
    "ex = next(seqio.get_mixture_or_task('local_books').get_dataset("
    "sequence_length={'targets': 32}, split='test', shuffle=False).as_numpy_iterator())\n"
    "print(repr(tasks.vocabulary('local_books').decode(ex['targets'].tolist())))\n"
  )
  env = dict(os.environ, PYTHONPATH=str(REPO), TFDS_DATA_DIR=str(tmp_path / 'none'))
  proc = subprocess.run(
    [sys.executable, '-c', code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.strip().splitlines()
  assert lines[0] == str(sorted(tasks.TASK_NAMES))
  assert 'Hamlet' in lines[1] or 'Twelfth' in lines[1] or 'Richard' in lines[1]


def test_train_vocab_is_deterministic_with_t5_layout():
  texts = [p.read_text(encoding='utf-8')[:60000] for p in sorted(REPO.glob('tasks/*.py'))]
  texts += [
    pathlib.Path(p).read_text(encoding='utf-8')[:60000]
    for _, _, p in sources.local_books_split('test')
  ]
  a = train_vocab.train_sentencepiece(texts, vocab_size=300)
  b = train_vocab.train_sentencepiece(texts, vocab_size=300)
  assert a == b
  sp = spm.SentencePieceProcessor(model_proto=a)
  assert sp.get_piece_size() == 300
  assert (sp.pad_id(), sp.eos_id(), sp.unk_id(), sp.bos_id()) == (0, 1, 2, -1)
  assert sp.decode(sp.encode('To be,  or not\nto be')) == 'To be,  or not\nto be'


# ------------------------------------------------------------------------------------------------
# Settings from gin and Python.


def test_settings_from_gin_and_python():
  with gin.unlock_config():
    gin.parse_config(
      ['tasks.LocalBooksConfig.chunk_length = 128', "tasks.Pg19T5Config.data_dir = '/x/tfds'"]
    )
  try:
    assert tasks.get_config('local_books').chunk_length == 128
    assert tasks.get_config('pg19_t5').data_dir == '/x/tfds'
    task = seqio.get_mixture_or_task('local_books')
    ex = next(task.get_dataset(split='test', shuffle=False).as_numpy_iterator())
    assert ex['targets'].shape == (128,)
    tasks.configure('local_books', chunk_length=64)  # Python overrides win over gin
    assert tasks.get_config('local_books').chunk_length == 64
    with pytest.raises(ValueError, match='no field'):
      tasks.configure('local_books', chunk_len=3)
  finally:
    gin.clear_config()
  assert tasks.get_config('pg19_t5').data_dir is None


# ------------------------------------------------------------------------------------------------
# C4 (JSON shard layout) and arXiv (JSONL / TFRecord) with tiny in-test data.


def _write_jsonl_gz(path: pathlib.Path, rows: list[dict]) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  with gzip.open(path, 'wt', encoding='utf-8') as f:
    for row in rows:
      f.write(json.dumps(row) + '\n')


def _doc_texts(n: int) -> list[str]:
  """n real text snippets of varied lengths (from the plays)."""
  text = pathlib.Path(sources.local_books_split('test')[0][2]).read_text(encoding='utf-8')
  rng = np.random.default_rng(0)
  out = []
  for _ in range(n):
    start, size = int(rng.integers(0, len(text) - 3000)), int(rng.integers(20, 2500))
    out.append(text[start : start + size])
  return out


def _use_local_vocab(task_name: str) -> None:
  tasks.configure(
    task_name, vocabulary_path=config_lib.LOCAL_BOOKS_VOCABULARY_PATH, vocabulary_extra_ids=0
  )


def _task_docs(task_name: str, split: str) -> dict[int, np.ndarray]:
  ds = seqio.get_mixture_or_task(task_name).get_dataset(split=split, shuffle=False)
  docs: dict[int, list[np.ndarray]] = {}
  for ex in ds.as_numpy_iterator():
    docs.setdefault(int(ex['document_id']), []).append(ex['targets'])
  return {k: np.concatenate(v) for k, v in docs.items()}


def test_c4_length_filter_and_split_stand_in(tmp_path, local_sp):
  texts = _doc_texts(40)
  for shard in range(8):  # validation shards 0-3 -> 'validation', 4-7 -> 'test'
    rows = [{'text': t, 'url': f'u{shard}-{i}'} for i, t in enumerate(texts[shard * 5 :][:5])]
    _write_jsonl_gz(tmp_path / f'en/c4-validation.{shard:05d}-of-00008.json.gz', rows)
  min_tokens = 300
  _use_local_vocab('c4_4k')
  tasks.configure('c4_4k', source='json', data_dir=str(tmp_path), min_document_tokens=min_tokens)
  tasks.configure('c4_4k', chunk_length=64)
  for split, shard_range in (('validation', range(0, 4)), ('test', range(4, 8))):
    candidates = [t for s in shard_range for t in texts[s * 5 :][:5]]
    expected = sorted(
      len(local_sp.encode(t)) for t in candidates if len(local_sp.encode(t)) >= min_tokens
    )
    assert 0 < len(expected) < len(candidates)  # the filter keeps some and drops some
    docs = _task_docs('c4_4k', split)
    assert sorted(int((d != 0).sum()) for d in docs.values()) == expected


def test_arxiv_jsonl_filter_and_tfrecord(tmp_path, local_sp):
  texts = _doc_texts(9)
  rows = [
    {'text': t, 'meta': {'config': 'arxiv' if i % 3 else 'books'}} for i, t in enumerate(texts)
  ]
  _write_jsonl_gz(tmp_path / 'test/proofpile_test.jsonl.gz', rows)
  _use_local_vocab('arxiv_math')
  tasks.configure('arxiv_math', data_dir=str(tmp_path), chunk_length=64)
  docs = _task_docs('arxiv_math', 'test')
  expected = sorted(len(local_sp.encode(t)) for i, t in enumerate(texts) if i % 3)
  assert sorted(int((d != 0).sum()) for d in docs.values()) == expected

  path = tmp_path / 'records' / 'part-0.tfrecord'
  path.parent.mkdir()
  with tf.io.TFRecordWriter(str(path)) as w:
    for t in texts[:4]:
      feat = {'body': tf.train.Feature(bytes_list=tf.train.BytesList(value=[t.encode()]))}
      w.write(tf.train.Example(features=tf.train.Features(feature=feat)).SerializeToString())
  tasks.configure(
    'arxiv_math', file_format='tfrecord', text_field='body', validation_files='records/*.tfrecord'
  )
  docs = _task_docs('arxiv_math', 'validation')
  assert sorted(int((d != 0).sum()) for d in docs.values()) == sorted(
    len(local_sp.encode(t)) for t in texts[:4]
  )


# ------------------------------------------------------------------------------------------------
# Clear errors naming the setting to fix.


def _get(task_name: str, split: str = 'train'):
  return seqio.get_mixture_or_task(task_name).get_dataset(split=split, shuffle=False)


def test_error_missing_tfds_data_dir(tmp_path):
  tasks.configure('pg19_t5', data_dir=str(tmp_path / 'missing'))
  with pytest.raises(FileNotFoundError, match=r'tasks\.Pg19T5Config\.data_dir'):
    _get('pg19_t5')
  tasks.configure('pg19_t5', data_dir=str(tmp_path))  # exists, but pg19 is not prepared there
  with pytest.raises(FileNotFoundError, match=r'pg19/0\.1\.1.*tasks\.Pg19T5Config\.data_dir'):
    _get('pg19_t5')
  tasks.configure('c4_4k', data_dir=str(tmp_path))
  with pytest.raises(FileNotFoundError, match=r'c4/en/3\.0\.1.*tasks\.C4Config\.data_dir'):
    _get('c4_4k', 'test')


def test_error_missing_vocabulary_file(tmp_path):
  tasks.configure('local_books', vocabulary_path=str(tmp_path / 'nope.model'))
  with pytest.raises(FileNotFoundError, match=r'tasks\.LocalBooksConfig\.vocabulary_path'):
    _get('local_books', 'test')
  _write_jsonl_gz(tmp_path / 'train/proofpile_train_0.jsonl.gz', [{'text': 'x', 'meta': {}}])
  tasks.configure('arxiv_math', data_dir=str(tmp_path))
  with pytest.raises(ValueError, match=r'tasks\.ArxivMathConfig\.vocabulary_path.*train_vocab'):
    _get('arxiv_math')


def test_error_missing_data_files(tmp_path):
  with pytest.raises(ValueError, match=r'tasks\.ArxivMathConfig\.data_dir'):
    _get('arxiv_math')
  tasks.configure('arxiv_math', data_dir=str(tmp_path / 'missing'))
  with pytest.raises(FileNotFoundError, match=r'tasks\.ArxivMathConfig\.data_dir'):
    _get('arxiv_math')
  tasks.configure('arxiv_math', data_dir=str(tmp_path))
  with pytest.raises(FileNotFoundError, match=r'tasks\.ArxivMathConfig\.train_files'):
    _get('arxiv_math')
  tasks.configure('c4_4k', source='json', data_dir=str(tmp_path))
  with pytest.raises(FileNotFoundError, match=r'tasks\.C4Config\.json_validation_files'):
    _get('c4_4k', 'validation')
  tasks.configure('c4_4k', source='hdf5')
  with pytest.raises(ValueError, match=r'tasks\.C4Config\.source'):
    _get('c4_4k', 'validation')


# ------------------------------------------------------------------------------------------------
# TFDS sources (pg19_t5, c4_4k) on tiny prepared TFDS datasets written here.


@pytest.fixture(scope='module')
def tfds_dir(tmp_path_factory) -> pathlib.Path:
  """Prepared `pg19/0.1.1` and `c4/en/3.0.1` TFDS directories with a few real text snippets."""
  import importlib.resources

  import tensorflow_datasets as tfds

  root = tmp_path_factory.mktemp('tfds')
  texts = _doc_texts(16)
  # TFDS 4.9.10's writer imports the `importlib_resources` backport (not a dependency here; the
  # reading path does not need it); the standard library module has the same API on 3.11.
  saved = sys.modules.get('importlib_resources')
  sys.modules['importlib_resources'] = importlib.resources
  try:
    tfds.dataset_builders.store_as_tfds_dataset(
      name='pg19',
      version='0.1.1',
      data_dir=root,
      features=tfds.features.FeaturesDict(
        {'book_text': tfds.features.Text(), 'book_id': np.int32, 'book_title': np.str_}
      ),
      split_datasets={
        s: tf.data.Dataset.from_tensor_slices(
          {
            'book_text': texts[4 * k : 4 * k + 4],
            'book_id': [100 * k + i for i in range(4)],
            'book_title': ['title'] * 4,
          }
        )
        for k, s in enumerate(sources.SPLITS)
      },
    )
    tfds.dataset_builders.store_as_tfds_dataset(
      name='c4',
      config='en',
      version='3.0.1',
      data_dir=root,
      features=tfds.features.FeaturesDict({'text': tfds.features.Text()}),
      split_datasets={
        'train': tf.data.Dataset.from_tensor_slices({'text': texts[:4]}),
        'validation': tf.data.Dataset.from_tensor_slices({'text': texts[4:]}),
      },
      disable_shuffling=True,
    )
  finally:
    if saved is None:
      del sys.modules['importlib_resources']
    else:
      sys.modules['importlib_resources'] = saved
  return root


def test_pg19_reads_prepared_tfds(tfds_dir, local_sp):
  _use_local_vocab('pg19_t5')
  tasks.configure('pg19_t5', data_dir=str(tfds_dir), chunk_length=64)
  texts = _doc_texts(16)
  for k, split in enumerate(sources.SPLITS):
    docs = _task_docs('pg19_t5', split)
    assert sorted(docs) == [100 * k + i for i in range(4)]  # TFDS book_id is the document id
    for i in range(4):
      d = docs[100 * k + i]
      np.testing.assert_array_equal(d[d != 0], local_sp.encode(texts[4 * k + i]))


def test_c4_tfds_length_filter_and_test_stand_in(tfds_dir, local_sp):
  _use_local_vocab('c4_4k')
  validation = _doc_texts(16)[4:]  # C4's validation split: 12 documents, halves of 6
  lengths = [len(local_sp.encode(t)) for t in validation]
  # A threshold that keeps some and drops some documents of each half.
  min_tokens = next(
    n
    for n in sorted(lengths)
    if all(min(lengths[h:][:6]) < n <= max(lengths[h:][:6]) for h in (0, 6))
  )
  tasks.configure('c4_4k', data_dir=str(tfds_dir), chunk_length=64, min_document_tokens=min_tokens)
  for split, texts in (('validation', validation[:6]), ('test', validation[6:])):
    lengths = [len(local_sp.encode(t)) for t in texts]
    expected = sorted(n for n in lengths if n >= min_tokens)
    assert 0 < len(expected) < len(texts)
    docs = _task_docs('c4_4k', split)
    assert sorted(int((d != 0).sum()) for d in docs.values()) == expected


def test_train_vocab_command_suggested_by_the_missing_vocabulary_error_works(tmp_path):
  """Issue 27 item 1: the error of a task without a vocabulary names a command that works."""
  folder = tmp_path / 'corpus'
  folder.mkdir()
  for i, (_, _, path) in enumerate(sources.local_books_split('test')[:2]):
    (folder / f'play{i}.txt').write_text(pathlib.Path(path).read_text(encoding='utf-8')[:40000])
  data = f"--gin.tasks.TextCorpusConfig.train_files='{folder}/*.txt'"  # as the shell passes it
  gin.parse_config(f"tasks.TextCorpusConfig.train_files='{folder}/*.txt'")
  try:
    with pytest.raises(ValueError, match='has no vocabulary') as error:
      _get('text_corpus')
    command = re.search(r'python -m (tasks\.train_vocab [^,]*)', str(error.value)).group(1).split()
    assert command[0] == 'tasks.train_vocab'
    prefix = tmp_path / 'spm' / 'own'
    args = [a.replace('/path/spm', str(prefix)) for a in command[1:]]
    train_vocab.main([*args, data, '--vocab_size=300'])
  finally:
    gin.clear_config()
  sp = spm.SentencePieceProcessor(model_file=f'{prefix}.model')
  assert sp.get_piece_size() == 300
