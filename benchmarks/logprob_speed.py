"""Speed of the fused LM-head statistics: pallas and chunked beside the XLA reference, in one run.

Times the forward pass (``vocab_stats``) and forward + backward (``jax.value_and_grad`` of a
log-prob + entropy objective w.r.t. hidden and weight) of each implementation in one process:
warm-up calls, then the median of ``--iters`` timed calls, each ending in ``block_until_ready``.
Prints one JSON object.

Achieved TFLOP/s use model FLOPs, the same count for every implementation:
forward 2·N·d·V (the logits GEMM), forward + backward 6·N·d·V (logits GEMM + dX and dW GEMMs).
Implementations that recompute logits execute more (pallas and chunked: 2 + 2·(2 + 2) = 10·N·d·V,
the backward recomputing the logits once for dX and once for dW); ``executed_flops`` says so.
Temporary memory comes from the compiled executables' ``memory_analysis()``.

On CPU the default shape is small and pallas is skipped (it does not lower for CPU; interpret-mode
timings would measure the interpreter, not the kernel). The accelerator shape to record is

  python benchmarks/logprob_speed.py --n 16384 --d 4096 --v 131072 --dtype bfloat16
"""

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp

from alignax.kernels import chunked, pallas, reference

IMPLEMENTATIONS = {"reference": reference, "chunked": chunked, "pallas": pallas}
ACCELERATOR_SHAPE = {"n": 16384, "d": 4096, "v": 131072}
CPU_SHAPE = {"n": 512, "d": 256, "v": 8192}


def _parse_args() -> argparse.Namespace:
  on_cpu = jax.default_backend() == "cpu"
  shape = CPU_SHAPE if on_cpu else ACCELERATOR_SHAPE
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--n", type=int, default=shape["n"], help="tokens N")
  parser.add_argument("--d", type=int, default=shape["d"], help="hidden size d")
  parser.add_argument("--v", type=int, default=shape["v"], help="vocabulary size V")
  parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
  parser.add_argument(
    "--impls", default="reference,chunked,pallas",
    help="comma-separated subset of " + ",".join(IMPLEMENTATIONS),
  )
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--iters", type=int, default=10 if on_cpu else 30)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  unknown = set(args.impls.split(",")) - set(IMPLEMENTATIONS)
  if unknown:
    parser.error(f"--impls: unknown {sorted(unknown)}; choose from {list(IMPLEMENTATIONS)}")
  return args


def _median_seconds(fn, args, *, warmup: int, iters: int) -> float:
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _temp_bytes(fn, args) -> int | None:
  analysis = fn.lower(*args).compile().memory_analysis()
  return None if analysis is None else int(analysis.temp_size_in_bytes)


def _functions(module, targets):
  def forward(hidden, weight):
    return module.vocab_stats(hidden, weight, targets)

  def objective(hidden, weight):
    # A per-token log-prob + entropy objective, so all three statistics carry a cotangent.
    stats = module.vocab_stats(hidden, weight, targets)
    logp = stats.target_logit - stats.lse
    entropy = stats.lse - stats.expected_logit
    return jnp.mean(logp) + 0.01 * jnp.mean(entropy)

  return jax.jit(forward), jax.jit(jax.value_and_grad(objective, argnums=(0, 1)))


def main() -> None:
  args = _parse_args()
  dtype = jnp.dtype(args.dtype)
  key_h, key_w, key_t = jax.random.split(jax.random.key(args.seed), 3)
  hidden = jax.random.normal(key_h, (args.n, args.d), dtype)
  weight = (jax.random.normal(key_w, (args.v, args.d), jnp.float32) / args.d**0.5).astype(dtype)
  targets = jax.random.randint(key_t, (args.n,), 0, args.v)
  inputs = (hidden, weight)

  ndv = args.n * args.d * args.v
  model_flops = {"forward": 2 * ndv, "forward_backward": 6 * ndv}
  executed = {"reference": 6, "chunked": 10, "pallas": 10}  # N·d·V multiples, forward + backward
  results = {}
  reference_lse = None
  for name in args.impls.split(","):
    if name == "pallas" and jax.default_backend() not in ("tpu", "gpu"):
      results[name] = {
        "skipped": f"Pallas kernels do not lower for {jax.default_backend()!r}; interpret-mode "
                   "timings would measure the interpreter"
      }
      continue
    forward, forward_backward = _functions(IMPLEMENTATIONS[name], targets)
    entry = {}
    for label, fn in (("forward", forward), ("forward_backward", forward_backward)):
      seconds = _median_seconds(fn, inputs, warmup=args.warmup, iters=args.iters)
      entry[label] = {
        "median_ms": round(seconds * 1e3, 3),
        "tflops": round(model_flops[label] / seconds / 1e12, 4),
        "temp_bytes": _temp_bytes(fn, inputs),
      }
    if name in executed:
      entry["executed_flops_forward_backward"] = f"{executed[name]}*N*d*V"
    lse = forward(*inputs).lse
    if name == "reference":
      reference_lse = lse
    elif reference_lse is not None:
      entry["max_abs_lse_diff_vs_reference"] = float(jnp.max(jnp.abs(lse - reference_lse)))
    results[name] = entry

  print(json.dumps({
    "backend": jax.default_backend(),
    "device": jax.devices()[0].device_kind,
    "shape": {"N": args.n, "d": args.d, "V": args.v, "dtype": args.dtype},
    "timing": {"warmup": args.warmup, "iters": args.iters, "statistic": "median"},
    "model_flops": {
      **model_flops, "formula": {"forward": "2*N*d*V", "forward_backward": "6*N*d*V"},
    },
    "results": results,
  }, indent=2))


if __name__ == "__main__":
  main()
