"""The T5X plumbing serves every architecture unchanged (needs T5X).

For each architecture of the registry (`architectures.names()`; and Transformer-XL without its
cache) at the tiny size of its gin files: every logical axis name of its parameters and carried
state has a partitioning rule and every parameter axis an Adafactor factor rule, T5X builds its
train state, and `MemoryDecoderModel.loss_fn` carries its memory from one chunk to the next with
the same tree, shapes and dtypes (what T5X's compiled train step requires).
"""

from __future__ import annotations

import architecture_configs
import jax
import jax.numpy as jnp
import needs
import numpy as np
import pytest

needs.t5x()

import seqio  # noqa: E402
from flax.core import unfreeze  # noqa: E402
from flax.linen import partitioning as nn_partitioning  # noqa: E402
from t5x import adafactor, train_state  # noqa: E402

from melodi_t5x import architectures, t5x_model  # noqa: E402
from melodi_t5x import partitioning as melodi_partitioning  # noqa: E402

B = 2


def _configs():
  """Every architecture of the registry at the tiny size of its gin files, and XL without cache."""
  for name in architectures.names():
    yield name, architecture_configs.tiny_config(name)
  yield 'xl_nocache', architecture_configs.tiny_config('xl', use_cache=False)


CONFIGS = dict(_configs())


def _model(cfg) -> t5x_model.MemoryDecoderModel:
  return t5x_model.MemoryDecoderModel(
    module=architectures.build_decoder(cfg),
    vocabulary=seqio.PassThroughVocabulary(cfg.vocab_size),
    optimizer_def=adafactor.Adafactor(
      decay_rate=0.8, logical_factor_rules=melodi_partitioning.logical_factor_rules()
    ),
  )


def _initial_variables(model):
  length = 2 * model.module.config.window_length
  shapes = {'decoder_input_tokens': (B, length), 'decoder_target_tokens': (B, length)}
  types = {k: jnp.int32 for k in shapes}
  return model.get_initial_variables(jax.random.PRNGKey(0), shapes, types)


def _axis_names(axes_tree) -> set[str]:
  names = set()
  for spec in jax.tree_util.tree_leaves(
    unfreeze(nn_partitioning.get_axis_names(axes_tree)), is_leaf=lambda x: isinstance(x, tuple)
  ):
    names.update(n for n in spec if n is not None)
  return names


@pytest.mark.parametrize('name', sorted(CONFIGS))
def test_every_axis_has_rules_and_t5x_builds_the_train_state(name):
  model = _model(CONFIGS[name])
  variables = jax.eval_shape(lambda: _initial_variables(model))
  assert ('memory' in variables) == (name != 'xl_nocache')
  rule_names = {logical for logical, _ in melodi_partitioning.logical_axis_rules()}
  factor_names = set(melodi_partitioning.logical_factor_rules())
  param_axes = _axis_names(variables['params_axes'])
  memory_axes = _axis_names(variables.get('memory_axes', {}))
  assert param_axes - rule_names == set() and memory_axes - rule_names == set()
  assert param_axes - factor_names == set()
  assert 'batch' in memory_axes or name == 'xl_nocache'
  state = jax.eval_shape(
    lambda: train_state.FlaxOptimTrainState.create(model.optimizer_def, _initial_variables(model))
  )
  # The module's memory, and beside it the data position of each row (`t5x_model.STREAM`).
  carried = {'memory', 'stream'} if 'memory' in variables else set()
  assert set(state.flax_mutables) == carried


@pytest.mark.parametrize('name', sorted(CONFIGS))
def test_loss_fn_carries_memory_with_unchanged_tree(name):
  model = _model(CONFIGS[name])
  variables = jax.jit(
    lambda: {k: v for k, v in _initial_variables(model).items() if not k.endswith('_axes')}
  )()
  mutables = {k: v for k, v in variables.items() if k == 'memory'}
  cfg = CONFIGS[name]
  tokens = np.random.RandomState(0).randint(1, cfg.vocab_size, (3, B, 2 * cfg.window_length + 1))
  tokens = tokens.astype(np.int32)

  @jax.jit
  def step(params, mutables, chunk, index, sos):
    batch = {
      'decoder_input_tokens': chunk[:, :-1],
      'decoder_target_tokens': chunk[:, 1:],
      'decoder_loss_weights': jnp.ones(chunk[:, 1:].shape, jnp.float32),
      'start_of_sequence': sos,
      'document_id': jnp.arange(B),  # row r streams document r: chunk 0, then chunk 1
      'chunk_index': jnp.full((B,), index),
    }
    loss, (_, new) = model.loss_fn(params, batch, None, mutables)
    return loss, new

  params = variables['params']
  _, after_first = step(params, mutables, tokens[0], 0, jnp.ones(B, bool))
  assert jax.tree_util.tree_structure(after_first) == jax.tree_util.tree_structure(mutables)
  for new, old in zip(jax.tree_util.tree_leaves(after_first), jax.tree_util.tree_leaves(mutables)):
    assert new.shape == old.shape and new.dtype == old.dtype
  carried, _ = step(params, after_first, tokens[1], 1, jnp.zeros(B, bool))
  reset, _ = step(params, after_first, tokens[1], 1, jnp.ones(B, bool))
  if name == 'xl_nocache':
    assert float(carried) == float(reset)  # nothing is carried
  else:
    assert abs(float(carried) - float(reset)) > 1e-6  # the first chunk's memory is read


@pytest.mark.parametrize('name', sorted(CONFIGS))
def test_factor_map_covers_every_parameter_without_fallback_warnings(name, caplog):
  """Issue 27 item 8: ~140 'factorization method falls back' warnings per training run.

  The gin-bound rules (`melodi_partitioning.factor_map`) give the optimizer state T5X built with
  the per-axis rules (the same factoring), without a warning.
  """
  cfg = CONFIGS[name]
  caplog.set_level('WARNING')

  def state_shapes(optimizer_def):
    model = t5x_model.MemoryDecoderModel(
      module=architectures.build_decoder(cfg),
      vocabulary=seqio.PassThroughVocabulary(cfg.vocab_size),
      optimizer_def=optimizer_def,
    )
    state = jax.eval_shape(
      lambda: train_state.FlaxOptimTrainState.create(model.optimizer_def, _initial_variables(model))
    )
    return jax.tree_util.tree_map(lambda x: x.shape, state.param_states)

  # Small dimensions are factored too (min_dim_size_to_factor), so that factoring is compared.
  hyper = dict(decay_rate=0.8, beta1=0.9, min_dim_size_to_factor=4)
  old = state_shapes(
    adafactor.Adafactor(**hyper, logical_factor_rules=melodi_partitioning.logical_factor_rules())
  )
  assert 'falls back to heuristics' in caplog.text  # what T5X said for each parameter
  caplog.clear()
  new = state_shapes(adafactor.Adafactor(**hyper, factor_map=melodi_partitioning.factor_map()))
  assert 'falls back' not in caplog.text
  assert new == old
  rows = [s.v_row for s in jax.tree_util.tree_leaves(new, is_leaf=lambda x: hasattr(x, 'v_row'))]
  assert any(shape != (1,) for shape in rows)  # some parameters are factored
