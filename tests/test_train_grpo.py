"""The GRPO trainer (alignax.train.grpo): learning on a rule-based reward, the first-update and
stored-old-log-prob invariants, the reference only when beta > 0, exact resume, TRL's metric names,
the completions log, and named errors for bad input."""

import glob
import json
import os
import types

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
from alignax.train.grpo import (GRPO_LOSS_TYPES, GRPOConfig, GRPOOptionsWarning, grpo,
                                grpo_objective)
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

  updated = [m for m in history if "skipped_updates" not in m]
  assert len(updated) >= 12  # a converged round (every group agrees) skips its update
  for m in updated:
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
  # A line holds its window's means (it held the last step's values), and the latest num_tokens.
  for line, window in zip(logged, np.split(np.arange(16), 4)):
    np.testing.assert_allclose(line["reward"], np.mean([history[i]["reward"] for i in window]),
                               rtol=1e-6)
    np.testing.assert_allclose(
      line["completions/mean_length"],
      np.mean([history[i]["completions/mean_length"] for i in window]), rtol=1e-6)
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
  # Dynamic sampling with a per-sequence loss and the entropy bonus: the stored batch carries the
  # rows in the loss (in_loss), which the compiled step's weights and bonus read. Two prompts
  # kept of four drawn: the sampler runs the other tests' shapes.
  options = dict(max_steps=4, save_steps=2, num_iterations=2, beta=0.04, logging_steps=1,
                 importance_sampling_correction=True, dynamic_sampling=True, loss_type="grpo",
                 entropy_coef=0.01, per_device_train_batch_size=4)
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


@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
def test_a_group_with_identical_rewards_has_zero_advantage(estimator):
  rewards = np.array([[1.0, 1.0, 1.0, 1.0], [0.0, 1.0, 0.0, 0.5]], np.float32)
  mask = np.ones((2, 4, 3), bool)
  mask[1, 0, 2] = False  # unequal lengths: no whitening-like shift may creep in
  config = _config("unused", advantage_estimator=estimator)
  advantages = grpo_module._advantages(rewards, mask, config)
  assert advantages.shape == (2, 4, 3)
  np.testing.assert_array_equal(advantages[0], 0.0)
  assert np.all(np.abs(advantages[1][mask[1]]) > 0)


def test_reinforce_pp_shifts_a_uniform_group_by_the_batch_whitening():
  """Under REINFORCE++ a group whose rewards agree is not at 0: the whitening subtracts the
  batch's token-weighted mean of the centred rewards, nonzero when lengths differ (GRPOConfig
  documents it). Expected values from NumPy: (x - mean) / sqrt(var(ddof=1) + 1e-8) over tokens."""
  rewards = np.array([[1.0, 1.0], [0.0, 1.0]], np.float32)
  mask = np.zeros((2, 2, 4), bool)
  mask[0, :, :2] = True  # the uniform group: 2 tokens each
  mask[1, 0, :4] = True  # a 4-token wrong answer and a 1-token right one
  mask[1, 1, :1] = True
  advantages = grpo_module._advantages(rewards, mask, _config(
    "unused", advantage_estimator="reinforce_pp", num_generations=2))
  centred = np.broadcast_to(np.array([[0.0, 0.0], [-0.5, 0.5]])[..., None], mask.shape)
  tokens = centred[mask]
  expected = (tokens - tokens.mean()) / np.sqrt(tokens.var(ddof=1) + 1e-8)
  np.testing.assert_allclose(advantages[mask], expected, rtol=1e-5)
  uniform = advantages[0][mask[0]]
  np.testing.assert_allclose(uniform, uniform[0])
  assert abs(uniform[0]) > 0.1


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
  # save_steps need not be a multiple of num_iterations (the loop saves at the next round's end):
  # TRL's num_iterations=3 with the default save_steps=500 constructs.
  assert GRPOConfig(output_dir="unused", num_iterations=3).save_steps == 500
  with pytest.raises(ValueError, match="max_steps=4 must be a multiple of num_iterations=3"):
    _config("unused", num_iterations=3)


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
  config, *_ = cli.parse("grpo", [
    "--model_name_or_path", "m", "--output_dir", "out", "--num_generations", "4",
    "--per_device_train_batch_size", "8", "--importance_sampling_level", "sequence",
    "--loss_type", "grpo", "--epsilon", "0.001", "--reward_funcs", "soft_overlong_punishment",
    "--soft_punish_cache", "4", "--reward_timeout", "5", "--reward_on_timeout", "none"])
  assert (config.ratio_level, config.clip_range, config.soft_punish_cache,
          config.reward_on_timeout) == ("sequence", (0.001, None), 4, "none")
  # TRL's legacy boolean spelling of scale_rewards.
  for flag, meaning in (("true", "group"), ("false", "none")):
    config, *_ = cli.parse("grpo", ["--model_name_or_path", "m", "--output_dir", "out",
                                    "--scale_rewards", flag])
    assert config.scale_rewards == meaning, flag
  assert _config("unused", scale_rewards="false").reward_scale == "none"


def test_k1_in_the_loss_warns():
  with pytest.warns(GRPOOptionsWarning, match="kl_estimator='k1' in the loss"):
    _config("unused", beta=0.04, kl_estimator="k1")
  import warnings

  with warnings.catch_warnings():
    warnings.simplefilter("error")
    _config("unused", beta=0.0, kl_estimator="k1")  # no KL term: nothing to warn about
    _config("unused", beta=0.04, kl_estimator="k3")


def test_sequence_importance_ratio_metrics_are_per_row():
  """In a sequence_* mode each completion has one ratio; TRL reduces the [B, 1] ratios. The
  metric was token-weighted (a long completion's ratio counted once per token)."""
  rollout = grpo_module._Rollout.__new__(grpo_module._Rollout)
  valid = np.array([[1, 0, 0], [1, 1, 1], [0, 0, 0]], bool)  # the third row is out of the loss
  old = np.array([[np.log(0.5), 0, 0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]], np.float32)
  for mode, expected in (("sequence_truncate", (0.5, 0.75, 1.0)),
                         ("token_truncate", (0.5, 0.875, 1.0))):
    rollout.config = types.SimpleNamespace(importance_sampling_mode=mode,
                                           importance_sampling_cap=3.0)
    weights = rollout._importance_weights(old, np.zeros_like(old), valid)
    metrics = rollout._importance_metrics(weights, valid)
    got = tuple(metrics[f"sampling/importance_sampling_ratio/{n}"] for n in ("min", "mean", "max"))
    np.testing.assert_allclose(got, expected, rtol=1e-6, err_msg=mode)


def test_rows_out_of_the_loss_leave_the_per_sequence_row_count(setup):
  """Dynamic sampling's refill rows (in_loss 0, no loss token) counted in the row mean of grpo,
  gspo and dr_grpo, shrinking their loss and gradient by kept/total rows: the batch with one must
  give the loss, the policy_loss metric and the micro-batch weight of the batch without it."""
  from flax import nnx

  _, base, _ = setup
  graphdef, params, rest = nnx.split(ax.from_pretrained(base), nnx.Param, ...)
  ids = np.array([[0, 5, 6, 7, 8, 9], [3, 4, 5, 6, 7, 8], [3, 4, 5, 6, 7, 8]], np.int32)
  batch = {"input_ids": ids, "attention_mask": np.ones_like(ids),
           "completion_mask": np.array([[0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1], [0] * 6],
                                       np.int32),
           "in_loss": np.array([1.0, 1.0, 0.0], np.float32)}
  old = np.asarray(online.stored_logprobs(graphdef, (params, rest), batch, temperature=1.0))
  batch.update(old_logp=old, advantages=np.where(old != 0, np.array([[1.0], [0.5], [0.0]]), 0.0))
  kept = {k: v[:2] for k, v in batch.items() if k != "in_loss"}
  for loss_type in ("grpo", "dr_grpo"):
    objective = grpo_objective(graphdef, loss_type=loss_type, max_completion_length=4)
    with_refill = objective.loss(params, rest, batch, jax.random.key(0))
    without = objective.loss(params, rest, kept, jax.random.key(0))
    np.testing.assert_allclose(float(with_refill[0]), float(without[0]), rtol=1e-5,
                               err_msg=loss_type)
    np.testing.assert_allclose(float(with_refill[1]["policy_loss"]),
                               float(without[1]["policy_loss"]), rtol=1e-5, err_msg=loss_type)
    assert float(objective.weight(batch)) == float(objective.weight(kept)) == 2.0, loss_type


def test_masked_truncated_rows_leave_the_sampler_consistency_metrics(setup, tmp_path):
  """With no stop token every completion is truncated; masked out, they have no stored log-probs,
  so they must not count as a sampler/trainer mismatch (they did: |0 - sampler logp|)."""
  _, history = _run(setup, _config(tmp_path, max_steps=1, logging_steps=1,
                                   mask_truncated_completions=True,
                                   importance_sampling_correction=True))
  assert history[0]["completions/clipped_ratio"] == 1.0
  assert history[0]["sampling/sampling_logp_difference/max"] < 1e-4
  # No token left to weigh: the importance-ratio statistics are 0, not a crash on an empty array.
  assert history[0]["sampling/importance_sampling_ratio/max"] == 0.0
  # No row is left in the loss: the update is skipped, not taken with a zero gradient.
  assert history[0]["skipped_updates"] == 1.0 and "grad_norm" not in history[0]


# --- defects of the last review, each with the case that exposed it ----------------------------


def _runner_output(per_source, names=("a", "b")):
  """A RewardRunner's output for per-source rewards [N, S] (None: the source skipped it)."""
  from alignax.rewards import RewardRunner

  def source(column):
    def score(completions, **kwargs):
      return [row[column] for row in per_source]
    score.__name__ = names[column]
    return score

  with pytest.warns(UserWarning, match="returned None"):
    return RewardRunner([source(i) for i in range(len(names))])(
      ["p0", "p1"], [f"c{i}" for i in range(len(per_source))], num_generations=4)


def test_a_completion_no_reward_scored_is_out_of_the_group_statistics():
  """Every source returned None for completions 1 and 5: TRL gives them reward NaN, leaves them
  out of the group mean and std, and zeroes their advantage (they got reward 0 and an advantage)."""
  per_source = [[1.0, None], [None, None], [0.0, 0.5], [2.0, None],
                [None, 1.0], [None, None], [0.0, None], [3.0, 0.0]]
  scored = _runner_output(per_source)
  rewards = grpo_module._rewards(scored).reshape(2, 4)
  assert np.isnan(rewards[0, 1]) and np.isnan(rewards[1, 1])
  mask = np.ones((2, 4, 3), bool)
  advantages = grpo_module._advantages(rewards, mask, _config("unused"))
  assert np.isfinite(advantages).all()
  np.testing.assert_array_equal(advantages[:, 1], 0.0)
  for p in range(2):
    kept = [0, 2, 3]
    expected = ax.group_advantages(rewards[p, kept][None], scale="group", eps=1e-4)[0]
    np.testing.assert_allclose(advantages[p, kept, 0], expected, rtol=1e-5)
  metrics = grpo_module._reward_metrics(rewards, scored)
  scorable = rewards[~np.isnan(rewards)]
  np.testing.assert_allclose(metrics["reward"], scorable.mean(), rtol=1e-6)
  # reward_std is TRL's: the std over the batch of rewards, not the mean of the group stds.
  np.testing.assert_allclose(metrics["reward_std"], scorable.std(ddof=1), rtol=1e-6)
  assert metrics["rewards/all_none_count"] == 2.0


def test_reward_std_is_the_std_over_the_batch():
  """TRL logs nanstd(rewards) over the batch whatever scale_rewards is (it was the mean group
  std)."""
  import types

  rewards = np.array([[0.0, 1.0], [4.0, 5.0]], np.float32)
  metrics = grpo_module._reward_metrics(rewards, types.SimpleNamespace(metrics={}))
  np.testing.assert_allclose(metrics["reward_std"], np.std([0, 1, 4, 5], ddof=1), rtol=1e-6)
  assert metrics["frac_reward_zero_std"] == 0.0 and metrics["reward"] == 2.5
  # frac_reward_zero_std is over the std the advantages divide by: TRL's batch std under
  # scale_rewards="batch" (it was always the group's).
  agree = np.array([[1.0, 1.0], [0.0, 1.0]], np.float32)
  assert grpo_module._reward_metrics(agree, types.SimpleNamespace(metrics={}))[
    "frac_reward_zero_std"] == 0.5
  assert grpo_module._reward_metrics(agree, types.SimpleNamespace(metrics={}), scale="batch")[
    "frac_reward_zero_std"] == 0.0
  assert grpo_module._reward_metrics(np.ones((2, 2), np.float32), types.SimpleNamespace(
    metrics={}), scale="batch")["frac_reward_zero_std"] == 1.0


def test_estimators_scale_as_their_papers_and_meaningless_combinations_are_named():
  rewards = np.array([[1.0, 0.0, 0.0, 0.5], [2.0, 2.0, 0.0, 1.0]], np.float32)
  mask = np.ones((2, 4, 3), bool)

  def advantages(**options):
    return grpo_module._advantages(rewards, mask, _config("unused", **options))[..., 0]

  # RLOO: the leave-one-out baseline, no std scaling unless asked (it divided by the group std).
  np.testing.assert_allclose(advantages(advantage_estimator="rloo"),
                             ax.group_advantages(rewards, scale="none", leave_one_out=True),
                             rtol=1e-6)
  group_std = rewards.std(axis=-1, ddof=1, keepdims=True)
  loo = ax.group_advantages(rewards, scale="none", leave_one_out=True)
  np.testing.assert_allclose(advantages(advantage_estimator="rloo", scale_rewards="group"),
                             loo / (group_std + 1e-4), rtol=1e-5)
  # TRL's RLOO normalize_advantages: a z-score of the advantages over the batch.
  np.testing.assert_allclose(advantages(advantage_estimator="rloo", scale_rewards="batch"),
                             (loo - loo.mean()) / (loo.std(ddof=1) + 1e-4), rtol=1e-5)
  # GRPO keeps its group std by default.
  np.testing.assert_allclose(advantages(), ax.group_advantages(rewards, eps=1e-4), rtol=1e-5)
  # REINFORCE++-baseline: group-centred, whitened over the batch's tokens; nothing else.
  np.testing.assert_allclose(
    grpo_module._advantages(rewards, mask, _config("unused", advantage_estimator="reinforce_pp")),
    ax.reinforce_pp_advantages(ax.group_advantages(rewards, scale="none"), mask), rtol=1e-5,
    atol=1e-6)
  for scale in ("group", "none"):
    with pytest.raises(ValueError, match=f"scale_rewards='{scale}' has no REINFORCE"):
      _config("unused", advantage_estimator="reinforce_pp", scale_rewards=scale)


def test_the_clip_range_follows_the_ratio_level_and_incoherent_levels_warn():
  import warnings

  with warnings.catch_warnings():
    warnings.simplefilter("error")  # the defaults and GSPO's recipe are coherent: no warning
    default = _config("unused")
    gspo = _config("unused", loss_type="gspo")
    recipe = _config("unused", loss_type="grpo", importance_sampling_level="sequence")
  assert default.clip_range == (0.2, None) and default.ratio_level == "token"
  # A sequence ratio moves ~1e-3 where token ratios move ~0.2: GSPO's 3e-4 / 4e-4 (it kept 0.2).
  assert gspo.clip_range == recipe.clip_range == (3e-4, 4e-4)
  assert gspo.ratio_level == recipe.ratio_level == "sequence"
  key = grpo_module._StepKey.of(gspo, max_steps=4)  # what the compiled objective is built with
  assert (key.epsilon, key.epsilon_high, key.importance_sampling_level) == (3e-4, 4e-4, "sequence")
  assert _config("unused", loss_type="gspo", epsilon=0.1).clip_range == (0.1, None)
  assert _config("unused", epsilon=0.1, epsilon_high=0.28).clip_range == (0.1, 0.28)

  with pytest.warns(GRPOOptionsWarning, match="weights every completion's clipped term by its"):
    _config("unused", importance_sampling_level="sequence")  # with dapo's token sum
  with pytest.warns(GRPOOptionsWarning, match="'sequence_truncate' or 'sequence_mask'"):
    _config("unused", loss_type="gspo", importance_sampling_correction=True)
  with pytest.raises(ValueError, match="loss_type='gspo' is the sequence-level ratio"):
    _config("unused", loss_type="gspo", importance_sampling_level="token")


def test_overlong_punishment_and_timeouts_are_reachable_from_the_config():
  import time

  def hangs(completions, **kwargs):
    time.sleep(2)
    return [1.0] * len(completions)

  config = _config("unused", reward_funcs=["soft_overlong_punishment"], soft_punish_cache=2,
                   reward_timeout=0.2, reward_on_timeout="none")
  runner = grpo_module._reward_runner(config, None, tokenizer=None, mesh=None)
  # max_completion_length=8 is the budget, the last 2 tokens the ramp.
  out = runner(["p"], ["a", "b"], [[5] * 8, [5] * 7], num_generations=2)
  np.testing.assert_allclose(out.rewards, [-1.0, -0.5])
  runner = grpo_module._reward_runner(config, [hangs], tokenizer=None, mesh=None)
  with pytest.warns(UserWarning, match="returned None"):
    out = runner(["p"], ["a", "b"], [[5], [5]], num_generations=2)
  assert out.metrics["rewards/hangs/timeouts"] == 1.0 and out.all_none.all()
  with pytest.raises(ValueError, match="soft_punish_cache must be an int in"):
    _config("unused", soft_punish_cache=9)


def test_the_entropy_bonus_is_the_token_mean_whatever_the_aggregation(setup):
  """TRL's bonus is the mean entropy per completion token for every loss type; it was aggregated
  like the policy term (sums over M for dr_grpo, a mean of per-sequence means for grpo). And the
  token means among the metrics are averaged over micro-batches by tokens, not rows."""
  from flax import nnx

  from alignax.train.step import _average_metrics

  _, base, _ = setup
  graphdef, params, rest = nnx.split(ax.from_pretrained(base), nnx.Param, ...)
  ids = np.array([[0, 5, 6, 7, 8, 9], [3, 4, 5, 6, 7, 8]], np.int32)
  batch = {"input_ids": ids, "attention_mask": np.ones_like(ids),
           "completion_mask": np.array([[0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1]], np.int32)}
  old = online.stored_logprobs(graphdef, (params, rest), batch, temperature=1.0)
  batch.update(old_logp=np.asarray(old), advantages=np.where(np.asarray(old) != 0, 1.0, 0.0))
  assert (np.asarray(old) != 0).sum(axis=1).tolist() == [4, 2]  # unequal lengths
  key = jax.random.key(0)
  for loss_type, extra in (("dr_grpo", {}),
                           # the rollout's entropy_norm: rows / loss tokens
                           ("grpo", {"entropy_norm": np.full(2, 2 / 6, np.float32)})):
    batch.update(extra)
    objective = grpo_objective(graphdef, loss_type=loss_type, entropy_coef=0.5,
                               max_completion_length=4)
    value, metrics = objective.loss(params, rest, batch, key)
    # beta=0: the loss is the policy term minus the bonus, which must be the coefficient times
    # the token mean of the entropy (the metric).
    np.testing.assert_allclose(float(metrics["policy_loss"] - value),
                               0.5 * float(metrics["entropy"]), rtol=1e-5, err_msg=loss_type)

  # Two micro-batches of one row each, as accumulation splits the generation batch: with
  # entropy_norm the shares add up to the whole batch's loss.
  micro = {k: np.stack([v[:1], v[1:]]) for k, v in batch.items()}
  outs = [objective.loss(params, rest, {k: v[i] for k, v in micro.items()}, key) for i in range(2)]
  shares = jnp.array([0.5, 0.5])  # per-sequence weights: one row each
  np.testing.assert_allclose(float(outs[0][0] + outs[1][0]) / 2, float(value), rtol=1e-5)
  averaged = _average_metrics(objective, micro, shares,
                              {k: jnp.stack([o[1][k] for o in outs]) for k in metrics})
  for name in ("entropy", "approx_kl", "clip_ratio/region_mean"):
    np.testing.assert_allclose(float(averaged[name]), float(metrics[name]), rtol=2e-6,
                               atol=1e-9, err_msg=name)


def test_a_round_with_nothing_to_learn_skips_the_optimizer_and_logp_is_micro_batched(
    setup, tmp_path, monkeypatch):
  """Every group agrees (a constant reward, beta=0): the update would be a zero gradient, yet AdamW
  moved its moments, its bias correction and (weight decay) the weights. And the old log-probs
  run over the training's micro-batches, not the whole generation batch at once."""
  shapes = []
  micro_batched = grpo_module.micro_batched_logprobs

  def spy(graphdef, states, batch, **options):
    shapes.append(batch["input_ids"].shape)
    return micro_batched(graphdef, states, batch, **options)

  monkeypatch.setattr(grpo_module, "micro_batched_logprobs", spy)
  tokenizer, base, mesh = setup
  model = ax.from_pretrained(base, mesh=mesh)
  from flax import nnx

  before = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
  config = _config(tmp_path, max_steps=2, logging_steps=2, weight_decay=0.1,
                   per_device_train_batch_size=4, gradient_accumulation_steps=2)
  result = grpo(config, model=model, reward_funcs=[lambda completions, **k: [1.0] * len(
    completions)], tokenizer=tokenizer, train_dataset=PROMPTS, mesh=mesh)
  # 2 rounds, each [2 micro-batches, 8 rows (4 completions x 2 devices), L].
  assert len(shapes) == 2 and all(s[:2] == (2, 8) for s in shapes), shapes
  line = [h for h in result.history if "reward" in h][-1]
  assert line["skipped_updates"] == 2.0 and "loss" not in line
  assert line["frac_reward_zero_std"] == 1.0
  assert int(result.state.step) == 2
  import optax

  kinds = (optax.ScaleByScheduleState, optax.ScaleByAdamState)
  counts = {type(node).__name__: int(node.count) for node in jax.tree.leaves(
    result.state.opt_state, is_leaf=lambda n: isinstance(n, kinds)) if isinstance(node, kinds)}
  # Adam never stepped; the learning-rate schedule kept pace with the skipped steps.
  assert counts == {"ScaleByAdamState": 0, "ScaleByScheduleState": 2}
  after = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
    np.testing.assert_array_equal(a, b)


# Without stop tokens every completion has the same length: no length-controlled win rate.
@pytest.mark.filterwarnings("ignore:the length-controlled win rate")
def test_in_training_eval_logs_against_the_frozen_starting_policy(setup, tmp_path):
  """eval_num_prompts > 0: every eval_steps (and at the end) the policy is sampled on the eval
  prompts and compared with a frozen copy of the starting model: eval/reward, eval/win_rate and
  eval/kl on lines of their own; the baseline's numbers never move, and the KL to it grows from
  0 once the policy has learned."""
  tokenizer, base, mesh = setup
  model = ax.from_pretrained(base, mesh=mesh)
  config = _config(tmp_path, max_steps=4, logging_steps=1, eval_steps=2, eval_num_prompts=2,
                   eval_num_samples=2, eval_max_completion_length=8,
                   per_device_eval_batch_size=1)
  result = grpo(config, model=model, reward_funcs=[even_fraction], tokenizer=tokenizer,
                train_dataset=PROMPTS, mesh=mesh,
                eval_dataset=[{"prompt": "count 99 pears"}, {"prompt": "count 7 plums"}])
  lines = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  evals = [m for m in lines if "eval/reward" in m]
  assert [m["step"] for m in evals] == [2, 4]
  assert all("loss" not in m for m in evals)  # a line of its own
  for m in evals:
    for key in ("eval/reward", "eval/win_rate", "eval/kl", "eval/reward_baseline"):
      assert np.isfinite(m[key]), (key, m)
    assert 0.0 <= m["eval/win_rate"] <= 1.0
  # A baseline that followed the policy (no copy before the first, donating step) would give KL 0
  # and a moving baseline reward.
  assert evals[0]["eval/reward_baseline"] == evals[1]["eval/reward_baseline"]
  assert evals[1]["eval/kl"] > 1e-3
  assert [h["step"] for h in result.history if "eval/kl" in h] == [2, 4]


def test_multi_host_refusals_are_named(setup, tmp_path, monkeypatch):
  """With several processes, each host scores its own rows: reward models (a forward on the global
  mesh) and the one-host generation evaluation are refused by name before any work."""
  tokenizer, base, mesh = setup
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  model = ax.from_pretrained(base, mesh=mesh)
  with pytest.raises(ValueError, match="eval_num_prompts=2: the in-training generation"):
    grpo(_config(tmp_path, eval_num_prompts=2), model=model, reward_funcs=[even_fraction],
         tokenizer=tokenizer, train_dataset=PROMPTS, mesh=mesh)
  monkeypatch.setattr(jax, "process_count", lambda: 3)
  # 8 completions x 2 devices / 4 per group = 4 prompts per round: no whole share for 3 hosts.
  with pytest.raises(ValueError, match="the 4 prompts drawn per generation batch do not split "
                                       "over the 3 processes"):
    grpo(_config(tmp_path), model=model, reward_funcs=[even_fraction], tokenizer=tokenizer,
         train_dataset=PROMPTS, mesh=mesh)
  from alignax.rewards import RewardModelScorer

  scorer = RewardModelScorer.__new__(RewardModelScorer)
  with pytest.raises(ValueError, match=r"reward models \(\['RewardModelScorer'\]\)"):
    grpo_module._check_multi_host_rewards(types.SimpleNamespace(sources=[even_fraction, scorer]))
