"""The generic task `text_corpus`, vocabularies of any registered task, ids from position."""

from __future__ import annotations

import gzip
import json

import gin
import numpy as np
import pytest
import seqio

import tasks
from melodi_t5x.report import PerplexityAccumulator
from tasks import prepare
from tasks.prepared_stream import PreparedStreamIterator
from tasks.streaming import DocumentStreamIterator

TEXTS = [
  'To be, or not to be, that is the question.\nWhether tis nobler in the mind to suffer',
  'Now is the winter of our discontent\nMade glorious summer by this sun of York.',
  'To be, or not to be, that is the question.\nWhether tis nobler in the mind to suffer',
]


@pytest.fixture
def book_folder(tmp_path):
  folder = tmp_path / 'books'
  folder.mkdir()
  for i, text in enumerate(TEXTS):  # books 0 and 2 are identical
    (folder / f'book{i}.txt').write_text(text)
  tasks.configure(
    'text_corpus', test_files=str(folder / '*.txt'), vocabulary_task='local_books', chunk_length=16
  )
  yield folder
  tasks.reset_config('text_corpus')


def score_all(batches) -> PerplexityAccumulator:
  acc = PerplexityAccumulator([0])
  for b in batches:
    nll = np.zeros(b['decoder_target_tokens'].shape)
    acc.add(nll, b['decoder_loss_weights'], b['document_id'], b['chunk_index'], b['row_valid'])
  return acc


def test_text_folder_task_identical_documents_are_two_documents(book_folder, tmp_path):
  vocab = tasks.vocabulary('text_corpus')
  assert vocab.vocab_size == tasks.vocabulary('local_books').vocab_size == 4096
  task = seqio.get_mixture_or_task('text_corpus')
  chunks = list(task.get_dataset(split='test', shuffle=False).as_numpy_iterator())
  docs: dict[int, list[int]] = {}
  for ex in chunks:
    docs.setdefault(int(ex['document_id']), []).extend(int(t) for t in ex['targets'] if t)
  assert len(docs) == 3  # the two identical texts have different (positional) ids
  assert [vocab.decode(t) for t in docs.values()] == TEXTS
  total = sum(len(t) for t in docs.values())

  # The report counts both copies (content-hash ids made it raise 'scored twice').
  fly = list(
    DocumentStreamIterator('text_corpus', split='test', batch_size=2, shuffle=False, repeat=False)
  )
  acc = score_all(fly)
  assert acc.documents == 3 and acc.tokens == total

  # Prepared from the command line, read back: same batches.
  root = str(tmp_path / 'prepared')
  prepare.main(['--task=text_corpus', '--split=test', f'--out={root}'])
  data = prepare.open_for_task(root, 'text_corpus', 'test')
  ours = list(
    PreparedStreamIterator(data, batch_size=2, chunk_length=16, shuffle=False, repeat=False)
  )
  assert len(ours) == len(fly)
  for x, y in zip(fly, ours):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)
  checksums = data.index['checksum']
  assert checksums[0] == checksums[2] != checksums[1]  # the content hash is kept as a checksum


def test_text_corpus_jsonl_from_gin(tmp_path):
  path = tmp_path / 'docs.jsonl'
  path.write_text('\n'.join(json.dumps({'body': t}) for t in TEXTS[:2]) + '\n')
  gin.parse_config(
    [
      "tasks.TextCorpusConfig.source = 'jsonl'",
      f"tasks.TextCorpusConfig.validation_files = '{path}'",
      "tasks.TextCorpusConfig.text_field = 'body'",
      "tasks.TextCorpusConfig.vocabulary_task = 'local_books'",
    ]
  )
  try:
    task = seqio.get_mixture_or_task('text_corpus')
    ds = task.get_dataset(sequence_length={'targets': 8}, split='validation', shuffle=False)
    ids = sorted({int(ex['document_id']) for ex in ds.as_numpy_iterator()})
    assert ids == [0, 1]  # file 0, rows 0 and 1
    with pytest.raises(FileNotFoundError, match='tasks.TextCorpusConfig.test_files'):
      tasks.configure('text_corpus', test_files='nothing/*.txt', data_dir=str(tmp_path))
      task.get_dataset(split='test', shuffle=False)
  finally:
    gin.clear_config()
    tasks.reset_config('text_corpus')


def test_vocabulary_of_any_registered_task():
  vocab = seqio.SentencePieceVocabulary(tasks.config.LOCAL_BOOKS_VOCABULARY_PATH)
  seqio.TaskRegistry.remove('h10_user_task')
  seqio.TaskRegistry.add(
    'h10_user_task',
    source=seqio.FunctionDataSource(lambda split, shuffle_files: None, splits=['test']),
    preprocessors=[],
    output_features={'targets': seqio.Feature(vocab)},
  )
  try:
    assert tasks.vocabulary('h10_user_task') is vocab
  finally:
    seqio.TaskRegistry.remove('h10_user_task')
  with pytest.raises(ValueError, match='text_corpus'):
    tasks.vocabulary('heldout_austen')


def _documents(split='test'):
  task = seqio.get_mixture_or_task('text_corpus')
  ds = task.get_dataset(sequence_length={'targets': 16}, split=split, shuffle=False)
  return sorted({int(ex['document_id']) for ex in ds.as_numpy_iterator()})


def test_undecodable_files_are_named_with_the_byte_offset_before_any_reading(tmp_path, caplog):
  """Issue 27 item 5: a non-UTF-8 file used to crash training when the stream reached it."""
  folder = tmp_path / 'books'
  folder.mkdir()
  (folder / 'a.txt').write_text(TEXTS[0])
  (folder / 'b.txt').write_bytes('Ros\u00e9 and caf\u00e9. '.encode() * 300 + b'na\xefve')
  (folder / 'c.txt').write_text(TEXTS[1])
  (folder / 'd.txt.gz').write_bytes(gzip.compress(b'\xff' + b'x' * 10))
  bad_offset = len('Ros\u00e9 and caf\u00e9. '.encode()) * 300 + 2
  tasks.configure('text_corpus', test_files=str(folder / '*'), vocabulary_task='local_books')
  try:
    task = seqio.get_mixture_or_task('text_corpus')
    with pytest.raises(ValueError, match='not UTF-8') as error:
      task.get_dataset(split='test', shuffle=False)  # before any document is read
    print(error.value)
    message = str(error.value)
    assert f'{folder}/b.txt (byte {bad_offset})' in message
    assert f'{folder}/d.txt.gz (byte 0)' in message and '2 of the 4 files' in message
    assert "tasks.TextCorpusConfig.undecodable_files = 'skip'" in message
    # 'skip': the other files are read, ids unchanged (file index 0 and 2), the skipped counted.
    tasks.configure('text_corpus', undecodable_files='skip')
    caplog.set_level('WARNING')
    assert _documents() == [0, 2 * 2**40]
    assert 'skipping 2 of the 4 files' in caplog.text and f'{folder}/b.txt (byte' in caplog.text
    tasks.configure('text_corpus', undecodable_files='ignore')
    with pytest.raises(ValueError, match=r"undecodable_files must be one of \('fail', 'skip'\)"):
      _documents()
  finally:
    tasks.reset_config('text_corpus')


def test_empty_corpus_files_are_named(tmp_path, caplog):
  """Issue 27 item 5: empty files gave 'the eval dataset produced no batches' at best."""
  folder = tmp_path / 'books'
  folder.mkdir()
  (folder / 'a.txt').write_text(TEXTS[0])
  (folder / 'empty.txt').write_text('')
  tasks.configure('text_corpus', test_files=str(folder / '*.txt'), vocabulary_task='local_books')
  try:
    caplog.set_level('WARNING')
    assert _documents() == [0]
    assert '1 of the 2 files of tasks.TextCorpusConfig.test_files are empty' in caplog.text
    assert f'{folder}/empty.txt' in caplog.text
    (folder / 'a.txt').write_text('')
    with pytest.raises(ValueError, match='no file of tasks.TextCorpusConfig.test_files has text'):
      _documents()
    # JSONL without rows is empty too.
    (folder / 'rows.jsonl').write_text('')
    tasks.configure('text_corpus', source='jsonl', test_files=str(folder / '*.jsonl'))
    with pytest.raises(ValueError, match=f'empty: {folder}/rows.jsonl'):
      _documents()
  finally:
    tasks.reset_config('text_corpus')
