"""Reference log-probs computed once over a dataset (TRL's ``--precompute_ref_log_probs``).

DPO and KTO compare the policy with a frozen reference model. Its log-probs do not change during
training, so they can be computed in one pass before it: the step then runs no reference forward
(about a quarter of a DPO step's FLOPs, next to the policy's forward and backward) and the
reference weights need not stay in memory.
:func:`precompute_reference_logps` writes them onto the examples; ``alignax.data.make_batches``
carries them into the batches (``ref_logps``, ``kl_ref_logps``) and ``dpo_objective`` /
``kto_objective`` read them instead of running the reference.

Multi-host: every host runs the reference over *all* examples (its copy of the data is the same
on every host), feeding the whole batch to ``jax.make_array_from_process_local_data`` with the
global shape (each device takes its rows from it) and reading the result back replicated, so every
host ends with the same values for every example without a separate exchange.
"""

import dataclasses
import math
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from alignax import _validate
from alignax.sharding import batch_sharding
from alignax.data.config import DataConfig
from alignax.data.formats import PreparedDataset
from alignax.data.pipeline import collate_preference, collate_sequences, pair_kl_examples
from alignax.losses.supervised import sequence_logprobs
from alignax.train.objectives import model_logprobs

_SEQUENCE_KEYS = ("input_ids", "attention_mask", "completion_mask")


def _data_parallel_size(mesh: jax.sharding.Mesh) -> int:
  """Devices that hold different rows of a batch (the mesh axes of the ``batch`` rule)."""
  return int(np.prod([mesh.shape.get(a, 1) for a in ("data", "fsdp")]))


def precompute_reference_logps(reference: nnx.Module, dataset: PreparedDataset, *,
                               batch_size: int, config: DataConfig, mesh: jax.sharding.Mesh,
                               impl: str = "auto") -> PreparedDataset:
  r"""The reference model's sequence log-probs :math:`\log\pi_\text{ref}(y\mid x)` (completion
  tokens summed) of every example, computed once, batched and jitted on ``mesh``.

  Preference examples get ``ref_logps``: float32 ``[2]`` (chosen, rejected). Unpaired (KTO)
  examples get their KL rows attached first (``alignax.data.pipeline.pair_kl_examples``: the
  pairing is per example, in dataset order, so it is the one ``make_batches`` uses) and then
  ``ref_logps`` and ``kl_ref_logps``, float32 scalars. Examples are processed in dataset order in
  chunks of ``batch_size`` rows (rounded up to a multiple of the mesh's data-parallel devices); the
  last chunk is filled with copies of its last example, whose results are dropped. Each chunk is
  padded to its length bucket (``config``'s buckets), so the step compiles once per bucket.

  Args:
    reference: the frozen reference model (e.g. ``from_pretrained(path, mesh=mesh)``); for a
      LoRA policy, ``alignax.lora_disabled(policy)`` (or the base model before ``apply_lora``).
    dataset: a ``preference`` or ``unpaired`` dataset from ``alignax.data.prepare_dataset``.
    batch_size: rows per forward (pairs for preference data, examples for unpaired).
    config: the data configuration the training batches use (``max_length``,
      ``truncation_mode`` for the KL rows, padding buckets).
    mesh: the device mesh; rows are split over its ``data`` and ``fsdp`` axes.
    impl: the ``alignax.token_logprobs`` implementation.

  Returns:
    A copy of ``dataset`` whose examples carry the log-probs (the input is not modified).

  Raises:
    ValueError: a task other than ``preference`` / ``unpaired``; a bad ``batch_size``.
  """
  _validate.positive_int("batch_size", batch_size)
  if dataset.task not in ("preference", "unpaired"):
    raise ValueError(f"reference log-probs apply to 'preference' (DPO) and 'unpaired' (KTO) data, "
                     f"not to {dataset.task!r}")
  preference = dataset.task == "preference"
  examples = list(dataset.examples)
  if not preference:
    examples = pair_kl_examples(examples, config=config)
  collate = collate_preference if preference else collate_sequences
  parallel = _data_parallel_size(mesh)
  rows = math.ceil(batch_size / parallel) * parallel
  graphdef, state = nnx.split(reference)
  # Rows [2 * rows, T] (chosen then rejected, or completions then KL rows) split over the devices.
  row_sharding = batch_sharding(mesh, 2, batch_size=2 * rows)

  def score(state: Any, batch: dict[str, jax.Array]) -> jax.Array:
    out, mask = model_logprobs(nnx.merge(graphdef, state), batch, impl=impl)
    return sequence_logprobs(out.logp, mask)

  # The output is replicated, so every host reads every value.
  score = jax.jit(score, out_shardings=NamedSharding(mesh, PartitionSpec()))

  results = []
  for start in range(0, len(examples), rows):
    chunk = examples[start:start + rows]
    filled = chunk + [chunk[-1]] * (rows - len(chunk))
    batch = collate(filled, pad_token_id=dataset.pad_token_id, config=config)
    if preference:  # [2, B, T] -> [2B, T], chosen rows first
      flat = {k: batch[k].reshape(2 * rows, -1) for k in _SEQUENCE_KEYS}
    else:  # the completion rows, then the KL rows
      flat = {k: np.concatenate([batch[k], batch[f"kl_{k}"]]) for k in _SEQUENCE_KEYS}
    # Every host passes the whole batch with its global shape; each device takes its rows.
    placed = {k: jax.make_array_from_process_local_data(row_sharding, v, v.shape)
              for k, v in flat.items()}
    logps = np.asarray(jax.device_get(score(state, placed)), np.float32).reshape(2, rows)
    results.append(logps[:, :len(chunk)])
  logps = np.concatenate(results, axis=1)  # [2, N]
  if preference:
    new = [{**e, "ref_logps": logps[:, i].copy()} for i, e in enumerate(examples)]
  else:
    new = [{**e, "ref_logps": np.float32(logps[0, i]), "kl_ref_logps": np.float32(logps[1, i])}
           for i, e in enumerate(examples)]
  return dataclasses.replace(dataset, examples=new)
