"""Accelerator checks of the attention and log-prob kernels and of a training step, run by
``benchmarks/device_check.sh``.

Five sections, each recorded in one JSON document (``--out``/device_check.json):

  values  every attention implementation against the dense oracle (``impl="reference"``, fp32 at
          HIGHEST precision on the same rounded inputs): output and dq, dk, dv, as the largest
          error relative to the largest oracle magnitude, at a few shapes (odd lengths, padding,
          GQA), ≤ 1e-2 with bf16 inputs and ≤ 1e-4 in fp32 (whose cases run with fp32 matmuls,
          not a GPU's default TF32); only ``attention``'s own "cannot express" ValueError is a
          skip, any other exception a failure; and the log-prob kernels (``impl="pallas"`` and
          ``"chunked"``) against ``impl="reference"`` (log p, entropy, d hidden, d head);
  speed   forward + backward of one causal attention layer (Llama-3.1-8B heads: H 32, K 8, hd 128,
          bf16) per implementation: median of timed runs, each ending in ``block_until_ready``;
  memory  ``memory_analysis()`` temporaries of that forward + backward at T = 8k, 16k, 32k
          (dense implementations up to 16k);
  train   MFU of a full training step (``benchmarks/train_step_mfu.py``: SFT objective, AdamW, a
          ~1B Llama with random weights built on the device, batch 8 × 2048, bf16 compute with fp32
          master weights, remat): tokens/s, model FLOPs per step, achieved FLOP/s, MFU against the
          device's dense bf16 datasheet peak and against a matmul timed in the same run; with
          attention ``auto`` and then, within the section's time budget, ``cudnn``. Goal: MFU ≥ 40%
          (reported, not a pass/fail check);
  status  which implementations ran, which were skipped and why.

A table of the results is printed last (and written to device_check_table.txt); the exit status
is 1 when a value check failed, a section raised, or no value was checked at all.
``--cpu-dry-run`` runs everything at tiny sizes on the CPU (the GPU-only implementations, cuDNN
and the Triton kernel, are skipped with the reason printed), so the script itself is tested before
device time is spent on it. The Pallas paths leave padding slots' query rows at 0 by design, so
they are compared on the other rows (``_pallas_rows``).
"""

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

# A sibling module: benchmarks/ is on sys.path when this runs as a script, not when a test loads it.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_step_mfu  # noqa: E402

from alignax.kernels import token_logprobs
from alignax.kernels.attention import attention

# The prefix of the ValueError ``attention`` raises for a feature an implementation cannot express.
# Only that error is a skip: any other exception (a library kernel rejecting a shape, say) fails.
UNSUPPORTED = "attention(impl="

# Largest error allowed, relative to the largest oracle magnitude. bf16: the rounded output and
# bf16 operands of the score products give a few 2^-9 (the CPU dry run sees <= 5e-3), so 1e-2
# still catches a kernel that is off by 1-2 %. fp32 (fp32 matmuls, see _matmul_precision): ~1e-6.
TOLERANCE = {"bfloat16": 1e-2, "float32": 1e-4}

GPU_ONLY = {"cudnn": "cuDNN runs on NVIDIA GPUs only",
            "pallas_gpu": "the Triton kernel runs on GPUs only (interpret mode is tested on CPU)"}


def _log(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


def _error(actual, expected) -> float:
  actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
  if not np.all(np.isfinite(actual)):
    return float("inf")
  return float(np.max(np.abs(actual - expected)) / max(float(np.max(np.abs(expected))), 1e-6))


def _attention_grad_fn(impl, options):
  def loss(q, k, v, cotangent):
    out = attention(q, k, v, impl=impl, **options)
    return jnp.sum(out.astype(jnp.float32) * cotangent), out

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))


def _matmul_precision(dtype):
  """fp32 cases run with fp32 matmuls: on a GPU, XLA's DEFAULT precision is TF32 (10-bit
  mantissa), which would fail the fp32 tolerance by itself, whatever the kernel."""
  if dtype == jnp.float32:
    return jax.default_matmul_precision("highest")
  return contextlib.nullcontext()


def _attention_inputs(shape, dtype, seed=0):
  b, t, h, kv_heads, hd = shape
  keys = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(keys[0], (b, t, h, hd), jnp.float32).astype(dtype)
  k = jax.random.normal(keys[1], (b, t, kv_heads, hd), jnp.float32).astype(dtype)
  v = jax.random.normal(keys[2], (b, t, kv_heads, hd), jnp.float32).astype(dtype)
  return q, k, v, jax.random.normal(keys[3], (b, t, h, hd), jnp.float32)


def _value_cases(dry_run: bool) -> list[dict]:
  """(name, shape, dtype, options) of the correctness cases. The Pallas paths leave the query rows
  whose own slot is padding (``kv_valid`` False) at 0 by design, where the oracle gives a
  right-padding query the average of the earlier valid keys: ``check_attention_values`` compares
  them on the other rows only, with no cotangent on padding rows (``_pallas_rows``)."""
  t = 45 if dry_run else 1000  # not a multiple of any block
  b, h, kv_heads, hd = (2, 4, 2, 16) if dry_run else (2, 16, 4, 128)
  right = jnp.arange(t)[None, :] < jnp.array([[t], [t - 7]])
  cases = []
  for dtype in ("bfloat16", "float32"):
    cases.append({"name": f"causal_{dtype}", "shape": (b, t, h, kv_heads, hd), "dtype": dtype,
                  "options": {}})
  cases.append({"name": "causal_right_padding_bfloat16", "shape": (b, t, h, kv_heads, hd),
                "dtype": "bfloat16", "options": {"kv_valid": right}})
  cases.append({"name": "window_bfloat16", "shape": (b, t, h, kv_heads, hd),
                "dtype": "bfloat16", "options": {"window": 128 if not dry_run else 9}})
  segments = (jnp.arange(t)[None, :] >= t // 3).astype(jnp.int32).repeat(b, 0)
  # Packing without a soft-cap, the case the Triton kernel (segment ids, no soft-cap) can run.
  cases.append({"name": "packing_bfloat16", "shape": (b, t, h, kv_heads, hd), "dtype": "bfloat16",
                "options": {"q_segment_ids": segments, "kv_segment_ids": segments}})
  cases.append({"name": "packing_softcap_bfloat16", "shape": (b, t, h, 1, hd),
                "dtype": "bfloat16", "options": {"q_segment_ids": segments,
                                                 "kv_segment_ids": segments, "softcap": 30.0}})
  return cases


def _pallas_rows(impl, options):
  """[B, T] query rows compared for ``impl``: all, except padding slots' rows on Pallas paths."""
  if impl.startswith("pallas") and options.get("kv_valid") is not None:
    return options["kv_valid"]
  return None


def check_attention_values(impls, dry_run, report) -> None:
  rows = report.setdefault("values", [])
  for case in _value_cases(dry_run):
    dtype = jnp.dtype(case["dtype"])
    q, k, v, full_cotangent = _attention_inputs(case["shape"], dtype)
    options = {"scale": case["shape"][-1] ** -0.5, **case["options"]}
    upcast = [x.astype(jnp.float32) for x in (q, k, v)]
    oracle = {}  # compared rows (None: all) -> the oracle's output and gradients

    for impl in impls:
      compared = _pallas_rows(impl, options)
      key = None if compared is None else "valid rows"
      cotangent = full_cotangent
      if compared is not None:
        cotangent = jnp.where(compared[:, :, None, None], full_cotangent, 0.0)
      if key not in oracle:
        oracle[key] = _attention_grad_fn("reference", options)(*upcast, cotangent)
      (_, ref_out), ref_grads = oracle[key]
      row = {"check": "attention", "case": case["name"], "impl": impl}
      if impl == "cudnn" and dtype == jnp.float32:
        row["skipped"] = "cuDNN flash attention takes fp16 / bf16 inputs only"
        rows.append(row)
        continue
      try:
        with _matmul_precision(dtype):
          (_, out), grads = _attention_grad_fn(impl, options)(q, k, v, cotangent)
        if compared is not None:
          row["rows"] = "valid query rows only (Pallas leaves padding rows at 0)"
          out, ref_out = (jnp.where(compared[:, :, None, None], x, 0.0) for x in (out, ref_out))
        row["out"] = _error(out, ref_out)
        row.update({f"d{n}": _error(g, r) for n, g, r in zip("qkv", grads, ref_grads)})
        row["tolerance"] = TOLERANCE[dtype.name]
        row["pass"] = max(row[x] for x in ("out", "dq", "dk", "dv")) <= row["tolerance"]
      except ValueError as error:
        if not str(error).startswith(UNSUPPORTED):
          row["error"] = f"ValueError: {str(error)[:400]}"
          row["pass"] = False
        else:  # a feature this implementation cannot express (named by ``attention``)
          row["skipped"] = str(error).split(";")[0]
      except Exception as error:  # noqa: BLE001 (recorded, the other checks go on)
        row["error"] = f"{type(error).__name__}: {str(error)[:400]}"
        row["pass"] = False
      _log(json.dumps(row))
      rows.append(row)


def check_logprob_values(dry_run, report) -> None:
  n, d, v = (64, 32, 500) if dry_run else (4096, 4096, 131072)
  keys = jax.random.split(jax.random.key(1), 3)
  hidden = jax.random.normal(keys[0], (n, d), jnp.float32).astype(jnp.bfloat16)
  head = (0.02 * jax.random.normal(keys[1], (v, d), jnp.float32)).astype(jnp.bfloat16)
  targets = jax.random.randint(keys[2], (n,), 0, v)

  def stats(impl):
    def loss(h, w):
      out = token_logprobs(h, w, targets, impl=impl)  # logp, entropy, lse, target_is_top1
      return jnp.sum(out.logp) + jnp.sum(out.entropy), out

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))

  (_, ref), ref_grads = stats("reference")(hidden.astype(jnp.float32), head.astype(jnp.float32))
  # target_is_top1 on targets that are in turn the argmax and the runner-up of fp32 logits of the
  # same rounded inputs; a token whose top two logits lie within 1e-3 may go either way.
  with jax.default_matmul_precision("highest"):
    top2, top2_ids = jax.lax.top_k(hidden.astype(jnp.float32) @ head.astype(jnp.float32).T, 2)
  hit = jnp.arange(n) % 2 == 0
  top1_targets = jnp.where(hit, top2_ids[:, 0], top2_ids[:, 1])
  decidable = np.asarray(top2[:, 0] - top2[:, 1] > 1e-3)
  top1 = lambda impl: jax.jit(lambda h, w: token_logprobs(  # noqa: E731
    h, w, top1_targets, impl=impl).target_is_top1)
  impls = ["chunked"] + ([] if dry_run else ["pallas"])
  for impl in impls:
    row = {"check": "token_logprobs", "case": f"N{n}_d{d}_V{v}_bf16", "impl": impl}
    try:
      (_, out), grads = stats(impl)(hidden, head)
      row.update({
        "logp": _error(out.logp, ref.logp), "entropy": _error(out.entropy, ref.entropy),
        "dhidden": _error(grads[0], ref_grads[0]), "dhead": _error(grads[1], ref_grads[1]),
      })
      wrong = (np.asarray(top1(impl)(hidden, head)) != np.asarray(hit)) & decidable
      row["top1_wrong"] = int(wrong.sum())
      row["pass"] = max(row["logp"], row["entropy"]) <= 1e-3 and max(
        row["dhidden"], row["dhead"]) <= 3e-2 and row["top1_wrong"] == 0
    except Exception as error:  # noqa: BLE001
      row["error"] = f"{type(error).__name__}: {str(error)[:400]}"
      row["pass"] = False
    _log(json.dumps(row))
    report.setdefault("values", []).append(row)
  if dry_run:
    report.setdefault("skipped", []).append(
      {"check": "token_logprobs", "impl": "pallas", "why": "Pallas does not lower for CPU"})


def _llama_layer(t, dry_run):
  return (1, t, 4, 2, 32) if dry_run else (1, t, 32, 8, 128)


def time_attention(impls, dry_run, iters, report) -> None:
  rows = report.setdefault("speed", [])
  for t in ((256,) if dry_run else (4096, 8192)):
    shape = _llama_layer(t, dry_run)
    q, k, v, cotangent = _attention_inputs(shape, jnp.bfloat16)
    options = {"scale": shape[-1] ** -0.5}
    for impl in impls:
      row = {"impl": impl, "T": t, "shape": "B{} T{} H{} K{} hd{}".format(*shape)}
      try:
        fn = _attention_grad_fn(impl, options)
        jax.block_until_ready(fn(q, k, v, cotangent))
        times = []
        for _ in range(iters):
          start = time.perf_counter()
          jax.block_until_ready(fn(q, k, v, cotangent))
          times.append(time.perf_counter() - start)
        row["fwd_bwd_ms"] = round(1e3 * statistics.median(times), 3)
        # Causal model FLOPs: forward 2 GEMMs, backward 5, each 2·B·H·T²·hd / 2 under the mask.
        flops = 7 * shape[0] * shape[2] * t * t * shape[4]
        row["tflops"] = round(flops / statistics.median(times) / 1e12, 1)
      except Exception as error:  # noqa: BLE001
        row["error"] = f"{type(error).__name__}: {str(error)[:300]}"
      _log(json.dumps(row))
      rows.append(row)


# Dense implementations hold [B, H, T, T] fp32 scores: at T = 32768 with 32 heads that is 128 GiB,
# and XLA's GPU autotuner allocates a GEMM's operands while compiling, so these stop at 16384.
DENSE = {"xla": 16384, "reference": 16384}


def attention_memory(impls, dry_run, report) -> None:
  rows = report.setdefault("memory", [])
  for t in ((512, 1024) if dry_run else (8192, 16384, 32768)):
    shape = _llama_layer(t, dry_run)
    b, _, h, kv_heads, hd = shape
    q = jax.ShapeDtypeStruct((b, t, h, hd), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((b, t, kv_heads, hd), jnp.bfloat16)
    cotangent = jax.ShapeDtypeStruct((b, t, h, hd), jnp.float32)
    for impl in impls:
      row = {"impl": impl, "T": t}
      if t > DENSE.get(impl, t):
        row["error"] = f"not compiled: dense [T, T] scores past T={DENSE[impl]}"
        _log(json.dumps(row))
        rows.append(row)
        continue
      try:
        fn = _attention_grad_fn(impl, {"scale": hd**-0.5})
        analysis = fn.lower(q, kv, kv, cotangent).compile().memory_analysis()
        row["temp_mib"] = round(analysis.temp_size_in_bytes / 2**20, 1)
      except Exception as error:  # noqa: BLE001
        row["error"] = f"{type(error).__name__}: {str(error)[:300]}"
      _log(json.dumps(row))
      rows.append(row)


# Seconds a 1B step build needs (init, a compile of about a minute, 12 steps); the section starts
# one only with this much left before --budget-s runs out, and a second one only with as much left
# as the first took.
TRAIN_STEP_NEEDS_S = 100
MFU_GOAL = 0.40


def time_train_step(dry_run, report, deadline) -> None:
  """The ``train`` section: ``train_step_mfu.measure`` per attention implementation, while the
  script's time budget (``deadline``, a ``time.perf_counter()`` value) allows."""
  section = report.setdefault("train_step", {"runs": []})
  if dry_run:
    hf, batch, length, steps, impls, size = train_step_mfu.LLAMA_TINY, 2, 64, 2, ["auto"], 256
  else:
    hf, batch, length, steps, impls, size = train_step_mfu.LLAMA_1B, 8, 2048, 10, ["auto",
                                                                                  "cudnn"], 8192
  device = jax.devices()[0]
  peak = train_step_mfu.peak_flops(device.device_kind)
  section.update({"device_kind": device.device_kind, "mfu_goal": MFU_GOAL,
                  "peak_tflops": None if peak is None else peak / 1e12,
                  "peak_source": "dense bf16 tensor-core peak from the vendor datasheet "
                                 "(train_step_mfu.PEAK_BF16)" if peak else
                                 f"unknown for {device.device_kind!r}: MFU not computed"})
  needs = 0 if dry_run else TRAIN_STEP_NEEDS_S  # the dry run ignores the budget
  if not dry_run and deadline - time.perf_counter() < needs:
    raise TimeoutError(f"the train-step section needs ~{needs} s and only "
                       f"{deadline - time.perf_counter():.0f} s of --budget-s are left")
  matmul = train_step_mfu.matmul_rate(size)
  section["matmul_tflops"] = round(matmul / 1e12, 3)
  _log(json.dumps({"check": "train_step", "matmul_tflops": section["matmul_tflops"]}))
  for index, impl in enumerate(impls):
    left = deadline - time.perf_counter()
    if index and not dry_run and left < needs:
      section["runs"].append({"attention_impl": impl,
                              "skipped": f"{left:.0f} s left of --budget-s, ~{needs:.0f} s needed"})
      continue
    start = time.perf_counter()
    try:
      row = train_step_mfu.measure(hf, batch=batch, length=length, steps=steps,
                                   remat="dots_with_no_batch_dims", attention_impl=impl, peak=peak,
                                   matmul=matmul, log=_log)
      if row["mfu"] is not None:
        row["meets_goal"] = row["mfu"] >= MFU_GOAL
    except Exception as error:  # noqa: BLE001
      if index == 0:  # the library's default path must run; another impl may be unsupported
        raise
      row = {"attention_impl": impl, "error": f"{type(error).__name__}: {str(error)[:400]}"}
    _log(json.dumps(row))
    section["runs"].append(row)
    needs = max(needs, time.perf_counter() - start)
    jax.clear_caches()  # the next build starts from free device memory


def _table(report) -> str:
  lines = [f"backend {report['backend']}  devices {report['devices']}  jax {report['jax']}"]
  for row in report.get("values", []):
    if "skipped" in row:
      status = "skip: " + row["skipped"]
    elif "error" in row:
      status = "ERROR " + row["error"][:80]
    else:
      errors = {key: row[key] for key in row
                if key not in ("check", "case", "impl", "pass", "tolerance", "rows")}
      status = ("pass " if row["pass"] else "FAIL ") + " ".join(
        f"{key}={value}" if isinstance(value, int) else f"{key}={value:.1e}"
        for key, value in errors.items())
    lines.append(f"values  {row['check']:15} {row['case']:32} {row['impl']:11} {status}")
  for row in report.get("speed", []):
    value = row.get("fwd_bwd_ms", row.get("error", "")[:60])
    lines.append(f"speed   T={row['T']:<6} {row['impl']:11} fwd+bwd ms {value}"
                 + (f"  ({row['tflops']} TFLOP/s)" if "tflops" in row else ""))
  for row in report.get("memory", []):
    lines.append(f"memory  T={row['T']:<6} {row['impl']:11} temp MiB "
                 f"{row.get('temp_mib', row.get('error', '')[:60])}")
  train = report.get("train_step", {})
  for row in train.get("runs", []):
    head = f"train   attn={row.get('attention_impl', '?'):11}"
    if "step_s_median" not in row:
      lines.append(f"{head} {row.get('skipped') or 'ERROR ' + row.get('error', '')[:80]}")
      continue
    mfu = ("n/a (no datasheet peak for this device)" if row["mfu"] is None else
           f"{100 * row['mfu']:.1f}% of {train['peak_tflops']:.1f} TFLOP/s peak")
    lines.append(
      f"{head} {row['params'] / 1e6:.1f}M params B{row['batch']}xT{row['length']} "
      f"remat={row['remat']}: {row['tokens_per_s']:.0f} tok/s, step {row['step_s_median']} s, "
      f"{row['achieved_tflops']} TFLOP/s, MFU {mfu}, {100 * row['fraction_of_matmul']:.1f}% of "
      f"the {train['matmul_tflops']} TFLOP/s matmul")
  for row in report.get("skipped", []):
    lines.append(f"skipped {row['check']:15} {row['impl']:11} {row['why']}")
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--cpu-dry-run", action="store_true")
  parser.add_argument("--out", default=os.environ.get("OUT", "."))
  parser.add_argument("--iters", type=int, default=10)
  parser.add_argument("--budget-s", type=float, default=360.0,
                      help="wall seconds for the whole script: the train-step section is skipped "
                           "(and fails the check) when too little of it is left")
  cli = parser.parse_args()
  deadline = time.perf_counter() + cli.budget_s
  backend = jax.default_backend()
  if not cli.cpu_dry_run and backend != "gpu":
    raise SystemExit(f"device_check.py needs a GPU backend (got {backend!r}); "
                     "use --cpu-dry-run to test the script on a CPU")
  report = {"backend": backend, "devices": [str(d) for d in jax.devices()],
            "jax": jax.__version__, "dry_run": cli.cpu_dry_run, "skipped": []}
  impls = ["chunked", "xla", "cudnn", "pallas_gpu"]
  if backend != "gpu":
    for impl, why in GPU_ONLY.items():
      report["skipped"].append({"check": "attention", "impl": impl, "why": why})
      _log(f"skipping {impl}: {why}")
    impls = [impl for impl in impls if impl not in GPU_ONLY]
  sections = [
    ("attention values", lambda: check_attention_values(impls, cli.cpu_dry_run, report)),
    ("log-prob values", lambda: check_logprob_values(cli.cpu_dry_run, report)),
    ("attention speed", lambda: time_attention(impls, cli.cpu_dry_run,
                                               3 if cli.cpu_dry_run else cli.iters, report)),
    ("attention memory", lambda: attention_memory(impls, cli.cpu_dry_run, report)),
    ("train step MFU", lambda: time_train_step(cli.cpu_dry_run, report, deadline)),
  ]
  for name, section in sections:
    _log(f"== {name}")
    start = time.perf_counter()
    try:
      section()
    except Exception:  # noqa: BLE001 (the report keeps what the other sections found)
      report.setdefault("section_errors", []).append({name: traceback.format_exc()[-2000:]})
      _log(traceback.format_exc())
    report.setdefault("section_seconds", {})[name] = round(time.perf_counter() - start, 1)
    with open(os.path.join(cli.out, "device_check.json"), "w") as file:
      json.dump(report, file, indent=1)
  table = _table(report)
  with open(os.path.join(cli.out, "device_check_table.txt"), "w") as file:
    file.write(table + "\n")
  print(table)
  failure = _failure(report)
  if failure:
    raise SystemExit(failure)


def _failure(report) -> str | None:
  """Why the check failed (the script then exits with status 1), or None."""
  failed = [row for row in report.get("values", []) if row.get("pass") is False]
  checked = [row for row in report.get("values", []) if "pass" in row]
  if failed or report.get("section_errors") or not checked:
    return (f"{len(failed)} of {len(checked)} value checks failed, "
            f"{len(report.get('section_errors', []))} sections raised")
  return None


if __name__ == "__main__":
  main()
