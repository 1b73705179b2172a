"""``alignax eval`` and the in-training evaluation (alignax.evaluation): a model against itself is
exactly even (win rate 0.5, KL 0, tax 0); a policy SFT-trained here to say what a reward function
likes, and to stop, beats its base with an interval above 0.5, moves away from it (KL > 0) and stops
on the EOS id resolved once for both models; the exact KL is the mean of k1 within Monte-Carlo
error and 0 on a bitwise copy; length control removes a length-only judge's win and is reported as
not identified when the lengths do not overlap; ``total`` and the accuracy tax drop unscored (None)
completions instead of mixing source sets; an ensemble's members leave ``total``; bad input
(tokenizers, weights, a prompt too long for the model) is named before any sampling; the CLI runs
end to end; an SFT run logs eval/reward, eval/win_rate, eval/kl and eval/tax every eval_steps."""

import dataclasses
import json
import os
import shutil
import types
import warnings

import numpy as np
import pytest

from alignax import cli, evaluation, train
from alignax.data import DataConfig
from alignax.evaluation import EvalConfig, EvaluationWarning, evaluate
from alignax.rewards import RewardRunner
from train_factories import tiny_tokenizer_and_llama

WORDS = ["one", "two", "three", "four", "five", "six", "seven", "eight"]
YES = "evaluation_rewards.yes_reward"
# One sampler shape for every run here (8 prompts x 4 samples per call, 12 new tokens), so the
# sampler and the KL program compile once for the module.
SHAPES = dict(num_samples=4, max_completion_length=12, batch_size=8, num_bootstrap=200)


def _jsonl(path, rows):
  with open(path, "w") as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")
  return str(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """A random tiny Llama (the base; its checkpoint names no EOS id) and an SFT policy trained from
  it to answer " yes yes" and stop (SFT appends the tokenizer's EOS), with the in-training
  evaluation on; the prompt and held-out files."""
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
                   [{"prompt": f"{verb} {w}:"} for verb in ("say", "tell") for w in WORDS])
  steps = 32
  config = train.SFTConfig(
    output_dir=str(root / "sft"), per_device_train_batch_size=1, max_steps=steps,
    logging_steps=steps, save_steps=1000, eval_steps=steps // 2, disable_tqdm=True,
    learning_rate=2e-2, seed=0, eval_num_prompts=8, eval_num_samples=4,
    eval_max_completion_length=12, eval_reward_funcs=[YES], eval_tax_dataset=heldout,
    per_device_eval_batch_size=8)
  data = DataConfig(dataset_name=str(root / "data"), max_length=32, seed=0)
  result = train.sft(config, model=train.ModelConfig(model_name_or_path=base), data=data)
  return types.SimpleNamespace(root=root, tokenizer=tokenizer, base=base, config=config,
                               data=data, policy=config.output_dir, prompts=prompts,
                               heldout=heldout, history=result.history, steps=steps)


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
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    summary = evaluate(_config(setup, "eval-trained", setup.policy, plots=False))
  return summary, [w for w in caught if issubclass(w.category, EvaluationWarning)]


def test_a_model_against_itself_is_exactly_even(setup):
  summary = evaluate(_config(setup, "eval-self", setup.base))
  results = summary["results"]
  for source in ("yes_reward", "length_reward", "total"):
    reward = results["rewards"][source]
    win = reward["win_rate"]
    assert win["ci_low"] <= 0.5 <= win["ci_high"] and win["value"] == 0.5
    # Equal lengths in every pair: identified, and the plain win rate.
    assert reward["length_controlled_identified"] is True
    assert reward["length_controlled_win_rate"]["value"] == pytest.approx(0.5)
    assert reward["length_difference_shares"] == {"policy_shorter": 0.0, "equal": 1.0,
                                                  "policy_longer": 0.0}
    assert reward["difference"]["value"] == 0.0 and reward["ties"] == 1.0
    assert reward["unscored"] == {"policy": 0, "baseline": 0}
  rows = _rows(summary)
  assert len(rows) == 16 * 4
  assert all(r["policy"][k] == 0.0 for r in rows for k in ("kl", "k1", "k3"))
  assert results["kl"]["exact"] == {"value": 0.0, "ci_low": 0.0, "ci_high": 0.0, "n": 16}
  tax = results["tax"]
  assert tax["kind"] == "nll" and tax["tax"]["value"] == 0.0
  assert tax["tax"]["ci_low"] == tax["tax"]["ci_high"] == 0.0 and tax["policy"]["value"] > 0
  # eval.json: every number with its interval, the config, the versions, the stop ids used (the
  # checkpoint names none: the tokenizer's EOS), the weights and the mesh; the plots exist.
  with open(summary["files"]["eval"]) as f:
    written = json.load(f)
  assert written["config"]["num_samples"] == 4 and "jax" in written["versions"]
  assert set(written["results"]["rewards"]["yes_reward"]["policy"]) == {"value", "ci_low",
                                                                       "ci_high", "n"}
  assert written["stop_token_ids"] == [setup.tokenizer.eos_token_id]
  assert written["stop_token_ids_from"] == "tokenizer"
  assert written["results"]["stop_token_ids"] == [setup.tokenizer.eos_token_id]
  assert written["reward_weights"] == {"yes_reward": 1.0, "length_reward": 1.0}
  assert written["mesh"]["axes"]["fsdp"] == 8
  for name in ("reward_histograms", "win_rates", "kl_histogram"):
    assert os.path.getsize(summary["files"][name]) > 1000


def test_a_policy_trained_towards_the_reward_beats_its_base_and_stops(setup, trained_vs_base):
  summary, caught = trained_vs_base
  results = summary["results"]
  yes = results["rewards"]["yes_reward"]
  assert yes["policy"]["value"] > yes["baseline"]["value"]
  assert yes["win_rate"]["ci_low"] > 0.5, yes["win_rate"]
  assert yes["difference"]["ci_low"] > 0
  assert results["kl"]["exact"]["ci_low"] > 0
  assert results["kl"]["on_policy"] is True
  tax = results["tax"]["tax"]
  assert np.isfinite(tax["value"]) and tax["ci_low"] <= tax["value"] <= tax["ci_high"]
  # Both models stop on the tokenizer's EOS (the checkpoints name none): the policy learnt to
  # end " yes yes" with it, the random base almost never samples it.
  eos = setup.tokenizer.eos_token_id
  rows = _rows(summary)
  stopped = [r for r in rows if r["policy"]["stopped"]]
  assert len(stopped) > 0.8 * len(rows) and results["length"]["policy_truncated"] < 0.2
  assert results["length"]["policy"]["ci_high"] < SHAPES["max_completion_length"]
  assert summary["stop_token_ids"] == [eos]
  # The policy is shorter in most pairs (it stops, the base runs on): the length-controlled win
  # rate is reported exactly when enough pairs of equal length (both truncated) pin it at zero,
  # else it is None with a warning.
  shares = yes["length_difference_shares"]
  assert shares["policy_shorter"] > 0.8 and sum(shares.values()) == pytest.approx(1.0)
  identified = (min(shares["policy_shorter"], shares["policy_longer"]) + shares["equal"]
                >= evaluation.LC_MIN_SIDE_SHARE)
  assert yes["length_controlled_identified"] is identified
  assert (yes["length_controlled_win_rate"]["value"] is None) is (not identified)
  assert any("not identified" in str(w.message) for w in caught) is (not identified)
  assert not any("unscored" in str(w.message) for w in caught)


def test_exact_kl_is_the_mean_of_k1_within_monte_carlo_error(trained_vs_base):
  rows = _rows(trained_vs_base[0])
  exact = np.array([r["policy"]["kl"] for r in rows])
  k1 = np.array([r["policy"]["k1"] for r in rows])
  k3 = np.array([r["policy"]["k3"] for r in rows])
  assert exact.mean() > 0.1
  # Paired over the same samples: k1 - exact is the within-sequence sampling noise, mean 0.
  for estimate in (k1, k3):
    noise = estimate - exact
    assert noise.std() > 0 and abs(noise.mean()) < 4 * noise.std(ddof=1) / np.sqrt(noise.size), (
      exact.mean(), estimate.mean())


def test_the_kl_program_gives_zero_on_a_bitwise_copy(setup, monkeypatch):
  """The KL program itself (not the same_weights shortcut) on a policy and its bitwise copy."""
  import jax

  from alignax.models import from_pretrained
  from alignax.train.trainers import resolve_mesh

  model = from_pretrained(setup.policy, mesh=resolve_mesh(None))
  copy = evaluation.frozen_copy(model)
  monkeypatch.setattr(evaluation, "same_weights", lambda first, second: False)
  prompts = evaluation.load_prompts(setup.prompts, setup.tokenizer, limit=8)
  options = evaluation.SamplingOptions(max_new_tokens=12,
                                       stop_token_ids=(setup.tokenizer.eos_token_id,))
  samples = evaluation.sample_completions(model, prompts, tokenizer=setup.tokenizer,
                                          num_samples=4, options=options, key=jax.random.key(0),
                                          batch_size=8, reference=copy)
  assert samples.kl.shape == (32, 3) and samples.lengths.min() >= 1
  np.testing.assert_allclose(samples.kl, 0.0, atol=1e-5)


def test_length_control_removes_a_length_only_win_and_is_not_reported_unidentified():
  rng = np.random.default_rng(0)
  prompts, samples = 80, 4
  weights = evaluation.bootstrap_weights(prompts, num_bootstrap=300, seed=1)
  policy_length = rng.poisson(14, (prompts, samples)).astype(float)
  baseline_length = rng.poisson(10, (prompts, samples)).astype(float)
  difference = policy_length - baseline_length
  # A judge that reads only the length (equal lengths tie): the policy wins because it is longer.
  wins = evaluation.pairwise_wins(policy_length, baseline_length)
  raw = evaluation.mean_estimate(wins, weights=weights)
  controlled = evaluation.length_controlled_win_rate(wins, difference, weights=weights)
  assert raw.ci_low > 0.65 and controlled.identified
  assert controlled.shares["policy_shorter"] + controlled.shares["equal"] > 0.1
  assert sum(controlled.shares.values()) == pytest.approx(1.0)
  lc = controlled.estimate
  assert lc.ci_low <= 0.5 <= lc.ci_high and abs(lc.value - 0.5) < 0.05
  assert controlled.coefficient > 5
  # A length-blind judge that prefers the policy keeps its win under length control.
  quality = evaluation.pairwise_wins(rng.normal(1.0, 1.0, (prompts, samples)),
                                     rng.normal(0.0, 1.0, (prompts, samples)))
  kept = evaluation.length_controlled_win_rate(quality, difference, weights=weights).estimate
  plain = evaluation.mean_estimate(quality, weights=weights)
  assert kept.ci_low > 0.6 and abs(kept.value - plain.value) < 0.05
  # With equal lengths throughout there is nothing to control for: the plain win rate.
  same = evaluation.length_controlled_win_rate(quality, np.zeros((prompts, samples)),
                                               weights=weights)
  assert same.identified and same.estimate.value == pytest.approx(plain.value, abs=1e-3)
  # The policy longer in every pair: a length-only judge (wins everywhere) and a length-blind
  # judge (wins 70% at every length) cannot be told apart from the data, so neither is reported.
  longer = baseline_length + 1 + rng.poisson(2, (prompts, samples))
  blind = (rng.random((prompts, samples)) < 0.7).astype(float)
  for judge in (evaluation.pairwise_wins(longer, baseline_length), blind):
    out = evaluation.length_controlled_win_rate(judge, longer - baseline_length,
                                                weights=weights)
    assert not out.identified and np.isnan(out.estimate.value) and np.isnan(out.coefficient)
    assert out.shares == {"policy_shorter": 0.0, "equal": 0.0, "policy_longer": 1.0}
    assert out.estimate.n == prompts
  # A few pairs on the other side (2%) are not enough to pin the curve at zero.
  mostly = longer.copy()
  mostly[:, 0][rng.random(prompts) < 0.08] = 0.0
  out = evaluation.length_controlled_win_rate(blind, mostly - baseline_length, weights=weights)
  assert 0 < out.shares["policy_shorter"] < 0.1 and not out.identified


class _Graders:
  """Reward functions for the synthetic evaluations below: completions starting with "P" are the
  policy's, with "B" the baseline's."""

  @staticmethod
  def quality(completions, **kwargs):
    return [1.2 if c.startswith("P") else 1.0 for c in completions]

  @staticmethod
  def verifier(completions, **kwargs):
    # Cannot read the policy's odd-numbered answers: None, which TRL means as "not scored".
    return [None if c.startswith("P") and int(c.split()[-1]) % 2 else 0.5 for c in completions]


def _synthetic_eval(runner, prompts=4, samples=2, **kwargs):
  prompt_set = evaluation.PromptSet(ids=[np.array([1, 2])] * prompts,
                                    prompts=[f"q{i}" for i in range(prompts)], columns={})
  return evaluation.GenerationEval(prompts=prompt_set, tokenizer=None, runner=runner,
                                   baseline=None, num_samples=samples, num_bootstrap=50,
                                   options=evaluation.SamplingOptions(max_new_tokens=2), **kwargs)


def _samples(prefix, n):
  return evaluation.Samples(completion_ids=[[5, 6]] * n, texts=[f"{prefix} {i}" for i in range(n)],
                            lengths=np.full(n, 2), stopped=np.ones(n, bool),
                            kl=np.zeros((n, 3)))


def test_total_and_the_accuracy_tax_drop_unscored_completions(monkeypatch):
  runner = RewardRunner([_Graders.quality, _Graders.verifier], weights=[1.0, 2.0])
  e = _synthetic_eval(runner)
  mine, base = _samples("P", 8), _samples("B", 8)
  with pytest.warns(EvaluationWarning, match=r"'verifier' \(policy 4, baseline 0\)"):
    results = e._statistics(evaluation._Side(mine, e._score(mine)),
                            evaluation._Side(base, e._score(base)))
  rewards = results["rewards"]
  assert rewards["verifier"]["unscored"] == {"policy": 4, "baseline": 0}
  assert rewards["quality"]["unscored"] == {"policy": 0, "baseline": 0}
  # total = 1.2 + 2 * 0.5 = 2.2 on the policy's scored answers (not 1.2 with the None as 0):
  # the same sources on both sides, so the policy wins each of the 4 scored pairs.
  total = rewards["total"]
  assert total["unscored"] == {"policy": 4, "baseline": 0}
  assert total["policy"]["value"] == pytest.approx(2.2) and total["win_rate"]["value"] == 1.0
  assert total["difference"]["value"] == pytest.approx(0.2)
  # Ties over the scored pairs only: every scored verifier pair is a tie (0.5 vs 0.5).
  assert rewards["verifier"]["ties"] == 1.0 and rewards["verifier"]["win_rate"]["value"] == 0.5

  # An accuracy tax whose grader cannot read some answers: dropped on both sides and counted,
  # not graded 0.
  from flax import nnx

  policy, baseline = nnx.Module(), nnx.Module()
  answers = {id(policy): _samples("P", 4), id(baseline): _samples("B", 4)}
  monkeypatch.setattr(evaluation, "sample_completions",
                      lambda model, prompts, **kwargs: answers[id(model)])
  tax_prompts = evaluation.PromptSet(ids=[np.array([1, 2])] * 4, prompts=["a", "b", "c", "d"],
                                     columns={})
  e = _synthetic_eval(runner, tax=evaluation.TaxSet(prompts=tax_prompts,
                                                    reward_funcs=[_Graders.verifier]))
  ours, theirs = e._tax_values(policy, None), e._tax_values(baseline, None)
  np.testing.assert_array_equal(np.isnan(ours), [False, True, False, True])
  with pytest.warns(EvaluationWarning, match="2 of the policy's and 0 of the baseline's 4"):
    tax = e._tax_statistics(ours, theirs)
  assert tax["unscored"] == {"policy": 2, "baseline": 0}
  assert tax["policy"]["value"] == tax["baseline"]["value"] == 0.5 and tax["tax"]["value"] == 0
  assert tax["policy"]["n"] == 2
  e.close()


def test_an_ensembles_members_leave_total_unless_weighted():
  config = EvalConfig(output_dir="o", reward_model_name_or_path=["a", "b"], reward_ensemble="min")
  assert evaluation.reward_weights_for(config, 1) == [1.0, 0.0, 0.0, 1.0]
  config.reward_weights = [1.0, 0.5, 0.5, 0.0]
  assert evaluation.reward_weights_for(config, 1) == [1.0, 0.5, 0.5, 0.0]
  config.reward_weights = [1.0, 1.0]
  with pytest.raises(ValueError, match=r"reward_weights has 2 entries for 4 reward sources \(1 "
                                       r"reward functions, 2 reward models, the min ensemble"):
    evaluation.reward_weights_for(config, 1)


def test_a_trainers_runner_is_used_with_its_weights_and_left_open():
  """An online trainer hands its own RewardRunner: total is its training reward (its weights),
  and closing the evaluation leaves the runner to the trainer that created it."""
  runner = RewardRunner([_Graders.quality, _Graders.verifier], weights=[1.0, 0.0],
                        names=["q", "v"])
  prompt_set = evaluation.PromptSet(ids=[np.array([1, 2])] * 2, prompts=["a", "b"], columns={})
  e = evaluation.make_generation_eval(prompts=prompt_set, tokenizer=None, reward_funcs=runner,
                                      baseline=None, num_samples=2, stop_token_ids=[2])
  assert e.runner is runner and e.names == ["q", "v", "total"]
  scores = e._score(_samples("B", 4))
  np.testing.assert_allclose(scores[:, 2], scores[:, 0])  # v weighs 0 in training: not in total
  closed = []
  runner.close = lambda: closed.append(True)
  e.close()
  assert not closed


def test_stop_ids_resolve_once_from_the_policy_checkpoint(setup, tmp_path):
  eos = setup.tokenizer.eos_token_id
  assert evaluation.resolve_stop_token_ids(None, model_name_or_path=setup.base,
                                           tokenizer=setup.tokenizer) == ((eos,), "tokenizer")
  chat = tmp_path / "chat"
  shutil.copytree(setup.base, chat)
  with open(chat / "generation_config.json", "w") as f:
    json.dump({"eos_token_id": [7, eos]}, f)
  assert evaluation.resolve_stop_token_ids(None, model_name_or_path=str(chat),
                                           tokenizer=setup.tokenizer) == ((7, eos), "checkpoint")
  assert evaluation.resolve_stop_token_ids([3], model_name_or_path=str(chat)) == ((3,), "given")
  assert evaluation.resolve_stop_token_ids(None) == ((), "none")


def test_bad_input_is_named_before_sampling(setup, tmp_path):
  with pytest.raises(ValueError, match="no reward source"):
    evaluate(_config(setup, "bad", setup.base, reward_funcs=None))
  with pytest.raises(ValueError, match="reward_weights has 3 entries for 2 reward sources"):
    evaluate(_config(setup, "bad", setup.base, reward_weights=[1.0, 1.0, 1.0]))
  empty = tmp_path / "empty.jsonl"
  empty.write_text("")
  with pytest.raises(ValueError, match="dataset_name=.*empty.jsonl.* holds no prompts"):
    evaluate(_config(setup, "bad", setup.base, dataset_name=str(empty)))
  # A baseline whose tokenizer has one more token than the policy's: found with the policy's own
  # tokenizer and with one named by tokenizer_name_or_path.
  other = tmp_path / "other"
  shutil.copytree(setup.base, other)
  tokenizer = evaluation_tokenizer(setup.base)
  tokenizer.add_tokens(["<|extra|>"])
  tokenizer.save_pretrained(other)
  for tokenizer_path in (None, setup.base):
    with pytest.raises(ValueError, match="the policy's and the baseline's tokenizers differ: "
                                         "token '<\\|extra\\|>'"):
      evaluate(_config(setup, "bad", setup.base, baseline_model_name_or_path=str(other),
                       tokenizer_name_or_path=tokenizer_path))
  # A prompt too long for the models (max_position_embeddings=64) at row 3, named before any
  # sampling, with the max_prompt_length that would fit.
  long_prompts = _jsonl(tmp_path / "long.jsonl", [{"prompt": f"say {w}:"} for w in WORDS[:3]]
                        + [{"prompt": " ".join(["one two"] * 40)}])
  with pytest.raises(ValueError, match=r"dataset_name row 3 has a prompt of \d+ tokens; with "
                                       r"max_completion_length=12 .* max_position_embeddings=64: "
                                       r"set max_prompt_length=52"):
    evaluate(_config(setup, "bad", setup.base, dataset_name=long_prompts))
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
                    f"{setup.base}\nnum_samples: 4\nmax_completion_length: 12\nbatch_size: 8\n")
  code = cli.main(["eval", "--config", str(config), "--dataset_name", setup.prompts,
                   "--reward_funcs", YES, "--reward_model_name_or_path", *reward_models,
                   "--reward_ensemble", "min", "--tax_dataset", setup.prompts, "--tax_reward_funcs",
                   YES, "--num_prompts", "8", "--num_bootstrap", "100", "--output_dir",
                   str(out), "--plots", "false", "--disable_tqdm", "true", "--seed", "0"])
  printed = capsys.readouterr()
  assert code == 0, printed.err
  assert "win rate" in printed.out and "alignment tax (accuracy)" in printed.out
  with open(out / "eval.json") as f:
    summary = json.load(f)
  assert summary["results"]["num_prompts"] == 8
  assert list(summary["results"]["rewards"]) == ["yes_reward", "rm_1", "rm_2", "ensemble_min",
                                                 "total"]
  # The ensemble stands for its members in total: they weigh 0, so no score counts twice.
  assert summary["reward_weights"] == {"yes_reward": 1.0, "rm_1": 0.0, "rm_2": 0.0,
                                       "ensemble_min": 1.0}
  for row in _rows(summary):
    for side in ("policy", "baseline"):
      rewards = row[side]["rewards"]
      assert rewards["ensemble_min"] == pytest.approx(min(rewards["rm_1"], rewards["rm_2"]))
      assert rewards["total"] == pytest.approx(rewards["yes_reward"] + rewards["ensemble_min"],
                                               abs=1e-5)
  tax = summary["results"]["tax"]
  assert tax["kind"] == "accuracy" and tax["policy"]["value"] > tax["baseline"]["value"]
  assert tax["tax"]["value"] < 0  # the policy says "yes" more: it gained, a negative tax
  assert tax["unscored"] == {"policy": 0, "baseline": 0}
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
    assert h["eval/kl_on_policy"] == 1.0
  last = evals[-1]
  assert last["eval/kl"] > 0 and last["eval/reward"] > last["eval/reward_baseline"]
  # The trained policy stops on the tokenizer's EOS in the in-training evaluation too.
  assert last["eval/completion_length"] < 12
  with open(os.path.join(setup.policy, "metrics.jsonl")) as f:
    logged = [json.loads(line) for line in f]
  assert [line["step"] for line in logged if "eval/kl" in line] == [setup.steps // 2, setup.steps]


def test_a_trainer_checks_its_evaluation_prompts_at_start_up(setup, tmp_path):
  """A test prompt too long for the model fails when the trainer starts, naming its row, not at
  the first evaluation after training steps."""
  data_dir = tmp_path / "data"
  os.makedirs(data_dir)
  shutil.copy(setup.root / "data" / "train.jsonl", data_dir / "train.jsonl")
  _jsonl(data_dir / "test.jsonl", [{"prompt": "tell one:", "completion": " yes"},
                                   {"prompt": " ".join(["one two"] * 40), "completion": " yes"}])
  config = dataclasses.replace(setup.config, output_dir=str(tmp_path / "sft"), max_steps=4,
                               eval_steps=2)
  with pytest.raises(ValueError, match=r"dataset_name \(split 'test'\) row 1 has a prompt of "
                                       r"\d+ tokens; with eval_max_completion_length=12"):
    train.sft(config, model=train.ModelConfig(model_name_or_path=setup.base),
              data=DataConfig(dataset_name=str(data_dir), max_length=None, seed=0))
  assert not os.path.exists(os.path.join(config.output_dir, "metrics.jsonl"))
