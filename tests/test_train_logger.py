"""Metric sinks: metrics.jsonl (append on resume), TensorBoard events, trainer_state.json as
transformers writes it."""

import glob
import json
import math
import os
import struct

import jax.numpy as jnp
import numpy as np
import pytest
from transformers.trainer_callback import TrainerState

from alignax.train.logger import MetricsLogger, resolve_report_to


def _events(directory):
  """Scalar (tag, step, value) triples from tensorboardX event files (TFRecord framing)."""
  from tensorboardX.proto import event_pb2

  out = []
  for path in sorted(glob.glob(os.path.join(directory, "**", "events.out.tfevents.*"),
                               recursive=True)):
    data = open(path, "rb").read()
    offset = 0
    while offset < len(data):
      (length,) = struct.unpack("<Q", data[offset:offset + 8])
      record = data[offset + 12:offset + 12 + length]
      offset += 12 + length + 4
      event = event_pb2.Event.FromString(record)
      for value in event.summary.value:
        out.append((value.tag, event.step, value.simple_value))
  return out


def test_jsonl_tensorboard_and_trainer_state(tmp_path):
  with MetricsLogger(tmp_path, report_to="tensorboard", trainer_state={"max_steps": 4}) as logger:
    logger.log(1, {"loss": jnp.float32(0.5), "rewards/margins": np.float64(0.25)}, epoch=0.5)
    logger.log(2, {"loss": 0.25, "grad_norm": float("nan")})
    state_path = logger.save_state()
  lines = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert [line["step"] for line in lines] == [1, 2]
  assert lines[0]["loss"] == 0.5 and lines[0]["rewards/margins"] == 0.25 and lines[0]["epoch"] == 0.5
  assert lines[1]["grad_norm"] == "nan"  # valid JSON, not a bare NaN literal
  state = TrainerState.load_from_json(state_path)
  assert state.global_step == 2 and state.max_steps == 4
  assert [h["step"] for h in state.log_history] == [1, 2]
  assert math.isnan(state.log_history[1]["grad_norm"])
  scalars = _events(tmp_path / "runs")
  assert ("loss", 1, 0.5) in scalars and ("loss", 2, 0.25) in scalars
  assert ("rewards/margins", 1, 0.25) in scalars


def test_resume_appends_and_restores_history(tmp_path):
  with MetricsLogger(tmp_path) as first:
    for step in (1, 2, 3):
      first.log(step, {"loss": 1.0 / step})
      if step == 2:
        checkpoint_state = first.save_state(tmp_path / "checkpoint-2")
  with MetricsLogger(tmp_path) as resumed:
    resumed.restore_history(checkpoint_state)
    assert [h["step"] for h in resumed.state.log_history] == [1, 2]
    resumed.log(3, {"loss": 0.3})
    resumed.save_state()
  steps = [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")]
  assert steps == [1, 2, 3, 3]  # never truncated: the killed run's line 3 stays, the rerun appends
  assert [h["step"] for h in TrainerState.load_from_json(
    str(tmp_path / "trainer_state.json")).log_history] == [1, 2, 3]


def test_only_the_main_process_writes(tmp_path):
  with MetricsLogger(tmp_path / "run", report_to="tensorboard", is_main_process=False) as logger:
    record = logger.log(1, {"loss": 1.0})
    logger.save_state()
  assert record == {"loss": 1.0, "step": 1}
  assert not (tmp_path / "run").exists()


def test_bad_metrics_and_sinks_are_named_errors(tmp_path):
  with MetricsLogger(tmp_path) as logger:
    with pytest.raises(TypeError, match="'per_token'"):
      logger.log(1, {"per_token": jnp.ones(3)})
    with pytest.raises(TypeError, match="'name'"):
      logger.log(1, {"name": "x"})
    with pytest.raises(ValueError, match="not TrainerState fields"):
      logger.update_state(nonsense=1)
  with pytest.raises(ValueError, match="report_to='tensorbord'"):
    resolve_report_to("tensorbord")
  assert resolve_report_to("none") == ("jsonl",)
  assert resolve_report_to(["wandb", "tensorboard"]) == ("jsonl", "tensorboard", "wandb")
  assert resolve_report_to("all") == ("jsonl", "tensorboard", "wandb")
