"""Registration of the seqio tasks `local_books`, `pg19_t5`, `arxiv_math`, `c4_4k`, `text_corpus`.

Each task: documents -> tokenized (no EOS) -> [c4_4k, text_corpus: length filter] -> (seqio cache
point) -> 4096-token chunks (the length is the task's `chunk_length` setting, or
`sequence_length['targets']` when given). Splits are `train`, `validation`, `test` (C4 test: see
`tasks.C4Config`). Everything before the cache point is what `python -m tasks.prepare` (or seqio's
cache job) writes; the chunking runs when the prepared split is read.
"""

from __future__ import annotations

import functools

import seqio
import tensorflow as tf

from tasks import config as config_lib
from tasks import preprocessors, sources
from tasks import vocab as vocab_lib

# Tasks with a `min_document_tokens` setting (the length filter).
_FILTERED_TASKS = ('c4_4k', 'text_corpus')


def output_features(task_name: str) -> dict[str, seqio.Feature]:
  """`targets` (the chunk) and `inputs` (shifted by one; not required by seqio's checks)."""
  vocab = vocab_lib.vocabulary(task_name)
  return {
    'targets': seqio.Feature(vocab, add_eos=False, dtype=tf.int32),
    'inputs': seqio.Feature(vocab, add_eos=False, dtype=tf.int32, required=False),
  }


def _chunk_length_getter(task_name: str):
  return lambda: config_lib.get_config(task_name).chunk_length


def _min_tokens_getter(task_name: str):
  return lambda: config_lib.get_config(task_name).min_document_tokens


def _dataset_fn(task_name: str):
  """The task's document source, which also checks the vocabulary file before any tracing."""
  read_documents = sources.DATASET_FNS[task_name]

  def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
    ds = read_documents(split, shuffle_files, seed)
    # Checked here (plain Python) so that the error is not wrapped by tf.data's tracing.
    vocab_lib.check_vocabulary_file(task_name)
    return ds

  return dataset_fn


def build_task(task_name: str) -> seqio.Task:
  """Builds (without registering) one of the tasks."""
  steps = [
    preprocessors.rekey_text,
    functools.partial(seqio.preprocessors.tokenize, copy_pretokenized=False),
  ]
  if task_name in _FILTERED_TASKS:
    steps.append(
      functools.partial(preprocessors.filter_min_tokens, min_tokens=_min_tokens_getter(task_name))
    )
  # Tokenized documents are cached here (seqio's cache job, or `python -m tasks.prepare`);
  # not required: without a cache the task runs on the fly.
  steps.append(seqio.CacheDatasetPlaceholder(required=False))
  steps.append(
    functools.partial(preprocessors.chunk_documents, chunk_length=_chunk_length_getter(task_name))
  )
  return seqio.Task(
    task_name,
    source=seqio.FunctionDataSource(dataset_fn=_dataset_fn(task_name), splits=sources.SPLITS),
    preprocessors=steps,
    output_features=output_features(task_name),
    metric_fns=[],
  )


def register_tasks() -> None:
  """Registers every task with seqio (replacing earlier registrations of the same names)."""
  for name in config_lib.TASK_NAMES:
    seqio.TaskRegistry.remove(name)
    seqio.TaskRegistry.add_provider(name, build_task(name))
