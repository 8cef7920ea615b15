"""Test-session settings shared by both tiers (see the README's "Tests" section).

A persistent JAX compilation cache: in-process tests and every `python -m t5x.train` / `t5x.eval`
subprocess a test starts (they inherit the environment) reuse compiled programs across tests and
across runs. `MELODI_TEST_JAX_CACHE` picks the folder ('' turns the cache off); the default is a
folder under the user's cache directory, so a second run on the same machine skips most XLA
compilation. Results do not depend on it: a cache entry is keyed by the program, the compiler and
its flags.

Fast compilation: the tests' programs are tiny, so XLA:CPU's LLVM back end compiles them without
its expensive optimisations (`--xla_backend_optimization_level=0`,
`--xla_llvm_disable_expensive_passes`), which roughly halves a cold run. These flags change how
the machine code is optimised, not the HLO program or its float semantics (fast-math stays off).
`MELODI_TEST_FAST_COMPILE=0` turns this off; flags already in `XLA_FLAGS` win.
"""

from __future__ import annotations

import os

_DEFAULT_CACHE = os.path.join(
  os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache'),
  'melodi-t5x',
  'jax-test-cache',
)
_CACHE = os.environ.get('MELODI_TEST_JAX_CACHE', _DEFAULT_CACHE)
_FAST_COMPILE_FLAGS = (
  '--xla_backend_optimization_level=0',
  '--xla_llvm_disable_expensive_passes=true',
)

if os.environ.get('MELODI_TEST_FAST_COMPILE', '1') != '0':
  # Read when JAX starts its backend (after this file), here and in every subprocess a test starts.
  _flags = os.environ.get('XLA_FLAGS', '').split()
  _names = {f.split('=')[0] for f in _flags}
  _flags = [f for f in _FAST_COMPILE_FLAGS if f.split('=')[0] not in _names] + _flags
  os.environ['XLA_FLAGS'] = ' '.join(_flags)

if _CACHE:
  os.makedirs(_CACHE, exist_ok=True)
  # Read by JAX at import, here and in every subprocess a test starts.
  os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', _CACHE)
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.2')
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')
  import jax  # noqa: E402  (after the environment it reads)

  jax.config.update('jax_compilation_cache_dir', os.environ['JAX_COMPILATION_CACHE_DIR'])
  jax.config.update(
    'jax_persistent_cache_min_compile_time_secs',
    float(os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS']),
  )
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
