"""Pallas kernels for per-token statistics of softmax(h Wᵀ) that never hold the [N, V] logits.

  z   = cap(logit_scale · h Wᵀ + b) / T,   cap(u) = c · tanh(u / c)   (Gemma 2 soft-capping)
  lse = log Σ_j exp z_j,   target_logit = z_y,   expected_logit = Σ_j softmax(z)_j z_j

computed as in Cut Cross-Entropy (Wijmans et al., 2025, arXiv:2411.09009 §4) and split-V
"flash-decoding". The forward pass is a grid over (vocabulary tile, token block); every program
computes one [block_n, block_v] logit tile in fp32 and writes fp32 partials (tile max, Σ e^{z−m},
Σ e^{z−m}·z, target logit), which a tiny XLA step merges into the statistics. Only [N] statistics
are saved for the backward pass. It recomputes every logit tile twice: in a dX kernel (parallel over
token blocks, reducing over vocabulary tiles) and in a dW kernel (parallel over vocabulary tiles,
reducing over token blocks). Both accumulate in fp32 without atomics, so results are deterministic.

One kernel source lowers for two backends (``backend=``):

* ``"mosaic_tpu"``: the backward reduction is the sequential last grid axis, with the fp32 output
  block resident in VMEM; blocks hold whole hidden rows (``block_k`` = d by default).
* ``"triton"``: Pallas' Triton lowering for GPUs, selected in jax 0.10.2 by passing
  ``pallas.triton.CompilerParams`` (the default GPU lowering, Mosaic GPU, cannot lower the tiled
  ``dot_general`` used here). Triton programs run concurrently, so the reduction is a loop inside
  each program, dots run over ``block_k`` chunks of d, and block sizes are powers of 2.

``interpret=True`` runs either schedule on CPU (tests); there the default is ``"mosaic_tpu"``, whose
sequential grid is exactly what the interpreter executes.

Gradients reach hidden, weight and bias through ``jax.custom_vjp(..., symbolic_zeros=True)``. An
input that is not differentiated (a frozen LM head, a reference model) skips its backward kernel
entirely, so a frozen head never pays for the dW recompute.
"""

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton
from jaxtyping import Array, Float, Int

from alignax import _validate
from alignax.kernels import common
from alignax.kernels.common import KLStats, VocabStats

BACKENDS = ("mosaic_tpu", "triton")

# Untuned starting points (no accelerator was available to tune them): TPU tiles hold whole hidden
# rows in VMEM; GPU tiles are register-sized powers of 2 with d streamed in block_k chunks.
_DEFAULT_BLOCKS = {"mosaic_tpu": (256, 512, None), "triton": (64, 128, 64)}

_NT = (((1,), (1,)), ((), ()))  # contract the last dims: [n, k] · [v, k] -> [n, v]
_NN = (((1,), (0,)), ((), ()))  # [n, v] · [v, k] -> [n, k]
_TN = (((0,), (0,)), ((), ()))  # [n, v]ᵀ · [n, k] -> [v, k]


class _Config(NamedTuple):
  """Static description of one call: hyper-parameters, padded sizes and the schedule."""

  kind: str  # "vocab" (vocab_stats) or "kl" (kl_stats)
  temperature: float
  softcap: float | None
  logit_scale: float
  vocab_offset: int
  valid_vocab: int | None
  shard_vocab: int  # Vs, the unpadded number of weight rows
  block_n: int
  block_v: int
  block_k: int
  padded_n: int
  padded_v: int
  padded_d: int
  backend: str
  interpret: bool
  num_warps: int
  num_stages: int

  @property
  def num_n(self) -> int:
    return self.padded_n // self.block_n

  @property
  def num_v(self) -> int:
    return self.padded_v // self.block_v

  @property
  def num_k(self) -> int:
    return self.padded_d // self.block_k

  @property
  def loop_schedule(self) -> bool:
    """True when backward reductions loop inside a program (Triton) instead of over the grid."""
    return self.backend == "triton"


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class _Needs:
  """Which input cotangents the backward pass must compute (a static residual)."""

  hidden: bool
  weight: bool
  bias: bool


# ------------------------------------------------------------------------------------------------
# Tile math shared by all kernels. `rows_n` / `rows_v` select the token / vocabulary rows of a ref:
# the whole block (grid schedule) or one block of a whole array (loop schedule).


def _k_slice(k: Any, cfg: _Config) -> Any:
  if cfg.num_k == 1:
    return slice(None)
  return pl.ds(pl.multiple_of(k * cfg.block_k, cfg.block_k), cfg.block_k)


def _precision(dtype: Any) -> lax.Precision | None:
  # fp32 inputs get true fp32 products (TF32 would break the fp32 accuracy promise); bf16 inputs
  # already multiply exactly into the fp32 accumulator.
  return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _for_each_k(cfg: _Config, body: Callable[[Any], None]) -> None:
  if cfg.num_k == 1:
    body(0)
  else:
    @pl.loop(0, cfg.num_k)
    def _(k):
      body(k)


def _dot_nt(h_ref, rows_n, w_ref, rows_v, cfg: _Config) -> Array:
  """h[rows_n] · w[rows_v]ᵀ in fp32, streaming d in block_k chunks."""
  precision = _precision(h_ref.dtype)

  def chunk(k):
    ks = _k_slice(k, cfg)
    return lax.dot_general(
      h_ref[rows_n, ks], w_ref[rows_v, ks], _NT, precision=precision,
      preferred_element_type=jnp.float32,
    )

  if cfg.num_k == 1:
    return chunk(0)
  shape = (cfg.block_n, cfg.block_v)
  return lax.fori_loop(0, cfg.num_k, lambda k, acc: acc + chunk(k), jnp.zeros(shape, jnp.float32))


def _columns(cfg: _Config, vocab_block: Any) -> Array:
  """Local vocabulary ids (0-based within the shard) of one tile, [block_n, block_v]."""
  iota = lax.broadcasted_iota(jnp.int32, (cfg.block_n, cfg.block_v), 1)
  return iota + vocab_block * cfg.block_v


def _logits(refs, side: str, rows_n, rows_v, columns: Array, cfg: _Config) -> tuple[Array, Array]:
  """Transformed logits z of one tile and dz/dz_raw (see `common.transform_logits`)."""
  dot = _dot_nt(refs["hidden_" + side], rows_n, refs["weight_" + side], rows_v, cfg)
  bias_ref = refs.get("bias_" + side)
  bias = None if bias_ref is None else bias_ref[0, rows_v]
  valid = common.valid_columns(
    columns, shard_vocab=cfg.shard_vocab, vocab_offset=cfg.vocab_offset,
    valid_vocab=cfg.valid_vocab,
  )
  return common.transform_logits(
    dot, bias, valid, logit_scale=cfg.logit_scale, softcap=cfg.softcap,
    temperature=cfg.temperature,
  )


def _row(refs, name: str, rows_n) -> Array:
  """Per-token values (stored as an [N, 1] column) of the rows ``rows_n``, as a [block_n] vector."""
  return refs[name][rows_n, 0]


def _store_row(ref, value: Array) -> None:
  ref[...] = value.reshape(ref.shape).astype(ref.dtype)


# ------------------------------------------------------------------------------------------------
# Forward: one logit tile per program, fp32 partials out.


def _forward_kernel(*refs, names: tuple[str, ...], cfg: _Config) -> None:
  r = dict(zip(names, refs))
  vocab_block = pl.program_id(0)
  rows = slice(None)
  columns = _columns(cfg, vocab_block)
  z_p, _ = _logits(r, "p", rows, rows, columns, cfg)
  empty = common.online_init((cfg.block_n,))
  if cfg.kind == "vocab":
    state = common.online_update(empty, z_p, z_p)
    target = common.target_logit_of_block(z_p, columns, _row(r, "targets", rows))
    _store_row(r["out_target"], target)
  else:
    z_q, _ = _logits(r, "q", rows, rows, columns, cfg)
    state = common.online_update(empty, z_p, z_p - z_q)
    state_q = common.online_update(empty, z_q, z_q)
    _store_row(r["out_max_q"], state_q.max)
    _store_row(r["out_sumexp_q"], state_q.sumexp)
  _store_row(r["out_max"], state.max)
  _store_row(r["out_sumexp"], state.sumexp)
  _store_row(r["out_weighted"], state.weighted)


# ------------------------------------------------------------------------------------------------
# Backward: recompute a tile, turn the statistics' cotangents into dz_raw, accumulate dX or dW / db.


def _tile_cotangent(r, rows_n, rows_v, vocab_block, cfg: _Config) -> Array:
  """d⟨cotangent, stats⟩ / d z_raw for one tile, fp32 [block_n, block_v] (0 in masked columns)."""
  columns = _columns(cfg, vocab_block)
  z_p, slope = _logits(r, "p", rows_n, rows_v, columns, cfg)
  if cfg.kind == "vocab":
    zero = jnp.zeros((cfg.block_n,))  # fields the logit cotangent does not read
    stats = VocabStats(_row(r, "lse", rows_n), zero, _row(r, "mean", rows_n), zero)
    cotangent = VocabStats(*(_row(r, "ct_" + n, rows_n) for n in ("lse", "target", "mean")), zero)
    dz = common.vocab_stats_logit_cotangent(
      z_p, columns, _row(r, "targets", rows_n), stats, cotangent
    )
  else:
    z_q, _ = _logits(r, "q", rows_n, rows_v, columns, cfg)
    zero = jnp.zeros((cfg.block_n,))
    stats = KLStats(_row(r, "lse", rows_n), zero, _row(r, "mean", rows_n))
    cotangent = KLStats(_row(r, "ct_lse", rows_n), zero, _row(r, "ct_mean", rows_n))
    dz = common.kl_stats_logit_cotangent(z_p, z_q, stats, cotangent)
  return dz * slope


def _sync(cfg: _Config) -> None:
  if cfg.loop_schedule and not cfg.interpret:
    # Loop-schedule accumulators live in global memory and are re-read by the next (token block,
    # vocabulary tile) pair; make every thread's stores visible first.
    pltriton.debug_barrier()


def _accumulate(ref, columns, value: Array, cfg: _Config) -> None:
  ref[:, columns] += value
  _sync(cfg)


def _zero(name: str, ref, cfg: _Config) -> None:
  if name == "out_dbias":  # one [1, block_v] row
    ref[...] = jnp.zeros(ref.shape, ref.dtype)
  else:  # [rows, d], written in block_k chunks (Triton tensors stay register-sized)
    def body(k):
      ref[:, _k_slice(k, cfg)] = jnp.zeros((ref.shape[0], cfg.block_k), ref.dtype)

    _for_each_k(cfg, body)
  _sync(cfg)


def _dhidden_pair(r, rows_v, vocab_block, cfg: _Config) -> None:
  """dX[block] += logit_scale · dz_raw · W[tile] for one (token block, vocabulary tile) pair."""
  du = _tile_cotangent(r, slice(None), rows_v, vocab_block, cfg) * cfg.logit_scale
  w_ref = r["weight_p"]
  du = du.astype(w_ref.dtype)

  def body(k):
    ks = _k_slice(k, cfg)
    dx = lax.dot_general(
      du, w_ref[rows_v, ks], _NN, precision=_precision(w_ref.dtype),
      preferred_element_type=jnp.float32,
    )
    _accumulate(r["out_dhidden"], ks, dx, cfg)

  _for_each_k(cfg, body)


def _dweight_pair(r, rows_n, vocab_block, cfg: _Config) -> None:
  """dW[tile] += logit_scale · dz_rawᵀ · h[block] and db[tile] += Σ_n dz_raw for one pair."""
  du = _tile_cotangent(r, rows_n, slice(None), vocab_block, cfg)
  if "out_dbias" in r:
    _accumulate(r["out_dbias"], slice(None), jnp.sum(du, axis=0, keepdims=True), cfg)
  if "out_dweight" not in r:
    return
  h_ref = r["hidden_p"]
  du = (du * cfg.logit_scale).astype(h_ref.dtype)

  def body(k):
    ks = _k_slice(k, cfg)
    dw = lax.dot_general(
      du, h_ref[rows_n, ks], _TN, precision=_precision(h_ref.dtype),
      preferred_element_type=jnp.float32,
    )
    _accumulate(r["out_dweight"], ks, dw, cfg)

  _for_each_k(cfg, body)


def _backward_kernel(*refs, names: tuple[str, ...], cfg: _Config, wrt: str) -> None:
  """dX kernel (``wrt="hidden"``, parallel over token blocks) or dW/db kernel (``wrt="weight"``,
  parallel over vocabulary tiles); the other axis is reduced over the grid or in a loop."""
  r = dict(zip(names, refs))
  outs = {name: ref for name, ref in r.items() if name.startswith("out_")}
  pair = _dhidden_pair if wrt == "hidden" else _dweight_pair
  block = cfg.block_v if wrt == "hidden" else cfg.block_n
  count = cfg.num_v if wrt == "hidden" else cfg.num_n

  outer = pl.program_id(0)  # read outside loops: the interpreter cannot see it inside a loop body

  def vocab_block_of(inner):
    return inner if wrt == "hidden" else outer

  if cfg.loop_schedule:
    for name, ref in outs.items():
      _zero(name, ref, cfg)

    @pl.loop(0, count)
    def _(inner):
      rows = pl.ds(pl.multiple_of(inner * block, block), block)
      pair(r, rows, vocab_block_of(inner), cfg)
  else:
    inner = pl.program_id(1)

    @pl.when(inner == 0)
    def _():
      for name, ref in outs.items():
        _zero(name, ref, cfg)

    pair(r, slice(None), vocab_block_of(inner), cfg)


# ------------------------------------------------------------------------------------------------
# pallas_call plumbing.


def _spec(name: str, array: Any, grid_axes: Sequence[str], cfg: _Config, *, whole_axis: str = ""):
  """BlockSpec of an input: token rows [N, ...], vocabulary rows [V, d] or a bias row [1, V].

  ``grid_axes`` names what each grid index enumerates ("n" or "v"); arrays indexed by
  ``whole_axis`` are mapped entirely (the reduced axis of the loop schedule, sliced in the kernel).
  """
  shape = tuple(array.shape)
  axis = "v" if name.startswith(("weight", "bias")) else "n"
  if axis == whole_axis:
    return pl.BlockSpec(shape, lambda *_: (0,) * len(shape))
  position = grid_axes.index(axis)
  if name.startswith("bias"):
    # A [1, V] row rather than a [V] vector: rank-1 TPU blocks need the chip's tiling at lowering.
    return pl.BlockSpec((1, cfg.block_v), lambda *ids: (0, ids[position]))
  block = cfg.block_n if axis == "n" else cfg.block_v
  return pl.BlockSpec((block, shape[1]), lambda *ids: (ids[position], 0))


def _compiler_params(cfg: _Config, semantics: tuple[str, ...]):
  if cfg.interpret:
    return None
  if cfg.backend == "triton":
    return pltriton.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
  return pltpu.CompilerParams(dimension_semantics=semantics)


def _call(
  kernel: Callable[..., None], cfg: _Config, grid: tuple[int, ...], semantics: tuple[str, ...],
  inputs: dict[str, tuple[Array, Any]], outputs: dict[str, tuple[jax.ShapeDtypeStruct, Any]],
) -> dict[str, Array]:
  names = tuple(inputs) + tuple(outputs)
  arrays = [array for array, _ in inputs.values()]
  # Under jax.shard_map(check_vma=True) outputs must say over which mesh axes they vary: all of the
  # axes any input varies over. Inputs are made to vary the same way.
  manual = [jax.typeof(array).mat for array in arrays]
  varying = frozenset().union(*(m.varying for m in manual))
  arrays = [_vary(array, varying) for array in arrays]
  out_manual = manual[0].update(varying=varying)
  out_shapes = [jax.ShapeDtypeStruct(shape.shape, shape.dtype, manual_axis_type=out_manual)
                for shape, _ in outputs.values()]
  results = pl.pallas_call(
    functools.partial(kernel, names=names, cfg=cfg),
    grid=grid,
    in_specs=[spec for _, spec in inputs.values()],
    out_specs=[spec for _, spec in outputs.values()],
    out_shape=out_shapes,
    compiler_params=_compiler_params(cfg, semantics),
    interpret=cfg.interpret,
    name=f"alignax_{cfg.kind}_stats_{kernel.__name__.strip('_')}",
  )(*arrays)
  return dict(zip(outputs, results))


def _vary(array: Array, axes: frozenset) -> Array:
  missing = tuple(sorted(axes - jax.typeof(array).mat.varying))
  return lax.pcast(array, missing, to="varying") if missing else array


def _side_arrays(cfg: _Config, sides: dict[str, tuple[Array, Array, Array | None]]):
  """Pads hidden [N, d] / weight [Vs, d] / bias [Vs] of each side to the block grid."""
  arrays = {}
  for side, (hidden, weight, bias) in sides.items():
    hidden = common.pad_axis(common.pad_axis(hidden, cfg.padded_n), cfg.padded_d, axis=1)
    weight = common.pad_axis(common.pad_axis(weight, cfg.padded_v), cfg.padded_d, axis=1)
    arrays["hidden_" + side] = hidden
    arrays["weight_" + side] = weight
    if bias is not None:
      arrays["bias_" + side] = common.pad_axis(bias.astype(jnp.float32), cfg.padded_v)[None, :]
  return arrays


def _rows_column(cfg: _Config, values: Array, *, fill: float | int = 0) -> Array:
  """[N] -> padded [N_pad, 1] (a column, so per-token blocks tile like the hidden rows)."""
  return common.pad_axis(values, cfg.padded_n, value=fill)[:, None]


def _local_targets(cfg: _Config, targets: Array) -> Array:
  local = targets.astype(jnp.int32) - cfg.vocab_offset
  inside = (local >= 0) & (local < cfg.shard_vocab)
  return _rows_column(cfg, jnp.where(inside, local, -1), fill=-1)


def _forward(cfg: _Config, arrays: dict[str, Array], n: int) -> VocabStats | KLStats:
  if n == 0:  # no tokens: a grid with a zero extent does not lower
    empty = jnp.zeros_like(arrays["hidden_p"][:, 0], jnp.float32)
    if cfg.kind == "vocab":
      return VocabStats(empty, empty, empty, empty)
    return KLStats(empty, empty, empty)
  grid_axes = ("v", "n")  # token blocks vary fastest: programs running together share a W tile
  inputs = {name: (a, _spec(name, a, grid_axes, cfg)) for name, a in arrays.items()}
  partial_names = ["max", "sumexp", "weighted"]
  partial_names += ["target"] if cfg.kind == "vocab" else ["max_q", "sumexp_q"]
  partial = jax.ShapeDtypeStruct((cfg.num_v, cfg.padded_n, 1), jnp.float32)
  spec = pl.BlockSpec((None, cfg.block_n, 1), lambda v, i: (v, i, 0))
  outputs = {"out_" + name: (partial, spec) for name in partial_names}
  out = _call(_forward_kernel, cfg, (cfg.num_v, cfg.num_n), ("parallel", "parallel"), inputs,
              outputs)
  out = {name[4:]: value[:, :n, 0] for name, value in out.items()}
  merged = _merge_tiles(common.OnlineState(out["max"], out["sumexp"], out["weighted"]))
  lse, mean = common.online_finalize(merged)
  if cfg.kind == "vocab":
    # merged.max is the top-1 logit, from the very tiles that gave the target logit.
    return VocabStats(lse, jnp.sum(out["target"], axis=0), mean, merged.max)
  zeros = jnp.zeros_like(out["sumexp_q"])
  lse_q, _ = common.online_finalize(
    _merge_tiles(common.OnlineState(out["max_q"], out["sumexp_q"], zeros))
  )
  return KLStats(lse, lse_q, mean)


def _merge_tiles(state: common.OnlineState) -> common.OnlineState:
  """Merges per-tile online states stacked on axis 0 into one.

  The raw sums are rescaled to the common max and added, so the mean keeps a single normaliser,
  Σ e^{z−m}·value / Σ e^{z−m}. (Merging finished per-tile lse values instead weights the tile
  means by e^{lse_s − lse}, whose sum is 1 only up to the rounding of lse: ~1e-3 at logits of 1e4,
  which moves the mean by ~10.)
  """
  top = jnp.max(state.max, axis=0)
  shift = jnp.where(jnp.isfinite(top), top, 0.0)
  rescale = jnp.exp(state.max - shift)  # 0 for tiles with no valid column (their sums are 0)
  return common.OnlineState(
    top, jnp.sum(state.sumexp * rescale, axis=0), jnp.sum(state.weighted * rescale, axis=0)
  )


def _backward(cfg: _Config, arrays: dict[str, Array], needs: _Needs) -> dict[str, Array]:
  """Runs the dX and/or dW kernels that ``needs`` asks for; returns padded fp32 gradients."""
  if cfg.padded_n == 0:  # no tokens: nothing to reduce, and a zero-extent grid does not lower
    return {"out_d" + name: jnp.zeros_like(arrays[name + "_p"], jnp.float32)
            for name in ("hidden", "weight", "bias") if name + "_p" in arrays}
  grads = {}
  d = cfg.padded_d
  if needs.hidden:
    grid_axes = ("n", "v")
    whole_axis = "v" if cfg.loop_schedule else ""
    inputs = {name: (a, _spec(name, a, grid_axes, cfg, whole_axis=whole_axis))
              for name, a in arrays.items()}
    shape = jax.ShapeDtypeStruct((cfg.padded_n, d), jnp.float32)
    outputs = {"out_dhidden": (shape, pl.BlockSpec((cfg.block_n, d), lambda i, *_: (i, 0)))}
    grid = (cfg.num_n,) if cfg.loop_schedule else (cfg.num_n, cfg.num_v)
    kernel = functools.partial(_backward_kernel, wrt="hidden")
    kernel.__name__ = "dhidden"
    grads.update(_call(kernel, cfg, grid, ("parallel", "arbitrary")[: len(grid)], inputs, outputs))
  if needs.weight or needs.bias:
    grid_axes = ("v", "n")
    whole_axis = "n" if cfg.loop_schedule else ""
    inputs = {name: (a, _spec(name, a, grid_axes, cfg, whole_axis=whole_axis))
              for name, a in arrays.items()}
    outputs = {}
    if needs.weight:
      shape = jax.ShapeDtypeStruct((cfg.padded_v, d), jnp.float32)
      outputs["out_dweight"] = (shape, pl.BlockSpec((cfg.block_v, d), lambda j, *_: (j, 0)))
    if needs.bias:
      shape = jax.ShapeDtypeStruct((1, cfg.padded_v), jnp.float32)
      outputs["out_dbias"] = (shape, pl.BlockSpec((1, cfg.block_v), lambda j, *_: (0, j)))
    grid = (cfg.num_v,) if cfg.loop_schedule else (cfg.num_v, cfg.num_n)
    kernel = functools.partial(_backward_kernel, wrt="weight")
    kernel.__name__ = "dweight"
    grads.update(_call(kernel, cfg, grid, ("parallel", "arbitrary")[: len(grid)], inputs, outputs))
  return grads


# ------------------------------------------------------------------------------------------------
# custom_vjp wrappers: hidden / weight / bias of the p side are differentiable; targets and the q
# side are not.


def _materialize(cotangent: Any, like: Array) -> Array:
  if isinstance(cotangent, jax.custom_derivatives.SymbolicZero):
    return jnp.zeros(like.shape, jnp.float32)
  return cotangent.astype(jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _stats(cfg: _Config, hidden, weight, bias, others):
  """``others``: targets [N] for kind "vocab"; (hidden_q, weight_q, bias_q) for kind "kl"."""
  return _forward(cfg, _stats_arrays(cfg, hidden, weight, bias, others), hidden.shape[0])


def _stats_arrays(cfg: _Config, hidden, weight, bias, others) -> dict[str, Array]:
  sides = {"p": (hidden, weight, bias)}
  if cfg.kind == "kl":
    sides["q"] = others  # stop-gradient: the backward pass returns no cotangent for it
  arrays = _side_arrays(cfg, sides)
  if cfg.kind == "vocab":
    arrays["targets"] = _local_targets(cfg, others)
  return arrays


def _stats_fwd(cfg: _Config, hidden, weight, bias, others):
  # With symbolic_zeros every array arrives as CustomVJPPrimal(value, perturbed); an input that is
  # not perturbed (frozen head, no grad w.r.t. hidden) gets no backward kernel at all.
  needs = _Needs(
    hidden=hidden.perturbed, weight=weight.perturbed, bias=bias is not None and bias.perturbed
  )
  hidden, weight, bias, others = jax.custom_derivatives.custom_vjp_primal_tree_values(
    (hidden, weight, bias, others)
  )
  arrays = _stats_arrays(cfg, hidden, weight, bias, others)
  stats = _forward(cfg, arrays, hidden.shape[0])
  return stats, (hidden, weight, bias, others, stats, needs)


def _stats_bwd(cfg: _Config, residuals, cotangent):
  hidden, weight, bias, others, stats, needs = residuals
  zero_grads = (None, None, None, jax.tree.map(lambda _: None, others))
  if all(isinstance(c, jax.custom_derivatives.SymbolicZero) for c in cotangent):
    return zero_grads
  n = hidden.shape[0]
  arrays = _stats_arrays(cfg, hidden, weight, bias, others)
  cotangent = [_materialize(c, stats[0]) for c in cotangent]
  if cfg.kind == "vocab":
    rows = {"lse": stats.lse, "mean": stats.expected_logit, "ct_lse": cotangent[0],
            "ct_target": cotangent[1], "ct_mean": cotangent[2]}
  else:  # the lse_q cotangent only reaches the stop-gradient q side
    rows = {"lse": stats.lse_p, "mean": stats.expected_diff, "ct_lse": cotangent[0],
            "ct_mean": cotangent[2]}
  # A slice with no valid column has lse = −inf; its rows carry no probability and no gradient.
  rows = {name: jnp.where(jnp.isfinite(v), v, 0.0) if name in ("lse", "mean") else v
          for name, v in rows.items()}
  arrays.update({name: _rows_column(cfg, v.astype(jnp.float32)) for name, v in rows.items()})
  grads = _backward(cfg, arrays, needs)
  d, vs = hidden.shape[1], cfg.shard_vocab
  d_hidden = grads["out_dhidden"][:n, :d].astype(hidden.dtype) if needs.hidden else None
  d_weight = grads["out_dweight"][:vs, :d].astype(weight.dtype) if needs.weight else None
  d_bias = grads["out_dbias"][0, :vs].astype(bias.dtype) if needs.bias else None
  return (d_hidden, d_weight, d_bias, zero_grads[3])


_stats.defvjp(_stats_fwd, _stats_bwd, symbolic_zeros=True)


# ------------------------------------------------------------------------------------------------
# Public functions.


def _config(
  kind: str, hidden: Array, weight: Array, width: int, *,
  temperature: float, softcap: float | None, logit_scale: float, vocab_offset: int,
  valid_vocab: int | None, block_n: int | None, block_v: int | None, block_k: int | None,
  interpret: bool, backend: str | None, num_warps: int, num_stages: int,
) -> _Config:
  """Validates the static arguments and resolves backend, block sizes and padded extents."""
  common.check_options(
    temperature=temperature, softcap=softcap, logit_scale=logit_scale, vocab_offset=vocab_offset,
    valid_vocab=valid_vocab,
  )
  if not isinstance(interpret, bool):
    raise ValueError(f"interpret must be a bool, got {interpret!r}")
  if backend is None:
    platform = jax.default_backend()
    if platform == "tpu":
      backend = "mosaic_tpu"
    elif platform in ("gpu", "cuda", "rocm"):
      backend = "triton"
    elif interpret:
      backend = "mosaic_tpu"  # its sequential grid is what the interpreter runs
    else:
      raise ValueError(
        f"the Pallas kernels run on TPU or GPU, not {platform!r}; pass interpret=True (slow, for "
        "tests) or use impl='chunked'"
      )
  _validate.choice("backend", backend, BACKENDS)
  for name, value in (("block_n", block_n), ("block_v", block_v), ("block_k", block_k),
                      ("num_warps", num_warps), ("num_stages", num_stages)):
    if value is not None:
      _validate.positive_int(name, value)
  n, d = hidden.shape[0], width
  shard_vocab = weight.shape[0]
  default_n, default_v, default_k = _DEFAULT_BLOCKS[backend]
  block_n, block_v = block_n or default_n, block_v or default_v
  block_k = block_k or default_k or d
  if interpret:
    # The interpreter has no tiling constraints: blocks only shrink to the extents (N may be 0).
    block_n, block_v, block_k = max(1, min(block_n, n)), min(block_v, shard_vocab), min(block_k, d)
  elif backend == "triton":
    # Triton tensors have power-of-2 sides, and tl.dot needs every side >= 16.
    for name, value in (("block_n", block_n), ("block_v", block_v), ("block_k", block_k)):
      if value & (value - 1):
        raise ValueError(f"{name} must be a power of 2 for backend='triton', got {value}")
    block_n, block_v, block_k = (
      max(16, min(b, pl.next_power_of_2(extent)))
      for b, extent in ((block_n, n), (block_v, shard_vocab), (block_k, d))
    )
  else:
    # Mosaic tiles are (8, 128) (16 sublanes for 2-byte types); hidden rows are whole or 128-lane
    # chunks.
    block_n = common.block_size(block_n, n, align=32 // hidden.dtype.itemsize)
    block_v = common.block_size(block_v, shard_vocab, align=128)
    block_k = d if block_k >= d else common.block_size(block_k, d, align=128)
  return _Config(
    kind=kind, temperature=float(temperature),
    softcap=None if softcap is None else float(softcap), logit_scale=float(logit_scale),
    vocab_offset=int(vocab_offset), valid_vocab=None if valid_vocab is None else int(valid_vocab),
    shard_vocab=shard_vocab, block_n=block_n, block_v=block_v, block_k=block_k,
    padded_n=common.round_up(n, block_n), padded_v=common.round_up(shard_vocab, block_v),
    padded_d=common.round_up(d, block_k),
    backend=backend, interpret=interpret, num_warps=num_warps, num_stages=num_stages,
  )


def vocab_stats(
  hidden: Float[Array, "n d"],
  weight: Float[Array, "v d"],
  targets: Int[Array, "n"],
  *,
  bias: Float[Array, "v"] | None = None,
  temperature: float = 1.0,
  softcap: float | None = None,
  logit_scale: float = 1.0,
  vocab_offset: int = 0,
  valid_vocab: int | None = None,
  block_n: int | None = None,
  block_v: int | None = None,
  block_k: int | None = None,
  interpret: bool = False,
  backend: str | None = None,
  num_warps: int = 4,
  num_stages: int = 3,
) -> VocabStats:
  """lse, z_target, E_softmax(z)[z] and max z over the vocabulary slice in ``weight``, in Pallas.

    z = cap(logit_scale · h Wᵀ + b) / T;   lse = log Σ_j e^{z_j};   expected_logit = Σ_j p_j z_j

  (Cut Cross-Entropy, Wijmans et al., 2025, §4; soft-capping as in Gemma 2). Entropy is
  ``lse − expected_logit`` and log p(target) is ``target_logit − lse``. Differentiable w.r.t.
  hidden, weight and bias: the backward pass recomputes the logits tile by tile (dX and dW
  kernels).

  Args:
    hidden: hidden states [N, d] (fp32 or bf16; dots accumulate in fp32).
    weight: LM-head rows [Vs, d] of the vocabulary slice [vocab_offset, vocab_offset + Vs).
    targets: target token ids [N] (global ids; ids outside the slice give target_logit 0).
    bias: optional LM-head bias [Vs].
    temperature, softcap, logit_scale: the logit transform above (static Python numbers).
    vocab_offset: global id of the first row of ``weight``.
    valid_vocab: global ids >= this are vocabulary padding and get z = −inf (after soft-capping).
    block_n, block_v, block_k: token / vocabulary / hidden block sizes (backend defaults when None;
      ``block_k`` None on TPU means whole hidden rows).
    interpret: run the kernels in the Pallas interpreter (CPU tests; slow).
    backend: "mosaic_tpu" or "triton"; None picks from the default JAX platform.
    num_warps, num_stages: Triton launch parameters (ignored on TPU).

  Returns:
    VocabStats(lse, target_logit, expected_logit, max_logit), each fp32 [N]; ``max_logit`` (the
    merged per-tile maxima the log-sum-exp keeps) is stop-gradient.
  """
  common.check_head_inputs(hidden, weight, targets, bias)
  cfg = _config(
    "vocab", hidden, weight, hidden.shape[1], temperature=temperature, softcap=softcap,
    logit_scale=logit_scale, vocab_offset=vocab_offset, valid_vocab=valid_vocab, block_n=block_n,
    block_v=block_v, block_k=block_k, interpret=interpret, backend=backend, num_warps=num_warps,
    num_stages=num_stages,
  )
  stats = _stats(cfg, hidden, weight, bias, targets)
  return stats._replace(max_logit=lax.stop_gradient(stats.max_logit))


def kl_stats(
  hidden_p: Float[Array, "n d"],
  weight_p: Float[Array, "v d"],
  hidden_q: Float[Array, "n dq"],
  weight_q: Float[Array, "v dq"],
  *,
  bias_p: Float[Array, "v"] | None = None,
  bias_q: Float[Array, "v"] | None = None,
  temperature: float = 1.0,
  softcap: float | None = None,
  logit_scale: float = 1.0,
  vocab_offset: int = 0,
  valid_vocab: int | None = None,
  block_n: int | None = None,
  block_v: int | None = None,
  block_k: int | None = None,
  interpret: bool = False,
  backend: str | None = None,
  num_warps: int = 4,
  num_stages: int = 3,
) -> KLStats:
  """Statistics of KL(p‖q) between two LM heads over one vocabulary slice, fused in Pallas.

    lse_p = log Σ_j e^{z^p_j},  lse_q = log Σ_j e^{z^q_j},  expected_diff = Σ_j p_j (z^p_j − z^q_j)

  so KL(p‖q) = expected_diff − lse_p + lse_q (exact, full vocabulary; Schulman's k1 in expectation).
  Both logit tiles are computed in the same program. Differentiable w.r.t. the p side (hidden_p,
  weight_p, bias_p); the q side (a reference policy) is stop-gradient.

  Args:
    hidden_p, weight_p, bias_p: policy hidden states [N, d], head rows [Vs, d] and bias [Vs].
    hidden_q, weight_q, bias_q: the same for the reference model, [N, dq], [Vs, dq], [Vs]; a
      different width dq is zero-padded to the wider of the two inside the kernels.
    temperature, softcap, logit_scale, vocab_offset, valid_vocab: as in ``vocab_stats``, shared by p
      and q.
    block_n, block_v, block_k, interpret, backend, num_warps, num_stages: as in ``vocab_stats``.

  Returns:
    KLStats(lse_p, lse_q, expected_diff), each fp32 [N].
  """
  common.check_head_inputs(hidden_p, weight_p, None, bias_p, prefix="_p")
  common.check_head_inputs(hidden_q, weight_q, None, bias_q, prefix="_q")
  for name, q, p in (("hidden", hidden_q, hidden_p), ("weight", weight_q, weight_p)):
    if q.shape[0] != p.shape[0]:
      raise ValueError(
        f"{name}_q must have as many rows as {name}_p, got {list(q.shape)} and {list(p.shape)}"
      )
  cfg = _config(
    "kl", hidden_p, weight_p, max(hidden_p.shape[1], hidden_q.shape[1]), temperature=temperature,
    softcap=softcap, logit_scale=logit_scale, vocab_offset=vocab_offset, valid_vocab=valid_vocab,
    block_n=block_n, block_v=block_v, block_k=block_k, interpret=interpret, backend=backend,
    num_warps=num_warps, num_stages=num_stages,
  )
  return _stats(cfg, hidden_p, weight_p, bias_p, (hidden_q, weight_q, bias_q))
