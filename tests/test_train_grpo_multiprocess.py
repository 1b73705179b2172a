"""GRPO with two processes joined by ``jax.distributed`` (localhost, 4 CPU devices each) against
one process with 8 devices on the same global batch: the same rewards, advantages' effect (losses,
grad norms) and batch statistics for 2 steps, each host's reward function scoring only its own
prompts, one set of files written by process 0 (the completions of both hosts' rows), and an exact
resume of the two-process run from its checkpoint."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from train_factories import tiny_tokenizer_and_llama

WORKER = os.path.join(os.path.dirname(__file__), "grpo_worker.py")
TIMEOUT_S = 300
# Batch statistics (scale_rewards="batch"), a reference (beta > 0) and two micro-batches: every
# host-side path of the rollout that a second host could change.
TRAINING = dict(beta=0.04, scale_rewards="batch", gradient_accumulation_steps=2,
                per_device_train_batch_size=2, num_generations=2)
COMPARED = ("loss", "grad_norm", "reward", "reward_std", "frac_reward_zero_std", "kl",
            "completions/mean_length", "rewards/even_fraction/mean", "rewards/even_fraction/std",
            "sampling/sampling_logp_difference/max", "num_tokens")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start(spec):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  return subprocess.Popen([sys.executable, WORKER, json.dumps(spec)], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _two(spec):
  port = _free_port()
  return [_start(dict(spec, devices=4, num_processes=2, process_id=i,
                      coordinator=f"localhost:{port}")) for i in range(2)]


def _finish(processes):
  outputs = []
  try:
    for p in processes:
      outputs.append(p.communicate(timeout=TIMEOUT_S)[0])
  except subprocess.TimeoutExpired:
    pytest.fail(f"a worker ran past {TIMEOUT_S} s: {[p.args for p in processes]}")
  finally:
    for p in processes:
      if p.poll() is None:
        p.kill()
  for p, output in zip(processes, outputs):
    assert p.returncode == 0, output[-4000:]


def _metrics(run):
  return [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]


def _scored(run, process):
  """The prompts of each reward call (one per round) of a process, one per completion."""
  return [json.loads(line) for line in open(os.path.join(run, f"scored-{process}.jsonl"))]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("grpo_multiprocess")
  tiny_tokenizer_and_llama(root)
  one, two = str(root / "one"), str(root / "two")
  _finish([_start(dict(root=str(root), output_dir=one, devices=8, training=TRAINING)),
           *_two(dict(root=str(root), output_dir=two, training=TRAINING))])
  return root, one, two


def test_two_processes_train_what_one_process_trains(runs):
  _, one, two = runs
  first, second = _metrics(one), _metrics(two)
  assert [m["step"] for m in second] == [1, 2]  # process 0 alone writes
  for a, b in zip(first, second):
    for name in COMPARED:
      np.testing.assert_allclose(b[name], a[name], rtol=1e-6, atol=1e-7, err_msg=name)
  for i in range(2):
    done = json.load(open(os.path.join(two, f"done-{i}.json")))
    assert done["process_count"] == 2 and [h["step"] for h in done["history"]] == [1, 2]


def test_each_host_scores_its_own_prompts_and_process_0_writes_every_row(runs):
  _, one, two = runs
  # Each round: 8 prompts x 2 completions on each host, whole groups, no prompt on both hosts,
  # and together the one-process run's batch in its order.
  for mine, theirs, whole in zip(_scored(two, 0), _scored(two, 1), _scored(one, 0), strict=True):
    assert len(mine) == len(theirs) == 16 and not set(mine) & set(theirs)
    assert mine + theirs == whole
  for step in (1, 2):
    name = f"completions/completions_{step:06d}.jsonl"
    rows = [json.loads(line) for line in open(os.path.join(two, name))]
    expected = [json.loads(line) for line in open(os.path.join(one, name))]
    assert len(rows) == 32
    assert [(r["prompt"], r["completion"]) for r in rows] == \
      [(r["prompt"], r["completion"]) for r in expected]
    np.testing.assert_allclose([r["advantage"] for r in rows],
                               [r["advantage"] for r in expected], rtol=1e-6, atol=1e-7)


def test_two_processes_resume_their_checkpoint_exactly(runs):
  root, _, two = runs
  resumed = str(root / "resumed")
  _finish(_two(dict(root=str(root), output_dir=resumed,
                    training=dict(TRAINING, resume_from_checkpoint=os.path.join(
                      two, "checkpoint-1")))))
  # The rollout key comes from the checkpointed RNG and the round: step 2 again, bitwise.
  fields = ("loss", "grad_norm", "reward", "num_tokens", "step")
  assert [{k: m[k] for k in fields} for m in _metrics(resumed)] == \
    [{k: m[k] for k in fields} for m in _metrics(two)[1:]]
  state = json.load(open(os.path.join(resumed, "trainer_state.json")))
  assert [h["step"] for h in state["log_history"]] == [1, 2]
