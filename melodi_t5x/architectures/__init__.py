"""The four architectures of the project, one module each, found by name.

  decoder.py      the decoder shell, the layer-kind protocol and the `Architecture` record.
  melodi.py       MELODI (Chen et al., ICLR 2025): short-term + long-term compressed memory.
  xl.py           Transformer-XL with a sliding window and a one-window key/value cache.
  memorizing.py   Memorizing Transformer, dense attention over a FIFO of past keys and values.
  brt.py          Block-Recurrent Transformer ("fixed:skip").

Each architecture module exports `ARCHITECTURE` (`decoder.Architecture`: config class, decoder,
carried-memory components, training FLOPs, gin file). A fifth architecture is one new module
exporting its record, its name in `NAMES`, and its gin model file.
"""

from __future__ import annotations

import functools
import importlib

from melodi_t5x.architectures.decoder import Architecture

# Modules of `melodi_t5x.architectures` holding an `ARCHITECTURE`, imported on first use.
NAMES: tuple[str, ...] = ('melodi', 'xl', 'memorizing', 'brt')


@functools.cache
def get(name: str) -> Architecture:
  """The record of architecture `name` (one of `NAMES`)."""
  if name not in NAMES:
    raise ValueError(
      f'unknown architecture {name!r}; known: {NAMES}. A new architecture is a module of '
      'melodi_t5x.architectures exporting ARCHITECTURE, listed in architectures.NAMES.'
    )
  return importlib.import_module(f'{__name__}.{name}').ARCHITECTURE


def all_architectures() -> tuple[Architecture, ...]:
  return tuple(get(name) for name in NAMES)


def for_config(config) -> Architecture:
  """The record whose config class is the most specific class of `config`."""
  by_class = {arch.config_class: arch for arch in all_architectures()}
  for cls in type(config).__mro__:
    if cls in by_class:
      return by_class[cls]
  raise TypeError(
    f'no architecture is registered for {type(config).__name__}; use one of '
    f'{[a.config_class.__name__ for a in all_architectures()]} (melodi_t5x.config).'
  )


def decoder_class(config) -> type:
  """The decoder module class for `config`."""
  return for_config(config).decoder_class


def build_decoder(config):
  """The decoder module for `config`, e.g. `XLDecoder(XLConfig(...))`."""
  return decoder_class(config)(config)
