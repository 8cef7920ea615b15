"""Incremental decoding of the MELODI decoder (T5X's `prefill` / `decode` calls, `cache`).

Inside a window a context token attends only to the memory and to the window's context tokens
before it, never to the window's summary tokens (`melodi.window_geometry`). So a window can be read
one token per call (`MelodiLayer.context_step`, with the keys/values of its earlier context tokens
cached per layer); when it is complete, the summary tokens are run over the cached window
(`MelodiLayer.summary_step`) and the token mixers write the next short-term memory and the
long-term increment, exactly as the training path does at the end of the window. The prefill
reads a prompt's complete windows through the training path itself (`melodi._window_step`, memory
carried) and the rest of it into the cache.

Cache (collection `cache`, every array `[B, ...]`, see `cache_specs`): `index` (tokens read),
`windows_seen`, and per layer the current window's context keys/values and outputs
(`[B, W, ...]`, valid before window position `index % W`), the short-term memory z with its
keys/values and, for long-term layers, the FIFO with its keys/values. Memory changes only when a
window completes. Functions take the bound `MelodiDecoder` (`module`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from melodi_t5x import decoding
from melodi_t5x.architectures import melodi
from melodi_t5x.config import MelodiConfig
from melodi_t5x.layers import tied_logits

Array = jax.Array


def cache_specs(cfg: MelodiConfig) -> tuple[decoding.Spec, ...]:
  """The cache arrays of a MELODI decoder (name, shape without batch, logical axes, dtype)."""
  w, d, dt = cfg.window_length, cfg.embed_dim, cfg.dtype
  kv, kv_axes = (cfg.num_heads, cfg.head_dim), ('heads', 'kv')
  specs = [('index', (), (), 'int32'), ('windows_seen', (), (), 'int32')]
  for i in range(cfg.num_layers):
    specs += [
      (f'context_keys_{i}', (w, *kv), ('length', *kv_axes), dt),
      (f'context_values_{i}', (w, *kv), ('length', *kv_axes), dt),
      (f'context_outputs_{i}', (w, d), ('length', 'embed'), dt),
    ]
    sizes = [('short_memory', 'memory', cfg.short_memory_size(i))]
    if cfg.is_long_term_layer(i):
      sizes.append(('long_memory', 'long', cfg.long_term_memory_tokens))
    for tokens_name, kv_name, n in sizes:
      if n:
        specs += [
          (f'{tokens_name}_{i}', (n, d), ('memory_length', 'embed'), dt),
          (f'{kv_name}_keys_{i}', (n, *kv), ('memory_length', *kv_axes), dt),
          (f'{kv_name}_values_{i}', (n, *kv), ('memory_length', *kv_axes), dt),
        ]
  return tuple(specs)


def prefill(module, tokens: Array, lengths: Array | None, start_of_sequence: Array | None):
  """Reads a prompt into the cache; logits [B, L, V] (valid at positions < lengths[b]).

  Row b consumes `tokens[b, :lengths[b]]` (default: T5X's count of non-zero tokens after
  position 0). Its complete windows run through the training path (`melodi._window_step`) with
  memory carried, starting from the `memory` collection (reset where `start_of_sequence`; None
  resets every row); the rest of the prompt is read into the cache by `MelodiLayer.context_step`.
  """
  cfg = module.config
  w, dtype = cfg.window_length, jnp.dtype(cfg.dtype)
  tokens = jnp.asarray(tokens).astype(jnp.int32)
  batch, length = tokens.shape
  lengths = decoding.prefill_lengths_of(tokens, lengths)
  sos = jnp.ones((batch,), bool) if start_of_sequence is None else start_of_sequence
  carry = module._start_segment(jnp.asarray(sos).astype(bool).reshape(batch), True, dtype)
  n = length // w
  outputs = []
  if n:
    x = jnp.take(module.embedding, tokens[:, : n * w], axis=0).astype(dtype)
    windows = x.reshape(batch, n, w, -1).swapaxes(0, 1)  # [n, B, W, D]
    complete = jnp.arange(1, n + 1)[:, None] * w <= lengths[None, :]  # [n, B]
    scan = nn.scan(
      _prefill_window_step,
      variable_broadcast=['params', 'params_axes'],
      split_rngs={'params': False, 'dropout': True},
      length=n,
    )
    carry, y = scan(module, carry, (windows, complete))
    outputs.append(y.swapaxes(0, 1).reshape(batch, n * w, -1))
  state = _state_from_carry(module, carry, lengths)
  start = lengths // w * w  # the window holding the rest of the prompt
  x = jnp.take(module.embedding, decoding.slice_rows(tokens, start, w), axis=0).astype(dtype)
  y, state = _context_pass(module, x, jnp.zeros_like(lengths), state)
  module.decode_state.read(batch)
  module.decode_state.write(state)
  y = jnp.concatenate([*outputs, y[:, : length - n * w]], axis=1)
  return tied_logits(module.final_norm(y), module.embedding, cfg)


def decode_step(module, tokens: Array) -> Array:
  """Logits [B, 1, V] of the next token after `tokens: [B, 1]`; completes windows.

  A call on an empty cache (T5X's cache-initialising call, any `[B, L]`) creates a zero cache
  and returns zero logits.
  """
  cfg = module.config
  tokens = jnp.asarray(tokens).astype(jnp.int32)
  batch, n = tokens.shape
  if not module.decode_state.exists():
    module.decode_state.read(batch)
    return jnp.zeros((batch, n, cfg.vocab_size), jnp.float32)
  if n != 1:
    raise ValueError(
      f'decode=True reads one token per call, got {n}; read a prompt with prefill=True.'
    )
  state = module.decode_state.read(batch)
  x = jnp.take(module.embedding, tokens, axis=0).astype(jnp.dtype(cfg.dtype))  # [B, 1, D]
  y, state = _context_pass(module, x, state['index'] % cfg.window_length, state)
  logits = tied_logits(module.final_norm(y), module.embedding, cfg)
  state['index'] = state['index'] + 1
  done = state['index'] % cfg.window_length == 0  # rows whose window is now complete
  state = nn.cond(jnp.any(done), _end_window, lambda _, s, __: s, module, state, done)
  module.decode_state.write(state)
  return logits


def _state_from_carry(module, carry, index: Array) -> dict[str, Array]:
  """Cache arrays from the training path's carry (context slots zero)."""
  cfg = module.config
  short, long, seen = carry
  batch, dtype = index.shape[0], jnp.dtype(cfg.dtype)
  state = {'index': index, 'windows_seen': seen}
  for i in range(cfg.num_layers):
    kv = (batch, cfg.window_length, cfg.num_heads, cfg.head_dim)
    state[f'context_keys_{i}'] = state[f'context_values_{i}'] = jnp.zeros(kv, dtype)
    state[f'context_outputs_{i}'] = jnp.zeros((batch, cfg.window_length, cfg.embed_dim), dtype)
  for i, z in short.items():
    state[f'short_memory_{i}'] = z
    state[f'memory_keys_{i}'], state[f'memory_values_{i}'] = module.layers[i].project_kv(z, True)
  for i, (fifo, k, v) in long.items():
    state[f'long_memory_{i}'], state[f'long_keys_{i}'], state[f'long_values_{i}'] = fifo, k, v
  return state


def _context_pass(module, x: Array, position: Array, state: dict[str, Array]):
  """Context tokens `x: [B, N, D]` at window positions `position: [B]` through every layer."""
  state = dict(state)
  memory_valid, long_valid = melodi._valid_memory(module.config, state['windows_seen'])
  for i, layer in enumerate(module.layers):
    ckv = (state[f'context_keys_{i}'], state[f'context_values_{i}'])
    x, ckv = layer.context_step(
      x, position, ckv, _kv(state, 'memory', i), _kv(state, 'long', i), memory_valid, long_valid
    )
    state[f'context_keys_{i}'], state[f'context_values_{i}'] = ckv
    outputs = state[f'context_outputs_{i}']
    state[f'context_outputs_{i}'] = decoding.write_rows(outputs, x, position)
  return x, state


def _summary_pass(module, state: dict[str, Array]) -> dict[str, Array]:
  """Summary tokens over the cached window, then the next memory (every row)."""
  cfg = module.config
  state = dict(state)
  memory_valid, long_valid = melodi._valid_memory(cfg, state['windows_seen'])
  x0 = state['context_outputs_0']
  u = jnp.broadcast_to(
    module.summary_embeddings.astype(x0.dtype)[None], (x0.shape[0], cfg.summary_size, x0.shape[2])
  )
  for i, layer in enumerate(module.layers):
    ckv = (state[f'context_keys_{i}'], state[f'context_values_{i}'])
    u, z, delta = layer.summary_step(
      state[f'context_outputs_{i}'],
      u,
      ckv,
      _kv(state, 'memory', i),
      _kv(state, 'long', i),
      memory_valid,
      long_valid,
    )
    if z is not None:
      state[f'short_memory_{i}'] = z
      state[f'memory_keys_{i}'], state[f'memory_values_{i}'] = layer.project_kv(z, True)
    if delta is not None:  # FIFO: drop the oldest increment, append the new one
      n = delta.shape[1]
      new = (delta, *layer.project_kv(delta, True))
      for name, value in zip(('long_memory', 'long_keys', 'long_values'), new):
        old = state[f'{name}_{i}']
        state[f'{name}_{i}'] = jnp.concatenate([old[:, n:], value.astype(old.dtype)], axis=1)
  state['windows_seen'] = state['windows_seen'] + 1
  return state


def _kv(state: dict[str, Array], kind: str, layer: int):
  """(keys, values) of `kind` ('memory' or 'long') for `layer` from a cache dict, or None."""
  keys = state.get(f'{kind}_keys_{layer}')
  return None if keys is None else (keys, state[f'{kind}_values_{layer}'])


def _end_window(module, state: dict[str, Array], done: Array):
  """Runs the summary pass; keeps its result for the rows whose window is complete (`done`)."""
  return decoding.select_rows(done, _summary_pass(module, state), state)


def _prefill_window_step(module, carry, xs):
  """`melodi._window_step` on one prompt window; rows whose prompt ends in it keep memory."""
  x, complete = xs
  new_carry, y = melodi._window_step(module, carry, x, deterministic=True)
  return decoding.select_rows(complete, new_carry, carry), y
