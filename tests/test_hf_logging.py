"""``import alignax`` keeps transformers' "PyTorch was not found" advice out of the user's logs."""

import logging

import alignax  # noqa: F401  (installs the filter)
from alignax import _hf_logging


def test_torch_advice_is_dropped_and_other_transformers_records_pass(caplog):
  logger = logging.getLogger("transformers")
  assert _hf_logging._drop_torch_advice in logger.filters
  with caplog.at_level(logging.WARNING, logger="transformers"):
    logger.warning("PyTorch was not found. Models won't be available and only tokenizers, "
                   "configuration and file/data utilities can be used.")
    logger.warning("an unrelated transformers warning")
  messages = [r.getMessage() for r in caplog.records]
  assert messages == ["an unrelated transformers warning"]
  _hf_logging.install()  # idempotent
  assert logger.filters.count(_hf_logging._drop_torch_advice) == 1
