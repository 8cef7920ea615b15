"""The step runner (`xm_launch.steps`): order, skipping finished steps, stopping on failure.

In-process: the steps' processes are replaced by a recording function and the file system by a
set of paths, except where a real module runs in this process (`run_module`).
"""

from __future__ import annotations

import sys

import pytest

from xm_launch import steps


def _plan(*step_list):
  return steps.Plan('main/exp', tuple(step_list))


TRAIN = steps.Step(
  'train', 't5x.train', ('--gin_file=a.gin',), output='/r/checkpoint_60/checkpoint'
)
EVAL_C = steps.Step('eval_carried', 't5x.eval', ('--x',), output='/r/eval/t_step60_carried.json')
EVAL_R = steps.Step('eval_reset', 't5x.eval', ('--x',), output='/r/eval/t_step60_reset.json')


class FakeCluster:
  """Files that exist, and the steps run (a successful step writes its output)."""

  def __init__(self, files=(), fail=None):
    self.files = set(files)
    self.ran = []
    self.fail = dict(fail or {})
    self.lines = []

  def exists(self, path):
    return path in self.files

  def run(self, step, worker):
    self.ran.append((step.name, worker, tuple(step.command(worker))))
    rc = self.fail.get(step.name, 0)
    if not rc and step.output:
      self.files.add(steps.fill(step.output, worker))
    return rc

  def __call__(self, plan, **kw):
    return steps.run_plan(plan, exists=self.exists, run=self.run, log=self.lines.append, **kw)


def test_runs_steps_in_order_then_skips_them_all():
  cluster = FakeCluster()
  plan = _plan(TRAIN, EVAL_C, EVAL_R)
  assert cluster(plan) == 0
  assert [r[0] for r in cluster.ran] == ['train', 'eval_carried', 'eval_reset']
  assert cluster.ran[0][2] == ('python', '-m', 't5x.train', '--gin_file=a.gin')
  # A restarted pod (or a re-launched sweep) runs nothing: every output exists.
  cluster.ran.clear()
  assert cluster(plan) == 0
  assert cluster.ran == []
  assert sum('skipped' in line for line in cluster.lines) == 3


def test_resumes_at_the_first_unfinished_step():
  cluster = FakeCluster(files={TRAIN.output, EVAL_C.output})
  assert cluster(_plan(TRAIN, EVAL_C, EVAL_R)) == 0
  assert [r[0] for r in cluster.ran] == ['eval_reset']
  assert any(f'[main/exp/train] skipped: {TRAIN.output} exists' == x for x in cluster.lines)


def test_a_failed_step_stops_the_chain_with_its_exit_status():
  cluster = FakeCluster(fail={'eval_carried': 3})
  assert cluster(_plan(TRAIN, EVAL_C, EVAL_R)) == 3
  assert [r[0] for r in cluster.ran] == ['train', 'eval_carried']  # eval_reset never started
  assert any('FAILED with exit status 3' in line for line in cluster.lines)


def test_a_preempted_step_stops_the_chain_with_the_restart_code():
  cluster = FakeCluster(fail={'train': steps.runner_lib.RESTART_EXIT_CODE})
  assert cluster(_plan(TRAIN, EVAL_C)) == 42
  assert [r[0] for r in cluster.ran] == ['train']
  assert any('[main/exp/train] preempted' in line for line in cluster.lines), cluster.lines


def test_exit_zero_without_the_output_is_a_failure():
  cluster = FakeCluster()
  cluster.run = lambda step, worker: cluster.ran.append(step.name) or 0  # writes nothing
  assert cluster(_plan(TRAIN, EVAL_C)) == 1
  assert cluster.ran == ['train']
  assert any('is missing' in line for line in cluster.lines)


def test_worker_placeholders_worker_only_steps_and_waiting():
  part = steps.Step(
    'prepare_train',
    'tasks.prepare',
    ('--worker={worker}', '--num_workers=2'),
    output='/p/worker-{worker:05d}-of-00002/done.json',
    done_if='/p/meta.json',
    distributed=False,
  )
  parts = ('/p/worker-00000-of-00002/done.json', '/p/worker-00001-of-00002/done.json')
  final = steps.Step(
    'finalize_train', 'tasks.prepare', ('--finalize',), output='/p/meta.json', worker=0,
    wait_for=parts, distributed=False,
  )  # fmt: skip
  plan = _plan(part, final)
  # Worker 1 writes its part and leaves the merge to worker 0.
  cluster = FakeCluster()
  assert cluster(plan, worker=1) == 0
  assert cluster.ran == [('prepare_train', 1, ('python', '-m', 'tasks.prepare', '--worker=1',
                                               '--num_workers=2'))]  # fmt: skip
  assert '/p/worker-00001-of-00002/done.json' in cluster.files
  # Worker 0 writes its part, then waits for worker 1's (polls), then merges.
  cluster = FakeCluster()
  slept = []

  def sleep(seconds):
    slept.append(seconds)
    if len(slept) == 2:
      cluster.files.add(parts[1])

  assert cluster(plan, worker=0, sleep=sleep, poll_s=5) == 0
  assert [r[0] for r in cluster.ran] == ['prepare_train', 'finalize_train']
  assert slept == [5, 5]
  # A part that never appears: worker 0 gives up after the timeout, without merging.
  cluster = FakeCluster()
  assert cluster(plan, worker=0, sleep=lambda s: None, poll_s=10, wait_timeout_s=30) == 1
  assert [r[0] for r in cluster.ran] == ['prepare_train']
  # Once merged, every worker skips its part (done_if).
  cluster = FakeCluster(files={'/p/meta.json'})
  assert cluster(plan, worker=1) == 0 and cluster.ran == []


def test_plan_json_round_trip_and_errors():
  plan = _plan(TRAIN, steps.Step('f', 'tasks.prepare', ('a',), worker=0, wait_for=('x',)))
  assert steps.Plan.from_json(plan.to_json()) == plan
  with pytest.raises(ValueError, match='unknown fields'):
    steps.Plan.from_json('{"name": "x", "steps": [{"name": "a", "module": "m", "outptu": "o"}]}')
  assert steps.main(['--plan={"name": "x", "steps": [{"name": "a"}]}']) == steps.CONFIG_ERROR


def test_check_plan_names_missing_gin_files_and_modules(tmp_path):
  (tmp_path / 'gin').mkdir()
  (tmp_path / 'gin' / 'a.gin').write_text('')
  good = steps.Step('train', 'json', ('--gin_file=gin/a.gin', '--gin_file=/abs/run/experiment.gin'))
  bad = steps.Step('eval', 'no_such_module_xyz', ('--gin_file=gin/b.gin',))
  assert steps.check_plan(_plan(good), str(tmp_path)) == []
  problems = steps.check_plan(_plan(good, bad), str(tmp_path))
  assert problems == [
    'step eval: module no_such_module_xyz is not installed',
    f'step eval: gin file gin/b.gin is not in {tmp_path}',
  ]


def test_module_command_and_worker_index():
  step = steps.Step('train', 't5x.train', ('--w={worker}',))
  assert steps.module_command(step, 3, distributed=True)[1:] == [
    '-m', 'xm_launch.steps', '--module=t5x.train', '--distributed', '--', '--w=3',
  ]  # fmt: skip
  assert '--distributed' not in steps.module_command(step, 0, distributed=False)
  prep = steps.Step('p', 'tasks.prepare', distributed=False)  # no JAX: never initializes
  assert '--distributed' not in steps.module_command(prep, 0, distributed=True)
  assert steps.worker_index({'JOB_COMPLETION_INDEX': '7'}) == 7
  assert steps.worker_index({}) == 0
  with pytest.raises(ValueError, match='not a pod index'):
    steps.worker_index({'JOB_COMPLETION_INDEX': 'x'})


@pytest.fixture
def tiny_module(tmp_path, monkeypatch):
  """A module `melodi_step_probe` that records its argv, or raises what PROBE_RAISE names."""
  (tmp_path / 'melodi_step_probe.py').write_text(
    'import os, sys\n'
    'RECORD.append(list(sys.argv))\n'
    "if os.environ.get('PROBE_RAISE') == 'missing':\n"
    '  from tasks import prepare\n'
    "  raise prepare.MissingPreparedSplitError('split test of task x is not prepared')\n"
    "if os.environ.get('PROBE_RAISE') == 'other':\n"
    "  raise RuntimeError('boom')\n"
    "if os.environ.get('PROBE_RAISE') in ('preempted', 'before_training'):\n"
    "  module, name = ('t5x.trainer', 'PreemptionError') if os.environ['PROBE_RAISE'] == "
    "'preempted' else ('melodi_t5x.preemption', 'PreemptedBeforeTraining')\n"
    "  raise getattr(sys.modules[module], name)('preempted at step 4')\n"
  )
  monkeypatch.syspath_prepend(str(tmp_path))
  record = []
  import builtins

  monkeypatch.setattr(builtins, 'RECORD', record, raising=False)
  monkeypatch.setattr(sys, 'argv', list(sys.argv))
  return record


@pytest.fixture
def preemption_service():
  """Restores JAX's preemption-service setting, which `run_module(distributed=True)` sets."""
  import jax  # pylint: disable=g-import-not-at-top

  before = jax.config.jax_enable_preemption_service
  yield
  jax.config.update('jax_enable_preemption_service', before)


def test_run_module_initializes_jax_distributed_first(tiny_module, monkeypatch, preemption_service):
  calls = []
  init = lambda: calls.append(('initialize', len(tiny_module)))
  steps.run_module('melodi_step_probe', ['--a=1'], distributed=True, initialize=init)
  assert calls == [('initialize', 0)]  # before the module ran
  [argv] = tiny_module  # run as __main__ with the step's arguments (argv[0]: the module's file)
  assert argv[0].endswith('melodi_step_probe.py') and argv[1:] == ['--a=1']
  steps.run_module('melodi_step_probe', [], distributed=False, initialize=init)
  assert len(calls) == 1  # --local: never


def test_run_module_maps_a_missing_prepared_split_to_config_error(tiny_module, monkeypatch):
  monkeypatch.setenv('PROBE_RAISE', 'missing')
  with pytest.raises(SystemExit) as exit_info:
    steps.run_module('melodi_step_probe', [], distributed=False)
  assert exit_info.value.code == steps.CONFIG_ERROR
  monkeypatch.setenv('PROBE_RAISE', 'other')  # any other error propagates (retried by the JobSet)
  with pytest.raises(RuntimeError, match='boom'):
    steps.run_module('melodi_step_probe', [], distributed=False)


@pytest.mark.parametrize('kind', ['preempted', 'before_training'])
def test_run_module_maps_a_preemption_to_the_restart_code(tiny_module, monkeypatch, kind):
  """T5X's PreemptionError (after its emergency save) and a stop before any step: exit 42.

  Stand-ins for the two exception modules (the real ones import T5X; only their classes count).
  """
  import types

  for module, name in (
    ('t5x.trainer', 'PreemptionError'),
    ('melodi_t5x.preemption', 'PreemptedBeforeTraining'),
  ):
    stand_in = types.SimpleNamespace(**{name: type(name, (Exception,), {})})
    monkeypatch.setitem(sys.modules, module, stand_in)
  monkeypatch.setenv('PROBE_RAISE', kind)
  with pytest.raises(SystemExit) as exit_info:
    steps.run_module('melodi_step_probe', [], distributed=False)
  assert exit_info.value.code == steps.runner_lib.RESTART_EXIT_CODE == 42


# A step command that says it is ready, then on SIGTERM exits with the code in argv[2]
# ('default': no handler, it dies of the signal).
_ON_SIGTERM = """
import signal, sys, time
if sys.argv[2] != 'default':
  signal.signal(signal.SIGTERM, lambda n, f: sys.exit(int(sys.argv[2])))
open(sys.argv[1], 'w').close()
time.sleep(60)
"""


@pytest.mark.parametrize('child_code, expected', [('0', 42), ('5', 5), ('default', 143)])
def test_run_subprocess_passes_sigterm_on(tmp_path, child_code, expected):
  """The step runner (not PID 1) forwards SIGTERM to the step; a step that then exits 0 still
  stops the plan (42: the pod is going away); a failure keeps its code; a death by SIGTERM, 143.
  """
  import os
  import signal
  import subprocess
  import time

  script, ready = tmp_path / 'step.py', tmp_path / 'ready'
  script.write_text(_ON_SIGTERM)
  cmd = [sys.executable, str(script), str(ready), child_code]
  code = f'import sys; from xm_launch import steps; sys.exit(steps.run_subprocess({cmd!r}))'
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([repo, os.environ.get('PYTHONPATH', '')]))
  proc = subprocess.Popen([sys.executable, '-c', code], env=env, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 30
  while not ready.exists():
    assert proc.poll() is None and time.time() < deadline, proc.communicate()
    time.sleep(0.02)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=30)
  assert proc.returncode == expected, err
  assert '[xm_launch.steps] forwarding SIGTERM' in err


# A step module (`--distributed`, one process) that says it is ready and sleeps; argv[1]: the
# module name, argv[2]: 'train' to list it among the preemptible modules, argv[3]: ready file.
_DISTRIBUTED_SLEEPER = """
import socket, sys
import jax
from xm_launch import steps
module, kind, ready = sys.argv[1:4]
with open(module + '.py', 'w') as f:
  f.write('import sys, time\\nopen(sys.argv[1], "w").close()\\ntime.sleep(60)\\n')
sys.path.insert(0, '.')
if kind == 'train':
  steps.PREEMPTIBLE_MODULES = (module,)
with socket.socket() as s:
  s.bind(('127.0.0.1', 0))
  address = f'127.0.0.1:{s.getsockname()[1]}'
steps.run_module(module, [ready], distributed=True,
                 initialize=lambda: jax.distributed.initialize(address, 1, 0))
"""


@pytest.mark.parametrize('kind', ['eval', 'train'])
def test_only_training_steps_get_jax_preemption_service(tmp_path, kind):
  """Under jax.distributed, JAX's preemption service swallows SIGTERM (training polls it at its
  sync point); an eval step without it ends at once (143) instead of waiting for SIGKILL.
  """
  import os
  import signal
  import subprocess
  import time

  ready = tmp_path / 'ready'
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env['PYTHONPATH'] = os.pathsep.join([repo, os.environ.get('PYTHONPATH', '')])
  cmd = [sys.executable, '-c', _DISTRIBUTED_SLEEPER, 'melodi_sleep_probe', kind, str(ready)]
  proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.time() + 120
    while not ready.exists():
      assert proc.poll() is None and time.time() < deadline, proc.communicate()
      time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    if kind == 'eval':
      assert proc.wait(timeout=30) == -signal.SIGTERM
    else:
      time.sleep(2.0)
      assert proc.poll() is None  # the notice is waiting for a sync point
  finally:
    proc.kill()
    proc.communicate()


@pytest.mark.slow
def test_local_prepare_rerun_skips_finished_steps(tmp_path):
  """`--sweep=prepare --local` twice: the second run finds every split's meta.json."""
  import os
  import subprocess

  from melodi_t5x import experiments

  cmd = [
    sys.executable, '-m', 'xm_launch.launch', '--sweep=prepare', '--task=local_books', '--local',
    f'--model_dir_root={tmp_path}',
  ]  # fmt: skip
  env = dict(os.environ, PYTHONPATH=experiments.REPO_ROOT, JAX_PLATFORMS='cpu')
  first = subprocess.run(cmd, cwd=experiments.REPO_ROOT, env=env, capture_output=True, text=True)
  assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
  assert first.stdout.count(' running: python -m tasks.prepare --task=local_books') == 3
  for split in ('train', 'validation', 'test'):
    assert (tmp_path / 'prepared' / 'local_books' / split / 'meta.json').exists()
  again = subprocess.run(cmd, cwd=experiments.REPO_ROOT, env=env, capture_output=True, text=True)
  assert again.returncode == 0
  assert ' running: ' not in again.stdout
  for split in ('train', 'validation', 'test'):
    meta = tmp_path / 'prepared' / 'local_books' / split / 'meta.json'
    assert f'[prepare/local_books/prepare_{split}] skipped: {meta} exists' in again.stdout


def test_a_step_killed_by_a_signal_exits_128_plus_the_signal(tmp_path):
  """subprocess reports -15 for SIGTERM; the step runner passes on 143, as a shell would (the
  JobSet's failure policy tells signals from application errors by 128 + N)."""
  kill_self = [sys.executable, '-c', 'import os, signal; os.kill(os.getpid(), signal.SIGTERM)']
  assert steps.run_subprocess(kill_self) == 143
  assert steps.run_subprocess(kill_self, log=str(tmp_path / 'log')) == 143
  assert steps.run_subprocess([sys.executable, '-c', 'raise SystemExit(3)']) == 3
