"""Runs a T5X entry point as one process of a multi-process JAX job (CPU or GPU hosts).

  python -m melodi_t5x.multihost --coordinator_address=10.0.0.1:8476 --num_processes=2 \
    --process_id=0 [--cpu_collectives=gloo] -- t5x.eval --gin_file=... [T5X flags]

initialises `jax.distributed` (before any JAX backend starts), then runs the named module as
`__main__` with the remaining arguments. `t5x.train` can do the first step itself
(`--multiprocess_gpu --coordinator_address=... --process_count=... --process_index=...`), but
`t5x.eval` and `t5x.infer` cannot; this wrapper serves all three. On Cloud TPU it is not needed:
run the plain command on every host (JAX finds the other hosts itself).

A run stopped by a preemption (SIGTERM; T5X saved its emergency checkpoint) exits with
`RESTART_EXIT_CODE` (42, `melodi_t5x.preemption`).
"""

from __future__ import annotations

import argparse
import runpy
import sys
from collections.abc import Sequence


def parse(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
  """Splits `argv` into this wrapper's settings and the module with its own arguments."""
  argv = list(argv)
  if '--' not in argv:
    raise SystemExit('usage: python -m melodi_t5x.multihost [settings] -- MODULE [ARGS...]')
  split = argv.index('--')
  parser = argparse.ArgumentParser(prog='python -m melodi_t5x.multihost')
  parser.add_argument('--coordinator_address', required=True, help='host:port of process 0.')
  parser.add_argument('--num_processes', type=int, required=True)
  parser.add_argument('--process_id', type=int, required=True)
  parser.add_argument(
    '--cpu_collectives',
    default=None,
    help="cross-process collectives on CPU devices ('gloo'); needed for CPU hosts.",
  )
  settings = parser.parse_args(argv[:split])
  rest = argv[split + 1 :]
  if not rest:
    raise SystemExit('name the module to run after --, e.g. -- t5x.train --gin_file=...')
  if not 0 <= settings.process_id < settings.num_processes:
    raise SystemExit(
      f'--process_id={settings.process_id} must be in [0, {settings.num_processes}) '
      '(--num_processes).'
    )
  return settings, rest


def main(argv: Sequence[str]) -> None:
  settings, rest = parse(argv)
  import jax  # pylint: disable=g-import-not-at-top

  if settings.cpu_collectives:
    jax.config.update('jax_cpu_collectives_implementation', settings.cpu_collectives)
  jax.distributed.initialize(
    settings.coordinator_address, settings.num_processes, settings.process_id
  )
  module = rest[0][3:] if rest[0].startswith('-m ') else rest[0]
  sys.argv = [module, *rest[1:]]
  try:
    runpy.run_module(module, run_name='__main__', alter_sys=True)
  except Exception as e:  # pylint: disable=broad-except
    from melodi_t5x import preemption  # pylint: disable=g-import-not-at-top

    if not preemption.is_preemption(e):
      raise
    print(f'preempted, restart me (exit {preemption.RESTART_EXIT_CODE}): {e}', file=sys.stderr)
    raise SystemExit(preemption.RESTART_EXIT_CODE) from e


if __name__ == '__main__':
  main(sys.argv[1:])
