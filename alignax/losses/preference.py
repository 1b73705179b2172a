r"""Direct preference objectives: DPO and its loss-type family, KTO, ORPO, SimPO and CPO.

Inputs are per-sequence log-probabilities :math:`\log\pi(y\mid x)`, the SUM of the completion's
token log-probs (``alignax.sequence_logprobs``), and, where a method length-normalises, the
completion lengths :math:`|y|` (``alignax.aggregation.masked_count(mask, axis=-1)``). Any leading
batch shape ``[*b]`` works; every statistic is a mean over all of it.

Every objective returns ``(loss, metrics)`` for ``jax.value_and_grad(has_aux=True)``; ``metrics`` is
a flat dict of stop-gradient scalars (batch means) named as TRL logs them. ``reduction="mean"`` (the
default) makes ``loss`` the mean over pairs (KTO: examples); ``reduction="none"`` returns the
per-pair losses ``[*b]`` instead, with their gradients, so callers can weight or reduce pairs
differently (their mean is the ``"mean"`` loss).

Lengths (``chosen_lengths``, ``rejected_lengths``) are keyword-only everywhere. Optional per-example
arguments must have exactly the shape of the log-probs: nothing is broadcast.

A length of 0 is treated as 1 wherever a method divides by it: the sum over no token is 0, so the
normalised log-prob of an empty completion is 0, with finite values and gradients (never NaN).
"""

from collections.abc import Sequence
from typing import Literal, get_args

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Bool, Float, Real

from alignax import _validate
from alignax.aggregation import _aggregate_sequences, masked_mean

DpoLossType = Literal["sigmoid", "hinge", "ipo", "robust", "exo_pair", "nca_pair", "bco_pair",
                      "sppo_hard", "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop",
                      "sigmoid_norm"]
DPO_LOSS_TYPES: tuple[str, ...] = get_args(DpoLossType)

# Loss types that read the length-normalised margin; `ipo` only when lengths are given.
_NEEDS_LENGTHS = ("sigmoid_norm",)
_MAY_USE_LENGTHS = ("sigmoid_norm", "ipo")
# What `label_smoothing` (ε) means per loss type; a type missing here has no ε and requires ε = 0.
_CDPO_SMOOTHED = ("sigmoid", "sigmoid_norm", "aot", "aot_unpaired")

Metrics = dict[str, Float[Array, ""]]
Scalar = float | Float[ArrayLike, ""]
Reduction = Literal["mean", "none"]
REDUCTIONS: tuple[str, ...] = get_args(Reduction)


def _reduce(losses: Array, reduction: str) -> Array:
  """The per-pair ``losses`` themselves (``"none"``) or their mean (``"mean"``)."""
  return losses if reduction == "none" else jnp.mean(losses)


def _length_normalised(logps: Array, lengths: Array) -> Array:
  return logps / jnp.maximum(lengths, 1).astype(logps.dtype)


def _smoothed_logistic(z: Array, eps: float) -> Array:
  """Logistic loss with the label flipped at rate ε: −(1−ε) log σ(z) − ε log σ(−z)."""
  return -(1 - eps) * jax.nn.log_sigmoid(z) - eps * jax.nn.log_sigmoid(-z)


def _sort_flat(x: Array) -> Array:
  """Sorts all of ``x`` (every batch dim) and gives it back its shape and sharding."""
  sharding = jax.typeof(x).sharding
  # A batch sharded over explicit mesh axes is gathered for the sort, then sharded again.
  explicit = any(axis is not None for axis in sharding.spec)
  if explicit:
    x = jax.sharding.reshard(x, jax.sharding.NamedSharding(sharding.mesh, jax.P()))
  out = jnp.sort(x.reshape(-1)).reshape(x.shape)
  return jax.sharding.reshard(out, sharding) if explicit else out


def _chosen_nll(chosen_logps: Array, chosen_lengths: Array) -> tuple[Array, Array]:
  r"""NLL of the chosen completions, ``sft_loss``'s default token mean, from sequence sums.

  ORPO and CPO receive :math:`\log\pi(y_c)` summed over tokens and :math:`|y_c|`, so the token
  mean is ``aggregate``'s ``token_mean`` written on sequence sums, :math:`-\sum_i \log\pi(y_{c,i})
  / \sum_i |y_{c,i}|`, as the Hugging Face cross-entropy in TRL computes it. Returns the per-pair
  share (each pair's part, whose mean over pairs is the NLL) and the NLL itself.
  """
  nll = _aggregate_sequences(-chosen_logps, chosen_lengths, loss_agg_mode="token_mean")
  num_tokens = jnp.maximum(jnp.sum(jax.lax.stop_gradient(chosen_lengths)), 1)
  share = -chosen_logps * (chosen_logps.size / num_tokens.astype(chosen_logps.dtype))
  return share, nll


def _pair_statistics(chosen_rewards: Array, rejected_rewards: Array, chosen_logps: Array,
                     rejected_logps: Array) -> Metrics:
  stats = {
      "rewards/chosen": jnp.mean(chosen_rewards),
      "rewards/rejected": jnp.mean(rejected_rewards),
      "rewards/margins": jnp.mean(chosen_rewards - rejected_rewards),
      "rewards/accuracies": jnp.mean(chosen_rewards > rejected_rewards, dtype=jnp.float32),
      "logps/chosen": jnp.mean(chosen_logps),
      "logps/rejected": jnp.mean(rejected_logps),
  }
  return jax.tree.map(jax.lax.stop_gradient, stats)


def _check_dpo_label_smoothing(loss_types: Sequence[str], eps: float) -> None:
  _validate.in_unit_interval("label_smoothing", eps)
  for loss_type in loss_types:
    if loss_type in _CDPO_SMOOTHED:
      if not eps <= 0.5:
        raise ValueError(f"label_smoothing must lie in [0, 0.5] for loss_type={loss_type!r} (cDPO: "
                         f"the rate at which labels are flipped), got {eps!r}")
    elif loss_type == "robust":
      if not eps < 0.5:
        raise ValueError(f"label_smoothing must lie in [0, 0.5) for loss_type='robust' (the label "
                         f"noise rate; the loss divides by 1 - 2*label_smoothing), got {eps!r}")
    elif loss_type == "exo_pair":
      if not eps > 0:
        raise ValueError("loss_type='exo_pair' needs label_smoothing in (0, 1) (it takes its log; "
                         "1e-3 is the usual choice), got 0")
    elif eps != 0:
      raise ValueError(f"label_smoothing={eps!r} has no effect for loss_type={loss_type!r}; "
                       "set it to 0")


def _dpo_pair_losses(loss_type: str, *, chosen_logps: Array, rejected_logps: Array,
                     ref_chosen_logps: Array, ref_rejected_logps: Array,
                     normalised_margin: Array | None, beta: Scalar, eps: float,
                     discopop_tau: float, bco_reward_shift: Scalar) -> Array:
  chosen_ratio = chosen_logps - ref_chosen_logps  # s_c
  rejected_ratio = rejected_logps - ref_rejected_logps  # s_r
  margin = chosen_ratio - rejected_ratio  # δ
  z = beta * margin
  match loss_type:
    case "sigmoid":
      return _smoothed_logistic(z, eps)
    case "sigmoid_norm":
      return _smoothed_logistic(beta * normalised_margin, eps)
    case "hinge":
      return jax.nn.relu(1 - z)
    case "ipo":
      h = margin if normalised_margin is None else normalised_margin
      return jnp.square(h - 1 / (2 * beta))
    case "robust":
      return (-(1 - eps) * jax.nn.log_sigmoid(z) + eps * jax.nn.log_sigmoid(-z)) / (1 - 2 * eps)
    case "exo_pair":
      # KL(Bernoulli(σ(z)) ‖ Bernoulli(1 − ε)), written with log-sigmoids so it never overflows.
      return (jax.nn.sigmoid(z) * (jax.nn.log_sigmoid(z) - jnp.log1p(-eps))
              + jax.nn.sigmoid(-z) * (jax.nn.log_sigmoid(-z) - jnp.log(eps)))
    case "nca_pair":
      chosen_reward, rejected_reward = beta * chosen_ratio, beta * rejected_ratio
      return (-jax.nn.log_sigmoid(chosen_reward) - 0.5 * jax.nn.log_sigmoid(-chosen_reward)
              - 0.5 * jax.nn.log_sigmoid(-rejected_reward))
    case "bco_pair":
      return (-jax.nn.log_sigmoid(beta * chosen_ratio - bco_reward_shift)
              - jax.nn.log_sigmoid(-(beta * rejected_ratio - bco_reward_shift)))
    case "sppo_hard":
      target = 1 / (2 * beta)
      return jnp.square(chosen_ratio - target) + jnp.square(rejected_ratio + target)
    case "aot":
      delta = (_sort_flat(chosen_logps - rejected_logps)
               - _sort_flat(ref_chosen_logps - ref_rejected_logps))
      return _smoothed_logistic(beta * delta, eps)
    case "aot_unpaired":
      delta = _sort_flat(chosen_ratio) - _sort_flat(rejected_ratio)
      return _smoothed_logistic(beta * delta, eps)
    case "apo_zero":
      return jax.nn.sigmoid(-beta * chosen_ratio) + jax.nn.sigmoid(beta * rejected_ratio)
    case "apo_down":
      return jax.nn.sigmoid(beta * chosen_ratio) + jax.nn.sigmoid(-z)
    case "discopop":
      # m·exp(−z) as exp(log σ(z/τ) − z): the naive product is 0·inf = NaN for z ≪ 0.
      return (jax.nn.sigmoid(-z / discopop_tau) * -jax.nn.log_sigmoid(z)
              + jnp.exp(jax.nn.log_sigmoid(z / discopop_tau) - z))
  raise AssertionError(loss_type)  # unreachable: loss_type was validated


def dpo_loss(chosen_logps: Float[ArrayLike, "*b"], rejected_logps: Float[ArrayLike, "*b"],
             ref_chosen_logps: Float[ArrayLike, "*b"] | None,
             ref_rejected_logps: Float[ArrayLike, "*b"] | None, *,
             beta: Scalar = 0.1,
             loss_type: DpoLossType | Sequence[DpoLossType] = "sigmoid",
             loss_weights: Sequence[float] | None = None,
             label_smoothing: float = 0.0,
             chosen_lengths: Real[ArrayLike, "*b"] | None = None,
             rejected_lengths: Real[ArrayLike, "*b"] | None = None,
             discopop_tau: float = 0.05,
             bco_reward_shift: Scalar = 0.0,
             reduction: Reduction = "mean") -> tuple[Float[Array, "*r"], Metrics]:
  r"""Direct Preference Optimization and its pairwise loss family, mean over pairs.

  With :math:`s_c = \log\pi(y_c) - \log\pi_\text{ref}(y_c)`, :math:`s_r` likewise,
  :math:`\delta = s_c - s_r`, :math:`z = \beta\delta`, :math:`\varepsilon` = ``label_smoothing`` and
  :math:`\bar\delta = s_c/|y_c| - s_r/|y_r|`, the per-pair loss of each ``loss_type`` is:

  * ``sigmoid``: −(1−ε) log σ(z) − ε log σ(−z). DPO, Rafailov et al. 2023 (Eq. 7); with ε > 0 the
    conservative cDPO of Mitchell 2023 ("A note on DPO with noisy preferences").
  * ``hinge``: max(0, 1 − z), i.e. a margin of 1/β on δ. SLiC-HF, Zhao et al. 2023; RSO,
    Liu et al. 2024.
  * ``ipo``: (δ̄ − 1/(2β))², or (δ − 1/(2β))² when no lengths are given: the squared loss pulls the
    margin to 1/(2β) instead of to infinity. IPO, Azar et al. 2024 (arXiv 2310.12036).
  * ``robust``: [−(1−ε) log σ(z) + ε log σ(−z)] / (1 − 2ε), unbiased under labels flipped at rate ε.
    rDPO, Chowdhury et al. 2024.
  * ``exo_pair``: σ(z)[log σ(z) − log(1−ε)] + σ(−z)[log σ(−z) − log ε], the reverse KL to the
    smoothed label. EXO, Ji et al. 2024.
  * ``nca_pair``: −log σ(βs_c) − ½ log σ(−βs_c) − ½ log σ(−βs_r). NCA, Chen et al. 2024.
  * ``bco_pair``: −log σ(βs_c − Δ) − log σ(−(βs_r − Δ)). BCO, Jung et al. 2024.
  * ``sppo_hard``: (s_c − 1/(2β))² + (s_r + 1/(2β))². SPPO, Wu et al. 2024 (hard-label form).
  * ``aot``: the ``sigmoid`` loss on sort(log π(y_c) − log π(y_r)) − sort(log π_ref(y_c) −
    log π_ref(y_r)), sorted over the batch. AOT, Melnyk et al. 2024 (paired form).
  * ``aot_unpaired``: the ``sigmoid`` loss on sort(s_c) − sort(s_r). AOT, unpaired form.
  * ``apo_zero``: 1 − σ(βs_c) + σ(βs_r). APO-zero, D'Oosterlinck et al. 2024.
  * ``apo_down``: σ(βs_c) + 1 − σ(z). APO-down, same paper.
  * ``discopop``: (1 − m)(−log σ(z)) + m·e^(−z) with m = σ(z/τ), a log-ratio-modulated blend of the
    logistic and exponential losses. DiscoPOP, Lu et al. 2024.
  * ``sigmoid_norm``: the ``sigmoid`` loss on βδ̄ ("DPO w/ LN"): SimPO, Meng et al. 2024 (App.);
    Tülu 3, Lambert et al. 2024.

  Notes per type:

  * ``label_smoothing`` is ε. It is the cDPO flip rate in [0, 0.5] for ``sigmoid``,
    ``sigmoid_norm``, ``aot`` and ``aot_unpaired`` (0.5 makes the loss symmetric in chosen and
    rejected); the noise rate in [0, 0.5) for ``robust``; a required ε in (0, 1) for ``exo_pair``
    (1e-3 is usual); and must be 0 for the other types, which have no ε.
  * ``ipo`` uses the length-normalised margin :math:`\bar\delta` when lengths are given (TRL's form,
    confirmed with the IPO authors) and the raw margin δ of the paper otherwise. ``sigmoid_norm``
    requires lengths.
  * ``bco_pair``'s :math:`\Delta` is ``bco_reward_shift``, the running mean of the implicit rewards
    (Jung et al.: the mean of :math:`\beta s_c` and :math:`\beta s_r` over past batches, i.e. of
    ``(metrics["rewards/chosen"] + metrics["rewards/rejected"]) / 2``). The caller keeps it as state
    and passes it in; TRL v1 fixes it at 0, the default.
  * ``aot`` and ``aot_unpaired`` sort across the whole batch, so the ``reduction="none"`` losses
    are indexed by quantile, not by pair.
  * ``discopop``'s :math:`\tau` is ``discopop_tau`` (0.05 in the paper and TRL).
  * Reference-free: pass ``ref_chosen_logps=ref_rejected_logps=None``; every
    :math:`\log\pi_\text{ref}` above is then 0 (as in SimPO and CPO; TRL ≤ 0.28's
    ``reference_free``).
  * Several types combine as :math:`\sum_k w_k\,\mathrm{mean}(L_k)` with ``loss_type=("sigmoid",
    "bco_pair")`` and ``loss_weights=(1.0, 0.5)``, as TRL's MPO recipe does. Its ``"sft"`` term is
    not a pairwise loss: add ``alignax.sft_loss`` on the chosen tokens (RPO, Pang et al. 2024).

  Args:
    chosen_logps: :math:`\log\pi(y_c\mid x)`, summed over completion tokens, shape ``[*b]``.
    rejected_logps: :math:`\log\pi(y_r\mid x)`, same shape.
    ref_chosen_logps: :math:`\log\pi_\text{ref}(y_c\mid x)`, same shape (treated as constant), or
      ``None`` (reference-free).
    ref_rejected_logps: :math:`\log\pi_\text{ref}(y_r\mid x)`, same shape, or ``None``.
    beta: :math:`\beta > 0`; a Python number or a scalar array (it may be traced, e.g. vmapped).
    loss_type: one of ``DPO_LOSS_TYPES`` or a sequence of distinct ones.
    loss_weights: one weight per loss type (default: all 1).
    label_smoothing: ε, see the notes.
    chosen_lengths: :math:`|y_c|`, number of completion tokens, shape ``[*b]``; used by
      ``sigmoid_norm`` and ``ipo`` only.
    rejected_lengths: :math:`|y_r|`, same shape.
    discopop_tau: :math:`\tau > 0` of ``discopop``.
    bco_reward_shift: :math:`\Delta` of ``bco_pair`` (a scalar; may be traced).
    reduction: ``"mean"`` (a scalar loss) or ``"none"`` (the per-pair losses ``[*b]``).

  Returns:
    ``(loss, metrics)``: the mean over pairs of :math:`\sum_k w_k L_k` (``reduction="none"``: the
    per-pair values, shape ``[*b]``), and the scalars ``rewards/chosen`` (:math:`\beta s_c`),
    ``rewards/rejected`` (:math:`\beta s_r`), ``rewards/margins``, ``rewards/accuracies`` (fraction
    with :math:`\beta s_c > \beta s_r`), ``logps/chosen``, ``logps/rejected`` (batch means).
  """
  loss_types = (loss_type,) if isinstance(loss_type, str) else tuple(loss_type)
  if not loss_types:
    raise ValueError("loss_type must name at least one loss type")
  for name in loss_types:
    _validate.choice("loss_type", name, DPO_LOSS_TYPES)
  if len(set(loss_types)) != len(loss_types):
    raise ValueError(f"loss_type lists a type twice: {loss_types}; merge them with loss_weights")
  if loss_weights is None:
    loss_weights = (1.0,) * len(loss_types)
  if len(loss_weights) != len(loss_types):
    raise ValueError(f"loss_weights has {len(loss_weights)} entries for {len(loss_types)} loss "
                     f"types {loss_types}")
  for weight in loss_weights:
    _validate.non_negative("loss_weights", weight)
  _validate.choice("reduction", reduction, REDUCTIONS)
  _validate.positive("beta", beta)
  _validate.static_value("bco_reward_shift", bco_reward_shift)
  _check_dpo_label_smoothing(loss_types, label_smoothing)
  _validate.positive("discopop_tau", discopop_tau)
  if (ref_chosen_logps is None) != (ref_rejected_logps is None):
    raise ValueError("ref_chosen_logps and ref_rejected_logps must both be arrays or both be None "
                     "(reference-free)")
  if (chosen_lengths is None) != (rejected_lengths is None):
    raise ValueError("chosen_lengths and rejected_lengths must be given together")
  if chosen_lengths is None and any(t in _NEEDS_LENGTHS for t in loss_types):
    raise ValueError(f"loss_type {loss_types} needs chosen_lengths and rejected_lengths (the "
                     "number of completion tokens of each sequence)")
  if chosen_lengths is not None and not any(t in _MAY_USE_LENGTHS for t in loss_types):
    raise ValueError(f"chosen_lengths/rejected_lengths are unused by loss_type {loss_types}; only "
                     f"{_MAY_USE_LENGTHS} length-normalise")

  arrays = {"chosen_logps": chosen_logps, "rejected_logps": rejected_logps,
            "ref_chosen_logps": ref_chosen_logps, "ref_rejected_logps": ref_rejected_logps,
            "chosen_lengths": chosen_lengths, "rejected_lengths": rejected_lengths}
  arrays = {k: None if v is None else jnp.asarray(v) for k, v in arrays.items()}
  _validate.same_shape(arrays)
  chosen_logps, rejected_logps = arrays["chosen_logps"], arrays["rejected_logps"]
  if ref_chosen_logps is None:
    ref_chosen_logps = ref_rejected_logps = jnp.zeros_like(chosen_logps)
  else:
    # The reference is frozen: no gradient reaches whatever computed its log-probs.
    ref_chosen_logps, ref_rejected_logps = jax.lax.stop_gradient(
        (arrays["ref_chosen_logps"], arrays["ref_rejected_logps"]))

  normalised_margin = None
  if chosen_lengths is not None:
    normalised_margin = (
        _length_normalised(chosen_logps - ref_chosen_logps, arrays["chosen_lengths"])
        - _length_normalised(rejected_logps - ref_rejected_logps, arrays["rejected_lengths"]))
  losses = sum(
      weight * _dpo_pair_losses(
          name, chosen_logps=chosen_logps, rejected_logps=rejected_logps,
          ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps,
          normalised_margin=normalised_margin, beta=beta, eps=label_smoothing,
          discopop_tau=discopop_tau, bco_reward_shift=bco_reward_shift)
      for name, weight in zip(loss_types, loss_weights))
  metrics = _pair_statistics(beta * (chosen_logps - ref_chosen_logps),
                             beta * (rejected_logps - ref_rejected_logps),
                             chosen_logps, rejected_logps)
  return _reduce(losses, reduction), metrics


def kto_reference_point(mismatched_logps: Float[ArrayLike, "*b"],
                        ref_mismatched_logps: Float[ArrayLike, "*b"]) -> Float[Array, ""]:
  r"""KTO reference point :math:`z_0 = \max(0, \overline{\log\pi(y'|x) - \log\pi_{ref}(y'|x)})`.

  An estimate of :math:`\mathrm{KL}(\pi\,\|\,\pi_\text{ref})` from completions :math:`y'`
  paired with the wrong prompt :math:`x` (Ethayarajh et al. 2024; TRL pairs each prompt
  with the next example's completion). No gradient flows through it, as in the paper.

  Args:
    mismatched_logps: :math:`\log\pi(y'\mid x)` summed over tokens, shape ``[*b]``.
    ref_mismatched_logps: :math:`\log\pi_\text{ref}(y'\mid x)`, same shape.

  Returns:
    The scalar :math:`z_0 \ge 0`, to pass as ``kto_loss(..., reference_point=z0)``.
  """
  mismatched_logps = jnp.asarray(mismatched_logps)
  ref_mismatched_logps = jnp.asarray(ref_mismatched_logps)
  _validate.same_shape({"mismatched_logps": mismatched_logps,
                        "ref_mismatched_logps": ref_mismatched_logps})
  kl = jnp.maximum(jnp.mean(mismatched_logps - ref_mismatched_logps), 0)
  return jax.lax.stop_gradient(kl)


def kto_loss(logps: Float[ArrayLike, "*b"], ref_logps: Float[ArrayLike, "*b"],
             desirable: Bool[ArrayLike, "*b"], *, reference_point: Scalar, beta: Scalar = 0.1,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0,
             reduction: Reduction = "mean") -> tuple[Float[Array, "*r"], Metrics]:
  r"""Kahneman-Tversky Optimization on unpaired examples, mean over examples.

  With :math:`s = \log\pi(y\mid x) - \log\pi_\text{ref}(y\mid x)` and the reference point
  :math:`z_0`, the per-example loss is :math:`\lambda_D\,(1 - \sigma(\beta(s - z_0)))` for a
  desirable completion and :math:`\lambda_U\,(1 - \sigma(\beta(z_0 - s)))` for an undesirable one
  (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization"). The
  paper advises :math:`\lambda_D n_D / (\lambda_U n_U) \in [1, 4/3]` for :math:`n_D` desirable and
  :math:`n_U` undesirable examples.

  :math:`z_0` is an explicit input: ``kto_reference_point`` computes the paper's estimate from
  mismatched pairs; a running estimate or a constant works too. ``reference_point=0.0`` gives TRL's
  ``apo_zero_unpaired`` (D'Oosterlinck et al. 2024): :math:`1 - \sigma(\beta s)` and
  :math:`\sigma(\beta s)`.

  Args:
    logps: :math:`\log\pi(y\mid x)` summed over completion tokens, shape ``[*b]``.
    ref_logps: :math:`\log\pi_\text{ref}(y\mid x)`, same shape (treated as constant).
    desirable: boolean label, same shape; ``True`` for desirable (thumbs-up) completions.
    reference_point: :math:`z_0`, a scalar (no gradient is taken through it).
    beta: :math:`\beta > 0` (may be traced).
    desirable_weight: :math:`\lambda_D \ge 0`.
    undesirable_weight: :math:`\lambda_U \ge 0`.
    reduction: ``"mean"`` (a scalar loss) or ``"none"`` (the per-example losses ``[*b]``).

  Returns:
    ``(loss, metrics)``: the mean loss (``reduction="none"``: per example, ``[*b]``) and TRL's
    scalars ``kl`` (:math:`z_0`), ``rewards/chosen`` and ``logps/chosen`` (means of :math:`\beta s`
    and :math:`\log\pi` over desirable examples, 0 if there are none), ``rewards/rejected`` and
    ``logps/rejected`` (over undesirable ones) and ``rewards/margins`` (their difference).
  """
  _validate.choice("reduction", reduction, REDUCTIONS)
  _validate.positive("beta", beta)
  _validate.non_negative("desirable_weight", desirable_weight)
  _validate.non_negative("undesirable_weight", undesirable_weight)
  logps, ref_logps = jnp.asarray(logps), jnp.asarray(ref_logps)
  desirable = _validate.bool_mask("desirable", desirable)
  _validate.same_shape({"logps": logps, "ref_logps": ref_logps, "desirable": desirable})
  ref_logps = jax.lax.stop_gradient(ref_logps)  # the reference is frozen
  reference_point = jax.lax.stop_gradient(jnp.asarray(reference_point))
  if reference_point.ndim:
    raise ValueError(f"reference_point must be a scalar, got shape {list(reference_point.shape)}")

  rewards = beta * (logps - ref_logps)
  z = beta * (logps - ref_logps - reference_point)
  # 1 − σ(a) = σ(−a): the desirable branch is σ(−z), the undesirable one σ(z).
  losses = jnp.where(desirable, desirable_weight * jax.nn.sigmoid(-z),
                     undesirable_weight * jax.nn.sigmoid(z))
  chosen_reward = masked_mean(rewards, desirable)
  rejected_reward = masked_mean(rewards, ~desirable)
  stats = {
      "kl": reference_point,
      "rewards/chosen": chosen_reward,
      "rewards/rejected": rejected_reward,
      "rewards/margins": chosen_reward - rejected_reward,
      "logps/chosen": masked_mean(logps, desirable),
      "logps/rejected": masked_mean(logps, ~desirable),
  }
  return _reduce(losses, reduction), jax.tree.map(jax.lax.stop_gradient, stats)


def _log1mexp(x: Array) -> Array:
  r""":math:`\log(1 - e^x)` for :math:`x < 0`, accurate at both ends (Mächler 2012).

  ``x`` is capped at :math:`-\epsilon_\text{machine}`: an average log-prob of exactly 0 (probability
  1, or an empty completion) would otherwise give :math:`\log 0`.
  """
  x = jnp.minimum(x, -jnp.finfo(x.dtype).eps)
  return jnp.where(x > -jnp.log(2.0), jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


def _pair_arrays(chosen_logps, rejected_logps, chosen_lengths, rejected_lengths):
  # Lengths are per example: exactly the log-probs' shape (a [B, 1] against [B] is an error).
  arrays = {"chosen_logps": chosen_logps, "rejected_logps": rejected_logps,
            "chosen_lengths": chosen_lengths, "rejected_lengths": rejected_lengths}
  arrays = {k: jnp.asarray(v) for k, v in arrays.items()}
  _validate.same_shape(arrays)
  return tuple(arrays.values())


def orpo_loss(chosen_logps: Float[ArrayLike, "*b"], rejected_logps: Float[ArrayLike, "*b"], *,
              chosen_lengths: Real[ArrayLike, "*b"], rejected_lengths: Real[ArrayLike, "*b"],
              odds_ratio_weight: Scalar = 0.1,
              reduction: Reduction = "mean") -> tuple[Float[Array, "*r"], Metrics]:
  r"""ORPO: :math:`\mathcal{L}_\text{NLL}(y_c) - \lambda\log\sigma(\log[odds(y_c)/odds(y_r)])`.

  Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference Model",
  with :math:`\mathrm{odds}(y) = p/(1-p)` and :math:`\log p = \log\pi(y)/|y|`, the length-AVERAGED
  log-prob, so :math:`\log\mathrm{odds} = \log p - \log(1 - e^{\log p})`, computed with a stable
  ``log1mexp``. :math:`\mathcal{L}_\text{NLL}` is the mean over all chosen completion tokens of the
  batch, as the Hugging Face cross-entropy in the paper's code and TRL computes it (the mean of
  per-sequence means when lengths are equal). :math:`\lambda` is ``odds_ratio_weight`` (the
  paper's λ; TRL calls it ``beta``, but it weighs a loss term and is not DPO's implicit-reward
  scale, so alignax does not).

  Args:
    chosen_logps: :math:`\log\pi(y_c\mid x)` summed over completion tokens, shape ``[*b]``.
    rejected_logps: :math:`\log\pi(y_r\mid x)`, same shape.
    chosen_lengths: :math:`|y_c|`, same shape (keyword-only).
    rejected_lengths: :math:`|y_r|`, same shape (keyword-only).
    odds_ratio_weight: :math:`\lambda > 0` (0.1 in the paper's main runs and TRL's ``beta``; may be
      traced).
    reduction: ``"mean"`` or ``"none"`` (per pair: each pair's share of the token-mean NLL plus its
      odds-ratio term, shape ``[*b]``).

  Returns:
    ``(loss, metrics)`` with TRL's names: ``rewards/chosen`` / ``rewards/rejected``
    (:math:`\lambda\log p`), ``rewards/margins``, ``rewards/accuracies``, ``logps/chosen`` /
    ``logps/rejected`` (means of the averaged log-probs), ``nll_loss``, ``log_odds_ratio`` (mean
    :math:`\log\sigma(\log\mathrm{odds\ ratio})`) and ``log_odds_chosen`` (mean log odds ratio).
  """
  _validate.choice("reduction", reduction, REDUCTIONS)
  _validate.positive("odds_ratio_weight", odds_ratio_weight)
  chosen_logps, rejected_logps, chosen_lengths, rejected_lengths = _pair_arrays(
      chosen_logps, rejected_logps, chosen_lengths, rejected_lengths)
  chosen_avg = _length_normalised(chosen_logps, chosen_lengths)
  rejected_avg = _length_normalised(rejected_logps, rejected_lengths)
  log_odds = (chosen_avg - rejected_avg) - (_log1mexp(chosen_avg) - _log1mexp(rejected_avg))
  log_sigmoid_odds = jax.nn.log_sigmoid(log_odds)
  nll_share, nll = _chosen_nll(chosen_logps, chosen_lengths)
  losses = nll_share - odds_ratio_weight * log_sigmoid_odds
  metrics = _pair_statistics(odds_ratio_weight * chosen_avg, odds_ratio_weight * rejected_avg,
                             chosen_avg, rejected_avg)
  extra = {"nll_loss": nll, "log_odds_ratio": jnp.mean(log_sigmoid_odds),
           "log_odds_chosen": jnp.mean(log_odds)}
  metrics.update(jax.tree.map(jax.lax.stop_gradient, extra))
  return _reduce(losses, reduction), metrics


def simpo_loss(chosen_logps: Float[ArrayLike, "*b"], rejected_logps: Float[ArrayLike, "*b"], *,
               chosen_lengths: Real[ArrayLike, "*b"], rejected_lengths: Real[ArrayLike, "*b"],
               beta: Scalar = 2.0, gamma_beta_ratio: float = 0.25, label_smoothing: float = 0.0,
               loss_type: Literal["sigmoid", "hinge"] = "sigmoid",
               reduction: Reduction = "mean") -> tuple[Float[Array, "*r"], Metrics]:
  r"""SimPO: :math:`-\log\sigma(\beta\log\pi(y_c)/|y_c| - \beta\log\pi(y_r)/|y_r| - \gamma)`.

  Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward" (Eq. 6):
  the implicit reward is the length-normalised log-prob :math:`\frac{\beta}{|y|}\log\pi(y\mid x)`,
  with no reference model, and the target margin is :math:`\gamma = \beta\cdot` ``gamma_beta_ratio``
  (the paper's code parametrises it by the ratio; TRL's CPO trainer calls γ ``simpo_gamma``). With
  :math:`z` the argument of σ above, ``label_smoothing`` ε gives
  :math:`-(1-\varepsilon)\log\sigma(z) - \varepsilon\log\sigma(-z)` and ``loss_type="hinge"`` gives
  :math:`\max(0, 1 - z)`, as in the paper's code.

  Args:
    chosen_logps: :math:`\log\pi(y_c\mid x)` summed over completion tokens, shape ``[*b]``.
    rejected_logps: :math:`\log\pi(y_r\mid x)`, same shape.
    chosen_lengths: :math:`|y_c|`, same shape.
    rejected_lengths: :math:`|y_r|`, same shape.
    beta: :math:`\beta > 0` (the paper uses 2 to 10; may be traced). Default 2.0, the paper code's.
    gamma_beta_ratio: :math:`\gamma/\beta \ge 0`. Default 0.25, the paper code's (``SimPOConfig``),
      i.e. :math:`\gamma = 0.5` at :math:`\beta = 2`, TRL's ``simpo_gamma``; the paper's released
      training configs tune it per model.
    label_smoothing: ε in [0, 0.5] for ``sigmoid``; must be 0 for ``hinge``.
    loss_type: ``"sigmoid"`` or ``"hinge"``.
    reduction: ``"mean"`` or ``"none"`` (per-pair losses ``[*b]``).

  Returns:
    ``(loss, metrics)``: ``rewards/chosen`` / ``rewards/rejected`` (:math:`\beta\log\pi(y)/|y|`),
    ``rewards/margins``, ``rewards/accuracies``, ``logps/chosen`` / ``logps/rejected`` (means of the
    length-averaged log-probs, as the paper's code logs them).
  """
  _validate.choice("loss_type", loss_type, ("sigmoid", "hinge"))
  _validate.choice("reduction", reduction, REDUCTIONS)
  _validate.positive("beta", beta)
  _validate.non_negative("gamma_beta_ratio", gamma_beta_ratio)
  _check_dpo_label_smoothing((loss_type,), label_smoothing)
  chosen_logps, rejected_logps, chosen_lengths, rejected_lengths = _pair_arrays(
      chosen_logps, rejected_logps, chosen_lengths, rejected_lengths)
  chosen_avg = _length_normalised(chosen_logps, chosen_lengths)
  rejected_avg = _length_normalised(rejected_logps, rejected_lengths)
  z = beta * (chosen_avg - rejected_avg - gamma_beta_ratio)
  if loss_type == "sigmoid":
    losses = _smoothed_logistic(z, label_smoothing)
  else:
    losses = jax.nn.relu(1 - z)
  metrics = _pair_statistics(beta * chosen_avg, beta * rejected_avg, chosen_avg, rejected_avg)
  return _reduce(losses, reduction), metrics


def cpo_loss(chosen_logps: Float[ArrayLike, "*b"], rejected_logps: Float[ArrayLike, "*b"], *,
             chosen_lengths: Real[ArrayLike, "*b"], rejected_lengths: Real[ArrayLike, "*b"],
             beta: Scalar = 0.1, loss_type: DpoLossType | Sequence[DpoLossType] = "sigmoid",
             label_smoothing: float = 0.0, cpo_alpha: float = 1.0,
             reduction: Reduction = "mean") -> tuple[Float[Array, "*r"], Metrics]:
  r"""CPO: reference-free DPO plus :math:`\alpha\,\mathcal{L}_\text{NLL}(y_c)`.

  Xu et al. 2024, "Contrastive Preference Optimization: Pushing the Boundaries of LLM Performance in
  Machine Translation": :math:`-\log\sigma(\beta\log\pi(y_c) - \beta\log\pi(y_r)) -
  \alpha\log\pi(y_c)`. The preference term is ``dpo_loss`` with no reference model and the given
  ``loss_type`` (TRL's CPO offers ``sigmoid``, with cDPO ``label_smoothing``, ``hinge`` and ``ipo``;
  ``ipo`` length-normalises, as there). :math:`\mathcal{L}_\text{NLL}` is the mean over all chosen
  completion tokens of the batch (the Hugging Face cross-entropy TRL uses). For SimPO's loss with an
  NLL term, use ``simpo_loss`` plus ``alignax.sft_loss``.

  Args:
    chosen_logps: :math:`\log\pi(y_c\mid x)` summed over completion tokens, shape ``[*b]``.
    rejected_logps: :math:`\log\pi(y_r\mid x)`, same shape.
    chosen_lengths: :math:`|y_c|`, same shape.
    rejected_lengths: :math:`|y_r|`, same shape.
    beta: :math:`\beta > 0` (may be traced).
    loss_type: as in ``dpo_loss``.
    label_smoothing: as in ``dpo_loss``.
    cpo_alpha: :math:`\alpha \ge 0`, the weight of the NLL term (TRL default 1).
    reduction: ``"mean"`` or ``"none"`` (per pair, ``[*b]``, including each pair's share of
      :math:`\alpha\,\mathcal{L}_\text{NLL}`).

  Returns:
    ``(loss, metrics)``: ``dpo_loss``'s metrics (rewards are :math:`\beta\log\pi(y)`) and
    ``nll_loss``.
  """
  _validate.non_negative("cpo_alpha", cpo_alpha)
  _validate.choice("reduction", reduction, REDUCTIONS)
  chosen_logps, rejected_logps, chosen_lengths, rejected_lengths = _pair_arrays(
      chosen_logps, rejected_logps, chosen_lengths, rejected_lengths)
  loss_types = (loss_type,) if isinstance(loss_type, str) else tuple(loss_type)
  lengths = {}
  if any(t in _MAY_USE_LENGTHS for t in loss_types):
    lengths = {"chosen_lengths": chosen_lengths, "rejected_lengths": rejected_lengths}
  pair_losses, metrics = dpo_loss(chosen_logps, rejected_logps, None, None, beta=beta,
                                  loss_type=loss_types, label_smoothing=label_smoothing,
                                  reduction="none", **lengths)
  nll_share, nll = _chosen_nll(chosen_logps, chosen_lengths)
  losses = pair_losses + cpo_alpha * nll_share
  return _reduce(losses, reduction), {**metrics, "nll_loss": jax.lax.stop_gradient(nll)}
