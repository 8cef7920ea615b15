"""Validation of the launcher's JobSet manifests against `jobset_v1alpha2.json` (this folder).

The schema is written in this repository from the JobSet v0.10.1 API (the version `xpk cluster
create` installs) and the Kubernetes batch/v1 Job and core/v1 Pod fields the manifests use. Every
object has `additionalProperties: false`, so a misspelled key fails here, where the API server
would drop it silently (and a missing failure-policy rule `name`, which the JobSet webhook would
fill in, is an error). Two rules of batch/v1 validation that JSON Schema cannot state are checked
here too: `onExitCodes.values` in ascending order, and no 0 with the operator `In`.
`validate_job` checks the pod preflight's batch/v1 Job against the same Job and Pod definitions.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Mapping
from typing import Any

SCHEMA_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'jobset_v1alpha2.json')


@functools.cache
def schema() -> dict[str, Any]:
  with open(SCHEMA_PATH) as f:
    return json.load(f)


def _job_schema() -> dict[str, Any]:
  """The batch/v1 Job definition of the schema, as a schema of its own."""
  return {**schema()['$defs']['job'], '$defs': schema()['$defs']}


def _exit_code_errors(node: Any, path: str = '') -> list[str]:
  """batch/v1: onExitCodes values ascending, and 0 not allowed with the operator In."""
  out = []
  if isinstance(node, dict):
    codes = node.get('onExitCodes')
    if isinstance(codes, dict) and isinstance(codes.get('values'), list):
      values = codes['values']
      if any(a >= b for a, b in zip(values, values[1:])):
        out.append(f'{path}.onExitCodes.values: must be in ascending order (batch/v1)')
      if codes.get('operator') == 'In' and 0 in values:
        out.append(f'{path}.onExitCodes.values: 0 is not allowed with In (batch/v1)')
    for k, v in node.items():
      out += _exit_code_errors(v, f'{path}.{k}' if path else k)
  elif isinstance(node, list):
    for i, v in enumerate(node):
      out += _exit_code_errors(v, f'{path}.{i}')
  return out


def errors(manifest: Mapping[str, Any], *, job: bool = False) -> list[str]:
  """Every schema violation of a JobSet (or, `job`, a batch/v1 Job), as 'path: message' lines."""
  import jsonschema  # pylint: disable=g-import-not-at-top

  validator = jsonschema.Draft202012Validator(_job_schema() if job else schema())
  out = []
  for error in sorted(validator.iter_errors(manifest), key=lambda e: list(e.absolute_path)):
    path = '.'.join(str(p) for p in error.absolute_path) or '<root>'
    out.append(f'{path}: {error.message}')
  return out + _exit_code_errors(manifest)


def validate(manifest: Mapping[str, Any], *, job: bool = False) -> None:
  """Raises ValueError listing the violations of an invalid manifest."""
  found = errors(manifest, job=job)
  if found:
    kind = 'Job' if job else 'JobSet'
    name = manifest.get('metadata', {}).get('name', '?')
    raise ValueError(f'{kind} {name} does not match {SCHEMA_PATH}:\n  ' + '\n  '.join(found))


def validate_job(manifest: Mapping[str, Any]) -> None:
  """Raises ValueError listing the violations of an invalid batch/v1 Job."""
  validate(manifest, job=True)
