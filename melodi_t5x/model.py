"""Compatibility alias: MELODI lives in `melodi_t5x.architectures.melodi`.

Gin files and user code that import `melodi_t5x.model.MelodiDecoder` keep working.
"""

from melodi_t5x.architectures.melodi import MelodiDecoder, MelodiLayer, TokenMixer, window_geometry
from melodi_t5x.layers import RMSNorm, attend, l2_normalize, t5_bucket

__all__ = [
  'MelodiDecoder',
  'MelodiLayer',
  'RMSNorm',
  'TokenMixer',
  'attend',
  'l2_normalize',
  't5_bucket',
  'window_geometry',
]
