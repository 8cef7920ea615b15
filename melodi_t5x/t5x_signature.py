"""What a checkpoint was trained with: architecture and vocabulary, checked before any restore.

T5X restores a checkpoint into whatever model the gin files build. Another architecture fails
deep inside the restore with a pytree-structure error (mentioning the other architecture's
state leaves); another vocabulary of the same padded size restores cleanly and scores the
wrong ids. `t5x.train` therefore writes `<MODEL_DIR>/model_signature.json` (architecture, config
class, config, vocabulary name, size and checksum of its SentencePiece model) and `t5x.eval` /
`t5x.infer`, `python -m melodi_t5x.tools.generate` and a resumed `t5x.train` compare it with the
model they build before restoring, with an error naming both: the architecture, the vocabulary
and the embedding's rows (`vocab_size`, the gin macro `VOCAB_SIZE`; a different size would
otherwise stop the restore with a raw `ScopeParamShapeError`).

Gin hooks (in `gin/runs/melodi_pretrain.gin`, `melodi_eval.gin`, `gin/infer.gin`):

  train_script.train.model_dir = @t5x_signature.signed_model_dir()      # writes or checks
  utils.RestoreCheckpointConfig.path = @t5x_signature.checked_checkpoint_path()   # checks

`checked_checkpoint_path` also quiets T5X's "Not restoring param=state/param_states/..." warnings of
those tools (they restore the parameters only; the optimizer state is dropped on purpose, one line
per optimizer-state leaf, 184 for the quickstart model); a parameter not restored is still logged.

A model directory without the file is not checked: a new run writes it silently, a directory
with checkpoints but no signature (trained before signatures were written) logs a warning.
"""

from __future__ import annotations

import dataclasses
import json
import logging as py_logging
import os
import re
import zlib
from typing import Any

from absl import logging

SIGNATURE_FILE = 'model_signature.json'
FORMAT_VERSION = 1


def vocabulary_fingerprint(vocabulary) -> dict[str, Any]:
  """Name, size and checksum (CRC32 of the SentencePiece model) of a seqio vocabulary.

  Two vocabularies are the same when their sizes and checksums agree (a task that borrows another
  task's vocabulary, `vocabulary_task`, has that task's checksum). Without a SentencePiece model
  the checksum is None and only the size is compared.
  """
  resolved = getattr(vocabulary, 'resolved', vocabulary)
  model = getattr(resolved, 'sp_model', None)
  checksum = zlib.crc32(model) if isinstance(model, bytes | bytearray) else None
  return {
    'name': repr(vocabulary),
    'size': int(vocabulary.vocab_size),
    'file': getattr(resolved, 'sentencepiece_model_file', None),
    'checksum': checksum,
  }


def model_signature(model) -> dict[str, Any]:
  """The signature of a T5X model: its module's class, config and vocabulary."""
  module = model.module
  config = getattr(module, 'config', None)
  fields = {}
  if dataclasses.is_dataclass(config):
    fields = {f.name: repr(getattr(config, f.name)) for f in dataclasses.fields(config)}
  return {
    'version': FORMAT_VERSION,
    'architecture': type(module).__name__,
    'config_class': type(config).__name__ if config is not None else None,
    'config': fields,
    'vocabulary': vocabulary_fingerprint(model.output_vocabulary),
  }


def _describe_vocabulary(v: dict[str, Any]) -> str:
  file = f', file {v["file"]}' if v.get('file') else ''
  return f'{v["name"]} (size {v["size"]}, checksum {v["checksum"]}{file})'


def mismatch(saved: dict[str, Any], current: dict[str, Any]) -> str | None:
  """A sentence naming what differs between a saved and a current signature, or None."""
  problems = []
  if (saved['architecture'], saved['config_class']) != (
    current['architecture'],
    current['config_class'],
  ):
    problems.append(
      f'architecture {saved["architecture"]} ({saved["config_class"]}) in the checkpoint, '
      f'{current["architecture"]} ({current["config_class"]}) in this run: bind the same MODULE '
      "and model file as the training run (e.g. --gin.MODULE='@xl.XLDecoder()' for a "
      'Transformer-XL checkpoint)'
    )
  sv, cv = saved['vocabulary'], current['vocabulary']
  same_checksum = sv['checksum'] is None or cv['checksum'] is None
  same_checksum = same_checksum or sv['checksum'] == cv['checksum']
  if sv['size'] != cv['size'] or not same_checksum:
    problems.append(
      f'vocabulary {_describe_vocabulary(sv)} in the checkpoint, {_describe_vocabulary(cv)} in '
      'this run: evaluate with the vocabulary the model was trained with (the task of the '
      'training run, or tasks.TextCorpusConfig.vocabulary_task / vocabulary_path naming it)'
    )
  saved_rows = saved['config'].get('vocab_size')
  rows = current['config'].get('vocab_size')
  if saved_rows is not None and rows is not None and saved_rows != rows:
    problems.append(
      f'embedding of {saved_rows} rows (vocab_size) in the checkpoint, {rows} in this run: bind '
      f"the training run's VOCAB_SIZE (--gin.VOCAB_SIZE={saved_rows}), which the data gin file "
      '(gin/experiments/data/<task>.gin) sets for its own vocabulary'
    )
  return '; '.join(problems) or None


def model_dir_of(checkpoint_path: str) -> str:
  """The model directory of a checkpoint path (`.../checkpoint_N` or the directory itself)."""
  path = str(checkpoint_path).rstrip('/')
  if re.fullmatch(r'checkpoint_\d+', os.path.basename(path)):
    return os.path.dirname(path)
  return path


def read_signature(model_dir: str) -> dict[str, Any] | None:
  from etils import epath  # pylint: disable=g-import-not-at-top

  path = epath.Path(model_dir) / SIGNATURE_FILE
  if not path.exists():
    return None
  return json.loads(path.read_text())


def check(model, checkpoint_path: str, what: str) -> None:
  """Raises ValueError if the model directory's signature differs from `model`'s."""
  model_dir = model_dir_of(checkpoint_path)
  saved = read_signature(model_dir)
  if saved is None:
    logging.warning(
      'No %s in %s (trained before signatures were written): architecture and vocabulary of the '
      'checkpoint are not checked.',
      SIGNATURE_FILE,
      model_dir,
    )
    return
  problem = mismatch(saved, model_signature(model))
  if problem:
    raise ValueError(f'{what} {checkpoint_path} does not fit this model: {problem}.')


def has_checkpoints(model_dir: str) -> bool:
  """Whether `model_dir` holds a T5X checkpoint (`checkpoint_<N>`), i.e. a run to resume."""
  from etils import epath  # pylint: disable=g-import-not-at-top

  path = epath.Path(model_dir)
  if not path.is_dir():
    return False
  return any(re.fullmatch(r'checkpoint_\d+', p.name) for p in path.iterdir())


def signed_model_dir(model_dir: str, model) -> str:
  """`train_script.train.model_dir`: checks (resume) or writes (new run) the signature."""
  import jax  # pylint: disable=g-import-not-at-top
  from etils import epath  # pylint: disable=g-import-not-at-top

  signed = read_signature(model_dir) is not None
  if signed or has_checkpoints(model_dir):  # a new run has nothing to check (and no warning)
    check(model, model_dir, 'The model directory')
  if not signed and jax.process_index() == 0:
    path = epath.Path(model_dir)
    path.mkdir(parents=True, exist_ok=True)
    (path / SIGNATURE_FILE).write_text(json.dumps(model_signature(model), indent=1) + '\n')
  return model_dir


class _OptimizerStateNotRestoredFilter(py_logging.Filter):
  """Drops T5X's warning for each optimizer-state leaf that eval / infer deliberately skip."""

  MESSAGE = "Not restoring param=%s because it's missing in the checkpoint"

  def filter(self, record: py_logging.LogRecord) -> bool:
    return not (
      record.msg == self.MESSAGE
      and bool(record.args)
      and str(record.args[0]).startswith('state/param_states/')
    )


def quiet_optimizer_state_restore() -> None:
  """Installs `_OptimizerStateNotRestoredFilter` on absl's logger (once)."""
  absl_logger = logging.get_absl_logger()
  if not any(isinstance(f, _OptimizerStateNotRestoredFilter) for f in absl_logger.filters):
    absl_logger.addFilter(_OptimizerStateNotRestoredFilter())


def checked_checkpoint_path(path, model):
  """`utils.RestoreCheckpointConfig.path` of eval / infer: checks the signature, returns `path`.

  Also quiets the warnings of the optimizer state these tools do not restore.
  """
  for p in [path] if isinstance(path, str) else list(path):
    check(model, p, 'The checkpoint')
  quiet_optimizer_state_restore()
  return path
