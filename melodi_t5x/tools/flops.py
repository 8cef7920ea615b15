"""Analytic FLOPs of one train step, written out per architecture, and a matmul counter.

Model FLOPs count the matrix multiplications the model performs (2 FLOPs per multiply-add), as
in the usual "6 x parameters x tokens" rule: a train step is 3 forward passes (forward, and a
backward pass of twice the forward's cost). Elementwise work (norms, softmax, gates) is not
counted. Attention is counted as computed: the full query x key matrix of every window, masked
entries included.

Why not XLA's cost analysis: it counts the body of a `scan` once, so for MELODI (a scan over the
windows of a segment) its FLOPs per token fall as the number of windows grows.

`dot_flops(fn, *args)` counts the matmul FLOPs of a traced function from its jaxpr (scan bodies
times their length); the tests check the analytic forward FLOPs against it.

Notation: T segment length, W window, N = T / W windows, D embed dim, HK = heads x head dim,
F MLP dim, V vocabulary rows, S summary tokens, M short-term memory, L long-term increment,
Q long-term FIFO tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax

from melodi_t5x.config import BRTConfig, MelodiConfig, MemorizingConfig, XLConfig

# Forward + backward = 3 forward passes.
TRAIN_FACTOR = 3


def _layer_matmul_params(cfg) -> int:
  """Matmul weights of one transformer block: Q, K, V, out (4 x D x HK) and the MLP (2 x D x F)."""
  hk = cfg.num_heads * cfg.head_dim
  return 4 * cfg.embed_dim * hk + 2 * cfg.embed_dim * cfg.mlp_dim


def melodi_flops(cfg: MelodiConfig, batch: int, length: int) -> dict[str, float]:
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
  terms['dense'] = f * tokens * (cfg.num_layers * _layer_matmul_params(cfg) + cfg.vocab_size * d)
  terms['summary_tokens'] = f * windows * cfg.num_layers * s * _layer_matmul_params(cfg)
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


def xl_flops(cfg: XLConfig, batch: int, length: int) -> dict[str, float]:
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
    'dense': f * tokens * (cfg.num_layers * _layer_matmul_params(cfg) + cfg.vocab_size * d),
    'attention': f * tokens * cfg.num_layers * 2 * (2 * cfg.window_length) * hk,
  }


def memorizing_flops(cfg: MemorizingConfig, batch: int, length: int) -> dict[str, float]:
  """Train-step FLOPs of the Memorizing Transformer (dense or top-k memory), by term.

  Terms (x 3 for forward + backward; the recomputation of the checkpointed query blocks in the
  backward pass is not counted, as model FLOPs exclude rematerialisation):
    dense, attention: the Transformer-XL stack (`xl_flops`), plus the memory layer's Q, K, V, out
      and MLP weights in `dense` (6 x weights x tokens).
    memory: every token's query against the M memory slots (logits: 2 x M x HK) and against all
      T keys of the segment (logits and values: 2 x 2 x T x HK, computed for every query and
      masked), and the values of the memory (2 x M x HK; with top-k, 2 x k x HK).
  """
  terms = xl_flops(cfg, batch, length)
  hk = cfg.num_heads * cfg.head_dim
  tokens = batch * length
  f = TRAIN_FACTOR * 2
  terms['dense'] += f * tokens * _layer_matmul_params(cfg)
  values = cfg.memory_top_k or cfg.memory_size
  terms['memory'] = f * tokens * (cfg.memory_size * hk + 2 * length * hk + values * hk)
  return terms


def brt_flops(cfg: BRTConfig, batch: int, length: int) -> dict[str, float]:
  """Train-step FLOPs of the Block-Recurrent Transformer, by term.

  Terms (x 3 for forward + backward):
    dense, attention: the Transformer-XL stack (`xl_flops`).
    recurrent_tokens: per token of the recurrent layer, the second query (D x HK), its attention
      over the N state vectors (2 x 2 x N x HK) and the wider output projection ([2HK, D] instead
      of [HK, D]: 2 x HK x D more).
    recurrent_state: per window, the N state vectors' Q, Q2, K, V (4 x D x HK) and output
      ([2HK, D]) projections, self-attention over the state (2 x 2 x N x N x HK) and
      cross-attention over the 2W token keys (2 x 2 x N x 2W x HK).
  """
  terms = xl_flops(cfg, batch, length)
  d, hk, n = cfg.embed_dim, cfg.num_heads * cfg.head_dim, cfg.num_states
  windows = cfg.num_windows(length) * batch
  tokens = batch * length
  f = TRAIN_FACTOR * 2
  terms['recurrent_tokens'] = f * tokens * (d * hk + 2 * n * hk + hk * d)
  per_window = n * 4 * d * hk + n * 2 * hk * d + 2 * n * n * hk + 2 * n * 2 * cfg.window_length * hk
  terms['recurrent_state'] = f * windows * per_window
  return terms


def recompute_flops(name: str, cfg, batch: int, length: int) -> float:
  """FLOPs the backward pass spends recomputing attention logits (`layers.recomputed_attention`).

  Every attention keeps only its inputs for the backward pass and recomputes its `q . k` logits
  there: one extra logits matmul (2 x Nq x Nk x HK) per attention, i.e. 1/6 of each attention
  term above (which counts logits and weighted values, x 3). MELODI adds its long-term
  cross-attention logits (2 x (W+S) x Q x HK per window), the Block-Recurrent Transformer its
  recurrent attentions. The Memorizing Transformer's memory layer recomputes its query blocks
  (its own `jax.checkpoint`, not counted here either). Not part of the model FLOPs; the hardware
  executes them (`step_flops`).
  """
  if name not in ANALYTIC_FLOPS:
    raise ValueError(f'No analytic FLOPs for model {name!r}; known: {sorted(ANALYTIC_FLOPS)}.')
  terms = ANALYTIC_FLOPS[name](cfg, batch, length)
  extra = terms['attention'] / 6
  hk = cfg.num_heads * cfg.head_dim
  if name == 'melodi':
    nq = cfg.window_length + cfg.summary_size
    windows = cfg.num_windows(length) * batch
    long_layers = sum(cfg.is_long_term_layer(i) for i in range(cfg.num_layers))
    extra += 2 * windows * long_layers * nq * cfg.long_term_memory_tokens * hk
  elif name == 'brt':
    n, w = cfg.num_states, cfg.window_length
    windows = cfg.num_windows(length) * batch
    extra += 2 * batch * length * n * hk + 2 * windows * (n * n + n * 2 * w) * hk
  return float(extra)


def step_flops(name: str, cfg, batch: int, length: int, remat: str | None = None) -> float:
  """FLOPs the hardware executes in one train step: model FLOPs plus recomputation.

  `remat` (default `cfg.remat`): every setting adds the attention logits recomputed in the
  backward pass (`recompute_flops`); 'window' and 'layer' also recompute the whole forward pass
  once more (+ 1/3 of the model FLOPs).
  """
  remat = cfg.remat if remat is None else remat
  model = train_flops(name, cfg, batch, length)['total']
  extra = recompute_flops(name, cfg, batch, length)
  if remat in ('window', 'layer'):
    extra += model / TRAIN_FACTOR
  return model + extra


def eval_flops(name: str, cfg, batch: int, length: int) -> float:
  """FLOPs of one forward (eval) step: the train step's model FLOPs / 3."""
  return train_flops(name, cfg, batch, length)['total'] / TRAIN_FACTOR


# ---------------------------------------------------------------------------------------------
# Peak throughput and memory of accelerators.
# ---------------------------------------------------------------------------------------------


# Dense bf16 peak per JAX device, TFLOP/s, keyed by `jax.Device.device_kind`; the most specific
# key that the device kind starts with wins ('TPU v5 lite' before 'TPU v5').
PEAK_TFLOPS: dict[str, float] = {
  # Cloud TPU v4: 275 TFLOP/s bf16 per chip (cloud.google.com/tpu/docs/v4, "System
  # architecture"). JAX shows a v4 chip as one device (megacore).
  'TPU v4': 275.0,
  # Cloud TPU v5e: 197 TFLOP/s bf16 per chip (cloud.google.com/tpu/docs/v5e); device kind
  # 'TPU v5 lite'.
  'TPU v5 lite': 197.0,
  # Cloud TPU v5p: 459 TFLOP/s bf16 per chip (cloud.google.com/tpu/docs/v5p); device kind
  # 'TPU v5' (also 'TPU v5p').
  'TPU v5': 459.0,
  # Cloud TPU v6e (Trillium): 918 TFLOP/s bf16 per chip (cloud.google.com/tpu/docs/v6e); device
  # kind 'TPU v6 lite'.
  'TPU v6': 918.0,
  # NVIDIA H100 SXM: 989 TFLOP/s dense bf16 (NVIDIA H100 datasheet, without sparsity).
  'H100': 989.0,
  # NVIDIA H200 SXM: 989 TFLOP/s dense bf16 (NVIDIA H200 datasheet, without sparsity).
  'H200': 989.0,
  # NVIDIA A100: 312 TFLOP/s dense bf16 (NVIDIA A100 datasheet, without sparsity).
  'A100': 312.0,
}
# HBM per chip, GiB (same Cloud TPU pages): v4 32, v5e 16, v5p 95, v6e 32.
HBM_GIB: dict[str, float] = {
  'TPU v4': 32.0,
  'TPU v5 lite': 16.0,
  'TPU v5': 95.0,
  'TPU v6': 32.0,
}


def _lookup(table: dict[str, float], device_kind: str) -> float | None:
  kind = device_kind.strip()
  for key in sorted(table, key=len, reverse=True):
    if kind.startswith(key) or (not key.startswith('TPU') and key in kind):
      return table[key]
  return None


def peak_tflops(device_kind: str) -> float | None:
  """Dense bf16 peak TFLOP/s of one device of `device_kind` (None if unknown)."""
  return _lookup(PEAK_TFLOPS, device_kind)


def hbm_gib(device_kind: str) -> float | None:
  """HBM GiB per TPU chip of `device_kind` (None if unknown)."""
  return _lookup(HBM_GIB, device_kind)


# Analytic train-step FLOPs by architecture name (the bench's --model); each returns its terms.
ANALYTIC_FLOPS: dict[str, Callable[..., dict[str, float]]] = {
  'melodi': melodi_flops,
  'xl': xl_flops,
  'memorizing': memorizing_flops,
  'brt': brt_flops,
}


def train_flops(name: str, cfg, batch: int, length: int) -> dict[str, float]:
  """The terms of `ANALYTIC_FLOPS[name]` plus their sum under 'total'."""
  if name not in ANALYTIC_FLOPS:
    raise ValueError(
      f'No analytic FLOPs for model {name!r}; known: {sorted(ANALYTIC_FLOPS)}. Add a function '
      'writing out its matmuls to melodi_t5x.tools.flops.ANALYTIC_FLOPS.'
    )
  terms = ANALYTIC_FLOPS[name](cfg, batch, length)
  return {**terms, 'total': float(sum(terms.values()))}


# ---------------------------------------------------------------------------------------------
# Counting matmuls in a jaxpr (independent check of the formulas above).
# ---------------------------------------------------------------------------------------------


def _dot_general_flops(eqn) -> int:
  lhs, rhs = (v.aval.shape for v in eqn.invars)
  (_, rhs_contract), (_, rhs_batch) = eqn.params['dimension_numbers']
  rhs_free = [n for i, n in enumerate(rhs) if i not in rhs_contract and i not in rhs_batch]
  return 2 * math.prod(lhs) * math.prod(rhs_free)


def _sub_jaxprs(params):
  for value in params.values():
    for item in value if isinstance(value, (tuple, list)) else (value,):
      if isinstance(item, jax.extend.core.ClosedJaxpr):
        yield item.jaxpr
      elif isinstance(item, jax.extend.core.Jaxpr):
        yield item


def jaxpr_dot_flops(jaxpr) -> int:
  """Matmul FLOPs of a jaxpr: dot_general ops, sub-jaxprs included, scan bodies x length."""
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == 'dot_general':
      total += _dot_general_flops(eqn)
    elif name == 'while':
      raise ValueError('jaxpr_dot_flops: a while loop has no static trip count.')
    inner = sum(jaxpr_dot_flops(j) for j in _sub_jaxprs(eqn.params))
    total += inner * (eqn.params['length'] if name == 'scan' else 1)
  return total


def dot_flops(fn: Callable, *args) -> int:
  """Matmul FLOPs of `fn(*args)` as traced (args may be `jax.ShapeDtypeStruct`s)."""
  return jaxpr_dot_flops(jax.make_jaxpr(fn)(*args).jaxpr)
