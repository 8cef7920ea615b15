"""The step of a job, ready to lower for its slice: `build_target`.

A train job's step is T5X's trainer train step; an eval job's, the streaming eval step of
`t5x_eval.MemoryTrainer`; both are built from the job's gin (`job_gin`) with T5X's partitioner on
the slice's mesh. A timing job's step is the benchmark's (`melodi_t5x.tools.bench`) on one device.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from melodi_t5x.tools import bench
from melodi_t5x.tools import flops as flops_lib
from melodi_t5x.tools.tpu_compile import job_gin as job_gin_lib
from melodi_t5x.tools.tpu_compile import slices, t5x_internals


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


def job_kind(job) -> str:
  """'train', 'eval' (either memory mode) or 'timing'."""
  if job.kind == 'train':
    return 'train'
  if job.kind.startswith('eval'):
    return 'eval'
  return 'timing'


def build_target(job, slice_: slices.Slice) -> Target:
  """The compile target of one launcher job on `slice_`."""
  kind = job_kind(job)
  if kind == 'timing':
    prefix = slices.TOPOLOGY_PREFIX[slice_.accelerator]
    return timing_target(job, slices.topology_devices(f'{prefix}:{job.topology}'))
  devices = slices.topology_devices(slice_.name)
  return (train_target if kind == 'train' else eval_target)(job, devices)


def _key(parts: dict[str, Any]) -> str:
  return hashlib.sha256(json.dumps(parts, sort_keys=True, default=repr).encode()).hexdigest()[:16]


def _abstract(tree):
  return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def _target(
  step, args: tuple, devices: Sequence[Any], describe: dict[str, Any], *, count: int, **flops
) -> Target:
  """The target of `step` (jitted or T5X-partitioned) on abstract `args`, run by `count` of the
  slice's `devices`."""
  return Target(
    key=_key(describe),
    lower=lambda: step.lower(*args),
    devices=count,
    cores_per_chip=slices.cores_per_chip(devices),
    device_kind=devices[0].device_kind,
    describe=describe,
    trace=lambda: jax.make_jaxpr(step)(*args),
    **flops,
  )


# ---------------------------------------------------------------------------------------------
# T5X's steps (train and eval jobs).
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _T5xStep:
  """A T5X step built in its job's gin context (`_t5x_target` adds model, batch and mesh)."""

  # The partitioned step (it has `lower`; `jax.make_jaxpr` traces it).
  fn: Any
  # Its abstract arguments.
  args: tuple
  # The batch it is given: feature name -> ShapeDtypeStruct [B, L] (or [B]).
  batch_spec: dict[str, jax.ShapeDtypeStruct]
  # What else determines the program (optimizer, trainer or evaluator, schedule).
  describe: dict[str, Any]
  # FLOPs executed / model FLOPs per step (analytic, all devices), and the job's steps (or None).
  flops: float | None
  model_flops: float | None
  steps: int | None


def _t5x_target(
  job,
  devices: Sequence[Any],
  *,
  entry: str,
  dataset: str,
  make_step: Callable[[dict[str, Any], Any, Any, int, int], _T5xStep],
) -> Target:
  """Parses the job's gin, puts T5X's partitioner on the slice's mesh and builds the step.

  Args:
    job: a `t5x.train` or `t5x.eval` job.
    devices: the slice's devices.
    entry: the script function whose gin bindings configure the run ('train', 'evaluate').
    dataset: its binding of the `utils.DatasetConfig` whose batch the step takes.
    make_step: (bindings, model, partitioner, batch, length) -> the step.
  """
  with job_gin_lib.job_gin(job) as script:
    b = job_gin_lib.bindings(getattr(script, entry))
    model, partitioner = b['model'], b['partitioner']
    dataset_cfg = b[dataset]
    mesh = slices.use_slice_mesh(partitioner, devices)
    batch, length = int(dataset_cfg.batch_size), _segment_length(dataset_cfg)
    step = make_step(b, model, partitioner, batch, length)
    describe = {
      'step': job_kind(job),
      **_model_description(model),
      **step.describe,
      'batch': {k: [list(v.shape), str(v.dtype)] for k, v in step.batch_spec.items()},
      'rules': repr(partitioner.logical_axis_rules),
      'mesh_shape': dict(mesh.shape),
      'mesh_devices': [int(d.id) for d in mesh.devices.flat],
    }
  return _target(
    step.fn,
    step.args,
    devices,
    describe,
    count=len(devices),
    flops=step.flops,
    model_flops=step.model_flops,
    steps=step.steps,
  )


def train_target(job, devices: Sequence[Any]) -> Target:
  """T5X's train step of a `t5x.train` job on the slice's `devices`."""
  return _t5x_target(
    job, devices, entry='train', dataset='train_dataset_cfg', make_step=_train_step
  )


def eval_target(job, devices: Sequence[Any]) -> Target:
  """The streaming eval step of a `t5x.eval` job (`MemoryTrainer`) on the slice's `devices`."""
  return _t5x_target(job, devices, entry='evaluate', dataset='dataset_cfg', make_step=_eval_step)


def _train_step(b: dict[str, Any], model, partitioner, batch: int, length: int) -> _T5xStep:
  """The trainer's train step on the train state T5X builds (`TrainStateInitializer`)."""
  from t5x import utils as t5x_utils  # pylint: disable=g-import-not-at-top

  trainer_cls = b.get('trainer_cls')
  total_steps = int(b['total_steps'])
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
  lr, microbatches = t5x_internals.train_schedule(trainer)
  # Every project decoder has a config; its architecture record gives the FLOPs.
  cfg = model.module.config
  return _T5xStep(
    fn=t5x_internals.partitioned_train_step(trainer),
    args=(_abstract(state), batch_spec),
    batch_spec=batch_spec,
    describe={
      'optimizer': [
        type(model.optimizer_def).__name__,
        repr(getattr(model.optimizer_def, 'hyper_params', model.optimizer_def)),
      ],
      'trainer': trainer_cls.__name__,
      'num_microbatches': microbatches,
      'learning_rate': [float(lr(s)) for s in (0, 1000, total_steps // 2, total_steps)]
      if lr
      else None,
    },
    flops=flops_lib.step_flops(cfg, batch, length),
    model_flops=flops_lib.train_flops(cfg, batch, length)['total'],
    steps=total_steps,
  )


def _eval_step(b: dict[str, Any], model, partitioner, batch: int, length: int) -> _T5xStep:
  """The evaluator's streaming step on the params and the carried memory of `batch` rows."""
  from t5x import utils as t5x_utils  # pylint: disable=g-import-not-at-top

  evaluator_cls = b['training_evaluator_cls']
  lengths = model.FEATURE_CONVERTER_CLS(pack=False).get_model_feature_lengths({'targets': length})
  initializer = t5x_utils.TrainStateInitializer(
    optimizer_def=None,
    init_fn=model.get_initial_variables,
    input_shapes={
      k: (batch,) if k == 'start_of_sequence' else (batch, int(v)) for k, v in lengths.items()
    },
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
  memory = jax.tree_util.tree_map(
    lambda x: jax.ShapeDtypeStruct((batch, *x.shape[1:]), x.dtype), state.flax_mutables
  )
  batch_spec = _eval_batch_spec(batch, length)
  fwd = flops_lib.eval_flops(model.module.config, batch, length)
  return _T5xStep(
    # The project's evaluator (t5x_eval.MemoryTrainer) builds its step privately, as `stream`
    # runs it; there is no public accessor.
    fn=evaluator._make_streaming_step(),  # pylint: disable=protected-access
    args=(_abstract(state.params), memory, batch_spec),
    batch_spec=batch_spec,
    describe={'evaluator': evaluator_cls.__name__},
    flops=fwd,
    model_flops=fwd,
    steps=None,
  )


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
    **t5x_internals.loss_settings(model),
    # The project's model (t5x_model.MemoryDecoderModel) keeps this setting private too.
    'misaligned_rows': getattr(model, '_misaligned_rows', None),
  }


# ---------------------------------------------------------------------------------------------
# The benchmark's steps (timing jobs).
# ---------------------------------------------------------------------------------------------


def timing_target(job, devices: Sequence[Any]) -> Target:
  """The benchmark step of a timing job (`melodi_t5x.tools.bench`) on the first of `devices`."""
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
    hw = flops_lib.step_flops(cfg, bsz, length)
    mf = flops_lib.train_flops(cfg, bsz, length)['total']
  else:
    tokens = jnp.ones((bsz, length), jnp.int32)
    variables = jax.eval_shape(
      lambda r: model.init(r, tokens, enable_dropout=False), jax.random.PRNGKey(0)
    )
    step = bench.make_eval_step(model)
    abstract = (placed(variables['params']), placed(variables.get('memory', {})), batch)
    hw = mf = flops_lib.eval_flops(cfg, bsz, length)
  describe = {
    'step': f'timing_{args.step}',
    'config': repr(cfg),
    'batch': [bsz, length],
    'device': int(device.id),
  }
  return _target(step, abstract, devices, describe, count=1, flops=hw, model_flops=mf, steps=None)
