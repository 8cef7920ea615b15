"""Parity with the authors' implementation on the golden fixture (numbers made by meliad)."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
from reference_fixtures import assert_parity, assert_parity_fails

from melodi_t5x.tools import check_reference

FIXTURE = pathlib.Path(__file__).parent / 'data' / 'melodi_tiny_a.npz'
_Q = 'layer_stack/melodi_layers_0/melodi_layer/tbase/_kvq/queries_layer/kernel'
_K = 'layer_stack/melodi_layers_0/melodi_layer/tbase/_kvq/keys_layer/kernel'


def test_parity_tool_passes_on_golden_fixture(tmp_path, capsys):
  errors = assert_parity(FIXTURE, capsys, tmp_path)
  # 3 segments x (logits, token losses, loss, 4 memories) and 3 x 66 gradients were compared.
  assert len(errors['forward']) == 21 and len(errors['gradient']) == 198
  assert max(errors['forward'].values()) < 1e-5
  assert max(errors['gradient'].values()) < 1e-4


# Fixtures made with meliad cc1aef5 beyond the shared one (tests/data/FIXTURES.md): b = 4 layers,
# long-term layer 2, FIFO wraps; c = S != M, H*Dh != d, long-term layer 0; d = no long-term layer.
# The slow tier: each needs its own compile; the fast tier keeps one fixture per architecture.
@pytest.mark.slow
@pytest.mark.parametrize('name', ['melodi_tiny_b', 'melodi_tiny_c', 'melodi_tiny_d'])
def test_parity_on_other_reference_configurations(name, capsys):
  assert_parity(FIXTURE.parent / f'{name}.npz', capsys)


def test_parity_tool_fails_when_one_weight_is_mapped_wrongly(capsys):
  assert_parity_fails(FIXTURE, [_Q, _K], capsys)


def test_every_reference_parameter_has_exactly_one_rule():
  z = np.load(FIXTURE)
  names = [k[len('param/') :] for k in z.files if k.startswith('param/')]
  ours = [check_reference.our_path(n) for n in names]
  assert len(set(ours)) == len(names)
  with pytest.raises(KeyError, match='no mapping rule'):
    check_reference.our_path('layer_stack/unknown/kernel')


def test_config_from_fixture_reads_sizes_and_rejects_bad_fifo():
  meta = json.loads(str(np.load(FIXTURE)['config_json']))
  cfg = check_reference.config_from_fixture(meta)
  assert (cfg.long_term_memory_layers, cfg.long_term_memory_windows) == ((1,), 8)
  with pytest.raises(ValueError, match='multiple of the long-term increment'):
    check_reference.config_from_fixture({**meta, 'long_term_memory_size': 15})


def test_parity_on_transformer_xl_fixture(capsys):
  assert_parity(FIXTURE.parent / 'xl_tiny_a.npz', capsys)


_MEMORIZING = FIXTURE.parent / 'memorizing_tiny_a.npz'


def test_parity_on_memorizing_fixture(tmp_path, capsys):
  errors = assert_parity(_MEMORIZING, capsys, tmp_path)
  # 3 segments x (logits, token losses, loss, 6 XL caches, memory keys and values) and
  # 3 x 49 gradients; the side layer's unused XL cache is only checked to be zero.
  assert len(errors['forward']) == 33 and len(errors['gradient']) == 147
  assert not any('side_layer/kvi_cache' in name for name in errors['forward'])


def test_memorizing_parity_fails_when_the_memory_layer_is_mapped_wrongly(capsys):
  side = 'layer_stack/side_layer/tbase/_kvq/'
  swap = [side + 'keys_layer/kernel', side + 'values_layer/kernel']
  assert_parity_fails(_MEMORIZING, swap, capsys)


def test_parity_on_block_recurrent_fixture(tmp_path, capsys):
  errors = assert_parity(FIXTURE.parent / 'brt_tiny_a.npz', capsys, tmp_path)
  # 3 segments x (logits, token losses, loss, 4 x 2 XL caches, the recurrent state) and
  # 3 x 55 gradients.
  assert len(errors['forward']) == 36 and len(errors['gradient']) == 165


def test_block_recurrent_parity_fails_with_state_queries_swapped(capsys):
  rec = 'transformer1/recurrent_tbase/_kvq/'
  swap = [rec + 'queries_layer/kernel', rec + 'queries2_layer/kernel']
  assert_parity_fails(FIXTURE.parent / 'brt_tiny_a.npz', swap, capsys)
