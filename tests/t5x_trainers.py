"""A `t5x_eval.MemoryTrainer` on fresh parameters, built as `t5x.train` builds it, for the
in-process T5X tests (call `needs.t5x()` before using it); the metrics a `t5x.train` log
holds."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp


def input_shapes(batch: int, length: int):
  """T5X's input shapes and types of a decoder-only model: int32 tokens [batch, length]."""
  shapes = {'decoder_input_tokens': (batch, length), 'decoder_target_tokens': (batch, length)}
  return shapes, {k: jnp.int32 for k in shapes}


def memory_trainer(model, partitioner, batch: int, length: int, **kwargs):
  """`t5x_eval.MemoryTrainer` of `model` on parameters initialised from PRNGKey(0).

  kwargs: the trainer's other arguments (`eval_names`, `summary_dir`, `rng`, `learning_rate_fn`,
  ...); `num_microbatches` and `weight_metrics_computer` are None unless given.
  """
  from t5x import utils  # pylint: disable=g-import-not-at-top

  from melodi_t5x import t5x_eval  # pylint: disable=g-import-not-at-top

  shapes, types = input_shapes(batch, length)
  initializer = utils.TrainStateInitializer(
    optimizer_def=model.optimizer_def,
    init_fn=model.get_initial_variables,
    input_shapes=shapes,
    input_types=types,
    partitioner=partitioner,
  )
  kwargs.setdefault('num_microbatches', None)
  kwargs.setdefault('weight_metrics_computer', None)
  return t5x_eval.MemoryTrainer(
    model=model,
    train_state=initializer.from_scratch(jax.random.PRNGKey(0)),
    partitioner=partitioner,
    train_state_axes=initializer.train_state_axes,
    **kwargs,
  )


def logged_metric(log: str, collection: str, name: str) -> dict[int, float]:
  """step -> value of metric `name` of `collection` as T5X's metric writer logs it in `log`."""
  out = {}
  for line in open(log):
    m = re.search(rf'\[(\d+)\] collection={collection} .*\b{re.escape(name)}=([0-9.e+-]+)', line)
    if m:
      out[int(m.group(1))] = float(m.group(2))
  return out
