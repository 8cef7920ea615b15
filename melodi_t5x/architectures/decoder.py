"""The decoder shell shared by every architecture, the layer-kind protocol and the record type.

A decoder is a stack of *layer kinds* (its `layout`, one `(name, kind)` per layer, data rather
than code); the shell owns everything else: the tied embedding, input checks, the loop over the
segment (each layer over the whole segment, or a scan over windows with every layer on one
window), T5X's prefill / decode dispatch, the final norm and the logits. Notation: B batch rows,
T segment length, W window, D embed dim, V vocab.

A layer kind (a `layers.StatefulLayer`) has one signature in every mode and carries one typed
state (`melodi_t5x.state`):
  state = layer.start_segment(reset, det)     # read from `memory`, fresh where reset: [B]
  x, state = layer(x, state, ctx, det)       # det: no dropout (static)
  layer.end_segment(state)                    # written back to `memory`
  x, state = layer.prefill(x, state, ctx)     # a prompt through the training path -> cache state
  x, state = layer.decode(x, state, ctx)      # one token (or a few) per call, state in `cache`
`ctx` holds what the shell knows of each row (`Context`). The shell itself carries one array,
`tokens_seen: [B]`, the row's tokens since its document start, in both collections.

An architecture module exports an `ARCHITECTURE` record (config class, decoder, carried-memory
components, training FLOPs, gin file); `melodi_t5x.architectures` finds it by module name.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import struct
from flax.linen import partitioning

from melodi_t5x import state as state_lib
from melodi_t5x.layers import ATTENTION_OUTPUT, RMSNorm, embedding_param, tied_logits

Array = jax.Array
# Residual policy of a window scan at remat='none': keep the outputs of the projections (dense
# layers, token mixers) and of each attention, recompute everything elementwise from them.
SAVE_MATMUL_OUTPUTS = jax.checkpoint_policies.save_from_both_policies(
  jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
  jax.checkpoint_policies.save_only_these_names(ATTENTION_OUTPUT),
)


@struct.dataclass
class Context:
  """What the shell tells every layer about the rows of a block of tokens."""

  # [B] int32: tokens of the row's document before the block's first token.
  tokens_seen: Array
  # [B] int32: prompt length of each row (prefill only, else None).
  lengths: Array | None = None

  def windows_seen(self, window: int) -> Array:
    """[B] complete windows of the row's document before the block."""
    return self.tokens_seen // window


@struct.dataclass
class Seen:
  """The shell's own state: `tokens_seen: [B]` int32 (in `memory` and in `cache`)."""

  tokens_seen: Array


SEEN = Seen(state_lib.ArraySpec((), (), 'int32'))


@dataclasses.dataclass(frozen=True)
class MemoryComponent:
  """One part of a model's carried state, per sequence (`melodi_t5x.memory_accounting`)."""

  # Short name, e.g. 'short-term memory'.
  name: str
  # How the paper-convention count is made, e.g. '13 layers x 192 tokens x d'.
  formula: str
  # Floats per sequence in the paper's convention (0 for counters the paper does not count).
  paper_floats: int
  # Elements per sequence that our decoder allocates for this part (0 if it allocates none).
  stored_elements: int
  # dtype of those elements in the `memory` collection.
  stored_dtype: str = 'float32'
  # Why the stored count differs from the paper's, if it does.
  note: str = ''

  @property
  def stored_bytes(self) -> int:
    return self.stored_elements * np.dtype(self.stored_dtype).itemsize


def kv_width(cfg) -> int:
  """Floats of one cached key + value pair: 2 x H x K (the paper's 2d; H x K = d at paper size)."""
  return 2 * cfg.num_heads * cfg.head_dim


def xl_caches(cfg, layers: int) -> MemoryComponent:
  """The one-window key/value caches of `layers` sliding-window layers."""
  w = cfg.window_length
  floats = layers * w * kv_width(cfg)
  return MemoryComponent(
    'XL caches', f'{layers} layers x {w} tokens x (keys + values)', floats, floats
  )


@dataclasses.dataclass(frozen=True)
class Architecture:
  """Everything the rest of the code needs to know of one architecture, in one place."""

  # Short name used by tools and experiment names ('melodi', 'xl', 'memorizing', 'brt').
  name: str
  # Its frozen config dataclass (`melodi_t5x.config`).
  config_class: type
  # Its decoder module class (`config` is its only field).
  decoder_class: type
  # config -> [MemoryComponent]: what a batch row carries from one segment to the next.
  memory_components: Callable
  # (config, batch, segment length) -> {term: model FLOPs} of one training step (forward +
  # backward; `melodi_t5x.tools.flops`).
  train_flops: Callable
  # (config, batch, segment length) -> FLOPs the backward pass spends recomputing attention.
  recompute_flops: Callable
  # The gin model file at the paper's size.
  gin_file: str

  @classmethod
  def from_module(cls, name: str, config_class: type, decoder_class: type, gin_file: str, names):
    """The record of an architecture module that defines `memory_components`, `train_flops` and
    `recompute_flops` (pass its `globals()`)."""
    functions = {f: names[f] for f in ('memory_components', 'train_flops', 'recompute_flops')}
    return cls(name, config_class, decoder_class, gin_file=gin_file, **functions)


# FLOPs of a train step = 3 forward passes (forward, and a backward pass of twice its cost).
TRAIN_FACTOR = 3


def layer_matmul_params(cfg) -> int:
  """Matmul weights of one transformer block: Q, K, V, out (4 x D x HK) and the MLP (2 x D x F)."""
  hk = cfg.num_heads * cfg.head_dim
  return 4 * cfg.embed_dim * hk + 2 * cfg.embed_dim * cfg.mlp_dim


def attention_recompute_flops(terms: dict[str, float]) -> float:
  """The attention logits recomputed in the backward pass (`layers.recomputed_attention`): one
  logits matmul (2 x Nq x Nk x HK) per attention, i.e. 1/6 of an `attention` term (logits and
  weighted values, x 3)."""
  return terms['attention'] / 6


class Decoder(nn.Module):
  """Decoder-only LM over a stack of layer kinds, with `t5x.models.DecoderOnlyModel`'s signature."""

  config: object  # a config.BaseConfig

  # False: each layer runs over the whole segment (a layer needs only its own input: the
  # Transformer-XL stack). True: the windows are scanned in order, every layer on one window
  # (MELODI: a window's memory feeds the next window).
  window_major: ClassVar[bool] = False

  def layout(self) -> tuple[tuple[str, type], ...]:
    """The stack: `(module name, layer kind)` per layer, bottom first."""
    raise NotImplementedError

  def setup(self):
    cfg = self.config
    self.embedding = embedding_param(self, cfg)
    self.stack = [
      _remat_layer(kind, cfg, self.window_major)(cfg, index, name=name)
      for index, (name, kind) in enumerate(self.layout())
    ]
    self.final_norm = RMSNorm(cfg)
    self.dropout = nn.Dropout(cfg.dropout_rate)
    self.setup_extra()

  def setup_extra(self):
    """Parameters of a decoder beyond the shell's (e.g. MELODI's summary embeddings)."""

  def __call__(
    self,
    decoder_input_tokens: Array,
    decoder_target_tokens: Array | None = None,
    decoder_segment_ids: Array | None = None,
    decoder_positions: Array | None = None,
    decoder_causal_attention: Array | None = None,
    *,
    start_of_sequence: Array | None = None,
    enable_dropout: bool = True,
    decode: bool = False,
    max_decode_length: int | None = None,
    prefill: bool | None = None,
    prefill_lengths: Array | None = None,
  ) -> Array:
    """Logits [B, T, V] (float32) of the segment `decoder_input_tokens: [B, T]`.

    `start_of_sequence: [B]` marks rows whose document starts with this segment (their state is
    reset); None resets every row. State is read from and, when the `memory` collection is
    mutable, written to the `memory` collection. Targets, positions and causal-attention flags are
    accepted for T5X compatibility; the attention pattern is fixed by the windows.

    Incremental decoding (T5X's convention, state in the `cache` collection): `prefill=True`
    reads a prompt `[B, L]` of which row b consumes its first `prefill_lengths[b]` tokens,
    `decode=True` one token `[B, 1]` per call and returns the next-token logits.
    """
    del decoder_target_tokens, decoder_positions, decoder_causal_attention, max_decode_length
    if decode or prefill:
      self.check_decoding()
    if prefill:
      return self.prefill(decoder_input_tokens, prefill_lengths, start_of_sequence)
    if decode:
      return self.decode_step(decoder_input_tokens)
    tokens, sos = self.segment_inputs(decoder_input_tokens, decoder_segment_ids, start_of_sequence)
    deterministic = not enable_dropout
    seen = self.read_seen(state_lib.MEMORY, sos)
    states = [layer.start_segment(sos, deterministic) for layer in self.stack]
    x = self.embed(tokens)
    if self.window_major:
      y, states = self.scan_windows(x, states, Context(seen), deterministic)
    else:
      y, states = self.run_stack(x, states, Context(seen), deterministic)
    for layer, s in zip(self.stack, states):
      layer.end_segment(s)
    if self.carries_memory():
      state_lib.write(self, state_lib.MEMORY, SEEN, Seen(seen + tokens.shape[1]))
    self.report(deterministic)
    y = self.dropout(self.final_norm(y), deterministic=deterministic)
    return tied_logits(y, self.embedding, self.config)

  # -- the segment ---------------------------------------------------------------------------------

  def segment_inputs(self, tokens, segment_ids, start_of_sequence) -> tuple[Array, Array]:
    """Checks a segment's inputs; returns (tokens [B, T] int32, start_of_sequence [B] bool)."""
    if segment_ids is not None:
      raise ValueError(
        'memory decoders do not support packed examples (decoder_segment_ids given): each batch '
        'row must stream one document; set pack=False in the dataset config.'
      )
    # No modulo: ids are checked on the host (tasks.streaming.check_token_ids) and the T5X model
    # refuses a vocabulary larger than the embedding, so an id >= vocab_size is a pipeline bug.
    tokens = jnp.asarray(tokens).astype(jnp.int32)
    batch, length = tokens.shape
    self.config.num_windows(length)  # validates the segment length
    return tokens, self.rows_starting(start_of_sequence, batch)

  @staticmethod
  def rows_starting(start_of_sequence, batch: int) -> Array:
    """`start_of_sequence` as [B] bool; None means every row starts a document."""
    if start_of_sequence is None:
      return jnp.ones((batch,), bool)
    return jnp.asarray(start_of_sequence).astype(bool).reshape((batch,))

  def embed(self, tokens: Array) -> Array:
    """[B, T] int32 -> [B, T, D] in the compute dtype, sharded ('batch', 'length', 'embed')."""
    x = jnp.take(self.embedding, tokens, axis=0).astype(jnp.dtype(self.config.dtype))
    return partitioning.with_sharding_constraint(x, ('batch', 'length', 'embed'))

  def carries_memory(self) -> bool:
    """Whether any layer carries state across segments (if none, neither does the shell)."""
    return any(layer.state_spec(False) is not None for layer in self.stack)

  def read_seen(self, collection: str, reset: Array | None = None, batch: int | None = None):
    """The shell's `tokens_seen: [B]` from `collection` (0 where `reset`)."""
    batch = reset.shape[0] if batch is None else batch
    if collection == state_lib.MEMORY and not self.carries_memory():
      return jnp.zeros((batch,), jnp.int32)
    return state_lib.read(self, collection, SEEN, batch, reset=reset).tokens_seen

  def run_stack(self, x: Array, states: list, ctx: Context, deterministic: bool):
    """Every layer in turn on the block `x: [B, N, D]`; returns (y, new states)."""
    new = []
    for layer, s in zip(self.stack, states):
      x, s = layer(x, s, ctx, deterministic)
      new.append(s)
    return x, new

  def block_tokens(self, x: Array) -> Array:
    """The tokens a window-major block runs on (MELODI appends its summary tokens)."""
    return x

  def scan_windows(
    self, x: Array, states: list, ctx: Context, deterministic: bool, complete: Array | None = None
  ):
    """`run_stack` on each window of `x: [B, T, D]` in order (`nn.scan`), state carried.

    `complete: [n, B]` (prefill): a row keeps its state through the windows its prompt does not
    cover.
    """
    cfg = self.config
    batch, length = x.shape[:2]
    n, w = cfg.num_windows(length), cfg.window_length
    windows = x.reshape(batch, n, w, -1).swapaxes(0, 1)  # [n, B, W, D]
    step = functools.partial(window_step, deterministic=deterministic)
    if cfg.remat == 'window':
      # The backward pass keeps each window's carry and input, and recomputes the step.
      step = nn.remat(step, prevent_cse=False)
    elif cfg.remat == 'none':
      # No matmul is recomputed: the backward pass keeps every projection's output and
      # recomputes only what is elementwise (norms, ReLU, upcasts) and the attention logits.
      step = nn.remat(step, prevent_cse=False, policy=SAVE_MATMUL_OUTPUTS)
    scan = nn.scan(
      step,
      variable_broadcast=['params', 'params_axes'],
      # Attribution (eval only) sows each window's masses, stacked along a leading window axis.
      variable_axes={'intermediates': 0} if cfg.record_attribution else {},
      split_rngs={'params': False, 'dropout': True},
      length=n,
    )
    (states, _), y = scan(self, (states, ctx.tokens_seen), (windows, complete))
    return y.swapaxes(0, 1).reshape(batch, length, -1), states

  def report(self, deterministic: bool) -> None:
    """Sows diagnostics into `intermediates` (MELODI: the long-term gate)."""
    del deterministic

  # -- incremental decoding -----------------------------------------------------------------------

  def check_decoding(self) -> None:
    if self.config.record_attribution:
      raise NotImplementedError(
        'record_attribution is an eval-time instrument of teacher-forced scoring; decode with '
        'record_attribution=False.'
      )
    if self.config.drop_sources:
      raise NotImplementedError(
        f'drop_sources={self.config.drop_sources} is an eval-time ablation of teacher-forced '
        'scoring; decode with the full model (drop_sources=()).'
      )
    missing = [type(layer).__name__ for layer in self.stack if not layer.decodes]
    if missing:
      raise NotImplementedError(
        f'{type(self).__name__} has no incremental decoding (layer kinds without it: '
        f'{sorted(set(missing))}); use teacher-forced scoring (decode=False).'
      )

  def prefill(self, tokens: Array, lengths: Array | None, start_of_sequence: Array | None):
    """Reads a prompt into the `cache`; logits [B, L, V] (valid at positions < lengths[b]).

    Row b consumes `tokens[b, :lengths[b]]` (default: T5X's count of non-zero tokens after
    position 0) after the state carried in `memory` (reset where `start_of_sequence`; None
    resets every row).
    """
    cfg = self.config
    tokens = jnp.asarray(tokens).astype(jnp.int32)
    batch, length = tokens.shape
    lengths = prefill_lengths_of(tokens, lengths)
    sos = self.rows_starting(start_of_sequence, batch)
    seen = self.read_seen(state_lib.MEMORY, sos)
    states = [layer.start_segment(sos, True) for layer in self.stack]
    ctx = Context(seen, lengths)
    if self.window_major:
      y, states = self.prefill_windows(tokens, states, ctx)
    else:
      x = self.embed(jnp.pad(tokens, ((0, 0), (0, -length % cfg.window_length))))
      states = list(states)
      for i, layer in enumerate(self.stack):
        x, states[i] = layer.prefill(x, states[i], ctx)
      y = x[:, :length]
    self.write_cache(batch, states, seen + lengths)
    return tied_logits(self.final_norm(y), self.embedding, cfg)

  def prefill_windows(self, tokens: Array, states: list, ctx: Context):
    """Window-major prefill (see the MELODI decoder)."""
    raise NotImplementedError

  def write_cache(self, batch: int, states: list, seen: Array) -> None:
    self.read_seen(state_lib.CACHE, batch=batch)
    state_lib.write(self, state_lib.CACHE, SEEN, Seen(seen))
    for layer, s in zip(self.stack, states):
      layer.write_cache(s)

  def decode_step(self, tokens: Array) -> Array:
    """Logits [B, 1, V] of the next token after `tokens: [B, 1]`.

    A call on an empty cache (T5X's cache-initialising call, any `[B, L]`) creates a zero cache
    and returns zero logits.
    """
    cfg = self.config
    tokens = jnp.asarray(tokens).astype(jnp.int32)
    batch, n = tokens.shape
    if not self.has_variable(state_lib.CACHE, 'tokens_seen'):
      states = [layer.read_cache(batch) for layer in self.stack]
      self.write_cache(batch, states, jnp.zeros((batch,), jnp.int32))
      return jnp.zeros((batch, n, cfg.vocab_size), jnp.float32)
    if n != 1:
      raise ValueError(
        f'decode=True reads one token per call, got {n}; read a prompt with prefill=True.'
      )
    seen = self.read_seen(state_lib.CACHE, batch=batch)
    states = [layer.read_cache(batch) for layer in self.stack]
    ctx = Context(seen)
    x = self.embed(tokens)
    for i, layer in enumerate(self.stack):
      x, states[i] = layer.decode(x, states[i], ctx)
    logits = tied_logits(self.final_norm(x), self.embedding, cfg)
    states = self.after_decode(states, Context(seen + 1))
    self.write_cache(batch, states, seen + 1)
    return logits

  def after_decode(self, states: list, ctx: Context) -> list:
    """Cross-layer work after a decoded token (MELODI: the summary pass at a window's end)."""
    del ctx
    return states


def window_step(module: Decoder, carry, xs, deterministic: bool):
  """nn.scan body: every layer on one window. carry = (states, tokens_seen); xs = (x, complete).

  `complete: [B]` (prefill only, else None) marks the rows whose prompt covers the window; the
  others keep their state.
  """
  states, seen = carry
  x, complete = xs
  w = x.shape[1]
  y, new = module.run_stack(module.block_tokens(x), states, Context(seen), deterministic)
  if complete is not None:
    new = state_lib.select_rows(complete, new, states)
  return (new, seen + w), y[:, :w]


def _remat_layer(kind: type, config, in_scan: bool) -> type:
  """`kind`, recomputed in the backward pass when `config.remat == 'layer'`.

  Parameter names and numbers do not change. Inside a scan CSE prevention is off, as
  `jax.checkpoint` advises for scan bodies; outside one it stays on, so that XLA does not merge
  the recomputation with the forward pass.
  """
  if config.remat != 'layer':
    return kind
  # `deterministic` (self, x, state, ctx, deterministic) is static.
  return nn.remat(kind, static_argnums=(4,), prevent_cse=not in_scan)


def prefill_lengths_of(tokens: Array, prefill_lengths: Array | None) -> Array:
  """Prompt lengths `[B]`: given, or T5X's rule (non-zero tokens after position 0)."""
  if prefill_lengths is None:
    return jnp.sum(tokens[:, 1:] != 0, axis=-1).astype(jnp.int32)
  return jnp.asarray(prefill_lengths).astype(jnp.int32).reshape(tokens.shape[:1])


def window_flags(length: int, window: int, lengths: Array) -> Array:
  """[n, B] bool: whether row b's prompt (`lengths: [B]`) covers window j of a [B, length] block."""
  return np.arange(1, length // window + 1)[:, None] * window <= lengths[None, :]
