"""`alignax demo`: the quick budget runs end to end, DPO and GRPO beat the SFT policy on the task
and PPO raises the reward model's score; the grading (the library's evaluation) matches an
independent greedy decode, exact KL and reward-model score; bad arguments are named errors."""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from alignax import demo
from alignax.models import CausalLM, RewardModel
from alignax.models.config import config_from_hf


def test_demonstrations_forget_the_carry_at_the_given_rate():
  prompts, answers = demo.addition_task()
  assert len(prompts) == 100 and prompts[37] == "3+7=" and answers[37] == 10
  rows = demo.demonstrations(prompts, answers, per_prompt=5, carry_error_rate=0.6)
  assert len(rows) == 500
  for i, (prompt, answer) in enumerate(zip(prompts, answers)):
    shown = [demo.parse_answer(r["completion"]) for r in rows[5 * i:5 * i + 5]]
    assert all(r["prompt"] == prompt for r in rows[5 * i:5 * i + 5])
    if answer >= 10:
      assert sorted(shown) == sorted([answer - 10] * 3 + [answer] * 2), prompt
    else:
      assert shown == [answer] * 5, prompt


def test_answers_parse_only_as_one_number_and_wrong_answers_are_wrong():
  assert demo.parse_answer(" 12") == 12 and demo.parse_answer("7") == 7
  for text in ("", " ", " 1 2", " 12x", "-3", " seven"):
    assert demo.parse_answer(text) is None, text
  for a in range(10):
    for b in range(10):
      wrong = demo.plausible_wrong_answers(a, b)
      assert wrong and a + b not in wrong and len(set(wrong)) == len(wrong)
      assert all(n >= 0 for n in wrong)


def _tiny(tokenizer, seed, cls=CausalLM, **extra):
  hf = dict(model_type="llama", vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
            num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=32, rms_norm_eps=1e-5, tie_word_embeddings=False,
            pad_token_id=tokenizer.pad_token_id, **extra)
  return cls(config_from_hf(hf), rngs=nnx.Rngs(seed))


def test_grading_is_a_greedy_decode_its_exact_kl_and_the_reward_models_score(tok):
  """evaluate_policy (the library's sampler and exact KL, the reward model's scorer) against a
  token-by-token greedy decode without cache or padding, the KL of the full next-token laws
  along it and the reward model's score of each unpadded sequence."""
  policy, reference = _tiny(tok, 0), _tiny(tok, 1)
  reward_model = _tiny(tok, 2, RewardModel, num_labels=1)
  # Prompts of different lengths: the batch is left-padded.
  prompts, answers = ["3+4=", "12+30=", "9+9="], [7, 42, 18]
  got = demo.evaluate_policy(
    policy, reference=reference, tokenizer=tok, prompts=demo.prompt_set(tok, prompts, answers),
    reward_model=demo.reward_scorer(reward_model, tok, batch_size=2))

  eos = tok.eos_token_id
  lengths, kls, scores, correct = [], [], [], []
  for prompt, answer in zip(prompts, answers):
    ids = tok(prompt)["input_ids"]
    sequence = list(ids)
    while len(sequence) < len(ids) + 4 and sequence[-1:] != [eos]:
      sequence.append(int(jnp.argmax(policy(jnp.asarray([sequence])).logits[0, -1])))
    completion = sequence[len(ids):]
    logp = jax.nn.log_softmax(policy(jnp.asarray([sequence])).logits[0], -1)
    logq = jax.nn.log_softmax(reference(jnp.asarray([sequence])).logits[0], -1)
    per_state = jnp.sum(jnp.exp(logp) * (logp - logq), -1)
    # The state before completion token t (position t - 1) predicts it.
    kls.append(float(per_state[len(ids) - 1:len(sequence) - 1].sum()))
    scores.append(float(reward_model(jnp.asarray([sequence])).scores[0, 0]))
    lengths.append(len(completion))
    correct.append(demo.parse_answer(tok.decode(completion, skip_special_tokens=True)) == answer)
  assert got["length"] == np.mean(lengths) and got["accuracy"] == np.mean(correct)
  np.testing.assert_allclose(got["kl"], np.mean(kls), rtol=1e-4)
  np.testing.assert_allclose(got["reward"], np.mean(scores), rtol=1e-5, atol=1e-6)
  assert got["kl"] > 0.01  # two random models differ
  same = demo.evaluate_policy(policy, reference=policy, tokenizer=tok,
                              prompts=demo.prompt_set(tok, prompts, answers),
                              reward_model=demo.reward_scorer(reward_model, tok, batch_size=2))
  assert same["kl"] == 0.0 and same["reward"] == got["reward"]


def test_format_table_has_one_row_per_policy():
  policies = {"base": {"accuracy": 0.0, "reward": -1.0, "kl": 20.0, "length": 4.0},
              "dpo": {"accuracy": 0.875, "reward": 1.25, "kl": 1.5, "length": 2.0}}
  lines = demo.format_table(policies).splitlines()
  assert lines[0].split()[:3] == ["policy", "task", "accuracy"]
  assert lines[2].split() == ["base", "0.0%", "-1.000", "20.000", "4.00"]
  assert lines[3].split() == ["dpo", "87.5%", "+1.250", "1.500", "2.00"]


@pytest.mark.parametrize("options, message", [
  (dict(sft_steps=0), "sft_steps"),
  (dict(beta=-0.1), "beta"),
  (dict(rpo_alpha=-1.0), "rpo_alpha"),
  (dict(ppo_kl_coef=-0.1), "ppo_kl_coef"),
  (dict(ppo_steps=30), r"ppo_steps=30 must be a multiple of ppo_epochs=4"),
  (dict(quick=True, ppo_epochs=7), r"ppo_steps=60 must be a multiple of ppo_epochs=7"),
  (dict(carry_error_rate=1.5), "carry_error_rate"),
  (dict(hidden_size=60), "hidden_size"),
  (dict(devices=0), "devices"),
  (dict(output_dir=""), "output_dir"),
])
def test_bad_config_values_are_named(options, message):
  with pytest.raises(ValueError, match=message):
    demo.DemoConfig(**options)


def test_a_batch_the_devices_cannot_split_fails_before_anything_is_written(tmp_path):
  with pytest.raises(ValueError, match=r"batch_size=12 must be a multiple of the 8"):
    demo.run_demo(demo.DemoConfig(output_dir=str(tmp_path / "out"), devices=8, batch_size=12))
  with pytest.raises(ValueError, match=r"devices=9, but only 8 devices"):
    demo.run_demo(demo.DemoConfig(output_dir=str(tmp_path / "out"), devices=9))
  with pytest.raises(ValueError, match=r"16 rows per device, which hold no whole GRPO groups of "
                                       r"samples_per_prompt=6"):
    demo.run_demo(demo.DemoConfig(output_dir=str(tmp_path / "out"), devices=2,
                                  samples_per_prompt=6))
  assert not (tmp_path / "out").exists()


def test_missing_matplotlib_is_named_before_training(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
  with pytest.raises(ValueError, match=r"plots=True needs matplotlib"):
    demo.run_demo(demo.DemoConfig(output_dir=str(tmp_path / "out")))
  assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, message", [
  (["--sft_steps", "0"], "sft_steps"),
  (["--carry_error_rate", "2"], "carry_error_rate"),
  (["--bogus", "1"], "--bogus"),
  (["--beta", "high"], "beta"),
  (["--devices", "2", "--batch_size", "9"], "batch_size=9"),
])
def test_bad_flags_exit_2_naming_the_flag(argv, message, capsys):
  assert demo.main(argv) == 2
  assert message in capsys.readouterr().err


@pytest.mark.slow
def test_quick_demo_aligns_the_policy_and_writes_its_report(tmp_path, capsys):
  out = tmp_path / "demo"
  assert demo.main(["--quick", "--output_dir", str(out), "--progress", "false"]) == 0
  printed = capsys.readouterr().out
  assert "task accuracy" in printed and str(out / demo.SUMMARY_FILE) in printed

  summary = json.loads((out / demo.SUMMARY_FILE).read_text())
  base, sft, dpo, grpo, ppo = (summary["policies"][name]
                               for name in ("base", "sft", "dpo", "grpo", "ppo"))
  # The aligned policy answers more prompts correctly than the SFT policy it started from, and
  # the reward model (which never saw the grader) agrees.
  assert dpo["accuracy"] > sft["accuracy"] > base["accuracy"]
  assert grpo["accuracy"] > sft["accuracy"]
  assert dpo["reward"] > sft["reward"]
  # PPO raises the score of the reward model it trains against, away from the SFT policy.
  assert ppo["reward"] > sft["reward"] + 0.1 and ppo["kl"] > 1e-3
  assert summary["reward_model"]["fresh_pair_accuracy"] >= 0.6  # chance: 0.5
  assert abs(sft["kl"]) < 1e-4 < dpo["kl"] < base["kl"]  # KL is to the SFT policy
  assert base["length"] == 4.0 and 2.0 <= sft["length"] <= 4.0  # the base never stops

  for path in summary["plots"]:
    with open(path, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n", path
  assert {os.path.basename(p) for p in summary["plots"]} == {demo.CURVES_FILE, demo.BARS_FILE}
  for stage in ("sft", "reward", "dpo", "grpo", "ppo"):
    lines = [json.loads(line) for line in open(out / stage / "metrics.jsonl")]
    assert lines[-1]["step"] == summary["steps"][stage]
    assert (out / stage / "config.json").exists()
  dpo_lines = [json.loads(line) for line in open(out / "dpo" / "metrics.jsonl")]
  graded = [line for line in dpo_lines if "eval_accuracy" in line]
  assert len(graded) == summary["steps"]["dpo"] // summary["steps"]["eval_every"]
  assert {"eval_kl", "eval_reward", "eval_length"} <= set(graded[-1])
  ppo_lines = [json.loads(line) for line in open(out / "ppo" / "metrics.jsonl")]
  # One line per rollout (ppo_epochs optimizer steps each) with its sampled answers' RM score.
  rollouts = [line for line in ppo_lines if "objective/scores" in line]
  assert len(rollouts) == summary["steps"]["ppo"] // summary["config"]["ppo_epochs"]
