"""Streaming perplexity bookkeeping and the evaluation report (JSON, Markdown, PNG).

No T5X needed: `PerplexityAccumulator` takes per-token negative log-likelihoods of one batch of
document-streaming chunks (numpy, `[B, T]`) and keeps exact float64 totals, overall, per document
per position-in-document bucket and, given the window length, per offset within the window.
`write_report` turns the totals into the report files.

A target token at offset `t` of a row whose chunk has index `c` sits at position `c * T + t` of its
document (chunks are consecutive, fixed-length pieces of a document). Only tokens with a positive
loss weight count; each must be seen exactly once, which `add` checks per document: a
`(document_id, chunk_index)` pair may not be scored twice. Windows start at every document's start
and tile its chunks (the segment length is a multiple of the window, as every model here checks),
so that token's offset in its window is `(c * T + t) % W`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def default_bucket_edges(segment_length: int, max_position: int | None = None) -> list[int]:
  """Bucket starts (in tokens) for position-in-document: chunk 0, 1, 2-3, 4-7, 8-15, ...

  Args:
    segment_length: tokens per chunk (T).
    max_position: if given, no edge at or beyond it is returned (the last bucket is open).

  Returns:
    Increasing token offsets starting at 0; bucket i covers [edges[i], edges[i + 1]).
  """
  if segment_length <= 0:
    raise ValueError(f'segment_length={segment_length} must be positive.')
  edges, chunks = [0], 1
  while max_position is None or chunks * segment_length < max_position:
    edges.append(chunks * segment_length)
    chunks *= 2
    if max_position is None and len(edges) >= 8:  # chunks 0, 1, 2-3, ..., 64+ by default
      break
  return edges


def window_bucket_edges(window_length: int, max_buckets: int = 64) -> list[int]:
  """Offsets in the window at which a window-position bucket starts.

  Every offset is its own bucket up to `max_buckets` offsets; for longer windows offset 0 (the
  token that sees only memory and itself) keeps its own bucket and the rest is split into
  `max_buckets - 1` buckets of equal width (the last may be shorter).
  """
  if window_length <= 0 or max_buckets < 2:
    raise ValueError(
      f'window_length={window_length} and max_buckets={max_buckets} must be >= 1, 2.'
    )
  if window_length <= max_buckets:
    return list(range(window_length))
  width = -(-(window_length - 1) // (max_buckets - 1))
  return [0] + list(range(1, window_length, width))


@dataclasses.dataclass
class PerplexityAccumulator:
  """Exact token-level NLL totals over a stream of `[B, T]` batches.

  Attributes:
    bucket_edges: increasing token offsets (first 0); bucket i is [edges[i], edges[i+1]), the
      last bucket is open-ended.
    grow: extend the buckets so that they reach the longest document: whenever a token lies at or
      beyond the last edge, edges doubling the last one are appended (needs >= 2 edges; with
      `default_bucket_edges(T, T + 1) = [0, T]` the buckets are chunk 0, 1, 2-3, 4-7, ... with no
      upper limit). The open last bucket then never holds a token.
    window_length: tokens per window (W) of the model; when set, NLL totals are also kept for each
      offset 0..W-1 within the window (`summary()['window_positions']`).
  """

  bucket_edges: Sequence[int]
  grow: bool = False
  window_length: int | None = None
  nll_sum: float = 0.0
  tokens: int = 0
  correct: int = 0
  batches: int = 0

  def __post_init__(self):
    edges = np.asarray(list(self.bucket_edges), np.int64)
    if edges.ndim != 1 or not len(edges) or edges[0] != 0 or np.any(np.diff(edges) <= 0):
      raise ValueError(
        f'bucket_edges={list(self.bucket_edges)} must be increasing token offsets starting at 0.'
      )
    if self.grow and len(edges) < 2:
      raise ValueError(
        f'bucket_edges={list(self.bucket_edges)}: grow=True needs at least two edges (e.g. '
        '[0, segment_length]) to know the doubling unit.'
      )
    self.bucket_edges = [int(e) for e in edges]
    if self.window_length is not None and self.window_length <= 0:
      raise ValueError(f'window_length={self.window_length} must be positive (or None).')
    self._offset_nll = np.zeros(self.window_length or 0, np.float64)
    self._offset_tokens = np.zeros(self.window_length or 0, np.int64)
    self._bucket_nll = np.zeros(len(edges), np.float64)
    self._bucket_tokens = np.zeros(len(edges), np.int64)
    self._doc_tokens: dict[int, int] = {}
    self._doc_nll: dict[int, float] = {}
    self._seen_chunks: set[tuple[int, int]] = set()

  def add(
    self,
    nll: np.ndarray,
    weights: np.ndarray,
    document_id: np.ndarray,
    chunk_index: np.ndarray,
    row_valid: np.ndarray | None = None,
    correct: np.ndarray | None = None,
  ) -> None:
    """Adds one batch.

    Args:
      nll: [B, T] per-token negative log-likelihood (natural log).
      weights: [B, T] loss weights; a token counts iff its weight is > 0 (weights must be 0/1).
      document_id: [B] document of each row.
      chunk_index: [B] index of each row's chunk within its document.
      row_valid: [B] False for padding rows (their tokens must have zero weight anyway).
      correct: optional [B, T] bool, argmax prediction == target.

    Raises:
      ValueError: on shape mismatch, non-binary weights, a weighted token in an invalid row, or a
        chunk scored twice.
    """
    nll = np.asarray(nll, np.float64)
    weights = np.asarray(weights)
    batch, length = nll.shape
    if weights.shape != (batch, length):
      raise ValueError(f'weights shape {weights.shape} != nll shape {nll.shape}.')
    if not np.all((weights == 0) | (weights == 1)):
      raise ValueError('loss weights must be 0 or 1 to count tokens exactly.')
    mask = weights > 0
    document_id = np.asarray(document_id).reshape(batch)
    chunk_index = np.asarray(chunk_index).reshape(batch)
    if row_valid is not None:
      row_valid = np.asarray(row_valid, bool).reshape(batch)
      if np.any(mask[~row_valid]):
        raise ValueError('a padding row (row_valid=False) has non-zero loss weights.')
    self.batches += 1
    positions = chunk_index.astype(np.int64)[:, None] * length + np.arange(length)[None, :]
    if self.grow and np.any(mask):
      self.extend_edges(int(positions[mask].max()))
    bucket = np.searchsorted(np.asarray(self.bucket_edges), positions, side='right') - 1
    np.add.at(self._bucket_nll, bucket[mask], nll[mask])
    np.add.at(self._bucket_tokens, bucket[mask], 1)
    if self.window_length:
      offset = positions % self.window_length
      np.add.at(self._offset_nll, offset[mask], nll[mask])
      np.add.at(self._offset_tokens, offset[mask], 1)
    row_tokens = mask.sum(axis=1)
    row_nll = np.where(mask, nll, 0.0).sum(axis=1)
    for r in range(batch):
      if not row_tokens[r]:
        continue
      key = (int(document_id[r]), int(chunk_index[r]))
      if key in self._seen_chunks:
        raise ValueError(f'chunk {key[1]} of document {key[0]} was scored twice.')
      self._seen_chunks.add(key)
      self._doc_tokens[key[0]] = self._doc_tokens.get(key[0], 0) + int(row_tokens[r])
      self._doc_nll[key[0]] = self._doc_nll.get(key[0], 0.0) + float(row_nll[r])
    self.nll_sum += float(row_nll.sum())
    self.tokens += int(row_tokens.sum())
    if correct is not None:
      self.correct += int(np.sum(np.asarray(correct, bool) & mask))

  def extend_edges(self, position: int) -> None:
    """Appends doubling edges until `position` lies before the last edge (no-op without grow)."""
    if not self.grow:
      return
    while self.bucket_edges[-1] <= position:
      self.bucket_edges.append(2 * self.bucket_edges[-1])
      self._bucket_nll = np.append(self._bucket_nll, 0.0)
      self._bucket_tokens = np.append(self._bucket_tokens, 0)

  @property
  def documents(self) -> int:
    return len(self._doc_tokens)

  @property
  def perplexity(self) -> float:
    return _ppl(self.nll_sum, self.tokens)

  def document_tokens(self) -> dict[int, int]:
    return dict(self._doc_tokens)

  def get_state(self) -> dict[str, Any]:
    """All totals as a JSON-able dict (to combine the accumulators of several hosts)."""
    return {
      'bucket_edges': list(self.bucket_edges),
      'nll_sum': self.nll_sum,
      'tokens': self.tokens,
      'correct': self.correct,
      'batches': self.batches,
      'bucket_nll': self._bucket_nll.tolist(),
      'bucket_tokens': self._bucket_tokens.tolist(),
      'documents': [[d, self._doc_tokens[d], self._doc_nll[d]] for d in self._doc_tokens],
      'chunks': sorted(self._seen_chunks),
      'window_length': self.window_length,
      'offset_nll': self._offset_nll.tolist(),
      'offset_tokens': self._offset_tokens.tolist(),
    }

  def merge_state(self, state: Mapping[str, Any]) -> None:
    """Adds the totals of another accumulator (`get_state`), e.g. another host's documents.

    With `grow`, the edges of both are doubling sequences from the same start; the shorter is
    extended to the longer (its extra buckets are empty).

    Raises:
      ValueError: if the bucket edges differ or a chunk was scored by both.
    """
    theirs = [int(e) for e in state['bucket_edges']]
    bucket_nll = np.asarray(state['bucket_nll'], np.float64)
    bucket_tokens = np.asarray(state['bucket_tokens'], np.int64)
    if self.grow:
      self.extend_edges(theirs[-1] - 1)
      pad = len(self.bucket_edges) - len(theirs)
      theirs += self.bucket_edges[len(theirs) :]
      bucket_nll = np.concatenate([bucket_nll, np.zeros(pad)])
      bucket_tokens = np.concatenate([bucket_tokens, np.zeros(pad, np.int64)])
    if theirs != list(self.bucket_edges):
      raise ValueError(f'bucket edges differ: {state["bucket_edges"]} vs {self.bucket_edges}.')
    if state.get('window_length') != self.window_length:
      raise ValueError(
        f'window_length differs: {state.get("window_length")} vs {self.window_length}.'
      )
    chunks = {(int(d), int(c)) for d, c in state['chunks']}
    twice = chunks & self._seen_chunks
    if twice:
      d, c = sorted(twice)[0]
      raise ValueError(
        f'chunk {c} of document {d} was scored on two hosts ({len(twice)} chunks in all): '
        'document ids must be unique across hosts.'
      )
    self._seen_chunks |= chunks
    self.nll_sum += float(state['nll_sum'])
    self.tokens += int(state['tokens'])
    self.correct += int(state['correct'])
    self.batches = max(self.batches, int(state['batches']))
    self._bucket_nll += bucket_nll
    self._bucket_tokens += bucket_tokens
    if self.window_length:
      self._offset_nll += np.asarray(state['offset_nll'], np.float64)
      self._offset_tokens += np.asarray(state['offset_tokens'], np.int64)
    for d, n, nll in state['documents']:
      self._doc_tokens[int(d)] = self._doc_tokens.get(int(d), 0) + int(n)
      self._doc_nll[int(d)] = self._doc_nll.get(int(d), 0.0) + float(nll)

  def window_positions(self) -> list[dict[str, Any]]:
    """Per window-offset bucket (`window_bucket_edges`): start, end, tokens, NLL, perplexity."""
    if not self.window_length:
      return []
    edges = window_bucket_edges(self.window_length)
    ends = edges[1:] + [self.window_length]
    nll = np.add.reduceat(self._offset_nll, edges)
    tokens = np.add.reduceat(self._offset_tokens, edges)
    return [_bucket(s, e, n, t) for s, e, n, t in zip(edges, ends, nll, tokens)]

  def summary(self, **extra: Any) -> dict[str, Any]:
    """The report dictionary (JSON-serialisable); `extra` keys are added at the top level.

    `per_document` holds each document's exact totals (`[document_id, tokens, nll_sum]`, by id):
    `melodi_t5x.tools.compare_reports` bootstraps confidence intervals over them.
    """
    ends = list(self.bucket_edges[1:]) + [None]
    buckets = [
      _bucket(s, e, n, t)
      for s, e, n, t in zip(self.bucket_edges, ends, self._bucket_nll, self._bucket_tokens)
    ]
    doc_ppl = [_ppl(self._doc_nll[d], n) for d, n in self._doc_tokens.items()]
    result = {
      'perplexity': self.perplexity,
      'nll_per_token': _mean(self.nll_sum, self.tokens),
      'tokens': self.tokens,
      'documents': self.documents,
      'chunks': len(self._seen_chunks),
      'batches': self.batches,
      'accuracy': _mean(self.correct, self.tokens),
      'mean_document_perplexity': float(np.mean(doc_ppl)) if doc_ppl else None,
      'position_buckets': buckets,
      'window_length': self.window_length,
      'window_positions': self.window_positions(),
      'per_document': [
        [d, self._doc_tokens[d], self._doc_nll[d]] for d in sorted(self._doc_tokens)
      ],
    }
    result.update(extra)
    return result


def _bucket(start: int, end: int | None, nll: float, tokens: int) -> dict[str, Any]:
  tokens = int(tokens)
  return {
    'start': int(start),
    'end': None if end is None else int(end),
    'tokens': tokens,
    'nll_per_token': _mean(nll, tokens),
    'perplexity': _ppl(nll, tokens),
  }


def _mean(total: float, count: int) -> float | None:
  return float(total) / count if count else None


def _ppl(total: float, count: int) -> float | None:
  return math.exp(float(total) / count) if count else None


def _fmt_tokens(n: int | None) -> str:
  if n is None:
    return 'end'
  return f'{n // 1024}K' if n and n % 1024 == 0 else str(n)


def title(summary: Mapping[str, Any]) -> str:
  """The report's title: the task and, when known, the memory mode (carried or reset)."""
  task = summary.get('task', 'evaluation')
  mode = summary.get('memory_mode')
  return f'{task} (memory {mode})' if mode else task


def to_markdown(summary: Mapping[str, Any]) -> str:
  """Renders a report dictionary (from `PerplexityAccumulator.summary`) as Markdown."""
  lines = [f'# Perplexity report: {title(summary)}', '']
  for key in ('checkpoint_step', 'split', 'segment_length', 'batch_size', 'checkpoint'):
    if summary.get(key) is not None:
      lines.append(f'- {key}: `{summary[key]}`')
  ppl = summary['perplexity']
  lines += [
    f'- **token-level perplexity: {ppl:.4f}**' if ppl is not None else '- perplexity: n/a',
    f'- tokens scored: {summary["tokens"]} (each real target token exactly once)',
    f'- documents: {summary["documents"]}, chunks: {summary["chunks"]}',
  ]
  if summary.get('accuracy') is not None:
    lines.append(f'- next-token accuracy: {summary["accuracy"]:.4f}')
  lines += [
    '',
    '## Perplexity by position in document',
    '',
    '| tokens from document start | tokens scored | NLL/token | perplexity |',
    '|---|---:|---:|---:|',
  ]
  for b in summary['position_buckets']:
    if not b['tokens']:
      continue
    lines.append(
      f'| [{_fmt_tokens(b["start"])}, {_fmt_tokens(b["end"])}) | {b["tokens"]} | '
      f'{b["nll_per_token"]:.4f} | {b["perplexity"]:.4f} |'
    )
  windows = [b for b in summary.get('window_positions') or [] if b['tokens']]
  if windows:
    lines += [
      '',
      f'## Perplexity by position in the window (W = {summary["window_length"]})',
      '',
      '| offsets in window | tokens scored | NLL/token | perplexity |',
      '|---|---:|---:|---:|',
    ]
    for b in windows:
      lines.append(
        f'| [{b["start"]}, {b["end"]}) | {b["tokens"]} | {b["nll_per_token"]:.4f} | '
        f'{b["perplexity"]:.4f} |'
      )
  lines += attribution_markdown(summary.get('attribution'))
  return '\n'.join(lines) + '\n'


def attribution_markdown(attr: Mapping[str, Any] | None) -> list[str]:
  """Lines of the attribution table (layers x sources, mean attention mass), if recorded."""
  if not attr:
    return []
  from melodi_t5x.attribution import source_order  # pylint: disable=g-import-not-at-top

  sources = sorted({s for v in attr['layers'].values() for s in v}, key=source_order)
  lines = [
    '',
    '## Memory-read attribution (attention mass per source, mean over scored tokens and heads)',
    '',
    'MELODI long-term sources carry the gate-weighted share (1 - mean sigmoid(gate)); '
    "'none': heads whose keys were all masked. See melodi_t5x/attribution.py.",
    '',
    '| layer | ' + ' | '.join(sources) + ' |',
    '|---|' + '---:|' * len(sources),
  ]
  for layer, v in attr['layers'].items():
    cells = [f'{v[s]["mass"]:.3f}' if s in v and v[s]['mass'] is not None else '' for s in sources]
    lines.append(f'| {layer} | ' + ' | '.join(cells) + ' |')
  return lines


def _bucket_figure(summary: Mapping[str, Any]):
  """A matplotlib figure of perplexity per position-in-document bucket and, if kept, per offset
  in the window."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  buckets = [b for b in summary['position_buckets'] if b['tokens']]
  windows = [b for b in summary.get('window_positions') or [] if b['tokens']]
  width = max(4.0, 1.1 * len(buckets) + 1.5)
  fig, axes = plt.subplots(1, 2 if windows else 1, figsize=(width + (6.0 if windows else 0), 3.5))
  ax = axes[0] if windows else axes
  labels = [f'[{_fmt_tokens(b["start"])}, {_fmt_tokens(b["end"])})' for b in buckets]
  ax.plot(range(len(buckets)), [b['perplexity'] for b in buckets], marker='o')
  ax.set_xticks(range(len(buckets)))
  ax.set_xticklabels(labels, rotation=30, ha='right')
  ax.set_xlabel('position in document (tokens)')
  ax.set_ylabel('perplexity')
  ppl = summary['perplexity']
  ax.set_title(f'{title(summary)}: overall perplexity {ppl:.3f}' if ppl else title(summary))
  ax.grid(alpha=0.3)
  if windows:
    plot_window_positions(axes[1], [(summary.get('label', ''), windows)])
  fig.tight_layout()
  return fig


def plot_buckets(summary: Mapping[str, Any], path: str) -> None:
  """Writes a PNG of perplexity per position-in-document bucket."""
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  fig = _bucket_figure(summary)
  fig.savefig(path, dpi=100)
  plt.close(fig)


def plot_window_positions(ax, series: Sequence[tuple[str, Sequence[Mapping[str, Any]]]]) -> None:
  """Draws perplexity against offset in the window (bucket starts), one line per labelled series."""
  for label, windows in series:
    points = [(b['start'], b['perplexity']) for b in windows if b['tokens']]
    ax.plot(*zip(*points), marker='.', label=label or None)
  ax.set_xlabel('offset in window (tokens)')
  ax.set_ylabel('perplexity')
  ax.set_title('by position in the window')
  ax.grid(alpha=0.3)
  if any(label for label, _ in series):
    ax.legend(fontsize='small')


def bucket_image(summary: Mapping[str, Any]) -> np.ndarray:
  """The figure of `plot_buckets` as an RGB image: uint8 [H, W, 3] (for TensorBoard)."""
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  fig = _bucket_figure(summary)
  fig.set_dpi(100)
  fig.canvas.draw()
  image = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
  plt.close(fig)
  return image


def write_report(summary: Mapping[str, Any], directory: str, name: str) -> dict[str, str]:
  """Writes `<directory>/<name>.{json,md,png}`; returns the paths by extension."""
  from etils import epath  # pylint: disable=g-import-not-at-top

  out = epath.Path(directory)
  out.mkdir(parents=True, exist_ok=True)
  paths = {ext: os.fspath(out / f'{name}.{ext}') for ext in ('json', 'md', 'png')}
  epath.Path(paths['json']).write_text(json.dumps(summary, indent=2, sort_keys=True) + '\n')
  epath.Path(paths['md']).write_text(to_markdown(summary))
  plot_buckets(summary, paths['png'])
  return paths
