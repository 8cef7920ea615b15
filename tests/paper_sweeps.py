"""How many training runs each sweep of the experiment suite has, stated once for the tests that
count them (`test_experiments.py`: the generator's sweeps; `test_t5x_xm_launch.py`: the launcher's
jobs). `main` is 3 datasets x 6 models; the others are the PG-19 ablations."""

# Training runs per sweep (the launcher adds a carried and a reset eval job to each).
TRAIN_RUNS = {
  'main': 18,
  'memory_tradeoff': 12,
  'coverage': 7,
  'window': 15,
  'short_layers': 8,
  'long_layers': 2,
  'branching': 3,
}
