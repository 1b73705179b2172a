r"""Liu et al. (2025), "Understanding R1-Zero-Like Training: A Critical Perspective" (Dr. GRPO): the
GRPO objective's per-response :math:`1/|o_i|` normaliser biases the policy towards long incorrect
and short correct responses, and its :math:`1/\mathrm{std}` advantage scale up-weights questions
that are nearly always or nearly never solved. Dr. GRPO (advantage :math:`R_i - \bar R`, token sums
over a constant) removes both. Measured with alignax's own ``grpo_loss`` / ``dr_grpo_loss``
aggregation modes and ``group_advantages``, so the experiment tests the library.

Toy 1, the stopping bandit (isolates the length mechanism). Whether a chain of thought is correct
is exogenous (probability ``p_correct``) and independent of its length; reward is
:math:`R = 1[\text{correct}]`. The policy only decides when to stop: a chain of class
:math:`c \in \{\text{wrong}, \text{correct}\}` emits "continue" tokens and stops at each token with
probability :math:`s_c = \sigma(\theta_c)`, truncated at ``max_len`` tokens, so its per-token
log-probs are :math:`\log(1 - s_c)` and, on the last token of a chain that stopped,
:math:`\log s_c`. As the reward does not depend on length, the expected policy gradient on
:math:`\theta` is exactly 0, and an unbiased loss has zero expected length drift. Under
``seq_mean_token_mean`` (GRPO) a response's score :math:`\nabla\sum_t\log\pi_t = 1 - L s` is
divided by its own length :math:`L`, and :math:`E[(1 - Ls)/L] = E[1/L] - s > 0` (Jensen), so wrong
responses (negative advantage) are pushed to stop later and correct ones to stop earlier. Under
``seq_mean_token_sum_norm`` (Dr. GRPO) the divisor is the constant ``max_len`` and the advantage
:math:`R_i - \bar R` does not depend on any length, so the expectation is 0.

* Z-scores: at the initial policy (mean length ``init_length``), ``zscore_batches`` independent
  batches of ``groups`` groups of ``group_size`` samples; for each loss the update direction of the
  stop logits, :math:`u = -\partial\mathcal L/\partial\theta`, is averaged over the batches and
  divided by its standard error. Negative means "lengthen". Besides GRPO and Dr. GRPO two
  token-mean variants are measured (reported, not judged): the batch-wide ``token_mean`` (verl,
  TRL ``dapo``) and DAPO's Eq. 8 read literally, a token mean within each group (``grpo_loss``
  vmapped over groups), which stays length-biased because each group's normaliser grows with its
  members' own lengths.
* Length drift under SGD: from the same start, ``sgd_steps`` plain SGD steps on the stop logits
  for GRPO and Dr. GRPO. The step sizes are noise-matched: each logit's learning rate is
  ``step_size`` divided by the std of its per-batch gradient at the start (from the z-score
  batches), so both losses take equally noisy steps and differ only in drift. Lengths are the
  policy's expected truncated length :math:`E[\min(L, T)] = (1 - (1 - s)^T)/s`.

Toy 2, the difficulty bias (exact). For a question solved with probability :math:`p` and a group
of :math:`G` samples with :math:`k \sim \mathrm{Bin}(G, p)` correct, the mean absolute advantage
per question is :math:`E_k[\frac1G\sum_i|\hat A_i|]`. With ``scale="none"`` it is
:math:`2k(G-k)/G^2`; with the group std (ddof 1, as GRPO) it is
:math:`2\sqrt{k(G-k)(G-1)}/G^{3/2}` (0 at :math:`k \in \{0, G\}`). Their ratio measures how much
std-normalisation up-weights a question; relative to :math:`p = 0.5` it up-weights
:math:`p = 0.05` by 1.333 at :math:`G = 8` and by :math:`\sqrt{0.25/(p(1-p))}` = 2.294 as
:math:`G \to \infty` (the law of large numbers turns both means into :math:`2p(1-p)` and
:math:`2\sqrt{p(1-p)}`). The ratio does not depend on the std's ddof; the mean :math:`|\hat A|`
themselves do (with ddof 0 they are 0.235 and 0.928 at p = 0.05 and 0.5; with GRPO's ddof 1,
0.220 and 0.868). The library's ``group_advantages`` is enumerated over :math:`k` with float64
binomial weights and must match these closed forms to ``toy2_tolerance``; on each seed a
Monte-Carlo estimate over ``toy2_groups`` sampled groups must match them within 4 of its standard
errors (computed exactly by the delta method from the same enumeration).

Toy 3, a tiny language model that also learns the answer. Prompts are the pairs
:math:`(a, b) \in \mathbb{Z}_m^2` (``toy3_modulus``), the right answer is :math:`(a + b) \bmod m`,
and a response is one answer token followed by filler tokens and EOS, at most ``toy3_max_len``
tokens; reward is 1 for the right answer, whatever the length. The model is a tabular
autoregressive LM: the answer token's logits are a table over prompts, and every later token's
distribution over {filler, EOS} a table over the context (prompt, answer token), so, as an LLM's
hidden state does, the context tells the model whether its own answer is right. It starts at
``toy3_init_accuracy`` with expected length ``toy3_init_length`` and is trained with Adam
(``toy3_lr``, ``toy3_steps`` steps of ``toy3_prompts`` prompts x ``group_size``) by GRPO and by
Dr. GRPO; accuracy and the expected lengths of wrong and correct responses are exact (the table's
probabilities). Nothing here is a neural network: alignax's decoder trained through
``alignax.sampling.generate`` for 300 steps x 5 seeds x 2 losses is beyond this module's CPU
budget, so toy 3 stands in for B.4's tiny-LM run.

The paper's own evidence (Fig. 1, Qwen2.5-Math-1.5B on MATH) is a reward-vs-length curve: GRPO
reaches ~0.6 reward at ~1000 tokens, Dr. GRPO at ~500; that setting is far beyond a CPU. The toys
reproduce the mechanism the paper derives (its §3.1). Criteria: toy 1, :math:`|z| < 3` for Dr.
GRPO and :math:`z \le -50` / :math:`\ge 50` for GRPO's wrong / correct stop logit; over the SGD
run GRPO's wrong-response length grows at least 5x and its correct-response length falls, while
Dr. GRPO's stay within [0.67x, 1.5x] (mean over seeds); toy 2, the closed forms to 1e-3 and the
sampled estimate within 4 standard errors; toy 3, GRPO's wrong-response length rises by at least
50 % and its correct-response length falls, Dr. GRPO's change by at most 15 %, and the two reach
accuracies within 3 points of each other (means over seeds), after both have learned (Dr. GRPO's
accuracy up by at least 20 points on every seed: a guard, so that equal accuracies cannot come
from neither learning).

Run: ``alignax run experiments/dr_grpo_length_bias.py [--seeds 8] [--set zscore_batches=20000]``
or ``python -m experiments.dr_grpo_length_bias`` (same flags); exits 1 if a criterion fails. The
CI smoke run, ``--seeds 2 --set zscore_batches=400 --set sgd_steps=100 --set curve_points=10
--set toy2_groups=20000``, passes every criterion too.
"""

import dataclasses
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

import alignax as ax
from alignax import experiment

CLAIM = ("GRPO's per-response 1/|o_i| normaliser lengthens incorrect responses and shortens "
         "correct ones although reward does not depend on length, while Dr. GRPO (advantage "
         "R - mean(R), token sums over a constant) has no length drift and reaches the same "
         "accuracy; and GRPO's 1/std advantage scale up-weights questions that are nearly always "
         "or nearly never solved.")
PAPER = ("Z. Liu, C. Chen, W. Li, P. Qi, T. Pang, C. Du, W. S. Lee, M. Lin, Understanding "
         "R1-Zero-Like Training: A Critical Perspective, 2025, arXiv:2503.20783, section 3.1")
DEFAULT_SEEDS = 8

# Toy 1 losses; the first two are judged, the token means are reported.
LOSSES = ("grpo", "dr_grpo", "token_mean", "group_token_mean")
CLASSES = ("wrong", "correct")


@dataclasses.dataclass(frozen=True)
class Config:
  """Toy 1: p_correct (exogenous accuracy), groups x group_size samples per batch, max_len (the
  truncation T, also Dr. GRPO's constant), init_length (expected length at the start, both
  classes), zscore_batches (batches for the z-scores), sgd_steps, step_size (noise-matched SGD
  step, in stop-logit standard deviations), curve_points (length-curve points kept).
  Toy 2: toy2_group_sizes (G of the enumerations), toy2_probs (solve rates; the first and the
  last are compared), toy2_groups (Monte-Carlo groups of group_size per p and seed),
  toy2_tolerance. Toy 3 (0 steps skips it): toy3_steps (Adam steps), toy3_modulus (m),
  toy3_prompts (prompts per step, each with group_size responses), toy3_max_len (response tokens,
  also Dr. GRPO's constant), toy3_init_accuracy, toy3_init_length, toy3_lr."""
  p_correct: float = 0.3
  groups: int = 32
  group_size: int = 8
  max_len: int = 512
  init_length: float = 32.0
  zscore_batches: int = 4000
  sgd_steps: int = 300
  step_size: float = 0.02
  curve_points: int = 30
  toy2_group_sizes: tuple[int, ...] = (8, 1024)
  toy2_probs: tuple[float, ...] = (0.05, 0.5)
  toy2_groups: int = 200_000
  toy2_tolerance: float = 1e-3
  toy3_steps: int = 300
  toy3_modulus: int = 5
  toy3_prompts: int = 16
  toy3_max_len: int = 64
  toy3_init_accuracy: float = 0.4
  toy3_init_length: float = 16.0
  toy3_lr: float = 0.01

  def __post_init__(self):
    if not 0 < self.p_correct < 1:
      raise ValueError(f"p_correct must lie in (0, 1), got {self.p_correct}")
    for name in ("groups", "zscore_batches", "sgd_steps", "toy2_groups"):
      if getattr(self, name) < 2:
        raise ValueError(f"{name} must be >= 2, got {getattr(self, name)}")
    if self.group_size < 2:
      raise ValueError(f"group_size must be >= 2 (a group std needs two samples), got "
                       f"{self.group_size}")
    if not 1 < self.init_length < self.max_len:
      raise ValueError(f"init_length must lie in (1, max_len={self.max_len}), got "
                       f"{self.init_length}")
    if not self.step_size > 0:
      raise ValueError(f"step_size must be > 0, got {self.step_size}")
    if not 1 <= self.curve_points <= self.sgd_steps:
      raise ValueError(f"curve_points must lie in [1, sgd_steps={self.sgd_steps}], got "
                       f"{self.curve_points}")
    if not self.toy2_group_sizes or min(self.toy2_group_sizes) < 2:
      raise ValueError(f"toy2_group_sizes must be a non-empty tuple of values >= 2, got "
                       f"{self.toy2_group_sizes}")
    if len(self.toy2_probs) < 2 or not all(0 < p < 1 for p in self.toy2_probs):
      raise ValueError(f"toy2_probs needs at least two values in (0, 1), got {self.toy2_probs}")
    if not self.toy2_tolerance > 0:
      raise ValueError(f"toy2_tolerance must be > 0, got {self.toy2_tolerance}")
    if self.toy3_steps < 0 or self.toy3_modulus < 2 or self.toy3_prompts < 1:
      raise ValueError(f"need toy3_steps >= 0 (0 skips toy 3), toy3_modulus >= 2 and "
                       f"toy3_prompts >= 1, got {self.toy3_steps}, {self.toy3_modulus}, "
                       f"{self.toy3_prompts}")
    if not 1 / self.toy3_modulus < self.toy3_init_accuracy < 1:
      raise ValueError(f"toy3_init_accuracy must lie in (1/toy3_modulus, 1), got "
                       f"{self.toy3_init_accuracy}")
    if not 2 < self.toy3_init_length < self.toy3_max_len:
      raise ValueError(f"toy3_init_length must lie in (2, toy3_max_len={self.toy3_max_len}), "
                       f"got {self.toy3_init_length}")
    if not self.toy3_lr > 0:
      raise ValueError(f"toy3_lr must be > 0, got {self.toy3_lr}")


# ---------------------------------------------------------------------------------------------
# toy 1: the stopping bandit


def init_stop_logit(init_length: float, max_len: int) -> float:
  """The stop logit whose expected truncated length :math:`(1 - (1-s)^T)/s` is ``init_length``."""
  lo, hi = 1e-9, 1.0  # the expected length falls monotonically in s: bisect
  for _ in range(200):
    s = 0.5 * (lo + hi)
    if (1 - (1 - s) ** max_len) / s > init_length:
      lo = s
    else:
      hi = s
  return math.log(s / (1 - s))


def expected_length(theta: jax.Array, max_len: int) -> jax.Array:
  """:math:`E[\\min(L, T)] = (1 - (1 - s)^T)/s`, stop probability :math:`s = \\sigma(\\theta)`."""
  s = jax.nn.sigmoid(theta)
  return -jnp.expm1(max_len * jax.nn.log_sigmoid(-theta)) / s


def _sample_batch(key: jax.Array, theta: jax.Array, config: Config):
  """Correctness ``[B, G]`` (bool) and truncated lengths ``[B, G]`` with a stopped flag."""
  correct_key, length_key = jax.random.split(key)
  shape = (config.groups, config.group_size)
  correct = jax.random.bernoulli(correct_key, config.p_correct, shape)
  log_continue = jax.nn.log_sigmoid(-theta)[correct.astype(jnp.int32)]
  # Inverse CDF of the geometric: P(L > l) = (1 - s)^l.
  u = jax.random.uniform(length_key, shape, minval=jnp.finfo(jnp.float32).tiny)
  raw = jnp.floor(jnp.log(u) / log_continue) + 1
  stopped = raw <= config.max_len
  return correct, jnp.minimum(raw, config.max_len).astype(jnp.int32), stopped


def _token_logp(theta: jax.Array, correct: jax.Array, length: jax.Array, stopped: jax.Array,
                max_len: int):
  """Per-token log-probs ``[B, G, T]`` of the sampled chains and their mask."""
  cls = correct.astype(jnp.int32)[..., None]
  t = jnp.arange(max_len)
  log_stop = jax.nn.log_sigmoid(theta)[cls]
  log_continue = jax.nn.log_sigmoid(-theta)[cls]
  is_stop = (t == length[..., None] - 1) & stopped[..., None]
  return jnp.where(is_stop, log_stop, log_continue), t < length[..., None]


def _loss(theta: jax.Array, name: str, correct: jax.Array, length: jax.Array, stopped: jax.Array,
          max_len: int) -> jax.Array:
  rewards = correct.astype(jnp.float32)
  logp, mask = _token_logp(theta, correct, length, stopped, max_len)
  if name == "dr_grpo":
    advantages = ax.group_advantages(rewards, scale="none")
    return ax.dr_grpo_loss(logp, None, advantages, mask, max_len=max_len)[0]
  advantages = ax.group_advantages(rewards, scale="group")
  if name == "grpo":
    return ax.grpo_loss(logp, None, advantages, mask)[0]
  if name == "token_mean":
    return ax.grpo_loss(logp, None, advantages, mask, loss_agg_mode="token_mean")[0]
  per_group = jax.vmap(lambda lp, a, m: ax.grpo_loss(lp, None, a, m,
                                                     loss_agg_mode="token_mean")[0])
  return jnp.mean(per_group(logp, advantages, mask))


def _update_directions(theta: jax.Array, key: jax.Array, config: Config) -> jax.Array:
  """``-grad`` of every loss in ``LOSSES`` on one batch, ``[len(LOSSES), 2]``."""
  batch = _sample_batch(key, theta, config)
  return jnp.stack([-jax.grad(_loss)(theta, name, *batch, config.max_len) for name in LOSSES])


def _toy1(key: jax.Array, config: Config) -> dict[str, jax.Array]:
  theta0 = jnp.full((2,), init_stop_logit(config.init_length, config.max_len), jnp.float32)
  zscore_key, sgd_key = jax.random.split(key)

  def accumulate(totals, batch_key):
    u = _update_directions(theta0, batch_key, config)
    return (totals[0] + u, totals[1] + u * u), None

  zeros = jnp.zeros((len(LOSSES), 2))
  (total, total_sq), _ = jax.lax.scan(
      accumulate, (zeros, zeros), jax.random.split(zscore_key, config.zscore_batches))
  n = config.zscore_batches
  mean = total / n
  std = jnp.sqrt(jnp.maximum(total_sq / n - mean * mean, 0.0) * n / (n - 1))
  zscore = mean / (std / math.sqrt(n))  # [loss, class]

  judged = (LOSSES.index("grpo"), LOSSES.index("dr_grpo"))
  lr = config.step_size / std[jnp.asarray(judged)]  # noise-matched, [2 losses, 2 classes]
  inner = config.sgd_steps // config.curve_points
  first = config.sgd_steps - inner * (config.curve_points - 1)

  def sgd_step(t, thetas):
    step_key = jax.random.fold_in(sgd_key, t)
    new = []
    for m, name in enumerate(("grpo", "dr_grpo")):
      batch = _sample_batch(jax.random.fold_in(step_key, m), thetas[m], config)
      grad = jax.grad(_loss)(thetas[m], name, *batch, config.max_len)
      new.append(thetas[m] - lr[m] * grad)
    return jnp.stack(new)

  def chunk(thetas, start_and_length):
    start, length = start_and_length
    thetas = jax.lax.fori_loop(start, start + length, sgd_step, thetas)
    return thetas, expected_length(thetas, config.max_len)

  starts = jnp.asarray([0] + [first + inner * i for i in range(config.curve_points - 1)])
  lengths = jnp.asarray([first] + [inner] * (config.curve_points - 1))
  thetas = jnp.stack([theta0, theta0])
  _, curve = jax.lax.scan(chunk, thetas, (starts, lengths))
  return {"zscore": zscore, "grad_mean": mean, "grad_std": std,
          "length_curve": curve,  # [curve_points, (grpo, dr_grpo), (wrong, correct)]
          "length_ratio": curve[-1] / expected_length(thetas, config.max_len)}


# ---------------------------------------------------------------------------------------------
# toy 2: std normalisation's difficulty weighting


def binomial_pmf(group_size: int, p: float) -> np.ndarray:
  """:math:`P(k)` for :math:`k = 0..G`, float64."""
  k = np.arange(group_size + 1)
  log_choose = (math.lgamma(group_size + 1) - np.array([math.lgamma(i + 1) for i in k])
                - np.array([math.lgamma(group_size - i + 1) for i in k]))
  return np.exp(log_choose + k * math.log(p) + (group_size - k) * math.log1p(-p))


def mean_abs_advantage_closed_form(group_size: int,
                                   k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per-question mean :math:`|\\hat A|` with ``k`` of ``G`` correct: (std-scaled, mean-only)."""
  g = group_size
  k = np.asarray(k, np.float64)
  return 2 * np.sqrt(k * (g - k) * (g - 1)) / g ** 1.5, 2 * k * (g - k) / g ** 2


def difficulty_ratio_closed_form(group_size: int, p_hard: float, p_mid: float) -> float:
  """How much std-normalisation up-weights a question solved with ``p_hard`` relative to one
  solved with ``p_mid``: the ratio of (std-scaled / mean-only) mean :math:`|\\hat A|`."""
  k = np.arange(group_size + 1)
  scaled, plain = mean_abs_advantage_closed_form(group_size, k)

  def weight(p):
    pmf = binomial_pmf(group_size, p)
    return float(pmf @ scaled) / float(pmf @ plain)

  return weight(p_hard) / weight(p_mid)


def difficulty_ratio_limit(p_hard: float, p_mid: float) -> float:
  """The :math:`G \\to \\infty` limit,
  :math:`\\sqrt{p_{mid}(1 - p_{mid}) / (p_{hard}(1 - p_{hard}))}`."""
  return math.sqrt(p_mid * (1 - p_mid) / (p_hard * (1 - p_hard)))


def monte_carlo_tolerance(group_size: int, p_hard: float, p_mid: float, groups: int, *,
                          z: float = 4.0) -> float:
  """``z`` standard errors of the Monte-Carlo ratio over ``groups`` groups per p (delta method on
  the log of each ratio of means, with the exact moments of the enumeration)."""
  k = np.arange(group_size + 1)
  scaled, plain = mean_abs_advantage_closed_form(group_size, k)
  var_log = 0.0
  for p in (p_hard, p_mid):
    pmf = binomial_pmf(group_size, p)
    mean_s, mean_p = pmf @ scaled, pmf @ plain
    centred = scaled / mean_s - plain / mean_p  # d log(mean_s / mean_p), per group
    var_log += float(pmf @ (centred - pmf @ centred) ** 2) / groups
  return z * math.sqrt(var_log) * difficulty_ratio_closed_form(group_size, p_hard, p_mid)


def _patterns(group_size: int) -> jax.Array:
  """Reward vectors with k = 0..G ones, ``[G + 1, G]``."""
  return (jnp.arange(group_size)[None, :] < jnp.arange(group_size + 1)[:, None]).astype(
      jnp.float32)


def _mean_abs(rewards: jax.Array, scale: str) -> jax.Array:
  return jnp.mean(jnp.abs(ax.group_advantages(rewards, scale=scale)), axis=-1)


def _toy2(key: jax.Array, config: Config) -> dict[str, jax.Array]:
  enumerated, sampled = [], []
  probs = config.toy2_probs
  for g in config.toy2_group_sizes:
    patterns = _patterns(g)
    scaled, plain = _mean_abs(patterns, "group"), _mean_abs(patterns, "none")
    weights = []
    for p in probs:  # float64 binomial weights as constants, the library's advantages per k
      pmf = jnp.asarray(binomial_pmf(g, p), jnp.float32)
      weights.append(jnp.dot(pmf, scaled) / jnp.dot(pmf, plain))
    enumerated.append(jnp.stack(weights))
  g = config.group_size
  for i, p in enumerate(probs):
    rewards = jax.random.bernoulli(jax.random.fold_in(key, i), p,
                                   (config.toy2_groups, g)).astype(jnp.float32)
    sampled.append(jnp.mean(_mean_abs(rewards, "group")) / jnp.mean(_mean_abs(rewards, "none")))
  sampled = jnp.stack(sampled)
  return {"toy2_weight": jnp.stack(enumerated),  # [group sizes, probs]
          "toy2_sampled_weight": sampled,  # [probs], at group_size
          "toy2_sampled_ratio": sampled[0] / sampled[-1]}


# ---------------------------------------------------------------------------------------------
# toy 3: a tiny language model that also learns the answer


def toy3_initial_params(config: Config) -> dict[str, np.ndarray]:
  """Answer logits ``[Q, m]`` (the right answer at ``toy3_init_accuracy``, the others equal) and
  stop logits ``[Q, m]`` (expected response length ``toy3_init_length`` for every context)."""
  m = config.toy3_modulus
  answers = toy3_answers(config)
  right = math.log(config.toy3_init_accuracy * (m - 1) / (1 - config.toy3_init_accuracy))
  answer_logits = np.where(np.arange(m)[None, :] == answers[:, None], right, 0.0)
  # A response is the answer token, fillers and (unless truncated) EOS: 1 + min(L, T - 1) tokens.
  stop = init_stop_logit(config.toy3_init_length - 1, config.toy3_max_len - 1)
  return {"answer": answer_logits, "stop": np.full((m * m, m), stop)}


def toy3_answers(config: Config) -> np.ndarray:
  """The right answer of prompt ``q = a * m + b``: ``(a + b) mod m``, ``[Q]``."""
  m = config.toy3_modulus
  q = np.arange(m * m)
  return (q // m + q % m) % m


def toy3_statistics(params, config: Config) -> jax.Array:
  """Exact accuracy and expected lengths of wrong and correct responses, ``[3]``."""
  answers = jnp.asarray(toy3_answers(config))
  probs = jax.nn.softmax(params["answer"])  # [Q, m]
  right = jax.nn.one_hot(answers, config.toy3_modulus, dtype=bool)
  lengths = 1 + expected_length(params["stop"], config.toy3_max_len - 1)  # [Q, m]
  wrong_mass = jnp.where(right, 0.0, probs)
  right_mass = jnp.where(right, probs, 0.0)
  return jnp.stack([jnp.mean(jnp.sum(right_mass, -1)),
                    jnp.sum(wrong_mass * lengths) / jnp.sum(wrong_mass),
                    jnp.sum(right_mass * lengths) / jnp.sum(right_mass)])


def _toy3_batch(key, params, config: Config):
  """Per-token log-probs ``[B, G, T]`` as a function of ``params``, their mask and the rewards."""
  m, t_max = config.toy3_modulus, config.toy3_max_len
  prompt_key, answer_key, length_key = jax.random.split(key, 3)
  prompts = jax.random.randint(prompt_key, (config.toy3_prompts, 1), 0, m * m)
  prompts = jnp.broadcast_to(prompts, (config.toy3_prompts, config.group_size))
  answer_logits = params["answer"][prompts]  # [B, G, m]
  answer = jax.random.categorical(answer_key, jax.lax.stop_gradient(answer_logits))
  stop_logit = params["stop"][prompts, answer]  # [B, G]: the context is (prompt, answer)
  log_continue = jax.lax.stop_gradient(jax.nn.log_sigmoid(-stop_logit))
  u = jax.random.uniform(length_key, answer.shape, minval=jnp.finfo(jnp.float32).tiny)
  fillers_and_stop = jnp.floor(jnp.log(u) / log_continue) + 1  # geometric, >= 1
  stopped = fillers_and_stop <= t_max - 1
  length = 1 + jnp.minimum(fillers_and_stop, t_max - 1).astype(jnp.int32)
  t = jnp.arange(t_max)
  answer_logp = jnp.take_along_axis(jax.nn.log_softmax(answer_logits), answer[..., None], -1)
  is_stop = (t == length[..., None] - 1) & stopped[..., None]
  tail = jnp.where(is_stop, jax.nn.log_sigmoid(stop_logit)[..., None],
                   jax.nn.log_sigmoid(-stop_logit)[..., None])
  logp = jnp.where(t == 0, answer_logp, tail)
  rewards = (answer == jnp.asarray(toy3_answers(config))[prompts]).astype(jnp.float32)
  return logp, t < length[..., None], rewards


def _toy3(key: jax.Array, config: Config) -> dict[str, jax.Array]:
  params0 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), toy3_initial_params(config))
  optimizer = optax.adam(config.toy3_lr)

  def loss(params, name, batch_key):
    logp, mask, rewards = _toy3_batch(batch_key, params, config)
    if name == "grpo":
      return ax.grpo_loss(logp, None, ax.group_advantages(rewards, scale="group"), mask)[0]
    return ax.dr_grpo_loss(logp, None, ax.group_advantages(rewards, scale="none"), mask,
                           max_len=config.toy3_max_len)[0]

  def step(state, t):
    new = []
    for m, name in enumerate(("grpo", "dr_grpo")):
      params, opt_state = state[m]
      batch_key = jax.random.fold_in(jax.random.fold_in(key, t), m)
      grad = jax.grad(loss)(params, name, batch_key)
      updates, opt_state = optimizer.update(grad, opt_state)
      new.append((optax.apply_updates(params, updates), opt_state))
    return tuple(new), None

  state = tuple((params0, optimizer.init(params0)) for _ in range(2))
  state, _ = jax.lax.scan(step, state, jnp.arange(config.toy3_steps))
  start = toy3_statistics(params0, config)
  final = jnp.stack([toy3_statistics(state[m][0], config) for m in range(2)])
  return {"toy3_start": start,  # [accuracy, wrong length, correct length]
          "toy3_final": final}  # [(grpo, dr_grpo), 3]


def make_train(config: Config):
  """``train(key)``: toy 1's z-scores and length curves, toy 2's difficulty weights and toy 3's
  accuracy and lengths."""

  def train(key):
    toy1_key, toy2_key, toy3_key = jax.random.split(key, 3)
    out = {**_toy1(toy1_key, config), **_toy2(toy2_key, config)}
    if config.toy3_steps:
      out.update(_toy3(toy3_key, config))
    return out

  return train


# ---------------------------------------------------------------------------------------------
# criteria and plots


def criteria(config: Config, measured: dict[str, np.ndarray]) -> list[dict]:
  out = []
  z = measured["zscore"]  # [seed, loss, class]
  grpo, dr = LOSSES.index("grpo"), LOSSES.index("dr_grpo")
  out.append(experiment.criterion("toy1 GRPO z(stop wrong) <= -50 (lengthens wrong)",
                                  paper_value=-50.0, values=z[:, grpo, 0], tolerance=0.0,
                                  rule="at_most"))
  out.append(experiment.criterion("toy1 GRPO z(stop correct) >= 50 (shortens correct)",
                                  paper_value=50.0, values=z[:, grpo, 1], tolerance=0.0,
                                  rule="at_least"))
  for c, cls in enumerate(CLASSES):
    out.append(experiment.criterion(f"toy1 Dr. GRPO |z(stop {cls})| < 3 (unbiased)",
                                    paper_value=0.0, values=z[:, dr, c], tolerance=3.0))
  ratio = measured["length_ratio"]  # [seed, (grpo, dr_grpo), class]
  out.append(experiment.criterion(
      f"toy1 GRPO wrong length x{config.sgd_steps} steps >= 5", paper_value=5.0,
      values=ratio[:, 0, 0], tolerance=0.0, rule="at_least", statistic="mean"))
  out.append(experiment.criterion(
      f"toy1 GRPO correct length x{config.sgd_steps} steps < 1 (falls)", paper_value=1.0,
      values=ratio[:, 0, 1], tolerance=0.0, rule="at_most", statistic="mean"))
  for c, cls in enumerate(CLASSES):
    # [0.67, 1.5] as a band around 1.085 with half-width 0.415.
    out.append(experiment.criterion(
        f"toy1 Dr. GRPO {cls} length x{config.sgd_steps} steps in [0.67, 1.5]",
        paper_value=(0.67 + 1.5) / 2, values=ratio[:, 1, c], tolerance=(1.5 - 0.67) / 2,
        statistic="mean"))
  p_hard, p_mid = config.toy2_probs[0], config.toy2_probs[-1]
  enumerated = measured["toy2_weight"]  # [seed, group size, prob]
  for j, g in enumerate(config.toy2_group_sizes):
    exact = difficulty_ratio_closed_form(g, p_hard, p_mid)
    out.append(experiment.criterion(
        f"toy2 G={g} up-weighting of p={p_hard:g} vs p={p_mid:g} (enumeration)",
        paper_value=exact, values=enumerated[:, j, 0] / enumerated[:, j, -1],
        tolerance=config.toy2_tolerance))
  g_max = max(config.toy2_group_sizes)
  limit = difficulty_ratio_limit(p_hard, p_mid)
  # The finite-G gap to the limit is what the closed form says it is, plus the float32 slack.
  gap = abs(difficulty_ratio_closed_form(g_max, p_hard, p_mid) - limit)
  out.append(experiment.criterion(
      f"toy2 G={g_max} approaches the G->inf up-weighting sqrt(p(1-p) ratio)", paper_value=limit,
      values=enumerated[:, config.toy2_group_sizes.index(g_max), 0]
      / enumerated[:, config.toy2_group_sizes.index(g_max), -1],
      tolerance=gap + config.toy2_tolerance))
  g = config.group_size
  out.append(experiment.criterion(
      f"toy2 G={g} up-weighting, {config.toy2_groups} sampled groups",
      paper_value=difficulty_ratio_closed_form(g, p_hard, p_mid),
      values=measured["toy2_sampled_ratio"],
      tolerance=monte_carlo_tolerance(g, p_hard, p_mid, config.toy2_groups)))
  if config.toy3_steps:
    start, final = measured["toy3_start"], measured["toy3_final"]  # [S, 3], [S, method, 3]
    steps = f"x{config.toy3_steps} steps"
    out.append(experiment.criterion(
        f"toy3 GRPO wrong length {steps} >= 1.5", paper_value=1.5,
        values=final[:, 0, 1] / start[:, 1], tolerance=0.0, rule="at_least", statistic="mean"))
    out.append(experiment.criterion(
        f"toy3 GRPO correct length {steps} < 1 (falls)", paper_value=1.0,
        values=final[:, 0, 2] / start[:, 2], tolerance=0.0, rule="at_most", statistic="mean"))
    for c, cls in ((1, "wrong"), (2, "correct")):
      out.append(experiment.criterion(
          f"toy3 Dr. GRPO {cls} length {steps} within 15%", paper_value=1.0,
          values=final[:, 1, c] / start[:, c], tolerance=0.15, statistic="mean"))
    out.append(experiment.criterion(
        "toy3 accuracy GRPO - Dr. GRPO within 3 points", paper_value=0.0,
        values=final[:, 0, 0] - final[:, 1, 0], tolerance=0.03, statistic="mean"))
    out.append(experiment.criterion(
        f"toy3 both learn: Dr. GRPO accuracy gain {steps} >= 0.2", paper_value=0.2,
        values=final[:, 1, 0] - start[:, 0], tolerance=0.0, rule="at_least"))
  return out


def curve_steps(config: Config) -> np.ndarray:
  inner = config.sgd_steps // config.curve_points
  first = config.sgd_steps - inner * (config.curve_points - 1)
  return first + inner * np.arange(config.curve_points)


def plot(config: Config, measured: dict[str, np.ndarray], out_dir: str) -> None:
  """``length_drift.png``: expected length of wrong and correct chains over SGD steps, GRPO vs
  Dr. GRPO (mean over seeds, band = min..max); ``zscores.png``: the z-scores of every loss;
  ``toy3.png``: toy 3's lengths and accuracy before and after; ``difficulty.png``: the
  std-normalisation up-weighting over p (closed form)."""
  import matplotlib.pyplot as plt

  steps = np.concatenate([[0], curve_steps(config)])
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  start = np.full((measured["length_curve"].shape[0], 1, 2, 2), config.init_length)
  curves = np.concatenate([start, measured["length_curve"]], axis=1)  # [seed, point, loss, class]
  for panel, (c, cls) in zip(axes, enumerate(CLASSES)):
    for m, (name, color) in enumerate((("GRPO", "C3"), ("Dr. GRPO", "C0"))):
      curve = curves[:, :, m, c]
      panel.plot(steps, curve.mean(0), color=color, label=name)
      panel.fill_between(steps, curve.min(0), curve.max(0), color=color, alpha=0.2)
    panel.set_yscale("log")
    panel.set_xlabel("SGD step")
    panel.set_ylabel("expected length (tokens)")
    panel.set_title(f"{cls} chains (reward independent of length)")
  axes[0].legend()
  fig.tight_layout()
  fig.savefig(os.path.join(out_dir, "length_drift.png"), dpi=120)
  plt.close(fig)

  fig, panel = plt.subplots(figsize=(6, 3.5))
  z = measured["zscore"]
  xs = np.arange(len(LOSSES))
  for c, cls in enumerate(CLASSES):
    panel.bar(xs + (c - 0.5) * 0.4, z[:, :, c].mean(0), 0.4, label=f"stop logit, {cls}")
  panel.axhline(0, color="k", linewidth=0.8)
  panel.set_yscale("symlog", linthresh=3)
  panel.set_xticks(xs, LOSSES)
  panel.set_ylabel("E[update] / SE (< 0: lengthen)")
  panel.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(os.path.join(out_dir, "zscores.png"), dpi=120)
  plt.close(fig)

  if config.toy3_steps:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    start, final = measured["toy3_start"], measured["toy3_final"]
    xs = np.arange(2)
    for i, (label, values) in enumerate((("start", start), ("GRPO", final[:, 0]),
                                         ("Dr. GRPO", final[:, 1]))):
      axes[0].bar(xs + (i - 1) * 0.27, values[:, 1:].mean(0), 0.27,
                  yerr=values[:, 1:].std(0), label=label)
      axes[1].bar(i, values[:, 0].mean(0), yerr=values[:, 0].std(0))
    axes[0].set_xticks(xs, ["wrong responses", "correct responses"])
    axes[0].set_ylabel("expected length (tokens)")
    axes[0].legend(fontsize=8)
    axes[1].set_xticks(range(3), ["start", "GRPO", "Dr. GRPO"])
    axes[1].set_ylabel("accuracy")
    fig.suptitle(f"toy 3: tabular LM, {config.toy3_steps} Adam steps")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "toy3.png"), dpi=120)
    plt.close(fig)

  fig, panel = plt.subplots(figsize=(6, 3.5))
  ps = np.linspace(0.02, 0.98, 49)
  for g in config.toy2_group_sizes:
    k = np.arange(g + 1)
    scaled, plain = mean_abs_advantage_closed_form(g, k)
    weight = [(binomial_pmf(g, p) @ scaled) / (binomial_pmf(g, p) @ plain) for p in ps]
    panel.plot(ps, np.asarray(weight) / weight[len(ps) // 2], label=f"G={g}")
  panel.plot(ps, [difficulty_ratio_limit(p, 0.5) for p in ps], "k--", label="G -> inf")
  panel.set_xlabel("solve rate p")
  panel.set_ylabel("std / mean-only weight, vs p = 0.5")
  panel.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(os.path.join(out_dir, "difficulty.png"), dpi=120)
  plt.close(fig)


if __name__ == "__main__":
  sys.exit(experiment.main(sys.argv[1:], module=sys.modules[__name__]))
