"""Block-Recurrent Transformer, "fixed:skip" (meliad `base_memory.gin` + `recurrent/bias_skip.gin`).

Reads top-down: the state block (the per-window state update), the recurrent layer, then the
decoder. Notation: B batch rows, T segment length, W window, n = T / W windows, N state vectors,
D embed dim, H heads, K head dim.

The stack is the Transformer-XL stack (`xl.py`: every layer a sliding-window layer with its XL
cache) in which one layer, `BRTConfig.recurrent_layer_index`, also carries a recurrent state
`S: [B, N, D]`. For each window w of a segment, in order:

  - State update (`StateBlock`): `hs = RMSNorm(S) + P` (learned position embeddings P added after
    the norm); the state's queries attend over the state's own keys (self-attention) and, with a
    second query, over the 2W token keys `[window w-1 (the XL cache at w = 0); window w]`
    (cross-attention); no mask and no position bias in either. `u = [self heads; cross heads]
    @ W_O` with W_O `[2*H*K, D]`, and the fixed ("bias") gate `g = sigmoid(gate_bias): [D]` gives
    `S <- g * S + (1 - g) * u`. No norm, residual or FFN after it ("skip FFN").
  - Tokens: the usual sliding-window self-attention, plus a second query per token attending over
    the keys and values of S *before* this window's update (so window w reads a state that has
    absorbed windows < w); `[self heads; cross heads] @ W_O` (`[2*H*K, D]`), residual, then the
    residual MLP as in every layer.

The token side of window w never feeds the state (no feedback), so the tokens' sliding attention
is computed for all windows at once, and only the state update is scanned over windows
(`nn.scan`: the compiled program does not grow with n). Gradients flow through S across the
windows of a segment; the S carried in from the previous segment is a constant. At a row's
document start S is the learned `initial_state` (not zeros), and the XL caches are zeros.
The state block has no dropout (as in the reference, whose state update runs in "pure" mode),
and the two cross-attentions have no attention dropout.

Incremental decoding (T5X's `prefill` / `decode` calls): the recurrent layer's `RecurrentState` adds
to the XL cache S, the keys/values of S and the keys/values of the previous window. The prefill runs
the training path, in which a prompt window updates S only if the row's prompt covers it; a decode
call that completes a window runs the state update over `[previous window; this window]` from the
cache, as the training path does.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import struct

from melodi_t5x import attribution
from melodi_t5x import state as state_lib
from melodi_t5x.architectures import xl
from melodi_t5x.architectures.decoder import (
  TRAIN_FACTOR,
  Architecture,
  Decoder,
  MemoryComponent,
  attention_recompute_flops,
  window_flags,
  xl_caches,
)
from melodi_t5x.config import BRTConfig
from melodi_t5x.layers import KV, Dense, TransformerBlock, l2_normalize, param, token_table

Array = jax.Array


# ---------------------------------------------------------------------------------------------
# Blocks.
# ---------------------------------------------------------------------------------------------


def cross_query_params(module: TransformerBlock) -> None:
  """Adds a second query projection `query2` and its temperature `temperature2` (setup only)."""
  cfg = module.config
  module.query2 = Dense(cfg.num_heads * cfg.head_dim, ('embed', 'joined_kv'), cfg)
  module.temperature2 = param(
    module, 'temperature2', nn.initializers.ones, (cfg.num_heads,), ('heads',), 'float32'
  )


class StateBlock(TransformerBlock):
  """The recurrent state's attention and fixed-gate update for one window (no FFN, no T5 bias)."""

  config: BRTConfig
  has_relpos = False
  has_ffn = False

  def setup(self):
    cfg = self.config
    self.setup_block()
    cross_query_params(self)
    # Learned position embeddings of the N state vectors, and the per-channel gate logits.
    normal = nn.initializers.normal
    self.position_embeddings = token_table(self, 'position_embeddings', cfg.num_states, normal(1.0))
    self.gate_bias = param(
      self, 'gate_bias', nn.initializers.normal(stddev=0.1), (cfg.embed_dim,), ('embed',), 'float32'
    )

  def __call__(self, state: Array, keys: Array, values: Array) -> tuple[Array, KV]:
    """One window's update.

    Args:
      state: S [B, N, D] before this window.
      keys, values: [B, 2W, H, K] normalised token keys and values `[previous window; window]`.

    Returns:
      The updated state [B, N, D], and the keys and values [B, N, H, K] of the state *before*
      the update (what this window's tokens attend to).
    """
    hs, (k, v) = self.state_kv(state)
    q, q2 = self.queries(hs), l2_normalize(self.heads(self.query2(hs)))
    o_self = self.attention(q, k, v, None, None, True)
    o_cross = self.attention(q2, keys, values, None, None, True, self.temperature2)
    o = jnp.concatenate([o_self, o_cross], axis=-2)  # [B, N, 2H, K]
    u = self.out(o.reshape(*o.shape[:-2], -1))  # [B, N, D]
    g = jax.nn.sigmoid(self.gate_bias).astype(state.dtype)
    return g * state + (1.0 - g) * u.astype(state.dtype), (k, v)

  def state_kv(self, state: Array) -> tuple[Array, KV]:
    """The normed state with positions `hs: [B, N, D]` and its keys and values [B, N, H, K]."""
    hs = self.attn_norm(state) + self.position_embeddings.astype(state.dtype)[None]
    return hs, self.keys_values(hs)


def _state_step(block: StateBlock, state: Array, xs) -> tuple[Array, KV]:
  """nn.scan body: carry S over windows; emit the keys/values of S before each update.

  `xs` is one window's (keys, values, complete): `complete: [B]` (prefill only, else None)
  marks the rows whose prompt covers the window; the others keep S.
  """
  keys, values, complete = xs
  new_state, state_kv = block(state, keys, values)
  if complete is not None:
    new_state = state_lib.select_rows(complete, new_state, state)
  return new_state, state_kv


@struct.dataclass
class RecurrentState:
  """The recurrent layer's state: its XL cache and S; decoding adds what a window's end needs.

  Carried across segments: `keys`, `values` (the XL cache, zero at a document start) and
  `recurrent` (S, the learned initial state at a document start). Decoding only: the keys and
  values of S (what the tokens read) and of the window before the current one.
  """

  keys: Array  # [B, W, H, K] XL cache (decoding: the last W tokens)
  values: Array  # [B, W, H, K]
  recurrent: Array  # [B, N, D] S before the current window's update
  state_keys: Array | None = None  # [B, N, H, K] keys of S (decoding)
  state_values: Array | None = None  # [B, N, H, K]
  previous_keys: Array | None = None  # [B, W, H, K] the window before the current one (decoding)
  previous_values: Array | None = None  # [B, W, H, K]

  def window(self) -> xl.XLState:
    return xl.XLState(self.keys, self.values)


class RecurrentLayer(xl.XLLayer):
  """A sliding-window layer that also reads and updates the recurrent state, window by window."""

  config: BRTConfig

  def setup(self):
    cfg = self.config
    self.setup_block()
    cross_query_params(self)
    self.state_block = StateBlock(cfg)
    # S at a document start, shared by all rows.
    self.initial_state = token_table(
      self, 'initial_state', cfg.num_states, nn.initializers.normal(0.1)
    )

  def state_spec(self, decode: bool):
    cfg = self.config
    window = xl.kv_spec(cfg, cfg.window_length, decode)
    recurrent = state_lib.ArraySpec(
      (cfg.num_states, cfg.embed_dim), ('memory_length', 'embed'), xl.state_dtype(cfg, decode)
    )
    if not decode:
      return RecurrentState(window, window, recurrent)
    states = xl.kv_spec(cfg, cfg.num_states, decode)
    return RecurrentState(window, window, recurrent, states, states, window, window)

  def fresh_state(self, batch: int) -> RecurrentState:
    fresh = state_lib.zeros(self.state_spec(False), batch)
    initial = jnp.broadcast_to(self.initial_state, fresh.recurrent.shape)
    return fresh.replace(recurrent=initial.astype(fresh.recurrent.dtype))

  def __call__(self, x: Array, state: RecurrentState, ctx, deterministic: bool):
    """x: [B, T, D] -> (y: [B, T, D], the XL cache of the last window and S after the segment)."""
    del ctx
    y, (k, v), s = self.forward(x, state, deterministic)
    w = self.config.window_length
    return y, RecurrentState(k[:, -w:], v[:, -w:], s)

  def forward(
    self, x: Array, state: RecurrentState, deterministic: bool, complete: Array | None = None
  ) -> tuple[Array, KV, Array]:
    """The segment `x: [B, T, D]`: (y, the keys and values [B, T, H, K] of every token, new S).

    `complete: [n, B]` (prefill) marks the windows that update S per row (default: all).
    """
    w = self.config.window_length
    batch, length = x.shape[:2]
    n = length // w
    cache = state_lib.cast(state.window(), x.dtype)
    a = self.normed_input(x, deterministic)
    q, (k, v) = self.queries(a), self.keys_values(a)
    o_self = self.sliding_attention(q, k, v, cache, deterministic)  # [B, T, H, K]

    window_kv = (self.previous_and_window(k, cache.keys), self.previous_and_window(v, cache.values))
    xs = (*window_kv, None if complete is None else complete.T)
    scan = nn.scan(
      _state_step,
      variable_broadcast=['params', 'params_axes'],
      split_rngs={'params': False},
      in_axes=1,
      out_axes=1,
      length=n,
    )
    new_state, state_kv = scan(self.state_block, state.recurrent.astype(x.dtype), xs)

    def per_window(t: Array) -> Array:  # [B, n, ...] -> [B * n, ...]
      return t.reshape(batch * n, *t.shape[2:])

    if self.config.drops('state'):  # every window reads S as at a document start
      initial = self.fresh_state(batch).recurrent.astype(x.dtype)
      _, initial_kv = self.state_block.state_kv(initial)  # [B, N, H, K]
      state_kv = tuple(jnp.broadcast_to(t[:, None], (batch, n, *t.shape[1:])) for t in initial_kv)
    a_windows = a.reshape(batch * n, w, a.shape[-1])
    o_cross = self.cross_attention(a_windows, tuple(map(per_window, state_kv)))
    if self.config.record_attribution:
      self.record_masses(q, k, cache, a_windows, per_window(state_kv[0]), batch)
    o = jnp.concatenate([o_self, o_cross.reshape(o_self.shape)], axis=-2)  # [B, T, 2H, K]
    return self.residual_mlp(x, o, deterministic), (k, v), new_state

  def record_masses(self, q, k, cache, a_windows, state_keys, batch: int) -> None:
    """Attribution: H self heads over [previous window; window], H cross heads over S (each head
    1/(2H) of the output kernel's input)."""
    q2 = l2_normalize(self.heads(self.query2(a_windows)))
    probs = self.attention_probs(q2, state_keys, None, None, self.temperature2)
    state = attribution.head_masses(probs, [('state', slice(None))])
    state = {s: attribution.from_windows(m, batch) for s, m in state.items()}
    own = self.sliding_masses(q, k, cache)
    attribution.sow(self, attribution.mix((own, 0.5), (state, 0.5)))

  def cross_attention(self, a: Array, state_kv: KV) -> Array:
    """Normed tokens `a: [B', W', D]` over the keys/values [B', N, H, K] of S -> [B', W', H, K]."""
    q2 = l2_normalize(self.heads(self.query2(a)))
    return self.attention(q2, *state_kv, None, None, True, self.temperature2)

  def prefill(self, x: Array, state: RecurrentState, ctx):
    """Window j of the prompt updates S only where the row's prompt covers it, so S is the state
    before the window holding position lengths[b] (the next token's window)."""
    w = self.config.window_length
    cache = state_lib.cast(state.window(), x.dtype)
    complete = window_flags(x.shape[1], w, ctx.lengths)
    y, (k, v), s = self.forward(x, state, True, complete)
    last = xl.window_state(cache, k, v, ctx.lengths)
    previous = xl.window_state(cache, k, v, ctx.lengths // w * w)
    state_keys, state_values = self.state_block.state_kv(s)[1]
    new = RecurrentState(
      last.keys, last.values, s, state_keys, state_values, previous.keys, previous.values
    )
    return y, new

  def decode(self, x: Array, state: RecurrentState, ctx):
    """One token `x: [B, 1, D]`; a token that completes a window runs the state update over
    `[previous window; this window]` from the cache, as the training path does."""
    a = self.normed_input(x, True)
    o_self, window = self.decode_attention(a, state.window())
    o_cross = self.cross_attention(a, (state.state_keys, state.state_values))
    o = jnp.concatenate([o_self, o_cross], axis=-2)  # [B, 1, 2H, K]
    y = self.residual_mlp(x, o, True)
    state = state.replace(keys=window.keys, values=window.values)
    # Rows whose token completes a window: the cached last W tokens are exactly that window.
    done = (ctx.tokens_seen + 1) % self.config.window_length == 0
    new = nn.cond(jnp.any(done), _end_window, lambda _, s: s, self, state)
    return y, state_lib.select_rows(done, new, state)


def _end_window(layer: RecurrentLayer, s: RecurrentState) -> RecurrentState:
  """The state update at the end of a window (the last W cached tokens)."""
  keys = jnp.concatenate([s.previous_keys, s.keys], axis=1)  # [B, 2W, H, K]
  values = jnp.concatenate([s.previous_values, s.values], axis=1)
  recurrent, _ = layer.state_block(s.recurrent, keys, values)
  _, (state_keys, state_values) = layer.state_block.state_kv(recurrent)
  new = s.replace(
    recurrent=recurrent,
    state_keys=state_keys,
    state_values=state_values,
    previous_keys=s.keys,
    previous_values=s.values,
  )
  return jax.tree_util.tree_map(lambda n, o: n.astype(o.dtype), new, s)


# ---------------------------------------------------------------------------------------------
# The decoder and its record.
# ---------------------------------------------------------------------------------------------


class BRTDecoder(Decoder):
  """Block-Recurrent Transformer: the XL stack with layer `recurrent_layer_index` recurrent."""

  config: BRTConfig

  def layout(self):
    cfg = self.config
    kind = lambda i: RecurrentLayer if i == cfg.recurrent_layer_index else xl.XLLayer
    return tuple((f'layers_{i}', kind(i)) for i in range(cfg.num_layers))


def memory_components(cfg: BRTConfig) -> list[MemoryComponent]:
  state = cfg.num_states * cfg.embed_dim
  return [
    xl_caches(cfg, cfg.num_layers),
    MemoryComponent('recurrent state', f'{cfg.num_states} states x d', state, state),
  ]


def train_flops(cfg: BRTConfig, batch: int, length: int) -> dict[str, float]:
  """Train-step FLOPs of the Block-Recurrent Transformer, by term.

  Terms (x 3 for forward + backward):
    dense, attention: the Transformer-XL stack (`xl.train_flops`).
    recurrent_tokens: per token of the recurrent layer, the second query (D x HK), its attention
      over the N state vectors (2 x 2 x N x HK) and the wider output projection ([2HK, D] instead
      of [HK, D]: 2 x HK x D more).
    recurrent_state: per window, the N state vectors' Q, Q2, K, V (4 x D x HK) and output
      ([2HK, D]) projections, self-attention over the state (2 x 2 x N x N x HK) and
      cross-attention over the 2W token keys (2 x 2 x N x 2W x HK).
  """
  terms = xl.train_flops(cfg, batch, length)
  d, hk, n = cfg.embed_dim, cfg.num_heads * cfg.head_dim, cfg.num_states
  windows = cfg.num_windows(length) * batch
  tokens = batch * length
  f = TRAIN_FACTOR * 2
  terms['recurrent_tokens'] = f * tokens * (d * hk + 2 * n * hk + hk * d)
  per_window = n * 4 * d * hk + n * 2 * hk * d + 2 * n * n * hk + 2 * n * 2 * cfg.window_length * hk
  terms['recurrent_state'] = f * windows * per_window
  return terms


def recompute_flops(cfg: BRTConfig, batch: int, length: int) -> float:
  """Every attention's logits, and the recurrent attentions' (tokens over S; S over S and 2W)."""
  extra = attention_recompute_flops(train_flops(cfg, batch, length))
  n, w, hk = cfg.num_states, cfg.window_length, cfg.num_heads * cfg.head_dim
  windows = cfg.num_windows(length) * batch
  return extra + 2 * batch * length * n * hk + 2 * windows * (n * n + n * 2 * w) * hk


ARCHITECTURE = Architecture.from_module(
  'brt', BRTConfig, BRTDecoder, 'gin/models/brt.gin', globals()
)
