"""One flag language: every gin-configured command line speaks T5X's gin flags (issue 27 item 7).

`--gin_file` (repeatable), `--gin.NAME=VALUE`, `--gin_bindings` (repeatable) and
`--gin_search_paths` as in `t5x.train`, through `melodi_t5x.t5x_gin.add_gin_flags` / `parse_args`;
the older spellings `--gin_param` (tasks.prepare, tasks.train_vocab) and `--binding` (launcher,
compile check) still work, with a FutureWarning.
"""

from __future__ import annotations

import argparse

import needs
import pytest
from absl import flags

from melodi_t5x import t5x_gin


def test_gin_dot_flags_are_rewritten_as_t5x_does():
  assert t5x_gin.rewrite_gin_args(['--x=1', '--gin.A=1', "--gin.b.c='x=y'"]) == [
    '--x=1',
    '--gin_bindings=A = 1',
    "--gin_bindings=b.c = 'x=y'",
  ]
  with pytest.raises(SystemExit, match='--gin.NAME=VALUE'):
    t5x_gin.rewrite_gin_args(['--gin.A'])


def test_every_spelling_reaches_gin_bindings_in_order():
  parser = argparse.ArgumentParser()
  t5x_gin.add_gin_flags(parser, deprecated=('--gin_param',))
  argv = ['--gin.A=1', '--gin_bindings=B = 2', '--gin_file=x.gin', '--gin_file=y.gin']
  with pytest.warns(FutureWarning, match=r'--gin_param is deprecated.*--gin\.NAME=VALUE'):
    args = t5x_gin.parse_args(parser, [*argv, '--gin_param=C=3', '--gin_search_paths=/p,/q'])
  assert args.gin_bindings == ['A = 1', 'B = 2', 'C=3']
  assert args.gin_file == ['x.gin', 'y.gin'] and args.gin_search_paths == ['/p', '/q']
  assert t5x_gin.normalize_binding('B = 2') == 'B=2'


def test_generate_accepts_t5x_gin_flags():
  """`generate ... --gin.TEMPERATURE=0.0` used to be `unrecognized arguments`."""
  needs.t5x()
  from melodi_t5x.tools import generate  # pylint: disable=g-import-not-at-top

  args = generate.parse_args(
    ['--checkpoint=c', '--prompt_file=p', '--gin.TEMPERATURE=0.0', '--gin_file=gin/infer.gin']
  )
  assert args.gin_bindings == ['TEMPERATURE = 0.0'] and args.gin_file == ['gin/infer.gin']


@pytest.mark.parametrize('module', ['prepare', 'train_vocab'])
def test_tasks_tools_accept_t5x_gin_flags_and_the_old_spelling(module, monkeypatch):
  """`tasks.prepare` / `tasks.train_vocab` parse `--gin.` and `--gin_bindings` (and --gin_param)."""
  import importlib  # pylint: disable=g-import-not-at-top

  tool = importlib.import_module(f'tasks.{module}')
  seen = {}

  def parse_gin(args, **unused):
    seen['bindings'] = list(args.gin_bindings)
    raise SystemExit(0)  # stop before any data is read

  monkeypatch.setattr(t5x_gin, 'parse_gin', parse_gin)
  required = ['--task=local_books', '--split=test', '--out=/tmp/unused', '--output_prefix=/x']
  if module == 'prepare':
    required.remove('--output_prefix=/x')
  else:
    required.remove('--split=test')
    required.remove('--out=/tmp/unused')
  argv = [*required, '--gin.tasks.LocalBooksConfig.chunk_length=64', '--gin_bindings=A = 1']
  with pytest.warns(FutureWarning, match='--gin_param is deprecated'):
    with pytest.raises(SystemExit):
      tool.main([*argv, '--gin_param=B=2'])
  assert seen['bindings'] == ['tasks.LocalBooksConfig.chunk_length = 64', 'A = 1', 'B=2']


def test_launcher_accepts_t5x_gin_flags_and_the_old_spelling():
  from xm_launch import launch  # pylint: disable=g-import-not-at-top

  flags.FLAGS.unparse_flags()
  argv = ['launch', '--gin.TRAIN_STEPS=5', '--gin_bindings=RANDOM_SEED = 3', '--binding=A=1']
  flags.FLAGS(t5x_gin.rewrite_gin_args(argv))
  try:
    with pytest.warns(FutureWarning, match='--binding is deprecated'):
      assert launch.gin_bindings() == ['TRAIN_STEPS=5', 'RANDOM_SEED=3', 'A=1']
  finally:
    flags.FLAGS.unparse_flags()


def test_compile_check_accepts_t5x_gin_flags_and_the_old_spelling():
  needs.t5x()
  from melodi_t5x.tools.tpu_compile import cli  # pylint: disable=g-import-not-at-top

  base = ['--experiment', 'gin/experiments/main/pg19_t5_xl.gin']
  args = cli.parse_args([*base, '--gin.BATCH_SIZE=3', '--gin_bindings=TRAIN_STEPS = 4'])
  assert args.gin_bindings == ['BATCH_SIZE = 3', 'TRAIN_STEPS = 4']
  with pytest.warns(FutureWarning, match='--binding is deprecated'):
    args = cli.parse_args([*base, '--binding', 'BATCH_SIZE=3'])
  assert args.gin_bindings == ['BATCH_SIZE=3']
