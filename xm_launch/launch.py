"""XManager launcher: the three paper MELODI sizes on Cloud TPU, one `t5x.train` job each.

Not runnable here (needs `xmanager` and a GCP project). `sweep_gin_args` is plain Python and
tested; `xmanager` is imported only by `main`.

  python xm_launch/launch.py --task=pg19_t5 --model_dir_root=gs://bucket/melodi --tpu=v4-32
"""

from __future__ import annotations

import itertools

# (gin model file, short name) of the paper's configurations.
PAPER_SIZES = (
  ('gin/models/melodi_s192_l32.gin', 's192_l32'),
  ('gin/models/melodi_s128_l64.gin', 's128_l64'),
  ('gin/models/melodi_s192_l96.gin', 's192_l96'),
)
RUN_GIN = 'gin/runs/melodi_pretrain.gin'


def sweep_gin_args(task: str, model_dir_root: str, sizes=PAPER_SIZES, seeds=(0,)) -> list[dict]:
  """One `{'name', 'args'}` per sweep point: the `python -m t5x.train` flags of that job."""
  if not task or not model_dir_root:
    raise ValueError('task and model_dir_root are required (e.g. pg19_t5, gs://bucket/melodi).')
  points = []
  for (gin_file, size), seed in itertools.product(sizes, seeds):
    name = f'{task}_{size}_seed{seed}'
    points.append(
      {
        'name': name,
        'args': [
          f'--gin_file={gin_file}',
          f'--gin_file={RUN_GIN}',
          f"--gin.MIXTURE_OR_TASK_NAME='{task}'",
          f"--gin.MODEL_DIR='{model_dir_root.rstrip('/')}/{name}'",
          f'--gin.DATA_SEED={seed}',
          f'--gin.RANDOM_SEED={seed}',
        ],
      }
    )
  return points


def main(argv):  # pragma: no cover - needs xmanager and GCP
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  from xmanager import xm, xm_local  # pylint: disable=g-import-not-at-top

  f = flags.FLAGS
  with xm_local.create_experiment(experiment_title=f'melodi_{f.task}') as experiment:
    [executable] = experiment.package(
      [
        xm.python_container(
          executor_spec=xm_local.Vertex.Spec(),
          path='.',
          base_image='python:3.11',
          entrypoint=xm.ModuleName('t5x.train'),
        )
      ]
    )
    for point in sweep_gin_args(f.task, f.model_dir_root):
      experiment.add(
        xm.Job(
          executable=executable,
          executor=xm_local.Vertex(requirements=xm.JobRequirements(tpu_v4=int(f.tpu_cores))),
          args=point['args'],
        )
      )


if __name__ == '__main__':  # pragma: no cover
  from absl import app, flags  # pylint: disable=g-import-not-at-top

  flags.DEFINE_string('task', 'pg19_t5', 'seqio task.')
  flags.DEFINE_string('model_dir_root', None, 'GCS root of the model dirs.', required=True)
  flags.DEFINE_integer('tpu_cores', 32, 'TPU v4 cores per job (batch 32 = one row per core).')
  app.run(main)
