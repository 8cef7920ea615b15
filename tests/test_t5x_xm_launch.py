"""The launcher's job lists: every sweep, timing, one experiment file, the job image.

The GKE manifests, the dry run and a launch against fake clouds are in test_xm_launch_gke.py; the
step runner in test_xm_launch_steps.py.
"""

from __future__ import annotations

import os
import re

import pytest
from paper_sweeps import TRAIN_RUNS

from melodi_t5x import experiments
from xm_launch import jobs as jobs_lib

REPO = experiments.REPO_ROOT
ROOT = 'gs://bucket/melodi'


@pytest.mark.parametrize('sweep', sorted(TRAIN_RUNS))
def test_sweep_jobs(sweep):
  jobs = jobs_lib.sweep_jobs(ROOT, sweep=sweep)
  train = [j for j in jobs if j.kind == 'train']
  assert len(train) == TRAIN_RUNS[sweep]
  assert len({j.model_dir for j in train}) == len(train)  # one MODEL_DIR per run
  assert len(jobs) == 3 * len(train)  # + eval carried and reset
  names = [j.name for j in jobs]
  assert len(set(names)) == len(names)
  for job in train:
    exp_file = job.gin_files[1]
    assert job.gin_files[0] == experiments.TRAIN_MODE_GIN
    assert os.path.exists(os.path.join(REPO, exp_file))
    # A configuration that another family also lists trains once, in that run's folder.
    run_sweep = exp_file.split('/')[-2] if 'ablations/' in exp_file else 'main'
    assert job.model_dir == f'{ROOT}/{run_sweep}/{os.path.basename(exp_file)[:-4]}'
    assert f'MODEL_DIR="{job.model_dir}"' in job.bindings
  steps = 500_000 if sweep == 'main' else 200_000
  for job in jobs:
    if job.kind.startswith('eval_'):
      mode = job.kind[len('eval_') :]
      assert job.after == job.name.rsplit('/', 1)[0] + '/train'
      assert job.gin_files[0] == experiments.EVAL_MODE_GIN
      assert f'CHECKPOINT_PATH="{job.model_dir}/checkpoint_{steps}"' in job.bindings
      assert f'MEMORY_MODE="{mode}"' in job.bindings


def test_timing_and_single_experiment_jobs():
  timing = jobs_lib.sweep_jobs(ROOT, sweep='timing', timing_topology='1x1')
  assert len(timing) == 2 * len(experiments.TIMING_MODELS)
  outs = [j.flags[j.flags.index('--json') + 1] for j in timing]
  assert len(set(outs)) == len(outs)
  for job in timing:
    # The experiment's own gin files (as t5x.train reads them), at the timing depth.
    assert job.module == 'melodi_t5x.tools.bench' and '--gin_file' in job.flags
    assert job.flags[job.flags.index('--gin') + 1 :].count('NUM_LAYERS = 12') == 1
  # Every paper-size timing job's flags build the config it times (nothing is compiled).
  from melodi_t5x.tools import bench  # pylint: disable=g-import-not-at-top

  for job in timing:
    cfg = bench.config_from_args(bench.parse_args(list(job.flags)))
    assert (cfg.num_layers, cfg.embed_dim, cfg.window_length) == (12, 1024, 512)
  one = jobs_lib.sweep_jobs(ROOT, experiment='gin/experiments/ablations/coverage/fifo016.gin')
  assert [j.kind for j in one] == ['train', 'eval_carried', 'eval_reset']
  with pytest.raises(ValueError, match='not an experiment file'):
    jobs_lib.sweep_jobs(ROOT, experiment='gin/quickstart.gin')
  with pytest.raises(ValueError, match='exactly one'):
    jobs_lib.sweep_jobs(ROOT)
  with pytest.raises(ValueError, match='divide the batch'):
    jobs_lib.check_topology('v5e', '4x6')
  assert jobs_lib.check_topology('v4', '2x2x4') == 16


def test_tiny_timing_jobs_time_the_tiny_models():
  """`--sweep=timing --size=tiny --local`: the rehearsal models' sizes (gin/models/tiny.gin)."""
  from melodi_t5x.tools import bench  # pylint: disable=g-import-not-at-top

  timing = jobs_lib.sweep_jobs(ROOT, sweep='timing', size='tiny')
  assert len(timing) == 2 * len(experiments.TIMING_MODELS)
  by_model = {}
  for job in timing:
    cfg = bench.config_from_args(bench.parse_args(list(job.flags)))
    assert (cfg.num_layers, cfg.embed_dim, cfg.mlp_dim, cfg.window_length) == (2, 64, 256, 32)
    by_model[job.name.split('/')[1]] = cfg
  # MELODI S192+L32 at 1/16: S12 + L2, long-term layer 1, FIFO of 16 windows (tiny.gin).
  melodi = by_model['melodi_s192_l32']
  assert (melodi.summary_size, melodi.short_term_memory_size) == (12, 12)
  assert melodi.long_term_memory_increment_size == 2
  assert melodi.long_term_memory_layers == (1,) and melodi.long_term_memory_windows == 16
  assert by_model['memorizing'].memory_size == 1024 and by_model['brt'].num_states == 32
  with pytest.raises(ValueError, match='--task does not apply'):
    jobs_lib.sweep_jobs(ROOT, sweep='timing', size='tiny', task='local_books')


def test_job_image_dockerfile():
  """The job image: the full stack in this order, the Cloud SDK (T5X moves GCS checkpoints with
  `gcloud storage mv`), files copied from the repository (the build context)."""
  dockerfile = jobs_lib.dockerfile()
  assert dockerfile.startswith(f'FROM {jobs_lib.BASE_IMAGE}\n')
  steps = [
    'google-cloud-cli',
    'RUN python -m pip install -r requirements.txt',
    'RUN python -m pip install --no-deps -r requirements-t5x.txt',
    'RUN python -m pip install -r requirements-tpu.txt',
    'COPY . ./',
    'RUN python -m pip install --no-deps -e .',
    'RUN python -c "import t5x.train, t5x.eval, melodi_t5x.t5x_model, tasks, xm_launch.steps, '
    'xm_launch.runner"',
  ]
  positions = [dockerfile.index(s) for s in steps]
  assert positions == sorted(positions)
  copied = re.findall(r'^COPY (.+) \./$', dockerfile, flags=re.M)[0].split()
  for name in copied:
    assert os.path.exists(os.path.join(REPO, name)), name


def test_container_requirements_are_pinned():
  t5x_reqs = open(os.path.join(REPO, 'requirements-t5x.txt')).read()
  for package in ('t5x', 'airio', 'jestimator'):
    assert re.search(rf'^{package} @ git\+\S+@[0-9a-f]{{40}}$', t5x_reqs, flags=re.M), package
  core = open(os.path.join(REPO, 'requirements.txt')).read()
  jax_version = re.search(r'^jax==(\S+)$', core, flags=re.M).group(1)
  tpu = open(os.path.join(REPO, 'requirements-tpu.txt')).read()
  assert re.search(rf'^jax\[tpu\]=={re.escape(jax_version)}$', tpu, flags=re.M)
