"""The engine's configuration: Hugging Face ``TrainingArguments``' names and meanings, so a TRL command
line carries over (``transformers.HfArgumentParser`` parses these dataclasses).

Batch sizes follow TRL: ``per_device_train_batch_size`` rows per data-parallel device (the devices
of the ``data`` and ``fsdp`` mesh axes; tensor-parallel devices share their rows), accumulated
``gradient_accumulation_steps`` times per optimizer step, so one step sees
``per_device_train_batch_size × (data × fsdp) × gradient_accumulation_steps`` rows.
"""

import dataclasses
from typing import Any

from alignax import _validate
from alignax.train.logger import resolve_report_to
from alignax.train.optim import LR_SCHEDULER_TYPES


@dataclasses.dataclass
class TrainingConfig:
  """Options every trainer shares (TRL/transformers names; defaults are transformers' unless noted).

  Attributes:
    output_dir: where checkpoints, metrics and the final model go.
    learning_rate: peak learning rate (each trainer sets TRL's default for its algorithm).
    per_device_train_batch_size: rows per data-parallel device per micro-batch.
    gradient_accumulation_steps: micro-batches per optimizer step.
    max_steps: optimizer steps; -1 derives them from ``num_train_epochs``.
    num_train_epochs: passes over the training set when ``max_steps`` is -1.
    logging_steps: log every N steps (TRL: 10).
    save_steps: checkpoint every N steps (and at the end).
    save_total_limit: keep the newest N checkpoints (None: all).
    eval_steps: evaluate every N steps (None: ``logging_steps``'s value, as transformers).
    seed: initialisation, shuffling and dropout randomness.
    lr_scheduler_type: ``linear`` | ``cosine`` | ``constant`` | ``constant_with_warmup``.
    warmup_steps, warmup_ratio: linear warmup (steps win when > 0).
    weight_decay: AdamW's decoupled weight decay.
    adam_beta1, adam_beta2, adam_epsilon: Adam's constants.
    max_grad_norm: global-norm gradient clipping (0: none).
    report_to: ``none`` | ``tensorboard`` | ``wandb`` | ``all`` (``metrics.jsonl`` is always written).
    run_name: the run's name in TensorBoard / W&B.
    resume_from_checkpoint: a ``checkpoint-N`` directory, or ``true`` for the latest in
      ``output_dir``.
    disable_tqdm: no progress bar.

  The compute dtype, remat policy and mesh belong to the model (``from_pretrained(path, mesh=,
  dtype="bf16", remat=)``), so they are not options here.
  """

  output_dir: str
  learning_rate: float = 5e-5
  per_device_train_batch_size: int = 8
  gradient_accumulation_steps: int = 1
  max_steps: int = -1
  num_train_epochs: float = 3.0
  logging_steps: int = 10
  save_steps: int = 500
  save_total_limit: int | None = None
  eval_steps: int | None = None
  seed: int = 42
  lr_scheduler_type: str = "linear"
  warmup_steps: int = 0
  warmup_ratio: float = 0.0
  weight_decay: float = 0.0
  adam_beta1: float = 0.9
  adam_beta2: float = 0.999
  adam_epsilon: float = 1e-8
  max_grad_norm: float = 1.0
  report_to: str = "none"
  run_name: str | None = None
  resume_from_checkpoint: str | None = None
  disable_tqdm: bool = False

  def __post_init__(self):
    for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "logging_steps",
                 "save_steps"):
      _validate.positive_int(name, getattr(self, name))
    if self.eval_steps is not None:
      _validate.positive_int("eval_steps", self.eval_steps)
    if self.max_steps != -1:
      _validate.positive_int("max_steps", self.max_steps)
    _validate.positive("learning_rate", self.learning_rate)
    _validate.positive("num_train_epochs", self.num_train_epochs)
    _validate.choice("lr_scheduler_type", self.lr_scheduler_type, LR_SCHEDULER_TYPES)
    resolve_report_to(self.report_to)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)
