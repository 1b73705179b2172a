r"""GRPO and its family as an online trainer: sample a group of completions per prompt, score
them, turn the scores into advantages, then take ``num_iterations`` policy updates on that
generation batch.

Each round (Shao et al. 2024, "DeepSeekMath", Alg. 1):

1. ``P`` prompts from the data (``task="prompt"``), ``G = num_generations`` completions each from
   :func:`alignax.sampling.generate` with the current policy (rows ``p·G + g``);
2. rewards from :class:`alignax.rewards.RewardRunner` (TRL's reward-function contract, reward
   models, weights), ``[P, G]``; with ``dynamic_sampling`` more prompts are drawn and the groups
   whose rewards all agree are dropped (DAPO, :func:`alignax.select_informative_groups`), refilled
   to a static ``P``;
3. advantages: :func:`alignax.group_advantages` (``grpo``; ``rloo`` with the leave-one-out baseline)
   or :func:`alignax.reinforce_pp_advantages` on group-centred scores (``reinforce_pp``);
4. the behaviour policy's log-probs recomputed by the training forward (``old_logp``, stored),
   the sampler's own log-probs compared with them
   (``sampling/sampling_logp_difference/{mean,max}``) and, optionally, a truncated importance
   weight over that difference; the reference's log-probs when ``beta > 0`` (with ``beta == 0``
   no reference exists and none is evaluated). Both sides use
   ``softmax(logits / temperature)``; with ``top_k`` / ``top_p`` / ``min_p`` the sampler's
   log-probs are under the filtered, renormalised distribution and the difference shows it;
5. ``num_iterations`` optimizer steps of :func:`grpo_objective` (:func:`alignax.grpo_loss` with the
   ``loss_type``'s aggregation) through the engine's exact-accumulation step.

An optimizer step is one update; a round spans ``num_iterations`` of them, and checkpoints are taken
at round boundaries only, so a resumed run regenerates nothing and, with the sampler's key derived
from the checkpointed RNG and the round index, replays the same trajectory.
"""

import dataclasses
import functools
import logging
import math
import time
import types
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
from alignax.train.online import (as_text, check_prompt_budget, completion_logprobs,
                                  place_micro_batches, prompt_dataset, sampler_key, shard_rows,
                                  stored_logprobs, to_token_positions, write_completions)
from alignax.train.step import Objective, TrainState

logger = logging.getLogger("alignax.train")

# TRL's GRPOConfig.loss_type values (alignax has no vLLM, so no sapo/vespo/luspo here).
GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "gspo", "cispo")
SCALE_REWARDS = ("group", "batch", "none")
ADVANTAGE_ESTIMATORS = ("grpo", "rloo", "reinforce_pp")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
IMPORTANCE_SAMPLING_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
# TRL's std epsilon of the group normalisation (verl uses 1e-6, OpenRLHF 1e-9).
REWARD_STD_EPS = 1e-4
# CISPO's IS-weight cap when epsilon_high is unset (ScaleRL's recommendation, TRL's default).
CISPO_DEFAULT_CAP = 5.0


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
    stop_token_ids: ids that end a completion (None: the model's ``eos_token_id``).
    beta: KL coefficient; 0 (TRL's default) builds and evaluates no reference model.
    kl_estimator: the in-loss KL estimator (``k3``, GRPO's; ``k1``, ``k2``, ``abs``).
    loss_type: ``dapo`` (token mean over the batch, TRL's default) | ``grpo`` (mean over sequences
      of token means) | ``bnpo`` (token mean; equal to ``dapo`` under exact accumulation) |
      ``dr_grpo`` (token sums over ``max_completion_length``) | ``gspo`` (sequence-level ratio,
      ``grpo``'s aggregation) | ``cispo`` (capped IS weight, token mean).
    importance_sampling_level: ``token`` or ``sequence`` (GSPO; implied by ``loss_type="gspo"``).
    scale_rewards: ``group`` | ``batch`` | ``none`` (Dr. GRPO): the std the advantages divide by.
    advantage_estimator: ``grpo`` (group mean baseline) | ``rloo`` (leave-one-out baseline) |
      ``reinforce_pp`` (REINFORCE++-baseline: group-centred, whitened over the batch's tokens).
    epsilon: lower clip of the ratio (TRL: 0.2).
    epsilon_high: upper clip (None: ``epsilon``; DAPO: 0.28); for ``cispo`` the absolute cap of the
      IS weight (None: 5.0, the layer-1 default; TRL falls back to ``epsilon``).
    num_iterations: updates per generation batch (TRL's μ), each against the stored old log-probs.
    mask_truncated_completions: completions that hit ``max_completion_length`` without a stop token
      leave the loss (DAPO's overlong filtering).
    reward_funcs: ``--reward_funcs``: built-in names or dotted ``module.function`` paths (the Python
      API also takes callables, see :func:`grpo`).
    reward_weights: one weight per reward source (functions first, then reward models).
    reward_model_name_or_path: reward models (alignax or HF ``*ForSequenceClassification``).
    reward_timeout: seconds per reward-function call (None: no limit).
    dynamic_sampling: DAPO's dynamic sampling: generate for ``dynamic_sampling_oversample`` times
      the prompts and keep the groups whose rewards differ first.
    dynamic_sampling_oversample: the over-sampling factor (>= 2).
    importance_sampling_correction: multiply the policy term by the truncated (or masked) ratio of
      the training forward's to the sampler's probability of each token (TRL's
      ``vllm_importance_sampling_correction``; the sampler here is alignax's own: off by default).
    importance_sampling_mode: ``token_truncate`` | ``token_mask`` | ``sequence_truncate`` |
      ``sequence_mask`` (sequence: the sum of the token log-ratios).
    importance_sampling_cap: the ratio's upper bound (TRL's ``vllm_importance_sampling_cap``).
    entropy_coef: entropy bonus coefficient.
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
  importance_sampling_level: str = dataclasses.field(
    default="token", metadata={"choices": IMPORTANCE_SAMPLING_LEVELS})
  scale_rewards: str = dataclasses.field(default="group", metadata={"choices": SCALE_REWARDS})
  advantage_estimator: str = dataclasses.field(default="grpo",
                                               metadata={"choices": ADVANTAGE_ESTIMATORS})
  epsilon: float = 0.2
  epsilon_high: float | None = None
  num_iterations: int = 1
  mask_truncated_completions: bool = False
  reward_funcs: list[str] | None = None
  reward_weights: list[float] | None = None
  reward_model_name_or_path: list[str] | None = None
  reward_timeout: float | None = None
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
    if self.save_steps % self.num_iterations:
      raise ValueError(f"save_steps={self.save_steps} must be a multiple of num_iterations="
                       f"{self.num_iterations}: checkpoints are taken between generation batches")
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
    for name, choices in (("kl_estimator", KL_ESTIMATORS), ("loss_type", GRPO_LOSS_TYPES),
                          ("importance_sampling_level", IMPORTANCE_SAMPLING_LEVELS),
                          ("scale_rewards", SCALE_REWARDS),
                          ("advantage_estimator", ADVANTAGE_ESTIMATORS),
                          ("importance_sampling_mode", IMPORTANCE_SAMPLING_MODES)):
      _validate.choice(name, getattr(self, name), choices)
    if self.loss_type == "gspo" and self.importance_sampling_level == "token":
      self.importance_sampling_level = "sequence"


# --- layer 3: the objective over a stored generation batch ---------------------------------------

# loss_type -> (alignax.aggregate mode, the micro-batch weight's unit)
_AGGREGATION = {
  "grpo": ("seq_mean_token_mean", "rows"), "gspo": ("seq_mean_token_mean", "rows"),
  "dr_grpo": ("seq_mean_token_sum_norm", "rows"), "dapo": ("token_mean", "tokens"),
  "bnpo": ("token_mean", "tokens"), "cispo": ("token_mean", "tokens"),
}


def grpo_objective(graphdef: nnx.GraphDef, *, loss_type: str = "dapo", epsilon: float = 0.2,
                   epsilon_high: float | None = None, beta: float = 0.0,
                   kl_estimator: str = "k3", importance_sampling_level: str = "token",
                   max_completion_length: int | None = None, temperature: float = 1.0,
                   entropy_coef: float = 0.0, impl: str = "auto") -> Objective:
  r"""GRPO's loss over one micro-batch of a stored generation batch (layer 3).

  .. math:: \mathcal{L} = \mathrm{agg}\big[\ell^{clip}(r_{i,t}, A_{i,t}) + \beta\,
            \widehat{\mathrm{KL}}(\pi_\theta\|\pi_{ref})_{i,t}\big],\quad
            r_{i,t} = \pi_\theta(o_{i,t})/\pi_{old}(o_{i,t}),

  :func:`alignax.grpo_loss` with the aggregation, ratio level and clip of ``loss_type`` (see
  :class:`GRPOConfig`). The batch holds, all ``[B, L]`` in next-token alignment (position ``t``
  scores token ``t + 1``): ``input_ids``, ``attention_mask``, ``completion_mask`` (the sequence
  layout; completion tokens in the loss), ``old_logp`` (the behaviour policy's, from the rollout),
  ``advantages`` (per token, importance weights folded in) and ``ref_logp`` when ``beta > 0``.

  The micro-batch weight is its number of completion tokens (token-mean types) or of rows
  (sequence-mean types), so accumulation gives the whole generation batch's loss.
  """
  from alignax.losses.policy import grpo_loss
  from alignax.losses.supervised import next_token_targets

  _validate.choice("loss_type", loss_type, GRPO_LOSS_TYPES)
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

  def loss(params: Any, frozen: Any, batch: dict[str, Any], key: jax.Array):
    del key  # the decoder has no dropout
    model = nnx.merge(graphdef, params, frozen)
    out, mask = completion_logprobs(model, batch, temperature=temperature, impl=impl)
    return grpo_loss(out.logp, batch["old_logp"], batch["advantages"], mask,
                     ref_logp=batch["ref_logp"] if beta > 0 else None, beta=beta,
                     kl_estimator=kl_estimator, loss_agg_mode=agg_mode,
                     max_len=max_completion_length, importance_level=level,
                     loss_type=policy_type, entropy=out.entropy, entropy_coef=entropy_coef, **clip)

  def weight(batch: dict[str, Any]) -> jax.Array:
    if unit == "rows":
      return jnp.asarray(batch["input_ids"].shape[0], jnp.float32)
    _, mask = next_token_targets(batch["input_ids"], batch["attention_mask"],
                                 completion_mask=batch["completion_mask"])
    return masked_count(mask)

  return Objective(loss=loss, weight=weight)


# --- rollout: generation, rewards, advantages, stored log-probs ----------------------------------


def _advantages(rewards: np.ndarray, completion_mask: np.ndarray, config: GRPOConfig
                ) -> np.ndarray:
  """Per-token advantages ``[P, G, M]`` from rewards ``[P, G]``."""
  from alignax.advantages import group_advantages, reinforce_pp_advantages

  if config.advantage_estimator == "reinforce_pp":
    centred = group_advantages(rewards, scale="none")
    return np.asarray(reinforce_pp_advantages(centred, completion_mask.astype(bool)))
  seq = group_advantages(rewards, scale=config.scale_rewards,
                         leave_one_out=config.advantage_estimator == "rloo", eps=REWARD_STD_EPS)
  return np.broadcast_to(np.asarray(seq)[..., None], completion_mask.shape) * completion_mask


def _group_std(rewards: np.ndarray) -> np.ndarray:
  return rewards.std(axis=-1, ddof=1)


def _select_groups(rewards: np.ndarray, prompts_kept: int) -> tuple[np.ndarray, np.ndarray]:
  """DAPO's dynamic sampling with a static batch: of the ``P_drawn`` groups of ``rewards`` (raw,
  ``[P_drawn, G]``), the rows ``[P_kept·G]`` of ``prompts_kept`` groups, informative ones first
  (``alignax.select_informative_groups``), and which of the kept groups are informative
  (``[P_kept]``; the others refill the batch and are masked out of the loss). Without
  over-sampling every group is kept as it is."""
  from alignax.advantages import informative_group_mask, select_informative_groups

  drawn, group = rewards.shape
  if drawn == prompts_kept:
    return np.arange(drawn * group), np.ones(drawn, bool)
  keep = np.asarray(select_informative_groups(rewards, k=prompts_kept))
  informative = np.asarray(informative_group_mask(rewards))[keep]
  return (keep[:, None] * group + np.arange(group)).reshape(-1), informative


class _Rollout:
  """Builds the stored generation batch of one round (all host NumPy)."""

  def __init__(self, *, config: GRPOConfig, runner: Any, tokenizer: Any, mesh: jax.sharding.Mesh,
               logp_fn: Callable, reference_fn: Callable | None, max_steps: int):
    self.config, self.runner, self.tokenizer, self.mesh = config, runner, tokenizer, mesh
    self.logp_fn, self.reference_fn, self.max_steps = logp_fn, reference_fn, max_steps

  def __call__(self, model: nnx.Module, state: TrainState, prompts: dict[str, Any],
               key: jax.Array, prompts_kept: int, step: int):
    from alignax.sampling import generate

    c = self.config
    group = c.num_generations
    timings = {}
    start = time.perf_counter()
    sample = generate(model, prompts["input_ids"], prompts["attention_mask"],
                      max_new_tokens=c.max_completion_length, temperature=c.temperature,
                      top_k=c.top_k or None, top_p=None if c.top_p >= 1 else c.top_p,
                      min_p=c.min_p, num_samples=group, key=key,
                      stop_token_ids=None if c.stop_token_ids is None else tuple(c.stop_token_ids))
    sample = jax.device_get(sample)
    timings["time/generation"] = time.perf_counter() - start

    start = time.perf_counter()
    lengths = np.asarray(sample.lengths)
    tokens = np.asarray(sample.tokens)
    completion_ids = [row[:n].tolist() for row, n in zip(tokens, lengths)]
    completions = self.tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    extras = dict(prompts.get("extras", {}))
    prompt_values = extras.pop("prompt", None)
    if prompt_values is None:  # prompts given as ids only: their decoded text stands in
      prompt_values = self.tokenizer.batch_decode(
        [row[m.astype(bool)].tolist() for row, m in zip(prompts["input_ids"],
                                                        prompts["attention_mask"])],
        skip_special_tokens=True)
    scored = self.runner(list(prompt_values), completions, completion_ids, columns=extras,
                         num_generations=group,
                         trainer_state=types.SimpleNamespace(global_step=step,
                                                             max_steps=self.max_steps))
    rewards = np.asarray(scored.rewards, np.float32).reshape(-1, group)
    timings["time/reward"] = time.perf_counter() - start

    rows, informative = _select_groups(rewards, prompts_kept)
    metrics = self._reward_metrics(rewards, scored)
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

    token_advantages = _advantages(rewards, loss_tokens.reshape(*rewards.shape, -1), c)
    token_advantages = token_advantages.reshape(loss_tokens.shape).astype(np.float32)

    start = time.perf_counter()
    placed = shard_rows(batch, self.mesh)
    old_logp = np.asarray(jax.device_get(self.logp_fn(state.params, state.frozen, placed)))
    timings["time/old_logp"] = time.perf_counter() - start
    sampler_logp = to_token_positions(np.asarray(sample.logprobs, np.float32)[rows], prompt_length, total)
    # The loss's tokens: rows masked out (truncated, refill groups) have no stored log-probs.
    valid = to_token_positions(loss_tokens, prompt_length, total).astype(bool)
    difference = np.abs(old_logp - sampler_logp)[valid]
    for name, reduce in (("mean", np.mean), ("max", np.max)):
      metrics[f"sampling/sampling_logp_difference/{name}"] = (
        float(reduce(difference)) if difference.size else 0.0)
    advantages = to_token_positions(token_advantages, prompt_length, total)
    if c.importance_sampling_correction:
      weights = self._importance_weights(old_logp, sampler_logp, valid)
      metrics.update({f"sampling/importance_sampling_ratio/{name}": float(fn(weights[valid]))
                      for name, fn in (("min", np.min), ("mean", np.mean), ("max", np.max))})
      advantages = advantages * weights
    batch.update(old_logp=np.where(valid, old_logp, 0.0).astype(np.float32),
                 advantages=advantages.astype(np.float32))
    if self.reference_fn is not None:
      start = time.perf_counter()
      batch["ref_logp"] = np.asarray(jax.device_get(self.reference_fn(state, placed)), np.float32)
      timings["time/reference"] = time.perf_counter() - start

    metrics.update(timings)
    metrics.update(self._length_metrics(lengths[rows], stopped))
    table = [{"prompt": as_text(prompt_values[r // group]), "completion": completions[r],
              "reward": float(rewards.reshape(-1)[i]),
              **{f"rewards/{name}": (None if np.isnan(v) else float(v))
                 for name, v in zip(scored.names, np.asarray(scored.per_source)[r])},
              "advantage": float(token_advantages[i, 0])}
             for i, r in enumerate(rows)]
    return batch, metrics, table

  def _importance_weights(self, old_logp, sampler_logp, valid):
    c = self.config
    log_ratio = np.where(valid, old_logp - sampler_logp, 0.0)
    if c.importance_sampling_mode.startswith("sequence"):
      log_ratio = np.broadcast_to(log_ratio.sum(axis=1, keepdims=True), log_ratio.shape)
    ratio = np.exp(np.minimum(log_ratio, 50.0))
    if c.importance_sampling_mode.endswith("truncate"):
      weights = np.minimum(ratio, c.importance_sampling_cap)
    else:
      # Masking keeps the ratio where it is within the cap and drops the token (or sequence) beyond.
      weights = np.where(ratio <= c.importance_sampling_cap, ratio, 0.0)
    return np.where(valid, weights, 0.0).astype(np.float32)

  def _reward_metrics(self, rewards: np.ndarray, scored: Any) -> dict[str, float]:
    """TRL's reward metrics over every drawn group (before dynamic sampling drops any)."""
    std = _group_std(rewards)
    # TRL logs the std the advantages were divided by: the batch's under scale_rewards="batch".
    spread = rewards.std(ddof=1) if self.config.scale_rewards == "batch" else std.mean()
    metrics = {"reward": float(rewards.mean()), "reward_std": float(spread),
               "frac_reward_zero_std": float(np.mean(np.isclose(std, 0.0)))}
    metrics.update({k: float(v) for k, v in scored.metrics.items()})
    return metrics

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
                   mesh: jax.sharding.Mesh) -> Any:
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
                      max_completion_len=config.max_completion_length)


def grpo(config: GRPOConfig, *, model: Any, reward_funcs: Any = None, tokenizer: Any = None,
         train_dataset: Any = None, data: Any = None, mesh: Any = None,
         reference: nnx.Module | None = None,
         on_step: Callable[[int, dict[str, float]], None] | None = None) -> Any:
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

  Returns:
    ``alignax.train.FitResult``: the trained model, final state and logged history.

  Raises:
    ValueError: named bad input (no reward, no prompts, a prompt longer than the position budget,
      a group split across rows, ...); ``alignax.rewards.RewardFunctionError`` when a reward
      function raises or returns the wrong number of rewards.
  """
  from alignax.data import DataConfig, make_batches, steps_per_epoch
  from alignax.train.checkpoint import Checkpointer, resolve_resume
  from alignax.train.config import ModelConfig
  from alignax.train.logger import MetricsLogger
  from alignax.train.loop import (FitResult, default_export, place_on_mesh, data_parallel_size,
                                  restore_checkpoint, write_run_config)
  from alignax.train.step import check_finite, init_state
  from alignax.train.trainers import load_model, make_export, resolve_mesh

  if not isinstance(config, GRPOConfig):
    raise ValueError(f"grpo takes a GRPOConfig, got {type(config).__name__}")
  if jax.process_count() > 1:
    raise ValueError("grpo runs on a single host: its rollout gathers the generation batch on "
                     f"the host, and this run has {jax.process_count()} processes")
  mesh = resolve_mesh(mesh)
  data = data or DataConfig()
  trainable: Any = nnx.Param
  export = None
  model_config = None
  if isinstance(model, ModelConfig):
    from alignax.models import LoRAConfig, LoRAParam, apply_lora
    from alignax.models.lora import LLAMA_TARGETS
    from alignax.models.tokenizer import load_tokenizer

    model_config = model
    if not model_config.model_name_or_path:
      raise ValueError("model_name_or_path is required (--model_name_or_path)")
    if tokenizer is None:
      tokenizer = load_tokenizer(model_config.tokenizer_name_or_path
                                 or model_config.model_name_or_path)
    dataset = prompt_dataset(train_dataset, data, tokenizer)
    model = load_model(model_config.model_name_or_path, model_config, mesh=mesh, head=None,
                        seed=config.seed)
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
  iterator = iter(make_batches(dataset, batch_size=prompts_drawn, config=data))

  graphdef, params, frozen = nnx.split(model, trainable, ...)
  if not jax.tree.leaves(params):
    raise ValueError(f"trainable={trainable!r} selects no parameter of the model")
  optimizer, step_fn = _compiled_step(graphdef, _StepKey.of(config, max_steps))
  state = place_on_mesh(init_state(params, optimizer, frozen=frozen, seed=config.seed), mesh)

  def logp_fn(params, frozen, batch):
    return stored_logprobs(graphdef, (params, frozen), batch, temperature=config.temperature)

  reference_fn = None if config.beta == 0 else _reference_fn(
    graphdef, reference, trainable=trainable, model=model, temperature=config.temperature)
  rollout = _Rollout(config=config, runner=runner, tokenizer=tokenizer, mesh=mesh,
                     logp_fn=logp_fn, reference_fn=reference_fn, max_steps=max_steps)

  main = jax.process_index() == 0
  metrics_logger = MetricsLogger(
    config.output_dir, report_to=config.report_to, run_name=config.run_name,
    config=config.to_dict(), is_main_process=main,
    trainer_state={"max_steps": max_steps, "logging_steps": config.logging_steps,
                   "eval_steps": config.eval_steps or config.logging_steps,
                   "save_steps": config.save_steps,
                   "train_batch_size": config.per_device_train_batch_size,
                   "num_train_epochs": config.num_train_epochs})
  checkpointer = Checkpointer(config.output_dir, save_total_limit=config.save_total_limit)
  write_run_config(config, mesh, {"max_steps": max_steps, "algorithm": "grpo",
                                  "data_config": dataclasses.asdict(data),
                                  **({"model_config": dataclasses.asdict(model_config)}
                                     if model_config is not None else {})})

  start = 0
  resume = resolve_resume(config.resume_from_checkpoint, config.output_dir)
  if resume is not None:
    run_dir, saved_step = resume
    if saved_step % config.num_iterations:
      raise ValueError(f"checkpoint-{saved_step} is inside a generation batch (num_iterations="
                       f"{config.num_iterations}); resume from a multiple of num_iterations")
    state = restore_checkpoint(state, run_dir, saved_step, checkpointer=checkpointer,
                               iterator=iterator, logger=metrics_logger)
    start = saved_step

  from tqdm.auto import tqdm

  progress = tqdm(total=max_steps, initial=start, disable=config.disable_tqdm or not main,
                  desc="grpo", dynamic_ncols=True)
  tokens_seen = int(metrics_logger.state.num_input_tokens_seen)
  step = start
  try:
    while step < max_steps:
      round_index = step // config.num_iterations
      nnx.update(model, state.params, state.frozen)
      try:
        prompts = next(iterator)
      except StopIteration:
        raise ValueError(f"the prompts ran out before step {step + 1} of max_steps={max_steps}; "
                         "lower max_steps") from None
      round_start = time.perf_counter()
      batch, round_metrics, table = rollout(model, state, prompts,
                                            sampler_key(state, round_index),
                                            prompts_per_step, step)
      round_tokens = int(batch["attention_mask"].sum())
      placed = place_micro_batches(batch, mesh, config.gradient_accumulation_steps)
      round_metrics["time/rollout"] = time.perf_counter() - round_start
      for iteration in range(config.num_iterations):
        step += 1
        step_start = time.perf_counter()
        state, metrics = step_fn(state, placed)
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        check_finite(step, {k: metrics[k] for k in ("loss", "grad_norm")})
        metrics["time/train"] = time.perf_counter() - step_start
        if iteration == 0:  # the round's tokens are seen once, however many updates reuse them
          tokens_seen += round_tokens
        metrics.update(round_metrics, num_tokens=tokens_seen)
        # The round's rollout is charged to its first update.
        metrics["step_time"] = metrics["time/train"] + (
          round_metrics["time/rollout"] if iteration == 0 else 0.0)
        progress.update(1)
        progress.set_postfix(loss=f"{metrics['loss']:.4f}", reward=f"{metrics['reward']:.3f}")
        if on_step is not None:
          on_step(step, metrics)
        if step % config.logging_steps == 0 or step == max_steps:
          metrics_logger.update_state(num_input_tokens_seen=tokens_seen)
          metrics_logger.log(step, metrics)
          if config.log_completions and main:
            write_completions(config.output_dir, step, table)
        if step % config.save_steps == 0 or step == max_steps:
          metrics_logger.update_state(num_input_tokens_seen=tokens_seen)
          checkpointer.save(step, state._replace(frozen=None), data_state=iterator.get_state(),
                            trainer_state=metrics_logger.state_json())
  finally:
    progress.close()
    checkpointer.close()  # finishes in-flight saves: the last good checkpoint is complete
    metrics_logger.save_state()
    metrics_logger.close()
    close = getattr(runner, "close", None)
    if close is not None:
      close()

  nnx.update(model, state.params, state.frozen)
  (export or default_export(tokenizer))(model, config.output_dir)
  return FitResult(model=model, state=state, history=list(metrics_logger.state.log_history))


@dataclasses.dataclass(frozen=True)
class _StepKey:
  """The options the compiled update depends on (the optimizer's and the objective's)."""

  learning_rate: float
  max_steps: int
  lr_scheduler_type: str
  warmup_steps: int
  warmup_ratio: float
  weight_decay: float
  adam_beta1: float
  adam_beta2: float
  adam_epsilon: float
  max_grad_norm: float
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
    names = [f.name for f in dataclasses.fields(cls) if f.name != "max_steps"]
    return cls(max_steps=max_steps, **{name: getattr(config, name) for name in names})


@functools.lru_cache(maxsize=4)
def _compiled_step(graphdef: nnx.GraphDef, key: _StepKey):
  """``(optimizer, jitted step)`` for a model structure and options; cached, so runs that differ
  only in data, output directory or resume point (a resumed run, a sweep over seeds) compile the
  step once per process."""
  from alignax.train.optim import make_optimizer
  from alignax.train.step import make_train_step

  optimizer, schedule = make_optimizer(
    key.learning_rate, max_steps=key.max_steps, lr_scheduler_type=key.lr_scheduler_type,
    warmup_steps=key.warmup_steps, warmup_ratio=key.warmup_ratio,
    weight_decay=key.weight_decay, adam_beta1=key.adam_beta1, adam_beta2=key.adam_beta2,
    adam_epsilon=key.adam_epsilon, max_grad_norm=key.max_grad_norm)
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
  """``(state, placed batch) -> ref_logp [N, L]``: a frozen copy of ``reference`` (default the
  initial policy), or with LoRA the policy's adapters-off view of the state's weights."""
  from alignax.models import LoRAParam

  if reference is None and trainable is LoRAParam:
    return lambda state, batch: stored_logprobs(graphdef, (state.params, state.frozen), batch,
                                                 temperature=temperature, adapters_off=True)
  ref_graphdef, ref_state = nnx.split(reference if reference is not None else model)
  # Copied: the policy's buffers are donated to the first step and would vanish under the reference.
  ref_state = jax.tree.map(jnp.copy, ref_state)
  return lambda state, batch: stored_logprobs(ref_graphdef, (ref_state,), batch,
                                               temperature=temperature)
