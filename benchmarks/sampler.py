"""Generated tokens/s of ``alignax.sampling.generate`` and ``transformers`` ``generate`` on CPU.

One process builds a randomly initialised ~10M-parameter Llama (d 384, 6 layers, vocabulary 4096)
with ``transformers``, saves it and loads it into both frameworks (fp32). For each batch size both
sample ``--new`` tokens per row from the same left-padded prompts (lengths drawn in
``[prompt/2, prompt]``), at temperature 1 with no filter (the RL setting) and no stop token, so
every row generates exactly ``--new`` tokens:

* alignax: ``generate(model, ids, mask, max_new_tokens=new, stop_token_ids=(), key=...)``; the first
  call compiles (reported as ``first_call_s``), later calls reuse the compiled loop.
* transformers: ``model.generate(do_sample=True, top_k=0, max_new_tokens=new,
  min_new_tokens=new)`` under ``torch.inference_mode()``, default attention (SDPA), its dynamic
  KV cache.

After one warm-up call each, the timed calls alternate between the two frameworks (a noisy machine
slows both alike); tokens/s = batch · new / median seconds. Prints one JSON object (and one line
per batch size on stderr as it goes). ``--threads`` sets torch's intra-op threads: on a machine whose
cores are busy with other work, torch with as many threads as cores slows down far more than XLA
does, so report the thread count with the figures.

  python benchmarks/sampler.py [--batches 1 8 64 --prompt 64 --new 64 --repeats 3 --threads 1]
  python benchmarks/sampler.py --quick   # a smoke run on a tiny model, seconds
"""

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import jax
import numpy as np
import torch
import transformers

import alignax.models
from alignax.sampling import generate

# ~10M parameters: 6 × 1.47M in the blocks plus a tied 4096 × 384 embedding.
LLAMA = dict(
  vocab_size=4096,
  hidden_size=384,
  intermediate_size=768,
  num_hidden_layers=6,
  num_attention_heads=6,
  num_key_value_heads=6,
  max_position_embeddings=2048,
  rms_norm_eps=1e-5,
  tie_word_embeddings=True,
)
QUICK = dict(LLAMA, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, vocab_size=512)


def _parse_args() -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
  parser.add_argument("--prompt", type=int, default=64, help="longest prompt (tokens)")
  parser.add_argument("--new", type=int, default=64, help="tokens generated per row")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument(
    "--threads", type=int, default=os.cpu_count(), help="torch intra-op threads (default: all)"
  )
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--quick", action="store_true", help="tiny model, batches 1 and 4, 1 repeat")
  args = parser.parse_args()
  if args.quick:
    args.batches, args.prompt, args.new, args.repeats = [1, 4], 8, 8, 1
  return args


def _prompts(rng: np.random.Generator, batch: int, longest: int, vocab: int):
  lengths = rng.integers(max(1, longest // 2), longest + 1, size=batch)
  lengths[0] = longest
  ids = np.zeros((batch, longest), np.int64)
  mask = np.zeros((batch, longest), bool)
  for row, n in enumerate(lengths):
    ids[row, longest - n :] = rng.integers(3, vocab, size=n)
    mask[row, longest - n :] = True
  return ids, mask


def main() -> None:
  args = _parse_args()
  torch.set_num_threads(args.threads)
  torch.manual_seed(args.seed)
  spec = QUICK if args.quick else LLAMA
  rng = np.random.default_rng(args.seed)

  with tempfile.TemporaryDirectory() as path:
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**spec)).save_pretrained(path)
    model = alignax.models.from_pretrained(path)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
  parameters = sum(p.numel() for p in hf_model.parameters())

  results = []
  for batch in args.batches:
    ids, mask = _prompts(rng, batch, args.prompt, spec["vocab_size"])
    torch_ids, torch_mask = torch.as_tensor(ids), torch.as_tensor(mask.astype(np.int64))
    calls = iter(range(1 << 30))

    def run_alignax():
      out = generate(model, ids, mask, max_new_tokens=args.new, stop_token_ids=(),
                     key=jax.random.key(next(calls)))
      return jax.block_until_ready(out.tokens)

    def run_transformers():
      with torch.inference_mode():
        return hf_model.generate(
          input_ids=torch_ids, attention_mask=torch_mask, do_sample=True, temperature=1.0,
          top_k=0, top_p=1.0, max_new_tokens=args.new, min_new_tokens=args.new, pad_token_id=0,
        )

    start = time.perf_counter()
    tokens = run_alignax()
    alignax_first = time.perf_counter() - start
    assert tokens.shape == (batch, args.new)
    start = time.perf_counter()
    hf_tokens = run_transformers()
    transformers_first = time.perf_counter() - start
    assert hf_tokens.shape == (batch, args.prompt + args.new), hf_tokens.shape
    times = {"alignax": [], "transformers": []}
    for _ in range(args.repeats):
      for name, fn in (("alignax", run_alignax), ("transformers", run_transformers)):
        start = time.perf_counter()
        fn()
        times[name].append(time.perf_counter() - start)
    generated = batch * args.new
    row = {"batch": batch}
    for name, first in (("alignax", alignax_first), ("transformers", transformers_first)):
      median = statistics.median(times[name])
      row[name] = {
        "first_call_s": round(first, 3),
        "median_s": round(median, 4),
        "tokens_per_s": round(generated / median, 1),
      }
    row["speedup_alignax_over_transformers"] = round(
      row["alignax"]["tokens_per_s"] / row["transformers"]["tokens_per_s"], 2
    )
    results.append(row)
    print(f"batch {batch}: {json.dumps(row)}", file=sys.stderr, flush=True)

  print(json.dumps({
    "benchmark": "sampler",
    "model": {"family": "llama", "parameters": int(parameters), **spec},
    "prompt_tokens_max": args.prompt,
    "new_tokens": args.new,
    "sampling": "temperature 1, no filter, no stop token",
    "repeats": args.repeats,
    "quick": args.quick,
    "platform": {
      "machine": platform.machine(),
      "cpu_count": os.cpu_count(),
      "jax": jax.__version__,
      "jax_backend": jax.default_backend(),
      "torch": torch.__version__,
      "transformers": transformers.__version__,
      "torch_threads": torch.get_num_threads(),
    },
    "results": results,
  }, indent=2))


if __name__ == "__main__":
  main()
