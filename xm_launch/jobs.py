"""Job specifications of the experiment suite, independent of XManager (plain Python).

`sweep_jobs` turns a sweep (or one experiment file) into `JobSpec`s: per experiment one
`t5x.train` job and, optionally, one `t5x.eval` job per memory mode on the final checkpoint, all
under `<model_dir_root>/<sweep>/<experiment>`; the `timing` sweep gives one benchmark job per model
and step kind. `CONTAINER_STEPS` are the Docker instructions of the job image: the pinned PyPI
stack, T5X at its pinned commits, a TPU jax, this repository. `xm_launch.launch` prints the specs
(`--dry_run`), converts them to `xmanager` jobs, or runs them on this machine (`--local`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
from collections.abc import Sequence

from melodi_t5x import experiments

REPO_ROOT = experiments.REPO_ROOT
# Accelerator flag -> (xmanager resource name, default topology of a 32-core slice). v4 and v5p
# chips have two TensorCores each (megacore): 16 chips = 32 cores.
ACCELERATORS = {
  'v4': ('tpu_v4', '2x2x4'),
  'v5e': ('tpu_v5e', '4x8'),
  'v5p': ('tpu_v5p', '2x2x4'),
  'v6e': ('tpu_v6e', '4x8'),
}
# One host's worth of chips for the timing benchmark (it times one device).
TIMING_TOPOLOGY = {'v4': '2x2x1', 'v5e': '1x1', 'v5p': '2x2x1', 'v6e': '1x1'}
# Training batch of the paper's runs (one row per core of a 32-core slice).
PAPER_BATCH = 32

# The job image: Python 3.11, the pinned stack, T5X at its pinned commits (--no-deps, see
# docs/t5x.md), the TPU build of the same jax, this repository installed in place.
BASE_IMAGE = 'python:3.11-slim'
WORKDIR = '/workdir/melodi-t5x'


def container_steps(project_dir_name: str) -> list[str]:
  """Docker instructions of the job image; the build context is the repository's parent."""
  return [
    'ENV LANG=C.UTF-8 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1',
    'RUN apt-get update && apt-get install -y --no-install-recommends git netcat-openbsd '
    '&& rm -rf /var/lib/apt/lists/*',
    f'WORKDIR {WORKDIR}',
    f'COPY {project_dir_name}/requirements.txt {project_dir_name}/requirements-t5x.txt '
    f'{project_dir_name}/requirements-tpu.txt ./',
    'RUN python -m pip install -r requirements.txt',
    'RUN python -m pip install --no-deps -r requirements-t5x.txt',
    'RUN python -m pip install -r requirements-tpu.txt',
    f'COPY {project_dir_name}/ ./',
    'RUN python -m pip install --no-deps -e .',
    'RUN python -c "import t5x.train, t5x.eval, melodi_t5x.t5x_model, tasks"',
    f'ENV PYTHONPATH={WORKDIR}',
  ]


# Every job runs `python -m <module> <args>`: one image serves all of them.
ENTRYPOINT = 'python -m'


@dataclasses.dataclass(frozen=True)
class JobSpec:
  """One job: `python -m <module> <args>` on an accelerator slice."""

  # Unique name: '<sweep>/<experiment>/<kind>'.
  name: str
  # 'train', 'eval_carried', 'eval_reset' or 'timing_<step>'.
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


def gin_string(value: str) -> str:
  """A string as a double-quoted gin literal (shell-friendly), e.g. MODEL_DIR="gs://b/x"."""
  return json.dumps(str(value))


def run_dir(root: str, exp: experiments.Experiment) -> str:
  return f'{root.rstrip("/")}/{exp.sweep}/{exp.name}'


def experiment_jobs(
  exp: experiments.Experiment,
  root: str,
  *,
  gin_file: str | None = None,
  eval_modes: Sequence[str] = experiments.MEMORY_MODES,
  bindings: Sequence[str] = (),
  train_steps: int | None = None,
  seed: int = 0,
  topology: str = '',
) -> list[JobSpec]:
  """Train job (+ one eval job per memory mode on the final checkpoint) of one experiment."""
  model_dir = run_dir(root, exp)
  gin_file = gin_file or exp.path
  steps = train_steps or exp.train_steps
  extra = list(bindings)
  if train_steps:
    extra.append(f'TRAIN_STEPS={train_steps}')
  base = f'{exp.sweep}/{exp.name}'
  train = JobSpec(
    name=f'{base}/train',
    kind='train',
    module='t5x.train',
    gin_files=(experiments.TRAIN_MODE_GIN, gin_file),
    bindings=(f'MODEL_DIR={gin_string(model_dir)}', f'RANDOM_SEED={seed}', *extra),
    flags=('--alsologtostderr',),
    model_dir=model_dir,
    topology=topology,
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
          f'CHECKPOINT_PATH={gin_string(f"{model_dir}/checkpoint_{steps}")}',
          f'EVAL_OUTPUT_DIR={gin_string(f"{model_dir}/eval")}',
          f'MEMORY_MODE={gin_string(mode)}',
          *extra,
        ),
        flags=('--alsologtostderr',),
        model_dir=model_dir,
        after=train.name,
        topology=topology,
      )
    )
  return jobs


# The tiny CPU models of gin/models/*_tiny.gin (d=64, 2 heads of 32, MLP 256, fp32) as bench flags.
_TINY_BENCH_FLAGS = (
  *('--embed-dim', '64', '--num-heads', '2', '--head-dim', '32', '--mlp-dim', '256'),
  *('--vocab-size', '4096', '--dtype', 'float32', '--memory-size', '1024', '--num-states', '32'),
  *('--memory-layer-index', '0', '--recurrent-layer-index', '0', '--compile-windows', ''),
)
# Long-term FIFO of the MELODI models, in windows (paper: 128; gin/models/melodi_tiny.gin: 16).
_FIFO_WINDOWS = {'paper': 128, 'tiny': 16}


def timing_flags(model: str, size: str = 'paper') -> list[str]:
  """Benchmark flags of a timed model: the paper's timing size (12 layers, d=1024) or tiny."""
  spec = experiments.MODELS[model]
  scale = experiments.SCALES[size]
  family = {'MelodiConfig': 'melodi', 'XLConfig': 'xl', 'MemorizingConfig': 'memorizing'}.get(
    spec.config_class, 'brt'
  )
  layers = 12 if size == 'paper' else scale.num_layers
  flags = ['--model', family, '--num-layers', str(layers)]
  if size != 'paper':
    flags += [*_TINY_BENCH_FLAGS, '--window-length', str(scale.window)]
    flags += ['--segment-length', str(scale.segment)]
    flags += ['--long-term-memory-layer', str(scale.long_term_layer)]
  if spec.melodi_memory:
    s, inc = (scale.tokens(t) for t in spec.melodi_memory)
    flags += ['--summary-size', str(s), '--short-term-memory-size', str(s)]
    flags += ['--long-term-memory-increment-size', str(inc)]
    flags += ['--long-term-memory-size', str(_FIFO_WINDOWS[size] * inc)]
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
        )
      )
  return jobs


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
  seed: int = 0,
  topology: str = '',
  timing_topology: str = '',
) -> list[JobSpec]:
  """Every job of a sweep (or of one committed experiment file), in launch order.

  Experiments of size 'tiny' have no committed file: their gin file is
  `<run dir>/experiment.gin`, written by the local runner (`experiments.render`).
  """
  if not root:
    raise ValueError('model_dir_root is required (e.g. gs://bucket/melodi or /tmp/rehearsal).')
  if bool(sweep) == bool(experiment):
    raise ValueError('give exactly one of --sweep and --experiment.')
  if experiment:
    if size != 'paper' or task:
      raise ValueError('--experiment runs a committed file: --size and --task do not apply.')
    exps = [experiments.find_experiment(experiment)]
  elif sweep == 'timing':
    if task:
      raise ValueError('--task does not apply to the timing sweep (it runs on synthetic tokens).')
    return timing_jobs(root, timing_topology, size)
  else:
    exps = experiments.sweep(sweep, size=size, dataset=task if size != 'paper' else None)
    if size == 'paper' and task:
      raise ValueError('--task applies to --size=tiny (the paper sweeps fix their datasets).')
  jobs = []
  for exp in exps:
    gin_file = None if size == 'paper' else f'{run_dir(root, exp)}/experiment.gin'
    jobs += experiment_jobs(
      exp,
      root,
      gin_file=gin_file,
      eval_modes=eval_modes,
      bindings=bindings,
      train_steps=train_steps,
      seed=seed,
      topology=topology,
    )
  return jobs


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


def project_dir_name() -> str:
  return os.path.basename(REPO_ROOT.rstrip('/'))
