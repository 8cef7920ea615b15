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
from flax import struct

from melodi_t5x import attribution
from melodi_t5x import state as state_lib
from melodi_t5x.architectures.decoder import (
  TRAIN_FACTOR,
  Architecture,
  Decoder,
  MemoryComponent,
  attention_recompute_flops,
  layer_matmul_params,
  xl_caches,
)
from melodi_t5x.config import XLConfig
from melodi_t5x.layers import StatefulLayer, t5_bucket

Array = jax.Array

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
  return state_lib.slice_rows(full, end, first_previous.shape[1])


# ---------------------------------------------------------------------------------------------
# State and blocks.
# ---------------------------------------------------------------------------------------------


@struct.dataclass
class XLState:
  """A sliding-window layer's cache: the W tokens before the block, oldest first.

  In training, the last window of the previous segment (a constant, zero at a document start);
  in decoding, the last W tokens read. Zero slots are not masked (see the module docstring).
  """

  keys: Array  # [B, W, H, K] normalised keys
  values: Array  # [B, W, H, K]


def state_dtype(config, decode: bool) -> str:
  """Carried memory is stored in float32 (as the paper counts it), the decode cache in the compute
  dtype (both hold values computed in the compute dtype)."""
  return config.dtype if decode else 'float32'


def kv_spec(config, length: int, decode: bool) -> state_lib.ArraySpec:
  """`[B, length, H, K]` keys or values."""
  shape = (length, config.num_heads, config.head_dim)
  axis = 'length' if decode and length == config.window_length else 'memory_length'
  return state_lib.ArraySpec(shape, (axis, 'heads', 'kv'), state_dtype(config, decode))


class XLLayer(StatefulLayer):
  """Sliding-window self-attention + MLP over a whole segment."""

  config: XLConfig

  def state_spec(self, decode: bool):
    cfg = self.config
    if not (cfg.use_cache or decode):
      return None  # the memory-free lower bound: a zero cache in every segment
    kv = kv_spec(cfg, cfg.window_length, decode)
    return XLState(kv, kv)

  def start_segment(self, reset: Array, deterministic: bool) -> XLState:
    if self.config.use_cache:
      return super().start_segment(reset, deterministic)
    return state_lib.zeros(
      XLState(*(kv_spec(self.config, self.config.window_length, False),) * 2), reset.shape[0]
    )

  def end_segment(self, state: XLState) -> None:
    if self.config.use_cache:
      super().end_segment(state)

  def sliding_attention(self, q: Array, k: Array, v: Array, cache: XLState, deterministic: bool):
    """Each window's queries over `[previous window; window]`.

    Args:
      q, k, v: [B, T, H, K] normalised queries, keys and values of the segment.
      cache: the keys and values of the window before the segment.
      deterministic: disables dropout.

    Returns:
      [B, T, H, K] attention output.
    """
    qw, kw, bias, visible = self.windowed_queries_keys(q, k, cache)
    vw = self.previous_and_window(v, cache.values).reshape(kw.shape[:2] + v.shape[2:])
    o = self.attention(qw, kw, vw, bias, visible, deterministic)
    return o.reshape(q.shape)

  def sliding_masses(self, q: Array, k: Array, cache: XLState) -> dict[str, Array]:
    """Attribution of `sliding_attention`: {'cache', 'window', 'none'} masses [B, H, T]."""
    w = self.config.window_length
    probs = self.attention_probs(*self.windowed_queries_keys(q, k, cache))
    masses = attribution.head_masses(probs, [('cache', slice(0, w)), ('window', slice(w, None))])
    return {s: attribution.from_windows(m, q.shape[0]) for s, m in masses.items()}

  def windowed_queries_keys(self, q: Array, k: Array, cache: XLState):
    """Windows as rows: (queries [B*n, W, H, K], keys [B*n, 2W, H, K] of `[previous window;
    window]`, the position bias and the visibility mask [W, 2W])."""
    cfg = self.config
    batch, length = q.shape[:2]
    w = cfg.window_length
    n = length // w
    bucket, visible = sliding_window_geometry(
      w, cfg.relative_position_buckets, cfg.relative_position_max_distance
    )
    kw = self.previous_and_window(k, cache.keys).reshape(batch * n, 2 * w, *k.shape[2:])
    qw = q.reshape(batch * n, w, *q.shape[2:])
    return qw, kw, self.position_bias(bucket), visible

  def previous_and_window(self, x: Array, first_previous: Array) -> Array:
    """`with_previous_window`; with the cache dropped (`drop_sources`), every window's previous
    window is zeros, as the first window's is at a document start."""
    w = self.config.window_length
    if self.config.drops('cache'):
      return with_previous_window(x, jnp.zeros_like(first_previous), w).at[:, :, :w].set(0)
    return with_previous_window(x, first_previous, w)

  def __call__(self, x: Array, state: XLState, ctx, deterministic: bool):
    """x: [B, T, D] -> (y: [B, T, D], the cache for the next segment: the last window)."""
    del ctx
    y, (k, v) = self.forward(x, state, deterministic)
    w = self.config.window_length
    return y, XLState(k[:, -w:], v[:, -w:])

  def forward(self, x: Array, state: XLState, deterministic: bool):
    """As `__call__`, but returns the keys and values [B, T, H, K] of every token."""
    a = self.normed_input(x, deterministic)
    q, (k, v) = self.queries(a), self.keys_values(a)
    cache = state_lib.cast(state, x.dtype)
    o = self.sliding_attention(q, k, v, cache, deterministic)
    if self.config.record_attribution:
      attribution.sow(self, self.sliding_masses(q, k, cache))
    return self.residual_mlp(x, o, deterministic), (k, v)

  def prefill(self, x: Array, state: XLState, ctx):
    """The cache after the prompt: the keys/values of positions lengths-W .. lengths-1."""
    state = state_lib.cast(state, x.dtype)
    y, (k, v) = self.forward(x, state, True)
    return y, window_state(state, k, v, ctx.lengths)

  def decode(self, x: Array, state: XLState, ctx):
    """One token `x: [B, 1, D]`; the cache shifts by one (oldest dropped, this token appended)."""
    del ctx
    o, state = self.decode_attention(self.normed_input(x, True), state)
    return self.residual_mlp(x, o, True), state

  def decode_attention(self, a: Array, state: XLState) -> tuple[Array, XLState]:
    """The sliding attention of one normed token `a: [B, 1, D]`: (o: [B, 1, H, K], new cache)."""
    cfg = self.config
    w = cfg.window_length
    q, (k, v) = self.queries(a), self.keys_values(a)
    bucket = t5_bucket(
      w - np.arange(w), cfg.relative_position_buckets, cfg.relative_position_max_distance
    )
    o = self.attention(q, state.keys, state.values, self.position_bias(bucket[None]), None, True)
    return o, XLState(state_lib.fifo_push(state.keys, k), state_lib.fifo_push(state.values, v))


def window_state(before: XLState, k: Array, v: Array, end: Array) -> XLState:
  """The W keys/values before position `end: [B]` of a block's `k, v: [B, T, H, K]`."""
  return XLState(window_before(before.keys, k, end), window_before(before.values, v, end))


# ---------------------------------------------------------------------------------------------
# The decoder and its record.
# ---------------------------------------------------------------------------------------------


class XLDecoder(Decoder):
  """Transformer-XL decoder-only LM: `num_layers` sliding-window layers."""

  config: XLConfig

  def layout(self):
    return tuple((f'layers_{i}', XLLayer) for i in range(self.config.num_layers))


def memory_components(cfg: XLConfig) -> list[MemoryComponent]:
  return [xl_caches(cfg, cfg.num_layers)] if cfg.use_cache else []


def train_flops(cfg: XLConfig, batch: int, length: int) -> dict[str, float]:
  """Train-step FLOPs of Transformer-XL with a sliding window, by term.

  Terms (x 3 for forward + backward):
    dense: 6 x (block matmul weights of every layer + the tied output embedding V x D) x tokens.
    attention: every token's query against the 2W keys of [previous window; window]:
      2 x 2 x 2W x HK per token and layer, x 3.
  """
  d, hk = cfg.embed_dim, cfg.num_heads * cfg.head_dim
  cfg.num_windows(length)
  tokens = batch * length
  f = TRAIN_FACTOR * 2
  return {
    'dense': f * tokens * (cfg.num_layers * layer_matmul_params(cfg) + cfg.vocab_size * d),
    'attention': f * tokens * cfg.num_layers * 2 * (2 * cfg.window_length) * hk,
  }


def recompute_flops(cfg: XLConfig, batch: int, length: int) -> float:
  return attention_recompute_flops(train_flops(cfg, batch, length))


ARCHITECTURE = Architecture.from_module('xl', XLConfig, XLDecoder, 'gin/models/xl.gin', globals())
