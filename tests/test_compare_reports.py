"""Tests of `melodi_t5x.tools.compare_reports` on synthetic reports (no T5X needed)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from melodi_t5x.tools import compare_reports as cr


def _write(path, docs, tokens, nll, mode='carried'):
  rows = [[int(d), int(n), float(s)] for d, n, s in zip(docs, tokens, nll)]
  path.write_text(json.dumps({'per_document': rows, 'memory_mode': mode}))
  return str(path)


def _pair(rng, n_docs, shift):
  """Two models on the same documents; B's per-token NLL is A's plus `shift` (+ noise)."""
  tokens = rng.integers(200, 2000, n_docs)
  per_token_a = rng.normal(3.0, 0.4, n_docs)
  per_token_b = per_token_a + shift + rng.normal(0.0, 0.05, n_docs)
  return tokens, per_token_a * tokens, per_token_b * tokens


def test_interval_covers_a_known_difference_and_excludes_none(tmp_path):
  rng = np.random.default_rng(0)
  tokens, nll_a, nll_b = _pair(rng, 300, shift=0.1)
  docs = np.arange(300) * 7
  a = cr.read_report(_write(tmp_path / 'a.json', docs, tokens, nll_a), 'a')
  b = cr.read_report(_write(tmp_path / 'b.json', docs, tokens, nll_b), 'b')
  result = cr.bootstrap([a, b], samples=1000, seed=1)
  assert result['paired']
  (ratio,) = result['ratios']
  # The population ratio of B to A is exp(0.1): A/B's interval must cover exp(-0.1), exclude 1.
  assert ratio['low'] < math.exp(-0.1) < ratio['high'] < 1.0
  assert ratio['ratio'] == pytest.approx(a.perplexity / b.perplexity)
  for m, r in zip(result['models'], (a, b)):
    direct = math.exp(r.nll.sum() / r.tokens.sum())
    assert m['perplexity'] == pytest.approx(direct) and m['low'] < direct < m['high']
  # Paired: the ratio's interval is far narrower than either perplexity's relative spread.
  width = ratio['high'] / ratio['low']
  assert width < (result['models'][0]['high'] / result['models'][0]['low'])


def test_deterministic_for_a_seed_and_different_for_another(tmp_path):
  rng = np.random.default_rng(2)
  tokens, nll_a, nll_b = _pair(rng, 40, shift=0.02)
  paths = [
    _write(tmp_path / 'a.json', range(40), tokens, nll_a),
    _write(tmp_path / 'b.json', range(40), tokens, nll_b),
  ]
  reports = [cr.read_report(p) for p in paths]
  first = cr.bootstrap(reports, samples=500, seed=3)
  assert first == cr.bootstrap(reports, samples=500, seed=3)
  assert first['ratios'][0]['low'] != cr.bootstrap(reports, samples=500, seed=4)['ratios'][0]['low']


def test_one_document_has_no_interval(tmp_path, capsys):
  paths = [
    _write(tmp_path / 'a.json', [5], [100], [250.0]),
    _write(tmp_path / 'b.json', [5], [100], [260.0]),
  ]
  assert cr.main([*paths, '--labels', 'x,y', '--samples', '200']) == 0
  out = capsys.readouterr().out
  assert 'one document: no interval' in out and '[' not in out.split('interval |')[1]
  assert f'| x | 1 | 100 | {math.exp(2.5):.3f} | one document: no interval |' in out


def test_different_documents_are_compared_unpaired(tmp_path):
  a = cr.read_report(_write(tmp_path / 'a.json', range(10), [50] * 10, np.full(10, 100.0)))
  b = cr.read_report(_write(tmp_path / 'b.json', range(1, 11), [50] * 10, np.full(10, 110.0)))
  result = cr.bootstrap([a, b], samples=200)
  assert not result['paired'] and not result['ratios'][0]['paired']
  assert 'unpaired' in cr.format_table(result)


def test_cli_writes_png_and_json_and_rejects_old_reports(tmp_path, capsys):
  rng = np.random.default_rng(5)
  tokens, nll_a, nll_b = _pair(rng, 12, shift=0.05)
  paths = [
    _write(tmp_path / 'melodi.json', range(12), tokens, nll_a),
    _write(tmp_path / 'xl.json', range(12), tokens, nll_b, mode='reset'),
  ]
  png, out = tmp_path / 'c.png', tmp_path / 'c.json'
  assert cr.main([*paths, '--png', str(png), '--json', str(out), '--samples', '300']) == 0
  assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  assert json.loads(out.read_text())['models'][1]['label'] == 'xl (reset)'
  assert 'melodi (carried) / xl (reset)' in capsys.readouterr().out
  old = tmp_path / 'old.json'
  old.write_text(json.dumps({'perplexity': 3.0}))
  with pytest.raises(ValueError, match='no per-document totals'):
    cr.read_report(str(old))
  with pytest.raises(SystemExit, match='one per report'):
    cr.main([*paths, '--labels', 'only_one'])


def test_few_documents_are_flagged_as_coarse(tmp_path):
  rng = np.random.default_rng(7)
  tokens, nll_a, nll_b = _pair(rng, 3, shift=0.05)
  reports = [
    cr.read_report(_write(tmp_path / f'{n}.json', range(3), tokens, nll))
    for n, nll in (('a', nll_a), ('b', nll_b))
  ]
  assert 'Only 3 documents' in cr.format_table(cr.bootstrap(reports, samples=200))
  tokens, nll_a, nll_b = _pair(rng, 30, shift=0.05)
  many = [cr.read_report(_write(tmp_path / 'c.json', range(30), tokens, nll_a))]
  assert 'Only' not in cr.format_table(cr.bootstrap(many, samples=200))
