"""Makes melodi-t5x's gin files includable from any working directory.

The repository's gin files live in `<repo>/gin/` and include each other by repository-relative
paths (`include 'gin/models/melodi_base.gin'`). Gin resolves such a path against the current
directory and its search paths; importing this module (every melodi-t5x gin file starts with
`import melodi_t5x.t5x_gin` before its includes) adds the repository root to the search paths.

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

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIN_DIR = os.path.join(REPO_ROOT, 'gin')


def register_search_path() -> str:
  """Adds the repository root to gin's config search paths (once); returns it."""
  from gin import config as gin_config  # pylint: disable=g-import-not-at-top

  if REPO_ROOT not in gin_config._LOCATION_PREFIXES:  # pylint: disable=protected-access
    gin.add_config_file_search_path(REPO_ROOT)
  return REPO_ROOT


register_search_path()
