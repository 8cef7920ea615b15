r"""The pod preflight: run on the cluster, as the sweep's pods run, before a sweep is submitted.

  python -m xm_launch.preflight --marker=gs://B/melodi/preflight/<job>.json \
      --read=gs://B/melodi/prepared/pg19_t5/train/meta.json ...

With the pods' own identity (namespace, service account, node pool, image), it reads each
`--read` file; for a prepared split's `meta.json` also the first bytes of its `index.npy` and of
its first token shard. It then writes `--marker` (JSON: who wrote it, where, when, what was
read) and reads it back. Any failure exits 1 with the path, the error and the identity, so a 403
names the service account that needs access. Local paths are read with `open`, URLs with
`tf.io.gfile` (TensorFlow is in the job image).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
import urllib.request
from collections.abc import Sequence
from typing import Any

# GCE metadata server: the service account the pod's credentials belong to.
_METADATA_EMAIL = (
  'http://metadata.google.internal/computeMetadata/v1/instance/service-accounts/default/email'
)
# Bytes read from each data file (enough to prove access, cheap on any storage).
HEAD_BYTES = 4096


def _open(path: str, mode: str):
  if '://' not in path:
    return open(path, mode)
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  return tf.io.gfile.GFile(path, mode)


def read_head(path: str, size: int = HEAD_BYTES) -> bytes:
  with _open(path, 'rb') as f:
    return f.read(size)


def service_account(timeout_s: float = 2.0) -> str:
  """The email of the pod's Google service account ('' off GCE, e.g. in a test)."""
  request = urllib.request.Request(_METADATA_EMAIL, headers={'Metadata-Flavor': 'Google'})
  try:
    with urllib.request.urlopen(request, timeout=timeout_s) as response:  # noqa: S310
      return response.read().decode().strip()
  except OSError:
    return ''


def identity() -> dict[str, str]:
  """Who this pod is: pod name (its hostname), node, service account."""
  return {
    'pod': os.environ.get('HOSTNAME', socket.gethostname()),
    'node': os.environ.get('NODE_NAME', ''),
    # Only in a pod (the kubelet sets KUBERNETES_SERVICE_HOST): elsewhere there is no metadata
    # server to ask.
    'service_account': service_account() if os.environ.get('KUBERNETES_SERVICE_HOST') else '',
  }


def check_read(path: str) -> dict[str, Any]:
  """Reads `path` (and, for a prepared split's meta.json, its index and first shard)."""
  data = read_head(path, 1 << 20)
  read = {path: len(data)}
  if os.path.basename(path) == 'meta.json':
    meta = json.loads(data)
    folder = path[: -len('meta.json')]
    for name in ['index.npy', *meta.get('shards', [])[:1]]:
      read[folder + name] = len(read_head(folder + name))
  return read


def write_marker(marker: str, record: dict[str, Any]) -> None:
  """Writes the marker and reads it back."""
  folder = marker.rsplit('/', 1)[0]
  if '://' not in marker:
    os.makedirs(folder, exist_ok=True)
  text = json.dumps(record, indent=2, sort_keys=True)
  with _open(marker, 'w') as f:
    f.write(text)
  with _open(marker, 'r') as f:
    if f.read() != text:
      raise OSError(f'{marker} read back differs from what was written')


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog='python -m xm_launch.preflight', description=__doc__)
  parser.add_argument('--marker', required=True, help='file written under the model root')
  parser.add_argument('--read', action='append', default=[], help='a file the sweep reads')
  args = parser.parse_args(argv)
  who = identity()
  print(f'preflight as {json.dumps(who, sort_keys=True)}', flush=True)
  read: dict[str, int] = {}
  for path in args.read:
    try:
      read.update(check_read(path))
    except Exception as e:  # pylint: disable=broad-except
      print(f'cannot read {path} as {who}: {type(e).__name__}: {e}', file=sys.stderr, flush=True)
      return 1
  record = dict(who, time=time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()), read=read)
  try:
    write_marker(args.marker, record)
  except Exception as e:  # pylint: disable=broad-except
    print(f'cannot write {args.marker} as {who}: {type(e).__name__}: {e}', file=sys.stderr)
    return 1
  print(f'read {len(read)} files ({sum(read.values())} bytes), wrote {args.marker}', flush=True)
  return 0


if __name__ == '__main__':
  sys.exit(main())
