"""Gin files: model sizes parse to the paper configs from any working directory (no T5X)."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys

import gin
import gin_entry_points
import needs
import pytest

import tasks
from melodi_t5x import config as config_lib
from melodi_t5x import memory_accounting, t5x_gin

REPO = t5x_gin.GIN_ROOT
GIN_DIR = os.path.join(REPO, 'gin')
# Configurables that need T5X; skipped when it is absent (and used normally when present).
T5X_SELECTORS = ['adafactor.Adafactor', 't5x_model.MemoryDecoderModel']


# A seqio task with T5's vocabulary size (32100 ids) but no file to read: the model files are
# parsed here without a data file, with the embedding following the task's vocabulary.
T5_SIZED_TASK = 'test_t5_sized_vocabulary'
# What a data file binds (gin/experiments/data/<task>.gin): here the embedding follows the task.
FOLLOW_THE_TASK = [
  'VOCAB_SIZE = @tasks.embedding_size()',
  'tasks.embedding_size.task_name = %MIXTURE_OR_TASK_NAME',
]
# The tiny size: an architecture's model file, then tiny.gin.
TINY = 'tiny.gin'


@pytest.fixture(scope='module', autouse=True)
def _t5_sized_task():
  import seqio  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  seqio.TaskRegistry.remove(T5_SIZED_TASK)
  seqio.TaskRegistry.add(
    T5_SIZED_TASK,
    source=seqio.FunctionDataSource(
      lambda split, shuffle_files: tf.data.Dataset.from_tensors({'targets': [1]}), ['train']
    ),
    preprocessors=[],
    output_features={'targets': seqio.Feature(seqio.PassThroughVocabulary(32100))},
  )
  yield
  seqio.TaskRegistry.remove(T5_SIZED_TASK)


def _model_module(gin_files, tmp_path, monkeypatch, task: str = T5_SIZED_TASK):
  """Parses model gin file(s) from an unrelated cwd and builds the decoder module (`MODULE`)."""
  if isinstance(gin_files, str):
    gin_files = [gin_files]
  monkeypatch.chdir(tmp_path)
  gin.clear_config(clear_constants=True)
  try:
    gin.parse_config_files_and_bindings(
      [os.path.join(GIN_DIR, 'models', f) for f in gin_files],
      [f'MIXTURE_OR_TASK_NAME = {task!r}', 'DROPOUT_RATE = 0.05', *FOLLOW_THE_TASK],
      skip_unknown=T5X_SELECTORS,
      finalize_config=False,
    )
    return gin.query_parameter('%MODULE').scoped_configurable_fn()
  finally:
    gin.clear_config(clear_constants=True)


def _model_config(gin_files, tmp_path, monkeypatch, task: str = T5_SIZED_TASK):
  return _model_module(gin_files, tmp_path, monkeypatch, task).config


PAPER = dict(
  num_layers=13,
  embed_dim=1024,
  num_heads=8,
  head_dim=128,
  mlp_dim=4096,
  window_length=512,
  vocab_size=32128,  # T5's 32100 ids rounded up to a multiple of 128
)


@pytest.mark.parametrize(
  'gin_file,summary,long_increment',
  [
    ('melodi_base.gin', 128, 64),
    ('melodi_s192_l32.gin', 192, 32),
    ('melodi_s128_l64.gin', 128, 64),
    ('melodi_s192_l96.gin', 192, 96),
  ],
)
def test_paper_model_files(gin_file, summary, long_increment, tmp_path, monkeypatch):
  cfg = _model_config(gin_file, tmp_path, monkeypatch)
  for field, value in PAPER.items():
    assert getattr(cfg, field) == value, field
  assert cfg.long_term_memory_layers == (6,)
  assert cfg.long_term_memory_windows == 128
  assert cfg.summary_size == cfg.short_term_memory_size == summary
  assert cfg.long_term_memory_increment_size == long_increment
  assert cfg.dropout_rate == cfg.attention_dropout_rate == 0.05
  assert cfg.num_windows(4096) == 8


def test_tiny_model_file(tmp_path, monkeypatch):
  cfg = _model_config(['melodi_base.gin', TINY], tmp_path, monkeypatch, 'local_books')
  assert (cfg.num_layers, cfg.embed_dim, cfg.window_length, cfg.vocab_size) == (2, 64, 32, 4096)
  assert cfg.dtype == 'float32'
  assert cfg.num_windows(128) == 4


# Baseline model files at the paper size -> (decoder class, the memory table's paper model, fields
# that differ from it). Every file must build exactly the paper model of the memory table (plus
# the run's dropout and bfloat16 compute).
BASELINES = {
  'xl.gin': ('XLDecoder', 'Transformer-XL', {}),
  'xl_nocache.gin': ('XLDecoder', 'Transformer-XL', {'use_cache': False}),
  'memorizing.gin': ('MemorizingDecoder', 'Memorizing (dense 64K)', {}),
  'brt.gin': ('BRTDecoder', 'Block-Recurrent', {}),
}
PAPER_MODELS = {m.name: m for m in memory_accounting.PAPER_MODELS}


@pytest.mark.parametrize('gin_file', sorted(BASELINES))
def test_baseline_model_files_build_the_paper_models(gin_file, tmp_path, monkeypatch):
  decoder, paper_name, changes = BASELINES[gin_file]
  module = _model_module(gin_file, tmp_path, monkeypatch)
  assert type(module).__name__ == decoder
  paper = PAPER_MODELS[paper_name].config(
    dropout_rate=0.05, attention_dropout_rate=0.05, dtype='bfloat16', **changes
  )
  assert module.config == paper
  for field, value in PAPER.items():
    if field != 'num_layers':
      assert getattr(module.config, field) == value, field


@pytest.mark.parametrize('gin_file', ['melodi_base.gin', 'xl.gin', 'memorizing.gin', 'brt.gin'])
def test_embedding_follows_the_task_vocabulary(gin_file, tmp_path, monkeypatch):
  assert _model_config(gin_file, tmp_path, monkeypatch).vocab_size == 32128
  assert _model_config(gin_file, tmp_path, monkeypatch, 'local_books').vocab_size == 4096


DATA_DIR = os.path.join(GIN_DIR, 'experiments', 'data')


@pytest.mark.parametrize('data', sorted(f[:-4] for f in os.listdir(DATA_DIR) if f.endswith('.gin')))
def test_vocab_size_comes_from_the_data_file(data, tmp_path, monkeypatch):
  """VOCAB_SIZE has one binding per setup: the data file's (common.gin only requires it)."""
  monkeypatch.chdir(tmp_path)
  files = [os.path.join(GIN_DIR, 'models', 'xl.gin'), os.path.join(DATA_DIR, f'{data}.gin')]
  expected = {'pg19_t5': 32128, 'c4_4k': 32128, 'arxiv_math': 32000}.get(data, 4096)
  gin.clear_config(clear_constants=True)
  try:
    gin.parse_config_files_and_bindings(
      files, ['DROPOUT_RATE = 0.0'], skip_unknown=T5X_SELECTORS, finalize_config=False
    )
    cfg = gin.query_parameter('%MODULE').scoped_configurable_fn().config
    assert gin.query_parameter('%MIXTURE_OR_TASK_NAME') == data
  finally:
    gin.clear_config(clear_constants=True)
  assert cfg.vocab_size == expected
  if data in ('local_books', 'text_corpus'):  # the vocabulary of local_books, in the repository
    assert cfg.vocab_size == tasks.embedding_size('local_books')


def test_a_model_file_without_a_data_file_asks_for_vocab_size(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  gin.clear_config(clear_constants=True)
  try:
    gin.parse_config_files_and_bindings(
      [os.path.join(GIN_DIR, 'models', 'xl.gin')],
      ["MIXTURE_OR_TASK_NAME = 'local_books'", 'DROPOUT_RATE = 0.0'],
      skip_unknown=T5X_SELECTORS,
      finalize_config=False,
    )
    with pytest.raises(ValueError, match='vocab_size'):  # the gin.REQUIRED of VOCAB_SIZE
      gin.query_parameter('%MODULE').scoped_configurable_fn()
  finally:
    gin.clear_config(clear_constants=True)


@pytest.mark.parametrize('name', ['xl', 'memorizing', 'brt'])
def test_tiny_baseline_files_match_the_tiny_melodi_sizes(name, tmp_path, monkeypatch):
  tiny = _model_config([f'{name}.gin', TINY], tmp_path, monkeypatch, 'local_books')
  paper = _model_config(f'{name}.gin', tmp_path, monkeypatch)
  melodi = _model_config(['melodi_base.gin', TINY], tmp_path, monkeypatch, 'local_books')
  shared = ('embed_dim', 'num_heads', 'head_dim', 'mlp_dim', 'vocab_size', 'window_length', 'dtype')
  for field in shared:
    assert getattr(tiny, field) == getattr(melodi, field), field
  assert type(tiny) is type(paper)
  # Only sizes differ from the paper file: the architecture's own switches are kept.
  kept = {f.name for f in dataclasses.fields(config_lib.BaseConfig)} | {
    'memory_layer_index',
    'memory_size',
    'recurrent_layer_index',
    'num_states',
  }
  for field in dataclasses.fields(paper):
    if field.name not in kept:
      assert getattr(tiny, field.name) == getattr(paper, field.name), field.name
  assert tiny.num_windows(128) == 4


def _gin_files():
  for root, _, files in os.walk(GIN_DIR):
    for name in sorted(files):
      if name.endswith('.gin'):
        yield os.path.relpath(os.path.join(root, name), REPO)


@pytest.mark.parametrize('path', sorted(_gin_files()))
def test_header_lists_required_macros(path):
  text = open(os.path.join(REPO, path)).read()
  required = re.findall(r'^(\w+)\s*=\s*%gin\.REQUIRED', text, flags=re.M)
  header = '\n'.join(line for line in text.splitlines() if line.startswith('#'))
  for macro in required:
    assert re.search(rf'\b{macro}\b', header), f'{path}: header does not list {macro}'
  # Includes of our own files must go through the search path that melodi_t5x.t5x_gin registers.
  if re.search(r"^include 'gin/", text, flags=re.M):
    before = re.split(r"^include '", text, maxsplit=1, flags=re.M)[0]
    assert 'import melodi_t5x.t5x_gin' in before, path


def test_gin_folders_and_gin_config_not_shadowed():
  for root, dirs, _ in os.walk(GIN_DIR):
    for d in dirs:
      if d != '__pycache__':
        assert os.path.exists(os.path.join(root, d, '__init__.py')), os.path.join(root, d)
  # gin/ itself must not be a package: with the repo root on sys.path (python -m ... from a
  # clone) `import gin` has to find gin-config, not the folder of config files.
  assert not os.path.exists(os.path.join(GIN_DIR, '__init__.py'))
  out = subprocess.run(
    [sys.executable, '-c', 'import gin; print(hasattr(gin, "configurable"))'],
    cwd=REPO,
    capture_output=True,
    text=True,
    check=True,
  )
  assert out.stdout.strip() == 'True'


# quickstart.gin trains any architecture with one binding (MODULE); each model file binds its
# config, tiny.gin sizes them all.
QUICKSTART_MODULES = {
  None: ('MelodiDecoder', 'melodi_base.gin'),
  '@xl.XLDecoder()': ('XLDecoder', 'xl.gin'),
  '@memorizing.MemorizingDecoder()': ('MemorizingDecoder', 'memorizing.gin'),
  '@brt.BRTDecoder()': ('BRTDecoder', 'brt.gin'),
}


@pytest.mark.parametrize('quickstart', ['quickstart.gin', 'quickstart_eval.gin'])
@pytest.mark.parametrize('module', list(QUICKSTART_MODULES), ids=str)
def test_quickstart_trains_any_architecture_with_one_binding(
  quickstart, module, tmp_path, monkeypatch
):
  needs.t5x()
  # The run files bind `__main__.train` / `evaluate` (t5x.train's and t5x.eval's entry points).
  gin_entry_points.install(monkeypatch)
  expected_class, model_file = QUICKSTART_MODULES[module]
  expected = _model_config([model_file, TINY], tmp_path, monkeypatch, 'local_books')
  bindings = ["MODEL_DIR = '/tmp/unused'", "CHECKPOINT_PATH = '/tmp/unused'"]
  bindings += ["EVAL_OUTPUT_DIR = '/tmp/unused'"] + ([f'MODULE = {module}'] if module else [])
  gin.clear_config(clear_constants=True)
  try:
    gin.parse_config_files_and_bindings(
      [os.path.join(GIN_DIR, quickstart)], bindings, finalize_config=False
    )
    built = gin.query_parameter('%MODULE').scoped_configurable_fn()
  finally:
    gin.clear_config(clear_constants=True)
  assert type(built).__name__ == expected_class
  assert built.config == dataclasses.replace(expected, dropout_rate=0.0, attention_dropout_rate=0.0)


def _data_seed(gin_files, bindings):
  gin.clear_config(clear_constants=True)
  try:
    gin.parse_config_files_and_bindings(gin_files, bindings, finalize_config=False)
    seed = gin.query_parameter('train/utils.DatasetConfig.seed')
    while hasattr(seed, 'scoped_configurable_fn'):  # macro references (DATA_SEED -> RANDOM_SEED)
      seed = seed.scoped_configurable_fn()
    return seed
  finally:
    gin.clear_config(clear_constants=True)


@pytest.mark.parametrize(
  'gin_files',
  [['quickstart.gin'], ['experiments/train.gin', 'experiments/ablations/coverage/fifo064.gin']],
  ids=['quickstart', 'experiment'],
)
def test_data_seed_follows_random_seed_unless_set(gin_files, monkeypatch):
  """Issue 16 item 4: seed replicates (RANDOM_SEED=N) also get their own document order."""
  needs.t5x()
  gin_entry_points.install(monkeypatch)
  files = [os.path.join(GIN_DIR, g) for g in gin_files]
  base = ["MODEL_DIR = '/tmp/unused'"]
  assert _data_seed(files, base + ['RANDOM_SEED = 3']) == 3
  assert _data_seed(files, base + ['RANDOM_SEED = 3', 'DATA_SEED = 7']) == 7
  assert _data_seed(files, base + ['RANDOM_SEED = 0']) == 0


def _parsed_quickstart(bindings):
  gin.clear_config(clear_constants=True)
  gin.parse_config_files_and_bindings(
    [os.path.join(GIN_DIR, 'quickstart.gin')], bindings, finalize_config=False
  )


def test_a_command_line_macro_typo_is_an_error_naming_the_closest_macro(monkeypatch):
  """Issue 27 item 4: `--gin.TRAIN_STEP=40` used to train the full 400 steps and exit 0."""
  needs.t5x()
  gin_entry_points.install(monkeypatch)
  bindings = ["MODEL_DIR = '/tmp/unused'", 'TRAIN_STEP = 40']
  try:
    _parsed_quickstart(bindings)
    with pytest.raises(ValueError, match=r'Gin macro TRAIN_STEP .*did you mean TRAIN_STEPS') as e:
      t5x_gin.check_command_line_macros(bindings)
    print(e.value)
    # Macros the run uses, and macros of other runs (a sweep's shared bindings), pass.
    t5x_gin.check_command_line_macros(["MODEL_DIR = '/tmp/unused'", 'TRAIN_STEPS = 40'])
    t5x_gin.check_command_line_macros(["MEMORY_MODE = 'reset'"])
    with pytest.raises(ValueError, match=r'Gin macro BATCHSIZE .*did you mean BATCH_SIZE'):
      t5x_gin.check_command_line_macros(['BATCHSIZE=4'])
  finally:
    gin.clear_config(clear_constants=True)


def test_macro_names_of_bindings_and_references():
  assert t5x_gin.macro_bindings(['A = 1', ' B=2', 'c.d = 3', 'x/y.z = 4', 'A = 5']) == {
    'A': 'A = 5',
    'B': 'B=2',
  }
  gin.clear_config(clear_constants=True)
  try:
    gin.parse_config_files_and_bindings(
      [], ['A = 3', 'B = %A', "C = [1, {'x': %B}]"], finalize_config=False
    )
    assert t5x_gin.referenced_macros(gin.config._CONFIG) == {'A', 'B'}
  finally:
    gin.clear_config(clear_constants=True)
  known = t5x_gin.known_macros()
  assert {'TRAIN_STEPS', 'MEMORY_MODE', 'BATCH_SIZE', 'VOCAB_SIZE'} <= known
  assert 'gin' not in known  # `%gin.REQUIRED` is a constant, not a macro


@pytest.mark.slow
def test_t5x_train_stops_at_a_macro_typo_before_building_anything(tmp_path):
  """The finalize hook of `melodi_t5x.t5x_gin` checks `t5x.train`'s own command line."""
  needs.t5x()
  model_dir = tmp_path / 'run'
  proc = subprocess.run(
    [
      sys.executable,
      '-m',
      't5x.train',
      f'--gin_search_paths={REPO}',
      '--gin_file=gin/quickstart.gin',
      f'--gin.MODEL_DIR="{model_dir}"',
      '--gin.TRAIN_STEP=40',
    ],
    cwd=tmp_path,
    env=dict(os.environ, PYTHONPATH=REPO),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode != 0
  assert 'Gin macro TRAIN_STEP ' in proc.stderr and 'did you mean TRAIN_STEPS' in proc.stderr
  assert 'Path not found' not in proc.stderr  # issue 27 item 8: search-path probes are quiet
  assert not model_dir.exists()


def test_includes_from_another_folder_log_no_path_not_found_errors(tmp_path, monkeypatch, caplog):
  """Issue 27 item 8: 11 error-level lines per run from another folder, for nothing wrong."""
  monkeypatch.chdir(tmp_path)
  caplog.set_level('INFO')
  gin.clear_config(clear_constants=True)
  try:
    gin.parse_config_files_and_bindings(
      ['gin/models/melodi_base.gin', 'gin/models/tiny.gin'],
      ["MIXTURE_OR_TASK_NAME = 'local_books'", 'VOCAB_SIZE = 4096'],
      skip_unknown=T5X_SELECTORS,
      finalize_config=False,
    )
  finally:
    gin.clear_config(clear_constants=True)
  assert 'Path not found' not in caplog.text
  with pytest.raises(IOError, match='Unable to open file: gin/models/nope.gin'):
    gin.parse_config_files_and_bindings(['gin/models/nope.gin'], [], finalize_config=False)


@pytest.mark.parametrize(
  'gin_files, period',
  [
    (['quickstart.gin'], 25),
    (['experiments/train.gin', 'experiments/main/pg19_t5_melodi_s128_l64.gin'], 100),
  ],
  ids=['quickstart', 'paper'],
)
def test_run_files_log_training_metrics_often(gin_files, period, monkeypatch):
  """Issue 27 item 6: the paper runs logged the training loss every 5,000 steps (eval_period)."""
  needs.t5x()
  gin_entry_points.install(monkeypatch)
  gin.clear_config(clear_constants=True)
  try:
    gin.parse_config_files_and_bindings(
      [os.path.join(GIN_DIR, g) for g in gin_files],
      ["MODEL_DIR = '/tmp/unused'"],
      finalize_config=False,
    )
    assert gin.query_parameter('train_script.train.stats_period') == period
    eval_period = gin.query_parameter('train_script.train.eval_period')
    while hasattr(eval_period, 'scoped_configurable_fn'):  # a macro (EVAL_PERIOD)
      eval_period = eval_period.scoped_configurable_fn()
    assert eval_period % period == 0
  finally:
    gin.clear_config(clear_constants=True)
