"""The four architectures of the project, one module each, side by side.

  melodi.py       MELODI (Chen et al., ICLR 2025): short-term + long-term compressed memory.
  xl.py           Transformer-XL with a sliding window and a one-window key/value cache.
  memorizing.py   Memorizing Transformer, dense attention over a FIFO of past keys and values.
  brt.py          Block-Recurrent Transformer ("fixed:skip").

Shared building blocks are in `melodi_t5x.layers`, configurations in `melodi_t5x.config`, carried
state in `melodi_t5x.memory`.
"""
