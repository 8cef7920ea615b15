"""What used to break or lie silently on a user's checkpoint or corpus now fails loudly (need T5X).

In-process: a checkpoint of another architecture or vocabulary is refused before the restore
with an error naming both (`t5x_signature`, through the gin files of `t5x.train` / `t5x.eval` /
`t5x.infer`).
"""

from __future__ import annotations

import json
import os
import sys

import gin
import pytest

pytest.importorskip('t5x', reason='t5x not installed: see docs/t5x.md')

from melodi_t5x import t5x_gin, t5x_signature  # noqa: E402

GIN_DIR = os.path.join(t5x_gin.REPO_ROOT, 'gin')


def _stub(**unused):
  """Stands in for t5x.train's `train`, t5x.eval's `evaluate`, t5x.infer's `infer`."""


@pytest.fixture
def entry_points(monkeypatch):
  for name in ('train', 'evaluate', 'infer'):
    monkeypatch.setattr(sys.modules['__main__'], name, _stub, raising=False)
  gin.clear_config(clear_constants=True)
  yield
  gin.clear_config(clear_constants=True)


def _evaluate(gin_files, parameter: str, bindings: list[str]):
  """Parses a run's gin files and evaluates one of its bound references (as T5X would)."""
  files = [gin_files] if isinstance(gin_files, str) else gin_files
  gin.clear_config(clear_constants=True)
  try:
    gin.parse_config_files_and_bindings(
      [os.path.join(GIN_DIR, f) for f in files], bindings, finalize_config=False
    )
    return gin.query_parameter(parameter).scoped_configurable_fn()
  finally:
    gin.clear_config(clear_constants=True)


def _train_signature(model_dir, module=None):
  bindings = [f'MODEL_DIR = {str(model_dir)!r}'] + ([f'MODULE = {module}'] if module else [])
  assert _evaluate('quickstart.gin', 'train_script.train.model_dir', bindings) == str(model_dir)
  return json.loads((model_dir / t5x_signature.SIGNATURE_FILE).read_text())


def _eval_path(checkpoint, *extra):
  bindings = [f'CHECKPOINT_PATH = {checkpoint!r}', "EVAL_OUTPUT_DIR = '/tmp/unused'", *extra]
  return _evaluate('quickstart_eval.gin', 'utils.RestoreCheckpointConfig.path', bindings)


def test_checkpoint_of_another_architecture_is_refused_naming_both(tmp_path, entry_points):
  """Issue 16 item 7: instead of a pytree-structure error mentioning `stream_position`."""
  del entry_points
  saved = _train_signature(tmp_path / 'melodi')
  assert (saved['architecture'], saved['config_class']) == ('MelodiDecoder', 'MelodiConfig')
  checkpoint = str(tmp_path / 'melodi' / 'checkpoint_400')
  assert _eval_path(checkpoint) == checkpoint  # the same architecture passes
  with pytest.raises(ValueError, match='architecture MelodiDecoder') as err:
    _eval_path(checkpoint, 'MODULE = @xl.XLDecoder()')
  print(err.value)
  assert 'XLDecoder (XLConfig) in this run' in str(err.value)
  # Resuming training in that directory with another architecture is refused too.
  with pytest.raises(ValueError, match='XLDecoder'):
    _train_signature(tmp_path / 'melodi', '@xl.XLDecoder()')


def test_checkpoint_of_another_vocabulary_is_refused_naming_both(tmp_path, entry_points):
  """Issue 16 item 3: a vocabulary of the same padded size used to restore and score silently."""
  del entry_points
  saved = _train_signature(tmp_path / 'run')
  vocab = saved['vocabulary']
  assert vocab['size'] == 4096 and vocab['checksum'] is not None
  checkpoint = str(tmp_path / 'run' / 'checkpoint_400')
  # The documented way to score a folder of text with the checkpoint's vocabulary passes.
  borrowed = [
    "MIXTURE_OR_TASK_NAME = 'text_corpus'",
    "tasks.TextCorpusConfig.vocabulary_task = 'local_books'",
  ]
  assert _eval_path(checkpoint, *borrowed) == checkpoint
  # A checkpoint trained with another vocabulary of the same size (other pieces, same 4096 ids).
  other = dict(saved, vocabulary=dict(vocab, name="TaskVocabulary('my_books')", checksum=123))
  (tmp_path / 'run' / t5x_signature.SIGNATURE_FILE).write_text(json.dumps(other))
  with pytest.raises(ValueError, match='vocabulary') as err:
    _eval_path(checkpoint)
  print(err.value)
  message = str(err.value)
  assert "TaskVocabulary('my_books') (size 4096, checksum 123" in message
  assert f"TaskVocabulary('local_books') (size 4096, checksum {vocab['checksum']}" in message
  with pytest.raises(ValueError, match='my_books'):  # t5x.infer checks it too
    _evaluate(
      ['models/melodi_tiny.gin', 'infer.gin'],
      'utils.RestoreCheckpointConfig.path',
      [f'CHECKPOINT_PATH = {checkpoint!r}', "INFER_OUTPUT_DIR = '/tmp/unused'"],
    )
