r"""Advantage estimators: GAE for critics, group baselines for GRPO-style methods, REINFORCE++.

Batch whitening of advantages is ``alignax.masked_whiten`` (its ``mask`` may be ``None``).

Per-token quantities are ``[*b, T]`` with a boolean ``mask`` (time is the last axis); group
quantities are ``[*p, G]`` with the group (completions of one prompt) last, so that sharding the
prompt axis keeps every group's statistics on one device.
"""

from typing import Literal, get_args

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Bool, Float, Int

from alignax import _validate
from alignax.aggregation import last_valid_token, masked_whiten

GroupScale = Literal["group", "batch", "none"]
GROUP_SCALES: tuple[str, ...] = get_args(GroupScale)


def gae(rewards: Float[ArrayLike, "*b T"], values: Float[ArrayLike, "*b T"],
        mask: Bool[ArrayLike, "*b T"], *, gamma: float, lambda_: float,
        bootstrap_value: Float[ArrayLike, "*b"] | None = None
        ) -> tuple[Float[Array, "*b T"], Float[Array, "*b T"]]:
  r"""Generalised advantage estimation (Schulman et al. 2016, "High-Dimensional Continuous Control
  Using Generalized Advantage Estimation", Eq. 16).

  .. math:: \delta_t = r_t + \gamma V_{t'} - V_t, \qquad A_t = \delta_t + \gamma\lambda A_{t'},
            \qquad R_t = A_t + V_t,

  where :math:`t'` is the next *valid* token after :math:`t`. Past the last valid token
  :math:`V = ` ``bootstrap_value`` (0 by default: the episode ended) and :math:`A = 0`. Masked
  positions are skipped (they neither pay rewards nor pass values), so a mask with holes, such as
  tool-output tokens in a multi-turn rollout, chains the valid tokens across the hole as verl does.
  Computed by a reverse ``lax.scan`` over time.

  Args:
    rewards: per-token rewards ``[*b, T]`` (e.g. from ``kl_penalized_rewards``).
    values: critic values :math:`V_t` ``[*b, T]``.
    mask: boolean ``[*b, T]``, ``True`` on generated tokens.
    gamma: discount :math:`\gamma \in [0, 1]` (1.0 in TRL / the N+ details).
    lambda_: GAE :math:`\lambda \in [0, 1]` (0.95 in TRL, 1.0 in verl / OpenRLHF).
    bootstrap_value: value after the last valid token, ``[*b]``, for truncated rollouts.

  Returns:
    ``(advantages, returns)``, each ``[*b, T]`` and 0 on masked positions.
  """
  _validate.in_unit_interval("gamma", gamma, closed_right=True)
  _validate.in_unit_interval("lambda_", lambda_, closed_right=True)
  rewards, values, mask = jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(mask)
  _validate.min_rank("rewards", rewards, 1, "[*b, T]")
  _validate.bool_mask("mask", mask)
  _validate.same_shape({"rewards": rewards, "values": values, "mask": mask})
  dtype = jnp.result_type(rewards, values)
  if bootstrap_value is None:
    bootstrap_value = jnp.zeros(mask.shape[:-1], dtype)
  bootstrap_value = jnp.asarray(bootstrap_value, dtype)
  if bootstrap_value.shape != mask.shape[:-1]:
    raise ValueError(f"bootstrap_value must have shape {list(mask.shape[:-1])}, "
                     f"got {list(bootstrap_value.shape)}")

  def step(carry, xs):
    next_value, next_advantage = carry
    reward, value, valid = xs
    advantage = reward + gamma * next_value - value + gamma * lambda_ * next_advantage
    carry = (jnp.where(valid, value, next_value), jnp.where(valid, advantage, next_advantage))
    return carry, jnp.where(valid, advantage, 0.0)

  time_major = [jnp.moveaxis(x, -1, 0) for x in (rewards.astype(dtype), values.astype(dtype), mask)]
  init = (bootstrap_value, jnp.zeros_like(bootstrap_value))
  _, advantages = jax.lax.scan(step, init, time_major, reverse=True)
  advantages = jnp.moveaxis(advantages, 0, -1)
  returns = jnp.where(mask, advantages + values, 0.0)
  return advantages, returns


def _std(x: Array, *, axis: int | None, ddof: int) -> Array:
  """Standard deviation with ``max(1, n - ddof)`` degrees of freedom and a finite gradient at 0."""
  mean = jnp.mean(x, axis=axis, keepdims=True)
  n = x.size if axis is None else x.shape[axis]
  var = jnp.sum(jnp.square(x - mean), axis=axis, keepdims=True) / max(n - ddof, 1)
  positive = var > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, var, 1.0)), 0.0)


def group_advantages(rewards: Float[ArrayLike, "*p G"], *, scale: GroupScale = "group",
                     leave_one_out: bool = False, ddof: int = 1,
                     eps: float = 1e-6) -> Float[Array, "*p G"]:
  r"""Sequence-level advantages from a group of completions per prompt: :math:`A_i = (R_i - b_i)/s`.

  Baseline :math:`b_i`: the group mean :math:`\bar R` (GRPO, Shao et al. 2024, Sec. 4.1.2), or with
  ``leave_one_out`` the mean of the *other* completions, :math:`(\sum_j R_j - R_i)/(G-1)` (RLOO,
  Ahmadian et al. 2024, "Back to Basics"). Scale :math:`s`:

  * ``"group"``: the group's reward std + ``eps`` (GRPO; TRL ``scale_rewards="group"``, verl
    ``norm_adv_by_std_in_grpo``);
  * ``"batch"``: the std of the rewards :math:`R` over the whole batch + ``eps``: group mean, batch
    std, TRL's ``scale_rewards="batch"`` (the "Lite PPO" normalisation of Liu et al. 2025, "Tricks
    or Traps? A Deep Dive into RL for LLM Reasoning"). This is not REINFORCE++-baseline, which
    whitens the group-centred scores over every token of the batch:
    ``reinforce_pp_advantages(group_advantages(scores, scale="none"), mask)``;
  * ``"none"``: 1 (Dr. GRPO, Liu et al. 2025, which drops the std to remove the difficulty bias;
    RLOO).

  Each group's advantages sum to 0. A group whose rewards are all equal gets 0 (see
  ``informative_group_mask``). The eps differs between peers: TRL 1e-4, verl 1e-6, OpenRLHF 1e-9.

  Args:
    rewards: ``[*p, G]``, one scalar reward per completion; the group is the last axis.
    scale: ``"group"``, ``"batch"`` or ``"none"``.
    leave_one_out: use the leave-one-out baseline (needs ``G >= 2``).
    ddof: delta degrees of freedom of the std (1: Bessel, as ``torch.std`` in TRL and verl).
    eps: added to the std, ``> 0``.

  Returns:
    Advantages ``[*p, G]``; broadcast over tokens with ``advantages[..., None]``.
  """
  _validate.choice("scale", scale, GROUP_SCALES)
  _validate.non_negative("ddof", ddof)
  _validate.positive("eps", eps)
  rewards = jnp.asarray(rewards)
  _validate.min_rank("rewards", rewards, 1, "[*p, G]")
  group = rewards.shape[-1]
  if leave_one_out and group < 2:
    raise ValueError(f"leave_one_out needs a group size G >= 2, got rewards of shape "
                     f"{list(rewards.shape)}")
  if leave_one_out:
    others = (jnp.sum(rewards, axis=-1, keepdims=True) - rewards) / (group - 1)
    centred = rewards - others
  else:
    centred = rewards - jnp.mean(rewards, axis=-1, keepdims=True)
  if scale == "none":
    return centred
  if scale == "group":
    std = _std(rewards, axis=-1, ddof=ddof)
  else:
    std = _std(rewards, axis=None, ddof=ddof)
  return centred / (std + eps)


def informative_group_mask(rewards: Float[ArrayLike, "*p G"]) -> Bool[Array, "*p"]:
  r"""``True`` for groups whose rewards are not all equal (DAPO dynamic sampling, Yu et al. 2025,
  Eq. 11: keep prompts with :math:`0 < |\{o_i : \text{correct}\}| < G`).

  A group with equal rewards has zero group-relative advantage and gives no gradient. Static shapes:
  the mask is used to weight, or to pick a fixed number of groups, rather than to filter.

  Args:
    rewards: ``[*p, G]``.

  Returns:
    Boolean ``[*p]``.
  """
  rewards = jnp.asarray(rewards)
  _validate.min_rank("rewards", rewards, 1, "[*p, G]")
  return jnp.any(rewards != rewards[..., :1], axis=-1)


def select_informative_groups(rewards: Float[ArrayLike, "P G"], *, k: int) -> Int[Array, "k"]:
  r"""Indices of ``k`` groups, informative first: DAPO's dynamic sampling with static shapes.

  DAPO (Yu et al. 2025, Sec. 3.2, Eq. 11) over-samples prompts and keeps only groups with
  :math:`0 < |\{o_i : \text{correct}\}| < G` (``informative_group_mask``) until the batch is full.
  Under ``jit`` the batch size is fixed, so sample :math:`P > k` prompts and gather the ``k``
  groups this returns (``rewards[idx]``, ``tokens[idx]``, ...): the informative groups in their
  original order (the order DAPO fills its buffer in), then, if fewer than ``k`` are informative,
  uninformative ones in order. Those padding groups have zero group-relative advantage and give no
  policy gradient; to keep them out of a token-mean normaliser too, mask them with
  ``informative_group_mask(rewards)[idx]``.

  Args:
    rewards: ``[P, G]``, one scalar reward per completion, a group of ``G`` per prompt.
    k: number of groups to keep, a Python int with ``1 <= k <= P``.

  Returns:
    ``int32`` indices ``[k]`` into the prompt axis.
  """
  if isinstance(k, bool) or not isinstance(k, int):
    raise TypeError(f"k must be a Python int (a static batch size), got {k!r}")
  rewards = jnp.asarray(rewards)
  if rewards.ndim != 2:
    raise ValueError(f"rewards must have shape [P, G], got {list(rewards.shape)}")
  if not 1 <= k <= rewards.shape[0]:
    raise ValueError(f"k must lie in [1, P] = [1, {rewards.shape[0]}], got {k}")
  # A stable sort on "uninformative" keeps the original order within each of the two classes.
  uninformative = jnp.where(informative_group_mask(rewards), 0, 1)
  return jnp.argsort(uninformative, stable=True)[:k].astype(jnp.int32)


def reinforce_pp_advantages(rewards: Float[ArrayLike, "..."],
                            mask: Bool[ArrayLike, "*b T"], *, gamma: float = 1.0,
                            whiten_advantages: bool = True,
                            eps: float = 1e-8) -> Float[Array, "*b T"]:
  r"""REINFORCE++ advantages (Hu 2025, "REINFORCE++: A Simple and Efficient Approach for Aligning
  Large Language Models"): discounted returns, then whitening over the whole batch.

  .. math:: G_t = \sum_{s \ge t} \gamma^{s-t} r_s, \qquad A_t = (G_t - \mu_G)/\sigma_G,

  with the sums over valid tokens and :math:`\mu, \sigma` over every valid token of the batch. The
  per-token rewards carry the KL penalty: build them with ``kl_penalized_rewards`` (score on the
  last token, :math:`-\beta\,\mathrm{KL}_t` on every token). Given sequence scores ``[*b]`` instead,
  each is placed on its row's last valid token. Masked positions give 0. :math:`G_t` is GAE with
  :math:`V = 0, \lambda = 1`, and is computed that way.

  REINFORCE++-baseline (same paper; verl ``reinforce_plus_plus_baseline``, OpenRLHF
  ``reinforce_baseline``) is this function on group-centred scores: subtract each prompt's group
  mean, broadcast over the tokens, then whiten globally,
  ``reinforce_pp_advantages(group_advantages(scores, scale="none"), mask)`` (with ``[P, G]`` scores
  and a ``[P, G, T]`` mask). ``group_advantages(scale="batch")`` is a different recipe (TRL's
  batch-std scaling, without the token-level whitening).

  Args:
    rewards: per-token rewards ``[*b, T]`` or sequence scores ``[*b]``.
    mask: boolean ``[*b, T]``.
    gamma: discount in ``[0, 1]``.
    whiten_advantages: whiten (mean shift and scale) over the batch; ``False`` returns :math:`G_t`.
    eps: whitening variance epsilon.

  Returns:
    Advantages ``[*b, T]``.
  """
  rewards = jnp.asarray(rewards)
  mask = _validate.bool_mask("mask", mask)
  _validate.min_rank("mask", mask, 1, "[*b, T]")
  if rewards.shape == mask.shape[:-1]:
    rewards = jnp.where(last_valid_token(mask), rewards[..., None], 0.0)
  elif rewards.shape != mask.shape:
    raise ValueError(f"rewards must have shape {list(mask.shape)} (per token) or "
                     f"{list(mask.shape[:-1])} (per sequence), got {list(rewards.shape)}")
  returns, _ = gae(rewards, jnp.zeros_like(rewards), mask, gamma=gamma, lambda_=1.0)
  if not whiten_advantages:
    return returns
  return masked_whiten(returns, mask, eps=eps)
