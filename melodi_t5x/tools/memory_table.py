r"""Prints the paper's memory table, what our modules allocate, and parameter counts.

Usage:
  python -m melodi_t5x.tools.memory_table [--batch-size 1] [--dtype bfloat16] [--json OUT]

For each of the paper's six models at the paper size (d=1024, windows of 512, T5 vocabulary):

* the carried memory per sequence in the paper's convention (short-term memory = tokens x d per
  layer; long-term, cached and external memories = keys + values), component by component, the
  exact float count, the value as the paper prints it (each component rounded to one decimal in
  millions, then added) and the paper's value;
* the bytes the carried-state variables of our decoder allocate for `--batch-size` rows with
  compute dtype `--dtype` (measured with `jax.eval_shape` of the decoder's init: nothing is
  allocated), next to the bytes the component formulas predict;
* the parameter count of the decoder (tied embedding included).
"""

from __future__ import annotations

import argparse
import dataclasses
import json

from melodi_t5x import memory_accounting as acc


def rows(batch_size: int = 1, dtype: str = 'float32') -> list[dict]:
  """One dict per paper model: components, exact floats, printed value, bytes, parameters."""
  out = []
  for model in acc.PAPER_MODELS:
    cfg = model.config(dtype=dtype)
    variables = acc.abstract_variables(cfg, batch_size)
    allocated = acc.allocated_memory(cfg, batch_size, variables=variables)
    out.append(
      {
        'model': model.name,
        'components': [dataclasses.asdict(c) for c in acc.memory_components(cfg)],
        'paper_floats': acc.paper_floats(cfg),
        'printed_millions': acc.paper_millions(cfg),
        'paper_millions': model.paper_millions,
        'allocated_bytes': allocated['bytes'],
        'allocated_elements': {k: v for k, v in allocated.items() if k != 'bytes'},
        'formula_bytes': acc.stored_bytes(cfg, batch_size),
        'params': acc.parameter_count(cfg, variables),
      }
    )
  return out


def _millions(x: int) -> str:
  return f'{x / 1e6:.2f}M'


def format_table(table: list[dict], batch_size: int, dtype: str) -> str:
  lines = [
    'Carried memory per sequence, paper convention (floats; d = 1024): short-term memory = tokens x'
    ' d per layer, long-term / cached / external memories = keys + values (2d per token).',
    '',
    f'{"model":24s} {"exact floats":>13s} {"exact":>8s} {"printed":>8s} {"paper":>6s}  '
    'how the printed value is made (each component rounded to 0.1M, then added)',
  ]
  for r in table:
    parts = [c for c in r['components'] if c['paper_floats']]
    how = ' + '.join(f'{c["formula"]} = {_millions(c["paper_floats"])}' for c in parts)
    rounded = ' + '.join(f'{acc._round_half_up(c["paper_floats"] / 1e6):.1f}' for c in parts)
    ok = 'ok' if abs(r['printed_millions'] - r['paper_millions']) < 1e-9 else 'DIFFERS'
    lines.append(
      f'{r["model"]:24s} {r["paper_floats"]:13,d} {r["paper_floats"] / 1e6:8.2f} '
      f'{r["printed_millions"]:8.1f} {r["paper_millions"]:6.1f}  {ok}: {how}'
      + (f' -> {rounded}' if len(parts) > 1 else '')
    )
  lines += [
    '',
    f'Carried-state variables our decoders allocate (jax.eval_shape of init; batch {batch_size}, '
    f'compute dtype {dtype}; memory is stored in float32):',
    '',
    f'{"model":24s} {"allocated":>14s} {"MiB":>9s} {"formula":>14s}  elements by dtype; notes',
  ]
  for r in table:
    notes = '; '.join(
      f'{c["name"]}: {c["note"]}' for c in r['components'] if c['note'] and c['paper_floats']
    )
    elements = ', '.join(f'{k} {v:,d}' for k, v in sorted(r['allocated_elements'].items()))
    lines.append(
      f'{r["model"]:24s} {r["allocated_bytes"]:14,d} {r["allocated_bytes"] / 2**20:9.1f} '
      f'{r["formula_bytes"]:14,d}  {elements}' + (f'; {notes}' if notes else '')
    )
  lines += ['', f'{"model":24s} {"parameters":>14s}  (tied embedding 32128 x 1024 included)']
  for r in table:
    lines.append(f'{r["model"]:24s} {r["params"]:14,d}  {r["params"] / 1e6:.1f}M')
  return '\n'.join(lines)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--batch-size', type=int, default=1, help='rows of carried state')
  parser.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
  parser.add_argument('--json', help='also write the table to this JSON file')
  args = parser.parse_args(argv)
  table = rows(args.batch_size, args.dtype)
  print(format_table(table, args.batch_size, args.dtype))
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(table, f, indent=1)
  bad = [r['model'] for r in table if abs(r['printed_millions'] - r['paper_millions']) > 1e-9]
  mismatched = [r['model'] for r in table if r['allocated_bytes'] != r['formula_bytes']]
  if bad or mismatched:
    print(f'MISMATCH: paper value {bad}, allocation vs formula {mismatched}')
    return 1
  return 0


if __name__ == '__main__':
  raise SystemExit(main())
