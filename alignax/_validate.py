"""Argument checks shared by the pure functions. All run at trace time on static shapes and Python
hyper-parameters, so a bad call fails before any compute with a message that names the argument."""

from collections.abc import Collection, Mapping
from numbers import Real
from typing import Any


def choice(name: str, value: Any, options: Collection[Any]) -> None:
  """Raises ValueError unless ``value`` is one of ``options``."""
  if value not in options:
    raise ValueError(f"{name}={value!r} is not supported; choose one of {sorted(map(str, options))}")


def non_negative(name: str, value: Real | None) -> None:
  if value is not None and not value >= 0:  # also rejects NaN
    raise ValueError(f"{name} must be >= 0, got {value!r}")


def positive(name: str, value: Real | None) -> None:
  if value is not None and not value > 0:
    raise ValueError(f"{name} must be > 0, got {value!r}")


def positive_int(name: str, value: Any) -> None:
  """Raises ValueError unless ``value`` is a Python int >= 1 (a size, a rank, a block length)."""
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f"{name} must be a positive int, got {value!r}")


def in_unit_interval(name: str, value: Real, *, closed_right: bool = False) -> None:
  ok = 0 <= value <= 1 if closed_right else 0 <= value < 1
  if not ok:
    right = "]" if closed_right else ")"
    raise ValueError(f"{name} must lie in [0, 1{right}, got {value!r}")


def same_shape(arrays: Mapping[str, Any]) -> tuple[int, ...]:
  """Raises ValueError naming the arguments unless every non-None array has one shape; returns it."""
  shapes = {k: tuple(v.shape) for k, v in arrays.items() if v is not None}
  if len(set(shapes.values())) > 1:
    listing = ", ".join(f"{k}{list(s)}" for k, s in shapes.items())
    raise ValueError(f"shape mismatch: {listing} must all have the same shape")
  return next(iter(shapes.values()), ())


def min_rank(name: str, x: Any, rank: int, dims: str) -> None:
  if x.ndim < rank:
    raise ValueError(f"{name} must have at least {rank} dims {dims}, got shape {list(x.shape)}")


def static_or_none(value: Any) -> float | None:
  """A hyper-parameter's Python value when it is known at trace time, else None (a traced array).

  Lets a check such as ``non_negative("beta", static_or_none(beta))`` reject a bad constant while
  still accepting a coefficient that is itself a jitted array (an adaptive KL coefficient, say).
  """
  try:
    return float(value)
  except TypeError:  # a tracer (ConcretizationTypeError subclasses TypeError), or not a scalar
    return None
