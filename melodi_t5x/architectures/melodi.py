"""MELODI decoder (Chen et al., ICLR 2025) as Flax linen modules.

Reads top-down: helpers (window geometry), blocks (token mixer, one MELODI layer), then the
decoder that embeds a segment, scans its windows and produces logits. Norm, dense, T5 buckets and
cosine attention are shared with the baselines (`melodi_t5x.layers`).

Semantics follow the authors' code (google-research/meliad cc1aef5, `memory2/melodi_*.py`); see
README "Deviations" for the few places where we chose otherwise. Notation:
  B batch rows, T segment length, W window, S summary tokens, M short-term memory tokens,
  Q long-term FIFO tokens, L long-term increment, D embed dim, H heads, K head dim, V vocab.

Memory lives in the `memory` collection (see `memory.py`): per layer the short-term memory
`Z: [B, M, D]`, per long-term layer the FIFO of token embeddings `[B, Q, D]` (oldest first), and a
per-row count of windows seen since the document start.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax.linen import partitioning

from melodi_t5x import decoding, memory
from melodi_t5x.architectures import melodi_decoding
from melodi_t5x.config import MelodiConfig
from melodi_t5x.layers import (
  ATTENTION_OUTPUT,
  RMSNorm,
  TransformerBlock,
  dense_init,
  embedding_param,
  layer_class,
  param,
  segment_inputs,
  t5_bucket,
  tied_logits,
)

Array = jax.Array
# Residual policy of remat='none': keep the outputs of the projections (dense layers, token
# mixers) and of each attention, recompute everything elementwise from them in the backward pass.
SAVE_MATMUL_OUTPUTS = jax.checkpoint_policies.save_from_both_policies(
  jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
  jax.checkpoint_policies.save_only_these_names(ATTENTION_OUTPUT),
)


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


class MelodiLayer(TransformerBlock):
  """One MELODI layer applied to one window (short-term, long-term or memory-free)."""

  config: MelodiConfig
  index: int

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

  def project_kv(self, tokens: Array, deterministic: bool) -> tuple[Array, Array]:
    """Normalised keys and values of `tokens: [B, N, D]` -> ([B, N, H, K], [B, N, H, K])."""
    return self.keys_values(self.normed_input(tokens, deterministic))

  def gate_mean(self) -> Array:
    """Mean weight sigma(g) given to self-attention (vs. long-term memory); a diagnostic."""
    return jnp.mean(jax.nn.sigmoid(self.gate.astype(jnp.float32)))

  def __call__(
    self,
    x: Array,
    u: Array,
    z: Array | None,
    long_kv: tuple[Array, Array] | None,
    memory_valid: Array | None,
    long_valid: Array | None,
    deterministic: bool,
  ):
    """Processes one window.

    Args:
      x: [B, W, D] context tokens; u: [B, S, D] summary tokens.
      z: [B, M, D] short-term memory of the previous window, or None (memory-free layer).
      long_kv: keys and values [B, Q, H, K] of the long-term FIFO, or None.
      memory_valid: [B] bool, whether z holds data (only when masking empty memory).
      long_valid: [B, Q] bool, FIFO slots holding data (only when masking empty memory).
      deterministic: disables dropout.

    Returns:
      x: [B, W, D], u: [B, S, D] for the next layer; z: [B, M, D] for the next window (or None);
      delta: [B, L, D] tokens to append to the long-term FIFO (or None).
    """
    cfg = self.config
    w, s, m = x.shape[1], u.shape[1], self.memory_size
    xu = jnp.concatenate([x, u], axis=1)  # [B, W+S, D]
    keys_in = xu if z is None else jnp.concatenate([z.astype(xu.dtype), xu], axis=1)
    a = self.normed_input(keys_in, deterministic)  # [B, M+W+S, D]
    k, v = self.keys_values(a)
    q = self.queries(a[:, m:])  # [B, W+S, H, K]

    bucket, visible = window_geometry(
      w, s, m, cfg.relative_position_buckets, cfg.relative_position_max_distance
    )
    mask = jnp.asarray(visible)[None, None]
    if memory_valid is not None and m:
      key_ok = jnp.concatenate(
        [
          jnp.broadcast_to(memory_valid[:, None], (x.shape[0], m)),
          jnp.ones((x.shape[0], w + s), bool),
        ],
        axis=1,
      )
      mask = mask & key_ok[:, None, None, :]
    o = self.attention(q, k, v, self.position_bias(bucket), mask, deterministic)  # [B, W+S, H, K]
    o = self.with_long_term(q, o, long_kv, long_valid, deterministic)

    y = self.residual_mlp(xu, o, deterministic)
    x_out, u_out = y[:, :w], y[:, w:]
    return (x_out, *self.mix_window(x_out, u_out))

  def with_long_term(self, q, o, long_kv, long_valid, deterministic: bool) -> Array:
    """Long-term layers: gates self-attention `o` with cross-attention of `q` to the FIFO."""
    if not self.is_long:
      return o
    cmask = None if long_valid is None else long_valid[:, None, None, :]
    o_long = self.attention(q, *long_kv, None, cmask, deterministic)
    g = jax.nn.sigmoid(self.gate.astype(o.dtype))  # [H, K]
    return g * o + (1.0 - g) * o_long

  def mix_window(self, x_out: Array, u_out: Array):
    """Token mixers over a window's outputs: (next summary tokens, next z or None, delta)."""
    delta = self.long_mixer(x_out, u_out) if self.is_long else None
    if not self.memory_size:
      return u_out, None, delta
    branching = self.config.summary_branching
    if branching == 'separate':
      return self.summary_mixer(x_out, u_out), self.memory_mixer(x_out, u_out), delta
    # No branching: the next window's memory is the next layer's summary.
    u_next = u_out if branching == 'none' else self.summary_mixer(x_out, u_out)
    return u_next, u_next, delta

  # -- incremental decoding: the window's context tokens one call at a time, then its summary --

  def _memory_mask(self, mask: Array, memory_valid: Array | None) -> Array:
    """Hides the memory keys (the first M) of rows whose memory is empty (`mask_empty_memory`)."""
    if memory_valid is None or not self.memory_size:
      return mask
    n = mask.shape[-1] - self.memory_size
    ok = jnp.concatenate(
      [
        jnp.broadcast_to(memory_valid[:, None], (memory_valid.shape[0], self.memory_size)),
        jnp.ones((memory_valid.shape[0], n), bool),
      ],
      axis=1,
    )
    return mask & ok[:, None, None, :]

  def _with_memory(self, kv: tuple[Array, Array], memory_kv) -> tuple[Array, Array]:
    """Prepends the memory keys/values [B, M, H, K] (if any) to `kv`."""
    if not self.memory_size:
      return kv
    return tuple(jnp.concatenate([m.astype(c.dtype), c], axis=1) for m, c in zip(memory_kv, kv))

  def context_step(self, x, position, context_kv, memory_kv, long_kv, memory_valid, long_valid):
    """Context tokens `x: [B, N, D]` at window positions `position[b] + 0..N-1`.

    Each attends to the memory and to the window's context tokens before it, exactly as in
    `__call__` (context tokens never see the summary tokens), so the window can be read a few
    tokens at a time.

    Args:
      x: [B, N, D] inputs of this layer; position: [B] window position of x[:, 0].
      context_kv: keys and values [B, W, H, K] of the window's context tokens so far (slots at or
        after `position` are ignored and overwritten).
      memory_kv: keys and values [B, M, H, K] of the short-term memory (None without memory).
      long_kv: keys and values [B, Q, H, K] of the long-term FIFO (long-term layers).
      memory_valid, long_valid: as in `__call__` (None unless masking empty memory).

    Returns:
      y: [B, N, D] outputs; the updated context keys and values.
    """
    cfg = self.config
    w, m = cfg.window_length, self.memory_size
    a = self.normed_input(x, True)
    q = self.queries(a)
    context_kv = tuple(
      decoding.write_rows(c, new, position) for c, new in zip(context_kv, self.keys_values(a))
    )
    bucket, visible = window_geometry(
      w, cfg.summary_size, m, cfg.relative_position_buckets, cfg.relative_position_max_distance
    )
    rows = position[:, None] + jnp.arange(x.shape[1])  # [B, N] query positions in the window
    bucket = jnp.take(jnp.asarray(bucket[:w, : m + w]), rows, axis=0)  # [B, N, M+W]
    mask = jnp.take(jnp.asarray(visible[:w, : m + w]), rows, axis=0)[:, None]
    bias = jnp.moveaxis(self.relpos_bias[:, bucket], 0, 1)  # [B, H, N, M+W]
    k, v = self._with_memory(context_kv, memory_kv)
    o = self.attention(q, k, v, bias, self._memory_mask(mask, memory_valid), True)
    o = self.with_long_term(q, o, long_kv, long_valid, True)
    return self.residual_mlp(x, o, True), context_kv

  def summary_step(self, x_out, u, context_kv, memory_kv, long_kv, memory_valid, long_valid):
    """The summary tokens `u: [B, S, D]` of a complete window, then the token mixers.

    Args:
      x_out: [B, W, D] this layer's outputs for the window's context tokens.
      u: [B, S, D] summary tokens entering this layer.
      context_kv: keys and values [B, W, H, K] of the window's context tokens.
      memory_kv, long_kv, memory_valid, long_valid: as in `context_step`.

    Returns:
      As `__call__` without x: the next layer's summary tokens, z for the next window (or None),
      the long-term increment (or None).
    """
    cfg = self.config
    w, s, m = cfg.window_length, u.shape[1], self.memory_size
    a = self.normed_input(u, True)
    q = self.queries(a)
    ku, vu = self.keys_values(a)
    k, v = self._with_memory(
      tuple(jnp.concatenate([c, n], axis=1) for c, n in zip(context_kv, (ku, vu))), memory_kv
    )
    bucket, visible = window_geometry(
      w, s, m, cfg.relative_position_buckets, cfg.relative_position_max_distance
    )
    mask = self._memory_mask(jnp.asarray(visible[w:])[None, None], memory_valid)
    o = self.attention(q, k, v, self.position_bias(bucket[w:]), mask, True)
    o = self.with_long_term(q, o, long_kv, long_valid, True)
    return self.mix_window(x_out, self.residual_mlp(u, o, True))


# ---------------------------------------------------------------------------------------------
# The decoder.
# ---------------------------------------------------------------------------------------------


def _valid_memory(cfg: MelodiConfig, seen: Array) -> tuple[Array | None, Array | None]:
  """(memory_valid [B], long_valid [B, Q]) from windows seen, or Nones without masking."""
  if not cfg.mask_empty_memory:
    return None, None
  q, inc = cfg.long_term_memory_tokens, cfg.long_term_memory_increment_size
  return seen > 0, jnp.arange(q)[None, :] >= q - inc * seen[:, None]


def _window_step(module: MelodiDecoder, carry, x: Array, deterministic: bool):
  """Runs every layer on one window. carry = (short, long, windows_seen); x: [B, W, D]."""
  cfg = module.config
  short, long, seen = carry
  short, long = dict(short), dict(long)
  batch = x.shape[0]
  u = jnp.broadcast_to(
    module.summary_embeddings.astype(x.dtype)[None], (batch, cfg.summary_size, cfg.embed_dim)
  )
  memory_valid, long_valid = _valid_memory(cfg, seen)
  for i, layer in enumerate(module.layers):
    kv = long[i][1:] if i in long else None
    x, u, z, delta = layer(x, u, short.get(i), kv, memory_valid, long_valid, deterministic)
    if z is not None:
      short[i] = z
    if delta is not None:
      dk, dv = layer.project_kv(delta, deterministic)
      n = delta.shape[1]
      long[i] = tuple(
        jnp.concatenate([old[:, n:], new.astype(old.dtype)], axis=1)
        for old, new in zip(long[i], (delta, dk, dv))
      )
  return (short, long, seen + 1), x


class MelodiDecoder(nn.Module):
  """MELODI decoder-only LM with the call signature of `t5x.models.DecoderOnlyModel`."""

  config: MelodiConfig

  def setup(self):
    cfg = self.config
    d = cfg.embed_dim
    self.embedding = embedding_param(self, cfg)
    self.summary_embeddings = param(
      self,
      'summary_embeddings',
      nn.initializers.truncated_normal(stddev=0.25),
      (cfg.summary_size, d),
      ('summary', 'embed'),
      cfg.param_dtype,
    )
    layer = layer_class(MelodiLayer, cfg, deterministic_argnum=7, in_scan=True)
    self.layers = [layer(cfg, i) for i in range(cfg.num_layers)]
    self.final_norm = RMSNorm(cfg)
    self.dropout = nn.Dropout(cfg.dropout_rate)
    self.short_memory = {
      str(i): memory.CarriedState((cfg.short_memory_size(i), d), ('memory_length', 'embed'))
      for i in range(cfg.num_layers)
      if cfg.short_memory_size(i)
    }
    self.long_memory = {
      str(i): memory.CarriedState((cfg.long_term_memory_tokens, d), ('memory_length', 'embed'))
      for i in cfg.long_term_memory_layers
    }
    self.windows_seen = memory.CarriedState((), (), jnp.int32)
    self.decode_state = decoding.DecodeCache(melodi_decoding.cache_specs(cfg))

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

    `start_of_sequence: [B]` marks rows whose document starts with this segment (their memory is
    reset); None resets every row. Memory is read from and, when the `memory` collection is
    mutable, written to the `memory` collection. Targets, positions and causal-attention flags
    are accepted for T5X compatibility; MELODI's attention pattern is fixed by the windows.

    Incremental decoding (T5X's convention, state in the `cache` collection): `prefill=True`
    reads a prompt (see `prefill`), `decode=True` one token per call (see `decode_step`).
    """
    del decoder_target_tokens, decoder_positions, decoder_causal_attention, max_decode_length
    if prefill:
      return self.prefill(decoder_input_tokens, prefill_lengths, start_of_sequence)
    if decode:
      return self.decode_step(decoder_input_tokens)
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    tokens, sos = segment_inputs(cfg, decoder_input_tokens, decoder_segment_ids, start_of_sequence)
    batch, length = tokens.shape
    num_windows = cfg.num_windows(length)
    deterministic = not enable_dropout

    x = jnp.take(self.embedding, tokens, axis=0).astype(dtype)  # [B, T, D]
    x = partitioning.with_sharding_constraint(x, ('batch', 'length', 'embed'))
    carry = self._start_segment(sos, deterministic, dtype)
    windows = x.reshape(batch, num_windows, cfg.window_length, -1).swapaxes(0, 1)  # [N, B, W, D]
    step = functools.partial(_window_step, deterministic=deterministic)
    if cfg.remat == 'window':
      # The backward pass keeps each window's carry and input, and recomputes the step.
      step = nn.remat(step, prevent_cse=False)
    elif cfg.remat == 'none':
      # No matmul is recomputed: the backward pass keeps every projection's output (the matmuls
      # without batch dimensions) and recomputes only what is elementwise (norms, ReLU, the
      # float32 upcasts) and, in `layers.recomputed_attention`, the attention logits.
      step = nn.remat(step, prevent_cse=False, policy=SAVE_MATMUL_OUTPUTS)
    scan = nn.scan(
      step,
      variable_broadcast=['params', 'params_axes'],
      split_rngs={'params': False, 'dropout': True},
      length=num_windows,
    )
    carry, windows = scan(self, carry, windows)
    self._end_segment(carry)

    y = windows.swapaxes(0, 1).reshape(batch, length, -1)
    y = self.dropout(self.final_norm(y), deterministic=deterministic)
    logits = tied_logits(y, self.embedding, cfg)
    if cfg.long_term_memory_layers and not self.is_initializing():
      gates = [self.layers[i].gate_mean() for i in cfg.long_term_memory_layers]
      self.sow('intermediates', 'long_term_gate', jnp.mean(jnp.stack(gates)))
    return logits

  def _start_segment(self, sos: Array, deterministic: bool, dtype):
    """Reads the carried memory (reset where `sos`) and precomputes the FIFO keys/values."""
    short = {int(i): s.start_segment(sos).astype(dtype) for i, s in self.short_memory.items()}
    long = {}
    for i, state in self.long_memory.items():
      fifo = state.start_segment(sos).astype(dtype)  # [B, Q, D]
      long[int(i)] = (fifo, *self.layers[int(i)].project_kv(fifo, deterministic))
    return short, long, self.windows_seen.start_segment(sos)

  def _end_segment(self, carry) -> None:
    short, long, seen = carry
    for i, state in self.short_memory.items():
      state.end_segment(short[int(i)])
    for i, state in self.long_memory.items():
      state.end_segment(long[int(i)][0])
    self.windows_seen.end_segment(seen)

  # -- incremental decoding (melodi_decoding.py) ------------------------------------------------

  def prefill(self, tokens: Array, lengths: Array | None, start_of_sequence: Array | None):
    """Reads a prompt into the `cache` collection: `melodi_decoding.prefill`."""
    return melodi_decoding.prefill(self, tokens, lengths, start_of_sequence)

  def decode_step(self, tokens: Array) -> Array:
    """Logits [B, 1, V] after one token per row: `melodi_decoding.decode_step`."""
    return melodi_decoding.decode_step(self, tokens)
