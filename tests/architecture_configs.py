"""Every architecture of the registry at the tiny size, built from its own gin model file.

Architecture-wide tests parametrize over `architectures.names()` and take each one's config from
here: its record's model file, then `gin/models/tiny.gin` (d=64, 2 layers, windows of 32), as the
rehearsal runs build it. A new architecture is then tested without any edit to a test.
"""

from __future__ import annotations

import dataclasses
import functools

from melodi_t5x import architectures, experiments

TINY_GIN = experiments.TINY_GIN
# What a data file and a run file would bind: a small vocabulary, no dropout.
BINDINGS = ("MIXTURE_OR_TASK_NAME = 'local_books'", 'VOCAB_SIZE = 128', 'DROPOUT_RATE = 0.0')


@functools.cache
def _tiny(name: str):
  arch = architectures.get(name)
  cfg = experiments.decoder_config([arch.gin_file, TINY_GIN], BINDINGS)
  if type(cfg) is not arch.config_class:
    raise AssertionError(
      f"{arch.gin_file} builds {type(cfg).__name__}, not {name!r}'s {arch.config_class.__name__}"
    )
  return cfg


def tiny_config(name: str, **changes):
  """Architecture `name` at the tiny size of its gin files, with `changes` to its fields."""
  return dataclasses.replace(_tiny(name), **changes)


def every_tiny_config() -> dict:
  """{name: tiny config} of every architecture of the registry, in the registry's order."""
  return {name: tiny_config(name) for name in architectures.names()}
