"""Block-Recurrent Transformer: the parity tool on a second configuration.

The configuration is a fixture in the golden format produced by `_rederived_fixture`, an
independent functional re-derivation written from the golden README's text (Block-Recurrent
section and the shared sliding-window layer), not from our modules: 3 layers with the recurrent
layer on top (index 2, not 1), H*K != D, 5 state vectors, 6 windows per segment, 4 segments with
resets in both rows at different segments. Reference parameter names and state keys.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference_fixtures as ref

# Slow tier: a second reference configuration (its own compile); the fast tier checks one fixture.
pytestmark = pytest.mark.slow

META = dict(
  model='brt',
  num_layers=3,
  recurrent_layer_index=2,
  recurrent_num_states=5,
  embed_dim=16,
  num_heads=2,
  head_dim=6,
  mlp_dim=24,
  vocab_size=41,
  window_length=4,
  segment_length=24,
  xl_cache_length=4,
  recurrent_gate_type='bias',
  recurrent_single_gate=False,
  recurrent_skip_ffn=True,
  feedback_recurrence=False,
  num_segments=4,
  batch_size=2,
)
SOS = [[True, True], [False, True], [False, False], [True, False]]
R = META['recurrent_layer_index']


def _heads(x):
  return x.reshape(*x.shape[:-1], META['num_heads'], META['head_dim'])


def _attend(q, k, v, tau, bias=0.0, visible=None):
  """q [B, Q, H, E], k/v [B, N, H, E]: logits (q.k + bias) |tau|, masked -1e6, safe softmax."""
  logits = (jnp.einsum('bqhe,bnhe->bhqn', q, k) + bias) * jnp.abs(tau)[:, None, None]
  if visible is not None:
    logits = jnp.where(visible, logits, -1e6)
  return jnp.einsum('bhqn,bnhe->bqhe', ref.safe_softmax(logits), v)


def _layer(p, i, x, cache, state):
  """Layer i on a segment x [B, T, D]; returns (y, new cache, new state or None)."""
  pre, w = f'transformer{i}/', META['window_length']
  kvq = pre + 'tbase/_kvq/'
  h = ref.rms(x, p[kvq + 'pre_attn_layernorm/scale'])
  q, k, v = (_heads(h @ p[kvq + f'{s}_layer/kernel']) for s in ('queries', 'keys', 'values'))
  q, k = ref.unit(q), ref.unit(k)
  rel = np.arange(2 * w)[None, :] - (np.arange(w)[:, None] + w)  # key j - (query i + W)
  bias = p[pre + 'relative_positions/rel_embedding'][:, np.clip(-rel, 0, None)]  # n < 16: exact
  outs, prev = [], cache
  for s in range(0, x.shape[1], w):
    kw = jnp.concatenate([prev[0], k[:, s : s + w]], 1)
    vw = jnp.concatenate([prev[1], v[:, s : s + w]], 1)
    o = _attend(q[:, s : s + w], kw, vw, p[kvq + 'attention_scale'], bias, (rel < 0) & (rel >= -w))
    if i == R:
      # State block: RMSNorm(S) + P, then self- and cross-attention of the state.
      rk = pre + 'recurrent_tbase/_kvq/'
      hs = ref.rms(state, p[rk + 'pre_attn_layernorm/scale']) + p[rk + 'position_embeddings']
      sq, sq2, sk = (
        ref.unit(_heads(hs @ p[rk + f'{n}_layer/kernel'])) for n in ('queries', 'queries2', 'keys')
      )
      sv = _heads(hs @ p[rk + 'values_layer/kernel'])
      s_self = _attend(sq, sk, sv, p[rk + 'attention_scale'])
      s_cross = _attend(sq2, kw, vw, p[pre + 'recurrent_tbase/attention_scale2'])
      u = jnp.concatenate([s_self, s_cross], 2).reshape(*state.shape[:2], -1)
      u = u @ p[pre + 'recurrent_tbase/post_attn_mlp/output_layer/kernel']
      # Tokens read the state before its update.
      q2 = ref.unit(_heads(h[:, s : s + w] @ p[kvq + 'queries2_layer/kernel']))
      cross = _attend(q2, sk, sv, p[pre + 'tbase/attention_scale2'])
      o = jnp.concatenate([o, cross], 2)
      g = jax.nn.sigmoid(p[pre + 'recurrent_tbase/post_attn_mlp/gate_bias'])
      state = g * state + (1 - g) * u
    outs.append(o)
    prev = (k[:, s : s + w], v[:, s : s + w])
  attn = jnp.concatenate(outs, 1)
  h1 = x + attn.reshape(*x.shape[:2], -1) @ p[pre + 'tbase/post_attn_mlp/output_layer/kernel']
  f = jax.nn.relu(
    ref.rms(h1, p[pre + 'tbase/pre_ffn_layernorm/scale']) @ p[pre + 'tbase/ffn/hidden0/kernel']
  )
  return h1 + f @ p[pre + 'tbase/ffn/output_layer/kernel'], prev, state


def _segment(p, carried, tokens, sos, targets, mask):
  keep = ~sos[:, None, None]
  x = p['embed/embedding'][tokens % META['vocab_size']]
  new = {}
  for i in range(META['num_layers']):
    pre = f'state/transformer{i}/'
    cache = tuple(
      jnp.where(keep[..., None], carried[pre + f'previous_{n}_train'], 0.0)
      for n in ('keys', 'values')
    )
    state = None
    if i == R:  # the learned initial state at a document start, not zeros
      initial = p[f'transformer{i}/recurrent_initial_state'][None]
      state = jnp.where(keep, carried[pre + 'recurrent_state_train'], initial)
    x, (ck, cv), state = _layer(p, i, x, cache, state)
    new[pre + 'previous_keys_train'], new[pre + 'previous_values_train'] = ck, cv
    if i == R:
      new[pre + 'recurrent_state_train'] = state
  return ref.head_and_loss(x, p['final_layernorm/scale'], p['embed/embedding'], targets, mask, new)


def _reference_params(rng: np.random.RandomState) -> dict[str, np.ndarray]:
  d, hk, f, h = META['embed_dim'], META['num_heads'] * META['head_dim'], META['mlp_dim'], 2
  n = META['recurrent_num_states']

  def kernel(n_in, n_out):
    return rng.normal(size=(n_in, n_out)) / np.sqrt(n_in)

  p = {'embed/embedding': rng.normal(size=(META['vocab_size'], d))}
  p['final_layernorm/scale'] = 1 + 0.2 * rng.normal(size=d)
  for i in range(META['num_layers']):
    pre = f'transformer{i}/'
    rec = i == R
    blocks = ['tbase/', 'recurrent_tbase/'] if rec else ['tbase/']
    for b in blocks:
      p[pre + b + '_kvq/pre_attn_layernorm/scale'] = 1 + 0.2 * rng.normal(size=d)
      p[pre + b + '_kvq/attention_scale'] = 2 + rng.normal(size=h)
      for s in ('queries', 'keys', 'values') + (('queries2',) if rec else ()):
        p[pre + b + f'_kvq/{s}_layer/kernel'] = kernel(d, hk)
      p[pre + b + 'post_attn_mlp/output_layer/kernel'] = kernel(2 * hk if rec else hk, d)
      if rec:
        p[pre + b + 'attention_scale2'] = 2 + rng.normal(size=h)
    p[pre + 'relative_positions/rel_embedding'] = rng.normal(size=(h, 32))
    p[pre + 'tbase/pre_ffn_layernorm/scale'] = 1 + 0.2 * rng.normal(size=d)
    p[pre + 'tbase/ffn/hidden0/kernel'] = kernel(d, f)
    p[pre + 'tbase/ffn/output_layer/kernel'] = kernel(f, d)
    if rec:
      p[pre + 'recurrent_initial_state'] = rng.normal(size=(n, d))
      p[pre + 'recurrent_tbase/_kvq/position_embeddings'] = rng.normal(size=(n, d))
      p[pre + 'recurrent_tbase/post_attn_mlp/gate_bias'] = rng.normal(size=d)
  return {k: v.astype(np.float32) for k, v in p.items()}


def _rederived_fixture(path: str) -> str:
  """Writes the re-derived fixture (golden format) to `path`."""
  rng = np.random.RandomState(0)
  b, w = META['batch_size'], META['window_length']
  params = _reference_params(rng)
  kv = (b, w, META['num_heads'], META['head_dim'])
  carried = {}
  for i in range(META['num_layers']):
    for n in ('keys', 'values'):
      carried[f'state/transformer{i}/previous_{n}_train'] = np.zeros(kv, np.float32)
  shape = (b, META['recurrent_num_states'], META['embed_dim'])
  carried[f'state/transformer{R}/recurrent_state_train'] = np.zeros(shape, np.float32)
  return ref.write_fixture(path, META, SOS, rng, params, carried, _segment, lambda state: state)


@pytest.fixture(scope='module')
def rederived(tmp_path_factory):
  return _rederived_fixture(str(tmp_path_factory.mktemp('brt') / 'brt_rederived.npz'))


def test_parity_tool_on_a_second_configuration(rederived, tmp_path, capsys):
  z = np.load(rederived)
  # The initial state gets a gradient exactly when some row starts a document.
  starts = [
    np.any(np.abs(z[f'seg{s}/grad/transformer{R}/recurrent_initial_state'])) for s in range(4)
  ]
  assert starts == [True, True, False, True]
  errors = ref.assert_parity(rederived, capsys, tmp_path)
  # 4 segments x (logits, token losses, loss, 3 x 2 caches, state); 4 x 45 gradients.
  assert len(errors['forward']) == 4 * 10 and len(errors['gradient']) == 4 * 45


def test_wrong_state_mapping_fails_on_the_second_configuration(rederived, capsys):
  # Two parameters of equal shape whose roles differ only inside the state update.
  rec = f'transformer{R}/'
  swap = [rec + 'recurrent_tbase/_kvq/position_embeddings', rec + 'recurrent_initial_state']
  ref.assert_parity_fails(rederived, swap, capsys)
