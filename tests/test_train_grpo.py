"""The GRPO trainer (alignax.train.grpo): learning on a rule-based reward, the first-update and
stored-old-log-prob invariants, the reference only when beta > 0, exact resume, TRL's metric names,
the completions log, and named errors for bad input."""

import glob
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import alignax as ax
from alignax.rewards import RewardFunctionError
from alignax.sharding import make_mesh
from alignax.train import grpo as grpo_module
from alignax.train import online
from alignax.train.config import ModelConfig
from alignax.train.grpo import GRPO_LOSS_TYPES, GRPOConfig, grpo, grpo_objective
from train_factories import tiny_tokenizer_and_llama

PROMPTS = [{"prompt": f"count {i} apples"} for i in range(16)]


def even_fraction(completion_ids, **kwargs):
  """The share of even token ids: about 0.5 for a random policy, 1.0 at best."""
  return [float(np.mean([t % 2 == 0 for t in ids])) for ids in completion_ids]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  tokenizer, base = tiny_tokenizer_and_llama(tmp_path_factory.mktemp("grpo"))
  # Two devices keep the compile short on a shared CPU; rows are still split over fsdp.
  mesh = make_mesh(fsdp=2, devices=jax.devices()[:2])
  return tokenizer, base, mesh


def _config(output_dir, **overrides):
  options = dict(output_dir=str(output_dir), max_steps=4, learning_rate=3e-2,
                 lr_scheduler_type="constant", per_device_train_batch_size=8, num_generations=4,
                 max_completion_length=8, stop_token_ids=[], logging_steps=2, save_steps=100,
                 disable_tqdm=True)
  return GRPOConfig(**{**options, **overrides})


def _run(setup, config, *, reward_funcs=(even_fraction,), on_step=None):
  tokenizer, base, mesh = setup
  model = ax.from_pretrained(base, mesh=mesh)
  history = []

  def record(step, metrics):
    history.append(dict(metrics, step=step))
    if on_step is not None:
      on_step(step, metrics)

  result = grpo(config, model=model, reward_funcs=list(reward_funcs), tokenizer=tokenizer,
                train_dataset=PROMPTS, mesh=mesh, on_step=record)
  return result, history


def test_grpo_learns_a_rule_based_reward_without_a_reference(setup, tmp_path, monkeypatch):
  def no_reference(*args, **kwargs):
    raise AssertionError("beta=0 must build and evaluate no reference model")

  monkeypatch.setattr(grpo_module, "_reference_fn", no_reference)
  config = _config(tmp_path, max_steps=16, logging_steps=4, save_steps=8)
  result, history = _run(setup, config)

  rewards = [m["reward"] for m in history]
  start, end = np.mean(rewards[:3]), np.mean(rewards[-3:])
  assert start < 0.7 and end > 0.85 and end - start > 0.25, rewards

  for m in history:
    # num_iterations=1: every update is the first on its generation batch, so pi == pi_old.
    assert m["clip_ratio/region_mean"] == 0.0
    assert abs(m["approx_kl"]) < 1e-9
    # The sampler and the training forward score the same tokens the same way.
    assert m["sampling/sampling_logp_difference/max"] < 1e-4
    assert "kl" not in m and "time/reference" not in m  # no reference forward ran
  trl_names = {"reward", "reward_std", "frac_reward_zero_std", "rewards/even_fraction/mean",
               "rewards/even_fraction/std", "entropy", "clip_ratio/low_mean",
               "clip_ratio/high_max", "clip_ratio/region_mean", "completions/mean_length",
               "completions/clipped_ratio", "num_tokens", "sampling/sampling_logp_difference/mean",
               "time/generation", "time/reward", "time/train", "step_time", "loss", "grad_norm"}
  logged = [entry for entry in result.history if "reward" in entry]
  assert [entry["step"] for entry in logged] == [4, 8, 12, 16]
  assert trl_names <= set(logged[-1])
  # No stop token: every completion runs to max_completion_length.
  assert logged[-1]["completions/mean_length"] == 8.0
  assert logged[-1]["completions/clipped_ratio"] == 1.0
  # Cumulative real tokens (prompt + completion) of every update, 16 rows of >= 9 tokens each.
  assert np.all(np.diff([m["num_tokens"] for m in history]) >= 16 * 9)
  assert logged[-1]["num_tokens"] == history[-1]["num_tokens"]

  files = sorted(glob.glob(os.path.join(tmp_path, "completions", "*.jsonl")))
  assert [os.path.basename(f) for f in files] == [f"completions_{s:06d}.jsonl"
                                                  for s in (4, 8, 12, 16)]
  with open(files[-1]) as f:
    rows = [json.loads(line) for line in f]
  assert len(rows) == 16  # 4 prompts x 4 generations
  assert {"prompt", "completion", "reward", "rewards/even_fraction", "advantage"} <= set(rows[0])
  assert rows[0]["prompt"].startswith("count ")

  assert {"checkpoint-8", "checkpoint-16", "metrics.jsonl"} <= set(os.listdir(tmp_path))
  assert os.path.exists(os.path.join(tmp_path, "config.json"))
  assert os.path.exists(os.path.join(tmp_path, "tokenizer_config.json"))


def test_num_iterations_kl_reference_and_exact_resume(setup, tmp_path):
  options = dict(max_steps=4, save_steps=2, num_iterations=2, beta=0.04, logging_steps=1,
                 importance_sampling_correction=True)
  _, straight = _run(setup, _config(tmp_path / "straight", **options))

  first, second = straight[0], straight[1]
  # One generation batch serves both updates.
  assert first["reward"] == second["reward"]
  # ... and its tokens are counted once, not once per update.
  assert first["num_tokens"] == second["num_tokens"] < straight[2]["num_tokens"]
  assert first["clip_ratio/region_mean"] == 0.0 and abs(first["approx_kl"]) < 1e-9
  # The second update compares against the stored old log-probs: the policy has moved.
  assert second["approx_kl"] > 1e-7
  # The reference is the initial policy: no divergence before the first update, some after.
  assert abs(first["kl"]) < 1e-6 and straight[3]["kl"] > 1e-7
  # Sampler and trainer agree, so the truncated IS ratio is 1.
  assert abs(first["sampling/importance_sampling_ratio/mean"] - 1.0) < 1e-3

  class Crash(Exception):
    pass

  def crash_at_three(step, metrics):
    if step == 3:
      raise Crash

  with pytest.raises(Crash):
    _run(setup, _config(tmp_path / "resumed", **options), on_step=crash_at_three)
  _, resumed = _run(setup, _config(tmp_path / "resumed", resume_from_checkpoint="true", **options))
  assert [m["step"] for m in resumed] == [3, 4]
  for name in ("loss", "reward", "kl", "approx_kl", "grad_norm", "num_tokens"):
    assert [m[name] for m in resumed] == [m[name] for m in straight[2:]], name


@pytest.mark.parametrize("estimator", ["grpo", "rloo", "reinforce_pp"])
def test_a_group_with_identical_rewards_has_zero_advantage(estimator):
  rewards = np.array([[1.0, 1.0, 1.0, 1.0], [0.0, 1.0, 0.0, 0.5]], np.float32)
  mask = np.ones((2, 4, 3), bool)
  config = _config("unused", advantage_estimator=estimator)
  advantages = grpo_module._advantages(rewards, mask, config)
  assert advantages.shape == (2, 4, 3)
  if estimator != "reinforce_pp":  # whitening over the batch shifts every token alike
    np.testing.assert_array_equal(advantages[0], 0.0)
    assert np.all(np.abs(advantages[1]) > 0)
  else:
    np.testing.assert_allclose(advantages[0], advantages[0, 0, 0])
    assert np.ptp(advantages[1]) > 0


def test_dynamic_sampling_keeps_informative_groups_first_at_a_static_size():
  rewards = np.array([[1, 1], [0, 1], [0, 0], [1, 0], [0.5, 0.5], [0, 2]], np.float32)
  rows, informative = grpo_module._select_groups(rewards, 4)
  # Groups 1, 3 and 5 differ; group 0 (the first uninformative one) refills the fourth slot.
  np.testing.assert_array_equal(rows, [2, 3, 6, 7, 10, 11, 0, 1])
  np.testing.assert_array_equal(informative, [True, True, True, False])
  rows, informative = grpo_module._select_groups(rewards[:2], 2)
  np.testing.assert_array_equal(rows, [0, 1, 2, 3])
  assert informative.all()  # nothing over-sampled: every group stays in the loss


def test_every_loss_type_has_ratio_one_on_the_first_update(setup):
  tokenizer, base, _ = setup
  model = ax.from_pretrained(base)
  from flax import nnx

  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  ids = np.array([[0, 5, 6, 7, 8, 9], [3, 4, 5, 6, 7, 8]], np.int32)
  batch = {"input_ids": ids, "attention_mask": np.array([[0, 1, 1, 1, 1, 1]] * 2, np.int32),
           "completion_mask": np.array([[0, 0, 0, 1, 1, 1]] * 2, np.int32)}
  old = online.stored_logprobs(graphdef, (params, rest), batch, temperature=0.7)
  batch.update(old_logp=old, advantages=jnp.where(old != 0, jnp.array([[1.0], [-1.0]]), 0.0))
  for loss_type in GRPO_LOSS_TYPES:
    objective = grpo_objective(graphdef, loss_type=loss_type, temperature=0.7,
                               max_completion_length=3)
    loss, metrics = objective.loss(params, rest, batch, jax.random.key(0))
    assert np.isfinite(float(loss)), loss_type
    assert abs(float(metrics["approx_kl"])) < 1e-9, loss_type
    clipped = metrics.get("clip_ratio/region_mean", metrics.get("cispo_clip_ratio"))
    assert float(clipped) == 0.0, loss_type
    expected = 3 * 2 if loss_type in ("dapo", "bnpo", "cispo") else 2
    assert float(objective.weight(batch)) == expected, loss_type


def test_optimizer_moments_are_laid_out_like_the_parameters(setup):
  """Replicated moments (optax's zeros_like under jit) made the second step compile again."""
  from flax import nnx

  from alignax.train.optim import make_optimizer
  from alignax.train.step import init_state

  _, base, mesh = setup
  params = nnx.state(ax.from_pretrained(base, mesh=mesh), nnx.Param)
  optimizer, _ = make_optimizer(1e-3, max_steps=1)
  opt_state = init_state(params, optimizer).opt_state
  param_shardings = [x.sharding for x in jax.tree.leaves(params)]
  moments = [node for node in jax.tree.leaves(
    opt_state, is_leaf=lambda n: jax.tree.structure(n) == jax.tree.structure(params))
    if jax.tree.structure(node) == jax.tree.structure(params)]
  assert len(moments) == 2  # Adam's mu and nu
  for moment in moments:
    shardings = [x.sharding for x in jax.tree.leaves(moment)]
    assert shardings == param_shardings
  assert any(s.spec != jax.sharding.PartitionSpec() for s in param_shardings)


def test_completions_per_device_must_hold_whole_groups():
  with pytest.raises(ValueError, match="per_device_train_batch_size=6 .* num_generations=4"):
    _config("unused", per_device_train_batch_size=6)
  with pytest.raises(ValueError, match="num_generations must be an int >= 2"):
    _config("unused", num_generations=1, per_device_train_batch_size=2)
  with pytest.raises(ValueError, match="save_steps=3 must be a multiple of num_iterations=2"):
    _config("unused", num_iterations=2, save_steps=3)


def test_a_prompt_longer_than_the_budget_is_named(setup, tmp_path):
  _, base, mesh = setup
  # The tiny Llama has 64 positions; 60 completion tokens leave 4 for the prompt. Checked over the
  # whole dataset when the run starts, before anything compiles.
  model = ModelConfig(model_name_or_path=base,
                      tokenizer_name_or_path=os.path.join(os.path.dirname(base), "tok"))
  with pytest.raises(ValueError, match=r"prompt 0 has \d+ tokens; with max_completion_length=60"):
    grpo(_config(tmp_path, max_completion_length=60), model=model, reward_funcs=[even_fraction],
         train_dataset=PROMPTS, mesh=mesh)


def test_reward_function_errors_surface_named(setup, tmp_path):
  def too_short(completions, **kwargs):
    return [1.0] * (len(completions) - 1)

  def broken(completions, **kwargs):
    raise KeyError("answer")

  with pytest.raises(RewardFunctionError, match="too_short"):
    _run(setup, _config(tmp_path / "short"), reward_funcs=[too_short])
  with pytest.raises(RewardFunctionError, match=r"'broken' \(reward source 0\) raised KeyError"):
    _run(setup, _config(tmp_path / "raises"), reward_funcs=[broken])


def test_the_cli_parses_trl_grpo_flags():
  from alignax import cli

  config, model, data_config, mesh = cli.parse("grpo", [
    "--model_name_or_path", "m", "--output_dir", "out", "--num_generations", "4",
    "--per_device_train_batch_size", "8", "--reward_funcs", "accuracy_reward", "mod.fn",
    "--reward_weights", "1", "0.5", "--loss_type", "dr_grpo", "--beta", "0.04",
    "--epsilon_high", "0.28", "--scale_rewards", "none"])
  assert isinstance(config, GRPOConfig) and model.model_name_or_path == "m"
  assert config.reward_funcs == ["accuracy_reward", "mod.fn"] and config.reward_weights == [1.0, 0.5]
  assert (config.loss_type, config.beta, config.epsilon_high, config.scale_rewards) == (
    "dr_grpo", 0.04, 0.28, "none")
  assert cli.main(["grpo", "--model_name_or_path", "m", "--output_dir", "out",
                   "--loss_type", "nope"]) == 2


def test_masked_truncated_rows_leave_the_sampler_consistency_metrics(setup, tmp_path):
  """With no stop token every completion is truncated; masked out, they have no stored log-probs,
  so they must not count as a sampler/trainer mismatch (they did: |0 - sampler logp|)."""
  _, history = _run(setup, _config(tmp_path, max_steps=1, logging_steps=1,
                                   mask_truncated_completions=True))
  assert history[0]["completions/clipped_ratio"] == 1.0
  assert history[0]["sampling/sampling_logp_difference/max"] < 1e-4
  assert history[0]["grad_norm"] == 0.0  # no row is left in the loss
