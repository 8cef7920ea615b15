"""Memorizing Transformer with dense memory attention as Flax linen modules.

The reference is meliad `base_memory2.gin` + `memory2/mem_densekv_64k.gin`. Reads top-down: the
joint memory attention of one block of queries, the memory layer, then the decoder. Notation:
B batch rows, T segment length, W window, Q queries per block, M memory slots, H heads, K head
dim, D embed dim.

The stack is the Transformer-XL stack (`xl.XLLayer`, each with its XL cache) plus one extra
*memory layer* inserted after XL layer `memory_layer_index` (`num_layers` counts XL layers only).
The memory layer is a pre-norm attention + MLP block (`layers.TransformerBlock`, no position
table) whose queries see, in **one joint softmax**:
  - every one of the M memory slots of their row (no mask, no position bias), and
  - the tokens of the current segment strictly before them (causal over the whole segment, not
    limited to a window, no position bias; a token never sees itself).
The memory holds past normalised keys and values `[B, M, H, K]`, a constant (no gradient flows
into earlier segments), zeroed at a row's document start. Zero slots are **not masked**, as in the
reference: each adds exp(0 - max) to the normaliser and value 0, so the first token of a document
attends to nothing but zeros and its attention output is exactly 0. After the segment, all T keys
and values (padding included) are written FIFO into slots [i, i + T) and i <- (i + T) mod M; reads
during a segment always see the memory as loaded at its start. M must be a multiple of T.

Residual convention (reproduced for parity with the reference): the memory layer's output
y = h + MLP(norm(h)), h = x + W_O attn, already contains its input x, and the stack adds x once
more: **x_next = x + y = 2x + W_O attn + MLP(...)**.

Write index: one per batch row (`write_index`, `[B]` int32), reset to 0 with the row's memory at
its document start, so each row's memory is its own FIFO, as T5X streaming needs (rows hold
unrelated documents). The reference keeps one counter for the whole batch that is not reset at a
document start. Since memory attention has no positions, the slot order never changes an output:
the two conventions give identical logits, losses and gradients, and the same memory read in
FIFO order from the write index (oldest slot first; `check_reference` compares it that way).

Top-k (`memory_top_k = k > 0`, off by default): each query keeps only its k highest-logit memory
slots (exact, `lax.top_k`; ties go to the lower slot) and the joint softmax runs over those k
logits plus the causal in-segment keys, the retrieval of the original Memorizing Transformer
without approximate search. k = M equals dense attention.

Memory efficiency: the logits over the memory are [B, H, T, M] for a whole segment (8.6 GB in fp32
per row at M=65536, T=4096, H=8). The queries are instead processed in blocks of
`memory_query_block` (default: one window W): `lax.map` over the blocks, each under
`jax.checkpoint` so that the backward pass recomputes a block instead of storing every block's
probabilities. The peak is then a few arrays of one block's [B, H, Q, M + T] (measured on CPU: the
temporaries of a train step's gradient are about 5x one block's fp32 logits). At the paper size
one block of Q = W = 512 queries is 1.1 GB of logits per row; Q = 128 makes it 0.29 GB.
"""

from __future__ import annotations

from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from melodi_t5x import memory
from melodi_t5x.architectures.xl import XLDecoder, windowed
from melodi_t5x.config import MemorizingConfig
from melodi_t5x.layers import TransformerBlock, apply_attention, attention_logits, safe_softmax

Array = jax.Array
KV = tuple[Array, Array]

# ---------------------------------------------------------------------------------------------
# Joint attention over the memory and the current segment.
# ---------------------------------------------------------------------------------------------


def joint_memory_attention(
  q: Array, k: Array, v: Array, slots: KV, temperature: Array, visible: Array, top_k: int
) -> tuple[Array, Array, Array | None]:
  """Probabilities of one block of queries over [memory ; segment] in one softmax.

  Args:
    q: [B, Q, H, K] normalised queries of the block.
    k, v: [B, T, H, K] normalised keys and values of the whole segment.
    slots: memory keys and values ([B, M, H, K], [B, M, H, K]).
    temperature: [H]; every logit is |temperature| * q.k.
    visible: [Q, T], True where the segment key is strictly before the query.
    top_k: 0 = every memory slot; k > 0 = each query's k highest-logit slots.

  Returns:
    probs [B, H, Q, N + T] (N = M, or k with top-k) and the memory values they weigh:
    [B, M, H, K] when dense, or [B, H, Q, k, K] (each query's selected slots) with top-k; the
    selected slot indices [B, H, Q, k] with top-k, else None.
  """
  mem_logits = attention_logits(q, slots[0], temperature, None, None)  # [B, H, Q, M]
  mem_values, chosen = slots[1], None
  if top_k:
    mem_logits, chosen = jax.lax.top_k(mem_logits, top_k)  # [B, H, Q, k]
    rows = jnp.arange(q.shape[0])[:, None, None, None]
    heads = jnp.arange(q.shape[2])[None, :, None, None]
    mem_values = mem_values[rows, chosen, heads]  # [B, H, Q, k, K]
  seg_logits = attention_logits(q, k, temperature, None, visible)  # [B, H, Q, T]
  probs = safe_softmax(jnp.concatenate([mem_logits, seg_logits], axis=-1))
  return probs, mem_values, chosen


def weigh_values(probs: Array, mem_values: Array, v: Array) -> Array:
  """Attention output [B, Q, H, K] of `joint_memory_attention`'s probabilities."""
  num_mem = probs.shape[-1] - v.shape[1]
  p_mem, p_seg = probs[..., :num_mem], probs[..., num_mem:]
  if mem_values.ndim == 5:  # top-k: per-query selected values [B, H, Q, k, K]
    out_mem = jnp.einsum('bhqn,bhqnk->bqhk', p_mem.astype(v.dtype), mem_values)
  else:
    out_mem = apply_attention(p_mem, mem_values)
  return out_mem + apply_attention(p_seg, v)


# ---------------------------------------------------------------------------------------------
# Blocks.
# ---------------------------------------------------------------------------------------------


class MemoryLayer(TransformerBlock):
  """The extra layer: joint attention over the memory and the causal segment, then the MLP."""

  config: MemorizingConfig
  has_relpos: ClassVar[bool] = False

  def __call__(self, x: Array, slots: KV, deterministic: bool) -> tuple[Array, KV]:
    """x: [B, T, D]; slots: memory ([B, M, H, K], [B, M, H, K]) -> (y [B, T, D], segment k, v).

    y = h + MLP(norm(h)), h = x + W_O attn (the stack adds x once more). The returned keys and
    values [B, T, H, K] are what the segment writes to memory.
    """
    a = self.normed_input(x, deterministic)
    q, (k, v) = self.queries(a), self.keys_values(a)
    o = self.memory_attention(q, k, v, slots, deterministic)
    return self.residual_mlp(x, o, deterministic), (k, v)

  def memory_attention(self, q: Array, k: Array, v: Array, slots: KV, deterministic: bool):
    """Joint attention output [B, T, H, K], one block of queries at a time (see module doc)."""
    cfg = self.config
    length, w = q.shape[1], cfg.memory_query_block or cfg.window_length
    n = length // w
    positions = np.arange(length)
    visible = positions[None, None, :] < positions.reshape(n, w)[:, :, None]  # [N, Q, T]
    rate = cfg.attention_dropout_rate
    rngs = None
    if not deterministic and rate > 0:
      rngs = jax.random.split(self.make_rng('dropout'), n)
    temperature = self.temperature

    def block(inputs):
      qw, vis, rng = inputs  # [B, Q, H, K], [Q, T], key or None
      probs, mem_values, _ = joint_memory_attention(
        qw, k, v, slots, temperature, vis, cfg.memory_top_k
      )
      if rng is not None:  # attention dropout (a module cannot be called inside lax.map)
        keep = jax.random.bernoulli(rng, 1.0 - rate, probs.shape)
        probs = jnp.where(keep, probs / (1.0 - rate), 0.0)
      return weigh_values(probs, mem_values, v)

    qs = windowed(q, w).swapaxes(0, 1)  # [N, B, Q, H, K]
    o = jax.lax.map(jax.checkpoint(block, prevent_cse=False), (qs, visible, rngs))
    return o.swapaxes(0, 1).reshape(q.shape)


def memory_slots_state(config: MemorizingConfig) -> memory.CarriedState:
  """One carried memory array (keys or values) `[B, M, H, K]`."""
  shape = (config.memory_size, config.num_heads, config.head_dim)
  return memory.CarriedState(shape, ('memory_length', 'heads', 'kv'))


# ---------------------------------------------------------------------------------------------
# The decoder.
# ---------------------------------------------------------------------------------------------


class MemorizingDecoder(XLDecoder):
  """The XL decoder with the memory layer after XL layer `memory_layer_index`.

  Carried state (`memory` collection): the XL caches of `XLDecoder`, plus `memory_keys` and
  `memory_values` `[B, M, H, K]` and `write_index` `[B]` (per row, reset at a document start).
  """

  config: MemorizingConfig

  def setup(self):
    super().setup()
    self.memory_layer = MemoryLayer(self.config)
    self.memory_keys = memory_slots_state(self.config)
    self.memory_values = memory_slots_state(self.config)
    self.write_index = memory.CarriedState((), (), jnp.int32)

  def after_layer(self, layer: int, x: Array, sos: Array, deterministic: bool) -> Array:
    """After XL layer `memory_layer_index`: x [B, T, D] -> x + memory_layer(x) (the quirk)."""
    if layer != self.config.memory_layer_index:
      return x
    slots = (
      jax.lax.stop_gradient(self.memory_keys.start_segment(sos).astype(x.dtype)),
      jax.lax.stop_gradient(self.memory_values.start_segment(sos).astype(x.dtype)),
    )
    y, (k, v) = self.memory_layer(x, slots, deterministic)
    self.write_memory(slots, self.write_index.start_segment(sos), k, v)
    return x + y

  def write_memory(self, slots: KV, index: Array, k: Array, v: Array) -> None:
    """FIFO write of the segment's k, v [B, T, H, K] at each row's `index` [B]."""

    def put(row_slots: Array, new: Array, i: Array) -> Array:  # [M, H, K], [T, H, K], []
      return jax.lax.dynamic_update_slice_in_dim(row_slots, new.astype(row_slots.dtype), i, 0)

    length = k.shape[1]
    self.memory_keys.end_segment(jax.vmap(put)(slots[0], jax.lax.stop_gradient(k), index))
    self.memory_values.end_segment(jax.vmap(put)(slots[1], jax.lax.stop_gradient(v), index))
    self.write_index.end_segment((index + length) % self.config.memory_size)
