"""The jobs of the experiment suite: which `python -m` steps a sweep runs (plain Python).

`sweep_jobs` turns a sweep (or one committed experiment file) into `JobSpec`s: per experiment (and
seed) one `t5x.train` job and, optionally, one `t5x.eval` job per memory mode on the final
checkpoint, all under `<model_dir_root>/<sweep>/<experiment>`; the `timing` sweep gives one
benchmark job per model and step kind. The launcher (`xm_launch.jobs`) adds the data stage
(`--sweep=prepare`), the job image and the step runner's plans; the TPU compile check
(`melodi_t5x.tools.tpu_compile`) compiles these jobs' steps. Nothing here imports the launcher.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
from collections.abc import Sequence

from melodi_t5x import experiments

# Accelerator flag -> default topology of a 32-core slice. v4 and v5p chips have two TensorCores
# each (megacore): 16 chips = 32 cores.
ACCELERATORS = {'v4': '2x2x4', 'v5e': '4x8', 'v5p': '2x2x4', 'v6e': '4x8'}
# One host's worth of chips for the timing benchmark (it times one device).
TIMING_TOPOLOGY = {'v4': '2x2x1', 'v5e': '1x1', 'v5p': '2x2x1', 'v6e': '1x1'}


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


def check_request(
  root: str, sweep: str | None, experiment: str | None, seeds: Sequence[int] | str
) -> tuple[int, ...]:
  """The seeds of a sweep request; raises if the root is missing, or not exactly one of `sweep`
  and `experiment` is given, or the seeds are not distinct non-negative integers."""
  if not root:
    raise ValueError('model_dir_root is required (e.g. gs://bucket/melodi or /tmp/rehearsal).')
  if bool(sweep) == bool(experiment):
    raise ValueError('give exactly one of --sweep and --experiment.')
  return parse_seeds(seeds)


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
) -> list[JobSpec]:
  """Every job of a sweep (or of one committed experiment file), in launch order.

  Experiments of size 'tiny' have no committed file: their gin file is
  `<run dir>/experiment.gin`, written by the local runner (`experiments.render`). With several
  seeds (or one other than 0) every experiment has one replicate per seed in `<run dir>/seed<N>`.
  `prepared_root` (None: read on the fly) is bound as `tasks.PreparedDataConfig.root`. The data
  stage (`--sweep=prepare`) is the launcher's (`xm_launch.jobs.sweep_jobs`).
  """
  seeds = check_request(root, sweep, experiment, seeds)
  replicated = seeds != (0,)
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
