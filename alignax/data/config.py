"""The data configuration shared by every trainer. Field names are TRL's (``SFTConfig``,
``DPOConfig``, ``ScriptArguments``) where TRL has one, so a TRL command line or YAML carries
over."""

import dataclasses
import os
from typing import Literal

from alignax import _validate

TruncationMode = Literal["keep_start", "keep_end"]
PaddingBuckets = Literal["pow2", "max_length"]
TRUNCATION_MODES = ("keep_start", "keep_end")
PADDING_BUCKETS = ("pow2", "max_length")


@dataclasses.dataclass
class DataConfig:
  """Where the data comes from and how rows become fixed-shape batches.

  Attributes:
    dataset_name: a local ``.jsonl`` / ``.json`` / ``.parquet`` file, a directory of them, a
      directory written by ``datasets``' ``save_to_disk``, or a hub dataset id (needs ``datasets``
      and a network). TRL's ``--dataset_name``.
    dataset_config: the hub dataset's configuration name (``--dataset_config``).
    dataset_train_split: split used for training (``--dataset_train_split``).
    dataset_test_split: split used for evaluation (``--dataset_test_split``).
    dataset_text_field: column holding plain text for language-modelling SFT data.
    max_length: tokens per sequence (prompt + completion) after truncation; None never truncates.
    max_prompt_length: tokens per prompt for prompt-only data (GRPO/PPO); prompts keep their end.
    truncation_mode: ``keep_start`` cuts the end of a sequence (a prompt that fills
      ``max_length`` leaves no completion token: an error, or a skip with ``skip_invalid``);
      ``keep_end`` cuts the start, so the prompt loses its beginning before the completion loses
      any token.
    completion_only_loss: for prompt-completion SFT data, put only completion tokens in the loss
      mask; None means True (TRL's default).
    assistant_only_loss: for conversational language-modelling data (``messages``), put only the
      assistant turns in the loss mask (needs a chat template with ``{% generation %}`` blocks;
      plain-text rows are an error).
    packing: pack SFT examples first-fit into rows of ``max_length`` tokens with segment ids.
    packing_bins: rows filled at once when packing (more bins, less padding); None = batch size.
    pad_to_multiple_of: pad each batch's length up to a multiple of this (capped at
      ``max_length``); overrides ``padding_buckets``.
    padding_buckets: ``pow2`` pads each batch's length to the next power of two (capped at
      ``max_length``), so a jitted step compiles once per bucket instead of once per length;
      ``max_length`` always pads to ``max_length`` (one shape).
    seed: seeds the shuffle, in ``[0, 2**32)`` (the same order on every host, then each takes
      its own slice, so the hosts' batches together are the one-host batch).
    shuffle: shuffle the examples (a new order every epoch).
    dataloader_drop_last: drop a last incomplete batch so every step has the same batch size
      (data too small for one full batch is then an error rather than an empty epoch).
    skip_invalid: skip bad rows and count them (``PreparedDataset.skipped``) instead of raising
      :class:`~alignax.data.DataError`.
  """

  dataset_name: str | None = None
  dataset_config: str | None = None
  dataset_train_split: str = "train"
  dataset_test_split: str = "test"
  dataset_text_field: str = "text"
  max_length: int | None = 1024
  max_prompt_length: int | None = None
  # str rather than the Literal, so a bad value reaches __post_init__'s named error; the choices
  # metadata still gives HfArgumentParser's --help and parsing the options.
  truncation_mode: str = dataclasses.field(
    default="keep_start", metadata={"choices": TRUNCATION_MODES}
  )
  completion_only_loss: bool | None = None
  assistant_only_loss: bool = False
  packing: bool = False
  packing_bins: int | None = None
  pad_to_multiple_of: int | None = None
  padding_buckets: str = dataclasses.field(default="pow2", metadata={"choices": PADDING_BUCKETS})
  seed: int = 42
  shuffle: bool = True
  dataloader_drop_last: bool = True
  skip_invalid: bool = False

  def __post_init__(self):
    # A YAML or hand-written config can hold "false" where a bool belongs, which is truthy: check
    # the types rather than let packing="false" pack.
    flags = ("assistant_only_loss", "packing", "shuffle", "dataloader_drop_last", "skip_invalid")
    for name in flags:
      _check_type(name, getattr(self, name), bool, "a bool")
    _check_type(
      "completion_only_loss", self.completion_only_loss, (bool, type(None)), "a bool or None"
    )
    _check_type(
      "dataset_name", self.dataset_name, (str, os.PathLike, type(None)), "a path, a name or None"
    )
    _check_type("dataset_config", self.dataset_config, (str, type(None)), "a string or None")
    for name in ("dataset_train_split", "dataset_test_split", "dataset_text_field"):
      value = getattr(self, name)
      _check_type(name, value, str, "a non-empty string")
      if not value:
        raise ValueError(f"{name} must be a non-empty string, got ''")
    _validate.choice("truncation_mode", self.truncation_mode, TRUNCATION_MODES)
    _validate.choice("padding_buckets", self.padding_buckets, PADDING_BUCKETS)
    for name in ("max_length", "max_prompt_length", "packing_bins", "pad_to_multiple_of"):
      value = getattr(self, name)
      if value is not None:
        _validate.positive_int(name, value)
    if self.packing and self.max_length is None:
      raise ValueError("packing=True needs max_length (the length of a packed row)")
    if self.padding_buckets == "max_length" and self.max_length is None:
      raise ValueError("padding_buckets='max_length' needs max_length")
    if isinstance(self.seed, bool) or not isinstance(self.seed, int):
      raise ValueError(f"seed must be an int, got {self.seed!r}")
    if not 0 <= self.seed < 2**32:
      raise ValueError(f"seed must lie in [0, 2**32) (grain's shuffle seeds), got {self.seed}")


def _check_type(name: str, value, types, expected: str) -> None:
  if not isinstance(value, types):
    raise ValueError(f"{name} must be {expected}, got {value!r} ({type(value).__name__})")
