"""Incremental decoding helpers shared by the decoders (the `cache` collection of T5X).

T5X decodes a decoder-only model in three kinds of calls (see `t5x.models.DecoderOnlyModel`):
`prefill=True` reads the prompt `[B, L]` with `prefill_lengths: [B]` (row b consumes its first
`prefill_lengths[b]` input tokens), then `decode=True` reads one token `[B, 1]` per call and returns
the next-token logits. Between calls the state lives in the Flax collection `cache`; every leaf
has a leading batch axis, so T5X can repeat rows for several samples (`decoding.cache_map`).

`DecodeCache` holds a decoder's named per-row arrays; `write_rows` writes a few tokens at a
per-row position; `slice_rows` gathers a per-row slice.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.linen import partitioning

CACHE = 'cache'

Array = jax.Array
# One cached array: (name, shape without the batch axis, logical axis names, dtype name).
Spec = tuple[str, tuple[int, ...], tuple[str, ...], str]


class DecodeCache(nn.Module):
  """Named per-row arrays `[B, *shape]` in the `cache` collection, zero until written."""

  specs: tuple[Spec, ...]

  def exists(self) -> bool:
    return self.has_variable(CACHE, self.specs[0][0])

  def read(self, batch: int) -> dict[str, Array]:
    """Every array (created as zeros when the collection is mutable and they do not exist)."""
    if not (self.exists() or self.is_mutable_collection(CACHE)):
      raise ValueError(
        "incremental decoding needs the 'cache' collection: apply with mutable=['cache'] (and "
        "pass the cache returned by the prefill call as variables['cache'] afterwards)."
      )
    out = {}
    for name, shape, axes, dtype in self.specs:
      full = (batch, *shape)
      var = partitioning.variable_with_axes(
        CACHE, name, jnp.zeros, full, jnp.dtype(dtype), axes=('batch', *axes), module=self
      )
      if var.value.shape != full:
        raise ValueError(
          f'decoding cache {name!r} has shape {var.value.shape} but this call needs {full}: the '
          'cache is per batch row; prefill it again for this batch.'
        )
      out[name] = var.value
    return out

  def write(self, values: dict[str, Array]) -> None:
    dtypes = {name: dtype for name, _, _, dtype in self.specs}
    for name, value in values.items():
      self.put_variable(CACHE, name, value.astype(jnp.dtype(dtypes[name])))


def write_rows(buffer: Array, new: Array, position: Array) -> Array:
  """Writes `new: [B, N, ...]` into `buffer: [B, W, ...]` at rows' offsets `position: [B]`."""
  put = lambda b, x, p: jax.lax.dynamic_update_slice_in_dim(b, x.astype(b.dtype), p, axis=0)
  return jax.vmap(put)(buffer, new, position)


def slice_rows(x: Array, start: Array, length: int) -> Array:
  """`x[b, start[b] : start[b] + length]` for every row (zero past the end): [B, length, ...]."""
  padded = jnp.pad(x, ((0, 0), (0, length)) + ((0, 0),) * (x.ndim - 2))
  take = lambda t, s: jax.lax.dynamic_slice_in_dim(t, s, length, axis=0)
  return jax.vmap(take)(padded, start)


def prefill_lengths_of(tokens: Array, prefill_lengths: Array | None) -> Array:
  """Prompt lengths `[B]`: given, or T5X's rule (non-zero tokens after position 0)."""
  if prefill_lengths is None:
    return jnp.sum(tokens[:, 1:] != 0, axis=-1).astype(jnp.int32)
  return jnp.asarray(prefill_lengths).astype(jnp.int32).reshape(tokens.shape[:1])


def select_rows(mask: Array, new, old):
  """Per row, `new` where `mask: [B]` else `old` (same tree)."""
  pick = lambda a, b: jnp.where(mask.reshape((-1,) + (1,) * (a.ndim - 1)), a, b)
  return jax.tree_util.tree_map(pick, new, old)
