"""Data parallelism from the model's logical axes alone (no T5X): 2 host CPU devices."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

# Slow tier: a subprocess with two host CPU devices.
pytestmark = pytest.mark.slow

_SCRIPT = textwrap.dedent(
  """
  import jax, jax.numpy as jnp, numpy as np
  from flax.linen import partitioning as nnp
  from flax import linen as nn
  from flax.core import unfreeze
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  from melodi_t5x.config import MelodiConfig
  from melodi_t5x.architectures.melodi import MelodiDecoder
  from melodi_t5x.partitioning import MELODI_AXIS_RULES

  assert jax.device_count() == 2, jax.devices()
  cfg = MelodiConfig(num_layers=2, embed_dim=32, num_heads=2, head_dim=16, mlp_dim=64,
                     vocab_size=64, window_length=8, summary_size=4, short_term_memory_size=4,
                     long_term_memory_layers=(1,), long_term_memory_increment_size=2,
                     long_term_memory_windows=4)
  model = MelodiDecoder(cfg)
  tokens = jnp.asarray(np.random.RandomState(0).randint(1, 64, (4, 32)))
  variables = model.init(jax.random.PRNGKey(0), tokens, enable_dropout=False)
  rules = [('batch', 'data'), ('length', None), ('embed', None), ('vocab', None), ('mlp', None),
           ('heads', None), ('kv', None), ('joined_kv', None), ('relpos_buckets', None),
           *MELODI_AXIS_RULES]
  mesh = Mesh(np.array(jax.devices()), ('data',))
  specs = {'params': unfreeze(nnp.get_axis_names(variables['params_axes'])),
           'memory': unfreeze(nnp.get_axis_names(variables['memory_axes']))}
  shard = nn.logical_to_mesh_sharding(specs, mesh, rules)
  data = NamedSharding(mesh, P('data'))

  def step(params, memory, tokens, sos):
    logits, new = model.apply({'params': params, 'memory': memory}, tokens,
                              start_of_sequence=sos, enable_dropout=False, mutable=['memory'])
    return logits, new['memory']

  def run(sharded):
    params, memory = variables['params'], variables['memory']
    fn = jax.jit(step)
    if sharded:
      params = jax.device_put(params, shard['params'])
      memory = jax.device_put(memory, shard['memory'])
      fn = jax.jit(step, in_shardings=(shard['params'], shard['memory'], data, data),
                   out_shardings=(data, shard['memory']))
    outs = []
    with mesh, nnp.axis_rules(rules):
      for k in range(3):
        sos = jnp.array([k == 0, k == 0, True, k == 0])
        logits, memory = fn(params, memory, jnp.roll(tokens, k, axis=1), sos)
        outs.append(np.asarray(logits))
    return outs, memory

  single, _ = run(False)
  multi, memory = run(True)
  for a, b in zip(single, multi):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
  leaf = memory['layers_1']['fifo']
  assert leaf.sharding.spec == P('data', None, None), leaf.sharding
  assert {s.data.shape for s in leaf.addressable_shards} == {(2, 8, 32)}
  print('DATA PARALLEL OK')
  """
)


def test_memory_and_batch_shard_over_data_axis_and_match_one_device():
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2', JAX_PLATFORMS='cpu')
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run(
    [sys.executable, '-c', _SCRIPT], env=env, cwd=root, capture_output=True, text=True, timeout=600
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert 'DATA PARALLEL OK' in proc.stdout
