"""What the online trainers (GRPO, PPO) share: placing a host-built generation batch on the mesh,
the no-gradient log-probs of stored completions, the sampler's per-round key, the prompt data and
its position budget, and the completions written to ``output_dir/completions/``.

The rollout of an online trainer is built on the host in NumPy (rewards come from Python
functions); these helpers move it onto the engine's mesh with rows over ``(data, fsdp)`` and back.
"""

import functools
import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from alignax.train.step import TrainState

COMPLETIONS_DIR = "completions"
# Folded into the state's RNG for the sampler's keys: a stream apart from dropout's.
SAMPLER_STREAM = 0x5A3


def completion_logprobs(model: nnx.Module, batch: dict[str, Any], *, temperature: float = 1.0,
                        impl: str = "auto"):
  """Per-token log-probs and entropy of a batch's next tokens under ``softmax(logits / T)``.

  ``alignax.train.objectives.model_logprobs`` with the sampling temperature (TRL divides the
  training logits by it, so the ratio compares the distribution the sampler drew from).

  Returns:
    ``(TokenLogprobs over [B, L], loss mask [B, L])``.
  """
  from alignax.kernels import token_logprobs
  from alignax.losses.supervised import next_token_targets

  targets, loss_mask = next_token_targets(batch["input_ids"], batch["attention_mask"],
                                          completion_mask=batch["completion_mask"])
  hidden = model(batch["input_ids"], batch["attention_mask"], compute_logits=False).hidden_states
  out = token_logprobs(hidden, model.get_lm_head(), targets, mask=loss_mask,
                       temperature=temperature, impl=impl)
  return out, loss_mask


def shard_rows(batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
  """Host arrays (one host) as global arrays whose rows are split over ``(data, fsdp)``."""
  def place(x):
    spec = PartitionSpec(("data", "fsdp"), *([None] * (x.ndim - 1)))
    return jax.make_array_from_process_local_data(NamedSharding(mesh, spec), np.asarray(x))

  return {k: place(v) for k, v in batch.items()}


def place_micro_batches(batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh,
                         accumulation: int) -> dict[str, jax.Array]:
  """``[B, ...]`` host arrays -> ``[k, B/k, ...]`` global arrays, rows over ``(data, fsdp)``."""
  from alignax.train.step import split_micro_batches

  micro = split_micro_batches(batch, accumulation)

  def place(x):
    spec = PartitionSpec(None, ("data", "fsdp"), *([None] * (x.ndim - 2)))
    return jax.make_array_from_process_local_data(NamedSharding(mesh, spec), x)

  return {k: place(v) for k, v in micro.items()}


def to_token_positions(per_completion: np.ndarray, prompt_length: int, total: int) -> np.ndarray:
  """``[N, M]`` values of completion tokens -> ``[N, L]`` in next-token alignment: token ``j`` of a
  completion sits at position ``prompt_length + j`` and is scored at the position before it."""
  out = np.zeros((per_completion.shape[0], total), per_completion.dtype)
  out[:, prompt_length - 1:prompt_length - 1 + per_completion.shape[1]] = per_completion
  return out


def as_text(x: Any) -> str:
  """A prompt or completion as logged text (conversations as JSON)."""
  return x if isinstance(x, str) else json.dumps(x)


def sampler_key(state: TrainState, round_index: int) -> jax.Array:
  """The sampler's key of a round, derived from the checkpointed RNG: a resumed run replays it."""
  key = jax.random.wrap_key_data(jax.device_get(state.rng))
  return jax.random.fold_in(jax.random.fold_in(key, SAMPLER_STREAM), round_index)


def check_prompt_budget(dataset: Any, *, max_completion_length: int, limit: int) -> None:
  """Names the first prompt whose length plus ``max_completion_length`` exceeds the position budget."""
  for index, example in enumerate(dataset.examples):
    length = len(example["prompt_ids"])
    if length + max_completion_length > limit:
      raise ValueError(
        f"prompt {index} has {length} tokens; with max_completion_length={max_completion_length} "
        f"that is {length + max_completion_length} positions, more than the model's "
        f"max_position_embeddings={limit}; set DataConfig.max_prompt_length (at most "
        f"{limit - max_completion_length}) or lower max_completion_length")


def prompt_dataset(train_dataset: Any, data: Any, tokenizer: Any, *, trainer: str = "grpo") -> Any:
  """The prompts of an online trainer as a prepared ``task="prompt"`` dataset (rows, a prepared
  dataset, or ``data``'s files)."""
  from alignax.data import DataConfig, PreparedDataset, load_dataset, load_rows, prepare_dataset

  if isinstance(train_dataset, PreparedDataset):
    dataset = train_dataset
  elif train_dataset is not None:
    dataset = prepare_dataset(load_rows(list(train_dataset)), tokenizer, task="prompt",
                              config=data or DataConfig())
  elif data is not None:
    dataset = load_dataset(data, tokenizer, task="prompt")
  else:
    raise ValueError(f"{trainer} needs prompts: pass train_dataset (rows with a 'prompt' column, or a "
                     "PreparedDataset of task 'prompt') or data=DataConfig(dataset_name=...)")
  if dataset.task != "prompt":
    raise ValueError(f"{trainer} trains on 'prompt' data, got a {dataset.task!r} dataset")
  return dataset


@functools.partial(jax.jit, static_argnames=("graphdef", "temperature", "adapters_off"))
def stored_logprobs(graphdef: nnx.GraphDef, states: tuple, batch: dict[str, jax.Array], *,
                     temperature: float, adapters_off: bool = False) -> jax.Array:
  """Log-probs ``[B, L]`` of a batch's completion tokens (0 elsewhere), no gradient: the old and
  reference log-probs of a rollout. Jitted at module level, so runs with the same model structure
  and shapes share the compiled program."""
  from alignax.models.lora import lora_disabled

  model = nnx.merge(graphdef, *states)
  if adapters_off:
    model = lora_disabled(model)
  out, mask = completion_logprobs(model, batch, temperature=temperature)
  return jnp.where(mask, out.logp, 0.0)


def write_completions(output_dir: str, step: int, table: Sequence[dict[str, Any]]) -> str:
  """``output_dir/completions/completions_{step:06d}.jsonl``: one row per completion."""
  directory = os.path.join(output_dir, COMPLETIONS_DIR)
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, f"completions_{step:06d}.jsonl")
  with open(path, "w") as f:
    for row in table:
      f.write(json.dumps({"step": step, **row}) + "\n")
  return path
