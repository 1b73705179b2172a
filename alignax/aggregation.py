r"""Masked reductions of per-token quantities, and the loss-aggregation modes.

How a ``[*b, T]`` per-token loss becomes a scalar is the knob the length-bias papers are about
(GRPO, DAPO, Dr. GRPO): the same per-token loss weights long and short sequences differently under
each mode. ``aggregate`` makes the choice explicit; every other reduction in alignax goes through
``masked_sum`` / ``masked_mean`` so that padding never contributes to values or gradients.

Masks are boolean (a loss mask; ``TypeError`` otherwise), ``True`` on valid tokens, and have exactly
the shape of the data they mask. Every reduction replaces masked entries by 0 with ``jnp.where`` on
its *input*, before any arithmetic, so NaN or inf in padded slots reaches neither the result nor the
gradients of the valid entries. A NaN produced upstream by an op whose own gradient is NaN
(``log(0)``, say) still needs guarding where it is produced.
"""

from typing import Literal, get_args

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Bool, Float, Int

from alignax import _validate

AggMode = Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum",
                  "seq_mean_token_sum_norm"]
AGG_MODES: tuple[str, ...] = get_args(AggMode)

Axis = int | tuple[int, ...] | None


def _check_mask(x: Array, mask: Array, x_name: str = "x") -> None:
  _validate.bool_mask("mask", mask)
  _validate.same_shape({x_name: x, "mask": mask})


def masked_sum(x: Float[ArrayLike, "*s"], mask: Bool[ArrayLike, "*s"], *,
               axis: Axis = None) -> Float[Array, "*r"]:
  r"""Sum of the valid entries: :math:`\sum_i m_i x_i`.

  Args:
    x: values, any shape.
    mask: boolean, same shape as ``x``; ``True`` keeps an entry.
    axis: axis or axes to reduce (``None``: all).

  Returns:
    ``x`` summed over ``axis`` with masked entries contributing exactly 0 (value and gradient).
  """
  x, mask = jnp.asarray(x), jnp.asarray(mask)
  _check_mask(x, mask)
  return jnp.sum(jnp.where(mask, x, 0), axis=axis)


def last_valid_token(mask: Bool[ArrayLike, "*b T"] | Int[ArrayLike, "*b T"]) -> Bool[Array, "*b T"]:
  """One-hot over ``T`` of the last valid entry of each row; all ``False`` where a row has none.

  ``mask`` is attention-style: boolean or 0/1 integers (a tokenizer's ``attention_mask``), so this
  also finds the last real token of left- or right-padded rows (the reward model's read-out).
  """
  mask = _validate.attention_mask("mask", mask)
  length = mask.shape[-1]
  last = length - 1 - jnp.argmax(mask[..., ::-1], axis=-1)
  return (jnp.arange(length) == last[..., None]) & mask


def masked_count(mask: Bool[ArrayLike, "*s"], *, axis: Axis = None) -> Float[Array, "*r"]:
  """Number of valid entries over ``axis``, as float32 (the denominator of ``masked_mean``).

  ``mask`` is a boolean loss mask (``TypeError`` otherwise): summing a float or 0/1 integer array
  would silently count weights or stray values.
  """
  return jnp.sum(_validate.bool_mask("mask", mask), axis=axis, dtype=jnp.float32)


def masked_mean(x: Float[ArrayLike, "*s"], mask: Bool[ArrayLike, "*s"], *,
                axis: Axis = None) -> Float[Array, "*r"]:
  r"""Mean of the valid entries: :math:`\sum_i m_i x_i / \max(1, \sum_i m_i)`.

  A slice with no valid entry has mean 0 and zero (finite) gradient: the denominator is clamped at 1
  instead of dividing 0 by 0 and patching the NaN afterwards.

  Args:
    x: values, any shape.
    mask: boolean, same shape as ``x``.
    axis: axis or axes to reduce (``None``: all).

  Returns:
    The masked mean over ``axis``.
  """
  x, mask = jnp.asarray(x), jnp.asarray(mask)
  _check_mask(x, mask)
  total = masked_sum(x, mask, axis=axis)
  count = masked_count(mask, axis=axis)
  return total / jnp.maximum(count, 1.0).astype(total.dtype)


def masked_var(x: Float[ArrayLike, "*s"], mask: Bool[ArrayLike, "*s"], *, axis: Axis = None,
               ddof: int = 1) -> Float[Array, "*r"]:
  r"""Masked variance, :math:`\sum_i m_i (x_i - \bar x)^2 / \max(1, n - \mathrm{ddof})`.

  ``ddof=1`` (the default) is Bessel's correction, as the PPO implementations whiten advantages
  (``masked_whiten`` in TRL and verl). Fewer than ``ddof + 1`` valid entries (:math:`n \le`
  ``ddof``, where the estimate is undefined) give 0, with zero gradient.

  Args:
    x: values, any shape.
    mask: boolean, same shape as ``x``.
    axis: axis or axes to reduce (``None``: all).
    ddof: delta degrees of freedom, ``>= 0``.

  Returns:
    The masked variance over ``axis``.
  """
  _validate.non_negative("ddof", ddof)
  x, mask = jnp.asarray(x), jnp.asarray(mask)
  _check_mask(x, mask)
  # Zero the padding first: `x - mean` on an inf slot would be inf, and the where below would then
  # pass 0 * inf = NaN back into the gradient of the mean, i.e. of every valid entry.
  x = jnp.where(mask, x, 0)
  mean = masked_mean(x, mask, axis=axis)
  if axis is not None:
    mean = jnp.expand_dims(mean, axis)
  centred = masked_sum(jnp.square(x - mean), mask, axis=axis)
  dof = masked_count(mask, axis=axis) - ddof
  # With n <= ddof the estimate is undefined (numpy: inf/NaN); 0, as documented, not centred / 1.
  variance = centred / jnp.maximum(dof, 1.0).astype(centred.dtype)
  return jnp.where(dof > 0, variance, 0.0).astype(centred.dtype)


def masked_whiten(x: Float[ArrayLike, "*s"], mask: Bool[ArrayLike, "*s"] | None = None, *,
                  shift_mean: bool = True, eps: float = 1e-8, ddof: int = 1,
                  axis: Axis = None) -> Float[Array, "*s"]:
  r"""Masked whitening, :math:`(x - \mu) / \sqrt{\sigma^2 + \epsilon}` (+ :math:`\mu`).

  :math:`\mu` and :math:`\sigma^2` are the masked mean and (Bessel-corrected by default) variance
  over ``axis`` (default: every entry, i.e. global batch whitening as PPO and REINFORCE++ apply to
  advantages). With ``shift_mean=False`` the mean is added back, so only the scale changes (TRL's
  ``whiten_rewards``). Masked entries are returned as 0. Where the variance is undefined (no more
  valid entries than ``ddof``) the centred values are scaled by 0.

  Args:
    x: values, any shape.
    mask: boolean, same shape as ``x``; ``None`` means every entry is valid.
    shift_mean: subtract the mean (``True``) or keep it (``False``).
    eps: added to the variance before the square root, ``> 0``.
    ddof: delta degrees of freedom of the variance.
    axis: axis or axes over which the statistics are taken (``None``: all).

  Returns:
    Whitened ``x``, same shape, 0 on masked entries.
  """
  _validate.positive("eps", eps)
  x = jnp.asarray(x)
  mask = jnp.ones(x.shape, jnp.bool_) if mask is None else jnp.asarray(mask)
  _check_mask(x, mask)
  x = jnp.where(mask, x, 0)  # padding must reach neither the statistics nor their gradients
  mean = masked_mean(x, mask, axis=axis)
  var = masked_var(x, mask, axis=axis, ddof=ddof)
  # n <= ddof: the variance is undefined (masked_var's 0); scale by 0, as an infinite variance
  # would, instead of blowing the deviations up by 1/sqrt(eps).
  defined = masked_count(mask, axis=axis) > ddof
  if axis is not None:
    mean, var = jnp.expand_dims(mean, axis), jnp.expand_dims(var, axis)
    defined = jnp.expand_dims(defined, axis)
  white = jnp.where(defined, (x - mean) * jax.lax.rsqrt(var + eps), 0.0)
  if not shift_mean:
    white = white + mean
  return jnp.where(mask, white, 0)


def aggregate(per_token: Float[ArrayLike, "*b T"], mask: Bool[ArrayLike, "*b T"], *,
              loss_agg_mode: AggMode, max_len: int | None = None) -> Float[Array, ""]:
  r"""Reduces a per-token loss :math:`\ell_{i,t}` over sequences :math:`i` and tokens :math:`t`.

  With :math:`m_{i,t}` the mask, :math:`|o_i| = \sum_t m_{i,t}` and :math:`N` sequences (the product
  of the leading dims):

  * ``token_mean``: :math:`\sum_{i,t} m_{i,t}\ell_{i,t} / \sum_i |o_i|` -- one global mean over all
    valid tokens of the batch; every token weighs the same, so long answers are not down-weighted.
    DAPO (Yu et al. 2025, Eq. 8, "token-level policy gradient loss"); TRL
    ``loss_type="dapo"``/"bnpo", verl/OpenRLHF default ``token-mean``.
  * ``seq_mean_token_mean``: :math:`\frac1N\sum_i \frac1{|o_i|}\sum_t m_{i,t}\ell_{i,t}` --
    per-sequence mean, then mean over sequences; a token of a short answer weighs more. GRPO (Shao
    et al. 2024, Eq. 3); TRL ``loss_type="grpo"``.
  * ``seq_mean_token_sum``: :math:`\frac1N\sum_i \sum_t m_{i,t}\ell_{i,t}` -- per-sequence sum, then
    mean over sequences (verl ``seq-mean-token-sum``).
  * ``seq_mean_token_sum_norm``: :math:`\frac1{N\cdot L}\sum_{i,t} m_{i,t}\ell_{i,t}` with the
    constant :math:`L` = ``max_len`` -- per-sequence sum over a constant normaliser; no length bias.
    Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training", Eq. 5 / Sec. 3.1); TRL
    ``loss_type="dr_grpo"``, verl ``seq-mean-token-sum-norm``.

  Papers normalise differently: GRPO divides by each sequence's own length, DAPO by the batch's
  total token count, Dr. GRPO by a constant. DAPO's equations normalise per group; here (as in verl
  and TRL) ``token_mean`` is over the whole batch, which is what sharded training computes; a
  per-group token mean would still be length-biased, as its normaliser grows with each sample's own
  length.

  Sequences with no valid token count towards :math:`N` and contribute 0 (``seq_*`` modes); an
  all-masked batch gives 0 with finite gradients. Under ``jax.jit`` with a sharded batch the sums
  are global, so ``token_mean`` remains the global token mean.

  Args:
    per_token: per-token loss, shape ``[*b, T]`` (at least 1-D).
    mask: boolean, same shape; ``True`` on tokens that count.
    loss_agg_mode: one of ``AGG_MODES`` (the name every composed loss uses for this knob).
    max_len: the constant :math:`L` of ``seq_mean_token_sum_norm`` (required there, ``> 0``);
      usually the maximum generation length, not the padded ``T`` of this batch.

  Returns:
    A scalar.
  """
  _validate.choice("loss_agg_mode", loss_agg_mode, AGG_MODES)
  per_token, mask = jnp.asarray(per_token), jnp.asarray(mask)
  _validate.min_rank("per_token", per_token, 1, "[*b, T]")
  _check_mask(per_token, mask, "per_token")
  return _aggregate_sequences(masked_sum(per_token, mask, axis=-1), masked_count(mask, axis=-1),
                              loss_agg_mode=loss_agg_mode, max_len=max_len)


def _aggregate_sequences(seq_sums: Array, lengths: Array, *, loss_agg_mode: str,
                         max_len: int | None = None) -> Array:
  r"""``aggregate`` from per-sequence sums :math:`S_i = \sum_t m_{i,t}\ell_{i,t}` and lengths
  :math:`|o_i|`, for losses that receive sequence sums (ORPO's and CPO's NLL term).

  ``aggregate(per_token, mask, ...)`` is exactly ``_aggregate_sequences(masked_sum(per_token, mask,
  axis=-1), masked_count(mask, axis=-1), ...)``; the modes are ``aggregate``'s: ``token_mean``
  :math:`\sum_i S_i / \max(1, \sum_i |o_i|)`, ``seq_mean_token_mean``
  :math:`\frac1N\sum_i S_i/\max(1, |o_i|)`, ``seq_mean_token_sum`` :math:`\frac1N\sum_i S_i` and
  ``seq_mean_token_sum_norm`` :math:`\frac1{N L}\sum_i S_i`.

  Args:
    seq_sums: per-sequence sums of the per-token loss, shape ``[*b]``.
    lengths: number of valid tokens of each sequence, same shape (no gradient flows into it).
    loss_agg_mode: one of ``AGG_MODES``.
    max_len: the constant :math:`L` of ``seq_mean_token_sum_norm``.

  Returns:
    A scalar.
  """
  _validate.choice("loss_agg_mode", loss_agg_mode, AGG_MODES)
  if loss_agg_mode == "seq_mean_token_sum_norm":
    if max_len is None:
      raise ValueError("max_len is required for loss_agg_mode='seq_mean_token_sum_norm' (Dr. GRPO)")
    _validate.positive("max_len", max_len)
  seq_sums, lengths = jnp.asarray(seq_sums), jnp.asarray(lengths)
  _validate.same_shape({"seq_sums": seq_sums, "lengths": lengths})
  lengths = jax.lax.stop_gradient(lengths).astype(seq_sums.dtype)
  if loss_agg_mode == "token_mean":
    return jnp.sum(seq_sums) / jnp.maximum(jnp.sum(lengths), 1)
  if loss_agg_mode == "seq_mean_token_mean":
    return jnp.mean(seq_sums / jnp.maximum(lengths, 1))
  if loss_agg_mode == "seq_mean_token_sum":
    return jnp.mean(seq_sums)
  return jnp.mean(seq_sums) / max_len
