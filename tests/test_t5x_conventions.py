"""Bad inputs to the T5X plumbing fail loudly or are counted (in-process; need T5X).

Memory follows its document (misaligned rows reset and counted, or an error), stateless scoring
refused without opt-in, T5X's seqio pipeline refused by the feature converter, `trainer.Trainer`
bindings forwarded to `MemoryTrainer` (or a clear conflict error), the checkpoint_0 stream
position, combining per-host perplexity totals, and the former class names.
"""

from __future__ import annotations

import importlib.util
import json

import needs
import numpy as np
import pytest
from tiny_configs import T5X_MELODI

needs.t5x()

import gin  # noqa: E402
import jax  # noqa: E402
import seqio  # noqa: E402
import tensorflow as tf  # noqa: E402
from t5x import adafactor  # noqa: E402
from t5x import trainer as trainer_lib  # noqa: E402
from t5x_trainers import input_shapes  # noqa: E402

from melodi_t5x import config as config_lib  # noqa: E402
from melodi_t5x import report, t5x_data, t5x_eval, t5x_gin, t5x_model  # noqa: E402
from melodi_t5x.architectures import melodi  # noqa: E402

B, T = 3, 16
TINY = config_lib.MelodiConfig(**T5X_MELODI)


def _model(**kwargs):
  return t5x_model.MemoryDecoderModel(
    module=melodi.MelodiDecoder(TINY),
    vocabulary=seqio.PassThroughVocabulary(size=32),
    optimizer_def=adafactor.Adafactor(),
    **kwargs,
  )


def _batch(document, chunk, sos, seed=0):
  rng = np.random.default_rng(seed)
  targets = rng.integers(2, 32, (B, T)).astype(np.int32)
  return {
    'decoder_input_tokens': np.roll(targets, 1, axis=1),
    'decoder_target_tokens': targets,
    'decoder_loss_weights': np.ones((B, T), np.float32),
    'start_of_sequence': np.asarray(sos, bool),
    'document_id': np.asarray(document, np.int32),
    'chunk_index': np.asarray(chunk, np.int32),
  }


def _init(model):
  variables = model.get_initial_variables(jax.random.PRNGKey(0), *input_shapes(B, T))
  return variables['params'], {'memory': variables['memory'], 'stream': variables['stream']}


def _step(model, params, mutables, batch):
  loss, (metrics, new) = model.loss_fn(params, batch, None, mutables)
  return metrics, new


def test_memory_records_document_and_chunk_and_resets_misaligned_rows():
  model = _model()
  params, mutables = _init(model)
  position = mutables[t5x_model.STREAM]
  assert position['document'].shape == (B,) and position['next_chunk'].shape == (B,)
  metrics, mutables = _step(model, params, mutables, _batch([5, 6, 7], [0, 0, 0], [1, 1, 1]))
  np.testing.assert_array_equal(mutables[t5x_model.STREAM]['document'], [5, 6, 7])
  np.testing.assert_array_equal(mutables[t5x_model.STREAM]['next_chunk'], [1, 1, 1])
  assert float(metrics[t5x_model.MISALIGNED_ROWS].compute()) == 0.0
  carried = mutables
  # Row 0 continues (5, chunk 1); row 1 jumps to another document; row 2 skips a chunk.
  bad = _batch([5, 9, 7], [1, 1, 2], [0, 0, 0], seed=1)
  metrics, _ = _step(model, params, carried, bad)
  misaligned = float(metrics[t5x_model.MISALIGNED_ROWS].compute())
  print(f'misaligned rows: memory/misaligned_rows = {misaligned}')
  assert misaligned == 2.0
  # Reset means: rows 1 and 2 score exactly as if they started their document here.
  nll = lambda m, b: np.asarray(  # noqa: E731
    t5x_model.token_nll(m.apply_with_memory(params, b, carried)[0], b['decoder_target_tokens'])
  )
  got = nll(model, bad)
  want = nll(model, {**bad, 'start_of_sequence': np.array([False, True, True])})
  np.testing.assert_allclose(got, want, rtol=1e-6)
  kept = nll(model, {**bad, 'start_of_sequence': np.array([True, True, True])})
  assert not np.allclose(got[0], kept[0])  # the aligned row really used its memory


def test_misaligned_rows_error_mode():
  model = _model(misaligned_rows='error')
  params, mutables = _init(model)
  _, mutables = _step(model, params, mutables, _batch([5, 6, 7], [0, 0, 0], [1, 1, 1]))
  step = jax.jit(lambda p, m, b: model.loss_fn(p, b, None, m))
  with pytest.raises(Exception, match='do not continue the document of their memory') as err:
    jax.block_until_ready(step(params, mutables, _batch([5, 9, 7], [1, 1, 1], [0, 0, 0])))
  print('misaligned rows (error mode):', str(err.value).splitlines()[-1][:200])
  with pytest.raises(ValueError, match='misaligned_rows'):
    _model(misaligned_rows='ignore')


def test_batch_without_document_fields_is_refused():
  model = _model()
  params, mutables = _init(model)
  batch = _batch([5, 6, 7], [0, 0, 0], [1, 1, 1])
  del batch['document_id'], batch['chunk_index']
  with pytest.raises(ValueError, match='get_dataset_fn = @t5x_data.get_dataset'):
    _step(model, params, mutables, batch)


def test_stateless_scoring_needs_opt_in():
  batch = _batch([5, 6, 7], [0, 0, 0], [1, 1, 1])
  model = _model()
  params, mutables = _init(model)
  with pytest.raises(ValueError, match='allow_stateless_scoring') as err:
    model.score_batch(params, batch)
  print('score_batch:', str(err.value)[:160])
  with pytest.raises(ValueError, match='allow_stateless_scoring'):
    model.eval_fn(params, batch, mutables)
  open_model = _model(allow_stateless_scoring=True)
  scores = np.asarray(open_model.score_batch(params, batch))
  logits = open_model.apply_with_memory(params, batch, None)[0]
  want = -np.asarray(t5x_model.token_nll(logits, batch['decoder_target_tokens'])).sum(-1)
  np.testing.assert_allclose(scores, want, rtol=1e-5)
  # eval_fn with opt-in ignores the training rows' memory: same loss with zero memory.
  _, trained = _step(open_model, params, mutables, batch)
  loss_a, _ = open_model.eval_fn(params, batch, trained)
  loss_b, _ = open_model.eval_fn(params, batch, mutables)
  assert float(loss_a) == float(loss_b)


def _chunk_dataset():
  ex = {'targets': np.arange(2, 2 + T, dtype=np.int32), 'start_of_sequence': True}
  return tf.data.Dataset.from_tensors(ex)


def test_feature_converter_refuses_seqio_pipelines_unless_opted_in():
  converter = _model().FEATURE_CONVERTER_CLS(pack=False)
  with pytest.raises(ValueError, match='not document streams') as err:
    converter(_chunk_dataset(), {'targets': T})
  print('utils.get_dataset:', str(err.value)[:160])
  converter = _model(allow_stateless_scoring=True).FEATURE_CONVERTER_CLS(pack=False)
  out = next(iter(converter(_chunk_dataset(), {'targets': T}).as_numpy_iterator()))
  np.testing.assert_array_equal(out['decoder_target_tokens'], np.arange(2, 2 + T))


@pytest.fixture
def clean_gin():
  gin.clear_config()
  yield
  gin.clear_config()


def _trainer_kwargs():
  return dict(
    learning_rate_fn=t5x_eval._UNSET,  # pylint: disable=protected-access
    num_microbatches=t5x_eval._UNSET,  # pylint: disable=protected-access
    weight_metrics_computer=t5x_eval._UNSET,  # pylint: disable=protected-access
  )


def test_trainer_bindings_are_forwarded_or_refused(clean_gin):
  del clean_gin
  gin.parse_config(
    """
from __gin__ import dynamic_registration
from t5x import trainer
trainer.Trainer.num_microbatches = 4
"""
  )
  forwarded = t5x_eval.forward_trainer_bindings(t5x_eval.MemoryTrainer, _trainer_kwargs())
  assert forwarded['num_microbatches'] == 4
  assert forwarded['learning_rate_fn'] is None
  with pytest.raises(ValueError, match='num_microbatches=4') as err:
    t5x_eval.MemoryTrainer(None, None, None, [], None, None, None)
  print('trainer.Trainer.num_microbatches=4:', str(err.value)[:160])
  gin.clear_config()
  gin.parse_config(
    """
from __gin__ import dynamic_registration
from t5x import trainer
from melodi_t5x import t5x_eval
trainer.Trainer.num_microbatches = None
t5x_eval.MemoryTrainer.num_microbatches = 2
"""
  )
  with pytest.raises(ValueError, match='disagree') as err:
    t5x_eval.forward_trainer_bindings(t5x_eval.MemoryTrainer, _trainer_kwargs())
  print('conflicting bindings:', str(err.value)[:160])
  assert issubclass(t5x_eval.MemoryTrainer, trainer_lib.Trainer)


def test_former_names_are_gone():
  """Issue 18: the compatibility aliases were removed (CHANGELOG.md lists the replacements)."""
  assert not hasattr(t5x_model, 'MelodiModel')
  assert not hasattr(t5x_data, 'MelodiFeatureConverter')
  assert not hasattr(t5x_eval, 'StreamingPerplexityEvaluator')
  assert not hasattr(t5x_gin, 'REPO_ROOT')
  assert importlib.util.find_spec('melodi_t5x.model') is None


class _Counting:
  """A stream of numbered batches with JSON state (stands in for the document stream)."""

  element_spec = {'decoder_input_tokens': None, 'decoder_target_tokens': None}

  def __init__(self):
    self.n = 0

  def __next__(self):
    self.n += 1
    return {'decoder_input_tokens': self.n, 'decoder_target_tokens': self.n}

  def get_state(self):
    return {'n': self.n}

  def save(self, filename):
    with open(filename, 'w') as f:
      json.dump(self.get_state(), f)

  def restore(self, filename):
    with open(filename) as f:
      self.n = json.load(f)['n']


def test_checkpoint_0_saves_the_position_before_the_peeked_batch(tmp_path):
  stream = t5x_data.KeySelectingIterator(_Counting(), t5x_data.MODEL_KEYS)
  next(stream)  # t5x.train peeks the first batch before saving checkpoint_0
  (tmp_path / 'checkpoint_0').mkdir()
  stream.save(tmp_path / 'checkpoint_0' / 'train_ds')
  assert json.loads((tmp_path / 'checkpoint_0' / 'train_ds').read_text()) == {'n': 0}
  for _ in range(4):  # steps 1..5 (the peeked batch is step 1's)
    next(stream)
  (tmp_path / 'checkpoint_5').mkdir()
  stream.save(tmp_path / 'checkpoint_5' / 'train_ds')
  assert json.loads((tmp_path / 'checkpoint_5' / 'train_ds').read_text()) == {'n': 5}
  resumed = t5x_data.KeySelectingIterator(_Counting(), t5x_data.MODEL_KEYS)
  resumed.restore(tmp_path / 'checkpoint_5' / 'train_ds')
  assert next(resumed)['decoder_target_tokens'] == 6
  (tmp_path / 'checkpoint_5.orbax-checkpoint-tmp-1').mkdir()
  resumed.save(tmp_path / 'checkpoint_5.orbax-checkpoint-tmp-1' / 'train_ds')  # peeked again
  assert json.loads(
    (tmp_path / 'checkpoint_5.orbax-checkpoint-tmp-1' / 'train_ds').read_text()
  ) == {'n': 5}


def test_hosts_totals_combine_to_the_one_host_totals():
  rng = np.random.default_rng(0)
  nll = rng.uniform(0, 5, (4, 8))
  weights = (rng.uniform(size=(4, 8)) < 0.8).astype(np.float32)
  docs, chunks = np.array([10, 11, 12, 10]), np.array([0, 0, 0, 1])
  whole = report.PerplexityAccumulator([0, 8])
  whole.add(nll, weights, docs, chunks)
  host_a, host_b = report.PerplexityAccumulator([0, 8]), report.PerplexityAccumulator([0, 8])
  host_a.add(nll[:2], weights[:2], docs[:2], chunks[:2])
  host_b.add(nll[2:], weights[2:], docs[2:], chunks[2:])
  combined = report.PerplexityAccumulator([0, 8])
  combined.merge_state(json.loads(json.dumps(host_a.get_state())))
  combined.merge_state(json.loads(json.dumps(host_b.get_state())))
  a, b = whole.summary(), combined.summary()
  for key in ('tokens', 'documents', 'chunks'):
    assert a[key] == b[key]
  assert b['perplexity'] == pytest.approx(a['perplexity'], rel=1e-12)
  assert b['position_buckets'] == pytest.approx(a['position_buckets'])
  with pytest.raises(ValueError, match='two hosts'):
    combined.merge_state(host_a.get_state())
