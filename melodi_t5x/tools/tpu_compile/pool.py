"""`check_jobs`: builds every job's step, compiles each distinct one once, returns the rows.

Jobs with equal build keys build their target once; jobs whose targets have equal keys share one
compile. A step missing from the results cache compiles in a spawned process of its own (a
process pool of `workers`, each process exiting after one step, so XLA's host memory is returned
between steps), or in this process (`--in_process`); a cached one is read back here.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import traceback
from collections.abc import Sequence
from typing import Any

from melodi_t5x.tools.tpu_compile import cache as cache_lib
from melodi_t5x.tools.tpu_compile import report, slices
from melodi_t5x.tools.tpu_compile import targets as targets_lib

# Gin bindings of a job that do not reach its compiled step: where it reads and writes, and the
# eval memory mode ('reset' sets `start_of_sequence` on the host; the step is the same).
_HOST_ONLY_BINDINGS = ('MODEL_DIR=', 'CHECKPOINT_PATH=', 'EVAL_OUTPUT_DIR=', 'MEMORY_MODE=')
# Order in which a pool compiles missing steps: the longest compiles first.
_COMPILE_ORDER = {'train': 0, 'timing': 1, 'eval': 2}

# A compile's outcome: (result of `cache.compile_target`, None) or (None, short error).
Outcome = tuple[dict | None, str | None]


def check_jobs(
  jobs: Sequence[Any],
  slice_: slices.Slice,
  *,
  workers: int = 1,
  utilisation: float = report.DEFAULT_UTILISATION,
  cache: cache_lib.ResultCache | None = None,
  fresh_process: bool = False,
  log=print,
) -> list[dict]:
  """Builds every job's target, compiles each distinct one once (or reads it from `cache`),
  returns one row per job, in the jobs' order.

  With `workers` > 1 or `fresh_process`, each step that is not in `cache` compiles in a spawned
  process that exits after that one step, `workers` at a time: XLA's host memory is returned
  between steps (one process that compiles a whole paper-size sweep grows by several GB a step).
  Cached steps are read back here, without a process. The pool gets train steps first, then
  timing, then eval (longest first), each as soon as its cache lookup misses.
  """
  targets, errors = build_targets(jobs, slice_, log)
  first: dict[str, Any] = {}  # target key -> the first job of that step
  for job in jobs:
    if targets[job.name] is not None:
      first.setdefault(targets[job.name].key, job)
  log(f'{len(jobs)} jobs, {len(first)} distinct compiles on {slice_.name}')
  results: dict[str, Outcome] = {}
  if (workers > 1 or fresh_process) and first:
    results = compile_in_pool(first, targets, slice_, cache, workers, log)
  for key, job in first.items():  # without a pool, or the steps a dead worker left
    if key not in results:
      results[key] = _compile_here(targets[job.name], slice_, cache)
      log(_progress(job.name, results[key]))
  rows = []
  for job in jobs:
    target = targets[job.name]
    if target is None:
      rows.append(report.job_row(job, None, None, errors[job.name], utilisation=utilisation))
      continue
    shared = first[target.key].name
    rows.append(
      report.job_row(
        job,
        target,
        *results[target.key],
        utilisation=utilisation,
        compiled_with=None if shared == job.name else shared,
      )
    )
  return rows


def build_targets(
  jobs: Sequence[Any], slice_: slices.Slice, log=print
) -> tuple[dict[str, targets_lib.Target | None], dict[str, str]]:
  """Each job's target (None where it fails to build) and the build errors, by job name; jobs
  with equal build keys (`_build_key`) share the first one's target."""
  targets: dict[str, targets_lib.Target | None] = {}
  errors: dict[str, str] = {}
  built: dict[tuple, str] = {}
  for job in jobs:
    same = built.get(_build_key(job))
    if same is not None:
      targets[job.name] = targets[same]
      if same in errors:
        errors[job.name] = errors[same]
      continue
    built[_build_key(job)] = job.name
    try:
      targets[job.name] = targets_lib.build_target(job, slice_)
    except Exception as e:  # reported per job
      targets[job.name] = None
      errors[job.name] = _short_error(e)
      log(f'[build failed] {job.name}: {errors[job.name]}')
      if os.environ.get('TPU_COMPILE_DEBUG'):
        traceback.print_exc()
  return targets, errors


def compile_in_pool(
  first: dict[str, Any],
  targets: dict[str, targets_lib.Target | None],
  slice_: slices.Slice,
  cache: cache_lib.ResultCache | None,
  workers: int,
  log=print,
) -> dict[str, Outcome]:
  """The outcomes of the distinct steps (`first`: target key -> job), each read from `cache` here
  or compiled in a spawned process of its own, `workers` at a time. Steps whose worker died are
  left out (the caller compiles them in process)."""
  results: dict[str, Outcome] = {}
  broken = 0
  # Processes spawn on submit only: a rerun whose steps are all cached starts none.
  with concurrent.futures.ProcessPoolExecutor(
    min(max(workers, 1), len(first)),
    mp_context=multiprocessing.get_context('spawn'),
    max_tasks_per_child=1,
  ) as pool:
    futures = {}
    # Heaviest steps first (a train compile takes minutes, an eval one seconds), and each missing
    # step is submitted as soon as its lookup misses: the workers compile while the lookups of
    # the later steps (a lowering each) go on here.
    order = sorted(first.items(), key=lambda kv: _COMPILE_ORDER[targets_lib.job_kind(kv[1])])
    for key, job in order:
      hit = _lookup(targets[job.name], slice_, cache)
      if hit is not None:
        results[key] = (hit, None)
        log(_progress(job.name, results[key]))
      else:
        futures[pool.submit(_compile_in_worker, job, slice_, cache)] = key
    for fut in concurrent.futures.as_completed(futures):
      key = futures[fut]
      try:
        results[key] = fut.result()
      except concurrent.futures.BrokenExecutor:
        # A worker died, most often killed for host memory (a paper-size MELODI compile for
        # v4 takes ~13 GB); the pool's pending steps are compiled by the caller, one at a time.
        broken += 1
        continue
      log(_progress(first[key].name, results[key]))
  if broken:
    log(
      f'[a compile worker died (host memory?)] compiling the {broken} steps it left one at a '
      'time in this process; lower --workers on this machine'
    )
  return results


def _lookup(
  target: targets_lib.Target, slice_: slices.Slice, cache: cache_lib.ResultCache | None
) -> dict | None:
  """The cached result of `target`, or None (no cache, a miss, or a step that fails to lower:
  its worker reports that)."""
  if cache is None:
    return None
  try:
    return cache_lib.cached_result(target, slice_.name, cache)
  except Exception:  # a step that fails to lower reports it from its worker
    return None


def _compile_here(
  target: targets_lib.Target, slice_: slices.Slice, cache: cache_lib.ResultCache | None
) -> Outcome:
  try:
    return cache_lib.compile_target(target, slice_.name, cache), None
  except Exception as e:  # reported per job
    return None, _short_error(e)


def _compile_in_worker(job, slice_: slices.Slice, cache: cache_lib.ResultCache | None) -> Outcome:
  """Worker process: rebuilds the job's target and compiles it."""
  try:
    return cache_lib.compile_target(targets_lib.build_target(job, slice_), slice_.name, cache), None
  except Exception as e:  # reported per job
    return None, _short_error(e)


def _build_key(job) -> tuple:
  """Jobs with equal build keys build equal targets (their target is built once)."""
  bindings = tuple(b for b in job.bindings if not b.startswith(_HOST_ONLY_BINDINGS))
  kind = targets_lib.job_kind(job)
  return (job.module, kind, tuple(job.gin_files), bindings, tuple(job.flags), job.topology)


def _short_error(e: BaseException) -> str:
  text = f'{type(e).__name__}: {e}'
  if 'RESOURCE_EXHAUSTED' in text or 'Ran out of memory' in text:
    start = text.find('RESOURCE_EXHAUSTED')
    return text[max(start, 0) : max(start, 0) + 400]
  return text[:600]


def _progress(name: str, outcome: Outcome) -> str:
  result, error = outcome
  if error:
    return f'[compile failed] {name}: {error}'
  mem = result['memory']
  how = 'from cache, compiled in' if result.get('cached') else 'compiled'
  gib = mem['peak'] / report.GIB
  return f'[{how} {result["compile_seconds"]:.0f} s] {name}: {gib:.2f} GiB/chip'
