"""Reward functions (alignax.rewards): TRL's contract, None handling, async concurrency, timeouts,
named errors, ``--reward_funcs`` resolution and the built-ins on tables of cases. Reward models and
ensembles are in test_rewards_models.py."""

import asyncio
import math
import os
import subprocess
import sys
import threading
import time
import warnings
from fractions import Fraction

import numpy as np
import pytest

from alignax import rewards
from alignax.rewards import (
  AllRewardsNoneWarning,
  RewardFunctionError,
  RewardRunner,
  RewardTimeoutError,
  resolve_reward_funcs,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["What is 1+1?", "What is 2+3?"]
COMPLETIONS = ["2", "3", "5", "6"]  # two generations per prompt, prompt-major


def test_contract_repeats_columns_and_passes_every_keyword():
  seen = {}

  def spy(prompts, completions, completion_ids, answer, source, trainer_state, log_extra,
          log_metric, **kwargs):
    seen.update(prompts=prompts, completions=completions, completion_ids=completion_ids,
                answer=answer, source=source, trainer_state=trainer_state, rest=kwargs)
    log_extra("checked", [f"c{i}" for i in range(len(completions))])
    log_metric("spy/calls", np.float32(1.0))
    log_metric("spy/calls", 3.0)
    return [float(c == a) for c, a in zip(completions, answer)]

  state = {"global_step": 7}
  with RewardRunner([spy]) as runner:
    out = runner(PROMPTS, COMPLETIONS, [[1], [2, 3], [4], [5, 6, 7]],
                 columns={"answer": ["2", "5"], "source": ["a", "b"], "prompt": PROMPTS},
                 num_generations=2, trainer_state=state)
  assert seen["prompts"] == [PROMPTS[0], PROMPTS[0], PROMPTS[1], PROMPTS[1]]
  assert seen["completions"] == COMPLETIONS
  assert seen["completion_ids"] == [[1], [2, 3], [4], [5, 6, 7]]
  assert seen["answer"] == ["2", "2", "5", "5"]
  assert seen["source"] == ["a", "a", "b", "b"]
  assert seen["trainer_state"] is state
  assert seen["rest"] == {}  # the `prompt` column is left out, as TRL does
  np.testing.assert_array_equal(out.rewards, [1.0, 0.0, 1.0, 0.0])
  assert out.names == ("spy",)
  assert out.extra_columns == {"checked": ["c0", "c1", "c2", "c3"]}
  assert out.metrics["spy/calls"] == 2.0
  assert out.metrics["rewards/spy/mean"] == 0.5
  # TRL's nanstd is Bessel-corrected.
  assert out.metrics["rewards/spy/std"] == pytest.approx(np.std([1, 0, 1, 0], ddof=1))


def test_conversational_prompts_get_conversational_completions():
  seen = {}

  def spy(prompts, completions, **kwargs):
    seen["prompts"], seen["completions"] = prompts, completions
    return [len(c[0]["content"]) for c in completions]

  prompts = [[{"role": "user", "content": "Say hi"}]]
  out = rewards.compute_rewards([spy], prompts, ["hi", "hello"], num_generations=2)
  assert seen["prompts"] == [prompts[0], prompts[0]]
  assert seen["completions"] == [[{"role": "assistant", "content": "hi"}],
                                 [{"role": "assistant", "content": "hello"}]]
  np.testing.assert_array_equal(out.rewards, [2.0, 5.0])


def test_a_source_cannot_change_another_sources_inputs():
  def vandal(prompts, completions, **kwargs):
    completions[0] = "changed"
    completions.append("extra")
    return [0.0] * (len(completions) - 1)

  def reader(completions, **kwargs):
    return [float(c == "2") for c in completions]

  out = rewards.compute_rewards([vandal, reader], PROMPTS, COMPLETIONS, num_generations=2)
  np.testing.assert_array_equal(out.per_source[:, 1], [1.0, 0.0, 0.0, 0.0])


def test_none_is_nan_per_source_and_skipped_by_the_weighted_sum():
  def sometimes(completions, **kwargs):
    return [1.0, None, 3.0, None]

  def partial_scorer(completions, **kwargs):
    return [10.0, 20.0, None, float("nan")]

  with pytest.warns(AllRewardsNoneWarning, match="completion 3"):
    out = rewards.compute_rewards([sometimes, partial_scorer], PROMPTS, COMPLETIONS,
                                  num_generations=2, weights=[2.0, 0.5])
  expected_matrix = np.array([[1, 10], [np.nan, 20], [3, np.nan], [np.nan, np.nan]], np.float32)
  np.testing.assert_array_equal(out.per_source, expected_matrix)
  # nansum: a None drops that source's term; the all-None sample gets 0 and is flagged.
  np.testing.assert_allclose(out.rewards, [2 * 1 + 0.5 * 10, 0.5 * 20, 2 * 3, 0.0])
  np.testing.assert_array_equal(out.all_none, [False, False, False, True])
  assert out.metrics["rewards/all_none_count"] == 1.0
  assert out.metrics["rewards/sometimes/mean"] == 2.0
  assert out.metrics["rewards/sometimes/std"] == pytest.approx(np.std([1.0, 3.0], ddof=1))
  assert out.metrics["rewards/partial_scorer/mean"] == 15.0


def test_no_warning_when_every_sample_is_scored():
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    out = rewards.compute_rewards([lambda completions, **kw: [1.0] * len(completions)],
                                  PROMPTS, COMPLETIONS, num_generations=2)
  assert out.metrics["rewards/all_none_count"] == 0.0


def test_async_sources_run_concurrently_on_one_loop():
  # Each function waits for the other to start: run one after the other, the first would wait
  # until the timeout; gathered, both finish.
  events = []
  loops = []

  def make(me, other):
    async def reward(completions, **kwargs):
      loops.append(asyncio.get_running_loop())
      started[me].set()
      events.append(f"{me} started")
      await started[other].wait()
      await asyncio.sleep(0)
      events.append(f"{me} finished")
      return [1.0] * len(completions)
    reward.__name__ = f"reward_{me}"
    return reward

  with RewardRunner([make("a", "b"), make("b", "a")], timeout=30.0) as runner:
    for _ in range(2):
      started = {"a": asyncio.Event(), "b": asyncio.Event()}
      events.clear()
      out = runner(PROMPTS, COMPLETIONS, num_generations=2)
      np.testing.assert_array_equal(out.rewards, [2.0] * 4)
      # Both started before either finished.
      assert set(events[:2]) == {"a started", "b started"}, events
  assert len(set(map(id, loops))) == 1  # one loop for every call of every async source


def test_async_and_sync_sources_mix_in_source_order():
  async def later(completions, **kwargs):
    await asyncio.sleep(0)
    return [2.0] * len(completions)

  def now(completions, **kwargs):
    return [1.0] * len(completions)

  out = rewards.compute_rewards([later, now], PROMPTS, COMPLETIONS, num_generations=2)
  assert out.names == ("later", "now")
  np.testing.assert_array_equal(out.per_source[0], [2.0, 1.0])


def test_a_hung_sync_function_times_out_with_a_named_error_or_none():
  release = threading.Event()

  def hung(completions, **kwargs):
    release.wait()
    return [1.0] * len(completions)

  def fine(completions, **kwargs):
    return [0.5] * len(completions)

  try:
    with pytest.raises(RewardTimeoutError, match=r"'hung' \(reward source 0\).*timeout=0.2s"):
      rewards.compute_rewards([hung, fine], PROMPTS, COMPLETIONS, num_generations=2, timeout=0.2)
    out = rewards.compute_rewards([hung, fine], PROMPTS, COMPLETIONS, num_generations=2,
                                  timeout=0.2, on_timeout="none")
  finally:
    release.set()
  assert np.isnan(out.per_source[:, 0]).all()
  np.testing.assert_array_equal(out.rewards, [0.5] * 4)
  assert out.metrics["rewards/hung/timeouts"] == 1.0
  assert out.metrics["rewards/fine/timeouts"] == 0.0


def test_reward_models_and_ensembles_are_not_timed():
  # Their first call compiles; the timeout guards user code only.
  def slow(completions, **kwargs):
    time.sleep(0.5)
    return [1.0] * len(completions)

  out = rewards.compute_rewards([rewards.RewardEnsemble([slow], name="slow_ensemble")], PROMPTS,
                                COMPLETIONS, num_generations=2, timeout=0.05)
  np.testing.assert_array_equal(out.rewards, [1.0] * 4)
  with pytest.raises(RewardTimeoutError):
    rewards.compute_rewards([slow], PROMPTS, COMPLETIONS, num_generations=2, timeout=0.05)


def test_array_inputs_are_accepted():
  def lengths(completion_ids, **kwargs):
    return [float(len(ids)) for ids in completion_ids]

  tokens = np.arange(8).reshape(4, 2)
  out = rewards.compute_rewards([lengths], PROMPTS, COMPLETIONS, list(tokens),
                                columns={"answer": np.array([1, 2])}, num_generations=2,
                                weights=np.array([0.5]))
  np.testing.assert_array_equal(out.rewards, [1.0] * 4)
  with pytest.raises(ValueError, match="sources must be a non-empty list"):
    RewardRunner([])


def test_a_hung_async_function_is_cancelled_at_the_timeout():
  cancelled = threading.Event()

  async def hung(completions, **kwargs):
    try:
      await asyncio.Event().wait()
    except asyncio.CancelledError:
      cancelled.set()
      raise

  with pytest.raises(RewardTimeoutError, match="'hung'"):
    rewards.compute_rewards([hung], PROMPTS, COMPLETIONS, num_generations=2, timeout=0.2)
  assert cancelled.wait(5)
  with pytest.warns(AllRewardsNoneWarning):
    out = rewards.compute_rewards([hung], PROMPTS, COMPLETIONS, num_generations=2, timeout=0.2,
                                  on_timeout="none")
  assert out.metrics["rewards/hung/timeouts"] == 1.0
  np.testing.assert_array_equal(out.rewards, [0.0] * 4)


@pytest.mark.filterwarnings("ignore::alignax.rewards.AllRewardsNoneWarning")
@pytest.mark.parametrize("on_timeout", ["error", "none"])
def test_an_async_function_that_blocks_the_loop_is_timed_out(on_timeout):
  # A synchronous wait inside `async def` blocks the loop, so asyncio cannot cancel it; the runner
  # used to wait for the gather forever. Run in a thread so that a hang fails instead of hanging.
  release = threading.Event()
  calls = []

  async def blocking(completions, **kwargs):
    calls.append(len(calls))
    if len(calls) == 1:
      release.wait()  # a synchronous client call inside `async def`, on the first call only
    return [1.0] * len(completions)

  async def polite(completions, **kwargs):
    await asyncio.sleep(0)
    return [0.5] * len(completions)

  runner = RewardRunner([blocking, polite], timeout=0.2, on_timeout=on_timeout)
  box = {}

  def score():
    try:
      box["out"] = runner(PROMPTS, COMPLETIONS, num_generations=2)
    except RewardTimeoutError as e:
      box["error"] = e

  try:
    worker = threading.Thread(target=score, daemon=True)
    started = time.monotonic()
    worker.start()
    worker.join(30)
    assert not worker.is_alive(), "the runner waited on a blocked event loop"
    assert time.monotonic() - started < 10
    if on_timeout == "error":
      message = str(box["error"])
      assert "['blocking', 'polite']" in message and "event loop stayed blocked" in message
    else:
      out = box["out"]
      assert np.isnan(out.per_source).all()
      assert out.metrics["rewards/blocking/timeouts"] == 1.0
      assert out.metrics["rewards/polite/timeouts"] == 1.0
    # The next batch runs on a fresh loop while the old one is still blocked.
    out = runner(PROMPTS, COMPLETIONS, num_generations=2)
    np.testing.assert_array_equal(out.rewards, [1.5] * 4)
  finally:
    release.set()
    runner.close()


def test_a_timeout_error_raised_by_the_function_is_its_own_error():
  async def client(completions, **kwargs):
    raise TimeoutError("upstream judge timed out")

  with pytest.raises(RewardFunctionError, match="raised TimeoutError: upstream") as info:
    rewards.compute_rewards([client], PROMPTS, COMPLETIONS, num_generations=2, timeout=10.0,
                            on_timeout="none")
  assert not isinstance(info.value, RewardTimeoutError)


@pytest.mark.parametrize("is_async", [False, True])
def test_a_function_that_returns_none_is_a_named_error_not_a_timeout(is_async):
  # A missing `return` used to be read as a timed-out call: every sample silently unscored.
  if is_async:
    async def forgot(completions, **kwargs):
      [1.0] * len(completions)
  else:
    def forgot(completions, **kwargs):
      [1.0] * len(completions)

  def fine(completions, **kwargs):
    return [0.5] * len(completions)

  for timeout in (None, 10.0):
    with pytest.raises(RewardFunctionError, match=r"'forgot' \(reward source 0\) returned None.*"
                                                  "missing `return`"):
      rewards.compute_rewards([forgot, fine], PROMPTS, COMPLETIONS, num_generations=2,
                              timeout=timeout, on_timeout="none")


def test_jax_numpy_and_torch_arrays_are_accepted_as_outputs():
  import jax.numpy as jnp
  import torch

  def as_jax(completions, **kwargs):
    return jnp.arange(len(completions), dtype=jnp.float32)

  def as_torch(completions, **kwargs):
    return torch.full((len(completions),), 0.5)

  def as_numpy_with_none(completions, **kwargs):
    return np.array([1.0, None, 2.0, None], dtype=object)

  out = rewards.compute_rewards([as_jax, as_torch, as_numpy_with_none], PROMPTS, COMPLETIONS,
                                num_generations=2)
  np.testing.assert_array_equal(out.per_source[:, 0], [0.0, 1.0, 2.0, 3.0])
  np.testing.assert_array_equal(out.rewards, [1.5, 1.5, 4.5, 3.5])

  def wrong_shape(completions, **kwargs):
    return jnp.zeros((len(completions), 1))

  with pytest.raises(RewardFunctionError, match=r"'wrong_shape'.*array of shape \[4, 1\]"):
    rewards.compute_rewards([wrong_shape], PROMPTS, COMPLETIONS, num_generations=2)


def test_a_timed_out_call_leaves_nothing_in_the_logs():
  release = threading.Event()

  def logs_then_hangs(completions, log_extra, log_metric, **kwargs):
    log_metric("judge/latency", 1.0)
    log_extra("judge_note", ["partial"] * len(completions))
    release.wait()
    log_metric("judge/latency", 2.0)  # after the batch: must not reach any later result
    return [1.0] * len(completions)

  def logs(completions, log_extra, log_metric, **kwargs):
    log_metric("judge/latency", 5.0)
    return [0.0] * len(completions)

  try:
    out = rewards.compute_rewards([logs_then_hangs, logs], PROMPTS, COMPLETIONS,
                                  num_generations=2, timeout=0.2, on_timeout="none")
  finally:
    release.set()
  assert out.metrics["rewards/logs_then_hangs/timeouts"] == 1.0
  assert out.metrics["judge/latency"] == 5.0  # only the call that returned
  assert out.extra_columns == {}


def test_concurrent_async_sources_log_in_source_order():
  def make(name, delay):
    async def source(completions, log_extra, **kwargs):
      await asyncio.sleep(delay)
      log_extra("judge", [f"{name}{i}" for i in range(len(completions))])
      return [0.0] * len(completions)
    source.__name__ = name
    return source

  # The first source finishes last; its column entries still come first.
  out = rewards.compute_rewards([make("slow", 0.2), make("fast", 0.0)], PROMPTS, COMPLETIONS,
                                num_generations=2)
  assert out.extra_columns == {"judge": [f"slow{i}" for i in range(4)]
                               + [f"fast{i}" for i in range(4)]}


@pytest.mark.parametrize("output, match", [
  ([1.0, 2.0, 3.0], r"'bad' \(reward source 1\) returned 3 rewards for 4 completions"),
  ([1.0, "x", 0.0, 0.0], r"'bad' \(reward source 1\) returned 'x' \(str\) for completion 1"),
  ([1.0, 1.0, [2.0], 0.0], r"returned \[2.0\] \(list\) for completion 2"),
  ([0.0, 0.0, 0.0, float("inf")], r"returned inf for completion 3; rewards must be finite"),
  (np.ones((4, 1)), r"returned an array of shape \[4, 1\]"),
  (1.0, r"returned float; expected a list of 4 floats"),
  ({"a": 1}, r"returned dict"),
])
def test_bad_outputs_are_named_errors(output, match):
  def good(completions, **kwargs):
    return [0.0] * len(completions)

  def bad(completions, **kwargs):
    return output

  with pytest.raises(RewardFunctionError, match=match):
    rewards.compute_rewards([good, bad], PROMPTS, COMPLETIONS, num_generations=2)


def test_numpy_and_bool_rewards_are_numbers():
  def typed(completions, **kwargs):
    return [np.float32(0.5), np.int64(2), True, np.array(1.5)]

  out = rewards.compute_rewards([typed], PROMPTS, COMPLETIONS, num_generations=2)
  np.testing.assert_array_equal(out.rewards, [0.5, 2.0, 1.0, 1.5])


@pytest.mark.parametrize("is_async", [False, True])
def test_a_raising_function_is_a_named_error(is_async):
  if is_async:
    async def broken(completions, **kwargs):
      raise KeyError("gold")
  else:
    def broken(completions, **kwargs):
      raise KeyError("gold")

  with pytest.raises(RewardFunctionError, match=r"'broken' \(reward source 0\) raised KeyError"):
    rewards.compute_rewards([broken], PROMPTS, COMPLETIONS, num_generations=2)


def test_a_sync_function_returning_a_coroutine_is_a_named_error():
  async def inner():
    return [0.0] * 4

  def wrapper(**kwargs):
    return inner()

  with pytest.raises(RewardFunctionError, match="'wrapper'.*returned an awaitable"):
    rewards.compute_rewards([wrapper], PROMPTS, COMPLETIONS, num_generations=2)


def test_batch_layout_and_configuration_errors():
  one = [lambda completions, **kw: [0.0] * len(completions)]
  with pytest.raises(ValueError, match=r"completions has 3 entries; expected .* 2 \* 2 = 4"):
    rewards.compute_rewards(one, PROMPTS, COMPLETIONS[:3], num_generations=2)
  with pytest.raises(ValueError, match="dataset column 'answer' has 4 entries for 2 prompts"):
    rewards.compute_rewards(one, PROMPTS, COMPLETIONS, columns={"answer": [1, 2, 3, 4]},
                            num_generations=2)
  with pytest.raises(ValueError, match="dataset column 'trainer_state' collides"):
    rewards.compute_rewards(one, PROMPTS, COMPLETIONS, columns={"trainer_state": [1, 2]},
                            num_generations=2)
  with pytest.raises(ValueError, match="completion_ids has 1 entries for 4 completions"):
    rewards.compute_rewards(one, PROMPTS, COMPLETIONS, [[1]], num_generations=2)
  with pytest.raises(ValueError, match=r"prompts\[1\] is plain text but prompts\[0\] is a conv"):
    rewards.compute_rewards(one, [[{"role": "user", "content": "a"}], "b"], ["x", "y"])
  with pytest.raises(ValueError, match="reward_weights has 2 entries for 1 reward sources"):
    RewardRunner(one, weights=[1.0, 2.0])
  with pytest.raises(ValueError, match="reward_weights for 'accuracy_reward' must be finite"):
    RewardRunner(["accuracy_reward"], weights=[float("nan")])
  with pytest.raises(ValueError, match=r"share the names \['accuracy_reward'\]"):
    RewardRunner(["accuracy_reward", "accuracy_reward"])
  RewardRunner(["accuracy_reward", "accuracy_reward"], names=["acc_a", "acc_b"])
  with pytest.raises(ValueError, match="on_timeout='skip' is not supported"):
    RewardRunner(one, on_timeout="skip")
  with pytest.raises(ValueError, match="timeout must be > 0"):
    RewardRunner(one, timeout=0)


def test_dotted_paths_import_from_the_working_directory(tmp_path, monkeypatch):
  (tmp_path / "my_reward_module_h7.py").write_text(
    "LIMIT = 3\n"
    "def short_reward(completions, **kwargs):\n"
    "  return [float(len(c) <= LIMIT) for c in completions]\n"
  )
  monkeypatch.chdir(tmp_path)
  monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
  monkeypatch.delitem(sys.modules, "my_reward_module_h7", raising=False)
  try:
    (func,) = resolve_reward_funcs(["my_reward_module_h7.short_reward"])
    out = rewards.compute_rewards(["my_reward_module_h7.short_reward", "think_format_reward"],
                                  ["p"], ["abc", "abcd"], num_generations=2)
    assert func.__name__ == "short_reward"
    assert out.names == ("short_reward", "think_format_reward")
    np.testing.assert_array_equal(out.per_source[:, 0], [1.0, 0.0])
    with pytest.raises(ValueError, match=r"reward_funcs\[0\]='my_reward_module_h7.missing'.* no "):
      resolve_reward_funcs(["my_reward_module_h7.missing"])
    with pytest.raises(ValueError, match="is a int, not a callable"):
      resolve_reward_funcs(["my_reward_module_h7.LIMIT"])
  finally:
    sys.modules.pop("my_reward_module_h7", None)
  with pytest.raises(ValueError, match=r"reward_funcs\[1\]='no_such_module_h7.f': cannot import"):
    resolve_reward_funcs([len, "no_such_module_h7.f"])
  with pytest.raises(ValueError, match="'accuracy' is neither a built-in"):
    resolve_reward_funcs(["accuracy"])
  with pytest.raises(ValueError, match="needs max_completion_len and soft_punish_cache"):
    resolve_reward_funcs(["soft_overlong_punishment"])


def test_builtin_names_resolve_to_the_builtins():
  acc, fmt, soft, trl_soft = resolve_reward_funcs(
    ["accuracy_reward", "think_format_reward", "soft_overlong_punishment",
     "get_soft_overlong_punishment"], max_completion_len=8, soft_punish_cache=4)
  assert acc is rewards.accuracy_reward and fmt is rewards.think_format_reward
  assert soft.__name__ == trl_soft.__name__ == "soft_overlong_punishment"
  assert soft(completion_ids=[[0] * 6]) == [-0.5]
  # The one-shot helper takes the runner's settings too (it used to take no lengths or names).
  out = rewards.compute_rewards(["soft_overlong_punishment", "think_format_reward"], ["p"],
                                ["a", "b"], [[0] * 6, [0] * 3], num_generations=2,
                                max_completion_len=8, soft_punish_cache=4,
                                names=["overlong", "format"])
  assert out.names == ("overlong", "format")
  np.testing.assert_array_equal(out.per_source[:, 0], [-0.5, 0.0])


# --- the built-ins ------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
  (r"so the answer is \boxed{42}.", "42"),
  (r"\boxed{1} first, then \boxed{\frac{1}{2}}", r"\frac{1}{2}"),
  (r"nested \boxed{\left\{ x : x^{2} = 1 \right\}} done", r"\left\{ x : x^{2} = 1 \right\}"),
  (r"\fbox{7} is the answer", "7"),
  (r"$\boxed 5$", "5"),
  (r"truncated \boxed{\frac{1}{", "1"),  # unclosed box: fall back to the last number
  ("Natalia sold 48/2 = 24 clips.\n#### 72", "72"),
  ("#### 1,000 apples\nthat's it", "1,000"),
  ("#### x + 1", "x + 1"),
  ("I think 3 apples cost $1,200.", "1,200"),
  ("The ratio is 3/4 and then -2.5", "-2.5"),
  ("half is .5", ".5"),
  ("no digits here", None),
  ("version v2 of x3", None),
])
def test_extract_answer(text, expected):
  assert rewards.extract_answer(text) == expected


@pytest.mark.parametrize("answer, value", [
  ("42", Fraction(42)),
  ("1,000", Fraction(1000)),
  ("1{,}000", Fraction(1000)),
  ("-1,234.5", Fraction(-24690, 20)),
  ("2.0", Fraction(2)),
  ("0.5", Fraction(1, 2)),
  (".5", Fraction(1, 2)),
  ("1/2", Fraction(1, 2)),
  (r"\frac{1}{2}", Fraction(1, 2)),
  (r"\dfrac{3}{4}", Fraction(3, 4)),
  (r"\frac12", Fraction(1, 2)),
  (r"-\frac{1}{3}", Fraction(-1, 3)),
  (r"\$5.", Fraction(5)),
  ("$18$", Fraction(18)),
  (r"\text{7}", Fraction(7)),
  ("50%", Fraction(50)),
  (r"50\%", Fraction(50)),
  ("+3", Fraction(3)),
  ("1,2", None),
  ("1/0", None),
  ("x+1", None),
  ("", None),
  ("1_000", None),
])
def test_parse_number(answer, value):
  assert rewards.parse_number(answer) == value


@pytest.mark.parametrize("predicted, gold, equal", [
  ("0.5", r"\frac{1}{2}", True),
  ("1/2", "0.5", True),
  ("1,000", "1000", True),
  ("72.0", "72", True),
  ("50%", "50", True),
  ("50%", "0.5", False),
  ("0.333", "1/3", False),
  ("x + 1", "x+1", True),
  (r"\left( 1, 2 \right)", "(1,2)", True),
  ("3", "4", False),
  ("2", "two", False),
])
def test_answers_match(predicted, gold, equal):
  assert rewards.answers_match(predicted, gold) is equal


def test_the_unicode_minus_is_a_minus_sign():
  # Dropping it turned a wrong "−5" into a right "5" (and a right "−5" into a wrong answer).
  assert rewards.extract_answer("so x = \u22125") == "-5"
  assert rewards.extract_answer("#### \u22123.5 degrees") == "-3.5"
  assert rewards.parse_number("\u22125") == Fraction(-5)
  assert rewards.answers_match("\u22121/2", r"-\frac{1}{2}")
  assert rewards.accuracy_reward(["so x = \u22125", "\\boxed{\u22125}"],
                                 solution=["5", "-5"]) == [0.0, 1.0]


def test_accuracy_reward_reads_solution_or_answer_columns():
  completions = [r"so \boxed{\frac{1}{2}}", "the total is 1,000.", "#### 9", "no idea", "0.5"]
  solution = [r"We get $\boxed{0.5}$.", "1000", "#### 8", "7", ""]
  assert rewards.accuracy_reward(completions, solution=solution) == [1.0, 1.0, 0.0, 0.0, None]
  gsm8k = ["Half of 1 is 1/2.\n#### 0.5"]
  conversational = [[{"role": "assistant", "content": "It is 0.50"}]]
  assert rewards.accuracy_reward(conversational, answer=gsm8k) == [1.0]
  # `solution` wins over `answer` (TRL's column name first).
  assert rewards.accuracy_reward(["5"], solution=["5"], answer=["6"]) == [1.0]
  with pytest.raises(ValueError, match=r"'solution' or an 'answer' dataset column.*\['level'\]"):
    rewards.accuracy_reward(["5"], level=[1], prompts=["p"], trainer_state=None)


def test_accuracy_reward_through_the_runner_skips_samples_without_gold():
  with pytest.warns(AllRewardsNoneWarning, match="2 of 4 completions"):
    out = rewards.compute_rewards(["accuracy_reward"], ["q1", "q2"], ["4", "5", "x", "y"],
                                  columns={"answer": ["4", ""]}, num_generations=2,
                                  weights=[1.0])
  np.testing.assert_array_equal(out.per_source[:, 0], [1.0, 0.0, np.nan, np.nan])


@pytest.mark.parametrize("completion, reward", [
  ("<think>2+2 is 4</think>The answer is 4.", 1.0),
  ("  \n<think>\nline one\nline two\n</think>\n\\boxed{4}\n", 1.0),
  ("<think>reasoning</think>", 0.0),                 # no answer
  ("<think>reasoning</think>   \n", 0.0),            # blank answer
  ("<think>  </think>4", 0.0),                       # blank reasoning
  ("4 <think>late</think> 4", 0.0),                  # text before the tag
  ("<think>a</think>b<think>c</think>d", 0.0),       # two think blocks
  ("<think>a<think>b</think>c", 0.0),                # nested opening tag
  ("<think>a</think>b</think>", 0.0),                # stray closing tag
  ("reasoning</think>answer", 0.0),                  # opening tag in the prompt: fails
  ("no tags at all", 0.0),
])
def test_think_format_reward(completion, reward):
  assert rewards.think_format_reward([completion]) == [reward]
  assert rewards.think_format_reward([[{"role": "assistant", "content": completion}]]) == [reward]


def test_soft_overlong_punishment_follows_dapo_in_tokens():
  # DAPO's setting: L_max = 20480, L_cache = 4096.
  f = rewards.soft_overlong_punishment(max_completion_len=20480, soft_punish_cache=4096)
  lengths = [0, 16384, 16385, 18432, 20480, 20481]
  expected = [0.0, 0.0, -1 / 4096, -0.5, -1.0, -1.0]
  np.testing.assert_allclose(f(completion_ids=[[7] * n for n in lengths]), expected)
  # Counted in tokens, not characters: one long token is one.
  small = rewards.soft_overlong_punishment(max_completion_len=4, soft_punish_cache=2)
  out = rewards.compute_rewards([small], ["p"], ["a" * 100, "b"], [[1], [1, 2, 3]],
                                num_generations=2)
  np.testing.assert_allclose(out.rewards, [0.0, -0.5])
  with pytest.raises(ValueError, match="soft_punish_cache=5 must be <= max_completion_len=4"):
    rewards.soft_overlong_punishment(max_completion_len=4, soft_punish_cache=5)
  # TRL allows soft_punish_cache=0: no ramp, only an overlong completion gets -1.
  hard = rewards.soft_overlong_punishment(max_completion_len=4, soft_punish_cache=0)
  assert hard(completion_ids=[[1] * 3, [1] * 4, [1] * 5]) == [0.0, 0.0, -1.0]
  for bad in (-1, True):
    with pytest.raises(ValueError, match=r"soft_punish_cache must be an int >= 0"):
      rewards.soft_overlong_punishment(max_completion_len=4, soft_punish_cache=bad)
  with pytest.raises(RewardFunctionError, match="needs completion_ids"):
    rewards.compute_rewards([small], ["p"], ["a"])


def test_reward_names():
  import functools

  def base(**kwargs):
    return []

  class Scorer:
    def __call__(self, **kwargs):
      return []

  named = Scorer()
  named.name = "judge"
  assert rewards.reward_name(base) == "base"
  assert rewards.reward_name(functools.partial(base, x=1)) == "base"
  assert rewards.reward_name(Scorer()) == "Scorer"
  assert rewards.reward_name(named) == "judge"
  # One scored sample: no Bessel-corrected spread (TRL's nanstd is NaN there too).
  with pytest.warns(AllRewardsNoneWarning):
    out = rewards.compute_rewards([lambda completions, **kw: [None, 1.0]], ["p"], ["a", "b"],
                                  num_generations=2)
  assert out.metrics["rewards/<lambda>/mean"] == 1.0
  assert math.isnan(out.metrics["rewards/<lambda>/std"])


def test_reward_functions_alone_import_neither_flax_nor_transformers():
  code = ("import sys; from alignax.rewards import RewardRunner, accuracy_reward;"
          "import alignax.rewards as r; assert 'RewardEnsemble' in r.__all__;"
          "heavy = {'flax', 'transformers'} & set(sys.modules); assert not heavy, heavy;"
          "r.RewardEnsemble; assert 'flax' in sys.modules; print('ok')")
  res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       timeout=300)
  assert res.returncode == 0, res.stderr
  assert res.stdout.strip() == "ok"
