r"""``alignax eval``: a policy against a baseline, in reward, win rate, KL to the reference and
alignment tax, each with a 95% confidence interval; the same evaluation runs inside training.

What one evaluation computes, over ``P`` prompts and ``K`` samples per prompt:

- **samples**: ``K`` completions per prompt from the policy and from the baseline with
  :func:`alignax.sampling.generate` (temperature, top-k, top-p, min-p or greedy). Both draw with
  the same keys (common random numbers; ``baseline_seed`` draws the baseline apart), so two equal
  models give equal samples and every comparison between them is exactly even. Both stop on one
  set of ids, resolved once from the policy checkpoint (:func:`resolve_stop_token_ids`).
- **rewards**: every reward source (reward functions with TRL's contract, reward models, reward-
  model ensembles) scores every completion through :class:`alignax.rewards.RewardRunner`; with
  several sources their weighted sum is reported as one more source, ``total``
  (:func:`weighted_total`: NaN where a weighted source returned None). Per source: the mean of
  the policy and of the baseline, their difference over the pairs scored on both sides, the
  **win rate** — the share of scored pairs (prompt ``p``, sample ``k``) where the policy's
  completion outscores the baseline's, ties counting half — the **length-controlled win rate**
  (:func:`length_controlled_win_rate`; None when the policy is longer, or shorter, in almost
  every pair, which leaves it unidentified) with the shares of pairs where the policy is
  shorter, as long and longer, and the count of completions each side left unscored.
- **KL(policy ‖ reference)** (the reference is the baseline unless given): on each of the
  policy's samples :math:`y`, the exact sequence KL along it,
  :math:`\sum_t \mathrm{KL}(\pi(\cdot|x, y_{<t}) \| \pi_{ref}(\cdot|x, y_{<t}))` over the whole
  vocabulary (:func:`alignax.token_kl`, streamed over vocabulary blocks), and the sample estimates
  :math:`k_1 = \sum_t \log\pi(y_t) - \log\pi_{ref}(y_t)` and :math:`k_3 = \sum_t (r_t - 1 - \log
  r_t)`, :math:`r_t = \pi_{ref}(y_t)/\pi(y_t)` (Schulman 2020; :func:`alignax.kl_estimate`). All
  three have the sequence-level :math:`\mathrm{KL}(\pi\|\pi_{ref})` as their mean when the samples
  are the policy's own distribution (temperature 1, no filter, not greedy: ``eval.json`` says so
  under ``kl.on_policy``); the exact one has by far the smallest variance.
- **alignment tax** on a held-out file: with SFT / text rows, the mean NLL per completion token
  of the policy and of the baseline, ``tax = NLL_policy − NLL_baseline``; with prompt rows and
  ``tax_reward_funcs``, the mean reward ("task accuracy" for a 0/1 verifier) of their greedy
  answers, ``tax = accuracy_baseline − accuracy_policy``, over the examples graded on both sides
  (a None from the grader is no wrong answer: it drops out and is counted under ``unscored``).
  Positive tax: the policy lost.

Every interval is a percentile bootstrap over prompts (held-out examples for the NLL tax): the
``K`` pairs of a prompt are resampled together, and one set of resamples serves every statistic
of a run, so differences are paired. ``num_bootstrap`` resamples, seeded by ``seed``.

Outputs under ``output_dir``: ``eval.json`` (every number with its interval, the configuration and
the library versions), ``completions.jsonl`` (one line per pair: both completions, their rewards,
lengths, the pair's win per source and the policy sample's KL), the plots ``reward_histograms.png``,
``win_rates.png`` and ``kl_histogram.png``; a table is printed and a progress bar runs throughout.

Usage::

  alignax eval --model_name_or_path out/dpo --baseline_model_name_or_path out/sft \\
    --dataset_name prompts.jsonl --reward_model_name_or_path out/rm --reward_funcs my.score \\
    --tax_dataset heldout.jsonl --num_samples 4 --output_dir eval-dpo

or from Python: ``evaluate(EvalConfig(...))`` returns what ``eval.json`` holds. Inside training,
:func:`trainer_generation_eval` (or :func:`make_generation_eval`) gives ``fit`` an ``eval_fn``
that logs ``eval/reward``, ``eval/win_rate``, ``eval/kl`` and ``eval/tax`` every ``eval_steps``.
"""

import dataclasses
import functools
import json
import math
import os
import platform
import sys
import time
import traceback
import types
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Bool, Float, Int, Real

from alignax import _validate

EVAL_FILE = "eval.json"
COMPLETIONS_FILE = "completions.jsonl"
REWARDS_PLOT = "reward_histograms.png"
WIN_RATE_PLOT = "win_rates.png"
KL_PLOT = "kl_histogram.png"
# The name under which the weighted sum of several reward sources is reported.
TOTAL = "total"
# Ridge penalties (lambda_a, lambda_b) of the length-controlled fit (length_controlled_win_rate):
# weak, so they only keep the fit finite when the length separates the wins.
LC_PENALTY = (1e-3, 1e-3)
# The length-controlled win rate is reported only when each side of a zero length difference holds
# at least this share of the scored pairs and this many (length_controlled_win_rate).
LC_MIN_SIDE_SHARE = 0.1
LC_MIN_SIDE_PAIRS = 5


class EvaluationWarning(UserWarning):
  """A number of the evaluation that rests on less than it seems: unscored completions, a
  length-controlled win rate that the lengths cannot identify."""


# --- statistics ---------------------------------------------------------------------------------


class Estimate(NamedTuple):
  """A number and its confidence interval.

  Attributes:
    value: the estimate.
    ci_low, ci_high: the interval's bounds (NaN with fewer than two prompts / examples).
    n: the prompts (or held-out examples) it rests on.
  """

  value: float
  ci_low: float
  ci_high: float
  n: int

  def as_dict(self) -> dict[str, Any]:
    return {"value": _number(self.value), "ci_low": _number(self.ci_low),
            "ci_high": _number(self.ci_high), "n": int(self.n)}


def _number(x: Any) -> float | None:
  """A JSON-safe float (NaN and inf become None)."""
  x = float(x)
  return x if math.isfinite(x) else None


def bootstrap_weights(num_clusters: int, *, num_bootstrap: int, seed: int
                      ) -> Int[np.ndarray, "B C"]:
  """Multiplicities ``[B, C]`` of ``B`` bootstrap resamples of ``C`` clusters (prompts): row ``b``
  counts how often each cluster was drawn when ``C`` were drawn with replacement."""
  _validate.positive_int("num_clusters", num_clusters)
  _validate.positive_int("num_bootstrap", num_bootstrap)
  rng = np.random.default_rng(seed)
  return rng.multinomial(num_clusters, np.full(num_clusters, 1.0 / num_clusters),
                         size=num_bootstrap)


def _interval(value: float, resampled: np.ndarray, n: int, confidence: float) -> Estimate:
  """The percentile interval of the resampled statistic (NaN below two clusters)."""
  resampled = resampled[np.isfinite(resampled)]
  if n < 2 or resampled.size == 0 or not math.isfinite(value):
    return Estimate(float(value), math.nan, math.nan, n)
  low, high = np.quantile(resampled, [(1 - confidence) / 2, (1 + confidence) / 2])
  return Estimate(float(value), float(low), float(high), n)


def _ratio(weights: np.ndarray, sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
  with np.errstate(invalid="ignore", divide="ignore"):
    return (weights @ sums) / (weights @ counts)


def _sums(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per-row sums and counts of the entries that are not NaN."""
  scored = ~np.isnan(values)
  return np.where(scored, values, 0.0).sum(axis=1), scored.sum(axis=1).astype(np.float64)


def mean_estimate(values: Float[np.ndarray, "P K"], *, weights: Int[np.ndarray, "B P"],
                  confidence: float = 0.95) -> Estimate:
  """The mean of the entries of ``values`` that are not NaN, with a bootstrap interval over rows.

  Args:
    values: ``[P, K]``, row ``p`` the ``K`` values of prompt ``p`` (NaN: missing).
    weights: ``[B, P]`` resample multiplicities (:func:`bootstrap_weights`).
    confidence: the interval's level.

  Returns:
    The :class:`Estimate` (``n``: the rows with a value).
  """
  sums, counts = _sums(np.asarray(values, np.float64))
  value = sums.sum() / counts.sum() if counts.sum() else math.nan
  return _interval(value, _ratio(weights, sums, counts), int((counts > 0).sum()), confidence)


def difference_estimate(first: Float[np.ndarray, "P K"], second: Float[np.ndarray, "P K"], *,
                        weights: Int[np.ndarray, "B P"], confidence: float = 0.95) -> Estimate:
  """``mean(first) − mean(second)`` (each as :func:`mean_estimate`), paired: both means are taken
  over the same resampled rows."""
  s1, c1 = _sums(np.asarray(first, np.float64))
  s2, c2 = _sums(np.asarray(second, np.float64))
  if not c1.sum() or not c2.sum():
    return Estimate(math.nan, math.nan, math.nan, 0)
  value = s1.sum() / c1.sum() - s2.sum() / c2.sum()
  resampled = _ratio(weights, s1, c1) - _ratio(weights, s2, c2)
  return _interval(value, resampled, int(((c1 > 0) & (c2 > 0)).sum()), confidence)


def pairwise_wins(policy_scores: Float[np.ndarray, "P K"], baseline_scores: Float[np.ndarray, "P K"]
                  ) -> Float[np.ndarray, "P K"]:
  """``1`` where the policy's score is higher, ``0.5`` on a tie, ``0`` where it is lower; NaN
  where either score is missing (a source that returned None)."""
  p = np.asarray(policy_scores, np.float64)
  b = np.asarray(baseline_scores, np.float64)
  wins = (p > b).astype(np.float64) + 0.5 * (p == b)
  return np.where(np.isnan(p) | np.isnan(b), np.nan, wins)


def win_rate(policy_scores: Float[np.ndarray, "P K"], baseline_scores: Float[np.ndarray, "P K"], *,
             weights: Int[np.ndarray, "B P"], confidence: float = 0.95) -> Estimate:
  """The policy's win rate against the baseline: the mean of :func:`pairwise_wins` (ties count
  half) over the scored pairs, with a bootstrap interval over prompts (a prompt's ``K`` pairs are
  resampled together)."""
  return mean_estimate(pairwise_wins(policy_scores, baseline_scores), weights=weights,
                       confidence=confidence)


def _fit_logistic(y: np.ndarray, x: np.ndarray, w: np.ndarray, penalty: tuple[float, float],
                  iterations: int = 100) -> np.ndarray:
  """``[B, 2]`` = ``(a, b)`` per row of ``w`` ``[B, N]`` maximising the weighted log-likelihood of
  ``y ~ Bernoulli(sigmoid(a + b·x))`` minus ``(λ_a a² + λ_b b²)/2``, by damped Newton steps."""
  from scipy.special import expit

  design = np.stack([np.ones_like(x), x], axis=1)  # [N, 2]
  ridge = np.diag(np.asarray(penalty, np.float64))
  theta = np.zeros((w.shape[0], 2))
  for _ in range(iterations):
    p = expit(theta @ design.T)  # [B, N]
    gradient = (w * (p - y)) @ design + theta @ ridge
    hessian = np.einsum("bn,ni,nj->bij", w * p * (1 - p), design, design) + ridge
    step = np.linalg.solve(hessian, gradient[..., None])[..., 0]
    # A trust region: separable data (a length-only judge) would otherwise overshoot.
    norm = np.linalg.norm(step, axis=1, keepdims=True)
    step = step * np.minimum(1.0, 4.0 / np.maximum(norm, 1e-300))
    theta = theta - step
    if np.max(np.abs(step)) < 1e-9:
      break
  return theta


class LengthControlled(NamedTuple):
  """What :func:`length_controlled_win_rate` returns.

  Attributes:
    estimate: the length-controlled win rate with its interval (NaN when not identified).
    coefficient: the fitted length coefficient ``b`` (positive: longer completions win more;
      NaN when not identified).
    identified: whether enough scored pairs lie on each side of a zero length difference for
      the rate at zero difference to be read off the data rather than extrapolated (see
      :func:`length_controlled_win_rate`).
    shares: the shares of the scored pairs where the policy's completion is shorter
      (``policy_shorter``: ``d < 0``), as long (``equal``: ``d = 0``) and longer
      (``policy_longer``: ``d > 0``); None each without scored pairs.
  """

  estimate: Estimate
  coefficient: float
  identified: bool
  shares: dict[str, float | None]


def length_controlled_win_rate(
  wins: Float[np.ndarray, "P K"],
  length_difference: Real[np.ndarray, "P K"],
  *,
  weights: Int[np.ndarray, "B P"],
  confidence: float = 0.95,
  penalty: tuple[float, float] = LC_PENALTY,
  min_side_share: float = LC_MIN_SIDE_SHARE,
  min_side_pairs: int = LC_MIN_SIDE_PAIRS,
) -> LengthControlled:
  r"""The win rate at zero length difference (AlpacaEval 2's length control, Dubois et al. 2024,
  "Length-Controlled AlpacaEval"), so verbosity cannot buy wins.

  Over the scored pairs ``i``, with the win :math:`w_i \in \{0, \tfrac12, 1\}`
  (:func:`pairwise_wins`) and the length difference :math:`d_i = |y^\pi_i| - |y^b_i|` in tokens,
  the logistic model

  .. math:: P(w_i = 1) = \sigma\big(a + b \tanh(d_i / s)\big),\qquad s = \mathrm{std}_i(d_i)

  (:math:`\tanh(d/s) = 0` when every difference is equal) is fitted by maximising
  :math:`\sum_i w_i\log\sigma_i + (1 - w_i)\log(1 - \sigma_i) - \tfrac12(\lambda_a a^2 + \lambda_b
  b^2)` (ties are soft targets of ½; the weak ridge ``penalty``, :data:`LC_PENALTY`, only keeps
  the fit finite when the length separates the wins). The length-controlled win rate is the
  fitted probability at zero length difference, :math:`\sigma(a)`. AlpacaEval also fits a
  per-instruction difficulty across many models; with one policy and one baseline there is
  nothing to identify it from, so this is their model with the model term ``a`` and the length
  term only.

  **Identification.** :math:`\sigma(a)` is read off the data only when pairs lie on both sides of
  :math:`d = 0`. When the policy's completion is longer in (almost) every pair, a judge that
  reads only the length and a judge that ignores it give the same data (the policy wins every
  pair, or wins 70% of pairs at every length), and the fitted value at zero is an extrapolation
  decided by the ridge and the ``tanh`` shape, anywhere in ``(0, 1)``. The rate is therefore
  reported only when each side of zero holds at least ``max(min_side_pairs, min_side_share · n)``
  of the ``n`` scored pairs, pairs of equal length counting for both sides (defaults
  :data:`LC_MIN_SIDE_PAIRS` = 5 and :data:`LC_MIN_SIDE_SHARE` = 10%); otherwise the estimate and
  the coefficient are NaN and ``identified`` is False. When identified, a length-blind judge
  keeps its plain win rate, equal lengths throughout give exactly the plain win rate, and a
  length-only judge gives 0.5 when pairs of equal length (its ties) pin the curve at zero; with
  a gap in the differences around zero and no tie inside it, the curve's crossing inside the gap
  is not pinned by any pair, and the rate can sit away from 0.5.

  Args:
    wins: ``[P, K]`` pair wins (NaN: unscored).
    length_difference: ``[P, K]`` policy minus baseline completion length (tokens).
    weights: ``[B, P]`` resample multiplicities over prompts (the fit is redone per resample).
    confidence: the interval's level.
    penalty: ``(λ_a, λ_b)``.
    min_side_share: the least share of the scored pairs each side of zero must hold.
    min_side_pairs: the least number of scored pairs each side of zero must hold.

  Returns:
    A :class:`LengthControlled`: the estimate, the coefficient ``b``, whether the rate is
    identified and the shares of pairs with the policy shorter, as long and longer.
  """
  from scipy.special import expit

  wins = np.asarray(wins, np.float64)
  scored = ~np.isnan(wins)
  rows = np.nonzero(scored)[0]
  n = int(np.unique(rows).size)
  missing = Estimate(math.nan, math.nan, math.nan, n)
  if rows.size == 0:
    return LengthControlled(missing, math.nan, False,
                            {"policy_shorter": None, "equal": None, "policy_longer": None})
  y = wins[scored]
  d = np.asarray(length_difference, np.float64)[scored]
  shorter, equal, longer = int((d < 0).sum()), int((d == 0).sum()), int((d > 0).sum())
  shares = {"policy_shorter": shorter / d.size, "equal": equal / d.size,
            "policy_longer": longer / d.size}
  needed = max(min_side_pairs, min_side_share * d.size)
  if min(shorter, longer) + equal < needed:
    return LengthControlled(missing, math.nan, False, shares)
  scale = d.std()
  x = np.tanh(d / scale) if scale > 0 else np.zeros_like(d)
  theta = _fit_logistic(y, x, np.ones((1, y.size)), penalty)[0]
  resampled = expit(_fit_logistic(y, x, np.asarray(weights, np.float64)[:, rows], penalty)[:, 0])
  return LengthControlled(_interval(float(expit(theta[0])), resampled, n, confidence),
                          float(theta[1]), True, shares)


# --- configuration ------------------------------------------------------------------------------


@dataclasses.dataclass
class EvalConfig:
  """Options of ``alignax eval`` (each is also a ``--flag``; TRL's names where TRL has one).

  Attributes:
    output_dir: where ``eval.json``, ``completions.jsonl`` and the plots go.
    model_name_or_path: the policy (a Hugging Face checkpoint directory or hub id).
    baseline_model_name_or_path: the model the policy is compared with (its starting point, say).
    ref_model_name_or_path: the KL reference (default: the baseline).
    tokenizer_name_or_path: the tokenizer (default: the policy's directory). The baseline's and
      the reference's own tokenizers, when their directories hold one, must be the same.
    dataset_name: the prompts (``prompt`` column, text or messages; other columns reach the
      reward functions), a file, directory or hub dataset as for training.
    dataset_config: the hub dataset's configuration name.
    dataset_split: the split of ``dataset_name`` to read.
    num_prompts: use the first N prompts (None: all).
    max_prompt_length: prompts keep their last N tokens (None: whole).
    num_samples: K, completions per prompt from each model.
    max_completion_length: the most tokens per completion.
    temperature: sampling temperature.
    top_k: top-k filter (0: off).
    top_p: nucleus filter (1.0: off).
    min_p: min-p filter (None: off).
    greedy: take the most likely token (num_samples is then best left at 1).
    stop_token_ids: ids that end a completion of either model (None: every EOS id of the policy
      checkpoint's ``generation_config.json`` and ``config.json``, else the tokenizer's
      ``eos_token_id``; :func:`resolve_stop_token_ids`; ``eval.json`` records the ids used).
    seed: the sampling keys and the bootstrap.
    baseline_seed: the baseline's sampling seed (None: ``seed``, the same keys as the policy).
    reward_funcs: reward functions: built-in names or ``module.function`` paths.
    reward_model_name_or_path: reward models (alignax or HF ``*ForSequenceClassification``).
    reward_weights: one weight per source for ``total``, in the sources' order: the reward
      functions, the reward models, then the ensemble when ``reward_ensemble`` is set (None: 1
      each, except that an ensemble's members weigh 0: the ensemble stands for them). A source
      of weight 0 is reported but leaves ``total``; a weighted source that returns None on a
      completion makes its ``total`` NaN (the pair drops out) rather than 0.
    reward_ensemble: also score with an ensemble of the reward models: ``mean``, ``min`` or
      ``mean_minus_std`` (None: no ensemble).
    tax_dataset: held-out rows for the alignment tax: SFT rows (text, prompt/completion or
      messages) for the NLL, or prompt rows with ``tax_reward_funcs`` for task accuracy.
    tax_reward_funcs: reward functions grading greedy answers to the ``tax_dataset`` prompts.
    tax_num_examples: use the first N held-out rows (None: all).
    tax_max_length: tokens per held-out sequence (None: whole).
    batch_size: prompts per sampler call (held-out rows per forward for the tax).
    num_bootstrap: bootstrap resamples behind every interval.
    confidence_level: the intervals' level.
    dtype: compute dtype of the models.
    plots: write the PNG plots.
    disable_tqdm: no progress bar.
  """

  output_dir: str | None = None
  model_name_or_path: str | None = None
  baseline_model_name_or_path: str | None = None
  ref_model_name_or_path: str | None = None
  tokenizer_name_or_path: str | None = None
  dataset_name: str | None = None
  dataset_config: str | None = None
  dataset_split: str = "train"
  num_prompts: int | None = None
  max_prompt_length: int | None = None
  num_samples: int = 4
  max_completion_length: int = 128
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  min_p: float | None = None
  greedy: bool = False
  stop_token_ids: list[int] | None = None
  seed: int = 42
  baseline_seed: int | None = None
  reward_funcs: list[str] | None = None
  reward_model_name_or_path: list[str] | None = None
  reward_weights: list[float] | None = None
  reward_ensemble: str | None = None
  tax_dataset: str | None = None
  tax_reward_funcs: list[str] | None = None
  tax_num_examples: int | None = None
  tax_max_length: int | None = 1024
  batch_size: int = 16
  num_bootstrap: int = 1000
  confidence_level: float = 0.95
  dtype: str = "float32"
  plots: bool = True
  disable_tqdm: bool = False

  def __post_init__(self):
    for name in ("num_samples", "max_completion_length", "batch_size", "num_bootstrap"):
      _validate.positive_int(name, getattr(self, name))
    for name in ("num_prompts", "max_prompt_length", "tax_num_examples", "tax_max_length"):
      if getattr(self, name) is not None:
        _validate.positive_int(name, getattr(self, name))
    _validate.positive("temperature", self.temperature)
    if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
      raise ValueError(f"top_k must be an int >= 0 (0: off), got {self.top_k!r}")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"top_p must lie in (0, 1], got {self.top_p!r}")
    if self.min_p is not None and not 0 <= self.min_p <= 1:
      raise ValueError(f"min_p must lie in [0, 1], got {self.min_p!r}")
    if not 0 < self.confidence_level < 1:
      raise ValueError(f"confidence_level must lie in (0, 1), got {self.confidence_level!r}")
    for name in ("seed", "baseline_seed"):
      value = getattr(self, name)
      if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                or value < 0):
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    if self.reward_ensemble is not None:
      from alignax.rewards.models import ENSEMBLE_MODES

      _validate.choice("reward_ensemble", self.reward_ensemble, ENSEMBLE_MODES)
    if self.tax_reward_funcs and not self.tax_dataset:
      raise ValueError("tax_reward_funcs grade answers to the tax_dataset prompts; set "
                       "tax_dataset too")
    for name in ("greedy", "plots", "disable_tqdm"):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")

  def sampling(self) -> "SamplingOptions":
    return SamplingOptions(
      max_new_tokens=self.max_completion_length, temperature=self.temperature,
      top_k=self.top_k or None, top_p=None if self.top_p >= 1 else self.top_p, min_p=self.min_p,
      greedy=self.greedy,
      stop_token_ids=None if self.stop_token_ids is None else tuple(self.stop_token_ids))


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
  """How completions are drawn (:func:`alignax.sampling.generate`'s options)."""

  max_new_tokens: int
  temperature: float = 1.0
  top_k: int | None = None
  top_p: float | None = None
  min_p: float | None = None
  greedy: bool = False
  stop_token_ids: tuple[int, ...] | None = None

  @property
  def on_policy(self) -> bool:
    """Whether the samples follow the model's own distribution (the KL estimates' premise)."""
    return (not self.greedy and self.temperature == 1 and self.top_k is None
            and self.top_p is None and self.min_p is None)


# --- data ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class PromptSet:
  """Prompts to sample from: their token ids, the prompts as given (text or messages) and the
  other columns of their rows (for reward functions)."""

  ids: list[np.ndarray]
  prompts: list[Any]
  columns: dict[str, list[Any]]

  def __len__(self) -> int:
    return len(self.ids)

  @classmethod
  def from_dataset(cls, dataset: Any, limit: int | None = None) -> "PromptSet":
    """From a prepared ``task="prompt"`` dataset (:func:`alignax.data.prepare_dataset`)."""
    examples = dataset.examples[:limit]
    extras = [dict(e["extras"]) for e in examples]
    prompts = [e.pop("prompt") for e in extras]
    keys = list(dict.fromkeys(k for e in extras for k in e))
    return cls(ids=[np.asarray(e["prompt_ids"], np.int32) for e in examples], prompts=prompts,
               columns={k: [e.get(k) for e in extras] for k in keys})


def load_prompts(source: Any, tokenizer: Any, *, split: str = "train",
                 config_name: str | None = None, limit: int | None = None,
                 max_prompt_length: int | None = None, what: str = "dataset_name") -> PromptSet:
  """The prompts of ``source`` (a path, a hub name or a list of row dicts with a ``prompt``
  column).

  Raises:
    ValueError: a source without rows or without a ``prompt`` column, naming ``what``.
  """
  from alignax.data import DataConfig, DataError, load_rows, prepare_dataset

  try:
    rows = load_rows(source, split=split, config_name=config_name)
  except DataError as e:
    if e.kind == "empty_dataset":
      raise ValueError(f"{what}={_short(source)} holds no prompts (it has no rows)") from e
    raise
  if not rows:
    raise ValueError(f"{what}={_short(source)} holds no prompts (it has no rows)")
  dataset = prepare_dataset(rows, tokenizer, task="prompt",
                            config=DataConfig(max_length=None, max_prompt_length=max_prompt_length))
  return PromptSet.from_dataset(dataset, limit)


def _short(value: Any) -> str:
  """A source as errors name it: a path or name in full, in-memory rows by their count."""
  if isinstance(value, (str, os.PathLike)):
    return repr(os.fspath(value))
  return f"<{len(value)} rows>" if hasattr(value, "__len__") else repr(value)


def check_same_tokenizer(first: Any, second: Any, *, names: tuple[str, str]) -> None:
  """Raises ValueError naming the first token (or special token) the two tokenizers disagree on:
  win rates compare lengths in tokens and the KL compares next-token distributions, so both
  models must speak one vocabulary."""
  a, b = first.get_vocab(), second.get_vocab()
  if a != b:
    differing = sorted(t for t in set(a) | set(b) if a.get(t) != b.get(t))
    token = differing[0]
    raise ValueError(
      f"the {names[0]}'s and the {names[1]}'s tokenizers differ: token {token!r} has id "
      f"{a.get(token)} in the {names[0]}'s and {b.get(token)} in the {names[1]}'s "
      f"({len(differing)} tokens differ, vocabularies of {len(a)} and {len(b)}); evaluate models "
      "that share a tokenizer")
  for special in ("eos_token_id", "pad_token_id", "bos_token_id"):
    if getattr(first, special, None) != getattr(second, special, None):
      raise ValueError(
        f"the {names[0]}'s and the {names[1]}'s tokenizers differ: {special} is "
        f"{getattr(first, special, None)} in the {names[0]}'s and {getattr(second, special, None)}"
        f" in the {names[1]}'s")


# --- model-side computations (jitted) -----------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("policy_graphdef", "reference_graphdef"))
def _kl_stats(policy_graphdef: Any, policy_state: Any, reference_graphdef: Any,
              reference_state: Any, input_ids: Int[Array, "N L"],
              attention_mask: Bool[Array, "N L"], completion_mask: Bool[Array, "N L"]
              ) -> Float[Array, "N 3"]:
  """Per row: the exact sequence KL along the completion, and the k1 and k3 sums (``[N, 3]``)."""
  from alignax.kernels import token_kl, token_logprobs
  from alignax.kl import kl_estimate

  policy = nnx.merge(policy_graphdef, policy_state)
  reference = nnx.merge(reference_graphdef, reference_state)
  hidden_p = policy(input_ids, attention_mask, compute_logits=False).hidden_states[:, :-1]
  hidden_q = reference(input_ids, attention_mask, compute_logits=False).hidden_states[:, :-1]
  # The state after token t predicts token t + 1: it counts when t + 1 is a completion token.
  mask = completion_mask[:, 1:]
  targets = input_ids[:, 1:]
  exact = token_kl(hidden_p, policy.get_lm_head(), hidden_q, reference.get_lm_head(), mask=mask)
  # KL >= 0: a token's value below 0 is the streamed sums' rounding (-1e-6 between equal models).
  exact = jnp.maximum(exact, 0.0)
  logp = token_logprobs(hidden_p, policy.get_lm_head(), targets, mask=mask).logp
  ref_logp = token_logprobs(hidden_q, reference.get_lm_head(), targets, mask=mask).logp
  k1 = jnp.where(mask, logp - ref_logp, 0.0)
  k3 = jnp.where(mask, kl_estimate(logp, ref_logp, kl_estimator="k3"), 0.0)
  return jnp.stack([exact.sum(-1), k1.sum(-1), k3.sum(-1)], axis=-1)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _nll_stats(graphdef: Any, state: Any, input_ids: Int[Array, "N L"],
               attention_mask: Int[Array, "N L"], completion_mask: Int[Array, "N L"]
               ) -> Float[Array, "N 2"]:
  """Per row: the summed NLL of its completion tokens and their count (``[N, 2]``)."""
  from alignax.kernels import token_logprobs
  from alignax.losses.supervised import next_token_targets

  model = nnx.merge(graphdef, state)
  targets, mask = next_token_targets(input_ids, attention_mask, completion_mask=completion_mask)
  hidden = model(input_ids, attention_mask, compute_logits=False).hidden_states
  logp = token_logprobs(hidden, model.get_lm_head(), targets, mask=mask).logp
  return jnp.stack([-jnp.where(mask, logp, 0.0).sum(-1), mask.sum(-1).astype(jnp.float32)], -1)


def _chunks(count: int, size: int) -> list[np.ndarray]:
  """Index chunks of ``size`` (the last filled up with its own last index, so every call has one
  shape; the caller drops the filler)."""
  chunks = []
  for start in range(0, count, size):
    index = np.arange(start, min(start + size, count))
    if count > size and index.size < size:
      index = np.concatenate([index, np.full(size - index.size, index[-1])])
    chunks.append(index)
  return chunks


@dataclasses.dataclass
class Samples:
  """``N = P·K`` completions of one model, rows ``p·K + k``.

  Attributes:
    completion_ids: the tokens of each completion (the stop token included).
    texts: the decoded completions (special tokens skipped).
    lengths: ``[N]`` completion lengths in tokens.
    stopped: ``[N]`` whether the completion ended on a stop token.
    kl: ``[N, 3]`` exact sequence KL, k1 and k3 to the reference (None: not computed).
  """

  completion_ids: list[list[int]]
  texts: list[str]
  lengths: np.ndarray
  stopped: np.ndarray
  kl: np.ndarray | None


def same_weights(first: nnx.Module, second: nnx.Module) -> bool:
  """Whether two models have the same structure and bitwise equal weights."""
  if first is second:
    return True
  graphdef_a, state_a = nnx.split(first)
  graphdef_b, state_b = nnx.split(second)
  if graphdef_a != graphdef_b:
    return False
  leaves_a, leaves_b = jax.tree.leaves(state_a), jax.tree.leaves(state_b)
  if len(leaves_a) != len(leaves_b):
    return False
  for a, b in zip(leaves_a, leaves_b):
    if a is b:
      continue
    if np.shape(a) != np.shape(b) or getattr(a, "dtype", None) != getattr(b, "dtype", None):
      return False
    if not bool(jnp.array_equal(a, b)):
      return False
  return True


def _left_padded(ids: Sequence[np.ndarray], pad: int) -> tuple[np.ndarray, np.ndarray]:
  length = max(len(x) for x in ids)
  out = np.full((len(ids), length), pad, np.int32)
  mask = np.zeros((len(ids), length), bool)
  for i, x in enumerate(ids):
    out[i, length - len(x):] = x
    mask[i, length - len(x):] = True
  return out, mask


def check_prompt_lengths(prompts: PromptSet, max_new_tokens: int, max_position_embeddings: int,
                         *, source: str = "dataset_name",
                         completion_option: str = "max_completion_length") -> None:
  """Raises ValueError naming the first prompt (its 0-based row in ``source``) that with
  ``max_new_tokens`` completion tokens runs past ``max_position_embeddings``, and the
  ``max_prompt_length`` that would make it fit."""
  for row, ids in enumerate(prompts.ids):
    if len(ids) + max_new_tokens > max_position_embeddings:
      raise ValueError(
        f"{source} row {row} has a prompt of {len(ids)} tokens; with {completion_option}="
        f"{max_new_tokens} that is {len(ids) + max_new_tokens} positions, more than the model's "
        f"max_position_embeddings={max_position_embeddings}: set max_prompt_length="
        f"{max_position_embeddings - max_new_tokens} (prompts keep their last tokens) or lower "
        f"{completion_option}")


def sample_completions(model: nnx.Module, prompts: PromptSet, *, tokenizer: Any, num_samples: int,
                       options: SamplingOptions, key: Array, batch_size: int,
                       reference: nnx.Module | None = None,
                       progress: Any = None) -> Samples:
  """``num_samples`` completions per prompt from ``model``, ``batch_size`` prompts per sampler
  call (call ``c`` draws with ``fold_in(key, c)``), and with a ``reference`` the KL statistics of
  every completion (:class:`Samples`)."""
  from alignax.sampling import generate

  # Here, not in the sampler, so the error names the prompt's row in the set, not in its chunk.
  check_prompt_lengths(prompts, options.max_new_tokens, model.config.max_position_embeddings,
                       source="prompts", completion_option="max_new_tokens")
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
  parts: dict[str, list[Any]] = {"tokens": [], "lengths": [], "stopped": [], "kl": []}
  # A model against itself has KL 0 by definition; the streamed sums would leave float rounding
  # (~1e-6 per token) where there is no divergence at all.
  identical = reference is not None and same_weights(model, reference)
  for call, index in enumerate(_chunks(len(prompts), batch_size)):
    real = len(np.unique(index))
    ids, mask = _left_padded([prompts.ids[i] for i in index], int(pad if pad is not None else 0))
    sample = generate(model, ids, mask, max_new_tokens=options.max_new_tokens,
                      temperature=options.temperature, top_k=options.top_k, top_p=options.top_p,
                      min_p=options.min_p, greedy=options.greedy,
                      stop_token_ids=options.stop_token_ids, num_samples=num_samples,
                      key=jax.random.fold_in(key, call))
    rows = real * num_samples
    if identical:
      parts["kl"].append(np.zeros((rows, 3)))
    elif reference is not None:
      sequence = jnp.concatenate([sample.prompt_ids, sample.tokens], axis=1)
      sequence_mask = jnp.concatenate([sample.prompt_mask, sample.completion_mask], axis=1)
      completion = jnp.concatenate([jnp.zeros_like(sample.prompt_mask), sample.completion_mask],
                                   axis=1)
      policy_graphdef, policy_state = nnx.split(model)
      reference_graphdef, reference_state = nnx.split(reference)
      stats = _kl_stats(policy_graphdef, policy_state, reference_graphdef, reference_state,
                        sequence, sequence_mask, completion)
      parts["kl"].append(np.asarray(jax.device_get(stats), np.float64)[:rows])
    host = jax.device_get(sample)
    parts["tokens"].append(np.asarray(host.tokens)[:rows])
    parts["lengths"].append(np.asarray(host.lengths)[:rows])
    parts["stopped"].append(np.asarray(host.stopped)[:rows])
    if progress is not None:
      progress.update(1)
  lengths = np.concatenate(parts["lengths"]).astype(np.int64)
  tokens = np.concatenate(parts["tokens"])
  completion_ids = [row[:n].tolist() for row, n in zip(tokens, lengths)]
  texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
  return Samples(completion_ids=completion_ids, texts=list(texts), lengths=lengths,
                 stopped=np.concatenate(parts["stopped"]).astype(bool),
                 kl=np.concatenate(parts["kl"]) if parts["kl"] else None)


def heldout_nll(model: nnx.Module, dataset: Any, *, batch_size: int, config: Any = None,
                progress: Any = None) -> tuple[np.ndarray, np.ndarray]:
  """Per held-out example: the summed NLL of its completion (loss) tokens and their count, from a
  prepared ``task="sft"`` dataset. Returns ``(nll_sums [E], token_counts [E])``."""
  from alignax.data import DataConfig, collate_sequences

  config = config or DataConfig(max_length=None)
  graphdef, state = nnx.split(model)
  sums, counts = [], []
  for index in _chunks(len(dataset), batch_size):
    real = len(np.unique(index))
    batch = collate_sequences([dataset.examples[i] for i in index],
                              pad_token_id=dataset.pad_token_id, config=config)
    out = np.asarray(jax.device_get(_nll_stats(
      graphdef, state, jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"]),
      jnp.asarray(batch["completion_mask"]))), np.float64)[:real]
    sums.append(out[:, 0])
    counts.append(out[:, 1])
    if progress is not None:
      progress.update(1)
  return np.concatenate(sums), np.concatenate(counts)


# --- the evaluation -----------------------------------------------------------------------------


@dataclasses.dataclass
class TaxSet:
  """The held-out data of the alignment tax: a prepared ``sft`` dataset (NLL) or prompts with
  the reward functions that grade the answers (accuracy)."""

  nll_dataset: Any = None
  prompts: PromptSet | None = None
  reward_funcs: Sequence[Any] | None = None

  @property
  def kind(self) -> str:
    return "nll" if self.nll_dataset is not None else "accuracy"

  def units(self, batch_size: int) -> int:
    """Progress-bar steps per model."""
    count = len(self.nll_dataset) if self.nll_dataset is not None else len(self.prompts)
    return -(-count // batch_size)


def load_tax_set(source: Any, tokenizer: Any, *, reward_funcs: Sequence[Any] | None = None,
                 limit: int | None = None, max_length: int | None = None,
                 max_prompt_length: int | None = None) -> TaxSet:
  """The held-out rows of ``source`` as SFT examples (no ``reward_funcs``) or as prompts graded by
  ``reward_funcs``."""
  from alignax.data import DataConfig, DataError, load_rows, prepare_dataset

  if reward_funcs:
    return TaxSet(prompts=load_prompts(source, tokenizer, limit=limit, what="tax_dataset",
                                       max_prompt_length=max_prompt_length),
                  reward_funcs=list(reward_funcs))
  try:
    rows = load_rows(source)
  except DataError as e:
    if e.kind == "empty_dataset":
      raise ValueError(f"tax_dataset={_short(source)} holds no rows") from e
    raise
  dataset = prepare_dataset(rows, tokenizer, task="sft", config=DataConfig(max_length=max_length))
  if limit is not None:
    dataset = dataclasses.replace(dataset, examples=dataset.examples[:limit])
  return TaxSet(nll_dataset=dataset)


@dataclasses.dataclass
class _Side:
  """One model's samples and scores."""

  samples: Samples
  scores: np.ndarray  # [N, S'] per source (and the total when S > 1)
  tax: Any = None  # (nll sums, counts) or accuracy [E] (NaN: unscored)


def weighted_total(scores: Float[np.ndarray, "N S"], weights: Float[np.ndarray, "S"]
                   ) -> Float[np.ndarray, "N"]:
  """``Σ_j w_j · scores[:, j]`` over the sources of non-zero weight, NaN in a row where any of
  them is NaN (returned None). Unlike the training reward (TRL's ``nansum``, a None counting as
  0), a pair compared on ``total`` then sums the same sources on both sides, or drops out."""
  scores = np.asarray(scores, np.float64)
  weights = np.asarray(weights, np.float64)
  counted = weights != 0
  return scores[:, counted] @ weights[counted]


class GenerationEval:
  """Compares a policy with a fixed baseline on fixed prompts (see the module docstring).

  The baseline's samples, scores and held-out values are computed once, at the first call, and
  kept: in training the baseline is the frozen starting model, so each later evaluation samples,
  scores and measures on the held-out data the current policy only.

  Args:
    prompts: the prompts (:class:`PromptSet`).
    tokenizer: decodes completions for the reward functions (the policy's and baseline's).
    runner: the reward sources (:class:`alignax.rewards.RewardRunner`); with several, ``total``
      is their sum weighted by ``runner.weights`` (:func:`weighted_total`).
    baseline: the baseline model, or ``policy -> baseline`` (e.g. ``lora_disabled``).
    reference: the KL reference, or ``policy -> reference``; None: the baseline.
    num_samples: K.
    options: the sampling options; both models stop on ``options.stop_token_ids`` (resolve
      them once, :func:`resolve_stop_token_ids`: None would let each model stop on its own
      ``config.json`` ids).
    seed, baseline_seed: the sampling keys (the same by default: common random numbers).
    batch_size: prompts per sampler call.
    tax: the held-out data (:class:`TaxSet`) or None.
    num_bootstrap, confidence: the intervals.
    close_runner: whether :meth:`close` closes ``runner`` (False for a runner its creator, a
      trainer, still uses and closes).
  """

  def __init__(self, *, prompts: PromptSet, tokenizer: Any, runner: Any, baseline: Any,
               reference: Any = None, num_samples: int, options: SamplingOptions, seed: int = 0,
               baseline_seed: int | None = None, batch_size: int = 16, tax: TaxSet | None = None,
               num_bootstrap: int = 1000, confidence: float = 0.95, close_runner: bool = True):
    if len(prompts) == 0:
      raise ValueError("the evaluation has no prompts")
    _validate.positive_int("num_samples", num_samples)
    _validate.positive_int("batch_size", batch_size)
    self.prompts, self.tokenizer, self.runner = prompts, tokenizer, runner
    self.baseline, self.reference = baseline, reference
    self.num_samples, self.options, self.batch_size = num_samples, options, batch_size
    self.seed = seed
    self.baseline_seed = seed if baseline_seed is None else baseline_seed
    self.tax, self.num_bootstrap, self.confidence = tax, num_bootstrap, confidence
    self.close_runner = close_runner
    names = list(runner.names)
    self.names = names + ([TOTAL] if len(names) > 1 else [])
    weights = getattr(runner, "weights", None)
    self.weights = np.ones(len(names)) if weights is None else np.asarray(weights, np.float64)
    self._baseline: _Side | None = None
    self._tax_runner = None

  def units(self) -> int:
    """Progress-bar steps of one :meth:`compare` with the baseline not yet computed."""
    calls = -(-len(self.prompts) // self.batch_size)
    tax = 0 if self.tax is None else self.tax.units(self.batch_size)
    return 2 * (calls + 1 + tax)

  def check_fits(self, max_position_embeddings: int, *,
                 completion_option: str = "max_completion_length",
                 prompt_source: str = "dataset_name",
                 tax_option: str | None = "tax_max_length") -> None:
    """Checks, before any sampling, that every prompt plus the completion budget
    (``options.max_new_tokens``) and every held-out sequence fits the model's position table.

    Args:
      max_position_embeddings: the models' position limit (the smallest of the models').
      completion_option, prompt_source, tax_option: the option names the error suggests (a
        trainer's differ from ``alignax eval``'s); ``tax_option`` None: no option truncates
        the held-out rows.

    Raises:
      ValueError: naming the first row (0-based, as data errors count) that does not fit, its
        length and the ``max_prompt_length`` that would make it fit.
    """
    budget = self.options.max_new_tokens
    limit = int(max_position_embeddings)
    if budget >= limit:
      raise ValueError(f"{completion_option}={budget} leaves no position for a prompt: the "
                       f"model has max_position_embeddings={limit}")
    check_prompt_lengths(self.prompts, budget, limit, source=prompt_source,
                         completion_option=completion_option)
    if self.tax is not None and self.tax.kind == "accuracy":
      check_prompt_lengths(self.tax.prompts, budget, limit, source="tax_dataset",
                           completion_option=completion_option)
    if self.tax is not None and self.tax.kind == "nll":
      for row, example in enumerate(self.tax.nll_dataset.examples):
        length = len(example["input_ids"])
        if length > limit:
          fix = (f"set {tax_option}={limit}" if tax_option is not None
                 else "shorten the row or drop it")
          raise ValueError(f"tax_dataset row {row} has {length} tokens, more than the model's "
                           f"max_position_embeddings={limit}: {fix}")

  def _resolve(self, model: Any, policy: nnx.Module) -> nnx.Module:
    return model(policy) if callable(model) and not isinstance(model, nnx.Module) else model

  def _score(self, samples: Samples) -> np.ndarray:
    out = self.runner(list(self.prompts.prompts), samples.texts, samples.completion_ids,
                      columns=self.prompts.columns, num_generations=self.num_samples,
                      trainer_state=types.SimpleNamespace(global_step=0, max_steps=0))
    scores = np.asarray(out.per_source, np.float64)
    if len(self.names) > len(out.names):
      scores = np.concatenate([scores, weighted_total(scores, self.weights)[:, None]], axis=1)
    return scores

  def _tax_values(self, model: nnx.Module, progress: Any) -> Any:
    if self.tax is None:
      return None
    if self.tax.kind == "nll":
      return heldout_nll(model, self.tax.nll_dataset, batch_size=self.batch_size,
                         progress=progress)
    from alignax.rewards import RewardRunner

    if self._tax_runner is None:
      self._tax_runner = RewardRunner(self.tax.reward_funcs)
    greedy = dataclasses.replace(self.options, greedy=True)
    answers = sample_completions(model, self.tax.prompts, tokenizer=self.tokenizer, num_samples=1,
                                 options=greedy, key=jax.random.key(0),
                                 batch_size=self.batch_size, progress=progress)
    out = self._tax_runner(list(self.tax.prompts.prompts), answers.texts, answers.completion_ids,
                           columns=self.tax.prompts.columns)
    # A None (the grader could not read the answer) is no wrong answer: NaN, dropped and counted.
    return weighted_total(out.per_source, self._tax_runner.weights)

  def _side(self, model: nnx.Module, *, seed: int, reference: nnx.Module | None,
            progress: Any) -> _Side:
    samples = sample_completions(model, self.prompts, tokenizer=self.tokenizer,
                                 num_samples=self.num_samples, options=self.options,
                                 key=jax.random.key(seed), batch_size=self.batch_size,
                                 reference=reference, progress=progress)
    scores = self._score(samples)
    if progress is not None:
      progress.update(1)
    return _Side(samples=samples, scores=scores, tax=self._tax_values(model, progress))

  def baseline_side(self, policy: nnx.Module, progress: Any = None) -> _Side:
    if self._baseline is None:
      self._baseline = self._side(self._resolve(self.baseline, policy), seed=self.baseline_seed,
                                  reference=None, progress=progress)
    return self._baseline

  def compare(self, policy: nnx.Module, progress: Any = None) -> dict[str, Any]:
    """Samples and scores ``policy`` and returns the statistics (``eval.json``'s ``results``)
    with the raw per-sample arrays under ``"_arrays"``."""
    reference = self._resolve(self.reference if self.reference is not None else self.baseline,
                              policy)
    baseline = self.baseline_side(policy, progress)
    ours = self._side(policy, seed=self.seed, reference=reference, progress=progress)
    return self._statistics(ours, baseline)

  def _statistics(self, ours: _Side, theirs: _Side) -> dict[str, Any]:
    p, k = len(self.prompts), self.num_samples
    weights = bootstrap_weights(p, num_bootstrap=self.num_bootstrap, seed=self.seed)
    level = self.confidence
    grid = lambda x: np.asarray(x, np.float64).reshape(p, k)
    length_difference = grid(ours.samples.lengths) - grid(theirs.samples.lengths)
    rewards, unscored, unidentified = {}, [], []
    for j, name in enumerate(self.names):
      mine, base = grid(ours.scores[:, j]), grid(theirs.scores[:, j])
      wins = pairwise_wins(mine, base)
      scored = ~np.isnan(wins)
      controlled = length_controlled_win_rate(wins, length_difference, weights=weights,
                                              confidence=level)
      missing = {"policy": int(np.isnan(mine).sum()), "baseline": int(np.isnan(base).sum())}
      if (missing["policy"] or missing["baseline"]) and name != TOTAL:
        unscored.append(f"{name!r} (policy {missing['policy']}, baseline {missing['baseline']})")
      if not controlled.identified and scored.any():
        shares = controlled.shares
        unidentified.append(
          f"{name!r} ({int(scored.sum())} scored pairs: the policy's completion shorter in "
          f"{shares['policy_shorter']:.1%}, as long in {shares['equal']:.1%}, longer in "
          f"{shares['policy_longer']:.1%})")
      rewards[name] = {
        "policy": mean_estimate(mine, weights=weights, confidence=level).as_dict(),
        "baseline": mean_estimate(base, weights=weights, confidence=level).as_dict(),
        # Over the pairs scored on both sides, as the win rate: one side's None must not move
        # the other side's mean in the difference.
        "difference": difference_estimate(np.where(scored, mine, np.nan),
                                          np.where(scored, base, np.nan), weights=weights,
                                          confidence=level).as_dict(),
        "win_rate": mean_estimate(wins, weights=weights, confidence=level).as_dict(),
        "length_controlled_win_rate": controlled.estimate.as_dict(),
        "length_controlled_identified": controlled.identified,
        "length_coefficient": _number(controlled.coefficient),
        "length_difference_shares": controlled.shares,
        "ties": _number(np.mean(wins[scored] == 0.5)) if scored.any() else None,
        "unscored": missing,
      }
    if unscored:
      warnings.warn(EvaluationWarning(
        f"reward sources returned None (unscored) on some of the {p * k} completions per model: "
        f"{', '.join(unscored)}; those pairs drop out of the source's win rate and difference, "
        f"and out of {TOTAL!r} where the source is weighted"), stacklevel=3)
    if unidentified:
      warnings.warn(EvaluationWarning(
        f"the length-controlled win rate is not identified (reported as None) for "
        f"{'; '.join(unidentified)}: the rate at zero length difference needs at least "
        f"{LC_MIN_SIDE_SHARE:.0%} of the scored pairs, and {LC_MIN_SIDE_PAIRS}, on each side of "
        "zero (pairs of equal length count for both); read the plain win rate with the length "
        "difference, or evaluate on prompts where the lengths overlap"), stacklevel=3)
    kl = ours.samples.kl
    results: dict[str, Any] = {
      "num_prompts": p, "num_samples": k, "rewards": rewards,
      "stop_token_ids": None if self.options.stop_token_ids is None
      else [int(i) for i in self.options.stop_token_ids],
      "kl": {name: mean_estimate(grid(kl[:, i]), weights=weights, confidence=level).as_dict()
             for i, name in enumerate(("exact", "k1", "k3"))},
      "length": {
        "policy": mean_estimate(grid(ours.samples.lengths), weights=weights,
                                confidence=level).as_dict(),
        "baseline": mean_estimate(grid(theirs.samples.lengths), weights=weights,
                                  confidence=level).as_dict(),
        "policy_truncated": _number(1 - ours.samples.stopped.mean()),
        "baseline_truncated": _number(1 - theirs.samples.stopped.mean()),
      },
    }
    results["kl"]["on_policy"] = self.options.on_policy
    if self.tax is not None:
      results["tax"] = self._tax_statistics(ours.tax, theirs.tax)
    results["_arrays"] = {"policy": ours, "baseline": theirs}
    return results

  def _tax_statistics(self, ours: Any, theirs: Any) -> dict[str, Any]:
    level = self.confidence
    if self.tax.kind == "nll":
      (s1, c1), (s2, c2) = ours, theirs
      n = len(s1)
      weights = bootstrap_weights(n, num_bootstrap=self.num_bootstrap, seed=self.seed + 1)
      policy = _interval(s1.sum() / c1.sum(), _ratio(weights, s1, c1), n, level)
      baseline = _interval(s2.sum() / c2.sum(), _ratio(weights, s2, c2), n, level)
      tax = _interval(policy.value - baseline.value,
                      _ratio(weights, s1, c1) - _ratio(weights, s2, c2), n, level)
      return {"kind": "nll", "policy": policy.as_dict(), "baseline": baseline.as_dict(),
              "tax": tax.as_dict(), "num_tokens": int(c1.sum())}
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    missing = {"policy": int(np.isnan(ours).sum()), "baseline": int(np.isnan(theirs).sum())}
    if missing["policy"] or missing["baseline"]:
      warnings.warn(EvaluationWarning(
        f"tax_reward_funcs returned None (unscored) on {missing['policy']} of the policy's and "
        f"{missing['baseline']} of the baseline's {len(ours)} answers: those examples drop out "
        "of the accuracy tax on both sides"), stacklevel=3)
    # Both sides over the examples graded on both, so the tax is the difference of the two.
    both = ~np.isnan(ours) & ~np.isnan(theirs)
    mine = np.where(both, ours, np.nan)[:, None]
    base = np.where(both, theirs, np.nan)[:, None]
    weights = bootstrap_weights(len(ours), num_bootstrap=self.num_bootstrap, seed=self.seed + 1)
    return {"kind": "accuracy",
            "policy": mean_estimate(mine, weights=weights, confidence=level).as_dict(),
            "baseline": mean_estimate(base, weights=weights, confidence=level).as_dict(),
            "tax": difference_estimate(base, mine, weights=weights, confidence=level).as_dict(),
            "unscored": missing}

  def __call__(self, policy: nnx.Module) -> dict[str, float]:
    """``fit``'s ``eval_fn``: the headline numbers under ``eval/`` keys (logged as they are).

    ``eval/kl`` (exact) and ``eval/kl_k3`` are logged at every temperature, with
    ``eval/kl_on_policy`` 1 when the samples follow the policy's own distribution (temperature
    1, no filter, not greedy) and 0 otherwise: off-policy they are KL sums along the tempered
    samples, not :math:`\\mathrm{KL}(\\pi\\|\\pi_{ref})`. ``eval/length_controlled_win_rate`` is
    NaN when the lengths do not identify it (:func:`length_controlled_win_rate`)."""
    results = self.compare(policy)
    headline = results["rewards"][self.names[-1]]
    metrics = {"eval/reward": headline["policy"]["value"],
               "eval/reward_baseline": headline["baseline"]["value"],
               "eval/win_rate": headline["win_rate"]["value"],
               "eval/win_rate_ci_low": headline["win_rate"]["ci_low"],
               "eval/win_rate_ci_high": headline["win_rate"]["ci_high"],
               "eval/length_controlled_win_rate": headline["length_controlled_win_rate"]["value"],
               "eval/kl": results["kl"]["exact"]["value"],
               "eval/kl_k3": results["kl"]["k3"]["value"],
               "eval/kl_on_policy": float(results["kl"]["on_policy"]),
               "eval/completion_length": results["length"]["policy"]["value"]}
    if len(self.names) > 1:
      for name in self.runner.names:
        metrics[f"eval/rewards/{name}"] = results["rewards"][name]["policy"]["value"]
    if "tax" in results:
      metrics["eval/tax"] = results["tax"]["tax"]["value"]
    return {k: (math.nan if v is None else float(v)) for k, v in metrics.items()}

  def close(self) -> None:
    for runner in ((self.runner,) if self.close_runner else ()) + (self._tax_runner,):
      close = getattr(runner, "close", None)
      if close is not None:
        close()


def resolve_stop_token_ids(stop_token_ids: Sequence[int] | None = None, *,
                           model_name_or_path: str | None = None, model: Any = None,
                           tokenizer: Any = None, revision: str | None = None
                           ) -> tuple[tuple[int, ...], str]:
  """The one set of stop ids both models of an evaluation sample with, and where it came from.

  In order: ``stop_token_ids`` as given (``"given"``); every EOS id of the policy checkpoint's
  ``generation_config.json`` and ``config.json``
  (:func:`alignax.sampling.checkpoint_stop_token_ids`, ``"checkpoint"``); a loaded ``model``'s ``config.json`` EOS ids (``"model_config"``); the
  tokenizer's ``eos_token_id`` (``"tokenizer"``); else ``()``, no stop (``"none"``). One tuple for
  both models: with None each model would stop on its own ``config.json`` ids, and a baseline
  whose checkpoint names none would run every completion to the length limit.

  Returns:
    ``(ids, source)``.
  """
  if stop_token_ids is not None:
    return tuple(int(i) for i in stop_token_ids), "given"
  if model_name_or_path:
    from alignax.sampling import checkpoint_stop_token_ids

    found = checkpoint_stop_token_ids(model_name_or_path, revision=revision)
    if found:
      return found, "checkpoint"
  if model is not None:
    from alignax.sampling import default_stop_token_ids

    found = default_stop_token_ids(model)
    if found:
      return found, "model_config"
  eos = None if tokenizer is None else getattr(tokenizer, "eos_token_id", None)
  if eos is not None:
    return (int(eos),), "tokenizer"
  return (), "none"


def make_generation_eval(
  *,
  prompts: Any,
  tokenizer: Any,
  reward_funcs: Any,
  baseline: Any,
  reference: Any = None,
  reward_weights: Sequence[float] | None = None,
  reward_names: Sequence[str] | None = None,
  num_samples: int = 2,
  max_new_tokens: int = 64,
  temperature: float = 1.0,
  top_k: int | None = None,
  top_p: float | None = None,
  greedy: bool = False,
  stop_token_ids: Sequence[int] | None = None,
  seed: int = 0,
  num_prompts: int | None = None,
  max_prompt_length: int | None = None,
  tax_dataset: Any = None,
  tax_reward_funcs: Sequence[Any] | None = None,
  batch_size: int = 16,
  num_bootstrap: int = 200,
  max_position_embeddings: int | None = None,
  completion_option: str = "max_new_tokens",
  prompt_source: str = "prompts",
) -> GenerationEval:
  """The evaluation as ``fit``'s ``eval_fn``: ``policy -> {"eval/reward", "eval/win_rate",
  "eval/kl", "eval/tax", ...}`` (see :meth:`GenerationEval.__call__`).

  Args:
    prompts: a :class:`PromptSet`, a prepared ``task="prompt"`` dataset, rows with a ``prompt``
      column, or a path / hub name.
    tokenizer: the policy's tokenizer.
    reward_funcs: reward sources (callables, built-in names, ``module.function`` paths, reward
      model scorers), or a :class:`alignax.rewards.RewardRunner`, used as it is (its weights and
      names) and left open by :meth:`GenerationEval.close` (its creator closes it).
    baseline: the frozen baseline model, or ``policy -> baseline`` (``lora_disabled`` for LoRA).
    reference: the KL reference (None: the baseline).
    reward_weights, reward_names: the runner's ``weights`` and ``names`` when ``reward_funcs``
      are sources (``total`` sums the sources with these weights).
    num_samples, max_new_tokens, temperature, top_k, top_p, greedy: sampling.
    stop_token_ids: the ids both models stop on (None: :func:`resolve_stop_token_ids` from the
      tokenizer's EOS; a trainer passes the ids its own sampler stops on).
    seed: sampling keys (the same at every evaluation, so the curve is not sampling noise).
    num_prompts: the first N prompts.
    max_prompt_length: prompts keep their last N tokens.
    tax_dataset: held-out SFT rows (NLL tax) or prompt rows (with ``tax_reward_funcs``).
    tax_reward_funcs: reward functions grading greedy answers for the accuracy tax.
    batch_size: prompts per sampler call.
    num_bootstrap: resamples per interval (few: this runs every ``eval_steps``).
    max_position_embeddings: the policy's position limit: every prompt (and held-out row) is
      checked against it now (:meth:`GenerationEval.check_fits`), not at the first evaluation.
    completion_option, prompt_source: the names that error names the completion budget and the
      prompts by.

  Returns:
    A :class:`GenerationEval` (callable; ``close()`` stops the reward runners' event loops).
  """
  from alignax.data import PreparedDataset
  from alignax.rewards import RewardRunner

  if isinstance(prompts, PromptSet):
    prompt_set = PromptSet(prompts.ids[:num_prompts], prompts.prompts[:num_prompts],
                           {k: v[:num_prompts] for k, v in prompts.columns.items()})
  elif isinstance(prompts, PreparedDataset):
    if prompts.task != "prompt":
      raise ValueError(f"prompts must be a 'prompt' dataset, got a {prompts.task!r} dataset")
    prompt_set = PromptSet.from_dataset(prompts, num_prompts)
  else:
    prompt_set = load_prompts(prompts, tokenizer, limit=num_prompts,
                              max_prompt_length=max_prompt_length, what="prompts")
  runner = reward_funcs if isinstance(reward_funcs, RewardRunner) else None
  shared = runner is not None
  if runner is None:
    sources = [] if reward_funcs is None else (
      [reward_funcs] if callable(reward_funcs) or isinstance(reward_funcs, str)
      else list(reward_funcs))
    if not sources:
      raise ValueError("the generation evaluation needs at least one reward source "
                       "(eval_reward_funcs, eval_reward_model_name_or_path)")
    runner = RewardRunner(sources, weights=reward_weights, names=reward_names,
                          max_completion_len=max_new_tokens)
  tax = None if tax_dataset is None else load_tax_set(
    tax_dataset, tokenizer, reward_funcs=tax_reward_funcs, max_prompt_length=max_prompt_length)
  stops, _ = resolve_stop_token_ids(stop_token_ids, tokenizer=tokenizer)
  options = SamplingOptions(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                            top_p=top_p, greedy=greedy, stop_token_ids=stops)
  evaluation = GenerationEval(prompts=prompt_set, tokenizer=tokenizer, runner=runner,
                              baseline=baseline, reference=reference, num_samples=num_samples,
                              options=options, seed=seed, batch_size=batch_size, tax=tax,
                              num_bootstrap=num_bootstrap, close_runner=not shared)
  if max_position_embeddings is not None:
    try:
      evaluation.check_fits(max_position_embeddings, completion_option=completion_option,
                            prompt_source=prompt_source, tax_option=None)
    except ValueError:
      evaluation.close()
      raise
  return evaluation


def trainer_generation_eval(config: Any, *, tokenizer: Any, data: Any, baseline: Any,
                            mesh: Any = None, reward_funcs: Any = None,
                            reward_weights: Sequence[float] | None = None,
                            reward_names: Sequence[str] | None = None, prompts: Any = None,
                            stop_token_ids: Sequence[int] | None = None,
                            max_position_embeddings: int | None = None
                            ) -> GenerationEval | None:
  """The in-training evaluation a trainer's ``TrainingConfig`` asks for, or None when
  ``config.eval_num_prompts`` is 0. A trainer calls it once at start-up (before its first step,
  so a prompt too long for the model fails then), then ``metrics_logger.log(step,
  evaluation(model))`` every ``eval_steps`` (after updating the model from its state) and
  ``evaluation.close()`` at the end; with ``beta == 0`` and no LoRA it passes
  ``baseline=frozen_copy(model)`` taken before the first step.

  Prompts: ``prompts`` when given, else the ``prompt`` column of ``data``'s test split
  (``data.dataset_name`` at ``data.dataset_test_split``). Rewards: ``config.eval_reward_funcs``
  and ``config.eval_reward_model_name_or_path``, else ``reward_funcs``: an online trainer passes
  its own :class:`alignax.rewards.RewardRunner` (its ``reward_weights`` and names then make
  ``total`` and ``eval/reward`` the training reward; the evaluation does not close it), or its
  sources with ``reward_weights`` / ``reward_names``. The baseline (and KL reference) is
  ``baseline``: the frozen starting model, or ``policy -> model`` (``alignax.lora_disabled`` for
  LoRA).

  Args:
    stop_token_ids: the ids the trainer's own sampler stops on, resolved (e.g. GRPO's
      ``stop_token_ids`` after :func:`alignax.sampling.checkpoint_stop_token_ids`); None:
      ``config.stop_token_ids`` if the config has one, else the tokenizer's EOS.
    max_position_embeddings: the policy's ``config.max_position_embeddings``: the evaluation
      prompts and the tax set are checked against it here, at start-up.

  Raises:
    ValueError: no reward source, no prompts to evaluate on, or a prompt (row named) too long
      for the model.
  """
  if not getattr(config, "eval_num_prompts", 0):
    return None
  sources = list(config.eval_reward_funcs or [])
  if config.eval_reward_model_name_or_path:
    from alignax.rewards import load_reward_model

    sources += [load_reward_model(path, mesh=mesh)
                for path in config.eval_reward_model_name_or_path]
  if sources:  # the evaluation's own sources: the trainer's weights and names are not theirs
    reward_weights = reward_names = None
  else:
    if reward_funcs is None:
      raise ValueError(f"eval_num_prompts={config.eval_num_prompts} needs a reward source: set "
                       "eval_reward_funcs or eval_reward_model_name_or_path")
    sources = reward_funcs
  what = "prompts"
  if prompts is None:
    if data is None or data.dataset_name is None:
      raise ValueError(f"eval_num_prompts={config.eval_num_prompts} needs prompts: a dataset "
                       "(dataset_name) whose test split has a 'prompt' column")
    what = f"dataset_name (split {data.dataset_test_split!r})"
    prompts = load_prompts(data.dataset_name, tokenizer, split=data.dataset_test_split,
                           config_name=data.dataset_config, limit=config.eval_num_prompts,
                           max_prompt_length=data.max_prompt_length, what=what)
  if stop_token_ids is None:
    stop_token_ids = getattr(config, "stop_token_ids", None)
  return make_generation_eval(
    prompts=prompts, tokenizer=tokenizer, reward_funcs=sources, baseline=baseline,
    reward_weights=reward_weights, reward_names=reward_names,
    num_samples=config.eval_num_samples, max_new_tokens=config.eval_max_completion_length,
    temperature=config.eval_temperature, stop_token_ids=stop_token_ids,
    seed=config.seed, num_prompts=config.eval_num_prompts,
    max_prompt_length=None if data is None else data.max_prompt_length,
    tax_dataset=config.eval_tax_dataset, batch_size=config.per_device_eval_batch_size,
    max_position_embeddings=max_position_embeddings,
    completion_option="eval_max_completion_length", prompt_source=what)


def frozen_copy(model: nnx.Module) -> nnx.Module:
  """A copy of ``model`` with its own arrays (same sharding): a baseline that training, which
  donates the policy's buffers, leaves as it was."""
  graphdef, state = nnx.split(model)
  return nnx.merge(graphdef, jax.tree.map(jnp.copy, state))


def _function_sources(config: EvalConfig, reward_funcs: Any) -> list[Any]:
  """The reward functions: ``reward_funcs`` when given, else ``config.reward_funcs``."""
  if reward_funcs is None:
    return list(config.reward_funcs or [])
  return [reward_funcs] if callable(reward_funcs) or isinstance(reward_funcs, str) \
    else list(reward_funcs)


def reward_weights_for(config: EvalConfig, num_functions: int) -> list[float]:
  """The weights of ``total``, one per source in the runner's order: the reward functions, the
  reward models, then the ensemble when ``reward_ensemble`` is set. ``config.reward_weights``
  when given (checked for its length here, before any model is loaded); else 1 each, except
  that with an ensemble its members weigh 0, so the ensemble stands for them rather than their
  scores counting twice.

  Raises:
    ValueError: ``reward_weights`` of another length than the sources, naming them.
  """
  models = len(config.reward_model_name_or_path or [])
  ensemble = int(config.reward_ensemble is not None)
  count = num_functions + models + ensemble
  if config.reward_weights is not None:
    if len(config.reward_weights) != count:
      parts = [f"{num_functions} reward functions", f"{models} reward models"]
      if ensemble:
        parts.append(f"the {config.reward_ensemble} ensemble")
      raise ValueError(f"reward_weights has {len(config.reward_weights)} entries for {count} "
                       f"reward sources ({', '.join(parts)}, in that order)")
    return [float(w) for w in config.reward_weights]
  return [1.0] * num_functions + [0.0 if ensemble else 1.0] * models + [1.0] * ensemble


def _reward_sources(config: EvalConfig, reward_funcs: Any, *, mesh: Any) -> list[Any]:
  """The reward functions, then the reward models, then (``reward_ensemble``) their ensemble."""
  from alignax.rewards import resolve_reward_funcs

  functions = resolve_reward_funcs(_function_sources(config, reward_funcs),
                                   max_completion_len=config.max_completion_length)
  models = []
  if config.reward_model_name_or_path:
    from alignax.rewards import load_reward_model

    models = [load_reward_model(path, mesh=mesh, dtype=config.dtype)
              for path in config.reward_model_name_or_path]
  sources = [*functions, *models]
  if config.reward_ensemble is not None:
    from alignax.rewards import RewardEnsemble

    if len(models) < 2:
      raise ValueError(f"reward_ensemble={config.reward_ensemble!r} needs at least two reward "
                       f"models (--reward_model_name_or_path), got {len(models)}")
    sources.append(RewardEnsemble(models, mode=config.reward_ensemble,
                                  name=f"ensemble_{config.reward_ensemble}"))
  return sources


def _versions() -> dict[str, str]:
  import scipy

  import alignax
  from alignax.train.loop import _versions as engine_versions

  return {"alignax": alignax.__version__, **engine_versions(), "numpy": np.__version__,
          "scipy": scipy.__version__, "platform": platform.platform(),
          "backend": jax.default_backend()}


def _mesh_record(given: Any, mesh: jax.sharding.Mesh) -> dict[str, Any]:
  """The mesh as ``eval.json`` records it: its axes and sizes, and the ``MeshConfig`` given."""
  from alignax.train.config import MeshConfig

  record: dict[str, Any] = {"axes": {str(k): int(v) for k, v in mesh.shape.items()}}
  if isinstance(given, MeshConfig):
    record["config"] = dataclasses.asdict(given)
  return record


def evaluate(config: EvalConfig, *, policy: nnx.Module | None = None,
             baseline: nnx.Module | None = None, reference: nnx.Module | None = None,
             tokenizer: Any = None, reward_funcs: Any = None, prompts: Any = None,
             mesh: Any = None) -> dict[str, Any]:
  """Runs ``alignax eval`` (see the module docstring) and writes its files.

  Args:
    config: the options.
    policy, baseline, reference: models already loaded (override the config's paths).
    tokenizer: the tokenizer (default: ``tokenizer_name_or_path`` or the policy's directory).
      The baseline's and the reference's own tokenizers, where their directories hold one, must
      equal it.
    reward_funcs: reward sources (callables with TRL's contract, names, paths) replacing
      ``config.reward_funcs``; reward models of ``config`` are added.
    prompts: rows with a ``prompt`` column replacing ``config.dataset_name``.
    mesh: a mesh, a ``MeshConfig`` or None (every device on ``fsdp``).

  Returns:
    What ``eval.json`` holds: ``{"results": {"rewards": {source: {policy, baseline, difference,
    win_rate, length_controlled_win_rate, length_controlled_identified,
    length_difference_shares, ties, unscored, ...}}, "kl": {exact, k1, k3, on_policy},
    "length", "tax", "stop_token_ids"}, "config", "stop_token_ids", "stop_token_ids_from",
    "reward_weights", "mesh", "versions", "files", "wall_seconds"}``, every number as
    ``{value, ci_low, ci_high, n}``.

  Raises:
    ValueError: no reward source, no output directory or model, ``reward_weights`` of the wrong
      length, tokenizers of the policy and the baseline (or reference) that differ, an empty
      prompt file, a bad row (named by the data module), a prompt too long for the models (its
      row named).
  """
  from alignax.models import from_pretrained, load_tokenizer
  from alignax.rewards import RewardRunner
  from alignax.train.trainers import resolve_mesh

  start = time.perf_counter()
  if not config.output_dir:
    raise ValueError("output_dir is required (--output_dir): where eval.json and the completions "
                     "go")
  if reward_funcs is None and not config.reward_funcs and not config.reward_model_name_or_path:
    raise ValueError("no reward source: pass --reward_funcs (built-in names or module.function "
                     "paths) and/or --reward_model_name_or_path")
  for name, given in (("model_name_or_path", policy), ("baseline_model_name_or_path", baseline)):
    if given is None and not getattr(config, name):
      raise ValueError(f"{name} is required (--{name})")
  if prompts is None and not config.dataset_name:
    raise ValueError("dataset_name is required (--dataset_name): the prompts to sample from")
  if config.plots:
    try:
      import matplotlib  # noqa: F401
    except ImportError as e:
      raise ValueError("plots=True needs matplotlib; or pass --plots false") from e
  weights = reward_weights_for(config, len(_function_sources(config, reward_funcs)))
  # Before anything slow: an unwritable output_dir fails now, not after the sampling.
  os.makedirs(config.output_dir, exist_ok=True)

  if tokenizer is None:
    path = config.tokenizer_name_or_path or config.model_name_or_path
    if path is None:
      raise ValueError("tokenizer is required with a model instance (or tokenizer_name_or_path)")
    tokenizer = load_tokenizer(path)
  # The tokenizer in use (the policy's, or tokenizer_name_or_path) tokenizes and decodes for
  # every model: each model's own tokenizer, where its directory has one, must be the same.
  for role, path in (("baseline", config.baseline_model_name_or_path if baseline is None
                      else None),
                     ("reference", config.ref_model_name_or_path if reference is None else None)):
    if path is not None and _has_tokenizer(path):
      check_same_tokenizer(tokenizer, load_tokenizer(path), names=("policy", role))

  prompt_set = load_prompts(config.dataset_name if prompts is None else prompts, tokenizer,
                            split=config.dataset_split, config_name=config.dataset_config,
                            limit=config.num_prompts, max_prompt_length=config.max_prompt_length)
  tax_funcs = None
  if config.tax_reward_funcs:
    from alignax.rewards import resolve_reward_funcs

    tax_funcs = resolve_reward_funcs(config.tax_reward_funcs)
  tax = None if config.tax_dataset is None else load_tax_set(
    config.tax_dataset, tokenizer, reward_funcs=tax_funcs, limit=config.tax_num_examples,
    max_length=config.tax_max_length, max_prompt_length=config.max_prompt_length)

  device_mesh = resolve_mesh(mesh)
  load = functools.partial(from_pretrained, dtype=config.dtype, mesh=device_mesh)
  policy_path = config.model_name_or_path if policy is None else None
  policy = load(config.model_name_or_path) if policy is None else policy
  baseline = load(config.baseline_model_name_or_path) if baseline is None else baseline
  if reference is None and config.ref_model_name_or_path:
    reference = load(config.ref_model_name_or_path)
  for role, model in (("baseline", baseline), ("reference", reference)):
    if model is not None and model.config.vocab_size != policy.config.vocab_size:
      raise ValueError(f"the policy's vocabulary has {policy.config.vocab_size} entries and the "
                       f"{role}'s {model.config.vocab_size}; evaluate models that share a "
                       "tokenizer")
  stop_token_ids, stop_from = resolve_stop_token_ids(
    config.stop_token_ids, model_name_or_path=policy_path, model=policy, tokenizer=tokenizer)
  options = dataclasses.replace(config.sampling(), stop_token_ids=stop_token_ids)
  runner = RewardRunner(_reward_sources(config, reward_funcs, mesh=device_mesh), weights=weights,
                        max_completion_len=config.max_completion_length)
  evaluation = GenerationEval(
    prompts=prompt_set, tokenizer=tokenizer, runner=runner, baseline=baseline,
    reference=reference, num_samples=config.num_samples, options=options,
    seed=config.seed, baseline_seed=config.baseline_seed, batch_size=config.batch_size, tax=tax,
    num_bootstrap=config.num_bootstrap, confidence=config.confidence_level)

  from tqdm.auto import tqdm

  try:
    evaluation.check_fits(min(m.config.max_position_embeddings
                              for m in (policy, baseline, reference) if m is not None))
    progress = tqdm(total=evaluation.units(), desc="eval", disable=config.disable_tqdm,
                    dynamic_ncols=True)
    try:
      results = evaluation.compare(policy, progress)
    finally:
      progress.close()
  finally:
    evaluation.close()
  arrays = results.pop("_arrays")

  files = {"eval": os.path.join(config.output_dir, EVAL_FILE),
           "completions": os.path.join(config.output_dir, COMPLETIONS_FILE)}
  write_completions(files["completions"], prompt_set, evaluation.names, arrays["policy"],
                    arrays["baseline"], num_samples=config.num_samples)
  if config.plots:
    files.update(write_plots(config.output_dir, evaluation.names, results, arrays["policy"],
                             arrays["baseline"]))
  summary = {"results": results, "config": dataclasses.asdict(config),
             "reward_sources": evaluation.names,
             "reward_weights": dict(zip(runner.names, (float(w) for w in runner.weights))),
             "stop_token_ids": list(stop_token_ids), "stop_token_ids_from": stop_from,
             "mesh": _mesh_record(mesh, device_mesh), "versions": _versions(), "files": files,
             "wall_seconds": time.perf_counter() - start}
  with open(files["eval"], "w") as f:
    json.dump(summary, f, indent=2)
  return summary


def _has_tokenizer(path: str) -> bool:
  from alignax.models.tokenizer import _TOKENIZER_FILES

  return not os.path.isdir(path) or any(os.path.exists(os.path.join(path, name))
                                        for name in _TOKENIZER_FILES)


# --- reporting ----------------------------------------------------------------------------------


def write_completions(path: str, prompts: PromptSet, names: Sequence[str], policy: _Side,
                      baseline: _Side, *, num_samples: int) -> None:
  """One JSON line per pair (prompt, sample): both completions, their lengths and rewards, the
  pair's win per source and the policy sample's KL statistics."""
  from alignax.train.online import as_text

  wins = pairwise_wins(policy.scores, baseline.scores)

  def side(s: _Side, row: int) -> dict[str, Any]:
    out = {"completion": s.samples.texts[row], "length": int(s.samples.lengths[row]),
           "stopped": bool(s.samples.stopped[row]),
           "rewards": {n: _number(v) for n, v in zip(names, s.scores[row])}}
    if s.samples.kl is not None:
      out.update({k: float(v) for k, v in zip(("kl", "k1", "k3"), s.samples.kl[row])})
    return out

  with open(path, "w") as f:
    for row in range(len(policy.samples.texts)):
      p, k = divmod(row, num_samples)
      record = {"prompt_index": p, "sample": k, "prompt": as_text(prompts.prompts[p]),
                "policy": side(policy, row), "baseline": side(baseline, row),
                "win": {n: _number(w) for n, w in zip(names, wins[row])}}
      f.write(json.dumps(record) + "\n")


def _cell(estimate: Mapping[str, Any], fmt: str = "{:.3f}") -> str:
  value = estimate["value"]
  if value is None:
    return "n/a"
  text = fmt.format(value)
  if estimate["ci_low"] is None:
    return text
  return f"{text} [{fmt.format(estimate['ci_low'])}, {fmt.format(estimate['ci_high'])}]"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
  widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
  line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths)))
  return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def format_report(summary: Mapping[str, Any]) -> str:
  """The printed report: one row per reward source, then KL, lengths and the tax."""
  results = summary["results"]
  level = round(100 * summary["config"]["confidence_level"])
  rows = [[name, _cell(r["policy"]), _cell(r["baseline"]), _cell(r["win_rate"]),
           _cell(r["length_controlled_win_rate"])] for name, r in results["rewards"].items()]
  text = [f"{results['num_prompts']} prompts x {results['num_samples']} samples; "
          f"[{level}% bootstrap intervals over prompts]", "",
          _table(["reward source", "policy", "baseline", "win rate", "LC win rate"], rows), ""]
  unidentified = [n for n, r in results["rewards"].items()
                  if not r["length_controlled_identified"] and r["win_rate"]["value"] is not None]
  if unidentified:
    shares = results["rewards"][unidentified[0]]["length_difference_shares"]
    text.append(f"LC win rate n/a for {', '.join(unidentified)}: not identified (policy shorter "
                f"in {shares['policy_shorter']:.0%}, as long in {shares['equal']:.0%}, longer in "
                f"{shares['policy_longer']:.0%} of the pairs)")
  for name, r in results["rewards"].items():
    if name != TOTAL and (r["unscored"]["policy"] or r["unscored"]["baseline"]):
      text.append(f"{name}: unscored (None) completions: policy {r['unscored']['policy']}, "
                  f"baseline {r['unscored']['baseline']}")
  if text[-1]:
    text.append("")
  kl = results["kl"]
  text.append(f"KL(policy || reference) per sequence: exact {_cell(kl['exact'])}, k1 "
              f"{_cell(kl['k1'])}, k3 {_cell(kl['k3'])}"
              + ("" if kl["on_policy"] else "  (samples not from the policy's own distribution)"))
  length = results["length"]
  text.append(f"completion length (tokens): policy {_cell(length['policy'], '{:.1f}')}, "
              f"baseline {_cell(length['baseline'], '{:.1f}')}")
  if "tax" in results:
    tax = results["tax"]
    what = "NLL per token" if tax["kind"] == "nll" else "accuracy"
    sign = "policy - baseline" if tax["kind"] == "nll" else "baseline - policy"
    text.append(f"alignment tax ({what}): policy {_cell(tax['policy'])}, baseline "
                f"{_cell(tax['baseline'])}, tax ({sign}) {_cell(tax['tax'])}")
  return "\n".join(text)


def write_plots(output_dir: str, names: Sequence[str], results: Mapping[str, Any],
                policy: _Side, baseline: _Side) -> dict[str, str]:
  """``reward_histograms.png`` (each source's rewards, policy vs baseline), ``win_rates.png``
  (win rate and length-controlled win rate per source, with intervals) and ``kl_histogram.png``
  (the policy samples' exact sequence KL, with the means of the three estimates)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  paths = {}
  columns = min(3, len(names))
  rows = -(-len(names) // columns)
  fig, axes = plt.subplots(rows, columns, figsize=(4.5 * columns, 3.2 * rows), squeeze=False)
  for ax, (j, name) in zip(axes.flat, enumerate(names)):
    mine, base = policy.scores[:, j], baseline.scores[:, j]
    values = np.concatenate([mine, base])
    values = values[np.isfinite(values)]
    bins = np.histogram_bin_edges(values, bins=20) if values.size else 10
    ax.hist(base[np.isfinite(base)], bins=bins, alpha=0.6, label="baseline", color="#999999")
    ax.hist(mine[np.isfinite(mine)], bins=bins, alpha=0.6, label="policy", color="#4C72B0")
    ax.set_title(name)
    ax.set_xlabel("reward")
    ax.legend(fontsize=7)
  for ax in list(axes.flat)[len(names):]:
    ax.axis("off")
  fig.tight_layout()
  paths["reward_histograms"] = os.path.join(output_dir, REWARDS_PLOT)
  fig.savefig(paths["reward_histograms"], dpi=110)
  plt.close(fig)

  fig, ax = plt.subplots(figsize=(max(4.0, 1.6 * len(names) + 1.5), 3.4))
  x = np.arange(len(names))
  for offset, key, label, color in ((-0.2, "win_rate", "win rate", "#4C72B0"),
                                    (0.2, "length_controlled_win_rate", "length-controlled",
                                     "#DD8452")):
    estimates = [results["rewards"][n][key] for n in names]
    values = np.array([np.nan if e["value"] is None else e["value"] for e in estimates])
    low = np.array([np.nan if e["ci_low"] is None else e["ci_low"] for e in estimates])
    high = np.array([np.nan if e["ci_high"] is None else e["ci_high"] for e in estimates])
    errors = np.nan_to_num(np.stack([values - low, high - values]))
    ax.bar(x + offset, values, width=0.4, yerr=errors, capsize=3, label=label, color=color)
  ax.axhline(0.5, color="black", linewidth=0.8, linestyle="--")
  ax.set_xticks(x, names)
  ax.set_ylim(0, 1)
  ax.set_ylabel("policy vs baseline")
  ax.legend(fontsize=7)
  fig.tight_layout()
  paths["win_rates"] = os.path.join(output_dir, WIN_RATE_PLOT)
  fig.savefig(paths["win_rates"], dpi=110)
  plt.close(fig)

  fig, ax = plt.subplots(figsize=(5.0, 3.4))
  kl = policy.samples.kl
  ax.hist(kl[:, 0], bins=30, color="#55A868", alpha=0.8, label="exact, per sample")
  for i, (name, style) in enumerate((("exact", "-"), ("k1", "--"), ("k3", ":"))):
    ax.axvline(kl[:, i].mean(), color="black", linestyle=style, label=f"mean {name}")
  ax.set_xlabel("sequence KL(policy || reference)")
  ax.legend(fontsize=7)
  fig.tight_layout()
  paths["kl_histogram"] = os.path.join(output_dir, KL_PLOT)
  fig.savefig(paths["kl_histogram"], dpi=110)
  plt.close(fig)
  return paths


# --- the command line ---------------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> tuple[EvalConfig, Any]:
  """``alignax eval argv`` -> ``(EvalConfig, MeshConfig)``, with ``--config FILE.yaml`` read as
  the trainers read it (flags win).

  Raises:
    alignax.cli.UsageError: an unknown flag or config key, a value of the wrong type.
    ValueError: a value :class:`EvalConfig` rejects (named).
  """
  import difflib

  from alignax import cli
  from alignax.train.config import MeshConfig

  # The mesh's axis sizes; the multi-host flags are left out (the evaluation runs on one host).
  mesh_fields = [(f.name, f.type, dataclasses.field(default=f.default))
                 for f in dataclasses.fields(MeshConfig) if f.name.startswith("mesh_")]
  mesh_options = dataclasses.make_dataclass("MeshOptions", mesh_fields)
  parser = cli._Parser((EvalConfig, mesh_options), prog="alignax eval",
                       description="A policy against a baseline: reward, win rate, KL to the "
                                   "reference and alignment tax. Flags override --config.")
  parser.add_argument("--config", metavar="FILE.yaml",
                      help="read options from a YAML mapping (flags on the command line win)")
  parser.add_argument("--debug", action="store_true",
                      help="print the traceback of an error (also ALIGNAX_TRACEBACK=1)")
  helps = {**cli._attribute_help(MeshConfig), **cli._attribute_help(EvalConfig)}
  for action in parser._actions:
    if action.dest in helps and not action.help:
      action.help = helps[action.dest]
  path, args = cli._split_config_flag([a for a in argv if a != "--debug"])
  if path is not None:
    parser.set_defaults(**cli._read_yaml(path, parser))
  config, mesh, *_, remaining = parser.parse_args_into_dataclasses(
    args=args, return_remaining_strings=True)
  if remaining:
    unknown = next((a for a in remaining if a.startswith("-")), remaining[0])
    close = difflib.get_close_matches(unknown.split("=", 1)[0], cli._option_names(parser), n=1)
    raise cli.UsageError(f"unrecognised argument {unknown}"
                         + (f" (did you mean {close[0]}?)" if close else ""))
  for name in ("output_dir", "model_name_or_path", "baseline_model_name_or_path", "dataset_name"):
    if not getattr(config, name):
      raise cli.UsageError(f"--{name} is required")
  if not config.reward_funcs and not config.reward_model_name_or_path:
    raise cli.UsageError("no reward source: pass --reward_funcs and/or "
                         "--reward_model_name_or_path")
  return config, MeshConfig(**dataclasses.asdict(mesh))


def main(argv: Sequence[str] | None = None) -> int:
  """``alignax eval [flags]``: 0 done, 1 failed while running, 2 bad usage."""
  from alignax import cli

  argv = list(sys.argv[1:] if argv is None else argv)
  debug = "--debug" in argv or os.environ.get("ALIGNAX_TRACEBACK", "") not in ("", "0")
  try:
    config, mesh = parse_args(argv)
  except SystemExit as e:  # --help
    return int(e.code or 0)
  except (cli.UsageError, ValueError, TypeError) as e:
    if debug:
      traceback.print_exc()
    cli._say("eval", f"{e}\n(`alignax eval --help` lists the flags)")
    return 2
  try:
    summary = evaluate(config, mesh=mesh)
  except KeyboardInterrupt:
    cli._say("eval", "interrupted")
    return 130
  except Exception as e:  # one readable line instead of a traceback wall
    if debug:
      traceback.print_exc()
    known = isinstance(e, (ValueError, OSError, RuntimeError))
    hint = "" if known or debug else " (--debug or ALIGNAX_TRACEBACK=1 shows the traceback)"
    cli._say("eval", (str(e) if known else f"{type(e).__name__}: {e}") + hint)
    return 1
  print("\n" + format_report(summary))
  for name, path in summary["files"].items():
    print(f"{name + ':':<19}{path}")
  print(f"done in {summary['wall_seconds']:.0f} s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
