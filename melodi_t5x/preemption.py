"""Preemption: on SIGTERM every host stops at the same step, T5X saves, the process exits 42.

A pod that Kubernetes stops gets SIGTERM (passed on by `xm_launch.runner` and `xm_launch.steps`)
and, after its grace period, SIGKILL. `MemoryTrainer.train` asks a `PreemptionWatch` before every
training step whether to stop; the first time it says yes, the trainer keeps the state of the last
finished step and raises `t5x.trainer.PreemptionError`, T5X's `train` saves its emergency
checkpoint (with the data position) and re-raises, and the step wrappers (`xm_launch.steps
--module`, `melodi_t5x.multihost`) exit with `RESTART_EXIT_CODE`. A restarted pod resumes from that
checkpoint exactly as from a periodic one.

How a process learns of the SIGTERM:
- `jax.distributed` initialised (multi-host slices): JAX's preemption service. `initialize` installs
  a C-level SIGTERM handler; the host that gets SIGTERM tells the coordination service, every
  host's background thread reports its step counter, and the sync point is one past the largest.
  `multihost_utils.reached_preemption_sync_point(counter)` then turns true on every host at that
  same counter, even if only one host was signalled. No Python SIGTERM handler is installed (it
  would replace JAX's).
- one process without `jax.distributed` (a one-host slice, a workstation): a Python SIGTERM
  handler, installed at the first training step, sets a flag; training stops before its next step.
  A second SIGTERM kills the process at once (the default action).
- several processes without `jax.distributed`: the hosts could not agree on a step (one stopping
  alone would leave the others waiting in a collective), so nothing is installed; a warning says so.

Counters: JAX's protocol counts from the first call in the process (a notice that comes before it
puts the sync point at 1), so the watch counts the steps this process has started, from 1, not the
global step: a resumed run starts at its checkpoint's step, and every host starts at the same one.
A sync point reached before the process trained a step raises `PreemptedBeforeTraining` instead:
the state is the restored checkpoint, so there is nothing to save.

The train summary of the stats period in which the run stopped is not written (T5X's own handling
of `PreemptionError`); the resumed run writes its summaries from the restart step on.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from typing import Any

import jax
from absl import logging
from jax.experimental import multihost_utils
from t5x import trainer as trainer_lib

from xm_launch.runner import RESTART_EXIT_CODE

__all__ = [
  'RESTART_EXIT_CODE',
  'PreemptedBeforeTraining',
  'PreemptionWatch',
  'StoppingBatches',
  'SyncPointReached',
  'is_preemption',
]


class PreemptedBeforeTraining(Exception):
  """SIGTERM came before this process trained a step: nothing new to save, restart."""


class SyncPointReached(Exception):
  """Raised by `StoppingBatches` instead of the next batch: stop before this step."""


def is_preemption(error: BaseException) -> bool:
  """Whether `error` ends a run that should exit with RESTART_EXIT_CODE."""
  return isinstance(error, (trainer_lib.PreemptionError, PreemptedBeforeTraining))


class _SigtermFlag:
  """The one-process notice: a Python SIGTERM handler that records the signal."""

  def __init__(self):
    self.received = False
    self.installed = False

  def install(self) -> bool:
    """Installs the handler (once, from the main thread); False where it cannot."""
    if self.installed:
      return True
    if threading.current_thread() is not threading.main_thread():
      return False
    signal.signal(signal.SIGTERM, self._handle)
    self.installed = True
    return True

  def _handle(self, signum: int, frame: Any) -> None:
    del frame
    if self.received:  # the second SIGTERM: stop now
      signal.signal(signum, signal.SIG_DFL)
      os.kill(os.getpid(), signum)
      return
    self.received = True
    logging.warning('SIGTERM: training stops before its next step and saves a checkpoint.')


_SIGTERM = _SigtermFlag()


class PreemptionWatch:
  """Says before each training step whether to stop for a preemption (every host alike).

  `should_stop` must be called before every step this process trains, in order, and `started`
  after each step is started (see the module docstring for the counter).
  """

  def __init__(self):
    # 'sync' (JAX's preemption service), 'local' (SIGTERM flag) or 'off'; None until first use.
    self.mode: str | None = None
    # Steps started by this process.
    self.steps = 0

  def _start(self) -> str:
    if jax.distributed.is_initialized():
      try:
        multihost_utils.reached_preemption_sync_point(0)  # a counter no step uses
      except RuntimeError as e:
        logging.warning('No preemption saves: %s', e)
        return 'off'
      return 'sync'
    if jax.process_count() > 1:
      logging.warning(
        'No preemption saves: %d processes without jax.distributed.initialize() cannot agree on '
        'a step to stop at (run through xm_launch.steps --distributed or melodi_t5x.multihost).',
        jax.process_count(),
      )
      return 'off'
    if not _SIGTERM.install():
      logging.warning('No preemption saves: training runs outside the main thread.')
      return 'off'
    return 'local'

  def should_stop(self) -> bool:
    """True: stop before the next step (on every host at the same step)."""
    if self.mode is None:
      self.mode = self._start()
      logging.info('Preemption watch: %s.', self.mode)
    if self.mode == 'sync':
      return bool(multihost_utils.reached_preemption_sync_point(self.steps + 1))
    return self.mode == 'local' and _SIGTERM.received

  def started(self) -> None:
    """Counts a step as started."""
    self.steps += 1


class StoppingBatches(Iterator):
  """The training batches, raising `SyncPointReached` instead of the batch of the step to stop at.

  The watch is asked before each batch is drawn, so the data iterator has given exactly the
  batches of the steps that ran: a checkpoint saved then resumes with the next one.
  """

  def __init__(self, batches: Iterator[Any], watch: PreemptionWatch):
    self._batches = batches
    self._watch = watch

  def __next__(self) -> Any:
    if self._watch.should_stop():
      raise SyncPointReached()
    batch = next(self._batches)
    self._watch.started()
    return batch
