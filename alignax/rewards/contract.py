"""The reward-function contract shared by the runner, the built-ins and the reward models.

A reward function follows TRL's ``GRPOTrainer`` contract, so reward code written for TRL runs
unchanged::

  f(prompts=..., completions=..., completion_ids=..., **dataset_columns,
    trainer_state=..., log_extra=..., log_metric=...) -> list[float | None]

with one entry per completion. ``None`` (or NaN) means "this function does not score this sample".
This module holds what every part of :mod:`alignax.rewards` needs to agree on: the named errors, the
check of a function's output, a function's logging name, and the text of a completion.
"""

import inspect
import math
import numbers
from collections.abc import Mapping
from typing import Any

import numpy as np


class RewardFunctionError(ValueError):
  """A reward source raised, returned the wrong number of rewards, or returned a non-number.

  The message names the function (its logging name and its position among the sources) and, for a
  bad value, the index of the completion.
  """


class RewardTimeoutError(RewardFunctionError, TimeoutError):
  """A reward function did not return within the runner's per-call ``timeout``."""


def reward_name(source: Any) -> str:
  """The name a reward source is logged under (``rewards/{name}/mean``).

  A ``name`` attribute (reward models, ensembles) wins; then ``__name__`` (TRL's rule for
  functions); then the wrapped function's name for a ``functools.partial``; then the type's name.
  """
  name = getattr(source, "name", None)
  if isinstance(name, str) and name:
    return name
  name = getattr(source, "__name__", None)
  if isinstance(name, str) and name:
    return name
  inner = getattr(source, "func", None)
  if inner is not None and callable(inner):
    return reward_name(inner)
  return type(source).__name__


def source_label(name: str, index: int) -> str:
  """``'name' (reward source 2)``: how errors point at a source."""
  return f"reward function {name!r} (reward source {index})"


def _as_float(value: Any) -> float | None:
  """``value`` as a Python float when it is a real scalar (bool, int, float, NumPy/JAX 0-d)."""
  if isinstance(value, numbers.Real):
    return float(value)
  dtype = getattr(value, "dtype", None)
  if dtype is not None and np.ndim(value) == 0:
    kind = np.dtype(dtype).kind
    if kind in "biuf":
      return float(np.asarray(value))
  return None


def check_rewards(output: Any, *, count: int, label: str) -> np.ndarray:
  """Validates a reward function's output and returns it as a float64 ``[count]`` array.

  ``None`` and NaN become NaN (not scored); every other entry must be a finite real number.

  Args:
    output: what the function returned: a list or tuple of floats / None, or a 1-D array (NumPy,
      JAX, or anything else ``np.asarray`` reads, as TRL accepts a tensor).
    count: the number of completions it was given.
    label: how to name the function in errors (see :func:`source_label`).

  Raises:
    RewardFunctionError: ``output`` is not a sequence, has a length other than ``count``, or holds
      an entry that is neither None nor a finite real number (named with its index).
  """
  if output is None:
    raise RewardFunctionError(
      f"{label} returned None; expected a list of {count} floats or None (one per completion): "
      "a missing `return`?"
    )
  if not isinstance(output, (list, tuple, str, bytes, Mapping)) and hasattr(output, "__array__"):
    output = np.asarray(output)  # a JAX array or a tensor: its elements arrive as NumPy scalars
  if isinstance(output, np.ndarray):
    if output.ndim != 1:
      raise RewardFunctionError(
        f"{label} returned an array of shape {list(output.shape)}; expected a list of {count} "
        "floats or None"
      )
    output = output.tolist()
  if isinstance(output, (str, bytes, Mapping)) or not isinstance(output, (list, tuple)):
    raise RewardFunctionError(
      f"{label} returned {type(output).__name__}; expected a list of {count} floats or None "
      "(one per completion)"
    )
  if len(output) != count:
    raise RewardFunctionError(
      f"{label} returned {len(output)} rewards for {count} completions; expected one per completion"
    )
  values = np.empty(count, np.float64)
  for i, entry in enumerate(output):
    if entry is None:
      values[i] = math.nan
      continue
    value = _as_float(entry)
    if value is None:
      raise RewardFunctionError(
        f"{label} returned {entry!r} ({type(entry).__name__}) for completion {i}; expected a float "
        "or None"
      )
    if math.isinf(value):
      raise RewardFunctionError(
        f"{label} returned {value} for completion {i}; rewards must be finite (None or NaN skips "
        "a sample)"
      )
    values[i] = value
  return values


def completion_text(completion: Any) -> str:
  """The text of one completion: the string itself, or the joined ``content`` of its messages.

  Conversational completions arrive as ``[{"role": "assistant", "content": ...}]``.

  Raises:
    ValueError: ``completion`` is neither a string nor a list of messages with string content.
  """
  if isinstance(completion, str):
    return completion
  if isinstance(completion, (list, tuple)) and all(
    isinstance(m, Mapping) and isinstance(m.get("content"), str) for m in completion
  ):
    return "".join(m["content"] for m in completion)
  raise ValueError(
    "a completion must be a string or a list of {'role', 'content'} messages with string "
    f"content, got {completion!r}"
  )


def is_async_source(source: Any) -> bool:
  """True for an ``async def`` function or an object whose ``__call__`` is one (partials too)."""
  return inspect.iscoroutinefunction(source) or inspect.iscoroutinefunction(
    getattr(source, "__call__", None)
  )


def is_conversational(value: Any) -> bool:
  """True for a list of ``{"role", "content"}`` messages (TRL's conversational format)."""
  return isinstance(value, (list, tuple)) and bool(value) and all(
    isinstance(m, Mapping) and "role" in m and "content" in m for m in value
  )

