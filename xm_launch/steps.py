r"""The step runner: one experiment's steps in order, each skipped when its output exists.

Every pod of a JobSet (and `python -m xm_launch.launch --local`) runs

  python -m xm_launch.steps --distributed --plan='<JSON>'      # a TPU pod
  python -m xm_launch.steps --plan='<JSON>'                    # this machine (--local)

where the plan is `Plan.to_json()`: the steps (train, then one eval per memory mode on the final
checkpoint; or the data preparation of a task), each a module with its arguments and the file
whose existence means it is done (the final checkpoint's
`<model_dir>/checkpoint_<TRAIN_STEPS>/commit_success.txt`, the eval report
`<model_dir>/eval/<task>_step<TRAIN_STEPS>_<mode>.json`, a prepared split's `meta.json`). A
restarted JobSet therefore resumes at the first unfinished step, and T5X resumes that step from
its last checkpoint. A failed step stops the chain: the runner exits with the
step's status. A plan that cannot run (unknown module, missing gin file) exits with
`CONFIG_ERROR` (78): like every application exit code it fails the JobSet at once
(`xm_launch.gke.failure_policies`). A step killed by signal N gives 128 + N, as a shell would.

SIGTERM (the pod is stopping) is passed on to the running step's process; the runner then starts
no further step and exits with `RESTART_EXIT_CODE` (42) or the step's own failure status. A
training step that saved its emergency checkpoint exits with 42 itself (`run_module`), as does
any step module that raises T5X's `PreemptionError`.

Each step runs in its own process (`python -m xm_launch.steps --module=M [--distributed] -- ARGS`):
on TPU that process calls `jax.distributed.initialize()` with no arguments (GKE injects
`TPU_WORKER_ID` / `TPU_WORKER_HOSTNAMES`; JAX finds the other hosts) and then runs the module as
`__main__`. One process per step because `t5x.train` and `t5x.eval` define the same absl flags.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import os
import runpy
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence

from xm_launch import runner as runner_lib

# Exit status of a configuration error (sysexits.h EX_CONFIG): an application error, never retried.
CONFIG_ERROR = 78
# Step modules that stop at a preemption sync point on SIGTERM (JAX's preemption service on).
PREEMPTIBLE_MODULES = ('t5x.train',)
# Placeholders in step arguments and outputs: this pod's index in its slice (Kubernetes'
# JOB_COMPLETION_INDEX), plain and zero-padded to 5 digits.
WORKER = '{worker}'
WORKER_05D = '{worker:05d}'
# Environment variable of the pod index in an Indexed Job.
WORKER_ENV = 'JOB_COMPLETION_INDEX'


@dataclasses.dataclass(frozen=True)
class Step:
  """One step of a plan: `python -m <module> <args>` unless `output` exists."""

  # 'train', 'eval_carried', 'prepare_train_w3', ...
  name: str
  # Python module run as __main__.
  module: str
  # Its command-line arguments ('{worker}' is replaced by the pod index).
  args: tuple[str, ...] = ()
  # The file whose existence means the step is done ('' : always run).
  output: str = ''
  # Also done when this file exists (e.g. a prepared split's meta.json for a worker's part).
  done_if: str = ''
  # A JAX step: under `--distributed` it calls jax.distributed.initialize() first.
  distributed: bool = True
  # Only the pod of this index runs the step (None: every pod).
  worker: int | None = None
  # Files to wait for before running (e.g. every worker's part before merging them).
  wait_for: tuple[str, ...] = ()

  def command(self, worker: int = 0) -> list[str]:
    """The step's command line in the job image, '{worker}' filled in."""
    args = [fill(a, worker) for a in self.args]
    return ['python', '-m', self.module, *args]


@dataclasses.dataclass(frozen=True)
class Plan:
  """The steps of one JobSet (or one --local experiment), in order."""

  # Name of the JobSet / experiment, for messages.
  name: str
  # The steps, run in order.
  steps: tuple[Step, ...]

  def to_json(self) -> str:
    """Compact JSON; step fields at their defaults are left out."""
    defaults = {f.name: f.default for f in dataclasses.fields(Step)}
    steps = [
      {
        k: v
        for k, v in dataclasses.asdict(s).items()
        if k in ('name', 'module') or v != defaults[k]
      }
      for s in self.steps
    ]
    return json.dumps({'name': self.name, 'steps': steps}, separators=(',', ':'))

  @classmethod
  def from_json(cls, text: str) -> Plan:
    data = json.loads(text)
    steps = []
    for s in data['steps']:
      unknown = sorted(set(s) - {f.name for f in dataclasses.fields(Step)})
      if unknown:
        raise ValueError(f'plan step {s.get("name")!r} has unknown fields {unknown}.')
      s = dict(s, args=tuple(s.get('args', ())), wait_for=tuple(s.get('wait_for', ())))
      steps.append(Step(**s))
    return cls(name=data['name'], steps=tuple(steps))


def fill(text: str, worker: int) -> str:
  """`text` with the worker placeholders replaced by `worker`."""
  return text.replace(WORKER_05D, f'{worker:05d}').replace(WORKER, str(worker))


def path_exists(path: str) -> bool:
  """Whether a local or gs:// path exists (tf.io.gfile for URLs, imported only then)."""
  if '://' not in path:
    return os.path.exists(path)
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  return tf.io.gfile.exists(path)


def check_plan(plan: Plan, repo_root: str | None = None) -> list[str]:
  """Configuration problems of a plan: unknown modules, gin files missing from the tree."""
  problems = []
  for step in plan.steps:
    if importlib.util.find_spec(step.module.split('.')[0]) is None:
      problems.append(f'step {step.name}: module {step.module} is not installed')
    for arg in step.args:
      if arg.startswith('--gin_file='):
        gin_file = arg.split('=', 1)[1]
        if '://' in gin_file or os.path.isabs(gin_file):
          continue  # a run's own file (tiny sweeps write it first)
        if repo_root and not os.path.exists(os.path.join(repo_root, gin_file)):
          problems.append(f'step {step.name}: gin file {gin_file} is not in {repo_root}')
  return problems


def module_command(step: Step, worker: int = 0, distributed: bool = False) -> list[str]:
  """The process that runs one step: this module in --module mode."""
  cmd = [sys.executable, '-m', 'xm_launch.steps', f'--module={step.module}']
  if distributed and step.distributed:
    cmd.append('--distributed')
  return cmd + ['--'] + [fill(a, worker) for a in step.args]


def exit_status(returncode: int) -> int:
  """A process's status as a shell reports it: 128 + N for a process killed by signal N.

  (subprocess gives -N, which `sys.exit` would turn into 256 - N: the JobSet's failure policy
  tells signals from application errors by 128 + N.)
  """
  return 128 - returncode if returncode < 0 else returncode


def run_subprocess(cmd: Sequence[str], log: str | None = None, cwd: str | None = None) -> int:
  """Runs a command (output to `log` when given, else inherited); returns its exit status.

  SIGTERM received meanwhile is passed on to the command. After one, a command that still
  exits 0 returns `RESTART_EXIT_CODE`: the pod is stopping, so the plan must not go on to its
  next step (a restarted pod skips the finished one). Killed by signal N: 128 + N.
  """
  with runner_lib.Forwarder((signal.SIGTERM,), _log_signal) as forwarder:
    with open(log, 'w') if log else contextlib.nullcontext() as out:
      stdout = {'stdout': out, 'stderr': subprocess.STDOUT} if out else {}
      with subprocess.Popen(list(cmd), cwd=cwd, **stdout) as proc:
        forwarder.attach(proc.pid)
        try:
          rc = runner_lib.returncode_exit_code(proc.wait())
        except BaseException:  # Ctrl-C: as subprocess.run, the command does not outlive us
          proc.kill()
          raise
  if forwarder.received and rc == 0:
    return runner_lib.RESTART_EXIT_CODE
  return rc


def _log_signal(line: str) -> None:
  print(f'[xm_launch.steps] {line}', file=sys.stderr, flush=True)


def run_plan(
  plan: Plan,
  *,
  worker: int = 0,
  distributed: bool = False,
  exists: Callable[[str], bool] = path_exists,
  run: Callable[[Step, int], int] | None = None,
  sleep: Callable[[float], None] = time.sleep,
  poll_s: float = 30.0,
  wait_timeout_s: float = 24 * 3600.0,
  log: Callable[[str], None] = print,
) -> int:
  """Runs the steps in order; returns 0, or the exit status of the first failed step.

  Args:
    plan: the steps.
    worker: this pod's index (steps with another `worker` are skipped; '{worker}' in arguments).
    distributed: JAX steps call jax.distributed.initialize() (multi-host TPU slices).
    exists: whether a path exists (injectable for tests).
    run: runs one step, returns its exit status (default: a `--module` subprocess of this module).
    sleep: waits between polls of `wait_for` files.
    poll_s: seconds between polls.
    wait_timeout_s: how long to wait for `wait_for` files before failing.
    log: where progress lines go.
  """
  run = run or (lambda step, w: run_subprocess(module_command(step, w, distributed)))
  for step in plan.steps:
    tag = f'[{plan.name}/{step.name}]'
    if step.worker is not None and step.worker != worker:
      log(f'{tag} skipped: runs on worker {step.worker} (this is worker {worker})')
      continue
    output, done_if = fill(step.output, worker), fill(step.done_if, worker)
    if (output and exists(output)) or (done_if and exists(done_if)):
      log(f'{tag} skipped: {output if output and exists(output) else done_if} exists')
      continue
    waited = 0.0
    for path in (fill(p, worker) for p in step.wait_for):
      while not exists(path):
        if waited >= wait_timeout_s:
          log(f'{tag} FAILED: {path} did not appear within {wait_timeout_s:.0f} s')
          return 1
        sleep(poll_s)
        waited += poll_s
    log(f'{tag} running: {" ".join(step.command(worker))}')
    tick = time.time()
    rc = run(step, worker)
    if rc == runner_lib.RESTART_EXIT_CODE:
      log(f'{tag} preempted after {time.time() - tick:.0f} s (exit status {rc}); stopping')
      return rc
    if rc:
      log(f'{tag} FAILED with exit status {rc} after {time.time() - tick:.0f} s; stopping')
      return rc
    if output and not exists(output) and not (done_if and exists(done_if)):
      log(f'{tag} FAILED: exit status 0 but {output} is missing; stopping')
      return 1
    log(f'{tag} done in {time.time() - tick:.0f} s')
  return 0


def run_module(
  module: str,
  args: Sequence[str],
  *,
  distributed: bool,
  initialize: Callable[[], None] | None = None,
) -> None:
  """Runs `module` as __main__ with `args`, after `jax.distributed.initialize()` if distributed.

  Configuration errors (an unprepared data split) exit with CONFIG_ERROR, which is not retried;
  T5X's `PreemptionError` (raised after its emergency checkpoint) exits with RESTART_EXIT_CODE.
  Only `PREEMPTIBLE_MODULES` get JAX's preemption service; other steps die of SIGTERM (143).
  """
  if distributed:
    import jax  # pylint: disable=g-import-not-at-top

    # JAX's preemption service turns SIGTERM into a notice that only training reads (at its
    # sync point); any other step would run on until SIGKILL, so it keeps SIGTERM's default.
    jax.config.update('jax_enable_preemption_service', module in PREEMPTIBLE_MODULES)
    (initialize or jax.distributed.initialize)()
  sys.argv = [module, *args]
  try:
    runpy.run_module(module, run_name='__main__', alter_sys=True)
  except Exception as e:  # pylint: disable=broad-except
    if _is_config_error(e):
      print(f'configuration error (not retried): {e}', file=sys.stderr, flush=True)
      raise SystemExit(CONFIG_ERROR) from e
    if _is_preemption(e):
      print(f'preempted, restart me (exit {runner_lib.RESTART_EXIT_CODE}): {e}', file=sys.stderr)
      raise SystemExit(runner_lib.RESTART_EXIT_CODE) from e
    raise


def _is_config_error(error: BaseException) -> bool:
  from tasks import prepare  # pylint: disable=g-import-not-at-top

  return isinstance(error, prepare.MissingPreparedSplitError)


def _is_preemption(error: BaseException) -> bool:
  # Only modules the step imported are looked at (the data stage imports neither).
  kinds = (('t5x.trainer', 'PreemptionError'), ('melodi_t5x.preemption', 'PreemptedBeforeTraining'))
  for module, name in kinds:
    kind = getattr(sys.modules.get(module), name, None)
    if kind is not None and isinstance(error, kind):
      return True
  return False


def worker_index(env: Mapping[str, str] = os.environ) -> int:
  """This pod's index in its slice (0 outside an Indexed Job)."""
  value = env.get(WORKER_ENV, '0') or '0'
  if not value.isdigit():
    raise ValueError(f'{WORKER_ENV}={value!r} is not a pod index.')
  return int(value)


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  rest: list[str] = []
  if '--' in argv:
    split = argv.index('--')
    argv, rest = argv[:split], argv[split + 1 :]
  parser = argparse.ArgumentParser(prog='python -m xm_launch.steps', description=__doc__)
  parser.add_argument('--plan', help='the plan as JSON (Plan.to_json), or @FILE')
  parser.add_argument('--module', help='run one step: this module, with the arguments after --')
  parser.add_argument(
    '--distributed', action='store_true', help='JAX steps call jax.distributed.initialize()'
  )
  parser.add_argument('--worker', type=int, default=None, help=f'default: ${WORKER_ENV} or 0')
  args = parser.parse_args(argv)
  if bool(args.plan) == bool(args.module):
    parser.error('give exactly one of --plan and --module.')
  if args.module:
    run_module(args.module, rest, distributed=args.distributed)
    return 0
  text = args.plan
  if text.startswith('@'):
    with open(text[1:]) as f:
      text = f.read()
  try:
    plan = Plan.from_json(text)
  except (ValueError, KeyError, TypeError) as e:
    print(f'bad --plan: {e}', file=sys.stderr)
    return CONFIG_ERROR
  from melodi_t5x import experiments  # pylint: disable=g-import-not-at-top

  problems = check_plan(plan, experiments.REPO_ROOT)
  if problems:
    print('configuration errors (not retried):\n  ' + '\n  '.join(problems), file=sys.stderr)
    return CONFIG_ERROR
  worker = worker_index() if args.worker is None else args.worker
  return run_plan(plan, worker=worker, distributed=args.distributed)


if __name__ == '__main__':
  sys.exit(main())
