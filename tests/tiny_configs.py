"""Tiny model settings shared by the unit tests; each test file spells out only what it varies."""

# Dimensions of the tiny test models: d=32, 2 heads of 16, MLP 64, 97 ids, windows of 8.
DIMS = dict(embed_dim=32, num_heads=2, head_dim=16, mlp_dim=64, vocab_size=97, window_length=8)
# MELODI memory: S = M = 4; long-term layer 1 with L = 2 and a FIFO of 3 windows (wraps quickly).
MELODI_MEMORY = dict(
  summary_size=4,
  short_term_memory_size=4,
  long_term_memory_layers=(1,),
  long_term_memory_increment_size=2,
  long_term_memory_windows=3,
)
# Smaller still: d=16, 2 heads of 8, MLP 32, 32 ids, windows of 4.
SMALL_DIMS = dict(embed_dim=16, num_heads=2, head_dim=8, mlp_dim=32, vocab_size=32, window_length=4)
# The in-process T5X tests' MELODI: one layer of SMALL_DIMS with windows of 8, S = M = 2, no
# long-term layer, float32.
T5X_MELODI = dict(
  SMALL_DIMS,
  num_layers=1,
  window_length=8,
  summary_size=2,
  short_term_memory_size=2,
  long_term_memory_layers=(),
  dtype='float32',
)
