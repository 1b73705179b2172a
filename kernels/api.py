"""Public entry points: per-token log-probs, entropy and KL straight from hidden states and LM head.

Both functions flatten any leading batch dims, apply the mask, pick an implementation
(``"pallas"``, ``"chunked"`` or ``"reference"``), and optionally run it under ``jax.shard_map``:
tokens split over every mesh axis except ``vocab_axis``, and the head's vocabulary rows split over
``vocab_axis``. Each device then computes the statistics of its own vocabulary shard and the shards
are combined exactly with ``pmax``/``psum`` of [N]-sized vectors, so the full vocabulary is never
gathered on one device.
"""

import importlib
from types import ModuleType
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import core, lax
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding, PartitionSpec
from jaxtyping import Array, Bool, Float, Int

from alignax import _validate
from alignax.kernels import common
from alignax.kernels.common import KLStats, LMHead, VocabStats

IMPLEMENTATIONS = ("auto", "pallas", "chunked", "reference")

# Backends on which benchmarks/device_check.sh has run the Pallas kernels against the reference and
# passed (BUILD.md records the run). A kernel that has never run on its device is not a default, so
# until a backend is listed here `impl="auto"` takes the portable chunked kernel there too.
PALLAS_VALIDATED_BACKENDS: frozenset[str] = frozenset()


class TokenLogprobs(NamedTuple):
  """Per-token outputs of ``token_logprobs``, all ``[*b]`` and 0 (False) on masked tokens.

  All four come out of one pass over the vocabulary (the kernel accumulates them anyway);
  gradients flow through whichever float the caller uses.

  Attributes:
    logp: log π(target | context), fp32.
    entropy: H(π(· | context)) = lse − E_π[z], fp32.
    lse: log Σ_j exp z_j (e.g. for a z-loss), fp32.
    target_is_top1: z_target ≥ max_j z_j, i.e. the target is an argmax of the logits (a tie
      counts as a hit), bool. Its masked mean is TRL's SFT ``mean_token_accuracy``. False on masked
      tokens and on targets outside [0, V) (or [0, valid_vocab)); no gradient.
  """

  logp: Float[Array, "*b"]
  entropy: Float[Array, "*b"]
  lse: Float[Array, "*b"]
  target_is_top1: Bool[Array, "*b"]


def implementation(impl: str) -> ModuleType:
  """The kernel module for ``impl``.

  ``"auto"`` is the Pallas kernel on a backend listed in ``PALLAS_VALIDATED_BACKENDS`` (validated on
  its device by ``benchmarks/device_check.sh``) and the chunked pure-JAX kernel everywhere else.
  """
  _validate.choice("impl", impl, IMPLEMENTATIONS)
  if impl == "auto":
    impl = "pallas" if jax.default_backend() in PALLAS_VALIDATED_BACKENDS else "chunked"
  return importlib.import_module(f"alignax.kernels.{impl}")


def _unpack_head(
  head: LMHead | Array, *, name: str, bias: Array | None, softcap: float | None,
  logit_scale: float,
) -> tuple[Array, Array | None, float | None, float]:
  """``(weight, bias, softcap, logit_scale)`` from an ``LMHead`` or a bare ``[V, d]`` weight.

  With an ``LMHead`` the head carries its own bias and logit transform; giving them again as
  keywords is ambiguous, so it is an error rather than a silent override.
  """
  if not isinstance(head, LMHead):
    return head, bias, softcap, logit_scale
  extra = [k for k, given in (("bias", bias is not None), ("softcap", softcap is not None),
                              ("logit_scale", logit_scale != 1.0)) if given]
  if extra:
    raise ValueError(
      f"{name} is an LMHead, which carries bias, softcap and logit_scale itself; do not pass "
      f"{extra} as keywords too"
    )
  return head.weight, head.bias, head.softcap, head.logit_scale


# ------------------------------------------------------------------------------------------------
# Argument checks.


def _check_head(
  hidden: Array, head: Array, bias: Array | None, *, hidden_name: str, head_name: str,
  bias_name: str,
) -> None:
  _validate.min_rank(hidden_name, hidden, 2, "[..., d]")
  if head.ndim != 2 or head.shape[1] != hidden.shape[-1]:
    raise ValueError(
      f"{head_name} must be [V, d] with d={hidden.shape[-1]} from {hidden_name}, "
      f"got shape {list(head.shape)}"
    )
  if bias is not None and bias.shape != head.shape[:1]:
    raise ValueError(
      f"{bias_name} must be [V] with V={head.shape[0]} from {head_name}, "
      f"got shape {list(bias.shape)}"
    )


def _check_tokens(
  name: str, x: Array | None, batch_shape: tuple[int, ...], hidden_name: str
) -> None:
  if x is not None and tuple(x.shape) != batch_shape:
    raise ValueError(
      f"{name} must have shape {list(batch_shape)} (the leading dims of {hidden_name}), "
      f"got {list(x.shape)}"
    )


def _check_options(
  *, temperature: float, softcap: float | None, logit_scale: float, valid_vocab: int | None,
  vocab_size: int, mask: Array | None,
) -> None:
  common.check_options(
    temperature=temperature, softcap=softcap, logit_scale=logit_scale, vocab_offset=0,
    valid_vocab=valid_vocab,
  )
  if valid_vocab is not None and valid_vocab > vocab_size:
    raise ValueError(f"valid_vocab={valid_vocab} exceeds the head's {vocab_size} rows")
  if mask is not None and mask.dtype != jnp.bool_:
    # A loss mask, unlike a model's attention mask, must say True/False explicitly.
    raise TypeError(f"mask must be a boolean array, got dtype {mask.dtype}")


def _check_targets_in_range(targets: Array, mask: Array | None, num_valid: int) -> None:
  """Raises ValueError naming the first unmasked target outside [0, num_valid), when the targets
  (and the mask) are concrete. Traced calls cannot look at values and keep logp = −lse there."""
  concrete = [x for x in (targets, mask) if x is not None]
  if any(isinstance(x, core.Tracer) or not getattr(x, "is_fully_addressable", True)
         for x in concrete):
    return
  targets = np.asarray(targets)
  bad = (targets < 0) | (targets >= num_valid)
  if mask is not None:
    bad &= np.asarray(mask)
  if bad.any():
    row = tuple(int(i) for i in np.argwhere(bad)[0])
    raise ValueError(
      f"targets[{', '.join(map(str, row))}] = {targets[row]} is outside [0, {num_valid}); mask "
      "that token out (mask=False) or fix the target"
    )


def _check_mesh(mesh: Mesh | None, vocab_axis: str | None, vocab_size: int) -> None:
  if vocab_axis is None:
    return
  if mesh is None:
    raise ValueError(f"vocab_axis={vocab_axis!r} needs a mesh")
  _validate.choice("vocab_axis", vocab_axis, mesh.axis_names)
  if vocab_size % mesh.shape[vocab_axis]:
    raise ValueError(
      f"lm_head has {vocab_size} rows, not divisible by the {mesh.shape[vocab_axis]} devices of "
      f"mesh axis {vocab_axis!r}; pad the head and pass valid_vocab"
    )


# ------------------------------------------------------------------------------------------------
# Running one implementation, optionally sharded.


def _shard_branches(
  num_shards: int, shard_vocab: int, valid_vocab: int | None
) -> tuple[list, Array]:
  """The distinct per-shard ``valid_vocab`` values (None = all valid, 0 = empty) and which shard
  uses which, so every shard runs with static options."""
  per_shard = []
  for shard in range(num_shards):
    valid = shard_vocab if valid_vocab is None else min(max(valid_vocab - shard * shard_vocab, 0),
                                                        shard_vocab)
    per_shard.append(None if valid == shard_vocab else valid)
  branches = sorted(set(per_shard), key=lambda v: -1 if v is None else v)
  return branches, jnp.asarray([branches.index(v) for v in per_shard], jnp.int32)


def _widen_reduction(x: Array, axes: tuple[str, ...]) -> Array:
  """Marks x as varying over ``axes`` through an fp32 round trip.

  Forward this is a no-op; backward, the cotangent's sum over ``axes`` (the transpose of the
  broadcast) then runs in fp32 rather than in x's (possibly bf16) dtype.
  """
  if not axes:
    return x
  return lax.pcast(x.astype(jnp.float32), axes, to="varying").astype(x.dtype)


def _place(x: Array | None, mesh: Mesh | AbstractMesh, spec: PartitionSpec | None) -> Array | None:
  """Lays x out as shard_map's in_specs expect (a reshard on meshes with explicit axes)."""
  if x is None:
    return None
  sharding = NamedSharding(mesh, spec)
  if AxisType.Explicit in mesh.axis_types:
    return jax.reshard(x, sharding)
  return lax.with_sharding_constraint(x, sharding)


def _run(
  stats_fn, empty_stats, psum_stats, token_args: tuple, head_args: tuple, targets: Array | None,
  *, mesh: Mesh | None, vocab_axis: str | None, valid_vocab: int | None, interpret: bool,
):
  """Calls ``stats_fn(token_args, head_args, targets, valid_vocab)`` on the whole problem, or per
  device under ``shard_map`` (tokens over the non-vocab axes, head rows over ``vocab_axis``).

  ``interpret``: the Pallas interpreter (jax 0.10.2) does not carry the varying-manual-axes types
  of ``shard_map`` into the kernel body, so interpreted kernels run without that check.
  """
  if mesh is None:
    # Inputs laid out on a mesh with explicit axes cannot be sliced block by block as if they were
    # whole; run per device on that mesh instead, keeping a head split over one axis split
    # (with auto axes, jit partitions the plain call).
    layout = jax.typeof(token_args[0]).sharding
    if AxisType.Explicit not in getattr(layout.mesh, "axis_types", ()):
      return stats_fn(token_args, head_args, targets, valid_vocab)
    mesh = layout.mesh
    head_rows = jax.typeof(head_args[0]).sharding.spec
    if head_rows and isinstance(head_rows[0], str):
      vocab_axis = head_rows[0]

  token_axes = tuple(a for a in mesh.axis_names if a != vocab_axis and mesh.shape[a] > 1)
  vocab_axes = () if vocab_axis is None else (vocab_axis,)
  num_tokens = token_args[0].shape[0]
  token_shards = int(np.prod([mesh.shape[a] for a in token_axes]))
  padded = common.round_up(num_tokens, token_shards)
  token_args = tuple(common.pad_axis(x, padded) for x in token_args)
  if targets is not None:
    targets = common.pad_axis(targets, padded)
  vocab_size = head_args[0].shape[0]
  num_vocab_shards = mesh.shape[vocab_axis] if vocab_axis else 1
  shard_vocab = vocab_size // num_vocab_shards
  branches, branch_of_shard = _shard_branches(num_vocab_shards, shard_vocab, valid_vocab)

  def per_device(token_args, head_args, targets):
    token_args = tuple(_widen_reduction(x, vocab_axes) for x in token_args)
    head_args = tuple(None if x is None else _widen_reduction(x, token_axes) for x in head_args)
    if not vocab_axes:
      return stats_fn(token_args, head_args, targets, valid_vocab)
    shard = lax.axis_index(vocab_axis)
    if targets is not None:
      targets = targets - shard * shard_vocab

    def branch(valid):
      if valid == 0:  # a shard made only of vocabulary padding
        return lambda *args: jax.tree.map(
          lambda x: lax.pcast(x, token_axes + vocab_axes, to="varying"),
          empty_stats(args[0][0].shape[0]),
        )
      return lambda t, h, y: stats_fn(t, h, y, valid)

    if len(branches) == 1:
      stats = branch(branches[0])(token_args, head_args, targets)
    else:
      stats = lax.switch(
        branch_of_shard[shard], [branch(v) for v in branches], token_args, head_args, targets
      )
    return psum_stats(stats, vocab_axis)

  tokens = PartitionSpec(token_axes or None)
  specs = (
    tuple(PartitionSpec(token_axes or None, None) for _ in token_args),
    tuple(None if x is None else PartitionSpec(vocab_axis, *([None] * (x.ndim - 1)))
          for x in head_args),
    None if targets is None else tokens,
  )
  args = jax.tree.map(
    lambda x, spec: _place(x, mesh, spec), (token_args, head_args, targets), specs,
    is_leaf=lambda x: x is None,
  )
  stats = jax.shard_map(
    per_device, mesh=mesh, in_specs=specs, out_specs=tokens, check_vma=not interpret
  )(*args)
  if padded == num_tokens:
    return stats
  # An uneven slice of a sharded axis is not allowed; the [N]-sized results are cheap to gather.
  return jax.tree.map(lambda x: _place(x, mesh, PartitionSpec())[:num_tokens], stats)


# ------------------------------------------------------------------------------------------------
# Public API.


def token_logprobs(
  hidden: Float[Array, "*b d"],
  head: LMHead | Float[Array, "V d"],
  targets: Int[Array, "*b"],
  *,
  mask: Bool[Array, "*b"] | None = None,
  bias: Float[Array, "V"] | None = None,
  temperature: float = 1.0,
  softcap: float | None = None,
  logit_scale: float = 1.0,
  valid_vocab: int | None = None,
  impl: str = "auto",
  mesh: Mesh | None = None,
  vocab_axis: str | None = None,
  **impl_options,
) -> TokenLogprobs:
  """log π(y_t | context) = z_{y_t} − log Σ_j exp z_j, with z = cap(s · h Wᵀ + b) / T, fused.

  The logits never exist as a [tokens, V] array (except with ``impl="reference"``): the statistics
  are accumulated over vocabulary blocks with an online log-sum-exp in fp32, and the backward pass
  recomputes them block by block. ``softcap`` is Gemma 2's final-logit soft-capping
  c · tanh(z / c); the temperature divides the capped logits, as samplers do. The same pass gives
  the entropy H = lse − Σ_j π_j z_j, the log-partition lse, and whether the target is a top-1
  token (z_target ≥ the running max the log-sum-exp keeps), i.e. per-token accuracy.

  Args:
    hidden: final hidden states [*b, d] (any leading dims, e.g. [B, T, d]).
    head: the model's ``LMHead`` (``model.get_lm_head()``: weight, bias, softcap and logit scale in
      one), or a bare LM-head / unembedding matrix [V, d] (the embedding table for tied embeddings)
      whose bias and transform are then the keywords below.
    targets: target token ids [*b] (``alignax.next_token_targets`` makes them from ``input_ids``). An
      unmasked id outside [0, V) (or [0, valid_vocab)) raises ValueError naming its index when the
      call is eager; under jit it gives logp = −lse.
    mask: boolean loss mask [*b]; False tokens give 0 (and zero gradient), their hidden rows are not
      used.
    bias: LM-head bias [V], optional (bare-matrix heads only).
    temperature: T > 0 (the sampling temperature whose policy is scored).
    softcap: c > 0 or None (bare-matrix heads only).
    logit_scale: s, multiplies h Wᵀ before the bias (bare-matrix heads only).
    valid_vocab: rows >= this of a padded head are excluded from the softmax.
    impl: ``"auto"`` (the Pallas kernel on backends where it is validated, see
      ``PALLAS_VALIDATED_BACKENDS``; chunked elsewhere), ``"pallas"``, ``"chunked"`` or
      ``"reference"`` (materialises the logits).
    mesh: run under ``jax.shard_map`` on this mesh: tokens split over its axes other than
      ``vocab_axis`` (padded to a multiple of their size). The outputs live on this mesh.
    vocab_axis: mesh axis over which the head's rows are split (V must divide evenly).
    **impl_options: forwarded to the implementation (e.g. ``token_block``, ``vocab_block`` for
      chunked; ``interpret=True`` for pallas on CPU).

  Returns:
    ``TokenLogprobs(logp, entropy, lse, target_is_top1)``: three fp32 [*b], 0 on masked tokens, and
    a bool [*b], False on masked tokens.
  """
  lm_head, bias, softcap, logit_scale = _unpack_head(
    head, name="head", bias=bias, softcap=softcap, logit_scale=logit_scale
  )
  _check_head(hidden, lm_head, bias, hidden_name="hidden", head_name="head", bias_name="bias")
  batch_shape = tuple(hidden.shape[:-1])
  _check_tokens("targets", targets, batch_shape, "hidden")
  _check_tokens("mask", mask, batch_shape, "hidden")
  if not jnp.issubdtype(targets.dtype, jnp.integer):
    raise TypeError(f"targets must be an integer array, got dtype {targets.dtype}")
  _check_options(
    temperature=temperature, softcap=softcap, logit_scale=logit_scale, valid_vocab=valid_vocab,
    vocab_size=lm_head.shape[0], mask=mask,
  )
  _check_mesh(mesh, vocab_axis, lm_head.shape[0])
  num_valid = lm_head.shape[0] if valid_vocab is None else valid_vocab
  _check_targets_in_range(targets, mask, num_valid)
  kernel = implementation(impl)

  hidden = hidden.reshape(-1, hidden.shape[-1])
  targets = targets.reshape(-1).astype(jnp.int32)
  if mask is not None:
    mask = mask.reshape(-1)
    hidden = jnp.where(mask[:, None], hidden, jnp.zeros((), hidden.dtype))

  def stats_fn(token_args, head_args, targets, valid):
    return kernel.vocab_stats(
      token_args[0], head_args[0], targets, bias=head_args[1], temperature=temperature,
      softcap=softcap, logit_scale=logit_scale, valid_vocab=valid, **impl_options,
    )

  def empty_stats(n):
    return VocabStats(jnp.full((n,), -jnp.inf), jnp.zeros((n,)), jnp.zeros((n,)),
                      jnp.full((n,), -jnp.inf))

  stats = _run(
    stats_fn, empty_stats, common.psum_vocab_stats, (hidden,), (lm_head, bias), targets,
    mesh=mesh, vocab_axis=vocab_axis, valid_vocab=valid_vocab,
    interpret=impl_options.get("interpret", False),
  )

  def finish(x):
    if mask is not None:
      x = jnp.where(mask, x, jnp.zeros((), x.dtype))
    return x.reshape(batch_shape)

  # An out-of-range target (possible under jit) has target_logit 0, which must not count as a hit.
  in_range = (targets >= 0) & (targets < num_valid)
  return TokenLogprobs(
    finish(stats.target_logit - stats.lse),
    finish(stats.lse - stats.expected_logit),
    finish(stats.lse),
    finish(in_range & (stats.target_logit >= stats.max_logit)),
  )


def token_kl(
  hidden_p: Float[Array, "*b d"],
  head_p: LMHead | Float[Array, "V d"],
  hidden_q: Float[Array, "*b dq"],
  head_q: LMHead | Float[Array, "V dq"],
  *,
  mask: Bool[Array, "*b"] | None = None,
  bias_p: Float[Array, "V"] | None = None,
  bias_q: Float[Array, "V"] | None = None,
  temperature: float = 1.0,
  softcap: float | None = None,
  logit_scale: float = 1.0,
  valid_vocab: int | None = None,
  impl: str = "auto",
  mesh: Mesh | None = None,
  vocab_axis: str | None = None,
  **impl_options,
) -> Float[Array, "*b"]:
  """Exact per-token KL(π‖π_ref) = Σ_j π_j (log π_j − log π_ref,j) over the full vocabulary, fused.

  Computed as Σ_j π_j (z_j − z^ref_j) − lse + lse_ref with both heads' logits recomputed block by
  block (never [tokens, V]). This is the exact KL whose single-sample estimators are k1/k2/k3
  (Schulman 2020); it is differentiable w.r.t. the policy side only (the reference side is
  stop-gradient). Both heads use the same logit transform (see ``token_logprobs``).

  Args:
    hidden_p: policy hidden states [*b, d].
    head_p: policy LM head, an ``LMHead`` or a bare [V, d] matrix.
    hidden_q: reference-policy hidden states [*b, dq].
    head_q: reference-policy LM head, an ``LMHead`` or a bare [V, dq] matrix. Two ``LMHead``s must
      share softcap and logit scale (one logit transform applies to both).
    mask: boolean [*b]; False tokens give 0 and zero gradient.
    bias_p, bias_q: LM-head biases [V], optional (bare-matrix heads only).
    temperature, softcap, logit_scale, valid_vocab, impl, mesh, vocab_axis, **impl_options: as in
      ``token_logprobs``.

  Returns:
    fp32 KL [*b].
  """
  transforms = {name: (h.softcap, h.logit_scale) for name, h in (("head_p", head_p),
                ("head_q", head_q)) if isinstance(h, LMHead)}
  if len(set(transforms.values())) > 1:
    raise ValueError(f"head_p and head_q use different (softcap, logit_scale): {transforms}")
  # One logit transform serves both sides: an LMHead's own, or the keywords for bare matrices.
  head_p, bias_p, softcap_p, scale_p = _unpack_head(
    head_p, name="head_p", bias=bias_p, softcap=softcap, logit_scale=logit_scale
  )
  head_q, bias_q, softcap_q, scale_q = _unpack_head(
    head_q, name="head_q", bias=bias_q, softcap=softcap, logit_scale=logit_scale
  )
  softcap, logit_scale = (softcap_p, scale_p) if "head_p" in transforms else (softcap_q, scale_q)
  _check_head(hidden_p, head_p, bias_p, hidden_name="hidden_p", head_name="head_p",
              bias_name="bias_p")
  _check_head(hidden_q, head_q, bias_q, hidden_name="hidden_q", head_name="head_q",
              bias_name="bias_q")
  batch_shape = tuple(hidden_p.shape[:-1])
  if tuple(hidden_q.shape[:-1]) != batch_shape:
    raise ValueError(
      f"hidden_q must have leading dims {list(batch_shape)} (those of hidden_p), "
      f"got shape {list(hidden_q.shape)}"
    )
  _check_tokens("mask", mask, batch_shape, "hidden_p")
  if head_q.shape[0] != head_p.shape[0]:
    raise ValueError(f"head_q has {head_q.shape[0]} rows but head_p has {head_p.shape[0]}")
  _check_options(
    temperature=temperature, softcap=softcap, logit_scale=logit_scale, valid_vocab=valid_vocab,
    vocab_size=head_p.shape[0], mask=mask,
  )
  _check_mesh(mesh, vocab_axis, head_p.shape[0])
  kernel = implementation(impl)

  hidden_p = hidden_p.reshape(-1, hidden_p.shape[-1])
  hidden_q = lax.stop_gradient(hidden_q.reshape(-1, hidden_q.shape[-1]))
  head_q, bias_q = lax.stop_gradient((head_q, bias_q))
  if mask is not None:
    mask = mask.reshape(-1)
    hidden_p = jnp.where(mask[:, None], hidden_p, jnp.zeros((), hidden_p.dtype))
    hidden_q = jnp.where(mask[:, None], hidden_q, jnp.zeros((), hidden_q.dtype))

  def stats_fn(token_args, head_args, targets, valid):
    del targets
    return kernel.kl_stats(
      token_args[0], head_args[0], token_args[1], head_args[2], bias_p=head_args[1],
      bias_q=head_args[3], temperature=temperature, softcap=softcap, logit_scale=logit_scale,
      valid_vocab=valid, **impl_options,
    )

  def empty_stats(n):
    return KLStats(jnp.full((n,), -jnp.inf), jnp.full((n,), -jnp.inf), jnp.zeros((n,)))

  stats = _run(
    stats_fn, empty_stats, common.psum_kl_stats, (hidden_p, hidden_q),
    (head_p, bias_p, head_q, bias_q), None, mesh=mesh, vocab_axis=vocab_axis,
    valid_vocab=valid_vocab, interpret=impl_options.get("interpret", False),
  )
  kl = stats.expected_diff - stats.lse_p + stats.lse_q
  if mask is not None:
    kl = jnp.where(mask, kl, 0.0)
  return kl.reshape(batch_shape)
