"""Attention that never holds the [T, S] scores: flash-style online softmax, masks from indices.

For queries q [B, T, H, hd], keys and values k, v [B, S, K, hd] (``H`` a multiple of ``K``; query
head h reads KV head ``h // (H // K)``):

  s_ij       = cap(scale · q_i · k_j)            cap(x) = c · tanh(x / c) (Gemma 2), or x
  allowed_ij = (kv_index_j ≤ q_index_i            if causal)
             ∧ kv_valid_j ∧ (j < kv_len)
             ∧ (q_index_i − W < kv_index_j        if window W)
             ∧ (q_segment_i = kv_segment_j        if segment ids)
  o_i        = Σ_j softmax_j(s_i | allowed) v_j   (softmax in fp32; o_i = 0 when no key is allowed)

The mask is computed block by block from the index, validity and segment vectors, never as a
dense [B, T, S] array (except in ``impl="reference"``, the exact oracle).

``impl="chunked"`` is FlashAttention-2 (Dao, 2023, "FlashAttention-2: Faster Attention with Better
Parallelism and Work Partitioning") in pure JAX with a ``jax.custom_vjp``:

* forward: query blocks outer, KV blocks inner, an online softmax in fp32 (running max m, sum l,
  accumulator acc); it saves only the output and the per-row log-sum-exp ``lse = m + log l``;
* backward: KV blocks outer, query blocks inner, recomputing each score block:
  ``p = exp(s − lse)``, ``dv += pᵀ dO``, ``dp = dO vᵀ``, ``ds = p ∘ (dp − D)`` with
  ``D = rowsum(dO ∘ O)``, times ``cap'(s_raw) · scale``; ``dk += dsᵀ q``; ``dq += ds k`` into an fp32
  [B, T, H, hd] buffer. dq, dk, dv accumulate in fp32.

A block pair whose keys can contribute to none of its queries (causal: every key after every
query; window: every key before every window; segments: disjoint id ranges; no valid key; slots at
or after ``kv_len``) is skipped with a ``lax.cond`` (XLA CPU runs only the taken branch), and the
KV loop stops at ``ceil(kv_len / block_kv)``, so a decode step reads only the filled slots' blocks.
Peak memory is a few [block_q, block_kv] score tiles per head plus O(T + S) vectors: linear in T.
Lengths need not be multiples of the blocks: the last block is shifted back to end at the edge (no
padded copy), and the rows it shares with the previous block are masked where they would be
counted twice.

Other implementations (``impl=``): ``"xla"`` / ``"cudnn"`` call ``jax.nn.dot_product_attention``
(no soft-cap, no segment ids, default positions, static window, padding on the right only);
``"pallas_tpu"`` runs splash attention and ``"pallas_gpu"`` the Pallas Triton flash kernel of
``jax.experimental.pallas.ops``; see ``attention`` for what each covers. ``"auto"`` is the chunked
kernel on every backend until an accelerator path has been validated on its device (``_VALIDATED``).
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import core, lax
from jaxtyping import Array, Bool, Float, Int

from alignax.kernels.chunked import _tied, _varying

IMPLEMENTATIONS = ("auto", "chunked", "reference", "xla", "cudnn", "pallas_tpu", "pallas_gpu")
DEFAULT_BLOCK_Q = 512
DEFAULT_BLOCK_KV = 512

# The implementation ``impl="auto"`` picks per backend. A kernel path that has never run on its
# device is not a default: ``benchmarks/device_check.sh`` validates the accelerator paths, and
# BUILD.md records which backend passed; only then does an entry here name "cudnn", "pallas_gpu" or
# "pallas_tpu". None means the chunked kernel.
_VALIDATED: dict[str, str | None] = {"gpu": None, "tpu": None}

# Windows at least this long are no window; clamping keeps q_index − W inside int32.
_NO_WINDOW = 2**30


class _Config(NamedTuple):
  """Static options (hashable), one non-differentiable argument of the custom VJP."""

  scale: float
  softcap: float | None
  causal: bool
  block_q: int
  block_kv: int
  has_window: bool
  has_segments: bool


class _Aux(NamedTuple):
  """The integer / boolean inputs that define the mask, broadcast to [B, T] and [B, S]."""

  q_index: Array  # int32 [B, T]
  kv_index: Array  # int32 [B, S]
  kv_valid: Array  # bool [B, S]
  q_segments: Array | None  # int32 [B, T]
  kv_segments: Array | None  # int32 [B, S]
  window: Array | None  # int32 []
  kv_len: Array  # int32 []


# ------------------------------------------------------------------------------------------------
# Block helpers.


def _slice(x: Array, start: Array, size: int, axis: int = 1) -> Array:
  """``x[..., start : start + size, ...]`` along ``axis``, read in place even when ``x`` is bf16.

  As in ``chunked._rows``: on CPU the array is tied to the loop-varying start, so XLA cannot hoist a
  whole-array fp32 convert of a bf16 input out of the loop.
  """
  x = lax.platform_dependent(x, start, cpu=_tied, default=lambda x, start: x)
  return lax.dynamic_slice_in_dim(x, start, size, axis)


def _add_slice(buffer: Array, update: Array, start: Array, axis: int) -> Array:
  current = lax.dynamic_slice_in_dim(buffer, start, update.shape[axis], axis)
  return lax.dynamic_update_slice_in_dim(buffer, current + update.astype(buffer.dtype), start, axis)


def _block_start(index: Array, size: int, extent: int) -> tuple[Array, Array]:
  """(start, nominal start) of block ``index``: the last block ends at ``extent``."""
  nominal = index * size
  return jnp.minimum(nominal, extent - size), nominal


def _block_mask(
  cfg: _Config, aux: _Aux, q_start: Array, q_size: int, q_nominal: Array | None,
  kv_start: Array, kv_size: int, kv_nominal: Array,
) -> Bool[Array, "B bq bk"]:
  """The block's ``allowed`` [B, bq, bk], from the index, validity and segment vectors.

  Keys below ``kv_nominal`` (and queries below ``q_nominal``, when given) belong to the previous
  block and are masked.
  """
  q_index = lax.dynamic_slice_in_dim(aux.q_index, q_start, q_size, 1)
  kv_index = lax.dynamic_slice_in_dim(aux.kv_index, kv_start, kv_size, 1)
  slots = kv_start + jnp.arange(kv_size)
  key_ok = lax.dynamic_slice_in_dim(aux.kv_valid, kv_start, kv_size, 1)
  key_ok &= ((slots >= kv_nominal) & (slots < aux.kv_len))[None, :]
  allowed = key_ok[:, None, :]
  if q_nominal is not None:
    allowed &= (q_start + jnp.arange(q_size) >= q_nominal)[None, :, None]
  if cfg.causal:
    allowed &= kv_index[:, None, :] <= q_index[:, :, None]
  if cfg.has_window:
    allowed &= kv_index[:, None, :] > q_index[:, :, None] - aux.window
  if cfg.has_segments:
    q_seg = lax.dynamic_slice_in_dim(aux.q_segments, q_start, q_size, 1)
    kv_seg = lax.dynamic_slice_in_dim(aux.kv_segments, kv_start, kv_size, 1)
    allowed &= q_seg[:, :, None] == kv_seg[:, None, :]
  return allowed


class _Summary(NamedTuple):
  """Per-block bounds [n_blocks] of the indices and segment ids (keys: valid ones only)."""

  index_min: Array
  index_max: Array
  segment_min: Array | None
  segment_max: Array | None


def _summaries(cfg: _Config, aux: _Aux, bq: int, bk: int) -> tuple[_Summary, _Summary]:
  """Bounds of every query block and KV block, computed once before the loops.

  Reduced over the batch too, so a block pair is skipped only when it is dead for every row, and
  the loops' skip tests read small replicated vectors: no reduction (hence no collective over a
  sharded batch) happens per block.
  """
  big = jnp.iinfo(jnp.int32).max

  def blocks(extent, size):
    starts = jnp.minimum(jnp.arange(-(-extent // size)) * size, extent - size)
    return starts[:, None] + jnp.arange(size)  # [n, size] slots

  def bounds(values, ok, axis):
    low = jnp.min(jnp.where(ok, values, big), axis=axis)
    high = jnp.max(jnp.where(ok, values, -big), axis=axis)
    return low, high

  q_slots = blocks(aux.q_index.shape[1], bq)
  q_summary = _Summary(
    *bounds(aux.q_index[:, q_slots], True, (0, 2)),
    *(bounds(aux.q_segments[:, q_slots], True, (0, 2)) if cfg.has_segments else (None, None)),
  )
  kv_slots = blocks(aux.kv_index.shape[1], bk)
  nominal = (jnp.arange(kv_slots.shape[0]) * bk)[:, None]
  key_ok = aux.kv_valid[:, kv_slots] & ((kv_slots >= nominal) & (kv_slots < aux.kv_len))[None]
  kv_summary = _Summary(
    *bounds(aux.kv_index[:, kv_slots], key_ok, (0, 2)),
    *(bounds(aux.kv_segments[:, kv_slots], key_ok, (0, 2)) if cfg.has_segments else (None, None)),
  )
  return q_summary, kv_summary


def _live(cfg: _Config, aux: _Aux, q: _Summary, kv: _Summary, i: Array, j: Array) -> Array:
  """False when no entry of block pair (i, j) can be allowed (the pair is then skipped)."""
  live = kv.index_min[j] <= kv.index_max[j]  # some valid key
  if cfg.causal:
    live &= kv.index_min[j] <= q.index_max[i]
  if cfg.has_window:
    live &= kv.index_max[j] > q.index_min[i] - aux.window
  if cfg.has_segments:
    live &= (kv.segment_min[j] <= q.segment_max[i]) & (kv.segment_max[j] >= q.segment_min[i])
  return live


def _scores(
  cfg: _Config, q_block: Array, k_block: Array
) -> tuple[Float[Array, "B K G bq bk"], Float[Array, "B K G bq bk"] | None]:
  """cap(scale · q kᵀ) in fp32 and, with a soft-cap, its slope 1 − tanh²(s_raw / c)."""
  s = jnp.einsum("bqkgd,bskd->bkgqs", q_block, k_block, preferred_element_type=jnp.float32)
  s = s * cfg.scale
  if cfg.softcap is None:
    return s, None
  capped = jnp.tanh(s / cfg.softcap)
  return cfg.softcap * capped, 1.0 - capped * capped


def _f32_einsum(spec: str, a: Array, b: Array) -> Array:
  """An einsum with both operands upcast to fp32, so no probability or cotangent is rounded."""
  return jnp.einsum(spec, a.astype(jnp.float32), b.astype(jnp.float32),
                    preferred_element_type=jnp.float32)


def _kv_blocks(aux: _Aux, s: int, size: int) -> Array:
  """Number of KV blocks that hold a slot below ``kv_len`` (the loop bound)."""
  return (jnp.clip(aux.kv_len, 0, s) + size - 1) // size


# ------------------------------------------------------------------------------------------------
# The chunked kernel.


def _forward(cfg: _Config, q: Array, k: Array, v: Array, aux: _Aux) -> tuple[Array, Array]:
  b, t, h, hd = q.shape
  s, kv_heads = k.shape[1], k.shape[2]
  groups = h // kv_heads
  bq, bk = min(cfg.block_q, t), min(cfg.block_kv, s)
  q5 = q.reshape(b, t, kv_heads, groups, hd)
  sources = (q, k, v, aux)
  n_kv = _kv_blocks(aux, s, bk)
  summaries = _summaries(cfg, aux, bq, bk)

  def q_block(i, carry):
    out, lse = carry
    q_start, _ = _block_start(i, bq, t)  # overlapping rows are recomputed in full, written again
    q_b = _slice(q5, q_start, bq)

    def kv_block(j, state):
      kv_start, kv_nominal = _block_start(j, bk, s)

      def compute(state):
        allowed = _block_mask(cfg, aux, q_start, bq, None, kv_start, bk, kv_nominal)
        m, l, acc = state
        scores, _ = _scores(cfg, q_b, _slice(k, kv_start, bk))
        scores = jnp.where(allowed[:, None, None], scores, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(scores, axis=-1))
        # −inf-safe shift: while a row has seen no allowed key its shift is 0, never −inf − −inf.
        shift = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        rescale = jnp.exp(m - shift)
        p = jnp.exp(scores - shift[..., None])
        acc = acc * rescale[..., None] + _f32_einsum(
          "bkgqs,bskd->bkgqd", p, _slice(v, kv_start, bk)
        )
        return m_new, l * rescale + jnp.sum(p, axis=-1), acc

      return lax.cond(_live(cfg, aux, *summaries, i, j), compute, lambda state: state, state)

    # Built from the query block so the carries have its sharding (explicit mesh axes).
    acc = jnp.zeros_like(q_b, jnp.float32).transpose(0, 2, 3, 1, 4)  # [B, K, G, bq, hd]
    init = _varying((acc[..., 0] - jnp.inf, acc[..., 0], acc), sources)
    m, l, acc = lax.fori_loop(0, n_kv, kv_block, init)
    nonempty = l > 0
    o = jnp.where(nonempty[..., None], acc / jnp.where(nonempty, l, 1.0)[..., None], 0.0)
    o = o.transpose(0, 3, 1, 2, 4).reshape(b, bq, h, hd).astype(out.dtype)
    # An empty row stores lse = +inf, so the backward pass's exp(s − lse) is 0 there, never NaN.
    row_lse = jnp.where(nonempty, m + jnp.log(jnp.where(nonempty, l, 1.0)), jnp.inf)
    return (lax.dynamic_update_slice_in_dim(out, o, q_start, 1),
            lax.dynamic_update_slice_in_dim(lse, row_lse, q_start, 3))

  lse = jnp.zeros_like(q5[..., 0], jnp.float32).transpose(0, 2, 3, 1)  # [B, K, G, T]
  return lax.fori_loop(0, -(-t // bq), q_block, _varying((jnp.zeros_like(q), lse), sources))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _chunked(cfg: _Config, q: Array, k: Array, v: Array, aux: _Aux) -> Array:
  return _forward(cfg, q, k, v, aux)[0]


def _chunked_fwd(cfg, q, k, v, aux):
  out, lse = _forward(cfg, q, k, v, aux)
  return out, (q, k, v, aux, out, lse)


def _chunked_bwd(cfg, residuals, d_out):
  q, k, v, aux, out, lse = residuals
  b, t, h, hd = q.shape
  s, kv_heads = k.shape[1], k.shape[2]
  groups = h // kv_heads
  bq, bk = min(cfg.block_q, t), min(cfg.block_kv, s)
  q5 = q.reshape(b, t, kv_heads, groups, hd)
  d_out5 = jnp.asarray(d_out).astype(q.dtype).reshape(b, t, kv_heads, groups, hd)
  # D_i = Σ_d dO_id O_id, the softmax-Jacobian term of FlashAttention-2's backward.
  delta = jnp.einsum("btkgd,btkgd->bkgt", d_out5.astype(jnp.float32),
                     out.reshape(b, t, kv_heads, groups, hd).astype(jnp.float32))
  sources = (residuals, d_out)
  summaries = _summaries(cfg, aux, bq, bk)

  def kv_block(j, carry):
    dq, dk, dv = carry
    kv_start, kv_nominal = _block_start(j, bk, s)
    k_b, v_b = _slice(k, kv_start, bk), _slice(v, kv_start, bk)

    def q_block(i, inner):
      q_start, q_nominal = _block_start(i, bq, t)

      def compute(inner):
        allowed = _block_mask(cfg, aux, q_start, bq, q_nominal, kv_start, bk, kv_nominal)
        dq, dk_b, dv_b = inner
        q_b, d_out_b = _slice(q5, q_start, bq), _slice(d_out5, q_start, bq)
        scores, slope = _scores(cfg, q_b, k_b)
        row_lse = lax.dynamic_slice_in_dim(lse, q_start, bq, 3)
        p = jnp.where(allowed[:, None, None], jnp.exp(scores - row_lse[..., None]), 0.0)
        dv_b = dv_b + _f32_einsum("bkgqs,bqkgd->bskd", p, d_out_b)
        dp = jnp.einsum("bqkgd,bskd->bkgqs", d_out_b, v_b, preferred_element_type=jnp.float32)
        ds = p * (dp - lax.dynamic_slice_in_dim(delta, q_start, bq, 3)[..., None])
        if slope is not None:
          ds = ds * slope
        ds = ds * cfg.scale
        dk_b = dk_b + _f32_einsum("bkgqs,bqkgd->bskd", ds, q_b)
        dq = _add_slice(dq, _f32_einsum("bkgqs,bskd->bqkgd", ds, k_b), q_start, 1)
        return dq, dk_b, dv_b

      return lax.cond(_live(cfg, aux, *summaries, i, j), compute, lambda inner: inner, inner)

    zeros = jnp.zeros_like(k_b, jnp.float32)
    dq, dk_b, dv_b = lax.fori_loop(
      0, -(-t // bq), q_block, _varying((dq, zeros, zeros), sources)
    )
    # Keys shared with the previous block were masked here, so their rows of dk_b / dv_b are 0.
    return dq, _add_slice(dk, dk_b, kv_start, 1), _add_slice(dv, dv_b, kv_start, 1)

  init = _varying((jnp.zeros_like(q5, jnp.float32), jnp.zeros_like(k), jnp.zeros_like(v)),
                  sources)
  dq, dk, dv = lax.fori_loop(0, _kv_blocks(aux, s, bk), kv_block, init)
  d_aux = jax.tree.map(lambda x: np.zeros(x.shape, jax.dtypes.float0), aux)
  return dq.reshape(q.shape).astype(q.dtype), dk, dv, d_aux


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


# ------------------------------------------------------------------------------------------------
# The exact oracle.


def _reference(cfg: _Config, q: Array, k: Array, v: Array, aux: _Aux) -> Array:
  """Dense scores and mask, fp32 throughout (HIGHEST precision), plain autodiff."""
  b, t, h, hd = q.shape
  s, kv_heads = k.shape[1], k.shape[2]
  allowed = _block_mask(cfg, aux, jnp.int32(0), t, None, jnp.int32(0), s, jnp.int32(0))
  grouped = q.reshape(b, t, kv_heads, h // kv_heads, hd).astype(jnp.float32)
  scores = jnp.einsum("btkgd,bskd->bkgts", grouped, k.astype(jnp.float32),
                      precision=lax.Precision.HIGHEST) * cfg.scale
  if cfg.softcap is not None:
    scores = cfg.softcap * jnp.tanh(scores / cfg.softcap)
  # A finite fill keeps rows with no allowed key finite; they are then zeroed, gradients too.
  scores = jnp.where(allowed[:, None, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1) * jnp.any(allowed, axis=-1)[:, None, None, :, None]
  out = jnp.einsum("bkgts,bskd->btkgd", probs, v.astype(jnp.float32),
                   precision=lax.Precision.HIGHEST)
  return out.reshape(b, t, h, hd).astype(q.dtype)


# ------------------------------------------------------------------------------------------------
# Library kernels: jax.nn.dot_product_attention (XLA / cuDNN), Pallas (splash on TPU, Triton GPU).


def _unsupported(impl: str, features: list[str]) -> None:
  if features:
    raise ValueError(
      f"attention(impl={impl!r}) cannot express: {', '.join(features)}; use impl='chunked' (any "
      f"backend) or impl='auto'"
    )


def _key_lengths(aux: _Aux) -> tuple[Array, Array]:
  """Per-row count of valid keys (capped at kv_len), and whether each row's keys are a prefix."""
  s = aux.kv_valid.shape[1]
  valid = aux.kv_valid & (jnp.arange(s) < aux.kv_len)[None, :]
  lengths = jnp.sum(valid, axis=1, dtype=jnp.int32)
  prefix = jnp.all(valid == (jnp.arange(s)[None, :] < lengths[:, None]))
  return lengths, prefix


def _nonempty_rows(cfg: _Config, aux: _Aux, t: int, lengths: Array) -> Array:
  """[B, T]: whether query i (at position i) has an allowed key among keys [0, lengths_b)."""
  rows = jnp.arange(t)[None, :]
  hi = jnp.minimum(lengths[:, None], rows + 1) if cfg.causal else lengths[:, None]
  lo = jnp.maximum(rows - aux.window + 1, 0) if cfg.has_window else 0
  return lo < hi


def _dot_product_attention(
  cfg: _Config, q: Array, k: Array, v: Array, aux: _Aux, *, implementation: str,
  default_positions: bool, static_window: int | None, padded: bool,
) -> Array:
  """``jax.nn.dot_product_attention`` with right padding as ``key_value_seq_lengths``.

  Whether ``kv_valid`` is right padding is data; when a row is not (left padding, holes), the call
  runs the chunked kernel instead (``lax.cond``), so the result is always the oracle's. Without
  ``kv_valid`` and ``kv_len`` (``padded`` False) the library is called with no lengths at all.
  """
  features = []
  if cfg.softcap is not None:
    features.append("softcap")
  if cfg.has_segments:
    features.append("segment ids")
  if not default_positions:
    features.append("q_index / kv_index (only the default positions arange(T), arange(S))")
  if cfg.has_window and static_window is None:
    features.append("a traced window")
  if implementation == "cudnn" and cfg.has_window and not cfg.causal:
    # cuDNN's sliding window looks left only; the oracle's non-causal window is unbounded right.
    features.append("a window without causal (cuDNN windows are causal)")
  _unsupported(implementation, features)
  lengths, prefix = _key_lengths(aux)
  if not padded:
    lengths, prefix = jnp.full(lengths.shape, k.shape[1], jnp.int32), None
  window = None
  if static_window is not None:
    window = (static_window - 1, 0 if cfg.causal else k.shape[1])

  def library(q, k, v):
    out = jax.nn.dot_product_attention(
      q, k, v, scale=cfg.scale, is_causal=cfg.causal,
      key_value_seq_lengths=lengths if padded else None, local_window_size=window,
      implementation=implementation,
    )
    nonempty = _nonempty_rows(cfg, aux, q.shape[1], lengths)
    return jnp.where(nonempty[:, :, None, None], out, 0.0).astype(q.dtype)

  if prefix is None:
    return library(q, k, v)
  return lax.cond(prefix, library, lambda q, k, v: _chunked(cfg, q, k, v, aux), q, k, v)


def _self_attention_checks(q: Array, k: Array, default_positions: bool) -> list[str]:
  features = []
  if q.shape[1] != k.shape[1]:
    features.append(f"T={q.shape[1]} != S={k.shape[1]} (self-attention only)")
  if not default_positions:
    features.append("q_index / kv_index (only the default positions)")
  return features


def _pad_time(x: Array, multiple: int) -> Array:
  extra = -x.shape[1] % multiple
  return x if extra == 0 else jnp.pad(x, [(0, 0), (0, extra)] + [(0, 0)] * (x.ndim - 2))


def _pallas_segments(aux: _Aux, t: int) -> tuple[Array, Array, Array]:
  """Query and key segment ids that also encode kv_valid, and whether q and kv ids agree.

  An invalid key gets an id no query has (int32 min), so no query attends to it. Returns
  ``(q_ids [B, T], kv_ids [B, S], same)`` with ``same`` True when every query's id equals its own
  slot's key id: the GPU kernel takes one id array for both sides, and then every valid query sees
  at least its own key, so only padding rows can be empty (``_zero_padding_rows``).
  """
  sentinel = jnp.iinfo(jnp.int32).min
  valid = aux.kv_valid & (jnp.arange(t) < aux.kv_len)[None, :]
  if aux.q_segments is None:
    q_ids = jnp.zeros(aux.kv_valid.shape, jnp.int32)
    same = jnp.bool_(True)
  else:
    q_ids = aux.q_segments
    same = jnp.all(aux.q_segments == aux.kv_segments)
  kv_ids = q_ids if aux.kv_segments is None else aux.kv_segments
  return q_ids, jnp.where(valid, kv_ids, sentinel), same & jnp.all(q_ids != sentinel)


def _pallas_tpu(
  cfg: _Config, q: Array, k: Array, v: Array, aux: _Aux, *, default_positions: bool,
  static_window: int | None, interpret: bool,
) -> Array:
  """Splash attention (``jax.experimental.pallas.ops.tpu.splash_attention``), one MQA kernel per
  KV head (GQA), causal / local masks, logit soft-cap, and segment ids carrying the padding."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

  features = _self_attention_checks(q, k, default_positions)
  if cfg.has_window and static_window is None:
    features.append("a traced window")
  _unsupported("pallas_tpu", features)
  b, t, h, hd = q.shape
  kv_heads = k.shape[2]
  groups = h // kv_heads
  block = min(cfg.block_q, 512)
  block = max(128, block - block % 128)
  padded = t + (-t % block)
  shape = (padded, padded)
  if static_window is not None:
    mask = masks.LocalMask(shape, (static_window - 1, 0 if cfg.causal else None), offset=0)
  elif cfg.causal:
    mask = masks.CausalMask(shape)
  else:
    mask = masks.FullMask(shape)
  sizes = splash.BlockSizes(
    block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
    block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block,
  )
  kernel = splash.make_splash_mqa_single_device(
    masks.MultiHeadMask([mask] * groups), block_sizes=sizes, attn_logits_soft_cap=cfg.softcap,
    interpret=interpret,
  )
  q_ids, kv_ids, same = _pallas_segments(aux, t)
  sentinel = jnp.iinfo(jnp.int32).min
  q_ids = jnp.pad(q_ids, [(0, 0), (0, padded - t)], constant_values=sentinel + 1)
  kv_ids = jnp.pad(kv_ids, [(0, 0), (0, padded - t)], constant_values=sentinel)

  def library(q, k, v):
    # [B, T, K, G, hd] -> [B, K, G, T, hd]. Splash applies no scale of its own and caps the logits
    # it is given, so q is pre-scaled: c · tanh(scale · q k / c), as in the oracle.
    qg = _pad_time(q * jnp.asarray(cfg.scale, q.dtype), block)
    qg = qg.reshape(b, padded, kv_heads, groups, hd).transpose(0, 2, 3, 1, 4)
    kg = _pad_time(k, block).transpose(0, 2, 1, 3)
    vg = _pad_time(v, block).transpose(0, 2, 1, 3)

    def one_example(qe, ke, ve, q_seg, kv_seg):
      ids = splash.SegmentIds(q=q_seg, kv=kv_seg)
      return jax.vmap(lambda qh, kh, vh: kernel(qh, kh, vh, segment_ids=ids))(qe, ke, ve)

    out = jax.vmap(one_example)(qg, kg, vg, q_ids, kv_ids)  # [B, K, G, T', hd]
    out = out.transpose(0, 3, 1, 2, 4).reshape(b, padded, h, hd)[:, :t]
    return _zero_padding_rows(out, aux, t)

  return lax.cond(same, library, lambda q, k, v: _chunked(cfg, q, k, v, aux), q, k, v)


def _zero_padding_rows(out: Array, aux: _Aux, t: int) -> Array:
  """Zeroes the rows whose own slot is padding (their outputs are unspecified for Pallas paths)."""
  valid = aux.kv_valid & (jnp.arange(t) < aux.kv_len)[None, :]
  return jnp.where(valid[:, :, None, None], out, 0.0).astype(out.dtype)


def _pallas_gpu(
  cfg: _Config, q: Array, k: Array, v: Array, aux: _Aux, *, default_positions: bool,
  interpret: bool,
) -> Array:
  """The Pallas Triton flash kernel (``jax.experimental.pallas.ops.gpu.attention.mha``): causal,
  one segment-id array shared by queries and keys (it carries the padding), KV heads repeated for
  GQA. No window, no soft-cap."""
  from jax.experimental.pallas.ops.gpu import attention as gpu_attention

  features = _self_attention_checks(q, k, default_positions)
  if cfg.softcap is not None:
    features.append("softcap")
  if cfg.has_window:
    features.append("window")
  _unsupported("pallas_gpu", features)
  b, t, h, hd = q.shape
  groups = h // k.shape[2]
  block = 64 if t >= 64 else 16
  padded = t + (-t % block)
  _, kv_ids, same = _pallas_segments(aux, t)
  # One id array serves both sides: a padding slot's query gets the sentinel too and attends to
  # padding keys only (finite; zeroed below). Block padding takes another id.
  ids = jnp.pad(kv_ids, [(0, 0), (0, padded - t)], constant_values=jnp.iinfo(jnp.int32).min + 1)
  sizes = gpu_attention.BlockSizes(
    block_q=block, block_k=block, block_q_dkv=min(block, 32), block_kv_dkv=min(block, 32),
    block_q_dq=min(block, 32), block_kv_dq=min(block, 32),
  )

  def library(q, k, v):
    kr = _pad_time(jnp.repeat(k, groups, axis=2), block)
    vr = _pad_time(jnp.repeat(v, groups, axis=2), block)
    out = gpu_attention.mha(
      _pad_time(q, block), kr, vr, ids, sm_scale=cfg.scale, causal=cfg.causal,
      block_sizes=sizes, interpret=interpret,
    )[:, :t]
    return _zero_padding_rows(out, aux, t)

  return lax.cond(same, library, lambda q, k, v: _chunked(cfg, q, k, v, aux), q, k, v)


# ------------------------------------------------------------------------------------------------
# Public entry point.


def _check_inputs(q, k, v, q_index, kv_index, kv_valid, q_segment_ids, kv_segment_ids) -> None:
  if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape:
    raise ValueError(
      f"q must be [B, T, H, hd] and k, v [B, S, K, hd] of one shape, got q {list(q.shape)}, "
      f"k {list(k.shape)}, v {list(v.shape)}"
    )
  b, t, h, hd = q.shape
  if k.shape[0] != b or k.shape[3] != hd:
    raise ValueError(f"k {list(k.shape)} must share B={b} and hd={hd} with q {list(q.shape)}")
  if h % k.shape[2]:
    raise ValueError(f"query heads H={h} must be a multiple of KV heads K={k.shape[2]}")
  s = k.shape[1]
  for name, x, length in (("q_index", q_index, t), ("kv_index", kv_index, s)):
    if x is not None and x.shape not in ((length,), (b, length)):
      raise ValueError(f"{name} must be [{length}] or [{b}, {length}], got {list(x.shape)}")
  if kv_valid is not None and kv_valid.shape != (b, s):
    raise ValueError(f"kv_valid must be [{b}, {s}], got {list(kv_valid.shape)}")
  if (q_segment_ids is None) != (kv_segment_ids is None):
    raise ValueError("q_segment_ids and kv_segment_ids must be given together")
  if q_segment_ids is not None:
    if q_segment_ids.shape != (b, t) or kv_segment_ids.shape != (b, s):
      raise ValueError(
        f"q_segment_ids must be [{b}, {t}] and kv_segment_ids [{b}, {s}], got "
        f"{list(q_segment_ids.shape)} and {list(kv_segment_ids.shape)}"
      )


def _static(name: str, value: float | None) -> float | None:
  if isinstance(value, core.Tracer):
    raise ValueError(f"{name} must be a Python number known at trace time, got a traced "
                     f"{value.aval.str_short()}")
  return None if value is None else float(value)


def _static_int(value: object) -> int | None:
  """The value of an int or concrete integer array, else None (traced)."""
  if isinstance(value, core.Tracer):
    return None
  return int(np.asarray(value))


def attention(
  q: Float[Array, "B T H hd"],
  k: Float[Array, "B S K hd"],
  v: Float[Array, "B S K hd"],
  *,
  scale: float,
  q_index: Int[Array, "B T"] | Int[Array, " T"] | None = None,
  kv_index: Int[Array, "B S"] | Int[Array, " S"] | None = None,
  kv_valid: Bool[Array, "B S"] | None = None,
  q_segment_ids: Int[Array, "B T"] | None = None,
  kv_segment_ids: Int[Array, "B S"] | None = None,
  causal: bool = True,
  window: int | Int[Array, ""] | None = None,
  softcap: float | None = None,
  kv_len: int | Int[Array, ""] | None = None,
  impl: str = "auto",
  block_q: int | None = None,
  block_kv: int | None = None,
  interpret: bool | None = None,
) -> Float[Array, "B T H hd"]:
  """``o_i = Σ_j softmax_j(cap(scale · q_i k_j) | allowed_ij) v_j`` without [T, S] scores.

  ``allowed_ij`` is in the module docstring: causal on slot indices, sliding window, valid keys,
  equal segment ids, slots below ``kv_len``. A query with no allowed key returns 0 (finite, zero
  gradient). The softmax is fp32; the output has q's dtype.

  Args:
    q: queries [B, T, H, hd].
    k, v: keys and values [B, S, K, hd]; ``H`` a multiple of ``K`` (grouped-query attention).
    scale: score scale, usually ``hd ** -0.5`` (a Python number).
    q_index: slot index of each query [B, T] or [T]; default ``arange(T)``.
    kv_index: slot index of each key [B, S] or [S]; default ``arange(S)``.
    kv_valid: False for padding keys or empty cache slots [B, S] (left or right padding).
    q_segment_ids, kv_segment_ids: packing ids [B, T], [B, S]; a query sees only keys of its id.
    causal: keys after the query (by index) are masked.
    window: sliding window W (key j visible to query i iff ``q_index_i − W < kv_index_j``); an int
      or a traced int scalar (per-layer windows as scanned data); W >= S is no window.
    softcap: Gemma 2 attention-logit soft-cap c (a Python number), applied before masking.
    kv_len: only slots ``< kv_len`` can be valid; the chunked kernel skips KV blocks past it
      (decode with a KV cache).
    impl: ``"auto"`` (the chunked kernel on every backend until ``_VALIDATED`` names another),
      ``"chunked"``, ``"reference"`` (dense oracle), ``"xla"``, ``"cudnn"`` (no soft-cap, no
      segment ids, default positions, static window, causal only for cuDNN windows; non-right
      padding falls back to chunked),
      ``"pallas_tpu"`` (splash: causal / static window, soft-cap, segment ids, GQA),
      ``"pallas_gpu"`` (Triton: causal, segment ids, GQA; no window or soft-cap). The Pallas paths
      need self-attention (T = S, default positions), return 0 at rows whose own slot is padding,
      and fall back to chunked when query and key segment ids differ.
    block_q, block_kv: tile sizes of the chunked kernel (default 512 each).
    interpret: run the Pallas kernels in interpret mode (default: only on the CPU backend; pass
      False to lower the real kernel for another platform, e.g. under ``jax.export``).

  Returns:
    The attention output [B, T, H, hd] in q's dtype.

  Raises:
    ValueError: on inconsistent shapes, a traced ``scale`` or ``softcap``, an unknown ``impl``, or a
      feature the requested library kernel cannot express (named in the message).
  """
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"impl must be one of {IMPLEMENTATIONS}, got {impl!r}")
  _check_inputs(q, k, v, q_index, kv_index, kv_valid, q_segment_ids, kv_segment_ids)
  scale = _static("scale", scale)
  softcap = _static("softcap", softcap)
  if softcap is not None and softcap <= 0:
    raise ValueError(f"softcap must be > 0, got {softcap!r}")
  for name, block in (("block_q", block_q), ("block_kv", block_kv)):
    if block is not None and (not isinstance(block, int) or block < 1):
      raise ValueError(f"{name} must be a positive int, got {block!r}")
  b, t, _, _ = q.shape
  s = k.shape[1]
  default_positions = q_index is None and kv_index is None
  static_window = None if window is None else _static_int(window)
  if static_window is not None and static_window < 1:
    raise ValueError(f"window must be >= 1, got {static_window}")
  if static_window is not None and static_window >= max(t, s) and default_positions:
    window = static_window = None  # covers every key: no window

  def positions(x, length):
    x = jnp.arange(length, dtype=jnp.int32) if x is None else jnp.asarray(x, jnp.int32)
    return jnp.broadcast_to(x, (b, length))

  aux = _Aux(
    q_index=positions(q_index, t), kv_index=positions(kv_index, s),
    kv_valid=jnp.ones((b, s), jnp.bool_) if kv_valid is None else kv_valid,
    q_segments=None if q_segment_ids is None else q_segment_ids.astype(jnp.int32),
    kv_segments=None if kv_segment_ids is None else kv_segment_ids.astype(jnp.int32),
    window=None if window is None else jnp.minimum(jnp.asarray(window, jnp.int32), _NO_WINDOW),
    kv_len=jnp.int32(s) if kv_len is None else jnp.asarray(kv_len, jnp.int32),
  )
  cfg = _Config(
    scale=scale, softcap=softcap, causal=bool(causal),
    block_q=block_q or DEFAULT_BLOCK_Q, block_kv=block_kv or DEFAULT_BLOCK_KV,
    has_window=window is not None, has_segments=q_segment_ids is not None,
  )
  if t == 0 or s == 0:  # no queries, or no keys (every row empty): zeros, zero gradients
    return jnp.zeros_like(q)
  if impl == "auto":
    impl = _VALIDATED.get(jax.default_backend()) or "chunked"
  if impl == "chunked":
    return _chunked(cfg, q, k, v, aux)
  if impl == "reference":
    return _reference(cfg, q, k, v, aux)
  if impl in ("xla", "cudnn"):
    return _dot_product_attention(
      cfg, q, k, v, aux, implementation=impl, default_positions=default_positions,
      static_window=static_window, padded=kv_valid is not None or kv_len is not None,
    )
  if interpret is None:
    interpret = jax.default_backend() == "cpu"
  if impl == "pallas_tpu":
    return _pallas_tpu(cfg, q, k, v, aux, default_positions=default_positions,
                       static_window=static_window, interpret=interpret)
  return _pallas_gpu(cfg, q, k, v, aux, default_positions=default_positions, interpret=interpret)


__all__ = ["DEFAULT_BLOCK_KV", "DEFAULT_BLOCK_Q", "IMPLEMENTATIONS", "attention"]
