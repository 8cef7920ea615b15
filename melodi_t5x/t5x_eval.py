"""Streaming evaluation for memory decoders under `t5x.train` (train-eval) and `t5x.eval`.

T5X's eval step feeds every eval batch the same train state and drops the updated state, so
memory never flows from one chunk of a document to the next. `MemoryTrainer`
replaces the trainer's `eval`: it starts each eval pass with zero memory shaped for the eval batch,
threads the memory returned by each step into the next (never into the train state), and sums
per-token NLL on the host in float64, overall and by position in document. Every real target token
is counted once (`report.PerplexityAccumulator` checks that no chunk is scored twice).

Bind it in gin as `train_script.train.trainer_cls` (training; train-eval then streams too) and as
`eval_script.evaluate.training_evaluator_cls` (evaluation, which also writes the report: JSON,
Markdown and a PNG of perplexity by position-in-document bucket).

Each pass logs its progress (`EvalProgress`: batches, tokens scored, tokens/s and an ETA, every
`progress_seconds`) and `eval` writes, besides T5X's metrics, the per-position perplexities and
the report image to TensorBoard through a clu metric writer (`write_tensorboard`).

seqio's inference path (score/predict) cannot carry memory, so for `t5x.eval`
`StreamingOnlyInferenceEvaluator` stands in for `seqio.Evaluator`: it gives T5X the model feature
shapes it needs to restore the checkpoint and runs no seqio metrics.
"""

from __future__ import annotations

import concurrent.futures
import copy
import dataclasses
import json
import os
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import clu.metrics
import gin
import jax
import jax.numpy as jnp
import numpy as np
import seqio
import tensorflow as tf
from absl import logging
from jax.experimental import multihost_utils
from t5x import metrics as metrics_lib
from t5x import partitioning as t5x_partitioning
from t5x import trainer as trainer_lib

from melodi_t5x import attribution as attribution_lib
from melodi_t5x import preemption, report, t5x_data, t5x_model

# Evaluation settings of `MemoryTrainer.memory_mode`: memory carried over each whole document, or
# reset at every chunk. Besides these, 'no_<source>' carries memory but drops one memory source of
# the architecture at every window (`ablation_modes`).
MEMORY_MODES = ('carried', 'reset')
ABLATION_PREFIX = 'no_'


def ablation_modes(module_config) -> tuple[str, ...]:
  """The eval-time ablation modes of a decoder config: 'no_<source>' per `MEMORY_SOURCES`."""
  return tuple(ABLATION_PREFIX + s for s in getattr(type(module_config), 'MEMORY_SOURCES', {}))


def check_memory_mode(memory_mode: str, module_config) -> None:
  """Raises a ValueError naming the modes this model supports if `memory_mode` is not one."""
  known = MEMORY_MODES + ablation_modes(module_config)
  if memory_mode not in known:
    raise ValueError(
      f'MemoryTrainer.memory_mode={memory_mode!r}: must be one of {known} for '
      f'{type(module_config).__name__} (gin: t5x_eval.MemoryTrainer.memory_mode, or MEMORY_MODE '
      'in gin/runs/melodi_eval.gin).'
    )


# Batch keys sent to the device: an eval batch's (`document_id` as its int32 key; the original id
# stays on the host for the report).
DEVICE_KEYS = t5x_data.EVAL_KEYS
# `trainer.Trainer` arguments that `t5x.train` leaves to gin; MemoryTrainer forwards their
# `trainer.Trainer` bindings (T5X's pretrain.gin sets two of them).
FORWARDED_TRAINER_ARGS = ('learning_rate_fn', 'num_microbatches', 'weight_metrics_computer')
_UNSET = object()


def device_batch(batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """The model features of a streamed batch, as device-friendly numpy arrays."""
  missing = {'decoder_input_tokens', 'decoder_target_tokens', 'start_of_sequence'} - set(batch)
  if missing:
    raise ValueError(
      f'streamed eval batch lacks {sorted(missing)}; build eval data with '
      'melodi_t5x.t5x_data.get_eval_datasets (train_eval_get_dataset_fn in gin).'
    )
  out = {k: np.asarray(batch[k]) for k in DEVICE_KEYS if k in batch}
  for key in ('decoder_input_tokens', 'decoder_target_tokens'):
    out[key] = out[key].astype(np.int32)
  if 'decoder_loss_weights' in out:
    out['decoder_loss_weights'] = out['decoder_loss_weights'].astype(np.float32)
  out['start_of_sequence'] = out['start_of_sequence'].astype(bool)
  if 'document_id' in out:
    out['document_id'] = t5x_data.document_key(out['document_id'])
  if 'chunk_index' in out:
    out['chunk_index'] = out['chunk_index'].astype(np.int32)
  if 'row_valid' in out:
    out['row_valid'] = out['row_valid'].astype(bool)
  return out


def padding_batch(spec: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """An all-padding eval batch shaped like `spec` (a host with no data left feeds these)."""
  out = {k: np.zeros(v.shape, v.dtype) for k, v in spec.items()}
  if 'start_of_sequence' in out:
    out['start_of_sequence'][:] = True
  for key in ('document_id', 'chunk_index'):
    if key in out:
      out[key][:] = -1
  out['row_valid'] = np.zeros(out['decoder_target_tokens'].shape[:1], bool)
  return out


def _gin_bindings(configurable, resolve: bool) -> dict[str, Any]:
  """The gin bindings of `configurable` ({} if it is not registered with gin).

  With `resolve`, references are evaluated (e.g. `@t5x_schedule.warmup_cosine()`); an error
  raised while evaluating one (such as the schedule's own validation) propagates, so it is never
  mistaken for "no binding".
  """
  try:
    unresolved = dict(gin.get_bindings(configurable, resolve_references=False))
  except (ValueError, KeyError, TypeError):  # not registered with gin: no bindings
    return {}
  if not resolve or not unresolved:
    return unresolved
  return dict(gin.get_bindings(configurable, resolve_references=True))


def forward_trainer_bindings(cls, given: dict[str, Any]) -> dict[str, Any]:
  """Fills `given` (FORWARDED_TRAINER_ARGS left `_UNSET`) from the `trainer.Trainer` bindings.

  `t5x.train` calls `trainer_cls(model=..., ...)` without these arguments, so with
  `trainer_cls = @t5x_eval.MemoryTrainer` the bindings of `trainer.Trainer` would otherwise be
  ignored.

  Raises:
    ValueError: if `trainer.Trainer` and `cls` bind the same argument to different values, or
      `trainer.Trainer` binds an argument that `t5x.train` passes itself.
  """
  base = _gin_bindings(trainer_lib.Trainer, resolve=False)
  own = _gin_bindings(cls, resolve=False)
  stray = sorted(set(base) - set(FORWARDED_TRAINER_ARGS))
  if stray:
    raise ValueError(
      f'trainer.Trainer bindings {stray} have no effect with trainer_cls = {cls.__name__}; remove '
      'them (t5x.train passes these arguments itself).'
    )
  for name in FORWARDED_TRAINER_ARGS:
    if name in base and name in own and repr(base[name]) != repr(own[name]):
      raise ValueError(
        f'trainer.Trainer.{name} = {base[name]!r} and {cls.__name__}.{name} = {own[name]!r} '
        f'disagree; bind only trainer.Trainer.{name} ({cls.__name__} takes it from there).'
      )
  resolved = _gin_bindings(trainer_lib.Trainer, resolve=True) if base else {}
  out = dict(given)
  for name in FORWARDED_TRAINER_ARGS:
    if out[name] is _UNSET:
      out[name] = resolved.get(name)
  return out


class MemoryTrainer(trainer_lib.Trainer):
  """`t5x.trainer.Trainer` for memory models: T5X training, streaming evaluation with memory.

  Training is T5X's (`Trainer.train`); `learning_rate_fn`, `num_microbatches` and
  `weight_metrics_computer` are taken from the `trainer.Trainer` gin bindings when not given
  (`forward_trainer_bindings`); on SIGTERM every host stops at the same step and T5X saves an
  emergency checkpoint (`melodi_t5x.preemption`). `eval` expects, per eval name, a re-iterable
  dataset (or an iterator) of streamed batches: row r of batch t+1 continues the document of row
  r of batch t, with `start_of_sequence`, `document_id`, `chunk_index` and optionally
  `row_valid`.
  """

  def __init__(
    self,
    model: t5x_model.MemoryDecoderModel,
    train_state: Any,
    partitioner: Any,
    eval_names: Sequence[str],
    summary_dir: str | None,
    train_state_axes: Any,
    rng: jax.Array,
    learning_rate_fn: Any = _UNSET,
    num_microbatches: Any = _UNSET,
    weight_metrics_computer: Any = _UNSET,
    report_dir: str | None = None,
    bucket_edges: Sequence[int] | None = None,
    memory_mode: str = 'carried',
    stop_on_nonfinite: bool = True,
    attribution: bool = False,
    progress_seconds: float | None = 30.0,
  ):
    """Constructor; the first nine arguments are T5X's (see `t5x.trainer.Trainer`).

    Args:
      model: a `MemoryDecoderModel`.
      train_state: the train state (None at first in `t5x.eval`, set before `eval`).
      partitioner: the T5X partitioner.
      eval_names: names of the eval datasets.
      summary_dir: TensorBoard directory.
      train_state_axes: partitioning of the train state.
      rng: base rng (dropout in training).
      learning_rate_fn: training learning-rate schedule (unused in `t5x.eval`).
      num_microbatches: must be None or 1: a microbatch would see every row's memory.
      weight_metrics_computer: as in `Trainer`.
      report_dir: if set, each `eval` writes `<report_dir>/<name>_step<N>_<memory_mode>.{json,md,
        png}`.
      bucket_edges: token offsets of the position-in-document buckets; default chunk 0, 1, 2-3,
        4-7, ... of the eval segment length, extended up to the longest document.
      memory_mode: 'carried' (memory flows from chunk to chunk of a document), 'reset' (every
        chunk starts from zero memory: what carried memory adds to this checkpoint), or
        'no_<source>' (carried, but the decoder does not read one memory source of its
        config's `MEMORY_SOURCES`, e.g. MELODI's 'no_long_term': what that source adds). In every
        mode but 'reset' an eval pass fails if any row was reset because it did not continue its
        memory's document (its perplexity would silently be a reset one).
      attribution: eval only: also record how much attention each layer's scored tokens put on
        each memory source (`melodi_t5x.attribution`), reported under 'attribution' in the report
        JSON and Markdown, and drawn in `<report>_attribution.png`. Compiles a second eval step;
        the default (False) leaves the eval step unchanged.
      stop_on_nonfinite: training stops with an error naming the step at the first step whose
        loss or written memory holds a NaN / inf (a NaN in a row's memory would otherwise persist
        until its document ends, and the run go on); False: train on.
      progress_seconds: seconds between the progress lines of a streaming eval pass (batches,
        tokens, tokens/s, ETA); 0 logs every batch, None none.
    """
    check_memory_mode(memory_mode, getattr(getattr(model, 'module', None), 'config', None))
    forwarded = forward_trainer_bindings(
      type(self),
      {
        'learning_rate_fn': learning_rate_fn,
        'num_microbatches': num_microbatches,
        'weight_metrics_computer': weight_metrics_computer,
      },
    )
    learning_rate_fn = forwarded['learning_rate_fn']
    num_microbatches = forwarded['num_microbatches']
    weight_metrics_computer = forwarded['weight_metrics_computer']
    if num_microbatches not in (None, 1):
      raise ValueError(
        f'trainer.Trainer.num_microbatches={num_microbatches}: memory models carry per-row '
        "memory and T5X's microbatching hands every microbatch all rows' memory; set it to None."
      )
    super().__init__(
      model=model,
      train_state=train_state,
      partitioner=partitioner,
      eval_names=eval_names,
      summary_dir=summary_dir,
      train_state_axes=train_state_axes,
      rng=rng,
      learning_rate_fn=learning_rate_fn,
      num_microbatches=num_microbatches,
      weight_metrics_computer=weight_metrics_computer,
    )
    self._report_dir = report_dir
    # T5X's model dir in `t5x.train` (where its checkpoints are).
    self._summary_dir = summary_dir
    self._memory_mode = memory_mode
    self._bucket_edges = list(bucket_edges) if bucket_edges else None
    self._streaming_step = None
    self._stop_on_nonfinite = bool(stop_on_nonfinite)
    self._attribution = bool(attribution)
    # Attribution summary of the last `stream` pass (all hosts), or None.
    self.last_attribution: dict[str, Any] | None = None
    # Whether to stop before the next training step for a preemption (SIGTERM).
    self._preemption = preemption.PreemptionWatch()
    self._progress_seconds = progress_seconds
    # One TensorBoard writer per summary folder for the run (not one event file per eval).
    self._tensorboard_writers: dict[str, Any] = {}
    self.last_reports: dict[str, dict[str, Any]] = {}
    # Rows reset by misalignment in the last `stream` pass (all hosts): count and first examples.
    self.last_misaligned: dict[str, Any] = {'rows': 0, 'examples': []}

  # -- training --------------------------------------------------------------------------------

  def train(self, batch_iter, num_steps: int, start_step: int | None = None):
    """T5X's `Trainer.train`, stopping at a non-finite loss or memory, or for a preemption.

    Before each step the preemption watch is asked whether to stop (`melodi_t5x.preemption`:
    SIGTERM, every host at the same step). Then the train state is that of the last finished
    step and `PreemptionError` is raised, on which T5X's `train` saves an emergency checkpoint
    (`PreemptedBeforeTraining` if this process has not trained a step: nothing to save).
    """
    first = int(start_step if start_step is not None else jax.device_get(self.train_state.step))
    inner = self._compiled_train_step or self._partitioned_train_step
    guard = NonFiniteGuard(first) if self._stop_on_nonfinite else None
    # The state after the last step finished in this call (None: no step yet).
    done = {'state': None, 'steps': 0}

    def step(train_state, batch):
      train_state, metrics = inner(train_state, batch)
      if guard is not None:
        guard.push(metrics)
      done['state'], done['steps'] = train_state, done['steps'] + 1
      return train_state, metrics

    compiled = self._compiled_train_step
    self._compiled_train_step = step
    batches = preemption.StoppingBatches(batch_iter, self._preemption, first)
    try:
      summary = super().train(batches, num_steps, start_step)
    except preemption.SyncPointReached:
      self._stop_for_preemption(first + done['steps'], done['state'], guard)
    finally:
      self._compiled_train_step = compiled
    if guard is not None:
      guard.drain()
    return summary

  def _stop_for_preemption(self, step: int, train_state: Any, guard: NonFiniteGuard | None):
    """Keeps the state of the last finished step (`step` steps done) and raises for T5X."""
    if guard is not None:
      guard.drain()  # a non-finite step fails the run rather than being saved
    if train_state is not None:
      self.train_state = train_state
    logging.warning('Preemption: every host stops at step %d (checkpoint_%d).', step, step)
    if not self._preemption.steps:
      raise preemption.PreemptedBeforeTraining(
        f'preempted at step {step} before this process trained a step: nothing new to save'
      )
    if train_state is None and self._has_checkpoint(step):
      raise preemption.PreemptedBeforeTraining(
        f'preempted at step {step}, whose checkpoint was just saved: nothing new to save'
      )
    raise trainer_lib.PreemptionError(
      f'preempted: stopped after step {step}, which T5X saves as an emergency checkpoint'
    )

  def _has_checkpoint(self, step: int) -> bool:
    """Whether T5X's checkpoint of `step` exists in the model dir (T5X's summary dir)."""
    return bool(self._summary_dir) and tf.io.gfile.exists(
      os.path.join(self._summary_dir, f'checkpoint_{step}')
    )

  # -- the partitioned step --------------------------------------------------------------------

  @property
  def memory_mode(self) -> str:
    return self._memory_mode

  @memory_mode.setter
  def memory_mode(self, mode: str) -> None:
    """Switches the eval memory mode (the next `stream` compiles the step of that mode)."""
    check_memory_mode(mode, getattr(self._model.module, 'config', None))
    if mode != self._memory_mode:
      self._streaming_step = None
    self._memory_mode = mode

  def _eval_model(self):
    """The model scored: a copy whose decoder drops a source ('no_<source>' modes) or records
    attribution, else the model itself."""
    changes = {}
    if self._memory_mode.startswith(ABLATION_PREFIX):
      changes['drop_sources'] = (self._memory_mode[len(ABLATION_PREFIX) :],)
    if self._attribution:
      changes['record_attribution'] = True
    if not changes:
      return self._model
    module = self._model.module
    model = copy.copy(self._model)
    model.module = module.clone(config=dataclasses.replace(module.config, **changes))
    return model

  def _make_streaming_step(self):
    model = self._eval_model()
    record = self._attribution
    axes = self._train_state_axes
    data_spec = self._partitioner.data_partition_spec

    def step(params, memory, batch):
      logits, new_memory, intermediates = model.apply_with_memory(params, batch, memory)
      targets = batch['decoder_target_tokens']
      no_rows = jnp.zeros(targets.shape[:1], bool)
      out = {
        'nll': t5x_model.token_nll(logits, targets),
        'correct': jnp.argmax(logits, axis=-1) == targets,
        'weights': t5x_model.loss_weights(batch),
        'misaligned': intermediates.get(t5x_model.MISALIGNED_MASK, no_rows),
      }
      if record:
        out['attribution'] = attribution_lib.collect(intermediates, *targets.shape)
      return out, new_memory

    return self._partitioner.partition(
      step,
      in_axis_resources=(axes.params, axes.flax_mutables, data_spec),
      out_axis_resources=(data_spec, axes.flax_mutables),
      donate_argnums=(1,),
    )

  def _zero_memory(self, flax_mutables: Any, global_batch: int) -> Any:
    """Zero memory for `global_batch` rows, created sharded like the train state's memory."""
    shapes = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct((global_batch, *x.shape[1:]), x.dtype), flax_mutables
    )
    make = self._partitioner.partition(
      lambda: jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes),
      in_axis_resources=(),
      out_axis_resources=self._train_state_axes.flax_mutables,
    )
    return make()

  def compile_eval(self, batches: Mapping[str, Any]) -> None:
    """No ahead-of-time compilation: the streaming step compiles on its first batch."""
    del batches

  # -- eval ------------------------------------------------------------------------------------

  def eval(self, batch_iters: Mapping[str, Iterable[Mapping[str, Any]]]) -> Mapping[str, Any]:
    """Streams each eval dataset once with carried memory; returns the metric values by name."""
    train_state = self.train_state
    # A memory decoder may carry nothing (e.g. XLConfig.use_cache=False): it streams with no state.
    if not train_state.flax_mutables and not isinstance(self._model, t5x_model.MemoryDecoderModel):
      raise ValueError(
        'The train state has no flax_mutables (memory); MemoryTrainer needs a model with carried '
        'memory: melodi_t5x.t5x_model.MemoryDecoderModel with a memory decoder module.'
      )
    step_num = int(jax.device_get(train_state.step))
    summaries = {}
    for name, dataset in batch_iters.items():
      logging.info('Streaming evaluation of %s at step %d.', name, step_num)
      mm = self.eval_metrics_managers[name]
      mm.start_duration_timer(block_on=train_state)
      tick = time.time()
      acc, num_batches = self.stream(
        train_state.params, train_state.flax_mutables, dataset, name=name
      )
      extra = {
        'task': name,
        'checkpoint_step': step_num,
        'seconds': time.time() - tick,
        'memory_mode': self._memory_mode,
        'hosts': jax.process_count(),
        'misaligned_rows': self.last_misaligned['rows'],
      }
      if self.last_attribution is not None:
        extra['attribution'] = self.last_attribution
      summary = acc.summary(**extra, **getattr(dataset, 'report_info', {}))
      self.last_reports[name] = summary
      logging.info(
        'Streaming eval %s: perplexity %s over %d tokens, %d documents (all hosts), %.1f s.',
        name,
        summary['perplexity'],
        summary['tokens'],
        summary['documents'],
        summary['seconds'],
      )
      if self._report_dir and jax.process_index() == 0:
        base = report_name(name, step_num, self._memory_mode)
        paths = report.write_report(summary, self._report_dir, base)
        if self.last_attribution is not None:
          attribution_lib.plot(
            self.last_attribution,
            os.path.join(self._report_dir, f'{base}_attribution.png'),
            f'{name} step {step_num} ({self._memory_mode}): memory-read attribution',
          )
        logging.info('Wrote perplexity report %s', paths['json'])
      if mm.summary_dir and jax.process_index() == 0:
        write_tensorboard(self._tensorboard_writer(mm.summary_dir), summary, step_num)
      metrics = self._summary_metrics(acc)
      summaries[name] = mm.write_metrics_summary(metrics, step_num, max(num_batches, 1))
    return {k: v.result() for k, v in summaries.items()}

  def _tensorboard_writer(self, summary_dir: str):
    if summary_dir not in self._tensorboard_writers:
      from clu import metric_writers  # pylint: disable=g-import-not-at-top

      self._tensorboard_writers[summary_dir] = metric_writers.create_default_writer(
        summary_dir, asynchronous=False
      )
    return self._tensorboard_writers[summary_dir]

  def stream(
    self,
    params: Any,
    flax_mutables: Any,
    dataset: Iterable[Mapping[str, Any]],
    name: str = 'eval',
  ) -> tuple[report.PerplexityAccumulator, int]:
    """One pass over `dataset` from zero memory, on every host; returns all hosts' totals.

    Each host streams its own documents. All hosts run the same number of steps: while any host
    has a batch left, the others feed padding batches (`row_valid` False). Host-local batches
    become global arrays as in T5X's `Trainer.eval`; per-token results come back as this host's
    rows. At the end the hosts' accumulators are combined, so every host returns the totals of
    every document of the split. Progress (this host's rows) is logged as `name`.

    The memory holds the global batch: this host's rows times the number of data shards (hosts
    that read different data). When the model axis spans hosts, several hosts hold the same rows
    (a replica set); only the first host of each set counts them.

    Returns:
      The combined accumulator and the number of steps.

    Raises:
      ValueError: in 'carried' mode, if any row did not continue its memory's document (it was
        reset, so its perplexity would be a reset one); counted in `last_misaligned` either way.
    """
    if self._streaming_step is None:
      self._streaming_step = self._make_streaming_step()
    num_hosts = jax.process_count()
    counts_rows = bool(self._partitioner.get_data_layout().is_first_host_in_replica_set)
    iterator = _fresh_iterator(dataset)
    spec = getattr(iterator, 'element_spec', None) or getattr(dataset, 'element_spec', None)
    progress = EvalProgress(
      f'{name} (memory {self._memory_mode})',
      self._progress_seconds,
      dataset if self._progress_seconds is not None else None,
    )
    try:
      acc, attr, num_batches, misaligned, examples = self._stream_batches(
        params, flax_mutables, iterator, spec, progress
      )
    finally:
      progress.close()
    if acc is None:
      raise ValueError('the eval dataset produced no batches; check its split and task name.')
    if num_hosts > 1:
      if not counts_rows:
        acc = report.PerplexityAccumulator(
          list(acc.bucket_edges), grow=acc.grow, window_length=acc.window_length
        )
      acc = _combine_across_hosts(acc)
      if attr is not None:
        attr = _combine_attribution(attr if counts_rows else attr.empty())
      misaligned, examples = _combine_misaligned(misaligned, examples)
    self.last_misaligned = {'rows': misaligned, 'examples': examples}
    self.last_attribution = None
    if attr is not None:
      self.last_attribution = attr.summary(report.window_bucket_edges(attr.window_length))
    if misaligned and self._memory_mode != 'reset':
      detail = ', '.join(f'batch {b} row {r}: document {d} chunk {c}' for b, r, d, c in examples)
      raise ValueError(
        f'Streaming eval (memory_mode {self._memory_mode}): {misaligned} eval rows did not '
        f'continue the document of their memory and were reset ({detail}); their perplexity '
        'would be a reset one, not a carried one. Feed eval batches from the document stream '
        '(train_eval_get_dataset_fn = @t5x_data.get_eval_datasets), whose row r of batch t+1 '
        "continues row r of batch t, or evaluate with MEMORY_MODE = 'reset'."
      )
    return acc, num_batches

  def _stream_batches(self, params, flax_mutables, iterator, spec, progress):
    """The loop of `stream`: this host's (accumulator, attribution accumulator or None, steps,
    misaligned rows, examples)."""
    num_hosts = jax.process_count()
    layout = self._partitioner.get_data_layout()
    counts_rows = bool(layout.is_first_host_in_replica_set)
    mesh, data_spec = self._partitioner.mesh, self._partitioner.data_partition_spec
    misaligned, examples = 0, []
    acc, memory, num_batches = None, None, 0
    attr = None
    while True:
      batch = next(iterator, None)
      if num_hosts > 1:
        live = multihost_utils.process_allgather(np.asarray(batch is not None, np.int32))
        if not np.any(live):
          break
        if batch is None:
          if spec is None:
            raise ValueError('an eval dataset without element_spec cannot be padded across hosts.')
          batch = padding_batch(spec)
      elif batch is None:
        break
      host = {k: np.asarray(v) for k, v in batch.items()}
      for key in ('document_id', 'chunk_index'):
        if key not in host:
          raise ValueError(
            f"streamed eval batch lacks '{key}', needed to place tokens in their documents; "
            'build eval data with melodi_t5x.t5x_data.get_eval_datasets.'
          )
      dev = device_batch(host)
      if self._memory_mode == 'reset':
        dev['start_of_sequence'] = np.ones_like(dev['start_of_sequence'])
      batch_size, length = dev['decoder_target_tokens'].shape
      if acc is None:
        acc = report.PerplexityAccumulator(
          self._bucket_edges or report.default_bucket_edges(length, length + 1),
          grow=not self._bucket_edges,
          window_length=_window_length(self._model),
        )
        memory = self._zero_memory(flax_mutables, batch_size * layout.num_shards)
        if self._attribution:
          attr = attribution_lib.AttributionAccumulator(acc.window_length or length)
      if num_hosts > 1:
        dev = t5x_partitioning.host_local_array_to_global_array(dev, mesh, data_spec)
      out, memory = self._streaming_step(params, memory, dev)
      if num_hosts > 1:
        out = multihost_utils.global_array_to_host_local_array(out, mesh, data_spec)
      out = jax.tree_util.tree_map(np.asarray, out)
      num_batches += 1
      progress.add(real_tokens(host))
      if not counts_rows:
        continue  # another host of this replica set counts these rows
      for r in np.flatnonzero(out['misaligned']):
        misaligned += 1
        if len(examples) < 4:
          examples.append(
            [num_batches, int(r), int(host['document_id'][r]), int(host['chunk_index'][r])]
          )
      acc.add(
        out['nll'],
        out['weights'],
        host['document_id'],
        host['chunk_index'],
        host.get('row_valid'),
        out['correct'],
      )
      if attr is not None:
        attr.add(out['attribution'], out['weights'])
    return acc, attr, num_batches, misaligned, examples

  @staticmethod
  def _summary_metrics(acc: report.PerplexityAccumulator) -> dict[str, clu.metrics.Metric]:
    tokens = np.float32(max(acc.tokens, 1))
    nll = np.float32(acc.nll_sum)
    return {
      'cross_ent_loss_per_nonpadding_target_token': clu.metrics.Average(total=nll, count=tokens),
      'perplexity': t5x_model.Perplexity(total=nll, count=tokens),
      'accuracy': clu.metrics.Average(total=np.float32(acc.correct), count=tokens),
      'num_tokens': metrics_lib.Sum(total=np.float32(acc.tokens)),
      'num_documents': metrics_lib.Sum(total=np.float32(acc.documents)),
    }


def real_tokens(batch: Mapping[str, Any]) -> int:
  """Real target tokens of a host batch (loss weight > 0 in a valid row)."""
  targets = np.asarray(batch['decoder_target_tokens'])
  weights = np.asarray(batch.get('decoder_loss_weights', targets != 0)) > 0
  if 'row_valid' in batch:
    weights = weights & np.asarray(batch['row_valid'], bool)[:, None]
  return int(np.count_nonzero(weights))


def _format_seconds(seconds: float) -> str:
  seconds = int(round(seconds))
  if seconds < 60:
    return f'{seconds} s'
  if seconds < 3600:
    return f'{seconds // 60} min {seconds % 60:02d} s'
  return f'{seconds // 3600} h {seconds % 3600 // 60:02d} min'


class EvalProgress:
  """Progress lines of one streaming eval pass: batches, tokens scored, tokens/s and an ETA.

  The number of tokens of the pass (this host's rows) is counted on a background thread from a
  second pass over a re-iterable `dataset` (the data pipeline only, no model); until it is known,
  or for a one-shot iterator, the line says so instead of an ETA. Tokens/s is measured from the
  end of the first batch (whose time is mostly compilation, logged on its own).
  """

  def __init__(
    self,
    label: str,
    period: float | None,
    dataset: Iterable[Mapping[str, Any]] | None = None,
    clock=time.monotonic,
  ):
    self._label, self._period, self._clock = label, period, clock
    self._start = self._last = clock()
    self._first: tuple[float, int] | None = None  # (time, tokens) at the end of the first batch
    self.batches = self.tokens = 0
    self.total: int | None = None
    self._stop = threading.Event()
    self._counter = None
    if period is not None and dataset is not None and not isinstance(dataset, Iterator):
      self._counter = threading.Thread(target=self._count, args=(dataset,), daemon=True)
      self._counter.start()

  def _count(self, dataset) -> None:
    total = 0
    try:
      for batch in dataset:
        if self._stop.is_set():
          return
        total += real_tokens(batch)
    except Exception as e:  # pylint: disable=broad-except  (the eval pass itself will report it)
      logging.warning('Streaming eval %s: counting its tokens failed (%s); no ETA.', self._label, e)
      return
    self.total = total

  def close(self) -> None:
    self._stop.set()

  def add(self, tokens: int) -> None:
    """Counts one finished batch; logs a line when `period` seconds have passed."""
    now = self._clock()
    self.batches += 1
    self.tokens += tokens
    if self._first is None:
      self._first = (now, self.tokens)
      if self._period is not None:
        logging.info(
          'Streaming eval %s: first batch after %s (compilation included).',
          self._label,
          _format_seconds(now - self._start),
        )
      self._last = now
      return
    if self._period is not None and now - self._last >= self._period:
      self._last = now
      logging.info('%s', self.line(now))

  def line(self, now: float | None = None) -> str:
    now = self._clock() if now is None else now
    first_time, first_tokens = self._first or (self._start, 0)
    elapsed = now - first_time
    rate = (self.tokens - first_tokens) / elapsed if elapsed > 0 else 0.0
    text = (
      f'Streaming eval {self._label}: batch {self.batches}, {self.tokens} tokens in '
      f'{_format_seconds(now - self._start)} ({rate:.0f} tokens/s)'
    )
    if self.total:
      left = max(self.total - self.tokens, 0)
      eta = _format_seconds(left / rate) if rate > 0 else 'unknown'
      text += f', {100 * self.tokens / self.total:.0f}% of {self.total} tokens, ETA {eta}'
    elif self._counter is not None:
      text += ', ETA after the split is counted'
    return text + '.'


def write_tensorboard(writer, summary: Mapping[str, Any], step: int) -> list[str]:
  """Writes a report's perplexities and its image with a clu metric writer; returns the tags.

  `MemoryTrainer` writes to T5X's eval summary folder (`training_eval/<task>`). Tags, per memory
  mode:
  `<mode>/perplexity`, `<mode>/position/<i>_<start>-<end>/perplexity` (bucket i, two digits so
  that TensorBoard lists them in order; token offsets from the document start) and the image
  `<mode>/perplexity_by_position`.
  """
  mode = summary.get('memory_mode', 'carried')
  scalars = {f'{mode}/perplexity': summary['perplexity']}
  for i, b in enumerate(summary['position_buckets']):
    if b['tokens']:
      end = b['end'] if b['end'] is not None else 'end'
      scalars[f'{mode}/position/{i:02d}_{b["start"]}-{end}/perplexity'] = b['perplexity']
  images = {f'{mode}/perplexity_by_position': report.bucket_image(summary)[None]}
  writer.write_scalars(step, scalars)
  writer.write_images(step, images)
  writer.flush()
  return [*scalars, *images]


def _window_length(model) -> int | None:
  """The decoder's window length (tokens per window), if its module has a config with one."""
  config = getattr(getattr(model, 'module', None), 'config', None)
  return getattr(config, 'window_length', None)


def _allgather_json(obj: Any) -> list[Any]:
  """Every host's JSON-able `obj`, in process order."""
  blob = np.frombuffer(json.dumps(obj).encode(), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.asarray(blob.size, np.int64)))
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[: blob.size] = blob
  blobs = np.asarray(multihost_utils.process_allgather(padded))
  return [json.loads(blobs[host, : int(sizes[host])].tobytes()) for host in range(len(sizes))]


def _combine_across_hosts(acc: report.PerplexityAccumulator) -> report.PerplexityAccumulator:
  """The sum of every host's accumulator (each host streamed different documents)."""
  combined = report.PerplexityAccumulator(
    list(acc.bucket_edges), grow=acc.grow, window_length=acc.window_length
  )
  for state in _allgather_json(acc.get_state()):
    combined.merge_state(state)
  return combined


def _combine_attribution(
  attr: attribution_lib.AttributionAccumulator,
) -> attribution_lib.AttributionAccumulator:
  """The sum of every host's attribution totals."""
  combined = attr.empty()
  for state in _allgather_json(attr.get_state()):
    combined.merge_state(state)
  return combined


def _combine_misaligned(count: int, examples: list[list[int]]) -> tuple[int, list[list[int]]]:
  """Every host's misaligned-row count (summed) and up to 4 examples."""
  counts = np.asarray(multihost_utils.process_allgather(np.asarray(count, np.int64)))
  padded = np.full((4, 4), -1, np.int64)
  for i, e in enumerate(examples[:4]):
    padded[i] = e
  gathered = np.asarray(multihost_utils.process_allgather(padded)).reshape(-1, 4)
  return int(counts.sum()), [list(map(int, e)) for e in gathered if e[0] >= 0][:4]


class NonFiniteGuard:
  """Checks each training step's loss and memory for NaN / inf, a few steps behind the device.

  `push` takes the step's metrics (device values; nothing waits), `drain` checks the rest.
  Checking a step only once a few later ones have been dispatched keeps the device busy.

  Raises:
    FloatingPointError: naming the first step whose loss or written memory is not finite.
  """

  LAG = 4

  def __init__(self, first_step: int):
    self._next = int(first_step)
    self._pending: list[tuple[int, Any, Any]] = []

  def push(self, metrics: Mapping[str, Any]) -> None:
    loss = metrics.get('loss')
    loss = getattr(loss, 'total', loss)
    memory = metrics.get(t5x_model.NONFINITE_MEMORY)
    memory = getattr(memory, 'total', memory)
    self._next += 1
    self._pending.append((self._next, loss, memory))
    while len(self._pending) > self.LAG:
      self._check(*self._pending.pop(0))

  def drain(self) -> None:
    while self._pending:
      self._check(*self._pending.pop(0))

  @staticmethod
  def _check(step: int, loss, memory) -> None:
    loss_value = None if loss is None else float(np.asarray(jax.device_get(loss)))
    bad_memory = 0 if memory is None else int(np.asarray(jax.device_get(memory)))
    if (loss_value is not None and not np.isfinite(loss_value)) or bad_memory:
      raise FloatingPointError(
        f'Training step {step}: loss {loss_value}, {bad_memory} non-finite values in the memory '
        'it wrote. The run stops here (the last checkpoint before this step is intact; a NaN in '
        "a row's memory would stay until its document ends). Lower the learning rate or check "
        'the data of this step; t5x_eval.MemoryTrainer.stop_on_nonfinite = False trains on.'
      )


def _fresh_iterator(dataset: Iterable[Mapping[str, Any]]) -> Iterator[Mapping[str, Any]]:
  """A pass from the start: re-iterables give a new iterator; iterators are reset if possible."""
  if isinstance(dataset, Iterator):
    reset = getattr(dataset, 'reset', None)
    if reset is not None:
      try:
        reset()
      except NotImplementedError:
        pass
    return dataset
  return iter(dataset)


class StreamingOnlyInferenceEvaluator:
  """Stand-in for `seqio.Evaluator` in `t5x.eval`: model feature shapes, no seqio metrics.

  `t5x.eval` always builds a seqio inference evaluator: it takes the model's input shapes from it
  and refuses to run if it has no tasks. Its score/predict paths cannot carry memory, so this class
  provides the shapes and the task list and runs nothing; the perplexity is computed by
  `MemoryTrainer` (`eval_script.evaluate.training_evaluator_cls`). Bind it as
  `eval_script.evaluate.inference_evaluator_cls`.
  """

  def __init__(
    self,
    mixture_or_task_name: str,
    feature_converter: seqio.FeatureConverter,
    eval_split: str = 'test',
    sequence_length: Mapping[str, int] | None = None,
    **unused_kwargs,
  ):
    if not sequence_length or 'targets' not in sequence_length:
      raise ValueError(
        "utils.DatasetConfig.task_feature_lengths must give 'targets' (the chunk length), e.g. "
        "{'targets': 4096}."
      )
    task = seqio.get_mixture_or_task(mixture_or_task_name)
    if eval_split not in task.splits:
      raise ValueError(
        f'{mixture_or_task_name!r} has no split {eval_split!r} (splits: {list(task.splits)}); '
        'set utils.DatasetConfig.split.'
      )
    self._tasks = [task]
    lengths = feature_converter.get_model_feature_lengths(sequence_length)
    self._shapes = {k: (() if k == 'start_of_sequence' else (int(v),)) for k, v in lengths.items()}

  @property
  def model_feature_shapes(self) -> Mapping[str, tuple[int, ...]]:
    return self._shapes

  @property
  def eval_tasks(self) -> Sequence[seqio.Task]:
    return self._tasks

  def evaluate(self, **unused_kwargs) -> tuple[concurrent.futures.Future, None]:
    """Runs nothing; returns `(metrics future, None)` like `seqio.Evaluator.evaluate`."""
    future = concurrent.futures.Future()
    future.set_result({})
    return future, None

  def close(self):
    pass


def report_name(name: str, step: int, memory_mode: str = 'carried') -> str:
  """Base name of the report files written by `MemoryTrainer` (without extension)."""
  return f'{name}_step{step}_{memory_mode}'


def report_path(report_dir: str, name: str, step: int, memory_mode: str = 'carried') -> str:
  """Path of the JSON report written by `MemoryTrainer`."""
  return os.path.join(report_dir, report_name(name, step, memory_mode) + '.json')
