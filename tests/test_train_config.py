"""TrainingConfig: TRL's flag names parse with transformers.HfArgumentParser; bad values are named."""

import pytest
import transformers

from alignax.train.config import ModelConfig, TrainingConfig
from alignax.train.logger import resolve_report_to


def test_trl_flags_parse_with_hf_argument_parser():
  parser = transformers.HfArgumentParser(TrainingConfig)
  (config,) = parser.parse_args_into_dataclasses([
    "--output_dir", "out", "--learning_rate", "1e-6", "--per_device_train_batch_size", "4",
    "--gradient_accumulation_steps", "2", "--max_steps", "100", "--logging_steps", "5",
    "--lr_scheduler_type", "cosine", "--warmup_ratio", "0.1", "--report_to", "tensorboard",
    "--resume_from_checkpoint", "true", "--save_total_limit", "2",
  ])
  assert (config.learning_rate, config.per_device_train_batch_size, config.max_steps) == (1e-6, 4, 100)
  assert config.lr_scheduler_type == "cosine" and config.save_total_limit == 2
  assert config.resume_from_checkpoint == "true"


@pytest.mark.parametrize("field, value, message", [
  ("per_device_train_batch_size", 0, "per_device_train_batch_size"),
  ("max_steps", 0, "max_steps"),
  ("learning_rate", -1.0, "learning_rate"),
  ("lr_scheduler_type", "cosine_with_restarts", "lr_scheduler_type"),
  ("report_to", "tensorbord", "report_to"),
  ("eval_steps", 0, "eval_steps"),
])
def test_bad_values_name_the_field(field, value, message):
  with pytest.raises(ValueError, match=message):
    TrainingConfig(output_dir="out", **{field: value})


def test_report_to_takes_several_sinks_as_transformers_does():
  parser = transformers.HfArgumentParser(TrainingConfig)
  (config,) = parser.parse_args_into_dataclasses(
    ["--output_dir", "out", "--report_to", "tensorboard", "wandb"])
  assert resolve_report_to(config.report_to) == ("jsonl", "tensorboard", "wandb")
  (config,) = parser.parse_args_into_dataclasses(["--output_dir", "out", "--report_to", "none"])
  assert resolve_report_to(config.report_to) == ("jsonl",)


@pytest.mark.parametrize("targets, expected", [
  (["all-linear"], None),  # TRL's `--lora_target_modules all-linear`, PEFT's shorthand
  ("all-linear", None),  # the same as a YAML scalar
  ("q_proj", ["q_proj"]),  # a YAML scalar is one name, not its characters
  (["q_proj", "v_proj"], ["q_proj", "v_proj"]),
])
def test_lora_target_modules_accept_peft_forms(targets, expected):
  assert ModelConfig(lora_target_modules=targets).lora_target_modules == expected


def test_all_linear_with_other_names_is_named():
  with pytest.raises(ValueError, match="all-linear"):
    ModelConfig(lora_target_modules=["all-linear", "q_proj"])


def test_flags_left_out_keep_their_defaults():
  (config,) = transformers.HfArgumentParser(TrainingConfig).parse_args_into_dataclasses(
    ["--output_dir", "out"])
  assert config == TrainingConfig(output_dir="out")
  assert resolve_report_to(config.report_to) == ("jsonl",)
