"""Batches of the document streamer in the tests: two runs compared, and the dataset config
that `melodi_t5x.t5x_data` reads (no T5X needed)."""

from __future__ import annotations

import dataclasses

import numpy as np

from tasks.streaming import BATCH_KEYS


def assert_batches_equal(a, b, keys=BATCH_KEYS) -> None:
  """Two lists of batches are equal key by key; with `keys`, every batch has exactly those keys."""
  assert len(a) == len(b)
  for x, y in zip(a, b):
    if keys is not None:
      assert set(x) == set(y) == set(keys)
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


@dataclasses.dataclass(frozen=True)
class DatasetConfig:
  """The fields of `t5x.utils.DatasetConfig` that `t5x_data` reads."""

  # seqio task or mixture.
  mixture_or_task_name: str = 'local_books'
  # {'targets': chunk length}.
  task_feature_lengths: dict = dataclasses.field(default_factory=lambda: {'targets': 512})
  # Split of the task.
  split: str = 'train'
  # Rows of a global batch.
  batch_size: int = 4
  # Shuffle the documents (training).
  shuffle: bool = True
  # Shuffle seed.
  seed: int = 0
  # Packing (the streamer refuses it).
  pack: bool = False
