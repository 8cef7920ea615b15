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

import json
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import seqio
import tensorflow as tf
from absl import logging
from clu.data import dataset_iterator as clu_dataset_iterator
from etils import epath

# Features of a memory model's train step. `document_id` (folded to int32 on the host) and
# `chunk_index` let the model check that each row continues the document of its memory.
MODEL_KEYS = (
  'decoder_input_tokens',
  'decoder_target_tokens',
  'decoder_loss_weights',
  'start_of_sequence',
  'document_id',
  'chunk_index',
)
# Eval batches also carry `row_valid` (False on padding rows at the end of a finite split).
EVAL_KEYS = MODEL_KEYS + ('row_valid',)


def document_key(document_id: np.ndarray) -> np.ndarray:
  """int32 key of int64 document ids for the device (-1 stays -1; others map into [0, 2^31))."""
  ids = np.asarray(document_id, np.int64)
  return np.where(ids < 0, -1, ids % np.int64(2**31 - 1)).astype(np.int32)


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

  def __init__(
    self,
    pack: bool = False,
    use_custom_packing_ops: bool = False,
    allow_independent_examples: bool = False,
    **kwargs,
  ):
    """Args as for `seqio.FeatureConverter`, plus `allow_independent_examples` (see `__call__`)."""
    self._allow_independent_examples = bool(allow_independent_examples)
    if pack:
      raise ValueError(
        'StreamingFeatureConverter: pack=True is not supported; each batch row streams one '
        'document. Set utils.DatasetConfig.pack = False.'
      )
    super().__init__(pack=False, use_custom_packing_ops=use_custom_packing_ops, **kwargs)

  def __call__(self, ds: tf.data.Dataset, task_feature_lengths: Mapping[str, int]):
    """Refuses seqio datasets unless opted in: they are not document streams.

    T5X reaches this converter only through seqio pipelines (`utils.get_dataset`, seqio's
    inference evaluator, `t5x.infer`), which shuffle and batch chunks as independent examples, so
    memory would be carried across unrelated documents. The document stream
    (`t5x_data.get_dataset` / `get_eval_datasets`) never calls it. `allow_independent_examples`
    (set by `MemoryDecoderModel.allow_stateless_scoring = True`) lets stateless scoring through.
    """
    if not self._allow_independent_examples:
      raise ValueError(
        'StreamingFeatureConverter got a seqio dataset of independent chunks (from '
        "T5X's utils.get_dataset, seqio's inference evaluator or t5x.infer): its batches are not "
        "document streams, so rows would carry other documents' memory. Train and evaluate with "
        'train_script.train.get_dataset_fn = @t5x_data.get_dataset and '
        'train_eval_get_dataset_fn = @t5x_data.get_eval_datasets (gin/runs/melodi_pretrain.gin). '
        'To score independent examples with fresh memory (t5x.infer mode=score), set '
        'MemoryDecoderModel.allow_stateless_scoring = True.'
      )
    return super().__call__(ds, task_feature_lengths)

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


_CHECKPOINT_STEP = re.compile(r'checkpoint_(\d+)')


def _checkpoint_step(filename) -> int | None:
  """The step N of the `checkpoint_N` directory a T5X dataset-state file lives in, or None."""
  found = _CHECKPOINT_STEP.findall(str(filename))
  return int(found[-1]) if found else None


class KeySelectingIterator(clu_dataset_iterator.DatasetIterator):
  """Passes through a `DatasetIterator`, keeping only `keys` of each batch.

  With `fold_document_id`, `document_id` becomes its int32 key (`document_key`) for the device
  (training; eval keeps the original ids on the host for the report). Saving aligns the
  position with the train state: `t5x.train` peeks the first batch (to warm up the pipeline)
  before it saves `checkpoint_0`, so the stream is one batch ahead of the state there. The state
  file's `checkpoint_N` directory says how many batches the train state has consumed since the
  start or the restore; when the stream has produced one more, the position before that batch is
  saved. A resumed run therefore continues with exactly the batch after the checkpoint's step.
  """

  def __init__(
    self,
    inner: clu_dataset_iterator.DatasetIterator,
    keys: tuple[str, ...],
    fold_document_id: bool = True,
  ):
    self._inner = inner
    self._fold = fold_document_id
    spec = dict(inner.element_spec)
    missing = [k for k in ('decoder_input_tokens', 'decoder_target_tokens') if k not in spec]
    if missing:
      raise ValueError(f'the streaming batcher yields no {missing}; its keys are {sorted(spec)}.')
    self._keys = tuple(k for k in keys if k in spec)
    self._spec = {k: spec[k] for k in self._keys}
    if self._fold and 'document_id' in self._spec:
      old = self._spec['document_id']
      self._spec['document_id'] = clu_dataset_iterator.ArraySpec(np.int32, tuple(old.shape))
    self._start_step = 0
    self._produced = 0
    self._first_state = None

  def __next__(self) -> dict[str, np.ndarray]:
    if self._produced == 0 and hasattr(self._inner, 'get_state'):
      self._first_state = self._inner.get_state()
    batch = next(self._inner)
    self._produced += 1
    out = {k: batch[k] for k in self._keys}
    if self._fold and 'document_id' in out:
      out['document_id'] = document_key(out['document_id'])
    return out

  @property
  def element_spec(self):
    return self._spec

  def reset(self):
    self._inner.reset()
    self._produced, self._first_state = 0, None

  def save(self, filename):
    step = _checkpoint_step(filename)
    consumed = None if step is None else step - self._start_step
    if consumed == 0 and self._produced == 1 and self._first_state is not None:
      # checkpoint_0 (or a checkpoint right after a restore) with the peeked batch outstanding.
      epath.Path(filename).write_text(json.dumps(self._first_state))
      return
    if consumed is not None and consumed != self._produced:
      logging.warning(
        'Saving the stream position at step %d: %d batches produced since step %d; the saved '
        'position may not match the train state.',
        step,
        self._produced,
        self._start_step,
      )
    self._inner.save(filename)

  def restore(self, filename):
    self._inner.restore(filename)
    step = _checkpoint_step(filename)
    self._start_step = step or 0
    self._produced, self._first_state = 0, None

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


class RowConcatIterator(clu_dataset_iterator.DatasetIterator):
  """Several endless document streams side by side: their batches concatenated along rows.

  State: `{'streams': [state of each stream]}` (JSON in `save`).
  """

  def __init__(self, streams: Sequence[clu_dataset_iterator.DatasetIterator]):
    self._streams = list(streams)
    specs = [dict(s.element_spec) for s in self._streams]
    self._spec = {
      k: clu_dataset_iterator.ArraySpec(
        v.dtype, (sum(sp[k].shape[0] for sp in specs), *v.shape[1:])
      )
      for k, v in specs[0].items()
    }

  def __next__(self) -> dict[str, np.ndarray]:
    batches = [next(s) for s in self._streams]
    return {k: np.concatenate([b[k] for b in batches], axis=0) for k in batches[0]}

  @property
  def element_spec(self):
    return self._spec

  def reset(self):
    for s in self._streams:
      s.reset()

  def get_state(self):
    return {'streams': [s.get_state() for s in self._streams]}

  def set_state(self, state):
    if len(state['streams']) != len(self._streams):
      raise ValueError(
        f'The saved stream position has {len(state["streams"])} stream shards, this run has '
        f'{len(self._streams)}: resume with the same t5x_data.get_dataset.stream_shards.'
      )
    for s, st in zip(self._streams, state['streams']):
      s.set_state(st)

  def save(self, filename):
    epath.Path(filename).write_text(json.dumps(self.get_state()))

  def restore(self, filename):
    self.set_state(json.loads(epath.Path(filename).read_text()))


def make_stream(
  cfg, shard_id: int, num_shards: int, *, finite: bool, stream_shards: int | None = None
):
  """The document stream of a T5X `DatasetConfig` for one host's rows.

  Args:
    cfg: T5X `utils.DatasetConfig`.
    shard_id: this host's data shard (T5X's `data_layout.shard_id`).
    num_shards: number of data shards (hosts that read different data).
    finite: one pass over the split (evaluation) instead of endless epochs.
    stream_shards: None: one stream per host. An integer S (a multiple of `num_shards` dividing
      the batch size): the documents are split into S streams of `batch_size / S` rows, and a
      host reads its S / num_shards of them side by side. The global batch is then the same for
      any number of hosts that divides S (e.g. a one-process run reproduces a two-host run).

  Returns:
    The prepared split when `tasks.PreparedDataConfig.root` is set
    (`tasks.prepared_stream.PreparedStreamIterator`: this host's rows only, restore by seeking),
    otherwise the task on the fly (`tasks.streaming.DocumentStreamIterator`); or a
    `RowConcatIterator` of such streams.
  """
  if stream_shards is not None:
    if finite:
      raise ValueError('stream_shards applies to the endless training stream only.')
    if stream_shards % num_shards or cfg.batch_size % stream_shards:
      raise ValueError(
        f't5x_data.get_dataset.stream_shards={stream_shards} must be a multiple of the '
        f'{num_shards} data shards (hosts) and divide batch_size={cfg.batch_size}.'
      )
    per_host = stream_shards // num_shards
    return RowConcatIterator(
      [
        make_stream(cfg, shard_id * per_host + k, stream_shards, finite=False)
        for k in range(per_host)
      ]
    )
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
  stream_shards: int | None = None,
) -> clu_dataset_iterator.DatasetIterator:
  """`train_script.train.get_dataset_fn`: an endless document stream, checkpointable.

  Args:
    cfg: T5X `utils.DatasetConfig` (task, split, batch size, `{'targets': T}`, shuffle, seed).
    shard_id: this host's data shard.
    num_shards: number of data shards.
    feature_converter_cls: ignored (the batcher emits model features itself).
    num_epochs: must be None: the stream is endless (a new document order each epoch).
    continue_from_last_checkpoint: ignored; T5X restores the position from the checkpoint.
    stream_shards: see `make_stream`; set it (e.g. to the largest host count) to make the global
      batch independent of the number of hosts.

  Returns:
    A `clu` `DatasetIterator` of model-feature batches with `save`/`restore`.
  """
  del feature_converter_cls, continue_from_last_checkpoint
  if num_epochs is not None:
    raise ValueError(
      f'num_epochs={num_epochs}: the training document stream is endless (it re-reads the '
      'documents in a new order each epoch); bound training with TRAIN_STEPS instead.'
    )
  stream = make_stream(cfg, shard_id, num_shards, finite=False, stream_shards=stream_shards)
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
      it = KeySelectingIterator(
        make_stream(task_cfg, shard_id, num_shards, finite=True), EVAL_KEYS, fold_document_id=False
      )
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
