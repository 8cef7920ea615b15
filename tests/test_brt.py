"""Behavioural tests of the Block-Recurrent Transformer decoder (no t5x, no meliad needed).

Parity with the authors' code is in test_reference_parity.py; these tests cover what the fixture
does not: another recurrent layer index, more windows per segment, the initial state at document
starts only, the order "tokens read the state before this window's update", and config errors.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from carried_memory import apply_segment, jit_step, zeros_memory
from flax import traverse_util
from tiny_configs import SMALL_DIMS

from melodi_t5x.architectures.brt import BRTDecoder
from melodi_t5x.config import BRTConfig

# Recurrent layer at the bottom (the fixture has it at index 1 of 4); H*K != D.
CFG = BRTConfig(
  num_layers=2,
  recurrent_layer_index=0,
  num_states=3,
  **{**SMALL_DIMS, 'head_dim': 4, 'vocab_size': 61},
)
B = 2
W = CFG.window_length


def _tokens(seed: int, length: int) -> jnp.ndarray:
  return jnp.asarray(np.random.RandomState(seed).randint(1, CFG.vocab_size, (B, length)))


@functools.cache
def _model_and_variables(cfg: BRTConfig = CFG):
  model = BRTDecoder(cfg)
  tokens = jnp.ones((B, 2 * cfg.window_length), jnp.int32)
  init = jax.jit(functools.partial(model.init, enable_dropout=False))
  return model, init(jax.random.PRNGKey(0), tokens, tokens)


def _params():
  return _model_and_variables()[1]['params']


def _zeros_memory():
  return zeros_memory(_model_and_variables()[1])


@functools.cache
def _step():
  return jit_step(_model_and_variables()[0])


def test_parameters_and_memory_layout():
  model, variables = _model_and_variables()
  flat = traverse_util.flatten_dict(variables['params'], sep='/')
  hk, d = CFG.num_heads * CFG.head_dim, CFG.embed_dim
  # Token side of the recurrent layer: [self; cross] heads into one output kernel.
  assert flat['layers_0/out/kernel'].shape == (2 * hk, d)
  assert flat['layers_0/query2/kernel'].shape == (d, hk)
  assert flat['layers_0/initial_state'].shape == (CFG.num_states, d)
  state_block = {k for k in flat if k.startswith('layers_0/state_block/')}
  assert state_block == {
    f'layers_0/state_block/{name}'
    for name in (
      'attn_norm/scale',
      'position_embeddings',
      'query/kernel',
      'query2/kernel',
      'key/kernel',
      'value/kernel',
      'temperature',
      'temperature2',
      'out/kernel',
      'gate_bias',
    )
  }  # no FFN (skip FFN) and no T5 table in the state block
  assert flat['layers_0/state_block/out/kernel'].shape == (2 * hk, d)
  # The other layer is a plain bias-free XL layer.
  assert flat['layers_1/out/kernel'].shape == (hk, d)
  assert not any(k.startswith('layers_1/') and ('2' in k or 'state' in k) for k in flat)
  assert not any(k.endswith('/bias') for k in flat)
  mem = variables['memory']
  assert mem['layers_0']['recurrent'].shape == (B, CFG.num_states, d)
  assert set(mem['layers_0']) == {'keys', 'values', 'recurrent'}
  assert set(mem['layers_1']) == {'keys', 'values'}


def test_one_segment_of_8_windows_equals_two_segments_of_4():
  step, params = _step(), _params()
  tokens = _tokens(0, 8 * W)
  full, mem_full = step(params, _zeros_memory(), tokens, jnp.ones((B,), bool))
  first, mem = step(params, _zeros_memory(), tokens[:, : 4 * W], jnp.ones((B,), bool))
  second, mem = step(params, mem, tokens[:, 4 * W :], jnp.zeros((B,), bool))
  np.testing.assert_allclose(np.concatenate([first, second], 1), full, atol=2e-5, rtol=1e-5)
  assert jax.tree_util.tree_structure(mem) == jax.tree_util.tree_structure(mem_full)
  for a, b in zip(jax.tree_util.tree_leaves(mem), jax.tree_util.tree_leaves(mem_full)):
    np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-5)
  # The state does change from one segment to the next.
  assert (
    np.max(np.abs(mem['layers_0']['recurrent'] - _params()['layers_0']['initial_state'])) > 1e-3
  )


def test_document_start_reads_the_learned_initial_state_not_the_carried_one():
  step, params = _step(), _params()
  tokens = _tokens(1, 3 * W)
  # Memory full of garbage: a row that starts a document must ignore all of it.
  garbage = jax.tree_util.tree_map(
    lambda x: jnp.asarray(np.random.RandomState(2).normal(size=x.shape), x.dtype), _zeros_memory()
  )
  started, _ = step(params, garbage, tokens, jnp.array([True, False]))
  # The same rows, continuing a document whose carried state is exactly the initial state and
  # whose XL caches are zero.
  mem = _zeros_memory()
  initial = params['layers_0']['initial_state']
  mem['layers_0']['recurrent'] = jnp.broadcast_to(initial, (B, *initial.shape))
  continued, _ = step(params, mem, tokens, jnp.zeros((B,), bool))
  np.testing.assert_allclose(started[0], continued[0], atol=1e-6)
  assert np.max(np.abs(started[1] - continued[1])) > 1e-3  # row 1 read the garbage
  # A zero state is not the same thing (the initial state is learned, not zeros).
  zero_state, _ = step(params, _zeros_memory(), tokens, jnp.zeros((B,), bool))
  assert np.max(np.abs(zero_state[0] - started[0])) > 1e-3
  # Stateless scoring starts every row from the initial state as well.
  model = _model_and_variables()[0]
  stateless = jax.jit(lambda p: model.apply({'params': p}, tokens, tokens, enable_dropout=False))(
    params
  )
  np.testing.assert_allclose(stateless[0], started[0], atol=1e-6)


@functools.cache
def _grad_fn():
  """Jitted d(loss)/d(params of layer 0); loss = a log-probability summed over weighted tokens."""
  model = _model_and_variables()[0]
  tokens = _tokens(3, 3 * W)
  mem = jax.tree_util.tree_map(lambda x: x + 0.5, _zeros_memory())

  def loss(params, sos, weights):
    logits, _ = apply_segment(model, params, mem, tokens, sos, tokens)
    return jnp.sum(jax.nn.log_softmax(logits)[..., 7] * weights)

  return jax.jit(lambda params, sos, weights: jax.grad(loss)(params, sos, weights)['layers_0'])


def _loss_grads(sos, loss_window: int | None = None):
  """Gradients of layer 0 for the loss of every token, or of window `loss_window` only."""
  weights = np.ones(3 * W, np.float32)
  if loss_window is not None:
    weights[:] = 0
    weights[loss_window * W : (loss_window + 1) * W] = 1
  return _grad_fn()(_params(), sos, jnp.asarray(weights))


def test_initial_state_gets_gradient_only_from_rows_that_start_a_document():
  assert np.all(_loss_grads(jnp.zeros((B,), bool))['initial_state'] == 0)
  assert np.max(np.abs(_loss_grads(jnp.array([False, True]))['initial_state'])) > 0


def test_tokens_read_the_state_before_this_windows_update():
  # Window 0 reads the incoming state, so nothing of the update (gate, output kernel, state
  # cross-attention) reaches its loss; window 1 reads the state updated by window 0.
  sos = jnp.zeros((B,), bool)
  first, second = _loss_grads(sos, 0)['state_block'], _loss_grads(sos, 1)['state_block']
  for name in ('gate_bias', 'temperature2'):
    assert np.all(first[name] == 0), name
    assert np.max(np.abs(second[name])) > 0, name
  assert np.all(first['out']['kernel'] == 0) and np.max(np.abs(second['out']['kernel'])) > 0


def _num_equations(jaxpr) -> int:
  """Equations of a jaxpr, those of nested jaxprs (scan bodies, jit calls) included."""
  total = 0
  for eqn in jaxpr.eqns:
    total += 1
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        inner = getattr(sub, 'jaxpr', sub)
        if hasattr(inner, 'eqns'):
          total += _num_equations(inner)
  return total


def test_compiled_program_does_not_grow_with_windows():
  model, variables = _model_and_variables()

  def count(length):
    tokens = jnp.ones((B, length), jnp.int32)
    fn = lambda p: model.apply({'params': p}, tokens, tokens, enable_dropout=False)
    return _num_equations(jax.make_jaxpr(fn)(variables['params']).jaxpr)

  assert count(2 * W) == count(16 * W)


def test_paper_defaults():
  cfg = BRTConfig()
  assert (cfg.num_layers, cfg.recurrent_layer_index, cfg.num_states) == (12, 9, 512)
  assert (cfg.use_cache, cfg.ffn_bias) == (True, False)


@pytest.mark.parametrize(
  'overrides, field, hint',
  [
    (dict(recurrent_layer_index=2), 'recurrent_layer_index', 'num_layers=2'),
    (dict(recurrent_layer_index=-1), 'recurrent_layer_index', '0-based'),
    (dict(num_states=0), 'num_states', 'positive integer'),
  ],
)
def test_config_errors_name_the_field_and_the_fix(overrides, field, hint):
  with pytest.raises(ValueError, match=f'BRTConfig.{field}=') as err:
    dataclasses.replace(CFG, **overrides)
  assert hint in str(err.value)
