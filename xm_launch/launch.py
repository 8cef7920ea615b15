r"""Launches the experiment suite: one job per experiment gin file, on Cloud TPU with XManager.

  # the paper's main table: 18 training jobs (+ 2 eval jobs each on the final checkpoint)
  python -m xm_launch.launch --sweep=main --model_dir_root=gs://BUCKET/melodi \
    --accelerator=v5e --topology=4x8 [--noeval] [--dry_run]
  # one ablation family (memory_tradeoff, coverage, window, short_layers, long_layers, branching),
  # the timing benchmarks, or one experiment file
  python -m xm_launch.launch --sweep=coverage --model_dir_root=gs://BUCKET/melodi ...
  python -m xm_launch.launch --sweep=timing --model_dir_root=gs://BUCKET/melodi --accelerator=v6e
  python -m xm_launch.launch --experiment=gin/experiments/main/pg19_t5_xl.gin ...
  # local rehearsal on this machine's CPU (tiny models, then the tables)
  python -m xm_launch.launch --sweep=main --size=tiny --task=local_books --local \
    --model_dir_root=/tmp/melodi_rehearsal

Runs land in `<model_dir_root>/<sweep>/<experiment>` (checkpoints, `eval/` reports); print the
tables with `python -m melodi_t5x.tools.paper_tables --sweep=... --model_dir_root=...`.
`--dry_run` prints every job (command line, gin files, bindings, accelerator, container) and
contacts nothing; `xmanager` is imported only for a real launch (requirements-xm.txt).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Sequence

from absl import app, flags

from melodi_t5x import experiments
from xm_launch import jobs as jobs_lib

_SWEEP = flags.DEFINE_string('sweep', None, f'one of {experiments.sweep_names()}')
_EXPERIMENT = flags.DEFINE_string('experiment', None, 'one committed experiment gin file')
_ROOT = flags.DEFINE_string('model_dir_root', None, 'runs go to <root>/<sweep>/<experiment>')
_ACCELERATOR = flags.DEFINE_enum('accelerator', 'v5e', sorted(jobs_lib.ACCELERATORS), 'TPU type')
_TOPOLOGY = flags.DEFINE_string('topology', None, 'TPU slice topology (default: 32 cores)')
_TIMING_TOPOLOGY = flags.DEFINE_string('timing_topology', None, 'slice of the timing jobs')
_EVAL = flags.DEFINE_bool('eval', True, 'add eval jobs on the final checkpoint of each run')
_EVAL_MODES = flags.DEFINE_list('eval_modes', list(experiments.MEMORY_MODES), 'memory modes')
_BINDINGS = flags.DEFINE_multi_string('binding', [], 'extra gin binding NAME=VALUE (all jobs)')
_SEED = flags.DEFINE_integer('seed', 0, 'RANDOM_SEED of the runs')
_TRAIN_STEPS = flags.DEFINE_integer('train_steps', None, 'override TRAIN_STEPS')
_SIZE = flags.DEFINE_enum('size', 'paper', sorted(experiments.SCALES), 'model size of the sweep')
_TASK = flags.DEFINE_string('task', None, 'task of a --size=tiny sweep (default local_books)')
_LOCAL = flags.DEFINE_bool('local', False, 'run the jobs here, one after another (CPU)')
_DRY_RUN = flags.DEFINE_bool('dry_run', False, 'print the jobs; contact nothing')
_IMAGE = flags.DEFINE_string('base_image', jobs_lib.BASE_IMAGE, 'base image of the job container')
_TITLE = flags.DEFINE_string('title', None, 'XManager experiment title (default melodi_<sweep>)')


def build_jobs() -> list[jobs_lib.JobSpec]:
  """The jobs described by the command-line flags."""
  accelerator = _ACCELERATOR.value
  topology = _TOPOLOGY.value or jobs_lib.ACCELERATORS[accelerator][1]
  timing_topology = _TIMING_TOPOLOGY.value or jobs_lib.TIMING_TOPOLOGY[accelerator]
  if not _LOCAL.value:
    jobs_lib.check_topology(accelerator, topology)
    if _SIZE.value != 'paper':
      raise ValueError(
        '--size=tiny runs exist only as files generated under the local model_dir_root; add '
        '--local (or use the committed paper-size sweeps on TPU).'
      )
  return jobs_lib.sweep_jobs(
    _ROOT.value,
    sweep=_SWEEP.value,
    experiment=_EXPERIMENT.value,
    size=_SIZE.value,
    task=_TASK.value,
    eval_modes=_EVAL_MODES.value if _EVAL.value else (),
    bindings=_BINDINGS.value,
    train_steps=_TRAIN_STEPS.value,
    seed=_SEED.value,
    topology='cpu' if _LOCAL.value else topology,
    timing_topology='cpu' if _LOCAL.value else timing_topology,
  )


def dry_run(jobs: Sequence[jobs_lib.JobSpec]) -> None:
  image = f'{_IMAGE.value} + container steps (xm_launch/jobs.py), entrypoint `python -m`'
  accelerator = 'local CPU' if _LOCAL.value else _ACCELERATOR.value
  dirs = {j.model_dir for j in jobs}
  print(f'{len(jobs)} jobs ({sum(j.kind == "train" for j in jobs)} train), {len(dirs)} run dirs')
  for job in jobs:
    print(jobs_lib.describe(job, accelerator, image))
  if not _LOCAL.value:
    print('\ncontainer steps:')
    for step in jobs_lib.container_steps(jobs_lib.project_dir_name()):
      print(f'  {step}')


# -- XManager ------------------------------------------------------------------------------------


def xm_container(xm, xm_local):  # pylint: disable=invalid-name
  """The packageable job image: this repository with the full stack (see container_steps)."""
  return xm.python_container(
    executor_spec=xm_local.Kubernetes.Spec(),
    path=jobs_lib.REPO_ROOT,
    base_image=_IMAGE.value,
    docker_instructions=jobs_lib.container_steps(jobs_lib.project_dir_name()),
    entrypoint=xm.CommandList([jobs_lib.ENTRYPOINT]),
  )


def xm_job(xm, xm_local, spec: jobs_lib.JobSpec, executable, accelerator: str):
  """An `xm.Job` for one spec: the image's `python -m` gets the module and its arguments."""
  resource = jobs_lib.ACCELERATORS[accelerator][0]
  requirements = xm.JobRequirements(**{resource: xm.Topology(spec.topology)})
  return xm.Job(
    executable=executable,
    executor=xm_local.Kubernetes(requirements=requirements),
    args=[spec.module, *spec.args],
    name=spec.name.replace('/', '-').replace('_', '-'),
  )


def launch_xm(jobs: Sequence[jobs_lib.JobSpec]) -> None:  # pragma: no cover - needs GCP
  """One work unit per training job; its eval jobs run in a second work unit that waits for it."""
  from xmanager import xm, xm_local  # pylint: disable=g-import-not-at-top

  accelerator = _ACCELERATOR.value
  title = _TITLE.value or f'melodi_{_SWEEP.value or "experiment"}'
  with xm_local.create_experiment(experiment_title=title) as experiment:
    [executable] = experiment.package([xm_container(xm, xm_local)])
    units = {}
    for spec in jobs:
      job = xm_job(xm, xm_local, spec, executable, accelerator)
      if spec.after is None:
        units[spec.name] = experiment.add(job)
        continue

      async def after(unit, job=job, before=units[spec.after], **kwargs):
        del kwargs
        await (await before).wait_until_complete()  # raises if that job failed
        await unit.add(job)

      experiment.add(after)


# -- local ---------------------------------------------------------------------------------------


def run_local(jobs: Sequence[jobs_lib.JobSpec]) -> list[str]:
  """Runs the jobs one after another here (writes tiny experiment files first).

  A failed job is reported and the jobs that wait for it are skipped; the others still run (their
  runs then show as missing in the tables). Returns the names of the failed and skipped jobs.
  """
  env = dict(os.environ)
  env['PYTHONPATH'] = os.pathsep.join([jobs_lib.REPO_ROOT, env.get('PYTHONPATH', '')])
  env.setdefault('JAX_PLATFORMS', 'cpu')
  exps = {}
  if _SWEEP.value and _SWEEP.value != 'timing':
    for exp in experiments.sweep(_SWEEP.value, size=_SIZE.value, dataset=_TASK.value):
      exps[jobs_lib.run_dir(_ROOT.value, exp)] = exp
  failed = []
  for job in jobs:
    if job.after in failed:
      print(f'[{job.name}] skipped: {job.after} failed', flush=True)
      failed.append(job.name)
      continue
    os.makedirs(job.model_dir, exist_ok=True)
    exp = exps.get(job.model_dir)
    if exp is not None and _SIZE.value != 'paper':
      with open(os.path.join(job.model_dir, 'experiment.gin'), 'w') as f:
        f.write(experiments.render(exp))
    # Timing jobs share one directory: their logs are named by model and step.
    stem = (
      job.name.split('/', 1)[1].replace('/', '_') if job.kind.startswith('timing_') else job.kind
    )
    log = os.path.join(job.model_dir, f'{stem}.log')
    tick = time.time()
    print(f'[{job.name}] {job.shell()}\n  log: {log}', flush=True)
    cmd = [sys.executable, *job.command[1:]]
    with open(log, 'w') as out:
      rc = subprocess.run(cmd, cwd=jobs_lib.REPO_ROOT, env=env, stdout=out, stderr=out).returncode
    print(f'  rc={rc} in {time.time() - tick:.0f} s', flush=True)
    if rc:
      errors = [line for line in open(log) if 'Error' in line][-3:]
      print(f'  FAILED; last errors in {log}:\n    ' + '    '.join(errors), flush=True)
      failed.append(job.name)
  return failed


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  jobs = build_jobs()
  if _DRY_RUN.value:
    dry_run(jobs)
  elif _LOCAL.value:
    failed = run_local(jobs)
    if _SWEEP.value:
      from melodi_t5x.tools import paper_tables  # pylint: disable=g-import-not-at-top

      argv = [f'--sweep={_SWEEP.value}', f'--model_dir_root={_ROOT.value}']
      argv += [f'--size={_SIZE.value}'] + ([f'--task={_TASK.value}'] if _TASK.value else [])
      if _TRAIN_STEPS.value:
        argv.append(f'--train_steps={_TRAIN_STEPS.value}')
      paper_tables.main(argv)
    if failed:
      raise SystemExit(f'{len(failed)} jobs failed or were skipped: {failed}')
  else:
    launch_xm(jobs)


if __name__ == '__main__':
  app.run(main)
