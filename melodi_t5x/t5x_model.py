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

Metrics: T5X's base metrics (`loss_per_nonpadding_target_token`, `accuracy`, `cross_ent_loss`,
...), plus `cross_ent_loss_per_nonpadding_target_token` (NLL without z-loss), `perplexity`
(exp of it), `memory/long_term_gate` (mean sigmoid gate of the long-term layers) and
`memory/reset_fraction` (fraction of rows starting a document).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import clu.metrics
import flax
import jax
import jax.numpy as jnp
from t5x import losses, models

from melodi_t5x import t5x_data

MEMORY = 'memory'
INTERMEDIATES = 'intermediates'

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

  The module (e.g. `melodi_t5x.model.MelodiDecoder`) must accept a `start_of_sequence: [B]`
  keyword and keep its memory in the `memory` collection with leading batch axis. Construct it as
  a `DecoderOnlyModel` (module, vocabulary, optimizer_def, z_loss, ...). `predict_batch_with_aux`
  samples continuations with the module's incremental decoding (`prefill` / `decode`).

  `MelodiModel` is the same class under its former name (gin files may use either).
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
  ):
    """Arguments as for `t5x.models.DecoderOnlyModel`."""
    if inputs_bidirectional_attention:
      raise ValueError(
        'MemoryDecoderModel.inputs_bidirectional_attention=True: memory decoders are causal LMs; '
        'leave inputs_bidirectional_attention False.'
      )
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
      flax_mutables: the carried collections (`{'memory': ...}`), or None for fresh memory.
      dropout_rng: dropout rng, or None for deterministic mode.

    Returns:
      logits [B, T, V] float32; the updated `flax_mutables` (same tree, shapes and dtypes as the
      input; None if the input was None); the sown intermediates.
    """
    incoming = dict(flax_mutables or {})
    logits, updated = self._compute_logits(
      params,
      batch,
      dropout_rng,
      mutable=[MEMORY, INTERMEDIATES],
      other_variables=incoming,
    )
    updated = dict(updated)
    intermediates = updated.pop(INTERMEDIATES, {})
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
    if isinstance(flax_mutables, flax.core.FrozenDict):
      new = flax.core.freeze(new)
    return logits, new, intermediates

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
    return loss, (metrics, new_mutables)

  def eval_fn(self, params: PyTree, batch: Mapping[str, Array], flax_mutables: PyTree = None):
    """Loss and metrics of one batch (memory read, not carried: see `t5x_eval` for streaming)."""
    loss, aux = self.loss_fn(params, batch, None, flax_mutables)
    return loss, (aux[0] if flax_mutables is not None else aux)

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

    `flax_mutables` is accepted (T5X passes the checkpoint's memory) and ignored: rows of a seqio
    score batch are independent examples. Document-level perplexity with carried memory is
    `t5x_eval.MemoryTrainer`.
    """
    del flax_mutables
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
      variables[MEMORY] = {k: v for k, v in memory.items() if k != 'stream_position'}
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


# Former name, kept so existing gin files and imports keep working.
MelodiModel = MemoryDecoderModel


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
