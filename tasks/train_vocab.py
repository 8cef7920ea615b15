r"""Trains a SentencePiece vocabulary on a task's training split (T5 id layout).

Ids: pad 0, eos 1, unk 2, no bos (what seqio and T5X expect). Newlines are kept as a piece and
whitespace is not collapsed, so decoding a document's tokens gives its text back. Training is
deterministic for a given input (single thread by default, fixed sentencepiece seed).

  # arXiv Math (32k, Meena's vocabulary being private); set the task's data settings first:
  python -m tasks.train_vocab --task=arxiv_math --vocab_size=32000 \
    --output_prefix=/data/spm/arxiv_math_32k \
    --gin.tasks.ArxivMathConfig.data_dir="'/data/proof-pile'" --max_documents=200000

  # Regenerate the committed local_books vocabulary (tasks/local_books_4k.model):
  python -m tasks.train_vocab --task=local_books --vocab_size=4096 \
    --output_prefix=tasks/local_books_4k

Gin flags as in t5x.train (`--gin_file`, `--gin.NAME=VALUE`, `--gin_bindings`,
`--gin_search_paths`); `--gin_param` is a deprecated spelling of `--gin_bindings`.
"""

from __future__ import annotations

import argparse
import collections.abc
import io
import os

import sentencepiece as spm

# Sentences longer than this many bytes are split (sentencepiece's default limit is 4192).
_MAX_SENTENCE_BYTES = 4000


def document_texts(task_name: str, split: str = 'train', max_documents: int | None = None):
  """Raw texts of a task's split, in source order (no shuffling, no tokenization).

  Read from the task's document source (`tasks.sources.DATASET_FNS`), not through the seqio task,
  whose source also checks the vocabulary file: the vocabulary is what is being trained here.
  """
  from tasks import sources  # pylint: disable=g-import-not-at-top

  if task_name not in sources.DATASET_FNS:
    raise ValueError(f'Unknown task {task_name!r}; known tasks: {sorted(sources.DATASET_FNS)}.')
  ds = sources.DATASET_FNS[task_name](split, False, None)
  for i, ex in enumerate(ds.as_numpy_iterator()):
    if max_documents is not None and i >= max_documents:
      break
    yield ex['text'].decode('utf-8')


def sentences(texts: collections.abc.Iterable[str]):
  """Non-empty lines of the texts, cut to at most `_MAX_SENTENCE_BYTES` bytes."""
  for text in texts:
    for line in text.split('\n'):
      if not line.strip():
        continue
      data = line.encode('utf-8')
      while len(data) > _MAX_SENTENCE_BYTES:
        cut = _MAX_SENTENCE_BYTES
        while cut > 0 and (data[cut] & 0xC0) == 0x80:  # do not split a UTF-8 character
          cut -= 1
        yield data[:cut].decode('utf-8')
        data = data[cut:]
      yield data.decode('utf-8')


def train_sentencepiece(
  texts: collections.abc.Iterable[str],
  vocab_size: int,
  model_type: str = 'unigram',
  num_threads: int = 1,
  input_sentence_size: int = 0,
  character_coverage: float = 1.0,
  seed: int = 0,
) -> bytes:
  """Trains a SentencePiece model on the texts and returns the serialized model.

  Args:
    texts: documents; every non-empty line is one training sentence.
    vocab_size: total number of pieces, including pad/eos/unk and the newline piece.
    model_type: 'unigram' or 'bpe'.
    num_threads: trainer threads (1 for bit-reproducible models).
    input_sentence_size: sample this many sentences (0: use all).
    character_coverage: fraction of characters covered by pieces (the rest map to unk).
    seed: sentencepiece's random seed (used when sampling sentences).

  Returns:
    The serialized SentencePiece model proto.
  """
  spm.set_random_generator_seed(seed)
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
    sentence_iterator=sentences(texts),
    model_writer=model,
    vocab_size=vocab_size,
    model_type=model_type,
    pad_id=0,
    eos_id=1,
    unk_id=2,
    bos_id=-1,
    user_defined_symbols=['\n'],
    normalization_rule_name='nfkc',
    remove_extra_whitespaces=False,
    character_coverage=character_coverage,
    input_sentence_size=input_sentence_size,
    shuffle_input_sentence=input_sentence_size > 0,
    num_threads=num_threads,
    max_sentence_length=_MAX_SENTENCE_BYTES + 16,
    minloglevel=2,
  )
  return model.getvalue()


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--task', required=True, help='seqio task name, e.g. arxiv_math.')
  parser.add_argument('--split', default='train')
  parser.add_argument('--vocab_size', type=int, default=32000)
  parser.add_argument('--output_prefix', required=True, help='Writes <prefix>.model.')
  parser.add_argument('--model_type', default='unigram', choices=['unigram', 'bpe'])
  parser.add_argument('--max_documents', type=int, default=None)
  parser.add_argument('--input_sentence_size', type=int, default=0)
  parser.add_argument('--num_threads', type=int, default=1)
  from melodi_t5x import t5x_gin  # pylint: disable=g-import-not-at-top

  t5x_gin.add_gin_flags(parser, deprecated=('--gin_param',))
  args = t5x_gin.parse_args(parser, argv)

  import tasks  # noqa: F401  # pylint: disable=g-import-not-at-top,unused-import

  t5x_gin.parse_gin(args, finalize_config=True)
  model = train_sentencepiece(
    document_texts(args.task, args.split, args.max_documents),
    vocab_size=args.vocab_size,
    model_type=args.model_type,
    num_threads=args.num_threads,
    input_sentence_size=args.input_sentence_size,
  )
  path = args.output_prefix + '.model'
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'wb') as f:
    f.write(model)
  sp = spm.SentencePieceProcessor(model_proto=model)
  print(f'Wrote {path}: {sp.get_piece_size()} pieces (pad 0, eos 1, unk 2).')


if __name__ == '__main__':
  main()
