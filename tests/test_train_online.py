"""The online trainers' host loop (alignax.train.online.run_rounds) on a stand-in trainer whose
rollout and update are a few array operations: window-averaged log lines, rounds counted once in
num_tokens, skipped rounds that leave the optimizer alone, checkpoints at round boundaries only,
Ctrl-C finishing the round, and a resume that replays the same rounds with the host state."""

import glob
import json
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignax.sharding import make_mesh
from alignax.train.checkpoint import Checkpointer
from alignax.train.config import TrainingConfig
from alignax.train.online import Round, run_rounds
from alignax.train.step import TrainState

TOKENS_PER_ROUND = 10


class Prompts:
  """An endless prompt iterator with grain's get_state/set_state."""

  def __init__(self):
    self.position = 0

  def __iter__(self):
    return self

  def __next__(self):
    self.position += 1
    return {"prompt_index": self.position}

  def get_state(self):
    return {"position": self.position}

  def set_state(self, state):
    self.position = state["position"]


class Counter:
  """Host state a resume must restore (as PPO's adaptive KL coefficient)."""

  def __init__(self):
    self.rounds = 0

  def state_dict(self):
    return {"rounds": self.rounds}

  def load_state_dict(self, state):
    self.rounds = state["rounds"]


def _run(output_dir, *, max_steps=6, updates_per_round=2, skip_rounds=(), on_step=None,
         export=None, **overrides):
  mesh = make_mesh(fsdp=1, devices=jax.devices()[:1])
  options = dict(output_dir=str(output_dir), max_steps=max_steps, logging_steps=3, save_steps=2,
                 disable_tqdm=True)
  config = TrainingConfig(**{**options, **overrides})
  state = TrainState(step=jnp.zeros((), jnp.int32), params={"w": jnp.zeros(3)},
                     opt_state={"updates": jnp.zeros((), jnp.int32)},
                     rng=jax.random.key_data(jax.random.key(0)))
  counter = Counter()
  rounds, steps = [], []

  def rollout(state, prompts, *, key, step):
    counter.rounds += 1
    draw = float(jax.random.uniform(key))  # the sampler's key: a resume must replay it
    rounds.append({"step": step, "prompt_index": prompts["prompt_index"], "draw": draw,
                   "rounds_before": counter.rounds - 1})
    index = step // updates_per_round
    # objective/kl_coef is state (PPO's adaptive coefficient): a line shows its latest value.
    return Round(batch={"round": index}, metrics={"reward": draw, "round_index": float(index),
                                                  "objective/kl_coef": float(index)},
                 tokens=TOKENS_PER_ROUND, completions=[{"prompt": "p", "completion": f"c{index}"}],
                 trainable=index not in skip_rounds)

  def update(state, batch, index):
    params = {"w": state.params["w"] + 1.0}
    opt_state = {"updates": state.opt_state["updates"] + 1}
    loss = float(state.step) * 10 + index
    metrics = {"loss": loss, "grad_norm": loss + 0.5,
               "learning_rate": 1e-3 * (1 + float(state.step))}
    return state._replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  def record(step, metrics):
    steps.append(dict(metrics, step=step))
    if on_step is not None:
      on_step(step, metrics)

  result = run_rounds(config, state=state, mesh=mesh, iterator=Prompts(), rollout=rollout,
                      update=update, max_steps=max_steps, updates_per_round=updates_per_round,
                      algorithm="test", on_step=record, host_state=counter, export=export)
  return result, steps, rounds


def test_lines_average_their_window_and_rounds_count_once(tmp_path):
  result, steps, rounds = _run(tmp_path, skip_rounds=(1,))
  assert [r["step"] for r in rounds] == [0, 2, 4]  # one rollout per round of two updates
  assert [s["num_tokens"] for s in steps] == [10, 10, 20, 20, 30, 30]
  # The rollout's time is charged to its round's first update only.
  assert ["time/rollout" in s for s in steps] == [True, False] * 3
  for s in steps:
    np.testing.assert_allclose(s["step_time"], s["time/train"] + s.get("time/rollout", 0.0))

  # Round 1 (steps 3-4) had nothing to learn: no update ran, the optimizer did not move, the step
  # counter did.
  assert [s.get("skipped_updates", 0.0) for s in steps] == [0, 0, 1, 1, 0, 0]
  assert "loss" not in steps[2] and "loss" in steps[4]
  assert int(result.state.opt_state["updates"]) == 4 and int(result.state.step) == 6
  np.testing.assert_array_equal(result.state.params["w"], 4.0)

  lines = [h for h in result.history if "reward" in h]
  assert [h["step"] for h in lines] == [3, 6]
  first, second = lines
  # A round's metrics count once per round in the window, not once per update (TRL appends them
  # once per generation): steps 1-3 are rounds 0 and 1, steps 4-6 rounds 1 and 2.
  np.testing.assert_allclose(first["reward"], np.mean([steps[0]["reward"], steps[2]["reward"]]))
  np.testing.assert_allclose(second["reward"], np.mean([steps[3]["reward"], steps[4]["reward"]]))
  assert (first["round_index"], second["round_index"]) == (0.5, 1.5)
  # ...state (a coefficient, the learning rate) is the latest value, not the window's mean...
  assert (first["objective/kl_coef"], second["objective/kl_coef"]) == (1.0, 2.0)
  # ...an update's metric is its mean over the window's steps that report it...
  np.testing.assert_allclose(first["loss"], np.mean([s["loss"] for s in steps[:2]]))
  np.testing.assert_allclose(second["loss"], np.mean([s["loss"] for s in steps[4:6]]))
  np.testing.assert_allclose(first["time/rollout"], np.mean([steps[0]["time/rollout"],
                                                             steps[2]["time/rollout"]]))
  # ...the learning rate, gradient norm and token count the latest step's, skips a count.
  assert first["learning_rate"] == steps[1]["learning_rate"]
  assert second["grad_norm"] == steps[5]["grad_norm"]
  assert (first["num_tokens"], second["num_tokens"]) == (20, 30)
  assert (first["skipped_updates"], second["skipped_updates"]) == (1.0, 1.0)

  written = sorted(glob.glob(os.path.join(tmp_path, "completions", "*.jsonl")))
  assert [os.path.basename(f) for f in written] == ["completions_000003.jsonl",
                                                    "completions_000006.jsonl"]
  with open(written[0]) as f:
    assert json.loads(f.readline())["completion"] == "c1"  # the round step 3 belongs to
  assert Checkpointer(tmp_path).all_steps() == [2, 4, 6]


def test_save_steps_inside_a_round_saves_at_the_next_boundary_and_completions_once(tmp_path):
  """save_steps need not divide into rounds (GRPO's num_iterations=3 with the default 500 was a
  config error): a checkpoint goes at the first round boundary at or after each multiple. And a
  round's completions are written once, at its first logged line, however many lines it has."""
  result, _, _ = _run(tmp_path, max_steps=12, updates_per_round=3, save_steps=4, logging_steps=2)
  assert Checkpointer(tmp_path).all_steps() == [6, 9, 12]
  written = sorted(os.path.basename(f)
                   for f in glob.glob(os.path.join(tmp_path, "completions", "*.jsonl")))
  # Lines at 2 (round 0), 4 and 6 (round 1), 8 (round 2), 10 and 12 (round 3).
  assert written == [f"completions_{s:06d}.jsonl" for s in (2, 4, 8, 10)]
  assert [h["step"] for h in result.history if "reward" in h] == [2, 4, 6, 8, 10, 12]
  with pytest.raises(ValueError, match="max_steps=5 must be a multiple of the 2 optimizer steps"):
    _run(tmp_path / "odd", max_steps=5)


def test_a_skipped_round_advances_the_learning_rate_schedule(tmp_path):
  """A skipped round moved state.step (and the logged learning_rate) but not optax's schedule
  count: every later update applied the rate of an earlier step. Adam's own count must not move
  (its bias correction would treat the first real update as a later one)."""
  import optax

  from alignax.train.optim import make_optimizer
  from alignax.train.step import init_state

  optimizer, schedule = make_optimizer(1.0, max_steps=4, lr_scheduler_type="linear",
                                       max_grad_norm=None, adam_epsilon=1e-12)
  mesh = make_mesh(fsdp=1, devices=jax.devices()[:1])
  state = init_state({"w": jnp.zeros(())}, optimizer, seed=0)

  def rollout(state, prompts, *, key, step):
    return Round(batch=None, metrics={}, tokens=1, trainable=step >= 2)  # round 0: nothing

  def update(state, batch, index):
    # Adam's first steps on a constant gradient move w by exactly the rate it applies.
    updates, opt_state = optimizer.update({"w": jnp.ones(())}, state.opt_state, state.params)
    return state._replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                          opt_state=opt_state), {"applied": -updates["w"],
                                                 "learning_rate": schedule(state.step)}

  applied = {}
  config = TrainingConfig(output_dir=str(tmp_path), max_steps=4, logging_steps=1, save_steps=4,
                          disable_tqdm=True)
  result = run_rounds(config, state=state, mesh=mesh, iterator=Prompts(), rollout=rollout,
                      update=update, max_steps=4, updates_per_round=2, algorithm="test",
                      on_step=lambda step, m: applied.update({step: m.get("applied")}))
  assert applied[1] is None and applied[2] is None
  for step in (3, 4):  # the update of step s runs at state.step = s - 1
    np.testing.assert_allclose(applied[step], float(schedule(step - 1)), rtol=1e-4)
  kinds = (optax.ScaleByScheduleState, optax.ScaleByAdamState)
  counts = {type(node).__name__: int(node.count) for node in jax.tree.leaves(
    result.state.opt_state, is_leaf=lambda n: isinstance(n, kinds)) if isinstance(node, kinds)}
  assert counts == {"ScaleByScheduleState": 4, "ScaleByAdamState": 2}


def test_ctrl_c_in_the_last_round_completes_and_exports(tmp_path):
  exported = []

  def interrupt_at_five(step, metrics):
    if step == 5:
      os.kill(os.getpid(), signal.SIGINT)

  result, steps, _ = _run(tmp_path, save_steps=100, on_step=interrupt_at_five,
                          export=lambda state: exported.append(int(state.step)))
  assert exported == [6] and int(result.state.step) == 6
  assert Checkpointer(tmp_path).all_steps() == [6]
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_ctrl_c_finishes_the_round_checkpoints_and_resumes_the_same_rounds(tmp_path):
  _, straight, straight_rounds = _run(tmp_path / "straight", save_steps=100)

  def interrupt_at_three(step, metrics):
    if step == 3:
      os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C, in the round's first update

  with pytest.raises(KeyboardInterrupt, match="stopped after step 4"):
    _run(tmp_path / "resumed", save_steps=100, on_step=interrupt_at_three)
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler given back
  # The round's second update ran, and the checkpoint is at the round's end.
  assert Checkpointer(tmp_path / "resumed").all_steps() == [4]
  lines = json.load(open(tmp_path / "resumed" / "trainer_state.json"))["log_history"]
  assert [h["step"] for h in lines] == [3, 4]  # the partial window is logged before the stop

  resumed, steps, rounds = _run(tmp_path / "resumed", save_steps=100,
                                resume_from_checkpoint="true")
  assert [s["step"] for s in steps] == [5, 6]
  # The same prompts and sampler key as the uninterrupted run's third round, and the host state
  # as the checkpoint left it.
  assert rounds == [straight_rounds[2]]
  for name in ("loss", "reward", "num_tokens"):
    assert [s[name] for s in steps] == [s[name] for s in straight[4:]], name
  np.testing.assert_array_equal(resumed.state.params["w"], 6.0)
