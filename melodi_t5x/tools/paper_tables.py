r"""Prints the paper's tables from the eval reports of a sweep's runs (Markdown, JSON, PNG).

Usage:
  python -m melodi_t5x.tools.paper_tables --sweep=main --model_dir_root=gs://BUCKET/melodi
  python -m melodi_t5x.tools.paper_tables --sweep=coverage --model_dir_root=... [--out_dir=DIR]
  python -m melodi_t5x.tools.paper_tables --sweep=main --size=tiny --task=local_books \
    --model_dir_root=/tmp/melodi_rehearsal        # the local rehearsal

Each run of the sweep (`melodi_t5x.experiments`) is read from
`<model_dir_root>/<sweep>/<experiment>/eval/<task>_step<N>_<mode>.json` (written by `t5x.eval`
with gin/experiments/eval.gin), N being the run's final step. `main` gives the paper's table:
models x datasets, token-level perplexity with carried memory, and the memory in millions of
floats (paper convention, `melodi_t5x.memory_accounting`), then the same with memory reset at
every chunk. An ablation family gives one row per grid point and its plot (perplexity against
memory, coverage, window or short-term layers; bars for the others). `timing` gives the benchmark
table. A run without the final report shows as `missing` or `unfinished (step N)`, never as a
number. Writes `<out_dir>/<sweep>.{md,json[,png]}` (default out_dir: <model_dir_root>/tables).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import tempfile
from collections.abc import Sequence
from typing import Any

import numpy as np
from etils import epath

from melodi_t5x import experiments
from melodi_t5x.tools import compare_reports

MISSING = 'missing'
# T5X configurables of the model files, skipped when parsing without T5X.
T5X_SELECTORS = list(experiments.T5X_SELECTORS)
PLOT_X = {
  'memory_tradeoff': ('memory (M floats, paper convention)', 'memory', False),
  'coverage': ('long-term coverage (windows)', 'x', True),
  'window': ('context window W (tokens)', 'x', True),
  'short_layers': ('layers with short-term memory', 'x', False),
}


# -- reading runs --------------------------------------------------------------------------------


def read_report(eval_dir: epath.Path, task: str, step: int, mode: str) -> tuple[str, Any]:
  """(status, report or None): 'done' with the step-N report, else 'unfinished (step M)' or
  'missing'."""
  pattern = re.compile(rf'{re.escape(task)}_step(\d+)_{mode}\.json')
  steps = []
  if eval_dir.exists():
    for path in eval_dir.iterdir():
      m = pattern.fullmatch(path.name)
      if m:
        steps.append(int(m.group(1)))
  if step in steps:
    report = json.loads((eval_dir / f'{task}_step{step}_{mode}.json').read_text())
    if report.get('perplexity') is None:
      return 'empty report', None
    return 'done', report
  if steps:
    return f'unfinished (step {max(steps)})', None
  return MISSING, None


def experiment_config(exp: experiments.Experiment):
  """The model config of an experiment, built from its gin text (T5X not needed)."""
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, f'{exp.name}.gin')
    with open(path, 'w') as f:
      f.write(experiments.render(exp))
    return experiments.decoder_config([path])


def memory_floats(exp: experiments.Experiment) -> tuple[float | None, int | None]:
  """Carried memory per sequence: (millions of floats as the paper prints them, exact floats).

  Paper convention (`melodi_t5x.memory_accounting`): short-term memory tokens x d per layer,
  long-term / cached / external memories as keys + values. (None, None) if that module is absent.
  """
  try:
    from melodi_t5x import memory_accounting  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None, None
  cfg = experiment_config(exp)
  return memory_accounting.paper_millions(cfg), memory_accounting.paper_floats(cfg)


def replicate_dirs(run_dir: epath.Path) -> list[tuple[str, epath.Path]]:
  """(label, model dir) of a run's trainings: `<run_dir>` itself and each `<run_dir>/seed<N>`.

  Seed replicates (the launcher's `--seeds`) train into `<run_dir>/seed<N>`; a single default
  seed trains into `<run_dir>`. Each with its own `eval/` folder.
  """
  out = [('', run_dir)]
  if run_dir.exists():
    seeds = [p for p in run_dir.iterdir() if re.fullmatch(r'seed\d+', p.name) and p.is_dir()]
    out += [(p.name, p) for p in sorted(seeds, key=lambda p: int(p.name[4:]))]
  return out


def combine(values: Sequence[float]) -> dict[str, Any]:
  """Mean and spread of replicate perplexities: sample std (ddof 1), min and max."""
  n = len(values)
  mean = sum(values) / n
  std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
  return {'n': n, 'mean': mean, 'std': std, 'min': min(values), 'max': max(values)}


def document_interval(report: dict[str, Any]) -> list[float] | None:
  """95% bootstrap interval over the report's documents (`compare_reports`), if it has >= 2."""
  if len(report.get('per_document') or ()) < 2:
    return None
  rows = sorted(report['per_document'])
  ids, tokens, nll = (np.asarray(c) for c in zip(*rows))
  model = compare_reports.bootstrap([compare_reports.Report('', ids, tokens, nll)])['models'][0]
  return [model['low'], model['high']]


def ablation_reports(
  eval_dir: epath.Path, task: str, step: int, window_positions: dict | None = None
) -> dict[str, float]:
  """Perplexity of each eval-time ablation ('no_<source>' memory mode) reported at `step`; each
  report's `window_positions` go into `window_positions[mode]` if given."""
  pattern = re.compile(rf'{re.escape(task)}_step{step}_(no_\w+)\.json')
  found = {}
  if eval_dir.exists():
    for path in sorted(eval_dir.iterdir()):
      m = pattern.fullmatch(path.name)
      if m:
        report = json.loads(path.read_text())
        if report.get('perplexity') is not None:
          found[m.group(1)] = report['perplexity']
          if window_positions is not None and report.get('window_positions'):
            window_positions[m.group(1)] = report['window_positions']
  return found


def memory_ablation_table(runs: Sequence[dict[str, Any]]) -> str:
  """Runs with eval-time ablation reports: perplexity per dropped source and its rise over
  carried memory ('' if no run has one)."""
  rows = [r for r in runs if r['ablations']]
  if not rows:
    return ''
  modes = sorted({m for r in rows for m in r['ablations']})
  lines = [
    '| Run | carried | ' + ' | '.join(modes) + ' |',
    '|---|---:|' + '---:|' * len(modes),
  ]
  for r in rows:
    carried = r['perplexity'].get('carried')
    cells = []
    for mode in modes:
      ppl = r['ablations'].get(mode)
      if ppl is None:
        cells.append('')
      elif carried:
        cells.append(f'{ppl:.2f} ({100 * (ppl / carried - 1):+.1f}%)')
      else:
        cells.append(f'{ppl:.2f}')
    head = f'{carried:.2f}' if carried else r['status'].get('carried', '')
    lines.append(f'| {r["name"]} | {head} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def collect(
  exps: Sequence[experiments.Experiment], root: str, train_steps: int | None = None
) -> list[dict[str, Any]]:
  """One record per table entry: status, perplexities per memory mode, memory, labels.

  An entry whose configuration another experiment trains (`Experiment.alias`) reads that run.
  With seed replicates, `perplexity` is their mean and `replicates` holds each one and the spread.
  """
  runs = []
  for exp in exps:
    steps = train_steps or exp.train_steps
    run_dir = epath.Path(f'{root.rstrip("/")}/{exp.run_id}')
    record = {
      'name': exp.table_name,
      'run': exp.run_id,
      'model': exp.model,
      'dataset': exp.dataset,
      'row': exp.row,
      'column': exp.column,
      'x': exp.x,
      'series': exp.series,
      'step': steps,
      'memory_mfloats': None,
      'memory_floats': None,
      'perplexity': {},
      'status': {},
      'replicates': {},
      'interval': {},
      'ablations': {},
      # Perplexity by offset in the window, per memory mode (single runs whose reports have it).
      'window_positions': {},
    }
    record['memory_mfloats'], record['memory_floats'] = memory_floats(exp)
    record['ablations'] = ablation_reports(
      run_dir / 'eval', exp.dataset, steps, record['window_positions']
    )
    for mode in experiments.MEMORY_MODES:
      found, pending, default_status = [], [], MISSING
      for label, model_dir in replicate_dirs(run_dir):
        status, report = read_report(model_dir / 'eval', exp.dataset, steps, mode)
        if report:
          found.append(
            {
              'replicate': label or 'default',
              'perplexity': report['perplexity'],
              'interval': document_interval(report),
            }
          )
          if not label and report.get('window_positions'):
            record['window_positions'][mode] = report['window_positions']
        elif label:
          pending.append(f'{label}: {status}')
        else:
          default_status = status
      if found:
        spread = combine([f['perplexity'] for f in found])
        record['perplexity'][mode] = spread['mean']
        record['status'][mode] = 'done' if len(found) == 1 else f'done ({len(found)} replicates)'
        record['replicates'][mode] = {'runs': found, **spread, 'pending': pending}
        record['interval'][mode] = found[0]['interval'] if len(found) == 1 else None
      else:
        record['perplexity'][mode] = None
        statuses = {p.split(': ', 1)[1] for p in pending}
        if statuses == {MISSING}:
          record['status'][mode] = MISSING
        else:
          record['status'][mode] = '; '.join(pending[:3]) if pending else default_status
    runs.append(record)
  return runs


# -- tables --------------------------------------------------------------------------------------


SPREAD_NOTE = (
  'Runs with seed replicates show mean ± sample standard deviation over the n replicates '
  '(min-max in the JSON); a single run shows its 95% bootstrap interval over the test documents '
  '[low, high] where the test set has several documents (melodi_t5x.tools.compare_reports).'
)


def _cell(run: dict[str, Any] | None, mode: str) -> str:
  if run is None:
    return 'not in sweep'
  ppl = run['perplexity'][mode]
  if ppl is None:
    return run['status'][mode]
  rep = run.get('replicates', {}).get(mode)
  if rep and rep['n'] > 1:
    return f'{ppl:.2f} ± {rep["std"]:.2f} (n={rep["n"]})'
  interval = run.get('interval', {}).get(mode)
  if interval:
    return f'{ppl:.2f} [{interval[0]:.2f}, {interval[1]:.2f}]'
  return f'{ppl:.2f}'


def _memory_column(runs: Sequence[dict[str, Any]]):
  """Header and formatter of the memory column: M floats (paper), K floats for tiny models."""
  exact = [r['memory_floats'] for r in runs if r['memory_floats'] is not None]
  if exact and max(exact) < 1e6:  # would print as 0.0M or 0.1M: the tiny rehearsal sizes
    return 'Memory (K floats)', lambda r: f'{r["memory_floats"] / 1e3:.1f}'
  return 'Memory (M floats)', lambda r: f'{r["memory_mfloats"]:.1f}'


def _mem(run: dict[str, Any], fmt) -> str:
  return fmt(run) if run['memory_floats'] is not None else 'n/a'


def main_table(runs: Sequence[dict[str, Any]], mode: str) -> str:
  """Models x datasets (the paper's main table), memory of each model."""
  columns = list(dict.fromkeys(r['column'] for r in runs))
  rows = list(dict.fromkeys(r['row'] for r in runs))
  by_cell = {(r['row'], r['column']): r for r in runs}
  header, fmt = _memory_column(runs)
  lines = [
    f'| Model | {header} | ' + ' | '.join(columns) + ' |',
    '|---|---:|' + '---:|' * len(columns),
  ]
  for row in rows:
    mem = _mem(next(r for r in runs if r['row'] == row), fmt)
    cells = [_cell(by_cell.get((row, c)), mode) for c in columns]
    lines.append(f'| {row} | {mem} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def ablation_table(runs: Sequence[dict[str, Any]]) -> str:
  header, fmt = _memory_column(runs)
  lines = [
    f'| Setting | {header} | Perplexity (carried) | Perplexity (reset) | Run |',
    '|---|---:|---:|---:|---|',
  ]
  for r in runs:
    run = r['name'] if r['run'].endswith(f'/{r["name"]}') else f'{r["run"]} (shared)'
    lines.append(
      f'| {r["row"]} | {_mem(r, fmt)} | {_cell(r, "carried")} | {_cell(r, "reset")} | {run} |'
    )
  return '\n'.join(lines)


def timing_table(root: str) -> tuple[str, list[dict[str, Any]]]:
  """Benchmark JSONs (`<root>/timing/<model>_<step>.json`) as a models x step-kinds table."""
  rows, lines = [], []
  head = '| Model | ' + ' | '.join(
    f'{s} step (ms) | {s} tokens/s' for s in experiments.TIMING_STEPS
  )
  lines += [head + ' | Params | Device |', '|---|' + '---:|---:|' * 2 + '---:|---|']
  for model in experiments.TIMING_MODELS:
    record = {'model': model, 'label': experiments.MODELS[model].label}
    cells, params, device = [], 'n/a', 'n/a'
    for step in experiments.TIMING_STEPS:
      path = epath.Path(f'{root.rstrip("/")}/timing/{model}_{step}.json')
      if path.exists():
        data = json.loads(path.read_text())
        record[step] = data
        cells += [f'{1000 * data["step_sec_median"]:.1f}', f'{data["tokens_per_sec"]:.0f}']
        params, device = f'{data["params"] / 1e6:.1f}M', data['device']
      else:
        record[step] = None
        cells += [MISSING, MISSING]
    rows.append(record)
    lines.append(f'| {record["label"]} | ' + ' | '.join(cells) + f' | {params} | {device} |')
  return '\n'.join(lines), rows


# -- plots ---------------------------------------------------------------------------------------


# The paper's plot of a family, and the other form also written (`<sweep>_<suffix>.png`).
ALTERNATIVE_PLOTS = {'memory_tradeoff': 'by_s', 'window': 'absolute'}
WINDOW_REFERENCE = 'W=512'


def plot_series(sweep: str, runs: Sequence[dict[str, Any]], form: str = 'paper') -> dict[str, Any]:
  """The lines of a family's plot: {'xlabel', 'ylabel', 'log2', 'series': {label: points}}.

  Points are `[x, y, label]` (carried perplexity; runs without a final report are left out).
  `form='paper'` is the paper's figure: for `memory_tradeoff` one line per long-term increment L
  along which S varies (points labelled by S); for `window` the increase in perplexity over W=512
  of the same model as the window shrinks. The other form (`ALTERNATIVE_PLOTS`): one line per S,
  and absolute perplexity.
  """
  xlabel, key, log2 = PLOT_X[sweep]
  ylabel = 'test perplexity (carried memory)'
  done = [r for r in runs if r['perplexity']['carried'] is not None]

  def group(r):
    if sweep == 'memory_tradeoff' and form != 'paper':
      return _summary_label(r)  # one line per S
    return r['series']

  series: dict[str, list[list[Any]]] = {}
  for r in done:
    x = _plot_x(r, key)
    if x is None:
      continue
    if sweep == 'memory_tradeoff':
      label = _summary_label(r) if form == 'paper' else r['series']
    else:
      label = r['row'] if sweep != 'window' else r['column']
    series.setdefault(group(r), []).append([x, r['perplexity']['carried'], label])
  if sweep == 'window' and form == 'paper':
    ylabel = f'increase in perplexity over {WINDOW_REFERENCE} (same model)'
    reference = {
      r['series']: r['perplexity']['carried'] for r in done if r['column'] == WINDOW_REFERENCE
    }
    series = {
      name: [[x, y - reference[name], label] for x, y, label in pts]
      for name, pts in series.items()
      if name in reference
    }
  ordered = {name: sorted(pts, key=lambda p: p[0]) for name, pts in series.items()}
  return {'xlabel': xlabel, 'ylabel': ylabel, 'log2': log2, 'series': ordered}


def _summary_label(run: dict[str, Any]) -> str:
  """'S128' of a memory trade-off row ('S128+L64' or 'S128 (no long-term)')."""
  return run['row'].split('+')[0].split(' ')[0]


def plot(sweep: str, runs: Sequence[dict[str, Any]], path: epath.Path, form: str = 'paper') -> None:
  """PNG of an ablation family: its `plot_series` lines, or bars for the families without x."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, ax = plt.subplots(figsize=(6.4, 4.2))
  done = [r for r in runs if r['perplexity']['carried'] is not None]
  missing = len(runs) - len(done)
  ylabel = 'test perplexity (carried memory)'
  if sweep in PLOT_X:
    lines = plot_series(sweep, runs, form)
    for name, pts in lines['series'].items():
      ax.plot([p[0] for p in pts], [p[1] for p in pts], marker='o', label=name)
      if sweep == 'memory_tradeoff':
        for x, y, label in pts:
          ax.annotate(label, (x, y), fontsize=7)
    if lines['log2']:
      ax.set_xscale('log', base=2)
    ax.set_xlabel(lines['xlabel'])
    ylabel = lines['ylabel']
    if len(lines['series']) > 1:
      ax.legend(fontsize=8)
  else:
    labels = [
      r['row'] if r['perplexity']['carried'] is not None else f'{r["row"]}\n(missing)' for r in runs
    ]
    ax.bar(range(len(runs)), [r['perplexity']['carried'] or 0.0 for r in runs])
    ax.set_xticks(range(len(runs)))
    ax.set_xticklabels(labels, rotation=15, ha='right', fontsize=8)
  ax.set_ylabel(ylabel)
  title = f'{sweep}' + (
    f' ({missing} of {len(runs)} runs without a final report)' if missing else ''
  )
  ax.set_title(title)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  with path.open('wb') as f:
    fig.savefig(f, format='png', dpi=100)
  plt.close(fig)


def _plot_x(run: dict[str, Any], key: str) -> float | None:
  if key == 'memory':
    return None if run['memory_floats'] is None else run['memory_floats'] / 1e6
  return run['x']


# -- main ----------------------------------------------------------------------------------------


def build(sweep: str, root: str, size: str, task: str | None, train_steps: int | None):
  """(markdown, json-able dict, runs) of one sweep."""
  if sweep == 'timing':
    md, rows = timing_table(root)
    sizes = sorted(
      {
        (r[step]['config']['num_layers'], r[step]['config']['embed_dim'])
        for r in rows
        for step in experiments.TIMING_STEPS
        if r[step] and 'config' in r[step]
      }
    )
    what = ', '.join(f'{n} layers, d={d}' for n, d in sizes) or 'no results yet'
    return f'## timing ({what})\n\n{md}\n', {'sweep': sweep, 'timing': rows}, []
  exps = experiments.sweep(sweep, size=size, dataset=task if size != 'paper' else None)
  runs = collect(exps, root, train_steps)
  if sweep == 'main':
    md = (
      '## Main table: test perplexity, memory carried over each document\n\n'
      + main_table(runs, 'carried')
      + '\n\n## Same checkpoints, memory reset at every chunk\n\n'
      + main_table(runs, 'reset')
      + '\n'
    )
  else:
    md = f'## Ablation: {sweep}\n\n' + ablation_table(runs) + '\n'
  ablations = memory_ablation_table(runs)
  if ablations:
    md += (
      '\n## Eval-time memory ablations: perplexity with one memory source dropped '
      '(rise over carried memory)\n\n' + ablations + '\n'
    )
  if any(rep['n'] > 1 for r in runs for rep in r['replicates'].values()):
    md += f'\n{SPREAD_NOTE}\n'
  data = {'sweep': sweep, 'size': size, 'model_dir_root': root, 'runs': runs}
  if sweep in PLOT_X:
    data['plot'] = plot_series(sweep, runs)
    if sweep in ALTERNATIVE_PLOTS:
      data[f'plot_{ALTERNATIVE_PLOTS[sweep]}'] = plot_series(sweep, runs, 'alternative')
  return md, data, runs


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--sweep', required=True, choices=experiments.sweep_names())
  parser.add_argument('--model_dir_root', required=True)
  parser.add_argument('--size', default='paper', choices=sorted(experiments.SCALES))
  parser.add_argument('--task', default=None, help='task of a --size=tiny sweep')
  parser.add_argument('--train_steps', type=int, default=None, help='final step (if overridden)')
  parser.add_argument('--out_dir', default=None, help='default: <model_dir_root>/tables')
  args = parser.parse_args(argv)
  md, data, runs = build(args.sweep, args.model_dir_root, args.size, args.task, args.train_steps)
  out = epath.Path(args.out_dir or f'{args.model_dir_root.rstrip("/")}/tables')
  out.mkdir(parents=True, exist_ok=True)
  (out / f'{args.sweep}.md').write_text(md)
  (out / f'{args.sweep}.json').write_text(json.dumps(data, indent=1, default=_json_default) + '\n')
  print(md)
  if any(r['window_positions'] for r in runs):
    path = out / f'{args.sweep}_window_positions.png'
    plot_window_overlay(args.sweep, runs, path)
    print(f'plot: {path}')
  if runs and args.sweep != 'main':
    plot(args.sweep, runs, out / f'{args.sweep}.png')
    print(f'plot: {out / f"{args.sweep}.png"}')
    if args.sweep in ALTERNATIVE_PLOTS:
      alt = out / f'{args.sweep}_{ALTERNATIVE_PLOTS[args.sweep]}.png'
      plot(args.sweep, runs, alt, 'alternative')
      print(f'plot: {alt}')
  print(f'written: {out / args.sweep}.{{md,json}}')
  return 0


def plot_window_overlay(sweep: str, runs: Sequence[dict[str, Any]], path: epath.Path) -> None:
  """One plot of perplexity by offset in the window: a line per run and memory mode."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  from melodi_t5x import report as report_lib  # pylint: disable=g-import-not-at-top

  series = [
    (f'{r["name"]} ({mode})', windows)
    for r in runs
    for mode, windows in r['window_positions'].items()
  ]
  fig, ax = plt.subplots(figsize=(8.0, 4.5))
  report_lib.plot_window_positions(ax, series)
  ax.set_title(f'{sweep}: perplexity by position in the window')
  fig.tight_layout()
  with path.open('wb') as f:
    fig.savefig(f, dpi=100, format='png')
  plt.close(fig)


def _json_default(value):
  if isinstance(value, float) and math.isnan(value):
    return None
  raise TypeError(f'not JSON-serialisable: {value!r}')


if __name__ == '__main__':
  raise SystemExit(main())
