"""A job's row (memory plan, fit, step-time estimate), the printed table and the docs table.

`job_row` gives the JSON row of one job from its target and compile result; `format_rows` the
table the check prints; `cost_table` the cost table of docs/experiments.md from the JSON of one or
more checks (`--table`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from melodi_t5x import experiments
from melodi_t5x.tools import flops as flops_lib
from melodi_t5x.tools.tpu_compile import targets

# A job fits if its per-chip plan is at most this fraction of the chip's HBM (room for the
# runtime, fragmentation and XLA's own buffers).
FIT_FRACTION = 0.9
# Model FLOPs utilisation assumed for the time estimate.
DEFAULT_UTILISATION = 0.4
GIB = 2**30


def estimate(
  target: targets.Target, utilisation: float, traced: float | None = None
) -> dict[str, Any]:
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


def job_row(
  job, target: targets.Target | None, result: dict | None, error: str | None, **extra
) -> dict:
  """The JSON row of one job."""
  kind = targets.job_kind(job)
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
