"""Carried memory of every architecture: the paper's float count and what our modules allocate.

Two views of the state a model carries from one segment to the next, per sequence (batch row):

* **Paper convention** (the MELODI paper's memory table): short-term memory counts tokens x d per
  layer; long-term, cached and external memories count keys + values, tokens x 2d (d = H x K, the
  key width). `memory_components(config)` lists each part with its exact count.
* **Allocated here**: the arrays our decoder keeps in its `memory` collection. They can differ
  from the paper's view on purpose (MELODI stores its long-term FIFO as token embeddings, d per
  token, and recomputes keys and values each segment; the reference Memorizing Transformer's memory
  layer owns an XL cache it never uses, which the paper counts and we do not allocate). Each
  component says what it allocates (`stored_elements`, `stored_dtype`); `allocated_memory`
  measures the real variables with `jax.eval_shape` of the decoder's init (nothing is allocated,
  so it works at the paper size) and the test suite checks that the two agree.

The paper prints each model's memory in millions of floats with one decimal. Its values are
reproduced by rounding each component to one decimal and adding the rounded parts
(`paper_millions`): e.g. MELODI S192+L32 is 13 x 192 x 1024 = 2.56M -> 2.6 plus 128 x 32 x 2048 =
8.39M -> 8.4, printed 11.0, although the exact total 10,944,512 rounds to 10.9.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from melodi_t5x import architectures
from melodi_t5x.architectures.decoder import MemoryComponent

# The decoder shell's own carried counter (`architectures.decoder.Seen`), in every architecture.
TOKENS_SEEN = MemoryComponent(
  'tokens seen', '-', 0, 1, 'int32', note='not memory content: tokens since the document start'
)


def memory_components(cfg) -> list[MemoryComponent]:
  """The parts of the state `cfg`'s model carries across segments, per sequence: its
  architecture's (`Architecture.memory_components`) and the decoder's token counter."""
  parts = architectures.for_config(cfg).memory_components(cfg)
  return [*parts, TOKENS_SEEN] if parts else []


def paper_floats(cfg) -> int:
  """Exact floats of carried memory per sequence in the paper's convention."""
  return sum(c.paper_floats for c in memory_components(cfg))


def paper_millions(cfg) -> float:
  """The paper's printed value: each component in millions rounded to one decimal, then added."""
  total = sum(_round_half_up(c.paper_floats / 1e6) for c in memory_components(cfg))
  return round(total, 1)


def _round_half_up(x: float) -> float:
  return math.floor(x * 10 + 0.5) / 10


def stored_bytes(cfg, batch_size: int = 1) -> int:
  """Bytes of carried state our decoder should allocate for `batch_size` rows (from the formula)."""
  return batch_size * sum(c.stored_bytes for c in memory_components(cfg))


# ---------------------------------------------------------------------------------------------
# What the modules really allocate (abstract evaluation of init: no memory is used).
# ---------------------------------------------------------------------------------------------


def abstract_variables(cfg, batch_size: int = 1, segment_length: int | None = None) -> dict:
  """`jax.ShapeDtypeStruct`s of every variable collection of `cfg`'s decoder (no allocation).

  The segment defaults to one window (the carried state does not depend on its length).
  """
  length = segment_length or cfg.window_length
  model = architectures.build_decoder(cfg)
  tokens = jax.ShapeDtypeStruct((batch_size, length), jnp.int32)
  return jax.eval_shape(
    lambda t: model.init(jax.random.PRNGKey(0), t, enable_dropout=False), tokens
  )


def _leaves(tree) -> list[jax.ShapeDtypeStruct]:
  return jax.tree_util.tree_leaves(tree)


def allocated_memory(
  cfg, batch_size: int = 1, segment_length: int | None = None, variables: dict | None = None
) -> dict[str, int]:
  """Elements and bytes of the `memory` collection our decoder allocates, by dtype.

  Returns:
    {'bytes': total bytes, '<dtype>': number of elements of that dtype, ...}.
  """
  if variables is None:
    variables = abstract_variables(cfg, batch_size, segment_length)
  out = {'bytes': 0}
  for leaf in _leaves(variables.get('memory', {})):
    n = int(np.prod(leaf.shape))
    out['bytes'] += n * np.dtype(leaf.dtype).itemsize
    out[str(np.dtype(leaf.dtype))] = out.get(str(np.dtype(leaf.dtype)), 0) + n
  return out


def parameter_count(cfg, variables: dict | None = None) -> int:
  """Trainable parameters of `cfg`'s decoder (abstract init)."""
  if variables is None:
    variables = abstract_variables(cfg)
  return sum(int(np.prod(leaf.shape)) for leaf in _leaves(variables['params']))


# ---------------------------------------------------------------------------------------------
# The paper's models.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PaperModel:
  """One row of the paper's memory table."""

  # Name as in the paper's table.
  name: str
  # The paper's value, millions of floats carried per sequence.
  paper_millions: float
  # Its architecture (`melodi_t5x.architectures`), whose config class builds it.
  architecture: str
  # Fields that differ from the class defaults (which are the paper's shared sizes).
  overrides: dict

  def config(self, **changes):
    cls = architectures.get(self.architecture).config_class
    return cls(**{**self.overrides, **changes})


def _melodi_sizes(summary: int, increment: int) -> dict:
  return dict(
    summary_size=summary, short_term_memory_size=summary, long_term_memory_increment_size=increment
  )


# The paper's models at the paper size: d=1024, 8x128 heads, MLP 4096, windows of 512, T5
# vocabulary (32128 rows), 13 layers (the Memorizing Transformer: 12 ordinary layers plus its memory
# layer; the Block-Recurrent Transformer: 12 layers).
PAPER_MODELS: list[PaperModel] = [
  PaperModel('Transformer-XL', 13.6, 'xl', {}),
  PaperModel('Block-Recurrent', 13.1, 'brt', dict(num_layers=12)),
  PaperModel('Memorizing (dense 64K)', 147.8, 'memorizing', dict(num_layers=12)),
  PaperModel('MELODI S192+L32', 11.0, 'melodi', _melodi_sizes(192, 32)),
  PaperModel('MELODI S128+L64', 18.5, 'melodi', _melodi_sizes(128, 64)),
  PaperModel('MELODI S192+L96', 27.8, 'melodi', _melodi_sizes(192, 96)),
]
