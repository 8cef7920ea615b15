"""The T5X attributes the compile check reads that T5X keeps private, in one place.

T5X offers no public way to read these; each function says what it reads and why the check needs
it. A T5X upgrade that renames one breaks the check here, with an AttributeError naming it.
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class MeshSettings:
  """The mesh arguments a T5X partitioner was built with (see `PjitPartitioner.__init__`)."""

  # Size of the model-parallel submesh T5X picks itself (ignored when `submesh` is given).
  num_partitions: int | None
  # (x, y, z, core) model-parallel device tile, or None.
  submesh: tuple[int, ...] | None
  # Logical mesh per slice and across slices (multi-slice), or None.
  ici_mesh_shape: tuple[int, ...] | None
  dcn_mesh_shape: tuple[int, ...] | None


def mesh_settings(partitioner) -> MeshSettings:
  """The mesh arguments of a T5X `PjitPartitioner`.

  T5X stores them privately and reads them only in its `mesh` property, which builds the mesh
  from the host's `jax.devices()`; the check builds the same mesh on the slice's devices instead
  (`slices.t5x_mesh`), so it needs the arguments themselves.
  """
  return MeshSettings(
    num_partitions=partitioner._num_partitions,  # pylint: disable=protected-access
    submesh=partitioner._model_parallel_submesh,  # pylint: disable=protected-access
    ici_mesh_shape=partitioner._ici_mesh_shape,  # pylint: disable=protected-access
    dcn_mesh_shape=partitioner._dcn_mesh_shape,  # pylint: disable=protected-access
  )


def use_mesh(partitioner, mesh) -> None:
  """Makes `partitioner` use `mesh` instead of building one from the host's devices.

  T5X's `mesh` is a `cached_property` (a non-data descriptor): an instance attribute of that name
  takes its place, so every later use (partitioning, the local chunker) sees the slice's mesh.
  """
  partitioner.mesh = mesh


def partitioned_train_step(trainer) -> Any:
  """The partitioned train step a T5X `Trainer` runs (not yet compiled).

  `_partitioned_train_step` is the hook T5X's `BaseTrainer` documents for subclasses to implement;
  T5X exposes the step only compiled (`compile_train`, which also needs a concrete train state),
  and the check must lower it without compiling (the results cache is keyed by the lowered
  program).
  """
  return trainer._partitioned_train_step  # pylint: disable=protected-access


def train_schedule(trainer) -> tuple[Any, int | None]:
  """The learning-rate function and microbatch count a T5X `Trainer` was built with.

  T5X keeps both private; they describe the step (two jobs that differ only in them must not
  share a compile), and the project's trainer takes them from gin bindings of `trainer.Trainer`
  when not given, so the trainer object is the one place that has the values it uses.
  """
  return (
    trainer._learning_rate_fn,  # pylint: disable=protected-access
    trainer._num_microbatches,  # pylint: disable=protected-access
  )


def loss_settings(model) -> dict[str, Any]:
  """The loss settings of a T5X model (`BaseTransformerModel` keeps them private).

  They reach the compiled step, so they describe it; a model without one gives None.
  """
  return {
    'z_loss': getattr(model, '_z_loss', None),
    'label_smoothing': getattr(model, '_label_smoothing', None),
    'loss_normalizing_factor': repr(getattr(model, '_loss_normalizing_factor', None)),
  }
