"""Ids and vocabularies: id layout of the chunker, host-side id range check, no modulo in the
model, embedding size against the task vocabulary (no t5x needed)."""

from __future__ import annotations

import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sentencepiece as spm
import seqio
import tensorflow as tf

import tasks
from melodi_t5x.architectures.xl import XLDecoder
from melodi_t5x.config import MelodiConfig, XLConfig
from tasks import preprocessors, streaming
from tasks import vocab as vocab_lib

_TEXT = ' '.join(f'word{i % 97} thing{i % 13} and more text' for i in range(400))


def _sentencepiece(tmp_path, **ids) -> seqio.SentencePieceVocabulary:
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
    sentence_iterator=iter(_TEXT.split(' and ')),
    model_writer=model,
    vocab_size=30,
    model_type='unigram',
    **ids,
  )
  path = tmp_path / 'sp.model'
  path.write_bytes(model.getvalue())
  return seqio.SentencePieceVocabulary(str(path))


def test_t5_layout_starts_documents_with_eos():
  assert vocab_lib.start_of_document_id(tasks.vocabulary('local_books')) == 1


def test_sentencepiece_default_layout_is_rejected_with_the_ids_and_the_fix(tmp_path):
  vocab = _sentencepiece(tmp_path)  # SentencePiece defaults: unk 0, bos 1, eos 2
  with pytest.raises(ValueError, match=r'unk 0, bos 1.*id 0 is the unk token.*pad_id=0 eos_id=1'):
    vocab_lib.start_of_document_id(vocab)


def test_other_eos_id_is_used_as_the_start_input(tmp_path):
  vocab = _sentencepiece(tmp_path, pad_id=0, unk_id=1, eos_id=2, bos_id=-1)
  assert vocab_lib.start_of_document_id(vocab) == 2
  docs = tf.data.Dataset.from_tensors({'targets': tf.constant([5, 6, 7]), 'document_id': 3})
  features = {'targets': seqio.Feature(vocab)}
  (chunk,) = list(preprocessors.chunk_documents(docs, {'targets': 4}, features).as_numpy_iterator())
  np.testing.assert_array_equal(chunk['inputs'], [2, 5, 6, 0])
  np.testing.assert_array_equal(chunk['loss_weights'], [1, 1, 1, 0])


def test_chunker_marks_real_tokens_by_position():
  out = preprocessors.chunk_tokens(tf.constant([4, 9, 4, 8, 3]), tf.constant(7), 3, start_id=1)
  np.testing.assert_array_equal(out['loss_weights'], [[1, 1, 1], [1, 1, 0]])
  np.testing.assert_array_equal(out['inputs'], [[1, 4, 9], [4, 8, 0]])


def test_stream_weights_come_from_the_chunker_not_from_ids():
  chunks = [
    {
      'targets': np.array([5, 6, 0, 0], np.int32),
      'inputs': np.array([1, 5, 6, 0], np.int32),
      'loss_weights': np.array([1, 1, 1, 0], np.int32),  # a real token with id 0 is still scored
      'document_id': 1,
      'chunk_index': 0,
    }
  ]
  it = streaming.DocumentStreamIterator(
    chunks, batch_size=1, chunk_length=4, shuffle=False, repeat=False
  )
  np.testing.assert_array_equal(next(it)['decoder_loss_weights'], [[1, 1, 1, 0]])


def test_out_of_range_ids_stop_the_stream():
  ids = np.array([[3, 4096]], np.int32)
  with pytest.raises(ValueError, match=r'outside the vocabulary \[0, 4096\) \(documents \[11\]\)'):
    streaming.check_token_ids(ids, ids, 4096, np.array([11]))
  streaming.check_token_ids(ids - 1, ids - 1, 4096, np.array([11]))  # in range: no error


def test_embedding_smaller_than_the_vocabulary_is_refused():
  cfg = MelodiConfig(
    num_layers=1, embed_dim=8, num_heads=1, head_dim=8, vocab_size=1024, long_term_memory_layers=()
  )
  with pytest.raises(ValueError, match=r'4096 ids but the model embedding has only 1024 rows'):
    vocab_lib.check_embedding_fits(tasks.vocabulary('local_books').vocab_size, cfg)
  vocab_lib.check_embedding_fits(1024, cfg)


def test_embedding_size_follows_the_task_vocabulary():
  assert tasks.embedding_size('local_books') == 4096
  assert tasks.embedding_size('local_books', multiple=1000) == 5000


def test_model_does_not_wrap_ids():
  cfg = XLConfig(
    num_layers=1, embed_dim=8, num_heads=1, head_dim=8, mlp_dim=8, vocab_size=16, window_length=4
  )
  model = XLDecoder(cfg)
  tokens = jnp.array([[1, 2, 3, 4]])
  params = model.init(jax.random.PRNGKey(0), tokens, enable_dropout=False)
  wrapped = model.apply(params, tokens + 16, enable_dropout=False)
  assert not np.allclose(wrapped, model.apply(params, tokens, enable_dropout=False))
