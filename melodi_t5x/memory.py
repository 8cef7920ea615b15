"""Per-row state carried from one segment (a T5X batch) to the next.

One small protocol, shared by every memory kind: at the start of a segment a `CarriedState` is
read and the rows whose document starts here are reset (`start_segment`); inside the segment the
model threads the value through its window loop; at the end it is written back (`end_segment`).

The arrays live in the Flax collection `MEMORY` (so T5X keeps them in `flax_mutables`, checkpoints
and partitions them) with their logical axis names in `MEMORY + '_axes'`. The leading axis is
always the batch row, so each row can stream its own document.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.linen import partitioning

MEMORY = 'memory'


class CarriedState(nn.Module):
  """One array `[B, *shape]` of carried state, zero (or a given value) at a document start."""

  shape: tuple[int, ...]
  axes: tuple[str, ...]
  dtype: jnp.dtype = jnp.float32

  def _exists(self) -> bool:
    return self.has_variable(MEMORY, 'value')

  def start_segment(
    self, start_of_sequence: jax.Array, initial: jax.Array | None = None
  ) -> jax.Array:
    """Returns the stored state with the rows flagged in `start_of_sequence: [B]` reset.

    Reset rows get `initial: [*shape]` (e.g. a learned initial state, which then receives the
    gradient of those rows), or zeros when `initial` is None.
    """
    batch = start_of_sequence.shape[0]
    full_shape = (batch, *self.shape)
    fresh = jnp.zeros(full_shape, self.dtype)
    if initial is not None:
      fresh = jnp.broadcast_to(initial.astype(self.dtype), full_shape)
    if self.is_mutable_collection(MEMORY) or self._exists():
      var = partitioning.variable_with_axes(
        MEMORY, 'value', jnp.zeros, full_shape, self.dtype, axes=('batch', *self.axes)
      )
      value = var.value
      if value.shape != full_shape:
        raise ValueError(
          f'{self.name}: carried memory has shape {value.shape} but this batch needs '
          f'{full_shape}; memory is per batch row, so re-initialise it (drop the '
          f"'{MEMORY}' collection / flax_mutables) when the batch size changes."
        )
    else:  # Stateless call (e.g. scoring): every row starts fresh.
      return fresh
    keep = jnp.logical_not(start_of_sequence).reshape((batch,) + (1,) * len(self.shape))
    return jnp.where(keep, value, fresh)

  def end_segment(self, value: jax.Array) -> None:
    """Stores `value` for the next segment (only in a mutable, non-init apply)."""
    if self.is_mutable_collection(MEMORY) and not self.is_initializing():
      self.put_variable(MEMORY, 'value', value.astype(self.dtype))
