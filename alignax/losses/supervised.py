r"""Supervised fine-tuning loss and the per-sequence log-probability every direct method takes.

The direct preference objectives (``dpo_loss``, ``orpo_loss``, ``simpo_loss``, ...) take one number
per completion, :math:`\log\pi(y\mid x) = \sum_t m_t \log\pi(y_t\mid x, y_{<t})`, together with the
completion length :math:`|y| = \sum_t m_t` where they length-normalise. ``sequence_logprobs`` makes
that number from per-token log-probs and a completion mask; ``alignax.aggregation.masked_count(mask,
axis=-1)`` gives the length.
"""

import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Bool, Float

from alignax import _validate
from alignax.aggregation import AGG_MODES, AggMode, aggregate, masked_count, masked_mean, masked_sum


def _check_tokens(name: str, x: Array, mask: Array) -> None:
  _validate.min_rank(name, x, 1, "[*b, T]")
  _validate.same_shape({name: x, "mask": mask})
  if mask.dtype != jnp.bool_:
    raise TypeError(f"mask must be a boolean array, got dtype {mask.dtype}")


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
  loss = aggregate(-logp, mask, mode=loss_agg_mode, max_len=max_len)
  return loss, {"num_tokens": masked_count(mask)}
