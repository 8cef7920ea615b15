"""seqio preprocessors: document filtering and chunking into fixed-length training chunks.

Chunk layout (one example per chunk, all chunks of a document consecutive and in order):

  targets            int32 [L]  tokens t[c*L : (c+1)*L] of the document, 0-padded at the end
  inputs             int32 [L]  the same window shifted right by one: inputs[0] is the last token
                                of the previous chunk, or the vocabulary's EOS for chunk 0; 0 where
                                targets is padding
  loss_weights       int32 [L]  1 on the document's tokens, 0 on padding (marked by position, so
                                a real token is never mistaken for padding)
  start_of_sequence  bool  []   True exactly for chunk 0 (the model resets its memory)
  document_id        int64 []   id of the document (stable; unique within a split)
  chunk_index        int32 []   c, the position of the chunk in its document

Every token of a document is a target exactly once: token 0 is predicted from the
start-of-document input, token i > 0 from token i-1 (across chunk boundaries too, through the
one-token overlap). Padding has target 0 and loss weight 0. The vocabulary's id layout is checked
(`tasks.vocab.start_of_document_id`): id 0 must not be a real token.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import tensorflow as tf

from tasks import vocab as vocab_lib

# Input token at the first position of a document. 0 is padding (and T5X's decoder BOS), so using
# it would make the first real position look like padding to anything that masks inputs == 0.
# EOS (1 in every T5-layout vocabulary) is what an LM reading concatenated documents sees before a
# new document, and it is never a target here.
START_OF_DOCUMENT_ID = 1


def rekey_text(dataset: tf.data.Dataset) -> tf.data.Dataset:
  """`{'text', 'document_id'}` -> `{'targets', 'document_id'}` (text to be tokenized)."""
  return dataset.map(
    lambda ex: {'targets': ex['text'], 'document_id': tf.cast(ex['document_id'], tf.int64)},
    num_parallel_calls=tf.data.AUTOTUNE,
  )


def filter_min_tokens(
  dataset: tf.data.Dataset, min_tokens: int | Callable[[], int], feature: str = 'targets'
) -> tf.data.Dataset:
  """Keeps documents with at least `min_tokens` tokens (the C4(4K+) filter)."""
  n = min_tokens() if callable(min_tokens) else min_tokens
  if n < 0:
    raise ValueError(f'min_tokens must be >= 0, got {n}.')
  return dataset.filter(lambda ex: tf.size(ex[feature]) >= n)


def drop_empty(dataset: tf.data.Dataset, feature: str = 'targets') -> tf.data.Dataset:
  """Drops documents without tokens (nothing to predict)."""
  return dataset.filter(lambda ex: tf.size(ex[feature]) > 0)


def resolve_chunk_length(
  sequence_length: Mapping[str, int | None] | None,
  chunk_length: int | Callable[[], int] | None,
) -> int:
  """`sequence_length['targets']` when given, else `chunk_length` (an int or a getter)."""
  length = None
  if sequence_length and sequence_length.get('targets'):
    length = sequence_length['targets']
  elif chunk_length is not None:
    length = chunk_length() if callable(chunk_length) else chunk_length
  if not isinstance(length, int) or length < 1:
    raise ValueError(f'Chunk length must be a positive int, got {length!r}.')
  return length


def chunk_tokens(
  tokens: tf.Tensor, document_id: tf.Tensor, chunk_length: int, start_id: int
) -> dict[str, tf.Tensor]:
  """Splits one tokenized document `[N]` into `[C, L]` chunk features (see module docstring)."""
  tokens = tf.cast(tokens, tf.int32)
  n = tf.size(tokens)
  num_chunks = tf.maximum((n + chunk_length - 1) // chunk_length, 1)
  pad = num_chunks * chunk_length - n
  targets = tf.reshape(tf.pad(tokens, [[0, pad]]), [num_chunks, chunk_length])
  shifted = tf.concat([tf.constant([start_id], tf.int32), tokens], axis=0)[:n]
  inputs = tf.reshape(tf.pad(shifted, [[0, pad]]), [num_chunks, chunk_length])
  real = tf.reshape(tf.range(num_chunks * chunk_length) < n, [num_chunks, chunk_length])
  inputs = tf.where(real, inputs, tf.zeros_like(inputs))
  chunk_index = tf.range(num_chunks, dtype=tf.int32)
  return {
    'targets': targets,
    'inputs': inputs,
    'loss_weights': tf.cast(real, tf.int32),
    'start_of_sequence': tf.equal(chunk_index, 0),
    'document_id': tf.fill([num_chunks], tf.cast(document_id, tf.int64)),
    'chunk_index': chunk_index,
  }


def chunk_documents(
  dataset: tf.data.Dataset,
  sequence_length: Mapping[str, int | None] | None = None,
  output_features: Mapping[str, object] | None = None,
  *,
  chunk_length: int | Callable[[], int] | None = None,
  start_id: int | None = None,
) -> tf.data.Dataset:
  """Turns tokenized documents `{'targets': [N], 'document_id'}` into per-chunk examples.

  Args:
    dataset: tokenized documents; empty documents are dropped.
    sequence_length: seqio's feature lengths; `sequence_length['targets']`, when set, is the chunk
      length (so T5X's TASK_FEATURE_LENGTHS applies).
    chunk_length: the chunk length otherwise (an int, or a getter reading the task's settings).
    output_features: seqio's output features (passed by seqio); the targets vocabulary's id layout
      is checked and its EOS is the input of a document's first position.
    start_id: that input explicitly (default: the vocabulary's EOS, or START_OF_DOCUMENT_ID when
      no vocabulary is given).

  Returns:
    One example per chunk, in document order then chunk order.
  """
  length = resolve_chunk_length(sequence_length, chunk_length)
  if start_id is None:
    start_id = START_OF_DOCUMENT_ID
    if output_features and 'targets' in output_features:
      start_id = vocab_lib.start_of_document_id(output_features['targets'].vocabulary)

  def to_chunks(ex):
    return tf.data.Dataset.from_tensor_slices(
      chunk_tokens(ex['targets'], ex['document_id'], length, start_id)
    )

  return drop_empty(dataset).flat_map(to_chunks)
