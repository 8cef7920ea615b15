"""Stand-ins for the entry points that T5X's run files bind in `__main__`, shared by every test.

The run files `import __main__ as train_script` (or `eval_script`, `infer_script`) and bind
`train_script.train`, `evaluate`, `infer`. Gin registers the function it finds there once per
process, so every test that parses those files must install the same function objects: different
stubs in two test modules make the second parse fail ("A different configurable matching
'train_script.train' already exists").
"""

from __future__ import annotations

import sys


def train(**unused):
  """Stands in for t5x.train's `train`."""


def evaluate(**unused):
  """Stands in for t5x.eval's `evaluate`."""


def infer(**unused):
  """Stands in for t5x.infer's `infer`."""


def install(monkeypatch) -> None:
  """Puts the three stand-ins into `__main__` for the duration of a test."""
  for fn in (train, evaluate, infer):
    monkeypatch.setattr(sys.modules['__main__'], fn.__name__, fn, raising=False)
