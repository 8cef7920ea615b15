"""Imports gin-config even when the repository's `gin/` config folder shadows it.

With the repository root on sys.path (`python -m ...` or `python -c ...` run from the root), the
folder `gin/` (a package holding .gin files) is found before the installed gin-config. Then
`gin.configurable` does not exist. This loads the installed gin-config instead and makes it the
`gin` module for the rest of the process.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
import types


def import_gin_config() -> types.ModuleType:
  """Returns the gin-config module (loading it past a shadowing `gin/` folder if needed)."""
  import gin  # pylint: disable=g-import-not-at-top

  if hasattr(gin, 'configurable'):
    return gin
  shadow_dir = os.path.dirname(os.path.dirname(os.path.abspath(gin.__file__)))
  path = [p for p in sys.path if os.path.abspath(p or os.curdir) != shadow_dir]
  spec = importlib.machinery.PathFinder.find_spec('gin', path)
  if spec is None or spec.loader is None:
    raise ImportError('gin-config is not installed: pip install gin-config (see requirements.txt).')
  for name in [n for n in sys.modules if n == 'gin' or n.startswith('gin.')]:
    del sys.modules[name]
  module = importlib.util.module_from_spec(spec)
  sys.modules['gin'] = module
  spec.loader.exec_module(module)
  return module


gin = import_gin_config()
