r"""Backward / forward time of the scanned decoder alone on CPU, with and without the hand-written
VJP of :func:`alignax.models.layers.matmul`.

A random Llama (``transformers.LlamaConfig`` sizes, default: the DPO benchmark's ~10M model: d 384,
6 layers, 6 heads, MLP 1024, batch 16 × 96 tokens, fp32) and the loss ``mean(h²)`` of its final
hidden states. For each variant (``custom_vjp``: the library's ``matmul``; ``jnp.dot``: the same
model with plain autodiff of ``jnp.dot`` patched in) it compiles ``loss`` and ``jax.grad(loss)``,
times them interleaved (min of ``--rounds``) and prints the ratio, then the largest gradient
difference between the variants.

  python benchmarks/decoder_backward.py [--hidden 384] [--layers 6] [--rounds 4]
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import transformers
from flax import nnx

from alignax.models import layers
from alignax.models.config import config_from_hf
from alignax.models.decoder import Transformer


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--hidden", type=int, default=384)
  parser.add_argument("--intermediate", type=int, default=1024)
  parser.add_argument("--layers", type=int, default=6)
  parser.add_argument("--heads", type=int, default=6)
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--length", type=int, default=96)
  parser.add_argument("--attention", default="auto", help="attention_impl of the decoder")
  parser.add_argument("--rounds", type=int, default=4)
  args = parser.parse_args()

  hf = transformers.LlamaConfig(
    hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
    num_attention_heads=args.heads, num_key_value_heads=args.heads, vocab_size=512,
  ).to_dict()
  model = Transformer(config_from_hf(hf), attention_impl=args.attention, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  ids = jnp.asarray(
    np.random.RandomState(0).randint(0, 512, (args.batch, args.length)), jnp.int32
  )

  def loss(params):
    hidden, _ = nnx.merge(graphdef, params)(ids)
    return jnp.mean(hidden * hidden)

  variants = {"custom_vjp": layers.matmul, "jnp.dot": jnp.dot}
  compiled = {}
  for name, matmul in variants.items():
    layers.matmul = matmul  # read by Linear.__call__ at trace time
    compiled[name] = (
      jax.jit(loss).lower(params).compile(),
      jax.jit(jax.grad(loss)).lower(params).compile(),
    )
  layers.matmul = variants["custom_vjp"]

  best = {name: [float("inf"), float("inf")] for name in compiled}
  for _ in range(args.rounds):  # interleaved, so a noisy neighbour hits every variant alike
    for name, fns in compiled.items():
      for i, fn in enumerate(fns):
        jax.block_until_ready(fn(params))
        start = time.perf_counter()
        jax.block_until_ready(fn(params))
        best[name][i] = min(best[name][i], time.perf_counter() - start)
  print(f"devices {jax.devices()}  d {args.hidden}  L {args.layers}  "
        f"tokens {args.batch}x{args.length}  attention {args.attention}")
  for name, (forward, backward) in best.items():
    print(f"{name:11s} forward {forward:.3f}s  forward+backward {backward:.3f}s  "
          f"ratio {backward / forward:.2f}")
  grads = {name: jax.tree.leaves(fns[1](params)) for name, fns in compiled.items()}
  diff = max(
    float(jnp.max(jnp.abs(a - b))) for a, b in zip(grads["custom_vjp"], grads["jnp.dot"])
  )
  print(f"max |grad difference| {diff:.3g}")


if __name__ == "__main__":
  main()
