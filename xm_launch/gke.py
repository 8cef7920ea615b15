"""GKE backend: one JobSet per experiment on a Cloud TPU slice, and the commands that launch them.

A slice is one Kubernetes Job (Indexed, one pod per TPU VM) inside a JobSet; every pod runs the
same command, the step runner (`python -m xm_launch.steps --distributed --plan=...`), which runs
the experiment's steps in order and skips those whose output exists. GKE injects
`TPU_WORKER_ID` / `TPU_WORKER_HOSTNAMES` into Indexed Jobs that request `google.com/tpu`, so
`jax.distributed.initialize()` with no arguments finds the other hosts.

Slice facts (xpk 1.16.0 `core/system_characteristics.py`, GKE's TPU docs): node label
`cloud.google.com/gke-tpu-accelerator`, `cloud.google.com/gke-tpu-topology`, machine type, one pod
per host with the host's chips as its `google.com/tpu` limit.

Nothing here contacts a cloud: `launch_commands` lists what a launch runs, `Launcher` runs them
through `subprocess` (`gcloud`, `kubectl`, `git` from PATH; the tests put fakes first).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from xm_launch import jobs as jobs_lib
from xm_launch import steps as steps_lib

API_VERSION = 'jobset.x-k8s.io/v1alpha2'
JOBSET_CRD = 'jobsets.jobset.x-k8s.io'
# The LocalQueue of a cluster made by `xpk cluster create` (Kueue).
DEFAULT_QUEUE = 'multislice-queue'
QUEUE_LABEL = 'kueue.x-k8s.io/queue-name'
EXCLUSIVE_ANNOTATION = 'alpha.jobset.sigs.k8s.io/exclusive-topology'
ACCELERATOR_LABEL = 'cloud.google.com/gke-tpu-accelerator'
TOPOLOGY_LABEL = 'cloud.google.com/gke-tpu-topology'
NODEPOOL_LABEL = 'cloud.google.com/gke-nodepool'
TPU_RESOURCE = 'google.com/tpu'
# Labels and annotations of this launcher's objects.
SWEEP_LABEL = 'melodi-t5x/sweep'
EXPERIMENT_LABEL = 'melodi-t5x/experiment'
SEED_LABEL = 'melodi-t5x/seed'
GROUP_ANNOTATION = 'melodi-t5x/group'
MODEL_DIR_ANNOTATION = 'melodi-t5x/model-dir'
# The one replicated Job of a JobSet, and its container.
REPLICATED_JOB = 'slice'
CONTAINER = 'melodi'
# The TPU runtime's port between hosts.
TPU_PORT = 8471
# A JobSet name stays this short so that pod names `<jobset>-slice-<j>-<i>-<5 chars>` fit 63.
MAX_JOBSET_NAME = 40
MAX_POD_NAME = 63
DNS_1035 = re.compile(r'[a-z]([-a-z0-9]*[a-z0-9])?')
# Job failure reason of a pod failure policy rule (batch/v1): a configuration error.
POD_FAILURE_POLICY_REASON = 'PodFailurePolicy'


@dataclasses.dataclass(frozen=True)
class TpuSlice:
  """One Cloud TPU slice on GKE: node labels, machine type, pods and chips per pod."""

  # Launcher flag: 'v4', 'v5e', 'v5p' or 'v6e'.
  accelerator: str
  # Topology, e.g. '4x8' (the node label value).
  topology: str
  # Value of the node label cloud.google.com/gke-tpu-accelerator.
  gke_accelerator: str
  # Machine type of the slice's node pool.
  machine_type: str
  # TPU VMs (= pods) of the slice.
  hosts: int
  # Chips per TPU VM (= the google.com/tpu limit of each pod).
  chips_per_host: int

  @property
  def chips(self) -> int:
    return self.hosts * self.chips_per_host

  @property
  def node_selector(self) -> dict[str, str]:
    return {ACCELERATOR_LABEL: self.gke_accelerator, TOPOLOGY_LABEL: self.topology}

  def summary(self) -> str:
    return (
      f'{self.accelerator} {self.topology}: {self.hosts} pods x {TPU_RESOURCE} '
      f'{self.chips_per_host}'
    )


# accelerator -> (gke accelerator label, machine type prefix, topology rank).
_FAMILIES = {
  'v4': ('tpu-v4-podslice', 'ct4p-hightpu-', 3),
  'v5p': ('tpu-v5p-slice', 'ct5p-hightpu-', 3),
  'v5e': ('tpu-v5-lite-podslice', 'ct5lp-hightpu-', 2),
  'v6e': ('tpu-v6e-slice', 'ct6e-standard-', 2),
}
# v5e / v6e topologies offered on GKE; single-host ones have 1, 4 or 8 chips.
_LITE_TOPOLOGIES = ('1x1', '2x2', '2x4', '4x4', '4x8', '8x8', '8x16', '16x16')


def tpu_slice(accelerator: str, topology: str) -> TpuSlice:
  """The GKE facts of a slice; raises on an accelerator or topology GKE does not offer."""
  if accelerator not in _FAMILIES:
    raise ValueError(f'--accelerator={accelerator!r}: must be one of {sorted(_FAMILIES)}.')
  label, machine, rank = _FAMILIES[accelerator]
  if not re.fullmatch(r'\d+(x\d+)*', topology or '') or len(topology.split('x')) != rank:
    example = '2x2x4' if rank == 3 else '4x8'
    raise ValueError(
      f'--topology={topology!r}: {accelerator} topologies have {rank} dimensions, e.g. {example}.'
    )
  chips = 1
  for d in topology.split('x'):
    chips *= int(d)
  if rank == 3:
    if chips % 4:
      raise ValueError(f'--topology={topology}: {accelerator} slices have a multiple of 4 chips.')
    return TpuSlice(accelerator, topology, label, f'{machine}4t', chips // 4, 4)
  if topology not in _LITE_TOPOLOGIES:
    raise ValueError(f'--topology={topology}: {accelerator} topologies are {_LITE_TOPOLOGIES}.')
  per_host = chips if chips <= 8 else 4
  return TpuSlice(
    accelerator, topology, label, f'{machine}{per_host}t', chips // per_host, per_host
  )


def dns_label(text: str, max_len: int = 63) -> str:
  """`text` as a DNS-1035 label (lowercase, a letter first, '-' for others), hashed when long."""
  name = re.sub(r'[^a-z0-9-]+', '-', text.lower()).strip('-')
  name = re.sub(r'-+', '-', name)
  if not name or not name[0].isalpha():
    name = f'x-{name}'.rstrip('-')
  if len(name) > max_len:
    digest = hashlib.sha1(text.encode()).hexdigest()[:5]
    name = f'{name[: max_len - 6].rstrip("-")}-{digest}'
  return name


def jobset_name(group: str, prefix: str = 'melodi') -> str:
  """The JobSet of a group ('main/pg19_t5_xl/seed1' -> 'melodi-main-pg19-t5-xl-seed1')."""
  return dns_label(f'{prefix}-{group.replace("/", "-")}', MAX_JOBSET_NAME)


def pod_names(manifest: Mapping[str, Any]) -> list[str]:
  """The pod names of a JobSet without their 5-character random suffix (hostnames)."""
  name = manifest['metadata']['name']
  out = []
  for rjob in manifest['spec']['replicatedJobs']:
    for j in range(rjob.get('replicas', 1)):
      for i in range(rjob['template']['spec']['parallelism']):
        out.append(f'{name}-{rjob["name"]}-{j}-{i}')
  return out


def _label_value(text: str) -> str:
  """A Kubernetes label value (<= 63 characters of [A-Za-z0-9_.-], alphanumeric at both ends)."""
  value = re.sub(r'[^A-Za-z0-9_.-]+', '-', text)[:63].strip('-_.')
  return value


def group_labels(group: str) -> dict[str, str]:
  """Sweep / experiment / seed labels of a group."""
  parts = group.split('/')
  labels = {SWEEP_LABEL: _label_value(parts[0])}
  if len(parts) > 1:
    labels[EXPERIMENT_LABEL] = _label_value(parts[1])
  seed = parts[2][len('seed') :] if len(parts) > 2 and parts[2].startswith('seed') else '0'
  labels[SEED_LABEL] = seed
  return labels


def step_runner_command(plan: steps_lib.Plan, distributed: bool) -> list[str]:
  """The command of every pod: the step runner with the JobSet's plan."""
  cmd = ['python', '-m', 'xm_launch.steps']
  if distributed:
    cmd.append('--distributed')
  return cmd + [f'--plan={plan.to_json()}']


def jobset_manifest(
  group: str,
  plan: steps_lib.Plan,
  tpu: TpuSlice,
  *,
  image: str,
  queue: str = DEFAULT_QUEUE,
  max_restarts: int = 10,
  model_dir: str = '',
  prefix: str = 'melodi',
) -> dict[str, Any]:
  """The JobSet of one group: one slice, `tpu.hosts` pods running the same step-runner command.

  Configuration errors (exit status `steps.CONFIG_ERROR`) fail the Job through its pod failure
  policy and the JobSet through its failure policy rule; any other failure (preemption, a crash)
  restarts the whole JobSet up to `max_restarts` times, and the step runner resumes.
  """
  name = jobset_name(group, prefix)
  labels = group_labels(group)
  meta_labels = dict(labels)
  if queue:
    meta_labels[QUEUE_LABEL] = queue
  annotations = {EXCLUSIVE_ANNOTATION: NODEPOOL_LABEL, GROUP_ANNOTATION: group}
  if model_dir:
    annotations[MODEL_DIR_ANNOTATION] = model_dir
  container = {
    'name': CONTAINER,
    'image': image,
    'command': step_runner_command(plan, distributed=tpu.hosts > 1),
    'env': [{'name': 'PYTHONUNBUFFERED', 'value': '1'}],
    'ports': [{'containerPort': TPU_PORT}],
    'securityContext': {'privileged': True},
    'resources': {'limits': {TPU_RESOURCE: tpu.chips_per_host}},
  }
  pod_spec = {
    'restartPolicy': 'Never',
    'hostNetwork': True,
    'dnsPolicy': 'ClusterFirstWithHostNet',
    'nodeSelector': tpu.node_selector,
    'terminationGracePeriodSeconds': 30,
    'containers': [container],
  }
  job_spec = {
    'parallelism': tpu.hosts,
    'completions': tpu.hosts,
    'completionMode': 'Indexed',
    'backoffLimit': 0,
    'podFailurePolicy': {
      'rules': [
        {
          'action': 'FailJob',
          'onExitCodes': {
            'containerName': CONTAINER,
            'operator': 'In',
            'values': [steps_lib.CONFIG_ERROR],
          },
        }
      ]
    },
    'template': {'metadata': {'labels': labels}, 'spec': pod_spec},
  }
  return {
    'apiVersion': API_VERSION,
    'kind': 'JobSet',
    'metadata': {'name': name, 'labels': meta_labels, 'annotations': annotations},
    'spec': {
      'failurePolicy': {
        'maxRestarts': max_restarts,
        'rules': [
          {
            'name': 'ConfigurationError',
            'action': 'FailJobSet',
            'onJobFailureReasons': [POD_FAILURE_POLICY_REASON],
          }
        ],
      },
      'successPolicy': {'operator': 'All'},
      'network': {'enableDNSHostnames': True},
      'replicatedJobs': [{'name': REPLICATED_JOB, 'replicas': 1, 'template': {'spec': job_spec}}],
    },
  }


@dataclasses.dataclass(frozen=True)
class JobSetPlan:
  """One JobSet of a launch: its group, steps, manifest."""

  # '<sweep>/<experiment>[/seed<N>]', 'prepare/<task>' or 'timing'.
  group: str
  # The steps (jobs_lib.JobSpec) in order.
  jobs: tuple[jobs_lib.JobSpec, ...]
  # The JobSet as a dict (JSON).
  manifest: dict[str, Any]

  @property
  def name(self) -> str:
    return self.manifest['metadata']['name']


def build_jobsets(
  jobs: Sequence[jobs_lib.JobSpec],
  *,
  train_slice: TpuSlice,
  timing_slice: TpuSlice | None = None,
  image: str,
  queue: str = DEFAULT_QUEUE,
  max_restarts: int = 10,
  prefix: str = 'melodi',
) -> list[JobSetPlan]:
  """One JobSet per group of steps; timing steps on `timing_slice`, the others on `train_slice`."""
  out = []
  names: dict[str, str] = {}
  for group, members in jobs_lib.groups(jobs).items():
    tpu = timing_slice if group == 'timing' and timing_slice else train_slice
    plan = jobs_lib.plan(group, members)
    model_dirs = {j.model_dir for j in members}
    manifest = jobset_manifest(
      group,
      plan,
      tpu,
      image=image,
      queue=queue,
      max_restarts=max_restarts,
      model_dir=model_dirs.pop() if len(model_dirs) == 1 else '',
      prefix=prefix,
    )
    name = manifest['metadata']['name']
    if name in names:
      raise ValueError(f'groups {names[name]!r} and {group!r} both map to JobSet name {name!r}.')
    names[name] = group
    out.append(JobSetPlan(group, tuple(members), manifest))
  return out


def write_manifests(plans: Sequence[JobSetPlan], manifest_dir: str) -> list[str]:
  """Writes `<dir>/<jobset>.json` per JobSet; returns the paths."""
  os.makedirs(manifest_dir, exist_ok=True)
  paths = []
  for p in plans:
    path = os.path.join(manifest_dir, f'{p.name}.json')
    with open(path, 'w') as f:
      json.dump(p.manifest, f, indent=2, sort_keys=True)
      f.write('\n')
    paths.append(path)
  return paths


# -- the commands of a launch -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CloudConfig:
  """Where a launch goes."""

  # Google Cloud project.
  project: str
  # Zone of the TPU node pools (e.g. us-east5-b).
  zone: str
  # GKE cluster name.
  cluster: str
  # Location of the cluster for get-credentials ('' : the zone's region, as xpk creates it).
  cluster_location: str = ''
  # Kubernetes namespace of the JobSets (and of the Kueue LocalQueue).
  namespace: str = 'default'
  # Kueue LocalQueue ('' : no queue label, no queue check).
  queue: str = DEFAULT_QUEUE
  # Artifact Registry repository of the job image ('' : <region>-docker.pkg.dev/<project>/melodi).
  registry: str = ''
  # Check that nodes with the slice's labels exist (off for node pools autoscaled from zero).
  check_nodes: bool = True

  @property
  def region(self) -> str:
    return self.zone.rsplit('-', 1)[0] if self.zone.count('-') >= 2 else self.zone

  @property
  def location(self) -> str:
    return self.cluster_location or self.region

  def image_repository(self) -> str:
    return self.registry.rstrip('/') or f'{self.region}-docker.pkg.dev/{self.project}/melodi'


def check_cloud_config(cloud: CloudConfig) -> None:
  missing = [f'--{k}' for k in ('project', 'zone', 'cluster') if not getattr(cloud, k)]
  if missing:
    raise ValueError(
      f'a GKE launch needs {", ".join(missing)} (the project, the TPU zone and the cluster; '
      'docs/experiments.md: "Cloud TPU on GKE").'
    )


def git_commit(repo: str = jobs_lib.REPO_ROOT) -> str:
  """The commit the image is built from (HEAD of the repository)."""
  out = subprocess.run(
    ['git', '-C', repo, 'rev-parse', 'HEAD'], capture_output=True, text=True, check=False
  )
  if out.returncode:
    raise RuntimeError(f'git rev-parse HEAD failed in {repo}: {out.stderr.strip()}')
  return out.stdout.strip()


def uncommitted_changes(repo: str = jobs_lib.REPO_ROOT) -> list[str]:
  out = subprocess.run(
    ['git', '-C', repo, 'status', '--porcelain', '--untracked-files=no'],
    capture_output=True,
    text=True,
    check=False,
  )
  return out.stdout.splitlines()


@dataclasses.dataclass(frozen=True)
class Command:
  """One command of a launch."""

  # argv.
  argv: tuple[str, ...]
  # What it is for (printed).
  purpose: str
  # File piped to stdin ('' : none).
  stdin_file: str = ''
  # What a preflight command checks: 'crd', 'queue', 'nodes', 'prepared' ('' : not a check).
  check: str = ''
  # The slice whose nodes a 'nodes' check counts.
  tpu: TpuSlice | None = None

  def shell(self) -> str:
    text = shlex.join(self.argv)
    return f'{text} < {self.stdin_file}' if self.stdin_file else text


def image_commands(cloud: CloudConfig, image: str, context: str) -> list[Command]:
  """Is the image there (describe), else build it from the committed tree."""
  return [
    Command(
      ('gcloud', 'artifacts', 'docker', 'images', 'describe', image, f'--project={cloud.project}'),
      'is the job image of this commit already built? (then no build)',
    ),
    Command(
      (
        'gcloud',
        'builds',
        'submit',
        context,
        f'--tag={image}',
        f'--project={cloud.project}',
        '--timeout=2h',
      ),
      'build the job image from the committed tree (git archive HEAD + Dockerfile)',
    ),
  ]


def credential_command(cloud: CloudConfig) -> Command:
  return Command(
    (
      'gcloud',
      'container',
      'clusters',
      'get-credentials',
      cloud.cluster,
      f'--location={cloud.location}',
      f'--project={cloud.project}',
    ),
    'kubectl credentials of the cluster',
  )


def preflight_commands(
  cloud: CloudConfig, tpus: Sequence[TpuSlice], prepared: Sequence[str] = ()
) -> list[Command]:
  """JobSet CRD, the Kueue queue, nodes of each slice, the prepared splits the sweep reads."""
  out = [
    Command(('kubectl', 'get', 'crd', JOBSET_CRD, '-o', 'name'), 'JobSet is installed', check='crd')
  ]
  if cloud.queue:
    out.append(
      Command(
        ('kubectl', 'get', 'localqueue', cloud.queue, '-n', cloud.namespace, '-o', 'name'),
        f'the Kueue LocalQueue {cloud.queue} exists',
        check='queue',
      )
    )
  if cloud.check_nodes:
    for tpu in tpus:
      selector = ','.join(f'{k}={v}' for k, v in tpu.node_selector.items())
      out.append(
        Command(
          ('kubectl', 'get', 'nodes', '-l', selector, '-o', 'name'),
          f'at least {tpu.hosts} nodes of a {tpu.accelerator} {tpu.topology} slice',
          check='nodes',
          tpu=tpu,
        )
      )
  remote = [p for p in prepared if '://' in p]
  if remote:
    out.append(
      Command(
        ('gcloud', 'storage', 'ls', *remote),
        'the prepared splits the sweep reads exist',
        check='prepared',
      )
    )
  return out


def create_command(cloud: CloudConfig, manifest_path: str) -> Command:
  return Command(
    ('kubectl', 'create', '-n', cloud.namespace, '-f', '-'),
    'submit the JobSet (AlreadyExists: skipped)',
    stdin_file=manifest_path,
  )


def prepared_markers(prepared_root: str | None, tasks: Sequence[str]) -> list[str]:
  """`meta.json` of every split a sweep reads (train, validation, test of each task)."""
  if not prepared_root:
    return []
  root = prepared_root.rstrip('/')
  return [f'{root}/{t}/{s}/meta.json' for t in tasks for s in jobs_lib.SPLITS]


# -- running them -------------------------------------------------------------------------------


class LaunchError(RuntimeError):
  """A launch stopped before submitting (preflight) or a submission failed."""


Runner = Callable[[Sequence[str], str | None], subprocess.CompletedProcess]


def run_command(argv: Sequence[str], stdin: str | None = None) -> subprocess.CompletedProcess:
  """Runs one command (gcloud, kubectl from PATH), capturing its output."""
  return subprocess.run(list(argv), input=stdin, capture_output=True, text=True, check=False)


def build_context(image_dockerfile: str, repo: str = jobs_lib.REPO_ROOT) -> str:
  """A temporary folder with the committed tree (`git archive HEAD`) and the Dockerfile."""
  folder = tempfile.mkdtemp(prefix='melodi-image-')
  archive = subprocess.run(
    ['git', '-C', repo, 'archive', '--format=tar', 'HEAD'], capture_output=True, check=False
  )
  if archive.returncode:
    raise LaunchError(f'git archive HEAD failed: {archive.stderr.decode()[-500:]}')
  subprocess.run(['tar', '-x', '-C', folder], input=archive.stdout, check=True)
  with open(os.path.join(folder, 'Dockerfile'), 'w') as f:
    f.write(image_dockerfile)
  return folder


def launch(
  plans: Sequence[JobSetPlan],
  manifest_paths: Sequence[str],
  cloud: CloudConfig,
  *,
  tpus: Sequence[TpuSlice],
  image: str,
  build: bool,
  prepared: Sequence[str] = (),
  run: Runner = run_command,
  make_context: Callable[[], str] | None = None,
  log: Callable[[str], None] = print,
) -> dict[str, str]:
  """The real launch: image, credentials, preflight, then `kubectl create` of every manifest.

  Returns {JobSet name: 'created' | 'exists'}. Raises `LaunchError` (nothing submitted) when a
  preflight check fails, naming what is missing.
  """

  def call(cmd: Command, stdin: str | None = None) -> subprocess.CompletedProcess:
    log(f'$ {cmd.shell()}')
    return run(list(cmd.argv), stdin)

  if build:
    describe, submit = image_commands(cloud, image, '<context>')
    if call(describe).returncode == 0:
      log(f'  image {image} exists: not rebuilt')
    else:
      context = (make_context or (lambda: build_context(jobs_lib.dockerfile())))()
      submit = dataclasses.replace(
        submit, argv=tuple(context if a == '<context>' else a for a in submit.argv)
      )
      try:
        done = call(submit)
      finally:
        shutil.rmtree(context, ignore_errors=True)
      if done.returncode:
        raise LaunchError(f'the image build failed:\n{done.stderr[-2000:]}')
  creds = call(credential_command(cloud))
  if creds.returncode:
    raise LaunchError(
      f'gcloud container clusters get-credentials {cloud.cluster} failed (project '
      f'{cloud.project}, location {cloud.location}; an xpk cluster is regional, a zonal one '
      f'needs --cluster_location=ZONE):\n{creds.stderr[-2000:]}'
    )
  problems = []
  for cmd in preflight_commands(cloud, tpus, prepared):
    result = call(cmd)
    kind = cmd.check
    if kind == 'crd' and result.returncode:
      problems.append(
        f'the JobSet CRD ({JOBSET_CRD}) is not installed: `xpk cluster create` installs it, or '
        'kubectl apply --server-side -f https://github.com/kubernetes-sigs/jobset/releases/'
        'download/v0.10.1/manifests.yaml'
      )
    elif kind == 'queue' and result.returncode:
      problems.append(
        f'the Kueue LocalQueue {cloud.queue!r} is not in namespace {cloud.namespace!r}: create '
        'the cluster with xpk (it makes multislice-queue), or pass --queue= (no Kueue) or the '
        'name of yours'
      )
    elif kind == 'nodes':
      found = len([x for x in result.stdout.splitlines() if x.strip()])
      tpu = cmd.tpu
      if result.returncode or found < tpu.hosts:
        problems.append(
          f'{found} nodes carry {cmd.argv[4]}; a {tpu.accelerator} {tpu.topology} slice needs '
          f'{tpu.hosts} ({tpu.machine_type}): create a node pool of that slice (docs/'
          'experiments.md), or pass --nocheck_nodes for a pool autoscaled from zero'
        )
    elif kind == 'prepared' and result.returncode:
      missing = [p for p in prepared if '://' in p and p not in result.stdout]
      problems.append(
        f'prepared splits are missing ({", ".join(missing) or result.stderr.strip()[-300:]}): '
        'run the data stage first, `python -m xm_launch.launch --sweep=prepare --task=<task> '
        '...` (same --model_dir_root / --prepared_root), or pass --noprepared'
      )
  for path in prepared:
    if '://' not in path and not os.path.exists(path):
      problems.append(f'prepared split missing: {path} (run --sweep=prepare first)')
  if problems:
    raise LaunchError('preflight failed, nothing submitted:\n  - ' + '\n  - '.join(problems))
  status = {}
  for p, path in zip(plans, manifest_paths):
    with open(path) as f:
      text = f.read()
    result = call(create_command(cloud, path), text)
    if result.returncode == 0:
      status[p.name] = 'created'
    elif 'AlreadyExists' in result.stderr or 'already exists' in result.stderr:
      log(f'  {p.name} already exists: skipped')
      status[p.name] = 'exists'
    else:
      raise LaunchError(f'kubectl create of {p.name} failed:\n{result.stderr[-2000:]}')
  return status


def sweep_selector(plans: Sequence[JobSetPlan]) -> str:
  """Label selector of the plans' JobSets.

  A sweep's runs may carry other sweeps' labels: an ablation entry whose resolved configuration
  another family trains is that family's run (`experiments.Experiment.alias`).
  """
  labels = sorted({group_labels(p.group)[SWEEP_LABEL] for p in plans})
  if len(labels) == 1:
    return f'{SWEEP_LABEL}={labels[0]}'
  return f'{SWEEP_LABEL} in ({",".join(labels)})'


def jobset_states(
  cloud: CloudConfig, selector: str, run: Runner = run_command
) -> dict[str, dict[str, Any]]:
  """{JobSet name: {'state': ..., 'restarts': N}} of the JobSets matching a label selector."""
  argv = ['kubectl', 'get', 'jobsets', '-n', cloud.namespace, '-l', selector]
  result = run(argv + ['-o', 'json'], None)
  if result.returncode:
    raise LaunchError(f'{shlex.join(argv)} failed:\n{result.stderr[-2000:]}')
  out = {}
  for item in json.loads(result.stdout or '{}').get('items', []):
    status = item.get('status', {})
    state = status.get('terminalState') or ''
    if not state:
      conditions = {c['type']: c['status'] for c in status.get('conditions', [])}
      state = 'Suspended (queued)' if conditions.get('Suspended') == 'True' else 'Active'
    out[item['metadata']['name']] = {'state': state, 'restarts': status.get('restarts', 0)}
  return out


# -- fallback: TPU VMs without GKE ---------------------------------------------------------------

# accelerator -> (--accelerator-type name of a slice of N chips, TPU VM runtime version).
_TPU_VM = {
  'v5e': (lambda chips: f'v5litepod-{chips}', 'v2-alpha-tpuv5-lite'),
  'v6e': (lambda chips: f'v6e-{chips}', 'v2-alpha-tpuv6e'),
  'v4': (lambda chips: f'v4-{2 * chips}', 'tpu-ubuntu2204-base'),  # named by TensorCores
  'v5p': (lambda chips: f'v5p-{2 * chips}', 'v2-alpha-tpuv5'),
}
_WORKER_NUMBER = (
  '$(curl -s -H Metadata-Flavor:Google '
  'http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number)'
)


def tpu_vm_commands(
  plan: JobSetPlan, tpu: TpuSlice, cloud: CloudConfig, image: str, spot: bool = False
) -> list[Command]:
  """A queued resource of the slice, the step runner on every worker over ssh, then delete.

  Each worker pulls the job image and runs the JobSet's command in it (host network, privileged),
  with its worker number as the pod index.
  """
  name_type, runtime = _TPU_VM[tpu.accelerator]
  where = (f'--project={cloud.project}', f'--zone={cloud.zone}')
  create = (
    'gcloud', 'compute', 'tpus', 'queued-resources', 'create', plan.name, f'--node-id={plan.name}',
    *where, f'--accelerator-type={name_type(tpu.chips)}', f'--runtime-version={runtime}',
  )  # fmt: skip
  [rjob] = plan.manifest['spec']['replicatedJobs']
  [container] = rjob['template']['spec']['template']['spec']['containers']
  registry = image.split('/', 1)[0]
  remote = (
    f'sudo gcloud auth configure-docker {registry} --quiet && sudo docker run --rm --privileged '
    f'--net=host -e {steps_lib.WORKER_ENV}={_WORKER_NUMBER} '
    + shlex.join([image, *container['command']])
  )
  return [
    Command(create + (('--spot',) if spot else ()), f'request a {tpu.accelerator} {tpu.topology}'),
    Command(
      (
        'gcloud',
        'compute',
        'tpus',
        'tpu-vm',
        'ssh',
        plan.name,
        *where,
        '--worker=all',
        f'--command={remote}',
      ),
      'run the steps on every worker (once the queued resource is ACTIVE)',
    ),  # fmt: skip
    Command(
      ('gcloud', 'compute', 'tpus', 'queued-resources', 'delete', plan.name, *where, '--force'),
      'release the slice',
    ),
  ]
