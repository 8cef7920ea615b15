r"""Launches the experiment suite on Cloud TPU slices (GKE + JobSet), or rehearses it on this CPU.

  # the paper's main table: 18 JobSets (train, then eval carried and reset on the final checkpoint)
  python -m xm_launch.launch --sweep=main --accelerator=v5e --topology=4x8 \
    --project=P --zone=Z --cluster=C --model_dir_root=gs://BUCKET/melodi [--image=IMAGE] \
    [--gin.NAME=VALUE ...] [--seeds=0,1,2] [--dry_run] [--manifest_dir=DIR] [--status]
  # the data stage first: the prepared splits the paper sweeps read (<root>/prepared by default)
  python -m xm_launch.launch --sweep=prepare --task=pg19_t5 --accelerator=v5e ... \
    --gin.tasks.Pg19T5Config.data_dir="'gs://BUCKET/tfds'"
  # an ablation family, the timing benchmarks, one experiment file
  python -m xm_launch.launch --sweep=coverage ...
  python -m xm_launch.launch --sweep=timing --accelerator=v6e ...
  python -m xm_launch.launch --experiment=gin/experiments/main/pg19_t5_xl.gin ...
  # local rehearsal on this machine's CPU (tiny models, the same step runner, then the tables)
  python -m xm_launch.launch --sweep=main --size=tiny --task=local_books --local \
    --model_dir_root=/tmp/melodi_rehearsal

One JobSet per experiment (and seed): one slice, one pod per TPU VM, every pod running the step
runner (`xm_launch.steps`), which skips steps whose output exists. Runs land in
`<model_dir_root>/<sweep>/<experiment>[/seed<N>]`. `--dry_run` contacts nothing: it writes the
manifests, prints a summary, each JobSet's steps and the commands a real launch runs.
"""

from __future__ import annotations

import os
import shlex
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence

from absl import app, flags

from melodi_t5x import experiments, t5x_gin
from xm_launch import gke
from xm_launch import jobs as jobs_lib
from xm_launch import schema as schema_lib
from xm_launch import steps as steps_lib

_SWEEP = flags.DEFINE_string('sweep', None, f'one of {[*experiments.sweep_names(), "prepare"]}')
_EXPERIMENT = flags.DEFINE_string('experiment', None, 'one committed experiment gin file')
_ROOT = flags.DEFINE_string('model_dir_root', None, 'runs go to <root>/<sweep>/<experiment>')
_ACCELERATOR = flags.DEFINE_enum('accelerator', 'v5e', sorted(jobs_lib.ACCELERATORS), 'TPU type')
_TOPOLOGY = flags.DEFINE_string('topology', None, 'TPU slice topology (default: 32 cores)')
_TIMING_TOPOLOGY = flags.DEFINE_string('timing_topology', None, 'slice of the timing sweep')
_EVAL = flags.DEFINE_bool('eval', True, 'eval steps on the final checkpoint of each run')
_EVAL_MODES = flags.DEFINE_list('eval_modes', list(experiments.MEMORY_MODES), 'memory modes')
_GIN_BINDINGS = flags.DEFINE_multi_string(
  'gin_bindings', [], "extra gin binding 'NAME = VALUE' (all steps); or --gin.NAME=VALUE"
)
_BINDINGS = flags.DEFINE_multi_string('binding', [], 'deprecated spelling of --gin_bindings')
_SEEDS = flags.DEFINE_string(
  'seeds',
  '0',
  'replicate seeds, e.g. 0,1,2: with more than one (or one other than 0) each run '
  'goes to <run dir>/seed<N> with RANDOM_SEED=DATA_SEED=N',
)
_TRAIN_STEPS = flags.DEFINE_integer('train_steps', None, 'override TRAIN_STEPS')
_SIZE = flags.DEFINE_enum('size', 'paper', sorted(experiments.SCALES), 'model size of the sweep')
_TASK = flags.DEFINE_string('task', None, 'task of --sweep=prepare, or of a --size=tiny sweep')
_PREPARED = flags.DEFINE_bool(
  'prepared', None, 'read prepared splits (default: yes for paper sweeps, no for tiny ones)'
)
_PREPARED_ROOT = flags.DEFINE_string(
  'prepared_root', None, 'root of the prepared splits (default <model_dir_root>/prepared)'
)
_PREPARE_WORKERS = flags.DEFINE_integer(
  'prepare_workers', None, '--sweep=prepare: workers per split (default: the pods of the slice)'
)
_LOCAL = flags.DEFINE_bool('local', False, 'run the steps here, one chain after another (CPU)')
_DRY_RUN = flags.DEFINE_bool('dry_run', False, 'write the manifests, print; contact nothing')
_STATUS = flags.DEFINE_bool('status', False, "list the sweep's JobSets and their finished steps")
_MANIFEST_DIR = flags.DEFINE_string('manifest_dir', None, 'where manifests go (default: a tmp dir)')
_PROJECT = flags.DEFINE_string('project', None, 'Google Cloud project')
_ZONE = flags.DEFINE_string('zone', None, 'zone of the TPU node pools')
_CLUSTER = flags.DEFINE_string('cluster', None, 'GKE cluster')
_CLUSTER_LOCATION = flags.DEFINE_string(
  'cluster_location', '', "cluster location for get-credentials (default: the zone's region)"
)
_NAMESPACE = flags.DEFINE_string('namespace', 'default', 'Kubernetes namespace')
_QUEUE = flags.DEFINE_string('queue', gke.DEFAULT_QUEUE, "Kueue LocalQueue ('' : none)")
_IMAGE = flags.DEFINE_string('image', None, 'job image (default: build this commit)')
_REGISTRY = flags.DEFINE_string(
  'registry', '', 'Artifact Registry repository (default <region>-docker.pkg.dev/<project>/melodi)'
)
_BASE_IMAGE = flags.DEFINE_string('base_image', jobs_lib.BASE_IMAGE, 'base of the job image')
_MAX_RESTARTS = flags.DEFINE_integer(
  'max_restarts',
  gke.DEFAULT_MAX_RESTARTS,
  'JobSet restarts after a crash (signal exits); disruptions and preemptions do not count, '
  'application errors fail at once',
)
_PRIORITY_CLASS = flags.DEFINE_string(
  'priority_class', gke.DEFAULT_PRIORITY_CLASS, "PriorityClass of the pods ('' : none), as xpk"
)
_CHECK_NODES = flags.DEFINE_bool('check_nodes', True, "preflight: the slice's nodes exist")
_SKIP_POD_PREFLIGHT = flags.DEFINE_bool(
  'skip_pod_preflight', False, 'skip the preflight Job (reads the splits as the pods would)'
)
_RECREATE_FAILED = flags.DEFINE_bool(
  'recreate_failed', False, 'delete and recreate the Failed JobSets of the sweep'
)
_STATUS_LINES = flags.DEFINE_integer('status_lines', 20, '--status: log lines of a failed pod')
_NAME_PREFIX = flags.DEFINE_string('name_prefix', 'melodi', 'prefix of the JobSet names')
_EMIT = flags.DEFINE_enum(
  'emit', 'jobset', ['jobset', 'tpu-vm'], 'tpu-vm: print queued-resource + ssh commands instead'
)
_SPOT = flags.DEFINE_bool('spot', False, '--emit=tpu-vm: spot TPU VMs')


def prepared_root() -> str | None:
  """Where training reads prepared splits from (None: on the fly)."""
  use = _PREPARED.value
  if use is None:
    use = _SIZE.value == 'paper' or bool(_PREPARED_ROOT.value) or _SWEEP.value == 'prepare'
  if not use:
    return None
  return _PREPARED_ROOT.value or f'{(_ROOT.value or "").rstrip("/")}/prepared'


def slices() -> tuple[gke.TpuSlice, gke.TpuSlice]:
  accelerator = _ACCELERATOR.value
  train = gke.tpu_slice(accelerator, _TOPOLOGY.value or jobs_lib.ACCELERATORS[accelerator])
  timing = gke.tpu_slice(
    accelerator, _TIMING_TOPOLOGY.value or jobs_lib.TIMING_TOPOLOGY[accelerator]
  )
  return train, timing


def build_jobs() -> list[jobs_lib.JobSpec]:
  """The steps described by the command-line flags."""
  local = _LOCAL.value
  train_slice, timing_slice = (None, None) if local else slices()
  if not local:
    if _SWEEP.value != 'prepare':
      jobs_lib.check_topology(_ACCELERATOR.value, train_slice.topology)
    if _SIZE.value != 'paper':
      raise ValueError(
        '--size=tiny runs exist only as files generated under the local model_dir_root; add '
        '--local (or use the committed paper-size sweeps on TPU).'
      )
  workers = _PREPARE_WORKERS.value or (1 if local else train_slice.hosts)
  return jobs_lib.sweep_jobs(
    _ROOT.value,
    sweep=_SWEEP.value,
    experiment=_EXPERIMENT.value,
    size=_SIZE.value,
    task=_TASK.value,
    eval_modes=_EVAL_MODES.value if _EVAL.value else (),
    bindings=gin_bindings(),
    train_steps=_TRAIN_STEPS.value,
    seeds=jobs_lib.parse_seeds(_SEEDS.value),
    topology='cpu' if local else train_slice.topology,
    timing_topology='cpu' if local else timing_slice.topology,
    prepared_root=prepared_root(),
    prepare_workers=workers,
  )


def cloud_config() -> gke.CloudConfig:
  return gke.CloudConfig(
    project=_PROJECT.value or '',
    zone=_ZONE.value or '',
    cluster=_CLUSTER.value or '',
    cluster_location=_CLUSTER_LOCATION.value,
    namespace=_NAMESPACE.value,
    queue=_QUEUE.value,
    registry=_REGISTRY.value,
    check_nodes=_CHECK_NODES.value,
  )


def image_name(cloud: gke.CloudConfig) -> tuple[str, bool]:
  """(image, whether a launch builds it): --image, else <registry>/melodi-t5x:<commit>."""
  if _IMAGE.value:
    return _IMAGE.value, False
  return f'{cloud.image_repository()}/melodi-t5x:{gke.git_commit()}', True


def settings(image: str) -> gke.SliceSettings:
  return gke.SliceSettings(
    image=image,
    queue=_QUEUE.value,
    max_restarts=_MAX_RESTARTS.value,
    priority_class=_PRIORITY_CLASS.value,
    model_root=_ROOT.value or '',
    prefix=_NAME_PREFIX.value,
  )


def jobsets(jobs: Sequence[jobs_lib.JobSpec], image: str) -> list[gke.JobSetPlan]:
  train_slice, timing_slice = slices()
  plans = gke.build_jobsets(
    jobs, train_slice=train_slice, timing_slice=timing_slice, settings=settings(image)
  )
  for p in plans:
    schema_lib.validate(p.manifest)
  return plans


def sweep_slice() -> gke.TpuSlice:
  """The slice the sweep's JobSets run on."""
  train_slice, timing_slice = slices()
  return timing_slice if _SWEEP.value == 'timing' else train_slice


def prepared_reads() -> list[str]:
  """The prepared splits' meta.json files the sweep reads (none for timing and prepare)."""
  if _SWEEP.value == 'prepare':
    return []
  tasks = jobs_lib.sweep_tasks(_SWEEP.value, _EXPERIMENT.value, _SIZE.value)
  return gke.prepared_markers(prepared_root(), tasks)


def pod_preflight_job(image: str, name: str) -> dict:
  """The preflight Job of a launch (its marker goes to <model_dir_root>/preflight/)."""
  marker = f'{_ROOT.value.rstrip("/")}/preflight/{name}.json'
  manifest = gke.preflight_job_manifest(
    name,
    sweep_slice(),
    settings(image),
    reads=prepared_reads(),
    marker=marker,
    namespace=_NAMESPACE.value,
  )
  schema_lib.validate_job(manifest)
  return manifest


def preflight_job_name() -> str:
  return gke.dns_label(f'{_NAME_PREFIX.value}-preflight-{int(time.time()):x}', 52)


def summary(jobs: Sequence[jobs_lib.JobSpec], plans: Sequence[gke.JobSetPlan]) -> str:
  """'54 steps (18 train) -> 18 JobSets on v5e 4x8: 8 pods x google.com/tpu 4'."""
  tpu = sweep_slice()
  trains = sum(j.kind == 'train' for j in jobs)
  return f'{len(jobs)} steps ({trains} train) -> {len(plans)} JobSets on {tpu.summary()}'


def print_plan(
  jobs: Sequence[jobs_lib.JobSpec],
  plans: Sequence[gke.JobSetPlan],
  paths: Sequence[str],
  cloud: gke.CloudConfig,
  image: str,
  build: bool,
  manifest_dir: str,
) -> None:
  """The dry-run text: summary, the steps of each JobSet, the commands of a real launch."""
  print(summary(jobs, plans))
  print(f'manifests: {manifest_dir} ({len(paths)} files, schema {schema_lib.SCHEMA_PATH})')
  print(f'image: {image}' + (' (built by the launch)' if build else ''))
  root = prepared_root()
  if root and prepared_reads():
    print(f'data: prepared splits under {root} (tasks.PreparedDataConfig.root)')
  for p in plans:
    pods = p.manifest['spec']['replicatedJobs'][0]['template']['spec']['parallelism']
    print(f'\n[{p.name}] {p.group}: {pods} pods')
    for i, job in enumerate(p.jobs, 1):
      who = '' if job.worker is None else f' (pod {job.worker} only)'
      print(f'  {i}. {job.kind}{who}: {job.shell()}')
      if job.output:
        print(f'     done when: {job.output}')
  print('\na real launch runs (nothing was contacted):')
  for cmd in launch_plan_commands(cloud, image, build, plans, paths):
    print(f'  {cmd.shell()}    # {cmd.purpose}')
  tpu = sweep_slice()
  if _SWEEP.value == 'timing' and cloud.queue:
    print(
      f'\nthe timing slice ({tpu.summary()}) is not the shape of an xpk cluster of '
      f'{jobs_lib.ACCELERATORS[tpu.accelerator]} slices; add it once (preflight checks it):'
    )
    for cmd in gke.extra_slice_commands(cloud, tpu):
      print(f'  {cmd.shell()}    # {cmd.purpose}')


def launch_plan_commands(
  cloud: gke.CloudConfig,
  image: str,
  build: bool,
  plans: Sequence[gke.JobSetPlan],
  paths: Sequence[str],
) -> list[gke.Command]:
  """The commands of a real launch, in order (those of the preflight as it reads them)."""
  commands = []
  if build:
    commands += gke.image_commands(cloud, image, '<git archive HEAD + Dockerfile>')
  commands.append(gke.credential_command(cloud))
  commands += gke.preflight_commands(
    cloud, [sweep_slice()], prepared_reads(), _PRIORITY_CLASS.value
  )
  if not _SKIP_POD_PREFLIGHT.value:
    job = pod_preflight_job(image, preflight_job_name())
    commands.append(
      gke.Command(
        ('kubectl', 'create', '-n', cloud.namespace, '-f', '-'),
        'the preflight Job: '
        + shlex.join(job['spec']['template']['spec']['containers'][0]['command']),
      )
    )
  commands.append(gke.jobsets_command(cloud, gke.sweep_selector(plans)))
  commands += [gke.create_command(cloud, path) for path in paths]
  return commands


def print_tpu_vm(jobs, plans, cloud: gke.CloudConfig, image: str, build: bool) -> None:
  """The TPU-VM fallback: per JobSet, a queued resource, the step runner over ssh, delete."""
  train_slice, timing_slice = slices()
  tpu = timing_slice if _SWEEP.value == 'timing' else train_slice
  trains = sum(j.kind == 'train' for j in jobs)
  print(
    f'{len(jobs)} steps ({trains} train) -> {len(plans)} TPU VM slices of {tpu.accelerator} '
    f'{tpu.topology} ({tpu.hosts} workers x {tpu.chips_per_host} chips)'
  )
  print('TPU-VM fallback: nothing is run; run these yourself (docs/experiments.md).')
  if build:
    print('# the job image (once):')
    for cmd in gke.image_commands(cloud, image, '<git archive HEAD + Dockerfile>')[1:]:
      print(f'  {cmd.shell()}')
  for p in plans:
    tpu = timing_slice if p.group == 'timing' else train_slice
    print(f'\n# [{p.name}] {p.group}: ' + ', '.join(j.kind for j in p.jobs))
    for cmd in gke.tpu_vm_commands(p, tpu, cloud, image, spot=_SPOT.value):
      print(f'  {cmd.shell()}    # {cmd.purpose}')


def run_gke(jobs: Sequence[jobs_lib.JobSpec]) -> None:
  cloud = cloud_config()
  gke.check_cloud_config(cloud)
  image, build = image_name(cloud)
  plans = jobsets(jobs, image)
  manifest_dir = _MANIFEST_DIR.value or tempfile.mkdtemp(prefix='melodi-jobsets-')
  if _EMIT.value == 'tpu-vm':
    print_tpu_vm(jobs, plans, cloud, image, build)
    return
  paths = gke.write_manifests(plans, manifest_dir)
  if _DRY_RUN.value:
    print_plan(jobs, plans, paths, cloud, image, build, manifest_dir)
    return
  if build:
    dirty = gke.uncommitted_changes()
    if dirty:
      print(f'note: {len(dirty)} uncommitted changes are not in the image (it is built from HEAD)')
  status = gke.launch(
    plans,
    paths,
    cloud,
    tpus=[sweep_slice()],
    image=image,
    build=build,
    priority_class=_PRIORITY_CLASS.value,
    prepared=prepared_reads(),
    pod_preflight=None
    if _SKIP_POD_PREFLIGHT.value
    else pod_preflight_job(image, preflight_job_name()),
    recreate_failed=_RECREATE_FAILED.value,
    make_context=lambda: gke.build_context(jobs_lib.dockerfile(_BASE_IMAGE.value)),
  )
  counts = {k: sum(v == k for v in status.values()) for k in ('created', 'recreated', 'exists')}
  failed = sorted(name for name, v in status.items() if v == 'failed')
  line = f'{summary(jobs, plans)}: {counts["created"]} created, '
  if counts['recreated']:
    line += f'{counts["recreated"]} Failed ones recreated, '
  print(line + f'{counts["exists"]} already there, {len(failed)} Failed')
  if failed:
    print(
      f'Failed JobSets, left as they are: {", ".join(failed)}\n'
      '  why: python -m xm_launch.launch --status (same flags); to run them again, fix the cause '
      'and re-launch with --recreate_failed'
    )
  print(
    'monitor: python -m xm_launch.launch --status (same flags); kubectl get jobsets -l '
    + shlex.quote(gke.sweep_selector(plans))
  )


def print_status(jobs: Sequence[jobs_lib.JobSpec]) -> None:
  """The sweep's JobSets on the cluster, the steps done, and why the Failed ones failed.

  Outputs on GCS are looked up with the gcloud CLI (`gcloud storage ls`), not TensorFlow.
  """
  cloud = cloud_config()
  gke.check_cloud_config(cloud)
  plans = jobsets(jobs, image='(status)')
  call = gke.caller(log=None)
  call(gke.credential_command(cloud))
  states = gke.jobset_states(cloud, gke.sweep_selector(plans), call)
  done = gke.existing_paths((j.output for j in jobs), call)
  finished = 0
  for p in plans:
    state = states.get(p.name, {'state': 'not submitted', 'restarts': 0, 'counted': 0})
    finished += all(j.output in done for j in p.jobs)
    steps = ' '.join(f'{j.kind}:{"done" if j.output in done else "-"}' for j in p.jobs)
    restarts = f'restarts={state["restarts"]} ({state["counted"]} counted)'
    print(f'{p.name:42s} {state["state"]:20s} {restarts:22s} {steps}')
    if state['state'] == 'Failed':
      print_failure(cloud, call, p, state, done)
  print(f'{finished} of {len(plans)} JobSets have every step done')


def print_failure(cloud, call, plan: gke.JobSetPlan, state: dict, done: set[str]) -> None:
  """The failed step and the failing pod's last log lines, indented under the JobSet."""
  if state.get('message'):
    print(f'  JobSet: {state["message"]}')
  pod = gke.failing_pod(cloud, plan.name, call)
  if pod is None:
    print(f'  failed step: {gke.failed_step(plan, [], done)} (no failed pod is left to read)')
    return
  lines = gke.pod_log_tail(cloud, pod.pod, call, _STATUS_LINES.value)
  why = f'exit code {pod.exit_code}' + (f' ({pod.reason})' if pod.reason else '')
  why += ', node disruption' if pod.disrupted else ''
  print(f'  failed step: {gke.failed_step(plan, lines, done)}; pod {pod.pod}: {why}')
  print(f'  last {len(lines)} log lines (kubectl logs {pod.pod} --tail={_STATUS_LINES.value}):')
  for line in lines:
    print(f'    {line}')


def run_local(jobs: Sequence[jobs_lib.JobSpec]) -> list[str]:
  """Runs each group's steps here with the step runner (tiny experiment files written first).

  A failed step stops its group (the later steps of that experiment are not run); the other
  groups still run. Returns the groups that failed.
  """
  env_path = os.pathsep.join([jobs_lib.REPO_ROOT, os.environ.get('PYTHONPATH', '')])
  os.environ['PYTHONPATH'] = env_path
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  exps = {}
  if _SWEEP.value and _SWEEP.value not in ('timing', 'prepare'):
    for exp in experiments.sweep(_SWEEP.value, size=_SIZE.value, dataset=_TASK.value):
      exps[jobs_lib.run_dir(_ROOT.value, exp)] = exp
  failed = []
  for group, members in jobs_lib.groups(jobs).items():
    for job in members:
      os.makedirs(job.model_dir, exist_ok=True)
    if _SIZE.value != 'paper':
      for run_dir, exp in exps.items():
        if any(j.model_dir.startswith(run_dir) for j in members):
          with open(os.path.join(run_dir, 'experiment.gin'), 'w') as f:
            f.write(experiments.render(exp))
    plan = jobs_lib.plan(group, members)
    logs = {j.kind: _log_path(j) for j in members}

    def run(step, worker, logs=logs):
      log = logs[step.name]
      print(f'  log: {log}', flush=True)
      return steps_lib.run_subprocess(
        steps_lib.module_command(step, worker), log, cwd=jobs_lib.REPO_ROOT
      )

    rc = steps_lib.run_plan(plan, run=run, log=lambda line: print(line, flush=True))
    if rc:
      failed.append(group)
  return failed


def _log_path(job: jobs_lib.JobSpec) -> str:
  # Timing jobs share one directory: their logs are named by model and step.
  stem = job.name.split('/', 1)[1].replace('/', '_') if job.kind.startswith('timing_') else job.kind
  return os.path.join(job.model_dir, f'{stem}.log')


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  jobs = build_jobs()
  if _LOCAL.value:
    if _DRY_RUN.value:
      for group, members in jobs_lib.groups(jobs).items():
        print(f'[{group}]')
        for job in members:
          print(f'  {job.kind}: {job.shell()}')
      return
    failed = run_local(jobs)
    if _SWEEP.value and _SWEEP.value != 'prepare':
      from melodi_t5x.tools import paper_tables  # pylint: disable=g-import-not-at-top

      argv = [f'--sweep={_SWEEP.value}', f'--model_dir_root={_ROOT.value}']
      argv += [f'--size={_SIZE.value}'] + ([f'--task={_TASK.value}'] if _TASK.value else [])
      if _TRAIN_STEPS.value:
        argv.append(f'--train_steps={_TRAIN_STEPS.value}')
      paper_tables.main(argv)
    if failed:
      raise SystemExit(f'{len(failed)} experiments stopped at a failed step: {failed}')
  elif _STATUS.value:
    print_status(jobs)
  else:
    try:
      run_gke(jobs)
    except gke.LaunchError as e:
      print(f'launch stopped: {e}', file=sys.stderr)
      raise SystemExit(1) from None


def gin_bindings() -> list[str]:
  """--gin_bindings and --gin.NAME=VALUE, then the deprecated --binding, as NAME=VALUE."""
  if _BINDINGS.value:
    warnings.warn(
      '--binding is deprecated and will be removed in the next release: write --gin.NAME=VALUE '
      'or --gin_bindings="NAME = VALUE" (as t5x.train).',
      FutureWarning,
      stacklevel=2,
    )
  return [t5x_gin.normalize_binding(b) for b in [*_GIN_BINDINGS.value, *_BINDINGS.value]]


if __name__ == '__main__':
  app.run(main, argv=t5x_gin.rewrite_gin_args(sys.argv))
