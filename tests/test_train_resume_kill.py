"""A real process SIGKILLed right after a checkpoint and resumed with
``resume_from_checkpoint=true`` logs what an uninterrupted run logs, bitwise: the same batches in
the same order, the same per-step losses and token counts; ``metrics.jsonl`` is appended to and
``log_history`` continues.

(tests/test_train_sft.py covers an in-process exception; tests/test_train_checkpoint.py a kill in
the middle of a save.)"""

import json
import os
import signal
import subprocess
import sys

import pytest

from train_factories import tiny_tokenizer_and_llama

WORKER = os.path.join(os.path.dirname(__file__), "train_worker.py")
TIMEOUT_S = 300


def _run(*specs):
  """Runs one worker per spec at the same time; returns their exit codes (all bounded in time)."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  processes = [subprocess.Popen([sys.executable, WORKER, json.dumps(spec)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for spec in specs]
  outputs = []
  try:
    for p in processes:
      outputs.append(p.communicate(timeout=TIMEOUT_S)[0])
  except subprocess.TimeoutExpired:
    pytest.fail(f"a worker ran past {TIMEOUT_S} s")
  finally:
    for p in processes:
      if p.poll() is None:
        p.kill()
  return [(p.returncode, output) for p, output in zip(processes, outputs)]


def _lines(run):
  return [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]


def test_sigkill_after_a_checkpoint_then_resume_matches_the_uninterrupted_run(tmp_path):
  tiny_tokenizer_and_llama(tmp_path)
  common = dict(root=str(tmp_path), devices=2, rows=4,
                training=dict(max_steps=6, save_steps=3, gradient_accumulation_steps=2))
  straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
  # Killed from step 5's hook once checkpoint-3 is on disk: step 4 was logged, then lost.
  (straight_code, straight_out), (killed_code, killed_out) = _run(
    dict(common, output_dir=straight), dict(common, output_dir=killed, kill_at_step=5,
                                            kill_after_checkpoint=3))
  assert straight_code == 0, straight_out[-4000:]
  assert killed_code == -signal.SIGKILL, killed_out[-4000:]
  assert [line["step"] for line in _lines(killed)] == [1, 2, 3, 4]
  assert not os.path.exists(os.path.join(killed, "checkpoint-6"))

  [(code, out)] = _run(dict(common, output_dir=killed,
                            training=dict(common["training"], resume_from_checkpoint="true")))
  assert code == 0, out[-4000:]

  expected = _lines(straight)
  got = _lines(killed)
  # Appended, not truncated: the killed run's lines stay, the resumed run starts again at step 4.
  assert [line["step"] for line in got] == [1, 2, 3, 4, 4, 5, 6]
  fields = ("loss", "grad_norm", "entropy", "learning_rate", "num_tokens")
  for line in got:
    want = expected[line["step"] - 1]
    # Bitwise (==, not a tolerance); num_tokens depends on which rows each batch holds.
    assert {k: line[k] for k in fields} == {k: want[k] for k in fields}, line["step"]

  state = json.load(open(os.path.join(killed, "trainer_state.json")))
  reference = json.load(open(os.path.join(straight, "trainer_state.json")))
  assert [h["step"] for h in state["log_history"]] == [1, 2, 3, 4, 5, 6]
  assert [h["loss"] for h in state["log_history"]] == [h["loss"] for h in reference["log_history"]]
  assert state["num_input_tokens_seen"] == reference["num_input_tokens_seen"]
  with open(os.path.join(killed, "checkpoint-6", "trainer_state.json")) as f:
    assert [h["step"] for h in json.load(f)["log_history"]] == [1, 2, 3, 4, 5, 6]
