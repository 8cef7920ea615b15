"""The experiment suite: the paper's main table, its ablations and the timing runs, as sweeps.

A sweep is a list of `Experiment`s; an experiment is one training run, i.e. one gin file under
`gin/experiments/`, plus where its result goes in the paper's tables (row, column, plot x). This
module is the single source of truth: `python -m melodi_t5x.tools.make_experiments` writes the gin
files from it (the committed files are what users run), `xm_launch.launch` starts one job per file
and `melodi_t5x.tools.paper_tables` lays out the eval reports.

An experiment file is a delta (model include + data include + run include + the grid point's
config settings) that serves both `t5x.train` and `t5x.eval`: the mode file goes first,

  python -m t5x.train --gin_file=gin/experiments/train.gin --gin_file=EXPERIMENT.gin ...
  python -m t5x.eval --gin_file=gin/experiments/eval.gin --gin_file=EXPERIMENT.gin ...

`size='tiny'` gives the same grids on the tiny CPU models (each architecture's model file, then
`gin/models/tiny.gin`; the local rehearsal and the tests): token counts (S, L, windows) are divided
by `Scale.divisor` and layer indices follow the tiny stack; those files are rendered into the run
directory, not committed.
"""

from __future__ import annotations

import dataclasses
import math
import os
import textwrap
from collections.abc import Sequence
from typing import Any

from melodi_t5x import architectures

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS_DIR = 'gin/experiments'
TRAIN_MODE_GIN = f'{EXPERIMENTS_DIR}/train.gin'
EVAL_MODE_GIN = f'{EXPERIMENTS_DIR}/eval.gin'
# The tiny CPU size of every architecture, given after the architecture's model file.
TINY_GIN = 'gin/models/tiny.gin'
# Eval settings reported per run (t5x_eval.MEMORY_MODES).
MEMORY_MODES = ('carried', 'reset')


@dataclasses.dataclass(frozen=True)
class Model:
  """A model of the tables: its architecture, gin file and the memory sizes that scale with size."""

  # Row label in the tables.
  label: str
  # Its architecture (`melodi_t5x.architectures`: the config class, the tiny model file).
  architecture: str
  # Gin model file at the paper size.
  gin: str
  # MELODI only: (S, L) at the paper size; L=0 removes the long-term layer.
  melodi_memory: tuple[int, int] | None = None
  # Rematerialisation of the paper runs (BaseConfig.remat), chosen from the TPU compile check
  # (`python -m melodi_t5x.tools.tpu_compile`): the fastest estimated step that fits one batch row
  # per device on v5e 4x8, v6e 4x8 and v4 2x2x4. Estimated time follows the FLOPs executed and
  # 'none' recomputes the least, so 'none' wherever it fits (docs/experiments.md, TPU check).
  remat: str = 'none'

  @property
  def config_class(self) -> type:
    """The config class its gin file builds (the architecture record's)."""
    return architectures.get(self.architecture).config_class

  @property
  def tiny_gins(self) -> tuple[str, ...]:
    """Gin model files at the tiny CPU size, in include order: the architecture's model file
    (the tiny MELODI models set S and L in the experiment file, so all start from
    melodi_base.gin), then TINY_GIN."""
    return (architectures.get(self.architecture).gin_file, TINY_GIN)


MODELS: dict[str, Model] = {
  'melodi_s192_l32': Model(
    'MELODI S192+L32', 'melodi', 'gin/models/melodi_s192_l32.gin', (192, 32)
  ),
  'melodi_s128_l64': Model(
    'MELODI S128+L64', 'melodi', 'gin/models/melodi_s128_l64.gin', (128, 64)
  ),
  'melodi_s192_l96': Model(
    'MELODI S192+L96', 'melodi', 'gin/models/melodi_s192_l96.gin', (192, 96)
  ),
  'melodi_s128_l0': Model(
    'MELODI S128 (no long-term)', 'melodi', 'gin/models/melodi_s128_l64.gin', (128, 0)
  ),
  'xl': Model('Transformer-XL', 'xl', 'gin/models/xl.gin'),
  'brt': Model('Block-Recurrent', 'brt', 'gin/models/brt.gin'),
  'memorizing': Model('Memorizing (dense 64K)', 'memorizing', 'gin/models/memorizing.gin'),
}
MAIN_MODELS = (
  'xl',
  'brt',
  'memorizing',
  'melodi_s192_l32',
  'melodi_s128_l64',
  'melodi_s192_l96',
)
MAIN_DATASETS = ('pg19_t5', 'arxiv_math', 'c4_4k')
DATASET_LABELS = {
  'pg19_t5': 'PG-19 (T5 vocab)',
  'arxiv_math': 'arXiv Math',
  'c4_4k': 'C4 (4K+)',
  'local_books': 'local_books',
  'text_corpus': 'text_corpus',
}


@dataclasses.dataclass(frozen=True)
class Scale:
  """The size-dependent settings of a sweep (paper models or tiny CPU models)."""

  # 'paper' or 'tiny'.
  name: str
  # Layers of the MELODI models.
  num_layers: int
  # MELODI's long-term layer.
  long_term_layer: int
  # Context window W.
  window: int
  # Token counts of the paper (S, L) are divided by this.
  divisor: int
  # Training segment length (TASK_FEATURE_LENGTHS).
  segment: int

  def tokens(self, paper_tokens: int) -> int:
    """A paper token count (S, L, W) at this size."""
    return paper_tokens // self.divisor


SCALES = {
  'paper': Scale('paper', num_layers=13, long_term_layer=6, window=512, divisor=1, segment=4096),
  'tiny': Scale('tiny', num_layers=2, long_term_layer=1, window=32, divisor=16, segment=256),
}
# TRAIN_STEPS of each run file (gin/experiments/runs/<run>.gin).
RUN_STEPS = {'main': 500_000, 'ablation': 200_000, 'tiny': 60}


@dataclasses.dataclass(frozen=True)
class Experiment:
  """One training run of a sweep and its place in the tables."""

  # 'main' or an ablation family.
  sweep: str
  # File stem, unique in the sweep (also the run's folder under the sweep's model_dir root).
  name: str
  # Key of MODELS.
  model: str
  # seqio task.
  dataset: str
  # 'main', 'ablation' or 'tiny' (gin/experiments/runs/<run>.gin).
  run: str
  # 'paper' or 'tiny'.
  size: str
  # Config field -> value, bound after the model file.
  overrides: tuple[tuple[str, Any], ...] = ()
  # Table row and column labels.
  row: str = ''
  column: str = ''
  # x of the family's plot (coverage in windows, window length, layers); None: memory floats.
  x: float | None = None
  # Plot series (one line per series).
  series: str = ''
  # The entry's own name in its family when another experiment of the suite trains the same
  # resolved configuration (then `sweep`/`name` are that experiment's: one run serves both
  # tables); '' otherwise.
  alias: str = ''

  @property
  def model_spec(self) -> Model:
    return MODELS[self.model]

  @property
  def model_gins(self) -> tuple[str, ...]:
    """The model gin files the experiment file includes, in order."""
    spec = self.model_spec
    return (spec.gin,) if self.size == 'paper' else spec.tiny_gins

  @property
  def path(self) -> str:
    """Repository-relative gin file (the committed file for size 'paper')."""
    folder = 'main' if self.sweep == 'main' else f'ablations/{self.sweep}'
    if self.size != 'paper':
      folder = f'{self.size}/{folder}'
    return f'{EXPERIMENTS_DIR}/{folder}/{self.name}.gin'

  @property
  def train_steps(self) -> int:
    return RUN_STEPS[self.run]

  @property
  def run_id(self) -> str:
    """`<sweep>/<name>` of the run that trains this entry (its folder under model_dir_root)."""
    return f'{self.sweep}/{self.name}'

  @property
  def table_name(self) -> str:
    """The entry's name in its family's table."""
    return self.alias or self.name

  @property
  def settings(self) -> tuple[tuple[str, Any], ...]:
    """Config fields bound by the experiment file: the overrides, then the model's remat."""
    remat = self.model_spec.remat
    if self.size != 'paper' or remat == 'none':
      return self.overrides
    return (*self.overrides, ('remat', remat))

  def config_bindings(self) -> list[str]:
    """`config.<Class>.<field> = <value>` lines of this experiment's settings."""
    cls = self.model_spec.config_class.__name__
    return [f'config.{cls}.{field} = {gin_value(value)}' for field, value in self.settings]


def gin_value(value: Any) -> str:
  """A Python value as gin text (tuples keep their trailing comma)."""
  if isinstance(value, tuple):
    inner = ', '.join(gin_value(v) for v in value)
    return f'({inner},)' if len(value) == 1 else f'({inner})'
  return repr(value)


# ---------------------------------------------------------------------------------------------
# Grids.
# ---------------------------------------------------------------------------------------------


def melodi_memory(
  scale: Scale, summary: int, increment: int, base: tuple[int, int] = (128, 64)
) -> list[tuple[str, Any]]:
  """Settings of a MELODI with S = `summary` and L = `increment` (paper tokens) at `scale`.

  At the paper size, settings equal to those of the included model file (`base` = its (S, L))
  are left out; at other sizes every setting is written.
  """
  s, inc = scale.tokens(summary), scale.tokens(increment)
  keep_all = scale.name != 'paper'
  out = []
  if keep_all or summary != base[0]:
    out += [('summary_size', s), ('short_term_memory_size', s)]
  if not increment:
    out.append(('long_term_memory_layers', ()))
  elif keep_all or increment != base[1]:
    out.append(('long_term_memory_increment_size', inc))
  return out


def spread_layers(num_layers: int, count: int, must_include: int) -> tuple[int, ...]:
  """`count` layers spread uniformly (bin centres), the one nearest `must_include` moved onto it."""
  if not 1 <= count <= num_layers:
    raise ValueError(f'count={count} must be in [1, num_layers={num_layers}].')
  layers = [math.floor((j + 0.5) * num_layers / count) for j in range(count)]
  if must_include not in layers:
    nearest = min(range(count), key=lambda j: (abs(layers[j] - must_include), j))
    layers[nearest] = must_include
  return tuple(sorted(set(layers)))


def _main(scale: Scale, datasets: Sequence[str], run: str) -> list[Experiment]:
  out = []
  for dataset in datasets:
    for key in MAIN_MODELS:
      spec = MODELS[key]
      memory = spec.melodi_memory
      overrides = () if memory is None else tuple(melodi_memory(scale, *memory, base=memory))
      out.append(
        Experiment(
          'main',
          f'{dataset}_{key}',
          key,
          dataset,
          run,
          scale.name,
          overrides,
          row=spec.label,
          column=DATASET_LABELS.get(dataset, dataset),
        )
      )
  return out


def _memory_tradeoff(scale: Scale, dataset: str, run: str) -> list[Experiment]:
  out = []
  for s in (64, 128, 192):
    for inc in (0, 32, 64, 96):
      label = f'S{s}+L{inc}' if inc else f'S{s} (no long-term)'
      out.append(
        Experiment(
          'memory_tradeoff',
          f's{s:03d}_l{inc:02d}',
          'melodi_s128_l64',
          dataset,
          run,
          scale.name,
          tuple(melodi_memory(scale, s, inc)),
          row=label,
          column='perplexity',
          # The paper's plot: one line per L, along which S varies.
          series=f'L={inc}' if inc else 'L=0 (no long-term)',
        )
      )
  return out


def _coverage(scale: Scale, dataset: str, run: str) -> list[Experiment]:
  return [
    Experiment(
      'coverage',
      f'fifo{w:03d}',
      'melodi_s128_l64',
      dataset,
      run,
      scale.name,
      tuple(melodi_memory(scale, 128, 64)) + (('long_term_memory_windows', w),),
      row=f'{w} windows',
      column='perplexity',
      x=w,
      series='MELODI S128+L64',
    )
    for w in (2, 4, 8, 16, 32, 64, 128)
  ]


def _window(scale: Scale, dataset: str, run: str) -> list[Experiment]:
  out = []
  for key in ('melodi_s128_l64', 'melodi_s128_l0', 'xl', 'brt', 'memorizing'):
    spec = MODELS[key]
    for w in (512, 256, 128):
      memory = [] if spec.melodi_memory is None else melodi_memory(scale, *spec.melodi_memory)
      out.append(
        Experiment(
          'window',
          f'{key}_w{w:03d}',
          key,
          dataset,
          run,
          scale.name,
          tuple(memory) + (('window_length', scale.tokens(w)),),
          row=spec.label,
          column=f'W={w}',
          x=scale.tokens(w),
          series=spec.label,
        )
      )
  return out


def _short_layers(scale: Scale, dataset: str, run: str) -> list[Experiment]:
  counts = (1, 2, 3, 4, 5, 7, 10, 13) if scale.name == 'paper' else (1, 2)
  out = []
  for k in counts:
    keep = spread_layers(scale.num_layers, k, scale.long_term_layer)
    free = tuple(i for i in range(scale.num_layers) if i not in keep)
    out.append(
      Experiment(
        'short_layers',
        f'short{k:02d}',
        'melodi_s128_l64',
        dataset,
        run,
        scale.name,
        tuple(melodi_memory(scale, 128, 64)) + (('no_memory_layers', free),),
        row=f'{k} layers {list(keep)}',
        column='perplexity',
        x=k,
        series='MELODI S128+L64',
      )
    )
  return out


def _long_layers(scale: Scale, dataset: str, run: str) -> list[Experiment]:
  if scale.name == 'paper':
    two = (4, 8)  # thirds of the 13-layer stack
  else:
    two = tuple(range(scale.num_layers))[-2:]
  points = (('one_l64', (scale.long_term_layer,), 64), ('two_l32', two, 32))
  return [
    Experiment(
      'long_layers',
      name,
      'melodi_s128_l64',
      dataset,
      run,
      scale.name,
      tuple(melodi_memory(scale, 128, inc)) + (('long_term_memory_layers', layers),),
      row=f'{len(layers)} long-term layer(s) {list(layers)}, L={inc}',
      column='perplexity',
    )
    for name, layers, inc in points
  ]


def _branching(scale: Scale, dataset: str, run: str) -> list[Experiment]:
  labels = {
    'separate': 'separate mixers (summary branching)',
    'shared': 'one shared mixer',
    'none': 'no mixer (reference token_mixing=False)',
  }
  return [
    Experiment(
      'branching',
      mode,
      'melodi_s128_l64',
      dataset,
      run,
      scale.name,
      tuple(melodi_memory(scale, 128, 64)) + (('summary_branching', mode),),
      row=label,
      column='perplexity',
    )
    for mode, label in labels.items()
  ]


ABLATIONS = {
  'memory_tradeoff': _memory_tradeoff,
  'coverage': _coverage,
  'window': _window,
  'short_layers': _short_layers,
  'long_layers': _long_layers,
  'branching': _branching,
}
# The header of each ablation family's files: the grid and why it was chosen.
FAMILY_DOCS = {
  'memory_tradeoff': """\
Memory trade-off: perplexity against memory (M floats, paper convention) for MELODI's short-term
size S (summary = short-term tokens per layer and window) and long-term increment L.
Grid: S in {64, 128, 192} x L in {0, 32, 64, 96}, 12 runs; L=0 has no long-term layer
(long_term_memory_layers = ()). The paper's exact grid is not public; this one contains the three
main configurations (S192+L32, S128+L64, S192+L96), brackets them on both axes and covers the
memory-free end of the long-term axis. Otherwise as S128+L64: 13 layers, long-term layer 6, FIFO
of 128 windows.""",
  'coverage': """\
Long-term coverage: the long-term FIFO holds 2, 4, 8, 16, 32, 64 or 128 windows
(long_term_memory_windows) of MELODI S128+L64, i.e. 1K to 64K tokens of history at W=512.
The paper reports that gains saturate beyond about 32 windows; the grid doubles from the smallest
useful FIFO to the paper's 128. Everything else as S128+L64.""",
  'window': """\
Context window: W in {512, 256, 128} (window_length) for MELODI S128+L64, MELODI S128 without
long-term memory, Transformer-XL, Block-Recurrent and Memorizing (dense 64K); the training segment
stays 4096 tokens (8, 16, 32 windows). Every other setting stays, so each model keeps its memory
slots: MELODI's FIFO keeps 128 windows of L tokens (its history in tokens shrinks with W), the
XL / BRT caches hold one window, Memorizing keeps 65,536 slots. The paper reports that models with
long-term memory (MELODI, Memorizing) degrade much less than the others.""",
  'short_layers': """\
Short-term layers: k in {1, 2, 3, 4, 5, 7, 10, 13} of MELODI S128+L64's 13 layers keep short-term
memory, the others carry none (no_memory_layers: window + summary self-attention, no mixers).
The k layers are spread uniformly (layer floor((j + 0.5) * 13 / k) for j < k, bin centres), and
the one nearest the long-term layer 6 is moved onto it: a long-term layer keeps its short-term
memory, as in the reference. The paper reports saturation after about 4 layers, so the grid is
dense there.""",
  'long_layers': """\
Long-term layers: one long-term layer with L=64 (layer 6, MELODI S128+L64) against two with L=32
each (layers 4 and 8, splitting the 13 layers into thirds). Both FIFOs hold 128 windows, so the
long-term memory is the same number of floats (2 x 128 x 32 = 128 x 64 tokens). The paper reports
that one L=64 layer is better.""",
  'branching': """\
Summary branching: 'separate' (default; two token mixers, one for the next layer's summary and one
for the next window's short-term memory), 'shared' (one mixer whose output is both) and 'none' (no
mixer: the post-FFN summary tokens are both; the reference's token_mixing=False), on MELODI
S128+L64 (summary_branching). The paper reports a consistent gain of about 0.3 perplexity from
branching.""",
}
ABLATION_DATASET = 'pg19_t5'
# What each model gin file binds for the settings the grids vary (an experiment's files apply in
# include order, the fields of other config classes left out): a grid binding equal to one of these
# restates the default, so two experiments that differ only by such bindings train the same model.
# tests/test_experiments.py checks every suite entry against its parsed configuration.
_MELODI_PAPER_DEFAULTS = {
  'window_length': 512,
  'summary_size': 128,
  'short_term_memory_size': 128,
  'long_term_memory_layers': (6,),
  'long_term_memory_increment_size': 64,
  'long_term_memory_windows': 128,
  'no_memory_layers': (),
  'summary_branching': 'separate',
}
MODEL_FILE_DEFAULTS: dict[str, dict[str, Any]] = {
  'gin/models/melodi_base.gin': _MELODI_PAPER_DEFAULTS,
  'gin/models/melodi_s128_l64.gin': _MELODI_PAPER_DEFAULTS,
  **{f'gin/models/{m}.gin': {'window_length': 512} for m in ('xl', 'brt', 'memorizing')},
  TINY_GIN: {
    'window_length': 32,
    'summary_size': 8,
    'short_term_memory_size': 8,
    'long_term_memory_layers': (1,),
    'long_term_memory_increment_size': 4,
    'long_term_memory_windows': 16,
  },
}
# Timing: the models the paper timed (12 layers, d=1024) with the benchmark CLI.
TIMING_MODELS = MAIN_MODELS
TIMING_STEPS = ('train', 'eval')


def sweep_names() -> list[str]:
  return ['main', *ABLATIONS, 'timing']


def sweep(name: str, size: str = 'paper', dataset: str | None = None) -> list[Experiment]:
  """The experiments of a sweep ('timing' has none: see `TIMING_MODELS`).

  Args:
    name: 'main' or an ablation family.
    size: 'paper' (the committed gin files) or 'tiny' (CPU rehearsal).
    dataset: for 'tiny', the one task every experiment uses (default 'local_books'); for 'paper',
      None (main: the three datasets; ablations: PG-19).
  """
  if size not in SCALES:
    raise ValueError(f'size={size!r}: must be one of {sorted(SCALES)}.')
  if size == 'paper' and dataset is not None:
    raise ValueError(
      f'dataset={dataset!r} applies to size="tiny" only; the paper sweeps use the paper datasets.'
    )
  if name == 'timing':
    return []
  if name != 'main' and name not in ABLATIONS:
    raise ValueError(f'unknown sweep {name!r}; sweeps: {sweep_names()}.')
  canonical = {}
  for family in ('main', *ABLATIONS):  # the first entry of a configuration trains it
    for exp in _grid(family, size, dataset):
      canonical.setdefault(resolved_key(exp), exp)
  return [_shared(exp, canonical[resolved_key(exp)]) for exp in _grid(name, size, dataset)]


def _grid(name: str, size: str, dataset: str | None) -> list[Experiment]:
  """The entries of a family's table, each as if it trained on its own."""
  scale = SCALES[size]
  run = {'paper': None, 'tiny': 'tiny'}[size]
  if name == 'main':
    datasets = MAIN_DATASETS if size == 'paper' else (dataset or 'local_books',)
    return _main(scale, datasets, run or 'main')
  default = ABLATION_DATASET if size == 'paper' else 'local_books'
  return ABLATIONS[name](scale, dataset or default, run or 'ablation')


def resolved_key(exp: Experiment) -> tuple[Any, ...]:
  """What makes two experiments the same training run: model file, data, schedule, settings.

  Bindings that restate the model files' values (`MODEL_FILE_DEFAULTS`) do not count.
  """
  settings = {**model_file_defaults(exp), **dict(exp.overrides)}
  return (
    exp.model_gins,
    exp.dataset,
    exp.run,
    tuple(sorted((k, repr(v)) for k, v in settings.items())),
  )


def model_file_defaults(exp: Experiment) -> dict[str, Any]:
  """What the experiment's model files bind for its config class (`MODEL_FILE_DEFAULTS`)."""
  fields = {f.name for f in dataclasses.fields(exp.model_spec.config_class)}
  out = {}
  for path in exp.model_gins:
    out.update(MODEL_FILE_DEFAULTS.get(path, {}))
  return {k: v for k, v in out.items() if k in fields}


def shared_by(exp: Experiment) -> list[str]:
  """`<family>/<entry>` of the other table entries that this experiment's run serves."""
  dataset = exp.dataset if exp.size != 'paper' else None
  return [
    f'{family}/{other.alias}'
    for family in ('main', *ABLATIONS)
    for other in sweep(family, size=exp.size, dataset=dataset)
    if other.alias and other.run_id == exp.run_id
  ]


def _shared(exp: Experiment, canonical: Experiment) -> Experiment:
  """`exp` trained by `canonical` (same run dir and gin file), keeping its own table labels."""
  if (canonical.sweep, canonical.name) == (exp.sweep, exp.name):
    return exp
  return dataclasses.replace(
    exp,
    sweep=canonical.sweep,
    name=canonical.name,
    model=canonical.model,
    overrides=canonical.overrides,
    alias=exp.name,
  )


def find_experiment(path: str) -> Experiment:
  """The committed experiment whose gin file is `path` (repository-relative or absolute)."""
  rel = os.path.relpath(os.path.abspath(path), REPO_ROOT) if os.path.isabs(path) else path
  rel = os.path.normpath(rel)
  for name in ('main', *ABLATIONS):
    for exp in sweep(name):
      if os.path.normpath(exp.path) == rel:
        return exp
  raise ValueError(
    f'{path!r} is not an experiment file of the suite (gin/experiments/main/*.gin or '
    'gin/experiments/ablations/<family>/*.gin).'
  )


# ---------------------------------------------------------------------------------------------
# Gin text.
# ---------------------------------------------------------------------------------------------

_GENERATED = [
  'Generated by `python -m melodi_t5x.tools.make_experiments` from melodi_t5x/experiments.py',
  '(edit that, not this file).',
]


def _comment(text: str) -> list[str]:
  return [f'# {line}'.rstrip() for line in text.splitlines()]


def render(exp: Experiment) -> str:
  """The gin file of an experiment (of the run that trains it, for an entry shared with another)."""
  if exp.alias:
    dataset = exp.dataset if exp.size != 'paper' else None
    exp = next(
      e
      for e in sweep(exp.sweep, size=exp.size, dataset=dataset)
      if e.name == exp.name and not e.alias
    )
  steps = exp.train_steps
  k_steps = f'{steps // 1000}k' if steps % 1000 == 0 else str(steps)
  title = (
    f'Main table: {exp.row} on {exp.column}, {k_steps} steps.'
    if exp.sweep == 'main'
    else f'Ablation {exp.sweep} ({k_steps} steps on {exp.dataset}): {exp.row}.'
  )
  lines = _comment(title)
  if exp.sweep in FAMILY_DOCS:
    lines += ['#', *_comment(FAMILY_DOCS[exp.sweep])]
  also = shared_by(exp)
  if also:
    text = (
      f'The same configuration is also the entry {", ".join(also)}: this one run serves those '
      'tables (bindings that restate model-file defaults do not count).'
    )
    lines += ['#', *_comment(textwrap.fill(text, 98))]
  lines += [
    '#',
    '# Run it (the mode file goes first; MODEL_DIR/eval receives the perplexity reports):',
    '#   python -m t5x.train --gin_file=gin/experiments/train.gin \\',
    f'#     --gin_file={exp.path} \\',
    '#     --gin.MODEL_DIR="\'/path/to/model_dir\'"',
    '#   python -m t5x.eval --gin_file=gin/experiments/eval.gin \\',
    f'#     --gin_file={exp.path} \\',
    f'#     --gin.CHECKPOINT_PATH="\'/path/to/model_dir/checkpoint_{steps}\'" \\',
    '#     --gin.EVAL_OUTPUT_DIR="\'/path/to/model_dir/eval\'"   # [--gin.MEMORY_MODE="\'reset\'"]',
    *[f'# {line}' for line in _GENERATED],
    'from __gin__ import dynamic_registration',
    '',
    'import melodi_t5x.t5x_gin',
  ]
  if exp.settings:
    lines.append('from melodi_t5x import config')
  lines += [
    '',
    *[f"include '{path}'" for path in exp.model_gins],
    f"include '{EXPERIMENTS_DIR}/data/{exp.dataset}.gin'",
    f"include '{EXPERIMENTS_DIR}/runs/{exp.run}.gin'",
  ]
  if exp.settings:
    lines += ['', *exp.config_bindings()]
  return '\n'.join(lines) + '\n'


# ---------------------------------------------------------------------------------------------
# The model a setup builds.
# ---------------------------------------------------------------------------------------------

# T5X configurables of the model and run files, skipped when parsing without T5X. (The run files'
# TPU mesh binds T5X's partitioner: gin/experiments/runs/tpu_mesh.gin.)
T5X_SELECTORS = (
  'adafactor.Adafactor',
  't5x_model.MemoryDecoderModel',
  'partitioning.PjitPartitioner',
)


def decoder_config(gin_files: Sequence[str], bindings: Sequence[str] = ()):
  """The config of the decoder (`MODULE`) that `gin_files` + `bindings` build, as t5x.train would.

  Paths are absolute or relative to the folder that holds `gin/` (`melodi_t5x.t5x_gin.GIN_ROOT`).
  The decoder object is built (a Flax module definition: nothing is initialised; T5X not needed)
  and gin's configuration is cleared before and after.
  """
  import gin  # pylint: disable=g-import-not-at-top

  from melodi_t5x import t5x_gin  # pylint: disable=g-import-not-at-top

  files = [os.path.join(t5x_gin.GIN_ROOT, path) for path in gin_files]
  gin.clear_config(clear_constants=True)
  try:
    # Only T5X's configurables may be unknown (skip_unknown=True would also hide ours).
    gin.parse_config_files_and_bindings(
      files, list(bindings), skip_unknown=list(T5X_SELECTORS), finalize_config=False
    )
    return gin.query_parameter('%MODULE').scoped_configurable_fn().config
  finally:
    gin.clear_config(clear_constants=True)


def all_committed() -> list[Experiment]:
  """Every training run with a committed gin file (main and the ablation families), each once."""
  out = {}
  for name in ('main', *ABLATIONS):
    for exp in sweep(name):
      out.setdefault(exp.path, exp)
  return list(out.values())
