"""The PPO trainer (alignax.train.ppo_trainer): learning against a trained Bradley-Terry reward
model with TRL's default critic (the reward model's weights), the first-minibatch invariants, the
adaptive KL coefficient, frozen vs EMA reference, GAE against a hand loop, exact resume (KL
coefficient and EMA reference included), a value head on the policy, the `alignax ppo` command
line, and named errors for bad input."""

import glob
import json
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import alignax as ax
from alignax.sharding import make_mesh
from alignax.train.config import ModelConfig
from alignax.train.ppo_trainer import (PPOConfig, _Reference, _reward_runner, minibatch_rows, ppo,
                                       ppo_advantages)
from alignax.train.step import TrainState
from train_factories import tiny_tokenizer_and_llama

PROMPTS = [{"prompt": f"count {i} apples"} for i in range(16)]
RESPONSE_LENGTH = 8
UPDATES = 4  # num_ppo_epochs=2 x num_mini_batches=2


def _even_tokens(rng, prompt, fractions):
  """Prompt + ``RESPONSE_LENGTH`` tokens, each even with about the given probability."""
  rows = []
  for fraction in fractions:
    even = rng.integers(2, 256, size=RESPONSE_LENGTH) * 2
    odd = rng.integers(1, 256, size=RESPONSE_LENGTH) * 2 + 1
    tokens = np.where(np.arange(RESPONSE_LENGTH) < rng.binomial(RESPONSE_LENGTH, fraction),
                      even, odd)
    rows.append(prompt + rng.permutation(tokens).tolist())
  return np.array(rows, np.int32)


def _train_reward_model(base, tokenizer):
  """A Bradley-Terry reward model (alignax.bradley_terry_loss) on a decidable preference: of two
  completions the one with more even token ids wins. A random policy samples about half even."""
  model = ax.from_pretrained(base, head="score", num_labels=1)
  prompt = tokenizer("count 3 apples")["input_ids"]
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  optimizer = optax.adam(1e-2)
  opt_state = optimizer.init(params)

  @jax.jit
  def step(params, opt_state, chosen, rejected):
    def loss(p):
      scorer = nnx.merge(graphdef, p, rest)
      return ax.bradley_terry_loss(scorer(chosen).scores[:, 0], scorer(rejected).scores[:, 0])[0]

    value, grads = jax.value_and_grad(loss)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value

  rng = np.random.default_rng(0)
  for _ in range(60):
    a, b = rng.uniform(size=32), rng.uniform(size=32)
    params, opt_state, _ = step(params, opt_state, _even_tokens(rng, prompt, np.maximum(a, b)),
                                _even_tokens(rng, prompt, np.minimum(a, b)))
  nnx.update(model, params)
  # It ranks all-even above half-even above all-odd completions it never saw.
  scores = np.asarray(model(jnp.asarray(np.concatenate(
    [_even_tokens(rng, prompt, [f] * 16) for f in (1.0, 0.5, 0.0)]))).scores[:, 0])
  means = scores.reshape(3, 16).mean(axis=1)
  assert means[0] > means[1] + 1 > means[2] + 2, means
  return model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("ppo")
  tokenizer, base = tiny_tokenizer_and_llama(root)
  reward_dir = str(root / "rm")
  ax.save_pretrained(_train_reward_model(base, tokenizer), reward_dir)
  tokenizer.save_pretrained(reward_dir)
  # Two devices keep the compile short on a shared CPU; rows are still split over fsdp.
  mesh = make_mesh(fsdp=2, devices=jax.devices()[:2])
  return types.SimpleNamespace(root=root, tokenizer=tokenizer, base=base, reward_dir=reward_dir,
                               mesh=mesh)


def _config(output_dir, **overrides):
  options = dict(output_dir=str(output_dir), max_steps=16 * UPDATES, learning_rate=1e-2,
                 lr_scheduler_type="constant", per_device_train_batch_size=4, num_mini_batches=2,
                 num_ppo_epochs=2, response_length=RESPONSE_LENGTH, logging_steps=UPDATES,
                 save_steps=8 * UPDATES, disable_tqdm=True)
  return PPOConfig(**{**options, **overrides})


def _run(setup, config, *, on_step=None, history=None, **kwargs):
  model = ax.from_pretrained(setup.base, mesh=setup.mesh)
  history = [] if history is None else history

  def record(step, metrics):
    history.append(dict(metrics, step=step))
    if on_step is not None:
      on_step(step, metrics)

  kwargs.setdefault("reward_model", setup.reward_dir)
  result = ppo(config, model=model, tokenizer=setup.tokenizer, train_dataset=PROMPTS,
               mesh=setup.mesh, on_step=record, **kwargs)
  return result, history


@pytest.fixture(scope="module")
def learned(setup, tmp_path_factory):
  """16 rounds with TRL's defaults for the critic (the reward model's weights) and a frozen
  reference; shared by the learning, invariant and output tests."""
  output_dir = tmp_path_factory.mktemp("learned")
  result, history = _run(setup, _config(output_dir))
  return output_dir, result, history


def test_ppo_raises_the_reward_models_score(learned):
  _, _, history = learned
  scores = [m["objective/scores"] for m in history[::UPDATES]]
  start, end = np.mean(scores[:2]), np.mean(scores[-3:])
  # The reward model's scores span about -1 (all odd) to 3.5 (all even).
  assert end > start + 1.5, scores
  # ... while the policy drifts from the frozen reference, which the reward pays for.
  kls = [m["objective/kl"] for m in history[::UPDATES]]
  assert abs(kls[0]) < 1e-5 and kls[-1] > 0.5, kls
  last = history[-1]
  np.testing.assert_allclose(last["objective/rlhf_reward"],
                             last["objective/scores"] + last["objective/non_score_reward"],
                             rtol=1e-5)
  np.testing.assert_allclose(last["objective/non_score_reward"], -0.05 * last["objective/kl"],
                             rtol=1e-4, atol=1e-6)


def test_the_first_minibatch_of_each_round_has_ratio_one(learned):
  _, _, history = learned
  for m in history:
    # Old log-probs, values and the sampler agree at rollout time (same temperature).
    assert m["sampling/sampling_logp_difference/max"] < 1e-4
    if (m["step"] - 1) % UPDATES == 0:  # the policy has not moved since it sampled
      assert abs(m["val/ratio"] - 1.0) < 1e-6, m["step"]
      assert m["policy/clipfrac_avg"] == 0.0, m["step"]
      assert m["policy/approxkl_avg"] < 1e-10, m["step"]
  # Later minibatches see a moved policy.
  assert max(m["policy/approxkl_avg"] for m in history) > 1e-4


def test_trl_metric_names_completions_and_outputs(learned):
  output_dir, result, _ = learned
  logged = [entry for entry in result.history if "objective/kl" in entry]
  assert [entry["step"] for entry in logged] == list(range(UPDATES, 16 * UPDATES + 1, UPDATES))
  trl_names = {"objective/kl", "objective/entropy", "objective/non_score_reward",
               "objective/rlhf_reward", "objective/scores", "policy/approxkl_avg",
               "policy/clipfrac_avg", "loss/policy_avg", "loss/value_avg", "val/clipfrac_avg",
               "policy/entropy_avg", "val/ratio", "val/ratio_var", "val/num_eos_tokens", "lr",
               "episode", "num_tokens", "completions/mean_length",
               "sampling/sampling_logp_difference/mean", "sampling/sampling_logp_difference/max",
               "time/generation", "time/reward", "time/train", "step_time"}
  assert trl_names <= set(logged[-1]), trl_names - set(logged[-1])
  # 16 prompts per round (4 per device x 2 devices x 2 minibatches); no stop token by default.
  assert logged[0]["episode"] == 16 and logged[-1]["episode"] == 16 * 16
  assert logged[-1]["completions/mean_length"] == RESPONSE_LENGTH

  files = sorted(glob.glob(os.path.join(output_dir, "completions", "*.jsonl")))
  assert len(files) == 16
  with open(files[-1]) as f:
    rows = [json.loads(line) for line in f]
  assert len(rows) == 16 and {"prompt", "completion", "score", "kl"} <= set(rows[0])
  assert {"checkpoint-32", "checkpoint-64", "metrics.jsonl", "config.json"} <= set(
    os.listdir(output_dir))
  # The exported policy is a causal LM that loads back.
  assert ax.from_pretrained(str(output_dir)).config.vocab_size == 512


def test_gae_and_whitening_match_a_hand_loop():
  """TRL's loop (ppo_trainer.py, steps 4-6), in NumPy, on rows of different lengths."""
  rng = np.random.default_rng(1)
  rows, length = 3, 7
  lengths = np.array([7, 4, 2])
  mask = np.arange(length) < lengths[:, None]
  logp, ref_logp = (np.where(mask, rng.normal(-2, 0.5, (rows, length)), 0) for _ in range(2))
  values = np.where(mask, rng.normal(0, 1, (rows, length)), 0)
  scores = rng.normal(0, 1, rows)
  for estimator, whiten in (("k1", False), ("k3", True)):
    gamma, lam, beta = 0.9, 0.8, 0.1
    out = ppo_advantages(*(jnp.asarray(x, jnp.float32) for x in (logp, ref_logp, values, scores)),
                         jnp.asarray(mask), jnp.float32(beta), kl_estimator=estimator,
                         whiten_rewards=whiten, gamma=gamma, lam=lam)
    log_ratio = ref_logp - logp
    kl = -log_ratio if estimator == "k1" else np.expm1(log_ratio) - log_ratio
    rewards = np.where(mask, -beta * kl, 0)
    rewards[np.arange(rows), lengths - 1] += scores
    if whiten:  # no mean shift, Bessel-corrected variance over the valid tokens
      valid = rewards[mask]
      rewards = np.where(mask, (rewards - valid.mean()) / np.sqrt(valid.var(ddof=1) + 1e-8)
                         + valid.mean(), 0)
    advantages = np.zeros((rows, length))
    for i in range(rows):
      last = 0.0
      for t in reversed(range(lengths[i])):
        next_value = values[i, t + 1] if t + 1 < lengths[i] else 0.0
        last = rewards[i, t] + gamma * next_value - values[i, t] + gamma * lam * last
        advantages[i, t] = last
    returns = np.where(mask, advantages + values, 0)
    valid = advantages[mask]
    whitened = np.where(mask, (advantages - valid.mean()) / np.sqrt(valid.var(ddof=1) + 1e-8), 0)
    np.testing.assert_allclose(out["rewards"], rewards, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["returns"], returns, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["advantages"], whitened, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out["kl"], np.where(mask, kl, 0), rtol=1e-5, atol=1e-6)


def test_minibatches_are_a_fresh_partition_per_epoch():
  first, second = (minibatch_rows(0, 3, epoch, 16, 4) for epoch in (0, 1))
  for split in (first, second):
    assert [len(rows) for rows in split] == [4] * 4
    np.testing.assert_array_equal(np.sort(np.concatenate(split)), np.arange(16))
  assert not np.array_equal(np.concatenate(first), np.concatenate(second))
  again = minibatch_rows(0, 3, 0, 16, 4)  # a resumed run shuffles as the first did
  np.testing.assert_array_equal(np.concatenate(first), np.concatenate(again))


def test_a_frozen_reference_stays_and_an_ema_reference_follows(setup):
  from alignax.train.ppo_trainer import ReferenceEMAState, reference_ema

  policy = ax.from_pretrained(setup.base)
  initial = jax.tree.map(np.asarray, nnx.state(policy, nnx.Param))
  frozen = _Reference(policy, ema=False)
  # A copy: training the policy in place leaves the frozen reference where it started.
  nnx.update(policy, jax.tree.map(lambda x: x + 1.0, nnx.state(policy, nnx.Param)))
  def train_state(opt_state):
    return TrainState(step=jnp.zeros((), jnp.int32), params={}, opt_state=opt_state,
                      rng=jnp.zeros(2, jnp.uint32))

  for kept, start in zip(jax.tree.leaves(frozen.params_of(train_state(()))),
                         jax.tree.leaves(initial)):
    np.testing.assert_array_equal(kept, start)

  params = {"policy": {"w": jnp.zeros(3)}, "critic": {"v": jnp.zeros(2)}}
  optimizer = optax.chain(optax.sgd(1.0), reference_ema(0.75, select=lambda p: p["policy"]))
  opt_state = optimizer.init(params)
  for _ in range(2):  # gradient -1: every step adds 1 to each parameter
    updates, opt_state = optimizer.update(jax.tree.map(lambda x: -jnp.ones_like(x), params),
                                          opt_state, params)
    params = optax.apply_updates(params, updates)
  average = opt_state[-1]
  assert isinstance(average, ReferenceEMAState) and set(average.params) == {"w"}
  # 0.75 * (0.75 * 0 + 0.25 * 1) + 0.25 * 2
  np.testing.assert_allclose(average.params["w"], 0.6875)
  assert _Reference(policy, ema=True).params_of(train_state(opt_state)) is average.params


class _Stop(Exception):
  pass


def _stop_at(last):
  def stop(step, metrics):
    if step == last:
      raise _Stop

  return stop


def test_adaptive_kl_ema_reference_and_exact_resume(setup, tmp_path):
  """An EMA reference and the adaptive controller; killed inside the second round and resumed
  from checkpoint-4, the run replays the uninterrupted trajectory (the KL coefficient and the EMA
  reference come back from the checkpoint). Runs are cut short by raising from ``on_step``, so
  they share the learning run's compiled programs."""
  options = dict(save_steps=UPDATES, logging_steps=1, ref_ema_decay=0.5, target_kl=0.05,
                 kl_horizon=16.0, kl_coef=0.1)
  straight = []
  with pytest.raises(_Stop):
    _run(setup, _config(tmp_path / "straight", **options), on_step=_stop_at(3 * UPDATES),
         history=straight)

  rounds = straight[::UPDATES]
  coefs = [m["objective/kl_coef"] for m in rounds]
  assert coefs[0] == pytest.approx(0.1)
  for before, after in zip(rounds, rounds[1:]):
    # Ziegler et al.: beta *= 1 + clip(KL / target - 1, +-0.2) * n / horizon, n = 16 completions.
    error = np.clip(before["objective/kl"] / 0.05 - 1, -0.2, 0.2)
    assert after["objective/kl_coef"] == pytest.approx(before["objective/kl_coef"]
                                                       * (1 + error * 16 / 16.0), rel=1e-5)
  # No drift before the first update: the coefficient shrinks towards a KL of 0.05.
  assert abs(rounds[0]["objective/kl"]) < 1e-5 and coefs[1] < coefs[0]

  with pytest.raises(_Stop):
    _run(setup, _config(tmp_path / "resumed", **options), on_step=_stop_at(6))
  resumed = []
  with pytest.raises(_Stop):
    _run(setup, _config(tmp_path / "resumed", resume_from_checkpoint="true", **options),
         on_step=_stop_at(3 * UPDATES), history=resumed)
  assert [m["step"] for m in resumed] == list(range(UPDATES + 1, 3 * UPDATES + 1))
  for name in ("loss", "objective/kl", "objective/kl_coef", "objective/scores", "grad_norm",
               "loss/value_avg", "num_tokens", "episode"):
    assert [m[name] for m in resumed] == [m[name] for m in straight[UPDATES:]], name


def test_a_value_head_on_the_policy_trains_with_the_policy(setup):
  """``value_head_on_policy``: one forward gives log-probs and values; on the first minibatch the
  ratio is 1, and the value loss's gradient reaches the head and the policy's body."""
  from alignax.train.ppo_trainer import ActorCritic, ppo_objective

  model = ActorCritic(ax.from_pretrained(setup.base), None, seed=0)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  ids = np.array([[0, 5, 6, 7, 8, 9], [3, 4, 5, 6, 7, 8]], np.int32)
  batch = {"input_ids": ids, "attention_mask": np.array([[0, 1, 1, 1, 1, 1]] * 2, np.int32),
           "completion_mask": np.array([[0, 0, 0, 1, 1, 1]] * 2, np.int32)}
  out, mask, values = model.outputs(batch, temperature=0.7)
  assert values.shape == ids.shape and np.all(np.asarray(values)[~np.asarray(mask)] == 0)
  old_logp = jnp.where(mask, out.logp, 0.0)
  batch.update(old_logp=old_logp, values=values, advantages=jnp.where(mask, 1.0, 0.0),
               returns=jnp.where(mask, values + 1.0, 0.0))
  objective = ppo_objective(graphdef, temperature=0.7, vf_coef=1.0)
  # One compiled program for both batches (eager differentiation compiles every op).
  loss_and_grads = jax.jit(jax.value_and_grad(objective.loss, has_aux=True))
  (loss, metrics), grads = loss_and_grads(params, rest, batch, jax.random.key(0))
  assert np.isfinite(float(loss)) and float(objective.weight(batch)) == 6
  assert abs(float(metrics["val/ratio"]) - 1) < 1e-6 and float(metrics["policy/clipfrac_avg"]) == 0
  # Every value is 1 below its return: 0.5 * 1^2 per token, nothing clipped yet.
  assert float(metrics["loss/value_avg"]) == pytest.approx(0.5, rel=1e-5)
  assert float(jnp.abs(grads["value_head"][...]).sum()) > 0
  # Value loss alone (no advantage): the policy's body still moves, its output head does not.
  batch["advantages"] = jnp.zeros_like(batch["advantages"])
  _, grads = loss_and_grads(params, rest, batch, jax.random.key(0))
  body = [float(jnp.abs(g).sum()) for g in jax.tree.leaves(grads["policy"]["model"])]
  assert max(body) > 0
  assert float(jnp.abs(grads["policy"]["lm_head"]["kernel"][...]).sum()) == 0


def test_the_cli_runs_ppo_end_to_end_on_files(setup, tmp_path, monkeypatch):
  from alignax import cli
  from alignax.train import trainers

  prompts = tmp_path / "prompts.jsonl"
  prompts.write_text("".join(json.dumps(row) + "\n" for row in PROMPTS))
  # The learning run's mesh, so the run reuses its compiled programs.
  monkeypatch.setattr(trainers, "resolve_mesh", lambda mesh: setup.mesh)
  output_dir = tmp_path / "out"
  with pytest.warns(UserWarning, match=r"missing_eos_penalty=1.0 without stop_token"):
    status = cli.main([
      "ppo", "--sft_model_path", setup.base, "--reward_model_path", setup.reward_dir,
      "--tokenizer_name_or_path", str(setup.root / "tok"), "--dataset_name", str(prompts),
      "--output_dir", str(output_dir), "--per_device_train_batch_size", "4",
      "--num_mini_batches", "2", "--num_ppo_epochs", "2", "--response_length", "8",
      "--max_steps", "4", "--save_steps", "4", "--logging_steps", "4", "--learning_rate", "1e-2",
      "--lr_scheduler_type", "constant",
      "--missing_eos_penalty", "1.0", "--reward_funcs", "think_format_reward", "--disable_tqdm"])
  assert status == 0
  lines = [json.loads(line) for line in open(output_dir / "metrics.jsonl")]
  assert lines[-1]["step"] == 4 and "objective/rlhf_reward" in lines[-1]
  # The reward function's score is added to the reward model's (0 here: no <think> format).
  assert lines[-1]["rewards/think_format_reward/mean"] == 0.0
  assert {"rewards/rm/mean", "rewards/rm/std"} <= set(lines[-1])
  # No stop token by default: every completion misses EOS and pays the penalty.
  completions = output_dir / "completions" / "completions_000004.jsonl"
  rows = [json.loads(line) for line in open(completions)]
  for row in rows:
    assert row["score"] == pytest.approx(row["raw_score"] - 1.0, abs=1e-5) or row["has_eos"]
  assert os.path.exists(output_dir / "config.json")


def test_cli_flags_and_bad_input_are_named(setup, tmp_path, capsys):
  from alignax import cli

  config, model, _, _ = cli.parse("ppo", [
    "--sft_model_path", "m", "--output_dir", "out", "--num_ppo_epochs", "2",
    "--num_mini_batches", "4", "--kl_coef", "0.1", "--kl_estimator", "k3", "--target_kl", "6",
    "--ref_ema_decay", "0.99", "--cliprange_value", "0.5", "--stop_token", "eos",
    "--whiten_rewards", "--save_steps", "8"])
  assert isinstance(config, PPOConfig) and config.sft_model_path == "m"
  assert (config.num_ppo_epochs, config.num_mini_batches, config.kl_coef, config.kl_estimator,
          config.target_kl, config.ref_ema_decay, config.cliprange_value, config.stop_token,
          config.whiten_rewards) == (2, 4, 0.1, "k3", 6.0, 0.99, 0.5, "eos", True)
  assert model.model_name_or_path is None
  assert cli.main(["ppo", "--sft_model_path", "m", "--output_dir", "out",
                   "--kl_estimator", "k2"]) == 2
  assert "invalid choice: 'k2'" in capsys.readouterr().err

  # save_steps need not be a multiple of the updates per rollout (the loop saves at the next
  # rollout boundary), so TRL's defaults with two minibatches are accepted; no clipping by default.
  assert _config(tmp_path, save_steps=6).save_steps == 6
  assert PPOConfig(output_dir=str(tmp_path), num_mini_batches=2).max_grad_norm is None
  with pytest.raises(ValueError, match=r"total_episodes=64 and max_steps=8 both set"):
    _config(tmp_path, max_steps=8, total_episodes=64)
  with pytest.raises(ValueError, match=r"reward_weights=\[1.0\] weight reward functions"):
    _reward_runner(_config(tmp_path, reward_weights=[1.0]), None)
  with pytest.raises(ValueError, match=r"max_steps=6 must be a multiple"):
    _config(tmp_path, max_steps=6)
  with pytest.raises(ValueError, match="num_mini_batches"):
    _config(tmp_path, num_mini_batches=0)
  with pytest.raises(ValueError, match="stop_token='eos' and stop_token_id=2 are exclusive"):
    _config(tmp_path, stop_token="eos", stop_token_id=2)
  with pytest.raises(ValueError, match="missing_eos_penalty"):
    _config(tmp_path, missing_eos_penalty=-1.0)

  # No reward at all: named before anything compiles.
  with pytest.raises(ValueError, match="ppo needs a reward"):
    _run(setup, _config(tmp_path / "no_reward"), reward_model=None)
  # A prompt longer than the position budget (64 positions, 60 completion tokens).
  model = ModelConfig(model_name_or_path=setup.base,
                      tokenizer_name_or_path=str(setup.root / "tok"))
  with pytest.raises(ValueError, match=r"prompt 0 has \d+ tokens; with max_completion_length=60"):
    ppo(_config(tmp_path / "long", response_length=60), model=model,
        reward_model=setup.reward_dir, train_dataset=PROMPTS, mesh=setup.mesh)


def test_the_default_critic_needs_the_policys_vocabulary_and_text_scores_keep_truncation(
    setup, tmp_path):
  """A reward model with another vocabulary cannot seed the critic (it would read the policy's ids
  in its own id space): a named error. Scored as text, only completions that ended with EOS get
  the reward model's EOS (the scorer's append_eos would mark truncated ones finished too)."""
  from alignax.models.config import config_from_hf
  from alignax.rewards import RewardModelScorer
  from alignax.train.ppo_trainer import _text_sequences, _value_model

  hf = dict(model_type="llama", vocab_size=1024, hidden_size=16, intermediate_size=32,
            num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
            max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=False,
            pad_token_id=0)
  ax.save_pretrained(ax.CausalLM(config_from_hf(hf), rngs=nnx.Rngs(0)), str(tmp_path / "base"))
  reward = ax.from_pretrained(str(tmp_path / "base"), head="score", num_labels=1)
  scorer = RewardModelScorer(reward, setup.tokenizer)
  with pytest.raises(ValueError, match=r"vocabulary has 1024 tokens, the policy's 512.*"
                                       r"value_model_path.*value_head_on_policy=True"):
    _value_model(None, _config(tmp_path), scorer, mesh=None, model_config=None,
                 policy_vocab_size=512, tokenizer=setup.tokenizer)
  assert _value_model(None, _config(tmp_path, value_head_on_policy=True), scorer, mesh=None,
                      model_config=None, policy_vocab_size=512, tokenizer=setup.tokenizer) is None

  eos = setup.tokenizer.eos_token_id
  finished, truncated = _text_sequences(scorer, ["count 1 apples"] * 2, ["four five"] * 2,
                                        np.array([True, False]))
  assert finished[-1] == eos and truncated == finished[:-1]


# Few, short evaluation completions: no length-controlled win rate.
@pytest.mark.filterwarnings("ignore:the length-controlled win rate")
def test_eos_stops_unequal_completions_and_in_training_eval(setup, tmp_path, monkeypatch):
  """stop_token='eos' on a policy that often emits EOS: completions of unequal lengths, the
  missing-EOS penalty only on the truncated ones; kl_coef=0 skips the reference forward (no
  objective/kl); eval_num_prompts logs eval/reward and eval/kl at the eval steps."""
  from alignax.train import ppo_trainer

  def no_reference(*args, **kwargs):
    raise AssertionError("kl_coef=0: the reference forward should be skipped")

  monkeypatch.setattr(ppo_trainer._Reference, "logprobs", no_reference)
  model = ax.from_pretrained(setup.base, mesh=setup.mesh)
  eos = setup.tokenizer.eos_token_id
  # EOS's logit along the prompts' mean final hidden state: some completions stop, some do not.
  batch = setup.tokenizer([row["prompt"] for row in PROMPTS], padding=True, return_tensors="np")
  hidden = np.asarray(model(jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"]),
                            compute_logits=False).hidden_states)
  direction = hidden.reshape(-1, hidden.shape[-1]).mean(axis=0)
  kernel = np.asarray(model.lm_head.kernel[...]).copy()
  kernel[:, eos] = 2.0 * direction / np.linalg.norm(direction)
  model.lm_head.kernel[...] = jax.device_put(jnp.asarray(kernel), model.lm_head.kernel[...].sharding)

  history = []
  config = _config(tmp_path, max_steps=UPDATES, logging_steps=1, save_steps=UPDATES,
                   stop_token="eos", missing_eos_penalty=1.0, kl_coef=0.0, eval_num_prompts=2,
                   eval_steps=2, eval_num_samples=2, eval_max_completion_length=8,
                   per_device_eval_batch_size=1)
  result = ppo(config, model=model, tokenizer=setup.tokenizer, train_dataset=PROMPTS,
               mesh=setup.mesh, reward_model=setup.reward_dir,
               on_step=lambda step, metrics: history.append(metrics),
               eval_dataset=[{"prompt": "count 99 pears"}, {"prompt": "count 7 plums"}])
  assert all("objective/kl" not in m for m in history)
  assert history[0]["completions/min_length"] < history[0]["completions/max_length"]
  with open(tmp_path / "completions" / "completions_000001.jsonl") as f:
    rows = [json.loads(line) for line in f]
  assert {row["has_eos"] for row in rows} == {True, False}
  for row in rows:  # the penalty only where the sampler ran out of tokens before EOS
    expected = row["raw_score"] - (0.0 if row["has_eos"] else 1.0)
    assert row["score"] == pytest.approx(expected, abs=1e-5)
  evals = [m for m in result.history if "eval/reward" in m]
  assert [m["step"] for m in evals] == [2, 4]
  for m in evals:
    assert np.isfinite(m["eval/reward"]) and np.isfinite(m["eval/kl"]), m


def test_truncated_importance_sampling_reweights_the_policy_term(setup, tmp_path):
  """The sampler/trainer correction: at cap 3 the ratios (trainer and sampler agree here) are 1 and
  weigh nothing; in token_mask mode with a cap below them every token is dropped, so the policy
  term is exactly 0 while the value loss still trains."""
  _, kept = _run(setup, _config(tmp_path / "kept", max_steps=UPDATES, logging_steps=1,
                                save_steps=UPDATES, importance_sampling_correction=True))
  assert kept[0]["sampling/importance_sampling_ratio/mean"] == pytest.approx(1.0, abs=1e-3)
  assert kept[0]["sampling/importance_sampling_ratio/max"] <= 3.0
  _, masked = _run(setup, _config(tmp_path / "masked", max_steps=UPDATES, logging_steps=1,
                                  save_steps=UPDATES, importance_sampling_correction=True,
                                  importance_sampling_mode="token_mask",
                                  importance_sampling_cap=0.5))
  assert masked[0]["sampling/importance_sampling_ratio/max"] == 0.0
  assert all(h["loss/policy_avg"] == 0.0 for h in masked)
  assert kept[0]["loss/policy_avg"] != 0.0 and masked[0]["loss/value_avg"] > 0.0
  with pytest.raises(ValueError, match="importance_sampling_mode"):
    _config(tmp_path, importance_sampling_mode="per_token")
