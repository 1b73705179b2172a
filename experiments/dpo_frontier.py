r"""Rafailov et al. (2023), "Direct Preference Optimization: Your Language Model is Secretly a
Reward Model", §6.1 and Fig. 2 (left): the reward–KL frontier of DPO, PPO, PPO-GT, Unlikelihood
and Preferred-FT on controlled sentiment generation.

The paper's set-up (App. C.1): GPT-2-large continues IMDb prefixes of 2–8 tokens; a sentiment
classifier is the ground-truth reward; preference pairs are the SFT model's samples labelled by that
classifier; every method is plotted as (sequence KL to the reference, expected reward) along
training for several hyper-parameters. The claims: "DPO produces by far the most efficient
frontier, achieving the highest reward while still achieving low KL", and "DPO achieves a better
frontier than PPO, even when PPO can access ground truth rewards (PPO-GT)".

Here (the "lexicon sentiment" protocol, ``../shared/reference/aesthetics_ablations.md`` B.1), on
a CPU, with no downloads:

* Task (``experiments/_frontier_task.py``): a 162-word vocabulary (60 positive and 60 negative
  adjectives from the VADER lexicon, neutral words, ``not``, ``very``, ``<eos>``), a grammar of
  short, mixed-sentiment movie reviews, prompts of 2–4 words; the ground-truth reward is VADER's
  ``compound`` score of the prompt and completion (negation, boosters, ``but``, saturation at ±1).
* Reference: a 2-layer Llama-style ``alignax.models.CausalLM`` trained by maximum likelihood on
  grammar reviews (``ax.sft_loss``).
* Preferences: ``samples_per_prompt`` reference samples per training prompt, every pair of them
  with different rewards labelled by VADER (deterministic preferences, as in the paper).
* Methods (``experiments/_frontier_methods.py``), all from the reference and with the same
  evaluation: DPO (``ax.dpo_loss``) for each β; Unlikelihood (likelihood of :math:`y_w` plus α
  times the token-level unlikelihood of :math:`y_l`) for each α; Preferred-FT (likelihood of
  :math:`y_w`); PPO (``ax.ppo_loss`` with a critic, ``ax.gae``, the k1 penalty of
  ``ax.kl_penalized_rewards``) for each KL coefficient, on a Bradley-Terry reward model
  (``ax.bradley_terry_loss``) trained on the same pairs, and PPO-GT, the same on the VADER reward.
  DPO, Unlikelihood and Preferred-FT are one loss with per-run coefficients, so all their runs
  (the β sweep included) train as one ``jit(vmap(...))`` program, called once per evaluation
  period. PPO and PPO-GT runs are scored and updated by vmapped programs too; their rollouts are
  sampled per run with ``alignax.sampling.generate``, and the VADER scores are computed on the
  host between rollout and update.
* Evaluation every ``offline_eval_every`` steps (``ppo_eval_every`` PPO iterations): one
  temperature-1 sample per held-out prompt; reward = mean VADER score; KL = mean over samples of
  the exact sequence KL :math:`\sum_t \mathrm{KL}(\pi(\cdot|s_t)\|\pi_{ref}(\cdot|s_t))` along
  the sampled path (``alignax.token_kl``).

Criteria (B.1's "reproduced if", plus the paper's strongest claim):

* (i) DPO moves along the frontier with β: Spearman's ρ between −β and the final KL, and between
  −β and the final reward, ≥ 0.8 (mean over seeds).
* (ii) For the KL bins ``kl_bins`` (default [0, 2], (2, 5], (5, 10] nats), DPO's best reward in a
  bin ≥ PPO's best there − 1 SE (the standard error over seeds of the per-seed difference); a bin
  where PPO has no point and DPO has one counts for DPO, one where DPO has none against it. Passed
  when the mean over seeds of the number of such bins is ≥ 2 of 3 (the paper: all of them).
* (ii') The same against PPO-GT: the paper's "even when PPO can access ground-truth rewards".
* (iii) The Preferred-FT and Unlikelihood points are Pareto-dominated (lower or equal KL and
  higher or equal reward) by a point of DPO ∪ PPO ∪ PPO-GT ∪ {π_ref}: fraction ≥ 0.9.
* (iv) DPO's implicit-reward accuracy on held-out pairs rises as β falls: Spearman's ρ between −β
  and the accuracy ≥ 0.8.

Budget: the defaults are sized for a few minutes per seed on 2 CPU cores; ``SMOKE`` is the CI
configuration. B.1's full protocol (2 k pre-training steps, ~20 k pairs, 1 k DPO steps × 64,
200 PPO iterations × 128 rollouts, 256 evaluation prompts) is ``--set pretrain_steps=2000
--set train_prompts=3400 --set offline_steps=1000 --set offline_batch=64 --set
ppo_iterations=200 --set ppo_rollouts=128 --set eval_prompts=256 --set sample_batch=256``
(not run here).

Run: ``alignax run experiments/dpo_frontier.py [--seeds 3] [--set dpo_betas=0.1,1]`` or
``python -m experiments.dpo_frontier`` with the same flags.
"""

import dataclasses
import functools
import logging
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from alignax import experiment

from experiments import _frontier_methods as methods
from experiments import _frontier_task as task

CLAIM = ("On controlled sentiment generation DPO gives the most efficient reward-KL frontier: at "
         "every KL budget its best ground-truth reward is at least that of PPO with a reward "
         "model learned from the same preferences, and even of PPO on the ground-truth reward "
         "(PPO-GT); Preferred-FT and Unlikelihood are dominated.")
PAPER = ("R. Rafailov, A. Sharma, E. Mitchell, S. Ermon, C. D. Manning, C. Finn, Direct Preference "
         "Optimization: Your Language Model is Secretly a Reward Model, NeurIPS 2023, "
         "arXiv:2305.18290, section 6.1 and figure 2 (left)")
DEFAULT_SEEDS = 3

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Config:
  """Every size and hyper-parameter of the experiment.

  seed: data, initialisation and sampling. hidden_size, num_layers: the decoders (policy, reward
  model and critic). reviews, pretrain_*: the reference LM's maximum-likelihood training.
  max_new: completion length M (the reviews have at most ``max_new + 2`` tokens).
  train_prompts, samples_per_prompt, held_out_prompts: preference pairs (every pair of samples
  with different rewards) for training and, from other prompts, for the held-out accuracies.
  dpo_betas, ul_alphas, preferred_ft, offline_*: DPO, Unlikelihood and Preferred-FT.
  rm_*: the Bradley-Terry reward model. ppo_*: PPO and PPO-GT (``ppo_rollouts`` samples per
  iteration, ``ppo_epochs`` passes over ``ppo_minibatches`` mini-batches).
  eval_prompts: held-out prompts of each evaluation. sample_batch: prompts per
  ``alignax.sampling.generate`` call (one compiled shape for every sampling).
  kl_bins: the bin edges of criterion (ii).
  """

  seed: int = 0
  hidden_size: int = 64
  num_layers: int = 2
  reviews: int = 20_000
  pretrain_steps: int = 800
  pretrain_batch: int = 64
  pretrain_lr: float = 3e-3
  max_new: int = 12
  train_prompts: int = 600
  samples_per_prompt: int = 4
  held_out_prompts: int = 100
  dpo_betas: tuple[float, ...] = (0.05, 0.1, 0.5, 1.0, 5.0)
  ul_alphas: tuple[float, ...] = (0.05, 0.1, 0.5, 1.0)
  preferred_ft: bool = True
  offline_steps: int = 300
  offline_batch: int = 32
  offline_lr: float = 1e-3
  offline_eval_every: int = 50
  rm_steps: int = 300
  rm_batch: int = 32
  rm_lr: float = 1e-3
  ppo_kl_coefs: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3)
  ppo_iterations: int = 60
  ppo_rollouts: int = 64
  ppo_epochs: int = 2
  ppo_minibatches: int = 2
  ppo_lr: float = 1e-3
  ppo_eval_every: int = 10
  gae_lambda: float = 0.95
  vf_coef: float = 0.1
  clip_eps: float = 0.2
  eval_prompts: int = 128
  sample_batch: int = 128
  kl_bins: tuple[float, ...] = (0.0, 2.0, 5.0, 10.0)

  def __post_init__(self):
    if not (self.dpo_betas and all(b > 0 for b in self.dpo_betas)):
      raise ValueError(f"dpo_betas must be a non-empty tuple of values > 0, got {self.dpo_betas}")
    if not all(a >= 0 for a in self.ul_alphas):
      raise ValueError(f"ul_alphas must be >= 0, got {self.ul_alphas}")
    if not (self.ppo_kl_coefs and all(c >= 0 for c in self.ppo_kl_coefs)):
      raise ValueError(f"ppo_kl_coefs must be a non-empty tuple of values >= 0, got "
                       f"{self.ppo_kl_coefs}")
    for name in ("offline", "ppo"):
      total = self.offline_steps if name == "offline" else self.ppo_iterations
      every = getattr(self, f"{name}_eval_every")
      if not (every >= 1 and total >= every and total % every == 0):
        raise ValueError(f"{name}_eval_every={every} must divide "
                         f"{'offline_steps' if name == 'offline' else 'ppo_iterations'}={total}")
    if self.samples_per_prompt < 2:
      raise ValueError(f"samples_per_prompt must be >= 2 (pairs), got {self.samples_per_prompt}")
    if self.ppo_rollouts % self.ppo_minibatches:
      raise ValueError(f"ppo_minibatches={self.ppo_minibatches} must divide "
                       f"ppo_rollouts={self.ppo_rollouts}")
    if len(self.kl_bins) < 2 or list(self.kl_bins) != sorted(set(self.kl_bins)):
      raise ValueError(f"kl_bins must be >= 2 increasing edges, got {self.kl_bins}")


# The CI configuration (tests/test_experiments_frontier.py): every stage runs, nothing converges.
SMOKE = dict(hidden_size=32, reviews=2000, pretrain_steps=100, train_prompts=48,
             held_out_prompts=16, dpo_betas=(0.1, 1.0, 5.0), ul_alphas=(0.5,), offline_steps=8,
             offline_batch=16, offline_eval_every=4, rm_steps=8, rm_batch=16,
             ppo_kl_coefs=(0.1,), ppo_iterations=2, ppo_rollouts=16, ppo_epochs=1,
             ppo_eval_every=1, eval_prompts=16, sample_batch=16)


def offline_runs(config: Config) -> list[tuple[str, float]]:
  """The offline runs in program order: ``("dpo", β)``, ``("ul", α)``, ``("pft", 0)``."""
  runs = [("dpo", b) for b in config.dpo_betas] + [("ul", a) for a in config.ul_alphas]
  return runs + ([("pft", 0.0)] if config.preferred_ft else [])


def ppo_runs(config: Config) -> list[tuple[str, float]]:
  """The PPO runs in program order: ``("ppo", β_KL)`` (reward model), then ``("ppo_gt", β_KL)``."""
  return [("ppo", c) for c in config.ppo_kl_coefs] + [("ppo_gt", c) for c in config.ppo_kl_coefs]


def offline_coefs(config: Config) -> methods.OfflineCoefs:
  """Each offline run's loss coefficients (``offline_loss``), stacked ``[R]``."""
  rows = {"dpo": lambda v: (1.0, v, 0.0, 0.0), "ul": lambda v: (0.0, 1.0, 1.0, v),
          "pft": lambda v: (0.0, 1.0, 1.0, 0.0)}
  table = np.asarray([rows[kind](value) for kind, value in offline_runs(config)], np.float32)
  return methods.OfflineCoefs(*(jnp.asarray(column) for column in table.T))


def preference_pairs(prompt_ids, prompt_mask, tokens, masks, rewards) -> dict[str, np.ndarray]:
  """Every pair of a prompt's samples with different rewards, the higher one chosen.

  Args:
    prompt_ids, prompt_mask: ``[N, P]``; tokens, masks: ``[N, K, M]``; rewards: ``[N, K]``.

  Returns:
    NumPy arrays ``prompt_row [n]`` (the prompt of each pair), ``prompt_ids, prompt_mask [n, P]``,
    ``chosen, chosen_mask, rejected, rejected_mask [n, M]``.
  """
  rows, winners, losers = [], [], []
  k = rewards.shape[1]
  for i in range(rewards.shape[0]):
    for a in range(k):
      for b in range(a + 1, k):
        if rewards[i, a] != rewards[i, b]:
          win, lose = (a, b) if rewards[i, a] > rewards[i, b] else (b, a)
          rows.append(i)
          winners.append(win)
          losers.append(lose)
  rows, winners, losers = map(np.asarray, (rows, winners, losers))
  return {"prompt_row": rows, "prompt_ids": prompt_ids[rows], "prompt_mask": prompt_mask[rows],
          "chosen": tokens[rows, winners], "chosen_mask": masks[rows, winners],
          "rejected": tokens[rows, losers], "rejected_mask": masks[rows, losers]}


def _pairs(nets, ref, arrays) -> methods.Pairs:
  """Device pairs with the reference's sequence log-probs."""
  prompt = (jnp.asarray(arrays["prompt_ids"]), jnp.asarray(arrays["prompt_mask"]))
  chosen = methods.join(*prompt, jnp.asarray(arrays["chosen"]), jnp.asarray(arrays["chosen_mask"]))
  rejected = methods.join(*prompt, jnp.asarray(arrays["rejected"]),
                          jnp.asarray(arrays["rejected_mask"]))
  return methods.Pairs(chosen, rejected, methods.reference_logps(nets.lm, ref, chosen),
                       methods.reference_logps(nets.lm, ref, rejected))


@functools.lru_cache(maxsize=4)
def _programs(nets: methods.Nets, offline: tuple, ppo: tuple):
  """The jitted, vmapped programs, built once per structure so that seeds share their compiles.

  ``offline`` and ``ppo`` are the keyword arguments of ``make_offline_train`` and ``make_ppo``
  as sorted item tuples.
  """
  offline_init, offline_train = methods.make_offline_train(nets.lm, **dict(offline))
  ppo_init, ppo_update = methods.make_ppo(nets, **dict(ppo))
  return {
      "offline_init": jax.jit(jax.vmap(offline_init)),
      "offline_train": jax.jit(jax.vmap(offline_train, in_axes=(0, 0, 0, None, None, None))),
      "ppo_init": jax.jit(jax.vmap(ppo_init)),
      "ppo_update": jax.jit(jax.vmap(ppo_update,
                                     in_axes=(0, 0, 0, None, None, 0, 0, 0, 0, None))),
  }


def unstack(states, n: int) -> list:
  """The ``n`` states of a stacked (vmapped) state tree."""
  return [jax.tree.map(lambda x, i=i: x[i], states) for i in range(n)]


def run(config: Config) -> dict[str, np.ndarray]:
  """One seed: reference, pairs, every method's (KL, reward) points and the accuracies.

  Returns (``R_off`` offline runs, ``R_ppo`` PPO runs, ``E_off`` / ``E_ppo`` evaluations):
    ``offline_kl``, ``offline_reward``, ``offline_loss`` ``[R_off, E_off]``;
    ``offline_accuracy`` ``[R_off]`` (implicit-reward accuracy on held-out pairs);
    ``ppo_kl``, ``ppo_reward``, ``ppo_score`` (the reward the run optimised) ``[R_ppo, E_ppo]``;
    ``ref_reward``, ``ref_nll``, ``rm_accuracy``, ``num_pairs`` scalars.
  """
  task.check_lexicon()
  start = time.perf_counter()

  def progress(message, *args):
    logger.info("seed %d, %5.0f s: " + message, config.seed, time.perf_counter() - start, *args)

  rng = np.random.default_rng(config.seed)
  keys = dict(zip(("pretrain", "pairs", "offline", "reward", "ppo", "eval"),
                  jax.random.split(jax.random.key(config.seed), 6)))
  max_tokens = config.max_new + 2
  nets, lm_init, reward_init = methods.build_nets(
      hidden_size=config.hidden_size, num_layers=config.num_layers,
      max_positions=4 + config.max_new, seed=config.seed)
  programs = _programs(
      nets,
      tuple(sorted(dict(steps=config.offline_eval_every, batch_size=config.offline_batch,
                        lr=config.offline_lr).items())),
      tuple(sorted(dict(lr=config.ppo_lr, epochs=config.ppo_epochs,
                        minibatches=config.ppo_minibatches, gae_lambda=config.gae_lambda,
                        vf_coef=config.vf_coef, clip_eps=config.clip_eps).items())))

  def sample(state, ids, mask, key):
    return methods.sample(nets.lm, state, ids, mask, key, max_new=config.max_new,
                          batch=config.sample_batch)

  reviews = jnp.asarray(task.sample_reviews(rng, config.reviews, max_tokens=max_tokens))
  ref, ref_nll = methods.pretrain(nets.lm, lm_init, reviews, keys["pretrain"],
                                  steps=config.pretrain_steps, batch_size=config.pretrain_batch,
                                  lr=config.pretrain_lr)

  def prompts(n):
    return task.prompts_from(task.sample_reviews(rng, n, max_tokens=max_tokens), rng, min_len=2,
                             max_len=4)

  # Training and held-out pairs from one batch of reference samples.
  n_train, n_prompts = config.train_prompts, config.train_prompts + config.held_out_prompts
  k = config.samples_per_prompt
  ids, mask = prompts(n_prompts)
  tokens, masks = sample(ref, np.repeat(ids, k, 0), np.repeat(mask, k, 0), keys["pairs"])
  tokens, masks = tokens.reshape(n_prompts, k, -1), masks.reshape(n_prompts, k, -1)
  pairs = preference_pairs(ids, mask, tokens, masks, methods.host_rewards(ids[:, None], tokens))
  all_pairs = _pairs(nets, ref, pairs)
  is_train = pairs["prompt_row"] < n_train
  train_pairs = methods.take(all_pairs, np.flatnonzero(is_train))
  held_out = methods.take(all_pairs, np.flatnonzero(~is_train))
  train_ids, train_mask = ids[:n_train], mask[:n_train]
  eval_ids, eval_mask = prompts(config.eval_prompts)
  progress("reference NLL %.3f; %d training and %d held-out pairs", float(ref_nll),
           int(is_train.sum()), int((~is_train).sum()))

  def evaluate(states, key):
    """Mean sequence KL and mean VADER reward of each state's samples on the eval prompts."""
    kl, reward = [], []
    for state in states:
      tokens, masks = sample(state, eval_ids, eval_mask, key)
      seq = methods.join(*map(jnp.asarray, (eval_ids, eval_mask, tokens, masks)))
      kl.append(float(jnp.mean(methods.sequence_kl_program(nets.lm, state, ref, seq))))
      reward.append(float(methods.host_rewards(eval_ids, tokens).mean()))
    return np.asarray(kl), np.asarray(reward)

  _, ref_reward = evaluate([ref], keys["eval"])

  # DPO, Unlikelihood and Preferred-FT: the runs (the beta sweep included) are one vmapped
  # program; it is called once per evaluation period.
  runs = offline_runs(config)
  coefs = offline_coefs(config)
  states = methods.stack(ref, len(runs))
  opt_states = programs["offline_init"](states)
  offline_kl, offline_reward, offline_loss = [], [], []
  for e in range(config.offline_steps // config.offline_eval_every):
    states, opt_states, loss = programs["offline_train"](
        states, opt_states, coefs, train_pairs, keys["offline"], e * config.offline_eval_every)
    kl, reward = evaluate(unstack(states, len(runs)), jax.random.fold_in(keys["eval"], e + 1))
    offline_kl.append(kl)
    offline_reward.append(reward)
    offline_loss.append(np.asarray(loss))
  # Implicit-reward accuracy on the held-out pairs, with the program that scored the reference.
  held_rows = np.flatnonzero(~is_train)
  offline_accuracy = []
  for state in unstack(states, len(runs)):
    chosen, rejected = (np.asarray(methods.reference_logps(nets.lm, state, s))[held_rows]
                        for s in (all_pairs.chosen, all_pairs.rejected))
    offline_accuracy.append(np.mean(chosen - np.asarray(all_pairs.ref_chosen)[held_rows]
                                    > rejected - np.asarray(all_pairs.ref_rejected)[held_rows]))
  progress("offline runs done; final (KL, reward): %s", ", ".join(
      f"{kind} {value:g}: ({kl:.2f}, {reward:.3f})" for (kind, value), kl, reward in
      zip(runs, offline_kl[-1], offline_reward[-1])))

  # The Bradley-Terry reward model, from the reference's body (InstructGPT's initialisation).
  reward_state, rm_accuracy = methods.train_reward_model(
      nets.reward, methods.with_body(reward_init, ref), train_pairs, held_out, keys["reward"],
      steps=config.rm_steps, batch_size=config.rm_batch, lr=config.rm_lr)
  progress("reward model held-out accuracy %.3f", float(rm_accuracy))

  # PPO (reward model) and PPO-GT (VADER), vmapped together; the critic starts as the RM.
  runs = ppo_runs(config)
  n_runs = len(runs)
  ground_truth = jnp.asarray([kind == "ppo_gt" for kind, _ in runs])
  kl_coefs = jnp.asarray([c for _, c in runs], jnp.float32)
  policies, values = methods.stack(ref, n_runs), methods.stack(reward_state, n_runs)
  opt_state = programs["ppo_init"](policies, values)
  ppo_kl, ppo_reward, ppo_score, iteration_scores = [], [], [], []
  for it in range(config.ppo_iterations):
    step_key = jax.random.fold_in(keys["ppo"], it)
    rows = rng.integers(0, n_train, config.ppo_rollouts)
    prompt_ids, prompt_mask = train_ids[rows], train_mask[rows]
    samples = [sample(policy, prompt_ids, prompt_mask, step_key)
               for policy in unstack(policies, n_runs)]
    tokens, masks = (np.stack(x) for x in zip(*samples))
    seq = methods.join(*(jnp.asarray(np.broadcast_to(x, (n_runs, *x.shape))) for x in
                         (prompt_ids, prompt_mask)), jnp.asarray(tokens), jnp.asarray(masks))
    vader = methods.host_rewards(prompt_ids, tokens)
    policies, values, opt_state, metrics = programs["ppo_update"](
        policies, values, opt_state, ref, reward_state, seq, jnp.asarray(vader), ground_truth,
        kl_coefs, jax.random.fold_in(step_key, 1))
    iteration_scores.append(np.asarray(metrics["score"]))
    if (it + 1) % config.ppo_eval_every == 0:
      kl, reward = evaluate(unstack(policies, n_runs),
                            jax.random.fold_in(keys["eval"], 10_000 + it))
      ppo_kl.append(kl)
      ppo_reward.append(reward)
      ppo_score.append(np.mean(iteration_scores[-config.ppo_eval_every:], axis=0))
      progress("PPO iteration %d; (KL, reward): %s", it + 1, ", ".join(
          f"{kind} {value:g}: ({k:.2f}, {r:.3f})" for (kind, value), k, r in
          zip(runs, kl, reward)))

  return {
      "offline_kl": np.stack(offline_kl, axis=1),
      "offline_reward": np.stack(offline_reward, axis=1),
      "offline_loss": np.stack(offline_loss, axis=1),
      "offline_accuracy": np.asarray(offline_accuracy),
      "ppo_kl": np.stack(ppo_kl, axis=1),
      "ppo_reward": np.stack(ppo_reward, axis=1),
      "ppo_score": np.stack(ppo_score, axis=1),
      "ref_reward": np.asarray(ref_reward[0]),
      "ref_nll": np.asarray(ref_nll),
      "rm_accuracy": np.asarray(rm_accuracy),
      "num_pairs": np.asarray(train_pairs.ref_chosen.shape[0]),
  }


# --- criteria -----------------------------------------------------------------------------------


def spearman(x, y) -> float:
  """Spearman's rank correlation (average ranks for ties); NaN when either side is constant."""
  def ranks(v):
    v = np.asarray(v, np.float64)
    order = np.argsort(v, kind="stable")
    r = np.empty(len(v))
    r[order] = np.arange(len(v))
    for value in np.unique(v):  # ties share their average rank
      r[v == value] = r[v == value].mean()
    return r

  rx, ry = ranks(x), ranks(y)
  if rx.std() == 0 or ry.std() == 0:
    return float("nan")
  return float(np.corrcoef(rx, ry)[0, 1])


def best_in_bins(kl: np.ndarray, reward: np.ndarray, edges) -> np.ndarray:
  """The highest reward among the points whose KL lies in each bin (``[e0, e1]``, then
  ``(e_i, e_i+1]``), ``-inf`` where a bin has none. ``kl``, ``reward``: any matching shape."""
  kl, reward = np.ravel(kl), np.ravel(reward)
  out = np.full(len(edges) - 1, -np.inf)
  for b, (lo, hi) in enumerate(zip(edges[:-1], edges[1:])):
    inside = (kl <= hi) & ((kl > lo) if b else (kl >= lo))
    if inside.any():
      out[b] = reward[inside].max()
  return out


def bins_won(dpo_best: np.ndarray, other_best: np.ndarray) -> np.ndarray:
  """Per seed, the number of bins where DPO's best ≥ the other's best − 1 SE over seeds.

  Args:
    dpo_best, other_best: ``[S, bins]`` from ``best_in_bins`` (``-inf``: no point in the bin).
  """
  seeds = dpo_best.shape[0]
  finite = np.isfinite(dpo_best) & np.isfinite(other_best)
  diff = np.where(finite, np.where(finite, dpo_best, 0.0) - np.where(finite, other_best, 0.0),
                  np.nan)
  se = np.zeros(dpo_best.shape[1])
  if seeds > 1:
    with np.errstate(invalid="ignore"):
      se = np.nan_to_num(np.nanstd(diff, axis=0, ddof=1) / math.sqrt(seeds))
  won = np.where(finite, dpo_best >= other_best - se,
                 np.isfinite(dpo_best) & ~np.isfinite(other_best))
  return won.sum(axis=1).astype(np.float64)


def dominated_fraction(points_kl, points_reward, front_kl, front_reward) -> float:
  """Fraction of the points with a front point of lower-or-equal KL and higher-or-equal reward."""
  front_kl, front_reward = np.ravel(front_kl), np.ravel(front_reward)
  dominated = [np.any((front_kl <= k) & (front_reward >= r))
               for k, r in zip(np.ravel(points_kl), np.ravel(points_reward))]
  return float(np.mean(dominated))


def frontier_summary(config: Config, measured: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Per-seed statistics behind the criteria: Spearman ρs, bins won, dominated fraction."""
  kinds = np.asarray([kind for kind, _ in offline_runs(config)])
  ppo_kinds = np.asarray([kind for kind, _ in ppo_runs(config)])
  betas = np.asarray(config.dpo_betas)
  dpo = kinds == "dpo"
  baseline = (kinds == "ul") | (kinds == "pft")
  seeds = measured["offline_kl"].shape[0]
  summary = {k: [] for k in ("rho_kl", "rho_reward", "rho_accuracy", "dominated")}
  best = {k: [] for k in ("dpo", "ppo", "ppo_gt")}
  for s in range(seeds):
    off_kl, off_reward = measured["offline_kl"][s], measured["offline_reward"][s]
    ppo_kl, ppo_reward = measured["ppo_kl"][s], measured["ppo_reward"][s]
    summary["rho_kl"].append(spearman(-betas, off_kl[dpo, -1]))
    summary["rho_reward"].append(spearman(-betas, off_reward[dpo, -1]))
    summary["rho_accuracy"].append(spearman(-betas, measured["offline_accuracy"][s][dpo]))
    best["dpo"].append(best_in_bins(off_kl[dpo], off_reward[dpo], config.kl_bins))
    for kind in ("ppo", "ppo_gt"):
      rows = ppo_kinds == kind
      best[kind].append(best_in_bins(ppo_kl[rows], ppo_reward[rows], config.kl_bins))
    front_kl = np.concatenate([off_kl[dpo].ravel(), ppo_kl.ravel(), [0.0]])
    front_reward = np.concatenate([off_reward[dpo].ravel(), ppo_reward.ravel(),
                                   [float(measured["ref_reward"][s])]])
    summary["dominated"].append(dominated_fraction(off_kl[baseline], off_reward[baseline],
                                                   front_kl, front_reward)
                                if baseline.any() else float("nan"))
  best = {k: np.asarray(v) for k, v in best.items()}
  out = {k: np.asarray(v, np.float64) for k, v in summary.items()}
  out["bins_vs_ppo"] = bins_won(best["dpo"], best["ppo"])
  out["bins_vs_ppo_gt"] = bins_won(best["dpo"], best["ppo_gt"])
  out.update({f"best_{k}": v for k, v in best.items()})
  return out


def criteria(config: Config, measured: dict[str, np.ndarray]) -> list[dict]:
  """B.1's criteria (i)-(iv) and the PPO-GT comparison (ii'); (iii) only when Unlikelihood or
  Preferred-FT runs exist."""
  summary = frontier_summary(config, measured)
  bins = len(config.kl_bins) - 1
  need = math.ceil(2 * bins / 3)  # B.1: "in >= 2 of 3 bins"

  def rank_correlation(name, values):
    return experiment.criterion(name, paper_value=1.0, values=values, tolerance=0.2,
                                rule="at_least", statistic="mean")

  def bins_criterion(name, values):
    return experiment.criterion(name, paper_value=float(bins), values=values,
                                tolerance=float(bins - need), rule="at_least", statistic="mean")

  out = [
      rank_correlation("(i) DPO: Spearman(-beta, final KL)", summary["rho_kl"]),
      rank_correlation("(i) DPO: Spearman(-beta, final reward)", summary["rho_reward"]),
      bins_criterion(f"(ii) KL bins where DPO best >= PPO best - 1 SE (of {bins})",
                     summary["bins_vs_ppo"]),
      bins_criterion(f"(ii') KL bins where DPO best >= PPO-GT best - 1 SE (of {bins})",
                     summary["bins_vs_ppo_gt"]),
  ]
  if config.ul_alphas or config.preferred_ft:
    out.append(experiment.criterion(
        "(iii) Preferred-FT/Unlikelihood points dominated by DPO u PPO", paper_value=1.0,
        values=summary["dominated"], tolerance=0.1, rule="at_least", statistic="mean"))
  out.append(rank_correlation("(iv) DPO: Spearman(-beta, held-out implicit-reward accuracy)",
                              summary["rho_accuracy"]))
  return out


def plot(config: Config, measured: dict[str, np.ndarray], out_dir: str) -> None:
  """``frontier.png``: every evaluation of every run as (KL, VADER reward), by method (seed 0
  filled, other seeds hollow), π_ref as a star, the KL bins dashed; ``accuracy.png``: DPO's
  held-out implicit-reward accuracy against β."""
  import matplotlib.pyplot as plt

  styles = {"dpo": ("C0", "o", "DPO"), "ppo": ("C1", "s", "PPO (learned RM)"),
            "ppo_gt": ("C3", "^", "PPO-GT (VADER)"), "ul": ("C2", "v", "Unlikelihood"),
            "pft": ("C7", "D", "Preferred-FT")}
  fig, panel = plt.subplots(figsize=(7, 5))
  seeds = measured["offline_kl"].shape[0]
  labelled = set()
  for s in range(seeds):
    for prefix, runs in (("offline", offline_runs(config)), ("ppo", ppo_runs(config))):
      for r, (kind, _) in enumerate(runs):
        color, marker, label = styles[kind]
        panel.scatter(measured[f"{prefix}_kl"][s, r], measured[f"{prefix}_reward"][s, r],
                      s=14, marker=marker, edgecolors=color,
                      facecolors=color if s == 0 else "none", alpha=0.8,
                      label=None if kind in labelled else label)
        labelled.add(kind)
    panel.scatter([0.0], [measured["ref_reward"][s]], marker="*", s=120, color="k",
                  label=None if s else "reference")
  for edge in config.kl_bins[1:-1]:
    panel.axvline(edge, color="0.7", linestyle="--", linewidth=0.8)
  panel.set_xlabel("sequence KL(pi || pi_ref) (nats)")
  panel.set_ylabel("mean VADER compound reward")
  panel.set_title("Reward-KL frontier (lexicon sentiment)")
  panel.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(os.path.join(out_dir, "frontier.png"), dpi=120)
  plt.close(fig)

  kinds = np.asarray([kind for kind, _ in offline_runs(config)])
  fig, panel = plt.subplots(figsize=(5, 3.5))
  accuracy = measured["offline_accuracy"][:, kinds == "dpo"]
  panel.errorbar(config.dpo_betas, accuracy.mean(0), yerr=accuracy.std(0), marker="o")
  panel.set_xscale("log")
  panel.set_xlabel("beta")
  panel.set_ylabel("held-out implicit-reward accuracy")
  fig.tight_layout()
  fig.savefig(os.path.join(out_dir, "accuracy.png"), dpi=120)
  plt.close(fig)


if __name__ == "__main__":
  sys.exit(experiment.main(sys.argv[1:], module=sys.modules[__name__]))
