"""Incremental decoding (prefill + one token per call) equals teacher-forced scoring (no t5x).

A fixed token sequence is scored once by the training path (one segment, memory carried over its
windows) and once incrementally: each row reads a prompt with `prefill=True`, then the true
tokens one per `decode=True` call. The next-token log-probabilities of both must agree in float32
(to 1e-5 relative) at every position, across window boundaries (MELODI's long-term FIFO
wrap-around, the Block-Recurrent state updates), for prompts ending mid-window, on a window
boundary and empty, with rows of different prompt lengths in one batch.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_configs import DIMS, MELODI_MEMORY

from melodi_t5x.architectures.brt import BRTDecoder
from melodi_t5x.architectures.melodi import MelodiDecoder
from melodi_t5x.architectures.xl import XLDecoder
from melodi_t5x.config import BRTConfig, MelodiConfig, XLConfig

# Window 8, long-term FIFO of 3 windows: 64 tokens are 8 windows, so the FIFO wraps.
MELODI = MelodiConfig(num_layers=3, **DIMS, **MELODI_MEMORY)
# Masked empty memory, a memory-free layer and the long-term layer at the bottom.
MELODI_MASKED = dataclasses.replace(
  MELODI, mask_empty_memory=True, no_memory_layers=(2,), long_term_memory_layers=(0,)
)
XL = XLConfig(num_layers=2, **DIMS)
DECODERS = {'melodi': (MelodiDecoder, MELODI), 'melodi_masked': (MelodiDecoder, MELODI_MASKED)}
DECODERS['xl'] = (XLDecoder, XL)
# Block-Recurrent: the recurrent layer in the middle of 3 layers, and at the bottom of 2.
XL_FIELDS = {f.name: getattr(XL, f.name) for f in dataclasses.fields(XL)}
BRT = BRTConfig(**{**XL_FIELDS, 'num_layers': 3}, recurrent_layer_index=1, num_states=4)
DECODERS['brt'] = (BRTDecoder, BRT)
DECODERS['brt_bottom'] = (BRTDecoder, BRTConfig(**XL_FIELDS, recurrent_layer_index=0, num_states=4))
T = 64
# Mid-window, exactly on a window boundary, empty (only the first input token is read by decode).
LENGTHS = np.array([13, 16, 0])
RTOL = 1e-5


def _tokens(seed: int, batch: int, length: int) -> jnp.ndarray:
  return jnp.asarray(np.random.RandomState(seed).randint(2, 97, (batch, length)), jnp.int32)


@functools.cache
def _setup(name: str):
  cls, cfg = DECODERS[name]
  model = cls(cfg)
  tokens = _tokens(0, len(LENGTHS), T)
  params = model.init(jax.random.PRNGKey(1), tokens, tokens, enable_dropout=False)['params']

  @jax.jit
  def prefill(params, memory, tokens, lengths, sos):
    variables = {'params': params, **({'memory': memory} if memory is not None else {})}
    logits, new = model.apply(
      variables,
      tokens,
      prefill=True,
      prefill_lengths=lengths,
      start_of_sequence=sos,
      enable_dropout=False,
      mutable=['cache'],
    )
    return jax.nn.log_softmax(logits), new['cache']

  @jax.jit
  def step(params, cache, token):
    logits, new = model.apply(
      {'params': params, 'cache': cache},
      token,
      decode=True,
      enable_dropout=False,
      mutable=['cache'],
    )
    return jax.nn.log_softmax(logits[:, 0]), new['cache']

  @jax.jit
  def score(params, memory, tokens, sos):
    variables = {'params': params, **({'memory': memory} if memory is not None else {})}
    logits, new = model.apply(
      variables, tokens, tokens, start_of_sequence=sos, enable_dropout=False, mutable=['memory']
    )
    return jax.nn.log_softmax(logits), new.get('memory')

  return model, params, prefill, step, score


def _incremental(name, params, tokens, lengths, memory=None, sos=None):
  """Log-probs [B, T, V]: prefill rows' first lengths[b] tokens, then feed the rest one by one."""
  _, _, prefill, step, _ = _setup(name)
  batch, length = tokens.shape
  lengths = jnp.asarray(lengths, jnp.int32)
  prompt = jnp.where(jnp.arange(length)[None] < lengths[:, None], tokens, 0)
  out, cache = prefill(params, memory, prompt, lengths, sos)
  out = np.array(out)
  index = np.asarray(lengths)
  rows = np.arange(batch)
  while index.min() < length:
    token = tokens[rows, np.minimum(index, length - 1)][:, None]
    logp, cache = step(params, cache, token)
    live = index < length
    out[rows[live], index[live]] = np.asarray(logp)[live]
    index = index + 1
  return out, cache


def _max_relative_error(got, want) -> float:
  return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


@pytest.mark.parametrize('name', sorted(DECODERS))
def test_incremental_decoding_equals_teacher_forcing(name):
  _, params, _, _, score = _setup(name)
  tokens = _tokens(2, len(LENGTHS), T)
  want, _ = score(params, None, tokens, None)
  got, cache = _incremental(name, params, tokens, LENGTHS)
  # Every position: prompt positions from the prefill, the others from single-token calls.
  np.testing.assert_allclose(got, want, rtol=RTOL, atol=RTOL * float(np.max(np.abs(want))))
  print(f'{name}: max relative error {_max_relative_error(got, want):.2e}')
  # Rows keep decoding until the shortest prompt's row reaches T.
  index = T + LENGTHS - LENGTHS.min()
  np.testing.assert_array_equal(cache['tokens_seen'], index)


@pytest.mark.parametrize('name', ['melodi', 'xl', 'brt'])
def test_prefill_after_carried_memory_continues_the_document(name):
  # The CLI's path: a first segment through the training path with memory carried, then the rest
  # of the prompt by prefill (start_of_sequence False) and decoding.
  _, params, _, _, score = _setup(name)
  tokens = _tokens(3, len(LENGTHS), T)
  want, _ = score(params, None, tokens, None)
  first = T // 2
  _, memory = score(params, None, tokens[:, :first], None)
  sos = jnp.zeros((len(LENGTHS),), bool)
  got, _ = _incremental(name, params, tokens[:, first:], LENGTHS, memory, sos)
  np.testing.assert_allclose(
    got, want[:, first:], rtol=RTOL, atol=RTOL * float(np.max(np.abs(want)))
  )
  error = _max_relative_error(got, want[:, first:])
  print(f'{name} after carried memory: max relative error {error:.2e}')
  # With memory reset the continuation is scored differently (memory matters).
  fresh, _ = _incremental(name, params, tokens[:, first:], LENGTHS, memory, ~sos)
  assert np.max(np.abs(fresh - want[:, first:])) > 1e-3


def test_greedy_decoding_is_deterministic_and_follows_the_argmax():
  name = 'melodi'
  _, params, prefill, step, score = _setup(name)
  prompt = _tokens(4, len(LENGTHS), 20)
  lengths = jnp.asarray(LENGTHS, jnp.int32)

  def greedy(n):
    masked = jnp.where(jnp.arange(20)[None] < lengths[:, None], prompt, 0)
    _, cache = prefill(params, None, masked, lengths, None)
    token = prompt[jnp.arange(3), lengths][:, None]
    out = []
    for _ in range(n):
      logp, cache = step(params, cache, token)
      token = jnp.argmax(logp, -1)[:, None].astype(jnp.int32)
      out.append(token)
    return np.asarray(jnp.concatenate(out, 1))

  a, b = greedy(24), greedy(24)
  np.testing.assert_array_equal(a, b)
  # Teacher-forced scoring of prompt + continuation puts each greedy token at the argmax.
  for row, n in enumerate(LENGTHS):
    seq = np.concatenate([np.asarray(prompt[row, : n + 1]), a[row]])[:24][None]
    logp, _ = score(params, None, jnp.asarray(seq), None)
    np.testing.assert_array_equal(np.argmax(logp[0, n:], -1), a[row, : 24 - n])


def test_decode_needs_a_mutable_cache_and_one_token_per_call():
  model, params, _, _, _ = _setup('melodi')
  tokens = _tokens(5, 2, 8)
  with pytest.raises(ValueError, match="mutable=\\['cache'\\]"):
    model.apply({'params': params}, tokens[:, :1], decode=True, enable_dropout=False)
  # T5X's cache-initialising call (a whole [B, L] on an empty cache) returns zero logits.
  logits, variables = model.apply(
    {'params': params}, tokens, decode=True, enable_dropout=False, mutable=['cache']
  )
  assert logits.shape == (2, 8, 97) and not np.any(logits)
  with pytest.raises(ValueError, match='one token per call'):
    model.apply(
      {'params': params, **variables}, tokens, decode=True, enable_dropout=False, mutable=['cache']
    )


def test_memorizing_decoder_refuses_incremental_decoding_clearly():
  from melodi_t5x.architectures.memorizing import MemorizingDecoder
  from melodi_t5x.config import MemorizingConfig

  model = MemorizingDecoder(MemorizingConfig(**XL_FIELDS, memory_layer_index=0, memory_size=16))
  tokens = _tokens(6, 2, 16)
  variables = model.init(jax.random.PRNGKey(0), tokens, tokens, enable_dropout=False)
  for kwargs in ({'prefill': True}, {'decode': True}):
    with pytest.raises(NotImplementedError, match='MemorizingDecoder has no incremental decoding'):
      model.apply(variables, tokens, **kwargs, enable_dropout=False, mutable=['cache'])
