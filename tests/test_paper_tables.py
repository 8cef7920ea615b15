"""The tables tool on synthetic eval reports (no T5X): numbers only from final reports."""

from __future__ import annotations

import json
import math
import re

import pytest

from melodi_t5x import experiments
from melodi_t5x.tools import paper_tables

ROOT_SWEEPS = ('main', 'coverage')


def _write_report(root, exp, step, mode, ppl):
  eval_dir = root / exp.sweep / exp.name / 'eval'
  eval_dir.mkdir(parents=True, exist_ok=True)
  report = {'perplexity': ppl, 'tokens': 1000, 'checkpoint_step': step, 'memory_mode': mode}
  (eval_dir / f'{exp.dataset}_step{step}_{mode}.json').write_text(json.dumps(report))


def test_main_table_from_reports(tmp_path, capsys):
  exps = {(e.dataset, e.model): e for e in experiments.sweep('main')}
  done = exps[('pg19_t5', 'melodi_s128_l64')]
  _write_report(tmp_path, done, 500_000, 'carried', 10.4412)
  _write_report(tmp_path, done, 500_000, 'reset', 12.5)
  unfinished = exps[('pg19_t5', 'xl')]
  _write_report(tmp_path, unfinished, 250_000, 'carried', 13.0)  # an earlier checkpoint only
  assert paper_tables.main(['--sweep=main', f'--model_dir_root={tmp_path}']) == 0
  md = capsys.readouterr().out
  lines = {line.split(' | ')[0]: line for line in md.splitlines() if line.startswith('| ')}
  carried = md.split('## Same checkpoints')[0]
  assert '| MELODI S128+L64 |' in carried
  row = next(x for x in carried.splitlines() if x.startswith('| MELODI S128+L64 |'))
  cells = [c.strip() for c in row.strip('|').split('|')]
  assert cells[2:] == ['10.44', 'missing', 'missing']  # PG-19, arXiv, C4
  xl = next(x for x in carried.splitlines() if x.startswith('| Transformer-XL |'))
  assert 'unfinished (step 250000)' in xl and '13.0' not in xl
  reset = md.split('## Same checkpoints')[1]
  assert '| 12.50 |' in next(x for x in reset.splitlines() if x.startswith('| MELODI S128+L64 |'))
  assert lines  # the tables were printed
  data = json.loads((tmp_path / 'tables' / 'main.json').read_text())
  runs = {(r['dataset'], r['model']): r for r in data['runs']}
  assert len(runs) == 18
  assert runs[('pg19_t5', 'melodi_s128_l64')]['perplexity'] == {'carried': 10.4412, 'reset': 12.5}
  assert runs[('pg19_t5', 'xl')]['perplexity']['carried'] is None
  assert runs[('pg19_t5', 'xl')]['status']['carried'] == 'unfinished (step 250000)'
  assert runs[('c4_4k', 'brt')]['status'] == {'carried': 'missing', 'reset': 'missing'}


def test_main_table_memory_column(tmp_path, capsys):
  """Memory in M floats from memory_accounting: the paper's values at the paper's sizes."""
  pytest.importorskip('melodi_t5x.memory_accounting')
  paper_tables.main(['--sweep=main', f'--model_dir_root={tmp_path}'])
  carried = capsys.readouterr().out.split('## Same checkpoints')[0]
  paper = {
    'Transformer-XL': '13.6',
    'Block-Recurrent': '13.1',
    'Memorizing (dense 64K)': '147.8',
    'MELODI S192+L32': '11.0',
    'MELODI S128+L64': '18.5',
    'MELODI S192+L96': '27.8',
  }
  for label, mem in paper.items():
    assert f'| {label} | {mem} | missing | missing | missing |' in carried, label


def test_ablation_table_and_plot(tmp_path, capsys):
  exps = experiments.sweep('coverage')
  for i, exp in enumerate(exps[:-1]):  # the 128-window run has no report
    _write_report(tmp_path, exp, 200_000, 'carried', 12.0 - 0.1 * i)
  out = tmp_path / 'out'
  paper_tables.main(['--sweep=coverage', f'--model_dir_root={tmp_path}', f'--out_dir={out}'])
  md = capsys.readouterr().out
  rows = [x for x in md.splitlines() if x.startswith('| ') and 'windows' in x]
  assert len(rows) == 7
  assert '| 11.50 |' in rows[5] and rows[-1].count('missing') == 2
  assert (out / 'coverage.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  data = json.loads((out / 'coverage.json').read_text())
  assert [r['x'] for r in data['runs']] == [2, 4, 8, 16, 32, 64, 128]
  assert math.isclose(data['runs'][0]['perplexity']['carried'], 12.0)


def test_timing_table(tmp_path, capsys):
  (tmp_path / 'timing').mkdir()
  result = {'step_sec_median': 0.25, 'tokens_per_sec': 16384.0, 'params': 151e6, 'device': 'TPU'}
  result['config'] = {'num_layers': 12, 'embed_dim': 1024}  # as bench --json writes it
  (tmp_path / 'timing' / 'xl_train.json').write_text(json.dumps(result))
  paper_tables.main(['--sweep=timing', f'--model_dir_root={tmp_path}'])
  md = capsys.readouterr().out
  assert '## timing (12 layers, d=1024)' in md  # the size the results were measured at
  row = next(x for x in md.splitlines() if x.startswith('| Transformer-XL |'))
  assert '| 250.0 | 16384 | missing | missing | 151.0M | TPU |' in row


def test_tiny_sweep_prints_memory_in_thousands(tmp_path, capsys):
  """The tiny rehearsal models carry a few thousand floats: K floats, never a column of 0.0."""
  paper_tables.main(['--sweep=main', f'--model_dir_root={tmp_path}', '--size=tiny'])
  carried = capsys.readouterr().out.split('## Same checkpoints')[0]
  assert '| Model | Memory (K floats) |' in carried
  for exp in experiments.sweep('main', size='tiny'):
    floats = paper_tables.memory_floats(exp)[1]
    assert 0 < floats < 1e6, (exp.name, floats)
    label = experiments.MODELS[exp.model].label
    assert f'| {label} | {floats / 1e3:.1f} |' in carried, label


def _write_at(root, run_id, dataset, step, mode, ppl):
  eval_dir = root / run_id / 'eval'
  eval_dir.mkdir(parents=True, exist_ok=True)
  report = {'perplexity': ppl, 'tokens': 1000, 'checkpoint_step': step, 'memory_mode': mode}
  (eval_dir / f'{dataset}_step{step}_{mode}.json').write_text(json.dumps(report))


def test_seed_replicates_show_mean_and_spread(tmp_path, capsys):
  """Issue 16 item 4: `<run_dir>/seed<N>` replicates -> mean ± sample std (n), min-max in JSON."""
  exps = experiments.sweep('coverage')
  for seed, ppl in ((0, 10.0), (1, 11.0), (2, 12.5)):
    _write_at(tmp_path, f'{exps[0].run_id}/seed{seed}', exps[0].dataset, 200_000, 'carried', ppl)
  _write_at(tmp_path, exps[1].run_id, exps[1].dataset, 200_000, 'carried', 9.0)  # one seed
  out = tmp_path / 'out'
  paper_tables.main(['--sweep=coverage', f'--model_dir_root={tmp_path}', f'--out_dir={out}'])
  md = capsys.readouterr().out
  rows = [x for x in md.splitlines() if x.startswith('| ') and 'windows' in x]
  mean = (10.0 + 11.0 + 12.5) / 3
  std = math.sqrt(((10 - mean) ** 2 + (11 - mean) ** 2 + (12.5 - mean) ** 2) / 2)
  assert f'| 11.17 ± {std:.2f} (n=3) |' in rows[0]
  assert '| 9.00 |' in rows[1] and '±' not in rows[1]
  assert 'mean ± sample standard deviation' in md
  run = json.loads((out / 'coverage.json').read_text())['runs'][0]
  rep = run['replicates']['carried']
  assert (rep['n'], rep['min'], rep['max']) == (3, 10.0, 12.5)
  assert math.isclose(rep['mean'], mean) and math.isclose(rep['std'], std)
  assert [r['replicate'] for r in rep['runs']] == ['seed0', 'seed1', 'seed2']


def test_window_plot_is_the_increase_over_w512(tmp_path):
  """Issue 16 item 10: the paper plots perplexity minus the same model's W=512 perplexity."""
  ppl = {('melodi_s128_l64', 512): 10.0, ('melodi_s128_l64', 256): 10.5}
  ppl |= {('melodi_s128_l64', 128): 11.5, ('xl', 512): 12.0, ('xl', 256): 13.0, ('xl', 128): 15.0}
  for exp in experiments.sweep('window'):
    key = (exp.model, int(exp.column[2:]))
    if key in ppl:
      _write_at(tmp_path, exp.run_id, exp.dataset, 200_000, 'carried', ppl[key])
  out = tmp_path / 'out'
  paper_tables.main(['--sweep=window', f'--model_dir_root={tmp_path}', f'--out_dir={out}'])
  data = json.loads((out / 'window.json').read_text())
  lines = data['plot']['series']
  assert 'increase in perplexity over W=512' in data['plot']['ylabel']
  assert lines['MELODI S128+L64'] == [[128, 1.5, 'W=128'], [256, 0.5, 'W=256'], [512, 0.0, 'W=512']]
  assert lines['Transformer-XL'] == [[128, 3.0, 'W=128'], [256, 1.0, 'W=256'], [512, 0.0, 'W=512']]
  assert data['plot_absolute']['series']['Transformer-XL'][0][1] == 15.0
  for name in ('window.png', 'window_absolute.png'):
    assert (out / name).read_bytes()[:4] == b'\x89PNG'


def test_memory_tradeoff_plot_varies_s_along_each_l(tmp_path):
  """Issue 16 item 10: one line per long-term increment L; S varies along it."""
  pytest.importorskip('melodi_t5x.memory_accounting')
  for i, exp in enumerate(experiments.sweep('memory_tradeoff')):
    _write_at(tmp_path, exp.run_id, exp.dataset, 200_000, 'carried', 12.0 - 0.1 * i)
  out = tmp_path / 'out'
  paper_tables.main(['--sweep=memory_tradeoff', f'--model_dir_root={tmp_path}', f'--out_dir={out}'])
  data = json.loads((out / 'memory_tradeoff.json').read_text())
  lines = data['plot']['series']
  assert sorted(lines) == ['L=0 (no long-term)', 'L=32', 'L=64', 'L=96']
  for pts in lines.values():
    assert [p[2] for p in pts] == ['S64', 'S128', 'S192']  # memory grows with S on a fixed L
  assert sorted(data['plot_by_s']['series']) == ['S128', 'S192', 'S64']
  assert (out / 'memory_tradeoff_by_s.png').read_bytes()[:4] == b'\x89PNG'


def test_single_runs_show_their_bootstrap_interval_over_documents(tmp_path, capsys):
  exps = {(e.dataset, e.model): e for e in experiments.sweep('main')}
  done = exps[('pg19_t5', 'xl')]
  eval_dir = tmp_path / done.sweep / done.name / 'eval'
  eval_dir.mkdir(parents=True)
  per_doc = [[d, 1000, 1000 * (2.3 + 0.1 * (d % 3))] for d in range(30)]
  ppl = math.exp(sum(r[2] for r in per_doc) / 30000)
  report = {'perplexity': ppl, 'per_document': per_doc, 'memory_mode': 'carried'}
  (eval_dir / 'pg19_t5_step500000_carried.json').write_text(json.dumps(report))
  assert paper_tables.main(['--sweep=main', f'--model_dir_root={tmp_path}']) == 0
  row = next(x for x in capsys.readouterr().out.splitlines() if x.startswith('| Transformer-XL'))
  cell = [c.strip() for c in row.strip('|').split('|')][2]
  match = re.fullmatch(r'([\d.]+) \[([\d.]+), ([\d.]+)\]', cell)
  value, low, high = map(float, match.groups())
  assert value == pytest.approx(ppl, abs=0.005) and low < ppl < high
  # The per-document NLL spans exp(2.3)..exp(2.5): the interval lies within that range.
  assert math.exp(2.3) < low and high < math.exp(2.5)


def test_ablation_reports_show_the_rise_over_carried(tmp_path, capsys):
  exps = {(e.dataset, e.model): e for e in experiments.sweep('main')}
  done = exps[('pg19_t5', 'melodi_s128_l64')]
  _write_report(tmp_path, done, 500_000, 'carried', 10.0)
  _write_report(tmp_path, done, 500_000, 'no_long_term', 11.5)
  _write_report(tmp_path, done, 500_000, 'no_short_term', 13.0)
  _write_report(tmp_path, done, 400_000, 'no_short_term', 99.0)  # another step: not shown
  assert paper_tables.main(['--sweep=main', f'--model_dir_root={tmp_path}']) == 0
  md = capsys.readouterr().out.split('## Eval-time memory ablations')[1]
  header, _, row = md.strip().splitlines()[2:5]
  assert header == '| Run | carried | no_long_term | no_short_term |'
  assert row.endswith('| 10.00 | 11.50 (+15.0%) | 13.00 (+30.0%) |')


def test_window_positions_of_every_mode_are_overlaid_on_one_plot(tmp_path, capsys):
  exps = {(e.dataset, e.model): e for e in experiments.sweep('main')}
  done = exps[('pg19_t5', 'xl')]
  eval_dir = tmp_path / done.sweep / done.name / 'eval'
  eval_dir.mkdir(parents=True)
  for mode, first in (('carried', 80.0), ('reset', 95.0), ('no_cache', 190.0)):
    windows = [{'start': i, 'end': i + 1, 'tokens': 10, 'perplexity': first - i} for i in range(4)]
    report = {'perplexity': first - 2, 'memory_mode': mode, 'window_positions': windows}
    (eval_dir / f'pg19_t5_step500000_{mode}.json').write_text(json.dumps(report))
  assert paper_tables.main(['--sweep=main', f'--model_dir_root={tmp_path}']) == 0
  assert f'plot: {tmp_path}/tables/main_window_positions.png' in capsys.readouterr().out
  png = tmp_path / 'tables' / 'main_window_positions.png'
  assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  runs = json.loads((tmp_path / 'tables' / 'main.json').read_text())['runs']
  xl = next(r for r in runs if r['dataset'] == 'pg19_t5' and r['model'] == 'xl')
  assert sorted(xl['window_positions']) == ['carried', 'no_cache', 'reset']
  assert xl['window_positions']['no_cache'][0]['perplexity'] == 190.0
