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
y = h + MLP(norm(h)), h = x + W_O attn, already contains its input x, and the layer adds x once
more: **x_next = x + y = 2x + W_O attn + MLP(...)**.

Write index: one per batch row, the row's tokens since its document start modulo M (the decoder's
`tokens_seen`), so each row's memory is its own FIFO, as T5X streaming needs (rows hold
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
from flax import struct

from melodi_t5x import attribution
from melodi_t5x.architectures import xl
from melodi_t5x.architectures.decoder import (
  TRAIN_FACTOR,
  Architecture,
  Decoder,
  MemoryComponent,
  attention_recompute_flops,
  kv_width,
  layer_matmul_params,
)
from melodi_t5x.config import MemorizingConfig
from melodi_t5x.layers import KV, StatefulLayer, apply_attention, attention_logits, safe_softmax

Array = jax.Array

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


@struct.dataclass
class MemoryState:
  """The external memory of the memory layer (a constant: no gradient flows into it)."""

  keys: Array  # [B, M, H, K] normalised keys, slot i written at token i mod M of the document
  values: Array  # [B, M, H, K]


class MemoryLayer(StatefulLayer):
  """The extra layer: joint attention over the memory and the causal segment, then the MLP."""

  config: MemorizingConfig
  has_relpos: ClassVar[bool] = False
  decodes: ClassVar[bool] = False

  def state_spec(self, decode: bool):
    kv = xl.kv_spec(self.config, self.config.memory_size, decode)
    return MemoryState(kv, kv)

  def __call__(self, x: Array, state: MemoryState, ctx, deterministic: bool):
    """x: [B, T, D] -> (x + y, the memory with the segment's keys and values written).

    y = h + MLP(norm(h)), h = x + W_O attn, and the layer adds x once more (the reference's
    residual convention, module docstring).
    """
    slots = (state.keys.astype(x.dtype), state.values.astype(x.dtype))
    a = self.normed_input(x, deterministic)
    q, (k, v) = self.queries(a), self.keys_values(a)
    # Dropped (eval ablation): read zero slots, as at a document start; write as usual.
    read = jax.tree_util.tree_map(jnp.zeros_like, slots) if self.config.drops('memory') else slots
    o = self.memory_attention(q, k, v, read, deterministic)
    if self.config.record_attribution:
      attribution.sow(self, self.memory_masses(q, k, v, read, ctx))
    y = self.residual_mlp(x, o, deterministic)
    index = ctx.tokens_seen % self.config.memory_size  # [B] each row's write position
    new = MemoryState(
      *(write_slots(s, jax.lax.stop_gradient(n), index) for s, n in zip(slots, (k, v)))
    )
    return x + y, new

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

    qs = xl.windowed(q, w).swapaxes(0, 1)  # [N, B, Q, H, K]
    o = jax.lax.map(jax.checkpoint(block, prevent_cse=False), (qs, visible, rngs))
    return o.swapaxes(0, 1).reshape(q.shape)

  def memory_masses(self, q: Array, k: Array, v: Array, slots: KV, ctx) -> dict[str, Array]:
    """Attribution of the joint attention: {'segment', 'memory age a-b', 'memory empty', 'none'}
    masses [B, H, T], one block of queries at a time. Ages are counted in windows before the
    segment; a slot not yet written in the row's document is 'memory empty'."""
    cfg = self.config
    length, w, m = q.shape[1], cfg.window_length, cfg.memory_size
    block_len = cfg.memory_query_block or w
    n = length // block_len
    positions = np.arange(length)
    visible = positions[None, None, :] < positions.reshape(n, block_len)[:, :, None]
    seen = ctx.tokens_seen[:, None]  # [B, 1]
    slot = jnp.arange(m)[None, :]
    age = ((seen - 1 - slot) % m + 1 + w - 1) // w  # [B, M] windows before the segment
    buckets = attribution.age_buckets(-(-m // w))
    labels = [attribution.age_label('memory', a, b) for a, b in buckets] + ['memory empty']
    slot_bucket = jnp.full(age.shape, len(buckets), jnp.int32)
    for j, (a, b) in enumerate(buckets):
      slot_bucket = jnp.where((age >= a) & (age <= b), j, slot_bucket)
    slot_bucket = jnp.where(slot < seen, slot_bucket, len(buckets))  # [B, M]

    def block(inputs):
      qw, vis = inputs
      probs, _, chosen = joint_memory_attention(
        qw, k, v, slots, self.temperature, vis, cfg.memory_top_k
      )
      mem = probs.shape[-1] - length
      sb = jnp.broadcast_to(slot_bucket[:, None, None, :], (*probs.shape[:3], m))
      if chosen is not None:
        sb = jnp.take_along_axis(sb, chosen, axis=-1)
      out = {'segment': probs[..., mem:].sum(-1)}
      for j, label in enumerate(labels):
        out[label] = jnp.where(sb == j, probs[..., :mem], 0.0).sum(-1)
      out[attribution.NONE] = jnp.clip(1.0 - probs.sum(-1), 0.0, 1.0)
      return out

    qs = xl.windowed(q, block_len).swapaxes(0, 1)  # [N, B, Q, H, K]
    masses = jax.lax.map(block, (qs, visible))  # {name: [N, B, H, Q]}
    return {
      name: jnp.moveaxis(x, 0, 2).reshape(*x.shape[1:3], length) for name, x in masses.items()
    }


def write_slots(slots: Array, new: Array, index: Array) -> Array:
  """FIFO write of a segment's `new: [B, T, H, K]` into `slots: [B, M, H, K]` at rows' `index`."""
  put = lambda row, n, i: jax.lax.dynamic_update_slice_in_dim(row, n.astype(row.dtype), i, 0)
  return jax.vmap(put)(slots, new, index)


# ---------------------------------------------------------------------------------------------
# The decoder and its record.
# ---------------------------------------------------------------------------------------------


class MemorizingDecoder(Decoder):
  """The XL stack with the memory layer after XL layer `memory_layer_index`."""

  config: MemorizingConfig

  def layout(self):
    cfg = self.config
    stack = [(f'layers_{i}', xl.XLLayer) for i in range(cfg.num_layers)]
    stack.insert(cfg.memory_layer_index + 1, ('memory_layer', MemoryLayer))
    return tuple(stack)


def memory_components(cfg: MemorizingConfig) -> list[MemoryComponent]:
  w, kv, layers = cfg.window_length, kv_width(cfg), cfg.num_layers
  external = cfg.memory_size * kv
  return [
    MemoryComponent(
      'XL caches',
      f'{layers + 1} layers ({layers} + the memory layer) x {w} tokens x (keys + values)',
      (layers + 1) * w * kv,
      layers * w * kv,
      note=f'we allocate {layers}: the reference memory layer owns an XL cache it never reads or '
      'writes, which the paper counts',
    ),
    MemoryComponent(
      'external memory', f'{cfg.memory_size} slots x (keys + values)', external, external
    ),
  ]


def train_flops(cfg: MemorizingConfig, batch: int, length: int) -> dict[str, float]:
  """Train-step FLOPs of the Memorizing Transformer (dense or top-k memory), by term.

  Terms (x 3 for forward + backward; the recomputation of the checkpointed query blocks in the
  backward pass is not counted, as model FLOPs exclude rematerialisation):
    dense, attention: the Transformer-XL stack (`xl.train_flops`), plus the memory layer's Q, K,
      V, out and MLP weights in `dense` (6 x weights x tokens).
    memory: every token's query against the M memory slots (logits: 2 x M x HK) and against all
      T keys of the segment (logits and values: 2 x 2 x T x HK, computed for every query and
      masked), and the values of the memory (2 x M x HK; with top-k, 2 x k x HK).
  """
  terms = xl.train_flops(cfg, batch, length)
  hk = cfg.num_heads * cfg.head_dim
  tokens = batch * length
  f = TRAIN_FACTOR * 2
  terms['dense'] += f * tokens * layer_matmul_params(cfg)
  values = cfg.memory_top_k or cfg.memory_size
  terms['memory'] = f * tokens * (cfg.memory_size * hk + 2 * length * hk + values * hk)
  return terms


def recompute_flops(cfg: MemorizingConfig, batch: int, length: int) -> float:
  """The XL stack's attention logits; the memory layer recomputes its query blocks under its own
  `jax.checkpoint`, not counted."""
  return attention_recompute_flops(train_flops(cfg, batch, length))


ARCHITECTURE = Architecture.from_module(
  'memorizing', MemorizingConfig, MemorizingDecoder, 'gin/models/memorizing.gin', globals()
)
