"""Pairwise reward-model loss (Bradley-Terry)."""

from typing import Literal

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float

from alignax import _validate


def bradley_terry_loss(chosen_scores: Float[ArrayLike, "*b"],
                       rejected_scores: Float[ArrayLike, "*b"], *,
                       margin: float | Float[ArrayLike, "..."] | None = None,
                       center_coefficient: float = 0.0,
                       reduction: Literal["mean", "none"] = "mean"
                       ) -> tuple[Float[Array, "*r"], dict[str, Float[Array, ""]]]:
  r"""Bradley-Terry loss :math:`-\log\sigma(r_c - r_r - m) + c\,(r_c + r_r)^2`, mean over pairs.

  :math:`r_c, r_r` are the scalar rewards of the chosen and rejected completions. The preference
  model :math:`P(y_c \succ y_r) = \sigma(r_c - r_r)` is Bradley & Terry (1952) as used for RLHF
  reward models by Ouyang et al. 2022 (InstructGPT, Eq. 1). The margin :math:`m` is Llama 2's
  (Touvron et al. 2023, Eq. 2): a per-pair offset from the preference-strength rating, so clearly
  better answers must win by more. The centring term with coefficient :math:`c` is TRL's
  ``center_rewards_coefficient`` (Eisenstein et al. 2023, "Helping or Herding?"): it pulls the mean
  reward towards 0, which the pairwise loss alone leaves free.

  Args:
    chosen_scores: rewards of the preferred completions, shape ``[*b]``.
    rejected_scores: rewards of the dispreferred completions, same shape.
    margin: :math:`m`, a number (or 0-d array) for every pair, or one per pair with exactly the
      scores' shape ``[*b]`` (nothing else is broadcast: a ``[B, 1]`` margin against ``[B]``
      scores is an error, not a ``[B, B]`` loss); ``None`` means 0.
    center_coefficient: :math:`c \ge 0` (TRL recommends 0.01 when used).
    reduction: ``"mean"`` (scalar) or ``"none"`` (the per-pair losses ``[*b]``, centring term
      included, with their gradients).

  Returns:
    ``(loss, metrics)`` with TRL's scalar metric names: ``accuracy`` (fraction of pairs with
    :math:`r_c > r_r`), ``margin`` (mean :math:`r_c - r_r`), ``min_reward`` / ``mean_reward`` /
    ``max_reward`` over both completions.
  """
  _validate.non_negative("center_coefficient", center_coefficient)
  _validate.choice("reduction", reduction, ("mean", "none"))
  chosen_scores = jnp.asarray(chosen_scores)
  rejected_scores = jnp.asarray(rejected_scores)
  shape = _validate.same_shape({"chosen_scores": chosen_scores, "rejected_scores": rejected_scores})
  diff = chosen_scores - rejected_scores
  if margin is not None:
    diff = diff - _validate.scalar_or_shape("margin", margin, shape, "the scores")
  losses = -jax.nn.log_sigmoid(diff)
  if center_coefficient:
    losses = losses + center_coefficient * jnp.square(chosen_scores + rejected_scores)
  both = jnp.stack([chosen_scores, rejected_scores])
  stats = {
      "accuracy": jnp.mean(chosen_scores > rejected_scores, dtype=jnp.float32),
      "margin": jnp.mean(chosen_scores - rejected_scores),
      "min_reward": jnp.min(both),
      "mean_reward": jnp.mean(both),
      "max_reward": jnp.max(both),
  }
  metrics = jax.tree.map(jax.lax.stop_gradient, stats)
  return (losses if reduction == "none" else jnp.mean(losses)), metrics
