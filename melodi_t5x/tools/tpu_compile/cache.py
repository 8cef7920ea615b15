"""Compiling a step, or reading its result back from the results cache (`ResultCache`).

A result (memory plan, traced matmul FLOPs, XLA's cost figures, compile seconds) is keyed by the
fingerprint of the lowered program, the slice and the toolchain (`program_fingerprint`).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any

import jax

from melodi_t5x.tools import bench
from melodi_t5x.tools import flops as flops_lib
from melodi_t5x.tools.tpu_compile import targets

# Environment variable naming the results cache (default ~/.cache/melodi_t5x/tpu_compile).
CACHE_ENV = 'MELODI_TPU_COMPILE_CACHE'


def memory_plan(compiled) -> dict[str, int]:
  """XLA's per-chip memory plan: argument, output, alias, temp bytes and their peak."""
  out = bench.xla_memory(compiled)
  out['peak'] = out.pop('peak_estimate')
  return out


class ResultCache:
  """Compile results on disk, keyed by the fingerprint of the lowered program.

  A result (memory plan, traced FLOPs, XLA's cost figures) is a function of the program XLA:TPU
  receives and of the compiler: the key hashes the lowered StableHLO (shardings included, source
  locations not), the slice, the device kind, the jax / jaxlib / libtpu versions and the XLA flags
  of the environment. Any change to the model code, the gin files or the mesh that reaches the
  step changes the program and misses; a rerun of an unchanged sweep, or a job that another
  sweep already compiled (e.g. an ablation family's shared run), is read back in seconds.
  Results only: no executable is stored, and failed compiles are not cached.
  """

  def __init__(self, directory: str):
    self.directory = directory

  def get(self, fingerprint: str) -> dict[str, Any] | None:
    try:
      with open(self._path(fingerprint)) as f:
        entry = json.load(f)
    except (OSError, ValueError):
      return None
    return entry.get('result') if entry.get('fingerprint') == fingerprint else None

  def put(self, fingerprint: str, result: dict[str, Any], **about: Any) -> None:
    os.makedirs(self.directory, exist_ok=True)
    path = self._path(fingerprint)
    tmp = f'{path}.{os.getpid()}.tmp'
    with open(tmp, 'w') as f:
      json.dump({'fingerprint': fingerprint, 'result': result, **about}, f, indent=1)
    os.replace(tmp, path)  # atomic: parallel workers never read half an entry

  def _path(self, fingerprint: str) -> str:
    return os.path.join(self.directory, f'{fingerprint}.json')


def default_cache_dir() -> str:
  return os.environ.get(CACHE_ENV) or os.path.join(
    os.path.expanduser('~'), '.cache', 'melodi_t5x', 'tpu_compile'
  )


def toolchain() -> dict[str, str]:
  """What besides the program decides XLA:TPU's plan: compiler versions and flags."""
  from importlib import metadata  # pylint: disable=g-import-not-at-top

  def version(dist: str) -> str:
    try:
      return metadata.version(dist)
    except metadata.PackageNotFoundError:
      return 'absent'

  return {
    'jax': jax.__version__,
    'jaxlib': version('jaxlib'),
    'libtpu': version('libtpu'),
    'XLA_FLAGS': os.environ.get('XLA_FLAGS', ''),
    'LIBTPU_INIT_ARGS': os.environ.get('LIBTPU_INIT_ARGS', ''),
  }


def program_fingerprint(lowered, target: targets.Target, slice_name: str) -> str:
  """Hash of the lowered program, where it compiles (slice, mesh, devices) and the toolchain."""
  h = hashlib.sha256(lowered.as_text(debug_info=False).encode())
  where = {
    'slice': slice_name,
    'device_kind': target.device_kind,
    'devices': target.devices,
    **{k: target.describe.get(k) for k in ('mesh_shape', 'mesh_devices', 'device')},
    **toolchain(),
  }
  h.update(json.dumps(where, sort_keys=True, default=repr).encode())
  return h.hexdigest()[:24]


def compile_target(
  target: targets.Target, slice_name: str, cache: ResultCache | None = None
) -> dict[str, Any]:
  """Compiles `target` for `slice_name` (or reads its result from `cache`): memory plan, XLA's
  cost figures, the traced matmul FLOPs and the compile seconds; 'cached' is True when read back.
  """
  lowered = target.lower()
  fingerprint = program_fingerprint(lowered, target, slice_name)
  hit = _read_back(cache, fingerprint) if cache is not None else None
  if hit is not None:
    return hit
  traced = None
  if target.trace is not None:
    try:
      traced = float(flops_lib.jaxpr_dot_flops(target.trace().jaxpr))
    except ValueError:  # a while loop: no static trip count; the analytic figure is used
      traced = None
  tick = time.perf_counter()
  compiled = lowered.compile()
  seconds = time.perf_counter() - tick
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  cost = dict(cost or {})
  result = {
    'memory': memory_plan(compiled),
    'compile_seconds': seconds,
    'traced_flops': traced,
    # Reported, not used: a loop body is counted once (see the module docstring).
    'xla_flops_loop_blind': float(cost.get('flops', 0.0)),
    'xla_optimal_seconds': float(cost.get('optimal_seconds', 0.0)),
  }
  if cache is not None:
    cache.put(fingerprint, result, describe=target.describe, toolchain=toolchain(), at=time.time())
  return {**result, 'fingerprint': fingerprint, 'cached': False}


def cached_result(
  target: targets.Target, slice_name: str, cache: ResultCache
) -> dict[str, Any] | None:
  """`compile_target`'s result when `cache` holds it (lowers the step, compiles nothing)."""
  return _read_back(cache, program_fingerprint(target.lower(), target, slice_name))


def _read_back(cache: ResultCache, fingerprint: str) -> dict[str, Any] | None:
  hit = cache.get(fingerprint)
  return None if hit is None else {**hit, 'fingerprint': fingerprint, 'cached': True}
