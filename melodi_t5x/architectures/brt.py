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
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from melodi_t5x import memory
from melodi_t5x.architectures.xl import KV, XLDecoder, XLLayer, with_previous_window
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
    hs = self.attn_norm(state) + self.position_embeddings.astype(state.dtype)[None]
    q, q2 = self.queries(hs), l2_normalize(self.heads(self.query2(hs)))
    k, v = self.keys_values(hs)
    o_self = self.attention(q, k, v, None, None, True)
    o_cross = self.attention(q2, keys, values, None, None, True, self.temperature2)
    o = jnp.concatenate([o_self, o_cross], axis=-2)  # [B, N, 2H, K]
    u = self.out(o.reshape(*o.shape[:-2], -1))  # [B, N, D]
    g = jax.nn.sigmoid(self.gate_bias).astype(state.dtype)
    return g * state + (1.0 - g) * u.astype(state.dtype), (k, v)


def _state_step(block: StateBlock, state: Array, window_kv: KV) -> tuple[Array, KV]:
  """nn.scan body: carry S over windows; emit the keys/values of S before each update."""
  new_state, state_kv = block(state, *window_kv)
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
    w = self.config.window_length
    batch, length = x.shape[:2]
    n = length // w
    a = self.normed_input(x, deterministic)
    q, (k, v) = self.queries(a), self.keys_values(a)
    q2 = l2_normalize(self.heads(self.query2(a)))  # [B, T, H, K]
    o_self = self.sliding_attention(q, k, v, cache, deterministic)  # [B, T, H, K]

    window_kv = (with_previous_window(k, cache[0], w), with_previous_window(v, cache[1], w))
    scan = nn.scan(
      _state_step,
      variable_broadcast=['params', 'params_axes'],
      split_rngs={'params': False},
      in_axes=1,
      out_axes=1,
      length=n,
    )
    new_state, (state_k, state_v) = scan(self.state_block, state, window_kv)  # [B, n, N, H, K]

    def per_window(t: Array) -> Array:  # [B, n, ...] -> [B * n, ...]
      return t.reshape(batch * n, *t.shape[2:])

    q2 = q2.reshape(batch * n, w, *q2.shape[2:])
    o_cross = self.attention(
      q2, per_window(state_k), per_window(state_v), None, None, True, self.temperature2
    ).reshape(o_self.shape)
    o = jnp.concatenate([o_self, o_cross], axis=-2)  # [B, T, 2H, K]
    return self.residual_mlp(x, o, deterministic), (k[:, -w:], v[:, -w:]), new_state


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
    state = self.recurrent_state.start_segment(sos, initial=layer.initial_state).astype(x.dtype)
    x, cache, state = layer(x, self.read_cache(index, sos, x.dtype), state, deterministic)
    self.write_cache(index, cache)
    self.recurrent_state.end_segment(jax.lax.stop_gradient(state))
    return x
