"""The four architectures of the project, one module each, side by side.

  melodi.py       MELODI (Chen et al., ICLR 2025): short-term + long-term compressed memory.
  xl.py           Transformer-XL with a sliding window and a one-window key/value cache.
  memorizing.py   Memorizing Transformer, dense attention over a FIFO of past keys and values.
  brt.py          Block-Recurrent Transformer ("fixed:skip").

Shared building blocks are in `melodi_t5x.layers`, configurations in `melodi_t5x.config`, carried
state in `melodi_t5x.memory`. `decoder_class(config)` gives the decoder module of any config, so
tools (benchmark, memory table) serve every architecture through one code path.
"""

from __future__ import annotations

import importlib

# Config class name -> (module, decoder class). Modules are imported on first use.
DECODERS: dict[str, tuple[str, str]] = {
  'MelodiConfig': ('melodi_t5x.architectures.melodi', 'MelodiDecoder'),
  'XLConfig': ('melodi_t5x.architectures.xl', 'XLDecoder'),
  'MemorizingConfig': ('melodi_t5x.architectures.memorizing', 'MemorizingDecoder'),
  'BRTConfig': ('melodi_t5x.architectures.brt', 'BRTDecoder'),
}


def decoder_class(config) -> type:
  """The decoder module class for `config` (the most specific config class registered)."""
  for cls in type(config).__mro__:
    if cls.__name__ in DECODERS:
      module, name = DECODERS[cls.__name__]
      return getattr(importlib.import_module(module), name)
  raise TypeError(
    f'no decoder is registered for {type(config).__name__}; use one of {sorted(DECODERS)} '
    '(melodi_t5x.config) or add it to melodi_t5x.architectures.DECODERS.'
  )


def build_decoder(config):
  """The decoder module for `config`, e.g. `XLDecoder(XLConfig(...))`."""
  return decoder_class(config)(config)
