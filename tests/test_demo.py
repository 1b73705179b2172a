"""`alignax demo`: the quick budget runs end to end and the aligned policy beats the SFT policy on
the task; the grading pieces match independent computations; bad arguments are named errors."""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from alignax import demo
from alignax.models import CausalLM
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


def _tiny_lm(seed):
  hf = dict(model_type="llama", vocab_size=40, hidden_size=16, intermediate_size=32,
            num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=16, rms_norm_eps=1e-5, tie_word_embeddings=False)
  return CausalLM(config_from_hf(hf), rngs=nnx.Rngs(seed))


def test_sequence_kl_is_the_exact_kl_summed_over_completion_tokens():
  policy, reference = _tiny_lm(0), _tiny_lm(1)
  ids = jax.random.randint(jax.random.key(2), (3, 8), 1, 40)
  # Row 0 left-padded by two, row 2 a one-token completion.
  mask = jnp.ones((3, 8), bool).at[0, :2].set(False)
  completion = jnp.zeros((3, 8), bool).at[:, 5:].set(True).at[2, 5:7].set(False)
  got = demo.sequence_kl(policy, reference, ids, mask, completion)

  logp = jax.nn.log_softmax(policy(ids, mask).logits, -1)
  logq = jax.nn.log_softmax(reference(ids, mask).logits, -1)
  per_state = jnp.sum(jnp.exp(logp) * (logp - logq), -1)  # [B, T]: KL of the next-token law
  # The state before token t (index t - 1) predicts completion token t.
  want = [float(sum(per_state[b, t - 1] for t in range(8) if completion[b, t])) for b in range(3)]
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(demo.sequence_kl(policy, policy, ids, mask, completion), 0.0,
                             atol=1e-5)


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
  base, sft, dpo, grpo = (summary["policies"][name] for name in ("base", "sft", "dpo", "grpo"))
  # The aligned policy answers more prompts correctly than the SFT policy it started from, and
  # the reward model (which never saw the grader) agrees.
  assert dpo["accuracy"] > sft["accuracy"] > base["accuracy"]
  assert grpo["accuracy"] > sft["accuracy"]
  assert dpo["reward"] > sft["reward"]
  assert summary["reward_model"]["fresh_pair_accuracy"] >= 0.6  # chance: 0.5
  assert abs(sft["kl"]) < 1e-4 < dpo["kl"] < base["kl"]  # KL is to the SFT policy
  assert base["length"] == 4.0 and 2.0 <= sft["length"] <= 4.0  # the base never stops

  for path in summary["plots"]:
    with open(path, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n", path
  assert {os.path.basename(p) for p in summary["plots"]} == {demo.CURVES_FILE, demo.BARS_FILE}
  for stage in ("sft", "reward", "dpo", "grpo"):
    lines = [json.loads(line) for line in open(out / stage / "metrics.jsonl")]
    assert lines[-1]["step"] == summary["steps"][stage]
    assert (out / stage / "config.json").exists()
  dpo_lines = [json.loads(line) for line in open(out / "dpo" / "metrics.jsonl")]
  graded = [line for line in dpo_lines if "eval_accuracy" in line]
  assert len(graded) == summary["steps"]["dpo"] // summary["steps"]["eval_every"]
  assert {"eval_kl", "eval_reward", "eval_length"} <= set(graded[-1])
