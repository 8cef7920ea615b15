"""Golden-format fixtures in the tests: independent re-derivations and the parity tool's verdicts.

A re-derivation (`test_brt_rederived.py`, `test_memorizing.py`) is written from the golden README's
text (tests/data/), not from our modules. It brings its parameters and one segment's function;
`write_fixture` runs that function over the segments and writes the golden format that
`check_reference` reads. The numerics here are the reference's conventions as the README states
them. `assert_parity` / `assert_parity_fails` run the parity tool on a fixture.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from melodi_t5x.tools import check_reference


def rms(x, scale):
  """The reference's RMSNorm (eps 1e-6 inside the square root)."""
  return x / jnp.sqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * scale


def unit(x):
  """L2 normalisation over the last axis (queries and keys; eps 1e-6 inside the square root)."""
  return x / jnp.sqrt(jnp.sum(x * x, -1, keepdims=True) + 1e-6)


def safe_softmax(logits):
  """The reference's softmax over the last axis: an extra exp(-1000 - max) term in the sum."""
  top = jax.lax.stop_gradient(jnp.maximum(logits.max(-1, keepdims=True), -1000.0))
  e = jnp.exp(logits - top)
  return e / (e.sum(-1, keepdims=True) + jnp.exp(-1000.0 - top))


def head_and_loss(x, final_scale, embedding, targets, mask, new_state):
  """The reference's output head and loss after the last layer x [B, T, D].

  logits = RMSNorm(x) E^T / sqrt(D) with the input embedding E [V, D]; token losses = NLL of the
  targets [B, T] times mask [B, T]. Returns (their sum, (logits, token losses, new_state)), the
  state without gradient: a re-derivation's segment function.
  """
  logits = rms(x, final_scale) @ embedding.T / np.sqrt(x.shape[-1])
  nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0]
  token_losses = nll * mask
  return token_losses.sum(), (logits, token_losses, jax.lax.stop_gradient(new_state))


def write_fixture(
  path: str,
  meta: Mapping,
  sos: Sequence[Sequence[bool]],
  rng: np.random.RandomState,
  params: Mapping[str, np.ndarray],
  state,
  segment: Callable,
  state_entries: Callable[[object], Mapping[str, np.ndarray]],
) -> str:
  """Runs `meta['num_segments']` segments of a re-derivation and writes them to `path`.

  segment(params, state, tokens, sos, targets, mask) -> (loss, (logits, token losses, new state))
  is differentiated with respect to the parameters; `state_entries(state)` names the state after a
  segment with its golden keys (`state/...`). Segment s draws its tokens [B, T] from `rng` (the
  last one ends row 1 with 3 padding tokens); `sos[s]` [B] says which rows start a document.
  """
  b, t = meta['batch_size'], meta['segment_length']
  out = {'config_json': json.dumps(dict(meta)), **{'param/' + k: v for k, v in params.items()}}
  step = jax.jit(jax.value_and_grad(segment, has_aux=True))
  for s in range(meta['num_segments']):
    tokens = rng.randint(1, meta['vocab_size'], (b, t)).astype(np.int32)
    if s == meta['num_segments'] - 1:
      tokens[1, -3:] = 0
    targets = np.concatenate([tokens[:, 1:], np.zeros((b, 1), np.int32)], 1)
    mask = (np.arange(t) < t - 1) & (tokens > 0) & (targets > 0)
    starts = np.asarray(sos[s])
    with jax.default_matmul_precision('highest'):
      (loss, (logits, token_losses, state)), grads = step(
        params, state, tokens, starts, targets, mask.astype(np.float32)
      )
    seg = f'seg{s}/'
    out.update({seg + 'input_tokens': tokens, seg + 'target_tokens': targets})
    out.update({seg + 'start_of_sequence': starts, seg + 'loss_mask': mask, seg + 'loss': loss})
    out.update({seg + 'logits': logits, seg + 'token_losses': token_losses})
    out.update({f'{seg}grad/{k}': g for k, g in grads.items()})
    out.update({seg + k: v for k, v in state_entries(state).items()})
  np.savez(path, **{k: np.asarray(v) for k, v in out.items()})
  return path


def assert_parity(fixture, capsys, tmp_path=None) -> dict | None:
  """The parity tool passes on `fixture`; with `tmp_path`, returns its errors (`--json`)."""
  args = [str(fixture)]
  if tmp_path is not None:
    out = tmp_path / 'errors.json'
    args += ['--json', str(out)]
  assert check_reference.main(args) == 0
  assert 'PARITY OK' in capsys.readouterr().out
  return json.loads(out.read_text()) if tmp_path is not None else None


def assert_parity_fails(fixture, swap: Sequence[str], capsys) -> None:
  """The parity tool fails on `fixture` with the two reference parameters `swap` exchanged."""
  assert check_reference.main([str(fixture), '--swap', *swap]) == 1
  assert 'PARITY FAIL' in capsys.readouterr().out
