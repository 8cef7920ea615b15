"""A non-editable install works: the wheel ships every gin file and they resolve from anywhere.

Builds the wheel from a copy of the source tree, checks it holds every `*.gin` file of `gin/`,
installs it (no deps) into a venv that reuses this interpreter's site-packages, and from a
directory outside the repository, with PYTHONPATH cleared, parses the quickstart the way
`python -m t5x.train --gin_search_paths=$(python -m melodi_t5x.t5x_gin) --gin_file=...` does
(with T5X absent: the model file chain only, as T5X's run files cannot be included).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import site
import subprocess
import sys
import zipfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE = ['pyproject.toml', 'setup.py', 'README.md', 'melodi_t5x', 'tasks', 'xm_launch', 'gin']
HAS_T5X = importlib.util.find_spec('t5x') is not None

pytestmark = pytest.mark.slow

# Run in the venv, from an unrelated cwd, before anything of melodi_t5x is imported: T5X's order
# (search paths, then the flag's gin file, whose first import is melodi_t5x.t5x_gin).
_PARSE = r"""
import json, os, sys
import gin
root = sys.argv[1]
if sys.argv[2] == 't5x':
  from t5x import gin_utils
  from t5x.train import _DEFAULT_GIN_SEARCH_PATHS, train  # `train`: gin's `train_script.train`
  gin_utils.parse_gin_flags(
    [root] + _DEFAULT_GIN_SEARCH_PATHS, ['gin/quickstart.gin'], ["MODEL_DIR = '/nonexistent'"]
  )
  steps = gin.query_parameter('%TRAIN_STEPS')
else:
  gin.add_config_file_search_path(root)
  gin.parse_config_files_and_bindings(
    ['gin/models/melodi_base.gin', 'gin/models/tiny.gin'],
    ["MIXTURE_OR_TASK_NAME = 'local_books'"],
    skip_unknown=['adafactor.Adafactor', 't5x_model.MemoryDecoderModel'],
    finalize_config=False,
  )
  steps = None
import melodi_t5x
from gin import config as gin_config
def value(binding):  # the bound value, through macros (common.gin binds the sizes to macros)
  v = gin.query_parameter(binding)
  while hasattr(v, 'scoped_configurable_fn'):
    v = v.scoped_configurable_fn()
  return v
print(json.dumps({
  'melodi_t5x': melodi_t5x.__file__,
  'gin_root': sys.modules['melodi_t5x.t5x_gin'].GIN_ROOT,
  # Search paths (cwd-relative ones made absolute) that hold a gin tree of this project.
  'trees': [os.path.abspath(p) for p in gin_config._LOCATION_PREFIXES
            if os.path.isfile(os.path.join(p, 'gin', 'quickstart.gin'))],
  'train_steps': steps,
  'num_layers': value('melodi_t5x.config.with_shared_fields.num_layers'),
  'embed_dim': value('melodi_t5x.config.with_shared_fields.embed_dim'),
}))
"""


def _run(cmd, cwd, env=None):
  proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
  assert proc.returncode == 0, f'{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}'
  return proc.stdout


def _venv_seeing_this_interpreter(venv) -> str:
  """A venv whose `import` finds this interpreter's packages after its own; returns its python.

  `venv --system-site-packages` would expose the *base* interpreter's site-packages, which is not
  where the stack lives when the tests run inside a virtualenv. Instead the child gets a `.pth`
  that runs `site.addsitedir` on each site-packages folder of the running interpreter (virtualenv
  or system install alike), so their own `.pth` files (editable installs such as t5x's) apply too,
  behind the child's own site-packages where the wheel is installed.
  """
  _run([sys.executable, '-m', 'venv', '--without-pip', str(venv)], REPO)
  python = str(venv / 'bin' / 'python')
  purelib = _run([python, '-c', 'import sysconfig; print(sysconfig.get_path("purelib"))'], REPO)
  parents = [p for p in site.getsitepackages() if os.path.isdir(p)]
  assert parents, 'the running interpreter has no site-packages folder'
  lines = [f'import site; site.addsitedir({p!r})' for p in parents]
  with open(os.path.join(purelib.strip(), '_melodi_test_parent_site.pth'), 'w') as f:
    f.write('\n'.join(lines) + '\n')
  return python


def _repo_gin_files() -> list[str]:
  out = []
  for folder, _, files in os.walk(os.path.join(REPO, 'gin')):
    out += [
      os.path.relpath(os.path.join(folder, f), REPO).replace(os.sep, '/')
      for f in files
      if f.endswith('.gin')
    ]
  return sorted(out)


def test_wheel_ships_gin_files_and_parses_outside_the_repo(tmp_path):
  src = tmp_path / 'src'
  src.mkdir()
  ignore = shutil.ignore_patterns('__pycache__', '*.egg-info', 'build')
  for name in SOURCE:
    path = os.path.join(REPO, name)
    if os.path.isdir(path):
      shutil.copytree(path, src / name, ignore=ignore)
    else:
      shutil.copy(path, src / name)
  pip = [sys.executable, '-m', 'pip', '--disable-pip-version-check']
  _run(pip + ['wheel', str(src), '--no-deps', '--no-build-isolation', '-w', str(tmp_path)], REPO)
  (wheel,) = [p for p in tmp_path.iterdir() if p.suffix == '.whl']

  # Every gin file of the repository, byte for byte, under melodi_t5x/gin/.
  gin_files = _repo_gin_files()
  assert 'gin/quickstart.gin' in gin_files and 'gin/models/tiny.gin' in gin_files
  with zipfile.ZipFile(wheel) as z:
    names = set(z.namelist())
    for rel in gin_files:
      assert f'melodi_t5x/{rel}' in names, f'{rel} missing from {wheel.name}'
      assert z.read(f'melodi_t5x/{rel}') == open(os.path.join(REPO, rel), 'rb').read(), rel
    assert 'tasks/local_books_4k.model' in names
    assert 'melodi_t5x/architectures/melodi.py' in names
    # No top-level `gin` package that would shadow gin-config.
    assert not any(n.startswith('gin/') for n in names)

  venv = tmp_path / 'venv'
  python = _venv_seeing_this_interpreter(venv)
  _run(pip + ['--python', python, 'install', '--no-deps', '--force-reinstall', str(wheel)], REPO)

  elsewhere = tmp_path / 'elsewhere'
  elsewhere.mkdir()
  env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
  env.setdefault('JAX_PLATFORMS', 'cpu')
  root = _run([python, '-m', 'melodi_t5x.t5x_gin'], elsewhere, env).strip().splitlines()[-1]
  site = _run(
    [python, '-c', 'import sysconfig; print(sysconfig.get_path("purelib"))'], elsewhere, env
  )
  installed = os.path.join(site.strip(), 'melodi_t5x')
  assert root == installed

  out = _run([python, '-c', _PARSE, root, 't5x' if HAS_T5X else 'no_t5x'], elsewhere, env)
  got = json.loads(out.strip().splitlines()[-1])
  assert got['melodi_t5x'] == os.path.join(installed, '__init__.py')
  assert got['gin_root'] == installed
  # The only gin tree gin could have read is the installed one (no checkout on its search path).
  assert got['trees'] == [installed]
  # Values set in gin/models/tiny.gin, reached through the repo-relative include chain.
  assert (got['num_layers'], got['embed_dim']) == (2, 64)
  if HAS_T5X:
    assert got['train_steps'] == 400  # gin/quickstart.gin itself


def test_child_venv_sees_the_packages_of_a_parent_virtualenv(tmp_path):
  """The child venv of the wheel test, built from inside a virtualenv, still imports the stack."""
  parent = _venv_seeing_this_interpreter(tmp_path / 'parent')
  tests = os.path.dirname(os.path.abspath(__file__))
  make_child = (
    f'import sys; sys.path.insert(0, {tests!r}); import test_packaging as t; import pathlib; '
    f'print(t._venv_seeing_this_interpreter(pathlib.Path({str(tmp_path / "child")!r})))'
  )
  env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
  child = _run([parent, '-c', make_child], tmp_path, env).strip().splitlines()[-1]
  out = _run([child, '-c', 'import sys, gin, jax; print(sys.prefix)'], tmp_path, env)
  assert out.strip().splitlines()[-1] == str(tmp_path / 'child')
