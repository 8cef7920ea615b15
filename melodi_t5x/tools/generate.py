r"""Continue a long text document with a trained memory decoder (T5X checkpoint) and print it.

  python -m melodi_t5x.tools.generate --checkpoint /tmp/melodi_quickstart/checkpoint_400 \
    --prompt_file play.txt --max_new_tokens 200 --temperature 0.8 --topk 40

The model comes from gin model files (default: the quickstart's tiny MELODI,
`gin/models/melodi_base.gin` + `gin/models/tiny.gin`), with the vocabulary of `--task` and an
embedding of its size (`tasks.embedding_size`). The whole prompt is read: its windows are
streamed through the training path one segment at a time with memory carried (`--segment_length`
tokens per step, a multiple of the window), the rest is prefilled, then tokens are sampled one at
a time with T5X's `temperature_sample` (`--temperature 0` is greedy; `--topk 0` samples from the
full softmax).
Prints the continuation (with `--json`, one JSON line with tokens, timings and tokens/s).
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings

import gin
import jax
import numpy as np
import orbax.checkpoint as ocp

from melodi_t5x import t5x_generate, t5x_gin


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--checkpoint', required=True, help='T5X checkpoint directory')
  parser.add_argument('--prompt_file', required=True, help='UTF-8 text to continue ("-": stdin)')
  parser.add_argument(
    '--gin_file',
    action='append',
    help='model gin file(s); default gin/models/melodi_base.gin then gin/models/tiny.gin',
  )
  parser.add_argument('--gin_bindings', action='append', default=[], help='extra gin bindings')
  parser.add_argument('--task', default='local_books', help='task whose vocabulary to use')
  parser.add_argument('--max_new_tokens', type=int, default=128)
  parser.add_argument('--temperature', type=float, default=0.8, help='0 = greedy')
  parser.add_argument('--topk', type=int, default=40, help='0 = no top-k cut')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument(
    '--segment_length', type=int, default=0, help='prompt tokens per streamed step (0: 8 windows)'
  )
  parser.add_argument('--json', action='store_true', help='print one JSON line with details')
  args = parser.parse_args(argv)
  if args.max_new_tokens <= 0:
    parser.error('--max_new_tokens must be positive')
  if args.temperature < 0 or args.topk < 0:
    parser.error('--temperature and --topk must be >= 0')
  return args


DEFAULT_GIN_FILES = ('gin/models/melodi_base.gin', 'gin/models/tiny.gin')


def load_model(gin_files, bindings, task: str):
  """The gin-configured `MemoryDecoderModel` (`MODEL`), dropout off, embedding sized to `task`."""
  t5x_gin.register_search_path()
  gin.clear_config(clear_constants=True)
  task_bindings = [
    f"MIXTURE_OR_TASK_NAME = '{task}'",
    'VOCAB_SIZE = @tasks.embedding_size()',
    'tasks.embedding_size.task_name = %MIXTURE_OR_TASK_NAME',
  ]
  gin.parse_config_files_and_bindings(gin_files, [*task_bindings, 'DROPOUT_RATE = 0.0', *bindings])
  return gin.query_parameter('%MODEL').scoped_configurable_fn()


def load_params(checkpoint: str):
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', UserWarning)  # "Sharding info not provided when restoring"
    state = ocp.PyTreeCheckpointer().restore(f'{checkpoint.rstrip("/")}/state')
  return jax.tree_util.tree_map(np.asarray, state['target'])


def main(argv=None) -> int:
  args = parse_args(argv)
  model = load_model(args.gin_file or list(DEFAULT_GIN_FILES), args.gin_bindings, args.task)
  window = model.module.config.window_length
  segment = args.segment_length or 8 * window
  if segment % window:
    raise SystemExit(f'--segment_length={segment} is not a multiple of the window ({window}).')
  params = load_params(args.checkpoint)
  text = sys.stdin.read() if args.prompt_file == '-' else open(args.prompt_file).read()
  vocab = model.output_vocabulary
  tokens = vocab.encode(text)
  timings = {}
  new = t5x_generate.continue_document(
    model,
    params,
    tokens,
    max_new_tokens=args.max_new_tokens,
    segment_length=segment,
    decoder_params={'temperature': args.temperature, 'topk': args.topk},
    rng=jax.random.PRNGKey(args.seed),
    timings=timings,
  )
  new = [int(t) for t in new]
  if 0 in new:  # decoding stopped at EOS (the rest is padding)
    new = new[: new.index(0)]
  continuation = vocab.decode(new)
  if args.json:
    print(
      json.dumps(
        {
          'prompt_tokens': len(tokens),
          'continuation': continuation,
          'tokens': new,
          **{k: round(v, 3) for k, v in timings.items()},
          # Sampled tokens per second (the decode time also covers the last < 1 segment of prompt).
          'tokens_per_second': round(len(new) / timings['decode_seconds'], 1),
        }
      )
    )
  else:
    print(continuation)
  return 0


if __name__ == '__main__':
  sys.exit(main())
