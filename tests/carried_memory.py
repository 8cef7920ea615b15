"""A decoder run segment by segment with its memory carried, as the tests run it (no T5X).

`apply_segment` is one segment of `module.apply` on `{'params', 'memory'}` with the memory mutable
and dropout off: (logits [B, T, V], the memory after the segment). `jit_step` jits it for one
module; `zeros_memory` is a memory tree of the right shapes with every leaf zero.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from melodi_t5x.state import MEMORY


def zeros_memory(variables):
  """The memory collection of `variables` with every leaf zero ({} for a decoder without one)."""
  return jax.tree_util.tree_map(jnp.zeros_like, variables.get(MEMORY, {}))


def apply_collections(
  module, params, memory, tokens, sos, targets=None, mutable: Sequence[str] = (MEMORY,)
):
  """(logits [B, T, V], the collections `mutable` after one segment) with `memory` carried in.

  tokens, targets: [B, T] (the decoders ignore the targets); sos: [B] bool, the rows that start a
  document (their memory is reset).
  """
  return module.apply(
    {'params': params, MEMORY: memory},
    tokens,
    targets,
    start_of_sequence=sos,
    enable_dropout=False,
    mutable=list(mutable),
  )


def apply_segment(module, params, memory, tokens, sos, targets=None):
  """(logits [B, T, V], memory after the segment); {} for a decoder that carries none."""
  logits, new = apply_collections(module, params, memory, tokens, sos, targets)
  return logits, new.get(MEMORY, {})


def jit_step(module):
  """`apply_segment` of `module`, jitted: (params, memory, tokens, sos) -> (logits, memory)."""
  return jax.jit(functools.partial(apply_segment, module))
