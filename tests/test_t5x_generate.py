"""Generation through T5X (`MemoryDecoderModel.predict_batch_with_aux`, the CLI); needs T5X.

Greedy continuations must be deterministic and be, token after token, the argmax of the
teacher-forced scores of prompt + continuation; sampled tokens must lie in the top-k of those
scores; rows of one batch have different prompt lengths; a long prompt streamed through memory
segment by segment continues exactly as when it is read in one prefill (MELODI, and the
Block-Recurrent Transformer, whose decoding goes through the same generic path).
"""

from __future__ import annotations

import json
import os

import needs
import numpy as np
import pytest

needs.t5x()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
import seqio  # noqa: E402
import tensorflow as tf  # noqa: E402
from tiny_configs import DIMS, MELODI_MEMORY  # noqa: E402

from melodi_t5x import t5x_generate, t5x_model  # noqa: E402
from melodi_t5x.architectures.brt import BRTDecoder  # noqa: E402
from melodi_t5x.architectures.melodi import MelodiDecoder  # noqa: E402
from melodi_t5x.config import BRTConfig, MelodiConfig  # noqa: E402
from melodi_t5x.tools import generate as generate_cli  # noqa: E402

CFG = MelodiConfig(num_layers=2, **DIMS, **MELODI_MEMORY)
BRT = BRTConfig(num_layers=2, **DIMS, recurrent_layer_index=0, num_states=4)
L = 40  # decoder length: prompt (with the start token) + continuation
PROMPTS = (13, 16, 5)  # prompt tokens per row: mid-window, on a boundary, short


def _model(module):
  vocab = seqio.PassThroughVocabulary(size=CFG.vocab_size, eos_id=1)
  model = t5x_model.MemoryDecoderModel(module, vocab, optimizer_def=None)
  shapes = {'decoder_input_tokens': (3, L), 'decoder_target_tokens': (3, L)}
  types = {k: jnp.int32 for k in shapes}
  params = model.get_initial_variables(jax.random.PRNGKey(0), shapes, types)['params']
  return model, params


MODEL, PARAMS = _model(MelodiDecoder(CFG))


def _batch(seed: int = 0):
  rng = np.random.RandomState(seed)
  tokens = np.zeros((len(PROMPTS), L), np.int32)
  causal = np.zeros((len(PROMPTS), L), np.int32)
  for row, n in enumerate(PROMPTS):
    tokens[row, : n + 1] = [1, *rng.randint(2, CFG.vocab_size, n)]
    causal[row, : n + 1] = 1
  return {'decoder_input_tokens': jnp.asarray(tokens), 'decoder_causal_attention': causal}


@jax.jit
def _predict(params, batch, rng, temperature, topk):
  return MODEL.predict_batch_with_aux(
    params, batch, rng, decoder_params={'temperature': temperature, 'topk': topk}
  )


@jax.jit
def _teacher_forced(params, tokens):
  return jax.nn.log_softmax(MODEL.module.apply({'params': params}, tokens, enable_dropout=False))


def _check_against_teacher_forcing(batch, decodes, check):
  """Calls check(row, scores [n, V], tokens [n]) for each row's continuation up to its EOS."""
  for row, n in enumerate(PROMPTS):
    new = list(np.asarray(decodes[row, : L - n]))
    if 1 in new:  # EOS ends the row (the rest is padding)
      new = new[: new.index(1) + 1]
    seq = np.zeros((1, L), np.int32)
    seq[0, : n + 1] = np.asarray(batch['decoder_input_tokens'][row, : n + 1])
    seq[0, n + 1 : n + len(new)] = new[:-1]
    scores = np.asarray(_teacher_forced(PARAMS, jnp.asarray(seq)))[0, n : n + len(new)]
    check(row, scores, np.asarray(new))


def test_greedy_is_deterministic_and_the_teacher_forced_argmax():
  batch = _batch()
  a, aux = _predict(PARAMS, batch, jax.random.PRNGKey(0), 0.0, 0)
  b, _ = _predict(PARAMS, batch, jax.random.PRNGKey(1), 0.0, 0)
  np.testing.assert_array_equal(a, b)
  assert a.shape == (3, L) and aux['scores'].shape == (3,)
  for row, n in enumerate(PROMPTS):  # continuations fill the buffer after the prompt
    assert np.all(np.asarray(a[row, L - n :]) == 0)

  def check(row, scores, tokens):
    np.testing.assert_array_equal(np.argmax(scores, -1), tokens, err_msg=f'row {row}')

  _check_against_teacher_forcing(batch, a, check)


def test_sampling_stays_in_the_top_k_and_follows_the_rng():
  batch = _batch(1)
  a, _ = _predict(PARAMS, batch, jax.random.PRNGKey(0), 1.0, 3)
  b, _ = _predict(PARAMS, batch, jax.random.PRNGKey(0), 1.0, 3)
  c, _ = _predict(PARAMS, batch, jax.random.PRNGKey(7), 1.0, 3)
  np.testing.assert_array_equal(a, b)
  assert np.any(np.asarray(a) != np.asarray(c))

  def check(row, scores, tokens):
    top3 = np.argsort(scores, -1)[:, -3:]
    assert all(t in top for t, top in zip(tokens, top3)), f'row {row}'

  _check_against_teacher_forcing(batch, a, check)


def test_several_decodes_and_input_checks():
  batch = _batch(2)
  predict = jax.jit(
    lambda params, batch, rng: MODEL.predict_batch_with_aux(
      params, batch, rng, num_decodes=2, return_all_decodes=True, decoder_params={'topk': 0}
    )
  )
  out, aux = predict(PARAMS, batch, jax.random.PRNGKey(0))
  assert out.shape == (3, 2, L) and aux['scores'].shape == (3, 2)
  with pytest.raises(ValueError, match='decoder_causal_attention'):
    MODEL.predict_batch_with_aux(PARAMS, {'decoder_input_tokens': batch['decoder_input_tokens']})


@pytest.mark.parametrize('kind', ['melodi', pytest.param('brt', marks=pytest.mark.slow)])
def test_streamed_prompt_continues_the_whole_document(kind):
  # A 45-token document: 2 segments of 16 inputs streamed with memory, the rest prefilled, then
  # greedy decoding: the continuation is the argmax of teacher forcing over the whole document.
  model, params = (MODEL, PARAMS) if kind == 'melodi' else _model(BRTDecoder(BRT))
  doc = list(np.random.RandomState(3).randint(2, CFG.vocab_size, 45))
  greedy = {'temperature': 0.0, 'topk': 0, 'eos_id': -1}  # -1: never stop early
  timings = {}
  streamed = t5x_generate.continue_document(
    model, params, doc, segment_length=16, max_new_tokens=12, decoder_params=greedy, timings=timings
  )
  assert streamed.shape == (12,) and timings['decode_seconds'] > 0
  seq = jnp.asarray([[1, *doc, *streamed]])[:, :56]  # 7 windows
  logits = model.module.apply({'params': params}, seq, enable_dropout=False)
  scores = np.asarray(jax.nn.log_softmax(logits))[0, 45:56]  # position 45 reads doc[-1]
  np.testing.assert_array_equal(np.argmax(scores, -1), streamed[:11])


def test_prompt_feature_converter_starts_documents_like_training():
  ds = tf.data.Dataset.from_tensors({'inputs': [5, 6, 7], 'targets': [8, 9]})
  converter = t5x_generate.PromptFeatureConverter()
  ex = next(iter(converter(ds, {'inputs': 4, 'targets': 4}).as_numpy_iterator()))
  np.testing.assert_array_equal(ex['decoder_input_tokens'], [1, 5, 6, 7, 8, 9, 0, 0])
  np.testing.assert_array_equal(ex['decoder_causal_attention'], [1, 1, 1, 1, 0, 0, 0, 0])
  with pytest.raises(ValueError, match='pack = False'):
    t5x_generate.PromptFeatureConverter(pack=True)


@pytest.mark.slow
def test_generate_cli_continues_a_text_file(tmp_path, capsys):
  # The quickstart model (tiny MELODI, local_books vocabulary), random weights.
  model = generate_cli.load_model(list(generate_cli.DEFAULT_GIN_FILES), [], 'local_books')
  tokens = jnp.ones((1, 32), jnp.int32)
  params = model.module.init(jax.random.PRNGKey(0), tokens, tokens, enable_dropout=False)['params']
  ckpt = tmp_path / 'checkpoint_1'
  ocp.PyTreeCheckpointer().save(str(ckpt / 'state'), {'target': params})
  prompt = tmp_path / 'prompt.txt'
  prompt.write_text('To be, or not to be, that is the question. ' * 12)
  args = ['--checkpoint', str(ckpt), '--prompt_file', str(prompt), '--max_new_tokens', '6']
  assert generate_cli.main([*args, '--temperature', '0', '--segment_length', '64', '--json']) == 0
  out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert out['prompt_tokens'] > 64 and 0 < len(out['tokens']) <= 6  # shorter only at EOS
  assert out['continuation'] == model.output_vocabulary.decode(out['tokens'])
  assert os.path.exists(ckpt / 'state')
