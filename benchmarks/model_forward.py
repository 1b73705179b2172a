"""Forward throughput and memory of the alignax decoder against ``transformers`` (PyTorch), on CPU.

One process builds a tiny randomly initialised Llama checkpoint with ``transformers``, saves it to a
temporary directory and loads it into both frameworks (fp32 parameters and compute). Both run the
same ``[batch, seq]`` batch (no padding) to full logits:

* alignax: ``jax.jit`` of the model's forward; compile time is measured and reported apart.
  Memory is the compiled executable's ``memory_analysis()``.
* transformers: the model in eval mode under ``torch.inference_mode()`` with its default attention
  (SDPA). Memory is the peak of the bytes allocated during one forward, from the PyTorch profiler's
  allocation events (parameters excluded, as they exist before the call).

After warm-up calls the timed calls alternate between the two frameworks, so a noisy machine slows
both alike; the median of each is reported with tokens/s = batch · seq / median seconds. The logits
of the two are compared as a sanity check. Prints one JSON object.

  python benchmarks/model_forward.py [--batch 8 --seq 256 --repeats 10]
"""

import argparse
import json
import os
import platform
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from flax import nnx
from torch.profiler import ProfilerActivity, profile

import alignax.models

# A small Llama: GQA 8:4, untied head, vocabulary not a power of two.
LLAMA = dict(
  vocab_size=8000,
  hidden_size=256,
  intermediate_size=704,
  num_hidden_layers=4,
  num_attention_heads=8,
  num_key_value_heads=4,
  max_position_embeddings=2048,
  rms_norm_eps=1e-5,
  tie_word_embeddings=False,
)


def _parse_args() -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq", type=int, default=256)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument(
    "--threads", type=int, default=os.cpu_count(), help="torch intra-op threads (default: all)"
  )
  parser.add_argument("--seed", type=int, default=0)
  return parser.parse_args()


def _build_checkpoint(path: str, seed: int) -> None:
  torch.manual_seed(seed)
  config = transformers.LlamaConfig(**LLAMA)
  transformers.LlamaForCausalLM(config).save_pretrained(path)


def _alignax_forward(path: str, input_ids: np.ndarray):
  """The compiled forward, its arguments, compile seconds and memory analysis."""
  model = alignax.models.from_pretrained(path)
  graphdef, state = nnx.split(model)

  def forward(state, input_ids):
    return nnx.merge(graphdef, state)(input_ids).logits

  ids = jnp.asarray(input_ids, jnp.int32)
  start = time.perf_counter()
  compiled = jax.jit(forward).lower(state, ids).compile()
  compile_s = time.perf_counter() - start
  analysis = compiled.memory_analysis()
  memory = {
    "argument_bytes": int(analysis.argument_size_in_bytes),
    "output_bytes": int(analysis.output_size_in_bytes),
    "temp_bytes": int(analysis.temp_size_in_bytes),
    "peak_bytes_excluding_parameters": int(
      analysis.output_size_in_bytes + analysis.temp_size_in_bytes
    ),
  }
  return compiled, (state, ids), compile_s, memory


def _torch_peak_bytes(model, ids: torch.Tensor) -> int:
  """Peak of the running sum of allocations and frees during one forward."""
  with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as p:
    model(input_ids=ids)
  events = sorted(
    (e for e in p.events() if e.self_cpu_memory_usage != 0), key=lambda e: e.time_range.start
  )
  live = peak = 0
  for event in events:
    live += event.self_cpu_memory_usage
    peak = max(peak, live)
  return int(peak)


def main() -> None:
  args = _parse_args()
  torch.set_num_threads(args.threads)
  rng = np.random.default_rng(args.seed)
  input_ids = rng.integers(0, LLAMA["vocab_size"], size=(args.batch, args.seq))
  torch_ids = torch.as_tensor(input_ids)

  with tempfile.TemporaryDirectory() as path:
    _build_checkpoint(path, args.seed)
    compiled, jax_args, compile_s, jax_memory = _alignax_forward(path, input_ids)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

  def run_jax():
    return jax.block_until_ready(compiled(*jax_args))

  def run_torch():
    with torch.inference_mode():
      return hf_model(input_ids=torch_ids).logits

  start = time.perf_counter()
  torch_logits = run_torch()
  torch_first_s = time.perf_counter() - start
  jax_logits = run_jax()
  max_abs_diff = float(np.max(np.abs(np.asarray(jax_logits) - torch_logits.numpy())))
  for _ in range(args.warmup):
    run_jax()
    run_torch()
  jax_times, torch_times = [], []
  for _ in range(args.repeats):
    for fn, times in ((run_jax, jax_times), (run_torch, torch_times)):
      start = time.perf_counter()
      fn()
      times.append(time.perf_counter() - start)

  tokens = args.batch * args.seq
  jax_s, torch_s = statistics.median(jax_times), statistics.median(torch_times)
  torch_peak = _torch_peak_bytes(hf_model, torch_ids)
  parameters = sum(p.numel() for p in hf_model.parameters())
  result = {
    "benchmark": "model_forward",
    "model": {"family": "llama", "parameters": int(parameters), **LLAMA},
    "batch": args.batch,
    "seq": args.seq,
    "dtype": "float32",
    "warmup": args.warmup,
    "repeats": args.repeats,
    "platform": {
      "machine": platform.machine(),
      "cpu_count": os.cpu_count(),
      "jax": jax.__version__,
      "jax_backend": jax.default_backend(),
      "torch": torch.__version__,
      "transformers": transformers.__version__,
      "torch_threads": torch.get_num_threads(),
      "xla_threads": "XLA CPU default (one intra-op pool over all cores)",
    },
    "alignax": {
      "compile_s": round(compile_s, 3),
      "median_s": round(jax_s, 5),
      "tokens_per_s": round(tokens / jax_s, 1),
      "memory": jax_memory,
    },
    "transformers": {
      "attention": hf_model.config._attn_implementation,
      "first_call_s": round(torch_first_s, 3),
      "median_s": round(torch_s, 5),
      "tokens_per_s": round(tokens / torch_s, 1),
      "memory": {"peak_bytes_excluding_parameters": torch_peak},
    },
    "tokens_per_s_ratio_alignax_over_transformers": round(torch_s / jax_s, 3),
    "peak_memory_ratio_alignax_over_transformers": round(
      jax_memory["peak_bytes_excluding_parameters"] / torch_peak, 3
    ),
    "max_abs_logit_diff": max_abs_diff,
  }
  print(json.dumps(result, indent=2))


if __name__ == "__main__":
  main()
