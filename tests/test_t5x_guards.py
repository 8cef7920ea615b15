"""What used to break or lie silently on a user's checkpoint or corpus now fails loudly (need T5X).

In-process: a checkpoint of another architecture or vocabulary is refused before the restore
with an error naming both (`t5x_signature`, through the gin files of `t5x.train` / `t5x.eval` /
`t5x.infer`).
"""

from __future__ import annotations

import json
import os

import gin
import gin_entry_points
import needs
import pytest

needs.t5x()

from melodi_t5x import t5x_gin, t5x_signature  # noqa: E402

GIN_DIR = os.path.join(t5x_gin.GIN_ROOT, 'gin')


@pytest.fixture
def entry_points(monkeypatch):
  gin_entry_points.install(monkeypatch)
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
  """Issue 16 item 7: instead of a pytree-structure error deep in the restore."""
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
      ['models/melodi_base.gin', 'models/tiny.gin', 'infer.gin'],
      'utils.RestoreCheckpointConfig.path',
      [f'CHECKPOINT_PATH = {checkpoint!r}', "INFER_OUTPUT_DIR = '/tmp/unused'"],
    )


# -- a real MemoryTrainer on a tiny MELODI (in-process) --------------------------------------------

B, T = 2, 16


def _trainer(tmp_path, **kwargs):
  import jax  # pylint: disable=g-import-not-at-top
  import seqio  # pylint: disable=g-import-not-at-top
  from t5x import adafactor  # pylint: disable=g-import-not-at-top
  from t5x_trainers import memory_trainer  # pylint: disable=g-import-not-at-top
  from tiny_configs import T5X_MELODI  # pylint: disable=g-import-not-at-top

  from melodi_t5x import config as config_lib  # pylint: disable=g-import-not-at-top
  from melodi_t5x import partitioning as melodi_partitioning  # pylint: disable=g-import-not-at-top
  from melodi_t5x import t5x_model  # pylint: disable=g-import-not-at-top
  from melodi_t5x.architectures import melodi  # pylint: disable=g-import-not-at-top

  model = t5x_model.MemoryDecoderModel(
    module=melodi.MelodiDecoder(config_lib.MelodiConfig(**T5X_MELODI)),
    vocabulary=seqio.PassThroughVocabulary(size=32),
    optimizer_def=adafactor.Adafactor(),
  )
  partitioner = melodi_partitioning.HostMeshPartitioner(
    num_partitions=1, logical_axis_rules=melodi_partitioning.logical_axis_rules()
  )
  return memory_trainer(
    model,
    partitioner,
    B,
    T,
    eval_names=[],
    summary_dir=str(tmp_path),
    rng=jax.random.PRNGKey(0),
    learning_rate_fn=lambda step: 1e-3,
    **kwargs,
  )


def _document_batches(steps, seed=0):
  """`steps` batches of two rows, each row one document (ids 7 and 9) chunk by chunk."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(seed)
  out = []
  for c in range(steps):
    targets = rng.integers(2, 32, (B, T)).astype(np.int32)
    out.append(
      {
        'decoder_input_tokens': np.roll(targets, 1, axis=1),
        'decoder_target_tokens': targets,
        'decoder_loss_weights': np.ones((B, T), np.float32),
        'start_of_sequence': np.full((B,), c == 0),
        'document_id': np.asarray([7, 9], np.int64),
        'chunk_index': np.full((B,), c, np.int32),
        'row_valid': np.ones((B,), bool),
      }
    )
  return out


@pytest.fixture
def clean_gin():
  gin.clear_config(clear_constants=True)
  yield
  gin.clear_config(clear_constants=True)


def test_eval_counts_misaligned_rows_and_carried_mode_fails(tmp_path, clean_gin):
  """Issue 16 item 2: a reset-by-misalignment row used to count as 'carried' perplexity."""
  del clean_gin
  trainer = _trainer(tmp_path)
  state = trainer.train_state
  bad = _document_batches(4)
  # Batch 3 swaps the rows' documents: both rows break their memory there, and again at batch 4.
  bad[2]['document_id'] = bad[2]['document_id'][::-1].copy()
  with pytest.raises(ValueError, match='4 eval rows did not continue') as err:
    trainer.stream(state.params, state.flax_mutables, bad)
  print(err.value)
  assert 'batch 3 row 0: document 9 chunk 2' in str(err.value)
  assert trainer.last_misaligned['rows'] == 4
  good = _document_batches(4)
  acc, steps = trainer.stream(state.params, state.flax_mutables, good)
  assert steps == 4 and acc.tokens == 4 * B * T and trainer.last_misaligned['rows'] == 0
  # Reset mode resets every chunk anyway: nothing is misaligned, the report says so.
  reset = _trainer(tmp_path, memory_mode='reset')
  reset.stream(state.params, state.flax_mutables, bad)
  assert reset.last_misaligned['rows'] == 0


def test_training_stops_at_the_first_nonfinite_step_naming_it(tmp_path, clean_gin):
  """Issue 16 item 5: a NaN used to persist in memory and the run to go on."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  from melodi_t5x import t5x_data, t5x_model  # pylint: disable=g-import-not-at-top

  del clean_gin
  batches = [{k: b[k] for k in t5x_data.MODEL_KEYS} for b in _document_batches(6)]
  trainer = _trainer(tmp_path)
  trainer.train(iter(batches[:2]), 2, start_step=0)  # finite: no error
  batches[4]['decoder_loss_weights'] = np.full((B, T), np.nan, np.float32)  # step 5 goes bad
  with pytest.raises(FloatingPointError, match='Training step 5: loss nan') as err:
    trainer.train(iter(batches[2:]), 4, start_step=2)
  print(err.value)
  assert float(t5x_model.nonfinite_count({'m': np.asarray([1.0, np.nan, np.inf])})) == 2.0
