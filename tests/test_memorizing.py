"""Memorizing Transformer: the parity tool on a second configuration, top-k, write index, config.

The second configuration is a fixture in the golden format produced by `_rederived_fixture`, an
independent functional re-derivation written from the golden README's text (Memorizing section
and the shared sliding-window layer), not from our modules: memory layer after layer 0, H*K != D,
three windows per segment, a memory of 3 segments that wraps, one batch-wide write index that is
not reset (the reference's convention) and resets in both rows at different segments.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference_fixtures as ref
from tiny_configs import SMALL_DIMS

from melodi_t5x.architectures.memorizing import (
  MemorizingDecoder,
  joint_memory_attention,
  weigh_values,
)
from melodi_t5x.config import MemorizingConfig
from melodi_t5x.tools import check_reference

# ---------------------------------------------------------------------------------------------
# An independent re-derivation (reference conventions and parameter names).
# ---------------------------------------------------------------------------------------------

META = dict(
  model='memorizing',
  num_layers=3,
  embed_dim=16,
  num_heads=2,
  head_dim=12,
  mlp_dim=32,
  vocab_size=40,
  window_length=4,
  segment_length=12,
  xl_cache_length=4,
  memory_layer_index=0,
  memory_layer_indices=[0],
  memory_size=36,
  num_segments=4,
  batch_size=2,
)
SOS = [[True, True], [False, True], [False, False], [True, False]]


def _bucket(n):  # T5, 32 buckets, max_distance 128, as the README states it
  n = np.asarray(n)
  large = 16 + (np.log(n.astype(np.float32) / 16 + np.finfo(np.float32).eps) / np.log(8) * 16)
  return np.where(n < 16, n, np.minimum(31, large.astype(np.int32)))


def _tbase(p, pre, x):
  """Pre-attention norm and projections: q̂, k̂, v [B, N, H, K]."""
  b, n, _ = x.shape
  h = ref.rms(x, p[pre + 'tbase/pre_attn_layernorm/scale'])
  proj = {
    s: (h @ p[pre + f'tbase/_kvq/{s}_layer/kernel']).reshape(b, n, META['num_heads'], -1)
    for s in ('queries', 'keys', 'values')
  }
  return ref.unit(proj['queries']), ref.unit(proj['keys']), proj['values']


def _out_ffn(p, pre, x, attn):
  b, n = x.shape[:2]
  h1 = x + attn.reshape(b, n, -1) @ p[pre + 'tbase/post_attn_mlp/output_layer/kernel']
  f = pre + 'tbase/ffn/mlp_layer/'
  hidden = jax.nn.relu(
    ref.rms(h1, p[pre + 'tbase/pre_ffn_layernorm/scale']) @ p[f + 'input_layer/kernel']
    + p[f + 'input_layer/bias']
  )
  return h1 + hidden @ p[f + 'output_layer/kernel'] + p[f + 'output_layer/bias']


def _xl_layer(p, pre, x, cache):
  q, k, v = _tbase(p, pre, x)
  w, t = META['window_length'], x.shape[1]
  tau = jnp.abs(p[pre + 'tbase/_kvq/attention_scale'])
  rel = np.arange(2 * w)[None, :] - (np.arange(w)[:, None] + w)
  bias = p[pre + 'relative_positions/rel_embedding'][:, _bucket(np.maximum(-rel, 0))]
  outs, prev = [], cache
  for i in range(0, t, w):
    kw = jnp.concatenate([prev[0], k[:, i : i + w]], 1)
    vw = jnp.concatenate([prev[1], v[:, i : i + w]], 1)
    logits = (jnp.einsum('bqhe,bjhe->bhqj', q[:, i : i + w], kw) + bias[None]) * tau[:, None, None]
    logits = jnp.where((rel < 0) & (rel >= -w), logits, -1e6)
    outs.append(jnp.einsum('bhqj,bjhe->bqhe', ref.safe_softmax(logits), vw))
    prev = (k[:, i : i + w], v[:, i : i + w])
  return _out_ffn(p, pre, x, jnp.concatenate(outs, 1)), prev


def _side_layer(p, x, mem_k, mem_v):
  pre = 'layer_stack/side_layer/'
  q, k, v = _tbase(p, pre, x)
  tau = jnp.abs(p[pre + 'tbase/_kvq/attention_scale'])[:, None, None]
  t = x.shape[1]
  mem_logits = jnp.einsum('bqhe,bmhe->bhqm', q, mem_k) * tau
  seg_logits = jnp.einsum('bqhe,bjhe->bhqj', q, k) * tau
  seg_logits = jnp.where(np.arange(t)[None, :] < np.arange(t)[:, None], seg_logits, -1e6)
  probs = ref.safe_softmax(jnp.concatenate([mem_logits, seg_logits], -1))
  m = mem_k.shape[1]
  attn = jnp.einsum('bhqm,bmhe->bqhe', probs[..., :m], mem_v)
  attn = attn + jnp.einsum('bhqj,bjhe->bqhe', probs[..., m:], v)
  return _out_ffn(p, pre, x, attn), k, v


def _segment(p, state, tokens, sos, targets, mask):
  keep = (~sos).astype(jnp.float32)[:, None, None, None]
  x = p['embed/embedding'][tokens % META['vocab_size']]
  new = {}
  for i in range(META['num_layers']):
    pre = f'layer_stack/transformer{i}/'
    cache = (state[f'{pre}keys'] * keep, state[f'{pre}values'] * keep)
    x, (new[f'{pre}keys'], new[f'{pre}values']) = _xl_layer(p, pre, x, cache)
    if i == META['memory_layer_index']:
      mem_k, mem_v = state['memory_keys'] * keep, state['memory_values'] * keep
      y, k, v = _side_layer(p, x, mem_k, mem_v)
      x = x + y  # the stack adds the side layer's output to its input
      wi = state['write_index']
      new['memory_keys'] = jax.lax.dynamic_update_slice_in_dim(mem_k, k, wi, 1)
      new['memory_values'] = jax.lax.dynamic_update_slice_in_dim(mem_v, v, wi, 1)
      new['write_index'] = (wi + x.shape[1]) % META['memory_size']
  return ref.head_and_loss(
    x, p['layer_stack/final_layernorm/scale'], p['embed/embedding'], targets, mask, new
  )


def _reference_params(rng: np.random.RandomState) -> dict[str, np.ndarray]:
  d, hk, f = META['embed_dim'], META['num_heads'] * META['head_dim'], META['mlp_dim']

  def kernel(n_in, n_out):
    return rng.normal(size=(n_in, n_out)) / np.sqrt(n_in)

  def block(pre):
    out = {
      pre + 'tbase/pre_attn_layernorm/scale': 1 + 0.2 * rng.normal(size=d),
      pre + 'tbase/pre_ffn_layernorm/scale': 1 + 0.2 * rng.normal(size=d),
      pre + 'tbase/_kvq/attention_scale': 2 + rng.normal(size=META['num_heads']),
      pre + 'tbase/post_attn_mlp/output_layer/kernel': kernel(hk, d),
      pre + 'tbase/ffn/mlp_layer/input_layer/kernel': kernel(d, f),
      pre + 'tbase/ffn/mlp_layer/input_layer/bias': 0.1 * rng.normal(size=f),
      pre + 'tbase/ffn/mlp_layer/output_layer/kernel': kernel(f, d),
      pre + 'tbase/ffn/mlp_layer/output_layer/bias': 0.1 * rng.normal(size=d),
    }
    for s in ('queries', 'keys', 'values'):
      out[pre + f'tbase/_kvq/{s}_layer/kernel'] = kernel(d, hk)
    return out

  p = {
    'embed/embedding': rng.normal(size=(META['vocab_size'], d)),
    'layer_stack/final_layernorm/scale': 1 + 0.2 * rng.normal(size=d),
    **block('layer_stack/side_layer/'),
  }
  for i in range(META['num_layers']):
    p.update(block(f'layer_stack/transformer{i}/'))
    p[f'layer_stack/transformer{i}/relative_positions/rel_embedding'] = rng.normal(size=(2, 32))
  return {k: v.astype(np.float32) for k, v in p.items()}


def _rederived_fixture(path: str) -> str:
  """Writes the re-derived fixture (golden format) to `path`."""
  rng = np.random.RandomState(0)
  b, w = META['batch_size'], META['window_length']
  kv = (b, w, META['num_heads'], META['head_dim'])
  mem = (b, META['memory_size'], META['num_heads'], META['head_dim'])
  params = _reference_params(rng)
  state = {'memory_keys': np.zeros(mem, np.float32), 'memory_values': np.zeros(mem, np.float32)}
  state['write_index'] = np.int32(0)
  for i in range(META['num_layers']):
    for s in ('keys', 'values'):
      state[f'layer_stack/transformer{i}/{s}'] = np.zeros(kv, np.float32)

  def entries(state):  # the golden keys of the state after a segment
    out, side = {}, 'state/layer_stack/side_layer/'
    for name, key in (('keys', 'memory_keys'), ('values', 'memory_values')):
      out[f'{side}recurrent_memory/memory_{name}_train'] = state[key]
      out[f'{side}kvi_cache/previous_{name}_train'] = np.zeros(kv, np.float32)
      for i in range(META['num_layers']):
        xl = f'state/layer_stack/transformer{i}/kvi_cache/previous_{name}_train'
        out[xl] = state[f'layer_stack/transformer{i}/{name}']
    out[side + 'recurrent_memory/write_index_train'] = state['write_index']
    return out

  return ref.write_fixture(path, META, SOS, rng, params, state, _segment, entries)


@pytest.fixture(scope='module')
def rederived(tmp_path_factory):
  return _rederived_fixture(str(tmp_path_factory.mktemp('mem') / 'memorizing_rederived.npz'))


@pytest.mark.slow
def test_parity_tool_on_a_second_configuration(rederived, tmp_path, capsys):
  z = np.load(rederived)
  # The batch-wide index wrapped and the rows were reset at different segments.
  indices = [
    int(z[f'seg{s}/state/layer_stack/side_layer/recurrent_memory/write_index_train'])
    for s in range(4)
  ]
  assert indices == [12, 24, 0, 12]
  errors = ref.assert_parity(rederived, capsys, tmp_path)
  assert len(errors['forward']) == 4 * 11 and len(errors['gradient']) == 4 * 49


@pytest.mark.slow
def test_memory_slot_layout_differs_but_fifo_order_matches(rederived):
  """The reset rows' memories compare equal only in FIFO order (the write indices differ)."""
  ref = np.load(rederived)['seg1/state/layer_stack/side_layer/recurrent_memory/memory_keys_train']
  # Row 1 restarted at segment 1: the reference (one index for the batch, 12 before the write)
  # holds that segment in slots [12, 24), index 24 after it; ours (per row, restarted at 0)
  # holds it in [0, 12), index 12.
  assert np.all(ref[1, :12] == 0) and np.all(ref[1, 24:] == 0) and np.all(ref[1, 12:24] != 0)
  ours = np.zeros_like(ref[1:])
  ours[0, :12] = ref[1, 12:24]
  assert not np.array_equal(ours, ref[1:])
  np.testing.assert_array_equal(
    check_reference.fifo_order(ours, np.array([12])), check_reference.fifo_order(ref[1:], [24])
  )


@pytest.mark.slow
def test_wrong_memory_mapping_fails_on_the_second_configuration(rederived, capsys):
  side = 'layer_stack/side_layer/tbase/'
  swap = [side + 'pre_attn_layernorm/scale', side + 'pre_ffn_layernorm/scale']
  ref.assert_parity_fails(rederived, swap, capsys)


# ---------------------------------------------------------------------------------------------
# Top-k memory attention against a brute-force numpy computation.
# ---------------------------------------------------------------------------------------------


def _brute_force_top_k(q, k, v, mk, mv, tau, top_k):
  b, nq, h, _ = q.shape
  out = np.zeros(q.shape)
  for r in range(b):
    for hh in range(h):
      for i in range(nq):
        mem = np.abs(tau[hh]) * mk[r, :, hh] @ q[r, i, hh]
        chosen = np.argsort(-mem, kind='stable')[:top_k] if top_k else np.arange(len(mem))
        seg = np.abs(tau[hh]) * k[r, :i, hh] @ q[r, i, hh]  # keys strictly before the query
        logits = np.concatenate([mem[chosen], seg])
        p = np.exp(logits - logits.max())
        p /= p.sum()
        out[r, i, hh] = p[: len(chosen)] @ mv[r, chosen, hh] + p[len(chosen) :] @ v[r, :i, hh]
  return out


def test_top_k_matches_brute_force_and_k_equal_m_is_dense():
  rng = np.random.RandomState(3)
  b, t, m, h, e = 2, 6, 10, 2, 4

  def unit(x):
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)

  q, k = unit(rng.normal(size=(b, t, h, e))), unit(rng.normal(size=(b, t, h, e)))
  v = rng.normal(size=(b, t, h, e)).astype(np.float32)
  mk, mv = unit(rng.normal(size=(b, m, h, e))), rng.normal(size=(b, m, h, e)).astype(np.float32)
  mk[1, 5:], mv[1, 5:] = 0, 0  # empty slots, as after a document start (logit 0, value 0)
  tau = np.array([3.0, -5.0], np.float32)
  visible = np.arange(t)[None, :] < np.arange(t)[:, None]

  def ours(top_k):
    probs, values, _ = joint_memory_attention(q, k, v, (mk, mv), tau, visible, top_k)
    return np.asarray(weigh_values(probs, values, v))

  with jax.default_matmul_precision('highest'):
    dense, full, small = ours(0), ours(m), ours(3)
  np.testing.assert_allclose(full, dense, atol=1e-6)
  np.testing.assert_allclose(dense, _brute_force_top_k(q, k, v, mk, mv, tau, 0), atol=1e-5)
  np.testing.assert_allclose(small, _brute_force_top_k(q, k, v, mk, mv, tau, 3), atol=1e-5)
  assert np.max(np.abs(small - dense)) > 1e-2


# ---------------------------------------------------------------------------------------------
# The decoder: top-k end to end, per-row write index, dropout, config errors.
# ---------------------------------------------------------------------------------------------

CFG = MemorizingConfig(
  num_layers=2, **{**SMALL_DIMS, 'vocab_size': 50}, memory_layer_index=1, memory_size=16
)
T = 8


def _run(cfg: MemorizingConfig, sos_list, enable_dropout=False):
  """Logits and carried state after each segment (same parameters for every config)."""
  model = MemorizingDecoder(cfg)
  tokens = np.random.RandomState(5).randint(1, cfg.vocab_size, (len(sos_list), 2, T))
  variables = model.init(jax.random.PRNGKey(0), tokens[0], tokens[0], enable_dropout=False)
  mem, outs = variables['memory'], []
  for tok, sos in zip(tokens, sos_list):
    logits, new = model.apply(
      {'params': variables['params'], 'memory': mem},
      tok,
      start_of_sequence=jnp.asarray(sos),
      enable_dropout=enable_dropout,
      rngs={'dropout': jax.random.PRNGKey(1)},
      mutable=['memory'],
    )
    mem = new['memory']
    outs.append((np.asarray(logits), jax.tree_util.tree_map(np.asarray, mem)))
  return outs


def test_top_k_decoder_k_equal_m_is_dense_and_small_k_differs():
  sos = [[True, True], [False, False]]
  dense = _run(CFG, sos)
  full = _run(dataclasses.replace(CFG, memory_top_k=CFG.memory_size), sos)
  small = _run(dataclasses.replace(CFG, memory_top_k=2), sos)
  np.testing.assert_allclose(full[1][0], dense[1][0], atol=1e-5)
  assert np.max(np.abs(small[1][0] - dense[1][0])) > 1e-3


def test_query_blocks_do_not_change_results():
  sos = [[True, True], [False, True]]
  ref = _run(CFG, sos)  # one window (4 queries) per block
  for block in (2, 8):
    out = _run(dataclasses.replace(CFG, memory_query_block=block), sos)
    for (logits, mem), (ref_logits, ref_mem) in zip(out, ref):
      np.testing.assert_allclose(logits, ref_logits, atol=1e-5)
      np.testing.assert_array_equal(mem['tokens_seen'], ref_mem['tokens_seen'])


def test_write_index_is_per_row_and_restarts_at_document_start():
  outs = _run(CFG, [[True, True], [False, True], [False, False], [False, True]])
  # The write index of a row is its tokens since the document start, modulo the memory size.
  index = [(out[1]['tokens_seen'] % CFG.memory_size).tolist() for out in outs]
  assert index == [[8, 8], [0, 8], [8, 0], [0, 8]]
  # Row 1 restarted at segment 3: the slots of its old document are zero.
  final = outs[3][1]['memory_layer']['keys']
  assert np.all(final[1, 8:] == 0) and np.any(final[1, :8] != 0)
  # Row 0 read one document throughout: segment 3 overwrote segment 1 (slots [0, 8)).
  assert np.any(final[0, :8] != outs[1][1]['memory_layer']['keys'][0, :8])


def test_attention_dropout_runs_in_the_memory_layer():
  cfg = dataclasses.replace(CFG, attention_dropout_rate=0.5)
  (det,) = _run(cfg, [[True, True]])
  (drop,) = _run(cfg, [[True, True]], enable_dropout=True)
  assert np.all(np.isfinite(drop[0])) and np.max(np.abs(drop[0] - det[0])) > 1e-4


def test_memory_size_must_be_a_multiple_of_the_segment_length():
  model = MemorizingDecoder(dataclasses.replace(CFG, memory_size=12))
  tokens = jnp.ones((2, T), jnp.int32)
  with pytest.raises(ValueError, match=r'memory_size=12 .* multiple of 8'):
    model.init(jax.random.PRNGKey(0), tokens, tokens, enable_dropout=False)


def test_query_block_must_divide_the_segment_length():
  model = MemorizingDecoder(dataclasses.replace(CFG, memory_query_block=3))
  tokens = jnp.ones((2, T), jnp.int32)
  with pytest.raises(ValueError, match=r'memory_query_block=3 does not divide .* 8'):
    model.init(jax.random.PRNGKey(0), tokens, tokens, enable_dropout=False)


@pytest.mark.parametrize(
  'field, value',
  [
    ('memory_layer_index', 2),
    ('memory_layer_index', -1),
    ('memory_top_k', 17),
    ('memory_top_k', -1),
    ('memory_size', 0),
    ('memory_query_block', -1),
  ],
)
def test_config_rejects_bad_memory_settings(field, value):
  with pytest.raises(ValueError, match=field):
    dataclasses.replace(CFG, **{field: value})
