"""A preempted two-process training saves one step on both hosts and resumes exactly (issue 25).

Each of two JAX processes (CPU, 2 devices each, gloo) runs as in a pod: `xm_launch.runner` as PID 1
of its own PID namespace (`unshare --pid --fork --mount-proc`), running the step runner
(`xm_launch.steps --plan`), whose one step starts `melodi_t5x.multihost -- t5x.train` (CPU hosts
need the explicit coordinator; on TPU the step calls `jax.distributed.initialize()` itself).
Once host 0 has logged a few steps, SIGTERM goes to host 1's runner only, from outside its
namespace, as Kubernetes sends it. Checks: both hosts stop at the same step (JAX's preemption sync
point) and T5X saves it as an emergency checkpoint (the checkpoint period is longer than the run:
the only other checkpoint is T5X's initial checkpoint_0), both runners exit with
RESTART_EXIT_CODE, and a restart resumes from that checkpoint with per-step training losses equal
to an uninterrupted two-process run of the same settings (run after them: one two-process run at
a time).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import needs
import pytest
from t5x_trainers import logged_metric

pytestmark = pytest.mark.slow
needs.t5x()

from xm_launch import runner, steps  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Long enough that the sync point (a few steps after the SIGTERM) comes before the end.
STEPS = 12
# SIGTERM once host 0 has logged this step.
SIGNAL_AFTER = 3
LOSS = 'loss_per_nonpadding_target_token'
TRAIN_GIN = f"""
from __gin__ import dynamic_registration
import __main__ as train_script
import melodi_t5x.t5x_gin
from melodi_t5x import t5x_schedule
from t5x import utils

include 'gin/quickstart.gin'
include 'gin/runs/cpu_data_parallel_train.gin'

TRAIN_STEPS = {STEPS}
train_script.train:
  eval_period = 1000
  stats_period = 1
  train_eval_dataset_cfg = None
  infer_eval_dataset_cfg = None
# No periodic checkpoint before the end: a resume can only come from the emergency checkpoint.
utils.SaveCheckpointConfig:
  period = 1000
  keep = None
t5x_schedule.warmup_cosine.warmup_steps = 2
"""


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _env(cache_dir):
  env = dict(os.environ)
  env['PYTHONPATH'] = os.pathsep.join([REPO, env.get('PYTHONPATH', '')])
  env['JAX_PLATFORMS'] = 'cpu'
  env['XLA_FLAGS'] = '--xla_force_host_platform_device_count=2'
  # The three runs compile the same programs: later runs load them (same executables, same
  # numbers; saves minutes on a loaded 2-core machine).
  env['JAX_COMPILATION_CACHE_DIR'] = str(cache_dir)
  return env


def _unshare_problem() -> str | None:
  """Why a PID namespace cannot be made here (None: it can)."""
  if shutil.which('unshare') is None:
    return 'unshare (util-linux) is not installed'
  probe = subprocess.run(
    ['unshare', '--pid', '--fork', '--mount-proc', 'true'], capture_output=True, text=True
  )
  if probe.returncode:
    return f'unshare --pid --fork --mount-proc failed (needs root or CAP_SYS_ADMIN): {probe.stderr}'
  return None


def _train_args(gin_file, model_dir, port, process):
  return [
    f'--coordinator_address=127.0.0.1:{port}',
    '--num_processes=2',
    f'--process_id={process}',
    '--cpu_collectives=gloo',
    '--',
    't5x.train',
    '--alsologtostderr',
    f'--gin_file={gin_file}',
    f'--gin.MODEL_DIR={str(model_dir)!r}',
  ]


def _pod_command(gin_file, model_dir, port, process):
  """A pod's command: the runner (PID 1), the step runner, one training step."""
  args = tuple(_train_args(gin_file, model_dir, port, process))
  step = steps.Step('train', 'melodi_t5x.multihost', args, distributed=False)
  plan = steps.Plan(f'preempt/host{process}', (step,))
  cmd = [sys.executable, '-m', 'xm_launch.runner', '--']
  return cmd + [sys.executable, '-m', 'xm_launch.steps', f'--plan={plan.to_json()}']


def _start(cmd, log, namespace=False):
  prefix = ['unshare', '--pid', '--fork', '--mount-proc'] if namespace else []
  out = open(log, 'w')
  env = _env(log.parent / 'jax_cache')
  return subprocess.Popen(prefix + cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)


def _reference(gin_file, model_dir, logs):
  """The uninterrupted run: plain two-process training, no runner."""
  port = _free_port()
  cmd = [sys.executable, '-m', 'melodi_t5x.multihost']
  return [
    _start(cmd + _train_args(gin_file, model_dir, port, i), log) for i, log in enumerate(logs)
  ]


def _child_of(pid: int) -> int:
  """The one child of `pid` (unshare's forked child: PID 1 inside the namespace)."""
  for _ in range(200):
    children = open(f'/proc/{pid}/task/{pid}/children').read().split()
    if children:
      return int(children[0])
    time.sleep(0.05)
  raise AssertionError(f'unshare (pid {pid}) started no child')


def _wait(procs, logs, timeout=900):
  codes = []
  for p, log in zip(procs, logs):
    try:
      codes.append(p.wait(timeout=timeout))
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise AssertionError(f'timed out; log {log}:\n' + open(log).read()[-4000:]) from None
  return codes


def _stop_step(log) -> int | None:
  m = re.search(r'Preemption: every host stops at step (\d+)', open(log).read())
  return int(m.group(1)) if m else None


def test_sigterm_to_pid1_saves_one_step_on_both_hosts_and_resumes_exactly(tmp_path):
  problem = _unshare_problem()
  if problem:
    needs.skip(f'no PID namespace for the runner as PID 1: {problem}')
  gin_file = tmp_path / 'train.gin'
  gin_file.write_text(TRAIN_GIN)
  model_dir, reference_dir = tmp_path / 'preempted', tmp_path / 'reference'
  pod_logs = [tmp_path / f'pod_{i}.log' for i in range(2)]
  ref_logs = [tmp_path / f'reference_{i}.log' for i in range(2)]
  port = _free_port()
  pods = [
    _start(_pod_command(gin_file, model_dir, port, i), log, namespace=True)
    for i, log in enumerate(pod_logs)
  ]
  pid1 = _child_of(pods[1].pid)
  deadline = time.time() + 600
  while SIGNAL_AFTER not in logged_metric(pod_logs[0], 'train', LOSS):
    assert all(p.poll() is None for p in pods), open(pod_logs[0]).read()[-4000:]
    assert time.time() < deadline, open(pod_logs[0]).read()[-4000:]
    time.sleep(0.1)
  os.kill(pid1, signal.SIGTERM)  # from outside host 1's PID namespace, to its PID 1
  codes = _wait(pods, pod_logs)
  texts = [log.read_text() for log in pod_logs]
  stops = [_stop_step(log) for log in pod_logs]
  checkpoints = sorted(p.name for p in model_dir.glob('checkpoint_*'))
  print(f'SIGTERM to host 1 runner (pid 1 in its namespace) after step {SIGNAL_AFTER}')
  print(f'stop step per host: {stops}; runner exit codes: {codes}; checkpoints: {checkpoints}')
  for i, text in enumerate(texts):
    assert '[xm_launch.runner] pid 1: started' in text, f'host {i}: runner not PID 1'
  # Host 1: the runner passed SIGTERM on to the step runner, which passed it on to the step.
  assert '[xm_launch.runner] forwarding SIGTERM' in texts[1], texts[1][-3000:]
  assert '[xm_launch.steps] forwarding SIGTERM' in texts[1], texts[1][-3000:]
  assert 'forwarding SIGTERM' not in texts[0]  # host 0 stopped on the coordination service's word
  assert stops[0] is not None and stops[0] == stops[1], (stops, texts[0][-3000:])
  stop = stops[0]
  assert SIGNAL_AFTER <= stop < STEPS
  for i, text in enumerate(texts):
    assert 'Saving emergency checkpoint done.' in text, f'host {i}:\n{text[-3000:]}'
    assert f'exited with {runner.RESTART_EXIT_CODE}' in text, f'host {i}:\n{text[-3000:]}'
  assert codes == [runner.RESTART_EXIT_CODE] * 2, codes
  # T5X's checkpoint of the initial state, and the emergency one.
  assert checkpoints == ['checkpoint_0', f'checkpoint_{stop}'], checkpoints
  for i in range(2):  # each host's data position in the emergency checkpoint
    assert (model_dir / f'checkpoint_{stop}' / 'dataset' / f'process_{i}-of-2').is_dir()
  interrupted = logged_metric(pod_logs[0], 'train', LOSS)
  assert max(interrupted) == stop, sorted(interrupted)

  # The restarted pods: same command, same model dir; they resume from the emergency checkpoint.
  resume_logs = [tmp_path / f'resume_{i}.log' for i in range(2)]
  port = _free_port()
  resumed_pods = [
    _start(_pod_command(gin_file, model_dir, port, i), log, namespace=True)
    for i, log in enumerate(resume_logs)
  ]
  assert _wait(resumed_pods, resume_logs) == [0, 0], open(resume_logs[0]).read()[-4000:]
  # The uninterrupted run, after the others: four processes at once on a loaded 2-core machine
  # can miss gloo's 30 s rendezvous.
  reference = _reference(gin_file, reference_dir, ref_logs)
  assert _wait(reference, ref_logs) == [0, 0], open(ref_logs[0]).read()[-4000:]
  resumed = logged_metric(resume_logs[0], 'train', LOSS)
  uninterrupted = logged_metric(ref_logs[0], 'train', LOSS)
  assert sorted(uninterrupted) == list(range(1, STEPS + 1)), sorted(uninterrupted)
  assert sorted(resumed) == list(range(stop + 1, STEPS + 1)), sorted(resumed)
  print('step  interrupted+resumed  uninterrupted')
  for s in range(max(1, stop - 2), min(STEPS, stop + 3) + 1):
    got = interrupted.get(s, resumed.get(s))
    print(f'{s:4d}  {got:.6f}{" (resumed)" if s in resumed else "":11s}  {uninterrupted[s]:.6f}')
  equal = all(resumed[s] == uninterrupted[s] for s in resumed)
  print(f'resumed steps {stop + 1}-{STEPS}: losses equal to the uninterrupted run: {equal}')
  assert {s: interrupted[s] for s in interrupted} == {s: uninterrupted[s] for s in interrupted}
  assert resumed == {s: uninterrupted[s] for s in resumed}
