r"""Compiles every job of a sweep for its TPU slice on this (CPU) machine and checks it fits.

Usage (a CPU machine with libtpu installed, e.g. `pip install -r requirements-tpu.txt`):

  JAX_PLATFORMS=cpu python -m melodi_t5x.tools.tpu_compile --sweep=main \
      [--accelerator=v5e] [--topology=4x8] [--gin.NAME=VALUE ...] [--json OUT] [--workers N]
  JAX_PLATFORMS=cpu python -m melodi_t5x.tools.tpu_compile \
      --experiment=gin/experiments/main/pg19_t5_xl.gin --accelerator=v4

The jobs are the launcher's (`xm_launch.jobs.sweep_jobs`: per experiment one `t5x.train` job and
one `t5x.eval` job per memory mode; the `timing` sweep's benchmark jobs). For each job this parses
the job's gin files and bindings as `t5x.train` / `t5x.eval` would, builds T5X's partitioner and
its mesh for the slice (the devices of libtpu's topology description, so T5X's `default_mesh` /
`get_mesh` run on the real device coordinates), and compiles the step the job runs with abstract
inputs (nothing of the model's size is allocated):

  train    T5X's trainer train step (`Trainer._partitioned_train_step`: forward, backward and
           Adafactor update with the carried `flax_mutables`), on the train state T5X builds.
  eval     the streaming eval step of `t5x_eval.MemoryTrainer` (params and carried memory; both
           memory modes run the same step, 'reset' only sets `start_of_sequence` on the host).
  timing   the benchmark's train or eval step (`melodi_t5x.tools.bench`) on one device.

Jobs whose resolved step (model config, loss settings, optimizer, shapes, learning-rate schedule,
mesh) is equal share one compile (e.g. a model on PG-19 and on C4; the two eval modes).

Per job it reports XLA:TPU's memory plan per device (arguments + outputs - aliased + temporaries,
`fits` if at most 90% of the device's HBM; a device is a chip, except on v4, which libtpu describes
as two devices per chip, one per TensorCore, each with half the chip's HBM and peak) and a time
estimate: XLA's own cost analysis counts a loop body once and its `optimal_seconds` can be
negative for programs with loops, so the estimate is the matmul FLOPs of the step as traced
(`melodi_t5x.tools.flops.jaxpr_dot_flops`: every dot_general, scan bodies times their length,
recomputation included; the analytic `flops.step_flops` if the step cannot be traced) over the
devices' dense bf16 peak at an assumed model FLOPs utilisation (`--utilisation`, default 0.4).
These are compiler plans and estimates, not measurements. The exit status is 1 when any job does
not fit or fails to compile.

The gin files' vocabulary (a SentencePiece file, often on GCS) is replaced by a stand-in of size
VOCAB_SIZE: only the embedding size, which VOCAB_SIZE sets, reaches the compiled step.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import functools
import hashlib
import json
import multiprocessing
import os
import sys
import time
import traceback
from collections.abc import Sequence
from typing import Any
from unittest import mock

# libtpu takes a lock file per process unless told that several processes may load it.
os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from melodi_t5x import experiments, t5x_gin  # noqa: E402
from melodi_t5x.tools import bench  # noqa: E402
from melodi_t5x.tools import flops as flops_lib  # noqa: E402

# A job fits if its per-chip plan is at most this fraction of the chip's HBM (room for the
# runtime, fragmentation and XLA's own buffers).
FIT_FRACTION = 0.9
# Model FLOPs utilisation assumed for the time estimate.
DEFAULT_UTILISATION = 0.4
# Accelerator flag -> libtpu topology name prefix.
TOPOLOGY_PREFIX = {'v4': 'v4', 'v5e': 'v5e', 'v5p': 'v5p', 'v6e': 'v6e'}
# libtpu describes no single-chip slice ('v5e:1x1' fails): the timing jobs (one device) compile
# for the first device of this smallest slice of the same chip.
SMALLEST_TOPOLOGY = {'v4': '2x2x1', 'v5e': '2x2', 'v5p': '2x2x1', 'v6e': '2x2'}
# Gin text appended to every job's gin: a vocabulary stand-in of the embedding's size.
VOCABULARY_STANDIN = """
from __gin__ import dynamic_registration
import seqio
VOCABULARY = @seqio.PassThroughVocabulary()
seqio.PassThroughVocabulary.size = %VOCAB_SIZE
"""
GIB = 2**30
# Environment variable naming the results cache (default ~/.cache/melodi_t5x/tpu_compile).
CACHE_ENV = 'MELODI_TPU_COMPILE_CACHE'


@dataclasses.dataclass(frozen=True)
class Slice:
  """A TPU slice: the launcher's accelerator flag and topology."""

  # 'v4', 'v5e', 'v5p' or 'v6e'.
  accelerator: str
  # Chip grid, e.g. '4x8' or '2x2x4'.
  topology: str

  @property
  def name(self) -> str:
    return f'{TOPOLOGY_PREFIX[self.accelerator]}:{self.topology}'


@functools.lru_cache(maxsize=8)
def topology_devices(slice_name: str) -> tuple[Any, ...]:
  """The devices of libtpu's description of `slice_name` (e.g. 'v5e:4x8')."""
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top

  try:
    topo = topologies.get_topology_desc(topology_name=slice_name, platform='tpu')
  except Exception as e:  # libtpu missing or an unknown topology
    raise RuntimeError(
      f'libtpu cannot describe the slice {slice_name!r} ({type(e).__name__}: {e}). Install the '
      'TPU requirements (pip install -r requirements-tpu.txt) and give a topology of that chip, '
      'e.g. v5e:4x8, v6e:4x8, v4:2x2x4, v5p:2x2x4.'
    ) from e
  return tuple(topo.devices)


def cores_per_chip(devices: Sequence[Any]) -> int:
  """JAX devices per chip: libtpu describes a v4 chip as two devices (one per TensorCore)."""
  return 1 + max(int(getattr(d, 'core_on_chip', 0)) for d in devices)


def libtpu_available() -> bool:
  """Whether libtpu can describe a TPU slice here (the slow tests skip without it)."""
  try:
    topology_devices('v5e:2x2')
  except RuntimeError:
    return False
  return True


def t5x_mesh(partitioner, devices: Sequence[Any]):
  """The mesh `partitioner` would build on a slice whose devices are `devices`.

  Runs T5X's own `default_mesh` (hence `get_mesh` with the submesh, or its per-TPU defaults, and
  its error for a TPU it has no default for) with `jax.devices()` / `jax.local_devices()` seen as
  the slice's devices; process 0's devices are the local ones.
  """
  from t5x import partitioning as t5x_partitioning  # pylint: disable=g-import-not-at-top

  devices = list(devices)
  local = [d for d in devices if d.process_index == devices[0].process_index]
  with (
    mock.patch.object(t5x_partitioning.jax, 'devices', lambda backend=None: devices),
    mock.patch.object(
      t5x_partitioning.jax, 'local_devices', lambda process_index=None, backend=None: local
    ),
  ):
    return t5x_partitioning.default_mesh(
      partitioner._num_partitions,  # pylint: disable=protected-access
      partitioner._model_parallel_submesh,  # pylint: disable=protected-access
      None,
      partitioner._ici_mesh_shape,  # pylint: disable=protected-access
      partitioner._dcn_mesh_shape,  # pylint: disable=protected-access
    )


def use_mesh(partitioner, mesh) -> None:
  """Makes `partitioner` (a T5X `PjitPartitioner`) use `mesh` instead of the host's devices."""
  partitioner.__dict__['mesh'] = mesh  # `mesh` is a cached_property


# ---------------------------------------------------------------------------------------------
# Gin: a job's configuration as t5x.train / t5x.eval parse it.
# ---------------------------------------------------------------------------------------------


def _script_module(module: str):
  """The T5X script module (`t5x.train` / `t5x.eval`) a job runs."""
  import importlib  # pylint: disable=g-import-not-at-top

  return importlib.import_module(module)


@contextlib.contextmanager
def job_gin(job):
  """Parses a job's gin files and bindings as its T5X script would; yields the script module.

  The gin files `import __main__ as train_script` (or `eval_script`): while parsing, `__main__`
  is the script module, as when the job runs.
  """
  import gin  # pylint: disable=g-import-not-at-top
  import t5x  # pylint: disable=g-import-not-at-top

  from melodi_t5x import t5x_gin  # pylint: disable=g-import-not-at-top

  script = _script_module(job.module)
  saved = sys.modules['__main__']
  sys.modules['__main__'] = script
  gin.clear_config()
  try:
    for path in (
      os.getcwd(),
      t5x_gin.register_search_path(),
      os.path.dirname(os.path.dirname(t5x.__file__)),
    ):
      gin.add_config_file_search_path(path)
    gin.parse_config_files_and_bindings(
      list(job.gin_files), list(job.bindings), finalize_config=False
    )
    gin.parse_config(VOCABULARY_STANDIN)
    yield script
  finally:
    sys.modules['__main__'] = saved
    gin.clear_config()


def _bindings(fn) -> dict[str, Any]:
  import gin  # pylint: disable=g-import-not-at-top

  return dict(gin.get_bindings(fn, resolve_references=True))


# ---------------------------------------------------------------------------------------------
# The steps.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Target:
  """A step ready to compile: `lower()` gives the lowered program; `key` identifies it."""

  # Hash of everything that determines the compiled program.
  key: str
  # () -> jax `Lowered`.
  lower: Any
  # Devices the step runs on.
  devices: int
  # Devices per chip in libtpu's description (2 for v4: one per TensorCore; else 1).
  cores_per_chip: int
  # Device kind (e.g. 'TPU v5 lite').
  device_kind: str
  # FLOPs the hardware executes per step (analytic, whole step, all devices), or None.
  flops: float | None
  # Model FLOPs per step (without recomputation), or None.
  model_flops: float | None
  # Steps of the job (train: TRAIN_STEPS; eval/timing: None).
  steps: int | None
  # What the key was made of (reported in the JSON).
  describe: dict[str, Any]
  # () -> jax `ClosedJaxpr` of the step (its matmuls are counted, scan bodies x length).
  trace: Any = None


def _key(parts: dict[str, Any]) -> str:
  return hashlib.sha256(json.dumps(parts, sort_keys=True, default=repr).encode()).hexdigest()[:16]


def _abstract(tree):
  return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), tree)


def _flops_name(module_config) -> str | None:
  from melodi_t5x import config as config_lib  # pylint: disable=g-import-not-at-top

  # Subclasses first: MemorizingConfig and BRTConfig derive from XLConfig.
  for cls, name in (
    (config_lib.MemorizingConfig, 'memorizing'),
    (config_lib.BRTConfig, 'brt'),
    (config_lib.XLConfig, 'xl'),
    (config_lib.MelodiConfig, 'melodi'),
  ):
    if isinstance(module_config, cls):
      return name
  return None


def _train_batch_spec(batch: int, length: int) -> dict[str, jax.ShapeDtypeStruct]:
  """The train iterator's batch (`t5x_data.get_dataset`: MODEL_KEYS, document_id folded)."""
  from melodi_t5x import t5x_data  # pylint: disable=g-import-not-at-top
  from tasks import streaming  # pylint: disable=g-import-not-at-top

  example = streaming.padding_batch(batch, length)
  example['document_id'] = t5x_data.document_key(example['document_id'])
  return {k: jax.ShapeDtypeStruct(example[k].shape, example[k].dtype) for k in t5x_data.MODEL_KEYS}


def _eval_batch_spec(batch: int, length: int) -> dict[str, jax.ShapeDtypeStruct]:
  """The streamed eval batch as `MemoryTrainer.stream` sends it (`t5x_eval.device_batch`)."""
  from melodi_t5x import t5x_eval  # pylint: disable=g-import-not-at-top
  from tasks import streaming  # pylint: disable=g-import-not-at-top

  example = t5x_eval.device_batch(streaming.padding_batch(batch, length))
  return {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in example.items()}


def _segment_length(dataset_cfg) -> int:
  lengths = dict(dataset_cfg.task_feature_lengths or {})
  if 'targets' not in lengths:
    raise ValueError(
      "utils.DatasetConfig.task_feature_lengths has no 'targets' (TASK_FEATURE_LENGTHS)."
    )
  return int(lengths['targets'])


def _model_description(model) -> dict[str, Any]:
  return {
    'model_class': type(model).__name__,
    'module': type(model.module).__name__,
    'config': repr(getattr(model.module, 'config', None)),
    'z_loss': getattr(model, '_z_loss', None),
    'label_smoothing': getattr(model, '_label_smoothing', None),
    'loss_normalizing_factor': repr(getattr(model, '_loss_normalizing_factor', None)),
    'misaligned_rows': getattr(model, '_misaligned_rows', None),
  }


def _mesh_description(mesh) -> dict[str, Any]:
  return {
    'mesh_shape': dict(mesh.shape),
    'mesh_devices': [int(d.id) for d in mesh.devices.flat],
  }


def train_target(job, slice_: Slice, devices: Sequence[Any]) -> Target:
  """T5X's train step of a `t5x.train` job on the slice."""
  from t5x import utils as t5x_utils  # pylint: disable=g-import-not-at-top

  with job_gin(job) as script:
    b = _bindings(script.train)
    model, partitioner = b['model'], b['partitioner']
    dataset_cfg = b['train_dataset_cfg']
    trainer_cls = b.get('trainer_cls')
    total_steps = int(b['total_steps'])
    mesh = t5x_mesh(partitioner, devices)
    use_mesh(partitioner, mesh)
    batch, length = int(dataset_cfg.batch_size), _segment_length(dataset_cfg)
    batch_spec = _train_batch_spec(batch, length)
    initializer = t5x_utils.TrainStateInitializer(
      optimizer_def=model.optimizer_def,
      init_fn=model.get_initial_variables,
      input_shapes={k: v.shape for k, v in batch_spec.items()},
      input_types={k: v.dtype for k, v in batch_spec.items()},
      partitioner=partitioner,
    )
    state = initializer.global_train_state_shape
    trainer = trainer_cls(
      model=model,
      train_state=state,
      partitioner=partitioner,
      train_state_axes=initializer.train_state_axes,
      eval_names=[],
      summary_dir=None,
      rng=jax.random.PRNGKey(0),
    )
    step = trainer._partitioned_train_step  # pylint: disable=protected-access
    lr = trainer._learning_rate_fn  # pylint: disable=protected-access
    describe = {
      'step': 'train',
      **_model_description(model),
      'optimizer': [
        type(model.optimizer_def).__name__,
        repr(getattr(model.optimizer_def, 'hyper_params', model.optimizer_def)),
      ],
      'trainer': trainer_cls.__name__,
      'num_microbatches': trainer._num_microbatches,  # pylint: disable=protected-access
      'learning_rate': [float(lr(s)) for s in (0, 1000, total_steps // 2, total_steps)]
      if lr
      else None,
      'batch': {k: [list(v.shape), str(v.dtype)] for k, v in batch_spec.items()},
      'rules': repr(partitioner.logical_axis_rules),
      **_mesh_description(mesh),
    }
    cfg = getattr(model.module, 'config', None)
    name = _flops_name(cfg)
    hw = flops_lib.step_flops(name, cfg, batch, length) if name else None
    mf = flops_lib.train_flops(name, cfg, batch, length)['total'] if name else None

  def lower():
    with mock.patch.object(jax, 'devices', lambda backend=None: list(devices)):
      return step.lower(_abstract_state(state), batch_spec)

  def trace():
    with mock.patch.object(jax, 'devices', lambda backend=None: list(devices)):
      return jax.make_jaxpr(step)(_abstract_state(state), batch_spec)

  return Target(
    _key(describe),
    lower,
    len(devices),
    cores_per_chip(devices),
    devices[0].device_kind,
    hw,
    mf,
    total_steps,
    describe,
    trace,
  )


def _abstract_state(state):
  return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)


def eval_target(job, slice_: Slice, devices: Sequence[Any]) -> Target:
  """The streaming eval step of a `t5x.eval` job (`MemoryTrainer`) on the slice."""
  from t5x import utils as t5x_utils  # pylint: disable=g-import-not-at-top

  with job_gin(job) as script:
    b = _bindings(script.evaluate)
    model, partitioner = b['model'], b['partitioner']
    dataset_cfg = b['dataset_cfg']
    evaluator_cls = b['training_evaluator_cls']
    mesh = t5x_mesh(partitioner, devices)
    use_mesh(partitioner, mesh)
    batch, length = int(dataset_cfg.batch_size), _segment_length(dataset_cfg)
    lengths = model.FEATURE_CONVERTER_CLS(pack=False).get_model_feature_lengths({'targets': length})
    input_shapes = {
      k: (batch,) if k == 'start_of_sequence' else (batch, int(v)) for k, v in lengths.items()
    }
    initializer = t5x_utils.TrainStateInitializer(
      optimizer_def=None,
      init_fn=model.get_initial_variables,
      input_shapes=input_shapes,
      partitioner=partitioner,
    )
    state = initializer.global_train_state_shape
    evaluator = evaluator_cls(
      model=model,
      train_state=None,
      partitioner=partitioner,
      train_state_axes=initializer.train_state_axes,
      eval_names=[],
      summary_dir=None,
      rng=jax.random.PRNGKey(0),
      learning_rate_fn=None,
      num_microbatches=None,
    )
    step = evaluator._make_streaming_step()  # pylint: disable=protected-access
    batch_spec = _eval_batch_spec(batch, length)
    memory = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct((batch, *x.shape[1:]), x.dtype), state.flax_mutables
    )
    describe = {
      'step': 'eval',
      **_model_description(model),
      'evaluator': evaluator_cls.__name__,
      'batch': {k: [list(v.shape), str(v.dtype)] for k, v in batch_spec.items()},
      'rules': repr(partitioner.logical_axis_rules),
      **_mesh_description(mesh),
    }
    cfg = getattr(model.module, 'config', None)
    name = _flops_name(cfg)
    fwd = flops_lib.eval_flops(name, cfg, batch, length) if name else None

  def lower():
    with mock.patch.object(jax, 'devices', lambda backend=None: list(devices)):
      return step.lower(_abstract_state(state.params), memory, batch_spec)

  def trace():
    with mock.patch.object(jax, 'devices', lambda backend=None: list(devices)):
      return jax.make_jaxpr(step)(_abstract_state(state.params), memory, batch_spec)

  return Target(
    _key(describe),
    lower,
    len(devices),
    cores_per_chip(devices),
    devices[0].device_kind,
    fwd,
    fwd,
    None,
    describe,
    trace,
  )


def timing_target(job, slice_: Slice, devices: Sequence[Any]) -> Target:
  """The benchmark step of a timing job (`melodi_t5x.tools.bench`) on the slice's first device."""
  from jax.sharding import Mesh, NamedSharding  # pylint: disable=g-import-not-at-top
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top

  from melodi_t5x import architectures  # pylint: disable=g-import-not-at-top

  args = bench.parse_args(list(job.flags))
  cfg = bench.config_from_args(args)
  model = architectures.build_decoder(cfg)
  bsz, length = args.batch_size, args.segment_length
  device = devices[0]
  one = NamedSharding(Mesh(np.array([device]), ('data',)), P())

  def placed(tree):
    return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one), tree
    )

  batch = placed(jax.eval_shape(lambda: bench._batch(cfg, bsz, length, 0, True)))  # pylint: disable=protected-access
  if args.step == 'train':
    optimizer = bench.training_optimizer()
    init = bench._abstract_state(model, optimizer, bsz, length)  # pylint: disable=protected-access
    params, opt_state, mem = jax.eval_shape(init, jax.random.PRNGKey(0))
    step = bench.make_train_step(model, optimizer)
    rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=one)
    abstract = (placed(params), placed(opt_state), placed(mem), batch, rng)
    hw = flops_lib.step_flops(args.model, cfg, bsz, length)
    mf = flops_lib.train_flops(args.model, cfg, bsz, length)['total']
  else:
    tokens = jnp.ones((bsz, length), jnp.int32)
    variables = jax.eval_shape(
      lambda r: model.init(r, tokens, enable_dropout=False), jax.random.PRNGKey(0)
    )
    step = bench.make_eval_step(model)
    abstract = (placed(variables['params']), placed(variables.get('memory', {})), batch)
    hw = mf = flops_lib.eval_flops(args.model, cfg, bsz, length)
  describe = {
    'step': f'timing_{args.step}',
    'config': repr(cfg),
    'batch': [bsz, length],
    'device': int(device.id),
  }
  return Target(
    _key(describe),
    lambda: step.lower(*abstract),
    1,
    cores_per_chip(devices),
    device.device_kind,
    hw,
    mf,
    None,
    describe,
    lambda: jax.make_jaxpr(step)(*abstract),
  )


def job_kind(job) -> str:
  if job.kind == 'train':
    return 'train'
  if job.kind.startswith('eval'):
    return 'eval'
  return 'timing'


def build_target(job, slice_: Slice) -> Target:
  """The compile target of one launcher job on `slice_`."""
  kind = job_kind(job)
  if kind == 'timing':
    devices = topology_devices(f'{TOPOLOGY_PREFIX[slice_.accelerator]}:{job.topology}')
    return timing_target(job, slice_, devices)
  devices = topology_devices(slice_.name)
  return (train_target if kind == 'train' else eval_target)(job, slice_, devices)


# ---------------------------------------------------------------------------------------------
# Compiling and reporting.
# ---------------------------------------------------------------------------------------------


def memory_plan(compiled) -> dict[str, int]:
  """XLA's per-chip memory plan: argument, output, alias, temp bytes and their peak."""
  out = bench.xla_memory(compiled)
  out['peak'] = out.pop('peak_estimate')
  return out


class ResultCache:
  """Compile results on disk, keyed by the fingerprint of the lowered program.

  A result (memory plan, traced FLOPs, XLA's cost figures) is a function of the program XLA:TPU
  receives and of the compiler: the key hashes the lowered StableHLO (shardings included, source
  locations not), the slice, the device kind, the jax / jaxlib / libtpu versions and the XLA flags
  of the environment. Any change to the model code, the gin files or the mesh that reaches the
  step changes the program and misses; a rerun of an unchanged sweep, or a job that another
  sweep already compiled (e.g. an ablation family's shared run), is read back in seconds.
  Results only: no executable is stored, and failed compiles are not cached.
  """

  def __init__(self, directory: str):
    self.directory = directory

  def get(self, fingerprint: str) -> dict[str, Any] | None:
    try:
      with open(self._path(fingerprint)) as f:
        entry = json.load(f)
    except (OSError, ValueError):
      return None
    return entry.get('result') if entry.get('fingerprint') == fingerprint else None

  def put(self, fingerprint: str, result: dict[str, Any], **about: Any) -> None:
    os.makedirs(self.directory, exist_ok=True)
    path = self._path(fingerprint)
    tmp = f'{path}.{os.getpid()}.tmp'
    with open(tmp, 'w') as f:
      json.dump({'fingerprint': fingerprint, 'result': result, **about}, f, indent=1)
    os.replace(tmp, path)  # atomic: parallel workers never read half an entry

  def _path(self, fingerprint: str) -> str:
    return os.path.join(self.directory, f'{fingerprint}.json')


def default_cache_dir() -> str:
  return os.environ.get(CACHE_ENV) or os.path.join(
    os.path.expanduser('~'), '.cache', 'melodi_t5x', 'tpu_compile'
  )


def toolchain() -> dict[str, str]:
  """What besides the program decides XLA:TPU's plan: compiler versions and flags."""
  from importlib import metadata  # pylint: disable=g-import-not-at-top

  def version(dist: str) -> str:
    try:
      return metadata.version(dist)
    except metadata.PackageNotFoundError:
      return 'absent'

  return {
    'jax': jax.__version__,
    'jaxlib': version('jaxlib'),
    'libtpu': version('libtpu'),
    'XLA_FLAGS': os.environ.get('XLA_FLAGS', ''),
    'LIBTPU_INIT_ARGS': os.environ.get('LIBTPU_INIT_ARGS', ''),
  }


def program_fingerprint(lowered, target: Target, slice_name: str) -> str:
  """Hash of the lowered program, where it compiles (slice, mesh, devices) and the toolchain."""
  h = hashlib.sha256(lowered.as_text(debug_info=False).encode())
  where = {
    'slice': slice_name,
    'device_kind': target.device_kind,
    'devices': target.devices,
    **{k: target.describe.get(k) for k in ('mesh_shape', 'mesh_devices', 'device')},
    **toolchain(),
  }
  h.update(json.dumps(where, sort_keys=True, default=repr).encode())
  return h.hexdigest()[:24]


def compile_target(
  target: Target, slice_name: str, cache: ResultCache | None = None
) -> dict[str, Any]:
  """Compiles `target` for `slice_name` (or reads its result from `cache`): memory plan, XLA's
  cost figures, the traced matmul FLOPs and the compile seconds; 'cached' is True when read back.
  """
  lowered = target.lower()
  fingerprint = program_fingerprint(lowered, target, slice_name)
  hit = _read_back(cache, fingerprint) if cache is not None else None
  if hit is not None:
    return hit
  traced = None
  if target.trace is not None:
    try:
      traced = float(flops_lib.jaxpr_dot_flops(target.trace().jaxpr))
    except ValueError:  # a while loop: no static trip count; the analytic figure is used
      traced = None
  tick = time.perf_counter()
  compiled = lowered.compile()
  seconds = time.perf_counter() - tick
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  cost = dict(cost or {})
  result = {
    'memory': memory_plan(compiled),
    'compile_seconds': seconds,
    'traced_flops': traced,
    # Reported, not used: a loop body is counted once (see the module docstring).
    'xla_flops_loop_blind': float(cost.get('flops', 0.0)),
    'xla_optimal_seconds': float(cost.get('optimal_seconds', 0.0)),
  }
  if cache is not None:
    cache.put(fingerprint, result, describe=target.describe, toolchain=toolchain(), at=time.time())
  return {**result, 'fingerprint': fingerprint, 'cached': False}


def cached_result(target: Target, slice_name: str, cache: ResultCache) -> dict[str, Any] | None:
  """`compile_target`'s result when `cache` holds it (lowers the step, compiles nothing)."""
  return _read_back(cache, program_fingerprint(target.lower(), target, slice_name))


def _read_back(cache: ResultCache, fingerprint: str) -> dict[str, Any] | None:
  hit = cache.get(fingerprint)
  return None if hit is None else {**hit, 'fingerprint': fingerprint, 'cached': True}


def estimate(target: Target, utilisation: float, traced: float | None = None) -> dict[str, Any]:
  """FLOPs per step, step seconds and MFU at the estimate (None where FLOPs are unknown).

  The FLOPs executed are the matmuls of the traced step (`traced`, recomputation included) or,
  without a trace, the analytic `target.flops`; the step takes them over the devices' peak at
  `utilisation`. MFU counts the model FLOPs (no recomputation) in that time.
  """
  peak = flops_lib.peak_tflops(target.device_kind)
  peak = peak / target.cores_per_chip if peak else None
  executed = traced if traced else target.flops
  if executed is None or peak is None:
    return {'flops_per_step': executed, 'estimated_step_seconds': None, 'mfu_at_estimate': None}
  seconds = executed / target.devices / (peak * 1e12 * utilisation)
  model = target.model_flops or executed
  return {
    'flops_per_step': executed,
    'flops_source': 'traced matmuls' if traced else 'analytic',
    'model_flops_per_step': model,
    'estimated_step_seconds': seconds,
    'mfu_at_estimate': model / target.devices / seconds / (peak * 1e12),
  }


def job_row(job, target: Target | None, result: dict | None, error: str | None, **extra) -> dict:
  """The JSON row of one job."""
  kind = job_kind(job)
  row: dict[str, Any] = {'name': job.name, 'kind': kind, **extra}
  if target is None:
    row.update(fits=False, error=error)
    return row
  hbm = flops_lib.hbm_gib(target.device_kind)
  # Per device: a v4 chip described as two devices has half its HBM on each.
  hbm_bytes = int(hbm * GIB / target.cores_per_chip) if hbm else None
  row.update(
    devices=target.devices,
    chips=target.devices // target.cores_per_chip,
    device_kind=target.device_kind,
    hbm_bytes_per_chip=hbm_bytes,
    compile_key=target.key,
  )
  traced = result.get('traced_flops') if result else None
  row.update(estimate(target, extra.get('utilisation', DEFAULT_UTILISATION), traced))
  if result is None or error:
    row.update(peak_bytes_per_chip=None, fits=False, error=error)
    return row
  mem = result['memory']
  row.update(
    peak_bytes_per_chip=mem['peak'],
    memory=mem,
    fits=bool(hbm_bytes and mem['peak'] <= FIT_FRACTION * hbm_bytes),
    compile_seconds=result['compile_seconds'],
    cached=bool(result.get('cached')),
    fingerprint=result.get('fingerprint'),
    xla_flops_loop_blind=result['xla_flops_loop_blind'],
    xla_optimal_seconds=result['xla_optimal_seconds'],
  )
  sec = row.get('estimated_step_seconds')
  if kind == 'train' and target.steps and sec:
    hours = target.steps * sec / 3600
    chips = target.devices // target.cores_per_chip
    row.update(steps=target.steps, estimated_run_hours=hours, chip_hours=hours * chips)
  else:
    row.update(estimated_run_hours=None, chip_hours=None)
  if not row['fits']:
    row['error'] = (
      f'plan {mem["peak"] / GIB:.2f} GiB per chip > {FIT_FRACTION:.0%} of '
      f'{hbm_bytes / GIB if hbm_bytes else float("nan"):.0f} GiB HBM'
    )
  return row


def _compile_in_worker(
  job, slice_: Slice, cache: ResultCache | None
) -> tuple[dict | None, str | None]:
  """Worker process: rebuilds the job's target and compiles it."""
  try:
    return compile_target(build_target(job, slice_), slice_.name, cache), None
  except Exception as e:  # reported per job
    return None, _short_error(e)


def _short_error(e: BaseException) -> str:
  text = f'{type(e).__name__}: {e}'
  if 'RESOURCE_EXHAUSTED' in text or 'Ran out of memory' in text:
    start = text.find('RESOURCE_EXHAUSTED')
    return text[max(start, 0) : max(start, 0) + 400]
  return text[:600]


# Gin bindings of a job that do not reach its compiled step: where it reads and writes, and the
# eval memory mode ('reset' sets `start_of_sequence` on the host; the step is the same).
_HOST_ONLY_BINDINGS = ('MODEL_DIR=', 'CHECKPOINT_PATH=', 'EVAL_OUTPUT_DIR=', 'MEMORY_MODE=')


def _build_key(job) -> tuple:
  """Jobs with equal build keys build equal targets (their target is built once)."""
  bindings = tuple(b for b in job.bindings if not b.startswith(_HOST_ONLY_BINDINGS))
  return (job.module, job_kind(job), tuple(job.gin_files), bindings, tuple(job.flags), job.topology)


# Order in which a pool compiles missing steps: the longest compiles first.
_COMPILE_ORDER = {'train': 0, 'timing': 1, 'eval': 2}


def check_jobs(
  jobs: Sequence[Any],
  slice_: Slice,
  *,
  workers: int = 1,
  utilisation: float = DEFAULT_UTILISATION,
  cache: ResultCache | None = None,
  fresh_process: bool = False,
  log=print,
) -> list[dict]:
  """Builds every job's target, compiles each distinct one once (or reads it from `cache`),
  returns one row per job.

  With `workers` > 1 or `fresh_process`, each step that is not in `cache` compiles in a spawned
  process that exits after that one step, `workers` at a time: XLA's host memory is returned
  between steps (one process that compiles a whole paper-size sweep grows by several GB a step).
  Cached steps are read back here, without a process. The pool gets train steps first, then
  timing, then eval (longest first), each as soon as its cache lookup misses.
  """
  targets: dict[str, Target | None] = {}
  errors: dict[str, str] = {}
  built: dict[tuple, str] = {}
  for job in jobs:
    same = built.get(_build_key(job))
    if same is not None:
      targets[job.name] = targets[same]
      if same in errors:
        errors[job.name] = errors[same]
      continue
    built[_build_key(job)] = job.name
    try:
      targets[job.name] = build_target(job, slice_)
    except Exception as e:  # reported per job
      targets[job.name] = None
      errors[job.name] = _short_error(e)
      log(f'[build failed] {job.name}: {errors[job.name]}')
      if os.environ.get('TPU_COMPILE_DEBUG'):
        traceback.print_exc()
  first: dict[str, Any] = {}
  for job in jobs:
    target = targets[job.name]
    if target is not None:
      first.setdefault(target.key, job)
  log(f'{len(jobs)} jobs, {len(first)} distinct compiles on {slice_.name}')
  results: dict[str, tuple[dict | None, str | None]] = {}
  pooled = (workers > 1 or fresh_process) and bool(first)
  if pooled:
    ctx = multiprocessing.get_context('spawn')
    broken = 0
    # Processes spawn on submit only: a rerun whose steps are all cached starts none.
    with concurrent.futures.ProcessPoolExecutor(
      min(max(workers, 1), len(first)), mp_context=ctx, max_tasks_per_child=1
    ) as pool:
      futures = {}
      # Heaviest steps first (a train compile takes minutes, an eval one seconds), and each missing
      # step is submitted as soon as its lookup misses: the workers compile while the lookups of
      # the later steps (a lowering each) go on here.
      for key, job in sorted(first.items(), key=lambda kv: _COMPILE_ORDER[job_kind(kv[1])]):
        hit = None
        if cache is not None:
          try:
            hit = cached_result(targets[job.name], slice_.name, cache)
          except Exception:  # a step that fails to lower reports it from its worker
            hit = None
        if hit is not None:
          results[key] = (hit, None)
          log(_progress(job.name, results[key]))
        else:
          futures[pool.submit(_compile_in_worker, job, slice_, cache)] = key
      for fut in concurrent.futures.as_completed(futures):
        key = futures[fut]
        try:
          results[key] = fut.result()
        except concurrent.futures.BrokenExecutor:
          # A worker died, most often killed for host memory (a paper-size MELODI compile for
          # v4 takes ~13 GB); the pool's pending steps are compiled below, one at a time.
          broken += 1
          continue
        log(_progress(first[key].name, results[key]))
    if broken:
      log(
        f'[a compile worker died (host memory?)] compiling the {broken} steps it left one at a '
        'time in this process; lower --workers on this machine'
      )
  for key, job in first.items():
    if key in results:
      continue
    try:
      results[key] = (compile_target(targets[job.name], slice_.name, cache), None)
    except Exception as e:  # reported per job
      results[key] = (None, _short_error(e))
    log(_progress(job.name, results[key]))
  rows = []
  for job in jobs:
    target = targets[job.name]
    if target is None:
      rows.append(job_row(job, None, None, errors[job.name], utilisation=utilisation))
      continue
    result, error = results[target.key]
    shared = first[target.key].name
    rows.append(
      job_row(
        job,
        target,
        result,
        error,
        utilisation=utilisation,
        compiled_with=None if shared == job.name else shared,
      )
    )
  return rows


def _progress(name: str, outcome: tuple[dict | None, str | None]) -> str:
  result, error = outcome
  if error:
    return f'[compile failed] {name}: {error}'
  mem = result['memory']
  how = 'from cache, compiled in' if result.get('cached') else 'compiled'
  return f'[{how} {result["compile_seconds"]:.0f} s] {name}: {mem["peak"] / GIB:.2f} GiB/chip'


def format_rows(rows: Sequence[dict]) -> str:
  """The table printed for the rows."""
  lines = [
    f'{"job":58s} {"kind":6s} {"dev":>4s} {"GiB/chip":>9s} {"fits":>5s} {"step s":>8s} '
    f'{"MFU":>5s} {"run h":>7s} {"chip h":>8s}'
  ]
  for r in rows:
    peak = r.get('peak_bytes_per_chip')
    sec = r.get('estimated_step_seconds')
    mfu = r.get('mfu_at_estimate')
    hours, chip_hours = r.get('estimated_run_hours'), r.get('chip_hours')
    lines.append(
      f'{r["name"]:58s} {r["kind"]:6s} {r.get("devices", 0):4d} '
      f'{"-" if peak is None else f"{peak / GIB:.2f}":>9s} {"yes" if r["fits"] else "NO":>5s} '
      f'{"-" if sec is None else f"{sec:.3f}":>8s} {"-" if mfu is None else f"{mfu:.2f}":>5s} '
      f'{"-" if hours is None else f"{hours:.0f}":>7s} '
      f'{"-" if chip_hours is None else f"{chip_hours:.0f}":>8s}'
    )
    if r.get('error'):
      lines.append(f'    -> {r["error"]}')
  return '\n'.join(lines)


# ---------------------------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
  from xm_launch import jobs as jobs_lib  # pylint: disable=g-import-not-at-top

  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  group = p.add_mutually_exclusive_group(required=True)
  group.add_argument('--sweep', choices=experiments.sweep_names(), help='a sweep to check')
  group.add_argument('--experiment', help='one committed experiment gin file')
  group.add_argument(
    '--table', nargs='+', help="instead: print the docs' cost table of these --json outputs"
  )
  p.add_argument('--accelerator', default='v5e', choices=sorted(jobs_lib.ACCELERATORS))
  p.add_argument('--topology', default=None, help="slice topology (default: the launcher's)")
  p.add_argument(
    '--timing_topology', default=None, help="slice of the timing jobs (default: the launcher's)"
  )
  # Gin bindings of all jobs: --gin.NAME=VALUE or --gin_bindings (--binding: deprecated).
  t5x_gin.add_gin_flags(p, gin_files=False, deprecated=('--binding',))
  p.add_argument('--noeval', action='store_true', help='leave out the eval jobs')
  p.add_argument('--json', default=None, help='write the rows to this JSON file')
  p.add_argument(
    '--workers',
    type=int,
    default=1,
    help='compile this many steps in parallel, each in a process of its own that exits after it',
  )
  p.add_argument(
    '--in_process',
    action='store_true',
    help='with --workers 1: compile in this process (tracebacks, debuggers); its host memory grows '
    'with every step',
  )
  p.add_argument(
    '--cache_dir',
    default=None,
    help=f'results cache (default ${CACHE_ENV} or ~/.cache/melodi_t5x/tpu_compile)',
  )
  p.add_argument('--nocache', action='store_true', help='compile every step, read no cached result')
  p.add_argument(
    '--utilisation',
    type=float,
    default=DEFAULT_UTILISATION,
    help='model FLOPs utilisation assumed for the step-time estimate',
  )
  return t5x_gin.parse_args(p, argv)


def launcher_jobs(args: argparse.Namespace):
  """The launcher's jobs for the flags (`xm_launch.jobs.sweep_jobs`) and the slice."""
  from xm_launch import jobs as jobs_lib  # pylint: disable=g-import-not-at-top

  topology = args.topology or jobs_lib.ACCELERATORS[args.accelerator]
  timing = args.timing_topology or jobs_lib.TIMING_TOPOLOGY[args.accelerator]
  if timing in ('1x1',) or timing.count('x') == 0:
    timing = SMALLEST_TOPOLOGY[args.accelerator]
  jobs = jobs_lib.sweep_jobs(
    '/tmp/tpu_compile',
    sweep=args.sweep,
    experiment=args.experiment,
    eval_modes=() if args.noeval else experiments.MEMORY_MODES,
    bindings=[t5x_gin.normalize_binding(b) for b in args.gin_bindings],
    topology=topology,
    timing_topology=timing,
  )
  return jobs, Slice(args.accelerator, topology)


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.table:
    reports = []
    for path in args.table:
      with open(path) as f:
        reports.append(json.load(f))
    print(cost_table(reports))
    return 0
  if not 0 < args.utilisation <= 1:
    raise SystemExit(f'--utilisation={args.utilisation}: must be in (0, 1].')
  tick = time.time()
  jobs, slice_ = launcher_jobs(args)
  cache = None if args.nocache else ResultCache(args.cache_dir or default_cache_dir())
  rows = check_jobs(
    jobs,
    slice_,
    workers=args.workers,
    utilisation=args.utilisation,
    cache=cache,
    fresh_process=not args.in_process,
  )
  wall = time.time() - tick
  print(format_rows(rows))
  bad = [r for r in rows if not r['fits']]
  steps = {r['fingerprint']: r['cached'] for r in rows if r.get('fingerprint')}
  print(
    f'{len(rows)} jobs on {slice_.name}: {len(rows) - len(bad)} fit, {len(bad)} do not fit or '
    f'failed; {wall:.0f} s ({sum(not c for c in steps.values())} steps compiled, '
    f'{sum(steps.values())} read from the cache). Estimates: matmul FLOPs (traced, else '
    f'analytic) at {args.utilisation:.0%} of peak.'
  )
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(
        {
          'slice': slice_.name,
          'utilisation': args.utilisation,
          'fit_fraction': FIT_FRACTION,
          'wall_seconds': wall,
          'steps_compiled': sum(not c for c in steps.values()),
          'steps_from_cache': sum(steps.values()),
          'jobs': rows,
        },
        f,
        indent=1,
      )
  return 1 if bad else 0


# ---------------------------------------------------------------------------------------------
# The docs table (docs/experiments.md) from the JSON of one or more checks.
# ---------------------------------------------------------------------------------------------


def _model_of(name: str) -> str:
  """'main/pg19_t5_melodi_s128_l64/train' -> 'melodi_s128_l64'; timing jobs keep their name."""
  parts = name.split('/')
  if parts[0] == 'timing':
    return f'{parts[1]} ({parts[2]} step)'
  for dataset in experiments.MAIN_DATASETS:
    if parts[1].startswith(dataset + '_'):
      return parts[1][len(dataset) + 1 :]
  return parts[1]


def cost_table(reports: Sequence[dict]) -> str:
  """Markdown: per slice and model, GiB per device (train / eval), estimated step, MFU at the
  estimate, wall-clock hours and chip-hours of one run, and the main sweep's total."""
  lines = [
    '| slice | model | train GiB/dev | eval GiB/dev | est. step (s) | MFU at est. | hours / run '
    '| chip-hours / run |',
    '|---|---|---:|---:|---:|---:|---:|---:|',
  ]
  for report in reports:
    by_model: dict[str, dict[str, list[dict]]] = {}
    for row in report['jobs']:
      by_model.setdefault(_model_of(row['name']), {}).setdefault(row['kind'], []).append(row)
    total_chip_hours, total_hours = 0.0, 0.0
    for model, kinds in by_model.items():
      train = kinds.get('train', []) or kinds.get('timing', [])
      evals = kinds.get('eval', [])

      def gib(rows):
        values = [r['peak_bytes_per_chip'] / GIB for r in rows if r.get('peak_bytes_per_chip')]
        if not values:
          return 'failed' if rows else '-'
        low, high = min(values), max(values)
        text = f'{low:.1f}' if high - low < 0.05 else f'{low:.1f}-{high:.1f}'
        return text + ('' if all(r['fits'] for r in rows) else ' (no fit)')

      first = train[0] if train else {}
      sec, mfu = first.get('estimated_step_seconds'), first.get('mfu_at_estimate')
      hours = [r['estimated_run_hours'] for r in train if r.get('estimated_run_hours')]
      chip_hours = [r['chip_hours'] for r in train if r.get('chip_hours')]
      total_hours += sum(hours)
      total_chip_hours += sum(chip_hours)
      lines.append(
        f'| {report["slice"]} | {model} | {gib(train)} | {gib(evals)} | '
        f'{"-" if sec is None else f"{sec:.3g}"} | {"-" if mfu is None else f"{mfu:.2f}"} | '
        f'{f"{hours[0]:.1f}" if hours else "-"} | '
        f'{f"{chip_hours[0]:,.0f}" if chip_hours else "-"} |'
      )
    if total_chip_hours:
      lines.append(
        f'| {report["slice"]} | **sweep total** | | | | | {total_hours:,.0f} (one slice) | '
        f'{total_chip_hours:,.0f} |'
      )
  return '\n'.join(lines)


if __name__ == '__main__':
  raise SystemExit(main())
