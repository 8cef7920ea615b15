"""The benchmark CLI runs end to end on a tiny size and reports every field."""

from __future__ import annotations

import json
import math

import pytest

from melodi_t5x import config as config_lib
from melodi_t5x.tools import bench

TINY = (
  '--num-layers 2 --embed-dim 32 --num-heads 2 --head-dim 16 --mlp-dim 64 --vocab-size 64 '
  '--segment-length 32 --window-length 8 --summary-size 4 --short-term-memory-size 4 '
  '--long-term-memory-increment-size 2 --long-term-memory-size 8 --long-term-memory-layer 1 '
  '--dtype float32 --batch-size 2 --steps 2'
).split()


def test_bench_writes_json(tmp_path):
  out = tmp_path / 'bench.json'
  assert bench.main(TINY + ['--compile-windows', '1,2', '--json', str(out)]) == 0
  result = json.loads(out.read_text())
  assert result['tokens_per_sec'] > 0 and result['compile_sec'] > 0 and result['peak_bytes'] > 0
  assert result['params'] > 0 and set(result['compile_sec_by_windows']) == {'1', '2'}
  assert result['final_loss'] > 0
  assert result['flops_per_token'] > 0 and result['xla_memory']['peak_estimate'] > 0


def test_bench_rejects_bad_sizes_before_compiling():
  with pytest.raises(ValueError, match='multiple of the long-term increment'):
    bench.config_from_args(bench.parse_args(TINY + ['--long-term-memory-size', '7']))
  with pytest.raises(ValueError, match='window_length'):
    bench.config_from_args(bench.parse_args(TINY + ['--segment-length', '30']))


def test_bench_eval_step(tmp_path):
  out = tmp_path / 'sub' / 'eval.json'
  assert bench.main(TINY + ['--step', 'eval', '--json', str(out)]) == 0
  result = json.loads(out.read_text())
  assert result['step'] == 'eval' and result['tokens_per_sec'] > 0 and result['compile_sec'] > 0
  assert math.isfinite(result['final_nll_per_token']) and result['final_nll_per_token'] > 0


@pytest.mark.slow
def test_remat_sweep_reports_memory_for_every_setting(tmp_path, capsys):
  out = tmp_path / 'sweep.json'
  # One layer without long-term memory: three cheap compiles.
  small = ['--num-layers', '1', '--long-term-memory-layer']
  args = TINY + small + ['--steps', '0', '--remat-sweep', '--json', str(out)]
  assert bench.main(args) == 0
  result = json.loads(out.read_text())['remat']
  assert set(result) == {'none', 'window', 'layer'}
  for entry in result.values():
    memory = entry['memory']
    assert memory['temp'] > 0 and memory['peak_estimate'] >= memory['argument'] > 0
    assert 'step_sec_median' not in entry  # --steps 0: compile only
  assert 'peak estimate GiB' in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize('model', ['xl', 'memorizing', 'brt'])
def test_bench_runs_every_baseline(model, tmp_path):
  out = tmp_path / 'bench.json'
  flags = ['--model', model, '--memory-size', '64', '--num-states', '4', '--compile-windows', '']
  assert bench.main(TINY + flags + ['--json', str(out)]) == 0
  result = json.loads(out.read_text())
  assert result['model'] == model and result['tokens_per_sec'] > 0 and result['params'] > 0


def test_bench_flags_of_other_models_are_ignored():
  cfg = bench.config_from_args(bench.parse_args(TINY + ['--model', 'xl']))
  assert type(cfg) is config_lib.XLConfig and cfg.use_cache
  assert (cfg.num_layers, cfg.embed_dim, cfg.window_length, cfg.vocab_size) == (2, 32, 8, 64)
  assert not bench.config_from_args(
    bench.parse_args(TINY + ['--model', 'xl', '--no-cache'])
  ).use_cache
  # Paper layer counts when --num-layers is not given; relative layer indices follow them.
  assert bench.config_from_args(bench.parse_args(['--model', 'xl'])).num_layers == 13
  cfg = bench.config_from_args(bench.parse_args(['--model', 'memorizing']))
  assert (cfg.num_layers, cfg.memory_layer_index, cfg.memory_size) == (12, 6, 65536)
  cfg = bench.config_from_args(bench.parse_args(['--model', 'brt']))
  assert (cfg.num_layers, cfg.recurrent_layer_index, cfg.num_states) == (12, 9, 512)
