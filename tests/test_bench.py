"""The benchmark CLI runs end to end on a tiny size and reports every field."""

from __future__ import annotations

import json
import math

import pytest

from melodi_t5x import architectures
from melodi_t5x import config as config_lib
from melodi_t5x.tools import bench

# MELODI's model file, then sizes of its own: 2 layers, d=32, windows of 8, S=M=4, long-term layer
# 1 with L=2 and a FIFO of 4 windows, vocabulary 64, float32.
TINY_BINDINGS = (
  'NUM_LAYERS = 2',
  'EMBED_DIM = 32',
  'NUM_HEADS = 2',
  'HEAD_DIM = 16',
  'MLP_DIM = 64',
  'VOCAB_SIZE = 64',
  'WINDOW_LENGTH = 8',
  "COMPUTE_DTYPE = 'float32'",
  'config.MelodiConfig.summary_size = 4',
  'config.MelodiConfig.short_term_memory_size = 4',
  'config.MelodiConfig.long_term_memory_increment_size = 2',
  'config.MelodiConfig.long_term_memory_windows = 4',
  'config.MelodiConfig.long_term_memory_layers = (1,)',
)
TINY = ['--gin_file', 'gin/models/melodi_base.gin']
TINY += [flag for b in TINY_BINDINGS for flag in ('--gin', b)]
TINY += '--segment-length 32 --batch-size 2 --steps 2'.split()


def test_bench_writes_json(tmp_path):
  out = tmp_path / 'bench.json'
  assert bench.main(TINY + ['--compile-windows', '1,2', '--json', str(out)]) == 0
  result = json.loads(out.read_text())
  assert result['tokens_per_sec'] > 0 and result['compile_sec'] > 0 and result['peak_bytes'] > 0
  assert result['params'] > 0 and set(result['compile_sec_by_windows']) == {'1', '2'}
  assert result['final_loss'] > 0
  assert result['flops_per_token'] > 0 and result['xla_memory']['peak_estimate'] > 0


def test_bench_rejects_bad_sizes_before_compiling():
  bad_layer = ['--gin', 'config.MelodiConfig.long_term_memory_layers = (2,)']
  with pytest.raises(ValueError, match='long_term_memory_layers.*outside'):
    bench.config_from_args(bench.parse_args(TINY + bad_layer))
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
  small = ['--gin', 'NUM_LAYERS = 1', '--gin', 'config.MelodiConfig.long_term_memory_layers = ()']
  args = TINY + small + ['--steps', '0', '--remat-sweep', '--json', str(out)]
  assert bench.main(args) == 0
  result = json.loads(out.read_text())['remat']
  assert set(result) == {'none', 'window', 'layer'}
  for entry in result.values():
    memory = entry['memory']
    assert memory['temp'] > 0 and memory['peak_estimate'] >= memory['argument'] > 0
    assert 'step_sec_median' not in entry  # --steps 0: compile only
  assert 'peak estimate GiB' in capsys.readouterr().out


# The tiny size of every other architecture: its model file, then tiny.gin (d=64, windows of 32).
def _tiny_flags(name: str) -> list[str]:
  gin_file = architectures.get(name).gin_file
  files = ['--gin_file', gin_file, '--gin_file', 'gin/models/tiny.gin']
  return files + ['--gin', 'VOCAB_SIZE = 64', '--segment-length', '64', '--batch-size', '2']


@pytest.mark.slow
@pytest.mark.parametrize('model', [n for n in architectures.names() if n != 'melodi'])
def test_bench_runs_every_architecture(model, tmp_path):
  out = tmp_path / 'bench.json'
  flags = _tiny_flags(model) + ['--steps', '2', '--compile-windows', '']
  assert bench.main(flags + ['--json', str(out)]) == 0
  result = json.loads(out.read_text())
  assert result['model'] == model and result['tokens_per_sec'] > 0 and result['params'] > 0
  assert result['flops_per_token'] > 0  # its record's FLOPs


def test_bench_builds_the_gin_files_model():
  cfg = bench.config_from_args(bench.parse_args(_tiny_flags('xl')))
  assert type(cfg) is config_lib.XLConfig and cfg.use_cache
  assert (cfg.num_layers, cfg.embed_dim, cfg.window_length, cfg.vocab_size) == (2, 64, 32, 64)
  assert cfg.dropout_rate == 0.0  # the benchmark binds DROPOUT_RATE = 0.0
  no_cache = _tiny_flags('xl') + ['--gin', 'config.XLConfig.use_cache = False']
  assert not bench.config_from_args(bench.parse_args(no_cache)).use_cache
  # --model alone: the architecture's model file at the paper size (T5 vocabulary, bfloat16).
  cfg = bench.config_from_args(bench.parse_args(['--model', 'xl']))
  assert (cfg.num_layers, cfg.vocab_size, cfg.dtype) == (13, 32128, 'bfloat16')
  cfg = bench.config_from_args(bench.parse_args(['--model', 'memorizing']))
  assert (cfg.num_layers, cfg.memory_layer_index, cfg.memory_size) == (12, 6, 65536)
  cfg = bench.config_from_args(bench.parse_args(['--model', 'brt']))
  assert (cfg.num_layers, cfg.recurrent_layer_index, cfg.num_states) == (12, 9, 512)
  assert type(bench.config_from_args(bench.parse_args([]))) is config_lib.MelodiConfig
  with pytest.raises(ValueError, match="--model=brt but the gin files .* build 'xl'"):
    bench.config_from_args(bench.parse_args(_tiny_flags('xl') + ['--model', 'brt']))
  with pytest.raises(SystemExit):  # not an architecture of the registry
    bench.parse_args(['--model', 'nope'])
