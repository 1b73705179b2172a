"""Pallas kernels (interpret mode on CPU) against the materialising reference, plus lowering checks.

Both schedules are exercised: "mosaic_tpu" (backward reductions over a sequential grid axis) and
"triton" (reductions looping inside each program), with N, V and d that are not multiples of the
blocks so that every padded tail is covered.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignax.kernels import pallas as kp
from alignax.kernels import reference
from alignax.kernels import token_logprobs

N, D, V = 37, 24, 203  # none a multiple of the blocks below
BLOCKS = {"block_n": 16, "block_v": 64, "block_k": 16}
ALL_OPTIONS = {
  "temperature": 0.7, "softcap": 5.0, "logit_scale": 1.3, "vocab_offset": 10, "valid_vocab": 190,
}


def _inputs(key, *, scale=1.0, dtype=jnp.float32):
  k = jax.random.split(key, 5)
  hidden = (scale * jax.random.normal(k[0], (N, D))).astype(dtype)
  weight = (0.5 * jax.random.normal(k[1], (V, D))).astype(dtype)
  bias = jax.random.normal(k[2], (V,))
  # Some targets fall before / after the slice [10, 213) or into its vocabulary padding.
  targets = jax.random.randint(k[3], (N,), 0, V + 20)
  cotangent = jax.random.normal(k[4], (3, N))
  return hidden, weight, bias, targets, cotangent


def _value_and_grads(stats_fn, cotangent, *args):
  """Stats and the gradient of Σ_k ⟨cotangent_k, stats_k⟩ w.r.t. every argument."""
  def loss(*args):
    return sum(jnp.sum(c * s) for c, s in zip(cotangent, stats_fn(*args)))

  return stats_fn(*args), jax.grad(loss, argnums=tuple(range(len(args))))(*args)


def _assert_close(actual, expected, rtol, names):
  for name, a, e in zip(names, actual, expected):
    a, e = np.asarray(a, np.float32), np.asarray(e, np.float32)
    assert np.all(np.isfinite(a)), name
    scale = max(np.max(np.abs(e)), 1.0)
    err = np.max(np.abs(a - e)) / scale
    assert err <= rtol, f"{name}: max |error| / max |expected| = {err:.2e} > {rtol:.0e}"


@pytest.mark.parametrize(
  "backend, options",
  [("mosaic_tpu", {}), ("mosaic_tpu", ALL_OPTIONS), ("triton", ALL_OPTIONS)],
  ids=["grid-plain", "grid-all-options", "loop-all-options"],
)
def test_vocab_stats_fp32_matches_reference(key, backend, options):
  hidden, weight, bias, targets, cotangent = _inputs(key)
  with_bias = bias if options else None

  def pallas(h, w, b):
    return kp.vocab_stats(
      h, w, targets, bias=b, interpret=True, backend=backend, **BLOCKS, **options
    )

  def ref(h, w, b):
    return reference.vocab_stats(h, w, targets, bias=b, **options)

  args = (hidden, weight) if with_bias is None else (hidden, weight, with_bias)
  wrap = (lambda f: lambda h, w: f(h, w, None)) if with_bias is None else (lambda f: f)
  stats, grads = jax.jit(lambda *a: _value_and_grads(wrap(pallas), cotangent, *a))(*args)
  ref_stats, ref_grads = _value_and_grads(wrap(ref), cotangent, *args)
  _assert_close(stats, ref_stats, 1e-5, ["lse", "target_logit", "expected_logit", "max_logit"])
  _assert_close(grads, ref_grads, 1e-5, ["d_hidden", "d_weight", "d_bias"])


def test_vocab_stats_bf16_within_bf16_tolerance_of_fp32(key):
  hidden, weight, bias, targets, cotangent = _inputs(key, dtype=jnp.bfloat16)
  options = {"temperature": 0.7, "softcap": 5.0}

  def pallas(h, w, b):
    return kp.vocab_stats(h, w, targets, bias=b, interpret=True, **BLOCKS, **options)

  def ref(h, w, b):  # fp32 oracle on the same (bf16-representable) numbers
    return reference.vocab_stats(
      h.astype(jnp.float32), w.astype(jnp.float32), targets, bias=b, **options
    )

  stats, grads = jax.jit(lambda *a: _value_and_grads(pallas, cotangent, *a))(hidden, weight, bias)
  ref_stats, ref_grads = _value_and_grads(ref, cotangent, hidden, weight, bias)
  assert grads[0].dtype == jnp.bfloat16 and grads[1].dtype == jnp.bfloat16
  # Statistics accumulate in fp32 from exact bf16 products; gradients round dz to bf16 once for
  # the dX / dW dots (about 2^-8 relative).
  _assert_close(stats, ref_stats, 1e-5, ["lse", "target_logit", "expected_logit", "max_logit"])
  _assert_close(grads, ref_grads, 2e-2, ["d_hidden", "d_weight", "d_bias"])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", ["mosaic_tpu", "triton"])
def test_target_is_top1_equals_argmax_of_materialised_logits(key, backend, dtype):
  hidden, weight, bias, _, _ = _inputs(key, dtype=dtype)
  options = {"temperature": 0.7, "softcap": 5.0, "valid_vocab": 190}
  # The oracle: argmax of the materialised fp32 logits (exact bf16 products) over valid columns.
  z = np.asarray(reference._logits(
    hidden.astype(jnp.float32), weight.astype(jnp.float32), bias, temperature=0.7, softcap=5.0,
    logit_scale=1.0, vocab_offset=0, valid_vocab=190)[0])
  top2 = np.sort(z, -1)[:, -2:]
  assert np.min(top2[:, 1] - top2[:, 0]) > 1e-4  # no near-tie to order differently
  # In turn the argmax (a hit), the runner-up (the closest miss) and a random id.
  targets = np.random.default_rng(0).integers(0, 190, N)
  ranked = np.argsort(z, -1)
  targets[0::3], targets[1::3] = ranked[0::3, -1], ranked[1::3, -2]
  mask = np.arange(N) % 5 != 2
  want = (np.argmax(z, -1) == targets) & mask
  out = jax.jit(lambda h, w, b: token_logprobs(
    h, w, jnp.asarray(targets), mask=jnp.asarray(mask), bias=b, impl="pallas", interpret=True,
    backend=backend, **BLOCKS, **options))(hidden, weight, bias)
  np.testing.assert_array_equal(out.target_is_top1, want)
  assert 0 < want.sum() < mask.sum()


def test_target_is_top1_counts_ties_across_tiles_as_hits():
  # Head rows 3 and 100 are equal and dominate (hidden > 0): both are top-1 for every token, in
  # different 64-column tiles; a target elsewhere is a miss.
  rng = np.random.default_rng(1)
  hidden = jnp.asarray(np.abs(rng.normal(size=(5, D))) + 0.1, jnp.float32)
  weight = rng.normal(size=(V, D)) * 0.01
  weight[3] = weight[100] = 1.0
  targets = jnp.asarray([3, 100, 7, 100, 3])
  out = jax.jit(lambda h, w: token_logprobs(h, w, targets, impl="pallas", interpret=True,
                                            **BLOCKS))(hidden, jnp.asarray(weight, jnp.float32))
  np.testing.assert_array_equal(out.target_is_top1, [True, True, False, True, True])


@pytest.mark.parametrize("backend", ["mosaic_tpu", "triton"])
def test_kl_stats_matches_reference(key, backend):
  hidden_p, weight_p, bias_p, _, cotangent = _inputs(key)
  hidden_q, weight_q, bias_q, _, _ = _inputs(jax.random.fold_in(key, 1))
  hidden_q = hidden_q[:, : D - 5]  # a reference model of another width
  weight_q = weight_q[:, : D - 5]

  def pallas(hp, wp, bp, hq, wq):
    return kp.kl_stats(
      hp, wp, hq, wq, bias_p=bp, bias_q=bias_q, interpret=True, backend=backend, **BLOCKS,
      **ALL_OPTIONS,
    )

  def ref(hp, wp, bp, hq, wq):
    return reference.kl_stats(hp, wp, hq, wq, bias_p=bp, bias_q=bias_q, **ALL_OPTIONS)

  args = (hidden_p, weight_p, bias_p, hidden_q, weight_q)
  stats, grads = jax.jit(lambda *a: _value_and_grads(pallas, cotangent, *a))(*args)
  ref_stats, ref_grads = _value_and_grads(ref, cotangent, *args)
  _assert_close(stats, ref_stats, 1e-5, ["lse_p", "lse_q", "expected_diff"])
  _assert_close(grads[:3], ref_grads[:3], 1e-5, ["d_hidden_p", "d_weight_p", "d_bias_p"])
  # The reference model is stop-gradient.
  assert not np.any(grads[3]) and not np.any(grads[4])


@pytest.mark.parametrize("softcap", [None, 30.0])
def test_extreme_logits_stay_finite(key, softcap):
  # |h Wᵀ| reaches ~1e4 before soft-capping.
  hidden, weight, _, targets, cotangent = _inputs(key, scale=2000.0)
  assert float(jnp.max(jnp.abs(hidden @ weight.T))) > 1e4

  def pallas(h, w):
    return kp.vocab_stats(h, w, targets, softcap=softcap, interpret=True, **BLOCKS)

  def ref(h, w):
    return reference.vocab_stats(h, w, targets, softcap=softcap)

  stats, grads = jax.jit(lambda *a: _value_and_grads(pallas, cotangent, *a))(hidden, weight)
  ref_stats, ref_grads = _value_and_grads(ref, cotangent, hidden, weight)
  _assert_close(stats, ref_stats, 1e-5, ["lse", "target_logit", "expected_logit"])
  # The fp32 rounding of a 1e4-sized dot (~1e-3 absolute) differs between summation orders (block_k
  # chunks vs one einsum) and p = e^{z − lse} turns it into a ~1e-3 relative change of the gradient.
  _assert_close(grads, ref_grads, 1e-3, ["d_hidden", "d_weight"])


@pytest.mark.parametrize("backend", ["mosaic_tpu", "triton"])
def test_padding_rows_stay_finite_with_a_large_bias(key, backend):
  # Token rows that only pad N to the block have zero hidden states, so their logits are b / T;
  # e^{b / T} overflows fp32, and the backward pass must not turn that into inf · 0 = NaN.
  hidden, weight, bias, targets, cotangent = _inputs(key)
  bias = bias + 100.0

  def pallas(h, w, b):
    return kp.vocab_stats(h, w, targets, bias=b, temperature=0.9, interpret=True, backend=backend,
                          **BLOCKS)

  def ref(h, w, b):
    return reference.vocab_stats(h, w, targets, bias=b, temperature=0.9)

  stats, grads = jax.jit(lambda *a: _value_and_grads(pallas, cotangent, *a))(hidden, weight, bias)
  ref_stats, ref_grads = _value_and_grads(ref, cotangent, hidden, weight, bias)
  _assert_close(stats, ref_stats, 1e-5, ["lse", "target_logit", "expected_logit"])
  # Logits near 100 round at ~1e-5 relative in fp32, and p = e^{z − lse} inherits that.
  _assert_close(grads, ref_grads, 1e-4, ["d_hidden", "d_weight", "d_bias"])


def test_sharded_tokens_and_vocabulary_in_interpret_mode():
  # Tokens over `data`, vocabulary over `tensor` (the last shard all padding), run by the Pallas
  # interpreter inside jax.shard_map, against the unsharded reference.
  mesh = jax.make_mesh((2, 4), ("data", "tensor"))
  hidden, weight, bias, targets, cotangent = _inputs(jax.random.key(3))
  hidden, weight, bias = hidden[:15], weight[:64], bias[:64]
  targets = targets[:15] % 40
  mask = jnp.arange(15) % 4 != 1

  def loss(h, w, b, **options):
    out = token_logprobs(h, w, targets, mask=mask, bias=b, valid_vocab=40,
                         softcap=5.0, **options)
    return jnp.sum(cotangent[0, :15] * out.logp + cotangent[1, :15] * out.entropy)

  args = (hidden, weight, bias)
  sharded = dict(impl="pallas", interpret=True, mesh=mesh, vocab_axis="tensor", block_n=4,
                 block_v=8)
  got = jax.jit(jax.value_and_grad(lambda *a: loss(*a, **sharded), (0, 1, 2)))(*args)
  want = jax.value_and_grad(lambda *a: loss(*a, impl="reference"), (0, 1, 2))(*args)
  _assert_close(jax.tree.leaves(got), jax.tree.leaves(want), 1e-5,
                ["loss", "d_hidden", "d_weight", "d_bias"])
  # Per-token accuracy: the shards' maxima combine (pmax) before the target logit is compared.
  top1 = lambda targets, **options: token_logprobs(  # noqa: E731
    hidden, weight, targets, mask=mask, bias=bias, valid_vocab=40, softcap=5.0,
    **options).target_is_top1
  ranked = jnp.argsort(reference._logits(hidden, weight, bias, temperature=1.0, softcap=5.0,
                                         logit_scale=1.0, vocab_offset=0, valid_vocab=40)[0], -1)
  turn = jnp.arange(15) % 3  # in turn the argmax, the runner-up and a random id
  hits = jnp.where(turn == 0, ranked[:, -1], jnp.where(turn == 1, ranked[:, -2], targets))
  want_top1 = top1(hits, impl="reference")
  assert np.any(want_top1) and not np.all(want_top1)
  np.testing.assert_array_equal(jax.jit(lambda t: top1(t, **sharded))(hits), want_top1)


def test_frozen_head_skips_the_weight_kernel(key):
  hidden, weight, _, targets, _ = _inputs(key)

  def loss(h, w):
    return jnp.sum(kp.vocab_stats(h, w, targets, interpret=True, **BLOCKS).lse)

  def kernels_in(argnums):
    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=argnums))(hidden, weight)
    return str(jaxpr).count("pallas_call[")

  # Forward, dX and dW kernels when both are differentiated; no dW kernel for a frozen head.
  assert kernels_in((0, 1)) == 3
  assert kernels_in(0) == 2


def test_token_logprobs_with_fully_masked_rows(key):
  hidden, weight, _, targets, cotangent = _inputs(key)
  targets = targets % V
  mask = jnp.arange(N) % 3 != 0  # every third token masked out entirely
  hidden = hidden.at[0].set(jnp.nan)  # a masked row's content must never be read

  def loss(impl, **options):
    def fn(h, w):
      out = token_logprobs(h, w, targets, mask=mask, impl=impl, **options)
      return jnp.sum(cotangent[0] * out.logp + cotangent[1] * out.entropy), out
    return jax.value_and_grad(fn, argnums=(0, 1), has_aux=True)

  (_, out), grads = jax.jit(loss("pallas", interpret=True, **BLOCKS))(hidden, weight)
  (_, ref_out), ref_grads = loss("reference")(hidden, weight)
  _assert_close([out.logp, out.entropy], [ref_out.logp, ref_out.entropy], 1e-5, ["logp", "entropy"])
  _assert_close(grads, ref_grads, 1e-5, ["d_hidden", "d_weight"])
  assert not np.any(out.logp[~mask]) and not np.any(grads[0][~mask])


@pytest.mark.parametrize("backend, platform, custom_call", [
  ("mosaic_tpu", "tpu", "tpu_custom_call"), ("triton", "cuda", "__gpu$xla.gpu.triton"),
])
def test_kernels_lower_for_accelerators(backend, platform, custom_call):
  # Lowered (not compiled) from this CPU-only jaxlib: Mosaic / Triton IR is built and embedded.
  hidden = jax.ShapeDtypeStruct((300, 256), jnp.bfloat16)
  weight = jax.ShapeDtypeStruct((1000, 256), jnp.bfloat16)
  bias = jax.ShapeDtypeStruct((1000,), jnp.float32)
  targets = jax.ShapeDtypeStruct((300,), jnp.int32)
  options = {"backend": backend, "softcap": 30.0, "temperature": 0.7, "valid_vocab": 990}

  def loss(h, w, b, y):
    vocab = kp.vocab_stats(h, w, y, bias=b, **options)
    kl = kp.kl_stats(h, w, h, w, bias_p=b, **options)
    return sum(jnp.sum(x) for x in (*vocab, *kl))

  exported = jax.export.export(
    jax.jit(jax.grad(loss, argnums=(0, 1, 2))), platforms=[platform],
    disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(custom_call)],
  )(hidden, weight, bias, targets)
  # Per function: a forward kernel, then the dX and dW kernels of the backward pass.
  assert exported.mlir_module().count(f"@{custom_call}") == 6


@pytest.mark.parametrize("backend, platform, custom_call", [
  ("mosaic_tpu", "tpu", "tpu_custom_call"), ("triton", "cuda", "__gpu$xla.gpu.triton"),
])
def test_kernels_lower_inside_shard_map(backend, platform, custom_call):
  # Tokens over `data`, vocabulary over `tensor`: the kernels run per shard under jax.shard_map,
  # whose varying-axes check the kernel outputs must satisfy.
  mesh = jax.make_mesh((4, 2), ("data", "tensor"))
  hidden = jax.ShapeDtypeStruct((8, 64, 256), jnp.bfloat16)
  head = jax.ShapeDtypeStruct((1024, 256), jnp.bfloat16)
  targets = jax.ShapeDtypeStruct((8, 64), jnp.int32)

  def loss(h, w, y):
    out = token_logprobs(
      h, w, y, impl="pallas", mesh=mesh, vocab_axis="tensor", backend=backend
    )
    return jnp.sum(out.logp) + jnp.sum(out.entropy)

  exported = jax.export.export(
    jax.jit(jax.grad(loss, argnums=(0, 1))), platforms=[platform],
    disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(custom_call)],
  )(hidden, head, targets)
  assert exported.mlir_module().count(f"@{custom_call}") == 3


def test_bad_arguments_are_named(key):
  hidden, weight, _, targets, _ = _inputs(key)
  with pytest.raises(ValueError, match="interpret=True"):
    kp.vocab_stats(hidden, weight, targets)
  with pytest.raises(ValueError, match="backend"):
    kp.vocab_stats(hidden, weight, targets, interpret=True, backend="cuda")
  with pytest.raises(ValueError, match="block_v must be a power of 2"):
    kp.vocab_stats(hidden, weight, targets, backend="triton", block_v=96)
  with pytest.raises(ValueError, match="temperature"):
    kp.vocab_stats(hidden, weight, targets, interpret=True, temperature=0.0)
  with pytest.raises(ValueError, match="block_n"):
    kp.vocab_stats(hidden, weight, targets, interpret=True, block_n=0)
