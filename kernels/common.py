"""Pieces shared by every LM-head kernel implementation (reference, chunked, pallas).

The logits of one vocabulary slice are

  z_raw = logit_scale · (h Wᵀ) + b
  z     = softcap · tanh(z_raw / softcap)      (Gemma 2 final-logit soft-capping, when set)
  z     = z / temperature

with columns outside the valid vocabulary set to −inf *after* soft-capping (a capped −inf would
become −softcap and leak probability mass). Everything here works on one block of logits at a time,
so the same code serves the chunked scan and the inside of a Pallas kernel; all arithmetic is fp32.

The per-shard statistics (lse, target logit, softmax-weighted mean logit) combine exactly across
vocabulary shards, which is how a vocabulary-sharded head is handled without gathering it.
"""

import math
from collections.abc import Callable
from typing import NamedTuple

import jax.numpy as jnp
from jax import core, lax
from jaxtyping import Array, Bool, Float, Int

from alignax import _validate


class LMHead(NamedTuple):
  """The LM head as arrays: ``z = softcap · tanh((logit_scale · h Wᵀ + b) / softcap)``.

  ``weight`` is ``[V, d]`` (the embedding matrix when embeddings are tied), ``bias`` ``[V]`` or None,
  ``softcap`` None for no capping. A model's ``get_lm_head()`` returns one, and
  ``alignax.token_logprobs`` / ``alignax.token_kl`` take it as their ``head`` argument.
  """

  weight: Float[Array, "V d"]
  bias: Float[Array, " V"] | None = None
  softcap: float | None = None
  logit_scale: float = 1.0


class VocabStats(NamedTuple):
  """Per-token statistics of softmax(z) over one vocabulary slice.

  Attributes:
    lse: ``log Σ_j exp z_j`` [N] (−inf when the slice holds no valid column).
    target_logit: ``z_target`` when the target lies in the slice, else 0 [N].
    expected_logit: ``Σ_j softmax(z)_j z_j`` over the slice [N]; entropy = lse − expected_logit.
    max_logit: ``max_j z_j`` over the slice [N] (−inf when it holds no valid column), the running
      max the online log-sum-exp keeps anyway. The target is a top-1 token exactly when
      ``target_logit >= max_logit`` (both read from the same logit tile, so a tie is exact).
      Carries no gradient: the kernels return it under ``lax.stop_gradient``.
  """

  lse: Float[Array, "*n"]
  target_logit: Float[Array, "*n"]
  expected_logit: Float[Array, "*n"]
  max_logit: Float[Array, "*n"]


class KLStats(NamedTuple):
  """Per-token statistics of two softmaxes p = softmax(z^p), q = softmax(z^q) over one slice.

  Attributes:
    lse_p: ``log Σ_j exp z^p_j`` [N].
    lse_q: ``log Σ_j exp z^q_j`` [N].
    expected_diff: ``Σ_j p_j (z^p_j − z^q_j)`` [N]; KL(p‖q) = expected_diff − lse_p + lse_q.
  """

  lse_p: Float[Array, "*n"]
  lse_q: Float[Array, "*n"]
  expected_diff: Float[Array, "*n"]


# ------------------------------------------------------------------------------------------------
# Argument checks and block helpers.


def check_options(
  *,
  temperature: float,
  softcap: float | None,
  logit_scale: float,
  vocab_offset: int,
  valid_vocab: int | None,
) -> None:
  """Raises ValueError (naming the argument) on hyper-parameters no implementation accepts."""
  options = dict(temperature=temperature, softcap=softcap, logit_scale=logit_scale,
                 vocab_offset=vocab_offset, valid_vocab=valid_vocab)
  for name, value in options.items():
    if isinstance(value, core.Tracer):  # the kernels are specialised to these values
      raise ValueError(
        f"{name} must be a Python number known at trace time (mark it static under jit), got a "
        f"traced {value.aval.str_short()}"
      )
  _validate.positive("temperature", float(temperature))
  _validate.positive("softcap", None if softcap is None else float(softcap))
  if not math.isfinite(logit_scale):
    raise ValueError(f"logit_scale must be finite, got {logit_scale!r}")
  if vocab_offset < 0:
    raise ValueError(f"vocab_offset must be >= 0, got {vocab_offset!r}")
  if valid_vocab is not None and valid_vocab < 1:
    raise ValueError(f"valid_vocab must be >= 1, got {valid_vocab!r}")


def check_head_inputs(
  hidden: Array, weight: Array, targets: Array | None, bias: Array | None, *, prefix: str = ""
) -> None:
  """Raises ValueError naming the argument unless hidden [N, d], weight [V, d], targets [N] int,
  bias [V] agree (``prefix`` tells apart the two heads of ``kl_stats``, e.g. ``"_p"``)."""
  if hidden.ndim != 2:
    raise ValueError(f"hidden{prefix} must be [N, d], got shape {list(hidden.shape)}")
  if weight.ndim != 2 or weight.shape[1] != hidden.shape[1]:
    raise ValueError(
      f"weight{prefix} must be [V, d] with d={hidden.shape[1]} from hidden{prefix}, "
      f"got shape {list(weight.shape)}"
    )
  if targets is not None:
    if targets.shape != hidden.shape[:1]:
      raise ValueError(
        f"targets must be [N] with N={hidden.shape[0]} from hidden, got shape {list(targets.shape)}"
      )
    if not jnp.issubdtype(targets.dtype, jnp.integer):
      raise ValueError(f"targets must be an integer array, got dtype {targets.dtype}")
  if bias is not None and bias.shape != weight.shape[:1]:
    raise ValueError(
      f"bias{prefix} must be [V] with V={weight.shape[0]} from weight{prefix}, "
      f"got shape {list(bias.shape)}"
    )


def round_up(n: int, multiple: int) -> int:
  """Smallest multiple of ``multiple`` that is >= ``n``."""
  return -(-n // multiple) * multiple


def block_size(requested: int, extent: int, *, align: int = 8) -> int:
  """Block length actually used along an axis of length ``extent``.

  A block never exceeds the (alignment-rounded) extent, so tiny inputs are not padded to a large
  block; ``align`` keeps the result a multiple of the hardware tile (8 sublanes, 128 lanes).
  """
  if requested < 1:
    raise ValueError(f"block size must be >= 1, got {requested!r}")
  return max(align, min(round_up(requested, align), round_up(extent, align)))


def pad_axis(x: Array, size: int, *, axis: int = 0, value: float | int = 0) -> Array:
  """Pads ``x`` with ``value`` at the end of ``axis`` up to length ``size`` (no-op if already)."""
  extra = size - x.shape[axis]
  if extra == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths, constant_values=value)


def valid_columns(
  columns: Int[Array, "*c"], *, shard_vocab: int, vocab_offset: int, valid_vocab: int | None
) -> Bool[Array, "*c"]:
  """True for the local column ids (0-based within the shard) that take part in the softmax.

  A column is dropped when it is block padding (``>= shard_vocab``) or vocabulary padding (global id
  ``vocab_offset + column >= valid_vocab``).
  """
  valid = columns < shard_vocab
  if valid_vocab is not None:
    valid &= columns + vocab_offset < valid_vocab
  return valid


# ------------------------------------------------------------------------------------------------
# The logit transform and its derivative.


def transform_logits(
  dot: Float[Array, "*n v"],
  bias: Float[Array, "v"] | None,
  valid: Bool[Array, "*#n v"],
  *,
  logit_scale: float,
  softcap: float | None,
  temperature: float,
) -> tuple[Float[Array, "*n v"], Float[Array, "*n v"]]:
  """z = cap(logit_scale · dot + b) / T, and its slope dz / dz_raw = (1 − tanh²(z_raw / c)) / T.

  Args:
    dot: ``h Wᵀ`` for one block, fp32 [n, v].
    bias: the block's bias [v] or None.
    valid: which columns take part (see ``valid_columns``), broadcastable to ``dot``.
    logit_scale, softcap, temperature: as in the module docstring.

  Returns:
    ``(z, slope)``: logits with −inf in invalid columns, and the derivative of z w.r.t. z_raw with
    0 in invalid columns (so z_raw cotangent = slope · z cotangent; dot cotangent = logit_scale ·
    that; bias cotangent = that).
  """
  z = dot.astype(jnp.float32) * logit_scale
  if bias is not None:
    z = z + bias.astype(jnp.float32)
  slope = jnp.full_like(z, 1.0 / temperature)
  if softcap is not None:
    capped = jnp.tanh(z / softcap)
    z = softcap * capped
    slope = slope * (1.0 - capped * capped)
  z = z / temperature
  return jnp.where(valid, z, -jnp.inf), jnp.where(valid, slope, 0.0)


# ------------------------------------------------------------------------------------------------
# Online (streaming) log-sum-exp with a softmax-weighted mean, over vocabulary blocks.


class OnlineState(NamedTuple):
  """Running ``max_j z_j``, ``Σ_j exp(z_j − max)`` and ``Σ_j exp(z_j − max) · value_j``."""

  max: Float[Array, "*n"]
  sumexp: Float[Array, "*n"]
  weighted: Float[Array, "*n"]


def online_init(shape: tuple[int, ...]) -> OnlineState:
  return OnlineState(
    jnp.full(shape, -jnp.inf, jnp.float32), jnp.zeros(shape, jnp.float32),
    jnp.zeros(shape, jnp.float32),
  )


def online_update(
  state: OnlineState, z: Float[Array, "*n v"], values: Float[Array, "*n v"]
) -> OnlineState:
  """Folds one block of logits z (−inf = excluded) and per-column values into the running state.

  The shift is −inf-safe: while every logit seen so far is −inf the shift is 0, so no
  ``exp(−inf − (−inf))`` ever happens; values of excluded columns are never read (they may be NaN).
  """
  new_max = jnp.maximum(state.max, jnp.max(z, axis=-1))
  shift = jnp.where(jnp.isfinite(new_max), new_max, 0.0)
  rescale = jnp.exp(state.max - shift)
  weights = jnp.exp(z - shift[..., None])
  weighted_values = jnp.where(weights > 0, weights * values, 0.0)
  return OnlineState(
    new_max,
    state.sumexp * rescale + jnp.sum(weights, axis=-1),
    state.weighted * rescale + jnp.sum(weighted_values, axis=-1),
  )


def online_finalize(state: OnlineState) -> tuple[Float[Array, "*n"], Float[Array, "*n"]]:
  """Returns ``(lse, mean)``; an all-excluded row gives lse = −inf and mean = 0."""
  shift = jnp.where(jnp.isfinite(state.max), state.max, 0.0)
  nonempty = state.sumexp > 0
  lse = jnp.where(nonempty, shift + jnp.log(jnp.where(nonempty, state.sumexp, 1.0)), -jnp.inf)
  mean = jnp.where(nonempty, state.weighted / jnp.where(nonempty, state.sumexp, 1.0), 0.0)
  return lse, mean


def target_logit_of_block(
  z: Float[Array, "*n v"], columns: Int[Array, "*#n v"], targets: Int[Array, "*n"]
) -> Float[Array, "*n"]:
  """z at the target column if the target is in this block (and valid), else 0 (iota compare)."""
  hit = (columns == targets[..., None]) & jnp.isfinite(z)
  return jnp.sum(jnp.where(hit, z, 0.0), axis=-1)


# ------------------------------------------------------------------------------------------------
# Cotangents of the statistics w.r.t. one block of logits (for the recomputing backward passes).


def _softmax_block(z: Float[Array, "*n v"], lse: Float[Array, "*n"]) -> Float[Array, "*n v"]:
  # A slice with no valid column has lse = −inf; its p must be 0, not exp(−inf + inf). z ≤ lse
  # holds for real rows, but block-padding rows (zero hidden, lse and cotangent 0) see z = b / T,
  # whose exp overflows for a large bias: capping at 0 keeps their p finite, so p · 0 stays 0.
  return jnp.exp(jnp.minimum(z - jnp.where(jnp.isfinite(lse), lse, 0.0)[..., None], 0.0))


def vocab_stats_logit_cotangent(
  z: Float[Array, "*n v"],
  columns: Int[Array, "*#n v"],
  targets: Int[Array, "*n"],
  stats: VocabStats,
  cotangent: VocabStats,
) -> Float[Array, "*n v"]:
  """∂⟨cotangent, VocabStats⟩ / ∂z for one block.

    ∂lse/∂z_k = p_k,   ∂target_logit/∂z_k = 1[k = target],
    ∂expected_logit/∂z_k = p_k (1 + z_k − E[z])

  Invalid (−inf) columns get 0. Multiply by the ``slope`` of ``transform_logits`` to reach z_raw.
  """
  p = _softmax_block(z, stats.lse)
  centred = jnp.where(p > 0, 1.0 + z - stats.expected_logit[..., None], 0.0)
  dz = p * (cotangent.lse[..., None] + cotangent.expected_logit[..., None] * centred)
  hit = (columns == targets[..., None]) & jnp.isfinite(z)
  return dz + jnp.where(hit, cotangent.target_logit[..., None], 0.0)


def kl_stats_logit_cotangent(
  z_p: Float[Array, "*n v"],
  z_q: Float[Array, "*n v"],
  stats: KLStats,
  cotangent: KLStats,
) -> Float[Array, "*n v"]:
  """∂⟨cotangent, KLStats⟩ / ∂z^p for one block (the q side is stop-gradient).

    ∂lse_p/∂z^p_k = p_k,  ∂expected_diff/∂z^p_k = p_k (1 + z^p_k − z^q_k − expected_diff)
  """
  p = _softmax_block(z_p, stats.lse_p)
  centred = jnp.where(p > 0, 1.0 + z_p - z_q - stats.expected_diff[..., None], 0.0)
  return p * (cotangent.lse_p[..., None] + cotangent.expected_diff[..., None] * centred)


# ------------------------------------------------------------------------------------------------
# Exact combination of per-shard statistics.


def _combine(
  lse: Array,
  means: tuple[Array, ...],
  sums: tuple[Array, ...],
  reduce_max: Callable[[Array], Array],
  reduce_sum: Callable[[Array], Array],
) -> tuple[Array, tuple[Array, ...], tuple[Array, ...]]:
  """lse = logsumexp_s lse_s; mean = Σ_s exp(lse_s − lse) mean_s; sum = Σ_s sum_s."""
  # The max only shifts the exponentials (any value works), so it carries no gradient.
  top = reduce_max(lax.stop_gradient(lse))
  shift = jnp.where(jnp.isfinite(top), top, 0.0)
  scaled = jnp.exp(lse - shift)
  total = reduce_sum(scaled)
  nonempty = total > 0
  combined_lse = jnp.where(nonempty, shift + jnp.log(jnp.where(nonempty, total, 1.0)), -jnp.inf)
  # Normalised by the very total the lse is built from, the weights sum to 1 to rounding. The
  # shorter exp(lse_s − lse) carries lse's own rounding (about 1e-3 when lse is near 1e4), and that
  # error, times means of the same size, moved expected_logit by several units.
  weight = scaled / jnp.where(nonempty, total, 1.0)
  combined_means = tuple(reduce_sum(jnp.where(weight > 0, weight * m, 0.0)) for m in means)
  return combined_lse, combined_means, tuple(reduce_sum(s) for s in sums)


def combine_vocab_stats(stats: VocabStats, *, axis: int = 0) -> VocabStats:
  """Combines statistics of vocabulary shards stacked along ``axis`` into whole-vocabulary ones."""
  lse, (expected,), (target,) = _combine(
    stats.lse, (stats.expected_logit,), (stats.target_logit,),
    lambda x: jnp.max(x, axis=axis, keepdims=True), lambda x: jnp.sum(x, axis=axis, keepdims=True),
  )
  top = jnp.max(stats.max_logit, axis=axis, keepdims=True)
  return VocabStats(*(jnp.squeeze(x, axis) for x in (lse, target, expected, top)))


def combine_kl_stats(stats: KLStats, *, axis: int = 0) -> KLStats:
  """Combines KL statistics of vocabulary shards stacked along ``axis``."""
  reduce_max = lambda x: jnp.max(x, axis=axis, keepdims=True)  # noqa: E731
  reduce_sum = lambda x: jnp.sum(x, axis=axis, keepdims=True)  # noqa: E731
  lse_p, (diff,), () = _combine(stats.lse_p, (stats.expected_diff,), (), reduce_max, reduce_sum)
  lse_q, (), () = _combine(stats.lse_q, (), (), reduce_max, reduce_sum)
  return KLStats(*(jnp.squeeze(x, axis) for x in (lse_p, lse_q, diff)))


def psum_vocab_stats(stats: VocabStats, axis_name: str | tuple[str, ...]) -> VocabStats:
  """``combine_vocab_stats`` across the devices of a mesh axis (inside ``jax.shard_map``)."""
  lse, (expected,), (target,) = _combine(
    stats.lse, (stats.expected_logit,), (stats.target_logit,),
    lambda x: lax.pmax(x, axis_name), lambda x: lax.psum(x, axis_name),
  )
  return VocabStats(lse, target, expected, lax.pmax(stats.max_logit, axis_name))


def psum_kl_stats(stats: KLStats, axis_name: str | tuple[str, ...]) -> KLStats:
  """``combine_kl_stats`` across the devices of a mesh axis (inside ``jax.shard_map``)."""
  reduce_max = lambda x: lax.pmax(x, axis_name)  # noqa: E731
  reduce_sum = lambda x: lax.psum(x, axis_name)  # noqa: E731
  lse_p, (diff,), () = _combine(stats.lse_p, (stats.expected_diff,), (), reduce_max, reduce_sum)
  lse_q, (), () = _combine(stats.lse_q, (), (), reduce_max, reduce_sum)
  return KLStats(lse_p, lse_q, diff)


__all__ = [
  "KLStats", "OnlineState", "VocabStats", "block_size", "check_head_inputs", "check_options",
  "combine_kl_stats", "combine_vocab_stats", "kl_stats_logit_cotangent", "online_finalize",
  "online_init", "online_update", "pad_axis", "psum_kl_stats", "psum_vocab_stats", "round_up",
  "target_logit_of_block", "transform_logits", "valid_columns", "vocab_stats_logit_cotangent",
]
