"""Argument checks shared by the pure functions. All run at trace time on static shapes and Python
hyper-parameters, so a bad call fails before any compute with a message that names the argument.

Hyper-parameters may be Python numbers, concrete scalar arrays, or tracers (an adaptive KL
coefficient inside ``jit``, a ``vmap`` over a sweep of ``beta``). ``static_value`` is the one rule
for telling them apart: every range check (``positive``, ``non_negative``, ``in_unit_interval``)
checks a value whenever it is known at trace time and skips it only when it is a tracer.

Masks: a *loss mask* (which tokens or examples count) must be boolean (``bool_mask``, TypeError
otherwise); an *attention mask* (which tokens are real, as a tokenizer returns it) may be boolean or
0/1 integers (``attention_mask``).
"""

from collections.abc import Collection, Mapping
from numbers import Real
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def choice(name: str, value: Any, options: Collection[Any]) -> None:
  """Raises ValueError unless ``value`` is one of ``options``."""
  if value not in options:
    raise ValueError(f"{name}={value!r} is not supported; choose one of {sorted(map(str, options))}")


def static_value(name: str, value: Real | Any | None) -> float | None:
  """A scalar hyper-parameter's Python value, or None when it is ``None`` or a tracer.

  Raises ValueError naming ``name`` when ``value`` is concrete but not a scalar (an array of shape
  ``[2]`` passed as ``beta``, say).
  """
  if value is None or isinstance(value, jax.core.Tracer):
    return None
  if np.ndim(value) != 0:
    raise ValueError(f"{name} must be a scalar, got shape {list(np.shape(value))}")
  return float(value)


def non_negative(name: str, value: Real | Any | None) -> None:
  """Raises ValueError unless ``value`` is >= 0 (skipped for None and for a traced value)."""
  value = static_value(name, value)
  if value is not None and not value >= 0:  # also rejects NaN
    raise ValueError(f"{name} must be >= 0, got {value!r}")


def positive(name: str, value: Real | Any | None) -> None:
  """Raises ValueError unless ``value`` is > 0 (skipped for None and for a traced value)."""
  value = static_value(name, value)
  if value is not None and not value > 0:
    raise ValueError(f"{name} must be > 0, got {value!r}")


def positive_int(name: str, value: Any) -> None:
  """Raises ValueError unless ``value`` is a Python int >= 1 (a size, a rank, a block length)."""
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f"{name} must be a positive int, got {value!r}")


def in_unit_interval(name: str, value: Real | Any, *, closed_right: bool = False) -> None:
  value = static_value(name, value)
  if value is None:
    return
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


def bool_mask(name: str, mask: Any) -> jax.Array:
  """``mask`` as an array; raises TypeError naming ``name`` unless it is boolean (a loss mask)."""
  mask = jnp.asarray(mask)
  if mask.dtype != jnp.bool_:
    raise TypeError(f"{name} must be a boolean array (True on entries that count), got dtype "
                    f"{mask.dtype}; convert a 0/1 mask with `{name}.astype(bool)`")
  return mask


def attention_mask(name: str, mask: Any) -> jax.Array:
  """An attention-style mask (boolean, or 0/1 integers as tokenizers return) as a boolean array.

  Raises TypeError naming ``name`` for any other dtype (floats, say).
  """
  mask = jnp.asarray(mask)
  if mask.dtype == jnp.bool_:
    return mask
  if not jnp.issubdtype(mask.dtype, jnp.integer):
    raise TypeError(f"{name} must be a boolean or 0/1 integer array, got dtype {mask.dtype}")
  return mask != 0


def integer_array(name: str, x: Any) -> jax.Array:
  """``x`` as an array; raises TypeError naming ``name`` unless its dtype is an integer type."""
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.integer):
    raise TypeError(f"{name} must be an integer array (token ids), got dtype {x.dtype}")
  return x


def scalar_or_shape(name: str, x: Any, shape: tuple[int, ...], what: str) -> jax.Array:
  """``x`` as an array that is either a scalar or has exactly ``shape``; ValueError otherwise.

  For optional per-example arguments (a margin, say): broadcasting ``[B, 1]`` against ``[B]`` would
  silently build a ``[B, B]`` loss, so only a scalar or the exact shape is accepted.
  """
  x = jnp.asarray(x)
  if x.ndim and x.shape != tuple(shape):
    raise ValueError(f"{name} must be a scalar or have the shape of {what}, {list(shape)}; got "
                     f"{list(x.shape)}")
  return x
