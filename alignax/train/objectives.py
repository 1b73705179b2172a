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

from alignax import _validate
from alignax.aggregation import masked_count, masked_mean
from alignax.data.pipeline import PREFERENCE_ROW_AXES
from alignax.kernels import token_logprobs
from alignax.losses.preference import (cpo_loss, dpo_loss, kto_loss, kto_reference_point, orpo_loss,
                                       simpo_loss)
from alignax.losses.reward import bradley_terry_loss
from alignax.losses.supervised import next_token_targets, sequence_logprobs, sft_loss
from alignax.train.step import Objective

# Preference batches from alignax.data: [2, B, T] (0 = chosen, 1 = rejected), margin [B], and the
# precomputed reference log-probs ref_logps [2, B] (alignax.train.reference).
PREFERENCE_BATCH_AXES = {**PREFERENCE_ROW_AXES, "margin": 0}
# The batch key that carries precomputed reference log-probs; when present, no reference forward.
REFERENCE_LOGPS_KEY = "ref_logps"


def _pair_count(batch: dict[str, Any]) -> jax.Array:
  """The weight of a loss that is a mean over the preference pairs of a micro-batch."""
  return jnp.asarray(batch["input_ids"].shape[1], jnp.float32)


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


# SFT's metrics: means over loss tokens, whatever unit the loss averages over.
_SFT_TOKEN_METRICS = ("entropy", "mean_token_logprob", "mean_token_accuracy")


def sft_objective(graphdef: nnx.GraphDef, *, loss_agg_mode: str = "token_mean",
                  max_len: int | None = None, impl: str = "auto") -> Objective:
  """Supervised fine-tuning: the NLL of completion tokens (all tokens without a completion mask).

  Metrics (TRL's SFT names): ``entropy`` (token mean), ``mean_token_logprob`` and
  ``mean_token_accuracy`` (the share of loss tokens whose target is the model's top-1 token, from the
  fused kernel's ``target_is_top1``: no ``[tokens, vocab]`` logits). The micro-batch
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
               "mean_token_logprob": masked_mean(out.logp, mask),
               "mean_token_accuracy": masked_mean(out.target_is_top1.astype(jnp.float32), mask)}
    return value, jax.lax.stop_gradient(metrics)

  def loss_tokens(batch: dict[str, Any]) -> jax.Array:
    _, mask = next_token_targets(batch["input_ids"], batch["attention_mask"],
                                 completion_mask=batch.get("completion_mask"),
                                 segment_ids=batch.get("segment_ids"))
    return masked_count(mask)

  if per_sequence:  # the seq_* modes average over every row, empty ones included; the metrics
    # stay token means over the whole batch
    return Objective(loss=loss, weight=lambda batch: jnp.asarray(batch["input_ids"].shape[0],
                                                                 jnp.float32),
                     metric_weights={name: loss_tokens for name in _SFT_TOKEN_METRICS})
  return Objective(loss=loss, weight=loss_tokens)


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

  return Objective(loss=loss, weight=_pair_count, batch_axes=PREFERENCE_BATCH_AXES)


_SEQUENCE_KEYS = ("input_ids", "attention_mask", "completion_mask")
# DPO loss types that read the length-normalised margin (alignax.dpo_loss takes lengths for them).
_LENGTH_NORMALISED = ("sigmoid_norm", "ipo")


def _pair_logprobs(model: nnx.Module, batch: dict[str, Any], *, impl: str):
  """Completion log-probs of chosen and rejected in ONE forward over ``[2B, T]``.

  Returns ``(TokenLogprobs over [2, B, T], loss mask [2, B, T])``.
  """
  two, rows, length = batch["input_ids"].shape
  flat = {k: batch[k].reshape(two * rows, length) for k in _SEQUENCE_KEYS}
  out, mask = model_logprobs(model, flat, impl=impl)
  return jax.tree.map(lambda x: x.reshape(two, rows, length), out), mask.reshape(two, rows, length)


def _policy_and_reference(graphdef: nnx.GraphDef, reference_graphdef: nnx.GraphDef | None,
                          params: Any, frozen: Any, *, reference_forward: bool, objective: str):
  """The policy and, when ``reference_forward``, the model to score the reference log-probs with.

  Without ``reference_graphdef`` the reference is the policy with its LoRA adapters switched off;
  a policy without adapters has no such view (the "reference" would be the policy itself, every
  implicit reward 0), which is an error at trace time, where the graph structure is known.
  """
  from alignax.models.lora import lora_disabled

  if reference_graphdef is not None:
    rest, reference_state = frozen
    policy = nnx.merge(graphdef, params, rest)
    return policy, nnx.merge(reference_graphdef, reference_state) if reference_forward else None
  policy = nnx.merge(graphdef, params, frozen)
  if not reference_forward:
    return policy, None
  try:
    return policy, lora_disabled(policy)
  except ValueError as e:
    raise ValueError(
      f"{objective}: no reference model: the policy has no LoRA adapters, so switching them off "
      "would leave the policy itself as its reference. Pass a frozen copy (fit(..., "
      "reference=model)), precompute the reference log-probs into the batches "
      "(alignax.train.reference.precompute_reference_logps, batch key 'ref_logps'), or train "
      "with adapters (alignax.apply_lora)") from e


def dpo_objective(graphdef: nnx.GraphDef, *, reference_graphdef: nnx.GraphDef | None = None,
                  beta: float = 0.1, loss_type: str | tuple[str, ...] = "sigmoid",
                  loss_weights: tuple[float, ...] | None = None, label_smoothing: float = 0.0,
                  rpo_alpha: float | None = None, reference_free: bool = False,
                  impl: str = "auto") -> Objective:
  """Direct preference optimisation (``alignax.dpo_loss`` and its loss types) on preference pairs.

  The reference log-probs come, by choice: from a frozen copy (``fit(..., reference=model_copy)``,
  which passes its weights as a step argument and its ``reference_graphdef`` here), from the policy
  with its LoRA adapters switched off (``reference_graphdef=None`` on a LoRA model:
  ``alignax.lora_disabled``, no second copy of the weights), precomputed once over the dataset
  (a batch with ``ref_logps [2, B]``, from
  ``alignax.train.reference.precompute_reference_logps``; TRL's ``--precompute_ref_log_probs``:
  the step then runs no reference forward, whatever the reference settings), or none
  (``reference_free=True``). Chosen and rejected run in one concatenated forward. ``rpo_alpha``
  adds α·NLL of the chosen completions (RPO, Pang et al. 2024; TRL's ``rpo_alpha``). Metrics:
  TRL's ``rewards/*``, ``logps/*``, plus ``nll_loss`` with RPO.

  Raises (when the step is traced):
    ValueError: no reference: ``reference_graphdef=None``, ``reference_free=False``, a policy
      without LoRA adapters and no ``ref_logps`` in the batch.
  """
  loss_types = (loss_type,) if isinstance(loss_type, str) else tuple(loss_type)

  def loss(params: Any, frozen: Any, batch: dict[str, Any], key: jax.Array):
    del key
    precomputed = REFERENCE_LOGPS_KEY in batch and not reference_free
    policy, reference = _policy_and_reference(
      graphdef, reference_graphdef, params, frozen,
      reference_forward=not (reference_free or precomputed), objective="dpo_objective")
    out, mask = _pair_logprobs(policy, batch, impl=impl)
    logps = sequence_logprobs(out.logp, mask)  # [2, B]
    ref_logps = (None, None)
    if precomputed:
      ref = jax.lax.stop_gradient(jnp.asarray(batch[REFERENCE_LOGPS_KEY], jnp.float32))
      if ref.shape != logps.shape:
        raise ValueError(f"batch['ref_logps'] has shape {list(ref.shape)}; the preference batch "
                         f"needs [2, B] = {list(logps.shape)} (chosen, rejected)")
      ref_logps = (ref[0], ref[1])
    elif reference is not None:
      ref_out, _ = _pair_logprobs(reference, batch, impl=impl)
      ref = jax.lax.stop_gradient(sequence_logprobs(ref_out.logp, mask))
      ref_logps = (ref[0], ref[1])
    lengths = {}
    if any(t in _LENGTH_NORMALISED for t in loss_types):
      counts = masked_count(mask, axis=-1)
      lengths = {"chosen_lengths": counts[0], "rejected_lengths": counts[1]}
    value, metrics = dpo_loss(logps[0], logps[1], *ref_logps, beta=beta, loss_type=loss_types,
                              loss_weights=loss_weights, label_smoothing=label_smoothing, **lengths)
    if rpo_alpha:
      nll, _ = sft_loss(out.logp[0], mask[0])
      value = value + rpo_alpha * nll
      metrics = {**metrics, "nll_loss": jax.lax.stop_gradient(nll)}
    return value, metrics

  return Objective(loss=loss, weight=_pair_count, batch_axes=PREFERENCE_BATCH_AXES)


KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")


def _row_count(batch: dict[str, Any]) -> jax.Array:
  """The weight of a loss that is a mean over the rows (examples) of a micro-batch."""
  return jnp.asarray(batch["input_ids"].shape[0], jnp.float32)


def kto_objective(graphdef: nnx.GraphDef, *, reference_graphdef: nnx.GraphDef | None = None,
                  beta: float = 0.1, desirable_weight: float = 1.0,
                  undesirable_weight: float = 1.0, loss_type: str = "kto",
                  impl: str = "auto") -> Objective:
  r"""Kahneman-Tversky optimisation on unpaired examples (``alignax.kto_loss``; Ethayarajh et al.
  2024, TRL's ``KTOTrainer``).

  With :math:`s = \log\pi(y|x) - \log\pi_\text{ref}(y|x)` summed over completion tokens, a
  desirable example costs :math:`\lambda_D(1 - \sigma(\beta(s - z_0)))` and an undesirable one
  :math:`\lambda_U(1 - \sigma(\beta(z_0 - s)))`, averaged over the examples. The reference point
  :math:`z_0 = \max(0, \overline{\log\pi(y'|x) - \log\pi_\text{ref}(y'|x)})` is the mean over
  the batch's KL rows (``kl_*``: each example's prompt with another example's completion
  :math:`y'`, paired at dataset level by ``alignax.data``), without gradient. The policy scores
  the KL rows in a forward of their own with its parameters held constant, so no backward pass
  runs over them (TRL computes them under ``torch.no_grad``); the reference scores completion and
  KL rows in one ``[2B, T]`` forward.
  ``loss_type="apo_zero_unpaired"`` (D'Oosterlinck et al. 2024) fixes :math:`z_0 = 0` and reads
  no KL row.

  :math:`z_0` is estimated per micro-batch: with gradient accumulation each micro-batch uses its
  own KL rows (over every device, as TRL gathers its per-device means; TRL too estimates it per
  accumulation step). The reference is chosen as in :func:`dpo_objective`: a frozen copy
  (``reference_graphdef``), the LoRA-off view of the policy, or precomputed log-probs (batch keys
  ``ref_logps [B]`` and, for ``kto``, ``kl_ref_logps [B]``, from
  ``alignax.train.reference.precompute_reference_logps``), which skip the reference forward.

  Args:
    graphdef: the policy's graph definition.
    reference_graphdef: a frozen reference's graph definition (its state rides in ``frozen``).
    beta: :math:`\beta > 0`.
    desirable_weight: :math:`\lambda_D \ge 0`.
    undesirable_weight: :math:`\lambda_U \ge 0`.
    loss_type: ``kto`` | ``apo_zero_unpaired``.
    impl: the ``token_logprobs`` implementation.

  Returns:
    An ``Objective`` on unpaired batches (``input_ids``, ``attention_mask``, ``completion_mask``
    ``[B, T]``, ``label [B]``, ``kl_*`` ``[B, T]``), weighted by rows. Metrics (TRL's KTO names):
    ``kl`` (:math:`z_0`), ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``,
    ``logps/chosen``, ``logps/rejected`` (means over the desirable / undesirable rows of each
    micro-batch, 0 where there are none) and ``entropy`` (token mean over completion tokens).
    With gradient accumulation the step averages each over micro-batches by its own count
    (desirable rows, undesirable rows, completion tokens), and ``rewards/margins`` is chosen minus
    rejected of those averages, so every metric is the whole batch's; ``kl`` stays the row-weighted
    mean of the per-micro-batch :math:`z_0` (the loss's own estimate).

  Raises:
    ValueError: a bad ``loss_type``, ``beta`` or weight; at trace time, no reference (as
      :func:`dpo_objective`) or precomputed ``ref_logps`` without ``kl_ref_logps`` for ``kto``.
  """
  _validate.choice("loss_type", loss_type, KTO_LOSS_TYPES)
  _validate.positive("beta", beta)
  _validate.non_negative("desirable_weight", desirable_weight)
  _validate.non_negative("undesirable_weight", undesirable_weight)
  use_kl = loss_type == "kto"

  def loss(params: Any, frozen: Any, batch: dict[str, Any], key: jax.Array):
    del key
    precomputed = REFERENCE_LOGPS_KEY in batch
    if precomputed and use_kl and "kl_ref_logps" not in batch:
      raise ValueError("kto_objective: the batch has precomputed 'ref_logps' but no "
                       "'kl_ref_logps' for the KL rows (loss_type='kto' needs both; "
                       "precompute_reference_logps writes both)")
    policy, reference = _policy_and_reference(
      graphdef, reference_graphdef, params, frozen, reference_forward=not precomputed,
      objective="kto_objective")
    rows = batch["input_ids"].shape[0]
    sequences = {k: batch[k] for k in _SEQUENCE_KEYS}
    out, mask = model_logprobs(policy, sequences, impl=impl)
    logps = sequence_logprobs(out.logp, mask)
    if use_kl:
      kl_sequences = {k: batch[f"kl_{k}"] for k in _SEQUENCE_KEYS}
      # The KL rows only feed z0, which carries no gradient: a forward of the policy with its
      # parameters held constant, so no backward pass runs over them (TRL's torch.no_grad).
      # Concatenated with the completion rows into one [2B, T] forward with gradient, the
      # backward would run over all 2B rows (half of it on zero cotangents) and keep their
      # activations: about 1.5x the policy's FLOPs and twice its activation memory.
      kl_policy = nnx.merge(graphdef, jax.lax.stop_gradient(params),
                            frozen if reference_graphdef is None else frozen[0])
      kl_out, kl_mask = model_logprobs(kl_policy, kl_sequences, impl=impl)
      logps = jnp.concatenate([logps, jax.lax.stop_gradient(
        sequence_logprobs(kl_out.logp, kl_mask))])
      # The reference scores completion and KL rows in one [2B, T] forward.
      sequences = {k: jnp.concatenate([v, kl_sequences[k]]) for k, v in sequences.items()}
      mask = jnp.concatenate([mask, kl_mask])
    if precomputed:
      names = (REFERENCE_LOGPS_KEY, "kl_ref_logps") if use_kl else (REFERENCE_LOGPS_KEY,)
      for name in names:
        if batch[name].shape != (rows,):
          raise ValueError(f"batch[{name!r}] has shape {list(batch[name].shape)}; the unpaired "
                           f"batch needs [B] = [{rows}]")
      ref = jnp.concatenate([jnp.asarray(batch[n], jnp.float32) for n in names])
    else:
      ref_out, _ = model_logprobs(reference, sequences, impl=impl)
      ref = sequence_logprobs(ref_out.logp, mask)
    ref = jax.lax.stop_gradient(ref)
    reference_point = kto_reference_point(logps[rows:], ref[rows:]) if use_kl else 0.0
    value, metrics = kto_loss(logps[:rows], ref[:rows], batch["label"],
                              reference_point=reference_point, beta=beta,
                              desirable_weight=desirable_weight,
                              undesirable_weight=undesirable_weight)
    entropy = masked_mean(out.entropy, mask[:rows])
    return value, {**metrics, "entropy": jax.lax.stop_gradient(entropy)}

  def desirable(batch):
    return jnp.sum(batch["label"].astype(jnp.float32))

  def undesirable(batch):
    return jnp.sum(1.0 - batch["label"].astype(jnp.float32))

  def completion_tokens(batch):
    return jnp.sum(next_token_targets(batch["input_ids"], batch["attention_mask"],
                                      completion_mask=batch["completion_mask"])[1])

  def margins(metrics):
    return {**metrics, "rewards/margins": metrics["rewards/chosen"] - metrics["rewards/rejected"]}

  return Objective(loss=loss, weight=_row_count, finalize_metrics=margins,
                   metric_weights={"rewards/chosen": desirable, "logps/chosen": desirable,
                                   "rewards/rejected": undesirable,
                                   "logps/rejected": undesirable, "entropy": completion_tokens})


def _reference_free_objective(graphdef: nnx.GraphDef, loss_fn, *, impl: str = "auto",
                              **options: Any) -> Objective:
  """A pairwise loss of the policy alone on length-normalised sequence log-probs (ORPO, SimPO,
  CPO): ``loss_fn(chosen_logps, rejected_logps, chosen_lengths=, rejected_lengths=, **options)``."""

  def loss(params: Any, frozen: Any, batch: dict[str, Any], key: jax.Array):
    del key
    out, mask = _pair_logprobs(nnx.merge(graphdef, params, frozen), batch, impl=impl)
    logps, lengths = sequence_logprobs(out.logp, mask), masked_count(mask, axis=-1)
    return loss_fn(logps[0], logps[1], chosen_lengths=lengths[0], rejected_lengths=lengths[1],
                   **options)

  # ORPO's and CPO's NLL terms are token means within each micro-batch, so with accumulation they
  # are weighted by pairs (exact when micro-batches hold equal token counts).
  return Objective(loss=loss, weight=_pair_count, batch_axes=PREFERENCE_BATCH_AXES)


def orpo_objective(graphdef: nnx.GraphDef, *, odds_ratio_weight: float = 0.1,
                   impl: str = "auto") -> Objective:
  """ORPO (Hong et al. 2024): chosen NLL + λ·odds-ratio term, no reference (``alignax.orpo_loss``;
  TRL's ``--beta`` is λ)."""
  return _reference_free_objective(graphdef, orpo_loss, impl=impl,
                                   odds_ratio_weight=odds_ratio_weight)


def simpo_objective(graphdef: nnx.GraphDef, *, beta: float = 2.0, gamma_beta_ratio: float = 0.25,
                    label_smoothing: float = 0.0, loss_type: str = "sigmoid",
                    impl: str = "auto") -> Objective:
  """SimPO (Meng et al. 2024): length-normalised implicit rewards with a target margin
  (``alignax.simpo_loss``)."""
  return _reference_free_objective(graphdef, simpo_loss, impl=impl, beta=beta,
                                   gamma_beta_ratio=gamma_beta_ratio,
                                   label_smoothing=label_smoothing, loss_type=loss_type)


def cpo_objective(graphdef: nnx.GraphDef, *, beta: float = 0.1, loss_type: str = "sigmoid",
                  label_smoothing: float = 0.0, cpo_alpha: float = 1.0,
                  impl: str = "auto") -> Objective:
  """CPO (Xu et al. 2024): reference-free DPO + α·chosen NLL (``alignax.cpo_loss``)."""
  return _reference_free_objective(graphdef, cpo_loss, impl=impl, beta=beta, loss_type=loss_type,
                                   label_smoothing=label_smoothing, cpo_alpha=cpo_alpha)
