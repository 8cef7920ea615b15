"""Gin files: model sizes parse to the paper configs from any working directory (no T5X)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import gin
import pytest

from melodi_t5x import t5x_gin

REPO = t5x_gin.REPO_ROOT
GIN_DIR = os.path.join(REPO, 'gin')
# Configurables that need T5X; skipped when it is absent (and used normally when present).
T5X_SELECTORS = ['adafactor.Adafactor', 't5x_model.MemoryDecoderModel']


def _model_config(gin_file: str, tmp_path, monkeypatch):
  """Parses a model gin file from an unrelated cwd and builds its `MelodiConfig`."""
  monkeypatch.chdir(tmp_path)
  gin.clear_config(clear_constants=True)
  try:
    gin.parse_config_files_and_bindings(
      [os.path.join(GIN_DIR, 'models', gin_file)],
      ["MIXTURE_OR_TASK_NAME = 'local_books'", 'DROPOUT_RATE = 0.05'],
      skip_unknown=T5X_SELECTORS,
      finalize_config=False,
    )
    ref = gin.query_parameter('melodi_t5x.melodi_model.MelodiDecoder.config')
    return ref.scoped_configurable_fn()
  finally:
    gin.clear_config(clear_constants=True)


PAPER = dict(
  num_layers=13, embed_dim=1024, num_heads=8, head_dim=128, mlp_dim=4096, window_length=512
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
  cfg = _model_config('melodi_tiny.gin', tmp_path, monkeypatch)
  assert (cfg.num_layers, cfg.embed_dim, cfg.window_length, cfg.vocab_size) == (2, 64, 32, 4096)
  assert cfg.dtype == 'float32'
  assert cfg.num_windows(128) == 4


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
    assert 'import melodi_t5x.t5x_gin' in text.split('include')[0], path


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
