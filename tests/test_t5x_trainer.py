"""T5X's trainer drives the memory model in-process, as T5X's own `trainer_test` does (needs T5X).

One tiny MELODI, one `t5x_eval.MemoryTrainer` (T5X's `Trainer` plus streaming eval) on one CPU
device, built once for the module. Training steps go through T5X's partitioned train step
(`Trainer.train`); each step's carried `flax_mutables`, loss, learning rate and misalignment count
are checked against a direct computation with the step's incoming parameters and memory. Eval
streams hand-built batches of several documents (rows of different lengths, padding rows) and
must equal scoring each document alone, chunk after chunk. The subprocess runs of `t5x.train` /
`t5x.eval` (kill and resume, multi-host) are the slow tier's `test_t5x_integration.py` and
`test_t5x_multihost.py`.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import needs
import numpy as np
import pytest

needs.t5x()

import seqio  # noqa: E402
from t5x import adafactor  # noqa: E402
from t5x import partitioning as t5x_partitioning  # noqa: E402
from t5x_trainers import memory_trainer  # noqa: E402

from melodi_t5x import architectures, t5x_eval, t5x_model, t5x_schedule  # noqa: E402
from melodi_t5x import config as config_lib  # noqa: E402
from melodi_t5x import partitioning as melodi_partitioning  # noqa: E402

V, B, W, T = 64, 2, 8, 16  # vocabulary, rows, window, segment (two windows)
CONFIG = config_lib.MelodiConfig(
  num_layers=2,
  embed_dim=32,
  num_heads=2,
  head_dim=16,
  mlp_dim=64,
  vocab_size=V,
  window_length=W,
  summary_size=4,
  short_term_memory_size=4,
  long_term_memory_layers=(1,),
  long_term_memory_increment_size=2,
  long_term_memory_windows=4,
  dropout_rate=0.0,
  dtype='float32',
)
# Schedule: 2 warmup steps to 0.05, cosine to 0.005 at step 6 (reached inside this file's steps).
BASE_LR, FINAL_LR, WARMUP, DECAY = 0.05, 0.005, 2, 6


def _expected_lr(step: int) -> float:
  """The paper's schedule, written out here: linear warmup, then cosine from base to final."""
  warm = min(step, WARMUP) / WARMUP
  progress = min(max(step, WARMUP), DECAY) / DECAY
  return warm * (FINAL_LR + 0.5 * (BASE_LR - FINAL_LR) * (1 + math.cos(math.pi * progress)))


@pytest.fixture(scope='module')
def trainer():
  model = t5x_model.MemoryDecoderModel(
    module=architectures.build_decoder(CONFIG),
    vocabulary=seqio.PassThroughVocabulary(V),
    optimizer_def=adafactor.Adafactor(
      decay_rate=0.8, logical_factor_rules=melodi_partitioning.logical_factor_rules()
    ),
  )
  partitioner = t5x_partitioning.PjitPartitioner(
    num_partitions=1, logical_axis_rules=melodi_partitioning.logical_axis_rules()
  )
  return memory_trainer(
    model,
    partitioner,
    B,
    T,
    eval_names=['synthetic'],
    summary_dir=None,
    rng=jax.random.PRNGKey(1),
    learning_rate_fn=t5x_schedule.warmup_cosine(BASE_LR, FINAL_LR, WARMUP, DECAY),
  )


def _batch(tokens, document, chunk, sos):
  """One streamed chunk per row: inputs are the targets shifted right within the chunk."""
  tokens = np.asarray(tokens, np.int32)
  inputs = np.concatenate([np.ones((tokens.shape[0], 1), np.int32), tokens[:, :-1]], axis=1)
  return {
    'decoder_input_tokens': inputs,
    'decoder_target_tokens': tokens,
    'decoder_loss_weights': (tokens > 0).astype(np.float32),
    'start_of_sequence': np.asarray(sos, bool),
    'document_id': np.asarray(document, np.int32),
    'chunk_index': np.asarray(chunk, np.int32),
  }


def _train_one(trainer, batch):
  """(incoming train state, metrics) of one `Trainer.train` step on `batch`."""
  before = jax.tree_util.tree_map(np.asarray, trainer.train_state)
  summary = trainer.train(iter([batch]), num_steps=1).result()
  return before, {k: float(getattr(v, 'value', v)) for k, v in summary.items()}


def _direct(trainer, state, batch):
  """Loss and new memory of `batch` from `state`, without T5X's train step."""
  loss, (_, new) = _loss_fn(trainer._model)(state.params, batch, state.flax_mutables)
  return float(loss), jax.tree_util.tree_map(np.asarray, new)


@functools.cache
def _loss_fn(model):
  return jax.jit(lambda params, batch, mutables: model.loss_fn(params, batch, None, mutables))


def _assert_trees_close(a, b, **tol):
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), **tol)


def test_train_steps_carry_memory_count_misalignment_and_follow_the_schedule(trainer):
  rng = np.random.RandomState(0)
  docs = rng.randint(2, V, (4, 5 * T))  # four documents of five chunks
  chunk = lambda d, c: docs[d, c * T : (c + 1) * T]  # noqa: E731
  # Rows 0 and 1 stream documents 0 and 1 for three steps; at step 4 row 1 jumps to chunk 3 of
  # document 2 without a start of sequence (misaligned), row 0 goes on; step 5 continues both.
  plan = [
    ((0, 0, True), (1, 0, True)),
    ((0, 1, False), (1, 1, False)),
    ((0, 2, False), (1, 2, False)),
    ((0, 3, False), (2, 3, False)),
    ((0, 4, False), (2, 4, False)),
  ]
  memories = []
  for step, rows in enumerate(plan, start=1):
    batch = _batch(
      [chunk(d, c) for d, c, _ in rows],
      [d for d, _, _ in rows],
      [c for _, c, _ in rows],
      [s for _, _, s in rows],
    )
    before, metrics = _train_one(trainer, batch)
    assert int(before.step) == step - 1
    assert metrics['learning_rate'] == pytest.approx(_expected_lr(step - 1), rel=1e-6)
    assert metrics['memory/misaligned_rows'] == (1.0 if step == 4 else 0.0), step
    loss, expected = _direct(trainer, before, batch)
    assert metrics['loss'] == pytest.approx(loss, rel=1e-5)
    after = jax.tree_util.tree_map(np.asarray, trainer.train_state.flax_mutables)
    # T5X's train step carried exactly the memory the model wrote (same tree, dtypes, values).
    _assert_trees_close(after, expected, rtol=1e-5, atol=1e-6)
    position = after['stream']
    np.testing.assert_array_equal(position['document'], [d for d, _, _ in rows])
    np.testing.assert_array_equal(position['next_chunk'], [c + 1 for _, c, _ in rows])
    memories.append((before, batch, after))
    if step == 2:
      # Carried memory is used: the same step from fresh memory writes something else.
      fresh = dict(batch, start_of_sequence=np.ones(B, bool))
      _, reset = _direct(trainer, before, fresh)
      leaves = zip(jax.tree_util.tree_leaves(reset), jax.tree_util.tree_leaves(after))
      assert max(float(np.max(np.abs(x - y))) for x, y in leaves) > 1e-3
  # The misaligned row was reset: row 1 at step 4 equals a declared start of sequence.
  before, batch, after = memories[3]
  _, declared = _direct(trainer, before, dict(batch, start_of_sequence=np.array([False, True])))
  _assert_trees_close(after, declared, rtol=1e-5, atol=1e-6)
  assert int(trainer.train_state.step) == len(plan)


def _stream_batches(docs, rows):
  """Hand-built eval stream: each row takes the next unread document when its own one ends."""
  queue = list(range(len(docs)))
  current = [None] * rows
  batches = []
  while True:
    for r in range(rows):
      if current[r] is None or current[r][1] * T >= len(docs[current[r][0]]):
        current[r] = (queue.pop(0), 0) if queue else None
    if all(c is None for c in current):
      return batches
    tokens = np.zeros((rows, T), np.int32)
    document, chunk, sos, valid = [], [], [], []
    for r, cur in enumerate(current):
      if cur is None:
        document.append(-1), chunk.append(-1), sos.append(True), valid.append(False)
        continue
      d, c = cur
      part = docs[d][c * T : (c + 1) * T]
      tokens[r, : len(part)] = part
      document.append(d), chunk.append(c), sos.append(c == 0), valid.append(True)
      current[r] = (d, c + 1)
    batch = _batch(tokens, document, chunk, sos)
    batch['row_valid'] = np.asarray(valid)
    batches.append(batch)


@pytest.mark.parametrize('mode', ['carried', 'reset', 'no_short_term', 'no_long_term'])
def test_streaming_eval_equals_scoring_each_document_alone(trainer, mode):
  rng = np.random.RandomState(1)
  docs = [rng.randint(2, V, n) for n in (3 * T, T + 5, 2 * T, 7, 4 * T - 1)]
  trainer.memory_mode = mode
  try:
    acc, steps = trainer.stream(
      trainer.train_state.params, trainer.train_state.flax_mutables, _stream_batches(docs, B)
    )
  finally:
    trainer.memory_mode = 'carried'
  assert steps == len(_stream_batches(docs, B))
  # Reference: each document alone in a batch of one row, chunk after chunk, memory carried
  # (or reset at every chunk), straight through the Flax module (built with the dropped source).
  module, params = trainer._model.module, trainer.train_state.params
  if mode.startswith('no_'):
    module = module.clone(config=dataclasses.replace(module.config, drop_sources=(mode[3:],)))
  empty = module.init(
    jax.random.PRNGKey(0),
    np.ones((1, T), np.int32),
    np.ones((1, T), np.int32),
    enable_dropout=False,
  )['memory']

  @jax.jit
  def score(memory, inputs, targets, sos):
    logits, new = module.apply(
      {'params': params, 'memory': memory},
      inputs,
      targets,
      start_of_sequence=sos,
      enable_dropout=False,
      mutable=['memory'],
    )
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0], new['memory']

  total, count = 0.0, 0
  for doc in docs:
    memory = empty
    for c in range(math.ceil(len(doc) / T)):
      b = _batch(
        np.pad(doc[c * T : (c + 1) * T], (0, T - len(doc[c * T : (c + 1) * T])))[None],
        [0],
        [c],
        [c == 0 or mode == 'reset'],
      )
      nll, memory = score(
        memory, b['decoder_input_tokens'], b['decoder_target_tokens'], b['start_of_sequence']
      )
      mask = b['decoder_target_tokens'][0] > 0
      total += float(np.asarray(nll)[0][mask].astype(np.float64).sum())
      count += int(mask.sum())
  assert count == sum(len(d) for d in docs)
  summary = acc.summary()
  assert summary['tokens'] == count and summary['documents'] == len(docs)
  assert summary['perplexity'] == pytest.approx(math.exp(total / count), rel=1e-5)


def test_memory_mode_names_the_ablations_of_the_architecture(trainer):
  with pytest.raises(ValueError, match=r"'no_state'.*'no_short_term', 'no_long_term'"):
    trainer.memory_mode = 'no_state'
  assert t5x_eval.ablation_modes(CONFIG) == ('no_short_term', 'no_long_term')
  assert trainer.memory_mode == 'carried'


def test_attribution_is_recorded_without_changing_the_scores(trainer):
  rng = np.random.RandomState(2)
  docs = [rng.randint(2, V, n) for n in (3 * T, T + 5, 2 * T)]
  state = trainer.train_state
  plain, _ = trainer.stream(state.params, state.flax_mutables, _stream_batches(docs, B))
  assert trainer.last_attribution is None
  trainer._attribution, trainer._streaming_step = True, None
  try:
    recorded, _ = trainer.stream(state.params, state.flax_mutables, _stream_batches(docs, B))
  finally:
    trainer._attribution, trainer._streaming_step = False, None
  assert recorded.summary()['perplexity'] == pytest.approx(plain.summary()['perplexity'], 1e-6)
  attr = trainer.last_attribution
  assert attr['tokens'] == sum(len(d) for d in docs)
  assert len(attr['layers']) == CONFIG.num_layers
  for layer, sources in attr['layers'].items():
    assert sum(v['mass'] for v in sources.values()) == pytest.approx(1.0, abs=1e-5), layer
  long_layer = attr['layers'][f'layers_{CONFIG.long_term_memory_layers[0]}']
  assert any(s.startswith('long_term age') for s in long_layer)
