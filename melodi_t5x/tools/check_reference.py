r"""Checks a decoder number-for-number against a fixture made with the authors' code.

Usage:
  python -m melodi_t5x.tools.check_reference FIXTURE.npz [--swap REF_A REF_B] [--json OUT]

The fixture format is described in the golden README (`config_json`, `param/<reference path>`,
`seg{k}/...`). `config_json["model"]` names the architecture (`melodi_t5x.architectures`:
`melodi` when absent, `xl`, `memorizing`, `brt`); `REFERENCES` holds, per architecture, how to
build our config from the stored sizes, the parameter mapping rules and the mapping of the
reference's carried state; the decoder comes from the architecture's record. The
tool builds the model from the stored config, maps every reference
parameter onto ours, replays the recorded segments with the recorded resets (memory carried from
one segment to the next, parameters fixed) and prints, per compared array, the relative error
max|ours - reference| / max|reference|. It exits with status 1 if any forward value (logits, token
losses, loss, memories) is above 1e-5 or any gradient above 1e-4 (float32).

`--swap A B` exchanges two reference parameters before mapping (a deliberate wrong mapping), to
show that the check catches a single misplaced weight.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import re
import sys
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from melodi_t5x import architectures
from melodi_t5x.config import BRTConfig, MelodiConfig, MemorizingConfig, XLConfig

FORWARD_TOLERANCE = 1e-5
GRADIENT_TOLERANCE = 1e-4

# Reference parameter path (regex, '/'-joined, without the leading 'param/') -> our path.
# `{i}` in the replacement is the layer index captured by the pattern.
_LAYER = r'layer_stack/melodi_layers_(?P<i>\d+)/melodi_layer/'
PARAM_RULES: list[tuple[str, str]] = [
  (r'embed/embedding', 'embedding'),
  (r'layer_stack/summary_embeddings', 'summary_embeddings'),
  (r'layer_stack/final_layernorm/scale', 'final_norm/scale'),
  (_LAYER + r'tbase/pre_attn_layernorm/scale', 'layers_{i}/attn_norm/scale'),
  (_LAYER + r'tbase/_kvq/queries_layer/kernel', 'layers_{i}/query/kernel'),
  (_LAYER + r'tbase/_kvq/keys_layer/kernel', 'layers_{i}/key/kernel'),
  (_LAYER + r'tbase/_kvq/values_layer/kernel', 'layers_{i}/value/kernel'),
  (_LAYER + r'tbase/_kvq/attention_scale', 'layers_{i}/temperature'),
  (_LAYER + r'relative_positions/rel_embedding', 'layers_{i}/relpos_bias'),
  (_LAYER + r'tbase/post_attn_mlp/output_layer/kernel', 'layers_{i}/out/kernel'),
  (_LAYER + r'tbase/pre_ffn_layernorm/scale', 'layers_{i}/ffn_norm/scale'),
  (_LAYER + r'tbase/ffn/mlp_layer/input_layer/(?P<p>kernel|bias)', 'layers_{i}/ffn_in/{p}'),
  (_LAYER + r'tbase/ffn/mlp_layer/output_layer/(?P<p>kernel|bias)', 'layers_{i}/ffn_out/{p}'),
  (_LAYER + r'token_mixing_summary/layernorm1/scale', 'layers_{i}/summary_mixer/norm_x/scale'),
  (_LAYER + r'token_mixing_summary/layernorm2/scale', 'layers_{i}/summary_mixer/norm_u/scale'),
  (_LAYER + r'token_mixing_summary/lin_mix/(?P<p>kernel|bias)', 'layers_{i}/summary_mixer/{p}'),
  (_LAYER + r'token_mixing_short/layernorm1/scale', 'layers_{i}/memory_mixer/norm_x/scale'),
  (_LAYER + r'token_mixing_short/layernorm2/scale', 'layers_{i}/memory_mixer/norm_u/scale'),
  (_LAYER + r'token_mixing_short/lin_mix/(?P<p>kernel|bias)', 'layers_{i}/memory_mixer/{p}'),
  (_LAYER + r'attn_gate', 'layers_{i}/gate'),
  (_LAYER + r'long_mem_token_mixing/lin_mix/(?P<p>kernel|bias)', 'layers_{i}/long_mixer/{p}'),
]


# Transformer-XL (meliad `transformer_layer.TransformerLayer` in a `TransformerStack`).
_XL = r'layer_stack/transformer(?P<i>\d+)/'
XL_PARAM_RULES: list[tuple[str, str]] = [
  (r'embed/embedding', 'embedding'),
  (r'layer_stack/final_layernorm/scale', 'final_norm/scale'),
  (_XL + r'tbase/pre_attn_layernorm/scale', 'layers_{i}/attn_norm/scale'),
  (_XL + r'tbase/_kvq/queries_layer/kernel', 'layers_{i}/query/kernel'),
  (_XL + r'tbase/_kvq/keys_layer/kernel', 'layers_{i}/key/kernel'),
  (_XL + r'tbase/_kvq/values_layer/kernel', 'layers_{i}/value/kernel'),
  (_XL + r'tbase/_kvq/attention_scale', 'layers_{i}/temperature'),
  (_XL + r'relative_positions/rel_embedding', 'layers_{i}/relpos_bias'),
  (_XL + r'tbase/post_attn_mlp/output_layer/kernel', 'layers_{i}/out/kernel'),
  (_XL + r'tbase/pre_ffn_layernorm/scale', 'layers_{i}/ffn_norm/scale'),
  (_XL + r'tbase/ffn/hidden0/kernel', 'layers_{i}/ffn_in/kernel'),
  (_XL + r'tbase/ffn/output_layer/kernel', 'layers_{i}/ffn_out/kernel'),
]


# Memorizing Transformer (meliad `memory2`): XL layers whose FFN has biases, plus the side layer
# (`recurrent_memory_layer.RecurrentMemoryLayer`), our `memory_layer`, which has no position table.
_SIDE = r'layer_stack/side_layer/'


def _block_rules(prefix: str, ours: str) -> list[tuple[str, str]]:
  """Rules of one meliad `tbase` (norms, K/Q/V, temperature, W_O, MLP with biases)."""
  return [
    (prefix + r'tbase/pre_attn_layernorm/scale', ours + 'attn_norm/scale'),
    (prefix + r'tbase/_kvq/queries_layer/kernel', ours + 'query/kernel'),
    (prefix + r'tbase/_kvq/keys_layer/kernel', ours + 'key/kernel'),
    (prefix + r'tbase/_kvq/values_layer/kernel', ours + 'value/kernel'),
    (prefix + r'tbase/_kvq/attention_scale', ours + 'temperature'),
    (prefix + r'tbase/post_attn_mlp/output_layer/kernel', ours + 'out/kernel'),
    (prefix + r'tbase/pre_ffn_layernorm/scale', ours + 'ffn_norm/scale'),
    (prefix + r'tbase/ffn/mlp_layer/input_layer/(?P<p>kernel|bias)', ours + 'ffn_in/{p}'),
    (prefix + r'tbase/ffn/mlp_layer/output_layer/(?P<p>kernel|bias)', ours + 'ffn_out/{p}'),
  ]


MEMORIZING_PARAM_RULES: list[tuple[str, str]] = [
  (r'embed/embedding', 'embedding'),
  (r'layer_stack/final_layernorm/scale', 'final_norm/scale'),
  (_XL + r'relative_positions/rel_embedding', 'layers_{i}/relpos_bias'),
  *_block_rules(_XL, 'layers_{i}/'),
  *_block_rules(_SIDE, 'memory_layer/'),
]


# Block-Recurrent Transformer (meliad `memory/transformer_layer.TransformerLayer` in a
# `memory/decoder_stack.DecoderStack`): no `layer_stack`, the pre-attention norm inside `_kvq`, the
# recurrent layer's token side under `tbase` and its state block under `recurrent_tbase`.
_BRT = r'transformer(?P<i>\d+)/'
BRT_PARAM_RULES: list[tuple[str, str]] = [
  (r'embed/embedding', 'embedding'),
  (r'final_layernorm/scale', 'final_norm/scale'),
  (_BRT + r'relative_positions/rel_embedding', 'layers_{i}/relpos_bias'),
  (_BRT + r'recurrent_initial_state', 'layers_{i}/initial_state'),
  (
    _BRT + r'recurrent_tbase/_kvq/position_embeddings',
    'layers_{i}/state_block/position_embeddings',
  ),
  (_BRT + r'recurrent_tbase/post_attn_mlp/gate_bias', 'layers_{i}/state_block/gate_bias'),
] + [
  (_BRT + ref + rest, f'layers_{{i}}/{ours}' + target)
  for ref, ours in (('tbase/', ''), ('recurrent_tbase/', 'state_block/'))
  for rest, target in (
    (r'_kvq/pre_attn_layernorm/scale', 'attn_norm/scale'),
    (r'_kvq/queries_layer/kernel', 'query/kernel'),
    (r'_kvq/queries2_layer/kernel', 'query2/kernel'),
    (r'_kvq/keys_layer/kernel', 'key/kernel'),
    (r'_kvq/values_layer/kernel', 'value/kernel'),
    (r'_kvq/attention_scale', 'temperature'),
    (r'attention_scale2', 'temperature2'),
    (r'post_attn_mlp/output_layer/kernel', 'out/kernel'),
    (r'pre_ffn_layernorm/scale', 'ffn_norm/scale'),
    (r'ffn/hidden0/kernel', 'ffn_in/kernel'),
    (r'ffn/output_layer/kernel', 'ffn_out/kernel'),
  )
]


def _melodi_state(ref_key: str) -> tuple[str, ...] | None:
  match = re.fullmatch(
    r'state/layer_stack/melodi_layers_(\d+)/(short|long)_memory/previous_mems_train', ref_key
  )
  field = {'short': 'short', 'long': 'fifo'}
  return None if match is None else (f'layers_{match.group(1)}', field[match.group(2)])


def _xl_state(ref_key: str) -> tuple[str, ...] | None:
  match = re.fullmatch(
    r'state/layer_stack/transformer(\d+)/kvi_cache/previous_(keys|values)_train', ref_key
  )
  return None if match is None else (f'layers_{match.group(1)}', match.group(2))


_MEMORY = 'state/layer_stack/side_layer/'


def fifo_order(slots: np.ndarray, write_index: np.ndarray) -> np.ndarray:
  """Memory `[B, M, ...]` read from each row's write index `[B]`: oldest slot first."""
  return np.stack([np.roll(row, -int(i), axis=0) for row, i in zip(slots, write_index)])


def _memorizing_state_pairs(ours: dict, states: dict[str, np.ndarray]) -> dict[str, tuple]:
  """Compares the Memorizing Transformer's carried state.

  The memory is compared in FIFO order (rolled per row so that the slot at the write index
  comes first): our write index is per row and restarts at 0 at a document start, the
  reference's is one counter for the batch that is not reset, so the slot layouts differ after
  a reset although the FIFOs are the same. The write indices are exercised through that roll (a
  wrong index misplaces a whole segment). The side layer's XL cache (`side_layer/kvi_cache/...`)
  is never read or written by the reference; we have no such variable, so it is only checked to
  be zero in the fixture.
  """
  pairs = {}
  ref_index = states[_MEMORY + 'recurrent_memory/write_index_train']
  # Our write index: each row's tokens since its document start, modulo the memory size.
  our_index = np.asarray(ours['tokens_seen']) % ours['memory_layer']['keys'].shape[1]
  for key, ref in states.items():
    if key.startswith(_MEMORY + 'kvi_cache/'):
      if np.any(ref):
        raise ValueError(f"{key}: the memory layer's unused XL cache should be zero")
      continue
    match = re.fullmatch(_MEMORY + r'recurrent_memory/memory_(keys|values)_train', key)
    if match:
      mine = np.asarray(ours['memory_layer'][match.group(1)])
      ref_fifo = fifo_order(ref, np.full(ref.shape[0], int(ref_index)))
      pairs[key] = (fifo_order(mine, our_index), ref_fifo)
    elif key != _MEMORY + 'recurrent_memory/write_index_train':
      where = _xl_state(key)
      if where is None:
        raise KeyError(f'unknown state array {key!r}')
      pairs[key] = (_lookup(ours, where), ref)
  return pairs


def _brt_state(ref_key: str) -> tuple[str, ...] | None:
  match = re.fullmatch(r'state/transformer(\d+)/previous_(keys|values)_train', ref_key)
  if match is not None:
    return (f'layers_{match.group(1)}', match.group(2))
  match = re.fullmatch(r'state/transformer(\d+)/recurrent_state_train', ref_key)
  return None if match is None else (f'layers_{match.group(1)}', 'recurrent')


def melodi_config_from_fixture(meta: dict) -> MelodiConfig:
  """Builds our MELODI config from a fixture's `config_json`."""
  layers = tuple(int(i) for i in meta.get('long_term_memory_layer_indices') or ())
  increment, windows = 1, 1  # unused without long-term layers
  if layers:
    increment = int(meta['long_term_memory_increment_size'])
    windows = MelodiConfig.capacity_windows(int(meta['long_term_memory_size']), increment)
  return MelodiConfig(
    **_base_sizes(meta),
    summary_size=int(meta['summary_size']),
    short_term_memory_size=int(meta['short_term_memory_size']),
    long_term_memory_layers=layers,
    long_term_memory_increment_size=increment,
    long_term_memory_windows=windows,
    no_memory_layers=tuple(int(i) for i in meta.get('no_memory_layer_indices', ())),
  )


def xl_config_from_fixture(meta: dict) -> XLConfig:
  """Builds our Transformer-XL config from a fixture's `config_json`."""
  if int(meta.get('xl_cache_length', meta['window_length'])) != int(meta['window_length']):
    raise ValueError('XL fixtures must cache exactly one window (xl_cache_length == window)')
  return XLConfig(**_base_sizes(meta))


def memorizing_config_from_fixture(meta: dict) -> MemorizingConfig:
  """Builds our Memorizing Transformer config from a fixture's `config_json`."""
  xl = xl_config_from_fixture(meta)
  if len(meta.get('memory_layer_indices', [meta['memory_layer_index']])) != 1:
    raise ValueError('Memorizing fixtures must have exactly one memory layer')
  return MemorizingConfig(
    **{f.name: getattr(xl, f.name) for f in dataclasses.fields(XLConfig) if f.name != 'ffn_bias'},
    memory_layer_index=int(meta['memory_layer_index']),
    memory_size=int(meta['memory_size']),
  )


def brt_config_from_fixture(meta: dict) -> BRTConfig:
  """Builds our Block-Recurrent Transformer config from a fixture's `config_json`."""
  expected = {
    'recurrent_gate_type': 'bias',
    'recurrent_single_gate': False,
    'recurrent_skip_ffn': True,
    'feedback_recurrence': False,
  }
  for key, value in expected.items():
    if meta.get(key, value) != value:
      raise ValueError(
        f'BRT fixture has {key}={meta[key]!r}; only "fixed:skip" ({value!r}) is built'
      )
  xl_config_from_fixture(meta)  # checks the XL cache length
  return BRTConfig(
    **_base_sizes(meta),
    recurrent_layer_index=int(meta['recurrent_layer_index']),
    num_states=int(meta['recurrent_num_states']),
  )


def _base_sizes(meta: dict) -> dict:
  """The `BaseConfig` fields stored in every fixture (float32, no dropout)."""
  return dict(
    num_layers=int(meta['num_layers']),
    embed_dim=int(meta['embed_dim']),
    num_heads=int(meta['num_heads']),
    head_dim=int(meta['head_dim']),
    mlp_dim=int(meta['mlp_dim']),
    vocab_size=int(meta['vocab_size']),
    window_length=int(meta['window_length']),
    relative_position_buckets=int(meta.get('t5_num_buckets', 32)),
    relative_position_max_distance=int(meta.get('t5_max_distance', 128)),
    dtype='float32',
  )


@dataclasses.dataclass(frozen=True)
class ReferenceMapping:
  """How to check one architecture (`melodi_t5x.architectures`) against its reference fixtures."""

  # Builds our config from the fixture's `config_json` (the architecture's config class).
  config_from_fixture: Callable[[dict], Any]
  # (reference parameter path regex, our '/'-joined path) rules.
  param_rules: list[tuple[str, str]]
  # Reference state key (without 'seg{k}/') -> path in our `memory` collection, or None.
  state_path: Callable[[str], tuple[str, ...] | None]
  # Optional (our memory, {reference state key: array}) -> {key: (ours, reference)} for states
  # that are not compared one array to one path.
  state_pairs: Callable[[dict, dict], dict[str, tuple]] | None = None

  def compare_state(self, ours: dict, states: dict[str, np.ndarray]) -> dict[str, tuple]:
    """{reference state key: (our array, reference array)} of one segment."""
    if self.state_pairs is not None:
      return self.state_pairs(ours, states)
    pairs = {}
    for key, ref in states.items():
      where = self.state_path(key)
      if where is None:
        raise KeyError(f'unknown state array {key!r}')
      pairs[key] = (_lookup(ours, where), ref)
    return pairs


# Per architecture name (`melodi_t5x.architectures.names()`), how its fixtures map onto ours.
REFERENCES: dict[str, ReferenceMapping] = {
  'melodi': ReferenceMapping(melodi_config_from_fixture, PARAM_RULES, _melodi_state),
  'xl': ReferenceMapping(xl_config_from_fixture, XL_PARAM_RULES, _xl_state),
  'memorizing': ReferenceMapping(
    memorizing_config_from_fixture, MEMORIZING_PARAM_RULES, _xl_state, _memorizing_state_pairs
  ),
  'brt': ReferenceMapping(brt_config_from_fixture, BRT_PARAM_RULES, _brt_state),
}


def reference_mapping(meta: dict) -> ReferenceMapping:
  """The mapping of the fixture's architecture (`config_json["model"]`, default 'melodi')."""
  name = meta.get('model', 'melodi')
  architectures.get(name)  # an unknown name is an error naming the known architectures
  if name not in REFERENCES:
    raise ValueError(
      f'fixture model {name!r} has no reference mapping; mapped: {sorted(REFERENCES)}. Add its '
      'parameter and state rules to check_reference.REFERENCES.'
    )
  return REFERENCES[name]


def config_from_fixture(meta: dict):
  """Our config for a fixture's `config_json` (any architecture)."""
  return reference_mapping(meta).config_from_fixture(meta)


def our_path(reference_path: str, rules: list[tuple[str, str]] = PARAM_RULES) -> str:
  """Translates one reference parameter path to ours; raises KeyError if no rule matches."""
  for pattern, replacement in rules:
    match = re.fullmatch(pattern, reference_path)
    if match:
      return replacement.format(**match.groupdict())
  raise KeyError(f'no mapping rule for reference parameter {reference_path!r}')


def map_parameters(
  reference: dict[str, np.ndarray], template: dict, rules: list[tuple[str, str]] = PARAM_RULES
) -> dict:
  """Maps `{reference path: array}` onto the structure of `template` (our params tree)."""
  ours = traverse_util.flatten_dict(template, sep='/')
  mapped = {}
  for ref_path, value in reference.items():
    path = our_path(ref_path, rules)
    if path not in ours:
      raise KeyError(f'{ref_path!r} maps to {path!r}, which our model does not have')
    if path in mapped:
      raise KeyError(f'two reference parameters map to {path!r}')
    if tuple(ours[path].shape) != tuple(value.shape):
      raise ValueError(f'{ref_path!r} {value.shape} -> {path!r} {ours[path].shape}: shape differs')
    mapped[path] = jnp.asarray(value, ours[path].dtype)
  missing = sorted(set(ours) - set(mapped))
  if missing:
    raise KeyError(f'our parameters with no reference counterpart: {missing}')
  return traverse_util.unflatten_dict(mapped, sep='/')


def relative_error(ours, reference) -> float:
  ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
  if ours.shape != reference.shape:
    return float('inf')
  scale = np.max(np.abs(reference)) if reference.size else 0.0
  diff = np.max(np.abs(ours - reference)) if reference.size else 0.0
  return float(diff / scale) if scale > 0 else float(diff)


@functools.cache
def _programs(cfg) -> tuple[Callable, Callable]:
  """Jitted (init, value-and-grad step) of one decoder config, shared by every run of it.

  A second run of the same fixture (e.g. with `--swap`, or the same configuration in another
  test) reuses the compiled programs instead of tracing and compiling them again.
  """
  model = architectures.build_decoder(cfg)
  init = jax.jit(functools.partial(model.init, enable_dropout=False))  # eager init is slow

  def loss_fn(params, mem, tokens, sos, targets, mask):
    logits, new = model.apply(
      {'params': params, 'memory': mem},
      tokens,
      targets,
      start_of_sequence=sos,
      enable_dropout=False,
      mutable=['memory'],
    )
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    token_losses = nll * mask
    return jnp.sum(token_losses), (logits, token_losses, new['memory'])

  return init, jax.jit(jax.value_and_grad(loss_fn, has_aux=True))


def run(path: str, swap: tuple[str, str] | None = None) -> dict[str, dict[str, float]]:
  """Replays the fixture; returns {category: {array name: relative error}}."""
  z = np.load(path)
  meta = json.loads(str(z['config_json']))
  arch = reference_mapping(meta)
  cfg = arch.config_from_fixture(meta)
  reference = {k[len('param/') :]: z[k] for k in z.files if k.startswith('param/')}
  if swap:
    a, b = swap
    reference[a], reference[b] = reference[b], reference[a]
  num_segments = int(meta['num_segments'])
  tokens0 = z['seg0/input_tokens']
  init, step = _programs(cfg)
  variables = init(jax.random.PRNGKey(0), tokens0, tokens0)
  params = map_parameters(reference, variables['params'], arch.param_rules)
  mem = jax.tree_util.tree_map(jnp.zeros_like, variables['memory'])
  errors: dict[str, dict[str, float]] = {'forward': {}, 'gradient': {}}
  for k in range(num_segments):
    seg = f'seg{k}/'
    (loss, (logits, token_losses, mem)), grads = step(
      params,
      mem,
      jnp.asarray(z[seg + 'input_tokens']),
      jnp.asarray(z[seg + 'start_of_sequence']),
      jnp.asarray(z[seg + 'target_tokens']),
      jnp.asarray(z[seg + 'loss_mask'], jnp.float32),
    )
    fwd = errors['forward']
    fwd[seg + 'logits'] = relative_error(logits, z[seg + 'logits'])
    fwd[seg + 'token_losses'] = relative_error(token_losses, z[seg + 'token_losses'])
    fwd[seg + 'loss'] = relative_error(loss, z[seg + 'loss'])
    states = {key[len(seg) :]: z[key] for key in z.files if key.startswith(seg + 'state/')}
    for key, (ours, ref) in arch.compare_state(mem, states).items():
      fwd[seg + key] = relative_error(ours, ref)
    flat_grads = traverse_util.flatten_dict(grads, sep='/')
    for ref_path in reference:
      name = seg + 'grad/' + ref_path
      grad = flat_grads[our_path(ref_path, arch.param_rules)]
      errors['gradient'][name] = relative_error(grad, z[name])
  return errors


def _lookup(tree, path: tuple[str, ...]):
  for key in path:
    tree = tree[key]
  return tree


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('fixture', help='golden .npz produced by the reference implementation')
  parser.add_argument('--swap', nargs=2, metavar=('REF_A', 'REF_B'), help='swap two params')
  parser.add_argument('--json', help='also write the errors to this JSON file')
  parser.add_argument('--verbose', action='store_true', help='print every array')
  args = parser.parse_args(argv)
  jax.config.update('jax_default_matmul_precision', 'highest')
  errors = run(args.fixture, tuple(args.swap) if args.swap else None)
  tolerance = {'forward': FORWARD_TOLERANCE, 'gradient': GRADIENT_TOLERANCE}
  failed = False
  for category, values in errors.items():
    worst = max(values, key=values.get)
    bad = {k: v for k, v in values.items() if v > tolerance[category]}
    failed |= bool(bad)
    print(
      f'{category:8s}: {len(values):4d} arrays, max rel err {values[worst]:.3e} ({worst}), '
      f'tolerance {tolerance[category]:.0e}, {"FAIL" if bad else "ok"}'
    )
    for name, value in sorted(values.items()) if args.verbose else sorted(bad.items()):
      print(f'  {value:.3e}  {name}')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(errors, f, indent=1, sort_keys=True)
  print('PARITY FAIL' if failed else 'PARITY OK')
  return 1 if failed else 0


if __name__ == '__main__':
  sys.exit(main())
