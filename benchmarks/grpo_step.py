"""Where a GRPO step's time goes: generation, scoring, old log-probs, reference, update (CPU).

Builds a randomly initialised ~9M-parameter Llama (d 384, 6 layers, the offline tiny tokenizer's
512-token vocabulary, fp32), then runs ``alignax.train.grpo.grpo`` for ``--steps`` optimizer steps
with a rule-based reward (the share of even token ids), no stop token (every completion has
``--completion`` tokens) and ``beta`` from ``--beta`` (0: no reference forward). The trainer's own
per-step timings are read from its metrics: ``time/generation`` (the sampler), ``time/reward`` (decode
and reward functions), ``time/old_logp`` (the training forward that recomputes the behaviour
log-probs), ``time/reference`` (``beta > 0``), ``time/train`` (the optimizer step) and
``step_time``. The first step (which compiles everything) is reported apart; the others give medians
and each part's share of the median step. Prints one JSON object.

  python benchmarks/grpo_step.py [--steps 6 --prompts 8 --generations 8 --completion 64 --beta 0.04]
  python benchmarks/grpo_step.py --quick   # a smoke run on a tiny model, seconds
"""

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile

import jax
import numpy as np
from flax import nnx

import alignax as ax
from alignax.models.config import config_from_hf
from alignax.sharding import make_mesh
from alignax.train.grpo import GRPOConfig, grpo

LLAMA = dict(model_type="llama", hidden_size=384, intermediate_size=768, num_hidden_layers=6,
             num_attention_heads=6, num_key_value_heads=6, max_position_embeddings=1024,
             rms_norm_eps=1e-5, tie_word_embeddings=True)
QUICK = dict(LLAMA, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2)
PARTS = ("time/generation", "time/reward", "time/old_logp", "time/reference", "time/train")


def even_fraction(completion_ids, **kwargs):
  return [float(np.mean([t % 2 == 0 for t in ids])) if ids else 0.0 for ids in completion_ids]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=6)
  parser.add_argument("--prompts", type=int, default=8, help="prompts per step")
  parser.add_argument("--generations", type=int, default=8)
  parser.add_argument("--completion", type=int, default=64, help="max_completion_length")
  parser.add_argument("--beta", type=float, default=0.04)
  parser.add_argument("--quick", action="store_true")
  args = parser.parse_args()
  if args.quick:
    args.steps, args.prompts, args.generations, args.completion = 3, 2, 4, 8

  with tempfile.TemporaryDirectory() as root:
    tokenizer = ax.build_tiny_tokenizer(os.path.join(root, "tok"))
    hf = dict(QUICK if args.quick else LLAMA, vocab_size=len(tokenizer),
              pad_token_id=tokenizer.pad_token_id)
    base = os.path.join(root, "base")
    ax.save_pretrained(ax.CausalLM(config_from_hf(hf), rngs=nnx.Rngs(0)), base)
    mesh = make_mesh(fsdp=1, devices=jax.devices()[:1])
    model = ax.from_pretrained(base, mesh=mesh)
    parameters = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    rows = args.prompts * args.generations
    config = GRPOConfig(output_dir=os.path.join(root, "out"), max_steps=args.steps,
                        per_device_train_batch_size=rows, num_generations=args.generations,
                        max_completion_length=args.completion, stop_token_ids=[],
                        beta=args.beta, logging_steps=args.steps, save_steps=args.steps,
                        log_completions=False, disable_tqdm=True)
    prompts = [{"prompt": f"question {i}: how many apples are left?"} for i in range(64)]
    history = []
    grpo(config, model=model, reward_funcs=[even_fraction], tokenizer=tokenizer,
         train_dataset=prompts, mesh=mesh, on_step=lambda step, m: history.append(m))

  steady = history[1:]
  medians = {part: statistics.median(m.get(part, 0.0) for m in steady) for part in PARTS}
  step = statistics.median(m["step_time"] for m in steady)
  result = {
    "parameters": int(parameters), "rows_per_step": rows, "completion_tokens": args.completion,
    "beta": args.beta, "steps_timed": len(steady),
    "first_step_s": {part: round(history[0].get(part, 0.0), 3) for part in (*PARTS, "step_time")},
    "median_s": {part: round(v, 4) for part, v in medians.items()},
    "median_step_s": round(step, 4),
    "share_of_step": {part: round(v / step, 3) for part, v in medians.items()},
    "generated_tokens_per_s": round(rows * args.completion / medians["time/generation"], 1),
    "jax": jax.__version__, "python": platform.python_version(), "cpu_count": os.cpu_count(),
  }
  json.dump(result, sys.stdout, indent=2)
  print()


if __name__ == "__main__":
  main()
