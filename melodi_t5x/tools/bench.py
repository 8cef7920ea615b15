r"""Benchmarks one train step of any architecture: forward + backward + Adafactor update.

Usage:
  python -m melodi_t5x.tools.bench [--model {melodi,xl,memorizing,brt}] [--json OUT]
  python -m melodi_t5x.tools.bench --gin_file gin/models/xl.gin --gin_file gin/models/tiny.gin \
      --gin_file gin/experiments/data/local_books.gin --gin "NUM_LAYERS = 4" --segment-length 256

The model is built from gin exactly as `t5x.train` builds it (`MODULE` of the model files):
`--model` picks an architecture of `melodi_t5x.architectures` and its model file at the paper size
(with the PG-19 data file: T5's vocabulary, 32128 rows), or `--gin_file` gives the files in include
order (a model file, e.g. `tiny.gin` after it, a data file) and `--gin` adds bindings after them
(e.g. `NUM_LAYERS = 12`, `config.MelodiConfig.summary_size = 192`). Dropout is off
(`DROPOUT_RATE = 0.0` before the `--gin` bindings). Defaults are the paper's sizes (d=1024, 8x128
heads, MLP 4096, segment 4096 = 8 windows of 512, bfloat16 compute): MELODI S128+L64, Transformer-XL
(13 layers), the Memorizing Transformer (12 + 1 layers, 65536 slots, dense) and the
Block-Recurrent Transformer (12 layers, recurrent layer 9, 512 states).
Memory is carried from step to step (rows flagged as continuing their document after step 0), as
in training. The optimizer is training's (`training_optimizer`: T5X Adafactor as bound in
gin/models/common.gin, momentum 0.9). Reports the median tokens/s over the timed steps (after
one warm-up step), the compile time, peak device memory, parameter count, the analytic FLOPs of the
step (`melodi_t5x.tools.flops`, by term) and the model FLOPs utilisation from them when the device
peak is known (or given with --peak-tflops), and the compile time for segments of 4, 8 and 16
windows. `--remat-sweep` instead reports, for every rematerialisation setting of the model
(`--remat-modes` to choose), XLA's memory estimate of the compiled step (compile only: works at
the paper size on any host) and, with `--steps` > 0, the median step time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from melodi_t5x import architectures, experiments
from melodi_t5x import config as config_lib
from melodi_t5x.state import MEMORY
from melodi_t5x.tools import flops as flops_lib

# The data file of `--model` without `--gin_file`: T5's vocabulary (VOCAB_SIZE = 32128).
DEFAULT_DATA_GIN = 'gin/experiments/data/pg19_t5.gin'
# Bound after the gin files, before `--gin`: the benchmark times steps without dropout.
BENCH_BINDINGS = ('DROPOUT_RATE = 0.0',)


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  add = p.add_argument
  add(
    '--model',
    default=None,
    choices=architectures.names(),
    help='architecture at the paper size (its model file); default melodi unless --gin_file',
  )
  add(
    '--gin_file',
    action='append',
    default=None,
    help='gin files in include order (model file, size file, data file); repeatable',
  )
  add('--gin', action='append', default=[], help='gin binding after the files; repeatable')
  add('--segment-length', type=int, default=4096)
  add('--batch-size', type=int, default=1)
  add(
    '--remat',
    default=None,
    choices=list(config_lib.BaseConfig.REMAT_MODES),
    help="rematerialisation (BaseConfig.remat; default: the gin files'; xl and the models built "
    "on it: no 'window')",
  )
  add(
    '--remat-sweep',
    action='store_true',
    help='instead: per remat setting, XLA memory estimate (compile only) and, with --steps > 0, '
    'the median step time',
  )
  add(
    '--remat-modes', default=None, help='comma-separated settings for --remat-sweep (default: all)'
  )
  add('--steps', type=int, default=5, help='timed steps after one warm-up step')
  add('--compile-windows', default='4,8,16', help="window counts to time compiles for; '' skips")
  add('--peak-tflops', type=float, default=None, help='device peak for MFU (else by device kind)')
  add('--json', default=None, help='write the results to this JSON file (local or gs://)')
  add('--step', default='train', choices=['train', 'eval'], help='time a train or an eval step')
  return p.parse_args(argv)


def gin_setup(args: argparse.Namespace) -> tuple[list[str], list[str]]:
  """(gin files, bindings) of the benchmarked model."""
  if args.gin_file:
    files = list(args.gin_file)
  else:
    files = [architectures.get(args.model or 'melodi').gin_file, DEFAULT_DATA_GIN]
  return files, [*BENCH_BINDINGS, *args.gin]


def config_from_args(args: argparse.Namespace):
  """The config the gin files build (validated before compiling anything)."""
  cfg = experiments.decoder_config(*gin_setup(args))
  name = architectures.for_config(cfg).name
  if args.model and args.model != name:
    raise ValueError(
      f'--model={args.model} but the gin files {args.gin_file} build {name!r} '
      f'({type(cfg).__name__}); drop --model or give its model file.'
    )
  if args.remat is not None:
    cfg = dataclasses.replace(cfg, remat=args.remat)
  cfg.num_windows(args.segment_length)  # validate before compiling anything
  return cfg


def training_optimizer(learning_rate: float = 0.01) -> optax.GradientTransformation:
  """T5X's Adafactor as bound in gin/models/common.gin, in optax.

  `adafactor.Adafactor(decay_rate=0.8, beta1=0.9, step_offset=0)` with T5X's defaults: factored
  second moments (dims >= 128), epsilon1 1e-30, updates scaled by max(RMS(param), 1e-3), update
  RMS clipped to 1.0, momentum 0.9 in float32 (no debiasing), no weight decay. The learning rate
  is a constant (training's warmup + cosine schedule does not change the cost of a step).
  """
  return optax.adafactor(
    learning_rate=learning_rate,
    min_dim_size_to_factor=128,
    decay_rate=0.8,
    decay_offset=0,
    multiply_by_parameter_scale=True,
    clipping_threshold=1.0,
    momentum=0.9,
    dtype_momentum=jnp.float32,
    eps=1e-30,
    factored=True,
  )


def analytic_flops(args: argparse.Namespace, cfg) -> dict[str, float]:
  """Model FLOPs of one train step by term (see `melodi_t5x.tools.flops`), with 'total'."""
  return flops_lib.train_flops(cfg, args.batch_size, args.segment_length)


def make_train_step(model, optimizer: optax.GradientTransformation):
  """(params, opt_state, memory, batch, rng) -> (params, opt_state, memory, loss), jitted."""

  def loss_fn(params, mem, batch, rng):
    logits, new = model.apply(
      {'params': params, MEMORY: mem},
      batch['inputs'],
      batch['targets'],
      start_of_sequence=batch['start_of_sequence'],
      rngs={'dropout': rng},
      mutable=[MEMORY],
    )
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch['targets'])
    return jnp.sum(losses * batch['weights']), new.get(MEMORY, {})

  def step(params, opt_state, mem, batch, rng):
    (loss, mem), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, mem, batch, rng)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, mem, loss

  return jax.jit(step, donate_argnums=(0, 1, 2))


def _batch(cfg, batch_size: int, length: int, seed: int, first: bool):
  rng = np.random.RandomState(seed)
  tokens = rng.randint(1, cfg.vocab_size, (batch_size, length + 1)).astype(np.int32)
  return {
    'inputs': jnp.asarray(tokens[:, :-1]),
    'targets': jnp.asarray(tokens[:, 1:]),
    'weights': jnp.ones((batch_size, length), jnp.float32),
    'start_of_sequence': jnp.full((batch_size,), first),
  }


def _abstract_state(model, optimizer, batch_size: int, length: int):
  tokens = jax.ShapeDtypeStruct((batch_size, length), jnp.int32)

  def init(rng):
    variables = model.init(rng, jnp.ones(tokens.shape, jnp.int32), enable_dropout=False)
    params = variables['params']
    return params, optimizer.init(params), variables.get(MEMORY, {})

  return init


def _peak_tflops(args) -> float | None:
  if args.peak_tflops:
    return args.peak_tflops
  return flops_lib.peak_tflops(jax.devices()[0].device_kind)


def compile_train_step(model, optimizer, cfg, batch_size: int, length: int):
  """Compiles the train step on abstract inputs (nothing of the model's size is allocated).

  Returns:
    (compiled step, compile seconds, jitted `init(rng) -> (params, opt_state, memory)`).
  """
  init = jax.jit(_abstract_state(model, optimizer, batch_size, length))
  state = jax.eval_shape(init, jax.random.PRNGKey(0))
  batch = jax.eval_shape(lambda: _batch(cfg, batch_size, length, 0, True))
  step = make_train_step(model, optimizer)
  start = time.perf_counter()
  compiled = step.lower(*state, batch, jax.random.PRNGKey(0)).compile()
  return compiled, time.perf_counter() - start, init


def time_train_steps(compiled, init, cfg, batch_size: int, length: int, steps: int):
  """Median seconds of `steps` train steps after one warm-up step, and the last loss."""
  params, opt_state, mem = init(jax.random.PRNGKey(0))
  batches = [_batch(cfg, batch_size, length, i, i == 0) for i in range(2)]
  times = []
  for i in range(steps + 1):  # step 0 warms up
    t0 = time.perf_counter()
    params, opt_state, mem, loss = compiled(
      params, opt_state, mem, batches[i > 0], jax.random.PRNGKey(i)
    )
    loss.block_until_ready()
    if i:
      times.append(time.perf_counter() - t0)
  return statistics.median(times), float(loss)


def xla_memory(compiled) -> dict[str, int]:
  """XLA's memory analysis of a compiled step; `peak_estimate` = arguments + outputs - aliased
  (donated) + temporaries, the bytes live at the step's peak as XLA plans it."""
  an = compiled.memory_analysis()
  out = {
    k: int(getattr(an, f'{k}_size_in_bytes', 0) or 0)
    for k in ('argument', 'output', 'alias', 'temp')
  }
  out['peak_estimate'] = out['argument'] + out['output'] - out['alias'] + out['temp']
  return out


def run(args: argparse.Namespace) -> dict:
  cfg = config_from_args(args)
  model = architectures.build_decoder(cfg)
  optimizer = training_optimizer()
  length, bsz = args.segment_length, args.batch_size
  compiled, compile_sec, init = compile_train_step(model, optimizer, cfg, bsz, length)
  params = jax.eval_shape(init, jax.random.PRNGKey(0))[0]
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))
  flop_terms = analytic_flops(args, cfg)
  flops = flop_terms['total']
  step_sec, loss = time_train_steps(compiled, init, cfg, bsz, length, args.steps)

  memory = xla_memory(compiled)
  stats = jax.devices()[0].memory_stats() or {}
  # On CPU (no device statistics): XLA's own estimate of the step's live buffers.
  peak = stats.get('peak_bytes_in_use', memory['peak_estimate'])
  peak_tflops = _peak_tflops(args)
  result = {
    'device': jax.devices()[0].device_kind,
    'model': architectures.for_config(cfg).name,
    'config': {k: v for k, v in vars(args).items() if k != 'json'},
    'model_config': dataclasses.asdict(cfg),
    'params': n_params,
    'tokens_per_sec': bsz * length / step_sec,
    'step_sec_median': step_sec,
    'compile_sec': compile_sec,
    'peak_bytes': int(peak),
    'xla_memory': memory,
    'flops_per_step': flops,
    'flops_per_token': flops / (bsz * length) if flops else None,
    'flops_by_term': flop_terms,
    'mfu': flops / step_sec / (peak_tflops * 1e12) if flops and peak_tflops else None,
    'final_loss': loss,
  }
  windows = [int(w) for w in args.compile_windows.split(',') if w.strip()]
  result['compile_sec_by_windows'] = {
    str(w): compile_train_step(model, optimizer, cfg, bsz, w * cfg.window_length)[1]
    for w in windows
  }
  return result


def make_eval_step(model):
  """(params, memory, batch) -> (memory, nll sum): a test-time step, jitted.

  Forward only, no dropout, memory carried to the next segment, as in streaming evaluation
  (`t5x_eval.MemoryTrainer`).
  """

  def step(params, mem, batch):
    logits, new = model.apply(
      {'params': params, MEMORY: mem},
      batch['inputs'],
      batch['targets'],
      start_of_sequence=batch['start_of_sequence'],
      enable_dropout=False,
      mutable=[MEMORY],
    )
    losses = optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), batch['targets']
    )
    return new.get(MEMORY, {}), jnp.sum(losses * batch['weights'])

  return jax.jit(step, donate_argnums=(1,))


def run_eval(args: argparse.Namespace) -> dict:
  """Times `make_eval_step` (median over --steps after one warm-up step)."""
  cfg = config_from_args(args)
  model = architectures.build_decoder(cfg)
  length, bsz = args.segment_length, args.batch_size
  tokens = jnp.ones((bsz, length), jnp.int32)
  variables = jax.jit(lambda r: model.init(r, tokens, enable_dropout=False))(jax.random.PRNGKey(0))
  params, mem = variables['params'], variables.get(MEMORY, {})
  batches = [_batch(cfg, bsz, length, i, i == 0) for i in range(2)]
  start = time.perf_counter()
  compiled = make_eval_step(model).lower(params, mem, batches[0]).compile()
  compile_sec = time.perf_counter() - start
  times = []
  for i in range(args.steps + 1):  # step 0 warms up
    t0 = time.perf_counter()
    mem, nll = compiled(params, mem, batches[i > 0])
    nll.block_until_ready()
    if i:
      times.append(time.perf_counter() - t0)
  step_sec = statistics.median(times)
  return {
    'step': 'eval',
    'device': jax.devices()[0].device_kind,
    'model': architectures.for_config(cfg).name,
    'config': {k: v for k, v in vars(args).items() if k != 'json'},
    'model_config': dataclasses.asdict(cfg),
    'params': sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params)),
    'tokens_per_sec': bsz * length / step_sec,
    'step_sec_median': step_sec,
    'compile_sec': compile_sec,
    'final_nll_per_token': float(nll) / (bsz * length),
  }


def write_json(result: dict, path: str) -> None:
  """Writes the results (local path or gs://)."""
  from etils import epath  # pylint: disable=g-import-not-at-top

  out = epath.Path(path)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(result, indent=1))


# -- rematerialisation sweep ---------------------------------------------------------------------


def remat_sweep(args: argparse.Namespace) -> dict[str, dict]:
  """For every `remat` setting: XLA's memory estimate and, if `args.steps` > 0, step timing.

  The memory estimate needs only a compile on abstract inputs, so it works at the paper size on
  any host; timing runs `args.steps` steps after one warm-up step on real arrays.
  """
  results = {}
  length, bsz = args.segment_length, args.batch_size
  base = config_from_args(args)
  modes = list(type(base).REMAT_MODES)  # the settings of its architecture
  if args.remat_modes:
    modes = [m.strip() for m in args.remat_modes.split(',') if m.strip()]
  # Every setting is validated before anything compiles.
  configs = {m: dataclasses.replace(base, remat=m) for m in modes}
  for mode, cfg in configs.items():
    model, optimizer = architectures.build_decoder(cfg), training_optimizer()
    compiled, compile_sec, init = compile_train_step(model, optimizer, cfg, bsz, length)
    entry = {'compile_sec': compile_sec, 'memory': xla_memory(compiled)}
    if args.steps > 0:
      step_sec, loss = time_train_steps(compiled, init, cfg, bsz, length, args.steps)
      entry.update(step_sec_median=step_sec, tokens_per_sec=bsz * length / step_sec)
      entry['final_loss'] = loss
    results[mode] = entry
  return results


def print_remat_sweep(results: dict[str, dict]) -> None:
  print('remat    temp GiB   peak estimate GiB   step sec   tokens/s   compile sec')
  for mode, r in results.items():
    gib = {k: v / 2**30 for k, v in r['memory'].items()}
    step = f'{r["step_sec_median"]:8.3f}' if 'step_sec_median' in r else '       -'
    tps = f'{r["tokens_per_sec"]:9.1f}' if 'tokens_per_sec' in r else '        -'
    print(
      f'{mode:7s} {gib["temp"]:9.3f} {gib["peak_estimate"]:19.3f}   {step}  {tps}'
      f'   {r["compile_sec"]:8.1f}'
    )


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.step == 'eval':
    result = run_eval(args)
    for key in ('step', 'device', 'params', 'tokens_per_sec', 'step_sec_median', 'compile_sec'):
      print(f'{key:18s} {result[key]}')
    if args.json:
      write_json(result, args.json)
    return 0
  if args.remat_sweep:
    cfg = config_from_args(args)
    result = {
      'device': jax.devices()[0].device_kind,
      'model': architectures.for_config(cfg).name,
      'config': vars(args),
      'model_config': dataclasses.asdict(cfg),
    }
    result['flops_by_term'] = analytic_flops(args, cfg)
    result['remat'] = remat_sweep(args)
    print_remat_sweep(result['remat'])
    if args.json:
      with open(args.json, 'w') as f:
        json.dump(result, f, indent=1)
    return 0
  result = run(args)
  for key in ('model', 'device', 'params', 'tokens_per_sec', 'step_sec_median', 'compile_sec'):
    print(f'{key:18s} {result[key]}')
  per_token = result['flops_per_token']
  print(f'{"flops_per_token":18s} {"n/a" if per_token is None else f"{per_token:.4g}"}')
  print(f'{"peak_bytes":18s} {result["peak_bytes"] / 2**20:.1f} MiB')
  print(f'{"mfu":18s} {result["mfu"]}')
  for w, sec in result['compile_sec_by_windows'].items():
    print(f'compile {w:>3s} windows  {sec:.2f} s')
  if args.json:
    write_json(result, args.json)
  return 0


if __name__ == '__main__':
  raise SystemExit(main())
