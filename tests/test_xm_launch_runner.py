"""The container's first process (`xm_launch.runner`): signals, exit codes, zombies (no T5X).

Each check starts `python -m xm_launch.runner -- python <script>` as a real process; the scripts
report what they saw through files and their exit codes. The PID-1 checks run the runner as PID 1
of a new PID namespace (`unshare --pid --fork --mount-proc`, root) and send SIGTERM from outside
it, as Kubernetes does: a bare `python` there ignores it, the runner passes it on.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import needs
import pytest

from xm_launch import runner, steps

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A child that exits with 10 + N on signal N once it has said it is ready.
EXIT_ON_SIGNAL = """
import signal, sys, time
for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
  signal.signal(sig, lambda n, f: sys.exit(10 + n))
open(sys.argv[1], 'w').close()
time.sleep(60)
sys.exit(99)
"""
# A child that only says it is ready and sleeps (default signal handling).
SLEEPER = """
import sys, time
open(sys.argv[1], 'w').close()
time.sleep(60)
"""
# A child that leaves an orphan: the orphan records its parent once re-parented, then exits; the
# child then watches /proc: exit 0 once the orphan is gone (reaped), 5 if it stays a zombie.
ORPHAN = """
import os, sys, time
info = sys.argv[1]
middle = os.fork()
if middle == 0:
  orphan = os.fork()
  if orphan == 0:
    time.sleep(0.5)  # the middle process has exited: this one is an orphan now
    with open(info, 'w') as f:
      f.write(f'{os.getpid()} {os.getppid()}')
    os._exit(0)
  os._exit(0)
os.waitpid(middle, 0)
deadline = time.time() + 20
while not os.path.exists(info) or not open(info).read():
  assert time.time() < deadline
  time.sleep(0.05)
orphan = int(open(info).read().split()[0])
state = None
while time.time() < deadline:
  try:
    with open(f'/proc/{orphan}/stat') as f:
      state = f.read().rsplit(')', 1)[1].split()[0]
  except FileNotFoundError:
    sys.exit(0)  # reaped
  time.sleep(0.05)
sys.exit(5 if state == 'Z' else 6)
"""


def _env():
  env = dict(os.environ)
  env['PYTHONPATH'] = os.pathsep.join([REPO, env.get('PYTHONPATH', '')])
  return env


def _script(tmp_path, name, text):
  path = tmp_path / f'{name}.py'
  path.write_text(textwrap.dedent(text))
  return str(path)


def _runner(args, namespace=False, **kw):
  prefix = ['unshare', '--pid', '--fork', '--mount-proc'] if namespace else []
  cmd = prefix + [sys.executable, '-m', 'xm_launch.runner', '--', *args]
  return subprocess.Popen(
    cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw
  )


def _wait_for(path, proc, timeout=30.0):
  deadline = time.time() + timeout
  while not os.path.exists(path):
    assert proc.poll() is None, proc.communicate()
    assert time.time() < deadline, f'{path} did not appear'
    time.sleep(0.02)


def _finish(proc, timeout=30.0):
  try:
    out, err = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    proc.kill()
    raise AssertionError(f'still running after {timeout} s: {proc.communicate()}') from None
  return proc.returncode, err


def _child_of(pid: int) -> int:
  """unshare's forked child: PID 1 inside the namespace."""
  for _ in range(400):
    children = open(f'/proc/{pid}/task/{pid}/children').read().split()
    if children:
      return int(children[0])
    time.sleep(0.02)
  raise AssertionError(f'pid {pid} started no child')


def _need_pid_namespace():
  if shutil.which('unshare') is None:
    needs.skip('unshare (util-linux) is not installed: no PID namespace for the PID-1 checks')
  probe = subprocess.run(
    ['unshare', '--pid', '--fork', '--mount-proc', 'true'], capture_output=True, text=True
  )
  if probe.returncode:
    needs.skip(f'unshare --pid needs root or CAP_SYS_ADMIN: {probe.stderr.strip()}')


@pytest.mark.parametrize('code', [0, 3, runner.RESTART_EXIT_CODE, steps.CONFIG_ERROR])
def test_exit_code_is_the_childs(code):
  proc = _runner([sys.executable, '-c', f'import sys; sys.exit({code})'])
  assert _finish(proc)[0] == code


def test_a_child_killed_by_a_signal_gives_128_plus_the_signal():
  proc = _runner([sys.executable, '-c', 'import os, signal; os.kill(os.getpid(), signal.SIGKILL)'])
  rc, err = _finish(proc)
  assert rc == 128 + signal.SIGKILL == 137
  assert 'killed by SIGKILL' in err


@pytest.mark.parametrize('sig', [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_each_signal_is_forwarded_to_the_child(tmp_path, sig):
  ready = tmp_path / 'ready'
  proc = _runner([sys.executable, _script(tmp_path, 'child', EXIT_ON_SIGNAL), str(ready)])
  _wait_for(ready, proc)
  proc.send_signal(sig)
  rc, err = _finish(proc)
  assert rc == 10 + sig, err  # the child's own handler ran: it got this very signal
  assert f'forwarding {signal.Signals(sig).name}' in err


def test_sigterm_kills_a_child_without_handler_with_143(tmp_path):
  ready = tmp_path / 'ready'
  proc = _runner([sys.executable, _script(tmp_path, 'sleeper', SLEEPER), str(ready)])
  _wait_for(ready, proc)
  proc.send_signal(signal.SIGTERM)
  rc, err = _finish(proc)
  assert rc == 143, err
  assert 'killed by SIGTERM' in err


def test_a_signal_before_the_child_starts_reaches_it(tmp_path):
  """The forwarder keeps a signal that comes before the child exists and sends it on `attach`."""
  probe = """
import os, signal, subprocess, sys
from xm_launch import runner
with runner.Forwarder((signal.SIGUSR1,)) as fwd:
  os.kill(os.getpid(), signal.SIGUSR1)  # handled here: no child yet
  child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])
  fwd.attach(child.pid)
  print(child.wait(timeout=30), fwd.received == [signal.SIGUSR1])
"""
  out = subprocess.run(
    [sys.executable, '-c', probe], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=60
  )
  assert out.stdout.split() == [str(-signal.SIGUSR1), 'True'], out


def test_orphans_are_reaped(tmp_path):
  """Not PID 1 here: the runner makes itself the child subreaper, so the orphan is its child."""
  info = tmp_path / 'orphan'
  proc = _runner([sys.executable, _script(tmp_path, 'orphan', ORPHAN), str(info)])
  rc, err = _finish(proc)
  assert rc == 0, f'the orphan stayed a zombie (exit {rc}): {err}'
  _, parent = info.read_text().split()
  assert int(parent) == proc.pid  # re-parented to the runner, which reaped it


def test_usage_and_a_missing_command():
  assert _finish(_runner([]))[0] == 2
  rc, err = _finish(_runner(['no-such-command-xyz']))
  assert rc == 127 and 'cannot start' in err


def test_as_pid1_sigterm_from_outside_reaches_the_child(tmp_path):
  """Issue 25 item 3: `python` as PID 1 ignores SIGTERM from outside; under the runner it ends."""
  _need_pid_namespace()
  sleeper = _script(tmp_path, 'sleeper', SLEEPER)
  # Without the runner: the sleeper itself is PID 1 and survives the SIGTERM.
  bare_ready = tmp_path / 'bare_ready'
  bare = subprocess.Popen(
    ['unshare', '--pid', '--fork', '--mount-proc', sys.executable, sleeper, str(bare_ready)]
  )
  bare_pid1 = _child_of(bare.pid)
  try:
    _wait_for(bare_ready, bare)
    os.kill(bare_pid1, signal.SIGTERM)
    time.sleep(1.0)
    assert bare.poll() is None  # still running: the signal was dropped
  finally:
    os.kill(bare_pid1, signal.SIGKILL)  # always delivered, even to a namespace's init
    bare.wait(timeout=30)
  # With the runner as PID 1: the same SIGTERM reaches the sleeper, which dies of it.
  ready = tmp_path / 'ready'
  proc = _runner([sys.executable, sleeper, str(ready)], namespace=True)
  _wait_for(ready, proc)
  pid1 = _child_of(proc.pid)
  tick = time.time()
  os.kill(pid1, signal.SIGTERM)
  rc, err = _finish(proc)
  assert 'pid 1: started' in err and 'forwarding SIGTERM' in err, err
  assert rc == 143 and time.time() - tick < 10, (rc, err)


def test_as_pid1_orphans_are_reaped(tmp_path):
  _need_pid_namespace()
  info = tmp_path / 'orphan'
  proc = _runner([sys.executable, _script(tmp_path, 'orphan', ORPHAN), str(info)], namespace=True)
  rc, err = _finish(proc)
  assert rc == 0, f'the orphan stayed a zombie (exit {rc}): {err}'
  _, parent = info.read_text().split()
  assert parent == '1'  # the namespace's init: the runner
