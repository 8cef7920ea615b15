"""Analytic FLOPs equal the traced matmuls; the bench's optimizer equals T5X's Adafactor."""

from __future__ import annotations

import architecture_configs
import jax
import jax.numpy as jnp
import needs
import numpy as np
import pytest
from tiny_configs import DIMS, MELODI_MEMORY

from melodi_t5x import architectures
from melodi_t5x.config import BaseConfig, MelodiConfig
from melodi_t5x.tools import bench, flops


def _configs():
  """Every architecture of the registry at its tiny size, and variants that exercise more terms."""
  yield from architecture_configs.every_tiny_config().items()
  # A memory-free layer, a long-term layer and M != S: every term of MELODI's formula.
  yield (
    'melodi_variant',
    architecture_configs.tiny_config(
      'melodi', num_layers=3, short_term_memory_size=6, no_memory_layers=(2,)
    ),
  )
  yield 'memorizing_top_k', architecture_configs.tiny_config('memorizing', memory_top_k=5)


CONFIGS = dict(_configs())
# Sizes whose attention-weight shape no other residual has (d=32, 2 heads, B=2, windows of 8).
MELODI = MelodiConfig(
  num_layers=3,
  **DIMS,
  **{**MELODI_MEMORY, 'short_term_memory_size': 6},
  no_memory_layers=(2,),
)


@pytest.mark.parametrize('name', sorted(CONFIGS))
@pytest.mark.parametrize('windows', [1, 2])
def test_analytic_forward_flops_equal_traced_matmuls(name, windows):
  """Forward = a third of the train-step FLOPs, matmul for matmul (scan bodies x windows)."""
  module = architectures.build_decoder(CONFIGS[name])
  batch, length = 2, windows * module.config.window_length
  tokens = jax.ShapeDtypeStruct((batch, length), jnp.int32)
  variables = jax.eval_shape(
    lambda t: module.init(jax.random.PRNGKey(0), t, enable_dropout=False), tokens
  )

  def forward(v, t):
    return module.apply(v, t, enable_dropout=False, mutable=['memory'])

  traced = flops.dot_flops(forward, variables, tokens)
  analytic = flops.train_flops(module.config, batch, length)
  assert traced > 0
  assert analytic['total'] == 3 * traced
  assert analytic['total'] == sum(v for k, v in analytic.items() if k != 'total')


def test_jaxpr_counter_multiplies_scan_bodies():
  x = jnp.ones((4, 8))
  w = jnp.ones((8, 8))

  def scanned(x, w):
    return jax.lax.scan(lambda c, _: (c @ w, None), x, None, length=5)[0]

  assert flops.dot_flops(scanned, x, w) == 5 * 2 * 4 * 8 * 8


def test_unknown_config_names_the_known_architectures():
  with pytest.raises(TypeError, match='no architecture is registered.*MelodiConfig'):
    flops.train_flops(BaseConfig(), 1, 8)


def test_bench_optimizer_equals_t5x_adafactor_of_the_gin_files():
  adafactor = needs.importorskip('t5x.adafactor')

  rng = np.random.RandomState(0)
  # Factored (both dims >= 128), unfactored matrix (a dim < 128) and a vector.
  params = {
    'w': jnp.asarray(rng.randn(256, 160), jnp.float32),
    'v': jnp.asarray(rng.randn(8, 300) * 0.01, jnp.float32),
    'b': jnp.asarray(rng.randn(64), jnp.float32),
  }
  ref = adafactor.Adafactor(learning_rate=0.01, decay_rate=0.8, beta1=0.9, step_offset=0)
  ours = bench.training_optimizer(0.01)
  ref_step = jax.jit(lambda p, s, g: ref.apply_gradient(ref.hyper_params, p, s, g))

  @jax.jit
  def our_step(p, s, g):
    updates, s = ours.update(g, s, p)
    return jax.tree_util.tree_map(lambda a, b: a + b, p, updates), s

  ref_params, ref_state = params, ref.init_state(params)
  our_params, our_state = params, ours.init(params)
  for step in range(4):
    grads = jax.tree_util.tree_map(
      lambda p, s=step: jnp.asarray(np.random.RandomState(s).randn(*p.shape), jnp.float32), params
    )
    ref_params, ref_state = ref_step(ref_params, ref_state, grads)
    our_params, our_state = our_step(our_params, our_state, grads)
    for key in params:
      np.testing.assert_allclose(our_params[key], ref_params[key], rtol=1e-5, atol=1e-7)


# Architectures whose recomputation `flops.recompute_flops` writes out (the Memorizing
# Transformer's memory layer recomputes its query blocks on top, not counted there).
RECOMPUTED = [n for n in architectures.names() if n != 'memorizing'] + ['melodi_variant']


@pytest.mark.parametrize('name', RECOMPUTED)
def test_train_step_matmuls_are_model_flops_plus_recomputed_logits(name):
  """The traced gradient executes 3x the forward matmuls plus one q.k per attention."""
  module = architectures.build_decoder(CONFIGS[name])
  batch, length = 2, 3 * module.config.window_length
  tokens = jax.ShapeDtypeStruct((batch, length), jnp.int32)
  variables = jax.eval_shape(
    lambda t: module.init(jax.random.PRNGKey(0), t, enable_dropout=False), tokens
  )

  def loss(params, v, t):
    logits, _ = module.apply({**v, 'params': params}, t, enable_dropout=False, mutable=['memory'])
    return jnp.sum(logits)

  traced = flops.dot_flops(jax.grad(loss), variables['params'], variables, tokens)
  model = flops.train_flops(module.config, batch, length)['total']
  extra = flops.recompute_flops(module.config, batch, length)
  assert 0 < extra < 0.1 * model
  assert traced == model + extra == flops.step_flops(module.config, batch, length)


def test_melodi_keeps_no_attention_probabilities_for_the_backward():
  """No residual of the train step has the [.., H, W+S, M+W+S] shape of attention weights."""
  saved_residuals = pytest.importorskip('jax._src.ad_checkpoint').saved_residuals
  module = architectures.build_decoder(MELODI)
  batch, length = 2, 3 * MELODI.window_length
  tokens = jnp.ones((batch, length), jnp.int32)
  variables = module.init(jax.random.PRNGKey(0), tokens, enable_dropout=False)

  def loss(params):
    logits, _ = module.apply(
      {**variables, 'params': params}, tokens, enable_dropout=False, mutable=['memory']
    )
    return jnp.sum(logits)

  nq = MELODI.window_length + MELODI.summary_size
  widths = {MELODI.short_memory_size(i) + nq for i in range(MELODI.num_layers)}
  widths.add(MELODI.long_term_memory_tokens)
  shapes = [aval.shape for aval, _ in saved_residuals(loss, variables['params'])]
  assert shapes
  for shape in shapes:
    attention_like = len(shape) >= 4 and shape[-2] == nq and shape[-1] in widths
    assert not (attention_like and MELODI.num_heads in shape), shape
