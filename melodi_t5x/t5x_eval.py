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

seqio's inference path (score/predict) cannot carry memory, so for `t5x.eval`
`StreamingOnlyInferenceEvaluator` stands in for `seqio.Evaluator`: it gives T5X the model feature
shapes it needs to restore the checkpoint and runs no seqio metrics.
"""

from __future__ import annotations

import concurrent.futures
import os
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import clu.metrics
import jax
import jax.numpy as jnp
import numpy as np
import seqio
from absl import logging
from t5x import metrics as metrics_lib
from t5x import trainer as trainer_lib

from melodi_t5x import report, t5x_model

# Batch keys sent to the device; the others (document_id, chunk_index) stay on the host.
DEVICE_KEYS = (
  'decoder_input_tokens',
  'decoder_target_tokens',
  'decoder_loss_weights',
  'start_of_sequence',
  'row_valid',
)


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
  if 'row_valid' in out:
    out['row_valid'] = out['row_valid'].astype(bool)
  return out


class MemoryTrainer(trainer_lib.Trainer):
  """`t5x.trainer.Trainer` whose `eval` carries model memory across the batches of a stream.

  Training is unchanged (`Trainer.train`). `eval` expects, per eval name, a re-iterable dataset
  (or an iterator) of streamed batches: row r of batch t+1 continues the document of row r of
  batch t, with `start_of_sequence`, `document_id`, `chunk_index` and optionally `row_valid`.
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
    learning_rate_fn: Any = None,
    num_microbatches: int | None = None,
    weight_metrics_computer: Any = None,
    report_dir: str | None = None,
    bucket_edges: Sequence[int] | None = None,
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
      report_dir: if set, each `eval` writes `<report_dir>/<name>_step<N>.{json,md,png}`.
      bucket_edges: token offsets of the position-in-document buckets; default chunk 0, 1, 2-3,
        4-7, ... of the eval segment length.
    """
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
    self._bucket_edges = list(bucket_edges) if bucket_edges else None
    self._streaming_step = None
    self.last_reports: dict[str, dict[str, Any]] = {}

  # -- the partitioned step --------------------------------------------------------------------

  def _make_streaming_step(self):
    model = self._model
    axes = self._train_state_axes
    data_spec = self._partitioner.data_partition_spec

    def step(params, memory, batch):
      logits, new_memory, _ = model.apply_with_memory(params, batch, memory)
      targets = batch['decoder_target_tokens']
      out = {
        'nll': t5x_model.token_nll(logits, targets),
        'correct': jnp.argmax(logits, axis=-1) == targets,
        'weights': t5x_model.loss_weights(batch),
      }
      return out, new_memory

    return self._partitioner.partition(
      step,
      in_axis_resources=(axes.params, axes.flax_mutables, data_spec),
      out_axis_resources=(data_spec, axes.flax_mutables),
      donate_argnums=(1,),
    )

  def compile_eval(self, batches: Mapping[str, Any]) -> None:
    """No ahead-of-time compilation: the streaming step compiles on its first batch."""
    del batches

  # -- eval ------------------------------------------------------------------------------------

  def eval(self, batch_iters: Mapping[str, Iterable[Mapping[str, Any]]]) -> Mapping[str, Any]:
    """Streams each eval dataset once with carried memory; returns the metric values by name."""
    if self._streaming_step is None:
      self._streaming_step = self._make_streaming_step()
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
      acc, num_batches = self.stream(train_state.params, train_state.flax_mutables, dataset)
      extra = {'task': name, 'checkpoint_step': step_num, 'seconds': time.time() - tick}
      summary = acc.summary(**extra, **getattr(dataset, 'report_info', {}))
      self.last_reports[name] = summary
      logging.info(
        'Streaming eval %s: perplexity %s over %d tokens, %d documents.',
        name,
        summary['perplexity'],
        summary['tokens'],
        summary['documents'],
      )
      if self._report_dir and jax.process_index() == 0:
        paths = report.write_report(summary, self._report_dir, f'{name}_step{step_num}')
        logging.info('Wrote perplexity report %s', paths['json'])
      metrics = self._summary_metrics(acc)
      summaries[name] = mm.write_metrics_summary(metrics, step_num, max(num_batches, 1))
    return {k: v.result() for k, v in summaries.items()}

  def stream(
    self, params: Any, flax_mutables: Any, dataset: Iterable[Mapping[str, Any]]
  ) -> tuple[report.PerplexityAccumulator, int]:
    """Runs one pass over `dataset` from zero memory; returns the accumulator and batch count."""
    if self._streaming_step is None:
      self._streaming_step = self._make_streaming_step()
    iterator = _fresh_iterator(dataset)
    acc, memory, num_batches = None, None, 0
    for batch in iterator:
      host = {k: np.asarray(v) for k, v in batch.items()}
      for key in ('document_id', 'chunk_index'):
        if key not in host:
          raise ValueError(
            f"streamed eval batch lacks '{key}', needed to place tokens in their documents; "
            'build eval data with melodi_t5x.t5x_data.get_eval_datasets.'
          )
      dev = device_batch(host)
      batch_size, length = dev['decoder_target_tokens'].shape
      if acc is None:
        acc = report.PerplexityAccumulator(
          self._bucket_edges or report.default_bucket_edges(length)
        )
        memory = t5x_model.zeros_memory_like(flax_mutables, batch_size)
      out, memory = self._streaming_step(params, memory, dev)
      out = jax.device_get(out)
      acc.add(
        out['nll'],
        out['weights'],
        host['document_id'],
        host['chunk_index'],
        host.get('row_valid'),
        out['correct'],
      )
      num_batches += 1
    if acc is None:
      raise ValueError('the eval dataset produced no batches; check its split and task name.')
    return acc, num_batches

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


# Former name, kept so existing gin files and imports keep working.
StreamingPerplexityEvaluator = MemoryTrainer


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


def report_path(report_dir: str, name: str, step: int) -> str:
  """Path of the JSON report written by `MemoryTrainer`."""
  return os.path.join(report_dir, f'{name}_step{step}.json')
