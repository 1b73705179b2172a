"""Data: TRL-format rows from files, saved or hub datasets, or lists, tokenised with completion
masks and batched by grain with padding buckets, packing, seeded shuffling, per-host sharding and
exact resume.

Typical use::

  config = DataConfig(dataset_name="data/prefs.jsonl", max_length=512)
  train = load_dataset(config, tokenizer, task="preference")
  batches = iter(make_batches(train, batch_size=8, config=config,
                              process_index=jax.process_index(), process_count=jax.process_count()))
  batch = next(batches)  # {"input_ids": [2, 8, T], "attention_mask": ..., "completion_mask": ...}
  state = batches.get_state()  # JSON-serialisable; batches.set_state(state) resumes exactly
"""

from collections.abc import Callable

import transformers

from alignax.data.config import PADDING_BUCKETS as PADDING_BUCKETS
from alignax.data.config import TRUNCATION_MODES as TRUNCATION_MODES
from alignax.data.config import DataConfig as DataConfig
from alignax.data.formats import FORMAT_COLUMNS as FORMAT_COLUMNS
from alignax.data.formats import TASK_FORMATS as TASK_FORMATS
from alignax.data.formats import TASKS as TASKS
from alignax.data.formats import PreparedDataset as PreparedDataset
from alignax.data.formats import detect_format as detect_format
from alignax.data.formats import prepare_dataset as prepare_dataset
from alignax.data.formats import truncate as truncate
from alignax.data.pipeline import bucket_length as bucket_length
from alignax.data.pipeline import collate_packed as collate_packed
from alignax.data.pipeline import collate_preference as collate_preference
from alignax.data.pipeline import collate_prompts as collate_prompts
from alignax.data.pipeline import collate_sequences as collate_sequences
from alignax.data.pipeline import host_slice as host_slice
from alignax.data.pipeline import kl_examples as kl_examples
from alignax.data.pipeline import make_batches as make_batches
from alignax.data.pipeline import steps_per_epoch as steps_per_epoch
from alignax.data.sources import DataError as DataError
from alignax.data.sources import Row as Row
from alignax.data.sources import load_rows as load_rows


def load_dataset(
  config: DataConfig,
  tokenizer: transformers.PreTrainedTokenizerBase,
  *,
  task: str,
  split: str = "train",
  on_skip: Callable[[DataError], None] | None = None,
) -> PreparedDataset:
  """Loads ``config.dataset_name`` and tokenises it: :func:`load_rows` then :func:`prepare_dataset`.

  Args:
    config: the data configuration (``dataset_name`` is required).
    tokenizer: a ``transformers`` tokenizer.
    task: ``sft`` | ``preference`` | ``unpaired`` | ``prompt``.
    split: ``"train"`` reads ``config.dataset_train_split``, ``"test"`` reads
      ``config.dataset_test_split``.
    on_skip: called with each skipped row's error under ``skip_invalid``.

  Returns:
    The prepared dataset.
  """
  if config.dataset_name is None:
    raise ValueError("DataConfig.dataset_name is not set (--dataset_name)")
  if split not in ("train", "test"):
    raise ValueError(f"split must be 'train' or 'test', got {split!r}")
  name = config.dataset_train_split if split == "train" else config.dataset_test_split
  rows = load_rows(config.dataset_name, split=name, config_name=config.dataset_config)
  return prepare_dataset(rows, tokenizer, task=task, config=config, on_skip=on_skip)
