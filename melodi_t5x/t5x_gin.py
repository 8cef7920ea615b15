"""Makes melodi-t5x's gin files includable from any working directory, installed or not.

The gin files live in a `gin/` folder and include each other by paths relative to the folder
above it (`include 'gin/models/common.gin'`). Gin resolves such a path against the current
directory and its search paths; importing this module (every melodi-t5x gin file starts with
`import melodi_t5x.t5x_gin` before its includes) adds `GIN_ROOT`, the folder that holds `gin/`:
- running from a checkout (`pip install -e .` or `PYTHONPATH=<repo>`): the repository root;
- installed from a wheel (`pip install .`): the installed `melodi_t5x/` package, where setup.py
  puts the whole `gin/` tree as package data (`melodi_t5x/gin/...`).

The top-level `--gin_file` is looked up by T5X before any of our code is imported, so from outside
the repository root pass the same root as a search path (printed by `python -m melodi_t5x.t5x_gin`):

  python -m t5x.train --gin_search_paths="$(python -m melodi_t5x.t5x_gin)" \
    --gin_file=gin/quickstart.gin ...

Why not a Python package named `gin`: a top-level package `gin` would shadow the gin-config
library itself (`import gin` would import the folder) whenever the repository root is on
`sys.path`, e.g. `python -m t5x.train` run from a clone (`AttributeError: module 'gin' has no
attribute 'configurable'`). So `gin/` itself has no `__init__.py` (gin-config, a regular package,
then wins over the folder) and inclusion goes through the search path. The sub-folders keep an
`__init__.py`, but they are not importable as `gin.models` etc.
"""

from __future__ import annotations

import os

import gin

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
# A file every gin tree of this project has; a bare `gin/` folder is not enough (site-packages
# holds gin-config's `gin/` next to an installed `melodi_t5x/`).
_MARKER = os.path.join('gin', 'quickstart.gin')


def find_gin_root() -> str:
  """The folder that holds melodi-t5x's `gin/` tree: installed package data, else the checkout."""
  candidates = [_PACKAGE_DIR, os.path.dirname(_PACKAGE_DIR)]
  for root in candidates:
    if os.path.isfile(os.path.join(root, _MARKER)):
      return root
  raise FileNotFoundError(
    f'melodi-t5x gin files not found: no {_MARKER} under {candidates}. Install the package from '
    'a repository checkout (`pip install .` ships gin/ as melodi_t5x/gin/) or run from the '
    'checkout (`pip install -e .` or PYTHONPATH=<repo>).'
  )


GIN_ROOT = find_gin_root()
GIN_DIR = os.path.join(GIN_ROOT, 'gin')


def register_search_path() -> str:
  """Adds `GIN_ROOT` to gin's config search paths (once); returns it."""
  from gin import config as gin_config  # pylint: disable=g-import-not-at-top

  if GIN_ROOT not in gin_config._LOCATION_PREFIXES:  # pylint: disable=protected-access
    gin.add_config_file_search_path(GIN_ROOT)
  return GIN_ROOT


register_search_path()

if __name__ == '__main__':
  print(GIN_ROOT)
