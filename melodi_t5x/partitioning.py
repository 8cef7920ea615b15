"""Logical-axis rules for the project's new axis names (partitioning and Adafactor factoring).

The four architectures (MELODI and the baselines) add these logical axis names to the ones T5X
already knows:

  summary        rows of the learned summary-token embeddings `[S, D]` (MELODI).
  mixer_in       input tokens of a token mixer (`W + S` rows: a window plus its summaries).
  mixer_out      output tokens of a token mixer (S short-term or L long-term memory tokens).
  memory_length  token slots of carried state (a `flax_mutables` leaf): MELODI's memories
                 `[B, M, D]`, the XL caches `[B, W, H, K]`, the Memorizing Transformer's memory
                 `[B, 65536, H, K]`.

All are token axes, so they are replicated: every architecture is sharded like a T5 decoder
(`batch` on `data`; `mlp`, `heads`, `joined_kv`, `vocab` on `model`; carried keys and values by
their `heads` axis). tests/test_t5x_architectures.py checks that every axis name each
architecture uses has a rule here or in T5X's standard rules. The plain lists below import
without T5X; the two builder functions import T5X lazily and are meant for gin:

  partitioning.PjitPartitioner.logical_axis_rules = @melodi_partitioning.logical_axis_rules()
  adafactor.Adafactor.factor_map = @melodi_partitioning.factor_map()

(`logical_factor_rules()`, Adafactor's per-axis rules, serves a parameter of rank > 2; every
parameter here has rank <= 2, for which T5X ignores such rules with a warning: see `factor_map`.)

`HostMeshPartitioner` (a `PjitPartitioner` with a data-parallel mesh over the devices of every
process, for CPU hosts) is available as `partitioning.HostMeshPartitioner` once T5X is installed
(`gin/runs/cpu_data_parallel_*.gin`).
"""

from __future__ import annotations

from collections.abc import Sequence

# (logical axis name, mesh axis or None) pairs appended to T5X's standard rules.
MELODI_AXIS_RULES: tuple[tuple[str, str | None], ...] = (
  ('summary', None),
  ('mixer_in', None),
  ('mixer_out', None),
  ('memory_length', None),
)

# Adafactor factoring of the new parameter axes, as names of `t5x.adafactor.FactorDim`.
# `summary_embeddings: [summary, embed]` factors as (column, row), like the token embedding
# `[vocab, embed]`; a mixer kernel `[mixer_in, mixer_out]` factors as (row, column).
# `memory_length` never occurs in parameters; it is listed so a future parameter with that axis is
# not factored by accident.
MELODI_FACTOR_RULES: tuple[tuple[str, str], ...] = (
  ('summary', 'column'),
  ('mixer_in', 'row'),
  ('mixer_out', 'column'),
  ('memory_length', 'none'),
)

MELODI_AXIS_NAMES: tuple[str, ...] = tuple(name for name, _ in MELODI_AXIS_RULES)


def logical_axis_rules(
  activation_partitioning_dims: int = 1,
  parameter_partitioning_dims: int = 1,
  additional_rules: Sequence[tuple[str, str | None]] | None = None,
) -> Sequence[tuple[str, str | None]]:
  """T5X's standard logical axis rules plus MELODI's (and any `additional_rules`).

  Args:
    activation_partitioning_dims: 1 or 2, as in `t5x.partitioning.standard_logical_axis_rules`.
    parameter_partitioning_dims: 1 or 2, as in `t5x.partitioning.standard_logical_axis_rules`.
    additional_rules: extra `(logical, mesh)` rules; they take precedence over MELODI's.

  Returns:
    The rule list for `t5x.partitioning.PjitPartitioner(logical_axis_rules=...)`.
  """
  from t5x import partitioning as t5x_partitioning  # pylint: disable=g-import-not-at-top

  extra = list(additional_rules or ())
  overridden = {name for name, _ in extra}
  extra += [rule for rule in MELODI_AXIS_RULES if rule[0] not in overridden]
  return t5x_partitioning.standard_logical_axis_rules(
    activation_partitioning_dims=activation_partitioning_dims,
    parameter_partitioning_dims=parameter_partitioning_dims,
    additional_rules=extra,
  )


def logical_factor_rules():
  """T5X Adafactor's standard factor rules plus MELODI's axes (a frozen dict name -> FactorDim)."""
  from flax.core import frozen_dict  # pylint: disable=g-import-not-at-top
  from t5x import adafactor  # pylint: disable=g-import-not-at-top

  rules = dict(adafactor.standard_logical_factor_rules())
  for name, dim in MELODI_FACTOR_RULES:
    rules[name] = adafactor.factor_name_to_factordim(dim)
  return frozen_dict.freeze(rules)


def factor_map():
  """Adafactor's factoring rule for every parameter (`adafactor.Adafactor.factor_map`).

  Every parameter of the four architectures has rank <= 2. T5X's Adafactor factors such a
  parameter by its heuristic (row and column second moments over the two largest dimensions, when
  both have at least `min_dim_size_to_factor` entries) whatever logical rule it is given, and logs
  "the factorization method falls back to heuristics" for each one (about 140 per run). This map
  gives every parameter that heuristic directly: the same optimizer state, no warnings. A parameter
  of rank > 2 has no heuristic: T5X then stops with an error naming it ("must have an explicit
  factorization rule"); give it a rule here (a `(path regex, FactorDim tuple)` before the last).
  """
  from t5x import adafactor  # pylint: disable=g-import-not-at-top

  return adafactor.HParamMap([(r'.*', adafactor.HEURISTIC_RULE)])


def host_mesh_partitioner_cls():
  """`HostMeshPartitioner` (defined lazily: it subclasses T5X's `PjitPartitioner`)."""
  from jax.sharding import Mesh  # pylint: disable=g-import-not-at-top
  from t5x import partitioning as t5x_partitioning  # pylint: disable=g-import-not-at-top

  class HostMeshPartitioner(t5x_partitioning.PjitPartitioner):
    """`PjitPartitioner` whose mesh is every device in process order: `data` x `model`.

    T5X's default mesh on CPU puts all devices on `model` (no data parallelism), and its
    `ici_mesh_shape` needs TPU topology attributes. This mesh takes `jax.devices()` sorted by
    (process, id) and reshapes them to `(devices / num_partitions, num_partitions)` on
    `('data', 'model')`, so host 0's rows come first in the global batch. Use it for CPU hosts
    (tests, a data-parallel run on several machines); on TPU use T5X's `PjitPartitioner`.
    """

    @property
    def mesh(self) -> Mesh:
      if getattr(self, '_host_mesh', None) is None:
        import jax  # pylint: disable=g-import-not-at-top
        import numpy as np  # pylint: disable=g-import-not-at-top

        parts = self._num_partitions or 1
        devices = sorted(jax.devices(self._backend), key=lambda d: (d.process_index, d.id))
        if len(devices) % parts:
          raise ValueError(
            f'HostMeshPartitioner.num_partitions={parts} does not divide the {len(devices)} '
            'devices.'
          )
        grid = np.asarray(devices, dtype=object).reshape(len(devices) // parts, parts)
        self._host_mesh = Mesh(grid, ('data', 'model'))
      return self._host_mesh

  return HostMeshPartitioner


def __getattr__(name: str):
  # `HostMeshPartitioner` needs T5X; define it on first use so this module imports without it.
  if name == 'HostMeshPartitioner':
    cls = host_mesh_partitioner_cls()
    globals()[name] = cls
    return cls
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
