"""seqio tasks of melodi-t5x: `import tasks` registers local_books, pg19_t5, arxiv_math, c4_4k
and text_corpus (any corpus, set from gin).

Importing touches no data and no network; settings (see `tasks.config`) are read when a dataset
is requested. Document streaming: `tasks.streaming.DocumentStreamIterator` (on the fly) and
`tasks.prepared_stream.PreparedStreamIterator` (splits written by `python -m tasks.prepare`).
"""

from tasks.config import (
  TASK_NAMES,
  ArxivMathConfig,
  C4Config,
  LocalBooksConfig,
  Pg19T5Config,
  PreparedDataConfig,
  TextCorpusConfig,
  configure,
  get_config,
  reset_config,
)
from tasks.definitions import register_tasks
from tasks.preprocessors import START_OF_DOCUMENT_ID, chunk_documents
from tasks.vocab import embedding_size, vocabulary

register_tasks()

__all__ = [
  'ArxivMathConfig',
  'C4Config',
  'LocalBooksConfig',
  'Pg19T5Config',
  'PreparedDataConfig',
  'TextCorpusConfig',
  'START_OF_DOCUMENT_ID',
  'TASK_NAMES',
  'chunk_documents',
  'configure',
  'embedding_size',
  'get_config',
  'register_tasks',
  'reset_config',
  'vocabulary',
]
