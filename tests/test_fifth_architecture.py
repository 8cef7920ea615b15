"""A fifth architecture, defined and registered by the tests alone, is served by every tool.

`tests/fifth_architecture.py` (record, config and decoder classes) and `tests/data/windowed.gin`
(its model file) are all it needs: its gin file gets the shared sizes at the paper and the tiny
size, bench builds, times and names it, its FLOPs equal the traced matmuls, memory accounting
matches what it allocates, T5X's model trains it with memory carried, `python -m t5x.train` and
`t5x.eval` run its experiment file, and the TPU compile check estimates and compiles its train step.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import architecture_configs
import fifth_architecture
import jax
import jax.numpy as jnp
import needs
import numpy as np
import pytest

from melodi_t5x import architectures, experiments
from melodi_t5x import memory_accounting as acc
from melodi_t5x.tools import bench, flops

NAME = 'windowed'
REPO = experiments.REPO_ROOT


@pytest.fixture(scope='module', autouse=True)
def registered():
  architectures.register(fifth_architecture.ARCHITECTURE)
  architecture_configs._tiny.cache_clear()  # pylint: disable=protected-access
  yield fifth_architecture.ARCHITECTURE
  architectures.unregister(NAME)


def _tiny():
  return architecture_configs.tiny_config(NAME)


def test_registry_knows_it_by_name_and_by_config():
  assert NAME in architectures.names()
  assert architectures.get(NAME) is fifth_architecture.ARCHITECTURE
  assert architectures.for_config(_tiny()) is fifth_architecture.ARCHITECTURE
  assert type(architectures.build_decoder(_tiny())) is fifth_architecture.WindowedDecoder
  record = fifth_architecture.ARCHITECTURE
  with pytest.raises(ValueError, match="name 'xl' is taken"):
    architectures.register(dataclasses.replace(record, name='xl'))
  with pytest.raises(ValueError, match='WindowedConfig is already the config class'):
    architectures.register(dataclasses.replace(record, name='other'))


def test_its_gin_file_gets_the_shared_sizes_with_no_block_of_its_own():
  tiny = _tiny()  # its model file, then tiny.gin
  assert type(tiny) is fifth_architecture.WindowedConfig
  assert (tiny.num_layers, tiny.embed_dim, tiny.num_heads, tiny.head_dim) == (2, 64, 2, 32)
  assert (tiny.mlp_dim, tiny.window_length, tiny.dtype) == (256, 32, 'float32')
  paper = experiments.decoder_config(
    [fifth_architecture.GIN_FILE, 'gin/experiments/data/pg19_t5.gin'], ['DROPOUT_RATE = 0.1']
  )
  assert (paper.num_layers, paper.embed_dim, paper.window_length) == (13, 1024, 512)
  assert (paper.vocab_size, paper.dtype, paper.attention_dropout_rate) == (32128, 'bfloat16', 0.1)
  assert paper.use_cache and not paper.ffn_bias


def test_flops_equal_the_traced_matmuls():
  cfg = _tiny()
  module = architectures.build_decoder(cfg)
  batch, length = 2, 2 * cfg.window_length
  tokens = jax.ShapeDtypeStruct((batch, length), jnp.int32)
  variables = jax.eval_shape(
    lambda t: module.init(jax.random.PRNGKey(0), t, enable_dropout=False), tokens
  )
  traced = flops.dot_flops(
    lambda v, t: module.apply(v, t, enable_dropout=False, mutable=['memory']), variables, tokens
  )
  assert flops.train_flops(cfg, batch, length)['total'] == 3 * traced > 0
  assert flops.step_flops(cfg, batch, length) > flops.train_flops(cfg, batch, length)['total']


def test_memory_accounting_matches_what_it_allocates():
  cfg = _tiny()
  allocated = acc.allocated_memory(cfg, batch_size=3)
  assert allocated['bytes'] == acc.stored_bytes(cfg, 3) > 0
  # One window of keys and values per layer (the XL caches), in the paper's convention.
  assert acc.paper_floats(cfg) == cfg.num_layers * cfg.window_length * 2 * 2 * 32


def test_bench_times_it_under_its_own_name(tmp_path):
  files = ['--gin_file', fifth_architecture.GIN_FILE, '--gin_file', 'gin/models/tiny.gin']
  flags = files + ['--gin', 'VOCAB_SIZE = 64', '--segment-length', '64', '--batch-size', '2']
  assert type(bench.config_from_args(bench.parse_args(['--model', NAME]))).__name__ == (
    'WindowedConfig'
  )
  out = tmp_path / 'bench.json'
  args = flags + ['--steps', '1', '--compile-windows', '', '--json', str(out)]
  assert bench.main(args) == 0
  result = json.loads(out.read_text())
  assert result['model'] == NAME and result['tokens_per_sec'] > 0
  timed = fifth_architecture.WindowedConfig(**result['model_config'])
  assert (timed.num_layers, timed.embed_dim, timed.vocab_size) == (2, 64, 64)
  assert result['flops_by_term'] == flops.train_flops(timed, 2, 64)


def test_t5x_trains_it_with_memory_carried():
  needs.t5x()
  import seqio  # pylint: disable=g-import-not-at-top
  from t5x import adafactor  # pylint: disable=g-import-not-at-top

  from melodi_t5x import partitioning, t5x_model  # pylint: disable=g-import-not-at-top

  cfg = _tiny()
  model = t5x_model.MemoryDecoderModel(
    module=architectures.build_decoder(cfg),
    vocabulary=seqio.PassThroughVocabulary(cfg.vocab_size),
    optimizer_def=adafactor.Adafactor(logical_factor_rules=partitioning.logical_factor_rules()),
  )
  b, length = 2, 2 * cfg.window_length
  shapes = {'decoder_input_tokens': (b, length), 'decoder_target_tokens': (b, length)}
  variables = model.get_initial_variables(
    jax.random.PRNGKey(0), shapes, {k: jnp.int32 for k in shapes}
  )
  params, memory = variables['params'], {'memory': variables['memory']}
  tokens = np.random.RandomState(0).randint(1, cfg.vocab_size, (3, b, length + 1)).astype(np.int32)

  def batch(chunk, index, sos):
    return {
      'decoder_input_tokens': chunk[:, :-1],
      'decoder_target_tokens': chunk[:, 1:],
      'decoder_loss_weights': jnp.ones((b, length), jnp.float32),
      'start_of_sequence': sos,
      'document_id': jnp.arange(b),
      'chunk_index': jnp.full((b,), index),
    }

  @jax.jit
  def train_step(params, memory, chunk, index, sos):
    def loss(p):
      value, (_, new) = model.loss_fn(p, batch(chunk, index, sos), None, memory)
      return value, new

    (value, new), grads = jax.value_and_grad(loss, has_aux=True)(params)
    return jax.tree_util.tree_map(lambda p, g: p - 0.05 * g, params, grads), new, value

  losses = []
  for step in range(6):  # the same two chunks of two documents, again and again
    chunk = step % 2
    sos = jnp.full((b,), chunk == 0)
    params, memory, value = train_step(params, memory, tokens[chunk], chunk, sos)
    losses.append(float(value))
  assert all(np.isfinite(losses)) and losses[-2] < losses[0]
  # The first chunk's memory is read by the second.
  _, after_first, _ = train_step(params, memory, tokens[0], 0, jnp.ones(b, bool))
  carried = model.loss_fn(params, batch(tokens[1], 1, jnp.zeros(b, bool)), None, after_first)[0]
  reset = model.loss_fn(params, batch(tokens[1], 1, jnp.ones(b, bool)), None, after_first)[0]
  assert abs(float(carried) - float(reset)) > 1e-6


def _experiment_file(tmp_path) -> str:
  """Its tiny experiment: its model file, the tiny size, local_books, the tiny run settings."""
  experiment = tmp_path / 'windowed_tiny.gin'
  experiment.write_text(
    'from __gin__ import dynamic_registration\n\nimport melodi_t5x.t5x_gin\n\n'
    f"include '{fifth_architecture.GIN_FILE}'\n"
    "include 'gin/models/tiny.gin'\n"
    "include 'gin/experiments/data/local_books.gin'\n"
    "include 'gin/experiments/runs/tiny.gin'\n"
  )
  return str(experiment)


@pytest.mark.slow
def test_t5x_train_and_t5x_eval_run_it_from_its_experiment_file(tmp_path):
  """`python -m t5x.train` then `python -m t5x.eval` on its experiment file, as for the four."""
  needs.t5x()
  experiment, model_dir = _experiment_file(tmp_path), tmp_path / 'run'
  env = dict(
    os.environ,
    JAX_PLATFORMS='cpu',
    PYTHONPATH=os.pathsep.join([REPO, os.path.join(REPO, 'tests')]),
  )

  def run(module, gin_file, *bindings):
    args = [f'--gin_file={gin_file}', f'--gin_file={experiment}', *(f'--gin.{b}' for b in bindings)]
    proc = subprocess.run(
      [sys.executable, '-m', module, *args], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

  run('t5x.train', experiments.TRAIN_MODE_GIN, f"MODEL_DIR='{model_dir}'", 'TRAIN_STEPS=8')
  signature = json.loads((model_dir / 'model_signature.json').read_text())
  assert signature['config_class'] == 'WindowedConfig'
  run(
    't5x.eval',
    experiments.EVAL_MODE_GIN,
    f"CHECKPOINT_PATH='{model_dir}/checkpoint_8'",
    f"EVAL_OUTPUT_DIR='{tmp_path}/eval'",
  )
  report = json.loads((tmp_path / 'eval' / 'local_books_step8_carried.json').read_text())
  assert report['tokens'] > 0 and 1.0 < report['perplexity'] < 2 * 4096


@pytest.mark.slow
def test_the_tpu_compile_check_estimates_and_compiles_its_train_step(tmp_path):
  """Its train job, written as an experiment file of its own, goes through the TPU compile check:
  a target on v5e 2x2 with its analytic FLOPs (from its record) and a memory plan that fits."""
  from test_tpu_compile import MESH_2X2, _tpu_compile  # pylint: disable=g-import-not-at-top

  tc = _tpu_compile()
  from melodi_t5x import jobs as jobs_lib  # pylint: disable=g-import-not-at-top

  experiment = _experiment_file(tmp_path)
  job = jobs_lib.JobSpec(
    name='fifth/windowed/train',
    kind='train',
    module='t5x.train',
    gin_files=(experiments.TRAIN_MODE_GIN, experiment),
    bindings=(f'MODEL_DIR={jobs_lib.gin_string(str(tmp_path / "run"))}', *MESH_2X2),
  )
  target = tc.targets.build_target(job, tc.slices.Slice('v5e', '2x2'))
  assert target.devices == 4 and target.flops and target.model_flops
  estimate = tc.report.estimate(target, 0.4)
  assert estimate['estimated_step_seconds'] > 0 and 0 < estimate['mfu_at_estimate'] <= 0.4
  cache = tc.cache.ResultCache(str(tmp_path / 'cache'))
  [row] = tc.pool.check_jobs([job], tc.slices.Slice('v5e', '2x2'), cache=cache, log=lambda *_: None)
  assert row['fits'] and not row['cached'] and row['memory']['peak'] > 0, row
