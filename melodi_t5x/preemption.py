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
  host's background thread reports the last counter it passed to
  `multihost_utils.reached_preemption_sync_point`, and the sync point is one past the largest. The
  call then turns true on every host at that same counter, even if only one host was signalled.
  No Python SIGTERM handler is installed (it would replace JAX's).
- one process without `jax.distributed` (a one-host slice, a workstation): a Python SIGTERM
  handler, installed at the first training step, sets a flag; training stops before its next step.
  A second SIGTERM kills the process at once (the default action).
- several processes without `jax.distributed`: the hosts could not agree on a step (one stopping
  alone would leave the others waiting in a collective), so nothing is installed; a warning says so.

Counters are global steps (the train state's step before each step), as Orbax's checkpoint manager
passes them to the same call when it saves. A notice that comes before any host has passed a
counter (during the restore or the compile) puts the sync point at 1, which a resumed run never
meets; so at its first step every process also asks the coordination service whether a notice
came, and all hosts stop there if any saw one (one collective, once per process).

The state at the stop is saved unless nothing new would be: `PreemptedBeforeTraining` instead when
the process has not trained a step, or when the stop falls on a step whose checkpoint exists (a
periodic save just before). The train summary of the stats period in which the run stopped is not
written (T5X's own handling of `PreemptionError`); the resumed run writes its summaries from the
restart step on.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
from absl import logging
from jax._src import distributed as jax_distributed  # the coordination client (no public API)
from jax.experimental import multihost_utils
from t5x import trainer as trainer_lib

from melodi_t5x.exit_codes import RESTART_EXIT_CODE

# The coordination-store key under which JAX's preemption service (TSL's preemption sync manager)
# records a notice; read once per process, at its first step.
PREEMPTION_NOTICE_KEY = 'RECEIVED_PREEMPTION_NOTICE'

__all__ = [
  'RESTART_EXIT_CODE',
  'PreemptedBeforeTraining',
  'PreemptionWatch',
  'StoppingBatches',
  'SyncPointReached',
  'is_preemption',
]


class PreemptedBeforeTraining(Exception):
  """Preempted with nothing new to save (no step trained since the restore or the last save)."""


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

  `should_stop(step)` must be called before every step this process trains, in order, with the
  train state's step, and `started` after each step is started.
  """

  def __init__(self):
    # 'sync' (JAX's preemption service), 'local' (SIGTERM flag) or 'off'; None until first use.
    self.mode: str | None = None
    # Steps started by this process.
    self.steps = 0

  def _start(self) -> str:
    if jax.distributed.is_initialized():
      try:
        multihost_utils.reached_preemption_sync_point(0)
      except RuntimeError as e:  # jax_enable_preemption_service is off
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

  def should_stop(self, step: int) -> bool:
    """True: stop with the train state at `step` (on every host at the same step)."""
    first = self.mode is None
    if first:
      self.mode = self._start()
      logging.info('Preemption watch: %s.', self.mode)
    if self.mode == 'sync':
      reached = bool(multihost_utils.reached_preemption_sync_point(int(step)))
      return reached or (first and _notice_on_any_host())
    return self.mode == 'local' and _SIGTERM.received

  def started(self) -> None:
    """Counts a step as started."""
    self.steps += 1


def _notice_on_any_host() -> bool:
  """Whether any host's coordination service already holds a preemption notice (a collective)."""
  seen = _notice_received()
  return bool(np.any(multihost_utils.process_allgather(np.asarray(seen))))


def _notice_received() -> bool:
  """Whether JAX's preemption service has recorded a notice (its key in the coordination store)."""
  client = getattr(jax_distributed.global_state, 'client', None)
  if client is None:
    return False
  try:
    client.key_value_try_get(PREEMPTION_NOTICE_KEY)
  except Exception:  # pylint: disable=broad-except  # NOT_FOUND: no notice
    return False
  return True


class StoppingBatches(Iterator):
  """The training batches, raising `SyncPointReached` instead of the batch of the step to stop at.

  The watch is asked before each batch is drawn, so the data iterator has given exactly the
  batches of the steps that ran: a checkpoint saved then resumes with the next one.
  """

  def __init__(self, batches: Iterator[Any], watch: PreemptionWatch, first_step: int):
    self._batches = batches
    self._watch = watch
    # The train state's step before the next batch.
    self.step = int(first_step)

  def __next__(self) -> Any:
    if self._watch.should_stop(self.step):
      raise SyncPointReached()
    batch = next(self._batches)
    self._watch.started()
    self.step += 1
    return batch
