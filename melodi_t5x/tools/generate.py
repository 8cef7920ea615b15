r"""Continue a long text document with a trained memory decoder (T5X checkpoint) and print it.

  python -m melodi_t5x.tools.generate --checkpoint /tmp/melodi_quickstart/checkpoint_400 \
    --prompt_file play.txt --max_new_tokens 200 --temperature 0.8 --topk 40

Gin flags as in t5x.train: `--gin_file` (repeatable), `--gin.NAME=VALUE`, `--gin_bindings`,
`--gin_search_paths`.

The model comes from gin model files (default: the quickstart's tiny MELODI,
`gin/models/melodi_base.gin` + `gin/models/tiny.gin`), with the vocabulary of `--task` and an
embedding of its size (`tasks.embedding_size`). The whole prompt is read: its windows are
streamed through the training path one segment at a time with memory carried (`--segment_length`
tokens per step, a multiple of the window), the rest is prefilled, then tokens are sampled one at
a time with T5X's `temperature_sample` (`--temperature 0` is greedy; `--topk 0` samples from the
full softmax).
Prints the continuation (with `--json`, one JSON line with tokens, timings and tokens/s).

Checked before the checkpoint is read: the prompt file (it must exist, be UTF-8 and hold text)
and the checkpoint's `model_signature.json` (architecture, vocabulary and embedding rows must be
those of the model built here, as `t5x.eval` checks them; `melodi_t5x.t5x_signature`). JAX,
Orbax and the model code are imported after the prompt is read, so a bad prompt file fails at once.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings

import gin

from melodi_t5x import t5x_gin, t5x_signature


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--checkpoint', required=True, help='T5X checkpoint directory')
  parser.add_argument('--prompt_file', required=True, help='UTF-8 text to continue ("-": stdin)')
  t5x_gin.add_gin_flags(
    parser,
    gin_file_help='model gin file(s); default gin/models/melodi_base.gin then gin/models/tiny.gin',
  )
  parser.add_argument('--task', default='local_books', help='task whose vocabulary to use')
  parser.add_argument('--max_new_tokens', type=int, default=128)
  parser.add_argument('--temperature', type=float, default=0.8, help='0 = greedy')
  parser.add_argument('--topk', type=int, default=40, help='0 = no top-k cut')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument(
    '--segment_length', type=int, default=0, help='prompt tokens per streamed step (0: 8 windows)'
  )
  parser.add_argument('--json', action='store_true', help='print one JSON line with details')
  args = t5x_gin.parse_args(parser, argv)
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
  t5x_gin.check_command_line_macros(bindings)
  return gin.query_parameter('%MODEL').scoped_configurable_fn()


def read_prompt(prompt_file: str) -> str:
  """The prompt's text (`-`: stdin); exits naming the file if it is missing, not UTF-8 or empty."""
  name = 'standard input' if prompt_file == '-' else f'--prompt_file {prompt_file}'
  try:
    data = sys.stdin.buffer.read() if prompt_file == '-' else open(prompt_file, 'rb').read()
  except OSError as e:
    raise SystemExit(f'{name}: cannot read it ({e.strerror}); give an existing text file.') from e
  try:
    text = data.decode('utf-8')
  except UnicodeDecodeError as e:
    raise SystemExit(
      f'{name} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); convert it '
      'first, e.g. iconv -f latin1 -t utf-8 IN > OUT.'
    ) from e
  if not text.strip():
    raise SystemExit(f'{name} is empty: give a prompt of at least one token of text.')
  return text


def load_params(checkpoint: str):
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  with warnings.catch_warnings():
    warnings.simplefilter('ignore', UserWarning)  # "Sharding info not provided when restoring"
    state = ocp.PyTreeCheckpointer().restore(f'{checkpoint.rstrip("/")}/state')
  return jax.tree_util.tree_map(np.asarray, state['target'])


def main(argv=None) -> int:
  args = parse_args(argv)
  text = read_prompt(args.prompt_file)
  import jax  # pylint: disable=g-import-not-at-top

  from melodi_t5x import t5x_generate  # pylint: disable=g-import-not-at-top

  for path in args.gin_search_paths:
    gin.add_config_file_search_path(path)
  model = load_model(args.gin_file or list(DEFAULT_GIN_FILES), args.gin_bindings, args.task)
  window = model.module.config.window_length
  segment = args.segment_length or 8 * window
  if segment % window:
    raise SystemExit(f'--segment_length={segment} is not a multiple of the window ({window}).')
  t5x_signature.check(model, args.checkpoint, 'The checkpoint')
  params = load_params(args.checkpoint)
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
