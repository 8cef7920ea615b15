"""A SentencePiece vocabulary whose model path is a task setting, resolved on first use."""

from __future__ import annotations

import functools

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
    from tasks import definitions  # pylint: disable=g-import-not-at-top

    return str(getattr(definitions.vocabulary(other), 'sentencepiece_model_file', ''))
  path = cfg.vocabulary_path
  if not path:
    raise ValueError(
      f'Task {task_name!r} has no vocabulary: '
      f'{config_lib.setting_name(task_name, "vocabulary_path")}'
      ' is not set. '
      + config_lib.fix_hint(task_name, 'vocabulary_path', "'/path/to/spm.model'")
      + f' To train one: python -m tasks.train_vocab --task={task_name} --output_prefix=/path/spm'
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
      from tasks import definitions  # pylint: disable=g-import-not-at-top

      vocab = definitions.vocabulary(other)
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
