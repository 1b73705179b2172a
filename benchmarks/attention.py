"""Compiled temporaries of attention forward + backward vs sequence length, per implementation.

Compiles (never runs, unless ``--time``) the gradient w.r.t. q, k, v of ``sum(attention(q, k, v))``
for one causal self-attention layer with a Llama-3.1-8B head layout (H 32, K 8, hd 128, B 1, bf16
by default) at T in {1k, 2k, 4k, 8k, 16k}, on ``jax.ShapeDtypeStruct`` inputs, and prints one JSON
document on stdout (progress on stderr): ``memory_analysis()`` temporary bytes per (impl, T), and
the ratio of temporaries at T=4096 to T=1024 per implementation (linear memory gives 4; dense
[T, S] scores give 16; the goal for ``chunked`` is <= 5).

  python benchmarks/attention.py [--seq 1024,2048,4096,8192,16384] [--impls chunked,reference,xla]
                                 [--dtype bf16|fp32] [--block-q 512 --block-kv 512] [--time]

``--time`` also runs the chunked kernel (forward + backward) at a small size, causal and not, to
show that causal block skipping halves the work on this backend (median of 5 runs; a benchmark,
never a test).
"""

import argparse
import json
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from alignax.kernels.attention import attention

DTYPES = {"bf16": jnp.bfloat16, "fp32": jnp.float32}


def _grad_fn(impl, options):
  def loss(q, k, v):
    return jnp.sum(attention(q, k, v, impl=impl, **options).astype(jnp.float32))

  return jax.grad(loss, argnums=(0, 1, 2))


def _memory(impl, t, args, options) -> dict:
  b, heads, kv_heads, hd, dtype = args
  q = jax.ShapeDtypeStruct((b, t, heads, hd), dtype)
  kv = jax.ShapeDtypeStruct((b, t, kv_heads, hd), dtype)
  start = time.perf_counter()
  analysis = jax.jit(_grad_fn(impl, options)).lower(q, kv, kv).compile().memory_analysis()
  return {
    "impl": impl, "T": t, "temp_bytes": int(analysis.temp_size_in_bytes),
    "argument_bytes": int(analysis.argument_size_in_bytes),
    "compile_s": round(time.perf_counter() - start, 2),
  }


def _time_causal_skipping(options, dtype) -> dict:
  """Median seconds of chunked fwd+bwd at a small size, causal vs not (block skipping check)."""
  t, heads, kv_heads, hd = 2048, 4, 2, 64
  keys = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(keys[0], (1, t, heads, hd), dtype)
  k = jax.random.normal(keys[1], (1, t, kv_heads, hd), dtype)
  v = jax.random.normal(keys[2], (1, t, kv_heads, hd), dtype)
  result = {"T": t, "H": heads, "K": kv_heads, "hd": hd}
  for causal in (True, False):
    fn = jax.jit(_grad_fn("chunked", {**options, "causal": causal}))
    jax.block_until_ready(fn(q, k, v))
    times = []
    for _ in range(5):
      start = time.perf_counter()
      jax.block_until_ready(fn(q, k, v))
      times.append(time.perf_counter() - start)
    result["causal_s" if causal else "full_s"] = round(statistics.median(times), 4)
  result["causal_over_full"] = round(result["causal_s"] / result["full_s"], 3)
  return result


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--seq", default="1024,2048,4096,8192,16384")
  parser.add_argument("--impls", default="chunked,reference,xla")
  parser.add_argument("--dtype", choices=list(DTYPES), default="bf16")
  parser.add_argument("--heads", type=int, default=32)
  parser.add_argument("--kv-heads", type=int, default=8)
  parser.add_argument("--head-dim", type=int, default=128)
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--block-q", type=int, default=None)
  parser.add_argument("--block-kv", type=int, default=None)
  parser.add_argument("--time", action="store_true")
  cli = parser.parse_args()
  dtype = DTYPES[cli.dtype]
  options = {"scale": cli.head_dim**-0.5, "block_q": cli.block_q, "block_kv": cli.block_kv}
  args = (cli.batch, cli.heads, cli.kv_heads, cli.head_dim, dtype)
  rows = []
  for impl in cli.impls.split(","):
    for t in map(int, cli.seq.split(",")):
      print(f"compiling {impl} T={t}", file=sys.stderr, flush=True)
      rows.append(_memory(impl, t, args, options))
  ratios = {}
  for impl in cli.impls.split(","):
    temp = {row["T"]: row["temp_bytes"] for row in rows if row["impl"] == impl}
    if 1024 in temp and 4096 in temp and temp[1024]:
      ratios[impl] = round(temp[4096] / temp[1024], 2)
  report = {
    "benchmark": "attention fwd+bwd compiled temporaries (memory_analysis)",
    "backend": jax.default_backend(), "jax": jax.__version__, "host": platform.machine(),
    "shape": {"B": cli.batch, "H": cli.heads, "K": cli.kv_heads, "hd": cli.head_dim,
              "dtype": cli.dtype, "causal": True},
    "blocks": {"block_q": cli.block_q, "block_kv": cli.block_kv},
    "rows": rows, "temp_ratio_T4096_over_T1024": ratios,
  }
  if cli.time:
    report["causal_skipping"] = _time_causal_skipping(options, dtype)
  print(json.dumps(report, indent=1))


if __name__ == "__main__":
  main()
