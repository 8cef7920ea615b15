"""The command line: `python -m melodi_t5x.tools.tpu_compile` (see the package docstring)."""

from __future__ import annotations

import argparse
import json
import time

from melodi_t5x import experiments, t5x_gin
from melodi_t5x import jobs as jobs_lib
from melodi_t5x.tools import tpu_compile
from melodi_t5x.tools.tpu_compile import cache as cache_lib
from melodi_t5x.tools.tpu_compile import pool, report, slices


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
    prog='python -m melodi_t5x.tools.tpu_compile', description=tpu_compile.__doc__.split('\n')[0]
  )
  group = p.add_mutually_exclusive_group(required=True)
  group.add_argument('--sweep', choices=experiments.sweep_names(), help='a sweep to check')
  group.add_argument('--experiment', help='one committed experiment gin file')
  group.add_argument(
    '--table', nargs='+', help="instead: print the docs' cost table of these --json outputs"
  )
  p.add_argument('--accelerator', default='v5e', choices=sorted(jobs_lib.ACCELERATORS))
  p.add_argument('--topology', default=None, help="slice topology (default: the launcher's)")
  p.add_argument(
    '--timing_topology', default=None, help="slice of the timing jobs (default: the launcher's)"
  )
  # Gin bindings of all jobs: --gin.NAME=VALUE or --gin_bindings (--binding: deprecated).
  t5x_gin.add_gin_flags(p, gin_files=False, deprecated=('--binding',))
  p.add_argument('--noeval', action='store_true', help='leave out the eval jobs')
  p.add_argument('--json', default=None, help='write the rows to this JSON file')
  p.add_argument(
    '--workers',
    type=int,
    default=1,
    help='compile this many steps in parallel, each in a process of its own that exits after it',
  )
  p.add_argument(
    '--in_process',
    action='store_true',
    help='with --workers 1: compile in this process (tracebacks, debuggers); its host memory grows '
    'with every step',
  )
  p.add_argument(
    '--cache_dir',
    default=None,
    help=f'results cache (default ${cache_lib.CACHE_ENV} or ~/.cache/melodi_t5x/tpu_compile)',
  )
  p.add_argument('--nocache', action='store_true', help='compile every step, read no cached result')
  p.add_argument(
    '--utilisation',
    type=float,
    default=report.DEFAULT_UTILISATION,
    help='model FLOPs utilisation assumed for the step-time estimate',
  )
  return t5x_gin.parse_args(p, argv)


def launcher_jobs(args: argparse.Namespace):
  """The launcher's jobs for the flags (`melodi_t5x.jobs.sweep_jobs`) and the slice."""
  topology = args.topology or jobs_lib.ACCELERATORS[args.accelerator]
  timing = args.timing_topology or jobs_lib.TIMING_TOPOLOGY[args.accelerator]
  if timing in ('1x1',) or timing.count('x') == 0:
    timing = slices.SMALLEST_TOPOLOGY[args.accelerator]
  jobs = jobs_lib.sweep_jobs(
    '/tmp/tpu_compile',
    sweep=args.sweep,
    experiment=args.experiment,
    eval_modes=() if args.noeval else experiments.MEMORY_MODES,
    bindings=[t5x_gin.normalize_binding(b) for b in args.gin_bindings],
    topology=topology,
    timing_topology=timing,
  )
  return jobs, slices.Slice(args.accelerator, topology)


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.table:
    reports = []
    for path in args.table:
      with open(path) as f:
        reports.append(json.load(f))
    print(report.cost_table(reports))
    return 0
  if not 0 < args.utilisation <= 1:
    raise SystemExit(f'--utilisation={args.utilisation}: must be in (0, 1].')
  tick = time.time()
  jobs, slice_ = launcher_jobs(args)
  cache = (
    None if args.nocache else cache_lib.ResultCache(args.cache_dir or cache_lib.default_cache_dir())
  )
  rows = pool.check_jobs(
    jobs,
    slice_,
    workers=args.workers,
    utilisation=args.utilisation,
    cache=cache,
    fresh_process=not args.in_process,
  )
  wall = time.time() - tick
  print(report.format_rows(rows))
  bad = [r for r in rows if not r['fits']]
  steps = {r['fingerprint']: r['cached'] for r in rows if r.get('fingerprint')}
  print(
    f'{len(rows)} jobs on {slice_.name}: {len(rows) - len(bad)} fit, {len(bad)} do not fit or '
    f'failed; {wall:.0f} s ({sum(not c for c in steps.values())} steps compiled, '
    f'{sum(steps.values())} read from the cache). Estimates: matmul FLOPs (traced, else '
    f'analytic) at {args.utilisation:.0%} of peak.'
  )
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(
        {
          'slice': slice_.name,
          'utilisation': args.utilisation,
          'fit_fraction': report.FIT_FRACTION,
          'wall_seconds': wall,
          'steps_compiled': sum(not c for c in steps.values()),
          'steps_from_cache': sum(steps.values()),
          'jobs': rows,
        },
        f,
        indent=1,
      )
  return 1 if bad else 0
