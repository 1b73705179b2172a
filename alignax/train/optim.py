"""The optimiser of every trainer: AdamW with warmup and a decay schedule, and gradient clipping, from
optax, with Hugging Face ``TrainingArguments``' names and defaults so a TRL command line means the
same here.

Schedules (``lr_scheduler_type``), with peak rate η, W warmup steps and N total steps:

* ``linear``: η·t/W during warmup, then η·(N − t)/(N − W) down to 0 (transformers' default);
* ``cosine``: warmup, then η·½(1 + cos(π·(t − W)/(N − W)));
* ``constant_with_warmup``: warmup, then η;
* ``constant``: η from the first step (no warmup allowed).
"""

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from alignax import _validate

LR_SCHEDULER_TYPES = ("linear", "cosine", "constant", "constant_with_warmup")


def warmup_steps_of(*, max_steps: int, warmup_steps: int = 0, warmup_ratio: float = 0.0) -> int:
  """transformers' rule: ``warmup_steps`` if > 0, else ``ceil(warmup_ratio · max_steps)``."""
  _validate.non_negative("warmup_steps", warmup_steps)
  _validate.in_unit_interval("warmup_ratio", warmup_ratio, closed_right=True)
  return int(warmup_steps) if warmup_steps > 0 else math.ceil(warmup_ratio * max_steps)


def learning_rate_schedule(learning_rate: float, *, max_steps: int,
                           lr_scheduler_type: str = "linear", warmup_steps: int = 0,
                           warmup_ratio: float = 0.0) -> optax.Schedule:
  """The learning rate as a function of the optimizer step (0-based, as optax counts).

  Raises:
    ValueError: an unknown schedule, a non-positive rate or step count, warmup past ``max_steps``,
      or warmup with ``constant``.
  """
  _validate.choice("lr_scheduler_type", lr_scheduler_type, LR_SCHEDULER_TYPES)
  _validate.positive("learning_rate", learning_rate)
  _validate.positive_int("max_steps", max_steps)
  warmup = warmup_steps_of(max_steps=max_steps, warmup_steps=warmup_steps,
                           warmup_ratio=warmup_ratio)
  if warmup > max_steps:
    raise ValueError(f"warmup ({warmup} steps) exceeds max_steps={max_steps}")
  if lr_scheduler_type == "constant":
    if warmup:
      raise ValueError("lr_scheduler_type='constant' takes no warmup; use 'constant_with_warmup'")
    return optax.constant_schedule(learning_rate)
  ramp = optax.linear_schedule(0.0, learning_rate, warmup) if warmup else None
  decay_steps = max(max_steps - warmup, 1)
  if lr_scheduler_type == "linear":
    after = optax.linear_schedule(learning_rate, 0.0, decay_steps)
  elif lr_scheduler_type == "cosine":
    after = optax.cosine_decay_schedule(learning_rate, decay_steps)
  else:
    after = optax.constant_schedule(learning_rate)
  if ramp is None:
    return after
  return optax.join_schedules([ramp, after], [warmup])


def make_optimizer(learning_rate: float, *, max_steps: int,
                   lr_scheduler_type: str = "linear", warmup_steps: int = 0,
                   warmup_ratio: float = 0.0, weight_decay: float = 0.0, adam_beta1: float = 0.9,
                   adam_beta2: float = 0.999, adam_epsilon: float = 1e-8,
                   max_grad_norm: float | None = 1.0,
                   weight_decay_mask: Any | Callable[[Any], Any] | None = None
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """``clip_by_global_norm(max_grad_norm)`` then AdamW on ``learning_rate_schedule``.

  Defaults are ``transformers.TrainingArguments``' (TRL's trainers set their own learning rates:
  DPO 1e-6, SFT 2e-5, reward 1e-4). The optimizer state's moments are fp32 whatever the parameter
  dtype (optax keeps them in the gradients' dtype, and the engine differentiates fp32 master
  weights).

  Args:
    learning_rate: peak rate.
    max_steps: total optimizer steps (the schedule's horizon).
    lr_scheduler_type: one of ``LR_SCHEDULER_TYPES``.
    warmup_steps: linear warmup steps (takes precedence over ``warmup_ratio`` when > 0).
    warmup_ratio: warmup as a fraction of ``max_steps``.
    weight_decay: decoupled weight decay (AdamW, Loshchilov & Hutter 2019).
    adam_beta1, adam_beta2, adam_epsilon: Adam's constants.
    max_grad_norm: clip the global gradient norm to this (None or 0: no clipping).
    weight_decay_mask: optax mask (pytree of bools or a function of the params) of the parameters
      that decay (e.g. not norms and biases); None decays all when ``weight_decay > 0``.

  Returns:
    ``(optimizer, schedule)``; log ``schedule(step)`` as ``learning_rate``.
  """
  _validate.non_negative("weight_decay", weight_decay)
  _validate.in_unit_interval("adam_beta1", adam_beta1)
  _validate.in_unit_interval("adam_beta2", adam_beta2)
  _validate.positive("adam_epsilon", adam_epsilon)
  _validate.non_negative("max_grad_norm", max_grad_norm)
  schedule = learning_rate_schedule(learning_rate, max_steps=max_steps,
                                    lr_scheduler_type=lr_scheduler_type,
                                    warmup_steps=warmup_steps, warmup_ratio=warmup_ratio)
  adamw = optax.adamw(schedule, b1=adam_beta1, b2=adam_beta2, eps=adam_epsilon,
                      weight_decay=weight_decay, mask=weight_decay_mask)
  if max_grad_norm:
    return optax.chain(optax.clip_by_global_norm(max_grad_norm), adamw), schedule
  return adamw, schedule


@dataclasses.dataclass(frozen=True)
class OptimizerOptions:
  """A config's :func:`make_optimizer` arguments, hashable: the part of a trainer's cache key for
  its compiled step that the optimizer decides."""

  learning_rate: float
  max_steps: int
  lr_scheduler_type: str
  warmup_steps: int
  warmup_ratio: float
  weight_decay: float
  adam_beta1: float
  adam_beta2: float
  adam_epsilon: float
  max_grad_norm: float | None

  @classmethod
  def of(cls, config: Any, max_steps: int) -> "OptimizerOptions":
    """From a ``TrainingConfig`` and the run's resolved ``max_steps``."""
    names = [f.name for f in dataclasses.fields(cls) if f.name != "max_steps"]
    if (config.lr_scheduler_type == "constant" and not config.warmup_steps
        and not config.warmup_ratio):
      # A constant schedule has no horizon: runs of any length share the compiled step.
      max_steps = 1
    return cls(max_steps=max_steps, **{name: getattr(config, name) for name in names})

  def build(self) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """``make_optimizer`` with these options: ``(optimizer, schedule)``."""
    return make_optimizer(**dataclasses.asdict(self))


def global_norm(tree: Any) -> jax.Array:
  """The gradient norm logged as ``grad_norm`` (before clipping, as transformers logs it)."""
  return optax.tree.norm(jax.tree.map(lambda x: x.astype(jnp.float32), tree))
