"""Optional dependencies of the tests: skipped on a user's machine, required in CI.

A user without T5X (or libtpu) still runs the rest of the suite; those tests are reported as
skipped with the reason and the install command. CI installs both (`.ci/run`), so there a missing
module is a failure: with `CI` set (CI sets `CI=true`), `importorskip` and `skip` fail the test
instead of skipping it, and a broken T5X install cannot land as a green run of skips.
"""

from __future__ import annotations

import importlib
import os

import pytest

T5X_REASON = (
  't5x not installed: pip install --no-deps -r requirements-t5x.txt (docs/t5x.md), '
  'or bash .ci/install_t5x with the pinned wheels'
)
LIBTPU_REASON = 'libtpu not installed: pip install --no-deps -r requirements-tpu.txt'


def in_ci() -> bool:
  return os.environ.get('CI', '').strip().lower() not in ('', '0', 'false', 'no')


def skip(reason: str) -> None:
  """Skips the test, or fails it in CI (where every optional dependency is installed)."""
  if in_ci():
    pytest.fail(f'CI must not skip this test: {reason}', pytrace=False)
  pytest.skip(reason, allow_module_level=True)


def importorskip(name: str, reason: str = T5X_REASON):
  """`pytest.importorskip`, except that in CI a module that does not import fails the test."""
  try:
    return importlib.import_module(name)
  except ImportError as e:
    skip(f'{reason} ({type(e).__name__}: {e})')


def t5x():
  return importorskip('t5x', T5X_REASON)


def libtpu():
  return importorskip('libtpu', LIBTPU_REASON)
