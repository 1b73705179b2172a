"""Where a run's metrics go: ``metrics.jsonl`` always, TensorBoard and W&B when asked, a progress bar,
and ``trainer_state.json`` in the layout ``transformers`` writes, so tools that read TRL runs read ours.

Only the main process (``jax.process_index() == 0``) writes; every process may call ``log`` with the
same (already globally reduced) metrics. ``metrics.jsonl`` is opened in append mode, so a resumed run
continues the file instead of truncating it; ``trainer_state.json``'s ``log_history`` is restored from
the checkpoint a run resumes from (``MetricsLogger.restore_history``), as ``transformers`` does.
"""

import dataclasses
import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

REPORT_TO = ("jsonl", "tensorboard", "wandb", "none", "all")
METRICS_FILE = "metrics.jsonl"
TRAINER_STATE_FILE = "trainer_state.json"
TENSORBOARD_DIR = "runs"


def _scalar(name: str, value: Any) -> float | int:
  """A Python number from a JAX/NumPy scalar; anything else is a named error."""
  try:
    if hasattr(value, "item"):
      value = value.item()
  except (TypeError, ValueError):
    raise TypeError(f"metric {name!r} must be a scalar, got shape {getattr(value, 'shape', '?')}")
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise TypeError(f"metric {name!r} must be a number, got {type(value).__name__}")
  return value


def _jsonable(value: float | int) -> float | int | str:
  # JSON has no NaN/Inf literals; json.dumps would write invalid JSON for them.
  if isinstance(value, float) and not math.isfinite(value):
    return repr(value)
  return value


def resolve_report_to(report_to: str | Sequence[str] | None) -> tuple[str, ...]:
  """TRL's ``--report_to`` values: ``none``, ``all`` or a list of ``tensorboard`` / ``wandb``.

  ``metrics.jsonl`` is always written; ``jsonl`` is accepted and implied.
  """
  if report_to is None:
    names = []
  elif isinstance(report_to, str):
    names = [n.strip() for n in report_to.split(",") if n.strip()]
  else:
    names = list(report_to)
  for name in names:
    if name not in REPORT_TO:
      raise ValueError(f"report_to={name!r} is not supported; choose from {list(REPORT_TO)}")
  if "all" in names:
    return ("jsonl", "tensorboard", "wandb")
  return ("jsonl", *sorted({n for n in names if n in ("tensorboard", "wandb")}))


class MetricsLogger:
  """Writes metrics to ``output_dir`` and the requested sinks.

  Args:
    output_dir: the run directory (created on the main process).
    report_to: extra sinks, TRL's names (``"tensorboard"``, ``"wandb"``, ``"all"``, ``"none"``).
    run_name: the W&B run name and TensorBoard sub-directory (default: the output dir's name).
    config: the resolved run configuration, sent to W&B.
    is_main_process: whether this process writes (pass ``jax.process_index() == 0``).
    trainer_state: initial ``transformers.TrainerState`` fields (``max_steps``, ``logging_steps``,
      ``eval_steps``, ``save_steps``, ``train_batch_size``, ``num_train_epochs``).
  """

  def __init__(self, output_dir: str | os.PathLike, *, report_to: str | Sequence[str] | None = None,
               run_name: str | None = None, config: Mapping[str, Any] | None = None,
               is_main_process: bool = True, trainer_state: Mapping[str, Any] | None = None):
    from transformers.trainer_callback import TrainerState

    self.output_dir = os.fspath(output_dir)
    self.sinks = resolve_report_to(report_to)
    self.is_main_process = is_main_process
    self.state = TrainerState(**dict(trainer_state or {}))
    self.state.log_history = []
    self._tensorboard = None
    self._wandb = None
    self._metrics_file = None
    if not is_main_process:
      return
    os.makedirs(self.output_dir, exist_ok=True)
    self._metrics_file = open(os.path.join(self.output_dir, METRICS_FILE), "a", buffering=1)
    run_name = run_name or os.path.basename(os.path.abspath(self.output_dir))
    if "tensorboard" in self.sinks:
      try:
        from tensorboardX import SummaryWriter
      except ImportError as error:
        raise ImportError("report_to tensorboard needs tensorboardX: pip install tensorboardX") \
          from error
      self._tensorboard = SummaryWriter(os.path.join(self.output_dir, TENSORBOARD_DIR, run_name))
    if "wandb" in self.sinks:
      try:
        import wandb
      except ImportError as error:
        raise ImportError("report_to wandb needs the wandb package: pip install wandb") from error
      self._wandb = wandb.init(name=run_name, config=dict(config or {}), dir=self.output_dir,
                               reinit=True)

  def restore_history(self, source: str | os.PathLike | Mapping[str, Any]) -> None:
    """Continues from a checkpoint's trainer state (its ``log_history``, step, epoch and tokens).

    Args:
      source: the path of a ``trainer_state.json``, or its fields as a mapping (what
        ``Checkpointer.restore`` returns as ``trainer_state``).
    """
    from transformers.trainer_callback import TrainerState

    if isinstance(source, Mapping):
      known = {f.name for f in dataclasses.fields(TrainerState)}
      restored = TrainerState(**{k: v for k, v in source.items() if k in known})
    else:
      restored = TrainerState.load_from_json(os.fspath(source))
    self.state.log_history = list(restored.log_history)
    self.state.global_step = restored.global_step
    self.state.epoch = restored.epoch
    self.state.num_input_tokens_seen = restored.num_input_tokens_seen

  def log(self, step: int, metrics: Mapping[str, Any], *, epoch: float | None = None) -> dict:
    """Records one line of metrics at ``step``; returns it as written (Python numbers).

    Raises:
      TypeError: a metric is not a scalar number.
    """
    record = {name: _scalar(name, value) for name, value in metrics.items()}
    if epoch is not None:
      record["epoch"] = epoch
      self.state.epoch = epoch
    record["step"] = int(step)
    self.state.global_step = int(step)
    self.state.log_history.append(record)
    if not self.is_main_process:
      return record
    line = {k: _jsonable(v) for k, v in record.items()}
    line["time"] = time.time()
    self._metrics_file.write(json.dumps(line) + "\n")
    if self._tensorboard is not None:
      for name, value in record.items():
        if name not in ("step", "epoch"):
          self._tensorboard.add_scalar(name, value, global_step=int(step))
      self._tensorboard.flush()
    if self._wandb is not None:
      self._wandb.log({k: v for k, v in record.items() if k != "step"}, step=int(step))
    return record

  def save_state(self, directory: str | os.PathLike | None = None) -> str:
    """Writes ``trainer_state.json`` (to ``directory``, default the output dir); returns its path."""
    path = os.path.join(os.fspath(directory or self.output_dir), TRAINER_STATE_FILE)
    if self.is_main_process:
      os.makedirs(os.path.dirname(path), exist_ok=True)
      self.state.save_to_json(path)
    return path

  def state_json(self) -> str:
    """``trainer_state.json``'s text as ``transformers`` writes it (for a checkpoint snapshot)."""
    return json.dumps(dataclasses.asdict(self.state), indent=2, sort_keys=True) + "\n"

  def update_state(self, **fields: Any) -> None:
    """Sets ``TrainerState`` fields (``max_steps``, ``best_metric``, ``num_input_tokens_seen``...)."""
    known = {f.name for f in dataclasses.fields(self.state)}
    unknown = sorted(set(fields) - known)
    if unknown:
      raise ValueError(f"not TrainerState fields: {unknown}")
    for name, value in fields.items():
      setattr(self.state, name, value)

  def close(self) -> None:
    if self._metrics_file is not None:
      self._metrics_file.close()
      self._metrics_file = None
    if self._tensorboard is not None:
      self._tensorboard.close()
      self._tensorboard = None
    if self._wandb is not None:
      self._wandb.finish()
      self._wandb = None

  def __enter__(self) -> "MetricsLogger":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
