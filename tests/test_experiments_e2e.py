"""A tiny ablation family end to end on CPU: launcher --local -> t5x.train -> t5x.eval -> tables,
then a rerun that the step runner skips entirely.

The `long_layers` family at the tiny size (2 grid points: one long-term layer with L=4 vs two with
L=2) on a small `text_corpus` written here, a few training steps each, then `t5x.eval` of the final
checkpoints and the tables tool. Needs T5X.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import needs
import numpy as np
import pytest

pytestmark = pytest.mark.slow
needs.t5x()

from melodi_t5x import experiments  # noqa: E402

REPO = experiments.REPO_ROOT
STEPS = 8
WORDS = (
  'the king queen castle river night sword crown letter garden storm ship island forest '
  'friend enemy brother sister father mother morning evening winter summer'
).split()


def _corpus(root, rng):
  """Small text files per split (one document per file), ~250-500 tokens each."""
  for split, count in (('train', 12), ('validation', 2), ('test', 3)):
    folder = root / split
    folder.mkdir(parents=True)
    for i in range(count):
      names = rng.choice(WORDS, size=4, replace=False)
      lines = [
        f'The {names[j % 4]} saw the {rng.choice(WORDS)} and the {names[(j + 1) % 4]}.'
        for j in range(int(rng.integers(30, 60)))
      ]
      (folder / f'doc{i}.txt').write_text('\n'.join(lines) + '\n')


def test_long_layers_family_end_to_end(tmp_path):
  _corpus(tmp_path / 'corpus', np.random.default_rng(0))
  root = tmp_path / 'runs'
  bindings = [
    f'--binding=tasks.TextCorpusConfig.{split}_files="{tmp_path}/corpus/{split}/*.txt"'
    for split in ('train', 'validation', 'test')
  ]
  cmd = [
    sys.executable,
    '-m',
    'xm_launch.launch',
    '--sweep=long_layers',
    '--size=tiny',
    '--task=text_corpus',
    '--local',
    f'--model_dir_root={root}',
    f'--train_steps={STEPS}',
    '--eval_modes=carried',
    *bindings,
  ]
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get('PYTHONPATH', '')]))
  env.setdefault('JAX_PLATFORMS', 'cpu')
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

  # one_l64 is the tiny main S128+L64 configuration: it trains (once) in main's folder.
  tiny = experiments.sweep('long_layers', size='tiny', dataset='text_corpus')
  runs = {e.table_name: e.run_id for e in tiny}
  assert runs['one_l64'] == 'main/text_corpus_melodi_s128_l64'
  for name, layers in (('one_l64', None), ('two_l32', '(0, 1)')):
    run = root / runs[name]
    if layers:
      assert f'long_term_memory_layers = {layers}' in (run / 'experiment.gin').read_text()
    assert (run / f'checkpoint_{STEPS}').is_dir()
    report = json.loads((run / 'eval' / f'text_corpus_step{STEPS}_carried.json').read_text())
    assert report['memory_mode'] == 'carried' and report['documents'] == 3
    assert math.isfinite(report['perplexity']) and report['perplexity'] > 1.0

  table = json.loads((root / 'tables' / 'long_layers.json').read_text())
  assert [r['name'] for r in table['runs']] == ['one_l64', 'two_l32']
  for r in table['runs']:
    assert r['status'] == {'carried': 'done', 'reset': 'missing'}
  assert (root / 'tables' / 'long_layers.png').read_bytes()[:4] == b'\x89PNG'
  md = (root / 'tables' / 'long_layers.md').read_text()
  for r in table['runs']:
    assert f'{r["perplexity"]["carried"]:.2f}' in md
  assert 'Perplexity (carried)' in proc.stdout  # the launcher printed the table

  # A rerun runs nothing: the step runner finds every final checkpoint and report.
  again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
  for name in ('one_l64', 'two_l32'):
    run_id = runs[name]  # one_l64's steps are those of the shared main run
    run = root / run_id
    assert (
      f'[{run_id}/train] skipped: {run}/checkpoint_{STEPS}/commit_success.txt exists'
      in again.stdout
    ), again.stdout[-3000:]
    assert (
      f'[{run_id}/eval_carried] skipped: '
      f'{run}/eval/text_corpus_step{STEPS}_carried.json exists' in again.stdout
    ), again.stdout[-3000:]
  assert ' running: ' not in again.stdout
