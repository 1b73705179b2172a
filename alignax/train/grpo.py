r"""GRPO and its family as an online trainer: sample a group of completions per prompt, score
them, turn the scores into advantages, then take ``num_iterations`` policy updates on that
generation batch.

Each round (Shao et al. 2024, "DeepSeekMath", Alg. 1):

1. ``P`` prompts from the data (``task="prompt"``), ``G = num_generations`` completions each from
   :func:`alignax.sampling.generate` with the current policy (rows ``p·G + g``);
2. rewards from :class:`alignax.rewards.RewardRunner` (TRL's reward-function contract, reward
   models, weights), ``[P, G]``; a completion every source returned None for is unscorable (NaN,
   as in TRL); with ``dynamic_sampling`` more prompts are drawn and the groups whose rewards all
   agree are dropped (DAPO, :func:`alignax.select_informative_groups`), refilled to a static ``P``;
3. advantages (:func:`_advantages`): the group baseline (``grpo``), the leave-one-out one
   (``rloo``) or REINFORCE++-baseline's whitening (``reinforce_pp``), with the scaling each
   estimator's recipe uses unless ``scale_rewards`` says otherwise; unscorable completions are
   left out of every statistic and get advantage 0;
4. the behaviour policy's log-probs recomputed by the training forward over the training's
   micro-batches (``old_logp``, stored), the sampler's own log-probs compared with them
   (``sampling/sampling_logp_difference/{mean,max}``) and, optionally, a truncated importance
   weight over that difference; the reference's log-probs when ``beta > 0`` (with ``beta == 0``
   no reference exists and none is evaluated). Both sides use
   ``softmax(logits / temperature)``; with ``top_k`` / ``top_p`` / ``min_p`` the sampler's
   log-probs are under the filtered, renormalised distribution and the difference shows it;
5. ``num_iterations`` optimizer steps of :func:`grpo_objective` (:func:`alignax.grpo_loss` with the
   ``loss_type``'s aggregation) through the engine's exact-accumulation step; a round with nothing
   to learn from (no loss token, or every advantage 0 with no KL or entropy term) skips them
   rather than step AdamW with a zero gradient (``skipped_updates``).

The rounds run in :func:`alignax.train.online.run_rounds`, the loop PPO shares: an optimizer step
is one update; a round spans ``num_iterations`` of them, and checkpoints are taken at round
boundaries only, so a resumed run regenerates nothing and, with the sampler's key derived from the
checkpointed RNG and the round index, replays the same trajectory.
With ``eval_num_prompts > 0`` the loop also runs :func:`alignax.evaluation.trainer_generation_eval`
every ``eval_steps`` against the starting policy (``eval/reward``, ``eval/win_rate``, ``eval/kl``,
``eval/tax``).

Multi-host, each host draws its block of the prompts and the whole batch is sampled on the global
mesh; a host's reward functions score only its own prompts' groups (rows ``p·G + g`` of its
prompts), and the rewards, texts and reward metrics are gathered (:func:`_gather_scores`), so the
advantages, batch statistics (``reward_std``, ``scale_rewards="batch"``, REINFORCE++'s whitening,
dynamic sampling's selection), logged means, ``num_tokens`` and skipped-update decisions are those
of one host running the same global batch; the stored log-probs are global arrays.
"""

import dataclasses
import functools
import logging
import math
import time
import types
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from alignax import _validate
from alignax.aggregation import masked_count
from alignax.kl import KL_ESTIMATORS
from alignax.train.config import TrainingConfig
from alignax.train.optim import OptimizerOptions
from alignax.train.online import (IMPORTANCE_SAMPLING_MODES, Round, as_text, check_prompt_budget,
                                  completion_logprobs, fetch, gather_objects, gather_rows,
                                  importance_metrics, importance_weights, micro_batched_logprobs,
                                  place_micro_batches, prompt_dataset, run_rounds,
                                  to_token_positions)
from alignax.train.step import Objective, TrainState

logger = logging.getLogger("alignax.train")

# TRL's GRPOConfig.loss_type values (alignax has no vLLM, so no sapo/vespo/luspo here).
GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "gspo", "cispo")
SCALE_REWARDS = ("group", "batch", "none")
ADVANTAGE_ESTIMATORS = ("grpo", "rloo", "reinforce_pp")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
REWARD_ON_TIMEOUT = ("error", "none")
# TRL's std epsilon of the group normalisation (verl uses 1e-6, OpenRLHF 1e-9).
REWARD_STD_EPS = 1e-4
# CISPO's IS-weight cap when epsilon_high is unset (ScaleRL's recommendation, TRL's default).
CISPO_DEFAULT_CAP = 5.0
# The clip range (epsilon, epsilon_high) when unset, by ratio level: PPO/GRPO's 0.2 for a token
# ratio; for GSPO's sequence ratio, a geometric mean of token ratios that stays within about 1e-3
# of 1, the GSPO paper's (Zheng et al. 2025, Sec. 5.1) and TRL's GSPO recipe's 3e-4 / 4e-4.
DEFAULT_CLIP = {"token": (0.2, None), "sequence": (3e-4, 4e-4)}
# The reward scaling of each advantage estimator when scale_rewards is unset (see GRPOConfig).
DEFAULT_SCALE = {"grpo": "group", "rloo": "none", "reinforce_pp": "batch"}
# The loss types whose aggregation sums a sequence's tokens (so weights it by its length).
_TOKEN_AGGREGATED = ("dapo", "bnpo", "cispo", "dr_grpo")


class GRPOOptionsWarning(UserWarning):
  """A combination of GRPO options that runs but mixes levels (sequence vs token) incoherently."""


@dataclasses.dataclass
class GRPOConfig(TrainingConfig):
  """Group relative policy optimisation (TRL's ``GRPOConfig`` names and current defaults).

  Batch sizes count completions: one optimizer step sees ``per_device_train_batch_size ×
  (data × fsdp devices) × gradient_accumulation_steps`` completions, ``1/num_generations`` as many
  prompts. ``max_steps`` counts optimizer steps, ``num_iterations`` per generation batch.

  Attributes:
    num_generations: ``G``, completions per prompt (>= 2; TRL: 8).
    max_completion_length: ``M``, the most tokens sampled per completion (TRL: 512).
    temperature: sampling temperature; the training forward divides its logits by it too (TRL).
    top_p: nucleus filter (1.0: off).
    top_k: top-k filter (0: off).
    min_p: min-p filter (None: off).
    stop_token_ids: ids that end a completion (None: every EOS id of the checkpoint's
      ``generation_config.json`` and ``config.json``, as ``transformers``; for a model instance,
      its config's ``eos_token_id``).
    beta: KL coefficient; 0 (TRL's default) builds and evaluates no reference model.
    kl_estimator: the in-loss KL estimator (``k3``, GRPO's; ``k1``, ``k2``, ``abs``); ``k1``
      with ``beta > 0`` warns (its expected gradient is 0, so it does not regularise).
    loss_type: ``dapo`` (token mean over the batch, TRL's default) | ``grpo`` (mean over sequences
      of token means) | ``bnpo`` (token mean; equal to ``dapo`` under exact accumulation) |
      ``dr_grpo`` (token sums over ``max_completion_length``) | ``gspo`` (sequence-level ratio,
      ``grpo``'s aggregation) | ``cispo`` (capped IS weight, token mean).
    importance_sampling_level: ``token`` or ``sequence`` (GSPO's ratio, the geometric mean of a
      completion's token ratios); None: ``sequence`` for ``loss_type="gspo"``, else ``token``.
      A sequence ratio with a token-summing loss type (``dapo``, ``bnpo``, ``cispo``,
      ``dr_grpo``) weights each completion's term by its length and warns (GSPO averages per
      sequence: ``loss_type="grpo"`` or ``"gspo"``).
    scale_rewards: what the advantages divide by (TRL's legacy ``True``/``"true"`` mean
      ``group``, ``False``/``"false"`` ``none``): ``group`` (the group's reward std, GRPO) |
      ``batch`` (the batch's: GRPO's group mean with the batch std, TRL's ``batch``; RLOO's
      advantages z-scored over the batch, TRL's RLOO ``normalize_advantages``; REINFORCE++'s
      whitening over the batch's tokens) | ``none`` (Dr. GRPO; RLOO as in its paper). None: the
      estimator's own, ``group`` for ``grpo``, ``none`` for ``rloo``, ``batch`` for
      ``reinforce_pp`` (which allows nothing else: its recipe is the global whitening).
    advantage_estimator: ``grpo`` (group mean baseline) | ``rloo`` (leave-one-out baseline) |
      ``reinforce_pp`` (REINFORCE++-baseline: group-centred, whitened over the batch's tokens).
      Under ``grpo`` and ``rloo`` a group whose rewards all agree has advantage 0 (no gradient
      from it); under ``reinforce_pp`` the whitening subtracts the batch's token-weighted mean,
      which is not 0 when completions differ in length, so such a group gets a uniform nonzero
      advantage (the same for each of its tokens) and still moves the policy.
    epsilon: lower clip of the ratio; None: 0.2 for a token ratio (TRL), 3e-4 for a sequence ratio
      (GSPO's, whose ratio is a per-token geometric mean and moves far less).
    epsilon_high: upper clip; None: ``epsilon`` when that is set, else 0.2 for a token ratio and
      4e-4 for a sequence ratio (DAPO's clip-higher: 0.28); for ``cispo`` the absolute cap of the
      IS weight (None: 5.0, the layer-1 default; TRL falls back to ``epsilon``).
    num_iterations: updates per generation batch (TRL's μ), each against the stored old log-probs.
    mask_truncated_completions: completions that hit ``max_completion_length`` without a stop token
      leave the loss (DAPO's overlong filtering).
    reward_funcs: ``--reward_funcs``: built-in names or dotted ``module.function`` paths (the Python
      API also takes callables, see :func:`grpo`).
    reward_weights: one weight per reward source (functions first, then reward models).
    reward_model_name_or_path: reward models (alignax or HF ``*ForSequenceClassification``).
    reward_timeout: seconds per reward-function call (None: no limit).
    reward_on_timeout: ``error`` (a call that overruns ``reward_timeout`` stops the run) or
      ``none`` (it scores None for the whole call, counted in ``rewards/{name}/timeouts``).
    soft_punish_cache: the ramp length in tokens of the ``soft_overlong_punishment`` reward
      function (TRL's name; DAPO's overlong buffer), whose budget is ``max_completion_length``.
    dynamic_sampling: DAPO's dynamic sampling: generate for ``dynamic_sampling_oversample`` times
      the prompts and keep the groups whose rewards differ first.
    dynamic_sampling_oversample: the over-sampling factor (>= 2).
    importance_sampling_correction: multiply the policy term by the truncated (or masked) ratio of
      the training forward's to the sampler's probability of each token (TRL's
      ``vllm_importance_sampling_correction``; the sampler here is alignax's own: off by default).
    importance_sampling_mode: ``token_truncate`` | ``token_mask`` | ``sequence_truncate`` |
      ``sequence_mask`` (sequence: the sum of the token log-ratios).
    importance_sampling_cap: the ratio's upper bound (TRL's ``vllm_importance_sampling_cap``).
    entropy_coef: entropy bonus coefficient; the bonus is the mean entropy per completion token of
      the whole generation batch for every ``loss_type`` (TRL), not rescaled by the loss's
      aggregation.
    log_completions: write completions with their rewards to ``output_dir/completions/`` every
      ``logging_steps``.
  """

  learning_rate: float = 1e-6
  per_device_train_batch_size: int = 8
  num_generations: int = 8
  max_completion_length: int = 512
  temperature: float = 1.0
  top_p: float = 1.0
  top_k: int = 0
  min_p: float | None = None
  stop_token_ids: list[int] | None = None
  beta: float = 0.0
  kl_estimator: str = dataclasses.field(default="k3", metadata={"choices": KL_ESTIMATORS})
  loss_type: str = dataclasses.field(default="dapo", metadata={"choices": GRPO_LOSS_TYPES})
  importance_sampling_level: str | None = dataclasses.field(
    default=None, metadata={"choices": IMPORTANCE_SAMPLING_LEVELS})
  # "true"/"false": TRL's legacy spelling, mapped in __post_init__.
  scale_rewards: str | None = dataclasses.field(
    default=None, metadata={"choices": (*SCALE_REWARDS, "true", "false")})
  advantage_estimator: str = dataclasses.field(default="grpo",
                                               metadata={"choices": ADVANTAGE_ESTIMATORS})
  epsilon: float | None = None
  epsilon_high: float | None = None
  num_iterations: int = 1
  mask_truncated_completions: bool = False
  reward_funcs: list[str] | None = None
  reward_weights: list[float] | None = None
  reward_model_name_or_path: list[str] | None = None
  reward_timeout: float | None = None
  reward_on_timeout: str = dataclasses.field(default="error",
                                             metadata={"choices": REWARD_ON_TIMEOUT})
  soft_punish_cache: int | None = None
  dynamic_sampling: bool = False
  dynamic_sampling_oversample: int = 2
  importance_sampling_correction: bool = False
  importance_sampling_mode: str = dataclasses.field(default="token_truncate",
                                                    metadata={"choices": IMPORTANCE_SAMPLING_MODES})
  importance_sampling_cap: float = 3.0
  entropy_coef: float = 0.0
  log_completions: bool = True

  def __post_init__(self):
    super().__post_init__()
    if isinstance(self.num_generations, bool) or not isinstance(self.num_generations, int) or \
        self.num_generations < 2:
      raise ValueError(f"num_generations must be an int >= 2 (a group needs two completions to "
                       f"have a relative advantage), got {self.num_generations!r}")
    if self.per_device_train_batch_size % self.num_generations:
      raise ValueError(
        f"per_device_train_batch_size={self.per_device_train_batch_size} (completions) is not "
        f"divisible by num_generations={self.num_generations}: each device's rows must hold whole "
        "groups of completions")
    for name in ("max_completion_length", "num_iterations", "dynamic_sampling_oversample"):
      _validate.positive_int(name, getattr(self, name))
    if self.dynamic_sampling and self.dynamic_sampling_oversample < 2:
      raise ValueError(f"dynamic_sampling needs dynamic_sampling_oversample >= 2 (prompts drawn "
                       f"per prompt kept), got {self.dynamic_sampling_oversample}")
    if self.max_steps != -1 and self.max_steps % self.num_iterations:
      raise ValueError(f"max_steps={self.max_steps} must be a multiple of num_iterations="
                       f"{self.num_iterations} (each generation batch gets all its updates)")
    _validate.positive("temperature", self.temperature)
    if not 0 < self.top_p <= 1:
      raise ValueError(f"top_p must lie in (0, 1], got {self.top_p!r}")
    if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
      raise ValueError(f"top_k must be an int >= 0 (0: off), got {self.top_k!r}")
    if self.min_p is not None and not 0 <= self.min_p <= 1:
      raise ValueError(f"min_p must lie in [0, 1], got {self.min_p!r}")
    _validate.non_negative("beta", self.beta)
    _validate.non_negative("entropy_coef", self.entropy_coef)
    _validate.in_unit_interval("epsilon", self.epsilon)
    _validate.non_negative("epsilon_high", self.epsilon_high)
    _validate.positive("importance_sampling_cap", self.importance_sampling_cap)
    if self.reward_timeout is not None:
      _validate.positive("reward_timeout", self.reward_timeout)
    if self.soft_punish_cache is not None and (
        isinstance(self.soft_punish_cache, bool) or not isinstance(self.soft_punish_cache, int)
        or not 0 <= self.soft_punish_cache <= self.max_completion_length):
      raise ValueError(f"soft_punish_cache must be an int in [0, max_completion_length="
                       f"{self.max_completion_length}], got {self.soft_punish_cache!r}")
    # TRL's legacy boolean spelling (its GRPOConfig maps True/False the same way).
    legacy = {True: "group", False: "none", "true": "group", "false": "none"}
    key = self.scale_rewards.lower() if isinstance(self.scale_rewards, str) else self.scale_rewards
    if isinstance(key, (bool, str)) and key in legacy:
      self.scale_rewards = legacy[key]
    for name, choices in (("kl_estimator", KL_ESTIMATORS), ("loss_type", GRPO_LOSS_TYPES),
                          ("advantage_estimator", ADVANTAGE_ESTIMATORS),
                          ("importance_sampling_mode", IMPORTANCE_SAMPLING_MODES),
                          ("reward_on_timeout", REWARD_ON_TIMEOUT)):
      _validate.choice(name, getattr(self, name), choices)
    for name, choices in (("importance_sampling_level", IMPORTANCE_SAMPLING_LEVELS),
                          ("scale_rewards", SCALE_REWARDS)):
      if getattr(self, name) is not None:
        _validate.choice(name, getattr(self, name), choices)
    if self.loss_type == "gspo" and self.importance_sampling_level == "token":
      raise ValueError("loss_type='gspo' is the sequence-level ratio; importance_sampling_level="
                       "'token' contradicts it (use loss_type='grpo' for token ratios)")
    if self.advantage_estimator == "reinforce_pp" and self.scale_rewards not in (None, "batch"):
      raise ValueError(
        f"advantage_estimator='reinforce_pp' whitens the group-centred rewards over the batch's "
        f"tokens (scale_rewards='batch', its only scaling); scale_rewards={self.scale_rewards!r} "
        "has no REINFORCE++ meaning (for group-centred advantages without whitening use "
        "advantage_estimator='grpo', scale_rewards='none')")
    self._warn_incoherent_levels()
    if self.beta > 0 and self.kl_estimator == "k1":
      warnings.warn(GRPOOptionsWarning(
        "kl_estimator='k1' in the loss (beta > 0) has zero expected gradient under on-policy "
        "samples (E[grad log pi] = 0), so the KL term does not pull towards the reference; use "
        "'k3' (GRPO's) or 'k2' (Zhang et al. 2025, 'On the Design of KL-Regularized Policy "
        "Gradient Algorithms')"), stacklevel=3)

  @property
  def ratio_level(self) -> str:
    """The importance-ratio level the loss uses (``importance_sampling_level`` resolved)."""
    if self.importance_sampling_level is not None:
      return self.importance_sampling_level
    return "sequence" if self.loss_type == "gspo" else "token"

  @property
  def clip_range(self) -> tuple[float, float | None]:
    """``(epsilon, epsilon_high)`` resolved: unset values take the ratio level's defaults
    (:data:`DEFAULT_CLIP`); an unset ``epsilon_high`` follows a set ``epsilon`` (TRL)."""
    low, high = DEFAULT_CLIP[self.ratio_level]
    if self.epsilon is not None:
      low, high = self.epsilon, None
    return low, self.epsilon_high if self.epsilon_high is not None else high

  @property
  def reward_scale(self) -> str:
    """``scale_rewards`` resolved for the advantage estimator (:data:`DEFAULT_SCALE`)."""
    if self.scale_rewards is not None:
      return self.scale_rewards
    return DEFAULT_SCALE[self.advantage_estimator]

  def _warn_incoherent_levels(self) -> None:
    if self.ratio_level != "sequence":
      # A token ratio with a sequence-level sampler correction (TRL's own default) is coherent:
      # the product of a completion's token ratios is the sequence's probability ratio.
      return
    if self.loss_type in _TOKEN_AGGREGATED:
      warnings.warn(GRPOOptionsWarning(
        f"a sequence-level ratio (GSPO) with loss_type={self.loss_type!r}, which sums each "
        "completion's tokens, weights every completion's clipped term by its length; GSPO "
        "averages per sequence: loss_type='grpo' or 'gspo'"), stacklevel=3)
    if self.importance_sampling_correction and self.importance_sampling_mode.startswith("token"):
      warnings.warn(GRPOOptionsWarning(
        f"a sequence-level ratio (GSPO) clips whole completions, but importance_sampling_mode="
        f"{self.importance_sampling_mode!r} weights their tokens differently; use "
        "'sequence_truncate' or 'sequence_mask'"), stacklevel=3)


# --- layer 3: the objective over a stored generation batch ---------------------------------------

# loss_type -> (alignax.aggregate mode, the micro-batch weight's unit)
_AGGREGATION = {
  "grpo": ("seq_mean_token_mean", "rows"), "gspo": ("seq_mean_token_mean", "rows"),
  "dr_grpo": ("seq_mean_token_sum_norm", "rows"), "dapo": ("token_mean", "tokens"),
  "bnpo": ("token_mean", "tokens"), "cispo": ("token_mean", "tokens"),
}


# Token means among grpo_loss's metrics: averaged over micro-batches by their completion tokens,
# so they are the generation batch's token means under a per-sequence loss too.
_TOKEN_MEAN_METRICS = ("entropy", "kl", "approx_kl", "clip_ratio/low_mean", "clip_ratio/high_mean",
                       "clip_ratio/region_mean", "cispo_clip_ratio")


def grpo_objective(graphdef: nnx.GraphDef, *, loss_type: str = "dapo", epsilon: float = 0.2,
                   epsilon_high: float | None = None, beta: float = 0.0,
                   kl_estimator: str = "k3", importance_sampling_level: str = "token",
                   max_completion_length: int | None = None, temperature: float = 1.0,
                   entropy_coef: float = 0.0, impl: str = "auto") -> Objective:
  r"""GRPO's loss over one micro-batch of a stored generation batch (layer 3).

  .. math:: \mathcal{L} = \mathrm{agg}\big[\ell^{clip}(r_{i,t}, A_{i,t}) + \beta\,
            \widehat{\mathrm{KL}}(\pi_\theta\|\pi_{ref})_{i,t}\big] - c_H\,\bar H,\quad
            r_{i,t} = \pi_\theta(o_{i,t})/\pi_{old}(o_{i,t}),

  :func:`alignax.grpo_loss` with the aggregation, ratio level and clip of ``loss_type`` (see
  :class:`GRPOConfig`). The batch holds, all ``[B, L]`` in next-token alignment (position ``t``
  scores token ``t + 1``): ``input_ids``, ``attention_mask``, ``completion_mask`` (the sequence
  layout; completion tokens in the loss), ``old_logp`` (the behaviour policy's, from the rollout),
  ``advantages`` (per token, importance weights folded in) and ``ref_logp`` when ``beta > 0``;
  optionally ``in_loss`` (``[B]``, 1 for the rows a per-sequence loss averages over: dynamic
  sampling's refill rows are 0, so they do not dilute the mean over sequences; without it every
  row counts).

  The entropy bonus :math:`\bar H` is the mean entropy per completion token of the whole
  generation batch whatever the aggregation (TRL's semantics: ``entropy_coef`` means the same for
  every ``loss_type``). Under a per-sequence weight its share of a micro-batch comes from the
  batch's ``entropy_norm`` (``[B]``, every row the generation batch's rows over its loss tokens,
  written by the rollout); without it the micro-batch is taken as the whole batch.

  The micro-batch weight is its number of completion tokens (token-mean types) or of rows in the
  loss (sequence-mean types), so accumulation gives the whole generation batch's loss.
  """
  from alignax.losses.policy import grpo_loss
  from alignax.losses.supervised import next_token_targets

  _validate.choice("loss_type", loss_type, GRPO_LOSS_TYPES)
  _validate.non_negative("entropy_coef", entropy_coef)
  agg_mode, unit = _AGGREGATION[loss_type]
  policy_type = "cispo" if loss_type == "cispo" else "clip"
  level = "sequence" if loss_type == "gspo" else importance_sampling_level
  clip = dict(clip_eps_low=epsilon, clip_eps_high=epsilon_high)
  if policy_type == "cispo":
    # epsilon_high is CISPO's absolute cap on the IS weight (None: 5.0, where TRL falls back to
    # epsilon itself, 0.2, which would clip almost every token).
    cap = CISPO_DEFAULT_CAP if epsilon_high is None else epsilon_high
    _validate.positive("epsilon_high", cap)
    clip = dict(clip_eps_low=epsilon, cispo_max_weight=cap)

  def loss_tokens(batch: dict[str, Any]) -> jax.Array:
    _, mask = next_token_targets(batch["input_ids"], batch["attention_mask"],
                                 completion_mask=batch["completion_mask"])
    return mask

  def loss(params: Any, frozen: Any, batch: dict[str, Any], key: jax.Array):
    del key  # the decoder has no dropout
    model = nnx.merge(graphdef, params, frozen)
    out, mask = completion_logprobs(model, batch, temperature=temperature, impl=impl)
    # The entropy goes in for the metric only; the bonus is added below at its own scale (the
    # layer-1 loss would aggregate it like the policy term).
    value, metrics = grpo_loss(out.logp, batch["old_logp"], batch["advantages"], mask,
                               ref_logp=batch["ref_logp"] if beta > 0 else None, beta=beta,
                               kl_estimator=kl_estimator, loss_agg_mode=agg_mode,
                               max_len=max_completion_length, importance_level=level,
                               loss_type=policy_type, entropy=out.entropy, **clip)
    rows = jnp.maximum(rows_in_loss(batch), 1.0)
    if unit == "rows" and "in_loss" in batch:
      # The loss averaged over all b rows, rows out of it (dynamic sampling's refill) giving 0;
      # its mean over the rows in it is b / n times that.
      scale = batch["input_ids"].shape[0] / rows
      value = value * scale
      metrics = {**metrics, "policy_loss": metrics["policy_loss"] * scale}
    if entropy_coef > 0:
      entropy_sum = jnp.sum(jnp.where(mask, out.entropy, 0.0))
      tokens = jnp.maximum(masked_count(mask), 1.0)
      if unit == "rows" and "entropy_norm" in batch:
        # Micro-batches weighted by their n_i rows in the loss (N in all, T tokens):
        # S_i * (N / T) / n_i, weighted n_i / N, sums to S / T.
        bonus = entropy_sum * batch["entropy_norm"][0] / rows
      else:  # token-weighted micro-batches: their token means combine into the batch's
        bonus = entropy_sum / tokens
      value = value - entropy_coef * bonus
    return value, metrics

  def rows_in_loss(batch: dict[str, Any]) -> jax.Array:
    if "in_loss" in batch:
      return jnp.sum(batch["in_loss"].astype(jnp.float32))
    return jnp.asarray(batch["input_ids"].shape[0], jnp.float32)

  def weight(batch: dict[str, Any]) -> jax.Array:
    if unit == "rows":
      return rows_in_loss(batch)
    return masked_count(loss_tokens(batch))

  def token_count(batch: dict[str, Any]) -> jax.Array:
    return masked_count(loss_tokens(batch))

  return Objective(loss=loss, weight=weight,
                   metric_weights={name: token_count for name in _TOKEN_MEAN_METRICS})


# --- rollout: generation, rewards, advantages, stored log-probs ----------------------------------


def _nanstd(x: np.ndarray, axis: int | None = None, keepdims: bool = False) -> np.ndarray:
  """Bessel-corrected std over the non-NaN entries (TRL's ``nanstd``): NaN with fewer than two."""
  count = np.sum(~np.isnan(x), axis=axis, keepdims=True)
  safe = np.where(np.isnan(x), 0.0, x)
  mean = np.sum(safe, axis=axis, keepdims=True) / np.maximum(count, 1)
  squares = np.sum(np.where(np.isnan(x), 0.0, (x - mean) ** 2), axis=axis, keepdims=True)
  std = np.where(count > 1, np.sqrt(squares / np.maximum(count - 1, 1)), np.nan)
  return std if keepdims else np.squeeze(std, axis=axis)


def _centred(rewards: np.ndarray, *, leave_one_out: bool) -> np.ndarray:
  """``[P, G]`` rewards (NaN: unscorable) minus their baseline among the group's scorable ones:
  the mean, or with ``leave_one_out`` the mean of the others (RLOO); 0 where unscorable or where
  no baseline exists (a group with one scorable completion under leave-one-out)."""
  scorable = ~np.isnan(rewards)
  count = scorable.sum(axis=-1, keepdims=True)
  total = np.where(scorable, rewards, 0.0).sum(axis=-1, keepdims=True)
  with np.errstate(invalid="ignore", divide="ignore"):
    if leave_one_out:
      centred = rewards - (total - rewards) / (count - 1)
    else:
      centred = rewards - total / count
  return np.where(scorable & np.isfinite(centred), centred, 0.0)


def _advantages(rewards: np.ndarray, completion_mask: np.ndarray, config: GRPOConfig
                ) -> np.ndarray:
  r"""Per-token advantages ``[P, G, M]`` from rewards ``[P, G]`` (NaN: a completion no reward
  source scored, or one left out of the loss).

  Unscorable completions are left out of every statistic (group means, stds, the batch's) and
  get advantage 0, as in TRL. ``scale_rewards`` (:attr:`GRPOConfig.reward_scale`):

  * ``grpo``: :math:`(R - \bar R_g)/(s + 10^{-4})` with ``s`` the group's (``group``) or batch's
    (``batch``) reward std, or no division (``none``); a group with fewer than two scorable
    completions has no std and gets 0 (TRL's NaN advantage, zeroed);
  * ``rloo``: :math:`R_i - \frac{1}{n-1}\sum_{j \ne i} R_j`; ``group`` divides by the group's
    reward std, ``batch`` z-scores the advantages over the batch (TRL's RLOO
    ``normalize_advantages``);
  * ``reinforce_pp``: group-centred rewards whitened over the batch's loss tokens
    (:func:`alignax.reinforce_pp_advantages`).
  """
  from alignax.advantages import reinforce_pp_advantages

  rewards = np.asarray(rewards, np.float64)
  scorable = ~np.isnan(rewards)
  scale = config.reward_scale
  if config.advantage_estimator == "reinforce_pp":
    mask = completion_mask.astype(bool) & scorable[..., None]
    centred = _centred(rewards, leave_one_out=False).astype(np.float32)
    return np.asarray(reinforce_pp_advantages(centred, mask))
  leave_one_out = config.advantage_estimator == "rloo"
  seq = _centred(rewards, leave_one_out=leave_one_out)
  with np.errstate(invalid="ignore", divide="ignore"):
    if scale == "group":
      seq = seq / (_nanstd(rewards, axis=-1, keepdims=True) + REWARD_STD_EPS)
    elif scale == "batch" and leave_one_out:
      scored = np.where(scorable, seq, np.nan)
      seq = (seq - np.nanmean(scored)) / (_nanstd(scored) + REWARD_STD_EPS)
    elif scale == "batch":
      seq = seq / (_nanstd(rewards) + REWARD_STD_EPS)
  seq = np.where(scorable & np.isfinite(seq), seq, 0.0)
  return (seq[..., None] * completion_mask).astype(np.float32)


def _informative(rewards: np.ndarray) -> np.ndarray:
  """``[P]``: groups whose scorable rewards are not all equal (NaN-aware
  :func:`alignax.informative_group_mask`)."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN groups
    return np.nan_to_num(np.nanmax(rewards, axis=-1) - np.nanmin(rewards, axis=-1)) > 0


def _select_groups(rewards: np.ndarray, prompts_kept: int) -> tuple[np.ndarray, np.ndarray]:
  """DAPO's dynamic sampling with a static batch: of the ``P_drawn`` groups of ``rewards`` (raw,
  ``[P_drawn, G]``), the rows ``[P_kept·G]`` of ``prompts_kept`` groups, informative ones first
  in their drawn order (:func:`alignax.select_informative_groups`, NaN-aware), and which of the
  kept groups are informative (``[P_kept]``; the others refill the batch and are masked out of the
  loss). Without over-sampling every group is kept as it is."""
  drawn, group = rewards.shape
  if drawn == prompts_kept:
    return np.arange(drawn * group), np.ones(drawn, bool)
  informative = _informative(rewards)
  keep = np.argsort(~informative, kind="stable")[:prompts_kept]
  return (keep[:, None] * group + np.arange(group)).reshape(-1), informative[keep]


def _rewards(scored: Any) -> np.ndarray:
  """``[N]`` rewards of a :class:`alignax.rewards.RewardOutput`, NaN where every source returned
  None (the runner's ``nansum`` gives them 0, which would count as a score)."""
  rewards = np.asarray(scored.rewards, np.float32).copy()
  rewards[np.asarray(scored.all_none, bool)] = np.nan
  return rewards


def _reward_metrics(rewards: np.ndarray, scored: Any, *, scale: str = "group"
                    ) -> dict[str, float]:
  """TRL's reward metrics over every drawn group (before dynamic sampling drops any) and the
  scorable completions only: ``reward`` (mean), ``reward_std`` (the std over the batch, TRL's
  ``nanstd(rewards)``), ``frac_reward_zero_std`` (the share of completions whose scaling std is
  0: their group's, or with ``scale="batch"`` the batch's, as TRL) and the runner's per-source
  metrics."""
  flat = rewards.reshape(-1)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)  # nothing scored: NaN, as TRL logs it
    mean = float(np.nanmean(flat))
  std = _nanstd(flat) if scale == "batch" else _nanstd(rewards, axis=-1)
  metrics = {"reward": mean, "reward_std": float(_nanstd(flat)),
             "frac_reward_zero_std": float(np.mean(np.isclose(std, 0.0)))}
  metrics.update({k: float(v) for k, v in scored.metrics.items()})
  return metrics


def _own_rows(rows: int) -> slice:
  """This host's block of a generation batch of ``rows`` rows: the completions of its own
  prompts (``make_batches`` gives host ``i`` the ``i``-th block of the global prompts, and a
  prompt's ``G`` completions follow it), so groups never straddle hosts."""
  share = rows // jax.process_count()
  return slice(jax.process_index() * share, (jax.process_index() + 1) * share)


def _gather_scores(scored: Any, prompts: list[str], completions: list[str]
                   ) -> tuple[Any, list[str], list[str]]:
  """The whole batch's rewards, prompt texts and completions from each host's own rows (a
  one-host run's come back as they are).

  The runner's metrics are the whole batch's: ``rewards/{name}/mean`` and ``/std`` and
  ``rewards/all_none_count`` recomputed from the gathered rewards, ``timeouts`` summed over the
  hosts' calls, and every other (``log_metric``) value averaged over the hosts, whose row counts
  are equal.

  Raises:
    ValueError: the hosts' reward runners report different metric names (a ``log_metric`` call
      made on some hosts only), naming them.
  """
  if jax.process_count() == 1:
    return scored, prompts, completions
  arrays = gather_rows({"rewards": np.asarray(scored.rewards, np.float32),
                        "per_source": np.asarray(scored.per_source, np.float32),
                        "all_none": np.asarray(scored.all_none, bool)})
  hosts = gather_objects({"prompts": prompts, "completions": completions,
                          "metrics": {k: float(v) for k, v in scored.metrics.items()}})
  names = set(hosts[0]["metrics"])
  for index, host in enumerate(hosts):
    if set(host["metrics"]) != names:
      raise ValueError(
        f"the reward runners of process 0 and process {index} log different metrics "
        f"({sorted(names ^ set(host['metrics']))}): a reward function's log_metric must be "
        "called on every host")
  metrics = {}
  for key in hosts[0]["metrics"]:
    values = [host["metrics"][key] for host in hosts]
    metrics[key] = sum(values) if key.endswith("/timeouts") else float(np.mean(values))
  for index, name in enumerate(scored.names):
    column = arrays["per_source"][:, index].astype(np.float64)
    column = column[~np.isnan(column)]
    metrics[f"rewards/{name}/mean"] = float(column.mean()) if column.size else math.nan
    metrics[f"rewards/{name}/std"] = float(np.std(column, ddof=1)) if column.size > 1 else math.nan
  metrics["rewards/all_none_count"] = float(arrays["all_none"].sum())
  whole = types.SimpleNamespace(names=scored.names, metrics=metrics, **arrays)
  return (whole, [p for host in hosts for p in host["prompts"]],
          [text for host in hosts for text in host["completions"]])


class _Rollout:
  """Builds the stored generation batch of one round (host NumPy, log-probs on the mesh)."""

  def __init__(self, *, config: GRPOConfig, runner: Any, tokenizer: Any, mesh: jax.sharding.Mesh,
               model: nnx.Module, logp_fn: Callable, reference_fn: Callable | None,
               max_steps: int, prompts_kept: int, stop_token_ids: tuple[int, ...] | None):
    self.stop_token_ids = stop_token_ids
    self.config, self.runner, self.tokenizer, self.mesh = config, runner, tokenizer, mesh
    self.model, self.logp_fn, self.reference_fn = model, logp_fn, reference_fn
    self.max_steps, self.prompts_kept = max_steps, prompts_kept

  def __call__(self, state: TrainState, prompts: dict[str, Any], *, key: jax.Array,
               step: int) -> Round:
    from alignax.sampling import generate

    c = self.config
    group = c.num_generations
    accumulation = c.gradient_accumulation_steps
    nnx.update(self.model, state.params, state.frozen)
    timings = {}
    start = time.perf_counter()
    # Multi-host: every host samples the whole batch (the hosts' prompt blocks in process order,
    # the one-host batch) on the global mesh and holds the result; the reward functions then score
    # each host's own rows, and everything after the rewards (advantages, statistics, stored
    # log-probs) is computed from the gathered batch, the same on every host as on one.
    local_prompts = {k: np.asarray(prompts[k]) for k in ("input_ids", "attention_mask")}
    whole = gather_rows(local_prompts)
    sample = generate(self.model, whole["input_ids"], whole["attention_mask"],
                      max_new_tokens=c.max_completion_length, temperature=c.temperature,
                      top_k=c.top_k or None, top_p=None if c.top_p >= 1 else c.top_p,
                      min_p=c.min_p, num_samples=group, key=key,
                      stop_token_ids=self.stop_token_ids)
    sample = fetch(sample)
    timings["time/generation"] = time.perf_counter() - start

    start = time.perf_counter()
    lengths = np.asarray(sample.lengths)
    tokens = np.asarray(sample.tokens)
    own = _own_rows(tokens.shape[0])
    completion_ids = [row[:n].tolist() for row, n in zip(tokens[own], lengths[own])]
    completions = self.tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    extras = dict(prompts.get("extras", {}))
    prompt_values = extras.pop("prompt", None)
    if prompt_values is None:  # prompts given as ids only: their decoded text stands in
      prompt_values = self.tokenizer.batch_decode(
        [row[m.astype(bool)].tolist() for row, m in zip(local_prompts["input_ids"],
                                                        local_prompts["attention_mask"])],
        skip_special_tokens=True)
    scored = self.runner(list(prompt_values), completions, completion_ids, columns=extras,
                         num_generations=group,
                         trainer_state=types.SimpleNamespace(global_step=step,
                                                             max_steps=self.max_steps))
    scored, prompt_values, completions = _gather_scores(scored, [as_text(v) for v in prompt_values],
                                                        completions)
    rewards = _rewards(scored).reshape(-1, group)
    timings["time/reward"] = time.perf_counter() - start

    rows, informative = _select_groups(rewards, self.prompts_kept)
    metrics = _reward_metrics(rewards, scored, scale=c.reward_scale)
    rewards = rewards.reshape(-1)[rows].reshape(-1, group)

    completion_mask = np.asarray(sample.completion_mask)[rows]
    stopped = np.asarray(sample.stopped)[rows]
    loss_tokens = completion_mask.copy()
    if c.mask_truncated_completions:
      loss_tokens &= stopped[:, None]
    loss_tokens &= np.repeat(informative, group)[:, None]
    prompt_ids = np.asarray(sample.prompt_ids)[rows]
    prompt_mask = np.asarray(sample.prompt_mask)[rows]
    prompt_length = prompt_ids.shape[1]
    input_ids = np.concatenate([prompt_ids, tokens[rows]], axis=1).astype(np.int32)
    attention_mask = np.concatenate([prompt_mask, completion_mask], axis=1).astype(np.int32)
    total = input_ids.shape[1]
    batch = {"input_ids": input_ids, "attention_mask": attention_mask,
             "completion_mask": np.concatenate([np.zeros_like(prompt_mask), loss_tokens],
                                               axis=1).astype(np.int32)}

    # Refill groups (dynamic sampling) are out of the loss: out of the batch's statistics too.
    scoring = np.where(informative[:, None], rewards, np.nan)
    token_advantages = _advantages(scoring, loss_tokens.reshape(*rewards.shape, -1), c)
    token_advantages = token_advantages.reshape(loss_tokens.shape).astype(np.float32)

    start = time.perf_counter()
    # As training splits it: one micro-batch's activations at a time.
    placed = place_micro_batches(batch, self.mesh, accumulation, global_batch=True)
    old_logp = fetch(self.logp_fn(state.params, state.frozen, placed))
    old_logp = old_logp.reshape(-1, total)
    timings["time/old_logp"] = time.perf_counter() - start
    sampler_logp = to_token_positions(np.asarray(sample.logprobs, np.float32)[rows],
                                      prompt_length, total)
    # The loss's tokens: rows masked out (truncated, refill groups) have no stored log-probs.
    valid = to_token_positions(loss_tokens, prompt_length, total).astype(bool)
    difference = np.abs(old_logp - sampler_logp)[valid]
    for name, reduce in (("mean", np.mean), ("max", np.max)):
      metrics[f"sampling/sampling_logp_difference/{name}"] = (
        float(reduce(difference)) if difference.size else 0.0)
    advantages = to_token_positions(token_advantages, prompt_length, total)
    if c.importance_sampling_correction:
      weights = self._importance_weights(old_logp, sampler_logp, valid)
      metrics.update(self._importance_metrics(weights, valid))
      advantages = advantages * weights
    # Refill rows leave the per-sequence losses' row count, as they left the loss's tokens (a row
    # masked for truncation stays in it, as in TRL, where it counts in the mean with loss 0).
    in_loss = np.repeat(informative, group).astype(np.float32)
    stored = {"old_logp": np.where(valid, old_logp, 0.0).astype(np.float32),
              "advantages": advantages.astype(np.float32), "in_loss": in_loss}
    if c.entropy_coef > 0:
      stored["entropy_norm"] = np.full(input_ids.shape[0], in_loss.sum()
                                       / max(int(valid.sum()), 1), np.float32)
    placed.update(place_micro_batches(stored, self.mesh, accumulation, global_batch=True))
    if self.reference_fn is not None:
      start = time.perf_counter()
      ref_logp = np.asarray(fetch(self.reference_fn(state, placed)), np.float32)
      placed.update(place_micro_batches({"ref_logp": ref_logp.reshape(-1, total)}, self.mesh,
                                        accumulation, global_batch=True))
      timings["time/reference"] = time.perf_counter() - start

    metrics.update(timings)
    metrics.update(self._length_metrics(lengths[rows], stopped))
    trainable = bool(valid.any()) and (c.beta > 0 or c.entropy_coef > 0
                                       or bool(np.any(advantages[valid] != 0)))
    table = [{"prompt": prompt_values[r // group], "completion": completions[r],
              "reward": None if np.isnan(rewards.reshape(-1)[i])
              else float(rewards.reshape(-1)[i]),
              **{f"rewards/{name}": (None if np.isnan(v) else float(v))
                 for name, v in zip(scored.names, np.asarray(scored.per_source)[r])},
              "advantage": float(token_advantages[i, 0])}
             for i, r in enumerate(rows)]
    return Round(batch=placed, metrics=metrics, tokens=int(attention_mask.sum()),
                 completions=table, trainable=trainable)

  def _importance_metrics(self, weights: np.ndarray, valid: np.ndarray) -> dict[str, float]:
    return importance_metrics(weights, valid, mode=self.config.importance_sampling_mode)

  def _importance_weights(self, old_logp, sampler_logp, valid):
    c = self.config
    return importance_weights(old_logp, sampler_logp, valid, mode=c.importance_sampling_mode,
                              cap=c.importance_sampling_cap)

  def _length_metrics(self, lengths: np.ndarray, stopped: np.ndarray) -> dict[str, float]:
    terminated = lengths[stopped]
    metrics = {"completions/mean_length": float(lengths.mean()),
               "completions/min_length": float(lengths.min()),
               "completions/max_length": float(lengths.max()),
               "completions/clipped_ratio": float(1.0 - stopped.mean())}
    for name, fn in (("mean", np.mean), ("min", np.min), ("max", np.max)):
      metrics[f"completions/{name}_terminated_length"] = float(fn(terminated)) if terminated.size \
        else 0.0
    return metrics


# --- the trainer -------------------------------------------------------------------------------


def _reward_runner(config: GRPOConfig, reward_funcs: Any, *, tokenizer: Any,
                   mesh: jax.sharding.Mesh | None) -> Any:
  from alignax.rewards import RewardRunner

  if isinstance(reward_funcs, RewardRunner):
    return reward_funcs
  sources = list(config.reward_funcs or []) if reward_funcs is None else (
    [reward_funcs] if callable(reward_funcs) or isinstance(reward_funcs, str)
    else list(reward_funcs))
  if config.reward_model_name_or_path:
    from alignax.rewards import load_reward_model

    sources += [load_reward_model(path, mesh=mesh) for path in config.reward_model_name_or_path]
  if not sources:
    raise ValueError("grpo needs at least one reward: pass reward_funcs=[...] (callables, built-in "
                     "names or module.function paths), --reward_funcs or "
                     "--reward_model_name_or_path")
  return RewardRunner(sources, weights=config.reward_weights, timeout=config.reward_timeout,
                      on_timeout=config.reward_on_timeout,
                      max_completion_len=config.max_completion_length,
                      soft_punish_cache=config.soft_punish_cache)


def grpo(config: GRPOConfig, *, model: Any, reward_funcs: Any = None, tokenizer: Any = None,
         train_dataset: Any = None, data: Any = None, mesh: Any = None,
         reference: nnx.Module | None = None,
         on_step: Callable[[int, dict[str, float]], None] | None = None,
         eval_dataset: Any = None) -> Any:
  """Trains a policy with GRPO (see the module docstring) and writes a TRL-style ``output_dir``.

  Args:
    config: a :class:`GRPOConfig`.
    model: a :class:`alignax.train.ModelConfig` (loaded on ``mesh``, LoRA adapters when
      ``use_peft``), or an ``alignax.models.CausalLM`` already on ``mesh`` (trained in place).
    reward_funcs: callables with TRL's contract, built-in names, ``module.function`` strings,
      reward-model scorers, or a ready :class:`alignax.rewards.RewardRunner`; None takes
      ``config.reward_funcs``. ``config.reward_model_name_or_path`` models are appended.
    tokenizer: decodes completions for the reward functions (default: the ``ModelConfig``'s).
    train_dataset: prompt rows (dicts with ``prompt`` and any columns the rewards read) or a
      prepared ``task="prompt"`` dataset; None loads ``data``.
    data: an :class:`alignax.data.DataConfig` (batching, shuffling, ``max_prompt_length``).
    mesh: a mesh (``alignax.make_mesh``), a ``MeshConfig`` or None (every device on ``fsdp``).
    reference: the frozen reference for ``beta > 0``; default a copy of the initial policy (with
      LoRA, the policy with its adapters off). Ignored (and never built) when ``beta == 0``.
    on_step: called after every optimizer step with its metrics.
    eval_dataset: the prompts of the in-training evaluation (``config.eval_num_prompts`` > 0):
      rows with a ``prompt`` column, a prepared ``task="prompt"`` dataset or a path; None takes
      ``data``'s test split. Every ``eval_steps`` the policy is sampled on them and compared with
      its starting point (:func:`alignax.evaluation.trainer_generation_eval`; rewards:
      ``config.eval_reward_funcs`` else GRPO's own), logging ``eval/reward``,
      ``eval/win_rate``, ``eval/kl`` (and ``eval/tax`` with ``eval_tax_dataset``).

  Multi-host (after ``alignax.distributed.initialize``, every process calling ``grpo`` with the
  same arguments): each host draws its block of the prompts, all hosts sample the whole batch on
  the global mesh, each host's reward functions score its own prompts' completions (groups never
  straddle hosts), and the rewards are gathered, so advantages, batch statistics, logged metrics
  and skipped-update decisions are those of a one-host run of the same batch. Process 0 writes
  the logs and the completions (every host's rows); checkpoints are collective. Reward models
  and the in-training evaluation are single-host only.

  Returns:
    ``alignax.train.FitResult``: the trained model, final state and logged history.

  Raises:
    ValueError: named bad input (no reward, no prompts, a prompt longer than the position budget,
      a group split across rows, prompts per round that do not split over the hosts, reward
      models or ``eval_num_prompts`` in a multi-host run, ...);
      ``alignax.rewards.RewardFunctionError`` when a reward function raises or returns the wrong
      number of rewards.
  """
  from alignax.data import DataConfig, make_batches, steps_per_epoch
  from alignax.train.config import ModelConfig
  from alignax.train.loop import FitResult, data_parallel_size, default_export, place_on_mesh
  from alignax.train.step import init_state
  from alignax.train.trainers import load_model, make_export, resolve_mesh

  if not isinstance(config, GRPOConfig):
    raise ValueError(f"grpo takes a GRPOConfig, got {type(config).__name__}")
  hosts = jax.process_count()
  if hosts > 1 and config.eval_num_prompts:
    raise ValueError(f"eval_num_prompts={config.eval_num_prompts}: the in-training generation "
                     f"evaluation runs on one host, and this run has {hosts} processes; set "
                     "eval_num_prompts=0 and evaluate the saved checkpoints with alignax eval")
  mesh = resolve_mesh(mesh)
  data = data or DataConfig()
  trainable: Any = nnx.Param
  export = None
  model_config = None
  stop_token_ids = None if config.stop_token_ids is None else tuple(config.stop_token_ids)
  if isinstance(model, ModelConfig):
    from alignax.models import LoRAConfig, LoRAParam, apply_lora
    from alignax.models.lora import LLAMA_TARGETS
    from alignax.models.tokenizer import load_tokenizer
    from alignax.sampling import checkpoint_stop_token_ids

    model_config = model
    if not model_config.model_name_or_path:
      raise ValueError("model_name_or_path is required (--model_name_or_path)")
    if tokenizer is None:
      tokenizer = load_tokenizer(model_config.tokenizer_name_or_path
                                 or model_config.model_name_or_path)
    dataset = prompt_dataset(train_dataset, data, tokenizer)
    model = load_model(model_config.model_name_or_path, model_config, mesh=mesh, head=None,
                        seed=config.seed)
    if stop_token_ids is None:  # every EOS id of generation_config.json, as transformers stops
      stop_token_ids = checkpoint_stop_token_ids(model_config.model_name_or_path,
                                                 revision=model_config.model_revision) or None
    if model_config.use_peft:
      apply_lora(model, LoRAConfig(rank=model_config.lora_r, alpha=model_config.lora_alpha,
                                   dropout=model_config.lora_dropout,
                                   target_modules=tuple(model_config.lora_target_modules
                                                        or LLAMA_TARGETS),
                                   use_rslora=model_config.use_rslora),
                 rngs=nnx.Rngs(config.seed))
      trainable = LoRAParam
    if config.beta > 0 and reference is None and not model_config.use_peft:
      reference = load_model(model_config.ref_model_name_or_path
                              or model_config.model_name_or_path, model_config, mesh=mesh,
                              head=None, seed=config.seed)
    export = make_export(model_config, tokenizer)
  else:
    if tokenizer is None:
      raise ValueError("tokenizer is required with a model instance: the reward functions read "
                       "decoded completions")
    dataset = prompt_dataset(train_dataset, data, tokenizer)
  check_prompt_budget(dataset, max_completion_length=config.max_completion_length,
                       limit=model.config.max_position_embeddings)
  runner = _reward_runner(config, reward_funcs, tokenizer=tokenizer, mesh=mesh)
  if hosts > 1:
    _check_multi_host_rewards(runner)

  devices = data_parallel_size(mesh)
  completions_per_step = (config.per_device_train_batch_size * devices
                          * config.gradient_accumulation_steps)
  prompts_per_step = completions_per_step // config.num_generations
  oversample = config.dynamic_sampling_oversample if config.dynamic_sampling else 1
  prompts_drawn = prompts_per_step * oversample
  max_steps = config.max_steps
  if max_steps == -1:
    rounds = steps_per_epoch(len(dataset), batch_size=prompts_drawn,
                             drop_last=data.dataloader_drop_last)
    if rounds == 0:
      raise ValueError(f"{len(dataset)} prompts make no batch of {prompts_drawn} prompts; lower "
                       "per_device_train_batch_size or set max_steps")
    max_steps = max(1, math.ceil(config.num_train_epochs * rounds)) * config.num_iterations
  if prompts_drawn % hosts:
    raise ValueError(f"the {prompts_drawn} prompts drawn per generation batch do not split over "
                     f"the {hosts} processes: each host samples and scores whole groups of its own "
                     "prompts; change per_device_train_batch_size, num_generations or "
                     "gradient_accumulation_steps")
  iterator = iter(make_batches(dataset, batch_size=prompts_drawn // hosts, config=data,
                               process_index=jax.process_index(), process_count=hosts))

  graphdef, params, frozen = nnx.split(model, trainable, ...)
  if not jax.tree.leaves(params):
    raise ValueError(f"trainable={trainable!r} selects no parameter of the model")
  optimizer, step_fn = _compiled_step(graphdef, _StepKey.of(config, max_steps))
  state = place_on_mesh(init_state(params, optimizer, frozen=frozen, seed=config.seed), mesh)

  def logp_fn(params, frozen, batch):
    return micro_batched_logprobs(graphdef, (params, frozen), batch,
                                  temperature=config.temperature)

  reference_fn = None if config.beta == 0 else _reference_fn(
    graphdef, reference, trainable=trainable, model=model, temperature=config.temperature)
  rollout = _Rollout(config=config, runner=runner, tokenizer=tokenizer, mesh=mesh, model=model,
                     logp_fn=logp_fn, reference_fn=reference_fn, max_steps=max_steps,
                     prompts_kept=prompts_per_step, stop_token_ids=stop_token_ids)

  generation_eval = _generation_eval(config, model=model, reference=reference,
                                     trainable=trainable, tokenizer=tokenizer, data=data,
                                     mesh=mesh, runner=runner, prompts=eval_dataset,
                                     stop_token_ids=stop_token_ids)

  def update(state: TrainState, batch: Any, iteration: int):
    del iteration  # every update of a round takes the whole generation batch
    return step_fn(state, batch)

  def evaluate(state: TrainState) -> dict[str, float]:
    nnx.update(model, state.params, state.frozen)
    return generation_eval(model)

  def close() -> None:
    try:
      if generation_eval is not None:
        generation_eval.close()
    finally:
      if hasattr(runner, "close"):
        runner.close()

  def export_model(state: TrainState) -> None:
    nnx.update(model, state.params, state.frozen)
    (export or default_export(tokenizer))(model, config.output_dir)

  epsilon, epsilon_high = config.clip_range
  result = run_rounds(
    config, state=state, mesh=mesh, iterator=iterator, rollout=rollout, update=update,
    max_steps=max_steps, updates_per_round=config.num_iterations, algorithm="grpo",
    run_config={"data_config": dataclasses.asdict(data),
                "resolved": {"epsilon": epsilon, "epsilon_high": epsilon_high,
                             "importance_sampling_level": config.ratio_level,
                             "scale_rewards": config.reward_scale,
                             "stop_token_ids": None if stop_token_ids is None
                             else list(stop_token_ids)},
                **({"model_config": dataclasses.asdict(model_config)}
                   if model_config is not None else {})},
    export=export_model, on_step=on_step, on_close=close,
    evaluate=None if generation_eval is None else evaluate)
  return FitResult(model=model, state=result.state, history=result.history)


def _check_multi_host_rewards(runner: Any) -> None:
  """Refuses reward models in a multi-host run: each host scores only its own rows, and a reward
  model's forward on the global mesh would need every host to pass the same batch."""
  from alignax.rewards import RewardEnsemble, RewardModelScorer

  models = [type(s).__name__ for s in getattr(runner, "sources", ())
            if isinstance(s, (RewardModelScorer, RewardEnsemble))]
  if models:
    raise ValueError(f"grpo with {jax.process_count()} processes scores each host's completions "
                     f"on that host, which reward functions do but reward models ({models}) "
                     "cannot (their forward runs on the global mesh): run reward models on one "
                     "host, or wrap one as a reward function served elsewhere")


def _generation_eval(config: GRPOConfig, *, model: nnx.Module, reference: nnx.Module | None,
                     trainable: Any, tokenizer: Any, data: Any, mesh: jax.sharding.Mesh,
                     runner: Any, prompts: Any, stop_token_ids: tuple[int, ...] | None) -> Any:
  """The in-training evaluation of ``config.eval_num_prompts`` (None when 0): the policy against
  its starting point, the reference when one was given or loaded, the adapters-off view with
  LoRA, else a frozen copy of the model taken now, before the first step. It scores with the
  training runner (its weights and names make ``eval/reward`` the training reward) and stops
  where the rollouts stop."""
  if not config.eval_num_prompts:
    return None
  from alignax.evaluation import frozen_copy, trainer_generation_eval
  from alignax.models import LoRAParam, lora_disabled

  if reference is not None:
    baseline = reference
  elif trainable is LoRAParam:
    baseline = lora_disabled
  else:
    baseline = frozen_copy(model)
  from alignax.sampling import default_stop_token_ids

  return trainer_generation_eval(
    config, tokenizer=tokenizer, data=data, baseline=baseline, mesh=mesh, reward_funcs=runner,
    prompts=prompts,
    stop_token_ids=stop_token_ids if stop_token_ids is not None else default_stop_token_ids(model),
    max_position_embeddings=model.config.max_position_embeddings)


@dataclasses.dataclass(frozen=True)
class _StepKey:
  """The options the compiled update depends on (the optimizer's and the objective's)."""

  optimizer: OptimizerOptions
  loss_type: str
  epsilon: float
  epsilon_high: float | None
  beta: float
  kl_estimator: str
  importance_sampling_level: str
  max_completion_length: int
  temperature: float
  entropy_coef: float

  @classmethod
  def of(cls, config: GRPOConfig, max_steps: int) -> "_StepKey":
    epsilon, epsilon_high = config.clip_range
    resolved = {"optimizer": OptimizerOptions.of(config, max_steps), "epsilon": epsilon,
                "epsilon_high": epsilon_high, "importance_sampling_level": config.ratio_level}
    names = [f.name for f in dataclasses.fields(cls) if f.name not in resolved]
    return cls(**resolved, **{name: getattr(config, name) for name in names})


@functools.lru_cache(maxsize=4)
def _compiled_step(graphdef: nnx.GraphDef, key: _StepKey):
  """``(optimizer, jitted step)`` for a model structure and options; cached, so runs that differ
  only in data, output directory or resume point (a resumed run, a sweep over seeds) compile the
  step once per process."""
  from alignax.train.step import make_train_step

  optimizer, schedule = key.optimizer.build()
  objective = grpo_objective(
    graphdef, loss_type=key.loss_type, epsilon=key.epsilon, epsilon_high=key.epsilon_high,
    beta=key.beta, kl_estimator=key.kl_estimator,
    importance_sampling_level=key.importance_sampling_level,
    max_completion_length=key.max_completion_length, temperature=key.temperature,
    entropy_coef=key.entropy_coef)
  return optimizer, jax.jit(make_train_step(objective, optimizer, schedule=schedule),
                            donate_argnums=0)


def _reference_fn(graphdef: nnx.GraphDef, reference: nnx.Module | None, *, trainable: Any,
                  model: nnx.Module, temperature: float) -> Callable:
  """``(state, placed micro-batches) -> ref_logp [k, N/k, L]``: a frozen copy of ``reference``
  (default the initial policy), or with LoRA the policy's adapters-off view of the state's
  weights."""
  from alignax.models import LoRAParam

  if reference is None and trainable is LoRAParam:
    return lambda state, batch: micro_batched_logprobs(
      graphdef, (state.params, state.frozen), batch, temperature=temperature, adapters_off=True)
  ref_graphdef, ref_state = nnx.split(reference if reference is not None else model)
  # Copied: the policy's buffers are donated to the first step and would vanish under the reference.
  ref_state = jax.tree.map(jnp.copy, ref_state)
  return lambda state, batch: micro_batched_logprobs(ref_graphdef, (ref_state,), batch,
                                                      temperature=temperature)
