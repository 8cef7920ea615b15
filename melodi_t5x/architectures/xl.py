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

from melodi_t5x import memory
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
    a = self.normed_input(x, deterministic)
    q, (k, v) = self.queries(a), self.keys_values(a)
    o = self.sliding_attention(q, k, v, cache, deterministic)
    w = self.config.window_length
    return self.residual_mlp(x, o, deterministic), (k[:, -w:], v[:, -w:])


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
    layer = layer_class(XLLayer, cfg, deterministic_argnum=3, in_scan=False)
    self.layers = [layer(cfg) for _ in range(cfg.num_layers)]
    self.final_norm = RMSNorm(cfg)
    self.dropout = nn.Dropout(cfg.dropout_rate)
    if cfg.use_cache:
      self.cache_keys = {str(i): xl_cache_state(cfg) for i in range(cfg.num_layers)}
      self.cache_values = {str(i): xl_cache_state(cfg) for i in range(cfg.num_layers)}

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
    """
    del decoder_target_tokens, decoder_positions, decoder_causal_attention, max_decode_length
    del prefill_lengths
    if decode or prefill:
      raise NotImplementedError(
        'XLDecoder has no incremental decoding; use teacher-forced scoring (decode=False).'
      )
    cfg = self.config
    tokens, sos = segment_inputs(cfg, decoder_input_tokens, decoder_segment_ids, start_of_sequence)
    deterministic = not enable_dropout
    x = jnp.take(self.embedding, tokens, axis=0).astype(jnp.dtype(cfg.dtype))  # [B, T, D]
    x = partitioning.with_sharding_constraint(x, ('batch', 'length', 'embed'))
    for i, layer in enumerate(self.layers):
      x, cache = layer(x, self.read_cache(i, sos, x.dtype), deterministic)
      if cfg.use_cache:
        self.cache_keys[str(i)].end_segment(jax.lax.stop_gradient(cache[0]))
        self.cache_values[str(i)].end_segment(jax.lax.stop_gradient(cache[1]))
    y = self.dropout(self.final_norm(x), deterministic=deterministic)
    return tied_logits(y, self.embedding, cfg)

  def read_cache(self, layer: int, sos: Array, dtype) -> KV:
    """The XL cache of `layer` for this segment (zeros at a document start or without cache)."""
    cfg = self.config
    if not cfg.use_cache:
      shape = (sos.shape[0], cfg.window_length, cfg.num_heads, cfg.head_dim)
      return jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)
    keys, values = self.cache_keys[str(layer)], self.cache_values[str(layer)]
    return keys.start_segment(sos).astype(dtype), values.start_segment(sos).astype(dtype)
