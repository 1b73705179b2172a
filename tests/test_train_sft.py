"""The host loop end to end with the SFT objective: it learns, writes a TRL-style output_dir whose
model transformers-free alignax reloads, and resumes exactly."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import alignax as ax
from alignax import data
from alignax.sharding import make_mesh
from alignax.train.config import TrainingConfig
from alignax.train.loop import fit
from alignax.train.objectives import model_logprobs, sft_objective
from train_factories import tiny_tokenizer_and_llama

WORDS = ["one", "two", "three", "four", "five", "six"]


def _rows(n, seed):
  rng = np.random.default_rng(seed)
  rows = []
  for _ in range(n):
    start = int(rng.integers(0, 3))
    rows.append({"prompt": f"count from {WORDS[start]}:",
                 "completion": " " + " ".join(WORDS[start:start + 3])})
  return rows


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("sft")
  tokenizer, base = tiny_tokenizer_and_llama(root)
  config = data.DataConfig(max_length=32, seed=0)
  train = data.prepare_dataset(data.load_rows(_rows(64, 0)), tokenizer, task="sft", config=config)
  heldout = data.prepare_dataset(data.load_rows(_rows(16, 1)), tokenizer, task="sft", config=config)
  return tokenizer, base, config, train, heldout


def _heldout_nll(model, heldout, config):
  batch = next(iter(data.make_batches(heldout, batch_size=16, config=config, num_epochs=1)))
  out, mask = model_logprobs(model, {k: jnp.asarray(v) for k, v in batch.items()})
  return float(-ax.masked_mean(out.logp, mask))


def _check_accuracy_against_materialised_logits(model, heldout, config):
  """``mean_token_accuracy`` (from the kernel's ``target_is_top1``) equals argmax(logits) == target."""
  batch = {k: jnp.asarray(v) for k, v in
           next(iter(data.make_batches(heldout, batch_size=16, config=config))).items()}
  graphdef, params, frozen = nnx.split(model, nnx.Param, ...)
  _, metrics = sft_objective(graphdef).loss(params, frozen, batch, jax.random.key(0))
  logits = model(batch["input_ids"], batch["attention_mask"]).logits
  targets, mask = ax.next_token_targets(batch["input_ids"], batch["attention_mask"],
                                        completion_mask=batch["completion_mask"])
  hits = (jnp.argmax(logits, axis=-1) == targets) & mask
  expected = float(hits.sum() / mask.sum())
  assert 0.0 < expected < 1.0, expected  # the trained model gets some tokens right, some wrong
  np.testing.assert_allclose(float(metrics["mean_token_accuracy"]), expected, rtol=1e-6)


def _run(setup, output_dir, mesh, eval_fn=None, **overrides):
  tokenizer, base, data_config, train, _ = setup
  model = ax.from_pretrained(base, mesh=mesh)
  options = dict(output_dir=str(output_dir), learning_rate=3e-3, per_device_train_batch_size=1,
                 gradient_accumulation_steps=2, max_steps=6, logging_steps=1, save_steps=3,
                 lr_scheduler_type="constant", disable_tqdm=True, seed=0)
  config = TrainingConfig(**{**options, **overrides})
  rows = config.per_device_train_batch_size * 8 * config.gradient_accumulation_steps
  batches = data.make_batches(train, batch_size=rows, config=data_config)
  return fit(model, sft_objective, batches, config, mesh=mesh, tokenizer=tokenizer, eval_fn=eval_fn)


def test_running_out_of_data_is_a_named_error(setup, tmp_path):
  tokenizer, base, data_config, train, _ = setup
  config = TrainingConfig(output_dir=str(tmp_path), max_steps=5, disable_tqdm=True,
                          per_device_train_batch_size=1)
  one_epoch = data.make_batches(train, batch_size=32, config=data_config, num_epochs=1)  # 2 batches
  with pytest.raises(ValueError, match="ran out before step 3 of max_steps=5"):
    fit(ax.from_pretrained(base, mesh=make_mesh(fsdp=8)), sft_objective, one_epoch, config,
        mesh=make_mesh(fsdp=8))


def test_sft_learns_and_writes_a_trl_style_output_dir(setup, tmp_path):
  mesh = make_mesh(fsdp=8)
  tokenizer, base, data_config, _, heldout = setup
  before = _heldout_nll(ax.from_pretrained(base), heldout, data_config)
  result = _run(setup, tmp_path, mesh, max_steps=12, save_steps=6, eval_steps=6,
                eval_fn=lambda model: {"nll": _heldout_nll(model, heldout, data_config)})
  after = _heldout_nll(ax.from_pretrained(str(tmp_path)), heldout, data_config)
  assert after < 0.7 * before, (before, after)
  _check_accuracy_against_materialised_logits(ax.from_pretrained(str(tmp_path)), heldout,
                                              data_config)
  names = set(os.listdir(tmp_path))
  assert {"checkpoint-6", "checkpoint-12", "metrics.jsonl", "trainer_state.json",
          "run_config.json", "config.json", "model.safetensors", "tokenizer.json"} <= names
  lines = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  evals = [line for line in lines if "eval_nll" in line]
  assert [line["step"] for line in evals] == [6, 12] and evals[1]["eval_nll"] < evals[0]["eval_nll"]
  np.testing.assert_allclose(evals[1]["eval_nll"], after, rtol=1e-5)  # eval saw the final weights
  lines = [line for line in lines if "loss" in line]
  assert [line["step"] for line in lines] == list(range(1, 13))
  assert {"loss", "grad_norm", "learning_rate", "entropy", "num_tokens",
          "train_tokens_per_second", "mean_token_accuracy"} <= set(lines[0])
  assert lines[-1]["loss"] < lines[0]["loss"]
  assert lines[-1]["mean_token_accuracy"] > lines[0]["mean_token_accuracy"]
  assert len(result.history) == 14  # 12 training lines and 2 evaluations
  state = json.load(open(tmp_path / "checkpoint-6" / "trainer_state.json"))
  assert state["global_step"] == 6
  assert [h["step"] for h in state["log_history"] if "loss" in h] == [1, 2, 3, 4, 5, 6]
  assert [h["step"] for h in state["log_history"] if "eval_nll" in h] == [6]


def test_resume_after_a_crash_logs_the_same_losses_bitwise(setup, tmp_path):
  mesh = make_mesh(fsdp=8)
  _run(setup, tmp_path / "straight", mesh)

  class Crash(RuntimeError):
    pass

  def crash_after_three(step, metrics):
    if step == 4:  # checkpoint-3 is written; step 4 ran but is lost with the process
      raise Crash()

  with pytest.raises(Crash):
    tokenizer, base, data_config, train, _ = setup
    model = ax.from_pretrained(base, mesh=mesh)
    config = TrainingConfig(output_dir=str(tmp_path / "resumed"), learning_rate=3e-3,
                            per_device_train_batch_size=1, gradient_accumulation_steps=2,
                            max_steps=6, logging_steps=1, save_steps=3,
                            lr_scheduler_type="constant", disable_tqdm=True, seed=0)
    fit(model, sft_objective, data.make_batches(train, batch_size=16, config=data_config), config,
        mesh=mesh, tokenizer=tokenizer, on_step=crash_after_three)
  _run(setup, tmp_path / "resumed", mesh, resume_from_checkpoint="true")

  def losses(run):
    by_step = {}
    for line in open(tmp_path / run / "metrics.jsonl"):
      record = json.loads(line)
      by_step[record["step"]] = record["loss"]  # the resumed run's line wins over the lost one
    return by_step

  assert losses("resumed") == losses("straight")
  state = json.load(open(tmp_path / "resumed" / "trainer_state.json"))
  assert [h["step"] for h in state["log_history"]] == [1, 2, 3, 4, 5, 6]



def test_per_sequence_loss_keeps_token_mean_metrics_exact_under_accumulation(setup):
  # The second micro-batch's rows keep one completion token each: its token means weigh far less
  # than its rows, which the loss (a per-sequence mean) counts equally.
  import optax

  from alignax.train.step import init_state, make_train_step, split_micro_batches

  _, base, config, _, heldout = setup
  batch = {k: np.array(v) for k, v in
           next(iter(data.make_batches(heldout, batch_size=8, config=config))).items()}
  for row in range(4, 8):
    first = int(np.argmax(batch["completion_mask"][row]))
    batch["completion_mask"][row, first + 1:] = 0
  graphdef, params, frozen = nnx.split(ax.from_pretrained(base), nnx.Param, ...)
  objective = sft_objective(graphdef, loss_agg_mode="seq_mean_token_mean")
  step = jax.jit(make_train_step(objective, optax.sgd(1e-3)))
  state = init_state(params, optax.sgd(1e-3), frozen=frozen)
  _, whole = step(state, split_micro_batches(batch, 1))
  _, split = step(state, split_micro_batches(batch, 2))
  for name in ("loss", "entropy", "mean_token_logprob", "mean_token_accuracy"):
    np.testing.assert_allclose(split[name], whole[name], rtol=2e-5, atol=2e-5, err_msg=name)
