"""grain pipelines from prepared examples to fixed-shape NumPy batches, with exact resume.

``make_batches`` builds ``MapDataset.source(examples).shuffle(seed).repeat(epochs)``, batches it
in global batches of ``batch_size * process_count`` rows padded to a length bucket, and keeps this
host's block of rows; or (SFT, ``packing=True``) takes this host's every ``process_count``-th
example and packs those. Iterate it with
``it = iter(batches)``; ``it.get_state()`` is a small JSON-serialisable dict and
``it.set_state(state)`` on a fresh iterator continues with exactly the batches the uninterrupted
iterator would have produced (grain's ``checkpoint.CheckpointSave`` stores it in an orbax
checkpoint).

Batch layouts (all ``int32`` unless noted; ``B`` = ``batch_size`` rows per host, ``T`` = the batch's
length bucket):

- ``sft``: ``input_ids``, ``attention_mask``, ``completion_mask`` ``[B, T]``, right-padded. Packed
  (``packing=True``): ``[B, max_length]`` with ``segment_ids`` (1, 2, ... per example, 0 on
  padding) and ``positions`` (restarting at 0 in every segment).
- ``preference``: ``input_ids``, ``attention_mask``, ``completion_mask`` ``[2, B, T]``: index 0
  holds the chosen sequences and index 1 the rejected ones, row ``b`` of both from the same pair;
  ``margin [B]`` (float32) when the data has one; ``ref_logps [2, B]`` (float32: the reference
  model's chosen and rejected sequence log-probs) when the dataset carries them
  (``alignax.train.reference.precompute_reference_logps``). ``x.reshape(2 * B, T)`` is the
  concatenated chosen-first ``[2B, T]`` layout of TRL's ``concatenated_forward``: one forward
  runs both. Keeping the pair axis first means the batch axis (axis 1) is the one to shard, so
  every device and host holds whole pairs and per-host batches concatenate along axis 1 into the
  global batch.
- ``unpaired``: ``input_ids``, ``attention_mask``, ``completion_mask`` ``[B, T]``; ``label [B]``
  (bool); ``kl_input_ids``, ``kl_attention_mask``, ``kl_completion_mask`` ``[B, T]``: each row's
  KL row, its prompt with another example's completion, for KTO's KL reference point (unused by
  ``apo_zero_unpaired``). The pairing is made once over the dataset, before shuffling (see
  :func:`pair_kl_examples`), so every example owns its KL row wherever it lands. With precomputed
  reference log-probs, ``ref_logps [B]`` and ``kl_ref_logps [B]`` (float32).
- ``prompt``: ``input_ids``, ``attention_mask`` ``[B, T]``, **left**-padded so every prompt ends
  at the last column, where generation starts; ``extras``: a dict of lists (the rows' columns,
  ``prompt`` included) for reward functions.
"""

import functools
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from alignax import _validate
from alignax.data.config import DataConfig
from alignax.data.formats import Example, PreparedDataset, truncate

# The axis that indexes rows in a preference batch, per key (0 for the rest): the pair axis leads.
PREFERENCE_ROW_AXES = {"input_ids": 1, "attention_mask": 1, "completion_mask": 1, "ref_logps": 1}



def bucket_length(
  length: int,
  *,
  max_length: int | None = None,
  pad_to_multiple_of: int | None = None,
  padding_buckets: str = "pow2",
) -> int:
  """The padded length of a batch whose longest sequence has ``length`` tokens.

  ``pad_to_multiple_of=m`` rounds up to a multiple of ``m``; otherwise ``pow2`` rounds up to a
  power of two and ``max_length`` always gives ``max_length``. Buckets are capped at
  ``max_length``, so a jitted step sees at most ``log2(max_length) + 1`` shapes under ``pow2``.

  Args:
    length: tokens in the longest sequence of the batch (``1 <= length <= max_length``).
    max_length: the cap (None: no cap).
    pad_to_multiple_of: bucket width; overrides ``padding_buckets``.
    padding_buckets: ``pow2`` | ``max_length``.

  Returns:
    The bucket length, ``>= length``.
  """
  _validate.positive_int("length", length)
  if max_length is not None and length > max_length:
    raise ValueError(f"length={length} exceeds max_length={max_length}")
  if pad_to_multiple_of is not None:
    _validate.positive_int("pad_to_multiple_of", pad_to_multiple_of)
    bucket = -(-length // pad_to_multiple_of) * pad_to_multiple_of
  elif padding_buckets == "max_length":
    if max_length is None:
      raise ValueError("padding_buckets='max_length' needs max_length")
    bucket = max_length
  elif padding_buckets == "pow2":
    bucket = 1 << (length - 1).bit_length()
  else:
    raise ValueError(f"padding_buckets must be 'pow2' or 'max_length', got {padding_buckets!r}")
  return bucket if max_length is None else min(bucket, max_length)


def _pad(sequences: Sequence[np.ndarray], length: int, value: int, *, left: bool = False):
  out = np.full((len(sequences), length), value, dtype=np.int32)
  for i, seq in enumerate(sequences):
    if left:
      out[i, length - len(seq) :] = seq
    else:
      out[i, : len(seq)] = seq
  return out


def _bucket(config: DataConfig, longest: int, max_length: int | None) -> int:
  return bucket_length(
    longest,
    max_length=max_length,
    pad_to_multiple_of=config.pad_to_multiple_of,
    padding_buckets=config.padding_buckets,
  )


def _prompt_length(example: Example) -> int:
  """The prompt is the leading tokens outside the completion mask."""
  mask = example["completion_mask"]
  return int(np.argmax(mask)) if mask.any() else len(mask)


# The longest rotation in dataset order that kl_partners tries before grouping by prompt.
_MAX_KL_SHIFT = 64


def kl_partners(examples: Sequence[Example]) -> list[int]:
  """For every example, the index of the example whose completion makes its KL row: a
  permutation of the examples in which every example's partner has a different prompt.

  A permutation uses every completion exactly once, so the KL rows score the dataset's own
  completions, each under another prompt (TRL's ``KTOTrainer`` rotates by one within each batch
  because "the mismatched outputs y' ... should be the same set as the matched outputs y"; here
  the sets are equal over the dataset, and over a batch in expectation, as the pairing precedes
  the shuffle). Example ``i`` takes the completion of example ``i - s`` (cyclically, in dataset
  order) for the smallest shift ``s >= 1`` that gives every example another prompt. A paired
  preference row becomes two adjacent examples (chosen, rejected) with one prompt, so there
  ``s = 2``: chosen with the previous row's chosen, rejected with its rejected. (Taking the
  nearest earlier different prompt instead would give both examples of a row the previous row's
  *rejected* completion: a KL estimate over undesirable completions only.)

  When no shift up to ``_MAX_KL_SHIFT`` works (prompts repeated across the dataset), the examples
  are grouped by prompt (in order of first appearance) and rotated by the largest group's size,
  which separates every example from its own group while no prompt holds more than half of the
  examples. When one does, no such permutation exists: each example takes the nearest earlier
  example with a different prompt (completions are reused); when all prompts are equal,
  ``i - 1``; a dataset of one example is its own partner.
  """
  n = len(examples)
  codes: dict[bytes, int] = {}
  prompt_ids = np.asarray(
    [codes.setdefault(e["input_ids"][: _prompt_length(e)].tobytes(), len(codes)) for e in examples],
    np.int64,
  )
  for shift in range(1, min(n, _MAX_KL_SHIFT + 1)):
    if not np.any(prompt_ids == np.roll(prompt_ids, shift)):  # roll(x, s)[i] = x[i - s]
      return ((np.arange(n) - shift) % n).tolist()
  largest = int(np.bincount(prompt_ids).max()) if n else 0
  if 1 < len(codes) and 2 * largest <= n:
    # Contiguous groups of at most `largest` examples: positions `largest` apart (either way
    # round the cycle, n - largest >= largest) always lie in different groups.
    order = np.argsort(prompt_ids, kind="stable")
    partners = np.empty(n, np.int64)
    partners[order] = np.roll(order, largest)
    return partners.tolist()
  differs = [prompt_ids[i] != prompt_ids[i - 1] for i in range(n)]
  if not any(differs):
    return [(i - 1) % n for i in range(n)]
  # Walk the cycle from a prompt change: the nearest earlier different prompt of example i is
  # i - 1 if the prompt changes at i, else the same as example i - 1's (they share the prompt).
  start = differs.index(True)
  partners = [0] * n
  for k in range(n):
    i = (start + k) % n
    partners[i] = (i - 1) % n if differs[i] else partners[i - 1]
  return partners


def kl_examples(examples: Sequence[Example], *, config: DataConfig) -> list[Example]:
  """KTO's mismatched pairs: each example's prompt with its :func:`kl_partners` example's
  completion, for the KL reference point of TRL's ``KTOTrainer``.

  The split between prompt and completion is read from the completion mask (the prompt is the
  leading zeros), and the new sequence is truncated to ``max_length`` like any other.

  Returns:
    One ``{"input_ids", "completion_mask"}`` per example, in the examples' order.
  """
  parts = []
  for e in examples:
    n_prompt = _prompt_length(e)
    parts.append((e["input_ids"][:n_prompt].tolist(), e["input_ids"][n_prompt:].tolist()))
  out = []
  for (prompt, _), partner in zip(parts, kl_partners(examples)):
    completion = parts[partner][1]
    ids = prompt + completion
    mask = [0] * len(prompt) + [1] * len(completion)
    ids, mask = truncate(
      ids, mask, max_length=config.max_length, truncation_mode=config.truncation_mode
    )
    out.append(
      {"input_ids": np.asarray(ids, np.int32), "completion_mask": np.asarray(mask, np.int32)}
    )
  return out


def pair_kl_examples(examples: Sequence[Example], *, config: DataConfig) -> list[Example]:
  """Unpaired examples with their KL rows attached (``kl_input_ids``, ``kl_completion_mask``, from
  :func:`kl_examples` over the whole sequence in dataset order); a list whose examples all carry
  them already is returned as it is.

  :func:`make_batches` calls it before shuffling, so the pairing does not depend on the shuffle,
  the batch size or the number of hosts, and the reference log-probs of the KL rows can be
  precomputed per example.
  """
  if all("kl_input_ids" in e for e in examples):
    return list(examples)
  return [
    {**e, "kl_input_ids": kl["input_ids"], "kl_completion_mask": kl["completion_mask"]}
    for e, kl in zip(examples, kl_examples(examples, config=config))
  ]


def _float_column(examples: Sequence[Example], key: str, axis: int = 0) -> np.ndarray:
  """Per-example float values stacked along ``axis`` (every example must carry ``key``)."""
  missing = [i for i, e in enumerate(examples) if key not in e]
  if missing:
    raise ValueError(
      f"{key!r} is on some examples of the batch but not on rows {missing}; precompute it for "
      "every example of the dataset"
    )
  return np.stack([np.asarray(e[key], np.float32) for e in examples], axis=axis)


def collate_sequences(
  examples: Sequence[Example], *, pad_token_id: int, config: DataConfig
) -> dict[str, np.ndarray]:
  """SFT / unpaired examples to right-padded ``[B, T]`` arrays. Unpaired (KTO) examples add
  ``label [B]`` and the KL rows ``kl_input_ids``, ``kl_attention_mask``, ``kl_completion_mask``
  ``[B, T]``, padded to the same ``T``: the examples' own (:func:`pair_kl_examples`), or when they
  have none, paired among the given examples (:func:`kl_examples`). Precomputed reference
  log-probs ``ref_logps`` and ``kl_ref_logps`` become ``[B]`` float32 columns."""
  unpaired = "label" in examples[0]
  if unpaired:
    examples = pair_kl_examples(examples, config=config)
  kl = (
    [{"input_ids": e["kl_input_ids"], "completion_mask": e["kl_completion_mask"]} for e in examples]
    if unpaired
    else []
  )
  seqs = [e["input_ids"] for e in [*examples, *kl]]
  length = _bucket(config, max(len(s) for s in seqs), config.max_length)
  batch = {}
  for prefix, group in (("", examples), ("kl_", kl)):
    if group:
      ids = [e["input_ids"] for e in group]
      batch[f"{prefix}input_ids"] = _pad(ids, length, pad_token_id)
      batch[f"{prefix}attention_mask"] = _pad([np.ones_like(s) for s in ids], length, 0)
      batch[f"{prefix}completion_mask"] = _pad([e["completion_mask"] for e in group], length, 0)
  if unpaired:
    batch["label"] = np.asarray([e["label"] for e in examples], dtype=np.bool_)
  for key in ("ref_logps", "kl_ref_logps"):
    # Any example, not just the first: a batch whose first row lacks them is still an error.
    if any(key in e for e in examples):
      batch[key] = _float_column(examples, key)
  return batch


def collate_preference(
  examples: Sequence[Example], *, pad_token_id: int, config: DataConfig
) -> dict[str, np.ndarray]:
  """Preference pairs to ``[2, B, T]`` arrays, chosen at index 0 (``margin [B]`` when present;
  precomputed ``ref_logps`` ``[2]`` per example become ``ref_logps [2, B]``)."""
  seqs = [e[f"{side}_input_ids"] for side in ("chosen", "rejected") for e in examples]
  masks = [e[f"{side}_completion_mask"] for side in ("chosen", "rejected") for e in examples]
  length = _bucket(config, max(len(s) for s in seqs), config.max_length)
  shape = (2, len(examples), length)
  batch = {
    "input_ids": _pad(seqs, length, pad_token_id).reshape(shape),
    "attention_mask": _pad([np.ones_like(s) for s in seqs], length, 0).reshape(shape),
    "completion_mask": _pad(masks, length, 0).reshape(shape),
  }
  if "margin" in examples[0]:
    batch["margin"] = np.asarray([e["margin"] for e in examples], dtype=np.float32)
  if any("ref_logps" in e for e in examples):
    batch["ref_logps"] = _float_column(examples, "ref_logps", axis=1)
  return batch


def collate_prompts(
  examples: Sequence[Example], *, pad_token_id: int, config: DataConfig
) -> dict[str, Any]:
  """Prompts to left-padded ``[B, T]`` arrays plus ``extras`` (a dict of per-row lists)."""
  seqs = [e["prompt_ids"] for e in examples]
  length = _bucket(config, max(len(s) for s in seqs), config.max_prompt_length)
  keys = list(dict.fromkeys(k for e in examples for k in e["extras"]))
  return {
    "input_ids": _pad(seqs, length, pad_token_id, left=True),
    "attention_mask": _pad([np.ones_like(s) for s in seqs], length, 0, left=True),
    "extras": {k: [e["extras"].get(k) for e in examples] for k in keys},
  }


def collate_packed(rows: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """Packed rows (grain's ``FirstFitPackIterDataset`` output) to ``[B, max_length]`` arrays."""
  segment_ids = np.stack([r["input_ids_segment_ids"] for r in rows]).astype(np.int32)
  return {
    "input_ids": np.stack([r["input_ids"] for r in rows]).astype(np.int32),
    "attention_mask": (segment_ids > 0).astype(np.int32),
    "completion_mask": np.stack([r["completion_mask"] for r in rows]).astype(np.int32),
    "segment_ids": segment_ids,
    "positions": np.stack([r["input_ids_positions"] for r in rows]).astype(np.int32),
  }


def host_slice(num_examples: int, *, process_index: int, process_count: int) -> slice:
  """This host's share: every ``process_count``-th example from ``process_index``, after dropping
  the ``num_examples % process_count`` last ones so every host gets as many (and so as many
  batches, keeping multi-host steps in lockstep). :func:`make_batches` takes it from the shuffled
  order for packed data, so the examples left out change every epoch."""
  _validate.positive_int("process_count", process_count)
  if isinstance(process_index, bool) or not isinstance(process_index, int):
    raise ValueError(f"process_index must be an int, got {process_index!r}")
  if not 0 <= process_index < process_count:
    raise ValueError(
      f"process_index={process_index} must lie in [0, process_count={process_count})"
    )
  even = num_examples - num_examples % process_count
  if even == 0:
    raise ValueError(f"{num_examples} examples cannot be shared among {process_count} hosts")
  return slice(process_index, even, process_count)


def steps_per_epoch(
  num_examples: int, *, batch_size: int, process_count: int = 1, drop_last: bool = True
) -> int:
  """Batches per host in one epoch without packing (with packing it depends on the lengths);
  with several epochs a batch may straddle two, so ``num_epochs`` epochs give
  ``steps_per_epoch(num_epochs * num_examples, ...)`` batches."""
  per_host = num_examples // process_count
  return per_host // batch_size if drop_last else -(-per_host // batch_size)


def make_batches(
  dataset: PreparedDataset,
  *,
  batch_size: int,
  config: DataConfig,
  num_epochs: int | None = None,
  process_index: int = 0,
  process_count: int = 1,
  prefetch_batches: int = 0,
) -> grain.IterDataset:
  """A grain dataset of batches (layouts in the module docstring) for one host.

  Args:
    dataset: from :func:`alignax.data.prepare_dataset`.
    batch_size: rows per batch on this host (the global batch is ``batch_size * process_count``);
      packed SFT rows count as rows. Unpacked, host ``i`` gets rows ``[i * batch_size, (i + 1) *
      batch_size)`` of the global batch, padded to the global batch's bucket, so every host's
      arrays have one shape and together, in process order, equal the one-host batch of
      ``batch_size * process_count`` rows (KTO's KL rows included).
    config: ``seed``, ``shuffle``, ``packing``, ``packing_bins``, padding buckets,
      ``dataloader_drop_last``.
    num_epochs: passes over the data; None repeats forever (stop at ``max_steps``). Each epoch is
      shuffled anew; a batch may straddle two epochs.
    process_index: this host (``jax.process_index()``).
    process_count: hosts (``jax.process_count()``). Every host gets as many batches (with
      ``dataloader_drop_last=False`` the last global batch loses its ``rows % process_count``
      last rows). Packed, each host packs every ``process_count``-th example of the shuffled
      order (``num_examples % process_count`` are left out each epoch) and packed rows per host
      differ, so multi-host packed runs stop at ``max_steps`` (``num_epochs`` None) rather than
      at the end of the data.
    prefetch_batches: batches prepared ahead on a background thread (0: none); the iterator state
      still counts only the batches consumed, so resume stays exact.

  Returns:
    ``grain.IterDataset``; ``iter()`` it for a checkpointable iterator.

  Raises:
    ValueError: packing non-SFT data; ``num_epochs`` epochs that make no full batch under
      ``dataloader_drop_last``; prompts bucketed to ``max_length`` without
      ``max_prompt_length``; fewer examples than hosts.
  """
  _validate.positive_int("batch_size", batch_size)
  if num_epochs is not None:
    _validate.positive_int("num_epochs", num_epochs)
  if config.packing and dataset.task != "sft":
    raise ValueError(f"packing applies to SFT data only, not to {dataset.task!r}")
  if (
    dataset.task == "prompt"
    and config.padding_buckets == "max_length"
    and config.pad_to_multiple_of is None
    and config.max_prompt_length is None
  ):
    raise ValueError(
      "padding_buckets='max_length' pads prompts to max_prompt_length, which is not set; set "
      "max_prompt_length or use padding_buckets='pow2'"
    )
  examples = dataset.examples
  if dataset.task == "unpaired":
    # KL rows are paired in dataset order, before the shuffle, so each example keeps its own.
    examples = pair_kl_examples(examples, config=config)
  ds = grain.MapDataset.source(examples)
  hosts = host_slice(len(ds), process_index=process_index, process_count=process_count)
  # Every host draws the same order (the same seed; grain reshuffles epoch e with seed + e).
  if config.shuffle:
    ds = ds.shuffle(seed=config.seed)
  drop = config.dataloader_drop_last
  if config.packing:
    # Packing runs on each host, so each host packs its own every-`process_count`-th example.
    ds = ds[hosts].repeat(num_epochs)
    length = config.max_length
    features = ds.map(
      lambda e: {"input_ids": e["input_ids"], "completion_mask": e["completion_mask"]}
    )
    packed = grain.experimental.FirstFitPackIterDataset(
      features.to_iter_dataset(),
      length_struct={"input_ids": length, "completion_mask": length},
      num_packing_bins=config.packing_bins or batch_size,
      shuffle_bins=False,  # the examples are shuffled already; bins stay in a reproducible order
    )
    batches = packed.batch(batch_size, drop_remainder=drop, batch_fn=collate_packed)
    return _prefetch(batches, prefetch_batches)
  collate = {
    "sft": collate_sequences,
    "unpaired": collate_sequences,
    "preference": collate_preference,
    "prompt": collate_prompts,
  }[dataset.task]
  # Every host collates the whole global batch and keeps its own block of rows: the padded
  # length then comes from the longest row of the global batch, so all hosts produce one shape
  # (the global array needs it), and their blocks in process order are the one-host batch of
  # `batch_size * process_count` rows.
  ds = ds.repeat(num_epochs)
  total = len(ds) if num_epochs is not None else None
  if total is not None and drop and total < batch_size * process_count:
    raise ValueError(
      f"{total} examples ({num_epochs} epoch(s) of {len(dataset)}) make no full batch of "
      f"batch_size={batch_size} x {process_count} host(s), and dataloader_drop_last=True "
      "would drop them all"
    )
  if total is not None and not drop and total % process_count:
    # A last partial global batch must split evenly too.
    ds = ds[: total - total % process_count]
  batch_fn = functools.partial(
    _host_block,
    collate=functools.partial(collate, pad_token_id=dataset.pad_token_id, config=config),
    process_index=process_index,
    process_count=process_count,
    row_axes=PREFERENCE_ROW_AXES if dataset.task == "preference" else {},
  )
  batches = ds.batch(batch_size * process_count, drop_remainder=drop, batch_fn=batch_fn)
  return _prefetch(batches.to_iter_dataset(), prefetch_batches)


def _host_block(
  examples: Sequence[Example],
  *,
  collate,
  process_index: int,
  process_count: int,
  row_axes: dict[str, int],
) -> dict[str, Any]:
  """Rows ``[i * n, (i + 1) * n)`` (``n = len(examples) / process_count``) of the collated
  global batch, for host ``i`` (on each key's row axis)."""
  batch = collate(examples)
  if process_count == 1:
    return batch
  n = len(examples) // process_count
  rows = slice(process_index * n, (process_index + 1) * n)
  out: dict[str, Any] = {}
  for key, value in batch.items():
    if key == "extras":
      out[key] = {name: column[rows] for name, column in value.items()}
    else:  # preference [2, B, ...]: the pair axis stays whole
      out[key] = value[(slice(None),) * row_axes.get(key, 0) + (rows,)]
  return out


def _prefetch(batches: grain.IterDataset, prefetch_batches: int) -> grain.IterDataset:
  if isinstance(prefetch_batches, bool) or not isinstance(prefetch_batches, int):
    raise ValueError(f"prefetch_batches must be an int >= 0, got {prefetch_batches!r}")
  _validate.non_negative("prefetch_batches", prefetch_batches)
  if prefetch_batches == 0:
    return batches
  return grain.experimental.ThreadPrefetchIterDataset(
    batches, prefetch_buffer_size=prefetch_batches
  )
