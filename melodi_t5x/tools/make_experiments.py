r"""Writes the experiment gin files of the suite from `melodi_t5x.experiments`.

Usage:
  python -m melodi_t5x.tools.make_experiments           # (re)write gin/experiments/{main,ablations}
  python -m melodi_t5x.tools.make_experiments --check   # exit 1 if the committed files differ

The committed files are what users and the launcher run; edit the grids in
`melodi_t5x/experiments.py` and regenerate. Stale `.gin` files in the generated folders are
removed.
"""

from __future__ import annotations

import argparse
import os
import sys

from melodi_t5x import experiments

GENERATED_FOLDERS = ('main', 'ablations')


def expected_files() -> dict[str, str]:
  """Repository-relative path -> text of every generated file (gin files and `__init__.py`s)."""
  files = {}
  for exp in experiments.all_committed():
    files[exp.path] = experiments.render(exp)
    folder = os.path.dirname(exp.path)
    while folder != experiments.EXPERIMENTS_DIR:
      files.setdefault(os.path.join(folder, '__init__.py'), '')
      folder = os.path.dirname(folder)
  return files


def existing_files() -> set[str]:
  """Files currently in the generated folders (repository-relative)."""
  out = set()
  for top in GENERATED_FOLDERS:
    root = os.path.join(experiments.REPO_ROOT, experiments.EXPERIMENTS_DIR, top)
    for dirpath, dirnames, filenames in os.walk(root):
      dirnames[:] = [d for d in dirnames if d != '__pycache__']
      for name in filenames:
        if name.endswith('.gin') or name == '__init__.py':
          out.add(os.path.relpath(os.path.join(dirpath, name), experiments.REPO_ROOT))
  return out


def differences() -> list[str]:
  """What --check reports: missing, changed and stale files."""
  want = expected_files()
  have = existing_files()
  out = []
  for path, text in sorted(want.items()):
    full = os.path.join(experiments.REPO_ROOT, path)
    if path not in have:
      out.append(f'missing: {path}')
    elif open(full).read() != text:
      out.append(f'changed: {path}')
  out += [f'stale: {p}' for p in sorted(have - set(want))]
  return out


def write() -> int:
  want = expected_files()
  for path, text in want.items():
    full = os.path.join(experiments.REPO_ROOT, path)
    os.makedirs(os.path.dirname(full), exist_ok=True)
    with open(full, 'w') as f:
      f.write(text)
  stale = existing_files() - set(want)
  for path in stale:
    os.remove(os.path.join(experiments.REPO_ROOT, path))
  print(f'wrote {len(want)} files, removed {len(stale)} stale ones.')
  return 0


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--check', action='store_true', help='only compare; exit 1 on differences')
  args = parser.parse_args(argv)
  if args.check:
    diff = differences()
    for line in diff:
      print(line)
    if diff:
      print('Run: python -m melodi_t5x.tools.make_experiments', file=sys.stderr)
    return 1 if diff else 0
  return write()


if __name__ == '__main__':
  raise SystemExit(main())
