"""Fake `gcloud` and `kubectl` executables for the launcher's tests: a cluster in a JSON file.

`install(bin_dir, state_dir)` writes two executables that run `main('gcloud' | 'kubectl')` of this
module. Each call is recorded (argv, stdin) in `<state>/calls.jsonl`; the cluster (nodes, Kueue
queues and flavors, priority classes, JobSets, pods) is `<state>/cluster.json`, which the tests
edit; a bucket is the folder `$FAKE_GCS` (`gs://b/x` is `$FAKE_GCS/x`). A created batch/v1 Job
(the pod preflight) runs its container's command here, with the bucket's URLs mapped to the
folder. `FAKE_BROKEN` breaks one thing: 'crd', 'prepared'. Only what the launcher calls exists.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = 'gs://b/'
ACCELERATOR = 'cloud.google.com/gke-tpu-accelerator'
TOPOLOGY = 'cloud.google.com/gke-tpu-topology'
# Machine type prefix -> GKE's accelerator label (GKE's TPU docs).
_MACHINES = {
  'ct5lp-hightpu-': 'tpu-v5-lite-podslice',
  'ct6e-standard-': 'tpu-v6e-slice',
  'ct4p-hightpu-': 'tpu-v4-podslice',
  'ct5p-hightpu-': 'tpu-v5p-slice',
}


def xpk_cluster(slices: int = 1) -> dict:
  """What `xpk cluster create --tpu-type=v5litepod-32 --num-slices=N` makes (xpk 1.16.0)."""
  labels = {ACCELERATOR: 'tpu-v5-lite-podslice', TOPOLOGY: '4x8'}
  nodes = [
    {
      'metadata': {'name': f'gke-tpu-{s}-{i}', 'labels': dict(labels)},
      'status': {'allocatable': {'google.com/tpu': '4'}},
    }
    for s in range(slices)
    for i in range(8)
  ]
  flavor = f'{slices}xv5litepod-32'
  return {
    'nodes': nodes,
    'priorityclasses': ['very-low', 'low', 'medium', 'high', 'very-high'],
    'localqueues': {'multislice-queue': {'spec': {'clusterQueue': 'cluster-queue'}}},
    'clusterqueues': {
      'cluster-queue': {
        'metadata': {'name': 'cluster-queue'},
        'spec': {
          'resourceGroups': [
            {
              'coveredResources': ['google.com/tpu'],
              'flavors': [
                {'name': flavor, 'resources': [{'name': 'google.com/tpu', 'nominalQuota': 32}]}
              ],
            }
          ]
        },
      }
    },
    'resourceflavors': {flavor: {'metadata': {'name': flavor}, 'spec': {'nodeLabels': labels}}},
    'jobsets': {},
    'jobs': {},
    'pods': [],
    'logs': {},
  }


def install(bin_dir: str, state_dir: str) -> None:
  for tool in ('gcloud', 'kubectl'):
    path = os.path.join(bin_dir, tool)
    with open(path, 'w') as f:
      f.write(
        f'#!{sys.executable}\nimport sys\nsys.path.insert(0, {os.path.dirname(__file__)!r})\n'
        f'import fake_cloud\nsys.exit(fake_cloud.main({tool!r}))\n'
      )
    os.chmod(path, 0o755)
  with open(os.path.join(state_dir, 'cluster.json'), 'w') as f:
    json.dump(xpk_cluster(), f)


def _load(state: str) -> dict:
  with open(os.path.join(state, 'cluster.json')) as f:
    return json.load(f)


def _save(state: str, cluster: dict) -> None:
  with open(os.path.join(state, 'cluster.json'), 'w') as f:
    json.dump(cluster, f)


def _local(url: str) -> str:
  return os.path.join(os.environ['FAKE_GCS'], url[len(BUCKET) :])


def _selects(selector: str, labels: dict) -> bool:
  """A label selector 'k=v,k2=v2' or 'k in (a,b)'."""
  match = re.fullmatch(r'(\S+) in \((.*)\)', selector)
  if match:
    return labels.get(match.group(1)) in match.group(2).split(',')
  return all(labels.get(k) == v for k, v in (x.split('=', 1) for x in selector.split(',')))


def _option(argv: list[str], name: str) -> str:
  for i, a in enumerate(argv):
    if a == name:
      return argv[i + 1]
    if a.startswith(name + '='):
      return a.split('=', 1)[1]
  return ''


def _gcloud(argv: list[str], state: str, broken: str) -> int:
  if argv[:4] == ['artifacts', 'docker', 'images', 'describe']:
    return 0 if os.path.exists(os.path.join(state, 'image-built')) else 1
  if argv[:2] == ['builds', 'submit']:
    assert os.path.exists(os.path.join(argv[2], 'Dockerfile')), argv
    open(os.path.join(state, 'image-built'), 'w').close()
    return 0
  if argv[:2] == ['storage', 'ls']:
    if broken == 'prepared':
      sys.stderr.write('ERROR: One or more URLs matched no objects.\n')
      return 1
    found = [u for u in argv[2:] if os.path.exists(_local(u))]
    print('\n'.join(found))
    if len(found) < len(argv) - 2:
      sys.stderr.write('ERROR: (gcloud.storage.ls) One or more URLs matched no objects.\n')
      return 1
    return 0
  if argv[:3] == ['container', 'node-pools', 'create']:
    machine = _option(argv, '--machine-type')
    prefix, chips = re.fullmatch(r'(.*-)(\d+)t', machine).groups()
    lite = prefix in ('ct5lp-hightpu-', 'ct6e-standard-')
    single = {1: '1x1', 4: '2x2' if lite else '2x2x1', 8: '2x4'}[int(chips)]
    labels = {ACCELERATOR: _MACHINES[prefix], TOPOLOGY: _option(argv, '--tpu-topology') or single}
    cluster = _load(state)
    for i in range(int(_option(argv, '--num-nodes'))):
      cluster['nodes'].append(
        {
          'metadata': {'name': f'{argv[3]}-{i}', 'labels': labels},
          'status': {'allocatable': {'google.com/tpu': chips}},
        }
      )
    _save(state, cluster)
  return 0


def _get(argv: list[str], cluster: dict, broken: str) -> int:
  kind, name = argv[1], argv[2] if len(argv) > 2 and not argv[2].startswith('-') else ''
  selector = _option(argv, '-l')
  out = None
  if kind == 'crd':
    return 1 if broken == 'crd' else 0
  if kind == 'priorityclass':
    return 0 if name in cluster['priorityclasses'] else 1
  if kind in ('localqueue', 'clusterqueue', 'job'):
    table = cluster[
      {'localqueue': 'localqueues', 'clusterqueue': 'clusterqueues'}.get(kind, 'jobs')
    ]
    if name not in table:
      sys.stderr.write(f'Error from server (NotFound): {kind} "{name}" not found\n')
      return 1
    out = table[name]
  elif kind == 'resourceflavors':
    out = {'items': list(cluster['resourceflavors'].values())}
  elif kind == 'nodes':
    out = {'items': [n for n in cluster['nodes'] if _selects(selector, n['metadata']['labels'])]}
  elif kind == 'jobsets':
    items = [
      {
        'metadata': {'name': n, 'labels': js['manifest']['metadata']['labels']},
        'status': js['status'],
      }
      for n, js in sorted(cluster['jobsets'].items())
    ]
    out = {'items': [i for i in items if _selects(selector, i['metadata']['labels'])]}
  elif kind == 'pods':
    out = {'items': [p for p in cluster['pods'] if _selects(selector, p['metadata']['labels'])]}
  print(json.dumps(out))
  return 0


def _run_job(manifest: dict) -> tuple[int, str]:
  """Runs a batch/v1 Job's container command here, the bucket mapped to $FAKE_GCS."""
  [container] = manifest['spec']['template']['spec']['containers']
  bucket = os.environ['FAKE_GCS'].rstrip('/') + '/'
  argv = [a.replace(BUCKET, bucket) for a in container['command']]
  argv[0] = sys.executable if argv[0] == 'python' else argv[0]
  env = dict(os.environ, PYTHONPATH=REPO, HOSTNAME=manifest['metadata']['name'] + '-x7k2q')
  env.update({e['name']: e.get('value', 'gke-node-0') for e in container.get('env', [])})
  proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  return proc.returncode, proc.stdout + proc.stderr


def _kubectl(argv: list[str], stdin: str, state: str, broken: str) -> int:
  cluster = _load(state)
  verb = argv[0]
  if verb == 'get':
    return _get(argv, cluster, broken)
  if verb == 'create':
    manifest = json.loads(stdin)
    name = manifest['metadata']['name']
    if manifest['kind'] == 'Job':
      rc, log = _run_job(manifest)
      cluster['jobs'][name] = {'status': {'succeeded': 1} if rc == 0 else {'failed': 1}}
      cluster['logs'][f'job/{name}'] = log
    elif name in cluster['jobsets']:
      sys.stderr.write(
        f'Error from server (AlreadyExists): jobsets.jobset.x-k8s.io "{name}" already exists\n'
      )
      return 1
    else:
      cluster['jobsets'][name] = {'manifest': manifest, 'status': {'restarts': 0}}
    _save(state, cluster)
    print(f'{manifest["kind"].lower()}/{name} created')
    return 0
  if verb == 'delete':
    cluster['jobsets'].pop(argv[2])
    cluster['pods'] = [
      p
      for p in cluster['pods']
      if p['metadata']['labels'].get('jobset.sigs.k8s.io/jobset-name') != argv[2]
    ]
    _save(state, cluster)
    return 0
  if verb == 'logs':
    lines = cluster['logs'].get(argv[1], '').splitlines()
    tail = int(_option(argv, '--tail') or len(lines))
    print('\n'.join(lines[-tail:]))
    return 0
  if verb == 'apply':
    flavor = json.loads(stdin)
    cluster['resourceflavors'][flavor['metadata']['name']] = flavor
    _save(state, cluster)
    return 0
  if verb == 'patch':
    target = cluster['clusterqueues'][argv[2]]
    for op in json.loads(_option(argv, '-p')):
      *parents, last = op['path'].strip('/').split('/')
      node = target
      for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
      assert op['op'] == 'add' and last == '-', op
      node.append(op['value'])
    _save(state, cluster)
    return 0
  return 0


def main(tool: str) -> int:
  state = os.environ['FAKE_CLOUD']
  argv = sys.argv[1:]
  stdin = '' if sys.stdin is None or sys.stdin.isatty() else sys.stdin.read()
  with open(os.path.join(state, 'calls.jsonl'), 'a') as f:
    f.write(json.dumps({'tool': tool, 'argv': argv, 'stdin': stdin}) + '\n')
  broken = os.environ.get('FAKE_BROKEN', '')
  if tool == 'gcloud':
    return _gcloud(argv, state, broken)
  return _kubectl(argv, stdin, state, broken)
