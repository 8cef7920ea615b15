"""Job specifications of the experiment suite (plain Python, no cloud library).

`sweep_jobs` turns a sweep (or one experiment file) into `JobSpec`s, the steps of the step runner
(`xm_launch.steps`): per experiment (and seed) one `t5x.train` step and, optionally, one `t5x.eval`
step per memory mode on the final checkpoint, all under `<model_dir_root>/<sweep>/<experiment>`;
the `timing` sweep gives one benchmark step per model and step kind; the `prepare` sweep the data
stage of one task (`tasks.prepare`). Steps with the same `group` form one JobSet
(`xm_launch.gke`), or one chain of `--local`. `dockerfile` is the job image: the pinned PyPI stack,
T5X at its pinned commits, a TPU jax, the Cloud SDK (T5X moves checkpoints on GCS with
`gcloud storage mv`), this repository.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
from collections.abc import Sequence

from melodi_t5x import experiments
from xm_launch import steps as steps_lib

REPO_ROOT = experiments.REPO_ROOT
# Accelerator flag -> default topology of a 32-core slice. v4 and v5p chips have two TensorCores
# each (megacore): 16 chips = 32 cores.
ACCELERATORS = {'v4': '2x2x4', 'v5e': '4x8', 'v5p': '2x2x4', 'v6e': '4x8'}
# One host's worth of chips for the timing benchmark (it times one device).
TIMING_TOPOLOGY = {'v4': '2x2x1', 'v5e': '1x1', 'v5p': '2x2x1', 'v6e': '1x1'}
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
    'RUN python -c "import t5x.train, t5x.eval, melodi_t5x.t5x_model, tasks, xm_launch.steps"',
    f'ENV PYTHONPATH={WORKDIR}',
  ]


def dockerfile(base_image: str = BASE_IMAGE) -> str:
  """The Dockerfile of the job image."""
  return '\n'.join([f'FROM {base_image}', *container_steps()]) + '\n'


@dataclasses.dataclass(frozen=True)
class JobSpec:
  """One step of a JobSet: `python -m <module> <args>`, skipped when `output` exists."""

  # Unique name: '<sweep>/<experiment>[/seed<N>]/<kind>'.
  name: str
  # 'train', 'eval_carried', 'eval_reset', 'timing_<step>', 'prepare_<split>[_w<i>]',
  # 'finalize_<split>'.
  kind: str
  # Python module run with `python -m`.
  module: str
  # Gin files, in order (mode file first).
  gin_files: tuple[str, ...] = ()
  # Gin bindings 'NAME=VALUE' (VALUE in gin syntax), passed as --gin.NAME=VALUE.
  bindings: tuple[str, ...] = ()
  # Other command-line flags.
  flags: tuple[str, ...] = ()
  # The run's folder (checkpoints, eval reports, benchmark JSON).
  model_dir: str = ''
  # Name of the job that must have finished before this one starts (None: none).
  after: str | None = None
  # Accelerator topology of the job (e.g. '4x8').
  topology: str = ''
  # The file whose existence means this step is done (the step runner skips it).
  output: str = ''
  # Also done when this file exists.
  done_if: str = ''
  # The JobSet (one per experiment and seed) that runs this step: '<sweep>/<experiment>[/seed<N>]'.
  group: str = ''
  # A JAX step (calls jax.distributed.initialize() on a multi-host slice).
  distributed: bool = True
  # Only the pod of this index runs it (None: every pod).
  worker: int | None = None
  # Files the step waits for before it runs.
  wait_for: tuple[str, ...] = ()

  @property
  def args(self) -> list[str]:
    out = [f'--gin_file={g}' for g in self.gin_files]
    out += [f'--gin.{b}' for b in self.bindings]
    return out + list(self.flags)

  @property
  def command(self) -> list[str]:
    return ['python', '-m', self.module, *self.args]

  def shell(self) -> str:
    return shlex.join(self.command)

  def step(self) -> steps_lib.Step:
    """The step runner's view of this job."""
    return steps_lib.Step(
      name=self.kind,
      module=self.module,
      args=tuple(self.args),
      output=self.output,
      done_if=self.done_if,
      distributed=self.distributed,
      worker=self.worker,
      wait_for=self.wait_for,
    )


def gin_string(value: str) -> str:
  """A string as a double-quoted gin literal (shell-friendly), e.g. MODEL_DIR="gs://b/x"."""
  return json.dumps(str(value))


def run_dir(root: str, exp: experiments.Experiment) -> str:
  """The experiment's folder: `<root>/<sweep>/<experiment>` (replicates in `seed<N>/` below)."""
  return f'{root.rstrip("/")}/{exp.sweep}/{exp.name}'


def model_dir(
  root: str, exp: experiments.Experiment, seed: int = 0, replicated: bool = False
) -> str:
  """MODEL_DIR of one run: the experiment's folder, or `<folder>/seed<N>` for replicates."""
  base = run_dir(root, exp)
  return f'{base}/seed{seed}' if replicated else base


def checkpoint_marker(model_dir_: str, steps: int) -> str:
  """The file that marks a finished checkpoint: Orbax's `checkpoint_<N>/commit_success.txt`.

  T5X saves through Orbax, which writes it into a finalized checkpoint (before the atomic rename
  on local disks; last on GCS, where renames are not atomic).
  """
  return f'{model_dir_}/checkpoint_{steps}/commit_success.txt'


def legacy_checkpoint_marker(model_dir_: str, steps: int) -> str:
  """The same for T5X's legacy checkpointer: the msgpack file it writes last."""
  return f'{model_dir_}/checkpoint_{steps}/checkpoint'


def eval_report(model_dir_: str, task: str, steps: int, mode: str) -> str:
  """The eval report `t5x.eval` writes (melodi_t5x.t5x_eval.report_path)."""
  return f'{model_dir_}/eval/{task}_step{steps}_{mode}.json'


def prepared_binding(prepared_root: str | None) -> tuple[str, ...]:
  """The gin binding that makes training and evaluation read prepared splits ('' : on the fly)."""
  if not prepared_root:
    return ()
  return (f'tasks.PreparedDataConfig.root={gin_string(prepared_root.rstrip("/"))}',)


def experiment_jobs(
  exp: experiments.Experiment,
  root: str,
  *,
  gin_file: str | None = None,
  eval_modes: Sequence[str] = experiments.MEMORY_MODES,
  bindings: Sequence[str] = (),
  train_steps: int | None = None,
  seed: int = 0,
  replicated: bool = False,
  topology: str = '',
  prepared_root: str | None = None,
) -> list[JobSpec]:
  """Train job (+ one eval job per memory mode on the final checkpoint) of one experiment.

  `replicated` (several seeds, or a seed other than 0): the run goes to `<run dir>/seed<N>` and
  binds RANDOM_SEED and DATA_SEED to the seed; otherwise `<run dir>` with RANDOM_SEED=seed.
  """
  mdir = model_dir(root, exp, seed, replicated)
  gin_file = gin_file or exp.path
  steps = train_steps or exp.train_steps
  extra = [*prepared_binding(prepared_root), *bindings]
  if train_steps:
    extra.append(f'TRAIN_STEPS={train_steps}')
  seeds = (f'RANDOM_SEED={seed}', f'DATA_SEED={seed}') if replicated else (f'RANDOM_SEED={seed}',)
  base = f'{exp.sweep}/{exp.name}' + (f'/seed{seed}' if replicated else '')
  train = JobSpec(
    name=f'{base}/train',
    kind='train',
    module='t5x.train',
    gin_files=(experiments.TRAIN_MODE_GIN, gin_file),
    bindings=(f'MODEL_DIR={gin_string(mdir)}', *seeds, *extra),
    flags=('--alsologtostderr',),
    model_dir=mdir,
    topology=topology,
    output=checkpoint_marker(mdir, steps),
    done_if=legacy_checkpoint_marker(mdir, steps),
    group=base,
  )
  jobs = [train]
  for mode in eval_modes:
    if mode not in experiments.MEMORY_MODES:
      raise ValueError(f'eval mode {mode!r}: must be one of {experiments.MEMORY_MODES}.')
    jobs.append(
      JobSpec(
        name=f'{base}/eval_{mode}',
        kind=f'eval_{mode}',
        module='t5x.eval',
        gin_files=(experiments.EVAL_MODE_GIN, gin_file),
        bindings=(
          f'CHECKPOINT_PATH={gin_string(f"{mdir}/checkpoint_{steps}")}',
          f'EVAL_OUTPUT_DIR={gin_string(f"{mdir}/eval")}',
          f'MEMORY_MODE={gin_string(mode)}',
          *extra,
        ),
        flags=('--alsologtostderr',),
        model_dir=mdir,
        after=train.name,
        topology=topology,
        output=eval_report(mdir, exp.dataset, steps, mode),
        group=base,
      )
    )
  return jobs


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
  (`--gin_param`), the settings of the task.
  """
  if not prepared_root:
    raise ValueError('--sweep=prepare needs a prepared root (--prepared_root or --model_dir_root).')
  from tasks import config as tasks_config  # pylint: disable=g-import-not-at-top

  if task not in tasks_config.CONFIG_CLASSES:
    raise ValueError(f'--task={task!r}: prepare one of {sorted(tasks_config.CONFIG_CLASSES)}.')
  root = prepared_root.rstrip('/')
  params = tuple(f'--gin_param={b}' for b in bindings if b.startswith('tasks.'))
  group = f'prepare/{task}'
  jobs, finals = [], []
  for split in splits:
    folder = f'{root}/{task}/{split}'
    meta = f'{folder}/meta.json'
    base = ('--task', task, '--split', split, '--out', root)
    if workers == 1:
      jobs.append(
        JobSpec(
          name=f'{group}/{split}',
          kind=f'prepare_{split}',
          module='tasks.prepare',
          flags=(*(f'{k}={v}' for k, v in zip(base[::2], base[1::2])), *params),
          model_dir=folder,
          topology=topology,
          output=meta,
          group=group,
          distributed=False,
        )
      )
      continue
    parts = [f'{folder}/worker-{w:05d}-of-{workers:05d}/done.json' for w in range(workers)]
    flags = (
      *(f'{k}={v}' for k, v in zip(base[::2], base[1::2])),
      f'--num_workers={workers}',
    )
    jobs.append(
      JobSpec(
        name=f'{group}/{split}/part',
        kind=f'prepare_{split}',
        module='tasks.prepare',
        flags=(*flags, f'--worker={steps_lib.WORKER}', *params),
        model_dir=folder,
        topology=topology,
        output=f'{folder}/worker-{steps_lib.WORKER_05D}-of-{workers:05d}/done.json',
        done_if=meta,
        group=group,
        distributed=False,
      )
    )
    finals.append(
      JobSpec(
        name=f'{group}/{split}/finalize',
        kind=f'finalize_{split}',
        module='tasks.prepare',
        flags=(*flags, '--finalize', *params),
        model_dir=folder,
        topology=topology,
        output=meta,
        group=group,
        distributed=False,
        worker=0,
        wait_for=tuple(parts),
        after=f'{group}/{split}/part',
      )
    )
  return jobs + finals


# The paper's timing runs use 12-layer models (the paper's timing table); at the tiny size the
# model files' layers.
_TIMING_LAYERS = {'paper': 12}


def timing_flags(model: str, size: str = 'paper') -> list[str]:
  """Benchmark flags of a timed model: the gin files and settings of its main-table experiment
  (model files, data file, the grid point's bindings), as `t5x.train` reads them, at the paper's
  timing depth (12 layers) or the tiny size; the segment is the run's."""
  scale = experiments.SCALES[size]
  dataset = None if size == 'paper' else 'local_books'
  exp = next(e for e in experiments.sweep('main', size, dataset) if e.model == model)
  flags = []
  for path in (*exp.model_gins, f'{experiments.EXPERIMENTS_DIR}/data/{exp.dataset}.gin'):
    flags += ['--gin_file', path]
  bindings = list(exp.config_bindings())
  if size in _TIMING_LAYERS:
    bindings.append(f'NUM_LAYERS = {_TIMING_LAYERS[size]}')
  for binding in bindings:
    flags += ['--gin', binding]
  flags += ['--segment-length', str(scale.segment)]
  if size != 'paper':
    flags += ['--compile-windows', '']
  return flags


def timing_jobs(root: str, topology: str = '', size: str = 'paper') -> list[JobSpec]:
  """One benchmark job per timed model and step kind (train step, eval step), JSON in root."""
  jobs = []
  for model in experiments.TIMING_MODELS:
    for step in experiments.TIMING_STEPS:
      out = f'{root.rstrip("/")}/timing/{model}_{step}.json'
      jobs.append(
        JobSpec(
          name=f'timing/{model}/{step}',
          kind=f'timing_{step}',
          module='melodi_t5x.tools.bench',
          flags=(*timing_flags(model, size), '--step', step, '--json', out),
          model_dir=f'{root.rstrip("/")}/timing',
          topology=topology,
          output=out,
          group='timing',
          distributed=False,
        )
      )
  return jobs


def parse_seeds(text: str | Sequence[int]) -> tuple[int, ...]:
  """`--seeds=0,1,2` -> (0, 1, 2): distinct non-negative integers."""
  items = text.split(',') if isinstance(text, str) else list(text)
  try:
    seeds = tuple(int(str(x).strip()) for x in items if str(x).strip())
  except ValueError:
    raise ValueError(f'--seeds={text!r}: expected comma-separated integers, e.g. 0,1,2.') from None
  if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
    raise ValueError(f'--seeds={text!r}: give distinct non-negative integers, e.g. 0,1,2.')
  return seeds


def sweep_jobs(
  root: str,
  *,
  sweep: str | None = None,
  experiment: str | None = None,
  size: str = 'paper',
  task: str | None = None,
  eval_modes: Sequence[str] = experiments.MEMORY_MODES,
  bindings: Sequence[str] = (),
  train_steps: int | None = None,
  seeds: Sequence[int] = (0,),
  topology: str = '',
  timing_topology: str = '',
  prepared_root: str | None = None,
  prepare_workers: int = 1,
) -> list[JobSpec]:
  """Every job of a sweep (or of one committed experiment file), in launch order.

  Experiments of size 'tiny' have no committed file: their gin file is
  `<run dir>/experiment.gin`, written by the local runner (`experiments.render`). With several
  seeds (or one other than 0) every experiment has one replicate per seed in `<run dir>/seed<N>`.
  `prepared_root` (None: read on the fly) is bound as `tasks.PreparedDataConfig.root`. The
  `prepare` sweep writes the prepared splits of `task` there with `prepare_workers` workers.
  """
  if not root:
    raise ValueError('model_dir_root is required (e.g. gs://bucket/melodi or /tmp/rehearsal).')
  if bool(sweep) == bool(experiment):
    raise ValueError('give exactly one of --sweep and --experiment.')
  seeds = parse_seeds(seeds)
  replicated = seeds != (0,)
  if sweep == 'prepare':
    if not task:
      raise ValueError('--sweep=prepare needs --task (e.g. --task=pg19_t5).')
    return prepare_jobs(
      task, prepared_root or '', workers=prepare_workers, bindings=bindings, topology=topology
    )
  if experiment:
    if size != 'paper' or task:
      raise ValueError('--experiment runs a committed file: --size and --task do not apply.')
    exps = [experiments.find_experiment(experiment)]
  elif sweep == 'timing':
    if task:
      raise ValueError('--task does not apply to the timing sweep (it runs on synthetic tokens).')
    if replicated:
      raise ValueError('--seeds does not apply to the timing sweep.')
    return timing_jobs(root, timing_topology, size)
  else:
    exps = experiments.sweep(sweep, size=size, dataset=task if size != 'paper' else None)
    if size == 'paper' and task:
      raise ValueError('--task applies to --size=tiny (the paper sweeps fix their datasets).')
  jobs = []
  for exp in exps:
    gin_file = None if size == 'paper' else f'{run_dir(root, exp)}/experiment.gin'
    for seed in seeds:
      jobs += experiment_jobs(
        exp,
        root,
        gin_file=gin_file,
        eval_modes=eval_modes,
        bindings=bindings,
        train_steps=train_steps,
        seed=seed,
        replicated=replicated,
        topology=topology,
        prepared_root=prepared_root,
      )
  return jobs


def sweep_tasks(sweep: str | None, experiment: str | None, size: str = 'paper') -> list[str]:
  """The seqio tasks a sweep trains and evaluates on (none for timing and prepare)."""
  if experiment:
    return [experiments.find_experiment(experiment).dataset]
  if sweep in ('timing', 'prepare', None) or size != 'paper':
    return []
  return sorted({exp.dataset for exp in experiments.sweep(sweep)})


def groups(jobs: Sequence[JobSpec]) -> dict[str, list[JobSpec]]:
  """The jobs by JobSet (`JobSpec.group`), in launch order."""
  out: dict[str, list[JobSpec]] = {}
  for job in jobs:
    out.setdefault(job.group, []).append(job)
  return out


def plan(group: str, jobs: Sequence[JobSpec]) -> steps_lib.Plan:
  """The step runner's plan of one JobSet."""
  return steps_lib.Plan(name=group, steps=tuple(j.step() for j in jobs))


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
