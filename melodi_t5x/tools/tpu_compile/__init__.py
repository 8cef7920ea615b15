r"""Compiles every job of a sweep for its TPU slice on this (CPU) machine and checks it fits.

Usage (a CPU machine with libtpu installed, e.g. `pip install -r requirements-tpu.txt`):

  JAX_PLATFORMS=cpu python -m melodi_t5x.tools.tpu_compile --sweep=main \
      [--accelerator=v5e] [--topology=4x8] [--gin.NAME=VALUE ...] [--json OUT] [--workers N]
  JAX_PLATFORMS=cpu python -m melodi_t5x.tools.tpu_compile \
      --experiment=gin/experiments/main/pg19_t5_xl.gin --accelerator=v4

The jobs are the launcher's (`melodi_t5x.jobs.sweep_jobs`: per experiment one `t5x.train` job and
one `t5x.eval` job per memory mode; the `timing` sweep's benchmark jobs). For each job this parses
the job's gin files and bindings as `t5x.train` / `t5x.eval` would, builds T5X's partitioner and
its mesh for the slice (T5X's `get_mesh` on the devices of libtpu's topology description, so the
mesh has the real device coordinates), and compiles the step the job runs with abstract inputs
(nothing of the model's size is allocated):

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

Modules, bottom-up:

  slices         a TPU slice: libtpu's devices of its topology, T5X's mesh on them.
  t5x_internals  the T5X attributes the check reads that T5X keeps private (each commented).
  job_gin        a job's gin files and bindings, parsed as its T5X script parses them.
  targets        the step of a job (train, eval, timing), ready to lower: `build_target`.
  cache          compiling a step, or reading its result back from the results cache.
  report         a job's row: memory plan, fit, step-time estimate; the table and docs table.
  pool           `check_jobs`: build every job's step, compile each distinct one once.
  cli            the command line (`python -m melodi_t5x.tools.tpu_compile`).
"""

import os

# Set before any module of the package imports jax (a spawned compile worker imports this first):
# libtpu takes a lock file per process unless told that several processes may load it, and the
# check runs on the CPU backend (the TPU is only described, never used).
os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
