"""Transformer-XL behaviour: the sliding window, the carried cache, resets, the memory-free bound.

Parity with the authors' code is in test_reference_parity.py; these tests check properties that
hold for any parameters: every token sees exactly the W tokens before it, a carried cache makes
two segments equal to one long one, a document start forgets the past, and `use_cache=False`
reads every segment as a document start.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from carried_memory import jit_step, zeros_memory
from tiny_configs import SMALL_DIMS

from melodi_t5x.architectures.xl import XLDecoder
from melodi_t5x.config import XLConfig

CFG = XLConfig(
  num_layers=2, **SMALL_DIMS, relative_position_max_distance=16, relative_position_buckets=8
)
W = CFG.window_length


def _tokens(batch: int, length: int, seed: int = 0) -> np.ndarray:
  return np.random.RandomState(seed).randint(1, CFG.vocab_size, (batch, length)).astype(np.int32)


@pytest.fixture(scope='module')
def params():
  return XLDecoder(CFG).init(jax.random.PRNGKey(1), _tokens(1, 2 * W), enable_dropout=False)[
    'params'
  ]


def _run(cfg, params, segments, sos_list):
  """Logits of consecutive segments [B, T] with the memory carried; sos per segment [B]."""
  model = XLDecoder(cfg)
  apply = jit_step(model)
  memory = zeros_memory(model.init(jax.random.PRNGKey(0), segments[0], enable_dropout=False))
  out = []
  for tokens, sos in zip(segments, sos_list):
    logits, memory = apply(params, memory, tokens, jnp.asarray(sos))
    out.append(np.asarray(logits))
  return out


@pytest.mark.parametrize('num_layers', [1, 2])
def test_each_token_sees_exactly_the_previous_window_per_layer(num_layers, params):
  cfg = dataclasses.replace(CFG, num_layers=num_layers)
  layer_params = {k: v for k, v in params.items() if k != 'layers_1' or num_layers == 2}
  tokens = _tokens(1, 6 * W)
  p = 2 * W + 1
  changed = tokens.copy()
  changed[0, p] = tokens[0, p] % (CFG.vocab_size - 1) + 1
  (a,), (b,) = (_run(cfg, layer_params, [t], [[True]]) for t in (tokens, changed))
  moved = np.abs(a - b).max(axis=-1)[0] > 1e-6  # [T]
  # Token p reaches tokens p+1 .. p+W in one layer, hence p .. p + num_layers * W; nothing else.
  expected = np.zeros(6 * W, bool)
  expected[p : p + num_layers * W + 1] = True
  np.testing.assert_array_equal(moved, expected)


def test_carried_cache_makes_two_segments_one(params):
  tokens = _tokens(2, 4 * W, seed=3)
  (whole,) = _run(CFG, params, [tokens], [[True, True]])
  first, second = _run(CFG, params, [tokens[:, : 2 * W], tokens[:, 2 * W :]], [[1, 1], [0, 0]])
  np.testing.assert_allclose(first, whole[:, : 2 * W], atol=1e-5)
  np.testing.assert_allclose(second, whole[:, 2 * W :], atol=1e-5)


def test_document_start_resets_only_its_row(params):
  tokens = _tokens(2, 4 * W, seed=4)
  segments = [tokens[:, : 2 * W], tokens[:, 2 * W :]]
  _, second = _run(CFG, params, segments, [[1, 1], [0, 1]])
  (alone,) = _run(CFG, params, [segments[1]], [[1, 1]])
  (whole,) = _run(CFG, params, [tokens], [[1, 1]])
  np.testing.assert_allclose(second[0], whole[0, 2 * W :], atol=1e-5)  # row 0 continues
  np.testing.assert_allclose(second[1], alone[1], atol=1e-5)  # row 1 starts afresh
  assert np.abs(second[1] - whole[1, 2 * W :]).max() > 1e-3  # and the past did matter


def test_memory_free_lower_bound_reads_every_segment_from_scratch(params):
  tokens = _tokens(2, 6 * W, seed=5)
  segments = [tokens[:, i : i + 2 * W] for i in range(0, 6 * W, 2 * W)]
  no_cache = dataclasses.replace(CFG, use_cache=False)
  free = _run(no_cache, params, segments, [[1, 1], [0, 0], [0, 1]])
  fresh = _run(CFG, params, segments, [[1, 1]] * 3)
  carried = _run(CFG, params, segments, [[1, 1], [0, 0], [0, 0]])
  for f, r in zip(free, fresh):
    np.testing.assert_allclose(f, r, atol=1e-6)
  assert np.abs(free[1] - carried[1]).max() > 1e-3  # the cache changes the next segment
  variables = XLDecoder(no_cache).init(jax.random.PRNGKey(0), segments[0], enable_dropout=False)
  assert 'memory' not in variables  # nothing is carried


def test_cache_is_not_written_without_mutable_memory(params):
  model = XLDecoder(CFG)
  tokens = _tokens(2, 2 * W, seed=6)
  memory = model.init(jax.random.PRNGKey(0), tokens, enable_dropout=False)['memory']
  logits = model.apply(
    {'params': params, 'memory': memory}, tokens, start_of_sequence=jnp.ones(2, bool)
  )
  assert logits.shape == (2, 2 * W, CFG.vocab_size)
  _, new = model.apply(
    {'params': params, 'memory': memory},
    tokens,
    start_of_sequence=jnp.ones(2, bool),
    enable_dropout=False,
    mutable=['memory'],
  )
  # The cache holds the last window's keys (L2-normalised per head) and values.
  keys = np.asarray(new['memory']['layers_0']['keys'])
  assert keys.shape == (2, W, CFG.num_heads, CFG.head_dim)
  np.testing.assert_allclose(np.linalg.norm(keys, axis=-1), 1.0, atol=1e-3)
