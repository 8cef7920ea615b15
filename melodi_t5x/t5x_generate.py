"""Generation with T5X: prompt features for `t5x.infer`, and continuing a long document.

- `PromptFeatureConverter`: T5X's prefix-LM features (`decoder_causal_attention` marks the
  prompt) whose first input is the start-of-document token, as in training; bind it as
  `MemoryDecoderModel.feature_converter_cls` for `t5x.infer` (see `gin/infer.gin`).
- `continue_document`: builds memory over a prompt of any length (its windows streamed through
  the training path, one segment at a time, memory carried), then samples a continuation with
  `MemoryDecoderModel.predict_batch_with_aux`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import seqio

from melodi_t5x.state import MEMORY
from tasks import vocab as vocab_lib
from tasks.preprocessors import START_OF_DOCUMENT_ID


class PromptFeatureConverter(seqio.DecoderFeatureConverter):
  """`{'inputs': prompt, 'targets': continuation}` -> decoder-only prefix-LM features (unpacked).

  `decoder_input_tokens = [START_OF_DOCUMENT_ID, prompt, continuation[:-1]]` and
  `decoder_causal_attention` is 1 on the first len(prompt) + 1 positions. Task feature lengths
  must sum to a multiple of the model's window (the module is initialised at that length). The
  start token is 1, the EOS of every vocabulary here (training starts documents with EOS); bind
  `bos_id` for a vocabulary with another EOS id.
  """

  def __init__(self, pack: bool = False, bos_id: int = START_OF_DOCUMENT_ID, **kwargs):
    if pack:
      raise ValueError(
        'PromptFeatureConverter: pack=True is not supported (memory decoders read one document '
        'per row); set utils.DatasetConfig.pack = False.'
      )
    super().__init__(pack=False, bos_id=bos_id, **kwargs)


def continue_document(
  model,
  params,
  tokens: Sequence[int],
  *,
  max_new_tokens: int,
  segment_length: int,
  decoder_params: Mapping[str, Any] | None = None,
  rng: jax.Array | None = None,
  timings: dict[str, float] | None = None,
) -> np.ndarray:
  """Continues one document given by its `tokens` (no start token); returns the new tokens.

  The model reads `[EOS, tokens]` (a document's first input in training). Whole segments of
  `segment_length` inputs (a multiple of the window) run through the training path with memory
  carried; the rest of the prompt (< one segment) is read by `predict_batch_with_aux`'s prefill,
  which continues that memory; then `max_new_tokens` tokens are sampled with `decoder_params` (e.g.
  `{'temperature': 0.0}` for greedy; `'topk'`). A `timings` dict receives `prompt_seconds`
  (streaming, compile included), `compile_seconds` and `decode_seconds` (prefill of the rest of
  the prompt and sampling, compiled).
  """
  timings = {} if timings is None else timings
  start = time.perf_counter()
  module = model.module
  start_id = vocab_lib.start_of_document_id(model.output_vocabulary)  # as in training
  inputs = np.asarray([start_id, *tokens], np.int32)
  # The last prompt token is read by the first decoding step; everything before it is context.
  context = len(inputs) - 1
  streamed = context // segment_length * segment_length

  @jax.jit
  def segment(params, memory, chunk, sos):
    variables = {'params': params, **({MEMORY: memory} if memory is not None else {})}
    _, new = module.apply(
      variables, chunk, chunk, start_of_sequence=sos, enable_dropout=False, mutable=[MEMORY]
    )
    return new[MEMORY]

  memory = None
  for offset in range(0, streamed, segment_length):
    chunk = jnp.asarray(inputs[None, offset : offset + segment_length])
    memory = segment(params, memory, chunk, jnp.asarray([offset == 0]))

  jax.block_until_ready(memory)
  timings['prompt_seconds'] = time.perf_counter() - start
  rest = inputs[streamed:]
  length = len(rest) + max_new_tokens
  batch = {
    'decoder_input_tokens': jnp.asarray(np.pad(rest, (0, max_new_tokens))[None]),
    'decoder_causal_attention': jnp.asarray((np.arange(length) < len(rest))[None], jnp.int32),
    'start_of_sequence': jnp.asarray([streamed == 0]),
  }

  @jax.jit
  def predict(params, batch, memory, rng):
    return model.predict_batch_with_aux(
      params, batch, rng, decoder_params=dict(decoder_params or {}), memory=memory
    )

  rng = jax.random.PRNGKey(0) if rng is None else rng
  start = time.perf_counter()
  compiled = predict.lower(params, batch, memory, rng).compile()
  timings['compile_seconds'] = time.perf_counter() - start
  start = time.perf_counter()
  decodes, _ = jax.block_until_ready(compiled(params, batch, memory, rng))
  timings['decode_seconds'] = time.perf_counter() - start
  return np.asarray(decodes[0, :max_new_tokens])
