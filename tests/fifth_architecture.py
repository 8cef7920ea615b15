"""A fifth architecture that lives only in the tests: Transformer-XL under another name and config.

`windowed` has its own config class and decoder class (the XL layers, the XL formulas for memory
and FLOPs) and its own gin model file (`tests/data/windowed.gin`);
`tests/test_fifth_architecture.py` registers its record and shows that every tool serves it with
no edit to a project module.
"""

from __future__ import annotations

import dataclasses
import os

from melodi_t5x.architectures import xl
from melodi_t5x.architectures.decoder import Architecture
from melodi_t5x.config import XLConfig

# Its gin model file (absolute: it is not under the project's gin/ folder).
GIN_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data', 'windowed.gin')


@dataclasses.dataclass(frozen=True)
class WindowedConfig(XLConfig):
  """Transformer-XL's fields under a config class of its own."""


class WindowedDecoder(xl.XLDecoder):
  """Transformer-XL's stack under a decoder class of its own."""


ARCHITECTURE = Architecture.from_module(
  'windowed', WindowedConfig, WindowedDecoder, GIN_FILE, vars(xl)
)
