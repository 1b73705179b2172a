"""Compiled temporary memory of per-token log-prob statistics: reference vs chunked vs pallas.

Compiles (never runs) ``vocab_stats`` forward, and forward + backward (gradient w.r.t. hidden and
weight of a loss that uses all three statistics), on ``jax.ShapeDtypeStruct`` inputs. Prints one
JSON document on stdout (progress lines go to stderr) with what ``compiled.memory_analysis()``
reports: temporary, argument and output bytes, plus each implementation's temporaries as a
fraction of the reference's.

  python benchmarks/logprob_memory.py [--shapes small|large|all] [--impls reference,chunked,pallas]

Pallas is lowered for the backend this runs on; where it cannot be lowered natively (a CPU host),
it is lowered in interpret mode and the entry says so (``"pallas_mode": "interpret"``).
"""

import argparse
import functools
import json
import platform
import sys
import time

import jax
import jax.numpy as jnp

from alignax.kernels import chunked, reference

SHAPES = {"small": (8192, 1024, 65536), "large": (32768, 2048, 131072)}  # (N, d, V)
DTYPES = {"bf16": jnp.bfloat16, "fp32": jnp.float32}


def _loss(stats_fn):
  def loss(hidden, weight, targets):
    stats = stats_fn(hidden, weight, targets)
    return jnp.sum(stats.target_logit - stats.lse) + jnp.sum(stats.lse - stats.expected_logit)

  return loss


def _memory(fn, args) -> dict:
  start = time.perf_counter()
  analysis = jax.jit(fn).lower(*args).compile().memory_analysis()
  return {
    "temp_bytes": int(analysis.temp_size_in_bytes),
    "argument_bytes": int(analysis.argument_size_in_bytes),
    "output_bytes": int(analysis.output_size_in_bytes),
    "compile_s": round(time.perf_counter() - start, 2),
  }


def _pallas_stats_fn():
  """``(vocab_stats, mode)``: native lowering where it works on this backend, else interpret."""
  from alignax.kernels import pallas  # noqa: PLC0415 (optional: the benchmark runs without it)

  probe = (jax.ShapeDtypeStruct((256, 128), jnp.bfloat16),
           jax.ShapeDtypeStruct((512, 128), jnp.bfloat16), jax.ShapeDtypeStruct((256,), jnp.int32))
  try:
    jax.jit(pallas.vocab_stats).lower(*probe).compile()
    return pallas.vocab_stats, "native"
  except Exception:  # noqa: BLE001 (any lowering failure means: not natively lowerable here)
    return functools.partial(pallas.vocab_stats, interpret=True), "interpret"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shapes", choices=[*SHAPES, "all"], default="all")
  parser.add_argument("--impls", default="reference,chunked,pallas")
  flags = parser.parse_args()

  impls = {"reference": reference.vocab_stats, "chunked": chunked.vocab_stats}
  report = {"backend": jax.default_backend(), "jax": jax.__version__,
            "machine": platform.machine(), "results": []}
  wanted = flags.impls.split(",")
  if "pallas" in wanted:
    try:
      impls["pallas"], report["pallas_mode"] = _pallas_stats_fn()
    except Exception as error:  # noqa: BLE001 (report why pallas is missing, keep the rest)
      report["pallas_error"] = f"{type(error).__name__}: {error}"
  impls = {name: fn for name, fn in impls.items() if name in wanted}

  shapes = SHAPES if flags.shapes == "all" else {flags.shapes: SHAPES[flags.shapes]}
  for shape_name, (n, d, v) in shapes.items():
    for dtype_name, dtype in DTYPES.items():
      args = (jax.ShapeDtypeStruct((n, d), dtype), jax.ShapeDtypeStruct((v, d), dtype),
              jax.ShapeDtypeStruct((n,), jnp.int32))
      row = {"shape": shape_name, "N": n, "d": d, "V": v, "dtype": dtype_name,
             "logits_fp32_bytes": n * v * 4}
      for name, stats_fn in impls.items():
        try:
          row[name] = {
            "forward": _memory(stats_fn, args),
            "forward_backward": _memory(jax.grad(_loss(stats_fn), (0, 1)), args),
          }
        except Exception as error:  # noqa: BLE001 (one failing entry must not hide the others)
          row[name] = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
      if "reference" in row and "error" not in row["reference"]:
        for name in impls:
          if name != "reference" and "error" not in row[name]:
            row[name]["temp_fraction_of_reference"] = {
              pass_: round(row[name][pass_]["temp_bytes"]
                           / max(row["reference"][pass_]["temp_bytes"], 1), 5)
              for pass_ in ("forward", "forward_backward")
            }
      report["results"].append(row)
      print(json.dumps(row), file=sys.stderr, flush=True)  # progress: one line per shape, dtype
  print(json.dumps(report, indent=1))


if __name__ == "__main__":
  main()
