"""Memory-read attribution: how much attention each query puts on each memory source.

An eval-only instrument (`BaseConfig.record_attribution`, set by
`t5x_eval.MemoryTrainer(attribution=True)`; off by default, so training and the default eval step
compile exactly as without it). Each layer that reads memory recomputes the attention
probabilities of its scored tokens (no dropout) and sums them over the keys of each source:

  MELODI        'window' (the window's earlier tokens), 'short_term' (the M memory tokens) and, in
                a long-term layer, 'long_term age a-b' (FIFO slots written a..b windows ago).
                The long-term cross-attention is mixed with the self-attention by the learned gate
                g (per head and channel): self-attention sources get the head's mean sigma(g), the
                FIFO sources 1 - mean sigma(g) (the gate-weighted share).
  XL layers     'window' and 'cache' (the previous window's keys).
  Memorizing    its memory layer: 'segment' (causal keys of the segment) and 'memory age a-b'
                (slots written a..b windows before the segment).
  BRT           its recurrent layer's token side has H self heads ('window', 'cache') and H
                cross heads that read only the recurrent states ('state'), one output kernel:
                each head counts 1/(2H), so 'state' is 1/2 by construction.

A query whose attention has no visible key (e.g. a masked empty memory) puts that head's share on
'none'. Per query the masses over all sources of a layer sum to 1. Masses are averaged over heads.
Layers sow `{source: [B, N]}` into the `intermediates` collection under 'attribution'; the host
side (`AttributionAccumulator`) averages them over scored tokens, per layer and per offset in the
window.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
# Name of the sown intermediate.
SOWN = 'attribution'
NONE = 'none'


def age_buckets(max_age: int) -> list[tuple[int, int]]:
  """Age buckets in windows, (first, last): 1, 2-3, 4-7, ... up to `max_age`."""
  buckets, start = [], 1
  while start <= max_age:
    buckets.append((start, min(2 * start - 1, max_age)))
    start *= 2
  return buckets


def age_label(prefix: str, first: int, last: int) -> str:
  return f'{prefix} age {first}' if first == last else f'{prefix} age {first}-{last}'


def head_masses(probs: Array, groups: Sequence[tuple[str, Any]]) -> dict[str, Array]:
  """Sums `probs: [B, H, Nq, Nk]` over each group's keys -> {name: [B, H, Nq]} (float32).

  A group is a static slice or boolean mask over Nk, or a [B, Nk] float weight per row (e.g. the
  slots of one age bucket); a name may appear in several groups (their masses add up). The
  remainder of a row that sums to less than 1 (keys all masked) goes to 'none'.
  """
  probs = probs.astype(jnp.float32)
  out: dict[str, Array] = {}
  for name, keys in groups:
    if isinstance(keys, slice):
      mass = probs[..., keys].sum(-1)
    elif isinstance(keys, np.ndarray) and keys.dtype == bool:
      mass = probs[..., np.flatnonzero(keys)].sum(-1)
    else:  # [B, Nk] weights
      mass = jnp.einsum('bhqn,bn->bhq', probs, jnp.asarray(keys, jnp.float32))
    out[name] = out[name] + mass if name in out else mass
  out[NONE] = out.get(NONE, 0.0) + jnp.clip(1.0 - probs.sum(-1), 0.0, 1.0)
  return out


def from_windows(m: Array, batch: int) -> Array:
  """Head masses of windows batched as rows, [B * n, H, W] -> [B, H, n * W]."""
  rows, heads, w = m.shape
  n = rows // batch
  return m.reshape(batch, n, heads, w).swapaxes(1, 2).reshape(batch, heads, n * w)


def mix(*parts: tuple[Mapping[str, Array], Array | float]) -> dict[str, Array]:
  """Adds head masses `{name: [B, H, Nq]}` of several attentions, each scaled by its share of
  the output: a scalar or per head `[H]` (e.g. a gate)."""
  out: dict[str, Array] = {}
  for masses, share in parts:
    share = jnp.asarray(share, jnp.float32)
    scale = share[None, :, None] if share.ndim == 1 else share
    for name, m in masses.items():
      out[name] = out[name] + m * scale if name in out else m * scale
  return out


def sow(module, masses: Mapping[str, Array]) -> None:
  """Sows the per-query masses, averaged over heads: {name: [B, H, Nq]} -> {name: [B, Nq]}."""
  module.sow('intermediates', SOWN, {k: jnp.mean(v, axis=1) for k, v in masses.items()})


def collect(intermediates: Mapping[str, Any], batch: int, length: int) -> dict[str, dict]:
  """{layer path: {source: [B, T]}} from the sown intermediates of one segment.

  A layer inside the window scan sows one `[B, W]` per window, stacked as `[n, B, W]`.
  """
  found = {}

  def visit(node, path):
    if isinstance(node, Mapping):
      for key, child in node.items():
        if key == SOWN:
          (masses,) = child  # one sow per layer call
          found['/'.join(path)] = {s: _as_segment(m, batch, length) for s, m in masses.items()}
        else:
          visit(child, (*path, key))

  visit(intermediates, ())
  return found


def _as_segment(m: Array, batch: int, length: int) -> Array:
  if m.ndim == 3:  # [n, B, W] from the window scan
    m = jnp.swapaxes(m, 0, 1).reshape(m.shape[1], -1)
  if m.shape != (batch, length):
    raise ValueError(f'attribution of shape {m.shape}, expected {(batch, length)}.')
  return m


@dataclasses.dataclass
class AttributionAccumulator:
  """Token-weighted sums of each layer's source masses, overall and per offset in the window."""

  window_length: int

  def __post_init__(self):
    self._sums: dict[str, dict[str, np.ndarray]] = {}
    self._tokens = np.zeros(self.window_length, np.int64)

  def empty(self) -> AttributionAccumulator:
    return AttributionAccumulator(self.window_length)

  def get_state(self) -> dict[str, Any]:
    """The totals as a JSON-able dict (to add up the hosts')."""
    sums = {lay: {s: v.tolist() for s, v in src.items()} for lay, src in self._sums.items()}
    return {'window_length': self.window_length, 'tokens': self._tokens.tolist(), 'sums': sums}

  def merge_state(self, state: Mapping[str, Any]) -> None:
    if state['window_length'] != self.window_length:
      raise ValueError(f'window_length differs: {state["window_length"]} vs {self.window_length}.')
    self._tokens += np.asarray(state['tokens'], np.int64)
    for layer, sources in state['sums'].items():
      sums = self._sums.setdefault(layer, {})
      for source, values in sources.items():
        add = np.asarray(values, np.float64)
        sums[source] = sums[source] + add if source in sums else add

  def add(self, masses: Mapping[str, Mapping[str, np.ndarray]], weights: np.ndarray) -> None:
    """masses: {layer: {source: [B, T]}}; weights: [B, T] (a token counts iff weight > 0)."""
    weights = np.asarray(weights) > 0
    offsets = np.arange(weights.shape[1]) % self.window_length
    per_offset = lambda x: np.bincount(
      np.broadcast_to(offsets, x.shape)[weights], x[weights], self.window_length
    )
    self._tokens += per_offset(np.ones(weights.shape)).astype(np.int64)
    for layer, sources in masses.items():
      sums = self._sums.setdefault(layer, {})
      for source, m in sources.items():
        add = per_offset(np.asarray(m, np.float64))
        sums[source] = sums[source] + add if source in sums else add

  def summary(self, window_edges: Sequence[int]) -> dict[str, Any]:
    """{'layers': {layer: {source: {'mass', 'by_window_position'}}}, 'window_edges', 'tokens'}."""
    tokens = self._tokens.sum()
    edges = list(window_edges)
    bucket_tokens = np.add.reduceat(self._tokens, edges)
    layers = {}
    for layer in sorted(self._sums, key=_layer_order):
      layers[layer] = {
        source: {
          'mass': float(s.sum() / tokens) if tokens else None,
          'by_window_position': [
            float(v / n) if n else None for v, n in zip(np.add.reduceat(s, edges), bucket_tokens)
          ],
        }
        for source, s in sorted(self._sums[layer].items(), key=lambda kv: source_order(kv[0]))
        if source != NONE or s.sum() > 0
      }
    return {'layers': layers, 'window_edges': edges, 'tokens': int(tokens)}


def source_order(name: str):
  """Reading order of sources: the window, near memory, far memory by age, then 'none'."""
  head, _, age = name.partition(' age ')
  rank = {'window': 0, 'segment': 0, 'cache': 1, 'short_term': 1, 'state': 2, NONE: 9}
  first = int(age.split('-')[0]) if age and age[0].isdigit() else 0
  return (rank.get(head, 5), head, first, name)


def _layer_order(path: str):
  """Sorts 'layers_2' before 'layers_10' (and 'memory_layer' after its number-less peers)."""
  digits = ''.join(c for c in path.rsplit('_', 1)[-1] if c.isdigit())
  return (int(digits) if digits else 10**6, path)


# Sources that are not memory: the current window (and, for the Memorizing layer, its segment).
LOCAL = ('window', 'segment', NONE)


def plot(summary: Mapping[str, Any], path: str, title: str = '') -> None:
  """PNG: left, one stacked bar per layer (mass on each source, averaged over scored tokens);
  right, each layer's mass on memory (every source but the window) by offset in the window."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  layers = summary['layers']
  sources = sorted({s for v in layers.values() for s in v}, key=source_order)
  fig, (ax, ax2) = plt.subplots(1, 2, figsize=(max(4.0, 0.9 * len(layers) + 3.0) + 5.5, 4.2))
  bottom = np.zeros(len(layers))
  for source in sources:
    mass = np.array([layers[lay].get(source, {}).get('mass') or 0.0 for lay in layers])
    ax.bar(range(len(layers)), mass, bottom=bottom, label=source)
    bottom += mass
  ax.set_xticks(range(len(layers)))
  ax.set_xticklabels(list(layers), rotation=30, ha='right')
  ax.set_ylabel('attention mass (mean over tokens, heads)')
  ax.set_ylim(0, 1.0)
  ax.legend(fontsize='x-small', loc='lower left', framealpha=0.8)
  edges = summary['window_edges']
  for layer, v in layers.items():
    memory = np.zeros(len(edges))
    for source, stats in v.items():
      if source not in LOCAL:
        memory += np.array([x or 0.0 for x in stats['by_window_position']])
    ax2.plot(edges, memory, marker='.', label=layer)
  ax2.set_xlabel('offset in window (tokens)')
  ax2.set_ylabel('mass on memory')
  ax2.set_ylim(0, 1.0)
  ax2.grid(alpha=0.3)
  ax2.legend(fontsize='x-small')
  fig.suptitle(title or 'memory-read attribution', fontsize='medium')
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
