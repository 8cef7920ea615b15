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

Importing this module also quiets gin's `Path not found` errors of search-path probes that miss
(`_GinPathProbeFilter`), and registers a gin finalize hook that stops `t5x.train` / `t5x.eval` /
`t5x.infer` when a command-line macro binding (`--gin.TRAIN_STEP=40`) names a macro that no
configuration of the run uses and no gin file of melodi-t5x or T5X knows (a typo gin would
otherwise ignore), naming the closest macro the run uses (`check_command_line_macros`).

Every command-line tool of the project speaks T5X's gin flags through `add_gin_flags` /
`parse_args` / `parse_gin` here: `--gin_file` (repeatable), `--gin.NAME=VALUE` and
`--gin_bindings='NAME = VALUE'` (repeatable), `--gin_search_paths` (comma-separated). Older
spellings (`--gin_param`, `--binding`) stay as deprecated aliases of `--gin_bindings`.
"""

from __future__ import annotations

import argparse
import difflib
import functools
import glob
import importlib.util
import logging as py_logging
import os
import re
import sys
import warnings
from collections.abc import Iterable, Mapping, Sequence

import gin
from absl import logging

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


class _GinPathProbeFilter(py_logging.Filter):
  """Drops gin-config's error-level `Path not found: gin/models/...` lines.

  For each include, gin tries every search path in turn; its package-resource reader logs that
  error (on the root logger) for each prefix that does not hold the file, e.g. 11 lines when
  training from another folder with `--gin_search_paths`, although the file is then found. A file
  that no prefix holds still fails, with gin's own `Unable to open file: ... Searched config
  paths` error.
  """

  def filter(self, record: py_logging.LogRecord) -> bool:
    return not (
      record.msg == 'Path not found: %s'
      and record.pathname.endswith(os.path.join('gin', 'resource_reader.py'))
    )


if not any(isinstance(f, _GinPathProbeFilter) for f in py_logging.getLogger().filters):
  py_logging.getLogger().addFilter(_GinPathProbeFilter())


# -- command-line macros that nothing uses ---------------------------------------------------------

# `NAME = value` with a name without dots or scopes: a gin macro binding.
_MACRO_BINDING = re.compile(r'^\s*([A-Za-z_]\w*)\s*=(?!=)')
# A macro bound or referenced in a gin file (a binding at the start of a line, or `%NAME`).
_FILE_MACRO = re.compile(r'^([A-Za-z_]\w*)\s*=|%([A-Za-z_]\w*)(?![\w.])', re.MULTILINE)


def macro_bindings(bindings: Iterable[str]) -> dict[str, str]:
  """The macros bound by gin binding strings: `{name: binding}` (later bindings win)."""
  out = {}
  for binding in bindings:
    match = _MACRO_BINDING.match(binding)
    if match:
      out[match.group(1)] = binding.strip()
  return out


def referenced_macros(config: Mapping) -> set[str]:
  """Names of the macros (`%NAME`) referenced by the bindings of a gin config (gin's `_CONFIG`)."""
  from gin import config as gin_config  # pylint: disable=g-import-not-at-top

  return {
    '/'.join(ref.scopes)
    for ref in gin_config.iterate_references(config)
    if ref.selector == 'gin.macro'
  }


def _gin_trees() -> list[str]:
  """Folders of gin files whose macros are known names: melodi-t5x's and T5X's `configs/`."""
  trees = [GIN_DIR]
  spec = importlib.util.find_spec('t5x')
  if spec is not None and spec.submodule_search_locations:
    trees += [os.path.join(p, 'configs') for p in spec.submodule_search_locations]
  return trees


@functools.lru_cache(maxsize=1)
def known_macros() -> frozenset[str]:
  """Every macro some gin file of melodi-t5x or T5X binds or references."""
  names = set()
  for tree in _gin_trees():
    for path in glob.glob(os.path.join(tree, '**', '*.gin'), recursive=True):
      with open(path, encoding='utf-8') as f:
        for bound, referenced in _FILE_MACRO.findall(f.read()):
          names.add(bound or referenced)
  return frozenset(names)


def check_command_line_macros(bindings: Sequence[str], config: Mapping | None = None) -> None:
  """Raises ValueError for a command-line macro that is a typo (used by nothing, known nowhere).

  A macro bound on the command line but referenced by no binding of the parsed `config` (default:
  gin's current one) is an error unless some gin file of melodi-t5x or T5X names it (then it is
  only logged: e.g. a sweep's shared `BATCH_SIZE` binding reaching an eval job). The error names
  the macro and the closest macro the configuration uses (difflib).
  """
  from gin import config as gin_config  # pylint: disable=g-import-not-at-top

  config = gin_config._CONFIG if config is None else config  # pylint: disable=protected-access
  used = referenced_macros(config)
  for name, binding in macro_bindings(bindings).items():
    if name in used:
      continue
    if name in known_macros():
      logging.warning(
        'Gin macro %s (command line: %s) is used by no configuration of this run; it has no '
        'effect.',
        name,
        binding,
      )
      continue
    close = difflib.get_close_matches(name, sorted(used), n=3, cutoff=0.6)
    hint = (
      f'did you mean {" or ".join(close)}?'
      if close
      else f'the macros this run uses are {", ".join(sorted(used))}.'
    )
    raise ValueError(
      f'Gin macro {name} (command line: {binding!r}) is used by no configuration of this run and '
      f'no gin file of melodi-t5x or T5X names it, so it would be ignored: {hint}'
    )


def _absl_gin_bindings() -> list[str]:
  """The `--gin_bindings` (and `--gin.NAME=VALUE`) of a T5X main, once absl has parsed them."""
  from absl import flags  # pylint: disable=g-import-not-at-top

  if 'gin_bindings' not in flags.FLAGS or not flags.FLAGS.is_parsed():
    return []
  return list(flags.FLAGS.gin_bindings or [])


def _check_t5x_command_line(config: Mapping) -> None:
  """Gin finalize hook: T5X's mains finalize after parsing the command line's bindings."""
  bindings = _absl_gin_bindings()
  if bindings:
    check_command_line_macros(bindings, config)


gin.config.register_finalize_hook(_check_t5x_command_line)


# -- T5X's gin flags for argparse command lines ----------------------------------------------------


def rewrite_gin_args(argv: Sequence[str]) -> list[str]:
  """`--gin.NAME=VALUE` -> `--gin_bindings=NAME = VALUE` (as T5X's mains read them)."""
  out = []
  for arg in argv:
    if arg.startswith('--gin.'):
      name, sep, value = arg[len('--gin.') :].partition('=')
      if not sep or not name:
        raise SystemExit(f'gin bindings are written --gin.NAME=VALUE; got {arg!r}.')
      arg = f'--gin_bindings={name} = {value}'
    out.append(arg)
  return out


class _DeprecatedBinding(argparse.Action):
  """An old spelling of `--gin_bindings`: appends to it, with a FutureWarning naming the new one."""

  def __call__(self, parser, namespace, values, option_string=None):
    warnings.warn(
      f'{option_string} is deprecated and will be removed in the next release: write '
      f'--gin.NAME=VALUE or --gin_bindings="NAME = VALUE" (as t5x.train).',
      FutureWarning,
      stacklevel=2,
    )
    items = list(getattr(namespace, self.dest, None) or [])
    setattr(namespace, self.dest, [*items, values])


def _search_paths(text: str) -> list[str]:
  return [p for p in text.split(',') if p]


def add_gin_flags(
  parser: argparse.ArgumentParser,
  *,
  gin_files: bool = True,
  gin_file_help: str = 'gin file to parse (repeatable), as in t5x.train',
  deprecated: Sequence[str] = (),
) -> None:
  """Adds T5X's gin flags to an argparse parser (parse with `parse_args`, which reads `--gin.`).

  Args:
    parser: the tool's parser.
    gin_files: whether the tool reads gin files (`--gin_file`, `--gin_search_paths`).
    gin_file_help: help text of `--gin_file`.
    deprecated: older spellings of `--gin_bindings` kept as aliases (e.g. '--gin_param').
  """
  if gin_files:
    parser.add_argument('--gin_file', action='append', default=None, help=gin_file_help)
    parser.add_argument(
      '--gin_search_paths',
      type=_search_paths,
      default=[],
      help='comma-separated folders where gin files are looked up, as in t5x.train',
    )
  parser.add_argument(
    '--gin_bindings',
    action='append',
    default=[],
    help="gin binding 'NAME = VALUE' (repeatable); or --gin.NAME=VALUE, as in t5x.train",
  )
  for flag in deprecated:
    parser.add_argument(
      flag,
      dest='gin_bindings',
      action=_DeprecatedBinding,
      help='deprecated spelling of --gin_bindings',
    )


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None):
  """`parser.parse_args` after rewriting `--gin.NAME=VALUE` (default: the process's argv)."""
  return parser.parse_args(rewrite_gin_args(sys.argv[1:] if argv is None else list(argv)))


def parse_gin(
  args: argparse.Namespace,
  default_files: Sequence[str] = (),
  *,
  extra_bindings: Sequence[str] = (),
  finalize_config: bool = False,
  skip_unknown: bool | Sequence[str] = False,
) -> None:
  """Parses the gin files and bindings of `add_gin_flags` and checks the command-line macros.

  `extra_bindings` (the tool's own) come before the command line's, which win. A command-line
  macro that nothing uses and no gin file knows is an error (`check_command_line_macros`).
  """
  for path in getattr(args, 'gin_search_paths', None) or []:
    gin.add_config_file_search_path(path)
  files = getattr(args, 'gin_file', None) or list(default_files)
  gin.parse_config_files_and_bindings(
    files,
    [*extra_bindings, *args.gin_bindings],
    finalize_config=finalize_config,
    skip_unknown=skip_unknown,
  )
  check_command_line_macros(args.gin_bindings)


def normalize_binding(binding: str) -> str:
  """`NAME = VALUE` -> `NAME=VALUE` (the form the launcher passes on as --gin.NAME=VALUE)."""
  name, sep, value = binding.partition('=')
  if not sep or not name.strip():
    raise SystemExit(f'gin bindings are written NAME=VALUE; got {binding!r}.')
  return f'{name.strip()}={value.strip()}'


if __name__ == '__main__':
  print(GIN_ROOT)
