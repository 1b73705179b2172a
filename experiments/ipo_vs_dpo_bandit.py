r"""Azar et al. (2023), "A General Theoretical Paradigm to Understand Learning from Human
Preferences" (IPO), §5.4: on a 3-action bandit with deterministic preferences DPO drives the
preferred action's probability to 1 whatever the regularisation τ, while IPO stops at its
regularised optimum.

Setup (the paper's §5.4): actions :math:`Y = \{y_a, y_b, y_c\}`, policy
:math:`\pi_\theta = \mathrm{softmax}(\theta)`, :math:`\theta \in \mathbb{R}^3` initialised at 0 (the
uniform reference :math:`\pi_{ref}`), Adam with learning rate 0.01 for 18000 steps on mini-batches
of 9 pairs drawn with replacement from the dataset, 10 seeds. The losses are alignax's
``dpo_loss(..., beta=τ, loss_type="sigmoid")`` (DPO: :math:`-\log\sigma(\tau h)`) and
``loss_type="ipo"`` (IPO: :math:`(h - \tfrac{1}{2\tau})^2`) on per-action log-probs, with
:math:`h(y_w, y_l) = \log\frac{\pi(y_w)\pi_{ref}(y_l)}{\pi(y_l)\pi_{ref}(y_w)}
= \theta_w - \theta_l` (the uniform reference and the softmax normaliser cancel). Every τ,
dataset, loss and seed is one bandit of one ``jit(vmap(...))`` program.

Datasets (pairs are (winner, loser), each drawn uniformly):

* D1 = {(a, b), (b, c), (a, c)}, a total order. The IPO objective is, with
  :math:`x = \theta_a - \theta_b`, :math:`y = \theta_b - \theta_c`, :math:`c = 1/(2\tau)`,
  :math:`(x - c)^2 + (y - c)^2 + (x + y - c)^2`. Setting both partial derivatives to zero gives
  :math:`2x + y = 2c` and :math:`x + 2y = 2c`, so :math:`x = y = 2c/3 = 1/(3\tau)`: the
  least-squares fit of the three margins. Hence
  :math:`\pi^* \propto (e^{2/(3\tau)}, e^{1/(3\tau)}, 1)`; τ = 1: (0.4484, 0.3213, 0.2302);
  τ = 0.5: (0.5627, 0.2889, 0.1483); τ = 0.1: (0.9644, 0.0344, 0.0012).
  DPO's loss :math:`-\log\sigma(\tau x) - \log\sigma(\tau y) - \log\sigma(\tau(x + y))` decreases
  in both x and y without bound, so :math:`\pi(y_a) \to 1` for every τ.
* D2 = {(a, b)}, the paper's two-action case (§5.3), read on :math:`\{y_a, y_b\}`:
  :math:`\pi(y_a \mid \{y_a, y_b\}) = \sigma(\theta_a - \theta_b)` (:math:`\theta_c` gets no
  gradient). IPO's optimum is :math:`x = 1/(2\tau)`, i.e. :math:`\sigma(1/(2\tau))`; DPO's is 1.
* D3' = {(a, b), (b, a), (a, c)}: :math:`y_c` never wins. IPO: with :math:`x = \theta_a - \theta_b`,
  :math:`z = \theta_a - \theta_c` (independent), :math:`(x - c)^2 + (-x - c)^2 + (z - c)^2` is
  minimised at :math:`x = 0`, :math:`z = c`, so :math:`\pi^*(y_c) = 1/(1 + 2e^{1/(2\tau)})`
  (0.2327 at τ = 1). DPO's :math:`-\log\sigma(\tau z)` sends :math:`z \to \infty`, so
  :math:`\pi(y_c) \to 0` for every τ. The paper's D3 = {(a, b), (b, a)} never mentions :math:`y_c`,
  whose gradient is then exactly 0 under either loss; D3' is the variant that shows the claimed
  effect ("when one action does not have at least a victory in the dataset DPO will set its
  probability to 0 regardless of τ").

The τ values of the paper's figures are not in its text; we use 0.1, 0.5 and 1. The IPO values are
the analytic optima derived above, not numbers printed in the paper.

Criteria, one per (dataset, τ, method, probability), each with a tolerance of at most half the
distance between the two methods' predictions (:func:`separating_tolerance`), so the other method's
limit can never pass it: DPO's preferred probabilities within 0.01 of 1 and the never-winning
action's within 1e-3 of 0, on every seed; IPO's two-action probability within 1e-3 of
:math:`\sigma(1/(2\tau))` on every seed (one pair: no mini-batch noise); IPO's D1 and D3'
probabilities within 0.01 of the optimum on the mean over seeds. The cap binds at τ = 0.1, where
IPO's optimum is itself near DPO's limit: :math:`\sigma(5)` = 0.9933 on D2 (a flat 0.01 would let
IPO pass DPO's criterion), :math:`\pi^*(y_c)` = 0.0012 on D1 and 0.0034 on D3' (a flat 0.01 would
let DPO's :math:`\pi(y_c) \approx 0` pass IPO's).

Run: ``alignax run experiments/ipo_vs_dpo_bandit.py [--seeds 10] [--set taus=0.1,1]
[--sweep lr=0.005,0.01]`` (``lr`` sweeps inside the same compiled program), or
``python -m experiments.ipo_vs_dpo_bandit`` with the same flags.
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

CLAIM = ("With deterministic preferences DPO converges to the greedy policy whatever the KL "
         "strength tau (pi(preferred) -> 1; an action that never wins gets probability 0), while "
         "IPO converges to its regularised optimum, which depends on tau.")
PAPER = ("M. G. Azar, M. Rowland, B. Piot, D. Guo, D. Calandriello, M. Valko, R. Munos, A General "
         "Theoretical Paradigm to Understand Learning from Human Preferences, 2023, "
         "arXiv:2310.12036, sections 4.2, 5.3 and 5.4")
DEFAULT_SEEDS = 10
VMAP_FIELDS = ("lr",)

ACTIONS = ("ya", "yb", "yc")
DATASETS: dict[str, tuple[tuple[int, int], ...]] = {
    "D1": ((0, 1), (1, 2), (0, 2)),
    "D2": ((0, 1),),
    "D3'": ((0, 1), (1, 0), (0, 2)),
}
LOSSES = {"dpo": "sigmoid", "ipo": "ipo"}


@dataclasses.dataclass(frozen=True)
class Config:
  """taus: the KL strengths τ (alignax's ``beta``). steps, lr, batch_size: the paper's Adam run.
  curve_points: how many points of π each learning curve keeps."""
  taus: tuple[float, ...] = (0.1, 0.5, 1.0)
  steps: int = 18_000
  lr: float = 0.01
  batch_size: int = 9
  curve_points: int = 90

  def __post_init__(self):
    if not self.taus or not all(t > 0 for t in self.taus):
      raise ValueError(f"taus must be a non-empty tuple of values > 0, got {self.taus}")
    if self.batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
    if not 1 <= self.curve_points <= self.steps:
      raise ValueError(f"curve_points must lie in [1, steps={self.steps}], got "
                       f"{self.curve_points}")
    if isinstance(self.lr, (int, float)) and not self.lr > 0:
      raise ValueError(f"lr must be > 0, got {self.lr}")


def ipo_optimum_d1(tau: float) -> np.ndarray:
  """IPO's optimum on D1: θa − θb = θb − θc = 1/(3τ)."""
  x = 1 / (3 * tau)
  return np.exp([2 * x, x, 0.0]) / np.sum(np.exp([2 * x, x, 0.0]))


def ipo_optimum_d2(tau: float) -> float:
  """IPO's two-action optimum π(ya | {ya, yb}) = σ(1/(2τ))."""
  return 1 / (1 + math.exp(-1 / (2 * tau)))


def ipo_optimum_d3_yc(tau: float) -> float:
  """IPO's π(yc) on D3': θa = θb, θa − θc = 1/(2τ)."""
  return 1 / (1 + 2 * math.exp(1 / (2 * tau)))


def separating_tolerance(paper_value: float, other_value: float, *, cap: float) -> float:
  """``cap``, or half the distance to what the other method predicts where that is smaller, so a
  criterion cannot be passed by the other method's limit."""
  return min(cap, abs(paper_value - other_value) / 2)


def _pair_arrays():
  width = max(len(pairs) for pairs in DATASETS.values())
  padded = [pairs + pairs[:1] * (width - len(pairs)) for pairs in DATASETS.values()]
  winners = jnp.asarray([[w for w, _ in pairs] for pairs in padded], jnp.int32)
  losers = jnp.asarray([[l for _, l in pairs] for pairs in padded], jnp.int32)
  counts = jnp.asarray([len(pairs) for pairs in DATASETS.values()], jnp.int32)
  return winners, losers, counts


def make_train(config: Config):
  """``train(key)``: final policies and learning curves of DPO and IPO, ``[dataset, tau, ...]``."""
  optimizer = optax.adam(config.lr)
  ref_logp = jnp.full((3,), -math.log(3.0))
  inner = config.steps // config.curve_points
  first = config.steps - inner * (config.curve_points - 1)  # the first chunk takes the remainder

  def loss(theta, tau, winners, losers, loss_type):
    logp = jax.nn.log_softmax(theta)
    value, _ = ax.dpo_loss(logp[winners], logp[losers], ref_logp[winners], ref_logp[losers],
                           beta=tau, loss_type=loss_type)
    return value

  def bandit(tau, winners, losers, count, key):
    def step(state, t):
      idx = jax.random.randint(jax.random.fold_in(key, t), (config.batch_size,), 0, count)
      w, l = winners[idx], losers[idx]  # the same mini-batch for both losses
      new = {}
      for name, loss_type in LOSSES.items():
        theta, opt_state = state[name]
        grad = jax.grad(loss)(theta, tau, w, l, loss_type)
        updates, opt_state = optimizer.update(grad, opt_state)
        new[name] = (optax.apply_updates(theta, updates), opt_state)
      return new

    def chunk(state, start_and_length):
      start, length = start_and_length
      state = jax.lax.fori_loop(start, start + length, lambda t, s: step(s, t), state)
      return state, {name: jax.nn.softmax(state[name][0]) for name in LOSSES}

    theta = jnp.zeros((3,))
    state = {name: (theta, optimizer.init(theta)) for name in LOSSES}
    starts = jnp.asarray([0] + [first + inner * i for i in range(config.curve_points - 1)])
    lengths = jnp.asarray([first] + [inner] * (config.curve_points - 1))
    _, curves = jax.lax.scan(chunk, state, (starts, lengths))
    return curves  # {loss: [curve_points, 3]}

  def train(key):
    winners, losers, counts = _pair_arrays()
    taus = jnp.asarray(config.taus, jnp.float32)
    keys = jax.random.split(key, (len(DATASETS), len(config.taus)))
    over_taus = jax.vmap(bandit, in_axes=(0, None, None, None, 0))
    curves = jax.vmap(over_taus, in_axes=(None, 0, 0, 0, 0))(taus, winners, losers, counts, keys)
    out = {}
    for name in LOSSES:
      out[f"{name}_curve"] = curves[name]  # [dataset, tau, curve_points, 3]
      out[f"{name}_policy"] = curves[name][:, :, -1]  # [dataset, tau, 3]
    return out

  return train


def curve_steps(config: Config) -> np.ndarray:
  inner = config.steps // config.curve_points
  first = config.steps - inner * (config.curve_points - 1)
  return first + inner * np.arange(config.curve_points)


def criteria(config: Config, measured: dict[str, np.ndarray]) -> list[dict]:
  d1, d2, d3 = (list(DATASETS).index(name) for name in ("D1", "D2", "D3'"))
  dpo, ipo = measured["dpo_policy"], measured["ipo_policy"]  # [seed, dataset, tau, action]
  out = []
  for t, tau in enumerate(config.taus):
    tag = f"tau={tau:g}"
    d1_optimum, d2_optimum = ipo_optimum_d1(tau), ipo_optimum_d2(tau)
    d3_optimum = ipo_optimum_d3_yc(tau)
    out.append(experiment.criterion(
        f"D1 {tag} DPO pi(ya)", paper_value=1.0, values=dpo[:, d1, t, 0],
        tolerance=separating_tolerance(1.0, d1_optimum[0], cap=0.01)))
    for a, (action, optimum) in enumerate(zip(ACTIONS, d1_optimum)):
      greedy = 1.0 if a == 0 else 0.0  # DPO's limit
      out.append(experiment.criterion(
          f"D1 {tag} IPO pi({action})", paper_value=float(optimum), values=ipo[:, d1, t, a],
          tolerance=separating_tolerance(float(optimum), greedy, cap=0.01), statistic="mean"))

    def pair_probability(policy):
      return policy[:, d2, t, 0] / (policy[:, d2, t, 0] + policy[:, d2, t, 1])

    out.append(experiment.criterion(
        f"D2 {tag} DPO pi(ya|ya,yb)", paper_value=1.0, values=pair_probability(dpo),
        tolerance=separating_tolerance(1.0, d2_optimum, cap=0.01)))
    out.append(experiment.criterion(
        f"D2 {tag} IPO pi(ya|ya,yb) = sigmoid(1/(2tau))", paper_value=d2_optimum,
        values=pair_probability(ipo), tolerance=separating_tolerance(d2_optimum, 1.0, cap=1e-3)))
    out.append(experiment.criterion(
        f"D3' {tag} DPO pi(yc)", paper_value=0.0, values=dpo[:, d3, t, 2],
        tolerance=separating_tolerance(0.0, d3_optimum, cap=1e-3)))
    out.append(experiment.criterion(
        f"D3' {tag} IPO pi(yc)", paper_value=d3_optimum, values=ipo[:, d3, t, 2],
        tolerance=separating_tolerance(d3_optimum, 0.0, cap=0.01), statistic="mean"))
  return out


def plot(config: Config, measured: dict[str, np.ndarray], out_dir: str) -> None:
  """``curves.png``: π(ya) on D1 and π(yc) on D3' over training (mean over seeds, band = min..max)
  for DPO and IPO at every τ, with IPO's analytic optimum dashed; ``policies.png``: the final D1
  policies beside the analytic IPO optimum."""
  import matplotlib.pyplot as plt

  steps = curve_steps(config)
  d1, d3 = list(DATASETS).index("D1"), list(DATASETS).index("D3'")
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for panel, (dataset, action, title, optimum) in zip(axes, (
      (d1, 0, "D1: pi(ya)", lambda tau: ipo_optimum_d1(tau)[0]),
      (d3, 2, "D3': pi(yc) (yc never wins)", ipo_optimum_d3_yc))):
    for t, tau in enumerate(config.taus):
      color = f"C{t}"
      for name, style in (("dpo", ":"), ("ipo", "-")):
        curve = measured[f"{name}_curve"][:, dataset, t, :, action]  # [seed, point]
        panel.plot(steps, curve.mean(0), style, color=color, label=f"{name.upper()} tau={tau:g}")
        panel.fill_between(steps, curve.min(0), curve.max(0), color=color, alpha=0.15)
      panel.axhline(optimum(tau), color=color, linestyle="--", linewidth=0.8)
    panel.set_xlabel("Adam step")
    panel.set_title(title)
  axes[0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(out_dir, "curves.png"), dpi=120)
  plt.close(fig)

  fig, axes = plt.subplots(1, len(config.taus), figsize=(4 * len(config.taus), 3.5), squeeze=False)
  xs = np.arange(3)
  for t, (panel, tau) in enumerate(zip(axes[0], config.taus)):
    panel.bar(xs - 0.27, measured["dpo_policy"][:, d1, t].mean(0), 0.27, label="DPO")
    panel.bar(xs, measured["ipo_policy"][:, d1, t].mean(0), 0.27, label="IPO")
    panel.bar(xs + 0.27, ipo_optimum_d1(tau), 0.27, label="IPO analytic", color="0.7")
    panel.set_xticks(xs, ACTIONS)
    panel.set_title(f"D1, tau={tau:g}")
  axes[0][0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(out_dir, "policies.png"), dpi=120)
  plt.close(fig)


if __name__ == "__main__":
  sys.exit(experiment.main(sys.argv[1:], module=sys.modules[__name__]))
