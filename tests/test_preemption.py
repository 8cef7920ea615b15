"""`melodi_t5x.preemption.PreemptionWatch` under JAX's preemption service (needs T5X).

Each check runs a fresh process (`jax.distributed` initialises once per process) with one JAX
process on CPU: `jax.distributed.initialize` installs JAX's SIGTERM notifier, the process sends
itself SIGTERM, and the watch is asked with global steps, as `MemoryTrainer` asks it. Two cases:
a notice while training (the watch turns true a few steps later), and a notice before the first
step of a resumed run (JAX's sync point is then 1, which a run resumed at step 500 never meets;
the watch's first-step check of the coordination store stops it at once). The two-process run
under the real runner is `tests/test_preemption_multihost.py`.
"""

from __future__ import annotations

import os
import subprocess
import sys

import needs
import pytest

pytestmark = pytest.mark.slow  # a fresh process each (jax.distributed), T5X imported in it
needs.t5x()

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Prints `<what> <value>` lines; argv[1]: 'training' or 'before_start'.
SCRIPT = """
import os, signal, socket, sys, time
import jax
from jax.experimental import multihost_utils
from melodi_t5x import preemption

with socket.socket() as s:
  s.bind(('127.0.0.1', 0))
  port = s.getsockname()[1]
jax.distributed.initialize(f'127.0.0.1:{port}', 1, 0)
watch = preemption.PreemptionWatch()

def wait_for_notice():
  deadline = time.time() + 30
  while not preemption._notice_received():
    assert time.time() < deadline, 'no notice in the coordination store'
    time.sleep(0.05)
  time.sleep(1.0)  # the sync protocol runs right after the notice

if sys.argv[1] == 'training':
  for step in range(500, 520):
    if step == 503:
      os.kill(os.getpid(), signal.SIGTERM)
      wait_for_notice()
    if watch.should_stop(step):
      print('stop', step)
      break
    watch.started()
  print('mode', watch.mode)
else:
  os.kill(os.getpid(), signal.SIGTERM)  # during the restore or the compile
  wait_for_notice()
  print('plain_sync_point_at_500', multihost_utils.reached_preemption_sync_point(500))
  print('watch_at_500', watch.should_stop(500))
  print('mode', watch.mode)
"""


def _run(case: str) -> dict[str, str]:
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env['PYTHONPATH'] = os.pathsep.join([REPO, env.get('PYTHONPATH', '')])
  out = subprocess.run(
    [sys.executable, '-c', SCRIPT, case],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=240,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  return dict(line.split(' ', 1) for line in out.stdout.splitlines() if ' ' in line)


def test_a_notice_while_training_stops_at_the_next_sync_point():
  got = _run('training')
  print(got)
  assert got['mode'] == 'sync'
  # Notice after the watch was asked at step 502: the sync point is one past it, 503.
  assert got['stop'] == '503', got


def test_a_notice_before_the_first_step_stops_a_resumed_run_at_once():
  got = _run('before_start')
  print(got)
  assert got['mode'] == 'sync'
  assert got['plain_sync_point_at_500'] == 'False'  # JAX's sync point alone would never fire
  assert got['watch_at_500'] == 'True'
