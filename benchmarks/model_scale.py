"""The models at their users' scale, compile-only: attention memory vs length, compile time vs
depth, and the per-device memory of a Llama-3.1-8B training step on 8 devices. Prints JSON.

Nothing here allocates a model: parameters are built abstractly (``nnx.eval_shape``) and every step
is lowered with ``jax.ShapeDtypeStruct`` arguments (carrying their shardings where a mesh is used),
compiled, and measured from the executable (``memory_analysis()``, the optimized HLO text). Runs on
8 fake CPU devices (the script sets ``--xla_force_host_platform_device_count=8`` itself), so it
works on a laptop; XLA:CPU's buffer assignment stands in for an accelerator's, which it
approximates.

The training step everywhere is what a trainer runs: the decoder to its final hidden states, the
fused log-prob loss (``ax.token_logprobs`` with ``model.get_lm_head()``; the ``[tokens, V]`` logits
never exist), and the gradient of every parameter, constrained to the parameter's own sharding.

Sections (``--sections``, default all):

* ``attention``: fwd+bwd temporaries of one Llama-8B-like decoder layer (d 4096, GQA 32:8,
  head_dim 128, intermediate 14336; bf16 compute, fp32 parameters; a 512-token vocabulary so the
  head does not hide the layer) at batch 1 for T in ``--lengths``, through the model's attention
  (``attention_impl="auto"``: the memory-efficient kernel) and, up to ``--reference-max-length``,
  the exact dense attention (``attention_impl="reference"``) for contrast. Goal: T=4096 <= 5x
  T=1024.
* ``depth``: compile seconds and optimized-HLO size of the training step of a small Llama (d 256) at
  2, 8 and 32 layers on an ``fsdp=8`` mesh (best of ``--compile-repeats``). Goal: 32 layers <= 1.5x
  the compile time of 2.
* ``llama8b``: per-device bytes of the Llama-3.1-8B training step (d 4096, 32 layers, GQA 32:8,
  head_dim 128, intermediate 14336, V 128256) on ``fsdp=8`` at ``--tokens-per-device`` tokens per
  device, bf16 compute with fp32 master weights, per remat policy in ``--remat``: arguments
  (parameters + batch), outputs (fp32 gradients), temporaries; plus AdamW's two fp32 moments sharded
  as the parameters, and whether the sum fits an 80 GiB accelerator (H100).

  python benchmarks/model_scale.py                      # everything (several minutes of compile)
  python benchmarks/model_scale.py --sections attention --lengths 1024 2048 4096
"""

import os

_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import alignax as ax  # noqa: E402
from alignax.models.config import config_from_hf  # noqa: E402
from alignax.models.decoder import CausalLM  # noqa: E402
from alignax.models.sharding import set_mesh, state_shardings  # noqa: E402
from alignax.sharding import batch_sharding, make_mesh  # noqa: E402

GIB = 2**30
H100_BYTES = 80 * GIB

# Llama 3.1 8B (meta-llama/Llama-3.1-8B config.json).
LLAMA_8B = dict(
  model_type="llama",
  vocab_size=128256,
  hidden_size=4096,
  intermediate_size=14336,
  num_hidden_layers=32,
  num_attention_heads=32,
  num_key_value_heads=8,
  head_dim=128,
  max_position_embeddings=131072,
  rms_norm_eps=1e-5,
  rope_theta=500000.0,
  rope_scaling=dict(
    rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
    original_max_position_embeddings=8192,
  ),
  tie_word_embeddings=False,
)

# The small Llama of benchmarks/model_forward.py, for compile time against depth.
SMALL_LLAMA = dict(
  model_type="llama",
  vocab_size=8000,
  hidden_size=256,
  intermediate_size=704,
  num_hidden_layers=4,
  num_attention_heads=8,
  num_key_value_heads=4,
  max_position_embeddings=4096,
  rms_norm_eps=1e-5,
  tie_word_embeddings=False,
)


def _parse_args() -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument(
    "--sections", nargs="+", default=["attention", "depth", "llama8b"],
    choices=["attention", "depth", "llama8b"],
  )
  parser.add_argument("--lengths", nargs="+", type=int, default=[1024, 2048, 4096, 8192, 16384])
  parser.add_argument("--reference-max-length", type=int, default=4096)
  parser.add_argument("--depths", nargs="+", type=int, default=[2, 8, 32])
  parser.add_argument("--depth-seq", type=int, default=512)
  parser.add_argument("--compile-repeats", type=int, default=3)
  parser.add_argument("--tokens-per-device", type=int, default=4096)
  parser.add_argument(
    "--remat", nargs="+", default=["none", "full", "dots_with_no_batch_dims"],
    help="remat policies of the 8B step ('none' for no rematerialisation)",
  )
  return parser.parse_args()


def _abstract_step(
  hf: dict[str, Any],
  *,
  batch: int,
  length: int,
  dtype: Any,
  param_dtype: Any,
  remat: str | None,
  mesh: Any,
  attention_impl: str = "auto",
):
  """The jitted training step and its abstract arguments (ShapeDtypeStructs with shardings)."""
  config = config_from_hf(hf)
  model = nnx.eval_shape(
    lambda: CausalLM(
      config, dtype=dtype, param_dtype=param_dtype, remat=remat, attention_impl=attention_impl,
      rngs=nnx.Rngs(0),
    )
  )
  if mesh is not None:
    set_mesh(model, mesh)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  if mesh is not None:
    param_shardings = state_shardings(params, mesh)
    rest_shardings = state_shardings(rest, mesh)
    token_sharding = batch_sharding(mesh, 2, batch_size=batch)
  else:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    param_shardings = jax.tree.map(lambda _: device, params)
    rest_shardings = jax.tree.map(lambda _: device, rest)
    token_sharding = device

  def abstract(tree, shardings):
    return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )

  tokens = [
    jax.ShapeDtypeStruct((batch, length), dt, sharding=token_sharding)
    for dt in (jnp.int32, jnp.bool_, jnp.int32, jnp.bool_)
  ]

  def loss_fn(params, rest, ids, mask, targets, loss_mask):
    model = nnx.merge(graphdef, params, rest)
    hidden = model(ids, mask, compute_logits=False).hidden_states
    logp = ax.token_logprobs(hidden, model.get_lm_head(), targets, mask=loss_mask).logp
    return jnp.sum(logp) / jnp.maximum(jnp.sum(loss_mask), 1)

  def step(params, rest, *batch_arrays):
    loss, grads = jax.value_and_grad(loss_fn)(params, rest, *batch_arrays)
    if mesh is not None:  # as an optimizer update on sharded parameters would consume them
      grads = jax.lax.with_sharding_constraint(grads, param_shardings)
    return loss, grads

  args = (abstract(params, param_shardings), abstract(rest, rest_shardings), *tokens)
  return jax.jit(step), args, params, param_shardings


def _compile(step, args) -> tuple[Any, float, float]:
  """The compiled step, and the wall and CPU (all threads of this process) seconds of lower+compile.

  CPU seconds are the steadier figure on a shared machine: other processes' load stretches the wall
  time but not this process's work.
  """
  wall, cpu = time.perf_counter(), time.process_time()
  compiled = step.lower(*args).compile()
  return compiled, time.perf_counter() - wall, time.process_time() - cpu


def _memory(compiled) -> dict[str, int]:
  m = compiled.memory_analysis()
  return {
    "argument_bytes": int(m.argument_size_in_bytes),
    "output_bytes": int(m.output_size_in_bytes),
    "alias_bytes": int(m.alias_size_in_bytes),
    "temp_bytes": int(m.temp_size_in_bytes),
  }


def _count(text: str, op: str) -> int:
  return text.count(f" {op}(") + text.count(f" {op}-start(")


def attention_section(args) -> dict[str, Any]:
  hf = {**LLAMA_8B, "num_hidden_layers": 1, "vocab_size": 512}
  rows = []
  for impl in ("model", "reference"):
    for length in args.lengths:
      if impl == "reference" and length > args.reference_max_length:
        continue
      step, step_args, _, _ = _abstract_step(
        hf, batch=1, length=length, dtype=jnp.bfloat16, param_dtype=jnp.float32, remat=None,
        mesh=None, attention_impl="auto" if impl == "model" else "reference",
      )
      compiled, seconds, _ = _compile(step, step_args)
      memory = _memory(compiled)
      rows.append({
        "attention": impl, "T": length, "temp_mib": round(memory["temp_bytes"] / 2**20, 1),
        "compile_s": round(seconds, 2),
      })
      print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
  by = {(r["attention"], r["T"]): r["temp_mib"] for r in rows}
  ratios, growth = {}, {}
  for impl in ("model", "reference"):
    if (impl, 1024) in by and (impl, 4096) in by:
      ratios[impl] = round(by[(impl, 4096)] / by[(impl, 1024)], 2)
    # What doubling T adds, relative to the previous doubling: 2 when linear, 4 when quadratic
    # (the constant part, e.g. the bf16 copies of the weights, cancels).
    if all((impl, t) in by for t in (1024, 2048, 4096)):
      growth[impl] = round(
        (by[(impl, 4096)] - by[(impl, 2048)]) / (by[(impl, 2048)] - by[(impl, 1024)]), 2
      )
  return {
    "config": "one Llama-3.1-8B layer (d 4096, GQA 32:8, hd 128, mlp 14336), vocab 512, batch 1, "
    "bf16 compute, fp32 params, no remat, fwd+bwd of the fused log-prob loss",
    "rows": rows,
    "temp_ratio_T4096_over_T1024": ratios,
    "growth_ratio_4096_2048_over_2048_1024": growth,
    "goal_T4096_over_T1024_at_most": 5.0,
    "goal_met": ratios.get("model", float("inf")) <= 5.0,
  }


def depth_section(args) -> dict[str, Any]:
  mesh = make_mesh(fsdp=8)
  rows = []
  for i, depth in enumerate(args.depths):
    hf = {**SMALL_LLAMA, "num_hidden_layers": depth}
    step, step_args, _, _ = _abstract_step(
      hf, batch=8, length=args.depth_seq, dtype=jnp.float32, param_dtype=jnp.float32, remat=None,
      mesh=mesh,
    )
    if i == 0:  # the first SPMD compile of the process also warms up XLA itself: not counted
      _compile(step, step_args)
    walls, cpus = [], []
    for _ in range(args.compile_repeats):
      jax.clear_caches()
      compiled, wall, cpu = _compile(step, step_args)
      walls.append(wall)
      cpus.append(cpu)
    rows.append({
      "layers": depth,
      "compile_wall_s": round(min(walls), 3),
      "compile_cpu_s": round(min(cpus), 3),
      "optimized_hlo_chars": len(compiled.as_text()),
      "stablehlo_chars": len(step.lower(*step_args).as_text()),
    })
    print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
  by = {r["layers"]: r for r in rows}
  ratios = {}
  if 2 in by and 32 in by:
    for key in ("compile_wall_s", "compile_cpu_s"):
      ratios[key] = round(by[32][key] / by[2][key], 2)
  return {
    "config": f"Llama d 256, 8 heads (4 KV), mlp 704, V 8000; batch 8 x {args.depth_seq} tokens, "
    f"fp32, fsdp=8, fwd+bwd of the fused log-prob loss; best of {args.compile_repeats} compiles",
    "rows": rows,
    "compile_ratio_32_over_2_layers": ratios,
    "goal_at_most": 1.5,
    "goal_met": bool(ratios) and max(ratios.values()) <= 1.5,
  }


def llama8b_section(args) -> dict[str, Any]:
  mesh = make_mesh(fsdp=8)
  devices = mesh.size
  results = []
  for remat in args.remat:
    step, step_args, params, shardings = _abstract_step(
      LLAMA_8B, batch=devices, length=args.tokens_per_device, dtype=jnp.bfloat16,
      param_dtype=jnp.float32, remat=None if remat == "none" else remat, mesh=mesh,
    )
    compiled, seconds, _ = _compile(step, step_args)
    memory = _memory(compiled)
    text = compiled.as_text()
    # Bytes of one device's shard of every parameter (fp32), hence of each AdamW moment.
    param_count = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(params))
    shard_bytes = sum(
      int(np.prod(s.shard_shape(v.shape))) * 4
      for v, s in zip(jax.tree.leaves(params), jax.tree.leaves(shardings))
    )
    adamw_bytes = 2 * shard_bytes
    step_bytes = memory["argument_bytes"] + memory["output_bytes"] - memory["alias_bytes"]
    step_bytes += memory["temp_bytes"]
    total = step_bytes + adamw_bytes
    results.append({
      "remat": remat,
      "compile_s": round(seconds, 1),
      "parameters": param_count,
      "per_device": {
        **{k: v for k, v in memory.items()},
        "argument_gib": round(memory["argument_bytes"] / GIB, 2),
        "output_gib": round(memory["output_bytes"] / GIB, 2),
        "temp_gib": round(memory["temp_bytes"] / GIB, 2),
        "step_gib": round(step_bytes / GIB, 2),
        "adamw_moments_gib": round(adamw_bytes / GIB, 2),
        "total_gib": round(total / GIB, 2),
      },
      "fits_80gib": total <= H100_BYTES,
      "collectives": {
        op: _count(text, op) for op in ("all-gather", "all-reduce", "reduce-scatter")
      },
    })
    print(json.dumps(results[-1]), file=sys.stderr, flush=True)
  return {
    "config": f"Llama-3.1-8B, fsdp=8, {args.tokens_per_device} tokens per device "
    f"(global batch {devices} x {args.tokens_per_device}), bf16 compute, fp32 master weights, "
    "fwd+bwd of the fused log-prob loss; AdamW = 2 fp32 moments sharded as the parameters",
    "accelerator_bytes": H100_BYTES,
    "results": results,
  }


def main() -> None:
  args = _parse_args()
  sections = {"attention": attention_section, "depth": depth_section, "llama8b": llama8b_section}
  out: dict[str, Any] = {
    "benchmark": "model_scale",
    "platform": {
      "machine": platform.machine(),
      "cpu_count": os.cpu_count(),
      "jax": jax.__version__,
      "backend": jax.default_backend(),
      "devices": jax.device_count(),
    },
  }
  for name in args.sections:
    out[name] = sections[name](args)
  print(json.dumps(out, indent=2))


if __name__ == "__main__":
  main()
