"""The container's first process: starts the job's command, forwards signals to it, reaps zombies.

  python -m xm_launch.runner -- python -m xm_launch.steps --distributed --plan='<JSON>'

Kubernetes stops a pod (preemption, node drain, `kubectl delete`) with SIGTERM to the container's
PID 1, then SIGKILL once `terminationGracePeriodSeconds` has passed. The kernel delivers a signal
sent from outside a PID namespace to the namespace's PID 1 only if PID 1 handles it: a `python`
started as PID 1 without a SIGTERM handler never sees it, and runs on until the SIGKILL. This
runner is PID 1 instead. It:

- starts the command as its only child (same stdin/stdout/stderr, environment and directory);
- forwards SIGTERM, SIGINT and SIGHUP to that child (the child's pid only, as `tini` does: the
  child decides what its own children get; `xm_launch.steps` passes SIGTERM on to its step);
- reaps every process that ends up its child: as PID 1 the kernel re-parents every orphan of the
  namespace to it (elsewhere it asks to be a "child subreaper" so that the same holds), so no
  exited process stays a zombie;
- exits with the child's status: its exit code, or 128 + N if signal N killed it (the shell's
  convention: 143 for SIGTERM, 137 for SIGKILL).

Exit codes that the launcher's failure policy reads:
- `RESTART_EXIT_CODE` (42): preempted, state saved, restart me. A training process that received
  SIGTERM stops at a step that every host agrees on, saves T5X's emergency checkpoint and exits
  with it (`melodi_t5x.preemption`); the step runner exits with it when SIGTERM came while a step
  ran. The runner passes it through like any other code.
- 128 + N: killed by signal N before it could save (e.g. SIGTERM during start-up, before the
  trainer handles it): nothing after the last checkpoint was kept; also a restart.

Standard library only (no JAX, no TensorFlow): it starts in milliseconds and cannot fail on an
import of the job's stack.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence

from melodi_t5x import exit_codes  # no imports of its own

# Exit code of a process that was preempted (SIGTERM) after saving its state: the JobSet restarts
# it (`melodi_t5x.exit_codes`, the one definition).
RESTART_EXIT_CODE = exit_codes.RESTART_EXIT_CODE
# Signals the runner passes on to its child.
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
# prctl(2) option: orphaned descendants are re-parented to this process instead of to init.
_PR_SET_CHILD_SUBREAPER = 36


def exit_code(wait_status: int) -> int:
  """The shell's exit code for a `waitpid` status: the code, or 128 + the killing signal."""
  if os.WIFSIGNALED(wait_status):
    return 128 + os.WTERMSIG(wait_status)
  return os.WEXITSTATUS(wait_status)


def returncode_exit_code(returncode: int) -> int:
  """The shell's exit code for a `subprocess` return code (-N: killed by signal N)."""
  return 128 - returncode if returncode < 0 else returncode


class Forwarder:
  """While entered, every signal of `signals` that this process receives is sent to `pid`.

  A signal that arrives before the child exists is sent once `attach` names it. Python runs
  signal handlers in the main thread only; entered from another thread, the forwarder installs
  nothing (the signals keep their current handling). Leaving restores the previous handlers.
  """

  def __init__(
    self, signals: Sequence[int] = FORWARDED_SIGNALS, log: Callable[[str], None] | None = None
  ):
    self.signals = tuple(signals)
    # Every forwarded signal received, in order.
    self.received: list[int] = []
    self._log = log
    self._pid: int | None = None
    self._pending: list[int] = []
    self._previous: dict[int, object] = {}

  def __enter__(self) -> Forwarder:
    if threading.current_thread() is threading.main_thread():
      for sig in self.signals:
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous.clear()

  def attach(self, pid: int) -> None:
    """Forwards to `pid` from now on, first the signals that came before it existed."""
    self._pid = pid
    pending, self._pending = self._pending, []
    for sig in pending:
      self._send(sig)

  def _handle(self, signum: int, frame) -> None:
    del frame
    self.received.append(signum)
    if self._pid is None:
      self._pending.append(signum)
    else:
      self._send(signum)

  def _send(self, sig: int) -> None:
    if self._log:
      self._log(f'forwarding {signal.Signals(sig).name} to pid {self._pid}')
    try:
      os.kill(self._pid, sig)
    except ProcessLookupError:
      pass  # it has just exited; its status is reaped as usual


def become_subreaper() -> bool:
  """Asks Linux to re-parent orphaned descendants to this process; False where not possible."""
  if not sys.platform.startswith('linux'):
    return False
  try:
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
  except (OSError, AttributeError):
    return False


def wait_reaping(pid: int) -> int:
  """Waits for `pid`, reaping every other child that exits meanwhile; returns its wait status."""
  while True:
    # Retried after each signal handler (PEP 475); other children are reaped and forgotten.
    done, status = os.waitpid(-1, 0)
    if done == pid:
      return status


def run(command: Sequence[str], log: Callable[[str], None] | None = None) -> int:
  """Runs `command` as this process's child with signals forwarded; returns its exit code."""
  if os.getpid() != 1:
    become_subreaper()
  with Forwarder(FORWARDED_SIGNALS, log) as forwarder:
    try:
      child = subprocess.Popen(list(command))
    except OSError as e:
      if log:
        log(f'cannot start {command[0]!r}: {e}')
      return 127 if isinstance(e, FileNotFoundError) else 126
    forwarder.attach(child.pid)
    if log:
      log(f'pid {os.getpid()}: started pid {child.pid}: {" ".join(command)}')
    status = wait_reaping(child.pid)
    code = exit_code(status)
    child.returncode = code  # reaped here: Popen must not wait for it again
  if log:
    log(f'pid {child.pid} exited with {_describe(code)}')
  return code


def _describe(code: int) -> str:
  if code == RESTART_EXIT_CODE:
    return f'{code} (preempted after saving: restart)'
  if code > 128 and code - 128 in signal.valid_signals():
    return f'{code} (killed by {signal.Signals(code - 128).name})'
  return str(code)


def _log(line: str) -> None:
  print(f'[xm_launch.runner] {line}', file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if argv[:1] == ['--']:
    argv = argv[1:]
  if not argv or argv[0].startswith('-'):
    print('usage: python -m xm_launch.runner -- COMMAND [ARGS...]', file=sys.stderr)
    return 2
  return run(argv, _log)


if __name__ == '__main__':
  sys.exit(main())
