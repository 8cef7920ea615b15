"""GKE backend: one JobSet per experiment on a Cloud TPU slice, and the commands that launch them.

A slice is one Kubernetes Job (Indexed, one pod per TPU VM) inside a JobSet; every pod runs the
same command, the signal-forwarding runner around the step runner
(`python -m xm_launch.runner -- python -m xm_launch.steps --distributed --plan=...`), which runs
the experiment's steps in order and skips those whose output exists. GKE injects
`TPU_WORKER_ID` / `TPU_WORKER_HOSTNAMES` into Indexed Jobs that request `google.com/tpu`, so
`jax.distributed.initialize()` with no arguments finds the other hosts.

Slice facts (xpk 1.16.0 `core/system_characteristics.py`, GKE's TPU docs): node labels
`cloud.google.com/gke-tpu-accelerator` and `cloud.google.com/gke-tpu-topology`, machine type, one
pod per TPU VM with the VM's chips as its `google.com/tpu` limit: 1 chip for a 1x1 slice, else 4.

Failures (`failure_policies`), as xpk classifies them: an application exit code fails the JobSet
at once; a node disruption, the restart code `RESTART_EXIT_CODE` or SIGTERM restart it without
spending `maxRestarts`; any other signal (a crash, the OOM killer) restarts it and counts.

Nothing here contacts a cloud by itself: `preflight_commands` lists what a launch reads, `launch`
runs the commands through `subprocess` (`gcloud`, `kubectl`, `git` from PATH; the tests put fakes
first), and `--status` reads the cluster and the runs' outputs with the same tools.
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
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from xm_launch import jobs as jobs_lib
from xm_launch import runner
from xm_launch import steps as steps_lib

API_VERSION = 'jobset.x-k8s.io/v1alpha2'
JOBSET_CRD = 'jobsets.jobset.x-k8s.io'
# The LocalQueue of a cluster made by `xpk cluster create` (Kueue), and its ClusterQueue.
DEFAULT_QUEUE = 'multislice-queue'
XPK_CLUSTER_QUEUE = 'cluster-queue'
QUEUE_LABEL = 'kueue.x-k8s.io/queue-name'
# Priority class of the pods: xpk clusters define very-low, low, medium, high, very-high, and
# xpk workloads default to medium; Kueue preempts lower priorities first.
DEFAULT_PRIORITY_CLASS = 'medium'
EXCLUSIVE_ANNOTATION = 'alpha.jobset.sigs.k8s.io/exclusive-topology'
ACCELERATOR_LABEL = 'cloud.google.com/gke-tpu-accelerator'
TOPOLOGY_LABEL = 'cloud.google.com/gke-tpu-topology'
NODEPOOL_LABEL = 'cloud.google.com/gke-nodepool'
TPU_RESOURCE = 'google.com/tpu'
# Label JobSet puts on its Jobs and pods.
JOBSET_NAME_LABEL = 'jobset.sigs.k8s.io/jobset-name'
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
# Job failure reason of a pod failure policy rule (batch/v1).
POD_FAILURE_POLICY_REASON = 'PodFailurePolicy'

# -- failures and restarts --
# The "restart me" exit code (defined by the pods' runner, `xm_launch.runner`): the training
# process saw SIGTERM (a preemption), saved an emergency checkpoint and asks for a restart. The
# JobSet restarts without spending maxRestarts (xpk's workloads use the same code).
RESTART_EXIT_CODE = runner.RESTART_EXIT_CODE
# Exit code of a process killed by SIGTERM (128 + 15): a termination request from outside.
SIGTERM_EXIT_CODE = 143
# Exit codes 128 + N of a process killed by signal N.
SIGNAL_EXIT_CODES = tuple(range(129, 256))
# Restarts that count (other signals: a crash, the OOM killer, a grace period run out).
DEFAULT_MAX_RESTARTS = 3
# Seconds between SIGTERM and SIGKILL: one step to reach the preemption sync point plus an
# emergency checkpoint (the paper-size state, sharded over the slice's hosts, is a few GB: tens of
# seconds to GCS). Spot VMs get at most 30 s from GCE whatever this says; Kueue preemption,
# maintenance and deletions give this.
TERMINATION_GRACE_S = 120
# A finished (Completed or Failed) JobSet is deleted this long after it finished; until then
# `--status` shows its failing pod's log.
TTL_AFTER_FINISHED_S = 3 * 24 * 3600
# The signal-forwarding runner (its own module) around the step runner: the step runner never
# runs as PID 1, and SIGTERM reaches the training process.
RUNNER = ('python', '-m', 'xm_launch.runner', '--')
# Memory-backed /dev/shm (the container runtime's default is 64 MiB).
SHM_VOLUME = 'dshm'
# JAX's persistent compilation cache (a restarted slice reuses its compiled steps).
COMPILATION_CACHE_ENV = 'JAX_COMPILATION_CACHE_DIR'
COMPILATION_CACHE_DIR = 'jax_cache'


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


@dataclasses.dataclass(frozen=True)
class _Family:
  """The slices of one TPU generation on GKE."""

  # Value of the node label cloud.google.com/gke-tpu-accelerator.
  gke_accelerator: str
  # Machine type of a VM with N chips: f'{prefix}{N}t'.
  machine_prefix: str
  # Topologies the launcher accepts (xpk's, plus GKE's single-host v5e 1x1 and 2x2).
  topologies: tuple[str, ...]


# THE slice table: accelerator -> family. Pods and chips per pod follow xpk's rule
# (`get_tpu_system_characteristics_map`): a 1-chip slice is one VM with 1 chip, every other slice
# is VMs of 4 chips. So v5e/v6e 2x4 is 2 pods x 4 chips (xpk's v5litepod-8 / v6e-8), not one
# 8-chip VM.
_FAMILIES = {
  'v4': _Family(
    'tpu-v4-podslice',
    'ct4p-hightpu-',
    (
      '2x2x1',
      '2x2x2',
      '2x2x4',
      '2x4x4',
      '4x4x4',
      '4x4x8',
      '4x8x8',
      '8x8x8',
      '8x8x12',
      '8x8x16',
      '8x16x16',
    ),
  ),  # fmt: skip
  'v5p': _Family(
    'tpu-v5p-slice',
    'ct5p-hightpu-',
    (
      '2x2x1',
      '2x2x2',
      '2x2x4',
      '2x4x4',
      '4x4x4',
      '4x4x8',
      '4x8x8',
      '8x8x8',
      '8x8x16',
      '8x16x16',
      '16x16x16',
    ),
  ),  # fmt: skip
  'v5e': _Family(
    'tpu-v5-lite-podslice',
    'ct5lp-hightpu-',
    ('1x1', '2x2', '2x4', '4x4', '4x8', '8x8', '8x16', '16x16'),
  ),
  'v6e': _Family(
    'tpu-v6e-slice',
    'ct6e-standard-',
    ('1x1', '2x2', '2x4', '4x4', '4x8', '8x8', '8x16', '16x16'),
  ),
}
# Chips of one VM of a multi-chip slice (xpk: chips_per_vm = 1 if total_chips == 1 else 4).
CHIPS_PER_VM = 4


def _chips(topology: str) -> int:
  chips = 1
  for d in topology.split('x'):
    chips *= int(d)
  return chips


def tpu_slice(accelerator: str, topology: str) -> TpuSlice:
  """The GKE facts of a slice; raises on an accelerator or topology the launcher does not take."""
  if accelerator not in _FAMILIES:
    raise ValueError(f'--accelerator={accelerator!r}: must be one of {sorted(_FAMILIES)}.')
  family = _FAMILIES[accelerator]
  if topology not in family.topologies:
    raise ValueError(
      f'--topology={topology!r}: {accelerator} topologies are {", ".join(family.topologies)} '
      '(the slices of xpk 1.16.0 and GKE).'
    )
  chips = _chips(topology)
  per_vm = 1 if chips == 1 else CHIPS_PER_VM
  return TpuSlice(
    accelerator,
    topology,
    family.gke_accelerator,
    f'{family.machine_prefix}{per_vm}t',
    chips // per_vm,
    per_vm,
  )


def slice_table() -> list[TpuSlice]:
  """Every slice the launcher accepts (docs/experiments.md prints the same table)."""
  return [tpu_slice(a, t) for a, f in _FAMILIES.items() for t in f.topologies]


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
  """The command of every pod: the step runner with the JobSet's plan, under the runner."""
  cmd = [*RUNNER, 'python', '-m', 'xm_launch.steps']
  if distributed:
    cmd.append('--distributed')
  return cmd + [f'--plan={plan.to_json()}']


def failure_policies(max_restarts: int) -> tuple[dict[str, Any], dict[str, Any]]:
  """(the Job's podFailurePolicy, the JobSet's failurePolicy): xpk's classes of failure.

  The Job's rules (first match wins) each fail the Job with reason PodFailurePolicy and the
  message '... matching FailJob rule at index <i>' (batch/v1 Job controller); the JobSet's rules
  (JobSet v0.10 `onJobFailureMessagePatterns`) tell the indexes apart:
    0. the pod has condition DisruptionTarget (preemption, maintenance, eviction, node lost):
       restart, not counted (`RestartJobSetAndIgnoreMaxRestarts`);
    1. exit code RESTART_EXIT_CODE (saved on SIGTERM, asks to be restarted) or SIGTERM_EXIT_CODE:
       restart, not counted;
    2. any other exit code below 129 (an exception, a gin error, a 403, the step runner's
       configuration error 78): fail the JobSet at once.
  Other signal exits (129-255 but 143: a crash, the OOM killer) match no rule: the Job fails
  with BackoffLimitExceeded and the JobSet restarts, counting towards `max_restarts`.
  """
  application = sorted({RESTART_EXIT_CODE, *SIGNAL_EXIT_CODES})
  pod_rules = [
    {'action': 'FailJob', 'onPodConditions': [{'type': 'DisruptionTarget', 'status': 'True'}]},
    {
      'action': 'FailJob',
      'onExitCodes': {
        'containerName': CONTAINER,
        'operator': 'In',
        'values': [RESTART_EXIT_CODE, SIGTERM_EXIT_CODE],
      },
    },
    {
      'action': 'FailJob',
      'onExitCodes': {'containerName': CONTAINER, 'operator': 'NotIn', 'values': application},
    },
  ]

  def rule(name: str, action: str, index: int) -> dict[str, Any]:
    return {
      'name': name,
      'action': action,
      'onJobFailureReasons': [POD_FAILURE_POLICY_REASON],
      'onJobFailureMessagePatterns': [f'matching FailJob rule at index {index}$'],
    }

  jobset_policy = {
    'maxRestarts': max_restarts,
    'rules': [
      rule('Disruption', 'RestartJobSetAndIgnoreMaxRestarts', 0),
      rule('RestartRequested', 'RestartJobSetAndIgnoreMaxRestarts', 1),
      rule('ApplicationError', 'FailJobSet', 2),
    ],
  }
  return {'rules': pod_rules}, jobset_policy


def container_spec(
  tpu: TpuSlice, command: Sequence[str], image: str, cache_dir: str = ''
) -> dict[str, Any]:
  """The one container of a pod: the command, the host's chips, /dev/shm, the compile cache."""
  env = [{'name': 'PYTHONUNBUFFERED', 'value': '1'}]
  if cache_dir:
    env.append({'name': COMPILATION_CACHE_ENV, 'value': cache_dir})
  return {
    'name': CONTAINER,
    'image': image,
    'command': list(command),
    'env': env,
    'ports': [{'containerPort': TPU_PORT}],
    'securityContext': {'privileged': True},
    'resources': {'limits': {TPU_RESOURCE: tpu.chips_per_host}},
    'volumeMounts': [{'name': SHM_VOLUME, 'mountPath': '/dev/shm'}],
  }


def pod_spec(
  tpu: TpuSlice, containers: Sequence[Mapping[str, Any]], priority_class: str = ''
) -> dict[str, Any]:
  """A pod on the slice's nodes: host network, TPU toleration, memory /dev/shm, priority."""
  spec = {
    'restartPolicy': 'Never',
    'hostNetwork': True,
    'dnsPolicy': 'ClusterFirstWithHostNet',
    'nodeSelector': tpu.node_selector,
    'tolerations': [{'key': TPU_RESOURCE, 'operator': 'Exists', 'effect': 'NoSchedule'}],
    'terminationGracePeriodSeconds': TERMINATION_GRACE_S,
    'volumes': [{'name': SHM_VOLUME, 'emptyDir': {'medium': 'Memory'}}],
    'containers': [dict(c) for c in containers],
  }
  if priority_class:
    spec['priorityClassName'] = priority_class
  return spec


def job_spec(
  tpu: TpuSlice,
  pod: Mapping[str, Any],
  labels: Mapping[str, str],
  pod_failure_policy: Mapping[str, Any],
) -> dict[str, Any]:
  """The slice's Job: Indexed, one pod per host, no pod retried by the Job itself."""
  return {
    'parallelism': tpu.hosts,
    'completions': tpu.hosts,
    'completionMode': 'Indexed',
    'backoffLimit': 0,
    'podFailurePolicy': dict(pod_failure_policy),
    'template': {'metadata': {'labels': dict(labels)}, 'spec': dict(pod)},
  }


@dataclasses.dataclass(frozen=True)
class SliceSettings:
  """How every JobSet of a launch runs (cluster-wide choices, not per experiment)."""

  # The job image.
  image: str
  # Kueue LocalQueue ('' : no queue label).
  queue: str = DEFAULT_QUEUE
  # Restarts counted towards the JobSet's maxRestarts (crashes; see failure_policies).
  max_restarts: int = DEFAULT_MAX_RESTARTS
  # PriorityClass of the pods ('' : the cluster's default).
  priority_class: str = DEFAULT_PRIORITY_CLASS
  # Root of the runs; its `jax_cache/` holds JAX's compilation cache ('' : no cache).
  model_root: str = ''
  # Prefix of the JobSet names.
  prefix: str = 'melodi'

  @property
  def cache_dir(self) -> str:
    root = self.model_root.rstrip('/')
    return f'{root}/{COMPILATION_CACHE_DIR}' if root else ''


def jobset_manifest(
  group: str,
  plan: steps_lib.Plan,
  tpu: TpuSlice,
  settings: SliceSettings,
  *,
  model_dir: str = '',
) -> dict[str, Any]:
  """The JobSet of one group: one slice, `tpu.hosts` pods running the same command."""
  labels = group_labels(group)
  meta_labels = dict(labels, **({QUEUE_LABEL: settings.queue} if settings.queue else {}))
  annotations = {EXCLUSIVE_ANNOTATION: NODEPOOL_LABEL, GROUP_ANNOTATION: group}
  if model_dir:
    annotations[MODEL_DIR_ANNOTATION] = model_dir
  command = step_runner_command(plan, distributed=tpu.hosts > 1)
  container = container_spec(tpu, command, settings.image, settings.cache_dir)
  pod_policy, jobset_policy = failure_policies(settings.max_restarts)
  job = job_spec(tpu, pod_spec(tpu, [container], settings.priority_class), labels, pod_policy)
  return {
    'apiVersion': API_VERSION,
    'kind': 'JobSet',
    'metadata': {
      'name': jobset_name(group, settings.prefix),
      'labels': meta_labels,
      'annotations': annotations,
    },
    'spec': {
      'failurePolicy': jobset_policy,
      'successPolicy': {'operator': 'All'},
      'network': {'enableDNSHostnames': True},
      'ttlSecondsAfterFinished': TTL_AFTER_FINISHED_S,
      'replicatedJobs': [{'name': REPLICATED_JOB, 'replicas': 1, 'template': {'spec': job}}],
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
  settings: SliceSettings,
) -> list[JobSetPlan]:
  """One JobSet per group of steps; timing steps on `timing_slice`, the others on `train_slice`."""
  out = []
  names: dict[str, str] = {}
  for group, members in jobs_lib.groups(jobs).items():
    tpu = timing_slice if group == 'timing' and timing_slice else train_slice
    model_dirs = {j.model_dir for j in members}
    manifest = jobset_manifest(
      group,
      jobs_lib.plan(group, members),
      tpu,
      settings,
      model_dir=model_dirs.pop() if len(model_dirs) == 1 else '',
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


# -- the pod preflight: a Job with the pods' identity -------------------------------------------


def preflight_job_manifest(
  name: str,
  tpu: TpuSlice,
  settings: SliceSettings,
  *,
  reads: Sequence[str],
  marker: str,
  namespace: str = 'default',
) -> dict[str, Any]:
  """A one-pod Job on the slice's node pool, as the JobSets' pods run (same namespace, service
  account, nodes), that reads the prepared splits and writes `marker` (`xm_launch.preflight`).

  It requests no TPU chips, so it runs beside a busy slice, and it carries no Kueue label.
  """
  command = ['python', '-m', 'xm_launch.preflight', f'--marker={marker}']
  command += [f'--read={r}' for r in reads]
  container = {
    'name': CONTAINER,
    'image': settings.image,
    'command': command,
    'env': [
      {'name': 'PYTHONUNBUFFERED', 'value': '1'},
      {'name': 'NODE_NAME', 'valueFrom': {'fieldRef': {'fieldPath': 'spec.nodeName'}}},
    ],
  }
  pod = pod_spec(tpu, [container], settings.priority_class)
  del pod['volumes']  # no /dev/shm: the container mounts none
  pod['terminationGracePeriodSeconds'] = 10
  return {
    'apiVersion': 'batch/v1',
    'kind': 'Job',
    'metadata': {'name': name, 'namespace': namespace, 'labels': {SWEEP_LABEL: 'preflight'}},
    'spec': {
      'backoffLimit': 0,
      'activeDeadlineSeconds': 600,
      'ttlSecondsAfterFinished': 3600,
      'template': {'metadata': {'labels': {SWEEP_LABEL: 'preflight'}}, 'spec': pod},
    },
  }


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
  # Text piped to stdin ('' : none).
  stdin_text: str = ''

  def shell(self) -> str:
    text = shlex.join(self.argv)
    if self.stdin_text:
      return f'echo {shlex.quote(self.stdin_text)} | {text}'
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


def _kubectl_get(kind: str, name: str = '', namespace: str = '', *extra: str) -> tuple[str, ...]:
  argv = ['kubectl', 'get', kind, *([name] if name else [])]
  argv += ['-n', namespace] if namespace else []
  return (*argv, *extra, '-o', 'json')


def preflight_commands(
  cloud: CloudConfig,
  tpus: Sequence[TpuSlice],
  prepared: Sequence[str] = (),
  priority_class: str = '',
) -> list[Command]:
  """What the preflight reads (`preflight` runs them and judges the answers)."""
  out = [Command(('kubectl', 'get', 'crd', JOBSET_CRD, '-o', 'name'), 'JobSet is installed')]
  if priority_class:
    out.append(
      Command(
        ('kubectl', 'get', 'priorityclass', priority_class, '-o', 'name'),
        f'the PriorityClass {priority_class} exists',
      )
    )
  if cloud.queue:
    out += [
      Command(
        _kubectl_get('localqueue', cloud.queue, cloud.namespace),
        f'the Kueue LocalQueue {cloud.queue} exists (and its ClusterQueue)',
      ),
      Command(
        _kubectl_get('clusterqueue', '<its ClusterQueue>'),
        'a flavor of the ClusterQueue fits each slice (node labels, google.com/tpu quota)',
      ),
      Command(_kubectl_get('resourceflavors'), "the flavors' node labels"),
    ]
  if cloud.check_nodes:
    for tpu in tpus:
      out.append(
        Command(
          _kubectl_get('nodes', '', '', '-l', selector_text(tpu.node_selector)),
          f'{tpu.hosts} nodes of a {tpu.accelerator} {tpu.topology} slice, each with '
          f'{tpu.chips_per_host} allocatable {TPU_RESOURCE}',
        )
      )
  remote = [p for p in prepared if '://' in p]
  if remote:
    out.append(
      Command(('gcloud', 'storage', 'ls', *remote), 'the prepared splits the sweep reads exist')
    )
  return out


def selector_text(selector: Mapping[str, str]) -> str:
  return ','.join(f'{k}={v}' for k, v in selector.items())


def create_command(cloud: CloudConfig, manifest_path: str) -> Command:
  return Command(
    ('kubectl', 'create', '-n', cloud.namespace, '-f', '-'),
    'submit the JobSet',
    stdin_file=manifest_path,
  )


def delete_command(cloud: CloudConfig, name: str) -> Command:
  return Command(
    (
      'kubectl', 'delete', 'jobset', name, '-n', cloud.namespace, '--cascade=foreground',
      '--wait=true', '--timeout=10m',
    ),
    'delete the Failed JobSet (its pods first) before it is created again',
  )  # fmt: skip


def prepared_markers(prepared_root: str | None, tasks: Sequence[str]) -> list[str]:
  """`meta.json` of every split a sweep reads (train, validation, test of each task)."""
  if not prepared_root:
    return []
  root = prepared_root.rstrip('/')
  return [f'{root}/{t}/{s}/meta.json' for t in tasks for s in jobs_lib.SPLITS]


# -- Kueue: is a slice admissible? --------------------------------------------------------------


def flavor_fits(node_labels: Mapping[str, str], selector: Mapping[str, str]) -> bool:
  """Kueue's test of a ResourceFlavor: its node labels agree with the pods' node selector."""
  return all(selector[k] == v for k, v in node_labels.items() if k in selector)


def _quantity(value: Any) -> int:
  text = str(value)
  return int(text) if text.isdigit() else 0


def admission_problems(
  tpu: TpuSlice, cluster_queue: Mapping[str, Any], flavors: Mapping[str, Mapping[str, str]]
) -> list[str]:
  """Why Kueue would never admit a JobSet of `tpu` to `cluster_queue` ([]: it would).

  `flavors`: ResourceFlavor name -> node labels. A JobSet is admitted once some flavor of the
  ClusterQueue that covers google.com/tpu has node labels matching the pods' node selector and a
  quota of at least the slice's chips.
  """
  offered = []
  for group in cluster_queue.get('spec', {}).get('resourceGroups', []):
    if TPU_RESOURCE not in group.get('coveredResources', []):
      continue
    for flavor in group.get('flavors', []):
      quota = {r['name']: _quantity(r.get('nominalQuota', 0)) for r in flavor.get('resources', [])}
      labels = flavors.get(flavor['name'], {})
      offered.append(f'{flavor["name"]} ({selector_text(labels) or "no labels"}: {quota})')
      if flavor_fits(labels, tpu.node_selector) and quota.get(TPU_RESOURCE, 0) >= tpu.chips:
        return []
  name = cluster_queue.get('metadata', {}).get('name', '?')
  return [
    f'Kueue never admits a {tpu.accelerator} {tpu.topology} JobSet ({tpu.chips} chips, '
    f'{selector_text(tpu.node_selector)}): no flavor of ClusterQueue {name} fits it (it offers '
    f'{"; ".join(offered) or "nothing for google.com/tpu"}). Add a node pool and a flavor of '
    'that slice (docs/experiments.md, "Extra slice shapes"), or launch on the cluster\'s shape '
    '(--topology / --timing_topology)'
  ]


def extra_slice_commands(
  cloud: CloudConfig,
  tpu: TpuSlice,
  cluster_queue: str = XPK_CLUSTER_QUEUE,
  covered: Sequence[str] = (TPU_RESOURCE,),
  spot: bool = False,
) -> list[Command]:
  """Make `tpu` admissible on a Kueue cluster: its node pool, a ResourceFlavor, the quota.

  `covered`: the coveredResources of the ClusterQueue's resource group (every flavor lists each,
  in order; the pods request only google.com/tpu, so the others get quota 0).
  """
  flavor = f'melodi-{tpu.accelerator}-{tpu.topology}'
  pool = ['gcloud', 'container', 'node-pools', 'create', flavor, f'--cluster={cloud.cluster}']
  pool += [f'--location={cloud.location}', f'--node-locations={cloud.zone}']
  pool += [f'--project={cloud.project}', f'--machine-type={tpu.machine_type}']
  if tpu.hosts > 1:
    pool.append(f'--tpu-topology={tpu.topology}')
  pool += [f'--num-nodes={tpu.hosts}', '--scopes=https://www.googleapis.com/auth/cloud-platform']
  pool += ['--spot'] if spot else []
  resource_flavor = {
    'apiVersion': 'kueue.x-k8s.io/v1beta1',
    'kind': 'ResourceFlavor',
    'metadata': {'name': flavor},
    'spec': {'nodeLabels': tpu.node_selector},
  }
  quota = [{'name': r, 'nominalQuota': tpu.chips if r == TPU_RESOURCE else 0} for r in covered]
  patch = [
    {
      'op': 'add',
      'path': '/spec/resourceGroups/0/flavors/-',
      'value': {'name': flavor, 'resources': quota},
    }
  ]
  return [
    Command(tuple(pool), f'a node pool of one {tpu.accelerator} {tpu.topology} slice'),
    Command(
      ('kubectl', 'apply', '-f', '-'),
      f"the Kueue ResourceFlavor {flavor} (the slice's node labels)",
      stdin_text=json.dumps(resource_flavor, separators=(',', ':')),
    ),
    Command(
      (
        'kubectl',
        'patch',
        'clusterqueue',
        cluster_queue,
        '--type=json',
        f'-p={json.dumps(patch, separators=(",", ":"))}',
      ),
      f'{tpu.chips} {TPU_RESOURCE} of flavor {flavor} in ClusterQueue {cluster_queue}',
    ),  # fmt: skip
  ]


# -- running them -------------------------------------------------------------------------------


class LaunchError(RuntimeError):
  """A launch stopped before submitting (preflight) or a submission failed."""


Runner = Callable[[Sequence[str], str | None], subprocess.CompletedProcess]
Call = Callable[[Command], subprocess.CompletedProcess]


def run_command(argv: Sequence[str], stdin: str | None = None) -> subprocess.CompletedProcess:
  """Runs one command (gcloud, kubectl from PATH), capturing its output."""
  return subprocess.run(list(argv), input=stdin, capture_output=True, text=True, check=False)


def caller(run: Runner = run_command, log: Callable[[str], None] | None = print) -> Call:
  """Runs a Command (stdin from its file or text), printing it first when `log` is given."""

  def call(cmd: Command) -> subprocess.CompletedProcess:
    if log:
      log(f'$ {cmd.shell() if not cmd.stdin_text else shlex.join(cmd.argv) + " < (JSON)"}')
    stdin = cmd.stdin_text or None
    if cmd.stdin_file:
      with open(cmd.stdin_file) as f:
        stdin = f.read()
    return run(list(cmd.argv), stdin)

  return call


def _json(result: subprocess.CompletedProcess) -> dict[str, Any]:
  try:
    return json.loads(result.stdout or '{}')
  except json.JSONDecodeError:
    return {}


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


def ensure_image(
  call: Call, cloud: CloudConfig, image: str, make_context: Callable[[], str], log=print
) -> None:
  """Builds the job image from the committed tree unless it is already in the registry."""
  describe, submit = image_commands(cloud, image, '<context>')
  if call(describe).returncode == 0:
    log(f'  image {image} exists: not rebuilt')
    return
  context = make_context()
  submit = dataclasses.replace(
    submit, argv=tuple(context if a == '<context>' else a for a in submit.argv)
  )
  try:
    done = call(submit)
  finally:
    shutil.rmtree(context, ignore_errors=True)
  if done.returncode:
    raise LaunchError(f'the image build failed:\n{done.stderr[-2000:]}')


def get_credentials(call: Call, cloud: CloudConfig) -> None:
  creds = call(credential_command(cloud))
  if creds.returncode:
    raise LaunchError(
      f'gcloud container clusters get-credentials {cloud.cluster} failed (project '
      f'{cloud.project}, location {cloud.location}; an xpk cluster is regional, a zonal one '
      f'needs --cluster_location=ZONE):\n{creds.stderr[-2000:]}'
    )


def _queue_problems(call: Call, cloud: CloudConfig, tpus: Sequence[TpuSlice]) -> list[str]:
  """The LocalQueue exists and its ClusterQueue admits every slice."""
  local = call(Command(_kubectl_get('localqueue', cloud.queue, cloud.namespace), 'LocalQueue'))
  if local.returncode:
    return [
      f'the Kueue LocalQueue {cloud.queue!r} is not in namespace {cloud.namespace!r}: create '
      'the cluster with xpk (it makes multislice-queue), or pass --queue= (no Kueue) or the '
      'name of yours'
    ]
  cq_name = _json(local).get('spec', {}).get('clusterQueue', '')
  cq = call(Command(_kubectl_get('clusterqueue', cq_name), 'ClusterQueue'))
  if cq.returncode or not cq_name:
    return [f'the ClusterQueue {cq_name!r} of LocalQueue {cloud.queue!r} cannot be read']
  listed = _json(call(Command(_kubectl_get('resourceflavors'), 'flavors'))).get('items', [])
  flavors = {f['metadata']['name']: f.get('spec', {}).get('nodeLabels', {}) for f in listed}
  problems = []
  for tpu in tpus:
    found = admission_problems(tpu, _json(cq), flavors)
    if found:
      covered = _covered_resources(_json(cq))
      fix = extra_slice_commands(cloud, tpu, cq_name, covered)
      found[0] += ':\n      ' + '\n      '.join(c.shell() for c in fix)
    problems += found
  return problems


def _covered_resources(cluster_queue: Mapping[str, Any]) -> list[str]:
  for group in cluster_queue.get('spec', {}).get('resourceGroups', []):
    if TPU_RESOURCE in group.get('coveredResources', []):
      return list(group['coveredResources'])
  return [TPU_RESOURCE]


def node_problems(tpu: TpuSlice, nodes: Iterable[Mapping[str, Any]]) -> list[str]:
  """Whether enough labelled nodes have exactly the pods' chips allocatable."""
  nodes = list(nodes)
  chips = [str(n.get('status', {}).get('allocatable', {}).get(TPU_RESOURCE, '0')) for n in nodes]
  fitting = sum(c == str(tpu.chips_per_host) for c in chips)
  if fitting >= tpu.hosts:
    return []
  seen = ', '.join(sorted(set(chips))) or 'none'
  return [
    f'{len(nodes)} nodes carry {selector_text(tpu.node_selector)}, {fitting} of them with '
    f'{tpu.chips_per_host} allocatable {TPU_RESOURCE} (found: {seen}); a {tpu.accelerator} '
    f'{tpu.topology} slice is {tpu.hosts} pods x {tpu.chips_per_host} chips on '
    f"{tpu.machine_type} nodes (xpk's layout): create a node pool of that slice (docs/"
    'experiments.md), or pass --nocheck_nodes for a pool autoscaled from zero'
  ]


def preflight(
  call: Call,
  cloud: CloudConfig,
  tpus: Sequence[TpuSlice],
  prepared: Sequence[str] = (),
  priority_class: str = '',
) -> None:
  """Raises LaunchError naming every missing piece (nothing submitted)."""
  problems = []
  if call(Command(('kubectl', 'get', 'crd', JOBSET_CRD, '-o', 'name'), 'crd')).returncode:
    problems.append(
      f'the JobSet CRD ({JOBSET_CRD}) is not installed: `xpk cluster create` installs it, or '
      'kubectl apply --server-side -f https://github.com/kubernetes-sigs/jobset/releases/'
      'download/v0.10.1/manifests.yaml'
    )
  if priority_class:
    argv = ('kubectl', 'get', 'priorityclass', priority_class, '-o', 'name')
    if call(Command(argv, 'priority')).returncode:
      problems.append(
        f'the PriorityClass {priority_class!r} does not exist (xpk clusters define very-low, '
        'low, medium, high, very-high): pass --priority_class=<one of yours>, or '
        '--priority_class= for none'
      )
  if cloud.queue:
    problems += _queue_problems(call, cloud, tpus)
  if cloud.check_nodes:
    for tpu in tpus:
      argv = _kubectl_get('nodes', '', '', '-l', selector_text(tpu.node_selector))
      problems += node_problems(tpu, _json(call(Command(argv, 'nodes'))).get('items', []))
  problems += _prepared_problems(call, prepared)
  if problems:
    raise LaunchError('preflight failed, nothing submitted:\n  - ' + '\n  - '.join(problems))


def _prepared_problems(call: Call, prepared: Sequence[str]) -> list[str]:
  remote = [p for p in prepared if '://' in p]
  missing = [p for p in prepared if '://' not in p and not os.path.exists(p)]
  if remote:
    found = existing_remote(call, remote)
    missing += [p for p in remote if p not in found]
  if not missing:
    return []
  return [
    f'prepared splits are missing ({", ".join(missing)}): run the data stage first, '
    '`python -m xm_launch.launch --sweep=prepare --task=<task> ...` (same --model_dir_root / '
    '--prepared_root), or pass --noprepared'
  ]


def existing_remote(call: Call, urls: Sequence[str]) -> set[str]:
  """Which gs:// objects exist: one `gcloud storage ls` (it lists those that match)."""
  if not urls:
    return set()
  result = call(Command(('gcloud', 'storage', 'ls', *urls), 'which outputs exist'))
  return {line.strip() for line in result.stdout.splitlines()} & set(urls)


def existing_paths(paths: Iterable[str], call: Call | None = None) -> set[str]:
  """Which of `paths` exist: local ones here, gs:// ones with the gcloud CLI (no TensorFlow)."""
  paths = [p for p in paths if p]
  remote = sorted({p for p in paths if '://' in p})
  found = {p for p in paths if '://' not in p and os.path.exists(p)}
  return found | existing_remote(call or caller(log=None), remote)


def run_pod_preflight(
  call: Call,
  cloud: CloudConfig,
  manifest: Mapping[str, Any],
  *,
  timeout_s: float = 660.0,
  poll_s: float = 5.0,
  sleep: Callable[[float], None] = time.sleep,
  log: Callable[[str], None] = print,
) -> None:
  """Runs the preflight Job and waits for it; raises LaunchError with its log if it fails."""
  name = manifest['metadata']['name']
  created = call(
    Command(
      ('kubectl', 'create', '-n', cloud.namespace, '-f', '-'),
      'preflight Job',
      stdin_text=json.dumps(manifest),
    )
  )
  if created.returncode:
    raise LaunchError(f'kubectl create of the preflight Job {name} failed:\n{created.stderr}')
  waited, state = 0.0, ''
  while waited <= timeout_s:
    status = _json(call(Command(_kubectl_get('job', name, cloud.namespace), 'wait'))).get(
      'status', {}
    )
    if status.get('succeeded'):
      state = 'succeeded'
      break
    if status.get('failed'):
      state = 'failed'
      break
    sleep(poll_s)
    waited += poll_s
  logs = call(
    Command(('kubectl', 'logs', f'job/{name}', '-n', cloud.namespace, '--tail=40'), 'log')
  ).stdout
  if state != 'succeeded':
    why = 'failed' if state else f'did not finish within {timeout_s:.0f} s'
    raise LaunchError(
      f"the preflight Job {name} (the pods' own identity, nodes and image) {why}; nothing "
      f'submitted (--skip_pod_preflight skips it). Its log:\n{logs[-4000:]}'
    )
  log(f'  preflight Job {name} passed:\n    ' + '\n    '.join(logs.strip().splitlines()[-3:]))


def submit(
  call: Call,
  plans: Sequence[JobSetPlan],
  manifest_paths: Sequence[str],
  cloud: CloudConfig,
  *,
  recreate_failed: bool = False,
  log: Callable[[str], None] = print,
) -> dict[str, str]:
  """Creates the JobSets not on the cluster; a Failed one only with `recreate_failed`.

  Returns {name: 'created' | 'exists' | 'failed' (left as it is) | 'recreated'}.
  """
  states = jobset_states(cloud, sweep_selector(plans), call) if plans else {}
  status = {}
  for p, path in zip(plans, manifest_paths):
    state = states.get(p.name, {}).get('state', '')
    if state == 'Failed' and not recreate_failed:
      log(f'  {p.name} is Failed: left as it is (--recreate_failed deletes and recreates it)')
      status[p.name] = 'failed'
      continue
    if state and state != 'Failed':
      log(f'  {p.name} is already there ({state}): skipped')
      status[p.name] = 'exists'
      continue
    if state == 'Failed':
      deleted = call(delete_command(cloud, p.name))
      if deleted.returncode:
        raise LaunchError(f'kubectl delete of {p.name} failed:\n{deleted.stderr[-2000:]}')
    result = call(create_command(cloud, path))
    if result.returncode == 0:
      status[p.name] = 'recreated' if state == 'Failed' else 'created'
    elif 'AlreadyExists' in result.stderr or 'already exists' in result.stderr:
      log(f'  {p.name} already exists: skipped')
      status[p.name] = 'exists'
    else:
      raise LaunchError(f'kubectl create of {p.name} failed:\n{result.stderr[-2000:]}')
  return status


def launch(
  plans: Sequence[JobSetPlan],
  manifest_paths: Sequence[str],
  cloud: CloudConfig,
  *,
  tpus: Sequence[TpuSlice],
  image: str,
  build: bool,
  priority_class: str = '',
  prepared: Sequence[str] = (),
  pod_preflight: Mapping[str, Any] | None = None,
  recreate_failed: bool = False,
  run: Runner = run_command,
  make_context: Callable[[], str] | None = None,
  sleep: Callable[[float], None] = time.sleep,
  log: Callable[[str], None] = print,
) -> dict[str, str]:
  """The real launch: image, credentials, preflight (and the preflight Job), then the JobSets.

  Returns `submit`'s status per JobSet. Raises `LaunchError` (nothing submitted) when a preflight
  check fails, naming what is missing.
  """
  call = caller(run, log)
  if build:
    context = make_context or (lambda: build_context(jobs_lib.dockerfile()))
    ensure_image(call, cloud, image, context, log)
  get_credentials(call, cloud)
  preflight(call, cloud, tpus, prepared, priority_class)
  if pod_preflight:
    run_pod_preflight(call, cloud, pod_preflight, sleep=sleep, log=log)
  return submit(call, plans, manifest_paths, cloud, recreate_failed=recreate_failed, log=log)


# -- status: the sweep's JobSets, and why a Failed one failed ----------------------------------


def sweep_selector(plans: Sequence[JobSetPlan]) -> str:
  """Label selector of the plans' JobSets.

  A sweep's runs may carry other sweeps' labels: an ablation entry whose resolved configuration
  another family trains is that family's run (`experiments.Experiment.alias`).
  """
  labels = sorted({group_labels(p.group)[SWEEP_LABEL] for p in plans})
  if len(labels) == 1:
    return f'{SWEEP_LABEL}={labels[0]}'
  return f'{SWEEP_LABEL} in ({",".join(labels)})'


def jobsets_command(cloud: CloudConfig, selector: str) -> Command:
  return Command(
    _kubectl_get('jobsets', '', cloud.namespace, '-l', selector),
    "the sweep's JobSets and their states (a Failed one is not resubmitted)",
  )


def jobset_states(cloud: CloudConfig, selector: str, call: Call) -> dict[str, dict[str, Any]]:
  """{JobSet name: {'state', 'restarts', 'counted', 'message'}} of the JobSets of a selector.

  'state': 'Completed', 'Failed', 'Suspended (queued)' or 'Active'; 'counted': the restarts that
  count towards maxRestarts (JobSet v0.10 `restartsCountTowardsMax`).
  """
  argv = _kubectl_get('jobsets', '', cloud.namespace, '-l', selector)
  result = call(Command(argv, "the sweep's JobSets"))
  if result.returncode:
    raise LaunchError(f'{shlex.join(argv)} failed:\n{result.stderr[-2000:]}')
  out = {}
  for item in _json(result).get('items', []):
    status = item.get('status', {})
    conditions = {c['type']: c for c in status.get('conditions', [])}
    state = status.get('terminalState') or ''
    if not state and conditions.get('Failed', {}).get('status') == 'True':
      state = 'Failed'
    if not state:
      suspended = conditions.get('Suspended', {}).get('status') == 'True'
      state = 'Suspended (queued)' if suspended else 'Active'
    failed = conditions.get('Failed', {})
    out[item['metadata']['name']] = {
      'state': state,
      'restarts': status.get('restarts', 0),
      'counted': status.get('restartsCountTowardsMax', status.get('restarts', 0)),
      'message': ': '.join(x for x in (failed.get('reason'), failed.get('message')) if x),
    }
  return out


@dataclasses.dataclass(frozen=True)
class PodFailure:
  """The pod whose failure failed a JobSet (the first container to terminate with an error)."""

  # Pod name.
  pod: str
  # The container's exit code.
  exit_code: int
  # The container's termination reason ('Error', 'OOMKilled', ...).
  reason: str
  # Whether the pod has the DisruptionTarget condition.
  disrupted: bool


def failing_pod(cloud: CloudConfig, name: str, call: Call) -> PodFailure | None:
  """The JobSet's pod that failed first (None: no failed pod is left)."""
  argv = _kubectl_get('pods', '', cloud.namespace, '-l', f'{JOBSET_NAME_LABEL}={name}')
  failures = []
  for pod in _json(call(Command(argv, "the JobSet's pods"))).get('items', []):
    for cs in pod.get('status', {}).get('containerStatuses', []):
      term = cs.get('state', {}).get('terminated') or {}
      if cs.get('name') == CONTAINER and term.get('exitCode'):
        conditions = pod['status'].get('conditions', [])
        disrupted = any(
          c.get('type') == 'DisruptionTarget' and c.get('status') == 'True' for c in conditions
        )
        failure = PodFailure(pod['metadata']['name'], term['exitCode'], term.get('reason', ''),
                             disrupted)  # fmt: skip
        failures.append((term.get('finishedAt', ''), failure))
  return min(failures, key=lambda f: f[0])[1] if failures else None


def pod_log_tail(cloud: CloudConfig, pod: str, call: Call, lines: int = 20) -> list[str]:
  argv = ('kubectl', 'logs', pod, '-n', cloud.namespace, '-c', CONTAINER, f'--tail={lines}')
  result = call(Command(argv, "the failing pod's last lines"))
  return (result.stdout if result.returncode == 0 else result.stderr).rstrip().splitlines()


_FAILED_STEP = re.compile(r'^\[(?P<plan>[^\]]*)/(?P<step>[^/\]]+)\] FAILED', re.M)


def failed_step(plan: JobSetPlan, log_lines: Sequence[str], done: set[str]) -> str:
  """The step that failed: from the step runner's 'FAILED' line, else the first unfinished one."""
  for line in reversed(log_lines):
    match = _FAILED_STEP.search(line)
    if match:
      return match.group('step')
  for job in plan.jobs:
    if job.output and job.output not in done:
      return job.kind
  return '?'


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
