"""Vocabularies of the tasks: a SentencePiece model whose path is a task setting, resolved on first
use (`TaskVocabulary`), the vocabulary of any task (`vocabulary`) and the embedding size it needs.
"""

from __future__ import annotations

import functools

import gin
import seqio
import tensorflow as tf

from tasks import config as config_lib


@functools.lru_cache(maxsize=16)
def _load(path: str, extra_ids: int) -> seqio.SentencePieceVocabulary:
  return seqio.SentencePieceVocabulary(path, extra_ids=extra_ids)


def delegate_task(task_name: str) -> str | None:
  """The task whose vocabulary `task_name` uses (its `vocabulary_task` setting), if any."""
  other = getattr(config_lib.get_config(task_name), 'vocabulary_task', None)
  if other == task_name:
    raise ValueError(
      f'{config_lib.setting_name(task_name, "vocabulary_task")} names the task itself; set '
      'vocabulary_path instead, or name another task.'
    )
  return other


def check_vocabulary_file(task_name: str) -> str:
  """Returns the task's vocabulary path, raising a clear error if it is unset or missing."""
  cfg = config_lib.get_config(task_name)
  other = delegate_task(task_name)
  if other is not None:
    return str(getattr(vocabulary(other), 'sentencepiece_model_file', ''))
  path = cfg.vocabulary_path
  if not path:
    raise ValueError(
      f'Task {task_name!r} has no vocabulary: '
      f'{config_lib.setting_name(task_name, "vocabulary_path")}'
      ' is not set. '
      + config_lib.fix_hint(task_name, 'vocabulary_path', "'/path/to/spm.model'")
      + f" To train one on the task's training split (with the same data settings): python -m "
      f'tasks.train_vocab --task={task_name} --output_prefix=/path/spm, then set '
      f"{config_lib.setting_name(task_name, 'vocabulary_path')} = '/path/spm.model'."
    )
  if not tf.io.gfile.exists(path):
    raise FileNotFoundError(
      f'Vocabulary file {path!r} of task {task_name!r} does not exist. '
      + config_lib.fix_hint(task_name, 'vocabulary_path', "'/path/to/spm.model'")
    )
  return path


class TaskVocabulary(seqio.Vocabulary):
  """Delegates to the SentencePiece model named by a task's `vocabulary_path` setting.

  The file is looked up at first use (encoding, decoding, `vocab_size`), not at construction, so
  registering tasks never needs the file, and a setting changed later is honoured.
  """

  def __init__(self, task_name: str):
    self._task_name = task_name
    super().__init__(extra_ids=0)

  @property
  def task_name(self) -> str:
    return self._task_name

  @property
  def resolved(self) -> seqio.Vocabulary:
    """The underlying vocabulary for the current settings (a SentencePiece model, or the
    vocabulary of the task named by a `vocabulary_task` setting)."""
    other = delegate_task(self._task_name)
    if other is not None:
      vocab = vocabulary(other)
      return vocab.resolved if isinstance(vocab, TaskVocabulary) else vocab
    path = check_vocabulary_file(self._task_name)
    extra_ids = config_lib.get_config(self._task_name).vocabulary_extra_ids
    return _load(path, extra_ids)

  @property
  def sentencepiece_model_file(self) -> str:
    return check_vocabulary_file(self._task_name)

  @property
  def extra_ids(self) -> int:
    if delegate_task(self._task_name) is not None:
      return self.resolved.extra_ids
    return config_lib.get_config(self._task_name).vocabulary_extra_ids

  @property
  def bos_id(self) -> int | None:
    return self.resolved.bos_id

  @property
  def eos_id(self) -> int | None:
    return self.resolved.eos_id

  @property
  def unk_id(self) -> int | None:
    return self.resolved.unk_id

  @property
  def pad_id(self) -> int:
    return self.resolved.pad_id

  @property
  def vocab_size(self) -> int:
    return self.resolved.vocab_size

  @property
  def _base_vocab_size(self) -> int:
    return self.resolved._base_vocab_size  # pylint: disable=protected-access

  def _encode(self, s):
    return self.resolved.encode(s)

  def _decode(self, ids):
    return self.resolved.decode(ids)

  def _encode_tf(self, s):
    return self.resolved.encode_tf(s)

  def _decode_tf(self, ids):
    return self.resolved.decode_tf(ids)

  def encode(self, s):
    return self.resolved.encode(s)

  def decode(self, ids):
    return self.resolved.decode(ids)

  def encode_tf(self, s):
    return self.resolved.encode_tf(s)

  def decode_tf(self, ids):
    return self.resolved.decode_tf(ids)

  def __eq__(self, other) -> bool:
    if isinstance(other, TaskVocabulary):
      return self._task_name == other._task_name
    return NotImplemented

  def __hash__(self) -> int:
    return hash(('TaskVocabulary', self._task_name))

  def __repr__(self) -> str:
    return f'TaskVocabulary({self._task_name!r})'


@gin.configurable(module='tasks')
def vocabulary(task_name: str = 'local_books') -> seqio.Vocabulary:
  """The vocabulary of a registered task or mixture (gin: `tasks.vocabulary.task_name`).

  For this package's tasks the file is resolved from the task's settings at first use; any other
  registered seqio task or mixture gives the vocabulary of its `targets` feature.
  """
  if task_name in config_lib.TASK_NAMES:
    return TaskVocabulary(task_name)
  try:
    provider = seqio.get_mixture_or_task(task_name)
  except ValueError:
    known = sorted(set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names()))
    raise ValueError(
      f'Unknown task {task_name!r} (tasks.vocabulary.task_name, usually %MIXTURE_OR_TASK_NAME): '
      f'it is neither one of {config_lib.TASK_NAMES} nor a registered seqio task or mixture. '
      f'Registered: {known}. For a corpus of your own use the task text_corpus '
      '(tasks.TextCorpusConfig).'
    ) from None
  features = provider.output_features
  if 'targets' not in features:
    raise ValueError(f'Task {task_name!r} has no targets feature; features: {sorted(features)}.')
  return features['targets'].vocabulary


@gin.configurable(module='tasks')
def embedding_size(task_name: str = 'local_books', multiple: int = 128) -> int:
  """Rows a model embedding needs for a task: its vocabulary size rounded up to `multiple`.

  T5's vocabulary (32100 ids) gives 32128, the size T5X configs use. Bind it in gin so the model
  follows the task: `VOCAB_SIZE = @tasks.embedding_size()` with
  `tasks.embedding_size.task_name = %MIXTURE_OR_TASK_NAME`.
  """
  size = vocabulary(task_name).vocab_size
  return -(-size // multiple) * multiple


def start_of_document_id(vocabulary) -> int:
  """The first input of every document (the vocabulary's EOS), after checking the id layout.

  The chunks use id 0 for padding (T5X's convention: padding, decoder BOS and masks all use 0),
  so no real token may have id 0, and EOS must be a real, non-zero id. T5's vocabulary and the
  ones `python -m tasks.train_vocab` writes (pad 0, eos 1, unk 2, no bos) qualify; SentencePiece's
  defaults (unk 0, bos 1, eos 2) do not: unknown pieces would read as padding.

  Raises:
    ValueError: naming the ids and the fix, when the layout cannot be handled.
  """
  vocabulary = getattr(vocabulary, 'resolved', vocabulary)  # tasks' lazily loaded vocabularies
  tokenizer = getattr(vocabulary, 'tokenizer', None)
  ids = {
    'pad': tokenizer.pad_id() if tokenizer is not None else vocabulary.pad_id,
    'eos': vocabulary.eos_id,
    'unk': vocabulary.unk_id,
    'bos': tokenizer.bos_id() if tokenizer is not None else None,
  }
  listed = ', '.join(f'{k} {v}' for k, v in ids.items() if v is not None and v >= 0)
  fix = (
    'retrain the SentencePiece model with pad_id=0 eos_id=1 unk_id=2 bos_id=-1 '
    '(python -m tasks.train_vocab does), or use a vocabulary with that layout'
  )
  zero = [k for k in ('unk', 'bos', 'eos') if ids[k] == 0]
  if zero:
    raise ValueError(
      f'vocabulary ids ({listed}): id 0 is the {zero[0]} token, but 0 marks padding in the '
      f'chunks and in T5X, so those tokens would be dropped from loss and perplexity; {fix}.'
    )
  if ids['pad'] not in (0, -1, None):
    raise ValueError(f'vocabulary ids ({listed}): padding must be id 0; {fix}.')
  if ids['eos'] is None or ids['eos'] < 0:  # no EOS (e.g. seqio.PassThroughVocabulary): T5's 1
    return 1
  if ids['eos'] == 0 or ids['eos'] >= vocabulary.vocab_size:
    raise ValueError(
      f'vocabulary ids ({listed}): a document starts with the EOS input, which needs a '
      f'non-zero EOS id below vocab_size={vocabulary.vocab_size}; {fix}.'
    )
  return int(ids['eos'])


def check_embedding_fits(vocab_size: int, config) -> None:
  """Refuses a task vocabulary with more ids than the model config's embedding has rows."""
  rows = getattr(config, 'vocab_size', None)
  if rows is not None and vocab_size > rows:
    name = type(config).__name__
    raise ValueError(
      f'the task vocabulary has {vocab_size} ids but the model embedding has only {rows} rows '
      f'({name}.vocab_size={rows}): ids >= {rows} would have no embedding. Set '
      f"{name}.vocab_size >= {vocab_size}, or bind it to the task's vocabulary "
      '(VOCAB_SIZE = @tasks.embedding_size() in gin).'
    )
