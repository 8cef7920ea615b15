"""Rematerialisation (`BaseConfig.remat`) changes memory, never the numbers."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_configs import DIMS, MELODI_MEMORY

from melodi_t5x.architectures.melodi import MelodiDecoder
from melodi_t5x.architectures.xl import XLDecoder
from melodi_t5x.config import MelodiConfig, XLConfig
from melodi_t5x.tools import flops

# Long-term layer, dropout on (remat must replay the same dropout masks), 4 windows per segment.
MELODI = MelodiConfig(
  num_layers=2, **DIMS, **MELODI_MEMORY, dropout_rate=0.1, attention_dropout_rate=0.1
)
XL = XLConfig(num_layers=2, **DIMS, dropout_rate=0.1, attention_dropout_rate=0.1)
B, T = 2, 32
# Names of jax.checkpoint's primitive across jax versions.
_REMAT = {'checkpoint', 'remat', 'remat2'}


def _primitives(jaxpr) -> set[str]:
  names = set()
  for eqn in jaxpr.eqns:
    names.add(eqn.primitive.name)
    for value in eqn.params.values():
      for item in value if isinstance(value, (tuple, list)) else (value,):
        if isinstance(item, jax.extend.core.ClosedJaxpr):
          names |= _primitives(item.jaxpr)
        elif isinstance(item, jax.extend.core.Jaxpr):
          names |= _primitives(item)
  return names


def _loss_grads_and_temp_bytes(decoder_cls, base, mode):
  """Loss, parameter gradients, XLA temp bytes and the primitives of a train step."""
  rng = np.random.RandomState(0)
  tokens = jnp.asarray(rng.randint(1, base.vocab_size, (B, T + 1)))
  # Random parameters and carried memory of the right shapes (no init or forward compile); row 0
  # continues its document with non-zero memory, row 1 starts one.
  shapes = jax.eval_shape(
    lambda: decoder_cls(base).init(jax.random.PRNGKey(0), tokens[:, :-1], enable_dropout=False)
  )

  def fill(x):
    if jnp.issubdtype(x.dtype, jnp.integer):
      return jnp.full(x.shape, 3, x.dtype)
    return jnp.asarray(0.5 * rng.randn(*x.shape), x.dtype)

  params = jax.tree_util.tree_map(fill, shapes['params'])
  memory = {'memory': jax.tree_util.tree_map(fill, shapes['memory'])}
  model = decoder_cls(dataclasses.replace(base, remat=mode))

  def loss(params, memory):
    logits, new = model.apply(
      {'params': params, **memory},
      tokens[:, :-1],
      start_of_sequence=jnp.array([False, True]),
      rngs={'dropout': jax.random.PRNGKey(1)},
      mutable=['memory'],
    )
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1)
    # The written memory enters the loss, so its gradient path is compared too.
    carried = sum(jnp.mean(x) for x in jax.tree_util.tree_leaves(new))
    return jnp.mean(nll) + carried

  step = jax.jit(jax.value_and_grad(loss))
  args = (params, memory)
  compiled = step.lower(*args).compile()
  primitives = _primitives(jax.make_jaxpr(loss)(*args).jaxpr)
  executed = flops.dot_flops(jax.grad(loss), *args)
  return compiled(*args), compiled.memory_analysis().temp_size_in_bytes, primitives, executed


@pytest.mark.parametrize(
  'decoder_cls,base,modes',
  [
    (MelodiDecoder, MELODI, ('none', 'window')),
    pytest.param(MelodiDecoder, MELODI, ('none', 'layer'), marks=pytest.mark.slow),
    (XLDecoder, XL, ('none', 'layer')),
  ],
)
def test_loss_and_grads_equal_in_every_remat_setting(decoder_cls, base, modes):
  results = {mode: _loss_grads_and_temp_bytes(decoder_cls, base, mode) for mode in modes}
  (ref_loss, ref_grads), ref_temp, ref_prims, ref_flops = results['none']
  # Every setting recomputes the attention weights (layers.recomputed_attention); 'none' no other
  # matmul: at most the model's FLOPs plus the recomputed logits (tests/test_flops.py: equal for a
  # loss of the logits alone; here part of the carried memory's gradient is not needed).
  assert _REMAT & ref_prims
  assert 0 < ref_flops <= flops.step_flops(base, B, T, remat='none')
  ref_leaves = jax.tree_util.tree_leaves(ref_grads)
  assert len(ref_leaves) > 10 and all(float(jnp.max(jnp.abs(g))) > 0 for g in ref_leaves[:5])
  for mode in modes[1:]:
    (loss, grads), temp, prims, executed = results[mode]
    assert executed > ref_flops, mode  # the setting is really applied: it recomputes matmuls
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(ref_grads)
    for g, r in zip(jax.tree_util.tree_leaves(grads), ref_leaves):
      np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)
    if decoder_cls is MelodiDecoder:
      # The scanned windows keep fewer activations for the backward pass.
      assert temp < ref_temp, (mode, temp, ref_temp)


def test_remat_setting_is_validated_per_architecture():
  with pytest.raises(ValueError, match=r"MelodiConfig\.remat='full': must be one of"):
    dataclasses.replace(MELODI, remat='full')
  with pytest.raises(ValueError, match=r"XLConfig\.remat='window'.*no 'window'.*use 'layer'"):
    dataclasses.replace(XL, remat='window')
