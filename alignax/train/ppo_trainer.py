r"""PPO with a critic for RLHF (TRL's ``PPOTrainer`` semantics; Schulman et al. 2017, Ziegler et al.
2019, Ouyang et al. 2022, Huang et al. 2024 "The N+ Implementation Details of RLHF with PPO").

Each round:

1. ``B`` prompts from the data (``task="prompt"``), one completion each from
   :func:`alignax.sampling.generate` at ``temperature`` (at most ``response_length`` tokens, ending
   at ``stop_token`` / ``stop_token_id``);
2. one no-gradient forward of the training model over prompt + completion: the behaviour policy's
   log-probs :math:`\log\pi_{old}` under ``softmax(logits / temperature)`` (the temperature the
   sampler drew with, Huang et al.'s detail), the critic's values :math:`V_{old}`, and the
   reference's log-probs (a frozen copy of the initial policy, or, with ``ref_ema_decay``, the
   policy's exponential moving average, updated after every optimizer step by
   :func:`reference_ema`);
3. the score :math:`s` of the frozen reward model on the full sequence (token ids when it shares the
   policy's vocabulary), plus any ``reward_funcs``; ``missing_eos_penalty`` is subtracted from the
   score of a completion without EOS;
4. per-token rewards :math:`r_t = -\beta\,\widehat{\mathrm{KL}}_t + [t = \text{last}]\,s`
   (:func:`alignax.kl_penalized_rewards`, ``kl_estimator`` k1 or k3; :math:`\beta` fixed at
   ``kl_coef`` or adapted towards ``target_kl`` by :func:`alignax.adaptive_kl_controller`),
   optionally whitened without the mean shift (``whiten_rewards``);
5. GAE (:func:`alignax.gae`, ``gamma``, ``lam``) over the completion tokens, returns
   :math:`R = A + V_{old}`, advantages whitened over the batch's tokens;
6. ``num_ppo_epochs`` passes over the rollout, each shuffled into ``num_mini_batches`` minibatches,
   one optimizer step of :func:`ppo_objective` (:func:`alignax.ppo_loss`: clipped surrogate with
   ``cliprange`` plus ``vf_coef`` times the clipped value loss with ``cliprange_value``) per
   minibatch, through the engine's exact-accumulation step; one optimizer trains the policy and the
   critic together (TRL's ``PolicyAndValueWrapper``).

The critic is a separate :class:`alignax.models.ValueModel` (``value_model_path``; by default the
reward model's weights with a per-token read-out, as TRL's script initialises it) or, with
``value_head_on_policy``, a linear head on the policy's final hidden states (one forward serves
both; the value loss then trains the policy's body too).

Batch sizes: one optimizer step (a minibatch) sees ``per_device_train_batch_size × (data × fsdp
devices) × gradient_accumulation_steps`` completions; a round samples ``num_mini_batches`` times
that and takes ``num_ppo_epochs × num_mini_batches`` optimizer steps. One step is one optimizer
update, as in GRPO and transformers' ``Trainer`` (``max_steps``, ``save_steps``, ``logging_steps``,
``eval_steps``); TRL's PPO counts rollouts instead (see :class:`PPOConfig`). The rounds run on the
online trainers' host loop (:func:`alignax.train.online.run_rounds`: window-averaged metrics,
completions, Ctrl-C, export, the in-training evaluation of ``eval_num_prompts``); checkpoints are
taken at round boundaries only (the first at or after each multiple of ``save_steps``) and hold
the KL coefficient (the loop's host state) and the EMA reference (in the optimizer state) with the
parameters, so a resumed run replays the same trajectory (the sampler's key and the minibatch
shuffles are derived from the seed and the round).

Where alignax deviates from TRL's ``PPOTrainer``:

- the score is paid at the completion's last real token (the stop token when it stopped), with a
  bootstrap value of 0 after it, as Huang et al. describe; TRL truncates after the stop token and
  pays at the last non-pad token, which is the same position, but with ``stop_token=None`` both
  score the whole ``response_length`` tokens (TRL parity);
- token metrics (entropy, KL, ratios, clip fractions) are means over the completion tokens only,
  never over padding;
- batch sizing is TRL's (its ``batch_size = per_device_train_batch_size ×
  gradient_accumulation_steps × num_mini_batches × world_size`` completions per rollout), with the
  world size the mesh's data × fsdp devices rather than the number of processes; the step unit is
  not (above);
- gradients are not clipped by default (``max_grad_norm=None``, as TRL's loop, which never
  clips); set ``max_grad_norm`` to clip the policy's and the critic's joint gradient;
- with ``kl_coef=0`` and no ``target_kl`` the reference forward is skipped (the penalty is 0) and
  ``objective/kl`` is not logged.

The Huang et al. invariants hold by construction and are tested: the rollout's old log-probs come
from the same forward the loss runs, at the sampling temperature, so the first minibatch of every
round has ratio 1, no clipping and zero approximate KL.
"""

import copy
import dataclasses
import functools
import logging
import math
import time
import types
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jaxtyping import Array, Bool, Float

from alignax import _validate
from alignax.train.config import TrainingConfig
from alignax.train.optim import OptimizerOptions
from alignax.train.online import (IMPORTANCE_SAMPLING_MODES, as_text, check_prompt_budget,
                                  importance_metrics, importance_weights, place_micro_batches,
                                  prompt_dataset, shard_rows, stored_logprobs, to_token_positions)
from alignax.train.step import Objective, TrainState

logger = logging.getLogger("alignax.train")

# TRL's PPO accepts k1 and k3 for the reward's KL (k2 is what it logs as approx-KL).
PPO_KL_ESTIMATORS = ("k1", "k3")
STOP_TOKENS = ("eos",)
# Folded into the seed for the minibatch shuffles: a stream apart from the sampler's.
SHUFFLE_STREAM = 0x9905
# The objective's token mean of the squared ratio, turned into ``val/ratio_var`` per step.
RATIO_SQUARE = "_ratio_square"


@dataclasses.dataclass
class PPOConfig(TrainingConfig):
  """PPO with a critic (TRL's ``PPOConfig`` names and defaults, plus alignax's ``target_kl``,
  ``ref_ema_decay`` and ``value_head_on_policy``).

  Steps: ``max_steps``, ``save_steps``, ``logging_steps`` and ``eval_steps`` count optimizer
  updates (one minibatch each), as GRPO and transformers' ``Trainer`` do. A rollout takes
  ``num_ppo_epochs × num_mini_batches`` of them, so TRL's per-rollout counts map as ``max_steps =
  rollouts × num_ppo_epochs × num_mini_batches`` (``max_steps`` must be such a multiple: every
  rollout gets all its updates) and TRL's ``save_steps=N`` rollouts is alignax's ``N ×
  num_ppo_epochs × num_mini_batches``; a ``save_steps`` that is not a multiple saves at the first
  rollout boundary at or after each multiple. ``max_grad_norm`` defaults to None (no clipping),
  as TRL's PPO loop.

  Attributes:
    sft_model_path: the policy to start from (TRL's name; ``--model_name_or_path`` is used when
      unset).
    reward_model_path: the frozen reward model (an alignax reward model or any HF
      ``*ForSequenceClassification`` checkpoint).
    value_model_path: the critic's initial weights (a reward-model or causal-LM checkpoint read
      with a per-token value head; default ``reward_model_path``, as TRL's script does).
    value_head_on_policy: no separate critic: a linear value head on the policy's final hidden
      states (the value loss then trains the policy's body too).
    reward_funcs: extra reward functions (built-in names or ``module.function`` paths, TRL's
      contract) whose weighted sum is added to the reward model's score.
    reward_weights: one weight per reward function (needs reward functions).
    num_ppo_epochs: passes over each rollout (TRL: 4).
    num_mini_batches: minibatches (optimizer steps) per pass (TRL: 1).
    total_episodes: completions to train on in all (TRL's name; sets ``max_steps``, so the two
      are exclusive).
    response_length: the most tokens sampled per completion (TRL: 53).
    stop_token: ``eos``: completions end at the tokenizer's EOS (None: no stop token unless
      ``stop_token_id``; TRL's default, every completion runs to ``response_length``).
    stop_token_id: the id that ends a completion (exclusive with ``stop_token``).
    temperature: sampling temperature; the training forward divides its logits by it too (TRL: 0.7).
    missing_eos_penalty: subtracted from the score of a completion without EOS (> 0; None: off;
      without a stop token the sampler does not stop at EOS, and a warning says so).
    kl_coef: the KL penalty's coefficient β in the reward (TRL: 0.05); the starting value when
      ``target_kl`` is set.
    kl_estimator: the per-token KL in the reward: ``k1`` (log-ratio, TRL's default) or ``k3``.
    target_kl: adapt β towards this mean sequence KL (Ziegler et al.'s proportional controller;
      None: β fixed).
    kl_horizon: the controller's horizon in completions (Ziegler et al.: 10000).
    ref_ema_decay: the reference follows the policy as an exponential moving average with this
      decay, updated after every optimizer step (None: a frozen copy of the initial policy).
    whiten_rewards: scale the per-token rewards to unit variance (no mean shift; TRL: off).
    cliprange: the ratio's clip range ε (TRL: 0.2).
    vf_coef: the value loss's coefficient (TRL: 0.1).
    cliprange_value: the value clip range (TRL: 0.2).
    gamma: GAE's discount γ (TRL: 1.0).
    lam: GAE's λ (TRL: 0.95).
    importance_sampling_correction: multiply the policy term by the truncated (or masked) ratio of
      the trainer's to the sampler's probability of each sampled token (as GRPO's option and
      TRL's ``vllm_importance_sampling_correction``; off by default: the sampler is alignax's own).
    importance_sampling_mode: ``token_truncate`` | ``token_mask`` | ``sequence_truncate`` |
      ``sequence_mask`` (``alignax.train.online.importance_weights``).
    importance_sampling_cap: the ratio's upper bound.
    log_completions: write completions with their scores to ``output_dir/completions/`` every
      ``logging_steps``.
  """

  learning_rate: float = 3e-6
  sft_model_path: str | None = None
  reward_model_path: str | None = None
  value_model_path: str | None = None
  value_head_on_policy: bool = False
  reward_funcs: list[str] | None = None
  reward_weights: list[float] | None = None
  num_ppo_epochs: int = 4
  num_mini_batches: int = 1
  total_episodes: int | None = None
  response_length: int = 53
  stop_token: str | None = None
  stop_token_id: int | None = None
  temperature: float = 0.7
  missing_eos_penalty: float | None = None
  kl_coef: float = 0.05
  kl_estimator: str = dataclasses.field(default="k1", metadata={"choices": PPO_KL_ESTIMATORS})
  target_kl: float | None = None
  kl_horizon: float = 10000.0
  ref_ema_decay: float | None = None
  whiten_rewards: bool = False
  cliprange: float = 0.2
  vf_coef: float = 0.1
  cliprange_value: float = 0.2
  gamma: float = 1.0
  lam: float = 0.95
  importance_sampling_correction: bool = False
  importance_sampling_mode: str = dataclasses.field(default="token_truncate",
                                                    metadata={"choices": IMPORTANCE_SAMPLING_MODES})
  importance_sampling_cap: float = 3.0
  log_completions: bool = True
  # TRL's PPO loop never clips the gradient.
  max_grad_norm: float | None = None

  def __post_init__(self):
    super().__post_init__()
    _validate.choice("importance_sampling_mode", self.importance_sampling_mode,
                     IMPORTANCE_SAMPLING_MODES)
    _validate.positive("importance_sampling_cap", self.importance_sampling_cap)
    for name in ("num_ppo_epochs", "num_mini_batches", "response_length"):
      _validate.positive_int(name, getattr(self, name))
    if self.total_episodes is not None:
      _validate.positive_int("total_episodes", self.total_episodes)
      if self.max_steps != -1:
        raise ValueError(f"total_episodes={self.total_episodes} and max_steps={self.max_steps} "
                         "both set the run's length: give one")
    if self.stop_token is not None:
      _validate.choice("stop_token", self.stop_token, STOP_TOKENS)
      if self.stop_token_id is not None:
        raise ValueError(f"stop_token={self.stop_token!r} and stop_token_id={self.stop_token_id} "
                         "are exclusive: give one")
    if self.stop_token_id is not None and (isinstance(self.stop_token_id, bool)
                                           or not isinstance(self.stop_token_id, int)
                                           or self.stop_token_id < 0):
      raise ValueError(f"stop_token_id must be a token id (an int >= 0), got "
                       f"{self.stop_token_id!r}")
    _validate.positive("temperature", self.temperature)
    if self.missing_eos_penalty is not None:
      _validate.positive("missing_eos_penalty", self.missing_eos_penalty)
    _validate.non_negative("kl_coef", self.kl_coef)
    _validate.choice("kl_estimator", self.kl_estimator, PPO_KL_ESTIMATORS)
    if self.target_kl is not None:
      _validate.positive("target_kl", self.target_kl)
      if self.kl_coef == 0:
        raise ValueError("target_kl adapts kl_coef multiplicatively, so it needs kl_coef > 0 to "
                         "start from")
    _validate.positive("kl_horizon", self.kl_horizon)
    if self.ref_ema_decay is not None:
      _validate.in_unit_interval("ref_ema_decay", self.ref_ema_decay, closed_right=True)
    _validate.in_unit_interval("cliprange", self.cliprange)
    _validate.non_negative("vf_coef", self.vf_coef)
    _validate.non_negative("cliprange_value", self.cliprange_value)
    _validate.in_unit_interval("gamma", self.gamma, closed_right=True)
    _validate.in_unit_interval("lam", self.lam, closed_right=True)
    if self.value_head_on_policy and self.value_model_path:
      raise ValueError("value_head_on_policy=True puts the critic on the policy; drop "
                       f"value_model_path={self.value_model_path!r}")
    updates = self.updates_per_round
    if self.max_steps != -1 and self.max_steps % updates:
      raise ValueError(f"max_steps={self.max_steps} must be a multiple of num_ppo_epochs × "
                       f"num_mini_batches = {updates} (each rollout gets all its updates)")

  @property
  def updates_per_round(self) -> int:
    """Optimizer steps per rollout: ``num_ppo_epochs × num_mini_batches``."""
    return self.num_ppo_epochs * self.num_mini_batches


# --- the model: a policy and its critic ----------------------------------------------------------


class ActorCritic(nnx.Module):
  """The policy and its critic as one module, so one optimizer trains both (TRL's
  ``PolicyAndValueWrapper``).

  Args:
    policy: an :class:`alignax.models.CausalLM`.
    critic: an :class:`alignax.models.ValueModel`, or None for a value head on the policy.
    seed: initialises the value head (normal, std 0.02, as a fresh ``score`` head).
  """

  def __init__(self, policy: nnx.Module, critic: nnx.Module | None = None, *, seed: int = 0):
    self.policy = policy
    self.critic = critic
    # One assignment: nnx fixes an attribute's kind (static None or a parameter) when first set.
    self.value_head = None if critic is not None else nnx.Param(nnx.initializers.normal(0.02)(
      jax.random.key(seed), (policy.config.hidden_size, 1), jnp.float32))

  def outputs(self, batch: dict[str, Any], *, temperature: float, impl: str = "auto"):
    """Per-token log-probs and entropy under ``softmax(logits / temperature)``, the loss mask
    and the critic's values, all ``[B, L]`` in next-token alignment (position ``t`` scores token
    ``t + 1`` and holds the value of the state before it)."""
    from alignax.kernels import token_logprobs
    from alignax.losses.supervised import next_token_targets

    ids, attention = batch["input_ids"], batch["attention_mask"]
    targets, mask = next_token_targets(ids, attention, completion_mask=batch["completion_mask"])
    hidden = self.policy(ids, attention, compute_logits=False).hidden_states
    out = token_logprobs(hidden, self.policy.get_lm_head(), targets, mask=mask,
                         temperature=temperature, impl=impl)
    if self.critic is None:
      # fp32 accumulation, as the reward and value heads read their scores.
      values = jnp.einsum("btd,dl->btl", hidden, self.value_head[...].astype(hidden.dtype),
                          preferred_element_type=jnp.float32)[..., 0]
    else:
      values = self.critic(ids, attention).scores
    return out, mask, jnp.where(mask, values, 0.0)


@functools.partial(jax.jit, static_argnames=("graphdef", "temperature"))
def _behaviour_outputs(graphdef: nnx.GraphDef, states: tuple, batch: dict[str, jax.Array], *,
                       temperature: float) -> tuple[jax.Array, jax.Array]:
  """``(old_logp, values)``, each ``[B, L]`` and 0 off the completion tokens: the rollout's
  no-gradient forward of the training model (the same code the objective runs)."""
  model = nnx.merge(graphdef, *states)
  out, mask, values = model.outputs(batch, temperature=temperature)
  return jnp.where(mask, out.logp, 0.0), values


# --- layer 3: the objective over a stored rollout ------------------------------------------------


def ppo_objective(graphdef: nnx.GraphDef, *, cliprange: float = 0.2, vf_coef: float = 0.1,
                  cliprange_value: float = 0.2, temperature: float = 1.0,
                  impl: str = "auto") -> Objective:
  r"""PPO's loss over one micro-batch of a stored rollout (layer 3).

  .. math:: \mathcal{L} = \operatorname{mean}_t \max\big(-A_t r_t,\,-A_t\,\mathrm{clip}(r_t,
            1\pm\epsilon)\big) + c_V\,\operatorname{mean}_t \tfrac12\max\big((V_t - R_t)^2,
            (\mathrm{clip}(V_t, V^{old}_t \pm \epsilon_V) - R_t)^2\big),

  :math:`r_t = \pi_\theta(o_t)/\pi_{old}(o_t)` (:func:`alignax.ppo_loss`, token means over the
  completion tokens; TRL's PPO loss). The batch holds, all ``[B, L]`` in next-token alignment:
  ``input_ids``, ``attention_mask``, ``completion_mask``, ``old_logp``, ``values`` (the critic's at
  rollout time), ``advantages`` and ``returns``. ``graphdef`` is an :class:`ActorCritic`'s.

  Metrics, TRL's names (each the minibatch's token mean): ``loss/policy_avg``, ``loss/value_avg``,
  ``policy/approxkl_avg`` (:math:`\tfrac12(\log r)^2`, TRL's estimator), ``policy/clipfrac_avg``,
  ``val/clipfrac_avg``, ``policy/entropy_avg``, ``val/ratio``, and ``values/mean``.

  The micro-batch weight is its number of completion tokens, so accumulation gives the
  minibatch's token mean exactly.
  """
  from alignax.aggregation import masked_count, masked_mean
  from alignax.losses.policy import ppo_loss
  from alignax.losses.supervised import next_token_targets

  def loss(params: Any, frozen: Any, batch: dict[str, Any], key: jax.Array):
    del key  # the decoder has no dropout
    model = nnx.merge(graphdef, params, frozen)
    out, mask, values = model.outputs(batch, temperature=temperature, impl=impl)
    total, metrics = ppo_loss(out.logp, batch["old_logp"], batch["advantages"], mask,
                              values=values, old_values=batch["values"], returns=batch["returns"],
                              clip_eps_low=cliprange, vf_coef=vf_coef,
                              value_clip_eps=cliprange_value, loss_agg_mode="token_mean",
                              entropy=out.entropy)
    log_ratio = jax.lax.stop_gradient(jnp.where(mask, out.logp - batch["old_logp"], 0.0))
    trl = {
      "loss/policy_avg": metrics["policy_loss"], "loss/value_avg": metrics["loss/value"],
      "policy/approxkl_avg": masked_mean(0.5 * jnp.square(log_ratio), mask),
      "policy/clipfrac_avg": metrics["clip_ratio/region_mean"],
      "val/clipfrac_avg": metrics["val/clipfrac"], "policy/entropy_avg": metrics["entropy"],
      "val/ratio": masked_mean(jnp.exp(log_ratio), mask),
      # E[r^2], so the step's token variance of the ratio is exact under accumulation.
      RATIO_SQUARE: masked_mean(jnp.exp(2 * log_ratio), mask),
      "values/mean": masked_mean(jax.lax.stop_gradient(values), mask),
    }
    return total, trl

  def weight(batch: dict[str, Any]) -> jax.Array:
    _, mask = next_token_targets(batch["input_ids"], batch["attention_mask"],
                                 completion_mask=batch["completion_mask"])
    return masked_count(mask)

  return Objective(loss=loss, weight=weight)


# --- rewards, GAE and whitening (pure) -----------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("kl_estimator", "whiten_rewards", "gamma", "lam"))
def ppo_advantages(logp: Float[Array, "B L"], ref_logp: Float[Array, "B L"],
                   values: Float[Array, "B L"], scores: Float[Array, " B"],
                   mask: Bool[Array, "B L"], kl_coef: Float[Array, ""], *, kl_estimator: str,
                   whiten_rewards: bool, gamma: float, lam: float) -> dict[str, Array]:
  r"""A rollout's KL-penalised rewards, GAE advantages and returns (TRL's PPO, steps 4-6).

  .. math:: r_t = -\beta\,\widehat{\mathrm{KL}}_t + [t = t_{last}]\,s,\quad
            \delta_t = r_t + \gamma V_{t+1} - V_t,\quad A_t = \delta_t + \gamma\lambda A_{t+1},
            \quad R_t = A_t + V_t,

  then :math:`A` whitened over the batch's valid tokens (Huang et al. 2024); with
  ``whiten_rewards`` the rewards are first scaled to unit variance without the mean shift.

  Args:
    logp: the behaviour policy's log-probs of the sampled tokens, ``[B, L]``.
    ref_logp: the reference's, ``[B, L]``.
    values: the critic's values at rollout time, ``[B, L]``.
    scores: sequence scores ``[B]`` (reward model, reward functions, EOS penalty).
    mask: ``[B, L]`` True on the completion tokens.
    kl_coef: β (traced: the adaptive controller changes it without recompiling).
    kl_estimator: ``k1`` or ``k3``.
    whiten_rewards: TRL's ``whiten_rewards``.
    gamma, lam: GAE's γ and λ.

  Returns:
    ``kl`` (per-token estimate), ``non_score_reward`` (:math:`-\beta\,\widehat{KL}`),
    ``rewards``, ``advantages`` (whitened) and ``returns``, each ``[B, L]``, 0 off the mask.
  """
  from alignax.advantages import gae
  from alignax.aggregation import masked_whiten
  from alignax.kl import kl_estimate, kl_penalized_rewards

  kl = jnp.where(mask, kl_estimate(jnp.where(mask, logp, 0.0), jnp.where(mask, ref_logp, 0.0),
                                   kl_estimator=kl_estimator), 0.0)
  rewards = kl_penalized_rewards(logp, ref_logp, scores, mask, beta=kl_coef,
                                 kl_estimator=kl_estimator)
  if whiten_rewards:
    rewards = masked_whiten(rewards, mask, shift_mean=False)
  advantages, returns = gae(rewards, values, mask, gamma=gamma, lambda_=lam)
  return {"kl": kl, "non_score_reward": jnp.where(mask, -kl_coef * kl, 0.0), "rewards": rewards,
          "advantages": masked_whiten(advantages, mask), "returns": returns}


# --- the reference: frozen or an EMA of the policy -----------------------------------------------


class ReferenceEMAState(NamedTuple):
  """The reference's weights when it is the policy's moving average (the policy's Param state)."""

  params: Any


def reference_ema(decay: float, *, select: Callable[[Any], Any] = lambda params: params
                  ) -> optax.GradientTransformation:
  r"""Keeps :math:`\theta_{ref} \leftarrow d\,\theta_{ref} + (1 - d)\,\theta` after every step.

  An optax transformation placed last in the chain (it passes the updates through and averages
  ``select(params + updates)``, the parameters the step produces), so the moving reference lives in
  the optimizer state: checkpoints, resume and sharding carry it like Adam's moments. It starts at
  ``select`` of the initial parameters.

  Args:
    decay: :math:`d \in [0, 1]`; 1 keeps the initial weights, 0 copies the policy.
    select: the part of the trainable parameters the reference averages (PPO: the policy, not
      the critic).
  """
  _validate.in_unit_interval("decay", decay, closed_right=True)

  def init(params: Any) -> ReferenceEMAState:
    return ReferenceEMAState(params=jax.tree.map(jnp.copy, select(params)))

  def update(updates: Any, state: ReferenceEMAState, params: Any = None
             ) -> tuple[Any, ReferenceEMAState]:
    if params is None:
      raise ValueError("reference_ema needs the parameters: call update(updates, state, params)")
    new = select(optax.apply_updates(params, updates))
    average = jax.tree.map(lambda r, p: (decay * r + (1 - decay) * p).astype(r.dtype),
                           state.params, new)
    return updates, ReferenceEMAState(params=average)

  return optax.GradientTransformation(init, update)


class _Reference:
  """The reference policy's log-probs of a rollout: a frozen copy of the initial policy (or of a
  given reference model), or the EMA the optimizer state keeps (:func:`reference_ema`)."""

  def __init__(self, reference: nnx.Module, *, ema: bool):
    self.graphdef, params, rest = nnx.split(reference, nnx.Param, ...)
    # Copied: the policy's buffers are donated to the first step and would vanish under it.
    self.rest = jax.tree.map(jnp.copy, rest)
    self.params = None if ema else jax.tree.map(jnp.copy, params)

  def params_of(self, state: TrainState) -> Any:
    if self.params is not None:
      return self.params
    return next(s for s in jax.tree.leaves(state.opt_state,
                                           is_leaf=lambda x: isinstance(x, ReferenceEMAState))
                if isinstance(s, ReferenceEMAState)).params

  def logprobs(self, state: TrainState, batch: dict[str, jax.Array], *,
               temperature: float) -> jax.Array:
    return stored_logprobs(self.graphdef, (self.params_of(state), self.rest), batch,
                           temperature=temperature)


class _KLCoefficient:
  """The KL coefficient β (fixed or adaptive) as the host loop's checkpointed host state."""

  def __init__(self, config: PPOConfig):
    from alignax.kl import adaptive_kl_controller, fixed_kl_controller

    if config.target_kl is None:
      self.controller = fixed_kl_controller(kl_coef=config.kl_coef)
    else:
      controller = adaptive_kl_controller(init_kl_coef=config.kl_coef, target=config.target_kl,
                                          horizon=config.kl_horizon)
      # One compiled update instead of a compile per eager scalar op, round after round.
      self.controller = controller._replace(update=jax.jit(controller.update))
    self.state = self.controller.init()

  @property
  def value(self) -> float:
    return float(self.state.kl_coef)

  def observe(self, kl: float, samples: int) -> None:
    """Ziegler et al.'s update from a rollout's mean sequence KL over ``samples`` completions."""
    self.state = self.controller.update(self.state, kl, samples)

  def state_dict(self) -> dict[str, float]:
    return {"kl_coef": self.value}

  def load_state_dict(self, state: dict[str, float]) -> None:
    from alignax.kl import KLControllerState

    self.state = KLControllerState(kl_coef=jnp.asarray(state["kl_coef"], jnp.float32))


# --- rollout -------------------------------------------------------------------------------------


class _Rollout:
  """Builds one round's stored batch on the host: generation, scoring, the behaviour forward,
  rewards and advantages."""

  def __init__(self, *, config: PPOConfig, graphdef: nnx.GraphDef, reference: _Reference | None,
               kl: _KLCoefficient, scorer: Any, runner: Any, tokenizer: Any,
               mesh: jax.sharding.Mesh, stop_token_ids: tuple[int, ...], eos_token_id: int | None,
               forward_rows: int, max_steps: int):
    self.config, self.graphdef, self.reference, self.kl = config, graphdef, reference, kl
    self.scorer, self.runner, self.tokenizer, self.mesh = scorer, runner, tokenizer, mesh
    self.stop_token_ids, self.eos_token_id = stop_token_ids, eos_token_id
    self.forward_rows, self.max_steps = forward_rows, max_steps
    self.same_vocabulary = scorer is not None and _same_vocabulary(scorer.tokenizer, tokenizer)

  def __call__(self, model: ActorCritic, state: TrainState, prompts: dict[str, Any], *,
               key: jax.Array, step: int) -> Any:
    from alignax.sampling import generate
    from alignax.train.online import Round

    c = self.config
    kl_coef = self.kl.value
    timings = {}
    start = time.perf_counter()
    sample = jax.device_get(generate(
      model.policy, prompts["input_ids"], prompts["attention_mask"],
      max_new_tokens=c.response_length, temperature=c.temperature,
      stop_token_ids=self.stop_token_ids, key=key))
    timings["time/generation"] = time.perf_counter() - start

    tokens, lengths = np.asarray(sample.tokens), np.asarray(sample.lengths)
    completion_mask = np.asarray(sample.completion_mask)
    prompt_ids, prompt_mask = np.asarray(sample.prompt_ids), np.asarray(sample.prompt_mask)
    prompt_length = prompt_ids.shape[1]
    input_ids = np.concatenate([prompt_ids, tokens], axis=1).astype(np.int32)
    batch = {"input_ids": input_ids,
             "attention_mask": np.concatenate([prompt_mask, completion_mask], 1).astype(np.int32),
             "completion_mask": np.concatenate([np.zeros_like(prompt_mask), completion_mask],
                                               1).astype(np.int32)}
    total = input_ids.shape[1]

    start = time.perf_counter()
    completion_ids = [row[:n].tolist() for row, n in zip(tokens, lengths)]
    completions = self.tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    extras = dict(prompts.get("extras", {}))
    prompt_values = extras.pop("prompt", None)
    if prompt_values is None:  # prompts given as ids only: their decoded text stands in
      prompt_values = self.tokenizer.batch_decode(
        [row[m.astype(bool)].tolist() for row, m in zip(prompt_ids, prompt_mask)],
        skip_special_tokens=True)
    has_eos = np.array([self.eos_token_id is not None and self.eos_token_id in ids
                        for ids in completion_ids])
    scores, sources, per_source, metrics = self._score(
      prompt_ids, prompt_mask, completion_ids, list(prompt_values), completions, extras, step,
      has_eos)
    raw_scores = scores.copy()
    if c.missing_eos_penalty is not None:
      scores = np.where(has_eos, scores, scores - c.missing_eos_penalty).astype(np.float32)
    timings["time/reward"] = time.perf_counter() - start

    start = time.perf_counter()
    old_logp, values, ref_logp = (np.zeros((len(input_ids), total), np.float32)
                                  for _ in range(3))
    reference_time = 0.0
    # The no-gradient forwards in chunks of one micro-batch, so their memory is the training's.
    for lo in range(0, len(input_ids), self.forward_rows):
      rows = slice(lo, lo + self.forward_rows)
      placed = shard_rows({k: v[rows] for k, v in batch.items()}, self.mesh)
      outputs = _behaviour_outputs(self.graphdef, (state.params, state.frozen), placed,
                                   temperature=c.temperature)
      old_logp[rows], values[rows] = (np.asarray(x) for x in jax.device_get(outputs))
      if self.reference is None:  # kl_coef = 0: a KL of 0 leaves the rewards as they are
        ref_logp[rows] = old_logp[rows]
        continue
      ref_start = time.perf_counter()
      ref_logp[rows] = np.asarray(jax.device_get(
        self.reference.logprobs(state, placed, temperature=c.temperature)))
      reference_time += time.perf_counter() - ref_start
    timings["time/old_logp"] = time.perf_counter() - start - reference_time
    timings["time/reference"] = reference_time

    valid = to_token_positions(completion_mask, prompt_length, total).astype(bool)
    sampler_logp = to_token_positions(np.asarray(sample.logprobs, np.float32), prompt_length,
                                      total)
    difference = np.abs(old_logp - sampler_logp)[valid]
    for name, reduce in (("mean", np.mean), ("max", np.max)):
      metrics[f"sampling/sampling_logp_difference/{name}"] = (
        float(reduce(difference)) if difference.size else 0.0)

    shaped = jax.device_get(ppo_advantages(
      jnp.asarray(old_logp), jnp.asarray(ref_logp), jnp.asarray(values), jnp.asarray(scores),
      jnp.asarray(valid), jnp.asarray(kl_coef, jnp.float32), kl_estimator=c.kl_estimator,
      whiten_rewards=c.whiten_rewards, gamma=c.gamma, lam=c.lam))
    shaped = {k: np.asarray(v, np.float32) for k, v in shaped.items()}
    advantages = shaped["advantages"]
    if c.importance_sampling_correction:
      # The weight w >= 0 scales both sides of the clipped surrogate's min: weighting the
      # advantage weights the policy term (the value loss is left as it is).
      weights = importance_weights(old_logp, sampler_logp, valid,
                                   mode=c.importance_sampling_mode, cap=c.importance_sampling_cap)
      metrics.update(importance_metrics(weights, valid, mode=c.importance_sampling_mode))
      advantages = advantages * weights
    batch.update(old_logp=old_logp, values=values, advantages=advantages,
                 returns=shaped["returns"])

    kl_per_row = shaped["kl"].sum(axis=1)
    non_score = shaped["non_score_reward"].sum(axis=1)
    if self.reference is not None:
      metrics["objective/kl"] = float(kl_per_row.mean())
    metrics.update({
      "objective/entropy": float(-old_logp.sum(axis=1).mean()),
      "objective/non_score_reward": float(non_score.mean()),
      "objective/rlhf_reward": float(non_score.mean() + scores.mean()),
      "objective/scores": float(scores.mean()),
      "objective/scores_std": float(scores.std()),
      "objective/kl_coef": kl_coef,
      "val/num_eos_tokens": float(sum(ids.count(self.eos_token_id) for ids in completion_ids)
                                  if self.eos_token_id is not None else 0),
      "completions/eos_ratio": float(has_eos.mean()),
    })
    metrics.update(timings)
    metrics.update(_length_metrics(lengths, np.asarray(sample.stopped)))
    table = [{"prompt": as_text(prompt_values[i]), "completion": completions[i],
              "score": float(scores[i]), "raw_score": float(raw_scores[i]),
              **{f"rewards/{name}": (None if np.isnan(v) else float(v))
                 for name, v in zip(sources, per_source[i])},
              "kl": float(kl_per_row[i]), "has_eos": bool(has_eos[i])}
             for i in range(len(completions))]
    if self.reference is not None:
      # The controller sees this rollout's KL; the next round's rewards use the new coefficient.
      self.kl.observe(metrics["objective/kl"], len(completions))
    return Round(batch=batch, metrics=metrics, tokens=int(batch["attention_mask"].sum()),
                 completions=table)

  def _score(self, prompt_ids, prompt_mask, completion_ids, prompts, completions, extras, step,
             has_eos):
    """Scores ``[B]``: the reward model's plus the reward functions' weighted sum."""
    count = len(completion_ids)
    scores = np.zeros(count, np.float32)
    names, columns, metrics = [], [], {}
    if self.scorer is not None:
      if self.same_vocabulary:
        # The ids the policy produced, as TRL scores them: no decode / re-encode round trip.
        sequences = [row[m.astype(bool)].tolist() + ids
                     for row, m, ids in zip(prompt_ids, prompt_mask, completion_ids)]
        model_scores = self.scorer.score_ids(sequences)
      else:
        model_scores = self.scorer.score_ids(_text_sequences(self.scorer, prompts, completions,
                                                             has_eos))
      scores += model_scores
      names.append(self.scorer.name)
      columns.append(model_scores)
      metrics[f"rewards/{self.scorer.name}/mean"] = float(model_scores.mean())
      metrics[f"rewards/{self.scorer.name}/std"] = float(model_scores.std())
    if self.runner is not None:
      scored = self.runner(prompts, completions, completion_ids, columns=extras,
                           num_generations=1,
                           trainer_state=types.SimpleNamespace(global_step=step,
                                                               max_steps=self.max_steps))
      scores += np.nan_to_num(np.asarray(scored.rewards, np.float32))
      names += list(scored.names)
      columns += list(np.asarray(scored.per_source, np.float32).T)
      metrics.update({k: float(v) for k, v in scored.metrics.items()})
    per_source = np.stack(columns, axis=1) if columns else np.zeros((count, 0), np.float32)
    return scores.astype(np.float32), names, per_source, metrics


def _text_sequences(scorer: Any, prompts: list[Any], completions: list[str],
                    has_eos: np.ndarray) -> list[list[int]]:
  """The reward model's token ids of prompt + decoded completion, ending with its EOS only where
  the policy's completion had one (the scorer's ``append_eos`` would end truncated completions
  with EOS too, and score them as finished)."""
  from alignax.rewards.contract import is_conversational

  plain = copy.copy(scorer)
  plain.append_eos = False
  eos = scorer.tokenizer.eos_token_id
  sequences = []
  for prompt, completion, ended in zip(prompts, completions, has_eos):
    ids = plain.encode(prompt, completion)
    # A chat template closes the assistant turn itself; plain text gets EOS as the scorer would.
    if (ended and scorer.append_eos and eos is not None and not is_conversational(prompt)
        and (not ids or ids[-1] != eos)):
      ids.append(eos)
    sequences.append(ids)
  return sequences


def _same_vocabulary(a: Any, b: Any) -> bool:
  return a is b or (len(a) == len(b) and a.get_vocab() == b.get_vocab())


def _length_metrics(lengths: np.ndarray, stopped: np.ndarray) -> dict[str, float]:
  terminated = lengths[stopped]
  metrics = {"completions/mean_length": float(lengths.mean()),
             "completions/min_length": float(lengths.min()),
             "completions/max_length": float(lengths.max()),
             "completions/clipped_ratio": float(1.0 - stopped.mean())}
  for name, fn in (("mean", np.mean), ("min", np.min), ("max", np.max)):
    metrics[f"completions/{name}_terminated_length"] = (float(fn(terminated)) if terminated.size
                                                        else 0.0)
  return metrics


def minibatch_rows(seed: int, round_index: int, epoch: int, rows: int,
                   num_mini_batches: int) -> list[np.ndarray]:
  """The rows of each minibatch of one epoch: a fresh shuffle per epoch (TRL), derived from the
  seed, the round and the epoch so a resumed run shuffles as the uninterrupted one did."""
  rng = np.random.default_rng([seed, SHUFFLE_STREAM, round_index, epoch])
  return np.split(rng.permutation(rows), num_mini_batches)


# --- loading -------------------------------------------------------------------------------------


def _load_scorer(reward_model: Any, config: PPOConfig, *, tokenizer: Any, mesh: Any,
                 batch_size: int) -> Any:
  """The frozen reward model as a :class:`alignax.rewards.RewardModelScorer` (or None)."""
  from alignax.models import RewardModel
  from alignax.rewards import RewardModelScorer, load_reward_model

  if reward_model is None:
    reward_model = config.reward_model_path
  if reward_model is None or isinstance(reward_model, RewardModelScorer):
    return reward_model
  if isinstance(reward_model, RewardModel):
    return RewardModelScorer(reward_model, tokenizer, name="reward_model", batch_size=batch_size)
  if isinstance(reward_model, str):
    from alignax.models.tokenizer import load_tokenizer

    try:
      own = load_tokenizer(reward_model)
    except (OSError, ValueError):  # a checkpoint saved without its tokenizer: the policy's
      own = tokenizer
    return load_reward_model(reward_model, tokenizer=own, mesh=mesh, batch_size=batch_size)
  raise ValueError(f"reward_model must be a RewardModelScorer, an alignax RewardModel or a "
                   f"checkpoint path, got {type(reward_model).__name__}")


def _value_model(value_model: Any, config: PPOConfig, scorer: Any, *, mesh: Any,
                 model_config: Any, policy_vocab_size: int, tokenizer: Any) -> nnx.Module | None:
  """The critic: a ValueModel given or loaded (``value_model_path``, else the reward model's
  checkpoint / weights, TRL's default), or None for a value head on the policy.

  Raises:
    ValueError: the default critic (the reward model's weights) when the reward model's
      vocabulary is not the policy's: the critic reads the policy's token ids.
  """
  from alignax.models import RewardModel, ValueModel

  if config.value_head_on_policy:
    if value_model is not None:
      raise ValueError("value_head_on_policy=True puts the critic on the policy; do not pass "
                       "value_model")
    return None
  if isinstance(value_model, ValueModel):
    return value_model
  if isinstance(value_model, RewardModel):
    return _critic_from_reward_model(value_model)
  path = value_model if isinstance(value_model, str) else config.value_model_path
  if value_model is not None and not isinstance(value_model, str):
    raise ValueError(f"value_model must be an alignax ValueModel, a RewardModel or a checkpoint "
                     f"path, got {type(value_model).__name__}")
  if path is not None:
    return _load_critic(path, config, mesh=mesh, model_config=model_config)
  # TRL's default: the critic starts from the reward model's weights.
  reward_tokenizer = None if scorer is None else scorer.tokenizer
  if reward_tokenizer is not None and not _same_vocabulary(reward_tokenizer, tokenizer):
    raise _vocabulary_error(config, "its tokenizer's vocabulary is not the policy's")
  if config.reward_model_path is not None:
    critic = _load_critic(config.reward_model_path, config, mesh=mesh, model_config=model_config)
  elif scorer is not None:
    critic = _critic_from_reward_model(nnx.merge(scorer._graphdef, scorer._state))
  else:
    raise ValueError("ppo needs a critic: pass value_model (or --value_model_path), a reward "
                     "model to initialise it from, or value_head_on_policy=True")
  if critic.config.vocab_size != policy_vocab_size:
    raise _vocabulary_error(config, f"its vocabulary has {critic.config.vocab_size} tokens, the "
                                    f"policy's {policy_vocab_size}")
  return critic


def _load_critic(path: str, config: PPOConfig, *, mesh: Any, model_config: Any) -> nnx.Module:
  from alignax.models import from_pretrained

  if model_config is not None:
    from alignax.train.trainers import load_model

    return load_model(path, model_config, mesh=mesh, head="value", seed=config.seed)
  return from_pretrained(path, mesh=mesh, head="value", seed=config.seed)


def _vocabulary_error(config: PPOConfig, why: str) -> ValueError:
  source = config.reward_model_path or "the reward model"
  return ValueError(f"the default critic starts from the reward model ({source}), but {why}: "
                    "the critic reads the policy's token ids. Pass value_model (or "
                    "--value_model_path) with the policy's vocabulary, or set "
                    "value_head_on_policy=True")


def _critic_from_reward_model(reward: nnx.Module) -> nnx.Module:
  """A ValueModel holding a copy of a one-label reward model's weights (the same tensors, read at
  every token instead of the last), with the reward model's dtype, kernels and mesh."""
  from alignax.models import ValueModel
  from alignax.models.sharding import set_mesh

  if reward.score.out_features != 1:
    raise ValueError(f"a critic starts from a one-label reward model; this one has "
                     f"{reward.score.out_features} labels")
  body = reward.model
  critic = nnx.eval_shape(lambda: ValueModel(reward.config, dtype=body.dtype, remat=body.remat,
                                             attention_impl=body.attention_impl,
                                             rngs=nnx.Rngs(0)))
  # Copied: the reward model stays frozen while the critic trains (and its buffers are donated).
  nnx.update(critic, jax.tree.map(jnp.copy, nnx.state(reward)))
  set_mesh(critic, body.mesh, body.rules)
  return critic


# --- the trainer ---------------------------------------------------------------------------------


def ppo(config: PPOConfig, *, model: Any, reward_model: Any = None, reward_funcs: Any = None,
        value_model: Any = None, tokenizer: Any = None, train_dataset: Any = None,
        data: Any = None, mesh: Any = None, reference: nnx.Module | None = None,
        on_step: Callable[[int, dict[str, float]], None] | None = None,
        eval_dataset: Any = None) -> Any:
  """Trains a policy and its critic with PPO (see the module docstring) and writes a TRL-style
  ``output_dir`` (the policy in Hugging Face format at its root).

  Args:
    config: a :class:`PPOConfig`.
    model: a :class:`alignax.train.ModelConfig` (the policy from ``config.sft_model_path``, else
      ``model_name_or_path``, loaded on ``mesh``), or an ``alignax.models.CausalLM`` already on
      ``mesh`` (trained in place).
    reward_model: the frozen reward model: a :class:`alignax.rewards.RewardModelScorer`, an
      :class:`alignax.models.RewardModel` (scored with ``tokenizer``) or a checkpoint path; None
      takes ``config.reward_model_path``.
    reward_funcs: reward functions (TRL's contract: callables, built-in names, ``module.function``
      strings) added to the reward model's score; None takes ``config.reward_funcs``.
    value_model: the critic: an :class:`alignax.models.ValueModel`, a one-label ``RewardModel``
      (its weights copied) or a checkpoint path; None takes ``config.value_model_path``, else the
      reward model's weights (TRL's default), unless ``config.value_head_on_policy``.
    tokenizer: decodes completions (default: the ``ModelConfig``'s).
    train_dataset: prompt rows (dicts with ``prompt``) or a prepared ``task="prompt"`` dataset;
      None loads ``data``.
    data: an :class:`alignax.data.DataConfig` (batching, shuffling, ``max_prompt_length``).
    mesh: a mesh (``alignax.make_mesh``), a ``MeshConfig`` or None (every device on ``fsdp``).
    reference: the reference policy; default a copy of the initial policy.
    on_step: called after every optimizer step with its metrics.
    eval_dataset: the prompts of the in-training evaluation (``config.eval_num_prompts`` > 0):
      rows with ``prompt``, or None for ``data``'s test split; every ``eval_steps`` the policy is
      sampled and scored with the training reward against the reference (else a frozen copy of
      the starting policy) (:func:`alignax.evaluation.trainer_generation_eval`).

  Returns:
    ``alignax.train.FitResult``: the policy (trained in place), the final state (of the
    :class:`ActorCritic`) and the logged history.

  Raises:
    ValueError: named bad input (no reward, no prompts, a prompt longer than the position budget,
      LoRA, a default critic from a reward model with another vocabulary, ...);
      ``alignax.rewards.RewardFunctionError`` from a reward function.
  """
  from alignax.data import DataConfig, make_batches, steps_per_epoch
  from alignax.models import CausalLM
  from alignax.train.config import ModelConfig
  from alignax.train.loop import FitResult, data_parallel_size, default_export, place_on_mesh
  from alignax.train.online import run_rounds
  from alignax.train.step import init_state
  from alignax.train.trainers import load_model, make_export, resolve_mesh

  if not isinstance(config, PPOConfig):
    raise ValueError(f"ppo takes a PPOConfig, got {type(config).__name__}")
  if jax.process_count() > 1:
    raise ValueError("ppo runs on a single host: its rollout gathers the batch on the host, and "
                     f"this run has {jax.process_count()} processes")
  mesh = resolve_mesh(mesh)
  data = data or DataConfig()
  export = None
  model_config = None
  if isinstance(model, ModelConfig):
    from alignax.models.tokenizer import load_tokenizer

    model_config = model
    if model_config.use_peft:
      raise ValueError("ppo trains the full policy and critic; use_peft (LoRA) is not supported "
                       "by the PPO trainer")
    path = config.sft_model_path or model_config.model_name_or_path
    if not path:
      raise ValueError("the policy is required: --sft_model_path or --model_name_or_path")
    # TRL reads the tokenizer from --model_name_or_path and the policy from --sft_model_path.
    tokenizer_path = (model_config.tokenizer_name_or_path or model_config.model_name_or_path
                      or path)
    # The checkpoint trained from, as the export and run_config.json name it.
    model_config = dataclasses.replace(model_config, model_name_or_path=path)
    if tokenizer is None:
      tokenizer = load_tokenizer(tokenizer_path)
    dataset = prompt_dataset(train_dataset, data, tokenizer, trainer="ppo")
    model = load_model(path, model_config, mesh=mesh, head=None, seed=config.seed)
    if reference is None and model_config.ref_model_name_or_path:
      reference = load_model(model_config.ref_model_name_or_path, model_config, mesh=mesh,
                             head=None, seed=config.seed)
    export = make_export(model_config, tokenizer)
  else:
    if not isinstance(model, CausalLM):
      raise ValueError(f"model must be a ModelConfig or an alignax CausalLM, got "
                       f"{type(model).__name__}")
    if tokenizer is None:
      raise ValueError("tokenizer is required with a model instance: completions are decoded "
                       "for the logs and the reward functions")
    dataset = prompt_dataset(train_dataset, data, tokenizer, trainer="ppo")
  check_prompt_budget(dataset, max_completion_length=config.response_length,
                      limit=model.config.max_position_embeddings)

  devices = data_parallel_size(mesh)
  minibatch = config.per_device_train_batch_size * devices * config.gradient_accumulation_steps
  rollout_rows = minibatch * config.num_mini_batches
  forward_rows = config.per_device_train_batch_size * devices
  scorer = _load_scorer(reward_model, config, tokenizer=tokenizer, mesh=mesh,
                        batch_size=forward_rows)
  runner = _reward_runner(config, reward_funcs)
  if scorer is None and runner is None:
    raise ValueError("ppo needs a reward: pass reward_model (or --reward_model_path) or "
                     "reward_funcs")
  critic = _value_model(value_model, config, scorer, mesh=mesh, model_config=model_config,
                        policy_vocab_size=model.config.vocab_size, tokenizer=tokenizer)

  updates = config.updates_per_round
  max_steps = config.max_steps
  if max_steps == -1:
    if config.total_episodes is not None:
      rounds = math.ceil(config.total_episodes / rollout_rows)
    else:
      per_epoch = steps_per_epoch(len(dataset), batch_size=rollout_rows,
                                  drop_last=data.dataloader_drop_last)
      if per_epoch == 0:
        raise ValueError(f"{len(dataset)} prompts make no rollout of {rollout_rows} prompts; "
                         "lower per_device_train_batch_size or num_mini_batches, or set max_steps")
      rounds = max(1, math.ceil(config.num_train_epochs * per_epoch))
    max_steps = rounds * updates
  iterator = iter(make_batches(dataset, batch_size=rollout_rows, config=data))

  if config.ref_ema_decay is not None and reference is not None:
    raise ValueError("ref_ema_decay starts the reference at the initial policy and moves it with "
                     "the policy; drop the reference model (or ref_ema_decay for a frozen one)")
  stop_token_ids, eos = _stop_tokens(config, tokenizer, model)
  if config.missing_eos_penalty is not None and not stop_token_ids:
    warnings.warn(f"missing_eos_penalty={config.missing_eos_penalty} without stop_token or "
                  "stop_token_id: the sampler does not stop at EOS, so every completion runs to "
                  "response_length and pays the penalty unless it emitted EOS somewhere (TRL's "
                  "behaviour); set stop_token='eos' to end completions at EOS", stacklevel=2)
  # Taken before the first step, which donates the policy's buffers.
  generation_eval = _generation_eval(
    config, model=model, reference=reference, tokenizer=tokenizer, data=data, mesh=mesh,
    runner=runner, scorer=scorer, prompts=eval_dataset, stop_token_ids=stop_token_ids)
  actor_critic = ActorCritic(model, critic, seed=config.seed)
  graphdef, params, frozen = nnx.split(actor_critic, nnx.Param, ...)
  optimizer, step_fn = _compiled_step(graphdef, _StepKey.of(config, max_steps))
  state = place_on_mesh(init_state(params, optimizer, frozen=frozen, seed=config.seed), mesh)
  # kl_coef = 0 with a fixed coefficient: the penalty is 0, so no reference forward.
  needs_reference = config.kl_coef > 0 or config.target_kl is not None
  ref = _Reference(reference if reference is not None else model,
                   ema=config.ref_ema_decay is not None) if needs_reference else None
  kl = _KLCoefficient(config)
  make_rollout = _Rollout(config=config, graphdef=graphdef, reference=ref, kl=kl, scorer=scorer,
                          runner=runner, tokenizer=tokenizer, mesh=mesh,
                          stop_token_ids=stop_token_ids, eos_token_id=eos,
                          forward_rows=forward_rows, max_steps=max_steps)
  current = {"round": 0}

  def rollout(state: TrainState, prompts: dict[str, Any], *, key: jax.Array, step: int) -> Any:
    current["round"] = step // updates
    nnx.update(actor_critic, state.params, state.frozen)
    generated = make_rollout(actor_critic, state, prompts, key=key, step=step)
    generated.metrics["episode"] = float((current["round"] + 1) * rollout_rows)
    return generated

  def update(state: TrainState, batch: dict[str, np.ndarray], index: int):
    epoch, minibatch = divmod(index, config.num_mini_batches)
    rows = minibatch_rows(config.seed, current["round"], epoch, rollout_rows,
                          config.num_mini_batches)[minibatch]
    placed = place_micro_batches({k: v[rows] for k, v in batch.items()}, mesh,
                                 config.gradient_accumulation_steps)
    state, metrics = step_fn(state, placed)
    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
    metrics["lr"] = metrics["learning_rate"]
    # TRL logs the variance of the minibatches' mean ratios; here, of the minibatch's tokens.
    metrics["val/ratio_var"] = max(metrics.pop(RATIO_SQUARE) - metrics["val/ratio"] ** 2, 0.0)
    return state, metrics

  def export_model(state: TrainState) -> None:
    nnx.update(actor_critic, state.params, state.frozen)
    (export or default_export(tokenizer))(model, config.output_dir)

  def evaluate(state: TrainState) -> dict[str, float]:
    nnx.update(actor_critic, state.params, state.frozen)
    return generation_eval(model)

  def close() -> None:
    try:
      if generation_eval is not None:
        generation_eval.close()
    finally:
      if hasattr(runner, "close"):
        runner.close()

  result = run_rounds(
    config, state=state, mesh=mesh, iterator=iterator, rollout=rollout, update=update,
    max_steps=max_steps, updates_per_round=updates, algorithm="ppo",
    run_config={"rollout_rows": rollout_rows, "data_config": dataclasses.asdict(data),
                 **({"model_config": dataclasses.asdict(model_config)}
                    if model_config is not None else {})},
    export=export_model, on_step=on_step, on_close=close, host_state=kl,
    evaluate=None if generation_eval is None else evaluate)
  return FitResult(model=model, state=result.state, history=result.history)


def _stop_tokens(config: PPOConfig, tokenizer: Any, model: nnx.Module
                 ) -> tuple[tuple[int, ...], int | None]:
  """``(stop ids for the sampler, the EOS id the penalty and metrics look for)``."""
  eos = tokenizer.eos_token_id
  if eos is None:
    eos = model.config.hf_config.get("eos_token_id")
    eos = eos[0] if isinstance(eos, (list, tuple)) else eos
  if config.stop_token == "eos":
    if eos is None:
      raise ValueError("stop_token='eos' but the tokenizer has no eos_token_id")
    return (int(eos),), int(eos)
  if config.stop_token_id is not None:
    vocab = model.config.vocab_size
    if config.stop_token_id >= vocab:
      raise ValueError(f"stop_token_id={config.stop_token_id} is outside the vocabulary "
                       f"[0, {vocab})")
    return (config.stop_token_id,), None if eos is None else int(eos)
  return (), None if eos is None else int(eos)


def _generation_eval(config: PPOConfig, *, model: nnx.Module, reference: nnx.Module | None,
                     tokenizer: Any, data: Any, mesh: jax.sharding.Mesh, runner: Any,
                     scorer: Any, prompts: Any, stop_token_ids: tuple[int, ...]) -> Any:
  """The in-training evaluation of ``config.eval_num_prompts`` (None when 0): the policy against
  the reference when one was given or loaded, else a frozen copy of the policy taken now, before
  the first step; scored with the training reward (the reward functions' runner, else the reward
  model)."""
  if not config.eval_num_prompts:
    return None
  from alignax.evaluation import frozen_copy, trainer_generation_eval

  baseline = reference if reference is not None else frozen_copy(model)
  options = {"reward_funcs": runner if runner is not None else [scorer]}
  if runner is not None and scorer is not None:  # the training reward: the model's score + funcs
    options = {"reward_funcs": [scorer, *runner.sources],
               "reward_weights": [1.0, *map(float, runner.weights)],
               "reward_names": [scorer.name, *runner.names]}
  return trainer_generation_eval(
    config, tokenizer=tokenizer, data=data, baseline=baseline, mesh=mesh, prompts=prompts,
    stop_token_ids=stop_token_ids,
    max_position_embeddings=model.config.max_position_embeddings, **options)


def _reward_runner(config: PPOConfig, reward_funcs: Any) -> Any:
  from alignax.rewards import RewardRunner

  if isinstance(reward_funcs, RewardRunner):
    return reward_funcs
  sources = list(config.reward_funcs or []) if reward_funcs is None else (
    [reward_funcs] if callable(reward_funcs) or isinstance(reward_funcs, str)
    else list(reward_funcs))
  if not sources:
    if config.reward_weights is not None:
      raise ValueError(f"reward_weights={config.reward_weights} weight reward functions, and "
                       "there are none: pass reward_funcs (or --reward_funcs), or drop "
                       "reward_weights")
    return None
  return RewardRunner(sources, weights=config.reward_weights,
                      max_completion_len=config.response_length)


@dataclasses.dataclass(frozen=True)
class _StepKey:
  """The options the compiled update depends on (the optimizer's and the objective's)."""

  optimizer: OptimizerOptions
  cliprange: float
  vf_coef: float
  cliprange_value: float
  temperature: float
  ref_ema_decay: float | None

  @classmethod
  def of(cls, config: PPOConfig, max_steps: int) -> "_StepKey":
    names = [f.name for f in dataclasses.fields(cls) if f.name != "optimizer"]
    return cls(optimizer=OptimizerOptions.of(config, max_steps),
               **{name: getattr(config, name) for name in names})


@functools.lru_cache(maxsize=4)
def _compiled_step(graphdef: nnx.GraphDef, key: _StepKey):
  """``(optimizer, jitted step)`` for a model structure and options; cached, so runs that differ
  only in data, output directory or resume point compile the step once per process."""
  from alignax.train.step import make_train_step

  optimizer, schedule = key.optimizer.build()
  if key.ref_ema_decay is not None:
    # Last in the chain: it averages the parameters the step produces.
    optimizer = optax.chain(optimizer, reference_ema(key.ref_ema_decay,
                                                     select=lambda params: params["policy"]))
  objective = ppo_objective(graphdef, cliprange=key.cliprange, vf_coef=key.vf_coef,
                            cliprange_value=key.cliprange_value, temperature=key.temperature)
  return optimizer, jax.jit(make_train_step(objective, optimizer, schedule=schedule),
                            donate_argnums=0)
