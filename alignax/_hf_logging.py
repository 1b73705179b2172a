"""Keeps ``import transformers`` quiet about PyTorch.

Without torch installed, ``transformers`` logs "PyTorch was not found. Models won't be available" at
import. alignax uses transformers only for configs, tokenizers and chat templates and its models need
no torch, so the message would mislead. The filter drops that one record on the ``transformers``
logger (where it is emitted) and nothing else; it is installed by ``import alignax``, before any
alignax module imports transformers.
"""

import logging

_TORCH_ADVICE = "PyTorch was not found"


def _drop_torch_advice(record: logging.LogRecord) -> bool:
  return _TORCH_ADVICE not in record.getMessage()


def install() -> None:
  """Adds the filter once (idempotent)."""
  logger = logging.getLogger("transformers")
  if _drop_torch_advice not in logger.filters:
    logger.addFilter(_drop_torch_advice)
