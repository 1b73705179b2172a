"""`alignax sft|reward|dpo|kto|orpo|simpo|cpo`: each subcommand trains a tiny local Llama end to end
(in-process through `alignax.cli.main`, and once through the installed console script) and writes a
TRL-style output_dir that transformers loads; `--config` YAML with overrides; bad flags, values and
rows give one named message and the documented exit status."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import safetensors.numpy

import alignax as ax
from alignax import cli
from train_factories import tiny_tokenizer_and_llama

WORDS = ["one", "two", "three", "four", "five", "six", "seven"]


def _write_jsonl(path, rows):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")


def _prompt(i):
  return f"count from {WORDS[i % 3]}:"


def _good(i):
  return " " + " ".join(WORDS[i % 3:i % 3 + 3])


def _bad(i):
  return " " + " ".join(reversed(WORDS[i % 3:i % 3 + 3]))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """A tiny checkpoint (tokenizer saved beside it, as on the hub) and one dataset directory per
  format, each with a train and a test split."""
  root = tmp_path_factory.mktemp("cli")
  tokenizer, base = tiny_tokenizer_and_llama(root)
  tokenizer.save_pretrained(base)
  for split, n in (("train", 16), ("test", 8)):
    _write_jsonl(root / "sft" / f"{split}.jsonl",
                 [{"prompt": _prompt(i), "completion": _good(i)} for i in range(n)])
    _write_jsonl(root / "pref" / f"{split}.jsonl",
                 [{"prompt": _prompt(i), "chosen": _good(i), "rejected": _bad(i)}
                  for i in range(n)])
    _write_jsonl(root / "kto" / f"{split}.jsonl",
                 [{"prompt": _prompt(i), "completion": _good(i) if i % 2 else _bad(i),
                   "label": bool(i % 2)} for i in range(n)])
  return root, base


def _flags(files, command, data, out, *extra):
  root, base = files
  return [command, "--model_name_or_path", str(base), "--dataset_name", str(root / data),
          "--output_dir", str(out), "--per_device_train_batch_size", "1", "--max_steps", "2",
          "--logging_steps", "1", "--save_steps", "100", "--max_length", "32",
          "--disable_tqdm", "--learning_rate", "1e-3", *extra]


def _metrics(out):
  return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


def _transformers_logits(path, input_ids, cls_name="AutoModelForCausalLM"):
  import torch
  import transformers

  model = getattr(transformers, cls_name).from_pretrained(path, dtype=torch.float32).eval()
  with torch.no_grad():
    return model(torch.tensor(np.asarray(input_ids))).logits.numpy()


def test_sft_from_a_yaml_config_with_a_flag_override_and_eval(files, tmp_path):
  root, base = files
  out = tmp_path / "sft"
  config = tmp_path / "sft.yaml"
  config.write_text(
    f"model_name_or_path: {base}\ndataset_name: {root / 'sft'}\noutput_dir: {out}\n"
    "learning_rate: 1e-3\nper_device_train_batch_size: 1\nmax_steps: 5\nlogging_steps: 1\n"
    "max_length: 32\ndisable_tqdm: true\neval_strategy: steps\neval_steps: 2\n"
    "per_device_eval_batch_size: 1\n")
  assert cli.main(["sft", "--config", str(config), "--max_steps", "2"]) == 0  # the flag wins
  lines = _metrics(out)
  assert [line["step"] for line in lines if "loss" in line] == [1, 2]
  evals = [line for line in lines if "eval_loss" in line]
  assert [line["step"] for line in evals] == [2] and np.isfinite(evals[0]["eval_loss"])
  assert {"eval_entropy", "eval_mean_token_logprob"} <= set(evals[0])
  run_config = json.load(open(out / "run_config.json"))
  assert run_config["algorithm"] == "sft" and run_config["config"]["max_steps"] == 2
  assert run_config["model_config"]["model_name_or_path"] == str(base)
  assert run_config["data_config"]["dataset_name"] == str(root / "sft")
  # The TRL-style output_dir: transformers loads it and computes what alignax computes.
  assert {"config.json", "model.safetensors", "tokenizer.json", "trainer_state.json"} <= set(
    os.listdir(out))
  ids = np.asarray([[3, 7, 11, 5, 9]], np.int32)
  ours = np.asarray(ax.from_pretrained(str(out))(ids, np.ones_like(ids)).logits)
  np.testing.assert_allclose(_transformers_logits(str(out), ids), ours, atol=2e-5, rtol=2e-5)
  before = np.asarray(ax.from_pretrained(str(base))(ids, np.ones_like(ids)).logits)
  assert np.abs(ours - before).max() > 1e-4  # it trained


def test_reward_model_logs_eval_accuracy_and_exports_a_sequence_classifier(files, tmp_path):
  out = tmp_path / "reward"
  assert cli.main(_flags(files, "reward", "pref", out, "--eval_strategy", "steps",
                         "--eval_steps", "2", "--per_device_eval_batch_size", "1")) == 0
  evals = [line for line in _metrics(out) if "eval_loss" in line]
  assert [line["step"] for line in evals] == [2]
  assert 0.0 <= evals[0]["eval_accuracy"] <= 1.0
  config = json.load(open(out / "config.json"))
  assert config["architectures"] == ["LlamaForSequenceClassification"] and config["num_labels"] == 1
  ids = np.asarray([[3, 7, 11, 5, 9]], np.int32)
  ours = np.asarray(ax.from_pretrained(str(out), head="score")(ids, np.ones_like(ids)).scores)
  theirs = _transformers_logits(str(out), ids, "AutoModelForSequenceClassification")
  np.testing.assert_allclose(theirs, ours, atol=2e-5, rtol=2e-5)


def test_dpo_with_lora_writes_a_peft_adapter_at_the_root(files, tmp_path):
  root, base = files
  out = tmp_path / "dpo"
  assert cli.main(_flags(files, "dpo", "pref", out, "--use_peft", "--lora_r", "4",
                         "--lora_alpha", "8", "--lora_target_modules", "q_proj", "v_proj",
                         "--beta", "0.1", "--loss_type", "sigmoid")) == 0
  adapter = json.load(open(out / "adapter_config.json"))
  assert (adapter["peft_type"], adapter["r"], adapter["lora_alpha"]) == ("LORA", 4, 8.0)
  assert adapter["target_modules"] == ["q_proj", "v_proj"]
  assert adapter["base_model_name_or_path"] == os.path.abspath(base)
  keys = set(safetensors.numpy.load_file(out / "adapter_model.safetensors"))
  assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
  assert "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight" in keys
  assert len(keys) == 2 * 2 * 2  # 2 layers x 2 projections x (A, B)
  assert "model.safetensors" not in os.listdir(out)  # the adapter, as TRL writes it
  assert "tokenizer.json" in os.listdir(out)
  lines = [line for line in _metrics(out) if "loss" in line]
  assert {"rewards/chosen", "rewards/margins", "rewards/accuracies",
          "logps/chosen"} <= set(lines[0])


@pytest.mark.parametrize("command, data, extra", [
  ("kto", "kto", ["--per_device_train_batch_size", "2"]),
  ("simpo", "pref", ["--beta", "2.0", "--gamma_beta_ratio", "0.5"]),
  ("cpo", "pref", ["--cpo_alpha", "0.5"]),
])
def test_subcommand_trains_and_writes_a_model(files, tmp_path, command, data, extra):
  out = tmp_path / command
  assert cli.main(_flags(files, command, data, out, *extra)) == 0
  lines = [line for line in _metrics(out) if "loss" in line]
  assert [line["step"] for line in lines] == [1, 2]
  assert all(np.isfinite(line["loss"]) for line in lines)
  config = json.load(open(out / "config.json"))
  assert config["architectures"] == ["LlamaForCausalLM"]
  assert json.load(open(out / "run_config.json"))["algorithm"] == command


def test_installed_console_script_runs_orpo(files, tmp_path):
  alignax = shutil.which("alignax", path=os.path.dirname(sys.executable))
  assert alignax is not None, "the alignax console script is not installed (pip install -e .)"
  out = tmp_path / "orpo"
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  proc = subprocess.run([alignax, *_flags(files, "orpo", "pref", out, "--beta", "0.1")],
                        capture_output=True, text=True, env=env, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "pref[train]: 16 examples from 16 rows" in proc.stderr
  assert [line["step"] for line in _metrics(out) if "loss" in line] == [1, 2]
  assert json.load(open(out / "run_config.json"))["mesh"] == {"data": 1, "fsdp": 2, "tensor": 1}
  assert "model.safetensors" in os.listdir(out)


# --- errors: one message naming what is wrong, exit 2 for usage and 1 at run time ---------------


def _error(capsys, argv, status):
  assert cli.main(argv) == status
  err = capsys.readouterr().err
  assert "Traceback" not in err
  return err


def test_unknown_flag_is_named_with_a_suggestion(files, tmp_path, capsys):
  err = _error(capsys, _flags(files, "dpo", "pref", tmp_path, "--bta", "0.2"), 2)
  assert "alignax dpo: error: unrecognised argument --bta (did you mean --beta?)" in err


@pytest.mark.parametrize("flags, message", [
  (["--learning_rate", "fast"],
   "argument --learning_rate/--learning-rate: invalid float value: 'fast'"),
  (["--loss_type", "sigmod"], "loss_type='sigmod' is not supported"),
  (["--beta", "-1"], "beta must be > 0, got -1.0"),
  (["--truncation_mode", "middle"], "argument --truncation_mode"),
  (["--lora_dropout", "0.1"], "lora_dropout=0.1"),
])
def test_bad_value_names_the_field(files, tmp_path, capsys, flags, message):
  err = _error(capsys, _flags(files, "dpo", "pref", tmp_path, *flags), 2)
  assert message in err and err.count("\n") <= 2


def test_yaml_errors_name_the_file_and_key(files, tmp_path, capsys):
  config = tmp_path / "bad.yaml"
  config.write_text("output_dir: out\nlearning_rte: 1e-5\n")
  err = _error(capsys, ["sft", "--config", str(config)], 2)
  assert f"--config {config}: unknown option 'learning_rte' (did you mean 'learning_rate'?)" in err
  err = _error(capsys, ["sft", "--config", str(tmp_path / "missing.yaml")], 2)
  assert "missing.yaml: no such file" in err


def test_missing_model_is_named(files, tmp_path, capsys):
  root, _ = files
  err = _error(capsys, ["sft", "--dataset_name", str(root / "sft"), "--output_dir",
                        str(tmp_path)], 2)
  assert "--model_name_or_path is required" in err
  err = _error(capsys, ["sft", "--model_name_or_path", str(tmp_path / "nowhere"), "--dataset_name",
                        str(root / "sft"), "--output_dir", str(tmp_path / "out")], 1)
  assert "nowhere" in err


def test_bad_row_names_the_file_row_and_field(files, tmp_path, capsys):
  rows = [{"prompt": _prompt(i), "chosen": _good(i), "rejected": _bad(i)} for i in range(6)]
  rows[3] = {"prompt": _prompt(3), "chosen": _good(3)}  # no rejected answer
  _write_jsonl(tmp_path / "data" / "train.jsonl", rows)
  flags = _flags(files, "dpo", "data", tmp_path / "out")
  flags[flags.index("--dataset_name") + 1] = str(tmp_path / "data")
  err = _error(capsys, flags, 1)
  assert "train.jsonl" in err and "row 3" in err and "rejected" in err
  assert len(err.strip().splitlines()) == 1


def test_run_time_errors_print_one_line_and_debug_shows_the_traceback(files, tmp_path, capsys,
                                                                     monkeypatch):
  from alignax.train import step, trainers

  def diverge(*args, **kwargs):
    raise step.NonFiniteError("step 3: loss = nan; stopping (the last checkpoint before this step "
                              "is intact)")

  monkeypatch.setattr(trainers, "run", diverge)
  flags = _flags(files, "sft", "sft", tmp_path)
  err = _error(capsys, flags, 1)
  assert err.strip() == ("alignax sft: error: step 3: loss = nan; stopping (the last checkpoint "
                         "before this step is intact)")
  assert cli.main([*flags, "--debug"]) == 1
  assert "Traceback" in capsys.readouterr().err

  def bug(*args, **kwargs):
    raise KeyError("oops")

  monkeypatch.setattr(trainers, "run", bug)
  monkeypatch.setenv("ALIGNAX_TRACEBACK", "0")
  err = _error(capsys, flags, 1)
  assert "KeyError: 'oops' (--debug or ALIGNAX_TRACEBACK=1 shows the traceback)" in err


def test_help_and_unknown_command(capsys):
  assert cli.main(["dpo", "--help"]) == 0
  out = capsys.readouterr().out
  assert "--beta BETA" in out and "the KL coefficient" in out and "--use_peft" in out
  assert "--mesh_fsdp" in out and "--config FILE.yaml" in out
  assert cli.main(["dop"]) == 2
  assert "unknown command 'dop' (did you mean 'dpo'?)" in capsys.readouterr().err
  assert cli.main([]) == 2


def test_yaml_values_parse_like_flags_and_the_command_line_wins(tmp_path):
  config = tmp_path / "dpo.yaml"
  config.write_text(  # YAML reads 1e-6 as a string; it is converted like a flag's value
    "model_name_or_path: some/model\noutput_dir: out\nlearning_rate: 1e-6\nbeta: 0.5\n"
    "loss_type: [sigmoid, bco_pair]\nloss_weights: [0.8, 0.2]\nuse_peft: true\n"
    "lora_target_modules: [q_proj]\nmax_length: 256\nmesh_fsdp: 4\nmesh_data: 2\nseed: 7\n")
  dpo, model, data, mesh = cli.parse("dpo", ["--config", str(config), "--beta", "0.2",
                                             "--seed", "11"])
  assert (dpo.learning_rate, dpo.beta, dpo.seed) == (1e-6, 0.2, 11)
  assert dpo.loss_type == ["sigmoid", "bco_pair"] and dpo.loss_weights == [0.8, 0.2]
  assert model.use_peft and model.lora_target_modules == ["q_proj"]
  assert (data.max_length, data.seed) == (256, 11)  # --seed seeds the data order too
  assert (mesh.mesh_data, mesh.mesh_fsdp, mesh.mesh_tensor) == (2, 4, 1)
