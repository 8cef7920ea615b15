"""Building blocks shared by every architecture of the project (MELODI and the baselines).

Reads top-down: relative positions, attention, then the parameter helper and the small modules
(RMS norm, dense with logical axes). Every module takes the architecture's frozen config (any
`config.BaseConfig`) and reads only its `dtype` and `param_dtype`.

Conventions (those of the authors' code, google-research/meliad cc1aef5): cosine attention, i.e.
queries and keys L2-normalised per head, logits `|temperature| * (q.k + bias)`, masked logits set
to -1e6 and a softmax whose normaliser has an extra `exp(-1000 - max)` term, so that a row with
every key masked attends to nothing. Notation: B batch, N keys, H heads, K head dim, D embed dim.
"""

from __future__ import annotations

import functools
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax.linen import partitioning
from jax.ad_checkpoint import checkpoint_name

from melodi_t5x import state as state_lib
from melodi_t5x.state import CACHE, MEMORY

Array = jax.Array
KV = tuple[Array, Array]  # (keys, values), each [B, N, H, K]
MASKED = -1_000_000.0  # Logit of a masked key.
FLOOR = -1000.0  # Softmax floor: a row with every key masked attends to nothing.
EPS = 1e-6
dense_init = nn.initializers.variance_scaling(1.0, 'fan_in', 'truncated_normal')
relpos_init = nn.initializers.variance_scaling(1.0, 'fan_in', 'normal', out_axis=0)


# ---------------------------------------------------------------------------------------------
# Relative positions and attention.
# ---------------------------------------------------------------------------------------------


def t5_bucket(distance: np.ndarray, num_buckets: int, max_distance: int) -> np.ndarray:
  """Unidirectional T5 bucket of `distance` = query position - key position (>= 0 kept)."""
  n = np.maximum(distance, 0)
  max_exact = num_buckets // 2
  log_ratio = np.log(n.astype(np.float32) / max_exact + np.finfo(np.float32).eps)
  large = max_exact + (log_ratio / np.log(max_distance / max_exact) * (num_buckets - max_exact))
  large = np.minimum(large.astype(np.int32), num_buckets - 1)
  return np.where(n < max_exact, n, large).astype(np.int32)


def l2_normalize(x: Array) -> Array:
  """Normalises the last axis (one attention head): x / sqrt(sum x^2 + 1e-6)."""
  return x * jax.lax.rsqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True) + EPS)


def attention_logits(
  q: Array, k: Array, temperature: Array, bias: Array | None, mask: Array | None
) -> Array:
  """Cosine-attention logits |temperature| * (q.k + bias), masked keys at -1e6.

  Args:
    q: [B, Nq, H, K] and k: [B, Nk, H, K], L2-normalised per head.
    temperature: [H].
    bias: broadcastable to [B, H, Nq, Nk] (e.g. [H, Nq, Nk]), or None.
    mask: broadcastable to [B, H, Nq, Nk], True = visible, or None.

  Returns:
    Logits [B, H, Nq, Nk] (float32).
  """
  logits = jnp.einsum('bqhk,bnhk->bhqn', q, k, preferred_element_type=jnp.float32)
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  logits = logits * jnp.abs(temperature.astype(jnp.float32))[:, None, None]
  if mask is not None:
    logits = jnp.where(mask, logits, MASKED)
  return logits


def safe_softmax(logits: Array) -> Array:
  """Softmax over the last axis with an extra exp(-1000 - max) term in the normaliser.

  Equals an ordinary softmax for a row with an unmasked key; a fully masked row sums to 0.
  """
  top = jax.lax.stop_gradient(jnp.maximum(jnp.max(logits, axis=-1, keepdims=True), FLOOR))
  weights = jnp.exp(logits - top)
  return weights / (jnp.sum(weights, axis=-1, keepdims=True) + jnp.exp(FLOOR - top))


def attend(
  q: Array, k: Array, v: Array, temperature: Array, bias: Array | None, mask: Array | None
) -> Array:
  """Attention probabilities [B, H, Nq, Nk] (float32) of `attention_logits` (same arguments).

  A row whose keys are all masked sums to 0.
  """
  del v  # The caller applies the probabilities (possibly after dropout).
  return safe_softmax(attention_logits(q, k, temperature, bias, mask))


def apply_attention(probs: Array, v: Array) -> Array:
  """probs: [B, H, Nq, Nk], v: [B, Nk, H, K] -> [B, Nq, H, K] in v's dtype."""
  return jnp.einsum('bhqn,bnhk->bqhk', probs.astype(v.dtype), v)


# Name of `recomputed_attention`'s output for `jax.checkpoint` policies.
ATTENTION_OUTPUT = 'attention_output'


class PositionBias(NamedTuple):
  """A T5 relative-position bias given by its table and static buckets (gathered when used)."""

  # The layer's table [H, buckets].
  table: Array
  # Static bucket of every (query, key) pair, e.g. [Nq, Nk] (numpy: part of the program).
  bucket: np.ndarray


def _attention_core(q, k, v, temperature, bias, mask, dropout_rng, *, rate: float, bucket):
  """Attention output of `attend` with dropout on the probabilities (flax `nn.Dropout`'s maths)."""
  if bucket is not None:
    bias = bias[:, bucket]
  probs = attend(q, k, v, temperature, bias, mask)
  if dropout_rng is not None:
    keep_prob = 1.0 - rate
    keep = jax.random.bernoulli(dropout_rng, p=keep_prob, shape=probs.shape)
    probs = jax.lax.select(keep, probs / keep_prob, jnp.zeros_like(probs))
  return apply_attention(probs, v)


def recomputed_attention(
  q: Array,
  k: Array,
  v: Array,
  temperature: Array,
  bias: Array | PositionBias | None,
  mask: Array | None,
  dropout_rng: Array | None = None,
  rate: float = 0.0,
) -> Array:
  """`apply_attention(dropout(attend(...)), v)` whose probabilities are not kept for the backward.

  The logits, probabilities and dropout mask `[B, H, Nq, Nk]` (float32) are the largest
  activations of every architecture; a train step that kept them for the backward pass would hold
  them for every layer and window. Here the backward pass recomputes them from what it keeps
  anyway (q, k, v, the bias table, the mask, the dropout key): one extra `q . k` matmul per
  attention (`melodi_t5x.tools.flops.recompute_flops`), the same float32 softmax, the same
  dropout mask. Forward values and gradients are those of the plain computation.

  Args:
    q, k, v, temperature, mask: as in `attend`.
    bias: as in `attend`, or a `PositionBias` (its gather is recomputed too).
    dropout_rng: key of the attention dropout (None: no dropout).
    rate: attention dropout rate (used with `dropout_rng`).
  """
  bucket = None
  if isinstance(bias, PositionBias):
    bias, bucket = bias.table, bias.bucket
  core = functools.partial(_attention_core, rate=float(rate), bucket=bucket)
  out = jax.checkpoint(core)(q, k, v, temperature, bias, mask, dropout_rng)
  # Named, so that an enclosing remat policy can keep it (`ATTENTION_OUTPUT`) instead of
  # recomputing the whole attention to get it back.
  return checkpoint_name(out, ATTENTION_OUTPUT)


# ---------------------------------------------------------------------------------------------
# Parameters and small modules.
# ---------------------------------------------------------------------------------------------


def param(module: nn.Module, name: str, init, shape, axes, dtype: str):
  """A parameter with logical axis names (`flax.linen.partitioning`)."""
  return partitioning.param_with_axes(name, init, shape, jnp.dtype(dtype), axes=axes, module=module)


def token_table(module: nn.Module, name: str, rows: int, init) -> Array:
  """A learned table of `rows` token vectors `[rows, D]` (summary tokens, recurrent states)."""
  cfg = module.config
  return param(module, name, init, (rows, cfg.embed_dim), ('summary', 'embed'), cfg.param_dtype)


class RMSNorm(nn.Module):
  """RMS normalisation (no mean, no bias) with a learned scale; statistics in float32."""

  config: object  # any config.BaseConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = param(
      self, 'scale', nn.initializers.ones, (x.shape[-1],), ('embed',), self.config.param_dtype
    )
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + EPS)
    return (y * scale.astype(jnp.float32)).astype(jnp.dtype(self.config.dtype))


class Dense(nn.Module):
  """y = x @ kernel (+ bias) over the last axis, with logical axis names on the kernel."""

  features: int
  axes: tuple[str, str]
  config: object  # any config.BaseConfig
  use_bias: bool = False

  @nn.compact
  def __call__(self, x: Array) -> Array:
    dtype, pdtype = jnp.dtype(self.config.dtype), self.config.param_dtype
    kernel = param(self, 'kernel', dense_init, (x.shape[-1], self.features), self.axes, pdtype)
    y = jnp.dot(x.astype(dtype), kernel.astype(dtype))
    if self.use_bias:
      bias = param(self, 'bias', nn.initializers.zeros, (self.features,), self.axes[1:], pdtype)
      y = y + bias.astype(dtype)
    return y


class TransformerBlock(nn.Module):
  """Parameters and maths of a pre-norm attention + ReLU MLP layer, shared by every layer kind.

  Subclasses decide which tokens are queries, keys and values and how attention is masked; this
  class owns the projections (`attn_norm`, `query`, `key`, `value`, `temperature`, optional
  `relpos_bias`, `out`) and the residual MLP (`ffn_norm`, `ffn_in`, `ffn_out`). Biases in the MLP
  follow `config.ffn_bias`.
  """

  config: object  # any config.BaseConfig

  # Whether this layer owns a T5 relative-position table (overridden by layers without positions).
  has_relpos: ClassVar[bool] = True
  # Whether this layer has the residual MLP (False for blocks that end after the attention output).
  has_ffn: ClassVar[bool] = True

  def setup(self):
    self.setup_block()

  def setup_block(self):
    cfg = self.config
    hk = cfg.num_heads * cfg.head_dim
    self.attn_norm = RMSNorm(cfg)
    self.query = Dense(hk, ('embed', 'joined_kv'), cfg)
    self.key = Dense(hk, ('embed', 'joined_kv'), cfg)
    self.value = Dense(hk, ('embed', 'joined_kv'), cfg)
    self.temperature = param(
      self, 'temperature', nn.initializers.ones, (cfg.num_heads,), ('heads',), 'float32'
    )
    if self.has_relpos:
      self.relpos_bias = param(
        self,
        'relpos_bias',
        relpos_init,
        (cfg.num_heads, cfg.relative_position_buckets),
        ('heads', 'relpos_buckets'),
        cfg.param_dtype,
      )
    self.out = Dense(cfg.embed_dim, ('joined_kv', 'embed'), cfg)
    if self.has_ffn:
      self.ffn_norm = RMSNorm(cfg)
      self.ffn_in = Dense(cfg.mlp_dim, ('embed', 'mlp'), cfg, use_bias=cfg.ffn_bias)
      self.ffn_out = Dense(cfg.embed_dim, ('mlp', 'embed'), cfg, use_bias=cfg.ffn_bias)
    self.dropout = nn.Dropout(cfg.dropout_rate)
    self.attn_dropout = nn.Dropout(cfg.attention_dropout_rate)

  def heads(self, x: Array) -> Array:
    """[..., H*K] -> [..., H, K]."""
    return x.reshape(*x.shape[:-1], self.config.num_heads, self.config.head_dim)

  def normed_input(self, x: Array, deterministic: bool) -> Array:
    """RMSNorm before attention, then dropout: [B, N, D] -> [B, N, D]."""
    return self.dropout(self.attn_norm(x), deterministic=deterministic)

  def queries(self, a: Array) -> Array:
    """L2-normalised queries of normed tokens `a: [B, N, D]` -> [B, N, H, K]."""
    return l2_normalize(self.heads(self.query(a)))

  def keys_values(self, a: Array) -> tuple[Array, Array]:
    """Keys (L2-normalised per head) and values of normed tokens `a: [B, N, D]`."""
    return l2_normalize(self.heads(self.key(a))), self.heads(self.value(a))

  def position_bias(self, bucket: np.ndarray) -> PositionBias:
    """The T5 bias [H, *bucket.shape] of a static bucket table (gathered inside `attention`)."""
    return PositionBias(self.relpos_bias, bucket)

  def attention(self, q, k, v, bias, mask, deterministic: bool, temperature=None) -> Array:
    """Attention output [B, Nq, H, K] (probabilities with attention dropout).

    The probabilities are recomputed in the backward pass (`recomputed_attention`); the dropout
    key is the one `attn_dropout` (flax `nn.Dropout`) would draw, so the masks are unchanged.
    """
    t = self.temperature if temperature is None else temperature
    rate = self.config.attention_dropout_rate
    rng = None
    if not deterministic and rate > 0.0:
      if rate >= 1.0:
        raise ValueError(f'attention_dropout_rate={rate}: must be in [0, 1).')
      rng = self.attn_dropout.make_rng('dropout')
    return recomputed_attention(q, k, v, t, bias, mask, rng, rate)

  def attention_probs(self, q, k, bias, mask, temperature=None) -> Array:
    """The probabilities [B, H, Nq, Nk] (float32, no dropout) of `attention`'s arguments (for
    `melodi_t5x.attribution`)."""
    if isinstance(bias, PositionBias):
      bias = bias.table[:, bias.bucket]
    t = self.temperature if temperature is None else temperature
    return attend(q, k, None, t, bias, mask)

  def residual_mlp(self, x: Array, o: Array, deterministic: bool) -> Array:
    """h = x + W_O o; y = h + MLP(RMSNorm(h)). x: [B, N, D], o: [B, N, H, K] -> [B, N, D]."""
    h = x + self.out(o.reshape(*o.shape[:-2], -1))
    ffn = self.ffn_out(nn.relu(self.ffn_in(self.ffn_norm(h))))
    return h + self.dropout(ffn, deterministic=deterministic)


class StatefulLayer(TransformerBlock):
  """A layer kind of a decoder stack (`architectures.decoder`): one signature, one typed state.

  `x, state = layer(x, state, ctx, deterministic)` in training and scoring; `prefill` and
  `decode` for incremental decoding. A subclass declares its state with `state_spec` (a
  `melodi_t5x.state` struct of `ArraySpec`s, or None for a stateless layer); reading, resetting
  and writing it in the `memory` and `cache` collections is done here.
  """

  config: object  # any config.BaseConfig
  # Position of the layer in its decoder's layout.
  index: int = 0

  # Whether the kind implements `prefill` and `decode`.
  decodes: ClassVar[bool] = True

  def state_spec(self, decode: bool):
    """The state carried across segments (`decode=False`) or decode calls (`decode=True`)."""
    del decode
    return None

  def fresh_state(self, batch: int):
    """The state at a document start (default: zeros); same struct as `state_spec(False)`."""
    return state_lib.zeros(self.state_spec(False), batch)

  def start_segment(self, reset: Array, deterministic: bool):
    """The carried state for this segment, fresh in the rows `reset: [B]` (None if stateless)."""
    del deterministic
    spec = self.state_spec(False)
    if spec is None:
      return None
    batch = reset.shape[0]
    return state_lib.read(self, MEMORY, spec, batch, reset, self.fresh_state(batch))

  def end_segment(self, state) -> None:
    """Stores the carried fields of `state` for the next segment."""
    spec = self.state_spec(False)
    if spec is not None:
      state_lib.write(self, MEMORY, spec, jax.lax.stop_gradient(state))

  def read_cache(self, batch: int):
    """The decode state in the `cache` collection (zeros when it is being created)."""
    spec = self.state_spec(True)
    return None if spec is None else state_lib.read(self, CACHE, spec, batch)

  def write_cache(self, state) -> None:
    spec = self.state_spec(True)
    if spec is not None:
      state_lib.write(self, CACHE, spec, state)

  def prefill(self, x: Array, state, ctx):
    """The prompt `x: [B, L, D]` (whole windows, row b valid before ctx.lengths[b]) after the
    carried `state`: (y, decode state)."""
    raise NotImplementedError(f'{type(self).__name__} has no incremental decoding')

  def decode(self, x: Array, state, ctx):
    """Tokens `x: [B, N, D]` after `ctx.tokens_seen` tokens: (y, decode state)."""
    raise NotImplementedError(f'{type(self).__name__} has no incremental decoding')


# ---------------------------------------------------------------------------------------------
# Decoder-level helpers (embedding and logits), the same for every architecture.
# ---------------------------------------------------------------------------------------------


def embedding_param(module: nn.Module, config) -> Array:
  """The tied token embedding `[V, D]` of a decoder."""
  return param(
    module,
    'embedding',
    nn.initializers.normal(stddev=1.0),
    (config.vocab_size, config.embed_dim),
    ('vocab', 'embed'),
    config.param_dtype,
  )


def tied_logits(y: Array, embedding: Array, config) -> Array:
  """Logits [B, T, V] (float32) = y @ E^T / sqrt(D), sharded on ('batch', 'length', 'vocab')."""
  dtype = jnp.dtype(config.dtype)
  logits = jnp.einsum(
    'btd,vd->btv', y, embedding.astype(dtype), preferred_element_type=jnp.float32
  ) / np.sqrt(config.embed_dim)
  return partitioning.with_sharding_constraint(logits, ('batch', 'length', 'vocab'))
