"""TPU ahead-of-time compile check (melodi_t5x.tools.tpu_compile): meshes, memory plans, peaks.

The compile tests need libtpu (requirements-tpu.txt) and run in the slow tier; they compile the
tiny MELODI rehearsal model's real jobs (T5X train step, streaming eval step) for a v5e 2x2 slice
on this CPU machine.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import types
from unittest import mock

import gin
import jax
import needs
import numpy as np
import pytest

from melodi_t5x import experiments
from melodi_t5x.tools import flops

REPO = experiments.REPO_ROOT


def _tpu_compile(libtpu: bool = True) -> types.SimpleNamespace:
  """The check's modules (skips without T5X, and without libtpu unless `libtpu` is False)."""
  needs.t5x()
  if libtpu:
    needs.libtpu()
  from melodi_t5x.tools.tpu_compile import (  # pylint: disable=g-import-not-at-top
    cache,
    cli,
    pool,
    report,
    slices,
    targets,
  )

  if libtpu and not slices.libtpu_available():
    needs.skip('libtpu cannot describe a TPU topology on this machine')
  return types.SimpleNamespace(
    cache=cache, cli=cli, pool=pool, report=report, slices=slices, targets=targets
  )


# -- peak FLOPs and HBM by device kind (fast) -------------------------------------------------


@pytest.mark.parametrize(
  'kind,tflops,hbm',
  [
    ('TPU v4', 275.0, 32.0),
    ('TPU v5 lite', 197.0, 16.0),
    ('TPU v5', 459.0, 95.0),
    ('TPU v5p', 459.0, 95.0),
    ('TPU v6 lite', 918.0, 32.0),
    ('NVIDIA H100 80GB HBM3', 989.0, None),
    ('NVIDIA A100-SXM4-40GB', 312.0, None),
  ],
)
def test_peak_and_hbm_by_device_kind(kind, tflops, hbm):
  assert flops.peak_tflops(kind) == tflops
  assert flops.hbm_gib(kind) == hbm


def test_unknown_device_kind_has_no_peak():
  assert flops.peak_tflops('cpu') is None
  assert flops.hbm_gib('TPU v3') is None


# -- the mesh of the run files (needs libtpu's topologies, no compile) -----------------------


def _run_partitioner(run: str, extra: str = ''):
  from t5x import partitioning  # pylint: disable=g-import-not-at-top

  from melodi_t5x import t5x_gin  # pylint: disable=g-import-not-at-top

  gin.clear_config()
  try:
    t5x_gin.register_search_path()
    gin.parse_config(
      '\n'.join(
        [
          'from __gin__ import dynamic_registration',
          'from t5x import partitioning',
          'partitioning.PjitPartitioner.num_partitions = 1',  # T5X's pretrain.gin
          f"include '{os.path.join(REPO, 'gin/experiments/runs', run + '.gin')}'",
          extra,
        ]
      )
    )
    return gin.get_configurable(partitioning.PjitPartitioner)()
  finally:
    gin.clear_config()


@pytest.mark.parametrize('run', ['main', 'ablation'])
@pytest.mark.parametrize(
  'slice_name,devices', [('v5e:4x8', 32), ('v6e:4x8', 32), ('v4:2x2x4', 32), ('v5p:2x2x4', 16)]
)
def test_run_files_give_a_data_parallel_mesh_on_every_tpu(run, slice_name, devices):
  tc = _tpu_compile()
  partitioner = _run_partitioner(run)
  mesh = tc.slices.t5x_mesh(partitioner, tc.slices.topology_devices(slice_name))
  assert dict(mesh.shape) == {'data': devices, 'model': 1}
  assert experiments.RUN_STEPS[run] % 1 == 0 and 32 % devices == 0


def _t5x_own_mesh(partitioner, devices):
  """The reference: T5X's `partitioner.mesh` (`default_mesh`) with the host's `jax.devices()` /
  `jax.local_devices()` seen as the slice's devices (process 0's are the local ones)."""
  from t5x import partitioning  # pylint: disable=g-import-not-at-top

  devices = list(devices)
  local = [d for d in devices if d.process_index == devices[0].process_index]
  with (
    mock.patch.object(partitioning.jax, 'devices', lambda backend=None: devices),
    mock.patch.object(
      partitioning.jax, 'local_devices', lambda process_index=None, backend=None: local
    ),
  ):
    return partitioning.default_mesh(
      partitioner._num_partitions,  # pylint: disable=protected-access
      partitioner._model_parallel_submesh,  # pylint: disable=protected-access
      None,
      partitioner._ici_mesh_shape,  # pylint: disable=protected-access
      partitioner._dcn_mesh_shape,  # pylint: disable=protected-access
    )


# Slices of every accelerator: the launcher's default and the smallest (the timing jobs').
SLICES = ['v5e:4x8', 'v6e:4x8', 'v4:2x2x4', 'v5p:2x2x4', 'v5e:2x2', 'v4:2x2x1']


@pytest.mark.parametrize('slice_name', SLICES)
@pytest.mark.parametrize(
  'settings',
  [
    {'model_parallel_submesh': (1, 1, 1, 1)},  # the suite's run files
    {'model_parallel_submesh': (1, 2, 1, 1)},
    {'model_parallel_submesh': (1, 1, 1, 2)},  # v4: a chip's two TensorCores
    {'num_partitions': 1, 'ici_mesh_shape': (1, -1, 2), 'dcn_mesh_shape': (1, 1, 1)},
  ],
)
def test_mesh_on_the_slice_is_the_mesh_t5x_builds_there(slice_name, settings):
  tc = _tpu_compile()
  from t5x import partitioning  # pylint: disable=g-import-not-at-top

  devices = tc.slices.topology_devices(slice_name)
  if 'ici_mesh_shape' in settings:  # every device: 'data' x 2 on 'model'
    settings = {**settings, 'ici_mesh_shape': (1, len(devices) // 2, 2)}
  try:
    reference = _t5x_own_mesh(partitioning.PjitPartitioner(**settings), devices)
  except (AssertionError, ValueError) as e:  # a submesh that does not tile this slice
    with pytest.raises(type(e), match=re.escape(str(e))):
      tc.slices.t5x_mesh(partitioning.PjitPartitioner(**settings), devices)
    return
  mesh = tc.slices.t5x_mesh(partitioning.PjitPartitioner(**settings), devices)
  assert mesh.axis_names == reference.axis_names
  assert dict(mesh.shape) == dict(reference.shape)
  assert [d.id for d in mesh.devices.flat] == [d.id for d in reference.devices.flat]


@pytest.mark.parametrize('slice_name', SLICES)
@pytest.mark.parametrize('num_partitions', [1, 2, 4])
def test_no_default_mesh_on_any_slice_as_in_t5x(slice_name, num_partitions):
  """Without a submesh (or ICI/DCN shapes) T5X picks a per-TPU default mesh, and has none for the
  devices libtpu describes for the check's slices; the check refuses as T5X does, naming the
  binding that fixes it."""
  tc = _tpu_compile()
  from t5x import partitioning  # pylint: disable=g-import-not-at-top

  devices = tc.slices.topology_devices(slice_name)
  with pytest.raises(ValueError, match='No default mesh'):
    _t5x_own_mesh(partitioning.PjitPartitioner(num_partitions=num_partitions), devices)
  with pytest.raises(ValueError, match='No default mesh.*model_parallel_submesh'):
    tc.slices.t5x_mesh(partitioning.PjitPartitioner(num_partitions=num_partitions), devices)


# -- compiling the tiny model's jobs for v5e 2x2 (slow) --------------------------------------


def _tiny_jobs(tmp_path, bindings, eval_mode: str = 'carried'):
  """The train job and the `eval_mode` eval job of the tiny MELODI (experiment file written)."""
  from melodi_t5x import jobs as jobs_lib  # pylint: disable=g-import-not-at-top

  exp = next(e for e in experiments.sweep('main', size='tiny') if e.model == 'melodi_s128_l64')
  path = tmp_path / 'experiment.gin'
  path.write_text(experiments.render(exp))
  return jobs_lib.experiment_jobs(
    exp, str(tmp_path / 'root'), gin_file=str(path), bindings=bindings, eval_modes=(eval_mode,)
  )


# Batch 4 on a 2 (data) x 2 (model) mesh of v5e:2x2.
MESH_2X2 = [
  'BATCH_SIZE=4',
  'EVAL_BATCH_SIZE=4',
  'partitioning.PjitPartitioner.num_partitions=None',
  'partitioning.PjitPartitioner.model_parallel_submesh=(1, 2, 1, 1)',
]


def _nbytes(tree) -> int:
  return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


@pytest.mark.slow
def test_tiny_train_step_compiles_with_memory_sharded_on_the_batch_axis(tmp_path):
  tc = _tpu_compile()
  train_job = _tiny_jobs(tmp_path, MESH_2X2)[0]
  target = tc.targets.build_target(train_job, tc.slices.Slice('v5e', '2x2'))
  assert target.devices == 4 and target.device_kind == 'TPU v5 lite'
  assert target.describe['mesh_shape'] == {'data': 2, 'model': 2}
  compiled = target.lower().compile()
  state_shardings = compiled.input_shardings[0][0]
  memory = state_shardings.flax_mutables['memory']
  leaves = jax.tree.leaves(memory, is_leaf=lambda x: isinstance(x, jax.sharding.NamedSharding))
  assert leaves
  for sharding in leaves:  # every carried leaf [B, ...] is split over 'data'
    assert sharding.spec[0] == 'data', sharding
  plan = tc.cache.memory_plan(compiled)
  assert plan['peak'] == plan['argument'] + plan['output'] - plan['alias'] + plan['temp']
  # Arguments per device: at least this device's share of the carried memory and of the batch,
  # at most the whole train state and batch (nothing sharded).
  state = target.lower().args_info[0][0]
  mem_bytes = _nbytes(state.flax_mutables)
  batch_bytes = _nbytes(target.lower().args_info[0][1])
  assert (mem_bytes + batch_bytes) / 2 <= plan['argument'] <= _nbytes(state) + batch_bytes
  # The train state is donated: its buffers are reused for the new state.
  assert plan['alias'] > 0 and plan['output'] >= plan['alias']


@pytest.mark.slow
def test_tiny_jobs_fit_and_report_their_rows(tmp_path):
  tc = _tpu_compile()
  jobs = _tiny_jobs(tmp_path, MESH_2X2)
  rows = tc.pool.check_jobs(jobs, tc.slices.Slice('v5e', '2x2'), log=lambda *_: None)
  assert [r['kind'] for r in rows] == ['train', 'eval']
  for row in rows:
    assert row['fits'], row
    assert row['devices'] == 4 and row['chips'] == 4
    assert row['hbm_bytes_per_chip'] == 16 * 2**30
    assert 0 < row['peak_bytes_per_chip'] < 0.9 * row['hbm_bytes_per_chip']
    assert row['estimated_step_seconds'] > 0
  train, evaluation = rows
  assert train['steps'] == experiments.RUN_STEPS['tiny']
  assert train['chip_hours'] == pytest.approx(train['estimated_run_hours'] * 4)
  # The traced train step executes 3x the forward's model FLOPs plus recomputed logits.
  assert train['flops_per_step'] > train['model_flops_per_step'] > 0
  assert evaluation['flops_per_step'] == pytest.approx(evaluation['model_flops_per_step'])


@pytest.mark.slow
def test_jobs_with_the_same_step_share_one_compile(tmp_path):
  tc = _tpu_compile()
  jobs = _tiny_jobs(tmp_path, MESH_2X2)
  reset = _tiny_jobs(tmp_path, MESH_2X2, 'reset')[1]
  slice_ = tc.slices.Slice('v5e', '2x2')
  carried = tc.targets.build_target(jobs[1], slice_)
  assert tc.targets.build_target(reset, slice_).key == carried.key
  wider = tc.targets.build_target(_tiny_jobs(tmp_path, [*MESH_2X2, 'EVAL_BATCH_SIZE=8'])[1], slice_)
  assert wider.key != carried.key


def test_result_cache_reads_back_only_its_own_fingerprint(tmp_path):
  tc = _tpu_compile(libtpu=False)

  cache = tc.cache.ResultCache(str(tmp_path / 'cache'))
  assert cache.get('abc') is None  # nothing there yet
  cache.put('abc', {'memory': {'peak': 7}}, describe={'step': 'train'})
  assert cache.get('abc') == {'memory': {'peak': 7}}
  assert cache.get('abd') is None
  # A damaged or foreign entry is a miss, not a result.
  (tmp_path / 'cache' / 'abd.json').write_text('{"fingerprint": "abc", "result": {}}')
  assert cache.get('abd') is None
  (tmp_path / 'cache' / 'abe.json').write_text('{not json')
  assert cache.get('abe') is None
  assert not [p for p in os.listdir(tmp_path / 'cache') if p.endswith('.tmp')]


class _FakeSteps:
  """Jobs of a 4-device slice (three train jobs unless `names` says otherwise; the kind is the
  name's last part) whose 'compile' records the step and plans 1 GiB."""

  def __init__(self, tc, names=('a/train', 'b/train', 'c/train')):
    import types  # pylint: disable=g-import-not-at-top

    self.tc = tc
    self.compiled = []
    self.jobs = [
      types.SimpleNamespace(
        name=name,
        kind=name.split('/')[-1],
        module='t5x.train' if name.endswith('/train') else 't5x.eval',
        gin_files=(name,),
        bindings=(),
        flags=(),
        topology='2x2',
      )
      for name in names
    ]

  def target(self, job, slice_):
    del slice_
    return self.tc.targets.Target(
      job.name, None, 4, 1, 'TPU v5 lite', 1e12, 1e12, 10, {'mesh_shape': {'data': 4}}
    )

  def result(self, key, cached=False):
    gib = self.tc.report.GIB
    plan = {'argument': 1, 'output': 1, 'alias': 1, 'temp': gib, 'peak': gib + 1}
    return {
      'memory': plan,
      'compile_seconds': 1.0,
      'traced_flops': None,
      'cached': cached,
      'xla_flops_loop_blind': 0.0,
      'xla_optimal_seconds': 0.0,
      'fingerprint': key,
    }

  def compile(self, target, slice_name, cache=None):
    del slice_name, cache
    self.compiled.append(target.key)
    return self.result(target.key)


def test_steps_left_by_a_dead_worker_compile_in_process(monkeypatch):
  """A worker killed for host memory breaks the pool: the check finishes the rest one by one."""
  import concurrent.futures  # pylint: disable=g-import-not-at-top

  tc = _tpu_compile(libtpu=False)

  steps = _FakeSteps(tc)

  class BrokenPool:
    """The first step finishes; then a worker dies and every pending future breaks."""

    def __init__(self, *args, **kwargs):
      del args, kwargs

    def __enter__(self):
      return self

    def __exit__(self, *exc):
      return False

    def submit(self, fn, job, slice_, cache):
      del fn
      fut = concurrent.futures.Future()
      if job.name == 'a/train':
        fut.set_result((steps.compile(steps.target(job, slice_), 'v5e:2x2'), None))
      else:
        fut.set_exception(concurrent.futures.process.BrokenProcessPool('killed'))
      return fut

  monkeypatch.setattr(tc.targets, 'build_target', steps.target)
  monkeypatch.setattr(tc.cache, 'compile_target', steps.compile)
  monkeypatch.setattr(concurrent.futures, 'ProcessPoolExecutor', BrokenPool)
  logs = []
  rows = tc.pool.check_jobs(steps.jobs, tc.slices.Slice('v5e', '2x2'), workers=2, log=logs.append)
  assert [r['fits'] for r in rows] == [True, True, True]
  assert sorted(steps.compiled) == ['a/train', 'b/train', 'c/train']  # each step exactly once
  assert any('worker died' in line for line in logs), logs


def test_fresh_process_compiles_each_missing_step_in_a_process_of_its_own(monkeypatch, tmp_path):
  """One step per spawned process (host memory returns between steps); cache hits stay here."""
  import concurrent.futures  # pylint: disable=g-import-not-at-top

  tc = _tpu_compile(libtpu=False)

  steps = _FakeSteps(tc)
  pools, submitted, events = [], [], []

  class RecordingPool:
    def __init__(self, max_workers, **kwargs):
      pools.append((max_workers, kwargs))

    def __enter__(self):
      return self

    def __exit__(self, *exc):
      return False

    def submit(self, fn, job, slice_, cache):
      del fn, cache
      submitted.append(job.name)
      events.append(f'submit {job.name}')
      fut = concurrent.futures.Future()
      fut.set_result((steps.compile(steps.target(job, slice_), 'v5e:2x2'), None))
      return fut

  def cached(target, slice_name, cache):
    del slice_name, cache
    return steps.result(target.key, cached=True) if target.key == 'b/train' else None

  monkeypatch.setattr(tc.targets, 'build_target', steps.target)
  monkeypatch.setattr(tc.cache, 'compile_target', steps.compile)
  monkeypatch.setattr(tc.cache, 'cached_result', cached)
  monkeypatch.setattr(concurrent.futures, 'ProcessPoolExecutor', RecordingPool)
  cache = tc.cache.ResultCache(str(tmp_path / 'cache'))
  rows = tc.pool.check_jobs(
    steps.jobs, tc.slices.Slice('v5e', '2x2'), cache=cache, fresh_process=True, log=lambda *_: None
  )
  assert sorted(submitted) == ['a/train', 'c/train']  # the cached step spawns nothing
  [(max_workers, kwargs)] = pools
  assert max_workers == 1 and kwargs['max_tasks_per_child'] == 1
  assert [r['cached'] for r in rows] == [False, True, False]
  # Longest compiles first, and each submitted as soon as its lookup misses (the lookups of later
  # steps overlap the compiles): train steps before eval steps, whatever the jobs' order.
  steps = _FakeSteps(tc, names=('a/eval_carried', 'b/train', 'c/train', 'd/eval_carried'))
  events.clear()
  monkeypatch.setattr(tc.targets, 'build_target', steps.target)
  monkeypatch.setattr(tc.cache, 'compile_target', steps.compile)

  def looked_up(target, slice_name, cache):
    del slice_name, cache
    events.append(f'lookup {target.key}')
    return steps.result(target.key, cached=True) if target.key == 'b/train' else None

  monkeypatch.setattr(tc.cache, 'cached_result', looked_up)
  rows = tc.pool.check_jobs(
    steps.jobs, tc.slices.Slice('v5e', '2x2'), cache=cache, workers=2, log=lambda *_: None
  )
  assert events == [
    'lookup b/train',
    'lookup c/train',
    'submit c/train',
    'lookup a/eval_carried',
    'submit a/eval_carried',
    'lookup d/eval_carried',
    'submit d/eval_carried',
  ]
  assert [r['name'] for r in rows] == [j.name for j in steps.jobs]  # rows keep the jobs' order
  assert [r['cached'] for r in rows] == [False, True, False, False]
  # In process (the library's default, --in_process): no pool at all.
  pools.clear()
  steps.compiled.clear()
  tc.pool.check_jobs(steps.jobs, tc.slices.Slice('v5e', '2x2'), log=lambda *_: None)
  assert not pools and steps.compiled == [j.name for j in steps.jobs]  # the jobs' order


@pytest.mark.slow
def test_a_cached_step_is_read_back_without_compiling_and_a_changed_one_compiles(tmp_path):
  tc = _tpu_compile()

  def eval_job(bindings):
    return _tiny_jobs(tmp_path, bindings)[1]

  slice_ = tc.slices.Slice('v5e', '2x2')
  cache = tc.cache.ResultCache(str(tmp_path / 'cache'))
  [first] = tc.pool.check_jobs([eval_job(MESH_2X2)], slice_, cache=cache, log=lambda *_: None)
  assert first['fits'] and not first['cached']
  assert os.listdir(tmp_path / 'cache') == [first['fingerprint'] + '.json']

  real_compile = jax.stages.Lowered.compile
  compiled = []

  def counting_compile(self, *args, **kwargs):
    compiled.append(1)
    return real_compile(self, *args, **kwargs)

  with mock.patch.object(jax.stages.Lowered, 'compile', counting_compile):
    [again] = tc.pool.check_jobs([eval_job(MESH_2X2)], slice_, cache=cache, log=lambda *_: None)
    assert not compiled and again['cached']
    assert again['memory'] == first['memory'] and again['fingerprint'] == first['fingerprint']
    # Another program (twice the rows) misses the cache and compiles.
    wider = [*MESH_2X2, 'EVAL_BATCH_SIZE=8']
    [other] = tc.pool.check_jobs([eval_job(wider)], slice_, cache=cache, log=lambda *_: None)
    assert compiled and not other['cached']
    assert other['fingerprint'] != first['fingerprint']
    assert other['memory']['argument'] > first['memory']['argument']


@pytest.mark.slow
def test_a_job_that_fails_to_compile_gives_exit_status_1(tmp_path, capsys):
  tc = _tpu_compile()
  out = tmp_path / 'rows.json'
  status = tc.cli.main(
    [
      *('--experiment', 'gin/experiments/main/pg19_t5_xl.gin', '--noeval'),
      *('--accelerator', 'v5e', '--topology', '2x2', '--json', str(out)),
      *('--binding', 'BATCH_SIZE=3'),  # 3 rows do not split over 4 devices
    ]
  )
  assert status == 1
  rows = json.loads(out.read_text())['jobs']
  assert [r['name'] for r in rows] == ['main/pg19_t5_xl/train']
  assert not rows[0]['fits'] and rows[0]['error']
  assert 'main/pg19_t5_xl/train' in capsys.readouterr().out


@pytest.mark.slow
def test_table_command_prints_the_docs_table(tmp_path):
  """`--table` as a user runs it (`python -m`), on a report of two jobs of one run."""
  gib = 2**30
  row = dict(fits=True, estimated_step_seconds=0.5, mfu_at_estimate=0.4, chip_hours=320.0)
  report = {
    'slice': 'v5e:4x8',
    'jobs': [
      {
        **row,
        'name': 'main/pg19_t5_xl/train',
        'kind': 'train',
        'peak_bytes_per_chip': 4 * gib,
        'estimated_run_hours': 10.0,
      },
      {
        **row,
        'name': 'main/pg19_t5_xl/eval_carried',
        'kind': 'eval',
        'peak_bytes_per_chip': gib,
        'estimated_run_hours': None,
        'chip_hours': None,
      },
    ],
  }
  path = tmp_path / 'report.json'
  path.write_text(json.dumps(report))
  out = subprocess.run(
    [sys.executable, '-m', 'melodi_t5x.tools.tpu_compile', '--table', str(path)],
    capture_output=True,
    text=True,
    check=True,
    cwd=REPO,
    env={**os.environ, 'JAX_PLATFORMS': 'cpu'},
  ).stdout
  assert '| v5e:4x8 | xl | 4.0 | 1.0 | 0.5 | 0.40 | 10.0 | 320 |' in out, out
  assert '| v5e:4x8 | **sweep total** |' in out, out
