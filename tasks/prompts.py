"""Prompt tasks for generation: `<task>_prompts` for each document task (`local_books_prompts`).

One example per document (documents with at least `inputs` + 1 tokens): `inputs` = the first
`sequence_length['inputs']` tokens of the document (the prompt), `targets` = the next
`sequence_length['targets']` tokens (the true continuation, for comparison), plus their texts
`inputs_pretokenized` / `targets_pretokenized` (which `t5x.infer` copies into its JSONL output).
Same documents, splits and vocabulary as the source task. With
`t5x_generate.PromptFeatureConverter` the model reads `[START_OF_DOCUMENT_ID, prompt]`, exactly as
a document starts in training.

`import tasks.prompts` registers them (gin: `gin/infer.gin`).
"""

from __future__ import annotations

import functools

import seqio
import tensorflow as tf

from tasks import config as config_lib
from tasks import definitions, preprocessors
from tasks import vocab as vocab_lib

SUFFIX = '_prompts'


def make_prompts(dataset: tf.data.Dataset, sequence_length, output_features) -> tf.data.Dataset:
  """Tokenized documents -> {inputs, targets, inputs_pretokenized, targets_pretokenized, id}."""
  if not sequence_length or not sequence_length.get('inputs') or 'targets' not in sequence_length:
    raise ValueError(
      f'prompt tasks need sequence_length with inputs (prompt length) and targets (continuation '
      f"length), e.g. TASK_FEATURE_LENGTHS = {{'inputs': 448, 'targets': 64}}; got "
      f'{sequence_length}.'
    )
  prompt, continuation = sequence_length['inputs'], sequence_length['targets']
  vocab = output_features['targets'].vocabulary

  def split(ex):
    tokens = ex['targets']
    inputs, targets = tokens[:prompt], tokens[prompt : prompt + continuation]
    return {
      'inputs': inputs,
      'targets': targets,
      'inputs_pretokenized': vocab.decode_tf(inputs),
      'targets_pretokenized': vocab.decode_tf(targets),
      'document_id': ex['document_id'],
    }

  dataset = dataset.filter(lambda ex: tf.size(ex['targets']) > prompt)
  return dataset.map(split, num_parallel_calls=tf.data.AUTOTUNE)


def build_prompt_task(task_name: str) -> seqio.Task:
  """`<task_name>_prompts` over the documents of `task_name` (one of `tasks.TASK_NAMES`)."""
  vocab = vocab_lib.vocabulary(task_name)
  return seqio.Task(
    task_name + SUFFIX,
    source=seqio.FunctionDataSource(
      dataset_fn=definitions._dataset_fn(task_name),  # pylint: disable=protected-access
      splits=('train', 'validation', 'test'),
    ),
    preprocessors=[
      preprocessors.rekey_text,
      functools.partial(seqio.preprocessors.tokenize, copy_pretokenized=False),
      make_prompts,
    ],
    output_features={
      'inputs': seqio.Feature(vocab, add_eos=False, dtype=tf.int32),
      'targets': seqio.Feature(vocab, add_eos=False, dtype=tf.int32),
    },
    metric_fns=[],
  )


def register_prompt_tasks() -> None:
  for name in config_lib.TASK_NAMES:
    seqio.TaskRegistry.remove(name + SUFFIX)
    seqio.TaskRegistry.add_provider(name + SUFFIX, build_prompt_task(name))


register_prompt_tasks()
