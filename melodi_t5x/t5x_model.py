"""T5X model class for memory decoders: memory carried across training steps in `flax_mutables`.

Serves any decoder module with the T5X decoder-only call signature, a `start_of_sequence: [B]`
keyword and per-row state in the Flax collection `memory` (MELODI, Transformer-XL, Memorizing
Transformer, Block-Recurrent Transformer, ...).

T5X keeps every non-`params` collection returned by `get_initial_variables` in
`TrainState.flax_mutables`, partitions it with its logical axes (collection `memory_axes`) and
checkpoints it. Its trainer hands those mutables to `loss_fn` as a fourth argument and stores the
`(loss, (metrics, new_mutables))` it returns, but only if the model returns them; no stock model
does. `MemoryDecoderModel` does: each training step reads the memory of every batch row, the
module resets the rows whose `start_of_sequence` flag is set (a document starts in this chunk),
and the memory written at the end of the chunk becomes the next step's memory. Row r of step t+1
must continue the document of row r of step t; `melodi_t5x.t5x_data` builds such batches.

Memory follows its document: `get_initial_variables` adds the collection `stream` beside the
module's `memory` (`document: [B]` and `next_chunk: [B]` int32, the document key and the next chunk
index of each row's state; the data-position bookkeeping, never passed to the module, which counts
only its own tokens, `memory/tokens_seen`). A row that is not a document start (`start_of_sequence`)
and whose `document_id` / `chunk_index` do not continue that position is misaligned: it is reset
(memory zeroed, as at a document start) and counted in `memory/misaligned_rows`, or, with
`misaligned_rows='error'`, the step fails with an error naming the rows. The batch must therefore
carry `document_id` and `chunk_index` (the document stream of `melodi_t5x.t5x_data` does).

Metrics: T5X's base metrics (`loss_per_nonpadding_target_token`, `accuracy`, `cross_ent_loss`,
...), plus `cross_ent_loss_per_nonpadding_target_token` (NLL without z-loss), `perplexity`
(exp of it), `memory/long_term_gate` (mean sigmoid gate of the long-term layers) and
`memory/reset_fraction` (fraction of rows starting a document), `memory/misaligned_rows` (rows
reset because they did not continue their memory's document, summed over steps),
`memory/nonfinite_values` (NaN / inf values in the memory written, summed over steps).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import clu.metrics
import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax.linen import partitioning as flax_partitioning
from t5x import losses, models
from t5x import metrics as metrics_lib

from melodi_t5x import t5x_data
from melodi_t5x.state import MEMORY
from tasks import vocab as vocab_lib

INTERMEDIATES = 'intermediates'
# Collection added by `MemoryDecoderModel` beside `memory`: which document and chunk each row's
# memory belongs to. Handled here, never passed to the module.
STREAM = 'stream'
MISALIGNED_ROWS = 'memory/misaligned_rows'
# Intermediate (not a metric): [B] bool, the rows reset because they broke their memory's document.
MISALIGNED_MASK = 'memory/misaligned_mask'
# Metric: non-finite (NaN / inf) values in the memory written by a training step.
NONFINITE_MEMORY = 'memory/nonfinite_values'
MISALIGNED_MODES = ('reset', 'error')

Array = jax.Array
PyTree = Any


@flax.struct.dataclass
class Perplexity(clu.metrics.Average):
  """exp of the average of per-token NLL (merges exactly like `Average`)."""

  def compute(self) -> jnp.ndarray:
    return jnp.exp(super().compute())


def token_nll(logits: Array, targets: Array) -> Array:
  """Per-token cross-entropy (natural log) without z-loss or smoothing: [B, T] float32."""
  logits = logits.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return log_z - target_logit


def loss_weights(batch: Mapping[str, Array]) -> Array:
  """`decoder_loss_weights` (or targets > 0), zeroed on padding rows (`row_valid` False)."""
  targets = batch['decoder_target_tokens']
  weights = batch.get('decoder_loss_weights')
  weights = (targets > 0) if weights is None else weights
  weights = weights.astype(jnp.float32)
  if 'row_valid' in batch:
    weights = weights * batch['row_valid'].astype(jnp.float32)[:, None]
  return weights


def _sown(intermediates: Mapping[str, Any], name: str) -> Array | None:
  """Mean of the values sown under `name` anywhere in an `intermediates` tree, or None."""
  found = []

  def visit(tree):
    if isinstance(tree, Mapping):
      for key, value in tree.items():
        if key == name:
          found.extend(jax.tree_util.tree_leaves(value))
        else:
          visit(value)

  visit(intermediates)
  if not found:
    return None
  return jnp.mean(jnp.stack([jnp.mean(x.astype(jnp.float32)) for x in found]))


class MemoryDecoderModel(models.DecoderOnlyModel):
  """`DecoderOnlyModel` whose module carries per-row memory from one batch to the next.

  The module (e.g. `melodi_t5x.architectures.melodi.MelodiDecoder`) must accept a
  `start_of_sequence: [B]` keyword and keep its memory in the `memory` collection with leading batch
  axis. Construct it as a `DecoderOnlyModel` (module, vocabulary, optimizer_def, z_loss, ...).
  `predict_batch_with_aux` samples continuations with the module's incremental decoding (`prefill` /
  `decode`).

  Beyond `DecoderOnlyModel`'s arguments:
    misaligned_rows: 'reset' (default): a row that does not continue its memory's document is
      reset and counted in `memory/misaligned_rows`; 'error': the step fails instead.
    allow_stateless_scoring: False (default): `score_batch` (seqio / `t5x.infer` scoring) and
      `eval_fn` (T5X's default eval step) raise, because they cannot carry memory across chunks;
      True: they score every row with fresh (zero) memory, each chunk on its own.
  """

  FEATURE_CONVERTER_CLS = t5x_data.StreamingFeatureConverter

  def __init__(
    self,
    module,
    vocabulary,
    optimizer_def,
    decode_fn=None,
    inputs_bidirectional_attention: bool = False,
    feature_converter_cls=None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    loss_normalizing_factor=None,
    misaligned_rows: str = 'reset',
    allow_stateless_scoring: bool = False,
  ):
    """Arguments as for `t5x.models.DecoderOnlyModel`, plus the two above."""
    if misaligned_rows not in MISALIGNED_MODES:
      raise ValueError(
        f'MemoryDecoderModel.misaligned_rows={misaligned_rows!r}: use one of {MISALIGNED_MODES}.'
      )
    self._misaligned_rows = misaligned_rows
    self._allow_stateless_scoring = bool(allow_stateless_scoring)
    if inputs_bidirectional_attention:
      raise ValueError(
        'MemoryDecoderModel.inputs_bidirectional_attention=True: memory decoders are causal LMs; '
        'leave inputs_bidirectional_attention False.'
      )
    if vocabulary is not None:
      vocab_lib.check_embedding_fits(vocabulary.vocab_size, getattr(module, 'config', None))
    kwargs = {} if decode_fn is None else {'decode_fn': decode_fn}
    super().__init__(
      module=module,
      vocabulary=vocabulary,
      optimizer_def=optimizer_def,
      feature_converter_cls=feature_converter_cls,
      label_smoothing=label_smoothing,
      z_loss=z_loss,
      loss_normalizing_factor=loss_normalizing_factor,
      **kwargs,
    )
    if self._allow_stateless_scoring:
      converter = self.FEATURE_CONVERTER_CLS
      self.FEATURE_CONVERTER_CLS = lambda *a, **k: converter(  # pylint: disable=invalid-name
        *a, **{'allow_independent_examples': True, **k}
      )

  def get_initial_variables(self, rng, input_shapes, input_types=None):
    """The module's variables plus the `stream` collection (each row's document and chunk)."""
    variables = flax.core.unfreeze(super().get_initial_variables(rng, input_shapes, input_types))
    if MEMORY in variables:
      batch = input_shapes['decoder_input_tokens'][0]
      variables[STREAM] = {
        'document': jnp.zeros((batch,), jnp.int32),
        'next_chunk': jnp.zeros((batch,), jnp.int32),
      }
      axes = flax_partitioning.AxisMetadata(names=('batch',))
      variables[STREAM + '_axes'] = {'document_axes': axes, 'next_chunk_axes': axes}
    return flax.core.freeze(variables)

  # -- forward ---------------------------------------------------------------------------------

  def _compute_logits(
    self,
    params: PyTree,
    batch: Mapping[str, Array],
    dropout_rng: Array | None = None,
    mutable: Any = False,
    other_variables: PyTree | None = None,
  ):
    """Logits [B, T, V] (and updated collections if `mutable`) for one streamed chunk."""
    rngs = {'dropout': dropout_rng} if dropout_rng is not None else None
    return self.module.apply(
      {'params': params, **(other_variables or {})},
      batch['decoder_input_tokens'],
      batch['decoder_target_tokens'],
      decoder_segment_ids=batch.get('decoder_segment_ids'),
      start_of_sequence=batch.get('start_of_sequence'),
      rngs=rngs,
      decode=False,
      enable_dropout=rngs is not None,
      mutable=mutable,
    )

  def apply_with_memory(
    self,
    params: PyTree,
    batch: Mapping[str, Array],
    flax_mutables: PyTree | None,
    dropout_rng: Array | None = None,
  ) -> tuple[Array, PyTree, Mapping[str, Any]]:
    """One chunk with carried memory.

    Args:
      params: model parameters.
      batch: features of one chunk per row (`start_of_sequence: [B]` resets rows).
      flax_mutables: the carried collections (`{'memory': ..., 'stream': ...}`), or None for
        fresh memory.
      dropout_rng: dropout rng, or None for deterministic mode.

    Returns:
      logits [B, T, V] float32; the updated `flax_mutables` (same tree, shapes and dtypes as the
      input; None if the input was None); the sown intermediates.
    """
    incoming = dict(flax_mutables or {})
    position = incoming.pop(STREAM, None)
    if position is not None:
      batch, misaligned, new_position = self._follow_documents(batch, position)
    logits, updated = self._compute_logits(
      params,
      batch,
      dropout_rng,
      mutable=[MEMORY, INTERMEDIATES],
      other_variables=incoming,
    )
    updated = dict(updated)
    intermediates = dict(updated.pop(INTERMEDIATES, {}))
    if position is not None:
      intermediates[MISALIGNED_ROWS] = jnp.sum(misaligned.astype(jnp.float32))
      intermediates[MISALIGNED_MASK] = misaligned
    if flax_mutables is None:
      return logits, None, intermediates
    new = dict(incoming)
    if MEMORY in updated:
      # Keep the exact incoming dtypes: the compiled train step rejects any change.
      memory = jax.tree_util.tree_map(
        lambda new_x, old_x: new_x.astype(old_x.dtype),
        flax.core.unfreeze(updated[MEMORY]),
        flax.core.unfreeze(incoming[MEMORY]),
      )
      if isinstance(incoming[MEMORY], flax.core.FrozenDict):
        memory = flax.core.freeze(memory)
      new[MEMORY] = memory
    if position is not None:
      new[STREAM] = type(position)(new_position)
    if isinstance(flax_mutables, flax.core.FrozenDict):
      new = flax.core.freeze(new)
    return logits, new, intermediates

  def _follow_documents(self, batch: Mapping[str, Array], position: Mapping[str, Array]):
    """Checks that each row continues its memory's document; resets the rows that do not.

    Returns:
      the batch with `start_of_sequence` set on misaligned rows, the misaligned rows ([B] bool)
      and the new `stream` position (document key and next chunk of each row).
    """
    missing = [k for k in ('document_id', 'chunk_index', 'start_of_sequence') if k not in batch]
    if missing:
      raise ValueError(
        f'The batch has no {missing}: memory cannot be checked against the documents of its rows. '
        'Batches must come from the document stream: train_script.train.get_dataset_fn = '
        '@t5x_data.get_dataset and train_eval_get_dataset_fn = @t5x_data.get_eval_datasets '
        "(T5X's utils.get_dataset shuffles chunks, so rows would carry unrelated documents' "
        'memory).'
      )
    document = batch['document_id'].astype(jnp.int32)
    chunk = batch['chunk_index'].astype(jnp.int32)
    sos = batch['start_of_sequence'].astype(bool)
    valid = batch['row_valid'].astype(bool) if 'row_valid' in batch else jnp.ones_like(sos)
    continues = (document == position['document']) & (chunk == position['next_chunk'])
    misaligned = valid & ~sos & ~continues
    if self._misaligned_rows == 'error':
      jax.debug.callback(_raise_if_misaligned, misaligned, document, chunk, position['document'])
    batch = {**batch, 'start_of_sequence': sos | misaligned}
    new_position = {
      'document': jnp.where(valid, document, 0).astype(position['document'].dtype),
      'next_chunk': jnp.where(valid, chunk + 1, 0).astype(position['next_chunk'].dtype),
    }
    return batch, misaligned, new_position

  # -- loss and metrics ------------------------------------------------------------------------

  def loss_fn(
    self,
    params: PyTree,
    batch: Mapping[str, Array],
    dropout_rng: Array | None,
    flax_mutables: PyTree | None = None,
  ):
    """Weighted cross-entropy on the real targets of one chunk per row.

    Returns `(loss, metrics)` without `flax_mutables` (stateless call: every row starts fresh), or
    `(loss, (metrics, new_flax_mutables))` with them, as `t5x.trainer` expects.
    """
    logits, new_mutables, intermediates = self.apply_with_memory(
      params, batch, flax_mutables, dropout_rng
    )
    loss, metrics = self._loss_and_metrics(logits, batch, intermediates)
    if flax_mutables is None:
      return loss, metrics
    metrics[NONFINITE_MEMORY] = metrics_lib.Sum(total=nonfinite_count(new_mutables.get(MEMORY)))
    return loss, (metrics, new_mutables)

  def eval_fn(self, params: PyTree, batch: Mapping[str, Array], flax_mutables: PyTree = None):
    """T5X's default eval step: refused unless `allow_stateless_scoring` (then fresh memory).

    T5X's `Trainer.eval` feeds every eval batch the training rows' memory and drops the update;
    `t5x_eval.MemoryTrainer` streams eval documents with carried memory instead.
    """
    self._check_stateless('eval_fn (trainer.Trainer.eval, the default train-eval step)')
    batch = dict(batch)
    batch['start_of_sequence'] = jnp.ones(batch['decoder_input_tokens'].shape[:1], bool)
    if flax_mutables is not None:
      flax_mutables = jax.tree_util.tree_map(jnp.zeros_like, flax_mutables)
      flax_mutables = {k: v for k, v in flax_mutables.items() if k != STREAM}
    loss, aux = self.loss_fn(params, batch, None, flax_mutables)
    return loss, (aux[0] if flax_mutables is not None else aux)

  def _check_stateless(self, what: str) -> None:
    if not self._allow_stateless_scoring:
      raise ValueError(
        f'MemoryDecoderModel.{what} cannot carry memory from one chunk of a document to the next: '
        'it would score each chunk without the memory of the chunks before it (or with the '
        "training rows' memory). For perplexity with carried memory use t5x_eval.MemoryTrainer "
        '(trainer_cls in t5x.train, training_evaluator_cls in t5x.eval; see gin/runs/). To score '
        'every row on its own with fresh memory anyway, set '
        'MemoryDecoderModel.allow_stateless_scoring = True.'
      )

  def _loss_and_metrics(self, logits: Array, batch: Mapping[str, Array], intermediates):
    targets = batch['decoder_target_tokens']
    weights = loss_weights(batch)
    normalizing_factor, weights = losses.get_loss_normalizing_factor_and_weights(
      self._loss_normalizing_factor, {**batch, 'decoder_loss_weights': weights}
    )
    loss, z_loss, _ = losses.compute_weighted_cross_entropy(
      logits,
      targets=targets,
      weights=weights,
      label_smoothing=self._label_smoothing,
      z_loss=self._z_loss,
      loss_normalizing_factor=normalizing_factor,
    )
    metrics = self._compute_metrics(
      logits=logits,
      targets=targets,
      mask=weights,
      loss=loss,
      z_loss=z_loss,
      segment_ids={'decoder_target': weights > 0},
    )
    nll = token_nll(logits, targets)
    metrics['cross_ent_loss_per_nonpadding_target_token'] = clu.metrics.Average(
      total=jnp.sum(nll * weights), count=jnp.sum(weights)
    )
    metrics['perplexity'] = Perplexity(total=jnp.sum(nll * weights), count=jnp.sum(weights))
    metrics.update(self._memory_metrics(batch, intermediates))
    return loss, metrics

  def _memory_metrics(self, batch: Mapping[str, Array], intermediates) -> dict[str, Any]:
    out = {}
    gate = _sown(intermediates, 'long_term_gate')
    if gate is not None:
      out['memory/long_term_gate'] = clu.metrics.Average(total=gate, count=jnp.float32(1.0))
    sos = batch.get('start_of_sequence')
    if sos is not None:
      out['memory/reset_fraction'] = clu.metrics.Average(
        total=jnp.sum(sos.astype(jnp.float32)), count=jnp.asarray(sos.shape[0], jnp.float32)
      )
    if MISALIGNED_ROWS in intermediates:
      out[MISALIGNED_ROWS] = metrics_lib.Sum(total=intermediates[MISALIGNED_ROWS])
    return out

  # -- scoring (stateless) ---------------------------------------------------------------------

  def score_batch(
    self,
    params: PyTree,
    batch: Mapping[str, Array],
    return_intermediates: bool = False,
    flax_mutables: PyTree | None = None,
  ):
    """Sum of target log-likelihoods per row, each row scored with fresh memory.

    Refused unless `allow_stateless_scoring=True`: seqio / `t5x.infer` score batches are
    independent examples, so memory cannot be carried. `flax_mutables` (the checkpoint's memory)
    is ignored. Document-level perplexity with carried memory is `t5x_eval.MemoryTrainer`.
    """
    del flax_mutables
    self._check_stateless('score_batch (seqio / t5x.infer scoring)')
    batch = dict(batch)
    batch['start_of_sequence'] = jnp.ones(batch['decoder_input_tokens'].shape[:1], bool)
    logits = self._compute_logits(params, batch)
    token_scores = -token_nll(logits, batch['decoder_target_tokens']) * loss_weights(batch)
    scores = jnp.sum(token_scores, axis=-1)
    if return_intermediates:
      return scores, {'token_scores': token_scores}
    return scores

  # -- generation ------------------------------------------------------------------------------

  def predict_batch_with_aux(
    self,
    params: PyTree,
    batch: Mapping[str, Array],
    rng: Array | None = None,
    *,
    return_all_decodes: bool = False,
    num_decodes: int = 1,
    decoder_params: Mapping[str, Any] | None = None,
    memory: PyTree | None = None,
  ):
    """Continues each row's prompt with `decode_fn` (T5X's `DecoderOnlyModel` convention).

    The prompt of row b is `decoder_input_tokens[b]` where `decoder_causal_attention[b]` is 1
    (T5X's prefix-LM features; `decoder_input_tokens[:, 0]` is the first input, for our tasks the
    start-of-document token). The module reads it with `prefill=True` (complete windows through
    the training path, the rest into the `cache` collection), then `decode_fn` (default
    `t5x.decoding.temperature_sample`) calls it with `decode=True` one token at a time;
    `decoder_params` go to `decode_fn` (e.g. `{'temperature': 0.0}` is greedy, `'topk'`).

    `memory` (the `memory` collection, e.g. from streaming the start of a long document through
    `apply_with_memory`) is continued for rows whose `batch['start_of_sequence']` is False;
    without it, or without that feature, every row starts from empty memory. The checkpoint's
    training memory is never used.

    Returns:
      The continuations `[B, L]` (or `[B, num_decodes, L]` with `return_all_decodes`), prompt
      removed and left-aligned, and `{'scores': log-probabilities of the samples}`.
    """
    if 'decoder_causal_attention' not in batch:
      raise ValueError(
        'predict_batch_with_aux needs decoder_causal_attention (1 on the prompt): use a feature '
        "converter for 'inputs' + 'targets' tasks, e.g. MemoryDecoderModel.feature_converter_cls "
        '= @t5x_generate.PromptFeatureConverter (see gin/infer.gin).'
      )
    prompt = batch['decoder_input_tokens'] * batch['decoder_causal_attention']
    lengths = jnp.sum(prompt[:, 1:] != 0, axis=-1).astype(jnp.int32)  # T5X's prefill lengths
    variables = {'params': params}
    sos = batch.get('start_of_sequence')
    if memory is not None and sos is not None:
      variables[MEMORY] = memory
    _, prefilled = self.module.apply(
      variables,
      prompt,
      prefill=True,
      prefill_lengths=lengths,
      start_of_sequence=sos if MEMORY in variables else None,
      enable_dropout=False,
      mutable=['cache'],
    )
    decoder_params = dict(decoder_params or {})
    if rng is not None:
      if decoder_params.get('decode_rng') is not None:
        raise ValueError('Give the decoding rng either as `rng` or as decoder_params, not both.')
      decoder_params['decode_rng'] = rng
    decoder_params.setdefault('eos_id', self.output_vocabulary.eos_id or 1)
    decodes, scores = self._decode_fn(
      inputs=prompt,
      cache=prefilled['cache'],
      tokens_to_logits=functools.partial(
        self._compute_logits_from_slice, params=params, max_decode_length=prompt.shape[1]
      ),
      num_decodes=num_decodes,
      initial_index=lengths,
      **decoder_params,
    )
    if not return_all_decodes:  # the most likely sample (decodes are sorted by score)
      decodes, scores = decodes[:, -1], scores[:, -1]
    return models.remove_prefix(decodes, lengths), {'scores': scores}


def nonfinite_count(tree: PyTree) -> Array:
  """Number of NaN / inf values in the floating-point leaves of `tree` (float32 scalar)."""
  counts = [
    jnp.sum(~jnp.isfinite(x)).astype(jnp.float32)
    for x in jax.tree_util.tree_leaves(tree)
    if jnp.issubdtype(x.dtype, jnp.floating)
  ]
  return sum(counts, jnp.float32(0.0))


def _raise_if_misaligned(misaligned, document, chunk, memory_document) -> None:
  """Host callback of `misaligned_rows='error'`: raises if any row broke its document."""
  rows = np.flatnonzero(np.asarray(misaligned))
  if rows.size:
    detail = ', '.join(
      f'row {r}: document {int(document[r])} chunk {int(chunk[r])} after memory of document '
      f'{int(memory_document[r])}'
      for r in rows[:4]
    )
    raise ValueError(
      f'{rows.size} batch rows do not continue the document of their memory ({detail}). Feed '
      'batches from the document stream (t5x_data.get_dataset), or set '
      "MemoryDecoderModel.misaligned_rows = 'reset' to reset such rows and count them in "
      'memory/misaligned_rows.'
    )


def zeros_memory_like(flax_mutables: PyTree, batch_size: int) -> PyTree:
  """Fresh (zero) carried state for `batch_size` rows, shaped like `flax_mutables[:, ...]`."""
  return jax.tree_util.tree_map(
    lambda x: jnp.zeros((batch_size, *x.shape[1:]), x.dtype), flax_mutables
  )


def memory_shapes(model: MemoryDecoderModel, batch_size: int, segment_length: int) -> PyTree:
  """`jax.ShapeDtypeStruct`s of the carried collections for a `[batch_size, segment_length]` run."""
  shapes = {
    'decoder_input_tokens': (batch_size, segment_length),
    'decoder_target_tokens': (batch_size, segment_length),
  }
  variables = jax.eval_shape(
    lambda: model.get_initial_variables(
      jax.random.PRNGKey(0), shapes, {k: jnp.int32 for k in shapes}
    )
  )
  return {k: v for k, v in variables.items() if k not in ('params',) and not k.endswith('_axes')}
