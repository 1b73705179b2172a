"""Logit processors of the sampler, in ``transformers``' order: temperature, top-k, top-p, min-p.

Each one is what ``transformers`` applies when ``do_sample=True`` (``TemperatureLogitsWarper``,
``TopKLogitsWarper``, ``TopPLogitsWarper``, ``MinPLogitsWarper``, ``min_tokens_to_keep=1``), and
removed tokens get ``-inf``. vLLM applies the same filters, also after the temperature. The order
matters: top-p and min-p measure probabilities of the distribution the earlier steps left.
"""

from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from alignax import _validate


def check_sampling_args(*, temperature: Any, top_k: Any, top_p: Any, min_p: Any) -> None:
  """Named ValueErrors for hyper-parameters outside their ranges (checked before any compute)."""
  _validate.positive("temperature", temperature)
  if top_k is not None:
    _validate.positive_int("top_k", top_k)  # a static int: it fixes the candidates' shape
  if top_p is not None:
    value = _validate.static_value("top_p", top_p)
    if value is not None and not 0 < value <= 1:
      raise ValueError(f"top_p must lie in (0, 1], got {top_p!r}")
  if min_p is not None:
    _validate.in_unit_interval("min_p", min_p, closed_right=True)


def top_p_keep_sorted(
  sorted_logits: Float[Array, "*b K"], top_p: float | Float[Array, ""]
) -> Float[Array, "*b K"]:
  """Nucleus filter (Holtzman et al., 2020) on logits sorted in descending order.

  Keeps the smallest prefix whose probability reaches ``top_p``: token ``i`` stays when the mass of
  the tokens ranked above it is below ``top_p`` (the top token always stays). ``transformers``
  writes the same rule on an ascending sort (drop where the ascending cumulative mass is at most
  ``1 - top_p``).

  Args:
    sorted_logits: ``[..., K]`` logits, descending along the last axis (``-inf`` for removed).
    top_p: the nucleus mass in ``(0, 1]``.

  Returns:
    ``[..., K]`` the logits with the tail set to ``-inf``.
  """
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  mass_above = jnp.cumsum(probs, axis=-1) - probs
  keep = mass_above < top_p
  keep = keep.at[..., 0].set(True)
  return jnp.where(keep, sorted_logits, -jnp.inf)


def min_p_keep(
  logits: Float[Array, "*b V"], min_p: float | Float[Array, ""]
) -> Float[Array, "*b V"]:
  """Min-p filter (Nguyen et al., 2024): drops tokens with ``p < min_p · max p``."""
  probs = jax.nn.softmax(logits, axis=-1)
  threshold = min_p * jnp.max(probs, axis=-1, keepdims=True)
  return jnp.where(probs < threshold, -jnp.inf, logits)


def process_logits(
  logits: Float[Array, "*b V"],
  *,
  temperature: float | int | Float[Array, ""] = 1.0,
  top_k: int | None = None,
  top_p: float | int | Float[Array, ""] | None = None,
  min_p: float | int | Float[Array, ""] | None = None,
) -> Float[Array, "*b V"]:
  """``logits / temperature``, then top-k, top-p and min-p filters (``-inf`` where removed).

  The distribution :func:`alignax.sampling.generate` samples from, in ``transformers``' order
  (temperature, top-k, top-p, min-p); ``log_softmax`` of the result gives the log-probabilities the
  sampler returns. Top-k keeps ties with the ``k``-th logit (as ``transformers``); the sampler
  itself draws from exactly ``k`` candidates, which differs only on exact ties.

  Args:
    logits: ``[..., V]`` raw (fp32) logits.
    temperature: ``> 0``; divides the logits.
    top_k: keep the ``k`` largest logits (None: all).
    top_p: nucleus mass in ``(0, 1]`` (None or 1: no filter).
    min_p: in ``[0, 1]``; drop tokens below ``min_p`` times the top probability (None: no filter).

  Returns:
    ``[..., V]`` fp32 processed logits.
  """
  check_sampling_args(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
  x = logits.astype(jnp.float32) / jnp.asarray(temperature, jnp.float32)
  if top_k is not None and top_k < x.shape[-1]:
    kth = jax.lax.top_k(x, top_k)[0][..., -1:]
    x = jnp.where(x < kth, -jnp.inf, x)
  if top_p is not None:
    sorted_x = -jnp.sort(-x, axis=-1)
    kept = top_p_keep_sorted(sorted_x, top_p)
    # The smallest kept logit is the cut-off: everything at or above it stays.
    cutoff = jnp.min(jnp.where(jnp.isfinite(kept), kept, jnp.inf), axis=-1, keepdims=True)
    x = jnp.where(x < cutoff, -jnp.inf, x)
  if min_p is not None:
    x = min_p_keep(x, min_p)
  return x
