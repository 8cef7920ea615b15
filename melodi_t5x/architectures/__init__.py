"""The four architectures of the project, one module each, found by name.

  decoder.py      the decoder shell, the layer-kind protocol and the `Architecture` record.
  melodi.py       MELODI (Chen et al., ICLR 2025): short-term + long-term compressed memory.
  xl.py           Transformer-XL with a sliding window and a one-window key/value cache.
  memorizing.py   Memorizing Transformer, dense attention over a FIFO of past keys and values.
  brt.py          Block-Recurrent Transformer ("fixed:skip").

Each architecture module exports `ARCHITECTURE` (`decoder.Architecture`: name, config class,
decoder, carried-memory components, training FLOPs, gin file). Every tool asks this registry which
architecture a name or a config is (`get`, `for_config`): bench and the timing sweep, the FLOPs of
the TPU compile check, memory accounting, the experiment suite and its tables, check_reference.
A fifth architecture is one new module exporting its record, its name in `NAMES`, and its gin
model file; an architecture outside the package (a test's) passes its record to `register`.
"""

from __future__ import annotations

import functools
import importlib

from melodi_t5x.architectures.decoder import Architecture

# Modules of `melodi_t5x.architectures` holding an `ARCHITECTURE`, imported on first use.
NAMES: tuple[str, ...] = ('melodi', 'xl', 'memorizing', 'brt')
# Architectures registered at run time (`register`), e.g. a test's own; by name.
_REGISTERED: dict[str, Architecture] = {}


def names() -> tuple[str, ...]:
  """Every known architecture: the built-in `NAMES`, then the registered ones."""
  return NAMES + tuple(_REGISTERED)


def register(arch: Architecture) -> Architecture:
  """Makes `arch` known to every tool (bench, FLOPs, memory accounting, ...) under `arch.name`.

  An architecture outside this package (e.g. a test's) registers its record here; one inside it
  is listed in `NAMES` instead. Raises if the name or the config class is already taken.
  """
  taken = {a.name: a for a in all_architectures()}
  if _REGISTERED.get(arch.name) is arch:
    return arch
  if arch.name in taken:
    raise ValueError(f'architecture name {arch.name!r} is taken; known: {names()}.')
  for other in taken.values():
    if other.config_class is arch.config_class:
      raise ValueError(
        f'{arch.config_class.__name__} is already the config class of {other.name!r}; give '
        f'{arch.name!r} a config class of its own (for_config finds the architecture by it).'
      )
  _REGISTERED[arch.name] = arch
  return arch


def unregister(name: str) -> None:
  """Forgets an architecture added by `register`."""
  if name not in _REGISTERED:
    raise ValueError(f'{name!r} was not registered; registered: {tuple(_REGISTERED)}.')
  del _REGISTERED[name]


def get(name: str) -> Architecture:
  """The record of architecture `name` (one of `names()`)."""
  if name in _REGISTERED:
    return _REGISTERED[name]
  if name not in NAMES:
    raise ValueError(
      f'unknown architecture {name!r}; known: {names()}. A new architecture is a module of '
      'melodi_t5x.architectures exporting ARCHITECTURE, listed in architectures.NAMES (or a '
      'record passed to architectures.register).'
    )
  return _builtin(name)


@functools.cache
def _builtin(name: str) -> Architecture:
  return importlib.import_module(f'{__name__}.{name}').ARCHITECTURE


def all_architectures() -> tuple[Architecture, ...]:
  return tuple(_builtin(name) for name in NAMES) + tuple(_REGISTERED.values())


def for_config(config) -> Architecture:
  """The record whose config class is `config`'s class (exactly: a subclass of `XLConfig` that
  no record names is an error, not Transformer-XL)."""
  by_class = {arch.config_class: arch for arch in all_architectures()}
  if type(config) in by_class:
    return by_class[type(config)]
  raise TypeError(
    f'no architecture is registered for {type(config).__name__}; use one of '
    f'{[a.config_class.__name__ for a in all_architectures()]} (melodi_t5x.config), or register '
    'its record (architectures.register).'
  )


def decoder_class(config) -> type:
  """The decoder module class for `config`."""
  return for_config(config).decoder_class


def build_decoder(config):
  """The decoder module for `config`, e.g. `XLDecoder(XLConfig(...))`."""
  return decoder_class(config)(config)
