"""The two GRPO reproductions: Dr. GRPO's length and difficulty biases (Liu et al. 2025) and the
GRPO group-size ablation, each end to end in a smoke configuration.

Golden values: toy 1's expected update on an exhaustively enumerated stopping bandit against the
closed form :math:`E[1/L] - s` (GRPO) and 0 (Dr. GRPO); toy 2's enumeration against the published
B.4 figures; the group-size closed forms against the algebraic :math:`p(1-p)/G`.
"""

import itertools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import alignax as ax
from alignax import experiment
from experiments import dr_grpo_length_bias as drgrpo
from experiments import grpo_group_size as group_size

DR_SMOKE = {"zscore_batches": 400, "sgd_steps": 100, "curve_points": 10, "toy2_groups": 20_000}
GS_SMOKE = {"steps": 30, "curve_points": 3, "probe_batches": 40}


# ---------------------------------------------------------------------------------------------
# Dr. GRPO: length and difficulty biases


@pytest.fixture(scope="module")
def dr_run(tmp_path_factory):
  out = tmp_path_factory.mktemp("drgrpo")
  argv = ["experiments/dr_grpo_length_bias.py", "--seeds", "2", "--output_dir", str(out),
          "--no_plots", "--json"] + [f"--set={k}={v}" for k, v in DR_SMOKE.items()]
  code = experiment.main(argv)
  return code, json.loads((out / "results.json").read_text()), out


def test_dr_grpo_smoke_reproduces_the_claim_and_writes_valid_results(dr_run):
  code, results, out = dr_run
  experiment.validate_results(results)
  failed = [(c["name"], c["measured"]["mean"]) for c in results["criteria"] if not c["passed"]]
  assert not failed and results["passed"] and code == 0
  assert results["config"]["seeds"] == [0, 1]
  assert results["config"]["zscore_batches"] == DR_SMOKE["zscore_batches"]
  cells = {c["name"]: c for c in results["criteria"]}
  assert len(cells) == 18
  # The contrast itself: GRPO's bias is orders of magnitude beyond Dr. GRPO's noise.
  grpo_wrong = cells["toy1 GRPO z(stop wrong) <= -50 (lengthens wrong)"]["measured"]["values"]
  dr_wrong = cells["toy1 Dr. GRPO |z(stop wrong)| < 3 (unbiased)"]["measured"]["values"]
  assert max(grpo_wrong) < -50 and max(abs(v) for v in dr_wrong) < 3
  saved = np.load(out / "measurements.npz")
  assert saved["zscore"].shape == (2, len(drgrpo.LOSSES), 2)
  assert saved["length_curve"].shape == (2, DR_SMOKE["curve_points"], 2, 2)
  assert saved["toy3_final"].shape == (2, 2, 3)
  # The reported token-mean variants are biased the same way as GRPO, the per-group one more
  # than the batch-wide one (B.4's "new finding": its normaliser tracks its members' lengths).
  z = saved["zscore"].mean(0)
  token_mean, group_mean = drgrpo.LOSSES.index("token_mean"), drgrpo.LOSSES.index(
      "group_token_mean")
  assert z[group_mean, 0] < z[token_mean, 0] < 0 < z[token_mean, 1] < z[group_mean, 1]


def test_dr_grpo_criteria_fail_when_grpo_and_dr_grpo_trade_places(dr_run):
  """The toy-1 criteria are live: GRPO's and Dr. GRPO's measurements swapped fail all eight."""
  _, _, out = dr_run
  measured = dict(np.load(out / "measurements.npz"))
  grpo, dr = drgrpo.LOSSES.index("grpo"), drgrpo.LOSSES.index("dr_grpo")
  swapped = dict(measured)
  swapped["zscore"] = measured["zscore"].copy()
  swapped["zscore"][:, [grpo, dr]] = measured["zscore"][:, [dr, grpo]]
  swapped["length_ratio"] = measured["length_ratio"][:, ::-1]
  criteria = drgrpo.criteria(drgrpo.Config(**DR_SMOKE), swapped)
  toy1 = [c for c in criteria if c["name"].startswith("toy1")]
  assert len(toy1) == 8 and not any(c["passed"] for c in toy1)


def _enumerated_update(name: str, theta: jax.Array, p_correct: float, max_len: int):
  """The exact expected update -E[grad] of one group of two samples: every (correctness, length)
  outcome of both samples, weighted by its probability."""
  outcomes = [(c, l, True) for c in (0, 1) for l in range(1, max_len + 1)]
  outcomes += [(c, max_len, False) for c in (0, 1)]  # truncated: no stop token

  def probability(c, l, stopped):
    s = 1 / (1 + math.exp(-float(theta[c])))
    p_class = p_correct if c else 1 - p_correct
    return p_class * ((1 - s) ** (l - 1) * s if stopped else (1 - s) ** max_len)

  pairs = list(itertools.product(outcomes, outcomes))
  correct = jnp.asarray([[[a[0], b[0]]] for a, b in pairs], bool)
  length = jnp.asarray([[[a[1], b[1]]] for a, b in pairs], jnp.int32)
  stopped = jnp.asarray([[[a[2], b[2]]] for a, b in pairs], bool)
  weights = np.asarray([probability(*a) * probability(*b) for a, b in pairs])
  assert weights.sum() == pytest.approx(1.0, abs=1e-12)
  loss = lambda th, c, l, s: drgrpo._loss(th, name, c, l, s, max_len)  # noqa: E731
  grads = jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, 0, 0, 0)))(theta, correct, length,
                                                                    stopped)
  grads = np.asarray(grads, np.float64)
  return -(weights[:, None] * grads).sum(0)


def test_toy1_expected_update_equals_the_closed_form_and_is_zero_for_dr_grpo():
  """Enumerated exactly (G = 2, T = 6): GRPO's expected update of each stop logit is
  -+2p(1-p) * (1/sqrt(2))/2 * (E[1/L; stopped] - s) (the advantage is +-1/sqrt(2) in a mixed
  group, the loss a mean over 2 sequences), and Dr. GRPO's is 0."""
  max_len, p = 6, 0.3
  theta = jnp.asarray([-1.2, 0.4], jnp.float32)  # stop logits of (wrong, correct)
  dr = _enumerated_update("dr_grpo", theta, p, max_len)
  np.testing.assert_allclose(dr, 0.0, atol=1e-8)
  grpo = _enumerated_update("grpo", theta, p, max_len)
  expected = []
  for c, sign in ((0, -1.0), (1, 1.0)):
    s = 1 / (1 + math.exp(-float(theta[c])))
    inverse_length = sum((1 - s) ** (l - 1) * s / l for l in range(1, max_len + 1))
    expected.append(sign * 2 * p * (1 - p) * (1 / math.sqrt(2)) / 2 * (inverse_length - s))
  np.testing.assert_allclose(grpo, expected, rtol=1e-4)
  assert grpo[0] < 0 < grpo[1]  # lengthen wrong chains, shorten correct ones


def test_toy1_chains_are_a_distribution_and_the_sampler_draws_from_it():
  config = drgrpo.Config(groups=2000, max_len=40, init_length=6.0)
  theta = jnp.asarray([drgrpo.init_stop_logit(6.0, 40), 0.3], jnp.float32)

  @jax.jit
  def chains_and_samples(theta, key):
    # Every outcome of each class: stop at l = 1..T, or truncated at T.
    lengths = jnp.tile(jnp.asarray(list(range(1, 41)) + [40], jnp.int32), (2, 1))
    stopped = jnp.tile(jnp.arange(41) < 40, (2, 1))
    correct = jnp.tile(jnp.asarray([[False], [True]]), (1, 41))
    logp, mask = drgrpo._token_logp(theta, correct, lengths, stopped, 40)
    totals = jnp.sum(jnp.exp(ax.masked_sum(logp, mask, axis=-1)), axis=-1)
    return totals, drgrpo._sample_batch(key, theta, config), drgrpo.expected_length(theta, 40)

  totals, (correct, length, _), expected = chains_and_samples(theta, jax.random.key(0))
  np.testing.assert_allclose(totals, 1.0, atol=1e-5)  # exp(sum of token log-probs) sums to 1
  assert float(expected[0]) == pytest.approx(6.0, rel=1e-4)
  for c in (0, 1):
    drawn = np.asarray(length)[np.asarray(correct) == bool(c)]
    assert drawn.mean() == pytest.approx(float(expected[c]),
                                         abs=4 * drawn.std() / math.sqrt(drawn.size))
  assert np.asarray(correct).mean() == pytest.approx(0.3, abs=0.01)


def test_toy3_samples_match_the_exact_statistics_at_the_start():
  """Toy 3's sampler and its exact statistics agree: accuracy 0.4 and length 16 at the start."""
  config = drgrpo.Config(toy3_prompts=500)
  params = jax.tree.map(jnp.asarray, drgrpo.toy3_initial_params(config))
  stats_and_batch = jax.jit(lambda params, key: (drgrpo.toy3_statistics(params, config),
                                                 drgrpo._toy3_batch(key, params, config)))
  stats, (logp, mask, rewards) = stats_and_batch(params, jax.random.key(2))
  np.testing.assert_allclose(stats, [0.4, 16.0, 16.0], rtol=1e-4)
  lengths = np.asarray(mask.sum(-1), np.float64)
  rewards = np.asarray(rewards)
  assert rewards.mean() == pytest.approx(0.4, abs=4 * math.sqrt(0.24 / rewards.size))
  assert lengths.mean() == pytest.approx(16.0, abs=4 * lengths.std() / math.sqrt(lengths.size))
  assert np.all(np.isfinite(np.where(mask, logp, 0.0))) and lengths.max() <= config.toy3_max_len


def test_toy2_closed_forms_match_the_quoted_figures():
  """B.4: mean |A| 0.235 vs 0.083 at p = 0.05 and 0.928 vs 0.438 at p = 0.5 (G = 8, population
  std), an up-weighting of about 1.34x, and 2.29x as G -> infinity."""
  k = np.arange(9)
  scaled, plain = drgrpo.mean_abs_advantage_closed_form(8, k)
  population = scaled * math.sqrt(8 / 7)  # ddof 0 instead of GRPO's ddof 1
  for p, quoted in ((0.05, (0.235, 0.083)), (0.5, (0.928, 0.438))):
    pmf = drgrpo.binomial_pmf(8, p)
    assert (pmf @ population, pmf @ plain) == pytest.approx(quoted, abs=6e-4)
  assert drgrpo.difficulty_ratio_closed_form(8, 0.05, 0.5) == pytest.approx(1.34, abs=0.01)
  assert drgrpo.difficulty_ratio_limit(0.05, 0.5) == pytest.approx(2.29, abs=0.01)
  # The library's group_advantages on each k-of-G pattern is the closed form.
  for scale, closed in (("group", scaled), ("none", plain)):
    np.testing.assert_allclose(drgrpo._mean_abs(drgrpo._patterns(8), scale), closed, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# GRPO group size at an equal sample budget


@pytest.fixture(scope="module")
def gs_run(tmp_path_factory):
  out = tmp_path_factory.mktemp("group_size")
  results = experiment.run_experiment(group_size, overrides=GS_SMOKE, seeds=[0, 1],
                                      output_dir=str(out), plots=False)
  return results, out


def test_group_size_smoke_writes_valid_results_and_meets_the_cheap_criteria(gs_run):
  results, out = gs_run
  on_disk = json.loads((out / "results.json").read_text())
  experiment.validate_results(on_disk)
  assert on_disk == results
  config = group_size.Config(**GS_SMOKE)
  cells = {c["name"]: c for c in results["criteria"]}
  assert len(cells) == 2 * len(config.group_sizes) + 2
  # The closed forms and "steadier" hold at any budget; "costlier" needs the full budget.
  cheap = [c for c in results["criteria"] if not c["name"].startswith("costlier")]
  assert [c["name"] for c in cheap if not c["passed"]] == []
  saved = np.load(out / "measurements.npz")
  g = len(config.group_sizes)
  assert saved["reward_curve"].shape == (2, g, GS_SMOKE["curve_points"])
  # Smaller groups: more zero-spread groups and a worse baseline, monotonically.
  for name in ("zero_spread", "baseline_mse", "train_zero_spread"):
    assert np.all(np.diff(saved[name].mean(0)) < 0), name
  assert np.all(np.diff(saved["cos_batch"].mean(0)) > 0)
  assert np.all(saved["final_reward"] > saved["initial_reward"][:, None])  # everyone learns


def test_group_size_vmap_over_seeds_equals_a_python_loop(gs_run):
  """The smoke run's seeds (and group sizes) were one jit(vmap(train)) program; one jit(train)
  per seed agrees."""
  _, out = gs_run
  vmapped = dict(np.load(out / "measurements.npz"))
  looped = experiment.measure(group_size, group_size.Config(**GS_SMOKE), [0, 1], vmap=False)
  assert set(vmapped) == set(looped)
  for name in vmapped:
    np.testing.assert_allclose(vmapped[name], looped[name], rtol=1e-4, atol=1e-6, err_msg=name)
  assert not np.allclose(vmapped["zero_spread"][0], vmapped["zero_spread"][1])  # seeds differ


def test_group_size_steadier_criterion_fails_with_the_group_sizes_reversed(gs_run):
  _, out = gs_run
  measured = dict(np.load(out / "measurements.npz"))
  reversed_ = {k: (v[:, ::-1] if v.ndim > 1 else v) for k, v in measured.items()}
  criteria = group_size.criteria(group_size.Config(**GS_SMOKE), reversed_)
  steadier = [c for c in criteria if c["name"].startswith("steadier")]
  closed = [c for c in criteria if c["name"].startswith("G=")]
  assert len(steadier) == 1 and not steadier[0]["passed"]
  assert sum(c["passed"] for c in closed) <= 2  # only G = 8 sits in the middle of both orders


def test_group_size_closed_forms_are_p_one_minus_p_over_g_and_the_binomial_zero_mass():
  config = group_size.Config()
  task = group_size.make_task(config)
  p = group_size.success_rates(task, task["x"], task["answers"])
  assert 0.15 < p.mean() < 0.3 and p.min() < 0.02 and p.max() > 0.8  # spread of difficulty
  for g in config.group_sizes:
    exact = group_size.closed_forms(config, g)
    assert exact["baseline_mse"] == pytest.approx(np.mean(p * (1 - p)) / g, rel=1e-9)
    assert exact["zero_spread"] == pytest.approx(np.mean(p ** g + (1 - p) ** g), rel=1e-9)
  # NumPy and JAX compute the same success rates.
  params = {"w": jnp.asarray(task["w"], jnp.float32), "b": jnp.asarray(task["b"], jnp.float32)}
  np.testing.assert_allclose(group_size.success_rates(params, jnp.asarray(task["x"], jnp.float32),
                                                      jnp.asarray(task["answers"])), p, rtol=2e-4)


def test_group_size_flat_layout_equals_the_library_on_groups_under_vmap():
  """The single program switches on a traced index of G; vmapped, every branch must still give
  group_advantages / informative_group_mask of the [N/G, G] layout."""
  config = group_size.Config(group_sizes=(2, 4, 8), samples_per_step=16)
  ops = group_size._group_ops(config)
  rewards = jax.random.bernoulli(jax.random.key(1), 0.4, (16,)).astype(jnp.float32)
  advantages, centred, zero = jax.jit(jax.vmap(ops, in_axes=(0, None)))(jnp.arange(3), rewards)
  for j, g in enumerate(config.group_sizes):
    groups = rewards.reshape(16 // g, g)
    np.testing.assert_allclose(advantages[j], ax.group_advantages(groups).reshape(16), atol=1e-6)
    np.testing.assert_allclose(centred[j], ax.group_advantages(groups, scale="none").reshape(16),
                               atol=1e-6)
    np.testing.assert_array_equal(zero[j], np.repeat(~ax.informative_group_mask(groups), g))


def test_configs_name_bad_values():
  with pytest.raises(ValueError, match="samples_per_step=48 must be a multiple"):
    group_size.Config(samples_per_step=48)
  with pytest.raises(ValueError, match="optimizer must be one of"):
    group_size.Config(optimizer="rmsprop")
  with pytest.raises(ValueError, match="group_sizes must be increasing"):
    group_size.Config(group_sizes=(4, 2, 8))
  with pytest.raises(ValueError, match="init_length must lie in"):
    drgrpo.Config(init_length=600.0)
  with pytest.raises(experiment.ExperimentError, match="group_size must be >= 2"):
    experiment.make_config(drgrpo.Config, {"group_size": 1})
