"""Per-algorithm objectives (layer 3): model forward + a layer-1 loss, as pure functions of the
trainable parameters. The shared step (``alignax.train.step``) differentiates and accumulates them.

Every objective reads hidden states from the decoder (``compute_logits=False``) and scores tokens
with the fused ``alignax.token_logprobs`` on the model's ``LMHead``, so no ``[tokens, vocab]``
logits exist in a training step.
"""

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from alignax.aggregation import masked_count, masked_mean
from alignax.kernels import token_logprobs
from alignax.losses.reward import bradley_terry_loss
from alignax.losses.supervised import next_token_targets, sft_loss
from alignax.train.step import Objective

# Preference batches from alignax.data: [2, B, T] (0 = chosen, 1 = rejected), margin [B].
PREFERENCE_BATCH_AXES = {"input_ids": 1, "attention_mask": 1, "completion_mask": 1, "margin": 0}


def model_logprobs(model: nnx.Module, batch: dict[str, Any], *, impl: str = "auto"):
  """Per-token log-probs (and entropy) of the batch's next tokens, with the loss mask.

  ``batch`` holds ``input_ids``, ``attention_mask`` and optionally ``completion_mask``,
  ``segment_ids``, ``positions`` (``alignax.data``'s keys), all ``[B, T]``.

  Returns:
    ``(TokenLogprobs, loss_mask)``, both over ``[B, T]``.
  """
  targets, loss_mask = next_token_targets(
    batch["input_ids"], batch["attention_mask"], completion_mask=batch.get("completion_mask"),
    segment_ids=batch.get("segment_ids"),
  )
  hidden = model(batch["input_ids"], batch["attention_mask"], batch.get("positions"),
                 batch.get("segment_ids"), compute_logits=False).hidden_states
  return token_logprobs(hidden, model.get_lm_head(), targets, mask=loss_mask, impl=impl), loss_mask


def sft_objective(graphdef: nnx.GraphDef, *, loss_agg_mode: str = "token_mean",
                  max_len: int | None = None, impl: str = "auto") -> Objective:
  """Supervised fine-tuning: the NLL of completion tokens (all tokens without a completion mask).

  Metrics (TRL's SFT names): ``entropy`` (token mean), ``mean_token_logprob``. The micro-batch
  weight is its number of loss tokens (sequences for the per-sequence modes), so accumulated
  micro-batches give the whole batch's loss.
  """
  per_sequence = loss_agg_mode != "token_mean"

  def loss(params: Any, frozen: Any, batch: dict[str, Any], key: jax.Array):
    del key  # the decoder has no dropout
    model = nnx.merge(graphdef, params, frozen)
    out, mask = model_logprobs(model, batch, impl=impl)
    value, _ = sft_loss(out.logp, mask, loss_agg_mode=loss_agg_mode, max_len=max_len)
    metrics = {"entropy": masked_mean(out.entropy, mask),
               "mean_token_logprob": masked_mean(out.logp, mask)}
    return value, jax.lax.stop_gradient(metrics)

  def weight(batch: dict[str, Any]) -> jax.Array:
    _, mask = next_token_targets(batch["input_ids"], batch["attention_mask"],
                                 completion_mask=batch.get("completion_mask"),
                                 segment_ids=batch.get("segment_ids"))
    if per_sequence:  # the seq_* modes average over every row, empty ones included
      return jnp.asarray(mask.shape[0], jnp.float32)
    return masked_count(mask)

  return Objective(loss=loss, weight=weight)


def reward_objective(graphdef: nnx.GraphDef, *, center_rewards_coefficient: float | None = None
                     ) -> Objective:
  """A Bradley-Terry reward model on preference pairs (TRL's ``RewardTrainer``).

  Chosen and rejected run in one concatenated forward of the ``RewardModel`` (``[2B, T]``); the loss
  is ``alignax.bradley_terry_loss`` with the batch's ``margin`` column when present and TRL's
  ``center_rewards_coefficient``. Metrics: ``accuracy``, ``margin``, ``{min,mean,max}_reward``.
  """

  def loss(params: Any, frozen: Any, batch: dict[str, Any], key: jax.Array):
    del key
    model = nnx.merge(graphdef, params, frozen)
    two, rows, length = batch["input_ids"].shape
    scores = model(batch["input_ids"].reshape(two * rows, length),
                   batch["attention_mask"].reshape(two * rows, length)).scores[:, 0]
    chosen, rejected = scores[:rows], scores[rows:]
    return bradley_terry_loss(chosen, rejected, margin=batch.get("margin"),
                              center_coefficient=center_rewards_coefficient or 0.0)

  def weight(batch: dict[str, Any]) -> jax.Array:
    return jnp.asarray(batch["input_ids"].shape[1], jnp.float32)  # a mean over pairs

  return Objective(loss=loss, weight=weight, batch_axes=PREFERENCE_BATCH_AXES)
