"""MELODI decoder (Chen et al., ICLR 2025) as Flax linen modules.

Reads top-down: helpers (window geometry), blocks (token mixer, one MELODI layer), then the
decoder that embeds a segment, scans its windows and produces logits. Norm, dense, T5 buckets and
cosine attention are shared with the baselines (`melodi_t5x.layers`).

Semantics follow the authors' code (google-research/meliad cc1aef5, `memory2/melodi_*.py`); see
README "Deviations" for the few places where we chose otherwise. Notation:
  B batch rows, T segment length, W window, S summary tokens, M short-term memory tokens,
  Q long-term FIFO tokens, L long-term increment, D embed dim, H heads, K head dim, V vocab.

Each layer's state is a `MelodiState` (`melodi_t5x.state`): carried across segments in the `memory`
collection, the short-term memory `Z: [B, M, D]` and, in long-term layers, the FIFO of token
embeddings `[B, Q, D]` (oldest first); the decoder counts each row's tokens since its document
start (`tokens_seen`).

Incremental decoding: inside a window a context token attends only to the memory and to the
window's context tokens before it, never to the window's summary tokens (`window_geometry`). So a
window is read one token per call (`MelodiLayer.decode`, the keys/values of its earlier context
tokens in the state); when it is complete, the summary tokens run over the cached window
(`MelodiLayer.end_window`) and the token mixers write the next short-term memory and the long-term
increment, as the training path does at the end of the window. A prompt's complete windows run
through the training path itself, the rest of it through `decode`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import struct

from melodi_t5x import attribution
from melodi_t5x import state as state_lib
from melodi_t5x.architectures.decoder import (
  TRAIN_FACTOR,
  Architecture,
  Context,
  Decoder,
  MemoryComponent,
  attention_recompute_flops,
  kv_width,
  layer_matmul_params,
  window_flags,
)
from melodi_t5x.architectures.xl import kv_spec, state_dtype
from melodi_t5x.config import MelodiConfig
from melodi_t5x.layers import KV, RMSNorm, StatefulLayer, dense_init, param, t5_bucket, token_table

Array = jax.Array


# ---------------------------------------------------------------------------------------------
# Helpers: window geometry.
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=32)
def window_geometry(
  window: int, summary: int, memory_size: int, num_buckets: int, max_distance: int
) -> tuple[np.ndarray, np.ndarray]:
  """Static T5 buckets and causal mask of one window's self-attention.

  Keys are `[memory (M); context (W); summary (S)]`, queries `[context; summary]`. Query q is
  aligned with key q + M, so memory sits at positions -M..-1, context at 0..W-1 and summary
  tokens right after the context. A key is visible iff it lies strictly before the query: no token
  attends to itself, context never sees its window's summary, summary token s sees all context.

  Returns:
    bucket: [W+S, M+W+S] int32 and mask: [W+S, M+W+S] bool (True = visible).
  """
  q = np.arange(window + summary)[:, None]
  k = np.arange(memory_size + window + summary)[None, :]
  rel = k - (q + memory_size)
  return t5_bucket(-rel, num_buckets, max_distance), rel < 0


# ---------------------------------------------------------------------------------------------
# Blocks.
# ---------------------------------------------------------------------------------------------


class TokenMixer(nn.Module):
  """Linear map along the token axis: [X (W); U (S)] -> `num_out` tokens.

  out[o, c] = sum_t in[t, c] * kernel[t, o] + bias[o]. With `norm_and_residual` (requires
  num_out == S), X and U are RMS-normalised first and U is added back.
  """

  num_out: int
  norm_and_residual: bool
  config: MelodiConfig

  @nn.compact
  def __call__(self, x: Array, u: Array) -> Array:
    """x: [B, W, D], u: [B, S, D] -> [B, num_out, D]."""
    if self.norm_and_residual:
      x, u_in = RMSNorm(self.config, name='norm_x')(x), RMSNorm(self.config, name='norm_u')(u)
    else:
      u_in = u
    tokens = jnp.concatenate([x, u_in], axis=1)  # [B, W+S, D]
    dtype, pdtype = jnp.dtype(self.config.dtype), self.config.param_dtype
    n_in = tokens.shape[1]
    kernel = param(
      self, 'kernel', dense_init, (n_in, self.num_out), ('mixer_in', 'mixer_out'), pdtype
    )
    bias = param(self, 'bias', nn.initializers.zeros, (self.num_out,), ('mixer_out',), pdtype)
    out = jnp.einsum('btd,to->bod', tokens, kernel.astype(dtype)) + bias.astype(dtype)[:, None]
    return out + u if self.norm_and_residual else out


@struct.dataclass
class MelodiState:
  """One MELODI layer's state (a field is None where the layer or the mode has no such part).

  Carried across segments: `short` and `fifo`. The training carry adds the FIFO's keys/values
  (computed once per segment, then pushed with each increment); decoding adds the keys/values of
  the short-term memory and the current window's context tokens so far.
  """

  short: Array | None = None  # [B, M, D] short-term memory Z (None: memory-free layer)
  fifo: Array | None = None  # [B, Q, D] long-term FIFO, oldest first (long-term layers)
  fifo_keys: Array | None = None  # [B, Q, H, K]
  fifo_values: Array | None = None  # [B, Q, H, K]
  short_keys: Array | None = None  # [B, M, H, K] (decoding)
  short_values: Array | None = None  # [B, M, H, K] (decoding)
  context_keys: Array | None = None  # [B, W, H, K] the window's context tokens (decoding)
  context_values: Array | None = None  # [B, W, H, K] (decoding)
  context_outputs: Array | None = None  # [B, W, D] this layer's outputs for them (decoding)

  def short_kv(self) -> KV | None:
    return None if self.short_keys is None else (self.short_keys, self.short_values)

  def fifo_kv(self) -> KV | None:
    return None if self.fifo_keys is None else (self.fifo_keys, self.fifo_values)


class MelodiLayer(StatefulLayer):
  """One MELODI layer (short-term, long-term or memory-free), applied to one window."""

  config: MelodiConfig

  def setup(self):
    cfg = self.config
    self.setup_block()
    self.memory_size = cfg.short_memory_size(self.index)
    self.is_long = cfg.is_long_term_layer(self.index)
    if self.memory_size and cfg.summary_branching != 'none':
      self.summary_mixer = TokenMixer(cfg.summary_size, True, cfg)
    if self.memory_size and cfg.summary_branching == 'separate':
      # The reference adds norms and a residual to the memory mixer only when M == S.
      self.memory_mixer = TokenMixer(self.memory_size, self.memory_size == cfg.summary_size, cfg)
    if self.is_long:
      self.gate = param(
        self,
        'gate',
        nn.initializers.truncated_normal(stddev=0.25),
        (cfg.num_heads, cfg.head_dim),
        ('heads', 'kv'),
        cfg.param_dtype,
      )
      self.long_mixer = TokenMixer(cfg.long_term_memory_increment_size, False, cfg)

  # -- state ---------------------------------------------------------------------------------------

  def state_spec(self, decode: bool):
    cfg = self.config
    m, q, d, w = self.memory_size, cfg.long_term_memory_tokens, cfg.embed_dim, cfg.window_length
    if not (m or self.is_long or decode):
      return None
    tokens = lambda n: state_lib.ArraySpec(
      (n, d), ('memory_length', 'embed'), state_dtype(cfg, decode)
    )
    spec = MelodiState(short=tokens(m) if m else None, fifo=tokens(q) if self.is_long else None)
    if not decode:
      return spec
    window = kv_spec(cfg, w, True)
    memory_kv = lambda n: kv_spec(cfg, n, True)
    return spec.replace(
      fifo_keys=memory_kv(q) if self.is_long else None,
      fifo_values=memory_kv(q) if self.is_long else None,
      short_keys=memory_kv(m) if m else None,
      short_values=memory_kv(m) if m else None,
      context_keys=window,
      context_values=window,
      context_outputs=state_lib.ArraySpec((w, d), ('length', 'embed'), cfg.dtype),
    )

  def start_segment(self, reset: Array, deterministic: bool) -> MelodiState:
    """The carried memory in the compute dtype, with the FIFO's keys and values."""
    state = super().start_segment(reset, deterministic) or MelodiState()
    state = state_lib.cast(state, self.config.dtype)
    if not self.is_long:
      return state
    keys, values = self.project_kv(state.fifo, deterministic)
    return state.replace(fifo_keys=keys, fifo_values=values)

  def end_segment(self, state: MelodiState) -> None:
    super().end_segment(MelodiState(short=state.short, fifo=state.fifo))

  def project_kv(self, tokens: Array, deterministic: bool) -> KV:
    """Normalised keys and values of `tokens: [B, N, D]` -> ([B, N, H, K], [B, N, H, K])."""
    return self.keys_values(self.normed_input(tokens, deterministic))

  def gate_mean(self) -> Array:
    """Mean weight sigma(g) given to self-attention (vs. long-term memory); a diagnostic."""
    return jnp.mean(jax.nn.sigmoid(self.gate.astype(jnp.float32)))

  def valid(self, ctx: Context) -> tuple[Array | None, Array | None]:
    """(memory_valid [B], long_valid [B, Q]) from windows seen, or Nones without masking."""
    cfg = self.config
    if not cfg.mask_empty_memory:
      return None, None
    seen = ctx.windows_seen(cfg.window_length)
    q, inc = cfg.long_term_memory_tokens, cfg.long_term_memory_increment_size
    memory_valid = (seen > 0) & (not cfg.drops('short_term'))
    long_valid = jnp.arange(q)[None, :] >= q - inc * seen[:, None]
    return memory_valid, long_valid & (not cfg.drops('long_term'))

  # -- one window ----------------------------------------------------------------------------------

  def __call__(self, xu: Array, state: MelodiState, ctx: Context, deterministic: bool):
    """A window `xu: [B, W+S, D]` (context tokens, then summary tokens) -> (next xu, state).

    The next layer gets this layer's context outputs and its next summary tokens; the state gets
    the next window's short-term memory and, in a long-term layer, the FIFO with this window's
    increment pushed.
    """
    w, m = self.config.window_length, self.memory_size
    short = state.short
    if m and self.config.drops('short_term'):  # eval ablation: zero memory, as at a document start
      short = jnp.zeros_like(short)
    keys_in = xu if not m else jnp.concatenate([short.astype(xu.dtype), xu], axis=1)
    a = self.normed_input(keys_in, deterministic)  # [B, M+W+S, D]
    keys, values = self.keys_values(a)
    q = self.queries(a[:, m:])  # [B, W+S, H, K]
    o = self.attend_window(q, keys, values, slice(None), state, ctx, deterministic)
    y = self.residual_mlp(xu, o, deterministic)
    x_out = y[:, :w]
    u_next, state = self.mix_window(x_out, y[:, w:], state, deterministic)
    return jnp.concatenate([x_out, u_next], axis=1), state

  def attend_window(self, q, keys, values, rows, state: MelodiState, ctx, deterministic):
    """Queries `q` (the window rows `rows` of [context; summary]) over [memory; window keys].

    `keys, values: [B, M + N, H, K]`; `rows` a static slice, or [B, Nq] per-row positions.
    Long-term layers gate the result with the cross-attention to the FIFO.
    """
    cfg = self.config
    m = self.memory_size
    bucket, visible = window_geometry(
      cfg.window_length,
      cfg.summary_size,
      m,
      cfg.relative_position_buckets,
      cfg.relative_position_max_distance,
    )
    n = keys.shape[1]
    if isinstance(rows, slice):
      bias = self.position_bias(bucket[rows, :n])
      mask = jnp.asarray(visible[rows, :n])[None, None]
    else:  # per-row query positions [B, Nq]
      bias = jnp.moveaxis(self.relpos_bias[:, jnp.take(jnp.asarray(bucket[:, :n]), rows, 0)], 0, 1)
      mask = jnp.take(jnp.asarray(visible[:, :n]), rows, axis=0)[:, None]
    memory_valid, long_valid = self.valid(ctx)
    if memory_valid is not None and m:
      ok = jnp.concatenate(
        [
          jnp.broadcast_to(memory_valid[:, None], (q.shape[0], m)),
          jnp.ones((q.shape[0], n - m), bool),
        ],
        axis=1,
      )
      mask = mask & ok[:, None, None, :]
    o = self.attention(q, keys, values, bias, mask, deterministic)
    record = cfg.record_attribution and isinstance(rows, slice)
    if record:  # the window's context queries (the scored tokens) over [memory; window]
      w = cfg.window_length
      probs = self.attention_probs(
        q[:, :w], keys, bias._replace(bucket=bias.bucket[:w]), mask[..., :w, :]
      )
      own = attribution.head_masses(probs, [('short_term', slice(0, m)), ('window', slice(m, n))])
    if not self.is_long:
      if record:
        attribution.sow(self, own)
      return o
    cmask = None if long_valid is None else long_valid[:, None, None, :]
    fifo_kv = state.fifo_kv()
    if cfg.drops('long_term'):  # eval ablation: a zero FIFO, as at a document start
      fifo_kv = self.project_kv(jnp.zeros_like(state.fifo), deterministic)
    o_long = self.attention(q, *fifo_kv, None, cmask, deterministic)
    g = jax.nn.sigmoid(self.gate.astype(o.dtype))  # [H, K]
    if record:
      probs = self.attention_probs(q[:, :w], fifo_kv[0], None, cmask)
      long = attribution.head_masses(probs, self.fifo_age_groups())
      share = jnp.mean(jax.nn.sigmoid(self.gate.astype(jnp.float32)), axis=-1)  # [H]
      attribution.sow(self, attribution.mix((own, share), (long, 1.0 - share)))
    return g * o + (1.0 - g) * o_long

  def fifo_age_groups(self) -> list[tuple[str, np.ndarray]]:
    """Attribution groups of the FIFO's slots (oldest first) by the window that wrote them."""
    cfg = self.config
    windows, inc = cfg.long_term_memory_windows, cfg.long_term_memory_increment_size
    age = windows - np.arange(windows * inc) // inc  # slot -> windows ago (newest: 1)
    return [
      (attribution.age_label('long_term', a, b), (age >= a) & (age <= b))
      for a, b in attribution.age_buckets(windows)
    ]

  def with_memory(self, kv: KV, memory_kv: KV | None) -> KV:
    """Prepends the short-term memory's keys/values [B, M, H, K] (if any) to `kv`."""
    if not self.memory_size:
      return kv
    return tuple(jnp.concatenate([m.astype(c.dtype), c], axis=1) for m, c in zip(memory_kv, kv))

  def mix_window(self, x_out: Array, u_out: Array, state: MelodiState, deterministic: bool):
    """Token mixers over a window's outputs: (next summary tokens, state with next memory)."""
    if self.is_long:
      delta = self.long_mixer(x_out, u_out)  # [B, L, D]
      keys, values = self.project_kv(delta, deterministic)
      state = state.replace(
        fifo=state_lib.fifo_push(state.fifo, delta),
        fifo_keys=state_lib.fifo_push(state.fifo_keys, keys),
        fifo_values=state_lib.fifo_push(state.fifo_values, values),
      )
    if not self.memory_size:
      return u_out, state
    branching = self.config.summary_branching
    if branching == 'separate':
      u_next, z = self.summary_mixer(x_out, u_out), self.memory_mixer(x_out, u_out)
    else:  # No branching: the next window's memory is the next layer's summary.
      u_next = z = u_out if branching == 'none' else self.summary_mixer(x_out, u_out)
    return u_next, state.replace(short=z.astype(state.short.dtype))

  # -- incremental decoding ------------------------------------------------------------------------

  def decode_state(self, state: MelodiState, batch: int) -> MelodiState:
    """The decode state of a training carry: memory keys/values added, the window empty."""
    spec = self.state_spec(True)
    fresh = state_lib.zeros(spec, batch)
    new = fresh.replace(short=state.short, fifo=state.fifo)
    new = new.replace(fifo_keys=state.fifo_keys, fifo_values=state.fifo_values)
    if self.memory_size:
      keys, values = self.project_kv(state.short, True)
      new = new.replace(short_keys=keys, short_values=values)
    return jax.tree_util.tree_map(lambda a, s: a.astype(s.dtype), new, fresh)

  def decode(self, x: Array, state: MelodiState, ctx: Context):
    """Context tokens `x: [B, N, D]` at window positions `tokens_seen % W + 0..N-1`.

    Each attends to the memory and to the window's context tokens before it, exactly as in
    `__call__` (context tokens never see the summary tokens). Slots of the window at or after the
    position are ignored and overwritten.
    """
    w = self.config.window_length
    position = ctx.tokens_seen % w
    a = self.normed_input(x, True)
    keys, values = self.keys_values(a)
    context = (
      state_lib.write_rows(state.context_keys, keys, position),
      state_lib.write_rows(state.context_values, values, position),
    )
    rows = position[:, None] + jnp.arange(x.shape[1])  # [B, N] query positions in the window
    k, v = self.with_memory(context, state.short_kv())
    o = self.attend_window(self.queries(a), k, v, rows, state, ctx, True)
    y = self.residual_mlp(x, o, True)
    outputs = state_lib.write_rows(state.context_outputs, y, position)
    return y, state.replace(
      context_keys=context[0], context_values=context[1], context_outputs=outputs
    )

  def end_window(self, u: Array, state: MelodiState, ctx: Context):
    """The summary tokens `u: [B, S, D]` over the complete cached window, then the mixers.

    Returns the next layer's summary tokens and the state with the next memory.
    """
    w = self.config.window_length
    a = self.normed_input(u, True)
    ku, vu = self.keys_values(a)
    kv = (
      jnp.concatenate([state.context_keys, ku], axis=1),
      jnp.concatenate([state.context_values, vu], axis=1),
    )
    k, v = self.with_memory(kv, state.short_kv())
    o = self.attend_window(self.queries(a), k, v, slice(w, None), state, ctx, True)
    u_next, new = self.mix_window(state.context_outputs, self.residual_mlp(u, o, True), state, True)
    if self.memory_size:
      keys, values = self.project_kv(new.short, True)
      new = new.replace(short_keys=keys, short_values=values)
    return u_next, new


# ---------------------------------------------------------------------------------------------
# The decoder and its record.
# ---------------------------------------------------------------------------------------------


class MelodiDecoder(Decoder):
  """MELODI decoder-only LM: the windows in order, every layer on [window; summary tokens]."""

  config: MelodiConfig
  window_major = True

  def layout(self):
    return tuple((f'layers_{i}', MelodiLayer) for i in range(self.config.num_layers))

  def setup_extra(self):
    cfg = self.config
    init = nn.initializers.truncated_normal(stddev=0.25)
    self.summary_embeddings = token_table(self, 'summary_embeddings', cfg.summary_size, init)

  def summary_tokens(self, like: Array) -> Array:
    """The learned summary tokens for every row: [B, S, D] in `like`'s dtype."""
    s = self.summary_embeddings.astype(like.dtype)[None]
    return jnp.broadcast_to(s, (like.shape[0], *s.shape[1:]))

  def block_tokens(self, x: Array) -> Array:
    """A window `x: [B, W, D]` and the summary tokens: [B, W+S, D]."""
    return jnp.concatenate([x, self.summary_tokens(x)], axis=1)

  def report(self, deterministic: bool) -> None:
    del deterministic
    cfg = self.config
    if cfg.long_term_memory_layers and not self.is_initializing():
      gates = [self.stack[i].gate_mean() for i in cfg.long_term_memory_layers]
      self.sow('intermediates', 'long_term_gate', jnp.mean(jnp.stack(gates)))

  def prefill_windows(self, tokens: Array, states: list, ctx: Context):
    """The prompt's complete windows through the training path (per row: the windows its prompt
    covers), the rest of it through `MelodiLayer.decode`."""
    w = self.config.window_length
    batch, length = tokens.shape
    n = length // w
    outputs = []
    if n:
      complete = window_flags(n * w, w, ctx.lengths)  # [n, B]
      y, states = self.scan_windows(self.embed(tokens[:, : n * w]), states, ctx, True, complete)
      outputs.append(y)
    states = [layer.decode_state(s, batch) for layer, s in zip(self.stack, states)]
    start = ctx.lengths // w * w  # the window holding the rest of the prompt
    x = self.embed(state_lib.slice_rows(tokens, start, w))
    rest = Context(ctx.tokens_seen + start)
    for i, layer in enumerate(self.stack):
      x, states[i] = layer.decode(x, states[i], rest)
    return jnp.concatenate([*outputs, x[:, : length - n * w]], axis=1), states

  def after_decode(self, states: list, ctx: Context) -> list:
    """Rows whose window the token completed: the summary pass writes their next memory."""
    done = ctx.tokens_seen % self.config.window_length == 0
    before = Context(ctx.tokens_seen - 1)
    new = nn.cond(jnp.any(done), _summary_pass, lambda _, s, __: s, self, states, before)
    return state_lib.select_rows(done, new, states)


def _summary_pass(module: MelodiDecoder, states: list, ctx: Context) -> list:
  """Summary tokens over every layer's cached window, then the next memory (every row)."""
  u = module.summary_tokens(states[0].context_outputs)
  new = []
  for layer, s in zip(module.stack, states):
    u, s = layer.end_window(u, s, ctx)
    new.append(s)
  return new


def memory_components(cfg: MelodiConfig) -> list[MemoryComponent]:
  d = cfg.embed_dim
  short_layers = [i for i in range(cfg.num_layers) if cfg.short_memory_size(i)]
  short = sum(cfg.short_memory_size(i) * d for i in short_layers)
  parts = [
    MemoryComponent(
      'short-term memory',
      f'{len(short_layers)} layers x {cfg.short_term_memory_size} tokens x d',
      short,
      short,
    )
  ]
  n_long = len(cfg.long_term_memory_layers)
  if n_long:
    q = cfg.long_term_memory_tokens
    parts.append(
      MemoryComponent(
        'long-term memory',
        f'{n_long} layer(s) x {cfg.long_term_memory_windows} windows x '
        f'{cfg.long_term_memory_increment_size} tokens x (keys + values)',
        n_long * q * kv_width(cfg),
        n_long * q * d,
        note='stored as token embeddings (d per token); keys and values recomputed per segment',
      )
    )
  return parts


def train_flops(cfg: MelodiConfig, batch: int, length: int) -> dict[str, float]:
  """Train-step FLOPs of MELODI on `batch` rows of a `length`-token segment, by term.

  Terms (each already x 3 for forward + backward):
    dense: 6 x (block matmul weights of every layer + the tied output embedding V x D) x tokens.
    summary_tokens: the S summary tokens of each window run through every layer's Q, K, V, out
      and MLP like context tokens: 6 x layers x S x block weights, per window.
    memory_keys: the M short-term memory tokens of a layer get keys and values: 6 x M x 2 x D x HK
      per window and memory layer.
    attention: per window and layer, queries [W+S] x keys [M+W+S]: 2 x 2 x (W+S)(M+W+S) HK
      (logits and weighted values), x 3.
    mixers: per window and memory layer, the summary and memory token mixers map W+S tokens to
      S and M tokens: 2 x (W+S)(S+M) D, x 3.
    long_term: per window and long-term layer, cross-attention of W+S queries to the Q FIFO
      tokens (2 x 2 x (W+S) Q HK), the long mixer (W+S -> L tokens: 2 x (W+S) L D) and the keys
      and values of the L new tokens (2 x 2 x L D HK); per segment, the keys and values of the
      FIFO read from memory (2 x 2 x Q D HK). All x 3.
  """
  d, hk = cfg.embed_dim, cfg.num_heads * cfg.head_dim
  w, s = cfg.window_length, cfg.summary_size
  windows = cfg.num_windows(length) * batch
  tokens = batch * length
  f = TRAIN_FACTOR * 2  # 2 FLOPs per multiply-add, x 3 for the train step
  terms = dict.fromkeys(
    ('dense', 'summary_tokens', 'memory_keys', 'attention', 'mixers', 'long_term'), 0.0
  )
  terms['dense'] = f * tokens * (cfg.num_layers * layer_matmul_params(cfg) + cfg.vocab_size * d)
  terms['summary_tokens'] = f * windows * cfg.num_layers * s * layer_matmul_params(cfg)
  q_fifo, inc = cfg.long_term_memory_tokens, cfg.long_term_memory_increment_size
  for layer in range(cfg.num_layers):
    m = cfg.short_memory_size(layer)
    nq, nk = w + s, m + w + s
    terms['memory_keys'] += f * windows * m * 2 * d * hk
    terms['attention'] += f * windows * 2 * nq * nk * hk
    if m:
      terms['mixers'] += f * windows * nq * (s + m) * d
    if cfg.is_long_term_layer(layer):
      per_window = 2 * nq * q_fifo * hk + nq * inc * d + 2 * inc * d * hk
      terms['long_term'] += f * (windows * per_window + batch * 2 * q_fifo * d * hk)
  return terms


def recompute_flops(cfg: MelodiConfig, batch: int, length: int) -> float:
  """Every attention's logits, and the long-term cross-attention's (2 x (W+S) x Q x HK/window)."""
  extra = attention_recompute_flops(train_flops(cfg, batch, length))
  nq = cfg.window_length + cfg.summary_size
  windows = cfg.num_windows(length) * batch
  long_layers = sum(cfg.is_long_term_layer(i) for i in range(cfg.num_layers))
  hk = cfg.num_heads * cfg.head_dim
  return extra + 2 * windows * long_layers * nq * cfg.long_term_memory_tokens * hk


ARCHITECTURE = Architecture.from_module(
  'melodi', MelodiConfig, MelodiDecoder, 'gin/models/melodi_base.gin', globals()
)
