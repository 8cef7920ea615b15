"""Eval-time memory ablations (`BaseConfig.drop_sources`): a dropped source reads as at a
document start, in every window, while the state is carried and written as usual.

Each check compares the ablated decoder with an independent construction of the same condition:
a window processed alone at a document start, or the full decoder run on memory edited by hand.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from carried_memory import apply_segment, zeros_memory
from tiny_configs import DIMS, MELODI_MEMORY

from melodi_t5x import architectures
from melodi_t5x.config import BRTConfig, MelodiConfig, MemorizingConfig, XLConfig

W = DIMS['window_length']
CONFIGS = {
  'melodi': MelodiConfig(num_layers=3, **DIMS, **MELODI_MEMORY),
  'melodi_masked': MelodiConfig(num_layers=3, mask_empty_memory=True, **DIMS, **MELODI_MEMORY),
  'xl': XLConfig(num_layers=2, **DIMS),
  'memorizing': MemorizingConfig(num_layers=2, memory_layer_index=0, memory_size=6 * W, **DIMS),
  'brt': BRTConfig(num_layers=2, recurrent_layer_index=1, num_states=5, **DIMS),
}


def _tokens(length: int, seed: int) -> np.ndarray:
  rng = np.random.RandomState(seed)
  return rng.randint(1, DIMS['vocab_size'], (2, length)).astype(np.int32)


def _init(cfg):
  """(params, zero memory) of `cfg`'s decoder."""
  variables = architectures.build_decoder(cfg).init(
    jax.random.PRNGKey(3), _tokens(2 * W, 0), enable_dropout=False
  )
  return variables['params'], zeros_memory(variables)


@pytest.fixture(scope='module', params=sorted(CONFIGS))
def setup(request):
  cfg = CONFIGS[request.param]
  return request.param, cfg, *_init(cfg)


def _apply(cfg, params, memory, tokens, sos):
  """(logits [B, T, V], memory after the segment) of one segment."""
  logits, memory = apply_segment(
    architectures.build_decoder(cfg), params, memory, jnp.asarray(tokens), jnp.asarray(sos)
  )
  return np.asarray(logits), memory


def _warm(cfg, params, memory):
  """Memory after two segments of a document, and the third segment's tokens."""
  for i, sos in enumerate((True, False)):
    _, memory = _apply(cfg, params, memory, _tokens(3 * W, 10 + i), [sos, sos])
  return memory, _tokens(3 * W, 12)


def test_every_source_changes_the_scores_of_a_model_that_reads_it(setup):
  _, cfg, params, memory = setup
  memory, tokens = _warm(cfg, params, memory)
  full, full_memory = _apply(cfg, params, memory, tokens, [False, False])
  for source in type(cfg).MEMORY_SOURCES:
    dropped_cfg = dataclasses.replace(cfg, drop_sources=(source,))
    dropped, dropped_memory = _apply(dropped_cfg, params, memory, tokens, [False, False])
    assert np.abs(dropped - full).max() > 1e-3, source
    # Dropping a source changes what the model reads, not how state is carried: memory written by
    # layers below any dropped read is unchanged, and the state tree keeps its shapes.
    assert jax.tree_util.tree_structure(dropped_memory) == jax.tree_util.tree_structure(full_memory)


@pytest.mark.parametrize('name', ['melodi', 'melodi_masked', 'xl'])
def test_with_every_source_dropped_each_window_reads_as_a_document_start(name):
  """MELODI without short- and long-term memory, XL without its cache: window j of a carried
  segment scores as that window alone at a document start."""
  cfg = CONFIGS[name]
  params, memory = _init(cfg)
  memory, tokens = _warm(cfg, params, memory)
  dropped_cfg = dataclasses.replace(cfg, drop_sources=tuple(type(cfg).MEMORY_SOURCES))
  dropped, _ = _apply(dropped_cfg, params, memory, tokens, [False, False])
  for j in range(3):
    alone, _ = _apply(cfg, params, memory, tokens[:, j * W : (j + 1) * W], [True, True])
    np.testing.assert_allclose(dropped[:, j * W : (j + 1) * W], alone, rtol=1e-5, atol=1e-5)


def test_melodi_without_long_term_layers_scores_no_long_term_as_carried():
  cfg = dataclasses.replace(CONFIGS['melodi'], long_term_memory_layers=())
  params, memory = _init(cfg)
  memory, tokens = _warm(cfg, params, memory)
  full, _ = _apply(cfg, params, memory, tokens, [False, False])
  dropped_cfg = dataclasses.replace(cfg, drop_sources=('long_term',))
  dropped, _ = _apply(dropped_cfg, params, memory, tokens, [False, False])
  np.testing.assert_array_equal(dropped, full)


def test_memorizing_without_memory_equals_the_same_segment_on_zeroed_memory():
  """The memory layer reads zero slots; the XL caches are still read."""
  cfg = CONFIGS['memorizing']
  params, memory = _init(cfg)
  memory, tokens = _warm(cfg, params, memory)
  layer = 'memory_layer'
  zeroed = dict(memory, **{layer: jax.tree_util.tree_map(jnp.zeros_like, memory[layer])})
  by_hand, _ = _apply(cfg, params, zeroed, tokens, [False, False])
  dropped_cfg = dataclasses.replace(cfg, drop_sources=('memory',))
  dropped, new = _apply(dropped_cfg, params, memory, tokens, [False, False])
  np.testing.assert_allclose(dropped, by_hand, rtol=1e-5, atol=1e-5)
  _, full_memory = _apply(cfg, params, memory, tokens, [False, False])
  # Written as usual: the memory layer writes its inputs' keys/values, which the layers below it
  # compute without reading the memory (the layers above it read changed inputs).
  below = [layer] + [f'layers_{i}' for i in range(cfg.memory_layer_index + 1)]
  for name in below:
    for a, b in zip(*(jax.tree_util.tree_leaves(m[name]) for m in (new, full_memory))):
      np.testing.assert_array_equal(a, b)


def test_brt_without_state_reads_the_initial_state_in_the_first_window():
  """In a segment's first window the tokens read S from before it: with the state dropped that
  is the learned initial state, exactly as with the carried S replaced by it by hand."""
  cfg = CONFIGS['brt']
  params, memory = _init(cfg)
  memory, tokens = _warm(cfg, params, memory)
  layer = f'layers_{cfg.recurrent_layer_index}'
  initial = jnp.broadcast_to(params[layer]['initial_state'], memory[layer]['recurrent'].shape)
  edited = dict(memory, **{layer: dict(memory[layer], recurrent=initial)})
  by_hand, _ = _apply(cfg, params, edited, tokens[:, :W], [False, False])
  dropped_cfg = dataclasses.replace(cfg, drop_sources=('state',))
  dropped, _ = _apply(dropped_cfg, params, memory, tokens, [False, False])
  np.testing.assert_allclose(dropped[:, :W], by_hand, rtol=1e-5, atol=1e-5)
  full, _ = _apply(cfg, params, memory, tokens, [False, False])
  assert np.abs(full[:, :W] - dropped[:, :W]).max() > 1e-3


def test_unknown_source_names_the_known_ones():
  with pytest.raises(ValueError, match=r"'long_term' is not a memory source of XLConfig.*'cache'"):
    dataclasses.replace(CONFIGS['xl'], drop_sources=('long_term',))
