"""Fused LM-head kernels: reference vs chunked, the public API, masks, options, sharding, extremes.

The oracle is ``alignax.kernels.reference`` (materialised logits, plain autodiff), itself checked
against NumPy formulas written from the definitions. Pallas is tested in test_kernels_pallas.py.
"""

import functools

import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec
from jax.test_util import check_grads

import alignax
from alignax.kernels import api, chunked, common, reference
from alignax.kl import categorical_kl

N, D, V = 37, 16, 101  # neither N nor V is a multiple of the blocks below
BLOCKS = dict(token_block=8, vocab_block=16)


def _inputs(seed=0, n=N, d=D, v=V, scale=0.5):
  rng = np.random.default_rng(seed)
  return dict(
    hidden=jnp.asarray(rng.normal(size=(n, d)), jnp.float32),
    weight=jnp.asarray(rng.normal(size=(v, d)) * scale, jnp.float32),
    bias=jnp.asarray(rng.normal(size=(v,)), jnp.float32),
    targets=jnp.asarray(rng.integers(0, v, n), jnp.int32),
  )


def _numpy_logits(hidden, weight, bias=None, *, temperature=1.0, softcap=None, logit_scale=1.0,
                  valid_vocab=None):
  """z per the kernel contract, in float64 NumPy."""
  z = logit_scale * np.asarray(hidden, np.float64) @ np.asarray(weight, np.float64).T
  if bias is not None:
    z = z + np.asarray(bias, np.float64)
  if softcap is not None:
    z = softcap * np.tanh(z / softcap)
  z = z / temperature
  if valid_vocab is not None:
    z[:, valid_vocab:] = -np.inf
  return z


def _numpy_log_softmax(z):
  m = z.max(-1, keepdims=True)
  return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


def _assert_close(actual, expected, rel):
  """Max-abs error within ``rel`` times the largest reference magnitude (plus a tiny floor)."""
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  scale = max(np.abs(expected).max(), 1e-6)
  np.testing.assert_allclose(actual, expected, rtol=0, atol=rel * scale)


def _stats_loss(stats_fn, weights):
  """A scalar mixing every output with distinct per-token weights, so every cotangent is tested."""

  def loss(hidden, weight, bias, targets, **options):
    stats = stats_fn(hidden, weight, targets, bias=bias, **options)
    return sum(jnp.sum(w * s) for w, s in zip(weights, stats))

  return loss


OPTION_SETS = {
  "plain": dict(),
  "transform": dict(temperature=0.7, softcap=3.0, logit_scale=1.3),
  "padding": dict(valid_vocab=90, vocab_offset=0, temperature=1.5),
  "slice": dict(vocab_offset=50, valid_vocab=120, softcap=5.0),  # targets partly outside
}


# ------------------------------------------------------------------------------------------------
# The oracle against NumPy.


def test_reference_matches_numpy_definitions():
  x = _inputs()
  opts = dict(temperature=0.7, softcap=3.0, logit_scale=1.3, valid_vocab=90)
  stats = jax.jit(functools.partial(reference.vocab_stats, **opts))(
    x["hidden"], x["weight"], x["targets"], bias=x["bias"]
  )
  z = _numpy_logits(x["hidden"], x["weight"], x["bias"], **opts)
  log_p = _numpy_log_softmax(z)
  p = np.exp(log_p)
  lse = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
  with np.errstate(invalid="ignore"):  # 0 · (−inf) on padded columns, discarded by the where
    entropy = -np.sum(np.where(p > 0, p * log_p, 0.0), -1)
  target = np.take_along_axis(z, np.asarray(x["targets"])[:, None], -1)[:, 0]
  target = np.where(np.asarray(x["targets"]) < 90, target, 0.0)
  _assert_close(stats.lse, lse, 1e-6)
  _assert_close(stats.target_logit, target, 1e-6)
  _assert_close(stats.lse - stats.expected_logit, entropy, 1e-5)


def test_per_shard_stats_combine_to_the_whole_vocabulary():
  x = _inputs()
  stats = jax.jit(reference.vocab_stats, static_argnames=("vocab_offset", "valid_vocab"))
  whole = stats(x["hidden"], x["weight"], x["targets"], bias=x["bias"], valid_vocab=60)
  cuts = [0, 30, 64, V]
  shards = [
    stats(x["hidden"], x["weight"][a:b], x["targets"], bias=x["bias"][a:b], vocab_offset=a,
          valid_vocab=60)
    for a, b in zip(cuts[:-1], cuts[1:])
  ]
  assert np.all(np.isneginf(shards[-1].lse))  # the last shard is all padding
  combined = common.combine_vocab_stats(jax.tree.map(lambda *s: jnp.stack(s), *shards))
  for got, want in zip(combined, whole):
    _assert_close(got, want, 1e-6)


def test_combine_is_exact_for_large_logits():
  # Shards whose lse are near 1e4, where fp32 rounds lse itself by about 1e-3: the combined
  # expected logit must still be a convex combination of the shards' (float64 oracle below).
  rng = np.random.default_rng(3)
  lse = (1e4 + rng.normal(size=(4, 64))).astype(np.float32)
  expected = (lse - rng.uniform(0, 5, size=(4, 64))).astype(np.float32)
  target = np.zeros_like(lse)
  top = lse - 1.0
  combined = common.combine_vocab_stats(
    common.VocabStats(*map(jnp.asarray, (lse, target, expected, top))))
  lse64, expected64 = lse.astype(np.float64), expected.astype(np.float64)
  whole_lse = np.log(np.exp(lse64 - lse64.max(0)).sum(0)) + lse64.max(0)
  whole_expected = (np.exp(lse64 - whole_lse) * expected64).sum(0)
  np.testing.assert_allclose(combined.lse, whole_lse, rtol=0, atol=2e-3)
  np.testing.assert_allclose(combined.expected_logit, whole_expected, rtol=0, atol=5e-3)
  np.testing.assert_array_equal(combined.max_logit, top.max(0))


# ------------------------------------------------------------------------------------------------
# chunked against the reference.


@pytest.mark.parametrize("options", OPTION_SETS.values(), ids=OPTION_SETS.keys())
def test_chunked_matches_reference_values_and_gradients_fp32(options):
  x = _inputs()
  weights = [jnp.linspace(-1.0, 1.5, N), jnp.cos(jnp.arange(N)), jnp.linspace(0.5, -2.0, N)]
  args = (x["hidden"], x["weight"], x["bias"], x["targets"])
  ref_loss = functools.partial(_stats_loss(reference.vocab_stats, weights), **options)
  chk_loss = functools.partial(_stats_loss(chunked.vocab_stats, weights), **options, **BLOCKS)
  ref_stats = jax.jit(functools.partial(reference.vocab_stats, **options))(
    x["hidden"], x["weight"], x["targets"], bias=x["bias"]
  )
  chk_stats = jax.jit(functools.partial(chunked.vocab_stats, **options, **BLOCKS))(
    x["hidden"], x["weight"], x["targets"], bias=x["bias"]
  )
  for got, want in zip(chk_stats, ref_stats):
    _assert_close(got, want, 1e-5)
  ref_grads = jax.jit(jax.grad(ref_loss, (0, 1, 2)))(*args)
  chk_grads = jax.jit(jax.grad(chk_loss, (0, 1, 2)))(*args)
  for got, want in zip(chk_grads, ref_grads):
    _assert_close(got, want, 1e-5)


def test_chunked_bf16_inputs_within_bf16_tolerance_of_fp32_reference():
  x = _inputs(seed=1)
  bf16 = {k: v.astype(jnp.bfloat16) if k != "targets" else v for k, v in x.items()}
  as_fp32 = {k: v.astype(jnp.float32) if k != "targets" else v for k, v in bf16.items()}
  options = dict(temperature=0.8, softcap=4.0)
  weights = [jnp.ones(N), jnp.linspace(-1.0, 1.0, N), jnp.full((N,), 0.5)]
  args = lambda d: (d["hidden"], d["weight"], d["bias"], d["targets"])  # noqa: E731
  chk = jax.jit(functools.partial(chunked.vocab_stats, **options, **BLOCKS))(
    bf16["hidden"], bf16["weight"], bf16["targets"], bias=bf16["bias"]
  )
  ref = jax.jit(functools.partial(reference.vocab_stats, **options))(
    as_fp32["hidden"], as_fp32["weight"], as_fp32["targets"], bias=as_fp32["bias"]
  )
  for got, want in zip(chk, ref):
    assert got.dtype == jnp.float32
    _assert_close(got, want, 1e-5)  # bf16 operands, fp32 products and accumulation
  chk_grads = jax.jit(jax.grad(
    functools.partial(_stats_loss(chunked.vocab_stats, weights), **options, **BLOCKS), (0, 1, 2)
  ))(*args(bf16))
  ref_grads = jax.jit(jax.grad(
    functools.partial(_stats_loss(reference.vocab_stats, weights), **options), (0, 1, 2)
  ))(*args(as_fp32))
  for got, want, arg in zip(chk_grads, ref_grads, args(bf16)):
    assert got.dtype == arg.dtype
    _assert_close(got, want, 4e-3)  # the fp32 gradient is rounded to bf16 once (2^-8)


def test_chunked_check_grads():
  x = _inputs(n=9, d=4, v=11)
  # check_grads perturbs with NumPy arrays; the kernels take jax arrays. max_logit is
  # stop-gradient by contract, so only the three differentiable statistics are checked.
  fn = lambda h, w, b: chunked.vocab_stats(  # noqa: E731
    jnp.asarray(h), jnp.asarray(w), x["targets"], bias=jnp.asarray(b), softcap=2.0,
    temperature=0.9, token_block=4, vocab_block=4,
  )[:3]
  check_grads(fn, (x["hidden"], x["weight"], x["bias"]), order=1, modes=["rev"], eps=1e-2,
              atol=2e-2, rtol=2e-2)


def test_kl_stats_chunked_matches_reference_and_numpy():
  p, q = _inputs(seed=2), _inputs(seed=3, d=8)
  options = dict(temperature=0.9, softcap=6.0, valid_vocab=95)
  kl_of = lambda s: s.expected_diff - s.lse_p + s.lse_q  # noqa: E731
  ref = reference.kl_stats(p["hidden"], p["weight"], q["hidden"], q["weight"], bias_p=p["bias"],
                           bias_q=q["bias"], **options)
  chk = chunked.kl_stats(p["hidden"], p["weight"], q["hidden"], q["weight"], bias_p=p["bias"],
                         bias_q=q["bias"], **options, **BLOCKS)
  for got, want in zip(chk, ref):
    _assert_close(got, want, 1e-5)
  log_p = _numpy_log_softmax(_numpy_logits(p["hidden"], p["weight"], p["bias"], **options))
  log_q = _numpy_log_softmax(_numpy_logits(q["hidden"], q["weight"], q["bias"], **options))
  with np.errstate(invalid="ignore"):  # −inf − (−inf) on padded columns, discarded by the where
    naive = np.sum(np.where(np.isfinite(log_p), np.exp(log_p) * (log_p - log_q), 0.0), -1)
  _assert_close(kl_of(chk), naive, 1e-5)

  def loss(fn, extra, h, w, b):
    stats = fn(h, w, q["hidden"], q["weight"], bias_p=b, bias_q=q["bias"], **options, **extra)
    return jnp.sum(jnp.linspace(-1.0, 2.0, N) * kl_of(stats) + jnp.sin(stats.lse_p))

  args = (p["hidden"], p["weight"], p["bias"])
  ref_grads = jax.jit(jax.grad(functools.partial(loss, reference.kl_stats, {}), (0, 1, 2)))(*args)
  chk_grads = jax.jit(jax.grad(functools.partial(loss, chunked.kl_stats, BLOCKS), (0, 1, 2)))(*args)
  for got, want in zip(chk_grads, ref_grads):
    _assert_close(got, want, 1e-5)


def test_token_kl_matches_categorical_kl():
  p, q = _inputs(seed=4), _inputs(seed=5)
  logits = lambda x: x["hidden"] @ x["weight"].T  # noqa: E731
  kl = api.token_kl(p["hidden"], p["weight"], q["hidden"], q["weight"], impl="chunked", **BLOCKS)
  _assert_close(kl, categorical_kl(logits(p), logits(q)), 1e-5)


# ------------------------------------------------------------------------------------------------
# The public API.


def test_token_logprobs_batched_masked_matches_numpy_and_slicing():
  x = _inputs(n=2 * 7)
  hidden, targets = x["hidden"].reshape(2, 7, D), x["targets"].reshape(2, 7)
  mask = jnp.asarray(np.random.default_rng(0).random((2, 7)) > 0.4)
  hidden = jnp.where(mask[..., None], hidden, jnp.nan)  # masked rows must never be read
  out = jax.jit(functools.partial(alignax.token_logprobs, impl="chunked", **BLOCKS))(hidden, x["weight"], targets,
                                                             mask=mask, bias=x["bias"])
  assert isinstance(out, alignax.TokenLogprobs) and out.logp.shape == (2, 7)
  log_p = _numpy_log_softmax(_numpy_logits(x["hidden"], x["weight"], x["bias"]))
  want_logp = np.take_along_axis(log_p, np.asarray(x["targets"])[:, None], -1)[:, 0]
  want_entropy = -np.sum(np.exp(log_p) * log_p, -1)
  flat_mask = np.asarray(mask).reshape(-1)
  _assert_close(out.logp.reshape(-1), np.where(flat_mask, want_logp, 0.0), 1e-5)
  _assert_close(out.entropy.reshape(-1), np.where(flat_mask, want_entropy, 0.0), 1e-5)
  assert np.all(np.asarray(out.lse)[~np.asarray(mask)] == 0)

  kept = api.token_logprobs(x["hidden"][flat_mask], x["weight"], x["targets"][flat_mask],
                            bias=x["bias"], impl="chunked", **BLOCKS).logp
  _assert_close(out.logp[mask], kept, 1e-6)

  grad = jax.jit(jax.grad(lambda h: jnp.sum(api.token_logprobs(h, x["weight"], targets, mask=mask,
                                                               impl="chunked", **BLOCKS).logp)))(hidden)
  assert np.all(np.isfinite(grad))
  assert np.all(np.asarray(grad)[~np.asarray(mask)] == 0)


def test_api_implementations_agree_and_auto_is_chunked_on_cpu():
  x = _inputs()
  assert api.implementation("auto") is chunked
  options = dict(bias=x["bias"], temperature=0.6, softcap=2.5, logit_scale=0.8, valid_vocab=99)
  targets = x["targets"] % 99
  ref = api.token_logprobs(x["hidden"], x["weight"], targets, impl="reference", **options)
  auto = api.token_logprobs(x["hidden"], x["weight"], targets, **options)
  for got, want in zip(auto, ref):
    _assert_close(got, want, 1e-5)


def test_api_dispatches_to_pallas_in_interpret_mode():
  x = _inputs(n=18, v=50)
  hidden, targets = x["hidden"].reshape(2, 9, D), x["targets"].reshape(2, 9)
  mask = jnp.arange(18).reshape(2, 9) % 3 != 0
  options = dict(mask=mask, softcap=3.0)

  def loss(h, w, **k):
    out = api.token_logprobs(h, w, targets, **options, **k)
    return jnp.sum(jnp.sin(out.logp) + out.entropy)

  want = jax.jit(jax.value_and_grad(functools.partial(loss, impl="reference"), (0, 1)))(
    hidden, x["weight"])
  got = jax.jit(jax.value_and_grad(functools.partial(loss, impl="pallas", interpret=True), (0, 1)))(
    hidden, x["weight"])
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    _assert_close(g, w, 1e-5)


def test_fully_masked_rows_and_extreme_logits_stay_finite():
  x = _inputs(n=8, v=40)
  hidden = x["hidden"] * 2e3  # logits of order ±1e4 before the soft-cap
  mask = jnp.asarray([True, False, True, True, False, True, True, True])
  for softcap in (None, 30.0):
    def loss(h, w, b):
      out = api.token_logprobs(h, w, x["targets"], mask=mask, bias=b, softcap=softcap,
                               impl="chunked", token_block=4, vocab_block=16)
      return jnp.sum(out.logp) + jnp.sum(out.entropy), out

    (value, out), grads = jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))(
      hidden, x["weight"], x["bias"]
    )
    ref = jax.jit(functools.partial(api.token_logprobs, mask=mask, softcap=softcap,
                                    impl="reference"))(hidden, x["weight"], x["targets"],
                                                       bias=x["bias"]).logp
    assert np.isfinite(value) and all(np.all(np.isfinite(g)) for g in grads)
    _assert_close(out.logp, ref, 1e-5)
    assert np.all(np.asarray(out.logp)[~np.asarray(mask)] == 0)

  none = jnp.zeros((8,), bool)
  grads = jax.jit(jax.grad(lambda h, w: jnp.sum(api.token_logprobs(
    h, w, x["targets"], mask=none, impl="chunked", token_block=4, vocab_block=16).logp), (0, 1)))(
    hidden, x["weight"]
  )
  assert all(np.all(np.asarray(g) == 0) for g in grads)


def test_out_of_range_targets_raise_eagerly_and_score_minus_lse_under_jit():
  x = _inputs(n=6, v=12)
  h, w = x["hidden"].reshape(2, 3, D), x["weight"]
  targets = (x["targets"] % 10).reshape(2, 3).at[1, 2].set(-100).at[0, 1].set(11)
  call = functools.partial(api.token_logprobs, impl="chunked")
  with pytest.raises(ValueError, match=r"targets\[0, 1\] = 12 is outside \[0, 12\)"):
    call(h, w, targets.at[0, 1].set(12))
  with pytest.raises(ValueError, match=r"targets\[0, 1\] = 11 is outside \[0, 11\)"):
    call(h, w, targets, valid_vocab=11, mask=targets >= 0)
  call(h, w, targets, valid_vocab=11, mask=(targets >= 0) & (targets < 11))  # masked out: fine
  # Traced targets cannot be inspected: an out-of-range id keeps the documented logp = −lse.
  out = jax.jit(call)(h, w, targets)
  np.testing.assert_allclose(out.logp[1, 2], -out.lse[1, 2], rtol=1e-6)


@pytest.mark.parametrize("impl", ["reference", "chunked", "pallas"])
def test_no_tokens_give_empty_outputs_and_zero_gradients(impl):
  w = _inputs(n=1, v=20)["weight"]
  h, t = jnp.zeros((2, 0, D)), jnp.zeros((2, 0), jnp.int32)
  options = {"chunked": BLOCKS, "pallas": dict(interpret=True), "reference": {}}[impl]

  def loss(h, w):
    out = api.token_logprobs(h, w, t, impl=impl, **options)
    kl = api.token_kl(h, w, h, w, impl=impl, **options)
    return jnp.sum(out.logp) + jnp.sum(out.entropy) + jnp.sum(kl), (out, kl)

  (_, (out, kl)), grads = jax.value_and_grad(loss, (0, 1), has_aux=True)(h, w)
  assert out.logp.shape == out.entropy.shape == kl.shape == (2, 0)
  assert grads[0].shape == h.shape and grads[1].shape == w.shape and not np.any(grads[1])


def test_tied_embeddings_gradient_flows_through_both_uses():
  x = _inputs(n=12)
  tokens = x["targets"][::-1]

  def loss(impl, table):
    hidden = jnp.tanh(table[tokens])  # the same table embeds the inputs and scores the outputs
    return jnp.sum(api.token_logprobs(hidden, table, x["targets"], impl=impl, **(
      BLOCKS if impl == "chunked" else {})).logp)

  table = x["weight"]
  _assert_close(jax.jit(jax.grad(functools.partial(loss, "chunked")))(table),
                jax.jit(jax.grad(functools.partial(loss, "reference")))(table), 1e-5)


def test_frozen_head_skips_the_weight_gradient_loop():
  h = jax.ShapeDtypeStruct((64, 16), jnp.float32)
  w = jax.ShapeDtypeStruct((256, 16), jnp.float32)
  t = jax.ShapeDtypeStruct((64,), jnp.int32)

  def loss(h, w, t):
    return jnp.sum(chunked.vocab_stats(h, w, t, token_block=16, vocab_block=64).lse)

  flops = {
    argnums: jax.jit(jax.grad(loss, argnums)).lower(h, w, t).compile().cost_analysis()["flops"]
    for argnums in [(0,), (0, 1)]
  }
  # Forward 2NdV + dh pass 4NdV, against + dW pass 4NdV.
  assert flops[(0,)] < 0.7 * flops[(0, 1)]


def test_chunked_forward_and_backward_never_hold_the_logits():
  n, v, d = 2048, 32768, 256
  shapes = (jax.ShapeDtypeStruct((n, d), jnp.float32), jax.ShapeDtypeStruct((v, d), jnp.float32),
            jax.ShapeDtypeStruct((n,), jnp.int32))

  def loss(h, w, t):
    stats = chunked.vocab_stats(h, w, t, token_block=256, vocab_block=1024)
    return jnp.sum(stats.target_logit - stats.lse + stats.expected_logit)

  memory = jax.jit(jax.grad(loss, (0, 1))).lower(*shapes).compile().memory_analysis()
  assert memory.temp_size_in_bytes < 0.02 * n * v * 4


# ------------------------------------------------------------------------------------------------
# Sharding.


def test_tokens_sharded_over_data_axis_match_unsharded(mesh8):
  x = _inputs(n=40)
  sharded = jax.device_put(x["hidden"], NamedSharding(mesh8, PartitionSpec("data", None)))
  targets = jax.device_put(x["targets"], NamedSharding(mesh8, PartitionSpec("data")))
  loss = lambda h, w, t, **k: jnp.sum(jnp.sin(api.token_logprobs(  # noqa: E731
    h, w, t, impl="chunked", token_block=4, vocab_block=32, **k).logp))
  want, want_grads = jax.value_and_grad(loss, (0, 1))(x["hidden"], x["weight"], x["targets"])
  for kwargs in ({}, {"mesh": mesh8}):
    got, got_grads = jax.jit(jax.value_and_grad(functools.partial(loss, **kwargs), (0, 1)))(
      sharded, x["weight"], targets
    )
    _assert_close(got, want, 1e-6)
    for g, w in zip(got_grads, want_grads):
      _assert_close(g, w, 1e-5)


@pytest.mark.parametrize("valid_vocab", [None, 20], ids=["whole-vocab", "partial-and-empty-shards"])
def test_vocab_sharded_over_tensor_axis_matches_unsharded(valid_vocab):
  mesh = jax.make_mesh((2, 4), ("data", "tensor"))
  x = _inputs(n=15, v=96)  # 15 tokens: padded for the 2 data shards; 4 vocab shards of 24 rows
  mask = jnp.arange(15) % 4 != 1
  options = dict(mask=mask, temperature=0.9, softcap=5.0, valid_vocab=valid_vocab)
  sharded = dict(mesh=mesh, vocab_axis="tensor", impl="chunked", token_block=4, vocab_block=16)

  def loss(h, w, b, **k):
    out = api.token_logprobs(h, w, x["targets"] % 20, bias=b, **options, **k)
    return jnp.sum(jnp.sin(out.logp) + out.entropy), out

  args = (x["hidden"], x["weight"], x["bias"])
  (_, want), want_grads = jax.jit(jax.value_and_grad(
    functools.partial(loss, impl="reference"), (0, 1, 2), has_aux=True))(*args)
  (_, got), got_grads = jax.jit(jax.value_and_grad(
    functools.partial(loss, **sharded), (0, 1, 2), has_aux=True))(*args)
  for g, w in zip((got.logp, got.entropy, *got_grads), (want.logp, want.entropy, *want_grads)):
    _assert_close(g, w, 1e-5)
  if valid_vocab is None:
    # Without mesh=: inputs already laid out on the mesh keep their layout (head split over rows).

    def place(a, *spec):
      return jax.device_put(a, NamedSharding(mesh, PartitionSpec(*spec)))

    laid_out = (place(x["hidden"][:14], "data", None), place(x["weight"], "tensor", None),
                place(x["bias"], "tensor"))
    plain = lambda h, w, b: jnp.sum(jnp.sin(api.token_logprobs(  # noqa: E731
      h, w, x["targets"][:14], bias=b, impl="chunked", token_block=4, vocab_block=16).logp))
    got, got_grads = jax.jit(jax.value_and_grad(plain, (0, 1, 2)))(*laid_out)
    assert got_grads[1].sharding.spec == PartitionSpec("tensor", None)
    want, want_grads = jax.value_and_grad(plain, (0, 1, 2))(x["hidden"][:14], *args[1:])
    for g, w in zip((got, *got_grads), (want, *want_grads)):
      _assert_close(g, w, 1e-5)
    return

  q = _inputs(seed=7, n=15, v=96)
  def kl(h, **k):
    return api.token_kl(h, x["weight"], q["hidden"], q["weight"], **options, **k)

  value_and_grad = lambda **k: jax.jit(jax.value_and_grad(  # noqa: E731
    lambda h: jnp.sum(jnp.cos(kl(h, **k)))))(x["hidden"])
  for g, w in zip(value_and_grad(**sharded), value_and_grad(impl="reference")):
    _assert_close(g, w, 1e-5)


# ------------------------------------------------------------------------------------------------
# target_is_top1: per-token accuracy from the same pass.


def _numpy_top1(hidden, weight, bias, targets, **options):
  """``argmax(z) == target`` on float64 logits materialised from the same (rounded) inputs, and
  the smallest top-1 / top-2 gap (the comparison is only well posed when it is not ~0)."""
  z = _numpy_logits(np.asarray(hidden, np.float32), np.asarray(weight, np.float32),
                    None if bias is None else np.asarray(bias, np.float32), **options)
  top2 = np.sort(z, -1)[:, -2:]
  return np.argmax(z, -1) == np.asarray(targets), float(np.min(top2[:, 1] - top2[:, 0]))


def _top1_and_runner_up_targets(hidden, weight, bias, seed, **options):
  """Targets that are, token by token in turn, the argmax (a hit), the runner-up (the closest
  miss: it beats every logit but one) and a random id."""
  z = _numpy_logits(np.asarray(hidden, np.float32), np.asarray(weight, np.float32),
                    np.asarray(bias, np.float32), **options)
  num_valid = options.get("valid_vocab") or z.shape[1]
  targets = np.random.default_rng(seed).integers(0, num_valid, z.shape[0])
  ranked = np.argsort(z, -1)
  targets[0::3], targets[1::3] = ranked[0::3, -1], ranked[1::3, -2]
  return jnp.asarray(targets, jnp.int32)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("impl", ["reference", "chunked"])
@pytest.mark.parametrize("options", [{}, dict(temperature=0.7, softcap=3.0, logit_scale=1.3,
                                              valid_vocab=90)], ids=["plain", "transform-padding"])
def test_target_is_top1_equals_argmax_of_materialised_logits(impl, dtype, options):
  x = _inputs(seed=11, n=2 * 13)  # V = 101 is not a multiple of the 16-column vocabulary block
  hidden, weight, bias = (x[k].astype(dtype) for k in ("hidden", "weight", "bias"))
  targets = _top1_and_runner_up_targets(hidden, weight, bias, seed=12, **options)
  want, gap = _numpy_top1(hidden, weight, bias, targets, **options)
  assert gap > 1e-4  # no near-tie the fp32 kernels could legitimately order differently
  mask = np.random.default_rng(13).random(2 * 13) > 0.3
  mask[1] = False  # at least one masked hit
  want &= mask
  call = functools.partial(api.token_logprobs, impl=impl, **options,
                           **(BLOCKS if impl == "chunked" else {}))
  out = jax.jit(call)(hidden.reshape(2, 13, D), weight, targets.reshape(2, 13),
                      bias=bias, mask=jnp.asarray(mask).reshape(2, 13))
  assert out.target_is_top1.dtype == jnp.bool_ and out.target_is_top1.shape == (2, 13)
  np.testing.assert_array_equal(np.asarray(out.target_is_top1).reshape(-1), want)
  assert 0 < want.sum() < mask.sum()  # hits and unmasked misses both present


@pytest.mark.parametrize("impl", ["reference", "chunked"])
def test_target_is_top1_counts_exact_ties_as_hits(impl):
  # Rows 3 and 10 of the head are equal and dominate every logit (hidden > 0): both are top-1 for
  # every token, and they sit in different 4-column blocks of the chunked kernel.
  rng = np.random.default_rng(5)
  hidden = jnp.asarray(np.abs(rng.normal(size=(6, D))) + 0.1, jnp.float32)
  weight = rng.normal(size=(V, D)) * 0.01
  weight[3] = weight[10] = 1.0
  targets = jnp.asarray([3, 10, 5, 3, 10, 100], jnp.int32)
  out = jax.jit(functools.partial(api.token_logprobs, impl=impl, token_block=4, vocab_block=4)
                if impl == "chunked" else functools.partial(api.token_logprobs, impl=impl))(
    hidden, jnp.asarray(weight, jnp.float32), targets)
  np.testing.assert_array_equal(out.target_is_top1, [True, True, False, True, True, False])


def test_target_is_top1_false_for_masked_and_out_of_range_targets():
  x = _inputs(n=6, v=12)
  z = _numpy_logits(x["hidden"], x["weight"])
  top = np.argmax(z, -1)
  # Every target is the argmax, then: token 1 masked, token 2 out of range (traced: no error),
  # token 3 beyond valid_vocab (its logit is excluded, so it cannot be top-1). A bias of −50 makes
  # every logit negative, so the 0 an unknown target scores would otherwise beat the max.
  targets = jnp.asarray(top).at[2].set(-1)
  mask = jnp.arange(6) != 1
  bias = jnp.full((12,), -50.0)
  call = jax.jit(functools.partial(api.token_logprobs, impl="chunked", token_block=4,
                                   vocab_block=8), static_argnames="valid_vocab")
  out = call(x["hidden"], x["weight"], targets, mask=mask, bias=bias)
  np.testing.assert_array_equal(out.target_is_top1, [True, False, False, True, True, True])
  beyond = call(x["hidden"], x["weight"], targets.at[3].set(11), mask=mask, bias=bias,
                valid_vocab=11)
  assert not beyond.target_is_top1[3]


def test_target_is_top1_sharded_over_tokens_and_vocabulary(mesh8):
  x = _inputs(seed=21, n=15, v=96)
  mask = jnp.arange(15) % 4 != 1
  for valid_vocab in (None, 40):  # 40: the last two of four 24-row shards are partial / empty
    options = dict(temperature=0.9, softcap=5.0, valid_vocab=valid_vocab)
    targets = _top1_and_runner_up_targets(x["hidden"], x["weight"], x["bias"], seed=22, **options)
    want, gap = _numpy_top1(x["hidden"], x["weight"], x["bias"], targets, **options)
    assert gap > 1e-4
    want &= np.asarray(mask)
    vocab_mesh = jax.make_mesh((2, 4), ("data", "tensor"))
    runs = {
      "vocab": dict(mesh=vocab_mesh, vocab_axis="tensor"),
      "tokens": dict(mesh=mesh8),  # 15 tokens padded to 16 for 8 devices
    }
    for name, run in runs.items():
      out = jax.jit(functools.partial(api.token_logprobs, impl="chunked", token_block=4,
                                      vocab_block=16, **options, **run))(
        x["hidden"], x["weight"], targets, bias=x["bias"], mask=mask)
      np.testing.assert_array_equal(out.target_is_top1, want, err_msg=name)
  assert want.any() and not want.all()


def test_target_is_top1_adds_no_logit_sized_buffer():
  n, v, d = 2048, 32768, 256
  shapes = (jax.ShapeDtypeStruct((n, d), jnp.bfloat16), jax.ShapeDtypeStruct((v, d), jnp.bfloat16),
            jax.ShapeDtypeStruct((n,), jnp.int32))

  def temp_bytes(outputs):
    fn = lambda h, w, t: outputs(api.token_logprobs(  # noqa: E731
      h, w, t, impl="chunked", token_block=256, vocab_block=1024))
    return jax.jit(fn).lower(*shapes).compile().memory_analysis().temp_size_in_bytes

  with_top1 = temp_bytes(lambda out: (out.logp, out.target_is_top1))
  assert with_top1 < 0.02 * n * v * 4
  # Beyond the logp-only program: at most a few [N] vectors.
  assert with_top1 <= temp_bytes(lambda out: out.logp) + 16 * n * 4


# ------------------------------------------------------------------------------------------------
# Input validation.


@pytest.fixture
def no_runtime_shape_checks():
  """Turns off the jaxtyping hook so the functions' own (always-on) checks are what is tested."""
  jaxtyping.config.update("jaxtyping_disable", True)
  yield
  jaxtyping.config.update("jaxtyping_disable", False)


@pytest.mark.usefixtures("no_runtime_shape_checks")
def test_bad_inputs_raise_naming_the_argument():
  x = _inputs(n=6, v=12)
  h, w, t = x["hidden"], x["weight"], x["targets"]
  call = functools.partial(api.token_logprobs, impl="chunked")
  cases = [
    (lambda: call(h, w[:, :3], t), "head must be"),
    (lambda: call(h, w, t[:4]), "targets"),
    (lambda: call(h, w, t, mask=jnp.ones(5, bool)), "mask"),
    (lambda: call(h, w, t, bias=x["bias"][:3]), "bias"),
    (lambda: call(h, w, t, impl="triton"), "impl"),
    (lambda: call(h, w, t, temperature=0.0), "temperature"),
    (lambda: call(h, w, t, softcap=-1.0), "softcap"),
    (lambda: call(h, w, t, valid_vocab=13), "valid_vocab"),
    (lambda: call(h, w, t, vocab_axis="tensor"), "needs a mesh"),
    (lambda: call(h, w[:10], t, mesh=jax.make_mesh((2, 4), ("data", "tensor")),
                  vocab_axis="tensor"), "not divisible"),
    (lambda: api.token_kl(h, w, h[:5], w), "hidden_q"),
    (lambda: api.token_kl(h, w, h, w[:6]), "head_q"),
    (lambda: chunked.vocab_stats(h, w, t, vocab_block=0), "vocab_block"),
    (lambda: jax.jit(lambda temp: call(h, w, t, temperature=temp))(0.7), "temperature must be"),
    (lambda: jax.jit(lambda c: api.token_kl(h, w, h, w, softcap=c))(5.0), "softcap must be"),
  ]
  for fn, message in cases:
    with pytest.raises(ValueError, match=message):
      fn()
  for fn, message in [
    (lambda: call(h, w, t.astype(jnp.float32)), "targets must be an integer"),
    (lambda: call(h, w, t, mask=jnp.ones(6)), "mask must be a boolean"),
  ]:
    with pytest.raises(TypeError, match=message):
      fn()


def test_chunked_bf16_needs_no_more_temporaries_than_fp32():
  """Low-precision inputs are sliced in place: no fp32 copy of hidden or the head (CPU regression).

  XLA's CPU backend upcasts a bf16 dynamic-slice through fp32; unless ``chunked._rows`` stops it,
  the whole-array upcast is hoisted out of the loop and bf16 costs more temporaries than fp32.
  """
  n, d, v = 512, 256, 4096
  blocks = dict(token_block=128, vocab_block=512)

  def vocab_stats_loss(h, w, t):
    stats = chunked.vocab_stats(h, w, t, **blocks)
    return jnp.sum(stats.target_logit - stats.lse + stats.expected_logit)

  def kl_stats_loss(h, w, h_q, w_q):
    stats = chunked.kl_stats(h, w, h_q, w_q, **blocks)
    return jnp.sum(stats.expected_diff - stats.lse_p + stats.lse_q)

  functions = {
    "vocab_stats": functools.partial(chunked.vocab_stats, **blocks),
    "vocab_stats grad": jax.grad(vocab_stats_loss, (0, 1)),
    "kl_stats": functools.partial(chunked.kl_stats, **blocks),
    "kl_stats grad": jax.grad(kl_stats_loss, (0, 1)),
  }
  for name, fn in functions.items():
    temp_bytes = {}
    for dtype in (jnp.bfloat16, jnp.float32):
      h, w = jax.ShapeDtypeStruct((n, d), dtype), jax.ShapeDtypeStruct((v, d), dtype)
      args = (h, w, jax.ShapeDtypeStruct((n,), jnp.int32)) if "vocab" in name else (h, w, h, w)
      temp_bytes[dtype] = jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes
    assert temp_bytes[jnp.bfloat16] <= temp_bytes[jnp.float32], (name, temp_bytes)


def test_lm_head_tuple_equals_unpacked_keywords_and_rejects_duplicates():
  x = _inputs(n=10, v=40)
  head = alignax.LMHead(weight=x["weight"], bias=x["bias"], softcap=2.0, logit_scale=0.5)
  via_head = api.token_logprobs(x["hidden"], head, x["targets"], impl="chunked", **BLOCKS)
  via_keywords = api.token_logprobs(x["hidden"], x["weight"], x["targets"], bias=x["bias"],
                                    softcap=2.0, logit_scale=0.5, impl="chunked", **BLOCKS)
  for got, want in zip(via_head, via_keywords):
    _assert_close(got, want, 0.0)
  kl_head = api.token_kl(x["hidden"], head, x["hidden"][::-1], head, impl="chunked", **BLOCKS)
  kl_keywords = api.token_kl(x["hidden"], x["weight"], x["hidden"][::-1], x["weight"],
                             bias_p=x["bias"], bias_q=x["bias"], softcap=2.0, logit_scale=0.5,
                             impl="chunked", **BLOCKS)
  _assert_close(kl_head, kl_keywords, 0.0)
  with pytest.raises(ValueError, match=r"head is an LMHead.*\['softcap'\]"):
    api.token_logprobs(x["hidden"], head, x["targets"], softcap=2.0)
  other = head._replace(softcap=3.0)
  with pytest.raises(ValueError, match="different"):
    api.token_kl(x["hidden"], head, x["hidden"], other)


def test_auto_takes_pallas_only_on_validated_backends(monkeypatch):
  assert api.PALLAS_VALIDATED_BACKENDS == frozenset()  # BUILD.md lists none validated yet
  assert api.implementation("auto") is chunked
  monkeypatch.setattr(api, "PALLAS_VALIDATED_BACKENDS", frozenset({jax.default_backend()}))
  assert api.implementation("auto").__name__ == "alignax.kernels.pallas"
