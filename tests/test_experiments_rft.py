"""experiments/grpo_vs_rft.py (DeepSeekMath's GRPO vs online RFT vs RFT): the task, the Pass@k and
Maj@k helpers against hand-computed values, and a smoke run end to end (a schema-valid
results.json and measurements)."""

import json
import math

import jax.numpy as jnp
import numpy as np
import pytest

from alignax import experiment
from experiments import grpo_vs_rft as rft

# The smallest run that goes through every stage: SFT, the RFT pool, the three online lanes (PPO
# included), the checkpoint curves and the sampled evaluation.
SMOKE = dict(sft_steps=20, rl_steps=4, curve_points=2, prompts_per_step=4, group_size=4,
             rft_samples=4, eval_problems=40, eval_samples=4)
SEEDS = [0, 1]


def test_pass_at_k_matches_the_binomial_formula():
  # n = 5, c = 2, k = 2: 1 - C(3, 2) / C(5, 2) = 1 - 3/10.
  assert float(rft.pass_at_k(5, jnp.asarray(2), 2)) == pytest.approx(0.7)
  n = 6
  counts = jnp.arange(n + 1)
  for k in (1, 2, 6):
    want = [1 - math.comb(n - c, k) / math.comb(n, k) for c in range(n + 1)]
    np.testing.assert_allclose(rft.pass_at_k(n, counts, k), want, atol=1e-6, err_msg=f"k={k}")
  # k = 1 is the fraction correct; k = n is "any correct".
  np.testing.assert_allclose(rft.pass_at_k(n, counts, 1), counts / n, atol=1e-6)
  with pytest.raises(ValueError, match=r"k must lie in \[1, num_samples=4\], got 5"):
    rft.pass_at_k(4, jnp.asarray(1), 5)


def test_maj_at_k_votes_and_breaks_ties_toward_the_first_sampled():
  answers = jnp.asarray([[3, 5, 3, 7],    # 3 wins 2:1:1
                         [5, 3, 5, 3],    # a 2:2 tie, 5 sampled first
                         [1, 2, 3, 4],    # all tied: the first, 1
                         [9, 9, 9, 9]])
  truth = jnp.asarray([3, 3, 2, 9])
  np.testing.assert_array_equal(rft.maj_at_k(answers, truth), [True, False, False, True])
  np.testing.assert_array_equal(rft.maj_at_k(answers[1:2], jnp.asarray([5])), [True])


def test_the_task_encodes_answers_reversed_and_holds_out_its_eval_problems():
  np.testing.assert_array_equal(rft.encode_prompts(jnp.asarray([[12, 7], [99, 0]])),
                                [[1, 2, rft.PLUS, 0, 7, rft.EQUALS],
                                 [9, 9, rft.PLUS, 0, 0, rft.EQUALS]])
  np.testing.assert_array_equal(rft.answer_digits(jnp.asarray([19, 297, 5])),
                                [[9, 1, 0], [7, 9, 2], [5, 0, 0]])
  np.testing.assert_array_equal(rft.answer_value(rft.answer_digits(jnp.arange(300))),
                                np.arange(300))
  # The numbering is a bijection, so the held-out tail never appears among training indices.
  config = rft.Config(terms=2, eval_problems=1000)
  every = np.asarray(rft.problem_operands(jnp.arange(10_000), terms=2))
  ids = every[:, 0] + 100 * every[:, 1]
  assert len(set(ids.tolist())) == 10_000
  held_out = {tuple(row) for row in np.asarray(rft.eval_problems(config)).tolist()}
  assert held_out == {tuple(row) for row in every[-1000:].tolist()} and len(held_out) == 1000
  assert not held_out & {tuple(row) for row in every[:-1000].tolist()}


def test_the_noisy_teacher_changes_exactly_one_digit_at_rate_noise(key):
  answers = rft.answer_digits(jnp.arange(200) % 199)
  changed = np.asarray(rft.noisy_answers(key, answers, noise=0.999999)) != np.asarray(answers)
  np.testing.assert_array_equal(changed.sum(-1), 1)
  np.testing.assert_array_equal(rft.noisy_answers(key, answers, noise=0.0), answers)


@pytest.mark.parametrize("overrides, message", [
    ({"terms": 4}, "terms must be 1, 2 or 3"),
    ({"noise": 1.0}, r"noise must lie in \[0, 1\)"),
    ({"group_size": 1}, "group_size must be >= 2"),
    ({"rl_steps": 7, "curve_points": 2}, "rl_steps=7 must be a multiple of curve_points=2"),
    ({"rl_steps": 2, "curve_points": 1, "prompts_per_step": 1, "group_size": 2,
      "rft_samples": 3}, "sample budget .* = 4 must be a multiple of rft_samples=3"),
    ({"terms": 1, "eval_problems": 60}, "eval_problems=60 must leave most"),
])
def test_config_errors_name_the_field(overrides, message):
  with pytest.raises(ValueError, match=message):
    rft.Config(**overrides)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
  out = tmp_path_factory.mktemp("grpo_vs_rft")
  results = experiment.run_experiment(rft, overrides=SMOKE, seeds=SEEDS, output_dir=str(out),
                                      plots=False)
  return results, out


def test_smoke_run_writes_schema_valid_results(smoke):
  results, out = smoke
  written = json.loads((out / "results.json").read_text())
  experiment.validate_results(written)
  assert written == results
  assert written["config"]["ppo"] is True and written["config"]["seeds"] == SEEDS
  names = [c["name"] for c in written["criteria"]]
  assert [n.split(" ")[0] for n in names] == ["(i)", "(i)", "(ii)", "(iii)", "(iii)", "(iii)",
                                              "(iv)"]
  measured = dict(np.load(out / "measurements.npz"))
  for policy in rft.POLICIES:
    for metric in rft.METRICS:
      values = measured[f"{policy}_{metric}"]
      assert values.shape == (len(SEEDS),) and np.all((values >= 0) & (values <= 100)), (
          policy, metric)
  for method in rft.METHODS:
    assert measured[f"{method}_curve"].shape == (len(SEEDS), SMOKE["curve_points"])
    # The curve's last point is the final policy.
    np.testing.assert_allclose(measured[f"{method}_curve"][:, -1], measured[f"{method}_pass1"])
  # Every seed starts from the one SFT policy, and the seeds' RL runs differ (PPO's policy moves
  # even before any reward: its fresh critic's values make the advantages).
  assert measured["sft_pass1"][0] == measured["sft_pass1"][1]
  assert not np.allclose(measured["ppo_curve"][0], measured["ppo_curve"][1])
  # PPO trains a critic as large as the policy (plus its scalar head, minus the LM head).
  assert measured["critic_params"][0] > 0.8 * measured["policy_params"][0]


# vmap over seeds == a Python loop over seeds is tested on grpo_group_size
# (tests/test_experiments_grpo.py): the same runner code; here it would compile every program twice.
