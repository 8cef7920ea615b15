"""Transformer-XL with a sliding window (meliad `base_transformer.gin`) as Flax linen modules.

Reads top-down: the window geometry, the sliding-window layer (also the ordinary layer of the
Memorizing and Block-Recurrent Transformers), then the decoder. Notation: B batch rows, T segment
length, W window, N = T / W windows, D embed dim, H heads, K head dim, V vocab.

Every token at absolute position t attends to exactly the W tokens t-W .. t-1 (never to itself),
with a T5 relative-position bias. Within a segment the previous window's keys are ordinary
activations; for the first window they come from the layer's XL cache: the normalised keys and the
values of the last window of the previous segment, `[B, W, H, K]` each, a constant (no gradient
flows into earlier segments), zeroed at a row's document start. Zero cache slots are not masked
(as in the reference): their key is 0, so they get the logit |tau| * bias and contribute value 0.
Because a window reads only the previous window of the *same layer's input*, the windows of a
layer are independent given that input and are computed in one batched attention (no scan).

`XLConfig.use_cache=False` is the memory-free lower bound: every segment starts from a zero cache.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax.linen import partitioning

from melodi_t5x import decoding, memory
from melodi_t5x.config import XLConfig
from melodi_t5x.layers import (
  RMSNorm,
  TransformerBlock,
  embedding_param,
  layer_class,
  segment_inputs,
  t5_bucket,
  tied_logits,
)

Array = jax.Array
KV = tuple[Array, Array]

# ---------------------------------------------------------------------------------------------
# Helpers: window geometry.
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=32)
def sliding_window_geometry(
  window: int, num_buckets: int, max_distance: int
) -> tuple[np.ndarray, np.ndarray]:
  """Static T5 buckets and mask of one window attending to `[previous window; window]`.

  Query i (0..W-1) is aligned with key i + W; the relative position r = key - (i + W) is visible
  iff -W <= r <= -1.

  Returns:
    bucket: [W, 2W] int32 and mask: [W, 2W] bool (True = visible).
  """
  rel = np.arange(2 * window)[None, :] - (np.arange(window)[:, None] + window)
  return t5_bucket(-rel, num_buckets, max_distance), (rel < 0) & (rel >= -window)


def windowed(x: Array, window: int) -> Array:
  """[B, T, ...] -> [B, T/W, W, ...]."""
  return x.reshape(x.shape[0], x.shape[1] // window, window, *x.shape[2:])


def with_previous_window(x: Array, first_previous: Array, window: int) -> Array:
  """For every window, `[previous window; window]`: x [B, T, ...] -> [B, T/W, 2W, ...].

  `first_previous: [B, W, ...]` stands before the first window (the XL cache).
  """
  previous = jnp.concatenate([first_previous.astype(x.dtype), x[:, :-window]], axis=1)
  return jnp.concatenate([windowed(previous, window), windowed(x, window)], axis=2)


def window_before(first_previous: Array, x: Array, end: Array) -> Array:
  """Rows' W entries before position `end: [B]` of x: [B, T, ...] -> [B, W, ...].

  `first_previous: [B, W, ...]` stands before position 0 (the XL cache), so `end` may be 0..T.
  """
  full = jnp.concatenate([first_previous.astype(x.dtype), x], axis=1)
  return decoding.slice_rows(full, end, first_previous.shape[1])


# ---------------------------------------------------------------------------------------------
# Blocks.
# ---------------------------------------------------------------------------------------------


class XLLayer(TransformerBlock):
  """Sliding-window self-attention + MLP over a whole segment."""

  config: XLConfig

  def sliding_attention(self, q: Array, k: Array, v: Array, cache: KV, deterministic: bool):
    """Each window's queries over `[previous window; window]`.

    Args:
      q, k, v: [B, T, H, K] normalised queries, keys and values of the segment.
      cache: normalised keys and values [B, W, H, K] of the window before the segment.
      deterministic: disables dropout.

    Returns:
      [B, T, H, K] attention output.
    """
    cfg = self.config
    batch, length = q.shape[:2]
    w = cfg.window_length
    n = length // w
    bucket, visible = sliding_window_geometry(
      w, cfg.relative_position_buckets, cfg.relative_position_max_distance
    )
    kw = with_previous_window(k, cache[0], w).reshape(batch * n, 2 * w, *k.shape[2:])
    vw = with_previous_window(v, cache[1], w).reshape(batch * n, 2 * w, *v.shape[2:])
    qw = q.reshape(batch * n, w, *q.shape[2:])
    o = self.attention(qw, kw, vw, self.position_bias(bucket), visible, deterministic)
    return o.reshape(q.shape)

  def __call__(self, x: Array, cache: KV, deterministic: bool) -> tuple[Array, KV]:
    """x: [B, T, D]; cache: ([B, W, H, K], [B, W, H, K]) -> (y: [B, T, D], new cache)."""
    y, (k, v) = self.forward(x, cache, deterministic)
    w = self.config.window_length
    return y, (k[:, -w:], v[:, -w:])

  def forward(self, x: Array, cache: KV, deterministic: bool) -> tuple[Array, KV]:
    """As `__call__`, but returns the keys and values [B, T, H, K] of every token."""
    a = self.normed_input(x, deterministic)
    q, (k, v) = self.queries(a), self.keys_values(a)
    o = self.sliding_attention(q, k, v, cache, deterministic)
    return self.residual_mlp(x, o, deterministic), (k, v)

  def decode_step(self, x: Array, cache: KV) -> tuple[Array, KV]:
    """One token `x: [B, 1, D]` after the W tokens whose keys/values are `cache` (oldest first).

    Returns y: [B, 1, D] and the cache shifted by one (oldest dropped, this token appended).
    """
    o, cache = self.decode_attention(self.normed_input(x, True), cache)
    return self.residual_mlp(x, o, True), cache

  def decode_attention(self, a: Array, cache: KV) -> tuple[Array, KV]:
    """The sliding attention of one normed token `a: [B, 1, D]`: (o: [B, 1, H, K], new cache)."""
    cfg = self.config
    w = cfg.window_length
    q, kv = self.queries(a), self.keys_values(a)
    bucket = t5_bucket(
      w - np.arange(w), cfg.relative_position_buckets, cfg.relative_position_max_distance
    )
    o = self.attention(q, *cache, self.position_bias(bucket[None]), None, True)
    cache = tuple(jnp.concatenate([c[:, 1:], n.astype(c.dtype)], axis=1) for c, n in zip(cache, kv))
    return o, cache


def xl_cache_state(config) -> memory.CarriedState:
  """One carried XL cache array (keys or values) `[B, W, H, K]`."""
  shape = (config.window_length, config.num_heads, config.head_dim)
  return memory.CarriedState(shape, ('memory_length', 'heads', 'kv'))


# ---------------------------------------------------------------------------------------------
# The decoder.
# ---------------------------------------------------------------------------------------------


class XLDecoder(nn.Module):
  """Transformer-XL decoder-only LM with the call signature of `t5x.models.DecoderOnlyModel`."""

  config: XLConfig

  def setup(self):
    cfg = self.config
    self.embedding = embedding_param(self, cfg)
    self.layers = [self.make_layer(i) for i in range(cfg.num_layers)]
    self.final_norm = RMSNorm(cfg)
    self.dropout = nn.Dropout(cfg.dropout_rate)
    if cfg.use_cache:
      self.cache_keys = {str(i): xl_cache_state(cfg) for i in range(cfg.num_layers)}
      self.cache_values = {str(i): xl_cache_state(cfg) for i in range(cfg.num_layers)}
    self.decode_state = decoding.DecodeCache(self.decode_cache_specs())

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

    `start_of_sequence: [B]` marks rows whose document starts here (their caches are zeroed);
    None resets every row. Caches are written back when the `memory` collection is mutable.

    Incremental decoding (T5X's convention, state in the `cache` collection): `prefill=True`
    reads a prompt (see `prefill`), `decode=True` one token per call (see `decode_step`).
    """
    del decoder_target_tokens, decoder_positions, decoder_causal_attention, max_decode_length
    if (decode or prefill) and not self.decodes_incrementally():
      raise NotImplementedError(
        f'{type(self).__name__} has no incremental decoding (it changes the XL stack without '
        'the decoding hooks prefill_layer/decode_layer); use teacher-forced scoring '
        '(decode=False).'
      )
    if prefill:
      return self.prefill(decoder_input_tokens, prefill_lengths, start_of_sequence)
    if decode:
      return self.decode_step(decoder_input_tokens)
    cfg = self.config
    tokens, sos = segment_inputs(cfg, decoder_input_tokens, decoder_segment_ids, start_of_sequence)
    deterministic = not enable_dropout
    x = jnp.take(self.embedding, tokens, axis=0).astype(jnp.dtype(cfg.dtype))  # [B, T, D]
    x = partitioning.with_sharding_constraint(x, ('batch', 'length', 'embed'))
    for i in range(cfg.num_layers):
      x = self.run_layer(i, x, sos, deterministic)
      x = self.after_layer(i, x, sos, deterministic)
    y = self.dropout(self.final_norm(x), deterministic=deterministic)
    return tied_logits(y, self.embedding, cfg)

  # Hooks for decoders built on this stack (Memorizing and Block-Recurrent Transformers).

  def make_layer(self, index: int) -> nn.Module:
    """The (unbound) layer `index` of the stack (see the Block-Recurrent decoder).

    With `remat='layer'` the layer is recomputed in the backward pass (also the XL layers of the
    decoders built on this stack; their own extra layers keep their activations).
    """
    del index
    return layer_class(XLLayer, self.config, deterministic_argnum=3, in_scan=False)(self.config)

  def run_layer(self, index: int, x: Array, sos: Array, deterministic: bool) -> Array:
    """Applies layer `index` to `x: [B, T, D]` with its XL cache, and stores the new cache."""
    x, cache = self.layers[index](x, self.read_cache(index, sos, x.dtype), deterministic)
    self.write_cache(index, cache)
    return x

  def after_layer(self, layer: int, x: Array, sos: Array, deterministic: bool) -> Array:
    """Extra computation after XL layer `layer` (none here; see the Memorizing decoder)."""
    del layer, sos, deterministic
    return x

  def write_cache(self, layer: int, cache: KV) -> None:
    """Stores the last window's keys and values of `layer` (a constant for the next segment)."""
    if self.config.use_cache:
      self.cache_keys[str(layer)].end_segment(jax.lax.stop_gradient(cache[0]))
      self.cache_values[str(layer)].end_segment(jax.lax.stop_gradient(cache[1]))

  def read_cache(self, layer: int, sos: Array, dtype) -> KV:
    """The XL cache of `layer` for this segment (zeros at a document start or without cache)."""
    cfg = self.config
    if not cfg.use_cache:
      shape = (sos.shape[0], cfg.window_length, cfg.num_heads, cfg.head_dim)
      return jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)
    keys, values = self.cache_keys[str(layer)], self.cache_values[str(layer)]
    return keys.start_segment(sos).astype(dtype), values.start_segment(sos).astype(dtype)

  # -- incremental decoding ----------------------------------------------------------------------
  #
  # Cache (collection `cache`): `index` (tokens read, [B]) and per layer the keys and values of the
  # last W tokens, oldest first ([B, W, H, K]; zero before the document start, as the XL cache).
  # A decoder that changes the stack (the training hooks above) decodes only if it also overrides
  # the decoding hooks `decode_cache_specs`, `prefill_layer` and `decode_layer` (see brt.py).

  def decodes_incrementally(self) -> bool:
    """False for a subclass that overrides a training hook but no decoding hook."""
    overrides = lambda hooks: any(
      getattr(type(self), h) is not getattr(XLDecoder, h) for h in hooks
    )
    training = ('make_layer', 'run_layer', 'after_layer')
    return not overrides(training) or overrides(('prefill_layer', 'decode_layer'))

  def decode_cache_specs(self) -> tuple[decoding.Spec, ...]:
    """The cache arrays (name, shape without batch, logical axes, dtype): see above."""
    cfg = self.config
    kv = ((cfg.window_length, cfg.num_heads, cfg.head_dim), ('length', 'heads', 'kv'), cfg.dtype)
    layers = tuple(
      (f'{name}_{i}', *kv) for i in range(cfg.num_layers) for name in ('keys', 'values')
    )
    return (('index', (), (), 'int32'),) + layers

  def prefill(self, tokens: Array, lengths: Array | None, start_of_sequence: Array | None):
    """Reads a prompt into the cache; logits [B, L, V] (valid at positions < lengths[b]).

    Row b consumes `tokens[b, :lengths[b]]` (default: T5X's count of non-zero tokens after
    position 0) through the training path, after the carried XL cache of the `memory` collection
    (reset where `start_of_sequence`; None resets every row).
    """
    cfg = self.config
    w = cfg.window_length
    tokens = jnp.asarray(tokens).astype(jnp.int32)
    batch, length = tokens.shape
    lengths = decoding.prefill_lengths_of(tokens, lengths)
    sos = jnp.ones((batch,), bool) if start_of_sequence is None else start_of_sequence
    sos = jnp.asarray(sos).astype(bool).reshape(batch)
    padded = jnp.pad(tokens, ((0, 0), (0, -length % w)))  # whole windows for the training path
    x = jnp.take(self.embedding, padded, axis=0).astype(jnp.dtype(cfg.dtype))
    state = {'index': lengths}
    for i in range(cfg.num_layers):
      x = self.prefill_layer(i, x, sos, lengths, state)
    self.decode_state.read(batch)
    self.decode_state.write(state)
    return tied_logits(self.final_norm(x[:, :length]), self.embedding, cfg)

  def prefill_layer(
    self, index: int, x: Array, sos: Array, lengths: Array, state: dict[str, Array]
  ) -> Array:
    """Layer `index` over the padded prompt `x: [B, L', D]` (training path, carried XL cache).

    Writes the layer's cache arrays into `state`: the keys/values of positions
    lengths-W .. lengths-1 (the carried cache stands before position 0).
    """
    cache = self.read_cache(index, sos, x.dtype)
    x, kv = self.layers[index].forward(x, cache, True)
    for name, before, new in zip(('keys', 'values'), cache, kv):
      state[f'{name}_{index}'] = window_before(before, new, lengths)
    return x

  def decode_step(self, tokens: Array) -> Array:
    """Logits [B, 1, V] of the next token after `tokens: [B, 1]`.

    A call on an empty cache (T5X's cache-initialising call, any `[B, L]`) creates a zero cache
    and returns zero logits.
    """
    cfg = self.config
    tokens = jnp.asarray(tokens).astype(jnp.int32)
    batch, n = tokens.shape
    if not self.decode_state.exists():
      self.decode_state.read(batch)
      return jnp.zeros((batch, n, cfg.vocab_size), jnp.float32)
    if n != 1:
      raise ValueError(
        f'decode=True reads one token per call, got {n}; read a prompt with prefill=True.'
      )
    state = self.decode_state.read(batch)
    x = jnp.take(self.embedding, tokens, axis=0).astype(jnp.dtype(cfg.dtype))  # [B, 1, D]
    for i in range(cfg.num_layers):
      x = self.decode_layer(i, x, state)
    state['index'] = state['index'] + 1
    self.decode_state.write(state)
    return tied_logits(self.final_norm(x), self.embedding, cfg)

  def decode_layer(self, index: int, x: Array, state: dict[str, Array]) -> Array:
    """Layer `index` on the token at position `state['index']`, `x: [B, 1, D]`.

    Updates the layer's cache arrays in `state` (the last W keys/values shift by one).
    """
    keys, values = f'keys_{index}', f'values_{index}'
    x, (state[keys], state[values]) = self.layers[index].decode_step(
      x, (state[keys], state[values])
    )
    return x
