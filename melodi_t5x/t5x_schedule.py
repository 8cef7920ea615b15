"""The paper's learning-rate schedule: linear warmup, then cosine from `base` down to `final`.

`lr(step) = min(step, warmup_steps) / warmup_steps * cosine(max(step, warmup_steps))` with
`cosine(s) = final + (base - final) * (1 + cos(pi * min(s, decay_steps) / decay_steps)) / 2`,
as in meliad's `lr_cosine_decay` (MELODI: warmup 1000, 0.01 -> 0.001 over 500k steps). Bind it as
`trainer.Trainer.learning_rate_fn = @t5x_schedule.warmup_cosine()`.
"""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp


def warmup_cosine(
  base_learning_rate: float = 0.01,
  final_learning_rate: float = 0.001,
  warmup_steps: int = 1000,
  decay_steps: int = 500_000,
) -> Callable[[jnp.ndarray], jnp.ndarray]:
  """Returns `step -> learning rate` (float32), usable inside a jitted T5X train step.

  Args:
    base_learning_rate: peak learning rate (reached at the end of warmup, before decay).
    final_learning_rate: learning rate at and after `decay_steps`.
    warmup_steps: steps of linear warmup from 0 (0 disables warmup).
    decay_steps: step at which the cosine reaches `final_learning_rate` (e.g. TRAIN_STEPS).

  Raises:
    ValueError: for negative or inconsistent settings.
  """
  if warmup_steps < 0:
    raise ValueError(f'warmup_steps={warmup_steps} must be >= 0.')
  if decay_steps <= 0:
    raise ValueError(f'decay_steps={decay_steps} must be positive (e.g. %TRAIN_STEPS).')
  if warmup_steps and decay_steps <= warmup_steps:
    raise ValueError(
      f't5x_schedule.warmup_cosine: decay_steps={decay_steps} <= warmup_steps={warmup_steps}: the '
      'cosine would end before warmup does, so the peak learning rate is never reached. Set '
      'decay_steps > warmup_steps (decay_steps is the step where the cosine ends, e.g. '
      '%TRAIN_STEPS) or lower warmup_steps.'
    )
  if base_learning_rate <= 0:
    raise ValueError(f'base_learning_rate={base_learning_rate} must be positive.')
  if not 0 <= final_learning_rate <= base_learning_rate:
    raise ValueError(
      f'need 0 <= final_learning_rate ({final_learning_rate}) <= base_learning_rate '
      f'({base_learning_rate}).'
    )

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = jnp.minimum(step, warmup_steps) / warmup_steps if warmup_steps else 1.0
    progress = jnp.minimum(jnp.maximum(step, warmup_steps), decay_steps) / decay_steps
    cosine = final_learning_rate + 0.5 * (base_learning_rate - final_learning_rate) * (
      1.0 + jnp.cos(jnp.pi * progress)
    )
    return jnp.asarray(warm * cosine, jnp.float32)

  return schedule
