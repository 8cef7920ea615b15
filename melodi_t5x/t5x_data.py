"""Data plumbing between the document-streaming batcher (`tasks.streaming`) and T5X.

T5X builds its input pipeline with `train_script.train.get_dataset_fn` (training) and
`train_eval_get_dataset_fn` (train-eval in `t5x.train`, eval in `t5x.eval`). A memory decoder
needs row r of batch t+1 to continue the document of row r of batch t, which seqio's batching does
not give; `tasks.streaming.DocumentStreamIterator` does. This module:

- `get_dataset`: the training `get_dataset_fn`, an infinite stream whose position is saved with
  each checkpoint (`utils.SaveCheckpointConfig.save_dataset = True`) and restored on resume.
- `get_eval_datasets`: a finite stream per task covering every chunk of the split exactly once,
  re-iterable so each train-eval / eval pass starts at the first document.
- `StreamingFeatureConverter`: a seqio feature converter for per-chunk examples (model features plus
  a rank-0 `start_of_sequence`), used for T5X's shape bookkeeping and seqio's score path.

Imports neither T5X nor the tasks package at module level.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import seqio
import tensorflow as tf
from clu.data import dataset_iterator as clu_dataset_iterator

# Features a memory model's train/eval step uses (others, e.g. document_id, stay on the host).
MODEL_KEYS = (
  'decoder_input_tokens',
  'decoder_target_tokens',
  'decoder_loss_weights',
  'start_of_sequence',
)
# Host-side bookkeeping features of the streamed batches (evaluation only).
EVAL_KEYS = MODEL_KEYS + ('document_id', 'chunk_index', 'row_valid')


class StreamingFeatureConverter(seqio.FeatureConverter):
  """Per-chunk examples -> decoder-only model features (never packed).

  (`MelodiFeatureConverter` is the same class under its former name.)

  Task features: `targets: [T]` (the chunk), optional `inputs: [T]` (the chunk shifted right by
  one, starting with the last token of the previous chunk of the document), optional rank-0
  `start_of_sequence` (True when absent, i.e. every example starts a fresh memory). Model
  features: `decoder_target_tokens`, `decoder_input_tokens` (= `inputs`, or `targets` shifted with
  BOS 0 when absent), `decoder_loss_weights` (targets != 0) and `start_of_sequence`.
  """

  TASK_FEATURES = {'targets': seqio.FeatureConverter.FeatureSpec(dtype=tf.int32)}
  MODEL_FEATURES = {
    'decoder_target_tokens': seqio.FeatureConverter.FeatureSpec(dtype=tf.int32),
    'decoder_input_tokens': seqio.FeatureConverter.FeatureSpec(dtype=tf.int32),
    'decoder_loss_weights': seqio.FeatureConverter.FeatureSpec(dtype=tf.int32),
    'start_of_sequence': seqio.FeatureConverter.FeatureSpec(dtype=tf.bool, rank=0),
  }
  PACKING_FEATURE_DTYPES = {}

  def __init__(self, pack: bool = False, use_custom_packing_ops: bool = False, **kwargs):
    if pack:
      raise ValueError(
        'StreamingFeatureConverter: pack=True is not supported; each batch row streams one '
        'document. Set utils.DatasetConfig.pack = False.'
      )
    super().__init__(pack=False, use_custom_packing_ops=use_custom_packing_ops, **kwargs)

  def _convert_features(
    self, ds: tf.data.Dataset, task_feature_lengths: Mapping[str, int]
  ) -> tf.data.Dataset:
    length = task_feature_lengths['targets']
    lengths = {'targets': length, 'inputs': length}
    ds = seqio.utils.trim_and_pad_dataset(ds, lengths)

    def convert(ex):
      targets = ex['targets']
      if 'inputs' in ex:
        inputs = ex['inputs']
      else:
        inputs = seqio.utils.make_autoregressive_inputs(targets, bos_id=self.bos_id)
      sos = ex.get('start_of_sequence', tf.constant(True))
      return {
        'decoder_target_tokens': targets,
        'decoder_input_tokens': inputs,
        'decoder_loss_weights': tf.cast(tf.not_equal(targets, 0), tf.int32),
        'start_of_sequence': tf.cast(tf.reshape(sos, []), tf.bool),
      }

    return ds.map(convert, num_parallel_calls=tf.data.AUTOTUNE)

  def get_model_feature_lengths(self, task_feature_lengths: Mapping[str, int]) -> Mapping[str, int]:
    length = task_feature_lengths['targets']
    return {
      'decoder_target_tokens': length,
      'decoder_input_tokens': length,
      'decoder_loss_weights': length,
      'start_of_sequence': 1,
    }


# -- adapters over the streaming batcher -----------------------------------------------------------


class KeySelectingIterator(clu_dataset_iterator.DatasetIterator):
  """Passes through a `DatasetIterator`, keeping only `keys` of each batch (state untouched)."""

  def __init__(self, inner: clu_dataset_iterator.DatasetIterator, keys: tuple[str, ...]):
    self._inner = inner
    spec = dict(inner.element_spec)
    missing = [k for k in ('decoder_input_tokens', 'decoder_target_tokens') if k not in spec]
    if missing:
      raise ValueError(f'the streaming batcher yields no {missing}; its keys are {sorted(spec)}.')
    self._keys = tuple(k for k in keys if k in spec)
    self._spec = {k: spec[k] for k in self._keys}

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self._inner)
    return {k: batch[k] for k in self._keys}

  @property
  def element_spec(self):
    return self._spec

  def reset(self):
    self._inner.reset()

  def save(self, filename):
    self._inner.save(filename)

  def restore(self, filename):
    self._inner.restore(filename)

  def get_state(self):
    return self._inner.get_state()

  def set_state(self, state):
    self._inner.set_state(state)


class StreamingEvalDataset:
  """A finite, re-iterable streamed split: each `iter()` starts a new pass at the first document.

  Attributes:
    element_spec: `jax.ShapeDtypeStruct`-like spec of one batch (T5X reads it for shapes).
    report_info: settings copied into the evaluation report.
  """

  def __init__(self, make_iterator, report_info: Mapping[str, Any]):
    self._make_iterator = make_iterator
    self.report_info = dict(report_info)
    self.element_spec = make_iterator().element_spec

  def __iter__(self) -> Iterator[Mapping[str, np.ndarray]]:
    return self._make_iterator()

  def as_numpy_iterator(self) -> Iterator[Mapping[str, np.ndarray]]:
    return iter(self)


def _segment_length(cfg) -> int:
  lengths = cfg.task_feature_lengths or {}
  if 'targets' not in lengths:
    raise ValueError(
      f'DatasetConfig for {cfg.mixture_or_task_name!r} has task_feature_lengths={lengths}; give '
      "{'targets': <chunk length>} (TASK_FEATURE_LENGTHS in gin)."
    )
  return int(lengths['targets'])


def _check_cfg(cfg, num_shards: int) -> None:
  if cfg.pack:
    raise ValueError(
      f'DatasetConfig(pack=True) for {cfg.mixture_or_task_name!r}: each batch row streams one '
      'document; set pack=False.'
    )
  if cfg.batch_size % num_shards:
    raise ValueError(
      f'batch_size={cfg.batch_size} is not divisible by the {num_shards} data shards (hosts).'
    )


def make_stream(cfg, shard_id: int, num_shards: int, *, finite: bool):
  """The document stream for a T5X `DatasetConfig` (one host's rows).

  Reads the prepared split when `tasks.PreparedDataConfig.root` is set
  (`tasks.prepared_stream.PreparedStreamIterator`: this host's rows only, restore by seeking),
  otherwise the task on the fly (`tasks.streaming.DocumentStreamIterator`).
  """
  _check_cfg(cfg, num_shards)
  import tasks  # noqa: F401  # pylint: disable=g-import-not-at-top  (registers the tasks)
  from tasks import prepared_stream  # pylint: disable=g-import-not-at-top

  seed = cfg.seed
  if seed is None:
    # The stream is deterministic given its seed; T5X's "new seed per restart" (seed=None) would
    # break resuming from the checkpointed position, so None means seed 0.
    seed = 0
  return prepared_stream.make_task_stream(
    cfg.mixture_or_task_name,
    split=cfg.split,
    batch_size=cfg.batch_size // num_shards,
    chunk_length=_segment_length(cfg),
    seed=int(seed),
    shuffle=bool(cfg.shuffle) and not finite,
    shard_id=shard_id,
    num_shards=num_shards,
    repeat=not finite,
  )


def get_dataset(
  cfg,
  shard_id: int,
  num_shards: int,
  feature_converter_cls=None,
  num_epochs: int | None = None,
  continue_from_last_checkpoint: bool = True,
) -> clu_dataset_iterator.DatasetIterator:
  """`train_script.train.get_dataset_fn`: an endless document stream, checkpointable.

  Args:
    cfg: T5X `utils.DatasetConfig` (task, split, batch size, `{'targets': T}`, shuffle, seed).
    shard_id: this host's data shard.
    num_shards: number of data shards.
    feature_converter_cls: ignored (the batcher emits model features itself).
    num_epochs: must be None: the stream is endless (a new document order each epoch).
    continue_from_last_checkpoint: ignored; T5X restores the position from the checkpoint.

  Returns:
    A `clu` `DatasetIterator` of model-feature batches with `save`/`restore`.
  """
  del feature_converter_cls, continue_from_last_checkpoint
  if num_epochs is not None:
    raise ValueError(
      f'num_epochs={num_epochs}: the training document stream is endless (it re-reads the '
      'documents in a new order each epoch); bound training with TRAIN_STEPS instead.'
    )
  stream = make_stream(cfg, shard_id, num_shards, finite=False)
  return KeySelectingIterator(stream, MODEL_KEYS)


def get_eval_datasets(
  cfg,
  shard_id: int,
  num_shards: int,
  eval_steps: int | None = None,
  feature_converter_cls=None,
) -> dict[str, StreamingEvalDataset]:
  """`train_eval_get_dataset_fn`: one finite stream of the whole split per task.

  Args:
    cfg: T5X `utils.DatasetConfig` of the eval data.
    shard_id: this host's data shard.
    num_shards: number of data shards.
    eval_steps: if set (train-eval in `t5x.train`), each pass stops after this many batches;
      None (`t5x.eval`) scores the whole split.
    feature_converter_cls: ignored.

  Returns:
    `{task name: StreamingEvalDataset}`.
  """
  del feature_converter_cls
  import tasks  # noqa: F401  # pylint: disable=g-import-not-at-top  (registers the tasks)

  mixture = seqio.get_mixture_or_task(cfg.mixture_or_task_name)
  task_names = [t.name for t in getattr(mixture, 'tasks', [mixture])]
  out = {}
  for name in task_names:
    task_cfg = _replace(cfg, mixture_or_task_name=name)

    def make(task_cfg=task_cfg):
      it = KeySelectingIterator(make_stream(task_cfg, shard_id, num_shards, finite=True), EVAL_KEYS)
      return it if eval_steps is None else _Take(it, eval_steps)

    info = {
      'split': cfg.split,
      'segment_length': _segment_length(cfg),
      'batch_size': cfg.batch_size,
      'eval_steps': eval_steps,
    }
    out[name] = StreamingEvalDataset(make, info)
  return out


def _replace(cfg, **changes):
  import dataclasses  # pylint: disable=g-import-not-at-top

  return dataclasses.replace(cfg, **changes)


class _Take(clu_dataset_iterator.DatasetIterator):
  """The first `n` batches of an iterator."""

  def __init__(self, inner, n: int):
    self._inner, self._left = inner, int(n)

  def __next__(self):
    if self._left <= 0:
      raise StopIteration
    self._left -= 1
    return next(self._inner)

  @property
  def element_spec(self):
    return self._inner.element_spec


# Former name, kept so existing gin files and imports keep working.
MelodiFeatureConverter = StreamingFeatureConverter
