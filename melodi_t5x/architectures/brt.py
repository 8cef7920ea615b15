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

Incremental decoding (T5X's `prefill` / `decode` calls) uses the XL decoder's cache and hooks; the
recurrent layer also caches S, the keys/values of S and the keys/values of the previous window
(see `BRTDecoder.decode_cache_specs`). The prefill runs the training path, in which a prompt
window updates S only if the row's prompt covers it; a decode call that completes a window runs
the state update over `[previous window; this window]` from the cache, as the training path does.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from melodi_t5x import decoding, memory
from melodi_t5x.architectures.xl import (
  KV,
  XLDecoder,
  XLLayer,
  window_before,
  with_previous_window,
)
from melodi_t5x.config import BRTConfig
from melodi_t5x.layers import Dense, TransformerBlock, l2_normalize, param

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
    self.position_embeddings = param(
      self,
      'position_embeddings',
      nn.initializers.normal(stddev=1.0),
      (cfg.num_states, cfg.embed_dim),
      ('summary', 'embed'),
      cfg.param_dtype,
    )
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
    new_state = decoding.select_rows(complete, new_state, state)
  return new_state, state_kv


class RecurrentLayer(XLLayer):
  """A sliding-window layer that also reads and updates the recurrent state, window by window."""

  config: BRTConfig

  def setup(self):
    cfg = self.config
    self.setup_block()
    cross_query_params(self)
    self.state_block = StateBlock(cfg)
    # S at a document start, shared by all rows.
    self.initial_state = param(
      self,
      'initial_state',
      nn.initializers.normal(stddev=0.1),
      (cfg.num_states, cfg.embed_dim),
      ('summary', 'embed'),
      cfg.param_dtype,
    )

  def __call__(
    self, x: Array, cache: KV, state: Array, deterministic: bool
  ) -> tuple[Array, KV, Array]:
    """x: [B, T, D]; cache: 2 x [B, W, H, K]; state: S [B, N, D] -> (y, new cache, new S)."""
    y, (k, v), state = self.forward(x, cache, state, deterministic)
    w = self.config.window_length
    return y, (k[:, -w:], v[:, -w:]), state

  def forward(
    self, x: Array, cache: KV, state: Array, deterministic: bool, complete: Array | None = None
  ) -> tuple[Array, KV, Array]:
    """As `__call__`, but returns the keys and values [B, T, H, K] of every token.

    `complete: [B, T/W]` (prefill) marks the windows that update S per row (default: all).
    """
    w = self.config.window_length
    batch, length = x.shape[:2]
    n = length // w
    a = self.normed_input(x, deterministic)
    q, (k, v) = self.queries(a), self.keys_values(a)
    o_self = self.sliding_attention(q, k, v, cache, deterministic)  # [B, T, H, K]

    window_kv = (with_previous_window(k, cache[0], w), with_previous_window(v, cache[1], w))
    xs = (*window_kv, complete)
    scan = nn.scan(
      _state_step,
      variable_broadcast=['params', 'params_axes'],
      split_rngs={'params': False},
      in_axes=1,
      out_axes=1,
      length=n,
    )
    new_state, state_kv = scan(self.state_block, state, xs)  # 2 x [B, n, N, H, K]

    def per_window(t: Array) -> Array:  # [B, n, ...] -> [B * n, ...]
      return t.reshape(batch * n, *t.shape[2:])

    a_windows = a.reshape(batch * n, w, a.shape[-1])
    o_cross = self.cross_attention(a_windows, tuple(map(per_window, state_kv)))
    o = jnp.concatenate([o_self, o_cross.reshape(o_self.shape)], axis=-2)  # [B, T, 2H, K]
    return self.residual_mlp(x, o, deterministic), (k, v), new_state

  def cross_attention(self, a: Array, state_kv: KV) -> Array:
    """Normed tokens `a: [B', W', D]` over the keys/values [B', N, H, K] of S -> [B', W', H, K]."""
    q2 = l2_normalize(self.heads(self.query2(a)))
    return self.attention(q2, *state_kv, None, None, True, self.temperature2)

  def decode_step(self, x: Array, cache: KV, state_kv: KV) -> tuple[Array, KV]:
    """One token `x: [B, 1, D]` after the W tokens of `cache`, reading S through `state_kv`.

    Returns y: [B, 1, D] and the cache shifted by one (as `XLLayer.decode_step`).
    """
    a = self.normed_input(x, True)
    o_self, cache = self.decode_attention(a, cache)
    o = jnp.concatenate([o_self, self.cross_attention(a, state_kv)], axis=-2)  # [B, 1, 2H, K]
    return self.residual_mlp(x, o, True), cache


# ---------------------------------------------------------------------------------------------
# The decoder.
# ---------------------------------------------------------------------------------------------


class BRTDecoder(XLDecoder):
  """Block-Recurrent Transformer decoder-only LM (`t5x.models.DecoderOnlyModel` signature).

  The XL stack with layer `recurrent_layer_index` a `RecurrentLayer`; besides the XL caches of
  every layer, the `memory` collection holds `recurrent_state: [B, N, D]`, reset to the learned
  initial state at a row's document start.
  """

  config: BRTConfig

  def setup(self):
    super().setup()
    cfg = self.config
    self.recurrent_state = memory.CarriedState(
      (cfg.num_states, cfg.embed_dim), ('memory_length', 'embed')
    )

  def make_layer(self, index: int) -> nn.Module:
    if index == self.config.recurrent_layer_index:
      return RecurrentLayer(self.config)
    return super().make_layer(index)

  def run_layer(self, index: int, x: Array, sos: Array, deterministic: bool) -> Array:
    if index != self.config.recurrent_layer_index:
      return super().run_layer(index, x, sos, deterministic)
    layer = self.layers[index]
    cache = self.read_cache(index, sos, x.dtype)
    x, cache, state = layer(x, cache, self.start_state(sos, x.dtype), deterministic)
    self.write_cache(index, cache)
    self.recurrent_state.end_segment(jax.lax.stop_gradient(state))
    return x

  def start_state(self, sos: Array, dtype) -> Array:
    """S [B, N, D] at the start of a segment: carried, or the learned initial state at `sos`."""
    initial = self.layers[self.config.recurrent_layer_index].initial_state
    return self.recurrent_state.start_segment(sos, initial=initial).astype(dtype)

  # -- incremental decoding (the XL decoder's cache and hooks) -----------------------------------

  def decode_cache_specs(self) -> tuple[decoding.Spec, ...]:
    """The XL cache, plus for the recurrent layer: S, its keys/values, the previous window's."""
    cfg = self.config
    kv = (cfg.num_heads, cfg.head_dim)
    window = ((cfg.window_length, *kv), ('length', 'heads', 'kv'), cfg.dtype)
    states = ((cfg.num_states, *kv), ('memory_length', 'heads', 'kv'), cfg.dtype)
    return super().decode_cache_specs() + (
      # S before the current window's update, and its keys/values (what the tokens read).
      ('recurrent_state', (cfg.num_states, cfg.embed_dim), ('memory_length', 'embed'), cfg.dtype),
      ('state_keys', *states),
      ('state_values', *states),
      # Keys/values of the window before the current one (the XL cache before the first window).
      ('previous_keys', *window),
      ('previous_values', *window),
    )

  def prefill_layer(
    self, index: int, x: Array, sos: Array, lengths: Array, state: dict[str, Array]
  ) -> Array:
    if index != self.config.recurrent_layer_index:
      return super().prefill_layer(index, x, sos, lengths, state)
    w = self.config.window_length
    layer = self.layers[index]
    cache = self.read_cache(index, sos, x.dtype)
    # Window j updates S only where the row's prompt covers it: S is then the state before the
    # window holding position lengths[b] (the next token's window).
    complete = jnp.arange(1, x.shape[1] // w + 1)[None, :] * w <= lengths[:, None]  # [B, n]
    x, kv, s = layer.forward(x, cache, self.start_state(sos, x.dtype), True, complete)
    for name, before, new in zip(('keys', 'values'), cache, kv):
      state[f'{name}_{index}'] = window_before(before, new, lengths)
      state[f'previous_{name}'] = window_before(before, new, lengths // w * w)
    state['recurrent_state'] = s
    state['state_keys'], state['state_values'] = layer.state_block.state_kv(s)[1]
    return x

  def decode_layer(self, index: int, x: Array, state: dict[str, Array]) -> Array:
    if index != self.config.recurrent_layer_index:
      return super().decode_layer(index, x, state)
    layer = self.layers[index]
    window = (state[f'keys_{index}'], state[f'values_{index}'])
    x, window = layer.decode_step(x, window, (state['state_keys'], state['state_values']))
    state[f'keys_{index}'], state[f'values_{index}'] = window
    # Rows whose token completes a window: the cached last W tokens are exactly that window.
    done = (state['index'] + 1) % self.config.window_length == 0
    names = ('recurrent_state', 'state_keys', 'state_values', 'previous_keys', 'previous_values')
    old = {name: state[name] for name in names}
    new = nn.cond(jnp.any(done), _end_window, lambda _, s, __: s, layer, old, window)
    state.update(decoding.select_rows(done, new, old))
    return x


def _end_window(layer: RecurrentLayer, s: dict[str, Array], window: KV) -> dict[str, Array]:
  """The state update at the end of a window with keys/values `window` (2 x [B, W, H, K])."""
  previous = (s['previous_keys'], s['previous_values'])
  keys, values = (jnp.concatenate([p, c], axis=1) for p, c in zip(previous, window))  # [B, 2W, ...]
  state, _ = layer.state_block(s['recurrent_state'], keys, values)
  _, (state_keys, state_values) = layer.state_block.state_kv(state)
  new = {
    'recurrent_state': state,
    'state_keys': state_keys,
    'state_values': state_values,
    'previous_keys': window[0],
    'previous_values': window[1],
  }
  return {name: value.astype(s[name].dtype) for name, value in new.items()}
