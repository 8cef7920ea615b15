"""A TPU slice as the check sees it: libtpu's devices of its topology, and T5X's mesh on them."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

from melodi_t5x.tools.tpu_compile import t5x_internals

# Accelerator flag -> libtpu topology name prefix.
TOPOLOGY_PREFIX = {'v4': 'v4', 'v5e': 'v5e', 'v5p': 'v5p', 'v6e': 'v6e'}
# libtpu describes no single-chip slice ('v5e:1x1' fails): the timing jobs (one device) compile
# for the first device of this smallest slice of the same chip.
SMALLEST_TOPOLOGY = {'v4': '2x2x1', 'v5e': '2x2', 'v5p': '2x2x1', 'v6e': '2x2'}


@dataclasses.dataclass(frozen=True)
class Slice:
  """A TPU slice: the launcher's accelerator flag and topology."""

  # 'v4', 'v5e', 'v5p' or 'v6e'.
  accelerator: str
  # Chip grid, e.g. '4x8' or '2x2x4'.
  topology: str

  @property
  def name(self) -> str:
    return f'{TOPOLOGY_PREFIX[self.accelerator]}:{self.topology}'


@functools.lru_cache(maxsize=8)
def topology_devices(slice_name: str) -> tuple[Any, ...]:
  """The devices of libtpu's description of `slice_name` (e.g. 'v5e:4x8')."""
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top

  try:
    topo = topologies.get_topology_desc(topology_name=slice_name, platform='tpu')
  except Exception as e:  # libtpu missing or an unknown topology
    raise RuntimeError(
      f'libtpu cannot describe the slice {slice_name!r} ({type(e).__name__}: {e}). Install the '
      'TPU requirements (pip install -r requirements-tpu.txt) and give a topology of that chip, '
      'e.g. v5e:4x8, v6e:4x8, v4:2x2x4, v5p:2x2x4.'
    ) from e
  return tuple(topo.devices)


def cores_per_chip(devices: Sequence[Any]) -> int:
  """JAX devices per chip: libtpu describes a v4 chip as two devices (one per TensorCore)."""
  return 1 + max(int(getattr(d, 'core_on_chip', 0)) for d in devices)


def libtpu_available() -> bool:
  """Whether libtpu can describe a TPU slice here (the slow tests skip without it)."""
  try:
    topology_devices('v5e:2x2')
  except RuntimeError:
    return False
  return True


def t5x_mesh(partitioner, devices: Sequence[Any]):
  """The mesh `partitioner` (a T5X `PjitPartitioner`) builds on a slice whose devices are
  `devices`, as its `mesh` property does on the host's devices (`t5x.partitioning.default_mesh`).

  ICI and DCN mesh shapes give JAX's hybrid device mesh ('replica', 'data', 'model'); a
  model-parallel submesh gives T5X's `get_mesh` (process 0's devices are the local ones). Without
  either, T5X picks a submesh from per-TPU defaults, which cover TPU v2 and v3 and v4 described
  as one device per chip; libtpu describes none of the check's slices so (a v4 chip is two
  devices), so T5X has no default mesh for them and neither has the check
  (tests/test_tpu_compile.py pins this against T5X's `default_mesh`).
  """
  from jax.experimental import mesh_utils  # pylint: disable=g-import-not-at-top
  from jax.sharding import Mesh  # pylint: disable=g-import-not-at-top
  from t5x import partitioning as t5x_partitioning  # pylint: disable=g-import-not-at-top

  settings = t5x_internals.mesh_settings(partitioner)
  devices = list(devices)
  if settings.ici_mesh_shape is not None and settings.dcn_mesh_shape is not None:
    grid = mesh_utils.create_hybrid_device_mesh(
      settings.ici_mesh_shape, settings.dcn_mesh_shape, devices=devices
    )
    return Mesh(grid, ['replica', 'data', 'model'])
  if settings.submesh:
    local = [d for d in devices if d.process_index == devices[0].process_index]
    return t5x_partitioning.get_mesh(
      settings.submesh, input_devices=devices, input_local_devices=local
    )
  raise ValueError(
    f'No default mesh for {devices[-1].device_kind} ({len(devices)} devices) with '
    f'num_partitions={settings.num_partitions}: T5X picks a submesh itself only for TPU v2, v3 '
    'and single-core v4 devices. Bind partitioning.PjitPartitioner.model_parallel_submesh (as '
    'gin/experiments/runs/tpu_mesh.gin does), or ici_mesh_shape and dcn_mesh_shape.'
  )


def use_slice_mesh(partitioner, devices: Sequence[Any]):
  """Gives `partitioner` its mesh on the slice's `devices` (`t5x_mesh`); returns the mesh."""
  mesh = t5x_mesh(partitioner, devices)
  t5x_internals.use_mesh(partitioner, mesh)
  return mesh
