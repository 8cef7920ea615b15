"""The GKE backend without a cloud: manifests of every sweep on every accelerator, the JobSet
schema (with a negative case per kind of error), the dry run, and a real launch against fake
`gcloud` / `kubectl` executables that record their arguments and stdin.

In-process (the launcher's flags are parsed in this process); only the fakes are processes.
"""

from __future__ import annotations

import copy
import json
import os
import re
import stat
import sys
import textwrap

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
  assert cmd[:3] == ['python', '-m', 'xm_launch.steps'] and cmd[-1].startswith('--plan=')
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
  return jobs, gke.build_jobsets(jobs, train_slice=train, timing_slice=timing, image='img:1')


def test_slice_table_matches_xpk():
  for accelerator, (topology, label, machine, pods, chips) in SLICES.items():
    tpu = gke.tpu_slice(accelerator, topology)
    assert (tpu.gke_accelerator, tpu.machine_type, tpu.hosts, tpu.chips_per_host) == (
      label, machine, pods, chips,
    )  # fmt: skip
  # Single-host slices of the timing sweep.
  assert gke.tpu_slice('v5e', '1x1').machine_type == 'ct5lp-hightpu-1t'
  assert gke.tpu_slice('v6e', '2x4').hosts == 1
  assert gke.tpu_slice('v4', '2x2x1').hosts == 1
  with pytest.raises(ValueError, match='3 dimensions'):
    gke.tpu_slice('v4', '4x8')
  with pytest.raises(ValueError, match='topologies are'):
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
    # Configuration errors are not retried.
    [rule] = job['podFailurePolicy']['rules']
    assert rule['action'] == 'FailJob' and rule['onExitCodes']['values'] == [steps.CONFIG_ERROR]
    [js_rule] = m['spec']['failurePolicy']['rules']
    assert js_rule['action'] == 'FailJobSet' and js_rule['onJobFailureReasons'] == [
      'PodFailurePolicy'
    ]
    assert plan == jobs_lib.plan(p.group, p.jobs)
    _check_steps(sweep, plan, pods)


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

FAKE = textwrap.dedent(
  """\
  #!{python}
  # Fake {tool}: records argv and stdin, answers from a state folder ($FAKE_CLOUD).
  import json, os, sys
  state = os.environ['FAKE_CLOUD']
  argv = sys.argv[1:]
  stdin = '' if sys.stdin.isatty() else sys.stdin.read()
  with open(os.path.join(state, 'calls.jsonl'), 'a') as f:
    f.write(json.dumps({{'tool': '{tool}', 'argv': argv, 'stdin': stdin}}) + '\\n')
  broken = os.environ.get('FAKE_BROKEN', '')
  def done(path):
    return os.path.exists(os.path.join(state, path))
  if '{tool}' == 'gcloud':
    if argv[:4] == ['artifacts', 'docker', 'images', 'describe']:
      sys.exit(0 if done('image-built') else 1)
    if argv[:2] == ['builds', 'submit']:
      assert os.path.exists(os.path.join(argv[2], 'Dockerfile')), argv
      open(os.path.join(state, 'image-built'), 'w').close()
    if argv[:2] == ['storage', 'ls'] and broken == 'prepared':
      sys.stderr.write('ERROR: One or more URLs matched no objects.\\n'); sys.exit(1)
    if argv[:2] == ['storage', 'ls']:
      print('\\n'.join(argv[2:]))
    sys.exit(0)
  if argv[:2] == ['get', 'crd']:
    sys.exit(1 if broken == 'crd' else 0)
  if argv[:2] == ['get', 'localqueue']:
    sys.exit(1 if broken == 'queue' else 0)
  if argv[:2] == ['get', 'nodes']:
    count = 3 if broken == 'nodes' else 8
    print('\\n'.join(f'node/gke-tpu-{{i}}' for i in range(count))); sys.exit(0)
  if argv[:2] == ['get', 'jobsets']:
    names = sorted(f[len('created-'):] for f in os.listdir(state) if f.startswith('created-'))
    items = [{{'metadata': {{'name': n}}, 'status': {{'restarts': 1, 'terminalState': 'Completed'
              if n.endswith('s128-l64') else ''}}}} for n in names]
    print(json.dumps({{'items': items}})); sys.exit(0)
  if argv[:1] == ['create']:
    name = json.loads(stdin)['metadata']['name']
    if done('created-' + name):
      sys.stderr.write(f'Error from server (AlreadyExists): jobsets.jobset.x-k8s.io "{{name}}" '
                       'already exists\\n'); sys.exit(1)
    open(os.path.join(state, 'created-' + name), 'w').close()
    print(f'jobset.jobset.x-k8s.io/{{name}} created'); sys.exit(0)
  sys.exit(0)
  """
)


@pytest.fixture
def fake_cloud(tmp_path, monkeypatch):
  bin_dir, state = tmp_path / 'bin', tmp_path / 'state'
  bin_dir.mkdir()
  state.mkdir()
  for tool in ('gcloud', 'kubectl'):
    path = bin_dir / tool
    path.write_text(FAKE.format(python=sys.executable, tool=tool))
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
  monkeypatch.setenv('PATH', f'{bin_dir}{os.pathsep}{os.environ["PATH"]}')
  monkeypatch.setenv('FAKE_CLOUD', str(state))

  def calls():
    log = state / 'calls.jsonl'
    if not log.exists():
      return []
    return [json.loads(line) for line in log.read_text().splitlines()]

  return calls


def _kind(call):
  tool, argv = call['tool'], call['argv']
  if tool == 'kubectl':
    return 'kubectl ' + (argv[0] if argv[0] == 'create' else f'get {argv[1]}')
  return 'gcloud ' + ' '.join(argv[:2] if argv[0] != 'artifacts' else argv[:4])


def test_real_launch_against_fake_cloud(tmp_path, capsys, fake_cloud, monkeypatch):
  sweep = ['--sweep=main', '--accelerator=v5e', '--topology=4x8', *CLOUD]
  code, out = _launch([*sweep, '--dry_run', f'--manifest_dir={tmp_path / "dry"}'], capsys)
  assert code == 0 and fake_cloud() == []  # the dry run contacted nothing
  dry = {n: json.load(open(tmp_path / 'dry' / n)) for n in os.listdir(tmp_path / 'dry')}

  code, out = _launch([*sweep, f'--manifest_dir={tmp_path / "real"}'], capsys)
  assert code == 0, out
  calls = fake_cloud()
  assert [_kind(c) for c in calls] == [
    'gcloud artifacts docker images describe',
    'gcloud builds submit',
    'gcloud container clusters',
    'kubectl get crd',
    'kubectl get localqueue',
    'kubectl get nodes',
    'gcloud storage ls',
    *['kubectl create'] * 18,
  ]
  commit = gke.git_commit()
  assert f'--tag=us-east5-docker.pkg.dev/p/melodi/melodi-t5x:{commit}' in calls[1]['argv']
  assert calls[2]['argv'][:4] == ['container', 'clusters', 'get-credentials', 'c']
  assert 'cloud.google.com/gke-tpu-accelerator=tpu-v5-lite-podslice,' in calls[5]['argv'][3]
  assert len(calls[6]['argv']) == 2 + 9  # train/validation/test of three tasks
  submitted = {}
  for c in calls[7:]:
    assert c['argv'] == ['create', '-n', 'default', '-f', '-']
    m = json.loads(c['stdin'])
    submitted[f'{m["metadata"]["name"]}.json'] = m
  assert submitted == dry  # exactly the dry-run manifests
  assert '18 JobSets on v5e 4x8: 8 pods x google.com/tpu 4: 18 created, 0 already there' in out

  # Re-launch: the image exists (no build), every JobSet exists (skipped, not an error).
  code, out = _launch(sweep, capsys)
  assert code == 0, out
  again = fake_cloud()[len(calls) :]
  assert [_kind(c) for c in again][:2] == ['gcloud artifacts docker images describe',
                                           'gcloud container clusters']  # fmt: skip
  assert sum(_kind(c) == 'kubectl create' for c in again) == 18
  assert ': 0 created, 18 already there' in out and out.count('already exists: skipped') == 18


@pytest.mark.parametrize(
  'broken, message',
  [
    ('crd', 'the JobSet CRD (jobsets.jobset.x-k8s.io) is not installed'),
    ('queue', "the Kueue LocalQueue 'multislice-queue' is not in namespace 'default'"),
    ('nodes', '3 nodes carry cloud.google.com/gke-tpu-accelerator=tpu-v5-lite-podslice,'),
    ('prepared', 'prepared splits are missing'),
  ],
)
def test_failed_preflight_submits_nothing(capsys, fake_cloud, monkeypatch, broken, message):
  monkeypatch.setenv('FAKE_BROKEN', broken)
  code, out = _launch(['--sweep=main', *CLOUD, '--image=img:1'], capsys)
  assert code == 1
  assert 'preflight failed, nothing submitted' in out and message in out
  kinds = [_kind(c) for c in fake_cloud()]
  assert 'kubectl create' not in kinds and kinds[0] == 'gcloud container clusters'
  if broken == 'prepared':
    assert '--sweep=prepare --task=<task>' in out


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
    '--worker={worker}', '--gin_param=tasks.Pg19T5Config.data_dir="gs://b/tfds"',
  )  # fmt: skip
  assert part.output == f'{ROOT}/prepared/pg19_t5/train/worker-{{worker:05d}}-of-00008/done.json'
  assert final.worker == 0 and '--finalize' in final.args and len(final.wait_for) == 8
  assert final.output == f'{ROOT}/prepared/pg19_t5/train/meta.json'


def test_missing_prepared_split_names_the_launcher_command(tmp_path):
  """Training refuses to start on an unprepared split (where its data is built)."""
  import dataclasses

  import gin

  from melodi_t5x import t5x_data
  from tasks import prepare

  @dataclasses.dataclass(frozen=True)
  class Cfg:  # the fields of t5x.utils.DatasetConfig that t5x_data reads
    mixture_or_task_name: str = 'local_books'
    task_feature_lengths: dict = dataclasses.field(default_factory=lambda: {'targets': 512})
    split: str = 'train'
    batch_size: int = 4
    shuffle: bool = True
    seed: int = 0
    pack: bool = False

  gin.parse_config(f"tasks.PreparedDataConfig.root = '{tmp_path}'")
  try:
    with pytest.raises(prepare.MissingPreparedSplitError) as error:
      t5x_data.get_dataset(Cfg(), 0, 1)
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
  code, out = _launch([*sweep, '--status'], capsys)
  assert code == 0, out
  lines = {line.split()[0]: line for line in out.splitlines() if line.startswith('melodi-')}
  one, two = lines['melodi-memory-tradeoff-s128-l64'], lines['melodi-long-layers-two-l32']
  assert 'Completed' in one and 'train:done eval_carried:done eval_reset:-' in one
  assert 'Active' in two and 'train:- eval_carried:- eval_reset:-' in two
  assert '0 of 2 JobSets have every step done' in out
  assert fake_cloud()[-1]['argv'][:2] == ['get', 'jobsets']
  assert 'melodi-t5x/sweep in (long_layers,memory_tradeoff)' in fake_cloud()[-1]['argv']
