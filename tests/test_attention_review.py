"""Review checks of the attention kernel and of ``benchmarks/device_check.py``.

The dense oracle (``impl="reference"``) builds its mask with the kernel's own ``_block_mask``, so a
mask-semantics slip would be shared by both; here a NumPy loop over (query, key) pairs, written from
the formula alone, is the independent oracle. The skip tests of the chunked kernel are fuzzed over
random indices, validity, segments, windows and ``kv_len`` passed as data (one compilation). The
device-check tests run its GPU-side decisions on CPU: what counts as a skip, a failure, the exit.
"""

import functools
import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignax.kernels.attention import attention

B, H, HD = 2, 4, 8


def _qkv(seed, t, s, kv_heads, dtype=jnp.float32):
  keys = jax.random.split(jax.random.key(seed), 4)
  return (jax.random.normal(keys[0], (B, t, H, HD), dtype),
          jax.random.normal(keys[1], (B, s, kv_heads, HD), dtype),
          jax.random.normal(keys[2], (B, s, kv_heads, HD), dtype),
          jax.random.normal(keys[3], (B, t, H, HD)))


def _numpy_attention(q, k, v, *, scale, q_index, kv_index, kv_valid, q_seg, kv_seg, causal, window,
                     softcap, kv_len):
  """The module docstring's formula, one (b, h, i) at a time in float64."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  b_, t, h_, _ = q.shape
  s, kv_heads = k.shape[1], k.shape[2]
  out = np.zeros_like(q)
  for b in range(b_):
    for i in range(t):
      allowed = np.array([
        kv_valid[b, j] and j < kv_len
        and (not causal or kv_index[b, j] <= q_index[b, i])
        and (window is None or q_index[b, i] - window < kv_index[b, j])
        and q_seg[b, i] == kv_seg[b, j]
        for j in range(s)
      ])
      if not allowed.any():
        continue
      for h in range(h_):
        kh = h // (h_ // kv_heads)
        scores = scale * k[b, :, kh] @ q[b, i, h]
        if softcap is not None:
          scores = softcap * np.tanh(scores / softcap)
        scores = np.where(allowed, scores, -np.inf)
        p = np.exp(scores - scores.max())
        out[b, i, h] = (p / p.sum()) @ v[b, :, kh]
  return out


def test_chunked_and_reference_match_an_independent_numpy_oracle():
  t, s = 7, 12
  q, k, v, _ = _qkv(0, t, s, 2)
  q_index = np.array([np.arange(5, 12), [9, 3, 11, 0, 7, 7, 2]])  # cache queries; unsorted
  kv_index = np.array([np.arange(12), [4, 0, 8, 2, 11, 6, 1, 9, 3, 10, 5, 7]])  # ring-buffer slots
  kv_valid = np.ones((B, s), bool)
  kv_valid[0, [1, 6]] = False
  kv_valid[1, 10:] = False
  q_seg = np.array([[0, 7, 1, 1, 1, 1, 1], [2, 2, 2, 2, 3, 3, 3]])  # id 7: no key, an empty row
  kv_seg = np.array([[0] * 6 + [1] * 6, [2] * 7 + [3] * 5])
  for causal, window, softcap in ((True, 3, None), (False, 4, 1.5), (True, None, 2.0)):
    options = {"scale": 0.5, "causal": causal, "window": window, "softcap": softcap}
    expected = _numpy_attention(q, k, v, q_index=q_index, kv_index=kv_index, kv_valid=kv_valid,
                                q_seg=q_seg, kv_seg=kv_seg, kv_len=11, **options)
    assert np.abs(expected).max() > 0 and np.any(np.all(expected == 0, axis=(-1, -2)))
    for impl, blocks in (("reference", {}), ("chunked", {"block_q": 3, "block_kv": 5})):
      out = attention(q, k, v, impl=impl, q_index=jnp.asarray(q_index),
                      kv_index=jnp.asarray(kv_index), kv_valid=jnp.asarray(kv_valid),
                      q_segment_ids=jnp.asarray(q_seg), kv_segment_ids=jnp.asarray(kv_seg),
                      kv_len=11, **blocks, **options)
      np.testing.assert_allclose(np.asarray(out), expected, atol=2e-6,
                                 err_msg=f"{impl} causal={causal} window={window}")


def _value_and_grads(impl, causal, blocks):
  def run(cotangent, q, k, v, q_index, kv_index, kv_valid, q_seg, kv_seg, window, kv_len):
    def loss(q, k, v):
      out = attention(q, k, v, scale=0.5, impl=impl, causal=causal, q_index=q_index,
                      kv_index=kv_index, kv_valid=kv_valid, q_segment_ids=q_seg,
                      kv_segment_ids=kv_seg, window=window, kv_len=kv_len, **blocks)
      return jnp.sum(out * cotangent)

    return jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)

  return jax.jit(run)


@pytest.mark.parametrize("causal", [True, False])
def test_block_skipping_fuzzed_against_the_oracle(causal):
  # Every mask input is data, so one compilation serves 12 random layouts: queries at the end of a
  # cache, unsorted slots, holes, segments spanning blocks, windows 1..∞ straddling the 3- and
  # 5-wide blocks, kv_len inside / at / past the edge. Any wrongly skipped or double-counted block
  # shows in the value or in dq, dk, dv.
  t, s = 11, 13
  chunked = _value_and_grads("chunked", causal, {"block_q": 3, "block_kv": 5})
  reference = _value_and_grads("reference", causal, {})
  rs = np.random.RandomState(1 + causal)
  q, k, v, cotangent = _qkv(3, t, s, 2)
  for trial in range(12):
    # Trials 1, 5, 9: plain self-attention positions, where query block [3, 5] and KV block
    # [5, 9] share only the diagonal pair (5, 5): a skip test off by one drops it.
    plain = trial % 4 == 1
    offset = 0 if plain else rs.randint(0, 15, (B, 1))
    q_index = offset + np.arange(t) if trial % 3 else rs.randint(0, 25, (B, t))
    kv_index = np.tile(np.arange(s), (B, 1)) if trial % 2 else rs.randint(0, 25, (B, s))
    kv_valid = rs.rand(B, s) < (1.0, 1.0, 0.7, 0.3)[trial % 4]
    q_seg = np.sort(rs.randint(0, 1 if plain else 3, (B, t)), axis=1)
    kv_seg = np.sort(rs.randint(0, 1 if plain else 3, (B, s)), axis=1)
    window = (1, 2, 4, 7, 2**31 - 1)[trial % 5]
    kv_len = (13, 6, 10, 0, 40, 12)[trial % 6]
    data = [jnp.asarray(x, jnp.int32) for x in (q_index, kv_index)] + [jnp.asarray(kv_valid)]
    data += [jnp.asarray(x, jnp.int32) for x in (q_seg, kv_seg, window, kv_len)]
    value, grads = chunked(cotangent, q, k, v, *data)
    ref_value, ref_grads = reference(cotangent, q, k, v, *data)
    np.testing.assert_allclose(float(value), float(ref_value), rtol=1e-5, atol=1e-5)
    for name, g, ref_g in zip("qkv", grads, ref_grads):
      scale = max(float(np.abs(ref_g).max()), 1.0)
      np.testing.assert_allclose(np.asarray(g) / scale, np.asarray(ref_g) / scale, atol=1e-5,
                                 err_msg=f"d{name}, trial {trial}")


def test_masked_keys_and_empty_batch_rows_get_exactly_zero_gradients():
  # Row 1 has no valid key at all; row 0 has holes and left padding. Queries with no allowed key
  # give exactly 0 and dq = 0, and keys no query may see get exactly dk = dv = 0.
  t = s = 13
  q, k, v, cotangent = _qkv(5, t, s, 2)
  valid = np.ones((B, s), bool)
  valid[0, [0, 1, 2, 7]] = False
  valid[1] = False

  def loss(q, k, v):
    out = attention(q, k, v, scale=0.4, kv_valid=jnp.asarray(valid), window=3, impl="chunked",
                    block_q=4, block_kv=5)
    return jnp.sum(out * cotangent), out

  (_, out), (dq, dk, dv) = jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))(q, k, v)
  empty = np.zeros((B, t), bool)
  empty[0, :3] = True  # window 3 and slots 0..2 invalid: queries 0..2 see nothing
  empty[1] = True
  for name, x in (("out", out), ("dq", dq)):
    assert np.all(np.asarray(x)[empty] == 0.0), name
    assert np.all(np.abs(np.asarray(x)[~empty]).max(axis=(-1, -2)) > 0), name
  for name, x in (("dk", dk), ("dv", dv)):
    assert np.all(np.asarray(x)[~valid] == 0.0), name
    assert np.all(np.abs(np.asarray(x)[valid]).max(axis=(-1, -2)) > 0), name


def test_grad_of_a_vmapped_call_whose_output_is_used_twice():
  # An extra leading (vmapped) axis, the output feeding two terms, jit vs eager.
  q, k, v, cotangent = _qkv(6, 9, 11, 1)
  q3 = jnp.stack([q, 0.5 * q, -q])

  def loss(impl, q3, k, v):
    def one(q):
      return attention(q, k, v, scale=0.4, window=4, softcap=2.0, impl=impl, block_q=4, block_kv=3)

    out = jax.vmap(one)(q3)
    return jnp.sum(out * cotangent) + jnp.sum(jnp.sin(out) * out)

  grads = jax.grad(functools.partial(loss, "chunked"), (0, 1, 2))
  eager = grads(q3, k, v)
  jitted = jax.jit(grads)(q3, k, v)
  expected = jax.jit(jax.grad(functools.partial(loss, "reference"), (0, 1, 2)))(q3, k, v)
  for name, e, j, r in zip("qkv", eager, jitted, expected):
    np.testing.assert_allclose(np.asarray(j), np.asarray(e), rtol=1e-6, atol=1e-6, err_msg=name)
    scale = max(float(np.abs(r).max()), 1.0)
    np.testing.assert_allclose(np.asarray(j) / scale, np.asarray(r) / scale, atol=1e-5,
                               err_msg=name)


def test_batch_sharded_on_an_auto_axes_mesh_equals_unsharded():
  # alignax's mesh policy is Auto axes (XLA partitions the plain call).
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  keys = jax.random.split(jax.random.key(4), 3)
  q = jax.random.normal(keys[0], (8, 13, H, HD))
  k, v = (jax.random.normal(x, (8, 11, 2, HD)) for x in keys[1:])
  valid = jnp.arange(11)[None, :] >= jnp.arange(8)[:, None]

  def loss(q, k, v, valid, window):
    out = attention(q, k, v, scale=0.4, kv_valid=valid, window=window, q_index=jnp.arange(13) - 2,
                    impl="chunked", block_q=4, block_kv=5)
    return jnp.sum(out * out)

  grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
  expected = grad(q, k, v, valid, jnp.int32(4))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  with jax.set_mesh(mesh):
    sharded = grad(*(jax.device_put(x, sharding) for x in (q, k, v, valid)), jnp.int32(4))
  for g, e in zip(sharded, expected):
    assert g.sharding.spec[0] == "data"
    np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-6, atol=1e-6)


def test_cudnn_window_without_causal_is_a_named_error():
  # cuDNN's sliding window looks left only: a non-causal window used to reach the library, which
  # rejected it with its own message ("right window") on a GPU.
  q, k, v, _ = _qkv(0, 8, 8, 2)
  with pytest.raises(ValueError, match=r"attention\(impl='cudnn'\) cannot express: a window"):
    attention(q, k, v, scale=1.0, impl="cudnn", causal=False, window=3)


# ------------------------------------------------------------------------------------------------
# benchmarks/device_check.py, the GPU-side decisions, run on CPU.


@pytest.fixture
def device_check():
  path = pathlib.Path(__file__).parents[1] / "benchmarks" / "device_check.py"
  spec = importlib.util.spec_from_file_location("device_check_under_test", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _one_case(dtype):
  return lambda dry_run: [{"name": f"tiny_{dtype}", "shape": (1, 9, 2, 1, 8), "dtype": dtype,
                           "options": {}}]


def test_device_check_runs_fp32_cases_with_fp32_matmuls(device_check, monkeypatch):
  # On a GPU, XLA's DEFAULT precision makes fp32 dots TF32, which alone exceeds the fp32
  # tolerance; the check must measure the kernel, not TF32.
  seen = []

  def recording(*args, impl, **options):
    if impl != "reference":
      seen.append(jax.config.jax_default_matmul_precision)
    return attention(*args, impl=impl, **options)

  monkeypatch.setattr(device_check, "attention", recording)
  monkeypatch.setattr(device_check, "_value_cases", _one_case("float32"))
  report = {}
  device_check.check_attention_values(["chunked"], True, report)
  assert seen and all(p in ("highest", "float32") for p in seen), seen
  assert report["values"][0]["pass"] is True


def test_device_check_fails_a_kernel_two_percent_off_in_bf16(device_check, monkeypatch):
  def two_percent_off(*args, impl, **options):
    out = attention(*args, impl=impl, **options)
    return out * 1.02 if impl == "chunked" else out

  monkeypatch.setattr(device_check, "attention", two_percent_off)
  monkeypatch.setattr(device_check, "_value_cases", _one_case("bfloat16"))
  report = {}
  device_check.check_attention_values(["chunked"], True, report)
  assert report["values"][0]["pass"] is False, report["values"][0]


def test_device_check_counts_a_library_value_error_as_a_failure(device_check, monkeypatch):
  # Only attention's own "cannot express" error is a skip; a library kernel rejecting the call
  # (cuDNN's ValueErrors, say) is a failed check, not a silent skip.
  def library_error(*args, impl, **options):
    if impl == "xla":
      raise ValueError("cuDNN doesn't support this head dimension")
    return attention(*args, impl=impl, **options)

  monkeypatch.setattr(device_check, "attention", library_error)
  monkeypatch.setattr(device_check, "_value_cases", lambda dry_run: [
    {"name": "tiny", "shape": (1, 9, 2, 1, 8), "dtype": "bfloat16", "options": {}},
    {"name": "tiny_softcap", "shape": (1, 9, 2, 1, 8), "dtype": "bfloat16",
     "options": {"softcap": 5.0}},
  ])
  report = {}
  device_check.check_attention_values(["chunked", "xla"], True, report)
  rows = {(row["case"], row["impl"]): row for row in report["values"]}
  assert rows["tiny", "xla"]["pass"] is False and "head dimension" in rows["tiny", "xla"]["error"]
  assert rows["tiny", "chunked"]["pass"] is True


def test_device_check_exits_nonzero_with_the_table_last(
  device_check, monkeypatch, tmp_path, capsys
):
  def failing_values(impls, dry_run, report):
    report.setdefault("values", []).append(
      {"check": "attention", "case": "c", "impl": "chunked", "out": 1.0, "pass": False})

  monkeypatch.setattr(device_check, "check_attention_values", failing_values)
  for name in ("check_logprob_values", "time_attention", "attention_memory"):
    monkeypatch.setattr(device_check, name, lambda *args: None)
  monkeypatch.setattr("sys.argv", ["device_check.py", "--cpu-dry-run", "--out", str(tmp_path)])
  with pytest.raises(SystemExit) as exit_info:
    device_check.main()
  assert exit_info.value.code not in (None, 0)
  table = (tmp_path / "device_check_table.txt").read_text()
  assert "FAIL" in table and capsys.readouterr().out == table  # stdout is the table alone
  # Nothing checked at all is not a pass either.
  monkeypatch.setattr(device_check, "check_attention_values", lambda *args: None)
  with pytest.raises(SystemExit) as exit_info:
    device_check.main()
  assert exit_info.value.code not in (None, 0)


def test_device_check_compares_pallas_paths_on_valid_query_rows(device_check, monkeypatch):
  # The Pallas paths leave padding slots' query rows at 0 (documented); with right padding the
  # oracle has values there, so comparing every row failed a correct Triton kernel by design.
  t = 20
  valid = jnp.arange(t)[None, :] < jnp.array([[t], [t - 6]])
  monkeypatch.setattr(device_check, "_value_cases", lambda dry_run: [
    {"name": "right_padding", "shape": (2, t, 2, 1, 16), "dtype": "float32",
     "options": {"kv_valid": valid}}])
  report = {}
  device_check.check_attention_values(["chunked", "pallas_gpu"], True, report)  # interpret mode
  rows = {row["impl"]: row for row in report["values"]}
  assert rows["chunked"]["pass"] is True and "rows" not in rows["chunked"]
  assert rows["pallas_gpu"]["pass"] is True, rows["pallas_gpu"]
