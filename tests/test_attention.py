"""The chunked attention kernel (and the XLA path) against the dense oracle, ``impl="reference"``.

Every case uses lengths that are not multiples of the blocks passed explicitly, so the shifted last
block (rows shared with the previous block) is exercised in the forward and the backward pass.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignax.kernels.attention import attention

B, H, HD = 2, 4, 8
BLOCKS = {"block_q": 4, "block_kv": 5}


def _qkv(key, t, s, kv_heads, dtype=jnp.float32):
  kq, kk, kv, kc = jax.random.split(key, 4)
  q = jax.random.normal(kq, (B, t, H, HD), dtype)
  k = jax.random.normal(kk, (B, s, kv_heads, HD), dtype)
  v = jax.random.normal(kv, (B, s, kv_heads, HD), dtype)
  cotangent = jax.random.normal(kc, (B, t, H, HD))
  return q, k, v, cotangent


def _value_and_grads(impl, cotangent, q, k, v, **options):
  """Output and the gradient of Σ cotangent · output w.r.t. q, k, v (one jit-compiled call)."""
  return jax.jit(functools.partial(_value_and_grads_eager, impl, **options))(cotangent, q, k, v)


def _value_and_grads_eager(impl, cotangent, q, k, v, **options):
  def loss(q, k, v):
    out = attention(q, k, v, impl=impl, **options)
    return jnp.sum(out.astype(jnp.float32) * cotangent), out

  (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
  return out, grads


def _assert_close(actual, expected, tol, name):
  actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
  assert np.all(np.isfinite(actual)), f"{name}: not finite"
  err = np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1.0)
  assert err <= tol, f"{name}: max |error| / max |expected| = {err:.2e} > {tol:.0e}"


def _padding(s, left, right):
  slots = jnp.arange(s)[None, :]
  return (slots >= jnp.asarray(left)[:, None]) & (slots < s - jnp.asarray(right)[:, None])


SEGMENTS_13 = jnp.array([[0] * 5 + [1] * 8, [3] * 6 + [4] * 4 + [5] * 3])

CASES = {
  # name: (T, S, K, options)
  "causal_gqa2": (13, 13, 2, {}),
  "cross_not_causal_mqa_right_pad": (
    7, 19, 1, {"causal": False, "kv_valid": _padding(19, [0, 0], [0, 6])}),
  "window_softcap": (13, 13, 2, {"window": 4, "softcap": 2.0}),
  "packing_left_pad": (13, 13, 2, {"q_segment_ids": SEGMENTS_13, "kv_segment_ids": SEGMENTS_13,
                                   "kv_valid": _padding(13, [3, 0], [0, 0])}),
  "cache_queries_kv_len": (5, 19, 2, {"q_index": jnp.arange(10, 15), "kv_len": 15,
                                      "kv_valid": _padding(19, [0, 2], [0, 0])}),
  "per_row_indices_window_not_causal": (
    9, 11, 4, {"causal": False, "window": 3, "kv_index": jnp.arange(11),
               "q_index": jnp.array([jnp.arange(9), jnp.arange(2, 11)])}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_chunked_matches_reference_fp32(key, case):
  t, s, kv_heads, options = CASES[case]
  q, k, v, cotangent = _qkv(key, t, s, kv_heads)
  options = {"scale": 0.4, **options}
  out, grads = _value_and_grads("chunked", cotangent, q, k, v, **BLOCKS, **options)
  ref_out, ref_grads = _value_and_grads("reference", cotangent, q, k, v, **options)
  _assert_close(out, ref_out, 1e-5, "out")
  for name, g, ref_g in zip("qkv", grads, ref_grads):
    _assert_close(g, ref_g, 1e-5, f"d{name}")


def test_chunked_matches_reference_bf16_every_feature(key):
  t, s = 13, 13
  q, k, v, cotangent = _qkv(key, t, s, 2, jnp.bfloat16)
  options = {"scale": 0.4, "window": 6, "softcap": 3.0, "q_segment_ids": SEGMENTS_13,
             "kv_segment_ids": SEGMENTS_13, "kv_valid": _padding(s, [2, 0], [0, 1])}
  out, grads = _value_and_grads("chunked", cotangent, q, k, v, **BLOCKS, **options)
  assert out.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in grads)
  # The oracle sees the same bf16-rounded inputs in fp32; what is left is bf16 output rounding
  # and the bf16 operands of the score products (fp32 accumulation in both).
  upcast = [x.astype(jnp.float32) for x in (q, k, v)]
  ref_out, ref_grads = _value_and_grads("reference", cotangent, *upcast, **options)
  _assert_close(out, ref_out, 1e-2, "out")
  for name, g, ref_g in zip("qkv", grads, ref_grads):
    _assert_close(g, ref_g, 2e-2, f"d{name}")


def test_traced_window_matches_static(key):
  t, s, kv_heads, _ = CASES["causal_gqa2"]
  q, k, v, cotangent = _qkv(key, t, s, kv_heads)

  @jax.jit
  def chunked(q, k, v, window):  # one compilation serves every window: it is traced
    return _value_and_grads_eager("chunked", cotangent, q, k, v, scale=0.4, window=window,
                                  **BLOCKS)

  for window in (1, 4, 100):  # 100 >= S: no window
    out, grads = chunked(q, k, v, jnp.int32(window))
    ref_out, ref_grads = _value_and_grads("reference", cotangent, q, k, v, scale=0.4,
                                          window=window)
    _assert_close(out, ref_out, 1e-5, f"out (window {window})")
    for name, g, ref_g in zip("qkv", grads, ref_grads):
      _assert_close(g, ref_g, 1e-5, f"d{name} (window {window})")


def test_query_with_no_allowed_key_is_zero_with_zero_gradient(key):
  t = s = 13
  q, k, v, cotangent = _qkv(key, t, s, 2)
  # Row 0: three slots of left padding, so its first three queries see no key at all; row 1: every
  # key of segment 9 is padding, so the queries of that segment see nothing either.
  segments = jnp.array([[0] * 13, [1] * 7 + [9] * 6])
  valid = _padding(s, [3, 0], [0, 6])
  options = {"scale": 0.4, "kv_valid": valid, "q_segment_ids": segments,
             "kv_segment_ids": segments}
  out, (dq, dk, dv) = _value_and_grads("chunked", cotangent, q, k, v, **BLOCKS, **options)
  empty = np.zeros((B, t), bool)
  empty[0, :3] = True
  empty[1, 7:] = True
  assert np.all(np.asarray(out)[empty] == 0.0)
  assert np.all(np.asarray(dq)[empty] == 0.0)
  for g in (dq, dk, dv):
    assert np.all(np.isfinite(np.asarray(g)))
  assert np.all(np.abs(np.asarray(out)[~empty]).max(axis=(-1, -2)) > 0)
  ref_out, ref_grads = _value_and_grads("reference", cotangent, q, k, v, **options)
  _assert_close(out, ref_out, 1e-5, "out")
  for name, g, ref_g in zip("qkv", (dq, dk, dv), ref_grads):
    _assert_close(g, ref_g, 1e-5, f"d{name}")


def test_decode_step_reads_only_filled_blocks(key):
  # One query per row at slot 9 of a 20-slot cache holding 10 tokens. The blocks of slots 10..19
  # hold NaN: any arithmetic on them would poison the output, so finiteness shows they are skipped.
  s, position = 20, 9
  q, k, v, _ = _qkv(key, 1, s, 2)
  filled = jnp.arange(s)[None, :, None, None] <= position
  k_nan, v_nan = (jnp.where(filled, x, jnp.nan) for x in (k, v))
  options = {"scale": 0.4, "q_index": jnp.array([position]), "kv_len": position + 1}
  decode = jax.jit(lambda q, k, v: attention(q, k, v, impl="chunked", block_q=4, block_kv=5,
                                             **options))
  out = decode(q, k_nan, v_nan)
  # The oracle on the first 10 slots only: the unfilled tail changes nothing.
  ref = jax.jit(lambda q, k, v: attention(q, k, v, impl="reference", scale=0.4,
                                          q_index=jnp.array([position])))
  _assert_close(out, ref(q, k[:, :10], v[:, :10]), 1e-5, "decode vs sliced cache")


def test_causal_skips_blocks_above_the_diagonal(key):
  # NaN in the keys/values of slots 10..14 (the last KV block): the queries before slot 10 never
  # read that block, forward or backward, so their outputs and dq stay finite and exact.
  t = s = 15
  q, k, v, cotangent = _qkv(key, t, s, 2)
  late = jnp.arange(s)[None, :, None, None] >= 10
  k_nan, v_nan = (jnp.where(late, jnp.nan, x) for x in (k, v))
  cotangent = cotangent.at[:, 10:].set(0.0)
  out, (dq, _, _) = _value_and_grads("chunked", cotangent, q, k_nan, v_nan, scale=0.4,
                                     block_q=5, block_kv=5)
  ref_out, (ref_dq, _, _) = _value_and_grads("reference", cotangent, q, k, v, scale=0.4)
  _assert_close(out[:, :10], ref_out[:, :10], 1e-5, "out before slot 10")
  _assert_close(dq[:, :10], ref_dq[:, :10], 1e-5, "dq before slot 10")


def test_jit_equals_eager(key):
  q, k, v, _ = _qkv(key, 11, 11, 2)
  options = {"scale": 0.4, "window": 5, "softcap": 4.0, **BLOCKS}
  eager = attention(q, k, v, impl="chunked", **options)
  jitted = jax.jit(lambda q, k, v: attention(q, k, v, impl="chunked", **options))(q, k, v)
  np.testing.assert_array_equal(np.asarray(eager), np.asarray(jitted))
  np.testing.assert_array_equal(np.asarray(attention(q, k, v, impl="auto", **options)),
                                np.asarray(eager))


def test_xla_implementation_matches_reference_and_falls_back_for_left_padding(key):
  q, k, v, cotangent = _qkv(key, 13, 13, 2)

  def run(impl):  # kv_valid is an argument: one compilation per implementation
    return jax.jit(lambda valid: _value_and_grads_eager(impl, cotangent, q, k, v, scale=0.4,
                                                        window=5, kv_valid=valid))

  xla, reference = run("xla"), run("reference")
  for valid in (_padding(13, [0, 0], [0, 4]), _padding(13, [0, 3], [0, 0])):  # right, left
    out, grads = xla(valid)
    ref_out, ref_grads = reference(valid)
    _assert_close(out, ref_out, 1e-5, "out")
    for name, g, ref_g in zip("qkv", grads, ref_grads):
      _assert_close(g, ref_g, 1e-5, f"d{name}")


@pytest.mark.parametrize("impl, options, feature", [
  ("xla", {"softcap": 5.0}, "softcap"),
  ("xla", {"q_segment_ids": jnp.zeros((B, 8), jnp.int32),
           "kv_segment_ids": jnp.zeros((B, 8), jnp.int32)}, "segment ids"),
  ("cudnn", {"q_index": jnp.arange(8)}, "q_index"),
  ("pallas_gpu", {"window": 3}, "window"),
  ("pallas_tpu", {"kv_index": jnp.arange(8)}, "q_index / kv_index"),
])
def test_unsupported_feature_is_a_named_error(key, impl, options, feature):
  q, k, v, _ = _qkv(key, 8, 8, 2)
  with pytest.raises(ValueError, match=feature):
    attention(q, k, v, scale=1.0, impl=impl, **options)


@pytest.mark.parametrize("bad, message", [
  ({"k": jnp.zeros((B, 8, 3, HD))}, "multiple of KV heads"),
  ({"q_index": jnp.zeros((B, 3), jnp.int32)}, "q_index"),
  ({"q_index": jnp.zeros((3,), jnp.int32)}, "q_index"),
  ({"kv_valid": jnp.ones((B, 7), bool)}, "kv_valid"),
  ({"q_segment_ids": jnp.zeros((B, 8), jnp.int32)}, "given together"),
  ({"impl": "flash"}, "impl must be one of"),
  ({"window": 0}, "window must be >= 1"),
])
def test_bad_input_is_a_named_error(key, bad, message):
  q, k, v, _ = _qkv(key, 8, 8, 2)
  args = {"q": q, "k": k, "v": v if "k" not in bad else bad["k"], "scale": 1.0, **bad}
  with pytest.raises(Exception, match=message):
    attention(**args)


def test_no_queries_or_no_keys(key):
  q, k, v, _ = _qkv(key, 6, 6, 2)
  assert attention(q[:, :0], k, v, scale=1.0).shape == (B, 0, H, HD)
  # No keys: every query row is empty, so the output and the gradient are 0.
  out = attention(q, k[:, :0], v[:, :0], scale=1.0)
  dq = jax.grad(lambda q: jnp.sum(attention(q, k[:, :0], v[:, :0], scale=1.0)))(q)
  assert out.shape == q.shape and not np.any(np.asarray(out)) and not np.any(np.asarray(dq))


def _temporaries(t):
  q = jax.ShapeDtypeStruct((1, t, 4, 32), jnp.float32)
  kv = jax.ShapeDtypeStruct((1, t, 2, 32), jnp.float32)

  def loss(q, k, v):
    return jnp.sum(attention(q, k, v, scale=0.2, impl="chunked", block_q=128, block_kv=128))

  compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_forward_backward_temporaries_grow_sub_quadratically():
  # 4x the tokens: dense [T, S] scores would need 16x the temporaries; the chunked kernel holds a
  # few [block_q, block_kv] tiles plus O(T) vectors.
  ratio = _temporaries(2048) / _temporaries(512)
  assert ratio < 6, f"fwd+bwd temporaries grew {ratio:.1f}x from T=512 to T=2048"


def test_batch_sharded_equals_unsharded(key, mesh8):
  # Batch over the 8 fake devices (explicit mesh axes): per-block skip tests read bounds computed
  # once before the loops, so the loops hold no cross-device reduction and the result is exact.
  kq, kk, kv = jax.random.split(key, 3)
  q = jax.random.normal(kq, (8, 13, H, HD))
  k, v = (jax.random.normal(x, (8, 13, 2, HD)) for x in (kk, kv))
  valid = jnp.arange(13)[None, :] >= jnp.arange(8)[:, None]  # left padding, 0..7 slots

  def loss(q, k, v, valid):
    out = attention(q, k, v, scale=0.4, kv_valid=valid, impl="chunked", **BLOCKS)
    return jnp.sum(out * out)

  grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
  expected = grad(q, k, v, valid)
  sharding = jax.sharding.NamedSharding(mesh8, jax.sharding.PartitionSpec("data"))
  with jax.set_mesh(mesh8):
    sharded = grad(*(jax.device_put(x, sharding) for x in (q, k, v, valid)))
    hlo = grad.lower(*(jax.device_put(x, sharding) for x in (q, k, v, valid))).compile().as_text()
  for g, e in zip(sharded, expected):
    assert g.sharding.spec[0] == "data"
    np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-6, atol=1e-6)
  # The only collectives: the block bounds of the forward and of the backward pass (one all-reduce
  # each, before the loops), whatever the number of blocks.
  assert hlo.count("all-reduce(") <= 2, hlo.count("all-reduce(")
