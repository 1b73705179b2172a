r"""Where an alignax DPO step spends its time on CPU: the parts of ``benchmarks/dpo_step.py``'s step
timed one by one, and the step under each LM-head / attention implementation.

Same model family and batch as ``dpo_step.py`` (a random Llama saved with ``transformers`` and
loaded with ``alignax.from_pretrained``; 8 pairs padded to 96 tokens, fp32, one CPU device). Each
part is its own ``jax.jit`` on the same placed batch; the median of ``--iters`` calls after a
compiling call is reported with its model GFLOP/s (the FLOP count of ``dpo_step.py``) and as a
fraction of a jitted ``[n, n] @ [n, n]`` matmul loop timed in the same process:

* ``reference_forward``: the frozen reference's log-probs of chosen and rejected (2·N·tokens);
* ``policy_forward``: the DPO loss of the policy with the reference log-probs given (2·N·tokens);
* ``policy_forward_backward``: its value and gradient (6·N·tokens);
* ``optimizer``: clipping + AdamW on a gradient pytree (no model FLOPs);
* ``step``: the engine's whole step as ``fit`` jits it (8·N·tokens), for each combination of
  ``token_logprobs`` implementation (``chunked``, the CPU default, recomputes the logits twice in
  its backward: 10·N·d·V instead of 6; ``reference`` keeps the ``[tokens, V]`` logits) and model
  attention (``auto`` = the chunked flash-style kernel, ``reference`` = dense scores with plain
  autodiff).

It also counts the compiled step's HLO instructions by opcode (dots, while loops, copies,
transposes) to show what the program executes.

  python benchmarks/dpo_step_profile.py [--vocab 512] [--iters 5]
  python benchmarks/dpo_step_profile.py --vocab 32000
"""

import argparse
import collections
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import transformers
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dpo_step  # noqa: E402  (the benchmark's model shape, data and FLOP count)

import alignax as ax  # noqa: E402
from alignax import data  # noqa: E402
from alignax.losses.supervised import sequence_logprobs  # noqa: E402
from alignax.sharding import make_mesh  # noqa: E402
from alignax.train import objectives  # noqa: E402
from alignax.train.loop import place_on_mesh, _place_batch  # noqa: E402
from alignax.train.optim import make_optimizer  # noqa: E402
from alignax.train.step import init_state, make_train_step  # noqa: E402


def _median_seconds(fn, *args, iters: int) -> float:
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _opcodes(hlo_text: str) -> dict[str, int]:
  counts = collections.Counter()
  for line in hlo_text.splitlines():
    if " = " in line:
      # "%name = <shape> opcode(...)": the shape ends in "]", "}" (layout) or ")" (a tuple).
      match = re.search(r"[\]\)\}] ([a-z][a-z0-9-]*)\(", line.split(" = ", 1)[1])
      if match:
        counts[match.group(1)] += 1
  keep = ("dot", "convolution", "while", "fusion", "copy", "transpose", "custom-call",
          "dynamic-slice", "dynamic-update-slice", "reduce", "scatter", "gather")
  return {k: counts[k] for k in keep if counts[k]}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--vocab", type=int, default=512)
  parser.add_argument("--iters", type=int, default=5)
  parser.add_argument("--matmul_n", type=int, default=2048)
  parser.add_argument("--quick", action="store_true", help="the small model of dpo_step --quick")
  args = parser.parse_args()
  shape = dpo_step.QUICK_MODEL if args.quick else dpo_step.FULL_MODEL
  root = tempfile.mkdtemp(prefix="dpo_profile_")
  inputs = dpo_step._build_inputs(root, shape, [args.vocab], 0)
  tokenizer = transformers.AutoTokenizer.from_pretrained(inputs["tokenizer"])
  config = data.DataConfig(max_length=128, seed=0, pad_to_multiple_of=32)
  train = data.prepare_dataset(data.load_rows(inputs["data"]), tokenizer, task="preference",
                               config=config)
  host = next(iter(data.make_batches(train, batch_size=8, config=config)))
  mesh = make_mesh()
  checkpoint = inputs["checkpoints"][args.vocab]
  sequences, length = 2 * host["input_ids"].shape[1], host["input_ids"].shape[2]
  flops = {"reference_forward": None, "policy_forward": None, "policy_forward_backward": None,
           "optimizer": None}
  full = dpo_step._step_flops(shape, args.vocab, sequences=sequences, length=length)
  without = dpo_step._step_flops(shape, args.vocab, sequences=sequences, length=length,
                                 reference=False)
  flops["reference_forward"] = full - without
  flops["policy_forward"] = full - without  # a forward is a third of forward + backward
  flops["policy_forward_backward"] = without

  n = args.matmul_n
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32) / n**0.5
  matmuls = jax.jit(lambda x, y: jax.lax.fori_loop(0, 4, lambda _, c: c @ y, x))
  matmul_gflops = 4 * 2 * n**3 / _median_seconds(matmuls, a, b, iters=args.iters) / 1e9

  optimizer, schedule = make_optimizer(1e-6, max_steps=dpo_step.MAX_STEPS, max_grad_norm=1.0)
  reference = ax.from_pretrained(checkpoint, mesh=mesh)
  ref_graphdef, ref_state = nnx.split(reference)
  report = {"vocab": args.vocab, "model": shape, "batch": list(host["input_ids"].shape),
            "matmul_gflops": matmul_gflops, "parts": {}, "steps": {}}

  def record(table, name, seconds, model_flops):
    entry = {"ms": seconds * 1e3}
    if model_flops:
      entry["model_gflops"] = model_flops / seconds / 1e9
      entry["fraction_of_matmul"] = entry["model_gflops"] / matmul_gflops
    table[name] = entry

  # The parts, with the default implementations.
  seq = {k: jnp.asarray(host[k]) for k in objectives._SEQUENCE_KEYS}

  @jax.jit
  def reference_forward(state, batch):
    out, mask = objectives._pair_logprobs(nnx.merge(ref_graphdef, state), batch, impl="auto")
    return sequence_logprobs(out.logp, mask)

  record(report["parts"], "reference_forward",
         _median_seconds(reference_forward, ref_state, seq, iters=args.iters),
         flops["reference_forward"])
  ref_logps = np.asarray(reference_forward(ref_state, seq))
  policy = ax.from_pretrained(checkpoint, mesh=mesh)
  graphdef, params, frozen = nnx.split(policy, nnx.Param, ...)
  objective = objectives.dpo_objective(graphdef, beta=0.1)
  batch = {**seq, "ref_logps": jnp.asarray(ref_logps)}
  key = jax.random.key(0)
  loss = jax.jit(lambda p, f, bt: objective.loss(p, f, bt, key)[0])
  grad = jax.jit(jax.value_and_grad(lambda p, f, bt: objective.loss(p, f, bt, key)[0]))
  record(report["parts"], "policy_forward",
         _median_seconds(loss, params, frozen, batch, iters=args.iters), flops["policy_forward"])
  record(report["parts"], "policy_forward_backward",
         _median_seconds(grad, params, frozen, batch, iters=args.iters),
         flops["policy_forward_backward"])
  opt_state = jax.jit(optimizer.init)(params)
  grads = grad(params, frozen, batch)[1]
  update = jax.jit(lambda g, s, p: optimizer.update(g, s, p))
  record(report["parts"], "optimizer",
         _median_seconds(update, grads, opt_state, params, iters=args.iters), None)

  # The whole step under each implementation pair.
  for lm_impl in ("chunked", "reference"):
    for attention in ("auto", "reference"):
      policy = ax.from_pretrained(checkpoint, mesh=mesh, attention_impl=attention)
      ref = ax.from_pretrained(checkpoint, mesh=mesh, attention_impl=attention)
      graphdef, params, frozen = nnx.split(policy, nnx.Param, ...)
      rg, rs = nnx.split(ref)
      objective = objectives.dpo_objective(graphdef, reference_graphdef=rg, beta=0.1, impl=lm_impl)
      state = place_on_mesh(init_state(params, optimizer, frozen=(frozen, rs)), mesh)
      placed = _place_batch(dict(host), mesh, 1, objective.batch_axes)
      step = jax.jit(make_train_step(objective, optimizer, schedule=schedule))  # no donation:
      # the same state is reused for every timed call
      compiled = step.lower(state, placed).compile()
      name = f"token_logprobs={lm_impl},attention={attention}"
      record(report["steps"], name, _median_seconds(compiled, state, placed, iters=args.iters),
             full)
      analysis = compiled.memory_analysis()
      if analysis is not None:
        report["steps"][name]["temp_mib"] = analysis.temp_size_in_bytes / 2**20
      if lm_impl == "chunked" and attention == "auto":
        report["step_hlo_opcodes"] = _opcodes(compiled.as_text())
  shutil.rmtree(root, ignore_errors=True)
  print(json.dumps(report, indent=2))


if __name__ == "__main__":
  main()
