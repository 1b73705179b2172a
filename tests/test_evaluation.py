"""``alignax eval`` and the in-training evaluation (alignax.evaluation): a model against itself is
exactly even (win rate 0.5, KL 0, tax 0); a policy SFT-trained here to say what a reward function
likes beats its base with an interval above 0.5 and moves away from it (KL > 0); the exact KL is
the mean of k1 within Monte-Carlo error; length control removes a length-only judge's win; bad
input is named; the CLI runs end to end; an SFT run logs eval/reward, eval/win_rate, eval/kl and
eval/tax every eval_steps."""

import json
import os
import types

import numpy as np
import pytest

from alignax import cli, evaluation, train
from alignax.data import DataConfig
from alignax.evaluation import EvalConfig, evaluate
from train_factories import tiny_tokenizer_and_llama

WORDS = ["one", "two", "three", "four", "five", "six", "seven", "eight"]
YES = "evaluation_rewards.yes_reward"
# One sampler shape for every run here (8 prompts x 4 samples per call, 8 new tokens), so the
# sampler and the KL program compile once for the module.
SHAPES = dict(num_samples=4, max_completion_length=8, batch_size=8, num_bootstrap=300)


def _jsonl(path, rows):
  with open(path, "w") as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")
  return str(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """A random tiny Llama (the base) and an SFT policy trained from it to answer " yes yes", with
  the in-training evaluation on; the prompt and held-out files."""
  root = tmp_path_factory.mktemp("evaluation")
  tokenizer, base = tiny_tokenizer_and_llama(root)
  tokenizer.save_pretrained(base)
  os.makedirs(root / "data")
  _jsonl(root / "data" / "train.jsonl",
         [{"prompt": f"say {w}:", "completion": " yes yes"} for w in WORDS * 4])
  _jsonl(root / "data" / "test.jsonl",
         [{"prompt": f"tell {w}:", "completion": " yes yes"} for w in WORDS])
  heldout = _jsonl(root / "heldout.jsonl",
                   [{"text": f"The quick brown fox counts {w} and {v}."}
                    for w, v in zip(WORDS, reversed(WORDS))])
  prompts = _jsonl(root / "prompts.jsonl",
                   [{"prompt": f"{verb} {w}:"} for verb in ("say", "tell", "ask", "add")
                    for w in WORDS])
  steps = 32
  config = train.SFTConfig(
    output_dir=str(root / "sft"), per_device_train_batch_size=1, max_steps=steps,
    logging_steps=steps, save_steps=1000, eval_steps=steps // 2, disable_tqdm=True,
    learning_rate=2e-2, seed=0, eval_num_prompts=8, eval_num_samples=4,
    eval_max_completion_length=8, eval_reward_funcs=[YES], eval_tax_dataset=heldout,
    per_device_eval_batch_size=8)
  result = train.sft(config, model=train.ModelConfig(model_name_or_path=base),
                     data=DataConfig(dataset_name=str(root / "data"), max_length=32, seed=0))
  return types.SimpleNamespace(root=root, tokenizer=tokenizer, base=base,
                               policy=config.output_dir, prompts=prompts, heldout=heldout,
                               history=result.history, steps=steps)


def _config(setup, out, policy, **overrides):
  options = dict(output_dir=str(setup.root / out), model_name_or_path=policy,
                 baseline_model_name_or_path=setup.base, dataset_name=setup.prompts,
                 reward_funcs=[YES, "evaluation_rewards.length_reward"],
                 tax_dataset=setup.heldout, disable_tqdm=True, seed=0, **SHAPES)
  return EvalConfig(**{**options, **overrides})


def _rows(summary):
  with open(summary["files"]["completions"]) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def trained_vs_base(setup):
  return evaluate(_config(setup, "eval-trained", setup.policy))


def test_a_model_against_itself_is_exactly_even(setup):
  summary = evaluate(_config(setup, "eval-self", setup.base))
  results = summary["results"]
  for source in ("yes_reward", "length_reward", "total"):
    win = results["rewards"][source]["win_rate"]
    assert win["ci_low"] <= 0.5 <= win["ci_high"] and win["value"] == 0.5
    assert results["rewards"][source]["length_controlled_win_rate"]["value"] == pytest.approx(0.5)
    assert results["rewards"][source]["difference"]["value"] == 0.0
  rows = _rows(summary)
  assert len(rows) == 32 * 4
  assert all(r["policy"][k] == 0.0 for r in rows for k in ("kl", "k1", "k3"))
  assert results["kl"]["exact"] == {"value": 0.0, "ci_low": 0.0, "ci_high": 0.0, "n": 32}
  tax = results["tax"]
  assert tax["kind"] == "nll" and tax["tax"]["value"] == 0.0
  assert tax["tax"]["ci_low"] == tax["tax"]["ci_high"] == 0.0 and tax["policy"]["value"] > 0
  # eval.json: every number with its interval, the config and the versions; the plots exist.
  with open(summary["files"]["eval"]) as f:
    written = json.load(f)
  assert written["config"]["num_samples"] == 4 and "jax" in written["versions"]
  assert set(written["results"]["rewards"]["yes_reward"]["policy"]) == {"value", "ci_low",
                                                                       "ci_high", "n"}
  for name in ("reward_histograms", "win_rates", "kl_histogram"):
    assert os.path.getsize(summary["files"][name]) > 1000


def test_a_policy_trained_towards_the_reward_beats_its_base(trained_vs_base):
  results = trained_vs_base["results"]
  yes = results["rewards"]["yes_reward"]
  assert yes["policy"]["value"] > yes["baseline"]["value"]
  assert yes["win_rate"]["ci_low"] > 0.5, yes["win_rate"]
  assert yes["difference"]["ci_low"] > 0
  assert results["kl"]["exact"]["ci_low"] > 0
  assert results["kl"]["on_policy"] is True
  tax = results["tax"]["tax"]
  assert np.isfinite(tax["value"]) and tax["ci_low"] <= tax["value"] <= tax["ci_high"]


def test_exact_kl_is_the_mean_of_k1_within_monte_carlo_error(trained_vs_base):
  rows = _rows(trained_vs_base)
  exact = np.array([r["policy"]["kl"] for r in rows])
  k1 = np.array([r["policy"]["k1"] for r in rows])
  k3 = np.array([r["policy"]["k3"] for r in rows])
  assert exact.mean() > 0.1
  error = np.sqrt(k1.var(ddof=1) / k1.size + exact.var(ddof=1) / exact.size)
  assert abs(exact.mean() - k1.mean()) < 4 * error, (exact.mean(), k1.mean(), error)
  assert abs(exact.mean() - k3.mean()) < 4 * np.sqrt(k3.var(ddof=1) / k3.size
                                                     + exact.var(ddof=1) / exact.size)
  assert exact.var() < k1.var()  # the exact sum has no sampling noise within a sequence


def test_length_control_removes_the_win_a_length_only_judge_gives():
  rng = np.random.default_rng(0)
  prompts, samples = 80, 4
  weights = evaluation.bootstrap_weights(prompts, num_bootstrap=500, seed=1)
  policy_length = rng.poisson(14, (prompts, samples)).astype(float)
  baseline_length = rng.poisson(10, (prompts, samples)).astype(float)
  # A judge that reads only the length: the policy wins because it is longer.
  wins = evaluation.pairwise_wins(policy_length, baseline_length)
  raw = evaluation.mean_estimate(wins, weights=weights)
  controlled, slope = evaluation.length_controlled_win_rate(
    wins, policy_length - baseline_length, weights=weights)
  assert raw.ci_low > 0.65
  assert controlled.ci_low <= 0.5 <= controlled.ci_high and abs(controlled.value - 0.5) < 0.05
  assert slope > 5
  # A judge that prefers the policy regardless of length keeps its win under length control.
  quality = evaluation.pairwise_wins(rng.normal(1.0, 1.0, (prompts, samples)),
                                     rng.normal(0.0, 1.0, (prompts, samples)))
  kept, _ = evaluation.length_controlled_win_rate(
    quality, policy_length - baseline_length, weights=weights)
  plain = evaluation.mean_estimate(quality, weights=weights)
  assert kept.ci_low > 0.6 and abs(kept.value - plain.value) < 0.05
  # With equal lengths throughout there is nothing to control for: the plain win rate.
  same, _ = evaluation.length_controlled_win_rate(quality, np.zeros((prompts, samples)),
                                                  weights=weights)
  assert same.value == pytest.approx(plain.value, abs=1e-3)


def test_bad_input_is_named(setup, tmp_path):
  with pytest.raises(ValueError, match="no reward source"):
    evaluate(_config(setup, "bad", setup.base, reward_funcs=None))
  empty = tmp_path / "empty.jsonl"
  empty.write_text("")
  with pytest.raises(ValueError, match="dataset_name=.*empty.jsonl.* holds no prompts"):
    evaluate(_config(setup, "bad", setup.base, dataset_name=str(empty)))
  # A baseline whose tokenizer has one more token than the policy's.
  import shutil

  other = tmp_path / "other"
  shutil.copytree(setup.base, other)
  tokenizer = evaluation_tokenizer(setup.base)
  tokenizer.add_tokens(["<|extra|>"])
  tokenizer.save_pretrained(other)
  with pytest.raises(ValueError, match="the policy's and the baseline's tokenizers differ: token "
                                       "'<\\|extra\\|>'"):
    evaluate(_config(setup, "bad", setup.base, baseline_model_name_or_path=str(other)))
  with pytest.raises(ValueError, match="tax_reward_funcs grade answers"):
    EvalConfig(output_dir="o", tax_reward_funcs=[YES])


def evaluation_tokenizer(path):
  from alignax.models import load_tokenizer

  return load_tokenizer(path)


def test_the_cli_runs_end_to_end_with_a_yaml_config(setup, tmp_path, capsys):
  from alignax.models import from_pretrained, save_pretrained

  # Two reward models (random score heads on the base) and their ensemble as sources.
  reward_models = []
  for seed in (1, 2):
    path = str(tmp_path / f"rm_{seed}")
    save_pretrained(from_pretrained(setup.base, head="score", num_labels=1, seed=seed), path)
    setup.tokenizer.save_pretrained(path)
    reward_models.append(path)
  out = tmp_path / "cli"
  config = tmp_path / "eval.yaml"
  config.write_text(f"model_name_or_path: {setup.policy}\nbaseline_model_name_or_path: "
                    f"{setup.base}\nnum_samples: 4\nmax_completion_length: 8\nbatch_size: 8\n")
  code = cli.main(["eval", "--config", str(config), "--dataset_name", setup.prompts,
                   "--reward_funcs", YES, "--reward_model_name_or_path", *reward_models,
                   "--reward_ensemble", "min", "--tax_dataset", setup.prompts, "--tax_reward_funcs",
                   YES, "--num_prompts", "16", "--num_bootstrap", "100", "--output_dir",
                   str(out), "--plots", "false", "--disable_tqdm", "true", "--seed", "0"])
  printed = capsys.readouterr()
  assert code == 0, printed.err
  assert "win rate" in printed.out and "alignment tax (accuracy)" in printed.out
  with open(out / "eval.json") as f:
    summary = json.load(f)
  assert summary["results"]["num_prompts"] == 16
  assert list(summary["results"]["rewards"]) == ["yes_reward", "rm_1", "rm_2", "ensemble_min",
                                                 "total"]
  rows = _rows(summary)
  for row in rows:  # the ensemble is the worse of its two members
    rewards = row["policy"]["rewards"]
    assert rewards["ensemble_min"] == pytest.approx(min(rewards["rm_1"], rewards["rm_2"]))
  tax = summary["results"]["tax"]
  assert tax["kind"] == "accuracy" and tax["policy"]["value"] > tax["baseline"]["value"]
  assert tax["tax"]["value"] < 0  # the policy says "yes" more: it gained, a negative tax
  assert cli.main(["eval", "--model_name_or_path", setup.base, "--output_dir", str(out)]) == 2
  assert "--baseline_model_name_or_path is required" in capsys.readouterr().err
  assert cli.main(["eval", "--config", str(config), "--dataset_name", setup.prompts,
                   "--output_dir", str(out), "--num_sampels", "2", "--reward_funcs", YES]) == 2
  assert "did you mean --num_samples" in capsys.readouterr().err


def test_sft_logs_the_generation_evaluation_every_eval_steps(setup):
  evals = [h for h in setup.history if "eval/win_rate" in h]
  assert [h["step"] for h in evals] == [setup.steps // 2, setup.steps]
  for h in evals:
    for key in ("eval/reward", "eval/win_rate", "eval/kl", "eval/tax"):
      assert np.isfinite(h[key]), (key, h)
  assert evals[-1]["eval/kl"] > 0 and evals[-1]["eval/reward"] > evals[-1]["eval/reward_baseline"]
  with open(os.path.join(setup.policy, "metrics.jsonl")) as f:
    logged = [json.loads(line) for line in f]
  assert [line["step"] for line in logged if "eval/kl" in line] == [setup.steps // 2, setup.steps]
