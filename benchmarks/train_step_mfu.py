"""Model FLOPs utilisation (MFU) of one full alignax training step on one device. Prints JSON.

The step is the one every trainer runs: ``alignax.train.step.make_train_step`` with the SFT
objective (``alignax.train.objectives.sft_objective``: decoder to hidden states, fused
``token_logprobs`` on the LM head, token-mean NLL) and AdamW with gradient clipping from
``alignax.train.optim.make_optimizer``, jitted with the state donated. The model is a Llama built
with random weights directly on the device (nothing is downloaded), bf16 compute with fp32 master
weights and fp32 optimizer moments, every block rematerialised with ``--remat``.

Model FLOPs per step (the MFU convention of PaLM, Chowdhery et al. 2022, appendix B: what the model
needs, not what the kernels execute, so recomputation is not counted):

  6 · N · B · T                       the weight matmuls, forward (2) and backward (4), where
                                      N = L · (d·(H + 2K)·hd + H·hd·d + 3·d·F) + V·d
                                      counts every matmul weight (not the input embedding lookup,
                                      nor norms);
  + 6 · B · L · H · hd · T · (T + 1)  causal attention: Q·Kᵀ and P·V over the T(T+1)/2 visible
                                      pairs, 2 FLOPs per multiply-add, times 3 for fwd + bwd.

``mfu`` divides achieved model FLOP/s by the device's dense bf16 peak (``PEAK_BF16``, from the
vendor's datasheet; ``--peak-tflops`` overrides it). ``mfu_palm`` counts attention as PaLM does,
over all T² pairs (12 · B · L · H · hd · T²), for comparison with published figures. The same run
times a large bf16 matmul, the rate this device actually reaches (``matmul_tflops``), and reports
the step as a fraction of it too.

Timing: one call to compile and warm up, then ``--steps`` steps, each ending in
``block_until_ready``; the median step time is reported (start-up and compile excluded).

  python benchmarks/train_step_mfu.py                       # ~1B Llama, batch 8 x 2048 (GPU)
  python benchmarks/train_step_mfu.py --tiny                # seconds on a CPU
  python benchmarks/train_step_mfu.py --attention auto cudnn --remat full
"""

import argparse
import json
import statistics
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# Dense (no sparsity) bf16 tensor-core peaks per device kind (``jax.Device.device_kind``), from the
# vendors' datasheets: NVIDIA H100/H200 SXM "BF16 Tensor Core 1,979 TFLOPS" with 2:4 sparsity, so
# 989.5 dense; H100 PCIe 1,513 sparse (756.5 dense); H200 NVL / H100 NVL 1,671 sparse (835.5 dense);
# A100 312 dense. Longest names first: "NVIDIA H200 NVL" must not match "NVIDIA H200".
PEAK_BF16 = {
  "NVIDIA H200 NVL": 835.5e12,
  "NVIDIA H100 NVL": 835.5e12,
  "NVIDIA H100 PCIe": 756.5e12,
  "NVIDIA H200": 989.5e12,
  "NVIDIA H100": 989.5e12,
  "NVIDIA A100": 312e12,
}

# A ~1B-parameter Llama shape (TinyLlama-1.1B's widths at 16 layers instead of 22): 0.821e9 matmul
# weights (layers 0.755e9, LM head 0.066e9) plus the 0.066e9 input embedding: 0.886e9 parameters.
LLAMA_1B = dict(
  model_type="llama", vocab_size=32000, hidden_size=2048, intermediate_size=5632,
  num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
  max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
)
# The same architecture at a size a CPU steps in well under a second.
LLAMA_TINY = dict(LLAMA_1B, vocab_size=512, hidden_size=64, intermediate_size=176,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  max_position_embeddings=256)


def peak_flops(device_kind: str) -> float | None:
  """The dense bf16 peak of ``device_kind`` from ``PEAK_BF16`` (longest matching name), or None."""
  for name in sorted(PEAK_BF16, key=len, reverse=True):
    if device_kind.startswith(name):
      return PEAK_BF16[name]
  return None


def matmul_weights(hf: dict[str, Any]) -> int:
  """N: the weights that take part in a matmul per token (layers' projections and the LM head)."""
  d, f, layers = hf["hidden_size"], hf["intermediate_size"], hf["num_hidden_layers"]
  heads, kv_heads = hf["num_attention_heads"], hf["num_key_value_heads"]
  hd = hf.get("head_dim") or d // heads
  per_layer = d * (heads + 2 * kv_heads) * hd + heads * hd * d + 3 * d * f
  return layers * per_layer + hf["vocab_size"] * d


def model_flops(hf: dict[str, Any], *, batch: int, length: int) -> dict[str, int]:
  """Model FLOPs of one training step (forward + backward) at ``batch`` × ``length`` tokens."""
  heads, layers = hf["num_attention_heads"], hf["num_hidden_layers"]
  hd = hf.get("head_dim") or hf["hidden_size"] // heads
  dense = 6 * matmul_weights(hf) * batch * length
  causal = 6 * batch * layers * heads * hd * length * (length + 1)
  full = 12 * batch * layers * heads * hd * length * length
  return {"matmul": dense, "attention_causal": causal, "attention_full": full,
          "total": dense + causal, "total_palm": dense + full}


def matmul_rate(size: int, *, iters: int = 10) -> float:
  """FLOP/s of a ``size``³ bf16 matmul with an fp32 accumulator (median of ``iters``)."""
  keys = jax.random.split(jax.random.key(0), 2)
  a = jax.random.normal(keys[0], (size, size), jnp.bfloat16)
  b = jax.random.normal(keys[1], (size, size), jnp.bfloat16)
  fn = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
  jax.block_until_ready(fn(a, b))
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    jax.block_until_ready(fn(a, b))
    times.append(time.perf_counter() - start)
  return 2 * size**3 / statistics.median(times)


def measure(hf: dict[str, Any], *, batch: int, length: int, steps: int, remat: str | None,
            attention_impl: str = "auto", logprob_impl: str = "auto", seed: int = 0,
            peak: float | None = None, matmul: float | None = None,
            log=lambda message: None) -> dict[str, Any]:
  """Builds the model and the jitted step on the default device and times ``steps`` steps.

  Returns a JSON-able dict: shape, parameter counts, compile seconds, step times, tokens/s, model
  FLOPs per step, achieved FLOP/s, ``mfu`` / ``mfu_palm`` against ``peak`` (None when unknown),
  fraction of ``matmul`` (a measured matmul FLOP/s, when given) and the step's final loss.
  """
  from flax import nnx

  from alignax.models.config import config_from_hf
  from alignax.models.decoder import CausalLM
  from alignax.train.objectives import sft_objective
  from alignax.train.optim import make_optimizer
  from alignax.train.step import init_state, make_train_step, split_micro_batches

  row: dict[str, Any] = {"model": {k: hf[k] for k in ("hidden_size", "intermediate_size",
                                                      "num_hidden_layers", "num_attention_heads",
                                                      "num_key_value_heads", "vocab_size")},
                         "batch": batch, "length": length, "remat": remat,
                         "attention_impl": attention_impl, "logprob_impl": logprob_impl,
                         "dtype": "bfloat16 compute, float32 params and AdamW moments"}
  start = time.perf_counter()
  model = CausalLM(config_from_hf(hf), dtype=jnp.bfloat16, param_dtype=jnp.float32, remat=remat,
                   attention_impl=attention_impl, rngs=nnx.Rngs(seed))
  graphdef, params, frozen = nnx.split(model, nnx.Param, ...)
  del model
  row["params"] = int(sum(x.size for x in jax.tree.leaves(params)))
  row["matmul_weights"] = matmul_weights(hf)
  # The FLOP count's N must be the model's own projection and head kernels.
  kernels = sum(x.size for path, x in jax.tree_util.tree_flatten_with_path(params)[0]
                if "kernel" in jax.tree_util.keystr(path))
  if kernels != row["matmul_weights"]:
    raise ValueError(f"matmul_weights(hf) = {row['matmul_weights']} but the model's kernels hold "
                     f"{kernels} weights: the FLOP formula does not describe this architecture")
  optimizer, schedule = make_optimizer(1e-5, max_steps=1000, warmup_steps=10, weight_decay=0.01)
  state = init_state(params, optimizer, frozen=frozen, seed=seed)
  del params
  step = jax.jit(make_train_step(sft_objective(graphdef, impl=logprob_impl), optimizer,
                                 schedule=schedule), donate_argnums=0)
  ids = jax.random.randint(jax.random.key(seed + 1), (batch, length), 0, hf["vocab_size"],
                           jnp.int32)
  data = split_micro_batches({"input_ids": ids, "attention_mask": jnp.ones_like(ids, bool)}, 1)
  jax.block_until_ready((state, data))
  row["init_s"] = round(time.perf_counter() - start, 2)
  log(f"train step: model and optimizer state built in {row['init_s']} s; compiling")

  start = time.perf_counter()
  compiled = step.lower(state, data).compile()
  row["compile_s"] = round(time.perf_counter() - start, 2)
  memory = compiled.memory_analysis()
  if memory is not None:
    row["temp_gib"] = round(memory.temp_size_in_bytes / 2**30, 2)
    row["argument_gib"] = round(memory.argument_size_in_bytes / 2**30, 2)
  log(f"train step: compiled in {row['compile_s']} s; warm-up step")
  start = time.perf_counter()
  state, metrics = compiled(state, data)
  jax.block_until_ready(metrics)
  row["first_step_s"] = round(time.perf_counter() - start, 3)
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    state, metrics = compiled(state, data)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  row["loss"] = float(metrics["loss"])
  if not np.isfinite(row["loss"]):
    raise FloatingPointError(f"the timed steps ended with loss {row['loss']}")

  seconds = statistics.median(times)
  flops = model_flops(hf, batch=batch, length=length)
  row.update({
    "steps_timed": steps, "step_s_median": round(seconds, 4),
    "step_s_min": round(min(times), 4), "step_s_max": round(max(times), 4),
    "tokens_per_s": round(batch * length / seconds, 1),
    "model_flops_per_step": flops["total"], "model_flops_per_step_palm": flops["total_palm"],
    "attention_flops_share": round(flops["attention_causal"] / flops["total"], 4),
    "achieved_tflops": float(f"{flops['total'] / seconds / 1e12:.4g}"),
    "peak_tflops": None if peak is None else round(peak / 1e12, 1),
    "mfu": None if peak is None else round(flops["total"] / seconds / peak, 4),
    "mfu_palm": None if peak is None else round(flops["total_palm"] / seconds / peak, 4),
  })
  if matmul is not None:
    row["fraction_of_matmul"] = round(flops["total"] / seconds / matmul, 4)
  return row


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--tiny", action="store_true", help="a 2-layer d=64 Llama (CPU, seconds)")
  parser.add_argument("--batch", type=int, default=None, help="sequences per step (default 8; 2 "
                      "with --tiny)")
  parser.add_argument("--length", type=int, default=None, help="tokens per sequence (default "
                      "2048; 64 with --tiny)")
  parser.add_argument("--steps", type=int, default=None, help="timed steps (default 10; 2 tiny)")
  parser.add_argument("--remat", default="dots_with_no_batch_dims",
                      help="remat policy of every block, or 'none'")
  parser.add_argument("--attention", nargs="+", default=["auto"],
                      help="attention implementations to time, one step build each")
  parser.add_argument("--logprob-impl", default="auto")
  parser.add_argument("--peak-tflops", type=float, default=None,
                      help="dense bf16 peak of the device (default: PEAK_BF16 by device kind)")
  parser.add_argument("--matmul-size", type=int, default=None,
                      help="side of the reference bf16 matmul (default 8192; 256 with --tiny)")
  cli = parser.parse_args()
  hf = LLAMA_TINY if cli.tiny else LLAMA_1B
  batch = cli.batch or (2 if cli.tiny else 8)
  length = cli.length or (64 if cli.tiny else 2048)
  steps = cli.steps or (2 if cli.tiny else 10)
  device = jax.devices()[0]
  peak = cli.peak_tflops * 1e12 if cli.peak_tflops else peak_flops(device.device_kind)
  log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
  report: dict[str, Any] = {"device": device.device_kind, "backend": jax.default_backend(),
                            "jax": jax.__version__, "peak_tflops": peak and peak / 1e12}
  matmul = matmul_rate(cli.matmul_size or (256 if cli.tiny else 8192))
  report["matmul_tflops"] = round(matmul / 1e12, 3)
  report["runs"] = []
  for impl in cli.attention:
    report["runs"].append(measure(
      hf, batch=batch, length=length, steps=steps,
      remat=None if cli.remat == "none" else cli.remat, attention_impl=impl,
      logprob_impl=cli.logprob_impl, peak=peak, matmul=matmul, log=log))
  print(json.dumps(report, indent=1))


if __name__ == "__main__":
  main()
