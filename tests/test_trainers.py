"""The trainers' Python API (`alignax.train.sft`, ..., `run`): precomputed reference log-probs
train exactly as the on-the-fly reference, the LoRA export (PEFT adapter at the root, merged weights
that transformers runs as the trained model), and the evaluator's whole-set averages."""

import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import alignax as ax
from alignax import data, train
from alignax.sharding import make_mesh
from alignax.train.objectives import model_logprobs, sft_objective
from train_factories import tiny_tokenizer_and_llama

WORDS = ["one", "two", "three", "four", "five", "six", "seven"]


def _pairs(n):
  return [{"prompt": f"count from {WORDS[i % 3]}:",
           "chosen": " " + " ".join(WORDS[i % 3:i % 3 + 3 + i % 2]),
           "rejected": " " + " ".join(reversed(WORDS[i % 3:i % 3 + 3]))} for i in range(n)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("trainers")
  tokenizer, base = tiny_tokenizer_and_llama(root)
  tokenizer.save_pretrained(base)
  return root, tokenizer, base


def _options(out, **overrides):
  return dict(output_dir=str(out), per_device_train_batch_size=1, max_steps=2, logging_steps=1,
              save_steps=100, disable_tqdm=True, learning_rate=1e-2, seed=0, **overrides)


def test_trainers_are_importable_from_alignax_train():
  for name in ("sft", "reward", "dpo", "kto", "orpo", "simpo", "cpo"):
    assert callable(getattr(train, name)) and getattr(train, name).__name__ == name
  assert train.DPOConfig(output_dir="o").learning_rate == 1e-6  # TRL's defaults per algorithm
  assert train.SFTConfig(output_dir="o").learning_rate == 2e-5
  assert train.RewardConfig(output_dir="o").learning_rate == 1e-4
  assert train.DPOConfig(output_dir="o", loss_type="ipo").loss_type == ["ipo"]


def test_wrong_config_or_unsupported_option_is_named(setup):
  _, _, base = setup
  model = train.ModelConfig(model_name_or_path=base)
  with pytest.raises(ValueError, match="dpo takes a DPOConfig, got SFTConfig"):
    train.dpo(train.SFTConfig(output_dir="o"), model=model, data=data.DataConfig())
  with pytest.raises(ValueError, match="use_peft=True is not supported for the reward model"):
    train.reward(train.RewardConfig(output_dir="o"),
                 model=train.ModelConfig(model_name_or_path=base, use_peft=True),
                 data=data.DataConfig())
  with pytest.raises(ValueError, match="merge_adapters=True needs use_peft=True"):
    train.ModelConfig(model_name_or_path=base, merge_adapters=True)
  with pytest.raises(ValueError, match="loss_weights has 1 weights for 2 loss types"):
    train.DPOConfig(output_dir="o", loss_type=["sigmoid", "ipo"], loss_weights=[1.0])


def test_lora_run_with_precomputed_reference_trains_as_on_the_fly_and_exports_merged_weights(
    setup, tmp_path):
  import torch
  import transformers

  root, tokenizer, base = setup
  config = data.DataConfig(max_length=32, seed=0)
  prepared = data.prepare_dataset(data.load_rows(_pairs(16)), tokenizer, task="preference",
                                  config=config)

  def run(out, precompute, merge):
    model = train.ModelConfig(model_name_or_path=base, use_peft=True, lora_r=4, lora_alpha=8.0,
                              merge_adapters=merge)
    return train.dpo(train.DPOConfig(**_options(out), precompute_ref_log_probs=precompute),
                     model=model, data=config, train_dataset=prepared, mesh=make_mesh(fsdp=8))

  # The reference is the adapters-off view: scored in the step, or once before training.
  on_the_fly = run(tmp_path / "view", precompute=False, merge=False)
  result = run(tmp_path / "precomputed", precompute=True, merge=True)
  lines = [[h for h in r.history if "loss" in h] for r in (on_the_fly, result)]
  for name in ("loss", "rewards/margins", "logps/chosen", "logps/rejected"):
    np.testing.assert_allclose([h[name] for h in lines[1]], [h[name] for h in lines[0]],
                               rtol=1e-4, atol=1e-5, err_msg=name)
  assert lines[0][1]["rewards/margins"] != 0  # step 2 compares two different models

  out = tmp_path / "precomputed"
  ids = np.asarray([[3, 7, 11, 5, 9, 2]], np.int32)
  trained = np.asarray(result.model(ids, np.ones_like(ids)).logits)
  base_logits = np.asarray(ax.from_pretrained(base)(ids, np.ones_like(ids)).logits)
  assert np.abs(trained - base_logits).max() > 1e-4  # the adapters moved
  # --merge_adapters: output_dir/merged is the trained model, as transformers runs it.
  merged = out / "merged"
  hf = transformers.AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
  with torch.no_grad():
    theirs = hf(torch.tensor(ids)).logits.numpy()
  np.testing.assert_allclose(theirs, trained, atol=2e-5, rtol=2e-5)
  assert "tokenizer.json" in os.listdir(merged)
  # The adapter at the root, loaded back onto the base model, is the trained model too.
  reloaded = ax.from_pretrained(base)
  ax.load_lora(reloaded, out, rngs=nnx.Rngs(0))
  np.testing.assert_allclose(np.asarray(reloaded(ids, np.ones_like(ids)).logits), trained,
                             atol=2e-5, rtol=2e-5)
  assert json.load(open(out / "adapter_config.json"))["base_model_name_or_path"] == (
    os.path.abspath(base))


def test_evaluator_averages_over_the_whole_set(setup):
  _, tokenizer, base = setup
  config = data.DataConfig(max_length=32, seed=0)
  rows = [{"prompt": f"count from {WORDS[i % 4]}:", "completion": " " + " ".join(WORDS[:1 + i % 5])}
          for i in range(21)]
  prepared = data.prepare_dataset(data.load_rows(rows), tokenizer, task="sft", config=config)
  mesh = make_mesh(fsdp=8)
  model = ax.from_pretrained(base, mesh=mesh)
  evaluate = train.make_evaluator(functools.partial(sft_objective), prepared, data=config,
                                  batch_size=1, mesh=mesh)
  metrics = evaluate(model)  # 16 of the 21 examples (a multiple of 8 devices), in batches of 8
  whole = data.make_batches(dataclasses.replace(prepared, examples=prepared.examples[:16]),
                            batch_size=16, config=data.DataConfig(max_length=32, shuffle=False),
                            num_epochs=1)
  batch = {k: jnp.asarray(v) for k, v in next(iter(whole)).items()}
  out, mask = model_logprobs(ax.from_pretrained(base), batch)
  np.testing.assert_allclose(metrics["loss"], float(-ax.masked_mean(out.logp, mask)), rtol=1e-5)
  np.testing.assert_allclose(metrics["entropy"], float(ax.masked_mean(out.entropy, mask)),
                             rtol=1e-5)
  # The token-weighted average differs from the mean of the two batches' means.
  halves = [float(-ax.masked_mean(out.logp[s], mask[s])) for s in (slice(0, 8), slice(8, 16))]
  assert abs(np.mean(halves) - metrics["loss"]) > 1e-6


def test_skipped_rows_are_counted_in_the_log(setup, tmp_path, caplog):
  from alignax.train import trainers

  _, tokenizer, _ = setup
  rows = _pairs(6)
  rows[2] = {"prompt": "count:", "chosen": " one"}  # no rejected answer
  rows[4] = {**rows[4], "chosen": ""}  # an empty completion
  os.makedirs(tmp_path / "data")
  with open(tmp_path / "data" / "train.jsonl", "w") as f:
    f.writelines(json.dumps(row) + "\n" for row in rows)
  config = data.DataConfig(dataset_name=str(tmp_path / "data"), max_length=32, skip_invalid=True)
  with caplog.at_level("INFO", logger="alignax.train"):
    prepared = trainers._load_data(config, tokenizer, task="preference", split="train")
  assert len(prepared) == 4
  assert f"{tmp_path / 'data'}[train]: 4 examples from 6 rows" in caplog.text
  assert "skipped 2 invalid rows (empty: 1, missing_field: 1)" in caplog.text


def _sft_fit(setup, out, *, on_step=None, **overrides):
  from alignax.train.loop import fit

  _, tokenizer, base = setup
  config = data.DataConfig(max_length=32, seed=0)
  rows = [{"prompt": f"count from {WORDS[i % 4]}:", "completion": " " + " ".join(WORDS[:1 + i % 5])}
          for i in range(16)]
  prepared = data.prepare_dataset(data.load_rows(rows), tokenizer, task="sft", config=config)
  mesh = make_mesh(fsdp=1, devices=jax.devices()[:1])  # the loop's logic: one device is enough
  options = {**_options(out), **overrides}
  return fit(ax.from_pretrained(base, mesh=mesh), functools.partial(sft_objective),
             data.make_batches(prepared, batch_size=2, config=config),
             train.SFTConfig(**options), mesh=mesh, steps_per_epoch=8, on_step=on_step)


def test_lines_average_their_window_and_ctrl_c_saves_the_step_and_resumes(setup, tmp_path):
  import signal

  from alignax.train.checkpoint import Checkpointer

  per_step = []

  def record_and_interrupt(step, metrics):
    per_step.append(dict(metrics))
    if step == 3:
      os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C: lands while the loop is in the step

  with pytest.raises(KeyboardInterrupt, match="stopped after step 3"):
    _sft_fit(setup, tmp_path, max_steps=6, logging_steps=2, save_steps=100,
             on_step=record_and_interrupt)
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler given back
  assert Checkpointer(tmp_path).all_steps() == [3]  # the interrupted step is saved, complete
  lines = json.load(open(tmp_path / "trainer_state.json"))["log_history"]
  assert [h["step"] for h in lines] == [2, 3]  # the stop logs its partial window
  # As transformers/TRL: the loss and the algorithm's metrics are the window's mean...
  assert per_step[0]["loss"] != per_step[1]["loss"]
  for name in ("loss", "mean_token_accuracy", "entropy"):
    np.testing.assert_allclose(lines[0][name], (per_step[0][name] + per_step[1][name]) / 2,
                               rtol=1e-6, err_msg=name)
    np.testing.assert_allclose(lines[1][name], per_step[2][name], rtol=1e-6, err_msg=name)
  # ...the learning rate and the gradient norm the latest step's.
  for name in ("learning_rate", "grad_norm"):
    assert lines[0][name] == per_step[1][name]
  resumed = _sft_fit(setup, tmp_path, max_steps=4, logging_steps=2,
                     resume_from_checkpoint="true")
  assert [h["step"] for h in resumed.history if "loss" in h] == [2, 3, 4]


def test_an_export_keeps_the_checkpoints_generation_config(setup, tmp_path):
  # Its EOS ids (several in Llama-3 / Qwen chat checkpoints) are where generation stops.
  import shutil

  from alignax.sampling import checkpoint_stop_token_ids
  from alignax.train.trainers import make_export

  _, tokenizer, base = setup
  source = tmp_path / "chat"
  shutil.copytree(base, source)
  (source / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 2]}))
  for peft in (False, True):
    out = tmp_path / f"out_peft_{peft}"
    model = ax.from_pretrained(source)
    if peft:
      ax.apply_lora(model, ax.LoRAConfig(rank=2), rngs=nnx.Rngs(0))
    make_export(train.ModelConfig(model_name_or_path=str(source), use_peft=peft,
                                  merge_adapters=peft), tokenizer)(model, str(out))
    exported = out / "merged" if peft else out
    assert checkpoint_stop_token_ids(str(exported))[:2] == (7, 2)
