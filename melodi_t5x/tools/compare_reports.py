r"""Perplexities of eval reports with 95% intervals, and each pairwise ratio with its interval.

    python -m melodi_t5x.tools.compare_reports EVAL_DIR_A/local_books_step400_carried.json \
        EVAL_DIR_B/local_books_step400_carried.json [--labels melodi,xl] [--png cmp.png] [--json J]

Token-level perplexity is `exp(sum of NLL / tokens)` over a test set's documents. Documents, not
tokens, are the independent units (tokens of one book are correlated), so the interval is a
bootstrap over documents: each of `--samples` resamples draws the documents with replacement and
recomputes every report's perplexity from its per-document totals (`per_document` in the report
JSON, `[document_id, tokens, nll_sum]`). The interval is the percentile interval of the resamples.

Reports of the same split (same documents, same token counts) are compared *paired*: one set of
resampled documents for all reports, so a ratio's interval reflects the models' difference on the
same text, not the spread of the test set. Reports of different document sets are resampled
independently and their ratios are marked `unpaired`. With a single document no interval exists;
the table says so instead of printing one.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

CONFIDENCE = 0.95
SAMPLES = 2000
# Below this many documents the table warns that the intervals are coarse.
FEW_DOCUMENTS = 20
_CHUNK = 256  # resamples drawn at a time (bounds the [chunk, documents] count matrix)


@dataclasses.dataclass(frozen=True)
class Report:
  """One report's per-document totals, sorted by document id."""

  label: str
  documents: np.ndarray  # [N] int64 document ids
  tokens: np.ndarray  # [N] int64 scored tokens per document
  nll: np.ndarray  # [N] float64 NLL sum per document

  @property
  def perplexity(self) -> float:
    return float(np.exp(self.nll.sum() / self.tokens.sum()))


def read_report(path: str, label: str | None = None) -> Report:
  """Reads a report JSON written by `t5x.eval` (`melodi_t5x.report.write_report`)."""
  with open(path) as f:
    data = json.load(f)
  rows = data.get('per_document')
  if not rows:
    raise ValueError(
      f'{path} has no per-document totals (`per_document`): it was written before reports kept '
      'them, or scored no token. Re-run t5x.eval on the checkpoint to write a current report.'
    )
  rows = sorted((int(d), int(n), float(s)) for d, n, s in rows)
  docs, tokens, nll = (np.asarray(c) for c in zip(*rows))
  if label is None:
    label = os.path.splitext(os.path.basename(path))[0]
    mode = data.get('memory_mode')
    label = f'{label} ({mode})' if mode and mode not in label else label
  return Report(label, docs.astype(np.int64), tokens.astype(np.int64), nll.astype(np.float64))


def _same_documents(reports: Sequence[Report]) -> bool:
  first = reports[0]
  return all(
    np.array_equal(r.documents, first.documents) and np.array_equal(r.tokens, first.tokens)
    for r in reports[1:]
  )


def _resampled_log_ppl(report: Report, counts: np.ndarray) -> np.ndarray:
  """log perplexity of each resample; counts: [S, N] times each document is drawn."""
  return (counts @ report.nll) / (counts @ report.tokens)


def _draw_counts(rng: np.random.Generator, n: int, samples: int):
  """Yields [chunk, n] multinomial draw counts, `samples` rows in all."""
  for start in range(0, samples, _CHUNK):
    yield rng.multinomial(n, np.full(n, 1.0 / n), size=min(_CHUNK, samples - start))


def bootstrap(
  reports: Sequence[Report],
  samples: int = SAMPLES,
  seed: int = 0,
  confidence: float = CONFIDENCE,
) -> dict[str, Any]:
  """Perplexity of each report and each pairwise ratio, with percentile intervals.

  Returns:
    {'paired', 'samples', 'confidence', 'seed', 'models': [{label, perplexity, documents, tokens,
    low, high}], 'ratios': [{a, b, ratio, low, high, paired}]}; low/high are None (with a 'note')
    where a report has a single document.
  """
  if not reports:
    raise ValueError('no reports to compare.')
  if samples < 100:
    raise ValueError(f'--samples={samples}: use at least 100 resamples for a 95% interval.')
  if not 0.5 < confidence < 1.0:
    raise ValueError(f'--confidence={confidence} must lie in (0.5, 1).')
  rng = np.random.default_rng(seed)
  paired = _same_documents(reports)
  logs = [[] for _ in reports]
  if paired:
    for counts in _draw_counts(rng, len(reports[0].documents), samples):
      for i, r in enumerate(reports):
        logs[i].append(_resampled_log_ppl(r, counts))
  else:
    for i, r in enumerate(reports):
      for counts in _draw_counts(rng, len(r.documents), samples):
        logs[i].append(_resampled_log_ppl(r, counts))
  logs = [np.concatenate(x) for x in logs]
  tail = 100 * (1 - confidence) / 2

  def interval(log_values: np.ndarray, single: bool) -> dict[str, Any]:
    if single:
      return {'low': None, 'high': None, 'note': 'one document: no interval'}
    low, high = np.exp(np.percentile(log_values, [tail, 100 - tail]))
    return {'low': float(low), 'high': float(high)}

  models = [
    {
      'label': r.label,
      'perplexity': r.perplexity,
      'documents': len(r.documents),
      'tokens': int(r.tokens.sum()),
      **interval(logs[i], len(r.documents) < 2),
    }
    for i, r in enumerate(reports)
  ]
  ratios = []
  for (i, a), (j, b) in itertools.combinations(enumerate(reports), 2):
    single = min(len(a.documents), len(b.documents)) < 2
    ratios.append(
      {
        'a': a.label,
        'b': b.label,
        'ratio': a.perplexity / b.perplexity,
        'paired': paired,
        **interval(logs[i] - logs[j], single),
      }
    )
  return {
    'paired': paired,
    'samples': samples,
    'confidence': confidence,
    'seed': seed,
    'models': models,
    'ratios': ratios,
  }


def _ci(row: dict[str, Any], digits: int) -> str:
  if row['low'] is None:
    return row['note']
  return f'[{row["low"]:.{digits}f}, {row["high"]:.{digits}f}]'


def format_table(result: dict[str, Any]) -> str:
  """Markdown: one table of perplexities, one of pairwise ratios."""
  pct = round(100 * result['confidence'])
  how = 'paired, same documents' if result['paired'] else 'unpaired: different documents'
  lines = [
    f'Bootstrap over documents: {result["samples"]} resamples, seed {result["seed"]} ({how}).',
    '',
    f'| report | documents | tokens | perplexity | {pct}% interval |',
    '|---|---:|---:|---:|---|',
  ]
  for m in result['models']:
    lines.append(
      f'| {m["label"]} | {m["documents"]} | {m["tokens"]} | {m["perplexity"]:.3f} | {_ci(m, 3)} |'
    )
  fewest = min(m['documents'] for m in result['models'])
  if 1 < fewest < FEW_DOCUMENTS:
    lines += [
      '',
      f'Only {fewest} documents: a bootstrap over so few has few distinct resamples, so the '
      'intervals are coarse (read them as a rough range, not a calibrated 95%).',
    ]
  if result['ratios']:
    lines += ['', f'| ratio of perplexities | ratio | {pct}% interval |', '|---|---:|---|']
    for r in result['ratios']:
      lines.append(f'| {r["a"]} / {r["b"]} | {r["ratio"]:.4f} | {_ci(r, 4)} |')
  return '\n'.join(lines) + '\n'


def plot(result: dict[str, Any], path: str) -> None:
  """PNG: each report's perplexity with its interval (error bars where one exists)."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  models = result['models']
  fig, ax = plt.subplots(figsize=(max(4.0, 1.4 * len(models) + 1.5), 3.5))
  for x, m in enumerate(models):
    err = None
    if m['low'] is not None:
      err = [[m['perplexity'] - m['low']], [m['high'] - m['perplexity']]]
    ax.errorbar([x], [m['perplexity']], yerr=err, fmt='o', capsize=5)
  ax.set_xticks(range(len(models)))
  ax.set_xticklabels([m['label'] for m in models], rotation=20, ha='right')
  ax.set_ylabel('perplexity')
  ax.set_title(f'{round(100 * result["confidence"])}% bootstrap intervals over documents')
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('reports', nargs='+', help='report JSON files written by t5x.eval')
  parser.add_argument('--labels', default='', help='comma-separated labels, one per report')
  parser.add_argument('--samples', type=int, default=SAMPLES, help='bootstrap resamples')
  parser.add_argument('--seed', type=int, default=0, help='seed of the resampling')
  parser.add_argument('--confidence', type=float, default=CONFIDENCE, help='interval coverage')
  parser.add_argument('--png', default='', help='also plot the perplexities with intervals here')
  parser.add_argument('--json', default='', help='also write the result as JSON here')
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  labels = [s.strip() for s in args.labels.split(',')] if args.labels else []
  if labels and len(labels) != len(args.reports):
    raise SystemExit(
      f'--labels has {len(labels)} labels for {len(args.reports)} reports; give one per report.'
    )
  reports = [read_report(p, labels[i] if labels else None) for i, p in enumerate(args.reports)]
  result = bootstrap(reports, args.samples, args.seed, args.confidence)
  sys.stdout.write(format_table(result))
  if args.png:
    plot(result, args.png)
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(result, f, indent=2)
  return 0


if __name__ == '__main__':
  sys.exit(main())
