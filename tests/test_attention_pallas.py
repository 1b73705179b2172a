"""The Pallas attention paths: values against the oracle in interpret mode (CPU), and lowering.

Splash attention (``impl="pallas_tpu"``) and the Triton flash kernel (``impl="pallas_gpu"``) run
here through Pallas's interpreter; the lowering tests build the real Mosaic / Triton kernels for
TPU / CUDA from this CPU-only jaxlib (``jax.export``), without running them.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignax.kernels.attention import attention

B, T, H, K, HD = 2, 20, 4, 2, 16  # T is not a multiple of any kernel block


def _inputs(key):
  kq, kk, kv, kc = jax.random.split(key, 4)
  return (jax.random.normal(kq, (B, T, H, HD)), jax.random.normal(kk, (B, T, K, HD)),
          jax.random.normal(kv, (B, T, K, HD)), jax.random.normal(kc, (B, T, H, HD)))


def _value_and_grads(impl, cotangent, q, k, v, **options):
  def loss(q, k, v):
    out = attention(q, k, v, impl=impl, scale=0.3, **options)
    return jnp.sum(out * cotangent), out

  return jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)


SEGMENTS = jnp.array([[0] * 9 + [1] * 11, [2] * 20])
RIGHT_PADDING = jnp.arange(T)[None, :] < jnp.array([[20], [15]])  # row 1: 5 padding slots

CASES = {
  "pallas_tpu": {"softcap": 3.0, "window": 6, "q_segment_ids": SEGMENTS,
                 "kv_segment_ids": SEGMENTS, "kv_valid": RIGHT_PADDING},
  "pallas_gpu": {"q_segment_ids": SEGMENTS, "kv_segment_ids": SEGMENTS,
                 "kv_valid": RIGHT_PADDING},
}


@pytest.mark.parametrize("impl", list(CASES))
def test_pallas_matches_reference_in_interpret_mode(key, impl):
  q, k, v, cotangent = _inputs(key)
  # Padding queries get 0 on the Pallas paths (the oracle averages the earlier valid keys there),
  # so they carry no cotangent, and the comparison is over valid query rows.
  cotangent = jnp.where(RIGHT_PADDING[:, :, None, None], cotangent, 0.0)
  run = functools.partial(_value_and_grads, cotangent=cotangent, q=q, k=k, v=v, **CASES[impl])
  (_, out), grads = jax.jit(lambda: run(impl))()
  (_, ref_out), ref_grads = jax.jit(lambda: run("reference"))()
  valid = np.asarray(RIGHT_PADDING)
  np.testing.assert_allclose(np.asarray(out)[valid], np.asarray(ref_out)[valid], atol=2e-5)
  assert np.all(np.asarray(out)[~valid] == 0.0)
  for g, ref_g in zip(grads, ref_grads):
    np.testing.assert_allclose(np.asarray(g), np.asarray(ref_g), atol=2e-5)


def test_pallas_gpu_falls_back_when_query_and_key_segments_differ(key):
  # The Triton kernel takes one id array for both sides; distinct ids run the chunked kernel.
  q, k, v, cotangent = _inputs(key)
  options = {"q_segment_ids": SEGMENTS, "kv_segment_ids": SEGMENTS.at[0, 9].set(0)}
  (_, out), grads = jax.jit(lambda: _value_and_grads("pallas_gpu", cotangent, q, k, v,
                                                     **options))()
  (_, ref_out), ref_grads = jax.jit(lambda: _value_and_grads("reference", cotangent, q, k, v,
                                                             **options))()
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref_out), atol=2e-5)
  for g, ref_g in zip(grads, ref_grads):
    np.testing.assert_allclose(np.asarray(g), np.asarray(ref_g), atol=2e-5)


@pytest.mark.parametrize("impl, platform, custom_call, options", [
  ("pallas_tpu", "tpu", "tpu_custom_call", {"softcap": 30.0, "window": 64}),
  ("pallas_gpu", "cuda", "__gpu$xla.gpu.triton", {}),
])
def test_pallas_attention_lowers_for_accelerators(impl, platform, custom_call, options):
  q = jax.ShapeDtypeStruct((1, 300, 8, 128), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((1, 300, 2, 128), jnp.bfloat16)
  segments = jax.ShapeDtypeStruct((1, 300), jnp.int32)

  def loss(q, k, v, ids):
    out = attention(q, k, v, scale=0.1, impl=impl, interpret=False, q_segment_ids=ids,
                    kv_segment_ids=ids, **options)
    return jnp.sum(out.astype(jnp.float32))

  exported = jax.export.export(
    jax.jit(jax.grad(loss, argnums=(0, 1, 2))), platforms=[platform],
    disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(custom_call)],
  )(q, kv, kv, segments)
  # A forward kernel and the backward kernel(s) are embedded.
  assert exported.mlir_module().count(f"@{custom_call}") >= 2
