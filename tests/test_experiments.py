"""The experiment suite's gin files: generated from the registry, parse, build the intended configs.

Without T5X each file is parsed with T5X's configurables skipped and its model config is built;
with T5X the mode file + experiment file parse completely (as `t5x.train` / `t5x.eval` do) and
the T5X model object is built.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types

import gin
import needs
import pytest
from paper_sweeps import TRAIN_RUNS

from melodi_t5x import config as config_lib
from melodi_t5x import experiments
from melodi_t5x.tools import make_experiments, paper_tables

REPO = experiments.REPO_ROOT
COMMITTED = experiments.all_committed()


def _need_model_file(exp):
  """Fails (never skips) when an experiment's model gin file is missing: it would not run."""
  for gin_file in exp.model_gins:
    path = os.path.join(REPO, gin_file)
    assert os.path.exists(path), f'{exp.path} includes {gin_file}, which does not exist'


def test_a_missing_model_file_fails_instead_of_skipping():
  """Issue 16 item 11: a missing model file used to skip ('issue 7 is not in this tree yet')."""
  missing = types.SimpleNamespace(model_gins=('gin/models/no_such_model.gin',), path='x.gin')
  with pytest.raises(AssertionError, match='no_such_model.gin'):
    _need_model_file(missing)


def test_committed_files_equal_the_generator_output():
  assert make_experiments.differences() == []


def test_sweeps_have_the_documented_grids():
  for name, size in TRAIN_RUNS.items():
    exps = experiments.sweep(name)
    assert len(exps) == size, name
    assert len({e.name for e in exps}) == size, name
  main = experiments.sweep('main')
  assert {(e.dataset, e.model) for e in main} == {
    (d, m) for d in ('pg19_t5', 'arxiv_math', 'c4_4k') for m in experiments.MAIN_MODELS
  }
  assert all(e.train_steps == 500_000 for e in main)
  ablations = [e for e in COMMITTED if e.sweep != 'main']
  assert all(e.train_steps == 200_000 and e.dataset == 'pg19_t5' for e in ablations)
  for exp in COMMITTED:
    assert os.path.exists(os.path.join(REPO, f'gin/experiments/data/{exp.dataset}.gin'))


def _table_entries(size):
  return [e for name in TRAIN_RUNS for e in experiments.sweep(name, size=size)]


@pytest.mark.parametrize('size', ['paper', 'tiny'])
def test_identical_configurations_train_once(size):
  """Issue 16 item 9: two table entries share a run exactly when their parsed configs are equal."""
  runs_by_config = {}
  for exp in _table_entries(size):
    _need_model_file(exp)
    cfg = _parsed_config(exp)
    key = (type(cfg).__name__, repr(cfg), exp.dataset, exp.train_steps)
    runs_by_config.setdefault(key, set()).add(exp.run_id)
  shared = {k: runs for k, runs in runs_by_config.items() if len(runs) > 1}
  assert not shared, f'identical configurations in several runs: {sorted(shared.values())}'
  # Different configurations never share a run: as many runs as configurations.
  runs = {e.run_id for e in _table_entries(size)}
  assert len(runs) == len(runs_by_config)
  if size == 'paper':
    ablation_runs = {e.run_id for e in _table_entries(size) if e.run == 'ablation'}
    entries = [e for e in _table_entries(size) if e.run == 'ablation']
    assert (len(entries), len(ablation_runs)) == (47, 41)
    aliases = {e.alias: e.run_id for e in entries if e.alias}
    assert aliases == {
      'fifo128': 'memory_tradeoff/s128_l64',
      'melodi_s128_l64_w512': 'memory_tradeoff/s128_l64',
      'short13': 'memory_tradeoff/s128_l64',
      'one_l64': 'memory_tradeoff/s128_l64',
      'separate': 'memory_tradeoff/s128_l64',
      'melodi_s128_l0_w512': 'memory_tradeoff/s128_l00',
    }
    assert len(COMMITTED) == 18 + 41
  for exp in _table_entries(size):  # a shared entry renders the file of the run that trains it
    if exp.alias:
      twin = [e for e in experiments.sweep(exp.sweep, size=size) if e.name == exp.name]
      assert experiments.render(exp) == experiments.render(twin[0])
      assert twin[0].alias == ''


def test_spread_layers_matches_the_header():
  expected = {
    1: (6,),
    2: (6, 9),
    3: (2, 6, 10),
    4: (1, 6, 8, 11),
    5: (1, 3, 6, 9, 11),
    7: (0, 2, 4, 6, 8, 10, 12),
    10: (0, 1, 3, 4, 6, 7, 8, 9, 11, 12),
    13: tuple(range(13)),
  }
  for k, layers in expected.items():
    assert experiments.spread_layers(13, k, 6) == layers, k
  with pytest.raises(ValueError, match='count'):
    experiments.spread_layers(13, 0, 6)


def _parsed_config(exp):
  return paper_tables.experiment_config(exp)


@pytest.mark.parametrize('exp', COMMITTED, ids=[e.path.split('experiments/')[1] for e in COMMITTED])
def test_experiment_builds_its_config(exp):
  _need_model_file(exp)
  cfg = _parsed_config(exp)
  assert type(cfg) is exp.model_spec.config_class
  assert (cfg.embed_dim, cfg.num_heads, cfg.head_dim, cfg.mlp_dim) == (1024, 8, 128, 4096)
  assert cfg.dropout_rate == cfg.attention_dropout_rate == 0.05
  assert cfg.vocab_size == {'pg19_t5': 32128, 'c4_4k': 32128, 'arxiv_math': 32000}[exp.dataset]
  # Every setting of the grid point reached the config.
  for field, value in exp.overrides:
    assert getattr(cfg, field) == value, field
  window = dict(exp.overrides).get('window_length', 512)
  assert cfg.window_length == window and cfg.num_windows(4096) == 4096 // window
  if isinstance(cfg, config_lib.MelodiConfig):
    memory = exp.model_spec.melodi_memory
    if exp.sweep == 'main':
      assert (cfg.summary_size, cfg.long_term_memory_increment_size) == memory
    assert cfg.num_layers == 13 and cfg.summary_size == cfg.short_term_memory_size
    if exp.sweep == 'short_layers':
      k = int(exp.name[len('short') :])
      assert cfg.num_layers - len(cfg.no_memory_layers) == k
      assert 6 in cfg.long_term_memory_layers and 6 not in cfg.no_memory_layers


def test_schedule_macros_of_the_run_files():
  for run, steps in (('main', 500_000), ('ablation', 200_000)):
    gin.clear_config(clear_constants=True)
    try:
      gin.parse_config_file(
        os.path.join(REPO, f'gin/experiments/runs/{run}.gin'),
        skip_unknown=paper_tables.T5X_SELECTORS,  # the TPU mesh binds T5X's partitioner
      )
      assert gin.query_parameter('%TRAIN_STEPS') == steps == experiments.RUN_STEPS[run]
      assert gin.query_parameter('%BATCH_SIZE') == 32
      assert gin.query_parameter('%TASK_FEATURE_LENGTHS') == {'targets': 4096}
      assert gin.query_parameter('%DROPOUT_RATE') == 0.05
      assert gin.query_parameter('t5x_schedule.warmup_cosine.warmup_steps') == 1000
      assert gin.query_parameter('t5x_schedule.warmup_cosine.base_learning_rate') == 0.01
      assert gin.query_parameter('t5x_schedule.warmup_cosine.final_learning_rate') == 0.001
      assert steps % gin.query_parameter('%CHECKPOINT_PERIOD') == 0
      assert steps % gin.query_parameter('%EVAL_PERIOD') == 0
    finally:
      gin.clear_config(clear_constants=True)


def test_tiny_sweeps_scale_the_grids():
  for name in TRAIN_RUNS:
    for exp in experiments.sweep(name, size='tiny'):
      _need_model_file(exp)
      cfg = _parsed_config(exp)
      assert cfg.embed_dim == 64 and cfg.window_length in (8, 16, 32), exp.name
      assert exp.dataset == 'local_books' and exp.train_steps == experiments.RUN_STEPS['tiny']
  tiny = {e.name: _parsed_config(e) for e in experiments.sweep('long_layers', size='tiny')}
  assert tiny['two_l32'].long_term_memory_layers == (0, 1)
  assert tiny['two_l32'].long_term_memory_increment_size == 2


FULL_GIN_SCRIPT = r"""
import importlib, json, os, sys
import gin
script = importlib.import_module(sys.argv[1])  # t5x.train or t5x.eval, as __main__ in T5X
sys.modules['__main__'] = script
from melodi_t5x import experiments, t5x_model  # noqa: F401 (registers the model class)
mode, extra = {
  't5x.train': (experiments.TRAIN_MODE_GIN, ["MODEL_DIR = '/tmp/unused'"]),
  't5x.eval': (
    experiments.EVAL_MODE_GIN,
    ["CHECKPOINT_PATH = '/tmp/unused/checkpoint_1'", "EVAL_OUTPUT_DIR = '/tmp/unused'"],
  ),
}[sys.argv[1]]
out = []
for exp in experiments.all_committed():
  gin.clear_config(clear_constants=True)
  gin.parse_config_files_and_bindings([mode, exp.path], extra, finalize_config=False)
  # MODEL itself is not built: its vocabulary would read the task's SentencePiece file.
  assert 'MemoryDecoderModel' in gin.query_parameter('%MODEL').selector, exp.path
  cfg = gin.query_parameter('%MODULE').scoped_configurable_fn().config
  out.append([exp.path, gin.query_parameter('%MIXTURE_OR_TASK_NAME'),
              gin.query_parameter('%TRAIN_STEPS'), type(cfg).__name__])
print(json.dumps(out))
"""


@pytest.mark.slow
@pytest.mark.parametrize('script', ['t5x.train', 't5x.eval'])
def test_full_gin_with_t5x(script):
  """Mode file + experiment parse completely, as in `python -m <script>`; the decoder builds."""
  needs.t5x()
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu')
  proc = subprocess.run(
    [sys.executable, '-c', FULL_GIN_SCRIPT, script],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  parsed = {path: rest for path, *rest in json.loads(proc.stdout.strip().splitlines()[-1])}
  expected = COMMITTED
  assert len(parsed) == len(expected) > 0
  for exp in expected:
    assert parsed[exp.path] == [
      exp.dataset,
      exp.train_steps,
      exp.model_spec.config_class.__name__,
    ]
