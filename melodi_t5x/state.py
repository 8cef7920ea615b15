"""State that a layer carries from one call to the next, in one shape for every use.

Each layer kind declares its state as a `flax.struct` dataclass of arrays, every one with a leading
batch axis (`[B, ...]`), its fields named and shaped in a comment. The same struct is:
  - the training carry (threaded through a segment's windows or layers),
  - the layer's entry in the Flax collection `memory` (carried from one segment, i.e. one T5X
    batch, to the next; T5X keeps it in `flax_mutables`, checkpoints and partitions it),
  - the layer's entry in the Flax collection `cache` (incremental decoding).
A layer describes its state by the same struct with `ArraySpec` leaves (shape without the batch
axis, logical axis names, dtype); a field left None is absent. `read` and `write` move a struct
in and out of a collection in the layer's own scope, one variable per field (`memory/layers_3/
keys`), with the field's logical axes in `<collection>_axes` for T5X's partitioner.

At a row's document start (`reset: [B]`) `read` gives the row a fresh state: zeros, or the layer's
`fresh` value (e.g. a learned initial state, which then gets that row's gradient).

The row helpers at the end (`select_rows`, `write_rows`, `slice_rows`, `fifo_push`) are the
per-row bookkeeping every layer kind shares.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.linen import partitioning

Array = jax.Array
# Flax collections: state carried across segments, and the incremental-decoding cache.
MEMORY = 'memory'
CACHE = 'cache'


@dataclasses.dataclass(frozen=True)
class ArraySpec:
  """One field of a state: `[B, *shape]` with logical axes `('batch', *axes)`."""

  shape: tuple[int, ...]
  axes: tuple[str, ...]
  dtype: str = 'float32'

  def zeros(self, batch: int) -> Array:
    return jnp.zeros((batch, *self.shape), jnp.dtype(self.dtype))


def _fields(spec) -> list[tuple[str, ArraySpec]]:
  """The present fields (name, spec) of a spec struct."""
  return [
    (f.name, getattr(spec, f.name))
    for f in dataclasses.fields(spec)
    if getattr(spec, f.name) is not None
  ]


def zeros(spec, batch: int):
  """The state of `spec` with every present field zero."""
  return spec.replace(**{name: s.zeros(batch) for name, s in _fields(spec)})


def read(module: nn.Module, collection: str, spec, batch: int, reset=None, fresh=None):
  """The state `spec` stored in `module`'s scope of `collection`, `[B, ...]` per field.

  Args:
    module: the (bound) layer or decoder owning the state.
    collection: `MEMORY` or `CACHE`.
    spec: a state struct with `ArraySpec` leaves (None fields are absent).
    batch: B.
    reset: [B] bool, rows that start a document here (MEMORY only): they get `fresh`.
    fresh: the state at a document start (default zeros); same struct as `spec`.

  Without the collection (a stateless call) the `MEMORY` state is `fresh` for every row; a missing
  `CACHE` is an error, because decoding needs the state of the prefill call.
  """
  fresh = zeros(spec, batch) if fresh is None else fresh
  names = _fields(spec)
  exists = names and module.has_variable(collection, names[0][0])
  if not (exists or module.is_mutable_collection(collection)):
    if collection == CACHE:
      raise ValueError(
        "incremental decoding needs the 'cache' collection: apply with mutable=['cache'] (and "
        "pass the cache returned by the prefill call as variables['cache'] afterwards)."
      )
    return fresh
  values = {}
  for name, s in names:
    full = (batch, *s.shape)
    axes = ('batch', *s.axes)
    # Not `module.variable`: a layer holds the same field names in `memory` and in `cache`.
    if not module.has_variable(collection, name):
      module.put_variable(collection, name, jnp.zeros(full, jnp.dtype(s.dtype)))
    module.sow(
      f'{collection}_axes', f'{name}_axes', partitioning.AxisMetadata(axes), reduce_fn=_same_axes
    )
    value = module.get_variable(collection, name)
    if value.shape != full:
      raise ValueError(
        f'{module.name}: {collection} {name!r} has shape {value.shape} but this batch needs '
        f'{full}; state is per batch row, so start it again (drop the {collection!r} collection, '
        'or prefill again) when the batch size changes.'
      )
    values[name] = partitioning.with_sharding_constraint(value, axes)
  state = spec.replace(**values)
  if reset is not None:
    state = select_rows(reset, fresh, state)
  return state


def _same_axes(old, new):
  """Reduce function of the axis metadata: one entry per variable, however often it is read."""
  if old != () and old != new:
    raise ValueError(f'logical axes {new} differ from those recorded before, {old}')
  return new


def write(module: nn.Module, collection: str, spec, state) -> None:
  """Stores the fields of `spec` from `state` (only in a mutable, non-init apply for MEMORY)."""
  if not module.is_mutable_collection(collection):
    return
  if collection == MEMORY and module.is_initializing():
    return
  for name, s in _fields(spec):
    module.put_variable(collection, name, getattr(state, name).astype(jnp.dtype(s.dtype)))


# ---------------------------------------------------------------------------------------------
# Per-row helpers.
# ---------------------------------------------------------------------------------------------


def cast(state, dtype):
  """`state` (any struct or tree of arrays) with every array in `dtype`."""
  return jax.tree_util.tree_map(lambda a: a.astype(jnp.dtype(dtype)), state)


def select_rows(mask: Array, new: Any, old: Any) -> Any:
  """Per row, `new` where `mask: [B]` else `old` (same tree; None leaves stay None)."""
  pick = lambda a, b: jnp.where(mask.reshape((-1,) + (1,) * (a.ndim - 1)), a, b.astype(a.dtype))
  return jax.tree_util.tree_map(pick, new, old)


def write_rows(buffer: Array, new: Array, position: Array) -> Array:
  """Writes `new: [B, N, ...]` into `buffer: [B, W, ...]` at rows' offsets `position: [B]`."""
  put = lambda b, x, p: jax.lax.dynamic_update_slice_in_dim(b, x.astype(b.dtype), p, axis=0)
  return jax.vmap(put)(buffer, new, position)


def slice_rows(x: Array, start: Array, length: int) -> Array:
  """`x[b, start[b] : start[b] + length]` for every row (zero past the end): [B, length, ...]."""
  padded = jnp.pad(x, ((0, 0), (0, length)) + ((0, 0),) * (x.ndim - 2))
  take = lambda t, s: jax.lax.dynamic_slice_in_dim(t, s, length, axis=0)
  return jax.vmap(take)(padded, start)


def fifo_push(fifo: Array, new: Array) -> Array:
  """Drops the oldest `N` entries of `fifo: [B, Q, ...]` and appends `new: [B, N, ...]`."""
  return jnp.concatenate([fifo[:, new.shape[1] :], new.astype(fifo.dtype)], axis=1)
