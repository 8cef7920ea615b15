"""Analytic FLOPs of one train step, written out per architecture, and a matmul counter.

The analytic FLOPs of each architecture are written out in its module (`train_flops`, read through
its `Architecture` record). Model FLOPs count the matrix multiplications the model performs (2 FLOPs
per multiply-add), as in the usual "6 x parameters x tokens" rule: a train step is 3 forward passes
(forward, and a backward pass of twice the forward's cost). Elementwise work (norms, softmax, gates)
is not counted. Attention is counted as computed: the full query x key matrix of every window,
masked entries included.

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

from melodi_t5x import architectures
from melodi_t5x.architectures import decoder as decoder_lib

# Forward + backward = 3 forward passes.
TRAIN_FACTOR = decoder_lib.TRAIN_FACTOR


def recompute_flops(cfg, batch: int, length: int) -> float:
  """FLOPs the backward pass spends recomputing attention logits (`layers.recomputed_attention`).

  Every attention keeps only its inputs for the backward pass and recomputes its `q . k` logits
  there: one extra logits matmul per attention, written out by each architecture
  (`Architecture.recompute_flops`). Not part of the model FLOPs; the hardware executes them
  (`step_flops`).
  """
  return float(architectures.for_config(cfg).recompute_flops(cfg, batch, length))


def step_flops(cfg, batch: int, length: int, remat: str | None = None) -> float:
  """FLOPs the hardware executes in one train step: model FLOPs plus recomputation.

  `remat` (default `cfg.remat`): every setting adds the attention logits recomputed in the
  backward pass (`recompute_flops`); 'window' and 'layer' also recompute the whole forward pass
  once more (+ 1/3 of the model FLOPs).
  """
  remat = cfg.remat if remat is None else remat
  model = train_flops(cfg, batch, length)['total']
  extra = recompute_flops(cfg, batch, length)
  if remat in ('window', 'layer'):
    extra += model / TRAIN_FACTOR
  return model + extra


def eval_flops(cfg, batch: int, length: int) -> float:
  """FLOPs of one forward (eval) step: the train step's model FLOPs / 3."""
  return train_flops(cfg, batch, length)['total'] / TRAIN_FACTOR


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


def train_flops(cfg, batch: int, length: int) -> dict[str, float]:
  """The model-FLOPs terms of `cfg`'s train step, plus their sum under 'total'.

  The terms are written out by `cfg`'s architecture (`architectures.for_config`); a config no
  architecture record names is an error.
  """
  terms = dict(architectures.for_config(cfg).train_flops(cfg, batch, length))
  terms['total'] = float(sum(terms.values()))
  return terms


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
