"""Package layout of melodi-t5x (metadata lives in pyproject.toml).

Python packages and data are found by pattern, so new modules and gin files ship without edits:
- every package under `melodi_t5x/`, `tasks/` and `xm_launch/`, with their `*.model`, `*.vocab` and
  `*.json` files (e.g. `tasks/local_books_4k.model`);
- the repository's `gin/` tree, every `*.gin` file in every sub-folder, installed as
  `melodi_t5x/gin/...`. In the checkout `gin/` stays a plain folder at the top (a top-level package
  named `gin` would shadow gin-config); `melodi_t5x.t5x_gin` puts whichever of the two roots exists
  on gin's search path, so `include 'gin/models/...'` resolves in both.
"""

from __future__ import annotations

import os

import setuptools

_ROOTS = ('melodi_t5x', 'tasks', 'xm_launch')
_DATA = ['*.model', '*.vocab', '*.json']


def _gin_packages() -> list[str]:
  """`melodi_t5x.gin` and one `melodi_t5x.gin.<sub>` per folder of `gin/`, recursively."""
  packages = []
  for folder, subfolders, _ in os.walk('gin'):
    subfolders[:] = sorted(d for d in subfolders if d != '__pycache__')
    packages.append('melodi_t5x.' + folder.replace(os.sep, '.'))
  return packages


_GIN_PACKAGES = _gin_packages()

setuptools.setup(
  packages=setuptools.find_packages(include=[p for r in _ROOTS for p in (r, r + '.*')])
  + _GIN_PACKAGES,
  package_dir={'melodi_t5x.gin': 'gin'},
  package_data={'': _DATA, **{p: ['*.gin'] for p in _GIN_PACKAGES}},
)
