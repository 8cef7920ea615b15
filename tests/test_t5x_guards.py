"""What used to break or lie silently on a user's checkpoint or corpus now fails loudly (need T5X).

In-process: a checkpoint of another architecture or vocabulary is refused before the restore
with an error naming both (`t5x_signature`, through the gin files of `t5x.train` / `t5x.eval` /
`t5x.infer`); SIGTERM stops training at a step boundary for T5X's emergency checkpoint.
"""

from __future__ import annotations

import json
import os
import re

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


def test_sigterm_stops_training_after_the_current_step(tmp_path, clean_gin, monkeypatch):
  """Issue 25 item 3: SIGTERM used to be ignored (PID 1) or to kill the run mid-period.

  One process (no jax.distributed): the SIGTERM flag. The trainer stops before the next step
  with the state of the last finished one, having drawn exactly that many batches (the saved data
  position resumes with the next), and raises T5X's PreemptionError (T5X then saves). A trainer
  that has not trained a step in this process stops without asking for a save.
  """
  import signal
  import threading

  import jax
  import numpy as np  # pylint: disable=g-import-not-at-top
  from t5x import trainer as trainer_lib  # pylint: disable=g-import-not-at-top

  from melodi_t5x import preemption  # pylint: disable=g-import-not-at-top

  del clean_gin
  assert threading.current_thread() is threading.main_thread()  # else SIGTERM would kill pytest
  monkeypatch.setattr(preemption._SIGTERM, 'received', False)
  keys = ('decoder_input_tokens', 'decoder_target_tokens', 'decoder_loss_weights')
  keys += ('start_of_sequence', 'document_id', 'chunk_index')
  batches = [{k: b[k] for k in keys} for b in _document_batches(6)]
  drawn = []

  def source():
    for i, batch in enumerate(batches):
      drawn.append(i)
      if i == 2:  # while step 3 runs
        assert preemption._SIGTERM.installed
        os.kill(os.getpid(), signal.SIGTERM)
      yield batch

  trainer = _trainer(tmp_path)
  with pytest.raises(trainer_lib.PreemptionError, match='stopped after step 3') as err:
    trainer.train(source(), 6, start_step=0)
  print(err.value)
  assert int(trainer.train_state.step) == 3 and drawn == [0, 1, 2]
  monkeypatch.setattr(preemption._SIGTERM, 'received', False)
  reference = _trainer(tmp_path)
  reference.train(iter(batches[:3]), 3, start_step=0)
  for got, want in zip(
    jax.tree.leaves(trainer.train_state.params), jax.tree.leaves(reference.train_state.params)
  ):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  monkeypatch.setattr(preemption._SIGTERM, 'received', True)  # SIGTERM before any step
  fresh = _trainer(tmp_path / 'fresh')
  with pytest.raises(preemption.PreemptedBeforeTraining, match='before this process trained'):
    fresh.train(iter(batches), 2, start_step=0)
  assert int(fresh.train_state.step) == 0
  # A stop between two calls: T5X may have just saved that step (its checkpoint exists: no new
  # save, which Orbax would refuse) or not (saved now).
  monkeypatch.setattr(preemption._SIGTERM, 'received', False)
  between = _trainer(tmp_path / 'between')
  between.train(iter(batches[:2]), 2, start_step=0)
  monkeypatch.setattr(preemption._SIGTERM, 'received', True)
  (tmp_path / 'between' / 'checkpoint_2').mkdir(parents=True)
  with pytest.raises(preemption.PreemptedBeforeTraining, match='step 2, whose checkpoint'):
    between.train(iter(batches[2:]), 2, start_step=2)
  (tmp_path / 'between' / 'checkpoint_2').rmdir()
  with pytest.raises(trainer_lib.PreemptionError, match='stopped after step 2'):
    between.train(iter(batches[2:]), 2, start_step=2)
  assert int(between.train_state.step) == 2


# -- issue 27: embedding rows, tools.generate, no false warning ------------------------------------


def _signed_run(model_dir, *bindings):
  """Signs `model_dir` as `t5x.train` of the quickstart does (with extra bindings)."""
  bindings = [f'MODEL_DIR = {str(model_dir)!r}', *bindings]
  assert _evaluate('quickstart.gin', 'train_script.train.model_dir', bindings) == str(model_dir)


def test_checkpoint_with_other_embedding_rows_is_refused_naming_vocab_size(tmp_path, entry_points):
  """Issue 27 item 3: instead of a raw ScopeParamShapeError after the model is built."""
  del entry_points
  _signed_run(tmp_path / 'run', 'VOCAB_SIZE = 8192')  # an own vocabulary's embedding size
  checkpoint = str(tmp_path / 'run' / 'checkpoint_400')
  with pytest.raises(ValueError, match=r'--gin\.VOCAB_SIZE=8192') as err:
    _eval_path(checkpoint)  # t5x.eval (the data file binds VOCAB_SIZE = 4096)
  print(err.value)
  assert 'embedding of 8192 rows (vocab_size) in the checkpoint, 4096 in this run' in str(err.value)
  assert _eval_path(checkpoint, 'VOCAB_SIZE = 8192') == checkpoint
  with pytest.raises(ValueError, match=r'VOCAB_SIZE=8192'):  # t5x.infer
    _evaluate(
      ['models/melodi_base.gin', 'models/tiny.gin', 'infer.gin'],
      'utils.RestoreCheckpointConfig.path',
      [f'CHECKPOINT_PATH = {checkpoint!r}', "INFER_OUTPUT_DIR = '/tmp/unused'"],
    )
  with pytest.raises(ValueError, match=r'VOCAB_SIZE=8192'):  # resuming t5x.train
    _signed_run(tmp_path / 'run')


def test_new_run_writes_its_signature_without_the_unsigned_warning(tmp_path, entry_points, caplog):
  """Issue 27 item 3: every new run used to warn 'trained before signatures were written'."""
  del entry_points
  caplog.set_level('WARNING')
  _signed_run(tmp_path / 'new')
  assert (tmp_path / 'new' / t5x_signature.SIGNATURE_FILE).exists()
  assert 'No model_signature.json' not in caplog.text
  # A directory with checkpoints but no signature (an old run) is resumed with the warning.
  (tmp_path / 'old' / 'checkpoint_100').mkdir(parents=True)
  _signed_run(tmp_path / 'old')
  assert f'No model_signature.json in {tmp_path / "old"}' in caplog.text


def test_generate_checks_the_signature_before_reading_the_checkpoint(
  tmp_path, entry_points, monkeypatch
):
  """Issue 27 item 2: tools.generate printed nonsense with another vocabulary and exited 0."""
  del entry_points
  from melodi_t5x.tools import generate  # pylint: disable=g-import-not-at-top

  def no_restore(checkpoint):
    raise AssertionError(f'the checkpoint {checkpoint} was read before the signature check')

  monkeypatch.setattr(generate, 'load_params', no_restore)
  prompt = tmp_path / 'prompt.txt'
  prompt.write_text('To be, or not to be, that is the question.')
  _signed_run(tmp_path / 'run')
  path = tmp_path / 'run' / t5x_signature.SIGNATURE_FILE
  saved = json.loads(path.read_text())
  other = dict(saved['vocabulary'], name="TaskVocabulary('my_books')", checksum=123)
  path.write_text(json.dumps(dict(saved, vocabulary=other)))
  args = ['--checkpoint', str(tmp_path / 'run' / 'checkpoint_400'), '--prompt_file', str(prompt)]
  with pytest.raises(ValueError, match=r"vocabulary TaskVocabulary\('my_books'\)"):
    generate.main(args)
  path.write_text(json.dumps(dict(saved, config=dict(saved['config'], vocab_size='8192'))))
  with pytest.raises(ValueError, match=r'--gin\.VOCAB_SIZE=8192'):
    generate.main(args)


@pytest.mark.parametrize(
  'content, message',
  [
    (None, 'cannot read it'),
    (b'caf\xe9 au lait', r'not UTF-8 text \(byte 0xe9 at offset 3\)'),
    (b'', 'is empty'),
    (b' \n\n', 'is empty'),
  ],
)
def test_generate_refuses_a_bad_prompt_file_before_loading_the_model(
  tmp_path, monkeypatch, content, message
):
  """Issue 27 item 2: reported after ~20 s of model loading (raw traceback), or generated."""
  from melodi_t5x.tools import generate  # pylint: disable=g-import-not-at-top

  def no_model(*unused):
    raise AssertionError('the model was loaded before the prompt file was checked')

  monkeypatch.setattr(generate, 'load_model', no_model)
  prompt = tmp_path / 'prompt.txt'
  if content is not None:
    prompt.write_bytes(content)
  with pytest.raises(SystemExit, match=f'--prompt_file {prompt}.*{message}'):
    generate.main(['--checkpoint', str(tmp_path / 'checkpoint_1'), '--prompt_file', str(prompt)])


def _event_tags(folder) -> dict[str, str]:
  """Tag -> kind ('scalar' / 'image') of the TensorBoard event files under `folder`."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  tags = {}
  for path in tf.io.gfile.glob(os.path.join(str(folder), 'events.out.tfevents.*')):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        plugin = value.metadata.plugin_data.plugin_name
        tags[value.tag] = 'image' if plugin == 'images' else 'scalar'
  return tags


def test_eval_logs_progress_with_tokens_per_second_and_eta(tmp_path, clean_gin, caplog):
  """Issue 27 item 6: eval printed nothing for its whole run, and had no ETA."""
  del clean_gin
  trainer = _trainer(tmp_path, progress_seconds=0)
  state = trainer.train_state
  caplog.set_level('INFO')
  caplog.set_level('INFO', logger='absl')  # another test may have lowered absl's verbosity
  batches = _document_batches(6)
  counted = t5x_eval_module().EvalProgress('x', 0, batches)
  counted._counter.join(timeout=60)  # the background count of a re-iterable dataset
  assert counted.total == 6 * B * T
  trainer.stream(state.params, state.flax_mutables, batches, name='books')
  lines = [r.getMessage() for r in caplog.records if 'Streaming eval books' in r.getMessage()]
  print('\n'.join(lines))
  assert 'first batch after' in lines[0] and '(memory carried)' in lines[0]
  assert any(re.search(r'batch [2-6], \d+ tokens in .*tokens/s\)', line) for line in lines)
  # Once the split is counted (a second pass on a background thread), lines carry an ETA.
  assert any(re.search(rf'% of {6 * B * T} tokens, ETA', line) for line in lines) or any(
    'ETA after the split is counted' in line for line in lines
  )


def t5x_eval_module():
  from melodi_t5x import t5x_eval  # pylint: disable=g-import-not-at-top

  return t5x_eval


def test_eval_progress_line_eta_from_the_counted_total():
  """The ETA is the tokens left at the measured rate (after the first, compiling batch)."""
  now = [100.0]
  progress = t5x_eval_module().EvalProgress('books (memory reset)', 30, clock=lambda: now[0])
  now[0] = 110.0
  progress.add(1000)  # first batch: 10 s of compilation
  now[0] = 120.0
  progress.add(1000)  # 1000 tokens in 10 s: 100 tokens/s
  assert progress.line() == (
    'Streaming eval books (memory reset): batch 2, 2000 tokens in 20 s (100 tokens/s).'
  )
  progress.total = 8000
  assert progress.line().endswith('(100 tokens/s), 25% of 8000 tokens, ETA 1 min 00 s.')


def test_eval_writes_perplexities_and_the_report_image_to_tensorboard(tmp_path, clean_gin):
  """Issue 27 item 6: per-position perplexities and the image never reached TensorBoard."""
  del clean_gin
  from t5x import trainer as trainer_lib  # pylint: disable=g-import-not-at-top

  t5x_eval = t5x_eval_module()
  trainer = _trainer(tmp_path / 'run', report_dir=str(tmp_path / 'report'), memory_mode='reset')
  trainer.eval_metrics_managers = {
    'books': trainer_lib.MetricsManager('training_eval/books', summary_dir=str(tmp_path / 'run'))
  }
  trainer.eval({'books': _document_batches(3)})
  folder = tmp_path / 'run' / 'training_eval' / 'books'
  files = set(os.listdir(folder))
  trainer.eval({'books': _document_batches(3)})  # a second eval: the same event files
  assert set(os.listdir(folder)) == files
  tags = _event_tags(folder)
  print(sorted(tags))
  assert tags['reset/perplexity'] == 'scalar'
  assert tags['reset/position/00_0-16/perplexity'] == 'scalar'
  assert tags['reset/perplexity_by_position'] == 'image'
  # The report's titles say the memory mode.
  md = (tmp_path / 'report' / f'{t5x_eval.report_name("books", 0, "reset")}.md').read_text()
  assert md.startswith('# Perplexity report: books (memory reset)')


def test_eval_does_not_warn_for_the_optimizer_state_it_skips(tmp_path, entry_points, caplog):
  """Issue 27 item 8: 184 'Not restoring param=state/param_states/...' warnings per eval."""
  del entry_points
  from absl import logging  # pylint: disable=g-import-not-at-top

  _signed_run(tmp_path / 'run')
  checkpoint = str(tmp_path / 'run' / 'checkpoint_400')
  assert _eval_path(checkpoint) == checkpoint  # what t5x.eval evaluates before restoring
  caplog.set_level('WARNING')
  message = "Not restoring param=%s because it's missing in the checkpoint"
  logging.warning(message, 'state/param_states/decoder/layers_0/mlp/wi/kernel/v_row')
  logging.warning(message, 'state/params/decoder/layers_0/mlp/wi/kernel')
  assert 'param_states' not in caplog.text
  assert 'Not restoring param=state/params/decoder/layers_0/mlp/wi/kernel' in caplog.text
