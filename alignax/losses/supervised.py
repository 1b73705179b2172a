r"""Supervised fine-tuning loss and the per-sequence log-probability every direct method takes.

The direct preference objectives (``dpo_loss``, ``orpo_loss``, ``simpo_loss``, ...) take one number
per completion, :math:`\log\pi(y\mid x) = \sum_t m_t \log\pi(y_t\mid x, y_{<t})`, together with the
completion length :math:`|y| = \sum_t m_t` where they length-normalise. ``sequence_logprobs`` makes
that number from per-token log-probs and a completion mask; ``alignax.aggregation.masked_count(mask,
axis=-1)`` gives the length. ``next_token_targets`` turns a tokenized batch into the targets and the
loss mask all of them take.
"""

import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Bool, Float, Int

from alignax import _validate
from alignax.aggregation import AGG_MODES, AggMode, aggregate, masked_count, masked_mean, masked_sum


AttentionMask = Bool[ArrayLike, "*b T"] | Int[ArrayLike, "*b T"]


def _check_tokens(name: str, x: Array, mask: Array) -> None:
  _validate.min_rank(name, x, 1, "[*b, T]")
  _validate.bool_mask("mask", mask)
  _validate.same_shape({name: x, "mask": mask})


def next_token_targets(input_ids: Int[ArrayLike, "*b T"], attention_mask: AttentionMask, *,
                       completion_mask: AttentionMask | None = None,
                       segment_ids: Int[ArrayLike, "*b T"] | None = None
                       ) -> tuple[Int[Array, "*b T"], Bool[Array, "*b T"]]:
  r"""Next-token targets and loss mask of a causal LM batch: the shift everybody writes by hand.

  The logits at position :math:`t` predict token :math:`t+1`, so :math:`y_t` =
  ``input_ids[..., t+1]`` (the last column, which predicts nothing, is 0) and position :math:`t` is
  trained on iff

  * :math:`t` and :math:`t+1` are both real tokens (``attention_mask``; left or right padding),
  * :math:`t+1` is a completion token, when ``completion_mask`` is given (prompt tokens are not
    trained on; TRL's ``completion_only_loss``),
  * :math:`t` and :math:`t+1` belong to the same sequence, when ``segment_ids`` is given (packing:
    the last token of one sequence does not predict the first of the next).

  Feed ``targets`` to ``alignax.token_logprobs`` with the model's hidden states, then
  ``sft_loss(logp, loss_mask)``, ``sequence_logprobs(logp, loss_mask)`` or a policy loss.

  Masks: ``attention_mask`` and ``completion_mask`` are attention-style, boolean or 0/1 integers
  (the tokenizer's arrays); the returned ``loss_mask`` is boolean, as every loss in alignax
  requires.

  Args:
    input_ids: integer token ids ``[*b, T]``.
    attention_mask: ``[*b, T]``, true (or 1) on real tokens.
    completion_mask: ``[*b, T]``, true (or 1) on completion tokens, or ``None`` (train on every
      real token after the first).
    segment_ids: integer ``[*b, T]`` sequence ids of a packed batch, or ``None``.

  Returns:
    ``(targets, loss_mask)``: ``int32`` targets and a boolean mask, both ``[*b, T]``.
  """
  input_ids = _validate.integer_array("input_ids", input_ids)
  _validate.min_rank("input_ids", input_ids, 1, "[*b, T]")
  attention_mask = _validate.attention_mask("attention_mask", attention_mask)
  if completion_mask is not None:
    completion_mask = _validate.attention_mask("completion_mask", completion_mask)
  if segment_ids is not None:
    segment_ids = _validate.integer_array("segment_ids", segment_ids)
  _validate.same_shape({"input_ids": input_ids, "attention_mask": attention_mask,
                        "completion_mask": completion_mask, "segment_ids": segment_ids})

  def shift(x: Array) -> Array:
    """``x[..., t+1]`` at ``t``, with a zero/False last column."""
    return jnp.concatenate([x[..., 1:], jnp.zeros_like(x[..., :1])], axis=-1)

  targets = shift(input_ids.astype(jnp.int32))
  loss_mask = attention_mask & shift(attention_mask)
  if completion_mask is not None:
    loss_mask = loss_mask & shift(completion_mask)
  if segment_ids is not None:
    # The shifted last column compares against 0 here, but the attention term already drops it.
    loss_mask = loss_mask & (segment_ids == shift(segment_ids))
  return targets, loss_mask


def sequence_logprobs(token_logp: Float[ArrayLike, "*b T"], mask: Bool[ArrayLike, "*b T"], *,
                      average: bool = False) -> Float[Array, "*b"]:
  r"""Sequence log-probability :math:`\sum_t m_t \ell_t`, or its mean :math:`\sum_t m_t\ell_t/|y|`.

  The sum is the sequence log-likelihood that DPO (Rafailov et al. 2023, Eq. 7), TRL, OpenRLHF and
  tunix feed the pairwise losses; the mean (``average=True``) is the length-normalised form used by
  SimPO, ORPO and IPO as TRL implements them.

  Args:
    token_logp: per-token log-probs :math:`\ell_t = \log\pi(y_t\mid x, y_{<t})`, shape ``[*b, T]``.
    mask: boolean, same shape; ``True`` on completion tokens (prompt and padding ``False``).
    average: divide by the number of completion tokens. A row with no completion token gives 0
      (sum and mean alike), with zero gradient.

  Returns:
    Shape ``[*b]``.
  """
  token_logp, mask = jnp.asarray(token_logp), jnp.asarray(mask)
  _check_tokens("token_logp", token_logp, mask)
  reduce = masked_mean if average else masked_sum
  return reduce(token_logp, mask, axis=-1)


def sft_loss(logp: Float[ArrayLike, "*b T"], mask: Bool[ArrayLike, "*b T"], *,
             loss_agg_mode: AggMode = "token_mean", max_len: int | None = None
             ) -> tuple[Float[Array, ""], dict[str, Float[Array, ""]]]:
  r"""Negative log-likelihood of completion tokens, :math:`-\mathrm{agg}_{i,t}\,m_{i,t}\ell_{i,t}`.

  Maximum-likelihood fine-tuning (the SFT stage of Ouyang et al. 2022, InstructGPT). The reduction
  is ``alignax.aggregate``: ``loss_agg_mode="token_mean"`` (default) is one mean over every
  completion token of the batch, as the Hugging Face cross-entropy with ``ignore_index`` and TRL's
  ``SFTTrainer`` compute it; ``loss_agg_mode="seq_mean_token_mean"`` is the per-sequence mean NLL
  averaged over sequences (every sequence weighs the same, whatever its length). The unreduced
  per-token loss is ``-logp``.

  Args:
    logp: per-token log-probs of the target tokens, shape ``[*b, T]``.
    mask: boolean, same shape; ``True`` on tokens that are trained on (completion tokens).
    loss_agg_mode: the reduction, one of ``alignax.aggregation.AGG_MODES``.
    max_len: the constant normaliser of ``loss_agg_mode="seq_mean_token_sum_norm"``.

  Returns:
    ``(loss, metrics)``: the scalar loss and ``{"num_tokens": number of trained tokens}`` (TRL's
    name).
  """
  logp, mask = jnp.asarray(logp), jnp.asarray(mask)
  _validate.choice("loss_agg_mode", loss_agg_mode, AGG_MODES)
  _check_tokens("logp", logp, mask)
  loss = aggregate(-logp, mask, loss_agg_mode=loss_agg_mode, max_len=max_len)
  return loss, {"num_tokens": masked_count(mask)}
