r"""GRPO's group size G at an equal sample budget: small groups give noisier advantages and more
zero-spread (gradient-free) groups; large groups are steadier but spend the budget on fewer prompts.

GRPO (Shao et al. 2024, DeepSeekMath §4.1.2) replaces PPO's critic by the mean reward of a group
of G completions of the same prompt, :math:`\hat A_i = (R_i - \bar R)/\mathrm{std}(R)`; the paper
uses G = 64. The group size trades three things at a fixed number of sampled completions per step
``samples_per_step`` = N (so N/G prompts per step):

* the baseline's error: with binary rewards of success rate :math:`p`, the group-mean baseline
  misses the value :math:`p` by :math:`E[(\bar R - p)^2] = p(1-p)/G`, which is exactly the mean
  squared error of the mean-centred advantage :math:`R_i - \bar R` against the true advantage
  :math:`R_i - p`;
* the share of zero-spread groups (all rewards equal, no gradient; DAPO's dynamic sampling filters
  them), :math:`p^G + (1-p)^G`;
* the number of distinct prompts an update sees, N/G.

Task and policy. A synthetic answer-matching task: a pool of ``prompts`` questions, each a
feature vector :math:`x_q \in \mathbb{R}^F` (``features``), whose answer is ``answer_len`` tokens
over a vocabulary of ``vocab``, token :math:`d` being the argmax of a hidden linear teacher
:math:`W^*_d x_q`; reward 1 if the whole answer is right. The policy is a small pure-JAX
log-linear one, :math:`\pi(y_d \mid q) = \mathrm{softmax}(W_d x_q + b_d)`, every answer token
sampled independently given the question, so, as in a language model, all questions share the
parameters and an update on some questions moves the others. It starts at
:math:`W = \kappa W^* + \sigma\,\epsilon` (``init_scale``, ``init_noise``), which spreads the
questions' initial success rates :math:`p_0` from near 0 to near 1 (mean ~0.2 by default). The task
(teacher, features, initial policy) is fixed by ``task_seed``; the experiment's seeds drive the
sampling only. A log-linear policy rather than alignax's decoder with ``alignax.sampling.generate``
because (i) every seed and group size, with its whole training run, is one ``jit(vmap(train))``
program, so 8 seeds x 5 group sizes take well under a minute of CPU; (ii) the expected reward
:math:`J(\theta) = \frac1P\sum_q\prod_d\pi_\theta(a_{q,d}\mid q)` over the pool, its gradient and
each question's :math:`p` are exact, so the baseline error, the zero-spread share and every update
are measured against the truth rather than against another estimate.

The loss is alignax's: ``group_advantages(rewards, scale="group")`` and ``grpo_loss`` (GRPO's
``seq_mean_token_mean``, one update per batch so the ratio is 1, no KL), with Adam at learning rate
``lr`` for ``steps`` steps, as GRPO trainers use: each step's size is set by the learning rate, so
what a larger group buys is a better direction, not a longer step (``optimizer="sgd"`` takes plain
gradient steps instead). Measured for each G in ``group_sizes``:

* at the initial policy, over ``probe_batches`` batches: the mean squared error of the advantages
  :math:`R_i - \bar R` (``group_advantages(scale="none")``) against :math:`R_i - p`, and the share
  of zero-spread groups (``informative_group_mask``), each against its closed form averaged over
  the pool, within 4 standard errors (from the per-group variances, exact by enumerating the
  binomial);
* during training, averaged over the steps: the cosine between each step's gradient and the exact
  gradient of the expected reward of that step's own questions (``cos_batch``: the noise from
  sampling completions, which larger groups reduce) and of the whole pool (``cos_pool``: that
  noise plus the noise from seeing only N/G questions); the zero-spread share; and :math:`J`
  after the budget.

Criteria: the two closed forms for each G; "steadier": ``cos_batch`` is higher at G =
max(group_sizes) than at G = min(group_sizes), on every seed; "costlier": at the equal budget the
best G is neither the smallest nor the largest, on the mean over seeds (the final reward of the
best intermediate G minus that of the better extreme is >= 0).

What the trade-off rests on: the parameters shared between questions. In a variant without them
(a logits table per question, plain SGD; tried while building this experiment, not an option of
it) the reward after the budget rose monotonically with G, as
the expected per-sample gradient of a mean-centred group, :math:`(1 - 1/G)\nabla p`, grows with G
and nothing is lost by visiting fewer questions. With sharing, both Adam (lr 0.003 to 0.03) and
plain SGD at a stable step (lr 3) put the best G in the middle.

Run: ``alignax run experiments/grpo_group_size.py [--seeds 8] [--set steps=600]
[--sweep lr=0.003,0.01,0.03]`` (``lr`` sweeps inside the same compiled program) or
``python -m experiments.grpo_group_size`` (same flags); exits 1 if a criterion fails. The CI
smoke run (``--seeds 2 --set steps=30 --set curve_points=3 --set probe_batches=40``) checks the
closed forms and "steadier"; "costlier" needs the full budget.
"""

import dataclasses
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

import alignax as ax
from alignax import experiment

CLAIM = ("At an equal sample budget, small GRPO groups give noisier advantages (the group-mean "
         "baseline misses the value by p(1-p)/G) and more zero-spread groups (p^G + (1-p)^G), so "
         "their updates are noisier; large groups are steadier but costlier, as each update covers "
         "fewer prompts, so neither extreme gets the most reward from the budget.")
PAPER = ("Z. Shao, P. Wang, Q. Zhu, R. Xu, J. Song, X. Bi, H. Zhang, M. Zhang, Y. K. Li, Y. Wu, "
         "D. Guo, DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language "
         "Models, 2024, arXiv:2402.03300, section 4.1.2 (GRPO; the group-size trade-off is the "
         "claim of alignax issue 12, checked against closed forms)")
DEFAULT_SEEDS = 8
VMAP_FIELDS = ("lr",)
OPTIMIZERS = {"adam": optax.adam, "sgd": optax.sgd}


@dataclasses.dataclass(frozen=True)
class Config:
  """group_sizes: the G compared; samples_per_step: completions per step (a multiple of every G);
  steps: optimiser steps (the budget is steps x samples_per_step); lr: the learning rate;
  optimizer: ``"adam"`` or ``"sgd"`` (plain, step proportional to the gradient); prompts,
  features, answer_len, vocab: the task; init_scale, init_noise: the initial policy; task_seed:
  the task's seed; probe_batches: batches for the initial-policy statistics; curve_points:
  reward-curve points kept."""
  group_sizes: tuple[int, ...] = (2, 4, 8, 16, 32)
  samples_per_step: int = 64
  steps: int = 300
  lr: float = 0.01
  optimizer: str = "adam"
  prompts: int = 1024
  features: int = 16
  answer_len: int = 4
  vocab: int = 8
  init_scale: float = 3.0
  init_noise: float = 0.5
  task_seed: int = 0
  probe_batches: int = 200
  curve_points: int = 30

  def __post_init__(self):
    if len(self.group_sizes) < 3 or min(self.group_sizes) < 2:
      raise ValueError(f"group_sizes needs at least three values >= 2, got {self.group_sizes}")
    if list(self.group_sizes) != sorted(set(self.group_sizes)):
      raise ValueError(f"group_sizes must be increasing, got {self.group_sizes}")
    bad = [g for g in self.group_sizes if self.samples_per_step % g]
    if bad:
      raise ValueError(f"samples_per_step={self.samples_per_step} must be a multiple of every "
                       f"group size (equal budget); not of {bad}")
    for name in ("steps", "prompts", "features", "answer_len", "probe_batches"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
    if self.vocab < 2:
      raise ValueError(f"vocab must be >= 2, got {self.vocab}")
    if isinstance(self.lr, (int, float)) and not self.lr > 0:  # a traced lr is swept (VMAP_FIELDS)
      raise ValueError(f"lr must be > 0, got {self.lr}")
    if self.optimizer not in OPTIMIZERS:
      raise ValueError(f"optimizer must be one of {list(OPTIMIZERS)}, got {self.optimizer!r}")
    if not (self.init_scale >= 0 and self.init_noise >= 0):
      raise ValueError(f"need init_scale >= 0 and init_noise >= 0, got "
                       f"init_scale={self.init_scale}, init_noise={self.init_noise}")
    if not 1 <= self.curve_points <= self.steps:
      raise ValueError(f"curve_points must lie in [1, steps={self.steps}], got "
                       f"{self.curve_points}")


def make_task(config: Config) -> dict[str, np.ndarray]:
  """The fixed task, float64: features ``[P, F]``, answers ``[P, D]`` and the initial policy
  ``W [D, V, F]``, ``b [D, V]``."""
  rng = np.random.default_rng(config.task_seed)
  d, v, f = config.answer_len, config.vocab, config.features
  teacher = rng.standard_normal((d, v, f)) / math.sqrt(f)
  x = rng.standard_normal((config.prompts, f))
  answers = np.einsum("dvf,pf->pdv", teacher, x).argmax(-1)
  noise = rng.standard_normal((d, v, f)) / math.sqrt(f)
  w = config.init_scale * teacher + config.init_noise * noise
  return {"x": x, "answers": answers, "w": w, "b": np.zeros((d, v))}


def success_rates(params, x, answers):
  """Each question's :math:`p = \\prod_d \\pi(a_d \\mid q)`, ``[P]`` (NumPy or JAX arrays)."""
  xp = jnp if isinstance(params["w"], jax.Array) else np
  logits = xp.einsum("dvf,pf->pdv", params["w"], x) + params["b"]
  logits = logits - logits.max(-1, keepdims=True)
  logp = logits - xp.log(xp.exp(logits).sum(-1, keepdims=True))
  right = xp.take_along_axis(logp, answers[..., None], axis=-1)[..., 0]
  return xp.exp(right.sum(-1))


def closed_forms(config: Config, group_size: int) -> dict[str, float]:
  """Over a uniformly drawn question of the pool, at the initial policy: the mean and per-group
  variance of the baseline's squared error :math:`(\\bar R - p)^2` and of the zero-spread
  indicator, by enumerating the binomial (float64)."""
  task = make_task(config)
  p = success_rates(task, task["x"], task["answers"])[:, None]
  g = group_size
  k = np.arange(g + 1)
  log_choose = np.array([math.lgamma(g + 1) - math.lgamma(i + 1) - math.lgamma(g - i + 1)
                         for i in k])
  pmf = np.exp(log_choose + k * np.log(p) + (g - k) * np.log1p(-p))  # [prompts, k]
  error = (k / g - p) ** 2
  zero = ((k == 0) | (k == g)).astype(np.float64)
  out = {}
  for name, value in (("baseline_mse", error), ("zero_spread", zero)):
    mean = float(np.mean(np.sum(pmf * value, axis=-1)))
    second = float(np.mean(np.sum(pmf * value * value, axis=-1)))
    out[name], out[f"{name}_var"] = mean, second - mean * mean
  return out


def _group_ops(config: Config):
  """Per group size, the library's group statistics on a flat batch of ``samples_per_step``
  rewards laid out group by group: ``(advantages, centred, zero_spread)``, each ``[N]``. One
  ``lax.switch`` branch per G, so a single program (vmapped over the index of G) serves every G."""
  n = config.samples_per_step

  def branch(g):
    def ops(rewards):
      groups = rewards.reshape(n // g, g)
      zero = jnp.repeat(~ax.informative_group_mask(groups), g)
      return (ax.group_advantages(groups, scale="group").reshape(n),
              ax.group_advantages(groups, scale="none").reshape(n), zero.astype(jnp.float32))
    return ops

  branches = [branch(g) for g in config.group_sizes]
  return lambda index, rewards: jax.lax.switch(index, branches, rewards)


def _logp(params, x, questions, completions):
  logits = jnp.einsum("dvf,nf->ndv", params["w"], x[questions]) + params["b"]  # [N, D, V]
  logp = jax.nn.log_softmax(logits)
  return jnp.take_along_axis(logp, completions[..., None], axis=-1)[..., 0]  # [N, D]


def _cosine(a, b):
  a, b = ravel_pytree(a)[0], ravel_pytree(b)[0]
  return jnp.dot(a, b) / jnp.maximum(jnp.linalg.norm(a) * jnp.linalg.norm(b), 1e-30)


def _one_group_size(key, index, config: Config) -> dict[str, jax.Array]:
  """Every measurement for the group size ``config.group_sizes[index]`` (``index`` traced)."""
  n = config.samples_per_step
  group_size = jnp.asarray(config.group_sizes, jnp.int32)[index]
  group_ops = _group_ops(config)
  task = make_task(config)
  x = jnp.asarray(task["x"], jnp.float32)
  answers = jnp.asarray(task["answers"], jnp.int32)
  params0 = {"w": jnp.asarray(task["w"], jnp.float32), "b": jnp.asarray(task["b"], jnp.float32)}
  p0 = success_rates(params0, x, answers)
  probe_key, train_key = jax.random.split(jax.random.fold_in(key, group_size))

  def sample(batch_key, params):
    prompt_key, answer_key = jax.random.split(batch_key)
    draws = jax.random.randint(prompt_key, (n,), 0, x.shape[0])
    questions = draws[jnp.arange(n) // group_size]  # the first N/G draws, G times each
    logits = jnp.einsum("dvf,nf->ndv", params["w"], x[questions]) + params["b"]
    completions = jax.random.categorical(answer_key, logits)  # [N, D]
    rewards = jnp.all(completions == answers[questions], axis=-1).astype(jnp.float32)
    return questions, completions, rewards

  def probe(_, batch_key):
    questions, _, rewards = sample(batch_key, params0)
    _, centred, zero = group_ops(index, rewards)
    error = centred - (rewards - p0[questions])  # against the true advantage R - p
    return None, (jnp.mean(error ** 2), jnp.mean(zero))

  _, (mse, zero) = jax.lax.scan(probe, None, jax.random.split(probe_key, config.probe_batches))

  optimizer = OPTIMIZERS[config.optimizer](config.lr)

  def reward(params, questions=None):
    rates = success_rates(params, x, answers)
    return jnp.mean(rates if questions is None else rates[questions])

  def loss(params, questions, completions, advantages):
    logp = _logp(params, x, questions, completions)
    # [N, D] with the groups flattened: seq_mean_token_mean does not see the grouping.
    return ax.grpo_loss(logp, None, advantages, jnp.ones(logp.shape, jnp.bool_))[0]

  def step(t, carry):
    params, opt_state, totals = carry
    questions, completions, rewards = sample(jax.random.fold_in(train_key, t), params)
    advantages, _, zero_share = group_ops(index, rewards)
    grad = jax.grad(loss)(params, questions, completions, advantages)
    # The loss is minimised: -grad is the ascent direction the exact gradients are compared to.
    ascent = jax.tree.map(jnp.negative, grad)
    cos_batch = _cosine(ascent, jax.grad(reward)(params, questions))
    cos_pool = _cosine(ascent, jax.grad(reward)(params))
    updates, opt_state = optimizer.update(grad, opt_state)
    totals = totals + jnp.stack([cos_batch, cos_pool, jnp.mean(zero_share)])
    return optax.apply_updates(params, updates), opt_state, totals

  def chunk(carry, start_and_length):
    start, length = start_and_length
    carry = jax.lax.fori_loop(start, start + length, step, carry)
    return carry, reward(carry[0])

  inner = config.steps // config.curve_points
  first = config.steps - inner * (config.curve_points - 1)
  starts = jnp.asarray([0] + [first + inner * i for i in range(config.curve_points - 1)])
  lengths = jnp.asarray([first] + [inner] * (config.curve_points - 1))
  init = (params0, optimizer.init(params0), jnp.zeros((3,)))
  (_, _, totals), curve = jax.lax.scan(chunk, init, (starts, lengths))
  means = totals / config.steps
  return {"baseline_mse": jnp.mean(mse), "zero_spread": jnp.mean(zero),
          "cos_batch": means[0], "cos_pool": means[1], "train_zero_spread": means[2],
          "reward_curve": curve, "final_reward": curve[-1], "initial_reward": jnp.mean(p0)}


def make_train(config: Config):
  """``train(key)``: every measurement stacked over ``group_sizes`` (axis 0 after the seed); the
  group sizes are one program, vmapped over their index."""

  def train(key):
    indices = jnp.arange(len(config.group_sizes))
    out = jax.vmap(lambda i: _one_group_size(key, i, config))(indices)
    out["initial_reward"] = out["initial_reward"][0]
    return out

  return train


def criteria(config: Config, measured: dict[str, np.ndarray]) -> list[dict]:
  out = []
  for j, g in enumerate(config.group_sizes):
    exact = closed_forms(config, g)
    groups = config.probe_batches * (config.samples_per_step // g)
    for name, label in (("baseline_mse", "advantage MSE vs R - p = mean p(1-p)/G"),
                        ("zero_spread", "zero-spread share = mean p^G + (1-p)^G")):
      out.append(experiment.criterion(
          f"G={g} {label}", paper_value=exact[name], values=measured[name][:, j],
          tolerance=4 * math.sqrt(exact[f"{name}_var"] / groups)))
  lo, hi = config.group_sizes[0], config.group_sizes[-1]
  cos = measured["cos_batch"]
  out.append(experiment.criterion(
      f"steadier: cosine(update, exact gradient on its questions), G={hi} minus G={lo}, > 0",
      paper_value=0.0, values=cos[:, -1] - cos[:, 0], tolerance=0.0, rule="at_least"))
  final = measured["final_reward"]  # [seed, G]
  middle = int(final[:, 1:-1].mean(0).argmax()) + 1
  out.append(experiment.criterion(
      f"costlier: final J of the best middle G ({config.group_sizes[middle]}) minus the better "
      f"of G={lo}, G={hi}, >= 0", paper_value=0.0,
      values=final[:, middle] - np.maximum(final[:, 0], final[:, -1]), tolerance=0.0,
      rule="at_least", statistic="mean"))
  return out


def curve_steps(config: Config) -> np.ndarray:
  inner = config.steps // config.curve_points
  first = config.steps - inner * (config.curve_points - 1)
  return first + inner * np.arange(config.curve_points)


def plot(config: Config, measured: dict[str, np.ndarray], out_dir: str) -> None:
  """``reward_curves.png``: exact expected reward over the sample budget per G (mean over seeds,
  band = min..max); ``group_size.png``: against G, the baseline MSE and zero-spread share at the
  start (measured and closed form), the update-gradient cosines, and the final reward."""
  import matplotlib.pyplot as plt

  samples = np.concatenate([[0], curve_steps(config)]) * config.samples_per_step
  fig, panel = plt.subplots(figsize=(6, 4))
  for j, g in enumerate(config.group_sizes):
    start = np.full((measured["reward_curve"].shape[0], 1), measured["initial_reward"][0])
    curve = np.concatenate([start, measured["reward_curve"][:, j]], axis=1)
    panel.plot(samples, curve.mean(0), color=f"C{j}", label=f"G={g}")
    panel.fill_between(samples, curve.min(0), curve.max(0), color=f"C{j}", alpha=0.15)
  panel.set_xlabel("sampled completions")
  panel.set_ylabel("expected reward J")
  panel.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(os.path.join(out_dir, "reward_curves.png"), dpi=120)
  plt.close(fig)

  gs = np.asarray(config.group_sizes)
  exact = [closed_forms(config, g) for g in config.group_sizes]
  fig, axes = plt.subplots(1, 4, figsize=(16, 3.5))
  for panel, name, title in ((axes[0], "baseline_mse", "advantage MSE at start"),
                             (axes[1], "zero_spread", "zero-spread share at start")):
    panel.errorbar(gs, measured[name].mean(0), yerr=measured[name].std(0), fmt="o",
                   label="measured")
    panel.plot(gs, [e[name] for e in exact], "k--", label="closed form")
    panel.set_title(title)
    panel.legend(fontsize=8)
  for name, label in (("cos_batch", "vs its questions' gradient"),
                      ("cos_pool", "vs the pool's gradient")):
    axes[2].errorbar(gs, measured[name].mean(0), yerr=measured[name].std(0), fmt="o", label=label)
  axes[2].set_title("cosine of the update")
  axes[2].legend(fontsize=8)
  axes[3].errorbar(gs, measured["final_reward"].mean(0), yerr=measured["final_reward"].std(0),
                   fmt="o")
  axes[3].axhline(measured["initial_reward"][0], color="0.6", linestyle=":", label="start")
  axes[3].set_title(f"J after {config.steps * config.samples_per_step} samples")
  axes[3].legend(fontsize=8)
  for panel in axes:
    panel.set_xscale("log", base=2)
    panel.set_xlabel("group size G")
  fig.tight_layout()
  fig.savefig(os.path.join(out_dir, "group_size.png"), dpi=120)
  plt.close(fig)


if __name__ == "__main__":
  sys.exit(experiment.main(sys.argv[1:], module=sys.modules[__name__]))
