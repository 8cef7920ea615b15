"""Two JAX processes (CPU, 2 devices each, gloo collectives) run the real T5X entry points.

The quickstart (`gin/quickstart.gin`, `local_books`, a few steps) is trained by two processes
over a data-parallel mesh of 4 devices (`gin/runs/cpu_data_parallel_train.gin`) with train-eval,
then evaluated by two `t5x.eval` processes. Checks: training losses equal a one-process run of the
same global batch (4 devices, `stream_shards=2`), to float tolerance; train-eval perplexity
equals the one-process one; the eval report counts every token of the validation split exactly
once (host 0 streams two plays, host 1 one: the hosts run different numbers of batches) and its
perplexity equals a one-process, one-device eval; a two-process run killed after a checkpoint
resumes exactly; a two-process checkpoint resumed by one process, and a one-process checkpoint by
two, continue exactly (T5X's per-process dataset files); `t5x.eval` with the model axis across the
two processes (data=1 x model=2, one device each) counts every token once and equals one process.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import needs
import pytest
from t5x_trainers import logged_metric

pytestmark = pytest.mark.slow
needs.t5x()

import numpy as np  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 6
EVAL_LENGTH = 1024
# The quickstart with fewer steps, over a data-parallel mesh of the devices of every process.
TRAIN_GIN = f"""
from __gin__ import dynamic_registration
import __main__ as train_script
import melodi_t5x.t5x_gin
from melodi_t5x import t5x_data
from melodi_t5x import t5x_schedule
from t5x import utils

include 'gin/quickstart.gin'
include 'gin/runs/cpu_data_parallel_train.gin'

TRAIN_STEPS = {STEPS}
train_script.train:
  eval_period = 4
  eval_steps = 2
  stats_period = 1
utils.SaveCheckpointConfig:
  period = 2
  keep = None
t5x_schedule.warmup_cosine.warmup_steps = 2
# The global batch is the same for one and two processes: two streams of 4 rows each.
t5x_data.get_dataset.stream_shards = 2
"""
# The whole validation split (3 plays) in 1024-token segments, 4 rows.
EVAL_GIN = f"""
from __gin__ import dynamic_registration
import melodi_t5x.t5x_gin
from t5x import utils

include 'gin/quickstart_eval.gin'

TASK_FEATURE_LENGTHS = {{'targets': {EVAL_LENGTH}}}
EVAL_BATCH_SIZE = 4
utils.DatasetConfig.split = 'validation'
"""
DATA_PARALLEL_EVAL = "include 'gin/runs/cpu_data_parallel_eval.gin'\n"


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _gin_flags(gin_files, bindings):
  flags = [f'--gin_file={g}' for g in gin_files]
  return flags + [f'--gin.{k}={v!r}' for k, v in bindings]


def _env(devices: int):
  env = dict(os.environ)
  env['PYTHONPATH'] = os.pathsep.join([REPO, env.get('PYTHONPATH', '')])
  env['JAX_PLATFORMS'] = 'cpu'
  env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
  return env


def _launch(script, gin_files, bindings, logs, processes, devices=None):
  """Starts `processes` processes of `t5x.<script>` (1: plain; 2: via melodi_t5x.multihost).

  `devices`: CPU devices per process (default: 4 for one training process, else 1 or 2).
  """
  port = _free_port()
  procs = []
  for i, log in enumerate(logs):
    if processes == 1:
      cmd = [sys.executable, '-m', f't5x.{script}']
      env = _env(devices or (4 if script == 'train' else 1))
    else:
      cmd = [
        sys.executable,
        '-m',
        'melodi_t5x.multihost',
        f'--coordinator_address=127.0.0.1:{port}',
      ]
      cmd += [f'--num_processes={processes}', f'--process_id={i}', '--cpu_collectives=gloo', '--']
      cmd += [f't5x.{script}']
      env = _env(devices or 2)
    cmd += ['--alsologtostderr', *_gin_flags(gin_files, bindings)]
    out = open(log, 'w')
    procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT))
  return procs


def _wait(procs, logs):
  for p, log in zip(procs, logs):
    rc = p.wait(timeout=900)
    assert rc == 0, f'rc={rc}; log {log}:\n' + open(log).read()[-4000:]


def _run(script, gin_files, bindings, logs, processes, devices=None):
  _wait(_launch(script, gin_files, bindings, logs, processes, devices), logs)


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """One-process and two-process training of the quickstart (same global batch)."""
  d = tmp_path_factory.mktemp('multihost')
  (d / 'train.gin').write_text(TRAIN_GIN)
  (d / 'eval_one.gin').write_text(EVAL_GIN)
  (d / 'eval_two.gin').write_text(EVAL_GIN + DATA_PARALLEL_EVAL)
  # Both runs at once (they are independent) to save wall time.
  one = _launch(
    'train', [d / 'train.gin'], [('MODEL_DIR', str(d / 'one'))], [d / 'train_one.log'], 1
  )
  two_logs = [d / 'train_two_0.log', d / 'train_two_1.log']
  two = _launch('train', [d / 'train.gin'], [('MODEL_DIR', str(d / 'two'))], two_logs, 2)
  _wait(one, [d / 'train_one.log'])
  _wait(two, two_logs)
  return d


def test_two_process_training_equals_one_process(runs):
  name = 'loss_per_nonpadding_target_token'
  one = logged_metric(runs / 'train_one.log', 'train', name)
  two = logged_metric(runs / 'train_two_0.log', 'train', name)
  assert sorted(one) == sorted(two) == list(range(1, STEPS + 1)), (one, two)
  print('step  one-process  two-process')
  for s in sorted(one):
    print(f'{s:4d}  {one[s]:.6f}     {two[s]:.6f}')
  np.testing.assert_allclose([two[s] for s in one], [one[s] for s in one], rtol=2e-5)
  assert len(set(one.values())) > 1  # really different batches at each step
  # Train-eval (2 steps of the validation plays, memory carried) on both: same numbers.
  ppl_one = logged_metric(runs / 'train_one.log', 'training_eval/local_books', 'perplexity')
  ppl_two = logged_metric(runs / 'train_two_0.log', 'training_eval/local_books', 'perplexity')
  assert sorted(ppl_one) == sorted(ppl_two) and STEPS in ppl_one, (ppl_one, ppl_two)
  for s in ppl_one:
    assert ppl_two[s] == pytest.approx(ppl_one[s], rel=1e-5)
  misaligned = logged_metric(runs / 'train_two_0.log', 'train', 'memory/misaligned_rows')
  assert misaligned and set(misaligned.values()) == {0.0}


def test_two_process_eval_covers_the_split_once(runs):
  import tasks  # noqa: F401  # pylint: disable=g-import-not-at-top
  from melodi_t5x import t5x_eval  # pylint: disable=g-import-not-at-top
  from tasks import streaming  # pylint: disable=g-import-not-at-top

  ckpt = str(runs / 'two' / f'checkpoint_{STEPS}')
  out_two, out_one = runs / 'eval_two', runs / 'eval_one'
  logs = [runs / 'eval_two_0.log', runs / 'eval_two_1.log']
  two = _launch(
    'eval',
    [runs / 'eval_two.gin'],
    [('CHECKPOINT_PATH', ckpt), ('EVAL_OUTPUT_DIR', str(out_two))],
    logs,
    2,
  )
  one = _launch(
    'eval',
    [runs / 'eval_one.gin'],
    [('CHECKPOINT_PATH', ckpt), ('EVAL_OUTPUT_DIR', str(out_one))],
    [runs / 'eval_one.log'],
    1,
  )
  _wait(two, logs)
  _wait(one, [runs / 'eval_one.log'])
  rep_two = json.loads(open(t5x_eval.report_path(str(out_two), 'local_books', STEPS)).read())
  rep_one = json.loads(open(t5x_eval.report_path(str(out_one), 'local_books', STEPS)).read())
  # The split's real tokens, counted from the document stream itself (every chunk once).
  stream = streaming.DocumentStreamIterator(
    'local_books', split='validation', batch_size=4, chunk_length=EVAL_LENGTH, shuffle=False,
    repeat=False,
  )  # fmt: skip
  tokens, documents = 0, set()
  for batch in stream:
    tokens += int(batch['decoder_loss_weights'].sum())
    documents |= set(batch['document_id'][batch['row_valid']].tolist())
  print(
    f'split tokens {tokens}, documents {len(documents)}; two-process report: tokens '
    f'{rep_two["tokens"]}, documents {rep_two["documents"]}, hosts {rep_two["hosts"]}, '
    f'perplexity {rep_two["perplexity"]:.6f}; one-process perplexity {rep_one["perplexity"]:.6f}'
  )
  assert rep_two['hosts'] == 2 and rep_one['hosts'] == 1
  assert rep_two['tokens'] == rep_one['tokens'] == tokens
  assert rep_two['documents'] == len(documents) == 3
  assert rep_two['chunks'] == rep_one['chunks']
  assert rep_two['perplexity'] == pytest.approx(rep_one['perplexity'], rel=1e-5)
  for a, b in zip(rep_two['position_buckets'], rep_one['position_buckets']):
    assert a['tokens'] == b['tokens']


def test_two_process_kill_and_resume_continues_exactly(runs):
  model_dir = runs / 'two_killed'
  bindings = [('MODEL_DIR', str(model_dir))]
  logs = [runs / 'kill_0.log', runs / 'kill_1.log']
  procs = _launch('train', [runs / 'train.gin'], bindings, logs, 2)
  deadline = time.time() + 600
  while not (model_dir / 'checkpoint_2').exists():
    assert all(p.poll() is None for p in procs), open(logs[0]).read()[-3000:]
    assert time.time() < deadline
    time.sleep(0.1)
  for p in procs:
    p.send_signal(signal.SIGKILL)
  for p in procs:
    p.wait()
  name = 'loss_per_nonpadding_target_token'
  killed = logged_metric(logs[0], 'train', name)
  assert not killed or max(killed) < STEPS  # really interrupted
  resume_logs = [runs / 'resume_0.log', runs / 'resume_1.log']
  _run('train', [runs / 'train.gin'], bindings, resume_logs, 2)
  resumed = logged_metric(resume_logs[0], 'train', name)
  start = min(resumed) - 1
  assert start >= 2 and start % 2 == 0, sorted(resumed)
  uninterrupted = logged_metric(runs / 'train_two_0.log', 'train', name)
  assert resumed == {s: uninterrupted[s] for s in range(start + 1, STEPS + 1)}


def _truncated_copy(src, dst, last_step):
  """A copy of a model dir without the checkpoints after `last_step` (a run stopped there)."""
  shutil.copytree(src, dst)
  for path in dst.glob('checkpoint_*'):
    if int(path.name.split('_')[1]) > last_step:
      shutil.rmtree(path)


def test_resume_on_another_process_count_continues_exactly(runs):
  """Issue 16 item 1: two processes' checkpoint resumed by one process, and one's by two.

  T5X saves the data position per process (`dataset/process_{i}-of-{n}/train_ds-...`) and
  restores `process_{i}-of-{n'}` on n' processes: a file that was never written.
  """
  name = 'loss_per_nonpadding_target_token'
  two_to_one, one_to_two = runs / 'two_to_one', runs / 'one_to_two'
  _truncated_copy(runs / 'two', two_to_one, 4)
  _truncated_copy(runs / 'one', one_to_two, 4)
  assert (two_to_one / 'checkpoint_4' / 'dataset' / 'process_1-of-2').is_dir()
  logs_one = [runs / 'two_to_one.log']
  logs_two = [runs / 'one_to_two_0.log', runs / 'one_to_two_1.log']
  one = _launch('train', [runs / 'train.gin'], [('MODEL_DIR', str(two_to_one))], logs_one, 1)
  two = _launch('train', [runs / 'train.gin'], [('MODEL_DIR', str(one_to_two))], logs_two, 2)
  _wait(one, logs_one)
  _wait(two, logs_two)
  uninterrupted = logged_metric(runs / 'train_two_0.log', 'train', name)
  for log in (logs_one[0], logs_two[0]):
    resumed = logged_metric(log, 'train', name)
    print(log.name, {s: f'{v:.6f}' for s, v in resumed.items()})
    assert sorted(resumed) == [5, 6], resumed  # resumed from checkpoint_4
    for step, loss in resumed.items():
      assert loss == pytest.approx(uninterrupted[step], rel=2e-5), (log.name, step)
    misaligned = logged_metric(log, 'train', 'memory/misaligned_rows')
    assert misaligned and set(misaligned.values()) == {0.0}  # every row went on with its document
  print('uninterrupted', {s: f'{uninterrupted[s]:.6f}' for s in (5, 6)})


def test_eval_with_the_model_axis_across_processes(runs):
  """Issue 16 item 8: data=1 x model=2 over two processes (one device each).

  Both processes hold the same rows (one replica set): memory has the global batch of the data
  shards (not batch x processes) and the rows are counted once.
  """
  import tasks  # noqa: F401  # pylint: disable=g-import-not-at-top
  from melodi_t5x import t5x_eval  # pylint: disable=g-import-not-at-top

  gin_file = runs / 'eval_model_axis.gin'
  text = EVAL_GIN.replace(
    'from t5x import utils\n',
    'from t5x import utils\nfrom melodi_t5x import partitioning as melodi_partitioning\n',
  )
  text += DATA_PARALLEL_EVAL + 'melodi_partitioning.HostMeshPartitioner.num_partitions = 2\n'
  gin_file.write_text(text)
  ckpt = str(runs / 'two' / f'checkpoint_{STEPS}')
  out = runs / 'eval_model_axis'
  logs = [runs / 'eval_model_axis_0.log', runs / 'eval_model_axis_1.log']
  bindings = [('CHECKPOINT_PATH', ckpt), ('EVAL_OUTPUT_DIR', str(out))]
  _run('eval', [gin_file], bindings, logs, 2, devices=1)
  rep = json.loads(open(t5x_eval.report_path(str(out), 'local_books', STEPS)).read())
  one_dir = runs / 'eval_one_model_axis'
  _run(
    'eval',
    [runs / 'eval_one.gin'],
    [('CHECKPOINT_PATH', ckpt), ('EVAL_OUTPUT_DIR', str(one_dir))],
    [runs / 'eval_one_model_axis.log'],
    1,
  )
  rep_one = json.loads(open(t5x_eval.report_path(str(one_dir), 'local_books', STEPS)).read())
  print(
    f'data=1 x model=2 on 2 processes: tokens {rep["tokens"]}, documents {rep["documents"]}, '
    f'perplexity {rep["perplexity"]:.6f}; one process: tokens {rep_one["tokens"]}, perplexity '
    f'{rep_one["perplexity"]:.6f}'
  )
  assert rep['hosts'] == 2 and rep['misaligned_rows'] == 0
  assert (rep['tokens'], rep['documents'], rep['chunks']) == (
    rep_one['tokens'],
    rep_one['documents'],
    rep_one['chunks'],
  )
  assert rep['perplexity'] == pytest.approx(rep_one['perplexity'], rel=1e-5)
