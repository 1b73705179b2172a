r"""KL divergence between a policy and a reference: sampled estimators, the exact categorical KL,
KL-penalised rewards and KL-coefficient controllers.

Throughout, ``logp`` is :math:`\log\pi(x)` of tokens sampled from :math:`\pi` (the policy that
generated them) and ``ref_logp`` is :math:`\log\pi_{ref}(x)` of the same tokens; with
:math:`\Delta = \log\pi(x) - \log\pi_{ref}(x)` and :math:`r = \pi_{ref}(x)/\pi(x) = e^{-\Delta}` the
estimators below target :math:`\mathrm{KL}(\pi\,\|\,\pi_{ref})` (J. Schulman, "Approximating KL
Divergence", 2020, with his :math:`q = \pi`, :math:`p = \pi_{ref}`).
"""

from collections.abc import Callable
from typing import Literal, NamedTuple, get_args

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Bool, Float

from alignax import _validate
from alignax.aggregation import last_valid_token

KLEstimator = Literal["k1", "k2", "k3", "abs"]
KL_ESTIMATORS: tuple[str, ...] = get_args(KLEstimator)


def kl_estimate(logp: Float[ArrayLike, "*s"], ref_logp: Float[ArrayLike, "*s"], *,
                kl_estimator: KLEstimator, kl_clamp: float | None = None) -> Float[Array, "*s"]:
  r"""Per-sample estimate of :math:`\mathrm{KL}(\pi\|\pi_{ref})` from samples :math:`x\sim\pi`.

  With :math:`\Delta = \log\pi(x) - \log\pi_{ref}(x)`:

  * ``k1`` :math:`= \Delta`. Unbiased, high variance, can be negative. As a loss (gradient through
    :math:`\log\pi`) its expected gradient is :math:`E_\pi[\nabla\log\pi] = 0`: it carries no
    signal, so use it in the *reward* (``kl_penalized_rewards``), where the score-function gradient
    is :math:`\nabla\mathrm{KL}(\pi\|\pi_{ref})`. TRL RLOO/PPO, verl ``kl``, OpenRLHF default.
  * ``k2`` :math:`= \tfrac12\Delta^2`. Biased (second order in :math:`\Delta`), low variance. As a
    loss, :math:`E_\pi[\nabla k_2] = E_\pi[\Delta\,\nabla\log\pi] =
    \nabla\mathrm{KL}(\pi\|\pi_{ref})` exactly (on-policy). verl ``mse``.
  * ``k3`` :math:`= (r - 1) - \log r = e^{-\Delta} - 1 + \Delta`. Unbiased, non-negative, low
    variance. As a loss, :math:`E_\pi[\nabla k_3] = E_\pi[(1 - r)\nabla\log\pi] =
    \nabla\mathrm{KL}(\pi_{ref}\|\pi)`, the gradient of the *forward* KL, not of the KL it
    estimates. GRPO's KL term (Shao et al. 2024, Eq. 4), verl ``low_var_kl``, TRL GRPO.
  * ``abs`` :math:`= |\Delta|`. A biased heuristic, kept for parity with verl / TRL v0.11.

  Papers differ on how k3 is used: as a value in the reward it estimates
  :math:`\mathrm{KL}(\pi\|\pi_{ref})`; as a loss (GRPO) its gradient is that of
  :math:`\mathrm{KL}(\pi_{ref}\|\pi)`.

  Args:
    logp: :math:`\log\pi` of the sampled tokens, any shape.
    ref_logp: :math:`\log\pi_{ref}` of the same tokens, same shape.
    kl_estimator: one of ``KL_ESTIMATORS``.
    kl_clamp: if given (``> 0``), the estimate is clipped to ``[-kl_clamp, kl_clamp]``, as verl
      clamps ``low_var_kl`` to [-10, 10]; clipped entries have zero gradient. For k3 the exponent is
      first bounded where the clipped value is already reached, so a huge :math:`|\Delta|` gives
      ``kl_clamp`` and a zero gradient instead of inf / NaN. Unclamped k3 overflows once
      :math:`-\Delta \gtrsim 88` in float32.

  Returns:
    Per-sample estimates, same shape; mask before aggregating.
  """
  _validate.choice("kl_estimator", kl_estimator, KL_ESTIMATORS)
  _validate.positive("kl_clamp", kl_clamp)
  logp, ref_logp = jnp.asarray(logp), jnp.asarray(ref_logp)
  _validate.same_shape({"logp": logp, "ref_logp": ref_logp})
  delta = logp - ref_logp
  if kl_estimator == "k1":
    kl = delta
  elif kl_estimator == "abs":
    kl = jnp.abs(delta)
  elif kl_estimator == "k2":
    kl = 0.5 * jnp.square(delta)
  else:
    log_r = -delta
    if kl_clamp is not None:
      # k3(u) = e^u - 1 - u already exceeds `kl_clamp` at both bounds, so bounding u changes nothing
      # after the final clip but keeps exp (and its gradient) finite.
      log_r = jnp.clip(log_r, -(kl_clamp + 2.0), jnp.log1p(kl_clamp) + 1.0)
    kl = jnp.expm1(log_r) - log_r
  if kl_clamp is not None:
    kl = jnp.clip(kl, -kl_clamp, kl_clamp)
  return kl


def categorical_kl(logits_p: Float[ArrayLike, "*s"], logits_q: Float[ArrayLike, "*s"], *,
                   axis: int = -1) -> Float[Array, "*r"]:
  r"""Exact :math:`\mathrm{KL}(p\|q) = \sum_v p_v(\log p_v - \log q_v)` between two categoricals.

  ``p = softmax(logits_p)``, ``q = softmax(logits_q)`` over ``axis`` (the vocabulary). Computed from
  log-softmax, so logits of any magnitude (e.g. ±1e4) neither overflow nor lose the small
  differences. Entries with :math:`p_v = 0` (including ``-inf`` logits, a masked vocabulary)
  contribute 0; :math:`p_v > 0 = q_v` gives ``inf``.

  Args:
    logits_p: unnormalised log-probabilities of p, e.g. ``[*b, T, V]``.
    logits_q: those of q, same shape.
    axis: the category axis.

  Returns:
    KL(p‖q), ``axis`` reduced (e.g. ``[*b, T]``).
  """
  logits_p, logits_q = jnp.asarray(logits_p), jnp.asarray(logits_q)
  _validate.same_shape({"logits_p": logits_p, "logits_q": logits_q})
  _validate.min_rank("logits_p", logits_p, 1, "[..., V]")
  log_p = jax.nn.log_softmax(logits_p, axis=axis)
  log_q = jax.nn.log_softmax(logits_q, axis=axis)
  p = jnp.exp(log_p)
  # Where p == 0 the log difference may be -inf - -inf; its contribution is 0 (0 log 0 = 0).
  log_ratio = jnp.where(p > 0, log_p - log_q, 0.0)
  return jnp.sum(p * log_ratio, axis=axis)


def kl_penalized_rewards(logp: Float[ArrayLike, "*b T"], ref_logp: Float[ArrayLike, "*b T"],
                         scores: Float[ArrayLike, "*b"], mask: Bool[ArrayLike, "*b T"], *,
                         beta: float | Array, kl_estimator: KLEstimator = "k1",
                         kl_clamp: float | None = None) -> Float[Array, "*b T"]:
  r"""Per-token RLHF reward :math:`r_t = -\beta\,\widehat{\mathrm{KL}}_t + [t = t_{last}]\,s`.

  The sequence score :math:`s` (a reward model's or verifier's) is paid on the last valid token and
  every valid token pays the KL penalty (Ziegler et al. 2019; Ouyang et al. 2022, InstructGPT;
  Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO"). Used with a policy-gradient
  estimator the k1 penalty yields :math:`\nabla\mathrm{KL}(\pi\|\pi_{ref})` (see ``kl_estimate``).
  Masked tokens, and rows with no valid token, get 0; whatever padded slots of ``logp`` /
  ``ref_logp`` hold (NaN, inf) never reaches a reward.

  Args:
    logp: policy log-probs of the sampled tokens, ``[*b, T]``.
    ref_logp: reference log-probs, ``[*b, T]``.
    scores: sequence-level scores, shape ``[*b]``.
    mask: boolean ``[*b, T]``, ``True`` on generated tokens.
    beta: KL coefficient, ``>= 0``; may be a traced array (e.g. from ``adaptive_kl_controller``).
    kl_estimator: the per-token KL estimator (``k1`` in InstructGPT and the N+ details).
    kl_clamp: if given, the per-token estimate is clipped to ``[-kl_clamp, kl_clamp]``
      (``kl_estimate``'s; OpenRLHF clamps every estimator to [-10, 10]).

  Returns:
    Per-token rewards ``[*b, T]``.
  """
  _validate.non_negative("beta", beta)
  logp, ref_logp, scores = jnp.asarray(logp), jnp.asarray(ref_logp), jnp.asarray(scores)
  mask = _validate.bool_mask("mask", mask)
  _validate.min_rank("logp", logp, 1, "[*b, T]")
  _validate.same_shape({"logp": logp, "ref_logp": ref_logp, "mask": mask})
  if scores.shape != mask.shape[:-1]:
    raise ValueError(f"scores must have shape mask.shape[:-1] = {list(mask.shape[:-1])}, "
                     f"got {list(scores.shape)}")
  kl = kl_estimate(jnp.where(mask, logp, 0.0), jnp.where(mask, ref_logp, 0.0),
                   kl_estimator=kl_estimator, kl_clamp=kl_clamp)
  rewards = jnp.where(mask, -beta * kl, 0.0)
  return rewards + jnp.where(last_valid_token(mask), scores[..., None], 0.0)


class KLControllerState(NamedTuple):
  """State of a KL-coefficient controller: the current coefficient :math:`\\beta`."""
  kl_coef: Float[Array, ""]


class KLController(NamedTuple):
  """A pair of pure functions, optax style.

  Attributes:
    init: ``() -> KLControllerState``.
    update: ``(state, kl, n_steps) -> KLControllerState``, where ``kl`` is the observed mean
      sequence KL of the last batch and ``n_steps`` the number of samples (or steps) it covered.
  """
  init: Callable[[], KLControllerState]
  update: Callable[[KLControllerState, Float[ArrayLike, ""], int | Array], KLControllerState]


def adaptive_kl_controller(*, init_kl_coef: float, target: float, horizon: float) -> KLController:
  r"""Proportional KL controller (Ziegler et al. 2019, "Fine-Tuning LMs from Human Preferences").

  .. math:: e = \mathrm{clip}(\mathrm{KL}/\mathrm{target} - 1, -0.2, 0.2), \qquad
            \beta \leftarrow \max\big(0,\; \beta\,(1 + e\cdot n/\mathrm{horizon})\big).

  The coefficient grows while the observed KL is above ``target`` and shrinks below it. Same update
  as verl's and OpenRLHF's ``AdaptiveKLController`` (TRL v0.11: ``init_kl_coef=0.2, target=6,
  horizon=10000``), except for the clamp at 0, a deliberate deviation from Ziegler et al.: their
  multiplicative update crosses 0 when one update covers more than ``horizon / 0.2`` samples
  (:math:`e\cdot n/\mathrm{horizon} < -1`), and a negative :math:`\beta` would then *reward* the
  policy for diverging from the reference. Once at 0 the coefficient stays 0 (the update is
  multiplicative).

  Args:
    init_kl_coef: the starting :math:`\beta`, ``>= 0``.
    target: the KL to track, ``> 0``.
    horizon: number of samples over which a relative error is corrected, ``> 0``.

  Returns:
    A ``KLController``; its ``update`` is jittable.
  """
  _validate.non_negative("init_kl_coef", init_kl_coef)
  _validate.positive("target", target)
  _validate.positive("horizon", horizon)

  def init() -> KLControllerState:
    return KLControllerState(kl_coef=jnp.asarray(init_kl_coef, jnp.float32))

  def update(state: KLControllerState, kl: Float[ArrayLike, ""],
             n_steps: int | Array) -> KLControllerState:
    error = jnp.clip(jnp.asarray(kl, jnp.float32) / target - 1.0, -0.2, 0.2)
    # Clamped at 0: a negative coefficient would pay the policy for moving away from the reference.
    kl_coef = jnp.maximum(state.kl_coef * (1.0 + error * n_steps / horizon), 0.0)
    return KLControllerState(kl_coef=kl_coef)

  return KLController(init=init, update=update)


def fixed_kl_controller(*, kl_coef: float) -> KLController:
  """A controller whose coefficient never changes (verl ``kl_ctrl.type=fixed``)."""
  _validate.non_negative("kl_coef", kl_coef)

  def init() -> KLControllerState:
    return KLControllerState(kl_coef=jnp.asarray(kl_coef, jnp.float32))

  def update(state: KLControllerState, kl: Float[ArrayLike, ""],
             n_steps: int | Array) -> KLControllerState:
    del kl, n_steps  # a fixed coefficient ignores the observed KL
    return state

  return KLController(init=init, update=update)
