"""The GKE backend without a cloud: manifests of every sweep on every accelerator, the JobSet
schema (with a negative case per kind of error), the failure policy run through the Job and
JobSet controllers' documented rules, the dry run, and real launches against fake `gcloud` /
`kubectl` executables (`fake_cloud.py`: a cluster in a JSON file, a bucket in a folder).

In-process (the launcher's flags are parsed in this process); the fakes, the pod preflight they
run, and the compilation-cache check are processes.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys

import fake_cloud as fake_cloud_lib
import needs
import pytest
from absl import flags

from melodi_t5x import experiments
from xm_launch import gke, launch, schema, steps
from xm_launch import jobs as jobs_lib

REPO = experiments.REPO_ROOT
ROOT = 'gs://b/melodi'
# The slices of the issue (xpk 1.16.0 system_characteristics, confirmed by its --dry-run):
# accelerator -> (topology, node label, machine type, pods, google.com/tpu per pod).
SLICES = {
  'v5e': ('4x8', 'tpu-v5-lite-podslice', 'ct5lp-hightpu-4t', 8, 4),
  'v4': ('2x2x4', 'tpu-v4-podslice', 'ct4p-hightpu-4t', 4, 4),
  'v6e': ('4x8', 'tpu-v6e-slice', 'ct6e-standard-4t', 8, 4),
  'v5p': ('2x2x4', 'tpu-v5p-slice', 'ct5p-hightpu-4t', 4, 4),
}
SWEEPS = [*experiments.sweep_names(), 'prepare']
DNS_1035 = re.compile(r'^[a-z]([-a-z0-9]*[a-z0-9])?$')


def _train_steps_of(gin_file: str) -> int:
  """TRAIN_STEPS of an experiment file, read from the run file it includes (not from Python)."""
  text = open(os.path.join(REPO, gin_file)).read()
  [run] = re.findall(r"include '(gin/experiments/runs/\w+\.gin)'", text)
  [steps_text] = re.findall(r'^TRAIN_STEPS = (\d+)$', open(os.path.join(REPO, run)).read(), re.M)
  return int(steps_text)


def _plan_of(manifest):
  [rjob] = manifest['spec']['replicatedJobs']
  [container] = rjob['template']['spec']['template']['spec']['containers']
  cmd = container['command']
  runner = ['python', '-m', 'xm_launch.runner', '--']
  assert cmd[:7] == [*runner, 'python', '-m', 'xm_launch.steps'] and cmd[-1].startswith('--plan=')
  return steps.Plan.from_json(cmd[-1][len('--plan=') :]), container, rjob


def _sweep_jobsets(sweep, accelerator, seeds=(0,)):
  topology = SLICES[accelerator][0]
  train = gke.tpu_slice(accelerator, topology)
  timing = gke.tpu_slice(accelerator, jobs_lib.TIMING_TOPOLOGY[accelerator])
  jobs = jobs_lib.sweep_jobs(
    ROOT,
    sweep=sweep,
    task='pg19_t5' if sweep == 'prepare' else None,
    seeds=seeds,
    topology=topology,
    timing_topology=timing.topology,
    prepared_root=f'{ROOT}/prepared',
    prepare_workers=train.hosts,
  )
  settings = gke.SliceSettings(image='img:1', model_root=ROOT)
  return jobs, gke.build_jobsets(jobs, train_slice=train, timing_slice=timing, settings=settings)


def test_slice_table_matches_xpk():
  for accelerator, (topology, label, machine, pods, chips) in SLICES.items():
    tpu = gke.tpu_slice(accelerator, topology)
    assert (tpu.gke_accelerator, tpu.machine_type, tpu.hosts, tpu.chips_per_host) == (
      label, machine, pods, chips,
    )  # fmt: skip
  # xpk 1.16.0's other slices (get_tpu_system_characteristics_map: a 1-chip slice is one VM of
  # 1 chip, any other VMs of 4): (accelerator, topology) -> (machine type, pods, chips per pod).
  xpk = {
    ('v5e', '2x4'): ('ct5lp-hightpu-4t', 2, 4),  # v5litepod-8
    ('v6e', '2x4'): ('ct6e-standard-4t', 2, 4),  # v6e-8
    ('v6e', '1x1'): ('ct6e-standard-1t', 1, 1),  # v6e-1
    ('v6e', '2x2'): ('ct6e-standard-4t', 1, 4),  # v6e-4
    ('v5e', '4x4'): ('ct5lp-hightpu-4t', 4, 4),  # v5litepod-16
    ('v5e', '16x16'): ('ct5lp-hightpu-4t', 64, 4),  # v5litepod-256
    ('v4', '2x2x1'): ('ct4p-hightpu-4t', 1, 4),  # v4-8
    ('v4', '2x2x2'): ('ct4p-hightpu-4t', 2, 4),  # v4-16
    ('v5p', '2x2x1'): ('ct5p-hightpu-4t', 1, 4),  # v5p-8
    ('v5p', '2x4x4'): ('ct5p-hightpu-4t', 8, 4),  # v5p-64
  }
  for (accelerator, topology), expected in xpk.items():
    tpu = gke.tpu_slice(accelerator, topology)
    assert (tpu.machine_type, tpu.hosts, tpu.chips_per_host) == expected, (accelerator, topology)
  # GKE's single-host v5e slices (not in xpk): one VM of 1 or 4 chips.
  assert gke.tpu_slice('v5e', '1x1').machine_type == 'ct5lp-hightpu-1t'
  assert (gke.tpu_slice('v5e', '2x2').hosts, gke.tpu_slice('v5e', '2x2').chips_per_host) == (1, 4)
  # Every accepted slice: 1 chip per pod only for 1x1, else 4; pods x chips = the topology's.
  for tpu in gke.slice_table():
    dims = [int(d) for d in tpu.topology.split('x')]
    assert tpu.chips_per_host == (1 if dims == [1, 1] else 4), tpu
    assert tpu.hosts * tpu.chips_per_host == eval('*'.join(map(str, dims))), tpu
    assert tpu.machine_type.endswith(f'-{tpu.chips_per_host}t'), tpu
  with pytest.raises(ValueError, match='v4 topologies are'):
    gke.tpu_slice('v4', '4x8')
  with pytest.raises(ValueError, match='v5e topologies are 1x1, 2x2, 2x4'):
    gke.tpu_slice('v5e', '4x6')
  with pytest.raises(ValueError, match='must be one of'):
    gke.tpu_slice('v3', '4x4')


@pytest.mark.parametrize('accelerator', sorted(SLICES))
@pytest.mark.parametrize('sweep', SWEEPS)
def test_manifest_invariants(sweep, accelerator):
  jobs, plans = _sweep_jobsets(sweep, accelerator)
  topology, label, _, pods, chips = SLICES[accelerator]
  if sweep == 'timing':
    tpu = gke.tpu_slice(accelerator, jobs_lib.TIMING_TOPOLOGY[accelerator])
    topology, pods, chips = tpu.topology, 1, tpu.chips_per_host
  names = [p.name for p in plans]
  assert len(set(names)) == len(names)
  assert sum(len(p.jobs) for p in plans) == len(jobs)
  for p in plans:
    m = p.manifest
    assert schema.errors(m) == [], p.name
    assert DNS_1035.match(m['metadata']['name']) and len(m['metadata']['name']) <= 40
    for pod in gke.pod_names(m):  # + '-' and 5 random characters
      assert DNS_1035.match(pod) and len(pod) + 6 <= 63, pod
    labels = m['metadata']['labels']
    assert labels['kueue.x-k8s.io/queue-name'] == 'multislice-queue'
    # A run another family trains (a shared entry, `Experiment.alias`) keeps that family's label.
    assert labels['melodi-t5x/sweep'] == p.group.split('/')[0]
    if sweep in ('timing', 'prepare'):
      assert labels['melodi-t5x/sweep'] == sweep
    else:
      assert labels['melodi-t5x/sweep'] in {e.sweep for e in experiments.sweep(sweep)}
    if sweep not in ('timing', 'prepare'):
      assert labels['melodi-t5x/experiment'] == p.group.split('/')[1]
    annotations = m['metadata']['annotations']
    assert (
      annotations['alpha.jobset.sigs.k8s.io/exclusive-topology'] == 'cloud.google.com/gke-nodepool'
    )
    plan, container, rjob = _plan_of(m)
    job = rjob['template']['spec']
    pod = job['template']['spec']
    # One slice: one Job, one pod per host, every pod the same command (one template).
    assert rjob['replicas'] == 1
    assert job['parallelism'] == job['completions'] == pods
    assert job['completionMode'] == 'Indexed' and pod['restartPolicy'] == 'Never'
    assert container['resources']['limits'] == {'google.com/tpu': chips}
    assert pod['nodeSelector'] == {
      'cloud.google.com/gke-tpu-accelerator': label,
      'cloud.google.com/gke-tpu-topology': topology,
    }
    assert pod['hostNetwork'] is True and container['securityContext']['privileged'] is True
    assert ('--distributed' in container['command']) == (pods > 1)
    # Admissible next to xpk workloads, tolerated on TPU nodes, /dev/shm in memory, the
    # compilation cache under the model root, a grace period for the emergency checkpoint.
    assert pod['priorityClassName'] == 'medium'
    assert {'key': 'google.com/tpu', 'operator': 'Exists', 'effect': 'NoSchedule'} in pod[
      'tolerations'
    ]
    [volume] = pod['volumes']
    assert volume['emptyDir'] == {'medium': 'Memory'}
    assert container['volumeMounts'] == [{'name': volume['name'], 'mountPath': '/dev/shm'}]
    assert {'name': 'JAX_COMPILATION_CACHE_DIR', 'value': f'{ROOT}/jax_cache'} in container['env']
    assert pod['terminationGracePeriodSeconds'] == 120
    assert m['spec']['ttlSecondsAfterFinished'] == 3 * 24 * 3600
    assert m['spec']['failurePolicy']['maxRestarts'] == gke.DEFAULT_MAX_RESTARTS
    assert plan == jobs_lib.plan(p.group, p.jobs)
    _check_steps(sweep, plan, pods)


def _job_failure(job, exit_code, conditions=()):
  """The batch/v1 Job controller on one failed pod: (Job failure reason, message).

  Rules in order, the first match wins (an exit-code rule: the code is In / NotIn its values; a
  condition rule: the pod has the condition); its message is the controller's format string
  (pkg/controller/job/pod_failure_policy.go). No match: the failure counts towards backoffLimit,
  0 here, so the Job fails with BackoffLimitExceeded.
  """
  assert job['backoffLimit'] == 0
  for index, rule in enumerate(job['podFailurePolicy']['rules']):
    assert rule['action'] == 'FailJob'
    if 'onExitCodes' in rule:
      codes = rule['onExitCodes']
      assert codes['containerName'] == 'melodi'
      if (exit_code in codes['values']) == (codes['operator'] == 'In'):
        return 'PodFailurePolicy', (
          f'Container melodi for pod default/p failed with exit code {exit_code} matching '
          f'FailJob rule at index {index}'
        )
    else:
      for c in rule['onPodConditions']:
        if c['type'] in conditions and c['status'] == 'True':
          return 'PodFailurePolicy', (
            f'Pod default/p has condition {c["type"]} matching FailJob rule at index {index}'
          )
  return 'BackoffLimitExceeded', 'Job has reached the specified backoff limit'


def _jobset_action(policy, reason, message):
  """JobSet v0.10: the first rule whose reasons and message patterns match; else RestartJobSet."""
  for rule in policy['rules']:
    reasons = rule.get('onJobFailureReasons') or [reason]
    patterns = rule.get('onJobFailureMessagePatterns') or ['']
    if reason in reasons and any(re.search(p, message) for p in patterns):
      return rule['action']
  return 'RestartJobSet'


@pytest.mark.parametrize(
  'exit_code, conditions, action',
  [
    # Application errors fail at once: an exception, a usage error, the step runner's
    # configuration error, command not found.
    (1, (), 'FailJobSet'),
    (2, (), 'FailJobSet'),
    (steps.CONFIG_ERROR, (), 'FailJobSet'),
    (127, (), 'FailJobSet'),
    # The restart code and SIGTERM: restart, not counted.
    (42, (), 'RestartJobSetAndIgnoreMaxRestarts'),
    (143, (), 'RestartJobSetAndIgnoreMaxRestarts'),
    # A node disruption, whatever the exit code: restart, not counted.
    (137, ('DisruptionTarget',), 'RestartJobSetAndIgnoreMaxRestarts'),
    (1, ('DisruptionTarget',), 'RestartJobSetAndIgnoreMaxRestarts'),
    # Other signals (the OOM killer, a segfault, an abort): restart, counted.
    (137, (), 'RestartJobSet'),
    (139, (), 'RestartJobSet'),
    (134, (), 'RestartJobSet'),
  ],
)
def test_failure_policy_like_xpk(manifest, exit_code, conditions, action):
  assert gke.RESTART_EXIT_CODE == 42
  job = _job(manifest)
  reason, message = _job_failure(job, exit_code, conditions)
  assert _jobset_action(manifest['spec']['failurePolicy'], reason, message) == action


def _check_steps(sweep, plan, pods):
  kinds = [s.name for s in plan.steps]
  if sweep == 'timing':
    assert kinds == [f'timing_{s}' for _ in experiments.TIMING_MODELS for s in ('train', 'eval')]
    return
  if sweep == 'prepare':
    assert kinds == [
      *(f'prepare_{s}' for s in jobs_lib.SPLITS),
      *(f'finalize_{s}' for s in jobs_lib.SPLITS),
    ]
    for s in plan.steps:
      assert s.module == 'tasks.prepare' and not s.distributed
      if s.name.startswith('finalize'):  # pod 0 merges the parts of every pod
        assert s.worker == 0 and len(s.wait_for) == pods
      else:
        assert s.worker is None and '--worker={worker}' in s.args
    return
  assert kinds == ['train', 'eval_carried', 'eval_reset']
  train, *evals = plan.steps
  gin_files = [a.split('=', 1)[1] for a in train.args if a.startswith('--gin_file=')]
  assert gin_files[0] == 'gin/experiments/train.gin'
  for g in gin_files:
    assert os.path.exists(os.path.join(REPO, g)), g
  n = _train_steps_of(gin_files[1])
  model_dir = plan.steps[0].output.rsplit('/checkpoint_', 1)[0]
  assert train.output == f'{model_dir}/checkpoint_{n}/commit_success.txt'  # Orbax's marker
  assert train.done_if == f'{model_dir}/checkpoint_{n}/checkpoint'  # the legacy checkpointer's
  assert f'--gin.MODEL_DIR="{model_dir}"' in train.args
  assert f'--gin.tasks.PreparedDataConfig.root="{ROOT}/prepared"' in train.args
  for e in evals:
    mode = e.name[len('eval_') :]
    assert f'--gin.CHECKPOINT_PATH="{model_dir}/checkpoint_{n}"' in e.args
    assert f'--gin.MEMORY_MODE="{mode}"' in e.args
    assert e.args[:2] == ('--gin_file=gin/experiments/eval.gin', f'--gin_file={gin_files[1]}')
    assert re.fullmatch(rf'{re.escape(model_dir)}/eval/\w+_step{n}_{mode}\.json', e.output)


def test_eval_output_is_the_report_t5x_eval_writes():
  t5x_eval = needs.importorskip('melodi_t5x.t5x_eval')
  jobs = jobs_lib.sweep_jobs(ROOT, experiment='gin/experiments/main/c4_4k_xl.gin')
  for job in jobs[1:]:
    mode = job.kind[len('eval_') :]
    expected = t5x_eval.report_path(f'{job.model_dir}/eval', 'c4_4k', 500_000, mode)
    assert job.output == expected


def test_seeds_make_replicate_runs():
  jobs, plans = _sweep_jobsets('branching', 'v5e', seeds=(0, 1, 2))
  assert len(plans) == 3 * 3 and len(jobs) == 27
  names = {p.name for p in plans}
  assert 'melodi-branching-shared-seed2' in names
  for p in plans:
    seed = int(p.group.rsplit('seed', 1)[1])
    train = p.jobs[0]
    assert train.model_dir.endswith(f'/{p.group}') and p.group.endswith(f'/seed{seed}')
    assert f'RANDOM_SEED={seed}' in train.bindings and f'DATA_SEED={seed}' in train.bindings
    assert p.manifest['metadata']['labels']['melodi-t5x/seed'] == str(seed)
    assert all(j.model_dir == train.model_dir for j in p.jobs)
  # One seed other than 0 is a replicate too; the default keeps today's paths.
  [one] = jobs_lib.sweep_jobs(ROOT, sweep='long_layers', seeds=(3,), eval_modes=())[:1]
  assert one.model_dir == f'{ROOT}/memory_tradeoff/s128_l64/seed3'  # one_l64's run (shared)
  [default] = jobs_lib.sweep_jobs(ROOT, sweep='long_layers', eval_modes=())[:1]
  assert default.model_dir == f'{ROOT}/memory_tradeoff/s128_l64'
  assert 'RANDOM_SEED=0' in default.bindings and not any('DATA_SEED' in b for b in default.bindings)
  for bad in ('0,0', '-1', 'a', ''):
    with pytest.raises(ValueError, match='--seeds'):
      jobs_lib.parse_seeds(bad)


def test_long_names_are_shortened_uniquely():
  a = gke.jobset_name('memory_tradeoff/s192_l96_with_a_much_longer_name/seed12')
  b = gke.jobset_name('memory_tradeoff/s192_l96_with_a_much_longer_name/seed13')
  assert a != b and len(a) <= 40 and len(b) <= 40 and DNS_1035.match(a)
  assert gke.jobset_name('main/pg19_t5_xl') == 'melodi-main-pg19-t5-xl'


# -- schema: negative cases ------------------------------------------------------------------------


@pytest.fixture(scope='module')
def manifest():
  _, plans = _sweep_jobsets('main', 'v5e')
  return plans[0].manifest


def _container(m):
  return m['spec']['replicatedJobs'][0]['template']['spec']['template']['spec']['containers'][0]


def _job(m):
  return m['spec']['replicatedJobs'][0]['template']['spec']


@pytest.mark.parametrize(
  'mutate, expected',
  [
    # Unknown keys (misspellings the API server would drop silently).
    (lambda m: _container(m).update(imagePullPolicyy='Always'), 'imagePullPolicyy'),
    (lambda m: m['spec'].update(failurPolicy={}), 'failurPolicy'),
    (lambda m: _job(m)['template']['spec'].update(hostNetwrok=True), 'hostNetwrok'),
    # Wrong types and values.
    (lambda m: _job(m).update(parallelism='8'), "'8' is not of type 'integer'"),
    (lambda m: _job(m)['template']['spec'].update(hostNetwork='true'), "'true' is not of type"),
    (lambda m: _container(m)['resources']['limits'].update({'google.com/tpu': 'four'}), 'four'),
    (lambda m: m['spec']['failurePolicy']['rules'][0].update(action='Fail'), "'Fail' is not one"),
    (lambda m: m['metadata'].update(name='Melodi_Main'), 'Melodi_Main'),
    # Missing required fields.
    (lambda m: _container(m).pop('image'), "'image' is a required property"),
    (lambda m: _job(m).pop('template'), "'template' is a required property"),
    (lambda m: m['spec']['replicatedJobs'][0].pop('name'), "'name' is a required property"),
    # The failure-policy rule name, which JobSet's webhook would otherwise fill in.
    (lambda m: m['spec']['failurePolicy']['rules'][0].pop('name'), "'name' is a required"),
    # batch/v1 rules JSON Schema cannot state: ascending exit codes, no 0 with In.
    (
      lambda m: _job(m)['podFailurePolicy']['rules'][1]['onExitCodes'].update(values=[143, 42]),
      'ascending order',
    ),
    (
      lambda m: _job(m)['podFailurePolicy']['rules'][1]['onExitCodes'].update(values=[0, 42]),
      '0 is not allowed with In',
    ),
    # The pod's new fields.
    (lambda m: _job(m)['template']['spec']['tolerations'][0].update(operator='Exist'), 'Exist'),
    (
      lambda m: _job(m)['template']['spec']['volumes'][0]['emptyDir'].update(medium='memory'),
      "'memory' is not one of",
    ),
    (lambda m: _container(m)['volumeMounts'][0].pop('mountPath'), "'mountPath' is a required"),
  ],
)
def test_schema_rejects(manifest, mutate, expected):
  bad = copy.deepcopy(manifest)
  mutate(bad)
  found = schema.errors(bad)
  assert found and any(expected in e for e in found), found
  with pytest.raises(ValueError, match='does not match'):
    schema.validate(bad)


def test_schema_is_closed_everywhere():
  """Every object of the schema lists its keys (additionalProperties false) or is a map."""

  def walk(node, path):
    if isinstance(node, dict):
      if node.get('type') == 'object':
        closed = node.get('additionalProperties') is False
        is_map = isinstance(node.get('additionalProperties'), dict)
        assert closed or is_map, path
      for k, v in node.items():
        walk(v, f'{path}/{k}')
    elif isinstance(node, list):
      for i, v in enumerate(node):
        walk(v, f'{path}/{i}')

  walk(schema.schema(), '#')


# -- the CLI in this process -----------------------------------------------------------------------

CLOUD = ['--project=p', '--zone=us-east5-b', '--cluster=c', f'--model_dir_root={ROOT}']


def _launch(args, capsys):
  """Runs `python -m xm_launch.launch ARGS` in this process; returns (exit code, stdout)."""
  flags.FLAGS.unparse_flags()
  flags.FLAGS(['launch', *args])
  code = 0
  try:
    launch.main(['launch'])
  except SystemExit as e:
    code = e.code
  finally:
    flags.FLAGS.unparse_flags()
  out = capsys.readouterr()
  return code, out.out + out.err


@pytest.mark.parametrize(
  'accelerator, topology, summary',
  [
    ('v5e', '4x8', '54 steps (18 train) -> 18 JobSets on v5e 4x8: 8 pods x google.com/tpu 4'),
    ('v4', '2x2x4', '54 steps (18 train) -> 18 JobSets on v4 2x2x4: 4 pods x google.com/tpu 4'),
  ],
)
def test_dry_run(tmp_path, capsys, accelerator, topology, summary):
  args = ['--sweep=main', f'--accelerator={accelerator}', f'--topology={topology}', *CLOUD]
  code, out = _launch([*args, '--dry_run', f'--manifest_dir={tmp_path}', '--image=img:1'], capsys)
  assert code == 0, out
  assert out.splitlines()[0] == summary
  files = sorted(os.listdir(tmp_path))
  assert len(files) == 18
  for name in files:
    m = json.load(open(tmp_path / name))
    assert schema.errors(m) == [] and f'{m["metadata"]["name"]}.json' == name
  assert len(re.findall(r'^\[melodi-main-\S+\] main/\S+: \d+ pods$', out, re.M)) == 18
  assert len(re.findall(r'^  1\. train: python -m t5x\.train ', out, re.M)) == 18
  assert out.count('kubectl create -n default -f - < ') == 18
  assert 'gcloud container clusters get-credentials c --location=us-east5 --project=p' in out
  assert 'gcloud builds submit' not in out  # --image given: nothing to build


def test_dry_run_without_image_prints_the_build(tmp_path, capsys):
  code, out = _launch(['--sweep=long_layers', *CLOUD, '--dry_run'], capsys)
  assert code == 0, out
  commit = gke.git_commit()
  image = f'us-east5-docker.pkg.dev/p/melodi/melodi-t5x:{commit}'
  assert f'image: {image} (built by the launch)' in out
  assert f"gcloud builds submit '<git archive HEAD + Dockerfile>' --tag={image}" in out
  assert re.search(r'^manifests: /\S+ \(2 files', out, re.M)  # a temporary folder, printed


def test_bad_flags_raise_early(capsys):
  with pytest.raises(ValueError, match='--project, --cluster'):
    _launch(['--sweep=main', '--zone=z', f'--model_dir_root={ROOT}', '--dry_run'], capsys)
  with pytest.raises(ValueError, match='divide the batch'):
    _launch(['--sweep=main', '--accelerator=v5e', '--topology=8x8', *CLOUD, '--dry_run'], capsys)
  with pytest.raises(ValueError, match='needs --task'):
    _launch(['--sweep=prepare', *CLOUD, '--dry_run'], capsys)


# -- a real launch against fake gcloud / kubectl ---------------------------------------------------

TASKS = ('arxiv_math', 'c4_4k', 'pg19_t5')


@pytest.fixture
def fake_cloud(tmp_path, monkeypatch):
  """Fake gcloud / kubectl on PATH; an xpk v5e 4x8 cluster; the bucket gs://b in a folder, with
  the prepared splits of the main sweep's tasks. Returns (calls(), cluster(), edit(fn))."""
  bin_dir, state, bucket = tmp_path / 'bin', tmp_path / 'state', tmp_path / 'bucket'
  for d in (bin_dir, state, bucket):
    d.mkdir()
  fake_cloud_lib.install(str(bin_dir), str(state))
  monkeypatch.setenv('PATH', f'{bin_dir}{os.pathsep}{os.environ["PATH"]}')
  monkeypatch.setenv('FAKE_CLOUD', str(state))
  monkeypatch.setenv('FAKE_GCS', str(bucket))
  for task in TASKS:
    for split in jobs_lib.SPLITS:
      folder = bucket / 'melodi' / 'prepared' / task / split
      folder.mkdir(parents=True)
      (folder / 'index.npy').write_bytes(b'\x93NUMPY' + bytes(100))
      (folder / 'tokens-00000.bin').write_bytes(bytes(range(256)) * 20)
      (folder / 'meta.json').write_text(json.dumps({'shards': ['tokens-00000.bin']}))

  def calls():
    log = state / 'calls.jsonl'
    return [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []

  def cluster():
    return json.loads((state / 'cluster.json').read_text())

  def edit(fn):
    c = cluster()
    fn(c)
    (state / 'cluster.json').write_text(json.dumps(c))

  return calls, cluster, edit


def _kind(call):
  tool, argv = call['tool'], call['argv']
  if tool == 'kubectl':
    return 'kubectl ' + (argv[0] if argv[0] not in ('get',) else f'get {argv[1]}')
  return 'gcloud ' + ' '.join(argv[:2] if argv[0] != 'artifacts' else argv[:4])


def test_real_launch_against_fake_cloud(tmp_path, capsys, fake_cloud):
  calls_of, cluster, _ = fake_cloud
  sweep = ['--sweep=main', '--accelerator=v5e', '--topology=4x8', *CLOUD]
  code, out = _launch([*sweep, '--dry_run', f'--manifest_dir={tmp_path / "dry"}'], capsys)
  assert code == 0 and calls_of() == []  # the dry run contacted nothing
  dry = {n: json.load(open(tmp_path / 'dry' / n)) for n in os.listdir(tmp_path / 'dry')}

  code, out = _launch([*sweep, f'--manifest_dir={tmp_path / "real"}'], capsys)
  assert code == 0, out
  calls = calls_of()
  assert [_kind(c) for c in calls] == [
    'gcloud artifacts docker images describe',
    'gcloud builds submit',
    'gcloud container clusters',
    'kubectl get crd',
    'kubectl get priorityclass',
    'kubectl get localqueue',
    'kubectl get clusterqueue',
    'kubectl get resourceflavors',
    'kubectl get nodes',
    'gcloud storage ls',
    'kubectl create',  # the preflight Job
    'kubectl get job',
    'kubectl logs',
    'kubectl get jobsets',
    *['kubectl create'] * 18,
  ]
  commit = gke.git_commit()
  assert f'--tag=us-east5-docker.pkg.dev/p/melodi/melodi-t5x:{commit}' in calls[1]['argv']
  assert calls[2]['argv'][:4] == ['container', 'clusters', 'get-credentials', 'c']
  assert calls[4]['argv'][2] == 'medium'
  assert 'cloud.google.com/gke-tpu-accelerator=tpu-v5-lite-podslice,' in calls[8]['argv'][3]
  assert len(calls[9]['argv']) == 2 + 9  # train/validation/test of three tasks
  # The preflight Job ran (here, as the fake cluster's pod) and left its marker in the bucket.
  job = json.loads(calls[10]['stdin'])
  schema.validate_job(job)
  pod = job['spec']['template']['spec']
  assert pod['nodeSelector'] == dry[next(iter(dry))]['spec']['replicatedJobs'][0]['template'][
    'spec']['template']['spec']['nodeSelector']  # fmt: skip
  markers = list((tmp_path / 'bucket' / 'melodi' / 'preflight').iterdir())
  [marker] = markers
  record = json.loads(marker.read_text())
  assert record['pod'] == f'{job["metadata"]["name"]}-x7k2q' and len(record['read']) == 27
  assert 'preflight Job melodi-preflight-' in out and 'passed' in out
  submitted = {}
  for c in calls[14:]:
    assert c['argv'] == ['create', '-n', 'default', '-f', '-']
    m = json.loads(c['stdin'])
    submitted[f'{m["metadata"]["name"]}.json'] = m
  assert submitted == dry  # exactly the dry-run manifests
  assert '18 JobSets on v5e 4x8: 8 pods x google.com/tpu 4: 18 created, 0 already there' in out

  # Re-launch: the image exists (no build), every JobSet exists (skipped, not created again).
  code, out = _launch([*sweep, '--skip_pod_preflight'], capsys)
  assert code == 0, out
  again = calls_of()[len(calls) :]
  assert [_kind(c) for c in again][:2] == ['gcloud artifacts docker images describe',
                                           'gcloud container clusters']  # fmt: skip
  assert 'kubectl create' not in [_kind(c) for c in again]
  assert ': 0 created, 18 already there, 0 Failed' in out


def _fail(name, pod_exit=1, log='', reason='Error'):
  """Marks a JobSet of the fake cluster Failed, with a failed pod (and its log)."""

  def edit(c):
    c['jobsets'][name]['status'] = {
      'restarts': 2,
      'restartsCountTowardsMax': 1,
      'terminalState': 'Failed',
      'conditions': [{'type': 'Failed', 'status': 'True', 'reason': 'FailJobSetActionApplied',
                      'message': 'applying FailJobSet failure policy action'}],
    }  # fmt: skip
    labels = {'jobset.sigs.k8s.io/jobset-name': name}
    for i, (code, when) in enumerate([(pod_exit, '10:00:00Z'), (143, '10:00:05Z')]):
      c['pods'].append(
        {
          'metadata': {'name': f'{name}-slice-0-{i}-abcde', 'labels': labels},
          'status': {
            'phase': 'Failed',
            'containerStatuses': [{'name': 'melodi', 'state': {'terminated': {
              'exitCode': code, 'reason': reason, 'finishedAt': f'2026-08-01T{when}'}}}],
          },
        }
      )  # fmt: skip
    c['logs'][f'{name}-slice-0-0-abcde'] = log

  return edit


def test_failed_jobsets_are_named_and_recreated_on_request(capsys, fake_cloud):
  calls_of, cluster, edit = fake_cloud
  sweep = ['--sweep=long_layers', *CLOUD, '--image=img:1', '--skip_pod_preflight']
  code, out = _launch(sweep, capsys)
  assert code == 0 and ': 2 created' in out, out
  edit(_fail('melodi-long-layers-two-l32'))
  n = len(calls_of())
  code, out = _launch(sweep, capsys)
  assert code == 0, out
  assert ': 0 created, 1 already there, 1 Failed' in out
  assert 'Failed JobSets, left as they are: melodi-long-layers-two-l32' in out
  assert '--recreate_failed' in out
  assert [_kind(c) for c in calls_of()[n:]].count('kubectl create') == 0
  n = len(calls_of())
  code, out = _launch([*sweep, '--recreate_failed'], capsys)
  assert code == 0, out
  assert '0 created, 1 Failed ones recreated, 1 already there, 0 Failed' in out
  kinds = [_kind(c) for c in calls_of()[n:]]
  assert kinds[-2:] == ['kubectl delete', 'kubectl create']
  assert calls_of()[-2]['argv'][:3] == ['delete', 'jobset', 'melodi-long-layers-two-l32']
  assert cluster()['jobsets']['melodi-long-layers-two-l32']['status'] == {'restarts': 0}


@pytest.mark.parametrize(
  'broken, message',
  [
    ('crd', 'the JobSet CRD (jobsets.jobset.x-k8s.io) is not installed'),
    ('queue', "the Kueue LocalQueue 'multislice-queue' is not in namespace 'default'"),
    ('priority', "the PriorityClass 'medium' does not exist"),
    ('nodes', '8 nodes carry cloud.google.com/gke-tpu-accelerator=tpu-v5-lite-podslice,'),
    ('prepared', 'prepared splits are missing'),
    ('pod', 'the preflight Job melodi-preflight-'),
  ],
)
def test_failed_preflight_submits_nothing(capsys, fake_cloud, monkeypatch, tmp_path, broken,
                                          message):  # fmt: skip
  calls_of, _, edit = fake_cloud
  if broken in ('crd', 'prepared'):
    monkeypatch.setenv('FAKE_BROKEN', broken)
  elif broken == 'queue':
    edit(lambda c: c['localqueues'].clear())
  elif broken == 'priority':
    edit(lambda c: c['priorityclasses'].remove('medium'))
  elif broken == 'nodes':  # the nodes are labelled, but with 8 chips each (one 2x4 host)
    edit(lambda c: [n['status']['allocatable'].update({'google.com/tpu': '8'}) for n in c['nodes']])
  elif broken == 'pod':  # the operator lists meta.json; the pod reads the shards too
    (tmp_path / 'bucket' / 'melodi' / 'prepared' / 'pg19_t5' / 'test' / 'tokens-00000.bin').unlink()
  code, out = _launch(['--sweep=main', *CLOUD, '--image=img:1'], capsys)
  assert code == 1
  assert message in out
  kinds = [_kind(c) for c in calls_of()]
  assert kinds[0] == 'gcloud container clusters' and 'kubectl get jobsets' not in kinds
  if broken == 'pod':
    assert 'cannot read' in out and 'pg19_t5/test/meta.json' in out and 'nothing submitted' in out
    assert 'FileNotFoundError' in out and 'tokens-00000.bin' in out
  else:
    assert 'preflight failed, nothing submitted' in out and 'kubectl create' not in kinds
  if broken == 'prepared':
    assert '--sweep=prepare --task=<task>' in out
  if broken == 'nodes':
    assert '0 of them with 4 allocatable google.com/tpu (found: 8)' in out


def test_timing_sweep_admissible_after_adding_its_slice(capsys, fake_cloud):
  """The timing sweep's 1x1 slice is not in an xpk 4x8 cluster: the preflight says so and gives
  the commands; run against the fake cluster, they make it admissible and the launch passes."""
  calls_of, cluster, _ = fake_cloud
  args = ['--sweep=timing', '--accelerator=v5e', *CLOUD, '--image=img:1']
  code, out = _launch(args, capsys)
  assert code == 1, out
  assert 'Kueue never admits a v5e 1x1 JobSet (1 chips' in out
  assert 'no flavor of ClusterQueue cluster-queue fits it' in out
  assert '0 nodes carry cloud.google.com/gke-tpu-accelerator=tpu-v5-lite-podslice,' in out
  cloud = gke.CloudConfig(project='p', zone='us-east5-b', cluster='c')
  fix = gke.extra_slice_commands(cloud, gke.tpu_slice('v5e', '1x1'), 'cluster-queue')
  for cmd in fix:
    assert cmd.shell() in out  # the message prints the same commands
  for cmd in fix:  # run them, as an operator would
    assert subprocess.run(['bash', '-c', cmd.shell()]).returncode == 0, cmd.shell()
  flavors = cluster()['resourceflavors']
  assert (
    flavors['melodi-v5e-1x1']['spec']['nodeLabels'] == gke.tpu_slice('v5e', '1x1').node_selector
  )
  code, out = _launch(args, capsys)
  assert code == 0, out
  assert '12 steps (0 train) -> 1 JobSets on v5e 1x1: 1 pods x google.com/tpu 1: 1 created' in out


def test_two_by_four_is_two_pods_of_four_chips(tmp_path, capsys):
  args = ['--sweep=long_layers', '--accelerator=v6e', '--topology=2x4', *CLOUD, '--image=img:1']
  code, out = _launch([*args, '--dry_run', f'--manifest_dir={tmp_path}'], capsys)
  assert code == 0, out
  assert (
    out.splitlines()[0] == '6 steps (2 train) -> 2 JobSets on v6e 2x4: 2 pods x google.com/tpu 4'
  )
  for name in os.listdir(tmp_path):
    _, container, rjob = _plan_of(json.load(open(tmp_path / name)))
    assert rjob['template']['spec']['parallelism'] == 2 and '--distributed' in container['command']
    assert container['resources']['limits'] == {'google.com/tpu': 4}
  assert (
    'gke-tpu-topology=2x4 -o json    # 2 nodes of a v6e 2x4 slice, each with 4 allocatable' in out
  )


def test_prepare_sweep_jobs(tmp_path, capsys):
  code, out = _launch(
    ['--sweep=prepare', '--task=pg19_t5', *CLOUD, '--image=img:1', '--dry_run',
     f'--manifest_dir={tmp_path}', '--binding=tasks.Pg19T5Config.data_dir="gs://b/tfds"',
     '--binding=TRAIN_STEPS=5'],
    capsys,
  )  # fmt: skip
  assert code == 0, out
  assert (
    out.splitlines()[0] == '6 steps (0 train) -> 1 JobSets on v5e 4x8: 8 pods x google.com/tpu 4'
  )
  [name] = os.listdir(tmp_path)
  plan, _, _ = _plan_of(json.load(open(tmp_path / name)))
  part, final = plan.steps[0], plan.steps[3]
  assert part.args == (
    '--task=pg19_t5', '--split=train', f'--out={ROOT}/prepared', '--num_workers=8',
    '--worker={worker}', '--gin_bindings=tasks.Pg19T5Config.data_dir="gs://b/tfds"',
  )  # fmt: skip
  assert part.output == f'{ROOT}/prepared/pg19_t5/train/worker-{{worker:05d}}-of-00008/done.json'
  assert final.worker == 0 and '--finalize' in final.args and len(final.wait_for) == 8
  assert final.output == f'{ROOT}/prepared/pg19_t5/train/meta.json'


def test_missing_prepared_split_names_the_launcher_command(tmp_path):
  """Training refuses to start on an unprepared split (where its data is built)."""
  import gin
  from stream_batches import DatasetConfig

  from melodi_t5x import t5x_data
  from tasks import prepare

  gin.parse_config(f"tasks.PreparedDataConfig.root = '{tmp_path}'")
  try:
    with pytest.raises(prepare.MissingPreparedSplitError) as error:
      t5x_data.get_dataset(DatasetConfig(), 0, 1)
  finally:
    gin.clear_config()
  text = str(error.value)
  assert f'python -m tasks.prepare --task=local_books --split=train --out={tmp_path}' in text
  assert (
    f'python -m xm_launch.launch --sweep=prepare --task=local_books --prepared_root={tmp_path}'
    in text
  )


@pytest.mark.parametrize(
  'accelerator, accelerator_type', [('v5e', 'v5litepod-32'), ('v4', 'v4-32'), ('v6e', 'v6e-32')]
)
def test_tpu_vm_fallback(capsys, accelerator, accelerator_type):
  import shlex

  args = ['--sweep=branching', f'--accelerator={accelerator}', *CLOUD, '--image=r/p/m:1']
  code, out = _launch([*args, '--emit=tpu-vm'], capsys)
  assert code == 0, out
  _, plans = _sweep_jobsets('branching', accelerator)
  lines = [line.strip() for line in out.splitlines()]
  creates = [x for x in lines if x.startswith('gcloud compute tpus queued-resources create')]
  assert len(creates) == 3 and all(f'--accelerator-type={accelerator_type}' in x for x in creates)
  sshes = [x.split('    # ')[0] for x in lines if x.startswith('gcloud compute tpus tpu-vm ssh')]
  assert len(sshes) == 3
  for ssh, p in zip(sshes, plans):
    argv = shlex.split(ssh)
    assert argv[5] == p.name and '--worker=all' in argv
    remote = shlex.split(argv[-1][len('--command=') :])
    assert 'JOB_COMPLETION_INDEX=$(curl' in remote  # each worker's number as the pod index
    assert remote[-1] == _plan_of(p.manifest)[1]['command'][-1]  # the JobSet's own plan


def test_status_lists_jobsets_and_finished_steps(tmp_path, capsys, fake_cloud):
  _, _, edit = fake_cloud
  root = tmp_path / 'runs'
  sweep = ['--sweep=long_layers', '--project=p', '--zone=us-east5-b', '--cluster=c',
           f'--model_dir_root={root}', '--image=img:1', '--noprepared']  # fmt: skip
  code, out = _launch(sweep, capsys)
  assert code == 0, out
  # one_l64 (trained as memory_tradeoff/s128_l64, the same configuration) trained and evaluated
  # with carried memory; two_l32 has nothing yet.
  run = root / 'memory_tradeoff' / 's128_l64'
  (run / 'checkpoint_200000').mkdir(parents=True)
  (run / 'checkpoint_200000' / 'commit_success.txt').write_text('ok')
  (run / 'eval').mkdir()
  (run / 'eval' / 'pg19_t5_step200000_carried.json').write_text('{}')
  edit(lambda c: c['jobsets']['melodi-memory-tradeoff-s128-l64']['status'].update(
    terminalState='Completed'))  # fmt: skip
  code, out = _launch([*sweep, '--status'], capsys)
  assert code == 0, out
  lines = {line.split()[0]: line for line in out.splitlines() if line.startswith('melodi-')}
  one, two = lines['melodi-memory-tradeoff-s128-l64'], lines['melodi-long-layers-two-l32']
  assert 'Completed' in one and 'train:done eval_carried:done eval_reset:-' in one
  assert 'Active' in two and 'train:- eval_carried:- eval_reset:-' in two
  assert '0 of 2 JobSets have every step done' in out


def test_status_shows_why_a_jobset_failed(tmp_path, capsys, fake_cloud):
  _, _, edit = fake_cloud
  sweep = ['--sweep=long_layers', *CLOUD, '--image=img:1', '--skip_pod_preflight']
  assert _launch(sweep, capsys)[0] == 0
  log = '\n'.join(
    [f'step {i}' for i in range(30)]
    + ['google.api_core.exceptions.Forbidden: 403 GET gs://b/melodi: no storage.objects.get',
       '[long_layers/two_l32/train] FAILED with exit status 1 after 12 s; stopping']
  )  # fmt: skip
  edit(_fail('melodi-long-layers-two-l32', pod_exit=1, log=log))
  code, out = _launch([*sweep, '--status', '--status_lines=5'], capsys)
  assert code == 0, out
  name = 'melodi-long-layers-two-l32'
  [line] = [x for x in out.splitlines() if x.startswith(name)]
  assert 'Failed' in line and 'restarts=2 (1 counted)' in line
  assert 'JobSet: FailJobSetActionApplied: applying FailJobSet failure policy action' in out
  # The pod that failed first (exit 1), not the one stopped after it (143).
  assert f'failed step: train; pod {name}-slice-0-0-abcde: exit code 1 (Error)' in out
  assert f'last 5 log lines (kubectl logs {name}-slice-0-0-abcde --tail=5):' in out
  assert '    google.api_core.exceptions.Forbidden: 403 GET' in out
  assert 'step 26' not in out and '    step 27' in out


def test_status_reads_gcs_outputs_without_tensorflow(tmp_path, fake_cloud):
  """`--status` on a workstation without TensorFlow: the outputs on gs:// are listed with the
  gcloud CLI (TensorFlow is made unimportable in the process)."""
  _, _, edit = fake_cloud
  run = tmp_path / 'bucket' / 'melodi' / 'memory_tradeoff' / 's128_l64'
  (run / 'checkpoint_200000').mkdir(parents=True)
  (run / 'checkpoint_200000' / 'commit_success.txt').write_text('ok')
  script = (
    'import sys; sys.modules["tensorflow"] = None\n'
    'from absl import flags\nfrom xm_launch import launch\n'
    f'flags.FLAGS({["launch", "--sweep=long_layers", *CLOUD, "--image=img:1", "--status"]!r})\n'
    'launch.main(["launch"])\n'
    'assert sys.modules["tensorflow"] is None\n'
  )
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu')
  proc = subprocess.run(
    [sys.executable, '-c', script], env=env, capture_output=True, text=True, timeout=300
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  [one] = [x for x in proc.stdout.splitlines() if x.startswith('melodi-memory-tradeoff-s128-l64')]
  assert 'not submitted' in one and 'train:done eval_carried:- eval_reset:-' in one


def test_pod_preflight_module(tmp_path):
  """`python -m xm_launch.preflight`: reads a prepared split (meta, index, first shard), writes
  the marker with who wrote it; a file it cannot read fails, naming the file."""
  split = tmp_path / 'prepared' / 'pg19_t5' / 'train'
  split.mkdir(parents=True)
  meta = json.dumps({'shards': ['tokens-00000.bin']})
  (split / 'meta.json').write_text(meta)
  (split / 'index.npy').write_bytes(bytes(10))
  (split / 'tokens-00000.bin').write_bytes(bytes(9000))
  marker = tmp_path / 'runs' / 'preflight' / 'm.json'
  env = dict(os.environ, PYTHONPATH=REPO, HOSTNAME='melodi-preflight-1-abcde', NODE_NAME='n-3')
  env.pop('KUBERNETES_SERVICE_HOST', None)
  cmd = [sys.executable, '-m', 'xm_launch.preflight', f'--marker={marker}',
         f'--read={split}/meta.json']  # fmt: skip
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  record = json.loads(marker.read_text())
  assert (record['pod'], record['node']) == ('melodi-preflight-1-abcde', 'n-3')
  assert record['read'] == {f'{split}/meta.json': len(meta), f'{split}/index.npy': 10,
                            f'{split}/tokens-00000.bin': 4096}  # fmt: skip
  (split / 'tokens-00000.bin').unlink()
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 1 and 'cannot read' in proc.stderr and 'tokens-00000.bin' in proc.stderr


def test_compilation_cache_is_hit_by_a_second_process(tmp_path):
  """The manifests' JAX_COMPILATION_CACHE_DIR, in two processes on CPU: the first writes the
  cache, the second hits it (jax's '/jax/compilation_cache/cache_hits' event). On CPU the compile
  is fast, so the minimum compile time to cache is set to 0 (on TPU the default, 1 s, applies)."""
  settings = gke.SliceSettings(image='img:1', model_root=str(tmp_path / 'runs'))
  plan = steps.Plan('x', (steps.Step('train', 't5x.train'),))
  m = gke.jobset_manifest('main/x', plan, gke.tpu_slice('v5e', '4x8'), settings)
  env_list = _job(m)['template']['spec']['containers'][0]['env']
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu')
  env.update({e['name']: e['value'] for e in env_list})
  env['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
  env['JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES'] = '0'
  cache = tmp_path / 'runs' / 'jax_cache'
  assert env['JAX_COMPILATION_CACHE_DIR'] == str(cache)
  script = (
    'import jax, jax.numpy as jnp\n'
    'hits = []\n'
    'jax.monitoring.register_event_listener(\n'
    '  lambda e, **kw: hits.append(e) if e == "/jax/compilation_cache/cache_hits" else None)\n'
    'jax.jit(lambda x: jnp.tanh(x @ x.T).sum())(jnp.ones((64, 64))).block_until_ready()\n'
    'print("hits", len(hits))\n'
  )
  outs = []
  for _ in range(2):
    proc = subprocess.run(
      [sys.executable, '-c', script], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    outs.append(proc.stdout.split()[-1])
    if len(outs) == 1:
      entries = os.listdir(cache)
      assert entries, 'the first process wrote no cache entry'
  assert outs[0] == '0' and int(outs[1]) >= 1, outs  # the second process compiled nothing anew
