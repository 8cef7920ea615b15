"""A job's configuration, parsed from its gin files and bindings as `t5x.train` / `t5x.eval` do."""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
from typing import Any

# Gin text appended to every job's gin: a vocabulary stand-in of the embedding's size (only the
# embedding size, which VOCAB_SIZE sets, reaches the compiled step).
VOCABULARY_STANDIN = """
from __gin__ import dynamic_registration
import seqio
VOCABULARY = @seqio.PassThroughVocabulary()
seqio.PassThroughVocabulary.size = %VOCAB_SIZE
"""


@contextlib.contextmanager
def job_gin(job):
  """Parses a job's gin files and bindings as its T5X script would; yields the script module.

  The gin files `import __main__ as train_script` (or `eval_script`): while parsing, `__main__`
  is the script module (`job.module`, e.g. `t5x.train`), as when the job runs.
  """
  import gin  # pylint: disable=g-import-not-at-top
  import t5x  # pylint: disable=g-import-not-at-top

  from melodi_t5x import t5x_gin  # pylint: disable=g-import-not-at-top

  script = importlib.import_module(job.module)
  saved = sys.modules['__main__']
  sys.modules['__main__'] = script
  gin.clear_config()
  try:
    for path in (
      os.getcwd(),
      t5x_gin.register_search_path(),
      os.path.dirname(os.path.dirname(t5x.__file__)),
    ):
      gin.add_config_file_search_path(path)
    gin.parse_config_files_and_bindings(
      list(job.gin_files), list(job.bindings), finalize_config=False
    )
    gin.parse_config(VOCABULARY_STANDIN)
    yield script
  finally:
    sys.modules['__main__'] = saved
    gin.clear_config()


def bindings(fn) -> dict[str, Any]:
  """The gin bindings of `fn` (e.g. `t5x.train.train`), references evaluated."""
  import gin  # pylint: disable=g-import-not-at-top

  return dict(gin.get_bindings(fn, resolve_references=True))
