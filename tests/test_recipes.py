"""The real-scale recipes in `recipes/`: each YAML parses through the real CLI parser as written
(hub id, mesh, hyper-parameters), and runs end to end through `alignax.cli.main` on a tiny random
checkpoint of the recipe's architecture family and a tiny JSONL in the recipe's data format, with
only the sizes overridden by flags."""

import json
import shutil
import math
import os
import re

import pytest
import yaml
from flax import nnx

import alignax as ax
from alignax import cli
from alignax.models.config import config_from_hf

RECIPES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes")

# Each recipe's command, the hub-id pattern of its checkpoint and that family's tiny config.
FAMILIES = {
  # Qwen2.5 small models: QKV bias, tied embeddings.
  "qwen2": (r"^Qwen/Qwen2\.5-", dict(model_type="qwen2", hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, tie_word_embeddings=True,
                                      rope_theta=1000000.0)),
  # Llama 3 8B: GQA, untied, rope_theta 500000.
  "llama": (r"^meta-llama/(Meta-)?Llama-3", dict(model_type="llama", hidden_size=32,
                                                 intermediate_size=64, num_hidden_layers=2,
                                                 num_attention_heads=4, num_key_value_heads=2,
                                                 tie_word_embeddings=False, rope_theta=500000.0)),
}
# Two steps of the smallest batch the 8 test devices split (warmup ratios then leave a step at
# a positive learning rate).
SIZES = ["--disable_tqdm", "--max_steps", "2", "--gradient_accumulation_steps", "1",
         "--logging_steps", "1"]


def _write_jsonl(path, rows):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")


def _user(text):
  return {"role": "user", "content": text}


def _assistant(text):
  return {"role": "assistant", "content": text}


def _question(i):
  return f"What is {i} + {i + 3}?"


def _gsm8k_rows(n):
  """openai/gsm8k's answer column (reasoning, then `#### number`) with a conversational prompt."""
  return [{"prompt": [_user(_question(i) + " Put the final answer after ####.")],
           "answer": f"{i} + {i + 3} = {2 * i + 3}\n#### {2 * i + 3}"} for i in range(n)]


def _ultrafeedback_rows(n):
  """trl-lib/ultrafeedback_binarized: full chosen/rejected conversations (implicit prompt) and
  their scores."""
  return [{"chosen": [_user(_question(i)), _assistant(f"It is {2 * i + 3}.")],
           "rejected": [_user(_question(i)), _assistant(f"It is {2 * i + 4}, I think.")],
           "score_chosen": 9.0, "score_rejected": 2.0} for i in range(n)]


def _capybara_rows(n):
  """trl-lib/Capybara: multi-turn `messages`."""
  return [{"messages": [_user(_question(i)), _assistant(f"{2 * i + 3}."),
                        _user("And doubled?"), _assistant(f"{4 * i + 6}.")],
           "source": "tiny"} for i in range(n)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """The tiny tokenizer and one random checkpoint per family, the tokenizer saved beside each (as
  on the hub), and the three datasets."""
  root = tmp_path_factory.mktemp("recipes")
  tokenizer = ax.build_tiny_tokenizer(root / "tok")
  checkpoints = {}
  for family, (_, spec) in FAMILIES.items():
    hf = dict(spec, vocab_size=len(tokenizer), max_position_embeddings=256, rms_norm_eps=1e-6,
              pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    path = root / family
    ax.save_pretrained(ax.CausalLM(config_from_hf(hf), rngs=nnx.Rngs(0)), path)
    tokenizer.save_pretrained(path)
    checkpoints[family] = path
  _write_jsonl(root / "gsm8k" / "train.jsonl", _gsm8k_rows(16))
  for split, n in (("train", 16), ("test", 8)):
    _write_jsonl(root / "ultrafeedback" / f"{split}.jsonl", _ultrafeedback_rows(n))
  _write_jsonl(root / "capybara" / "train.jsonl", _capybara_rows(32))
  return root, checkpoints


def _recipe(name):
  path = os.path.join(RECIPES, name)
  with open(path) as f:
    return path, yaml.safe_load(f)


def _family(model_id):
  matches = [family for family, (pattern, _) in FAMILIES.items() if re.match(pattern, model_id)]
  assert len(matches) == 1, f"no tiny family for the recipe's checkpoint {model_id!r}"
  return matches[0]


def _run(tiny, tmp_path, command, name, dataset, *flags):
  """Parses the recipe as written, then runs it on the tiny checkpoint of its family; returns the
  parsed recipe, its YAML values and the run's output directory."""
  root, checkpoints = tiny
  path, values = _recipe(name)
  parsed = cli.parse(command, ["--config", path])
  assert parsed[1].model_name_or_path == values["model_name_or_path"]
  out = tmp_path / "out"
  argv = [command, "--config", path, "--model_name_or_path",
          str(checkpoints[_family(values["model_name_or_path"])]),
          "--dataset_name", str(root / dataset), "--output_dir", str(out), *SIZES, *flags]
  assert cli.main(argv) == 0
  return parsed, values, out


def _losses(out):
  lines = [json.loads(line) for line in open(out / "metrics.jsonl")]
  return {line["step"]: line["loss"] for line in lines if "loss" in line}


def _run_config(out):
  return json.load(open(out / "run_config.json"))


SMOKE_TESTED = ("grpo_gsm8k_qwen.yaml", "dpo_ultrafeedback_llama.yaml", "sft_packing.yaml")


def test_every_recipe_has_a_smoke_test():
  assert sorted(f for f in os.listdir(RECIPES) if f.endswith((".yaml", ".yml"))) == sorted(
    SMOKE_TESTED)


# A user's reward module next to the command (the CLI imports `module.function` from the working
# directory): the length of each completion, so groups of a random model's completions differ.
LENGTH_REWARD = """def length_reward(completion_ids, **kwargs):
  return [float(len(ids)) for ids in completion_ids]
"""


def test_grpo_gsm8k_qwen_recipe(tiny, tmp_path, monkeypatch):
  # A random tiny model never finishes a GSM8K answer: with the recipe's accuracy reward alone
  # every group would be all zeros and no update would run. Ending completions on half the
  # vocabulary gives them varied lengths (and still truncates a few, which the recipe's
  # mask_truncated_completions drops), and the length reward then separates them.
  vocab = len(ax.load_tokenizer(tiny[1]["qwen2"]))
  (tmp_path / "recipe_rewards.py").write_text(LENGTH_REWARD)
  monkeypatch.chdir(tmp_path)
  (config, model, data, mesh), values, out = _run(
    tiny, tmp_path, "grpo", "grpo_gsm8k_qwen.yaml", "gsm8k", "--num_generations", "2",
    "--per_device_train_batch_size", "2", "--max_completion_length", "8",
    "--max_prompt_length", "48", "--reward_funcs", "accuracy_reward",
    "recipe_rewards.length_reward", "--stop_token_ids", *map(str, range(3, vocab, 2)))
  # As written: one host's accelerators under FSDP, the accuracy reward on the answer column.
  assert (mesh.mesh_data, mesh.mesh_fsdp, mesh.mesh_tensor) == (1, -1, 1)
  assert config.reward_funcs == ["accuracy_reward"] and config.beta == 0.0 and model.bf16
  assert config.per_device_train_batch_size % config.num_generations == 0
  assert config.save_steps % config.num_iterations == 0
  losses = _losses(out)
  assert sorted(losses) == [1, 2] and all(math.isfinite(v) for v in losses.values())
  run = _run_config(out)["config"]
  assert run["num_generations"] == 2 and run["loss_type"] == values["loss_type"]
  assert run["mask_truncated_completions"] is True and run["learning_rate"] == 1e-6
  table = out / "completions" / "completions_000002.jsonl"
  completions = [json.loads(line) for line in open(table)]
  assert len(completions) == 16
  assert all(c["rewards/accuracy_reward"] in (0.0, 1.0) for c in completions)
  assert len({c["rewards/length_reward"] for c in completions}) > 1
  assert json.load(open(out / "config.json"))["model_type"] == "qwen2"


def test_dpo_ultrafeedback_llama_recipe(tiny, tmp_path):
  (config, model, data, mesh), values, out = _run(
    tiny, tmp_path, "dpo", "dpo_ultrafeedback_llama.yaml", "ultrafeedback",
    "--per_device_train_batch_size", "1", "--max_length", "48", "--eval_steps", "2",
    "--per_device_eval_batch_size", "1")
  assert config.beta == 0.01 and config.loss_type == ["sigmoid"] and data.max_length == 1024
  assert data.truncation_mode == "keep_end" and model.gradient_checkpointing
  assert config.per_device_train_batch_size * 8 * config.gradient_accumulation_steps == 128
  losses = _losses(out)
  assert sorted(losses) == [1, 2] and all(math.isfinite(v) for v in losses.values())
  evals = [json.loads(line) for line in open(out / "metrics.jsonl")]
  assert [line["step"] for line in evals if "eval_loss" in line] == [2]
  run = _run_config(out)
  assert run["config"]["beta"] == 0.01 and run["config"]["lr_scheduler_type"] == "cosine"
  assert run["data_config"]["max_length"] == 48
  assert json.load(open(out / "config.json"))["model_type"] == "llama"


def test_sft_packing_recipe(tiny, tmp_path):
  (config, model, data, mesh), values, out = _run(
    tiny, tmp_path, "sft", "sft_packing.yaml", "capybara", "--per_device_train_batch_size", "1",
    "--max_length", "64", "--packing_bins", "4")
  assert data.packing and data.max_length == 2048 and config.learning_rate == 2e-5
  losses = _losses(out)
  assert sorted(losses) == [1, 2] and all(math.isfinite(v) for v in losses.values())
  run = _run_config(out)
  assert run["data_config"]["packing"] is True and run["data_config"]["max_length"] == 64
  assert json.load(open(out / "config.json"))["model_type"] == _family(values["model_name_or_path"])


def test_grpo_stops_on_every_eos_id_of_the_checkpoints_generation_config(tiny, tmp_path):
  root, checkpoints = tiny
  chat = tmp_path / "chat"
  shutil.copytree(checkpoints["qwen2"], chat)
  config = json.load(open(chat / "config.json"))
  eos, turn_end = config["eos_token_id"], config["vocab_size"] - 1
  (chat / "generation_config.json").write_text(json.dumps({"eos_token_id": [turn_end, eos]}))
  out = tmp_path / "out"
  assert cli.main(["grpo", "--model_name_or_path", str(chat), "--dataset_name",
                   str(root / "gsm8k"), "--output_dir", str(out), "--max_steps", "1",
                   "--num_generations", "2", "--per_device_train_batch_size", "2",
                   "--max_completion_length", "4", "--reward_funcs", "accuracy_reward",
                   "--disable_tqdm"]) == 0
  assert _run_config(out)["resolved"]["stop_token_ids"] == [turn_end, eos]
