"""LM-head statistics in pure JAX, block by block, never holding the [N, V] logits.

Forward: a loop over token blocks, and inside it over vocabulary blocks, keeping an online
log-sum-exp (running max, Σ e^{z − max}, Σ e^{z − max} · value) in fp32; it saves only the inputs
and [N]-sized statistics for the backward pass.

Backward (``jax.custom_vjp``) recomputes each logit block twice, in two independent loops:

  dh = logit_scale · Σ_v dz_raw W_v      token blocks outer, vocab blocks inner (fp32 accumulator)
  dW = logit_scale · Σ_n dz_rawᵀ h_n     vocab blocks outer, token blocks inner (fp32 accumulator)
  db = Σ_n dz_raw

Each loop writes finished blocks of its output, so no fp32 copy of W or h is ever made. This costs
10·N·d·V FLOPs for forward + backward (2 forward, then per loop 2 to recompute the logits and 2 for
its gradient GEMM) instead of the 6 of kept logits (6 instead of 4 with a frozen head), and buys
two things: the peak memory is a few [token_block, vocab_block] tiles, and the dW loop is dead
code when the head is frozen (its cotangent is unused), so jit removes it and a frozen head costs
no dW work.

Blocks that would run past the end of an axis are shifted back to end at the edge (no padded copy
of the inputs); the columns or rows they share with the previous block are masked where they
would be counted twice.
"""

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, Float, Int

from alignax import _validate
from alignax.kernels import common
from alignax.kernels.common import KLStats, VocabStats

DEFAULT_TOKEN_BLOCK = 1024
DEFAULT_VOCAB_BLOCK = 2048


class _Config(NamedTuple):
  """Static (hashable) options, passed to ``jax.custom_vjp`` as one non-differentiable argument."""

  temperature: float
  softcap: float | None
  logit_scale: float
  vocab_offset: int
  valid_vocab: int | None
  token_block: int
  vocab_block: int


def _config(
  *, temperature, softcap, logit_scale, vocab_offset, valid_vocab, token_block, vocab_block
) -> _Config:
  common.check_options(
    temperature=temperature, softcap=softcap, logit_scale=logit_scale, vocab_offset=vocab_offset,
    valid_vocab=valid_vocab,
  )
  _validate.positive_int("token_block", token_block)
  _validate.positive_int("vocab_block", vocab_block)
  return _Config(
    float(temperature), None if softcap is None else float(softcap), float(logit_scale),
    int(vocab_offset), None if valid_vocab is None else int(valid_vocab), token_block, vocab_block,
  )


def _for_each_block(
  extent: int, block: int, body: Callable[[Array, Array, object], object], init: object,
  sources: tuple,
) -> object:
  """``carry = body(start, nominal_start, carry)`` for each block of ``min(block, extent)`` rows.

  The last block starts at ``extent − size`` rather than running past the end; rows below
  ``nominal_start`` were already covered by the previous block. ``sources`` are the arrays the
  body reads (see ``_varying``).
  """
  init = _varying(init, sources)
  if extent == 0:  # no tokens (or rows): nothing to accumulate
    return init
  size = min(block, extent)

  def step(index, carry):
    nominal = index * size
    return body(jnp.minimum(nominal, extent - size), nominal, carry)

  return lax.fori_loop(0, -(-extent // size), step, init)


def _varying(init: object, sources: tuple) -> object:
  """Gives loop-carry initial values the manual-axis variance of the inputs they will mix with.

  Under ``jax.shard_map`` a fresh ``jnp.zeros`` is device-invariant while the loop body's result
  varies over the mesh axes its inputs are split over, and a loop carry must keep one type. Adding
  a zero built from every source (``zeros_like`` keeps the variance) makes the types agree; outside
  ``shard_map`` it is a no-op.
  """
  zero = sum(
    (jnp.zeros_like(x, shape=(), dtype=jnp.float32) for x in jax.tree.leaves(sources)),
    jnp.zeros((), jnp.float32),
  )
  return jax.tree.map(lambda x: x + zero.astype(x.dtype), init)


def _rows(x: Array, start: Array, size: int) -> Array:
  """``x[start : start + size]`` along axis 0, read in place even when ``x`` is bf16.

  XLA's CPU backend has no bf16 dynamic-slice: float normalization rewrites it as
  ``convert(dynamic-slice(convert(x)))`` through fp32, and while-loop-invariant code motion then
  hoists the whole-array ``convert(x)`` out of the loop: an fp32 copy of ``hidden`` or ``weight``.
  On CPU, ``x`` is first tied to the loop-varying ``start`` (``_tied``), so the convert stays in
  the loop and fuses with the slice into one block-sized read. GPU and TPU slice bf16 natively and
  get the plain slice.
  """
  x = lax.platform_dependent(x, start, cpu=_tied, default=lambda x, start: x)
  return lax.dynamic_slice_in_dim(x, start, size)


def _tied(x: Array, start: Array) -> Array:
  """``x``, which XLA must now treat as depending on ``start`` (an optimization barrier over both;
  XLA drops the barrier itself before code generation)."""
  return lax.optimization_barrier((x, start))[0]


def _dot(a: Array, b: Array, contract: tuple[int, int]) -> Array:
  """a · b contracting the given axes, in the inputs' common dtype with an fp32 accumulator.

  Forward, h and W share their (possibly bf16) dtype; backward, the fp32 logit cotangent meets a
  bf16 block of h or W, which is upcast, so no gradient is rounded before its final cast.
  """
  dtype = jnp.result_type(a, b)
  return lax.dot_general(
    a.astype(dtype), b.astype(dtype), (((contract[0],), (contract[1],)), ((), ())),
    preferred_element_type=jnp.float32,
  )


def _logits_block(
  cfg: _Config, hidden: Array, weight: Array, bias: Array | None, start: Array, keep_from: Array
) -> tuple[Array, Array, Array]:
  """z and dz/dz_raw [n, bv] of the vocab block at ``start``, and its local column ids [bv].

  Columns below ``keep_from`` (shared with the previous block) are excluded like padding.
  """
  size = min(cfg.vocab_block, weight.shape[0])
  columns = start + jnp.arange(size)
  valid = common.valid_columns(
    columns, shard_vocab=weight.shape[0], vocab_offset=cfg.vocab_offset,
    valid_vocab=cfg.valid_vocab,
  )
  z, slope = common.transform_logits(
    _dot(hidden, _rows(weight, start, size), (1, 1)),
    None if bias is None else _rows(bias, start, size),
    valid & (columns >= keep_from), logit_scale=cfg.logit_scale, softcap=cfg.softcap,
    temperature=cfg.temperature,
  )
  return z, slope, columns


# A function (token start, hidden block, vocab start, keep_from) -> dz_raw [n, bv]: the cotangent of
# the pre-transform logits of one tile, for the backward loops below.
_TileCotangent = Callable[[Array, Array, Array, Array], Array]


def _hidden_cotangent(
  cfg: _Config, hidden: Array, weight: Array, tile_cotangent: _TileCotangent, sources: tuple
) -> Array:
  """dh = logit_scale · Σ_v dz_raw W_v, token block by token block."""
  size = min(cfg.token_block, hidden.shape[0])

  def token_block(start, nominal, dh):
    del nominal  # overlapping rows are recomputed in full and written again
    h = _rows(hidden, start, size)

    def vocab_block(v_start, v_nominal, acc):
      dz = tile_cotangent(start, h, v_start, v_nominal)
      return acc + _dot(dz, _rows(weight, v_start, dz.shape[1]), (1, 0))

    acc = _for_each_block(
      weight.shape[0], cfg.vocab_block, vocab_block, jnp.zeros(h.shape, jnp.float32), sources
    )
    return lax.dynamic_update_slice_in_dim(dh, (cfg.logit_scale * acc).astype(dh.dtype), start, 0)

  return _for_each_block(
    hidden.shape[0], cfg.token_block, token_block, jnp.zeros_like(hidden), sources
  )


def _head_cotangent(
  cfg: _Config, hidden: Array, weight: Array, bias: Array | None, tile_cotangent: _TileCotangent,
  sources: tuple,
) -> tuple[Array, Array | None]:
  """dW = logit_scale · Σ_n dz_rawᵀ h_n and db = Σ_n dz_raw, vocab block by vocab block."""
  n, size = hidden.shape[0], min(cfg.token_block, hidden.shape[0])
  v_size = min(cfg.vocab_block, weight.shape[0])
  bias_dtype = jnp.float32 if bias is None else bias.dtype

  def vocab_block(v_start, v_nominal, outputs):
    del v_nominal  # overlapping columns are recomputed in full and written again

    def token_block(start, nominal, acc):
      dz = tile_cotangent(start, _rows(hidden, start, size), v_start, v_start)
      dz = jnp.where((start + jnp.arange(size) >= nominal)[:, None], dz, 0.0)
      return acc[0] + _dot(dz, _rows(hidden, start, size), (0, 0)), acc[1] + jnp.sum(dz, axis=0)

    dw, db = _for_each_block(
      n, cfg.token_block, token_block,
      (jnp.zeros((v_size, hidden.shape[1]), jnp.float32), jnp.zeros((v_size,), jnp.float32)),
      sources,
    )
    return (
      lax.dynamic_update_slice_in_dim(outputs[0], (cfg.logit_scale * dw).astype(weight.dtype),
                                      v_start, 0),
      lax.dynamic_update_slice_in_dim(outputs[1], db.astype(bias_dtype), v_start, 0),
    )

  init = (jnp.zeros_like(weight), jnp.zeros(weight.shape[:1], bias_dtype))
  dw, db = _for_each_block(weight.shape[0], cfg.vocab_block, vocab_block, init, sources)
  return dw, None if bias is None else db


def _integer_cotangent(x: Array) -> np.ndarray:
  return np.zeros(x.shape, jax.dtypes.float0)


# ------------------------------------------------------------------------------------------------
# vocab_stats


def _vocab_stats_forward(cfg, hidden, weight, targets, bias):
  n, size = hidden.shape[0], min(cfg.token_block, hidden.shape[0])
  local_targets = targets.astype(jnp.int32) - cfg.vocab_offset
  sources = (hidden, weight, targets, bias)

  def token_block(start, nominal, outputs):
    del nominal  # overlapping rows are recomputed in full and written again
    h, t = _rows(hidden, start, size), _rows(local_targets, start, size)

    def vocab_block(v_start, v_nominal, carry):
      state, target = carry
      z, _, columns = _logits_block(cfg, h, weight, bias, v_start, v_nominal)
      return common.online_update(state, z, z), target + common.target_logit_of_block(z, columns, t)

    state, target = _for_each_block(
      weight.shape[0], cfg.vocab_block, vocab_block,
      (common.online_init((size,)), jnp.zeros((size,), jnp.float32)), sources,
    )
    lse, expected = common.online_finalize(state)
    # The running max is the top-1 logit (ties with the target are exact: same tiles, same z).
    return tuple(
      lax.dynamic_update_slice_in_dim(out, value, start, 0)
      for out, value in zip(outputs, (lse, target, expected, state.max))
    )

  zeros = jnp.zeros((n,), jnp.float32)
  return VocabStats(
    *_for_each_block(n, cfg.token_block, token_block, (zeros,) * 4, sources)
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _vocab_stats(cfg, hidden, weight, targets, bias):
  return _vocab_stats_forward(cfg, hidden, weight, targets, bias)


def _vocab_stats_fwd(cfg, hidden, weight, targets, bias):
  stats = _vocab_stats_forward(cfg, hidden, weight, targets, bias)
  return stats, (hidden, weight, targets, bias, stats)


def _vocab_stats_bwd(cfg, residuals, cotangent):
  hidden, weight, targets, bias, stats = residuals
  cotangent = VocabStats(*map(jnp.asarray, cotangent))  # callers may pass NumPy cotangents
  local_targets = targets.astype(jnp.int32) - cfg.vocab_offset
  size = min(cfg.token_block, hidden.shape[0])

  def tile_cotangent(start, h, v_start, keep_from):
    z, slope, columns = _logits_block(cfg, h, weight, bias, v_start, keep_from)
    rows = lambda x: _rows(x, start, size)  # noqa: E731
    dz = common.vocab_stats_logit_cotangent(
      z, columns, rows(local_targets), VocabStats(*map(rows, stats)),
      VocabStats(*map(rows, cotangent)),
    )
    return dz * slope

  sources = (residuals, cotangent)
  dh = _hidden_cotangent(cfg, hidden, weight, tile_cotangent, sources)
  dw, db = _head_cotangent(cfg, hidden, weight, bias, tile_cotangent, sources)
  return dh, dw, _integer_cotangent(targets), db


_vocab_stats.defvjp(_vocab_stats_fwd, _vocab_stats_bwd)


def vocab_stats(
  hidden: Float[Array, "N d"],
  weight: Float[Array, "V d"],
  targets: Int[Array, "N"],
  *,
  bias: Float[Array, "V"] | None = None,
  temperature: float = 1.0,
  softcap: float | None = None,
  logit_scale: float = 1.0,
  vocab_offset: int = 0,
  valid_vocab: int | None = None,
  token_block: int = DEFAULT_TOKEN_BLOCK,
  vocab_block: int = DEFAULT_VOCAB_BLOCK,
) -> VocabStats:
  """lse = log Σ_j e^{z_j}, target_logit = z_target, expected_logit = Σ_j softmax(z)_j z_j and
  max_logit = max_j z_j; tiled.

  z = cap(logit_scale · h Wᵀ + b) / temperature over the vocabulary slice [vocab_offset,
  vocab_offset + V) (see ``alignax.kernels.common``). Same contract as
  ``alignax.kernels.reference.vocab_stats``; peak memory O(token_block · vocab_block).

  Args:
    hidden: hidden states [N, d].
    weight: LM-head rows of the slice [V, d].
    targets: global target ids [N]; a target outside the slice gives target_logit 0.
    bias: LM-head bias of the slice [V], optional.
    temperature, softcap, logit_scale: the logit transform (Python numbers).
    vocab_offset: global id of the slice's first row.
    valid_vocab: global ids >= this are padding and excluded.
    token_block: tokens per tile.
    vocab_block: vocabulary rows per tile.

  Returns:
    ``VocabStats`` of [N] fp32 arrays, differentiable w.r.t. hidden, weight and bias (except
    ``max_logit``, which is stop-gradient).
  """
  common.check_head_inputs(hidden, weight, targets, bias)
  cfg = _config(
    temperature=temperature, softcap=softcap, logit_scale=logit_scale, vocab_offset=vocab_offset,
    valid_vocab=valid_vocab, token_block=token_block, vocab_block=vocab_block,
  )
  stats = _vocab_stats(cfg, hidden, weight, targets, bias)
  return stats._replace(max_logit=lax.stop_gradient(stats.max_logit))


# ------------------------------------------------------------------------------------------------
# kl_stats


def _kl_stats_forward(cfg, hidden_p, weight_p, bias_p, hidden_q, weight_q, bias_q):
  n, size = hidden_p.shape[0], min(cfg.token_block, hidden_p.shape[0])
  sources = (hidden_p, weight_p, bias_p, hidden_q, weight_q, bias_q)

  def token_block(start, nominal, outputs):
    del nominal  # overlapping rows are recomputed in full and written again
    h_p, h_q = _rows(hidden_p, start, size), _rows(hidden_q, start, size)

    def vocab_block(v_start, v_nominal, carry):
      z_p, _, _ = _logits_block(cfg, h_p, weight_p, bias_p, v_start, v_nominal)
      z_q, _, _ = _logits_block(cfg, h_q, weight_q, bias_q, v_start, v_nominal)
      return (common.online_update(carry[0], z_p, z_p - z_q),
              common.online_update(carry[1], z_q, z_q))

    state_p, state_q = _for_each_block(
      weight_p.shape[0], cfg.vocab_block, vocab_block,
      (common.online_init((size,)), common.online_init((size,))), sources,
    )
    lse_p, expected_diff = common.online_finalize(state_p)
    lse_q, _ = common.online_finalize(state_q)
    return tuple(
      lax.dynamic_update_slice_in_dim(out, value, start, 0)
      for out, value in zip(outputs, (lse_p, lse_q, expected_diff))
    )

  zeros = jnp.zeros((n,), jnp.float32)
  return KLStats(*_for_each_block(n, cfg.token_block, token_block, (zeros, zeros, zeros), sources))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _kl_stats(cfg, hidden_p, weight_p, bias_p, hidden_q, weight_q, bias_q):
  return _kl_stats_forward(cfg, hidden_p, weight_p, bias_p, hidden_q, weight_q, bias_q)


def _kl_stats_fwd(cfg, hidden_p, weight_p, bias_p, hidden_q, weight_q, bias_q):
  stats = _kl_stats_forward(cfg, hidden_p, weight_p, bias_p, hidden_q, weight_q, bias_q)
  return stats, (hidden_p, weight_p, bias_p, hidden_q, weight_q, bias_q, stats)


def _kl_stats_bwd(cfg, residuals, cotangent):
  hidden_p, weight_p, bias_p, hidden_q, weight_q, bias_q, stats = residuals
  cotangent = KLStats(*map(jnp.asarray, cotangent))  # callers may pass NumPy cotangents
  size = min(cfg.token_block, hidden_p.shape[0])

  def tile_cotangent(start, h_p, v_start, keep_from):
    z_p, slope, _ = _logits_block(cfg, h_p, weight_p, bias_p, v_start, keep_from)
    h_q = _rows(hidden_q, start, size)
    z_q, _, _ = _logits_block(cfg, h_q, weight_q, bias_q, v_start, keep_from)
    rows = lambda x: _rows(x, start, size)  # noqa: E731
    dz = common.kl_stats_logit_cotangent(
      z_p, z_q, KLStats(*map(rows, stats)), KLStats(*map(rows, cotangent))
    )
    return dz * slope

  sources = (residuals, cotangent)
  dh = _hidden_cotangent(cfg, hidden_p, weight_p, tile_cotangent, sources)
  dw, db = _head_cotangent(cfg, hidden_p, weight_p, bias_p, tile_cotangent, sources)
  # The q side is a stop-gradient target.
  zeros_q = jax.tree.map(jnp.zeros_like, (hidden_q, weight_q, bias_q))
  return (dh, dw, db, *zeros_q)


_kl_stats.defvjp(_kl_stats_fwd, _kl_stats_bwd)


def kl_stats(
  hidden_p: Float[Array, "N d"],
  weight_p: Float[Array, "V d"],
  hidden_q: Float[Array, "N dq"],
  weight_q: Float[Array, "V dq"],
  *,
  bias_p: Float[Array, "V"] | None = None,
  bias_q: Float[Array, "V"] | None = None,
  temperature: float = 1.0,
  softcap: float | None = None,
  logit_scale: float = 1.0,
  vocab_offset: int = 0,
  valid_vocab: int | None = None,
  token_block: int = DEFAULT_TOKEN_BLOCK,
  vocab_block: int = DEFAULT_VOCAB_BLOCK,
) -> KLStats:
  """lse_p, lse_q and expected_diff = Σ_j p_j (z^p_j − z^q_j), in blocks; KL = diff − lse_p + lse_q.

  Same contract as ``alignax.kernels.reference.kl_stats``: both heads share the logit transform and
  the vocabulary slice, and only the p side is differentiated (the q side gets zero cotangents).

  Args:
    hidden_p, weight_p, bias_p: the differentiated policy's hidden states [N, d], head [V, d], [V].
    hidden_q, weight_q, bias_q: the reference policy's (any hidden width dq).
    temperature, softcap, logit_scale, vocab_offset, valid_vocab: as in ``vocab_stats``.
    token_block, vocab_block: tile sizes.

  Returns:
    ``KLStats`` of [N] fp32 arrays.
  """
  common.check_head_inputs(hidden_p, weight_p, None, bias_p, prefix="_p")
  common.check_head_inputs(hidden_q, weight_q, None, bias_q, prefix="_q")
  if hidden_q.shape[0] != hidden_p.shape[0] or weight_q.shape[0] != weight_p.shape[0]:
    raise ValueError(
      f"hidden_q {list(hidden_q.shape)} / weight_q {list(weight_q.shape)} must have the token and "
      f"vocabulary counts of hidden_p {list(hidden_p.shape)} / weight_p {list(weight_p.shape)}"
    )
  cfg = _config(
    temperature=temperature, softcap=softcap, logit_scale=logit_scale, vocab_offset=vocab_offset,
    valid_vocab=valid_vocab, token_block=token_block, vocab_block=vocab_block,
  )
  hidden_q, weight_q, bias_q = lax.stop_gradient((hidden_q, weight_q, bias_q))
  return _kl_stats(cfg, hidden_p, weight_p, bias_p, hidden_q, weight_q, bias_q)
