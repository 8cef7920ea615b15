"""Memory-read attribution (`melodi_t5x.attribution`): masses per source, per scored token."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from carried_memory import apply_collections, apply_segment
from test_ablation import CONFIGS, W, _init, _tokens, _warm

from melodi_t5x import architectures, attribution
from melodi_t5x.state import MEMORY


def _masses(cfg, params, memory, tokens, sos):
  """(logits, {layer: {source: [B, T]}}) with attribution recorded."""
  cfg = dataclasses.replace(cfg, record_attribution=True)
  logits, new = apply_collections(
    architectures.build_decoder(cfg),
    params,
    memory,
    jnp.asarray(tokens),
    jnp.asarray(sos),
    mutable=(MEMORY, 'intermediates'),
  )
  found = attribution.collect(new['intermediates'], *tokens.shape)
  return np.asarray(logits), jax.tree_util.tree_map(np.asarray, found)


@pytest.fixture(scope='module', params=sorted(CONFIGS))
def warm(request):
  cfg = CONFIGS[request.param]
  params, memory = _init(cfg)
  memory, tokens = _warm(cfg, params, memory)
  return request.param, cfg, params, memory, tokens


def test_masses_of_every_query_sum_to_one_and_scores_are_unchanged(warm):
  name, cfg, params, memory, tokens = warm
  logits, masses = _masses(cfg, params, memory, tokens, [False, False])
  plain, _ = apply_segment(
    architectures.build_decoder(cfg), params, memory, jnp.asarray(tokens), jnp.asarray([False] * 2)
  )
  np.testing.assert_allclose(logits, np.asarray(plain), rtol=1e-6, atol=1e-6)
  expected_layers = {
    'melodi': 3,
    'melodi_masked': 3,
    'xl': 2,
    'memorizing': 3,  # 2 XL layers and the memory layer
    'brt': 2,
  }[name]
  assert len(masses) == expected_layers
  for layer, sources in masses.items():
    total = sum(sources.values())
    np.testing.assert_allclose(total, 1.0, atol=1e-5, err_msg=layer)
    for source, m in sources.items():
      assert m.min() >= -1e-6, (layer, source)
  if name.startswith('melodi'):
    long_layer = f'layers_{CONFIGS[name].long_term_memory_layers[0]}'
    long_keys = [s for layer, v in masses.items() if long_layer in layer for s in v]
    assert any(s.startswith('long_term age') for s in long_keys), long_keys
  if name == 'brt':
    (state,) = [v['state'] for v in masses.values() if 'state' in v]
    np.testing.assert_allclose(state, 0.5, atol=1e-5)
  if name == 'memorizing':
    (mem,) = [v for layer, v in masses.items() if 'memory_layer' in layer]
    aged = sum(m for s, m in mem.items() if s.startswith('memory age'))
    assert aged.mean() > 0.01 and mem['memory empty'].max() < 1e-6  # 2 segments fill 6 windows


def test_an_empty_long_term_memory_gets_no_mass():
  """At a document start with masked empty memory the FIFO has no visible slot: its gated share
  goes to 'none'; a MELODI without long-term layers has no long-term source at all."""
  cfg = CONFIGS['melodi_masked']
  params, memory = _init(cfg)
  _, masses = _masses(cfg, params, memory, _tokens(W, 5), [True, True])
  for sources in masses.values():
    for source, m in sources.items():
      if source.startswith('long_term') or source == 'short_term':
        np.testing.assert_array_equal(m, 0.0)
  no_long = dataclasses.replace(CONFIGS['melodi'], long_term_memory_layers=())
  params, memory = _init(no_long)
  _, masses = _masses(no_long, params, memory, _tokens(3 * W, 5), [False, False])
  assert not any(s.startswith('long_term') for v in masses.values() for s in v)


def test_accumulator_averages_over_scored_tokens_by_window_offset():
  acc = attribution.AttributionAccumulator(window_length=4)
  mass = np.array([[0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0]])
  weights = np.array([[1, 1, 1, 1, 1, 1, 0, 0]])
  acc.add({'layers_0': {'cache': mass, 'window': 1 - mass}}, weights)
  summary = acc.summary([0, 2])
  cache = summary['layers']['layers_0']['cache']
  assert summary['tokens'] == 6
  assert cache['mass'] == pytest.approx((0 + 0.25 + 0.5 + 0.75 + 1 + 1) / 6)
  # offsets 0-1 hold tokens 0, 1, 4, 5; offsets 2-3 tokens 2, 3 (6, 7 are padding)
  assert cache['by_window_position'] == pytest.approx([(0 + 0.25 + 1 + 1) / 4, (0.5 + 0.75) / 2])
