"""The launcher's jobs: the suite's jobs (`melodi_t5x.jobs`), the data stage, image and plans.

`sweep_jobs` gives every job of a sweep as `JobSpec`s, the steps of the step runner
(`xm_launch.steps`): the experiment suite's train and eval jobs and the `timing` sweep's benchmark
jobs come from `melodi_t5x.jobs` (which the TPU compile check reads too, without importing the
launcher); the `prepare` sweep gives the data stage of one task (`tasks.prepare`). Steps with the
same `group` form one JobSet (`xm_launch.gke`), or one chain of `--local`. `dockerfile` is the job
image: the pinned PyPI stack, T5X at its pinned commits, a TPU jax, the Cloud SDK (T5X moves
checkpoints on GCS with `gcloud storage mv`), this repository.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

from melodi_t5x import experiments
from melodi_t5x import jobs as suite_jobs

# The suite's job enumeration: the launcher's modules read it through this one.
from melodi_t5x.jobs import (  # noqa: F401
  ACCELERATORS,
  TIMING_TOPOLOGY,
  JobSpec,
  groups,
  parse_seeds,
  run_dir,
  sweep_tasks,
)
from xm_launch import steps as steps_lib

REPO_ROOT = experiments.REPO_ROOT
# Training batch of the paper's runs (one row per core of a 32-core slice).
PAPER_BATCH = 32

# The job image: Python 3.11, the pinned stack, T5X at its pinned commits (--no-deps, see
# docs/t5x.md), the TPU build of the same jax, the Cloud SDK, this repository installed in place.
# The build context is the committed tree (`git archive`), so the image is the commit it is tagged.
BASE_IMAGE = 'python:3.11-slim'
WORKDIR = '/workdir/melodi-t5x'
_CLOUD_SDK_APT = (
  'curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg '
  '| gpg --dearmor -o /usr/share/keyrings/cloud.google.gpg '
  '&& echo "deb [signed-by=/usr/share/keyrings/cloud.google.gpg] '
  'https://packages.cloud.google.com/apt cloud-sdk main" '
  '> /etc/apt/sources.list.d/google-cloud-sdk.list'
)


def container_steps() -> list[str]:
  """Docker instructions of the job image after FROM; the build context is the repository."""
  return [
    'ENV LANG=C.UTF-8 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1',
    'RUN apt-get update && apt-get install -y --no-install-recommends git curl gnupg '
    f'ca-certificates && {_CLOUD_SDK_APT} && apt-get update '
    '&& apt-get install -y --no-install-recommends google-cloud-cli '
    '&& rm -rf /var/lib/apt/lists/*',
    f'WORKDIR {WORKDIR}',
    'COPY requirements.txt requirements-t5x.txt requirements-tpu.txt ./',
    'RUN python -m pip install -r requirements.txt',
    'RUN python -m pip install --no-deps -r requirements-t5x.txt',
    'RUN python -m pip install -r requirements-tpu.txt',
    'COPY . ./',
    'RUN python -m pip install --no-deps -e .',
    'RUN python -c "import t5x.train, t5x.eval, melodi_t5x.t5x_model, tasks, xm_launch.steps, '
    'xm_launch.runner"',
    f'ENV PYTHONPATH={WORKDIR}',
  ]


def dockerfile(base_image: str = BASE_IMAGE) -> str:
  """The Dockerfile of the job image."""
  return '\n'.join([f'FROM {base_image}', *container_steps()]) + '\n'


# Splits a sweep reads: train (training), validation (train-eval), test (eval).
SPLITS = ('train', 'validation', 'test')


def prepare_jobs(
  task: str,
  prepared_root: str,
  *,
  workers: int = 1,
  bindings: Sequence[str] = (),
  splits: Sequence[str] = SPLITS,
  topology: str = '',
) -> list[JobSpec]:
  """The data stage of a task: `tasks.prepare` of each split by `workers` pods, then the merge.

  With one worker each split is one step. With K workers, pod i writes its part of every split
  (`worker-<i>-of-<K>/done.json`), then pod 0 waits for all parts and merges them (`meta.json`).
  A step is skipped when its part or the finished split exists. Only `tasks.*` bindings are passed
  (`--gin_bindings`), the settings of the task.
  """
  if not prepared_root:
    raise ValueError('--sweep=prepare needs a prepared root (--prepared_root or --model_dir_root).')
  from tasks import config as tasks_config  # pylint: disable=g-import-not-at-top

  if task not in tasks_config.CONFIG_CLASSES:
    raise ValueError(f'--task={task!r}: prepare one of {sorted(tasks_config.CONFIG_CLASSES)}.')
  split = PrepareSplit(
    task=task,
    root=prepared_root.rstrip('/'),
    workers=workers,
    params=tuple(f'--gin_bindings={b}' for b in bindings if b.startswith('tasks.')),
    topology=topology,
  )
  jobs, finals = [], []
  for name in splits:
    if workers == 1:
      jobs.append(split.single_job(name))
    else:
      jobs.append(split.part_job(name))
      finals.append(split.finalize_job(name))
  return jobs + finals


@dataclasses.dataclass(frozen=True)
class PrepareSplit:
  """The steps that prepare one split of a task (`prepare_jobs`)."""

  # Task name (a key of `tasks.config.CONFIG_CLASSES`).
  task: str
  # Prepared root, without a trailing slash; a split goes to `<root>/<task>/<split>`.
  root: str
  # Pods that write a part each (1: one step writes the whole split).
  workers: int
  # `--gin_bindings=tasks.*` flags passed to every step.
  params: tuple[str, ...]
  # Accelerator topology of the steps.
  topology: str

  @property
  def group(self) -> str:
    return f'prepare/{self.task}'

  def folder(self, split: str) -> str:
    return f'{self.root}/{self.task}/{split}'

  def _flags(self, split: str) -> tuple[str, ...]:
    return (f'--task={self.task}', f'--split={split}', f'--out={self.root}')

  def _job(self, split: str, **fields) -> JobSpec:
    return JobSpec(
      module='tasks.prepare',
      model_dir=self.folder(split),
      topology=self.topology,
      group=self.group,
      distributed=False,
      **fields,
    )

  def single_job(self, split: str) -> JobSpec:
    """One step writes the whole split."""
    return self._job(
      split,
      name=f'{self.group}/{split}',
      kind=f'prepare_{split}',
      flags=(*self._flags(split), *self.params),
      output=f'{self.folder(split)}/meta.json',
    )

  def part_job(self, split: str) -> JobSpec:
    """Every pod writes its part (`{worker}` is the pod index; skipped once the split is done)."""
    workers = f'--num_workers={self.workers}'
    part = f'worker-{steps_lib.WORKER_05D}-of-{self.workers:05d}'
    return self._job(
      split,
      name=f'{self.group}/{split}/part',
      kind=f'prepare_{split}',
      flags=(*self._flags(split), workers, f'--worker={steps_lib.WORKER}', *self.params),
      output=f'{self.folder(split)}/{part}/done.json',
      done_if=f'{self.folder(split)}/meta.json',
    )

  def finalize_job(self, split: str) -> JobSpec:
    """Pod 0 waits for every part, then merges them (`meta.json`)."""
    folder = self.folder(split)
    parts = [
      f'{folder}/worker-{w:05d}-of-{self.workers:05d}/done.json' for w in range(self.workers)
    ]
    return self._job(
      split,
      name=f'{self.group}/{split}/finalize',
      kind=f'finalize_{split}',
      flags=(*self._flags(split), f'--num_workers={self.workers}', '--finalize', *self.params),
      output=f'{folder}/meta.json',
      worker=0,
      wait_for=tuple(parts),
      after=f'{self.group}/{split}/part',
    )


def sweep_jobs(
  root: str,
  *,
  sweep: str | None = None,
  experiment: str | None = None,
  task: str | None = None,
  bindings: Sequence[str] = (),
  seeds: Sequence[int] = (0,),
  topology: str = '',
  prepared_root: str | None = None,
  prepare_workers: int = 1,
  **suite,
) -> list[JobSpec]:
  """Every job of a sweep (or of one committed experiment file), in launch order.

  The `prepare` sweep writes the prepared splits of `task` to `prepared_root` with
  `prepare_workers` workers (`prepare_jobs`); every other sweep is the suite's
  (`melodi_t5x.jobs.sweep_jobs`, which takes the remaining arguments: size, eval modes, train
  steps, timing topology).
  """
  if sweep != 'prepare':
    return suite_jobs.sweep_jobs(
      root,
      sweep=sweep,
      experiment=experiment,
      task=task,
      bindings=bindings,
      seeds=seeds,
      topology=topology,
      prepared_root=prepared_root,
      **suite,
    )
  suite_jobs.check_request(root, sweep, experiment, seeds)
  if not task:
    raise ValueError('--sweep=prepare needs --task (e.g. --task=pg19_t5).')
  return prepare_jobs(
    task, prepared_root or '', workers=prepare_workers, bindings=bindings, topology=topology
  )


def step(job: JobSpec) -> steps_lib.Step:
  """The step runner's view of a job."""
  return steps_lib.Step(
    name=job.kind,
    module=job.module,
    args=tuple(job.args),
    output=job.output,
    done_if=job.done_if,
    distributed=job.distributed,
    worker=job.worker,
    wait_for=job.wait_for,
  )


def plan(group: str, jobs: Sequence[JobSpec]) -> steps_lib.Plan:
  """The step runner's plan of one JobSet."""
  return steps_lib.Plan(name=group, steps=tuple(step(j) for j in jobs))


def check_topology(accelerator: str, topology: str, batch: int = PAPER_BATCH) -> int:
  """Chips of `topology`; raises if the accelerator is unknown or the chips do not divide batch."""
  if accelerator not in ACCELERATORS:
    raise ValueError(f'accelerator={accelerator!r}: must be one of {sorted(ACCELERATORS)}.')
  if not re.fullmatch(r'\d+(x\d+)*', topology or ''):
    raise ValueError(f'topology={topology!r}: expected e.g. 4x8 or 2x2x4.')
  chips = 1
  for d in topology.split('x'):
    chips *= int(d)
  if batch % chips:
    raise ValueError(
      f'topology {topology} has {chips} chips, which do not divide the batch of {batch} rows; '
      'use a slice whose chip count divides it (e.g. v5e/v6e 4x8, v4/v5p 2x2x4).'
    )
  return chips


def describe(job: JobSpec, accelerator: str, image: str) -> str:
  """The dry-run text of one job."""
  lines = [f'[{job.name}]']
  if job.after:
    lines.append(f'  after:       {job.after} (final checkpoint)')
  lines.append(f'  accelerator: {accelerator} {job.topology}')
  lines.append(f'  container:   {image}')
  lines.append(f'  model_dir:   {job.model_dir}')
  for g in job.gin_files:
    lines.append(f'  gin_file:    {g}')
  for b in job.bindings:
    lines.append(f'  binding:     {b}')
  lines.append(f'  command:     {job.shell()}')
  return '\n'.join(lines)
