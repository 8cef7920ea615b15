"""Model configurations: one frozen dataclass per architecture, validated on construction.

`BaseConfig` holds what every architecture shares (sizes of the transformer stack, window,
relative positions, dropout, dtypes); `MelodiConfig`, `XLConfig`, `MemorizingConfig` and
`BRTConfig` add their own memory settings. Every invalid combination raises a `ValueError` that
names the field and says how to fix it, so a bad gin binding or CLI flag fails before anything is
traced or compiled.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

_DTYPES = ('float32', 'bfloat16')
# Values of MelodiConfig.summary_branching.
SUMMARY_BRANCHING = ('separate', 'shared', 'none')


@dataclasses.dataclass(frozen=True)
class BaseConfig:
  """Hyper-parameters shared by every architecture (defaults: the paper's 13-layer model)."""

  # Number of transformer layers in the stack.
  num_layers: int = 13
  # Width of the residual stream (d).
  embed_dim: int = 1024
  # Attention heads per layer.
  num_heads: int = 8
  # Channels per attention head; num_heads * head_dim need not equal embed_dim.
  head_dim: int = 128
  # Hidden units of the ReLU feed-forward block.
  mlp_dim: int = 4096
  # Biases in the two feed-forward dense layers (meliad's MELODI and Memorizing Transformer have
  # them; its Transformer-XL and Block-Recurrent Transformer do not).
  ffn_bias: bool = True
  # Rows of the (tied) token embedding; at least the task vocabulary's size (ids are not wrapped).
  vocab_size: int = 32128
  # Context window W: a segment is processed as segment_length // W windows, in order.
  window_length: int = 512
  # Dropout on normalised attention inputs and on the feed-forward output and pre-logits.
  dropout_rate: float = 0.0
  # Dropout on the attention probabilities.
  attention_dropout_rate: float = 0.0
  # Compute dtype of activations ('float32' or 'bfloat16').
  dtype: str = 'float32'
  # Storage dtype of parameters.
  param_dtype: str = 'float32'
  # T5 relative-position buckets (unidirectional; half of them are exact distances).
  relative_position_buckets: int = 32
  # Distances at or beyond this share the last T5 bucket.
  relative_position_max_distance: int = 128
  # Rematerialisation (T5X: `remat_policy`): 'none' recomputes no matmul in the backward pass
  # (only the attention weights, from q and k, and, in MELODI's window scan, what is elementwise);
  # 'window' keeps only what enters each window step and recomputes the step; 'layer' keeps what
  # enters each layer and recomputes the layer. Same numbers in every setting.
  remat: str = 'none'
  # Eval-time memory ablation: sources of `MEMORY_SOURCES` that the model does not read, each
  # replaced at every window by what it holds at a document start (set by
  # `t5x_eval.MemoryTrainer.memory_mode='no_<source>'`, never for training; state is still
  # carried and written as usual).
  drop_sources: tuple[str, ...] = ()
  # Eval-time instrument: every memory-reading layer sows the attention mass its scored tokens put
  # on each memory source (`melodi_t5x.attribution`; set by `MemoryTrainer(attribution=True)`).
  record_attribution: bool = False

  # The memory sources a token of this architecture reads besides its own window, with what
  # dropping each (`drop_sources`) does.
  MEMORY_SOURCES: ClassVar[dict[str, str]] = {}
  # Appended to the error for an unsupported `remat` value.
  REMAT_HINT: ClassVar[str] = ''
  # Values of `remat` this architecture implements, with what each means for it.
  REMAT_MODES: ClassVar[dict[str, str]] = {
    'none': 'recompute no matmul but the attention logits',
    'window': 'recompute each window step in the backward pass',
    'layer': 'recompute each layer in the backward pass',
  }

  def __post_init__(self):
    # gin and JSON hand over lists; keep the dataclass hashable.
    object.__setattr__(self, 'drop_sources', tuple(self.drop_sources))
    self._check()

  def drops(self, source: str) -> bool:
    """Whether the eval-time ablation drops `source` (one of `MEMORY_SOURCES`)."""
    return source in self.drop_sources

  def num_windows(self, segment_length: int) -> int:
    """Windows per segment; raises if the segment is not a whole number of windows."""
    if segment_length <= 0 or segment_length % self.window_length:
      raise ValueError(
        f'segment length {segment_length} is not a positive multiple of window_length='
        f'{self.window_length}; pad or crop segments (e.g. TASK_FEATURE_LENGTHS) to a multiple '
        'of the window, or change window_length.'
      )
    return segment_length // self.window_length

  def _need(self, ok: bool, field: str, msg: str) -> None:
    if not ok:
      raise ValueError(f'{type(self).__name__}.{field}={getattr(self, field)!r}: {msg}')

  def _check_positive(self, *fields: str) -> None:
    for field in fields:
      value = getattr(self, field)
      self._need(isinstance(value, int) and value > 0, field, 'must be a positive integer.')

  def _check_layer_indices(self, field: str) -> None:
    indices = getattr(self, field)
    for i in indices:
      self._need(
        isinstance(i, int) and 0 <= i < self.num_layers,
        field,
        f'layer index {i} is outside [0, num_layers={self.num_layers}); use 0-based indices.',
      )
    self._need(len(set(indices)) == len(indices), field, 'lists a layer twice; give each once.')

  def _check(self):
    for source in self.drop_sources:
      self._need(
        source in self.MEMORY_SOURCES,
        'drop_sources',
        f'{source!r} is not a memory source of {type(self).__name__}; its sources are '
        + (', '.join(f'{k!r} ({v})' for k, v in self.MEMORY_SOURCES.items()) or 'none')
        + '.',
      )
    self._check_positive(
      'num_layers', 'embed_dim', 'num_heads', 'head_dim', 'mlp_dim', 'vocab_size', 'window_length'
    )
    for field in ('dropout_rate', 'attention_dropout_rate'):
      self._need(0.0 <= getattr(self, field) < 1.0, field, 'must be in [0, 1).')
    for field in ('dtype', 'param_dtype'):
      self._need(getattr(self, field) in _DTYPES, field, f'must be one of {_DTYPES}.')
    self._need(
      self.remat in self.REMAT_MODES,
      'remat',
      f'must be one of {tuple(self.REMAT_MODES)} for {type(self).__name__} ('
      + '; '.join(f'{k!r}: {v}' for k, v in self.REMAT_MODES.items())
      + ').'
      + self.REMAT_HINT,
    )
    self._need(
      self.relative_position_buckets >= 2 and self.relative_position_buckets % 2 == 0,
      'relative_position_buckets',
      'must be an even integer >= 2 (half are exact distances, half log-spaced).',
    )
    self._need(
      self.relative_position_max_distance > self.relative_position_buckets // 2,
      'relative_position_max_distance',
      f'must exceed relative_position_buckets // 2 = {self.relative_position_buckets // 2}.',
    )


def shared_field_names() -> tuple[str, ...]:
  """The fields every architecture's config has (`BaseConfig`'s)."""
  return tuple(f.name for f in dataclasses.fields(BaseConfig))


def with_shared_fields(config_class: type, **shared) -> BaseConfig:
  """`config_class(...)` with the shared fields given once for every architecture (gin).

  gin/models/common.gin binds the shared sizes (`num_layers`, `embed_dim`, ...) on this function
  once, from its macros; each model file binds `config_class` in its own scope, e.g.
  `xl.XLDecoder.config = @xl/config.with_shared_fields()` and
  `xl/config.with_shared_fields.config_class = @config.XLConfig`, and its own fields on its class.
  A shared field bound on the class itself (`config.XLConfig.window_length = 256`: an experiment's
  setting, a command-line override) wins over the shared value.
  """
  import gin  # pylint: disable=g-import-not-at-top

  unknown = sorted(set(shared) - set(shared_field_names()))
  if unknown:
    raise ValueError(
      f'with_shared_fields: {unknown} are not fields of every config (BaseConfig: '
      f"{shared_field_names()}); bind an architecture's own field on its class, e.g. "
      f'config.{config_class.__name__}.<field>.'
    )
  # The class's own bindings (gin passes `@config.XLConfig` as a wrapper that applies them); none
  # when the class is not known to gin (a call from Python).
  selector = f'{config_class.__module__}.{config_class.__qualname__}'
  try:
    own = gin.get_bindings(selector, resolve_references=False)
  except ValueError:
    own = {}
  shared = {k: v for k, v in shared.items() if k not in own}
  missing = sorted(k for k, v in shared.items() if v is gin.REQUIRED)
  if missing:
    raise ValueError(
      f'{config_class.__name__}: the shared fields {missing} are gin.REQUIRED and not set; bind '
      'their macros (gin/models/common.gin lists them: VOCAB_SIZE comes with a data file '
      'gin/experiments/data/<task>.gin, DROPOUT_RATE with a run file or --gin.DROPOUT_RATE).'
    )
  return config_class(**shared)


@dataclasses.dataclass(frozen=True)
class MelodiConfig(BaseConfig):
  """MELODI (defaults: the paper's S128+L64 model)."""

  # S: learned summary tokens appended to every window in every layer.
  summary_size: int = 128
  # M: short-term memory tokens per layer carried from one window to the next.
  short_term_memory_size: int = 128
  # Indices of the layers that also keep a long-term memory FIFO (the "sandwich" middle).
  long_term_memory_layers: tuple[int, ...] = (6,)
  # L: long-term memory tokens produced from each window by a long-term layer.
  long_term_memory_increment_size: int = 64
  # Long-term FIFO capacity, in windows (the FIFO holds this many times L tokens).
  long_term_memory_windows: int = 128
  # Indices of layers that carry no memory at all (window + summary self-attention only).
  no_memory_layers: tuple[int, ...] = ()
  # Mask memory slots that hold no data yet (document start); the reference does not mask.
  mask_empty_memory: bool = False
  # How a layer's post-FFN summary tokens feed the next layer and the next window:
  # 'separate': two token mixers, one for the next layer's summary and one for the next window's
  # short-term memory (the paper's "summary branching"; default); 'shared': one mixer whose output
  # is both; 'none': no mixer, the post-FFN summary tokens are both (the reference's
  # token_mixing=False). 'shared' and 'none' need short_term_memory_size == summary_size.
  summary_branching: str = 'separate'

  MEMORY_SOURCES: ClassVar[dict[str, str]] = {
    'short_term': 'every layer reads a zero short-term memory (masked with mask_empty_memory)',
    'long_term': 'the long-term layers read a zero FIFO (masked with mask_empty_memory)',
  }

  def __post_init__(self):
    # gin and JSON hand over lists; keep the dataclass hashable.
    object.__setattr__(self, 'long_term_memory_layers', tuple(self.long_term_memory_layers))
    object.__setattr__(self, 'no_memory_layers', tuple(self.no_memory_layers))
    super().__post_init__()

  # -- derived sizes ---------------------------------------------------------------------------

  @property
  def long_term_memory_tokens(self) -> int:
    """Tokens held by each long-term FIFO (capacity in windows times L)."""
    return self.long_term_memory_windows * self.long_term_memory_increment_size

  def short_memory_size(self, layer: int) -> int:
    """Short-term memory tokens of `layer` (0 for a no-memory layer)."""
    return 0 if layer in self.no_memory_layers else self.short_term_memory_size

  def is_long_term_layer(self, layer: int) -> bool:
    return layer in self.long_term_memory_layers

  @staticmethod
  def capacity_windows(long_term_memory_tokens: int, increment_size: int) -> int:
    """Converts a FIFO size in tokens to windows; it must be a multiple of L."""
    if increment_size <= 0 or long_term_memory_tokens % increment_size:
      raise ValueError(
        f'long-term memory size {long_term_memory_tokens} tokens is not a multiple of the '
        f'long-term increment L={increment_size}; use a multiple of L (capacity = windows * L).'
      )
    return long_term_memory_tokens // increment_size

  # -- validation ------------------------------------------------------------------------------

  def _check(self):
    super()._check()
    need = self._need
    self._check_positive('summary_size')
    need(
      isinstance(self.short_term_memory_size, int) and self.short_term_memory_size > 0,
      'short_term_memory_size',
      'must be a positive integer; to run a layer without memory list it in no_memory_layers.',
    )
    self._check_layer_indices('long_term_memory_layers')
    self._check_layer_indices('no_memory_layers')
    need(
      self.summary_branching in SUMMARY_BRANCHING,
      'summary_branching',
      f'must be one of {SUMMARY_BRANCHING}.',
    )
    need(
      self.summary_branching == 'separate' or self.short_term_memory_size == self.summary_size,
      'summary_branching',
      f"the next window's memory is the next layer's summary, so short_term_memory_size="
      f'{self.short_term_memory_size} must equal summary_size={self.summary_size}; make them '
      "equal or use summary_branching='separate'.",
    )
    both = set(self.long_term_memory_layers) & set(self.no_memory_layers)
    need(
      not both,
      'no_memory_layers',
      f'layers {sorted(both)} are also long-term layers; a long-term layer needs its short-term '
      'memory, remove them from one of the two lists.',
    )
    if self.long_term_memory_layers:
      need(
        isinstance(self.long_term_memory_increment_size, int)
        and self.long_term_memory_increment_size > 0,
        'long_term_memory_increment_size',
        'must be a positive integer when long_term_memory_layers is non-empty '
        '(or set long_term_memory_layers=() for a short-term-only model).',
      )
      need(
        isinstance(self.long_term_memory_windows, int) and self.long_term_memory_windows > 0,
        'long_term_memory_windows',
        'must be a positive number of windows when long_term_memory_layers is non-empty.',
      )


@dataclasses.dataclass(frozen=True)
class XLConfig(BaseConfig):
  """Transformer-XL with a sliding window (meliad `base_transformer.gin`)."""

  # Carry each layer's last-window keys and values to the next segment; False gives the
  # memory-free lower bound (every segment read from scratch, first window sees no past).
  use_cache: bool = True
  # The reference Transformer-XL's feed-forward layers have no biases.
  ffn_bias: bool = False

  MEMORY_SOURCES: ClassVar[dict[str, str]] = {
    'cache': "every window reads zero keys and values in place of the previous window's",
  }
  REMAT_MODES: ClassVar[dict[str, str]] = {
    'none': 'recompute no matmul but the attention logits',
    'layer': 'recompute each layer in the backward pass',
  }
  REMAT_HINT: ClassVar[str] = (
    " There is no 'window': a layer attends over all windows of the segment in one batched"
    " attention, not in a loop over windows; use 'layer'."
  )


@dataclasses.dataclass(frozen=True)
class MemorizingConfig(XLConfig):
  """Memorizing Transformer, dense attention over a FIFO memory of past keys and values.

  meliad `base_memory2.gin` + `memory2/mem_densekv_64k.gin`: XL layers plus one extra memory layer.
  """

  # XL layers in the stack; the memory layer comes on top of these (paper: 12 + 1).
  num_layers: int = 12
  # The memory layer is inserted after XL layer `memory_layer_index` (0-based).
  memory_layer_index: int = 6

  MEMORY_SOURCES: ClassVar[dict[str, str]] = {
    **XLConfig.MEMORY_SOURCES,
    'memory': 'the memory layer reads zero memory slots (its memory is still written)',
  }
  # Key/value slots of the FIFO memory per batch row; a positive multiple of the segment length.
  memory_size: int = 65536
  # 0 = dense attention over every memory slot (the reference); k > 0 = each query attends only
  # to its k highest-logit memory slots (exact top-k, the original kNN-style variant).
  memory_top_k: int = 0
  # Queries of the memory layer processed at a time (bounds the [B, H, block, M + T] logits);
  # 0 = one window. Must divide the segment length. Does not change any result.
  memory_query_block: int = 0
  # The reference Memorizing Transformer's feed-forward layers have biases.
  ffn_bias: bool = True

  def num_windows(self, segment_length: int) -> int:
    """Windows per segment; also checks that the memory holds whole segments."""
    windows = super().num_windows(segment_length)
    if self.memory_size % segment_length:
      raise ValueError(
        f'MemorizingConfig.memory_size={self.memory_size} is not a multiple of the segment '
        f'length {segment_length}: the memory is written one whole segment at a time; set '
        f'memory_size to a multiple of {segment_length} (e.g. '
        f'{max(1, self.memory_size // segment_length) * segment_length}) or change the segment '
        'length.'
      )
    block = self.memory_query_block or self.window_length
    if segment_length % block:
      raise ValueError(
        f'MemorizingConfig.memory_query_block={self.memory_query_block} does not divide the '
        f'segment length {segment_length}; use a divisor of it (or 0 for one window).'
      )
    return windows

  def _check(self):
    super()._check()
    self._check_positive('memory_size')
    self._need(
      isinstance(self.memory_layer_index, int) and 0 <= self.memory_layer_index < self.num_layers,
      'memory_layer_index',
      f'must be in [0, num_layers={self.num_layers}): the memory layer goes after that XL layer.',
    )
    self._need(
      isinstance(self.memory_top_k, int) and 0 <= self.memory_top_k <= self.memory_size,
      'memory_top_k',
      f'must be in [0, memory_size={self.memory_size}] (0 = dense attention over the memory).',
    )
    self._need(
      isinstance(self.memory_query_block, int) and self.memory_query_block >= 0,
      'memory_query_block',
      'must be a non-negative integer (0 = one window of queries at a time).',
    )


@dataclasses.dataclass(frozen=True)
class BRTConfig(XLConfig):
  """Block-Recurrent Transformer "fixed:skip" (meliad `base_memory.gin` + `recurrent/bias_skip`).

  Every layer is an XL layer with its cache; layer `recurrent_layer_index` also carries a state of
  `num_states` vectors, updated once per window with a fixed learned gate and no FFN.
  """

  # Layers in the stack, the recurrent one included (paper: 12).
  num_layers: int = 12
  # 0-based index of the recurrent layer (paper: 9, third from the top of 12).
  recurrent_layer_index: int = 9
  # N: vectors of width embed_dim in the recurrent state (paper: 512).
  num_states: int = 512

  MEMORY_SOURCES: ClassVar[dict[str, str]] = {
    **XLConfig.MEMORY_SOURCES,
    'state': "the tokens read the learned initial state in place of the window's recurrent state",
  }

  def _check(self):
    super()._check()
    self._check_positive('num_states')
    self._need(
      isinstance(self.recurrent_layer_index, int)
      and 0 <= self.recurrent_layer_index < self.num_layers,
      'recurrent_layer_index',
      f'must be a 0-based layer index in [0, num_layers={self.num_layers}); the paper uses '
      'num_layers - 3 (third layer from the top).',
    )
