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
from collections.abc import Iterator, Mapping
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


UNITS_STATE_KIND = 'units'
UNITS_STATE_VERSION = 1


def dataset_state_files(filename) -> list[epath.Path]:
  """Every process's dataset-state file of the checkpoint that `filename` belongs to.

  T5X writes one file per data shard: `<ckpt>/dataset/train_ds-000-of-001` on one process,
  `<ckpt>/dataset/process_{i}-of-{n}/train_ds-{shard}-of-{shards}` on several (Orbax), or
  `<ckpt>/train_ds-{shard}-of-{shards}` (the legacy checkpointer). A run restored with another
  process count looks for a name that was never written; the files that were are found here.
  """
  path = epath.Path(filename)
  prefix = path.name.split('-')[0]
  folder = path.parent
  if folder.name.startswith('process_'):
    folder = folder.parent
  if not folder.exists():
    return []
  found = list(folder.glob(f'{prefix}-*')) + list(folder.glob(f'process_*/{prefix}-*'))
  return sorted(p for p in found if p.is_file())


class UnitStream(clu_dataset_iterator.DatasetIterator):
  """The global training batch as `num_units` document streams (units), one host's rows of it.

  Unit u is `make_unit(u, num_units)`: a stream of `global_batch / num_units` rows (documents
  sharded over the units). A host reads the units its rows `[shard_id * b, (shard_id + 1) * b)`
  overlap (b = global_batch / num_shards) and slices its rows out of them, so the global batch
  is the same for any number of hosts that divides it (two hosts holding the same unit produce the
  same rows: a unit is deterministic).

  State (`save`, JSON): the number of units, the global batch and the state of each unit this
  host holds. `restore` reads this host's file, or (a run resumed on another number of
  processes, whose file name T5X never wrote) every process's file of the checkpoint, and
  continues with the saved unit layout: every row goes on with its document and chunk.
  """

  def __init__(
    self, make_unit, *, global_batch: int, num_units: int, shard_id: int, num_shards: int
  ):
    if global_batch % num_shards:
      raise ValueError(
        f'batch_size={global_batch} is not divisible by the {num_shards} data shards (hosts).'
      )
    self._make_unit = make_unit
    self._global_batch = int(global_batch)
    self._shard_id, self._num_shards = int(shard_id), int(num_shards)
    self._build(num_units)
    self._check_documents()

  def _build(self, num_units: int) -> None:
    if self._global_batch % num_units:
      raise ValueError(
        f'{num_units} stream shards do not divide the global batch of {self._global_batch} rows '
        '(t5x_data.get_dataset.stream_shards must divide batch_size).'
      )
    rows = self._global_batch // self._num_shards
    per_unit = self._global_batch // num_units
    self._lo, self._hi = self._shard_id * rows, (self._shard_id + 1) * rows
    first, last = self._lo // per_unit, (self._hi - 1) // per_unit
    self._num_units, self._rows_per_unit, self._first_unit = num_units, per_unit, first
    self._units = {u: self._make_unit(u, num_units) for u in range(first, last + 1)}

  def _check_documents(self) -> None:
    """Every unit (also the other hosts') has a document per row: all hosts stop, or none."""
    for u in range(self._num_units):
      unit = self._units.get(u) or self._make_unit(u, self._num_units)
      check = getattr(unit, 'check_enough_documents', None)
      if check is not None:
        check(f' (stream shard {u} of {self._num_units})')
      if getattr(unit, 'GLOBAL_SCHEDULE', False):
        return  # every unit of a global schedule (the prepared stream) answers the same

  def __next__(self) -> dict[str, np.ndarray]:
    batches = [next(self._units[u]) for u in sorted(self._units)]
    offset = self._first_unit * self._rows_per_unit
    lo, hi = self._lo - offset, self._hi - offset
    return {k: np.concatenate([b[k] for b in batches], axis=0)[lo:hi] for k in batches[0]}

  @property
  def element_spec(self):
    spec = dict(next(iter(self._units.values())).element_spec)
    rows = self._hi - self._lo
    return {
      k: clu_dataset_iterator.ArraySpec(v.dtype, (rows, *v.shape[1:])) for k, v in spec.items()
    }

  def reset(self):
    for unit in self._units.values():
      unit.reset()

  def get_state(self):
    return {
      'kind': UNITS_STATE_KIND,
      'version': UNITS_STATE_VERSION,
      'num_units': self._num_units,
      'global_batch': self._global_batch,
      'units': {str(u): unit.get_state() for u, unit in self._units.items()},
    }

  def set_state(self, state):
    """Restores a (possibly merged) state; rebuilds the units if it has another layout."""
    if state.get('kind') != UNITS_STATE_KIND:
      state = self._legacy(state)
    if state.get('version') != UNITS_STATE_VERSION:
      raise ValueError(f'Unsupported data-position version {state.get("version")!r}.')
    if state['global_batch'] != self._global_batch:
      raise ValueError(
        f'The data position was saved with a global batch of {state["global_batch"]} rows; it is '
        f'now {self._global_batch}. The position is kept per global row: resume with the same '
        'global batch size (any number of hosts that divides it continues exactly).'
      )
    saved = {int(u): s for u, s in state['units'].items()}
    kinds = {s.get('kind') for s in saved.values()}
    if kinds == {'prepared'}:
      # The prepared stream's state is the global schedule: any unit's copy restores every unit.
      any_state = next(iter(saved.values()))
      for unit in self._units.values():
        unit.set_state(any_state)
      return
    if state['num_units'] != self._num_units:
      logging.info(
        'Data position saved as %d stream shards, this run has %d: continuing with %d.',
        state['num_units'],
        self._num_units,
        state['num_units'],
      )
      self._build(int(state['num_units']))
    missing = sorted(set(self._units) - set(saved))
    if missing:
      raise ValueError(
        f'The saved data position has no state for stream shard(s) {missing} (it has '
        f"{sorted(saved)}): the checkpoint lacks some processes' dataset files."
      )
    for u, unit in self._units.items():
      unit.set_state(saved[u])

  def _legacy(self, state):
    """A position saved before `UnitStream` (one stream per host, or `{'streams': [...]}`)."""
    states = state['streams'] if 'streams' in state else [state]
    held = sorted(self._units)
    if len(states) != len(held):
      raise ValueError(
        f'The saved data position holds {len(states)} stream(s); this host reads {len(held)}: '
        'resume with the process count and stream_shards of the run that saved it.'
      )
    return {
      'kind': UNITS_STATE_KIND,
      'version': UNITS_STATE_VERSION,
      'num_units': self._num_units,
      'global_batch': self._global_batch,
      'units': {str(u): s for u, s in zip(held, states)},
    }

  def save(self, filename):
    epath.Path(filename).write_text(json.dumps(self.get_state()))

  def _needed_units(self, num_units: int) -> set[int]:
    per_unit = self._global_batch // num_units
    return set(range(self._lo // per_unit, (self._hi - 1) // per_unit + 1))

  def restore(self, filename):
    path = epath.Path(filename)
    own = json.loads(path.read_text()) if path.exists() else None
    if own is not None and (
      own.get('kind') != UNITS_STATE_KIND  # written before UnitStream: same layout only
      or {s.get('kind') for s in own['units'].values()} == {'prepared'}
      or set(map(int, own['units'])) >= self._needed_units(int(own['num_units']))
    ):
      self.set_state(own)
      return
    files = dataset_state_files(filename)
    if not files:
      raise FileNotFoundError(
        f"No data position at {filename} and no other process's dataset file next to it: the "
        'checkpoint was saved without the dataset (utils.SaveCheckpointConfig.save_dataset).'
      )
    merged = None
    for f in files:
      state = json.loads(f.read_text())
      if state.get('kind') != UNITS_STATE_KIND:
        raise ValueError(
          f'{f} holds a data position written before stream shards were saved per unit: resume '
          'it with the process count that saved it.'
        )
      if merged is None:
        merged = {**state, 'units': dict(state['units'])}
      elif (state['num_units'], state['global_batch']) != (
        merged['num_units'],
        merged['global_batch'],
      ):
        raise ValueError(f'{f} and {files[0]} hold data positions of different layouts.')
      for u, s in state['units'].items():
        merged['units'].setdefault(u, s)
    logging.info('Restoring the data position from %d dataset file(s): %s', len(files), files)
    self.set_state(merged)


def make_stream(cfg, shard_id: int, num_shards: int, *, finite: bool):
  """The document stream of a T5X `DatasetConfig` for one host's (or one stream shard's) rows.

  Args:
    cfg: T5X `utils.DatasetConfig`.
    shard_id: this host's data shard (T5X's `data_layout.shard_id`), or stream shard.
    num_shards: number of data shards (hosts that read different data), or stream shards.
    finite: one pass over the split (evaluation) instead of endless epochs.

  Returns:
    The prepared split when `tasks.PreparedDataConfig.root` is set
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
    stream_shards: None: one document stream (unit) per host. An integer S dividing the batch:
      the documents are split into S streams of `batch_size / S` rows. Either way the saved
      position keeps this layout and a run resumed on another number of hosts continues it
      (`UnitStream`); S fixes the global batch of a new run whatever the host count.

  Returns:
    A `clu` `DatasetIterator` of model-feature batches with `save`/`restore`.
  """
  del feature_converter_cls, continue_from_last_checkpoint
  if num_epochs is not None:
    raise ValueError(
      f'num_epochs={num_epochs}: the training document stream is endless (it re-reads the '
      'documents in a new order each epoch); bound training with TRAIN_STEPS instead.'
    )
  _check_cfg(cfg, num_shards)
  stream = UnitStream(
    lambda u, n: make_stream(cfg, u, n, finite=False),
    global_batch=cfg.batch_size,
    num_units=stream_shards or num_shards,
    shard_id=shard_id,
    num_shards=num_shards,
  )
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
