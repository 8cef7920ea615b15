"""The XManager sweep builds correct t5x.train flags (no xmanager or T5X needed)."""

import os

import pytest

from xm_launch import launch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_sweep_points():
  points = launch.sweep_gin_args('pg19_t5', 'gs://b/m/', seeds=(0, 1))
  assert len(points) == 6 and len({p['name'] for p in points}) == 6
  for p in points:
    gin_files = [a.split('=', 1)[1] for a in p['args'] if a.startswith('--gin_file=')]
    assert all(os.path.exists(os.path.join(REPO, g)) for g in gin_files)
    assert f"--gin.MODEL_DIR='gs://b/m/{p['name']}'" in p['args']
  with pytest.raises(ValueError, match='required'):
    launch.sweep_gin_args('', 'gs://b')
