r"""Policy-gradient losses: the clipped surrogate, the clipped value loss, and the composed PPO and
GRPO-family objectives (GRPO, Dr. GRPO, DAPO, GSPO, CISPO) as options of one function.

Per-token tensors are ``[*b, T]``; for GRPO-style methods ``*b = (P, G)`` (prompts, completions per
prompt). ``logp`` is the current policy's log-prob of the sampled tokens, ``old_logp`` the behaviour
policy's (the one that sampled), ``ref_logp`` the frozen reference's. Only ``logp`` (and a critic's
``values``) are differentiated: old and reference log-probs, advantages and value targets pass
through ``stop_gradient``, as rlax stops the gradient of advantages and targets, so they may be
computed inside the differentiated function (advantages from a live critic, say) without leaking
gradient into whatever produced them.

Argument order: the per-token arrays positionally, ``(logp, old_logp, advantages, mask)``; the
reference (``ref_logp``), the critic (``values``, ``old_values``, ``returns``) and every
hyper-parameter by keyword. Clip ranges are ``clip_eps_low`` / ``clip_eps_high`` (ratio) and
``value_clip_eps`` (value loss); ``eps`` elsewhere in alignax is only a numerical epsilon.

Composed losses return ``(loss, metrics)`` for ``jax.value_and_grad(has_aux=True)``; ``metrics`` is
a flat dict of stop-gradient scalars named as TRL logs them:

=============================  ==============================================================
metric                         meaning (a token mean over valid tokens unless stated)
=============================  ==============================================================
``policy_loss``                the aggregated surrogate alone (no KL, entropy or value term)
``approx_kl``                  k3 estimate of KL(pi_old || pi) from the ratios
``clip_ratio/low_mean``        fraction with r < 1 - clip_eps_low and A < 0 (``"clip"``)
``clip_ratio/low_min``         min over sequences of that fraction (``"clip"``)
``clip_ratio/high_mean``       fraction with r > 1 + clip_eps_high and A > 0 (``"clip"``)
``clip_ratio/high_max``        max over sequences of that fraction (``"clip"``)
``clip_ratio/region_mean``     fraction of either (``"clip"``)
``clip_ratio/dual_mean``       fraction where the dual-clip bound is active (``dual_clip``)
``cispo_clip_ratio``           fraction with r > cispo_max_weight and A > 0 (``"cispo"``)
``kl``                         mean of the per-token KL estimate (when the KL term is on)
``entropy``                    mean entropy (when ``entropy`` is given)
``loss/value``                 the aggregated value loss (``ppo_loss`` with a critic)
``val/clipfrac``               fraction where the clipped value term is the larger (``ppo_loss``)
=============================  ==============================================================

TRL's PPO trainer logs the last two averaged over minibatches as ``loss/value_avg`` and
``val/clipfrac_avg``; the per-call names here drop the ``_avg``. TRL takes ``low_min`` /
``high_max`` over processes; here they are over sequences, which does not depend on the sharding.
"""

import functools
from typing import Literal, NamedTuple, get_args

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Bool, Float

from alignax import _validate
from alignax.aggregation import AGG_MODES, AggMode, aggregate, masked_mean
from alignax.kl import KL_ESTIMATORS, KLEstimator, kl_estimate

ImportanceLevel = Literal["token", "sequence"]
IMPORTANCE_LEVELS: tuple[str, ...] = get_args(ImportanceLevel)
PolicyLossType = Literal["clip", "cispo"]
POLICY_LOSS_TYPES: tuple[str, ...] = get_args(PolicyLossType)

# log-ratios are clamped before exp (as verl and OpenRLHF do) so that a stale or diverged token
# cannot overflow the ratio to inf, whose gradient would be NaN even where the loss clips it.
MAX_LOG_RATIO = 20.0


class ClipStats(NamedTuple):
  """Per-token clipping diagnostics of a policy loss, all ``[*b, T]``.

  Attributes:
    ratio: importance ratio :math:`\\pi/\\pi_{old}` used by the loss.
    is_low_clipped: :math:`r < 1-\\epsilon_{low}` with :math:`A < 0` (gradient zeroed).
    is_high_clipped: :math:`r > 1+\\epsilon_{high}` with :math:`A > 0` (gradient zeroed; for CISPO:
      :math:`r >` ``cispo_max_weight``, weight capped).
    is_region_clipped: either of the two.
    is_dual_clipped: :math:`A < 0` and the dual-clip bound :math:`-cA` is active.
    approx_kl: k3 estimate of :math:`\\mathrm{KL}(\\pi_{old}\\|\\pi)` from the samples of
      :math:`\\pi_{old}`, :math:`r - 1 - \\log r` (for logging).
  """
  ratio: Float[Array, "*b T"]
  is_low_clipped: Bool[Array, "*b T"]
  is_high_clipped: Bool[Array, "*b T"]
  is_region_clipped: Bool[Array, "*b T"]
  is_dual_clipped: Bool[Array, "*b T"]
  approx_kl: Float[Array, "*b T"]


def _check_clip_params(clip_eps_low: float, clip_eps_high: float | None,
                       dual_clip: float | None) -> float:
  _validate.in_unit_interval("clip_eps_low", clip_eps_low)
  _validate.non_negative("clip_eps_high", clip_eps_high)
  if dual_clip is not None and not dual_clip > 1:
    raise ValueError(f"dual_clip must be > 1 (Ye et al. 2020 use 3), got {dual_clip!r}")
  return clip_eps_low if clip_eps_high is None else clip_eps_high


def _ratio_stats(log_ratio: Array, advantages: Array, *, clip_eps_low: float, clip_eps_high: float,
                 is_dual_clipped: Array) -> ClipStats:
  ratio = jnp.exp(log_ratio)
  is_low = (ratio < 1 - clip_eps_low) & (advantages < 0)
  is_high = (ratio > 1 + clip_eps_high) & (advantages > 0)
  # k3 with the roles of the two policies swapped: samples come from pi_old, so log(pi_old/pi) is
  # the "policy" log-ratio and 0 - log_ratio its Delta.
  approx_kl = kl_estimate(jnp.zeros_like(log_ratio), log_ratio, kl_estimator="k3")
  return ClipStats(ratio=ratio, is_low_clipped=is_low, is_high_clipped=is_high,
                   is_region_clipped=is_low | is_high, is_dual_clipped=is_dual_clipped,
                   approx_kl=jax.lax.stop_gradient(approx_kl))


def _clip_objective(log_ratio: Array, advantages: Array, *, clip_eps_low: float,
                    clip_eps_high: float, dual_clip: float | None) -> tuple[Array, ClipStats]:
  """The clipped surrogate from a log-ratio (token-level, or GSPO's broadcast sequence ratio)."""
  log_ratio = jnp.clip(log_ratio, -MAX_LOG_RATIO, MAX_LOG_RATIO)
  ratio = jnp.exp(log_ratio)
  clipped_ratio = jnp.clip(ratio, 1 - clip_eps_low, 1 + clip_eps_high)
  loss = jnp.maximum(-advantages * ratio, -advantages * clipped_ratio)
  is_dual_clipped = jnp.zeros(loss.shape, jnp.bool_)
  if dual_clip is not None:
    dual_bound = -dual_clip * advantages
    is_dual_clipped = (advantages < 0) & (loss > dual_bound)
    loss = jnp.where(is_dual_clipped, dual_bound, loss)
  stats = _ratio_stats(log_ratio, advantages, clip_eps_low=clip_eps_low,
                       clip_eps_high=clip_eps_high,
                       is_dual_clipped=is_dual_clipped)
  return loss, stats


def clipped_surrogate(logp: Float[ArrayLike, "*b T"], old_logp: Float[ArrayLike, "*b T"],
                      advantages: Float[ArrayLike, "*b T"], *, clip_eps_low: float = 0.2,
                      clip_eps_high: float | None = None, dual_clip: float | None = None
                      ) -> tuple[Float[Array, "*b T"], ClipStats]:
  r"""PPO's clipped surrogate as a per-token loss (Schulman et al. 2017, Eq. 7), with asymmetric
  clipping (DAPO "clip-higher", Yu et al. 2025) and dual clip (Ye et al. 2020, "Mastering Complex
  Control in MOBA Games with Deep RL", Eq. 5).

  .. math:: \ell_t = \max\big(-r_t A_t,\; -\mathrm{clip}(r_t, 1-\epsilon_{low}, 1+\epsilon_{high})
            A_t\big), \qquad r_t = \exp(\log\pi_t - \log\pi_{old,t}),

  and with dual clip :math:`c > 1`, for :math:`A_t < 0`: :math:`\ell_t \leftarrow \min(\ell_t,
  -cA_t)`, which bounds the loss of a token whose ratio has run far above 1. At :math:`r = 1` the
  loss is :math:`-A_t` with gradient :math:`-A_t\nabla\log\pi_t`. The log-ratio is clamped to
  ±``MAX_LOG_RATIO`` before the exponential.

  Args:
    logp: :math:`\log\pi_\theta` of the sampled tokens, ``[*b, T]``.
    old_logp: :math:`\log\pi_{old}` of the same tokens, same shape (treated as constant).
    advantages: :math:`A_t`, same shape (treated as constant).
    clip_eps_low: :math:`\epsilon_{low} \in [0, 1)` (TRL ``epsilon``, 0.2).
    clip_eps_high: :math:`\epsilon_{high} \ge 0`; ``None`` means ``clip_eps_low`` (symmetric; TRL
      ``epsilon_high``). DAPO: 0.28.
    dual_clip: the constant :math:`c > 1`, or ``None`` for no dual clip (verl's default is 3).

  Returns:
    ``(per_token_loss, ClipStats)``, both ``[*b, T]``; mask and ``aggregate`` the loss.
  """
  clip_eps_high = _check_clip_params(clip_eps_low, clip_eps_high, dual_clip)
  logp, old_logp, advantages = map(jnp.asarray, (logp, old_logp, advantages))
  _validate.same_shape({"logp": logp, "old_logp": old_logp, "advantages": advantages})
  log_ratio = logp - jax.lax.stop_gradient(old_logp)
  return _clip_objective(log_ratio, jax.lax.stop_gradient(advantages), clip_eps_low=clip_eps_low,
                         clip_eps_high=clip_eps_high, dual_clip=dual_clip)


def clipped_value_loss(values: Float[ArrayLike, "*b T"], old_values: Float[ArrayLike, "*b T"],
                       returns: Float[ArrayLike, "*b T"], *, clip_eps: float
                       ) -> Float[Array, "*b T"]:
  r"""Clipped value loss, :math:`\tfrac12\max\big((V - R)^2,\;(\mathrm{clip}(V, V_{old} -
  \epsilon_V, V_{old} + \epsilon_V) - R)^2\big)` per token.

  The value-function clipping of OpenAI baselines' PPO2 and of the RLHF PPO implementations (TRL
  ``cliprange_value`` 0.2, verl / OpenRLHF 0.5; Huang et al. 2024, "The N+ Implementation Details of
  RLHF with PPO").

  Args:
    values: current critic values :math:`V`, ``[*b, T]``.
    old_values: values at rollout time :math:`V_{old}`, same shape (treated as constant).
    returns: targets :math:`R` (e.g. from ``gae``), same shape (treated as constant).
    clip_eps: clip range :math:`\epsilon_V \ge 0` (``ppo_loss``'s ``value_clip_eps``; TRL
      ``cliprange_value``).

  Returns:
    Per-token loss ``[*b, T]``.
  """
  _validate.non_negative("clip_eps", clip_eps)
  values, old_values, returns = map(jnp.asarray, (values, old_values, returns))
  _validate.same_shape({"values": values, "old_values": old_values, "returns": returns})
  old_values, returns = jax.lax.stop_gradient((old_values, returns))
  clipped = jnp.clip(values, old_values - clip_eps, old_values + clip_eps)
  return 0.5 * jnp.maximum(jnp.square(values - returns), jnp.square(clipped - returns))


def _row_extreme(flag: Array, mask: Array, reduce) -> Array:
  """min/max over sequences (rows with a valid token) of the per-sequence fraction of ``flag``."""
  fraction = masked_mean(flag.astype(jnp.float32), mask, axis=-1)
  has_tokens = jnp.any(mask, axis=-1)
  fill = jnp.inf if reduce is jnp.min else -jnp.inf
  extreme = reduce(jnp.where(has_tokens, fraction, fill))
  return jnp.where(jnp.any(has_tokens), extreme, 0.0)


def _clip_metrics(stats: ClipStats, mask: Array, loss_type: str) -> dict[str, Array]:
  """TRL's clipping metrics: ``cispo_clip_ratio`` for CISPO, else the ``clip_ratio/*`` family.

  TRL takes the min/max across processes; here across sequences, which does not depend on how the
  batch is sharded.
  """
  def fraction(flag: Array) -> Array:
    return masked_mean(flag.astype(jnp.float32), mask)

  metrics = {"approx_kl": masked_mean(stats.approx_kl, mask)}
  if loss_type == "cispo":
    return {**metrics, "cispo_clip_ratio": fraction(stats.is_high_clipped)}
  return {
      **metrics,
      "clip_ratio/low_mean": fraction(stats.is_low_clipped),
      "clip_ratio/low_min": _row_extreme(stats.is_low_clipped, mask, jnp.min),
      "clip_ratio/high_mean": fraction(stats.is_high_clipped),
      "clip_ratio/high_max": _row_extreme(stats.is_high_clipped, mask, jnp.max),
      "clip_ratio/region_mean": fraction(stats.is_region_clipped),
  }


def grpo_loss(logp: Float[ArrayLike, "*b T"], old_logp: Float[ArrayLike, "*b T"] | None,
              advantages: Float[ArrayLike, "..."], mask: Bool[ArrayLike, "*b T"], *,
              ref_logp: Float[ArrayLike, "*b T"] | None = None, clip_eps_low: float = 0.2,
              clip_eps_high: float | None = None, beta: float | Array = 0.0,
              kl_estimator: KLEstimator = "k3", kl_clamp: float | None = None,
              loss_agg_mode: AggMode = "seq_mean_token_mean",
              max_len: int | None = None, importance_level: ImportanceLevel = "token",
              loss_type: PolicyLossType = "clip", cispo_max_weight: float = 5.0,
              dual_clip: float | None = None, entropy: Float[ArrayLike, "*b T"] | None = None,
              entropy_coef: float = 0.0) -> tuple[Float[Array, ""], dict[str, Float[Array, ""]]]:
  r"""GRPO objective (Shao et al. 2024, "DeepSeekMath", Eq. 3) and its variants, as one function.

  .. math:: \mathcal{L} = \mathrm{agg}_{i,t}\big[\ell_{i,t} + \beta\,\widehat{\mathrm{KL}}_{i,t}
            - c_H H_{i,t}\big],

  where :math:`\ell` is PPO's clipped surrogate (``clipped_surrogate``) of ratio :math:`r_{i,t}`,
  :math:`\widehat{\mathrm{KL}}` a per-token estimator of :math:`\mathrm{KL}(\pi\|\pi_{ref})` (k3 in
  GRPO, added per token before aggregation as TRL does), :math:`H` an optional entropy bonus, and
  ``agg`` one of ``aggregate``'s modes. The variants differ only in these options:

  * GRPO: k3, ``seq_mean_token_mean``, group-std advantages; the paper uses ``beta=0.04``, TRL's
    default (followed here) is ``beta=0.0``, which needs no reference model.
  * Dr. GRPO (Liu et al. 2025): ``beta=0``, ``seq_mean_token_sum_norm`` with ``max_len``,
    advantages from ``group_advantages(scale="none")`` -- ``dr_grpo_loss``.
  * DAPO (Yu et al. 2025): ``clip_eps_high=0.28``, ``token_mean``, ``beta=0`` -- ``dapo_loss``.
  * GSPO (Zheng et al. 2025, Eq. 7 / GSPO-token Eq. 13): ``importance_level="sequence"``; the ratio
    is :math:`s_i = \exp(\frac1{|o_i|}\sum_t \log r_{i,t})`, applied to every token as
    :math:`\mathrm{sg}[s_i]\,\pi_t/\mathrm{sg}[\pi_t]`, whose value is :math:`s_i` and whose
    gradient is :math:`s_i\nabla\log\pi_t`; averaged per sequence this is exactly :math:`\nabla
    s_i`, so clipping acts on whole sequences -- ``gspo_loss``.
  * CISPO (MiniMax-M1, 2025, Eq. 4): ``loss_type="cispo"``,
    :math:`\ell_{i,t} = -\mathrm{sg}[\min(r_{i,t}, w_{max})]\,A_{i,t}\log\pi_t` with the absolute
    cap :math:`w_{max}` = ``cispo_max_weight``: the IS weight is capped, never zeroed, so every
    token keeps its gradient -- ``cispo_loss``.

  Defaults follow TRL's ``GRPOConfig`` (``epsilon=0.2``, ``beta=0.0``, k3, CISPO cap 5.0) except
  the aggregation: TRL now defaults to ``loss_type="dapo"`` (``token_mean``, i.e. ``dapo_loss``);
  this function keeps the GRPO paper's ``seq_mean_token_mean``.

  Padded positions may hold anything (even NaN or -inf): they are zeroed before any arithmetic, so
  they change neither the loss nor the gradients.

  Args:
    logp: :math:`\log\pi_\theta` of the sampled tokens, ``[*b, T]`` (e.g. ``[P, G, T]``).
    old_logp: :math:`\log\pi_{old}`, same shape; ``None`` for a single update per rollout, where
      :math:`\pi_{old} = \mathrm{sg}[\pi_\theta]` and the ratio is 1.
    advantages: per sequence ``[*b]`` (broadcast over tokens, e.g. from ``group_advantages``) or per
      token ``[*b, T]``; treated as constant.
    mask: boolean ``[*b, T]``, ``True`` on completion tokens.
    ref_logp: :math:`\log\pi_{ref}`, same shape (treated as constant); required when the KL term
      is on (``beta > 0``).
    clip_eps_low: lower clip :math:`\epsilon_{low} \in [0, 1)` (TRL ``epsilon``).
    clip_eps_high: upper clip; ``None`` means ``clip_eps_low`` (TRL ``epsilon_high``). Must be
      ``None`` for ``loss_type="cispo"``, whose cap is ``cispo_max_weight``.
    beta: KL coefficient :math:`\ge 0` (may be a traced array); 0 disables the KL term.
    kl_estimator: one of ``KL_ESTIMATORS`` (GRPO: ``k3``; see ``kl_estimate`` for its gradient).
    kl_clamp: if given, the per-token KL estimate is clipped to ``[-kl_clamp, kl_clamp]``
      (``kl_estimate``'s; verl uses 10). Unclamped (TRL), k3 overflows to inf, and the gradient to
      NaN, once :math:`\log\pi_{ref} - \log\pi \gtrsim 88` on a valid token.
    loss_agg_mode: one of ``AGG_MODES``.
    max_len: the constant of ``seq_mean_token_sum_norm``.
    importance_level: ``"token"`` (GRPO/DAPO) or ``"sequence"`` (GSPO).
    loss_type: ``"clip"`` (PPO surrogate) or ``"cispo"``.
    cispo_max_weight: CISPO's absolute cap :math:`w_{max} > 0` on the IS weight (TRL's
      ``epsilon_high`` for ``loss_type="cispo"``, 5.0 as ScaleRL recommends; verl parametrises it
      as :math:`1 + \epsilon_{high}` and also clips from below; here there is no lower bound, as
      in the MiniMax-M1 paper's experiments).
    dual_clip: dual-clip constant :math:`c > 1` (``loss_type="clip"`` only), or ``None``.
    entropy: per-token policy entropy ``[*b, T]``, logged as ``entropy`` and used when
      ``entropy_coef > 0``.
    entropy_coef: entropy bonus coefficient :math:`c_H \ge 0`.

  Returns:
    ``(loss, metrics)``: the scalar objective and the scalar metrics of the module docstring's
    table: ``policy_loss``, ``approx_kl``, ``clip_ratio/*`` (``loss_type="clip"``) or
    ``cispo_clip_ratio`` (``loss_type="cispo"``), ``clip_ratio/dual_mean`` with ``dual_clip``,
    ``kl`` when the KL term is on and ``entropy`` when given.
  """
  _validate.choice("importance_level", importance_level, IMPORTANCE_LEVELS)
  _validate.choice("loss_type", loss_type, POLICY_LOSS_TYPES)
  _validate.choice("kl_estimator", kl_estimator, KL_ESTIMATORS)
  _validate.choice("loss_agg_mode", loss_agg_mode, AGG_MODES)
  _validate.positive("kl_clamp", kl_clamp)
  if clip_eps_high is not None and loss_type == "cispo":
    # TRL spells CISPO's cap `epsilon_high`; here that value would be silently ignored.
    raise ValueError(f"clip_eps_high={clip_eps_high!r} does not apply to loss_type='cispo': its IS "
                     "weight is capped at cispo_max_weight (TRL's epsilon_high for CISPO)")
  clip_eps_high = _check_clip_params(clip_eps_low, clip_eps_high, dual_clip)
  _validate.positive("cispo_max_weight", cispo_max_weight)
  _validate.non_negative("entropy_coef", entropy_coef)
  _validate.non_negative("beta", beta)
  if dual_clip is not None and loss_type != "clip":
    raise ValueError(f"dual_clip applies to loss_type='clip' only, got loss_type={loss_type!r}")
  static_beta = _validate.static_value("beta", beta)
  use_kl = static_beta is None or static_beta > 0
  if use_kl and ref_logp is None:
    raise ValueError(f"ref_logp is required for the KL term (beta={beta!r}); pass beta=0.0 (the "
                     "default) to train without a reference")
  if entropy_coef > 0 and entropy is None:
    raise ValueError(f"entropy is required when entropy_coef={entropy_coef!r} > 0")

  logp = jnp.asarray(logp)
  mask = _validate.bool_mask("mask", mask)
  _validate.min_rank("logp", logp, 1, "[*b, T]")
  old_logp, ref_logp, entropy = (None if x is None else jnp.asarray(x)
                                 for x in (old_logp, ref_logp, entropy))
  # Only the arrays actually passed are checked (and named) here; None stands for logp's shape.
  _validate.same_shape({"logp": logp, "old_logp": old_logp, "ref_logp": ref_logp, "mask": mask,
                        "entropy": entropy})
  if old_logp is None:
    old_logp = jax.lax.stop_gradient(logp)
  advantages = jnp.asarray(advantages)
  if advantages.shape == mask.shape[:-1]:
    advantages = advantages[..., None]
  elif advantages.shape != mask.shape:
    raise ValueError(f"advantages must have shape {list(mask.shape[:-1])} (per sequence) or "
                     f"{list(mask.shape)} (per token), got {list(advantages.shape)}")

  # Zero the padding before any nonlinearity: garbage there must reach neither values nor gradients.
  def valid(x: Array) -> Array:
    return jnp.where(mask, x, 0.0)

  logp = valid(logp)
  advantages = jax.lax.stop_gradient(valid(jnp.broadcast_to(advantages, mask.shape)))
  token_log_ratio = logp - jax.lax.stop_gradient(valid(old_logp))
  if importance_level == "sequence":
    seq_log_ratio = masked_mean(token_log_ratio, mask, axis=-1)[..., None]
    log_ratio = jax.lax.stop_gradient(seq_log_ratio) + logp - jax.lax.stop_gradient(logp)
  else:
    log_ratio = token_log_ratio

  if loss_type == "clip":
    per_token, stats = _clip_objective(log_ratio, advantages, clip_eps_low=clip_eps_low,
                                       clip_eps_high=clip_eps_high, dual_clip=dual_clip)
  else:
    # No lower bound on the weight: clip_eps_low=1 makes the low-clip flag (r < 0) never fire; the
    # high flag r > 1 + (w_max - 1) is TRL's `cispo_clip_ratio` condition r > w_max.
    no_clip = jnp.zeros(mask.shape, jnp.bool_)
    stats = _ratio_stats(jnp.clip(log_ratio, -MAX_LOG_RATIO, MAX_LOG_RATIO), advantages,
                         clip_eps_low=1.0, clip_eps_high=cispo_max_weight - 1.0,
                         is_dual_clipped=no_clip)
    weight = jax.lax.stop_gradient(jnp.minimum(stats.ratio, cispo_max_weight))
    per_token = -weight * advantages * logp

  agg = functools.partial(aggregate, mask=mask, loss_agg_mode=loss_agg_mode, max_len=max_len)
  policy_loss = agg(per_token)
  metrics = {"policy_loss": policy_loss, **_clip_metrics(stats, mask, loss_type)}
  if dual_clip is not None:
    metrics["clip_ratio/dual_mean"] = masked_mean(stats.is_dual_clipped.astype(jnp.float32), mask)
  total = per_token
  if use_kl:
    kl = kl_estimate(logp, jax.lax.stop_gradient(valid(ref_logp)), kl_estimator=kl_estimator,
                     kl_clamp=kl_clamp)
    total = total + beta * kl
    metrics["kl"] = masked_mean(kl, mask)
  if entropy is not None:
    entropy = valid(entropy)
    metrics["entropy"] = masked_mean(entropy, mask)
    if entropy_coef > 0:
      total = total - entropy_coef * entropy
  loss = agg(total) if use_kl or entropy_coef > 0 else policy_loss
  return loss, jax.lax.stop_gradient(metrics)


def ppo_loss(logp: Float[ArrayLike, "*b T"], old_logp: Float[ArrayLike, "*b T"] | None,
             advantages: Float[ArrayLike, "*b T"], mask: Bool[ArrayLike, "*b T"], *,
             ref_logp: Float[ArrayLike, "*b T"] | None = None,
             values: Float[ArrayLike, "*b T"] | None = None,
             old_values: Float[ArrayLike, "*b T"] | None = None,
             returns: Float[ArrayLike, "*b T"] | None = None, clip_eps_low: float = 0.2,
             clip_eps_high: float | None = None, dual_clip: float | None = None,
             vf_coef: float = 0.1, value_clip_eps: float = 0.2, beta: float | Array = 0.0,
             kl_estimator: KLEstimator = "k3", kl_clamp: float | None = None,
             loss_agg_mode: AggMode = "token_mean", max_len: int | None = None,
             entropy: Float[ArrayLike, "*b T"] | None = None, entropy_coef: float = 0.0
             ) -> tuple[Float[Array, ""], dict[str, Float[Array, ""]]]:
  r"""PPO with a critic (Schulman et al. 2017; RLHF form: Ouyang et al. 2022, Huang et al. 2024).

  .. math:: \mathcal{L} = \mathrm{agg}[\ell^{clip}] + c_V\,\mathrm{agg}[\ell^{V}]
            + \beta\,\mathrm{agg}[\widehat{\mathrm{KL}}] - c_H\,\mathrm{agg}[H],

  with :math:`\ell^{clip}` from ``clipped_surrogate`` and :math:`\ell^V` from
  ``clipped_value_loss``. The policy part is ``grpo_loss`` at token level with per-token advantages
  (typically ``gae`` then ``masked_whiten``); in RLHF PPO the KL usually sits in the reward
  (``kl_penalized_rewards``) and ``beta`` stays 0. Defaults follow TRL's PPO (``cliprange`` 0.2,
  ``vf_coef`` 0.1, ``cliprange_value`` 0.2, token mean).

  Args:
    logp: :math:`\log\pi_\theta` of the sampled tokens, ``[*b, T]``.
    old_logp: :math:`\log\pi_{old}`, same shape, or ``None`` (ratio 1).
    advantages: per-token advantages ``[*b, T]``.
    mask: boolean ``[*b, T]``.
    ref_logp: reference log-probs, for an in-loss KL term (``beta > 0``).
    values: critic values :math:`V_\theta`; with ``old_values`` and ``returns`` adds the value loss.
    old_values: values at rollout time.
    returns: value targets.
    clip_eps_low: lower ratio clip :math:`\in [0, 1)` (TRL ``cliprange``).
    clip_eps_high: upper ratio clip (``None``: ``clip_eps_low``).
    dual_clip: dual-clip constant :math:`c > 1`, or ``None``.
    vf_coef: value-loss coefficient :math:`c_V \ge 0` (TRL ``vf_coef``).
    value_clip_eps: value clip range :math:`\ge 0` (TRL ``cliprange_value``).
    beta: in-loss KL coefficient :math:`\ge 0`.
    kl_estimator: estimator for the in-loss KL.
    kl_clamp: bound on the per-token KL estimate (see ``grpo_loss``), or ``None``.
    loss_agg_mode: one of ``AGG_MODES``, used for every term.
    max_len: the constant of ``seq_mean_token_sum_norm``.
    entropy: per-token entropy, logged and used when ``entropy_coef > 0``.
    entropy_coef: entropy bonus coefficient :math:`c_H \ge 0`.

  Returns:
    ``(loss, metrics)``: ``grpo_loss``'s metrics plus, when a critic is given, ``loss/value`` (the
    aggregated value loss) and ``val/clipfrac`` (fraction of valid tokens where the clipped value
    term is the larger), TRL PPO's names without the trainer's ``_avg`` suffix.
  """
  critic = {"values": values, "old_values": old_values, "returns": returns}
  given = [name for name, x in critic.items() if x is not None]
  if given and len(given) != len(critic):
    missing = sorted(set(critic) - set(given))
    raise ValueError(f"the value loss needs values, old_values and returns; missing {missing}")
  _validate.non_negative("vf_coef", vf_coef)
  _validate.non_negative("value_clip_eps", value_clip_eps)
  mask = _validate.bool_mask("mask", mask)
  advantages = jnp.asarray(advantages)
  if advantages.shape != jnp.shape(mask):
    raise ValueError(f"advantages must be per token with the shape of mask, "
                     f"{list(jnp.shape(mask))}; got {list(advantages.shape)}")
  loss, metrics = grpo_loss(logp, old_logp, advantages, mask, ref_logp=ref_logp,
                            clip_eps_low=clip_eps_low, clip_eps_high=clip_eps_high, beta=beta,
                            kl_estimator=kl_estimator, kl_clamp=kl_clamp,
                            loss_agg_mode=loss_agg_mode, max_len=max_len, dual_clip=dual_clip,
                            entropy=entropy, entropy_coef=entropy_coef)
  if not given:
    return loss, metrics
  values, old_values, returns = map(jnp.asarray, (values, old_values, returns))
  _validate.same_shape({"values": values, "old_values": old_values, "returns": returns,
                        "mask": mask})
  # Zero the padding first so that garbage there reaches neither the loss nor its gradients.
  values, old_values, returns = (jnp.where(mask, x, 0.0) for x in (values, old_values, returns))
  per_token = clipped_value_loss(values, old_values, returns, clip_eps=value_clip_eps)
  value_loss = aggregate(per_token, mask, loss_agg_mode=loss_agg_mode, max_len=max_len)
  is_clipped = per_token > 0.5 * jnp.square(values - returns)
  metrics = {**metrics, "loss/value": jax.lax.stop_gradient(value_loss),
             "val/clipfrac": jax.lax.stop_gradient(
                 masked_mean(is_clipped.astype(jnp.float32), mask))}
  return loss + vf_coef * value_loss, metrics


def _variant(doc: str, **defaults) -> functools.partial:
  """``grpo_loss`` with a paper's defaults (still overridable by keyword) and its own docstring."""
  variant = functools.partial(grpo_loss, **defaults)
  variant.__doc__ = doc
  return variant


dr_grpo_loss = _variant(
    """Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training: A Critical Perspective").

    ``grpo_loss(logp, old_logp, advantages, mask, *, max_len, ...)`` with ``beta=0`` and
    ``loss_agg_mode="seq_mean_token_sum_norm"``: per-sequence token sums over the constant
    ``max_len`` (pass it: the generation budget), which removes GRPO's response-length bias. Pair
    with ``group_advantages(rewards, scale="none")``, which removes the question-difficulty bias of
    the std.
    """,
    beta=0.0, loss_agg_mode="seq_mean_token_sum_norm")

dapo_loss = _variant(
    """DAPO (Yu et al. 2025, "DAPO: An Open-Source LLM Reinforcement Learning System at Scale").

    ``grpo_loss(logp, old_logp, advantages, mask, ...)`` with clip-higher (``clip_eps_low=0.2``,
    ``clip_eps_high=0.28``), the token-level loss (``loss_agg_mode="token_mean"``) and no KL term
    (``beta=0``). Dynamic sampling is ``select_informative_groups`` (with
    ``informative_group_mask``); overlong shaping belongs to the reward.
    """,
    clip_eps_low=0.2, clip_eps_high=0.28, beta=0.0, loss_agg_mode="token_mean")

gspo_loss = _variant(
    """GSPO (Zheng et al. 2025, "Group Sequence Policy Optimization").

    ``grpo_loss(logp, old_logp, advantages, mask, ...)`` with the length-normalised sequence ratio
    (``importance_level="sequence"``), the paper's clip range (``clip_eps_low=3e-4``,
    ``clip_eps_high=4e-4``; sequence ratios stay close to 1), no KL (``beta=0``) and
    ``seq_mean_token_mean``, which makes the token-broadcast loss equal to the sequence-level
    objective (a token mean would weight sequences by length).
    """,
    importance_level="sequence", clip_eps_low=3e-4, clip_eps_high=4e-4, beta=0.0,
    loss_agg_mode="seq_mean_token_mean")

cispo_loss = _variant(
    """CISPO (MiniMax 2025, "MiniMax-M1: Scaling Test-Time Compute Efficiently with Lightning
    Attention", Sec. 3.1).

    ``grpo_loss(logp, old_logp, advantages, mask, ...)`` with ``loss_type="cispo"``: REINFORCE with
    a capped, stop-gradient IS weight, ``-sg(min(r, cispo_max_weight)) * A * log pi`` (absolute cap,
    default 5.0 as TRL's ``epsilon_high`` for CISPO), token-level normalisation
    (``loss_agg_mode="token_mean"``) and no KL (``beta=0``).
    """,
    loss_type="cispo", beta=0.0, loss_agg_mode="token_mean")
