"""Validation of the launcher's JobSet manifests against `jobset_v1alpha2.json` (this folder).

The schema is written in this repository from the JobSet v0.10.1 API (the version `xpk cluster
create` installs) and the Kubernetes batch/v1 Job and core/v1 Pod fields the manifests use. Every
object has `additionalProperties: false`, so a misspelled key fails here, where the API server
would drop it silently (and a missing failure-policy rule `name`, which the JobSet webhook would
fill in, is an error).
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


def errors(manifest: Mapping[str, Any]) -> list[str]:
  """Every schema violation of a manifest, as 'path: message' lines (empty: valid)."""
  import jsonschema  # pylint: disable=g-import-not-at-top

  validator = jsonschema.Draft202012Validator(schema())
  out = []
  for error in sorted(validator.iter_errors(manifest), key=lambda e: list(e.absolute_path)):
    path = '.'.join(str(p) for p in error.absolute_path) or '<root>'
    out.append(f'{path}: {error.message}')
  return out


def validate(manifest: Mapping[str, Any]) -> None:
  """Raises ValueError listing the violations of an invalid manifest."""
  found = errors(manifest)
  if found:
    name = manifest.get('metadata', {}).get('name', '?')
    raise ValueError(f'JobSet {name} does not match {SCHEMA_PATH}:\n  ' + '\n  '.join(found))
