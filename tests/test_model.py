"""Behavioural tests of the MELODI decoder (no t5x needed)."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from carried_memory import jit_step, zeros_memory
from flax import traverse_util
from tiny_configs import DIMS, MELODI_MEMORY

from melodi_t5x.architectures.melodi import MelodiDecoder
from melodi_t5x.config import MelodiConfig

# 3 layers, long-term layer in the middle, FIFO of 3 windows so that it wraps quickly.
CFG = MelodiConfig(num_layers=3, **DIMS, **MELODI_MEMORY)
B = 2


def _tokens(seed: int, length: int, batch: int = B) -> jnp.ndarray:
  return jnp.asarray(np.random.RandomState(seed).randint(1, CFG.vocab_size, (batch, length)))


@functools.cache
def _model_and_params(cfg: MelodiConfig = CFG):
  model = MelodiDecoder(cfg)
  tokens = jnp.ones((B, 2 * cfg.window_length), jnp.int32)
  variables = model.init(jax.random.PRNGKey(0), tokens, tokens, enable_dropout=False)
  return model, variables


@functools.cache
def _step(cfg: MelodiConfig = CFG):
  return jit_step(_model_and_params(cfg)[0])


def _zeros_memory(cfg: MelodiConfig = CFG):
  return zeros_memory(_model_and_params(cfg)[1])


def test_shapes_memory_and_axes():
  model, variables = _model_and_params()
  params = variables['params']
  logits, mem = _step()(params, _zeros_memory(), _tokens(0, 24), jnp.ones((B,), bool))
  assert logits.shape == (B, 24, CFG.vocab_size) and logits.dtype == jnp.float32
  assert mem['layers_0']['short'].shape == (B, 4, 32)
  assert mem['layers_1']['fifo'].shape == (B, 6, 32)
  assert 'fifo' not in mem['layers_0'] and 'fifo' not in mem['layers_2']
  np.testing.assert_array_equal(mem['tokens_seen'], [3 * CFG.window_length] * 2)
  # Every parameter and memory leaf carries logical axis names of matching rank.
  flat = traverse_util.flatten_dict(params)
  axes = traverse_util.flatten_dict(variables['params_axes'])
  for path, value in flat.items():
    names = axes[path[:-1] + (path[-1] + '_axes',)].names
    assert len(names) == value.ndim, path
  memory = traverse_util.flatten_dict(variables['memory'])
  memory_axes = traverse_util.flatten_dict(variables['memory_axes'])
  short = sum(CFG.short_memory_size(i) > 0 for i in range(CFG.num_layers))
  assert len(memory) == len(memory_axes) == short + len(CFG.long_term_memory_layers) + 1
  for path, value in memory.items():
    names = memory_axes[path[:-1] + (path[-1] + '_axes',)].names
    assert len(names) == value.ndim and names[0] == 'batch', path


def test_start_of_sequence_row_equals_fresh_model():
  params = _model_and_params()[1]['params']
  step = _step()
  _, mem = step(params, _zeros_memory(), _tokens(1, 16), jnp.ones((B,), bool))
  tokens = _tokens(2, 16)
  carried, _ = step(params, mem, tokens, jnp.array([True, False]))
  fresh, _ = step(params, _zeros_memory(), tokens, jnp.ones((B,), bool))
  np.testing.assert_array_equal(carried[0], fresh[0])  # reset row: exactly a fresh model
  assert np.max(np.abs(carried[1] - fresh[1])) > 1e-3  # carried row: memory matters


def test_one_long_segment_equals_two_halves_with_memory_carried():
  params = _model_and_params()[1]['params']
  step = _step()
  tokens = _tokens(3, 64)  # 8 windows: the FIFO (3 windows) wraps
  full, mem_full = step(params, _zeros_memory(), tokens, jnp.ones((B,), bool))
  first, mem = step(params, _zeros_memory(), tokens[:, :32], jnp.ones((B,), bool))
  second, mem = step(params, mem, tokens[:, 32:], jnp.zeros((B,), bool))
  np.testing.assert_allclose(np.concatenate([first, second], 1), full, atol=2e-5, rtol=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves(mem), jax.tree_util.tree_leaves(mem_full)):
    np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-5)


def test_fifo_is_first_in_first_out():
  params = _model_and_params()[1]['params']
  step = _step()
  inc, q = CFG.long_term_memory_increment_size, CFG.long_term_memory_tokens
  mem = _zeros_memory()
  history = []
  for w in range(5):  # one window per call
    _, mem = step(params, mem, _tokens(10 + w, 8), jnp.array([w == 0] * B))
    fifo = np.asarray(mem['layers_1']['fifo'])
    history.append(fifo[:, -inc:])  # the newest increment is appended at the end
    filled = min(w + 1, CFG.long_term_memory_windows) * inc
    assert np.all(fifo[:, : q - filled] == 0), 'unfilled slots stay empty'
    assert np.all(np.abs(fifo[:, q - filled :]).sum(-1) > 0)
    expected = np.concatenate(history[-CFG.long_term_memory_windows :], axis=1)
    np.testing.assert_array_equal(fifo[:, q - filled :], expected)  # oldest first, oldest evicted


def test_causal_and_padding_does_not_leak_backwards():
  params = _model_and_params()[1]['params']
  step = _step()
  tokens = np.asarray(_tokens(4, 24))
  padded = tokens.copy()
  padded[:, 13:] = 0  # padding from position 13 on (second window onwards)
  a, _ = step(params, _zeros_memory(), jnp.asarray(tokens), jnp.ones((B,), bool))
  b, _ = step(params, _zeros_memory(), jnp.asarray(padded), jnp.ones((B,), bool))
  np.testing.assert_array_equal(a[:, :13], b[:, :13])
  assert np.max(np.abs(a[:, 13:] - b[:, 13:])) > 1e-3


def test_compiled_program_does_not_grow_with_windows():
  model, variables = _model_and_params()

  def count(length):
    tokens = jnp.ones((B, length), jnp.int32)
    fn = lambda p: model.apply({'params': p}, tokens, tokens, enable_dropout=False)
    return len(str(jax.make_jaxpr(fn)(variables['params'])).splitlines())

  assert count(16) == count(128)


def test_bfloat16_runs_and_stays_close_to_float32():
  cfg16 = dataclasses.replace(CFG, dtype='bfloat16')
  params = _model_and_params()[1]['params']
  tokens = _tokens(5, 32)
  ref, _ = _step()(params, _zeros_memory(), tokens, jnp.ones((B,), bool))
  out, mem = _step(cfg16)(params, _zeros_memory(cfg16), tokens, jnp.ones((B,), bool))
  assert out.dtype == jnp.float32 and np.all(np.isfinite(out))
  assert mem['layers_0']['short'].dtype == jnp.float32  # memory stored in float32
  p_ref, p_out = jax.nn.softmax(ref), jax.nn.softmax(out)
  assert float(jnp.max(jnp.abs(p_ref - p_out))) < 0.05
  assert float(jnp.mean(jnp.argmax(ref, -1) == jnp.argmax(out, -1))) > 0.9


def test_dropout_needs_rng_and_changes_output():
  cfg = dataclasses.replace(CFG, dropout_rate=0.3, attention_dropout_rate=0.3)
  model, variables = _model_and_params(cfg)
  tokens = _tokens(6, 16)
  plain = model.apply(variables, tokens, tokens, enable_dropout=False)
  dropped = model.apply(variables, tokens, tokens, rngs={'dropout': jax.random.PRNGKey(1)})
  assert np.max(np.abs(plain - dropped)) > 1e-3


def test_mask_empty_memory_and_no_memory_layers():
  cfg = dataclasses.replace(CFG, mask_empty_memory=True, no_memory_layers=(2,))
  model, variables = _model_and_params(cfg)
  assert 'short' not in variables['memory'].get('layers_2', {})
  assert 'memory_mixer' not in variables['params']['layers_2']
  tokens = _tokens(7, 16)
  masked, mem = _step(cfg)(variables['params'], _zeros_memory(cfg), tokens, jnp.ones((B,), bool))
  assert np.all(np.isfinite(masked))
  unmasked_cfg = dataclasses.replace(cfg, mask_empty_memory=False)
  unmasked, _ = _step(unmasked_cfg)(
    variables['params'], _zeros_memory(cfg), tokens, jnp.ones((B,), bool)
  )
  assert np.max(np.abs(masked - unmasked)) > 1e-4  # empty slots get attention only unmasked


def _logits_and_memory(cfg, params):
  """Two consecutive segments (memory carried): logits of the second and the final memory."""
  step = _step(cfg)
  mem, out = _zeros_memory(cfg), None
  for seed, first in ((9, True), (10, False)):
    out, mem = step(params, mem, _tokens(seed, 16), jnp.full((B,), first))
  return np.asarray(out), mem


def test_summary_branching_shared_and_none():
  separate = _model_and_params()[1]['params']
  flat = traverse_util.flatten_dict(separate, sep='/')
  # 'shared' is 'separate' with the memory mixer equal to the summary mixer (M == S, so both have
  # norms and a residual); 'none' is 'separate' with both mixers mapping U to itself (zero kernel
  # and bias leave only the residual).
  as_shared = {k.replace('/memory_mixer/', '/summary_mixer/'): v for k, v in flat.items()}
  as_shared = {k: as_shared[k.replace('/memory_mixer/', '/summary_mixer/')] for k in flat}
  zero = ('_mixer/kernel', '_mixer/bias')
  as_none = {
    k: jnp.zeros_like(v) if k.endswith(zero) and 'long_mixer' not in k else v
    for k, v in flat.items()
  }
  for mode, equivalent in (('shared', as_shared), ('none', as_none)):
    cfg = dataclasses.replace(CFG, summary_branching=mode)
    params = _model_and_params(cfg)[1]['params']
    names = set(traverse_util.flatten_dict(params, sep='/'))
    assert not any('memory_mixer' in n for n in names), mode
    assert any('summary_mixer' in n for n in names) == (mode == 'shared')
    own = {k: v for k, v in equivalent.items() if k in names}
    got, got_mem = _logits_and_memory(cfg, traverse_util.unflatten_dict(own, sep='/'))
    ref, ref_mem = _logits_and_memory(CFG, traverse_util.unflatten_dict(equivalent, sep='/'))
    np.testing.assert_allclose(got, ref, atol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(got_mem), jax.tree_util.tree_leaves(ref_mem)):
      np.testing.assert_allclose(a, b, atol=1e-5)
  # The modes differ from each other with the same (separate) parameters.
  base, _ = _logits_and_memory(CFG, separate)
  zeroed, _ = _logits_and_memory(CFG, traverse_util.unflatten_dict(as_none, sep='/'))
  assert np.max(np.abs(base - zeroed)) > 1e-3


def test_stateless_apply_starts_fresh_and_bad_inputs_raise():
  model, variables = _model_and_params()
  tokens = _tokens(8, 16)
  fresh = model.apply({'params': variables['params']}, tokens, tokens, enable_dropout=False)
  ref, _ = _step()(variables['params'], _zeros_memory(), tokens, jnp.ones((B,), bool))
  np.testing.assert_allclose(fresh, ref, atol=1e-6)
  with pytest.raises(ValueError, match='window_length=8'):
    model.apply({'params': variables['params']}, tokens[:, :12], tokens[:, :12])
  with pytest.raises(ValueError, match='pack=False'):
    model.apply(variables, tokens, tokens, decoder_segment_ids=jnp.ones_like(tokens))
  with pytest.raises(ValueError, match='batch size changes'):
    model.apply(variables, tokens[:1], tokens[:1], enable_dropout=False, mutable=['memory'])
  with pytest.raises(ValueError, match="mutable=\\['cache'\\]"):
    model.apply(variables, tokens, tokens, decode=True)


@pytest.mark.parametrize(
  'overrides, field',
  [
    (dict(num_layers=0), 'num_layers'),
    (dict(embed_dim=-1), 'embed_dim'),
    (dict(window_length=0), 'window_length'),
    (dict(summary_size=0), 'summary_size'),
    (dict(short_term_memory_size=0), 'short_term_memory_size'),
    (dict(long_term_memory_layers=(3,)), 'long_term_memory_layers'),
    (dict(long_term_memory_layers=(1, 1)), 'long_term_memory_layers'),
    (dict(no_memory_layers=(-1,)), 'no_memory_layers'),
    (dict(no_memory_layers=(1,)), 'no_memory_layers'),
    (dict(long_term_memory_increment_size=0), 'long_term_memory_increment_size'),
    (dict(long_term_memory_windows=0), 'long_term_memory_windows'),
    (dict(dropout_rate=1.0), 'dropout_rate'),
    (dict(attention_dropout_rate=-0.1), 'attention_dropout_rate'),
    (dict(dtype='float16'), 'dtype'),
    (dict(param_dtype='int8'), 'param_dtype'),
    (dict(relative_position_buckets=31), 'relative_position_buckets'),
    (dict(relative_position_max_distance=8), 'relative_position_max_distance'),
    (dict(summary_branching='two'), 'summary_branching'),
    (dict(summary_branching='shared', short_term_memory_size=8), 'summary_branching'),
    (dict(summary_branching='none', summary_size=2), 'summary_branching'),
  ],
)
def test_config_validation_names_the_field(overrides, field):
  with pytest.raises(ValueError, match=f'MelodiConfig.{field}='):
    dataclasses.replace(CFG, **overrides)


def test_size_helpers_reject_non_multiples():
  with pytest.raises(ValueError, match='multiple of window_length'):
    CFG.num_windows(20)
  with pytest.raises(ValueError, match='multiple of the long-term increment'):
    MelodiConfig.capacity_windows(8190, 64)
  assert MelodiConfig.capacity_windows(8192, 64) == 128
  assert dataclasses.replace(CFG, long_term_memory_layers=(), long_term_memory_windows=0)
