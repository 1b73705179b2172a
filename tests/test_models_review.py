"""Review of the scaled models layer: regressions (each failed on the code before its fix) and one
guard (the device-side input checks never sync the host on a valid batch)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P
from model_factories import padded_batch, saved_checkpoint

from alignax import models
from alignax.models import lora as lr
from alignax.sharding import make_mesh


def test_adapters_attached_to_a_sharded_model_are_sharded_like_their_kernels(tmp_path_factory):
  # An 8B model only fits loaded straight onto the mesh, so adapters come after: they used to be
  # created whole on device 0 (and so would their AdamW moments), whatever the mesh.
  path, hf_model = saved_checkpoint(tmp_path_factory, "llama")
  ids, mask, positions = (jnp.asarray(x) for x in padded_batch(hf_model.config.vocab_size))
  mesh = make_mesh(fsdp=2, tensor=4)
  model = models.from_pretrained(path, mesh=mesh)
  lr.apply_lora(model, lr.LoRAConfig(rank=4, alpha=8.0), rngs=nnx.Rngs(1))

  lora = model.model.layers.mlp.up_proj.lora  # kernel axes (layers, embed, mlp)
  specs = ((lora.lora_a, P(None, "fsdp", None)), (lora.lora_b, P(None, None, "tensor")))
  for factor, spec in specs:
    assert isinstance(factor[...].sharding, jax.sharding.NamedSharding)
    assert factor[...].sharding.mesh == mesh and factor[...].sharding.spec == spec
  unsharded = models.from_pretrained(path)
  lr.apply_lora(unsharded, lr.LoRAConfig(rank=4, alpha=8.0), rngs=nnx.Rngs(1))
  for got, want in zip(jax.tree.leaves(nnx.state(model, lr.LoRAParam)),
                       jax.tree.leaves(nnx.state(unsharded, lr.LoRAParam))):
    np.testing.assert_array_equal(got, want)  # same draws, only placed
  step = nnx.jit(lambda m: m(ids, mask, positions).logits)
  np.testing.assert_allclose(step(model), step(unsharded), rtol=1e-5, atol=1e-5)


def test_positions_outside_a_learned_table_are_named_not_nan(tmp_path_factory):
  # GPT-2's table has 32 rows; explicit positions past it (a sampler's decode_step) gave NaN
  # logits silently, eagerly and under jit.
  path, _ = saved_checkpoint(tmp_path_factory, "gpt2")
  model = models.from_pretrained(path)
  ids = jnp.full((2, 4), 5, jnp.int32)
  positions = np.tile(np.arange(28, 32), (2, 1))
  assert np.isfinite(np.asarray(model(ids, positions=jnp.asarray(positions)).logits)).all()
  positions[1, 2] = 32
  want = r"positions\[1, 2\] = 32 is outside the learned position table \[0, 32\)"
  with pytest.raises(ValueError, match=want):
    model(ids, positions=jnp.asarray(positions))
  cache = model.init_cache(2, 8)
  step = nnx.jit(lambda m, t, c, p: m.decode_step(t, c, p).logits)
  with pytest.raises(jax.errors.JaxRuntimeError, match=r"positions\[0, 0\] = 40"):
    jax.block_until_ready(step(model, ids[:, 0], cache, jnp.asarray([40, 3])))
  assert np.isfinite(np.asarray(step(model, ids[:, 0], cache, jnp.asarray([31, 3])))).all()


def _computations(hlo: str) -> dict[str, str]:
  """Compiled HLO text split into ``{computation name: body}`` (ENTRY keyed as ``"ENTRY"``)."""
  bodies = {}
  for block in re.split(r"\n(?=\S)", hlo):
    header = block.split("\n", 1)[0]
    match = re.match(r"(ENTRY\s+)?%?([\w.\-]+)", header)
    if match and "{" in header:
      bodies["ENTRY" if match.group(1) else match.group(2)] = block
  return bodies


def test_the_device_side_input_checks_call_the_host_only_from_a_cond_branch(tmp_path_factory):
  # The valid path must never leave the device: each host callback (token ids, positions, cache
  # overflow) may only sit in a conditional's branch, never in the entry or a loop body.
  path, _ = saved_checkpoint(tmp_path_factory, "gpt2")
  model = models.from_pretrained(path)
  graphdef, state = nnx.split(model)

  def decode(state, tokens, cache, positions):
    return nnx.merge(graphdef, state).decode_step(tokens, cache, positions).logits

  cache = model.init_cache(2, 8)
  args = (state, jnp.ones((2,), jnp.int32), cache, jnp.ones((2,), jnp.int32))
  hlo = jax.jit(decode).lower(*args).compile().as_text()
  bodies = _computations(hlo)
  calls = {
    name: len(re.findall(r"custom-call\(.*callback", body)) for name, body in bodies.items()
  }
  with_callback = {name for name, n in calls.items() if n}
  assert sum(calls.values()) >= 3, calls  # token ids, positions, cache overflow
  branches = set()
  for body in bodies.values():
    for listed in re.findall(r"branch_computations=\{([^}]*)\}", body):
      branches.update(name.strip().lstrip("%") for name in listed.split(","))
    branches.update(re.findall(r"(?:true|false)_computation=%?([\w.\-]+)", body))
  assert with_callback <= branches, (with_callback, branches)


def test_remat_inside_the_layer_scan_adds_no_cse_barriers():
  config = models.config_from_hf(dict(
    model_type="llama", vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
    num_attention_heads=2,
  ))
  model = models.CausalLM(config, remat="dots", rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  ids = jnp.ones((1, 4), jnp.int32)
  jaxpr = jax.make_jaxpr(jax.grad(lambda s: jnp.sum(nnx.merge(graphdef, s)(ids).logits)))(state)
  flags = re.findall(r"prevent_cse=(\w+)", str(jaxpr))
  assert flags and set(flags) == {"False"}, flags


def test_dtype_names_work_in_the_constructors_and_the_cache_and_bad_ones_are_named():
  # from_pretrained took "bf16", but CausalLM(..., dtype="bf16") and init_cache(dtype="bf16") died
  # inside numpy ("data type 'bf16' not understood"), naming no argument.
  config = models.config_from_hf(dict(
    model_type="llama", vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
    num_attention_heads=2,
  ))
  model = models.CausalLM(config, dtype="bf16", rngs=nnx.Rngs(0))
  assert model.model.layers.attn.q_proj.kernel[...].dtype == jnp.float32
  assert model(jnp.ones((1, 3), jnp.int32)).hidden_states.dtype == jnp.bfloat16
  assert model.init_cache(1, 4, dtype="fp32").keys.dtype == jnp.float32
  value = models.ValueModel(config, dtype="bf16", param_dtype="bf16", rngs=nnx.Rngs(0))
  assert value.score.kernel[...].dtype == jnp.bfloat16
  with pytest.raises(ValueError, match=r"param_dtype='bf17' is not a dtype"):
    models.CausalLM(config, param_dtype="bf17", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"dtype='int8' is not a dtype|dtype must be a floating"):
    model.init_cache(1, 4, dtype="int8")


def test_bf16_values_and_rewards_are_accumulated_in_fp32(tmp_path_factory):
  # The score head rounded its output to bf16 before the cast: values of ~100 came back on a grid
  # of 0.5 (PPO's advantages and a reward model's margins inherit that noise).
  path, hf_model = saved_checkpoint(tmp_path_factory, "qwen2", head="score", num_labels=1)
  ids, mask, _ = (jnp.asarray(x) for x in padded_batch(hf_model.config.vocab_size))
  for head in ("value", "score"):
    model = models.from_pretrained(path, head=head, dtype="bf16")
    model.score.kernel[...] = model.score.kernel[...] * 300.0
    out = nnx.jit(lambda m: m(ids, mask))(model)
    hidden = np.asarray(out.hidden_states.astype(jnp.float32), np.float64)
    weight = model.score.kernel[...].astype(jnp.bfloat16).astype(jnp.float32)
    weight = np.asarray(weight, np.float64)
    want = (hidden @ weight)[..., 0]
    if head == "score":
      last = np.asarray(mask).shape[1] - 1 - np.argmax(np.asarray(mask)[:, ::-1], axis=1)
      want = want[np.arange(len(last)), last][:, None]
    got = np.asarray(out.scores, np.float64)
    assert out.scores.dtype == jnp.float32 and np.abs(want).max() > 10
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
  lr.apply_lora(model, lr.LoRAConfig(rank=2, target_modules=("score",)), rngs=nnx.Rngs(0))
  np.testing.assert_array_equal(nnx.jit(lambda m: m(ids, mask))(model).scores, out.scores)


def _spec(array):
  """The partition spec of ``array`` with one entry per dimension (trailing Nones kept)."""
  spec = tuple(array.sharding.spec)
  return P(*spec, *([None] * (array.ndim - len(spec))))


def test_custom_rules_govern_the_activations_and_cache_not_only_the_parameters(tmp_path_factory):
  # The rules table says an optional sequence axis maps to "activation_length"; rules handed to
  # from_pretrained / shard_model reached the parameters only, while the activations and the KV
  # cache kept the default table (batch over fsdp), whatever the user asked for.
  path, hf_model = saved_checkpoint(tmp_path_factory, "llama")
  ids, mask, _ = padded_batch(hf_model.config.vocab_size, length=10)
  ids, mask = jnp.asarray(np.resize(ids, (4, 10))), jnp.asarray(np.resize(mask, (4, 10)))
  sequence_parallel = (
    ("activation_batch", "data"), ("activation_length", "fsdp"), *models.DEFAULT_RULES
  )
  mesh = make_mesh(fsdp=2, tensor=4)
  step = nnx.jit(lambda m, i, a: m(i, a))
  want = step(models.from_pretrained(path), ids, mask)

  for model in (
    models.from_pretrained(path, mesh=mesh, rules=sequence_parallel),
    models.shard_model(models.from_pretrained(path), mesh, sequence_parallel),
  ):
    out = step(model, ids, mask)
    assert _spec(out.hidden_states) == P(None, "fsdp", None)
    np.testing.assert_allclose(
      np.asarray(out.logits)[np.asarray(mask)], np.asarray(want.logits)[np.asarray(mask)],
      atol=1e-5,
    )
    cache = model.init_cache(batch=4, max_len=12)
    assert _spec(cache.keys) == P(None, None, "fsdp", None, None)
    lr.apply_lora(model, lr.LoRAConfig(rank=2, target_modules=("up_proj",)), rngs=nnx.Rngs(0))
    assert _spec(model.model.layers.mlp.up_proj.lora.lora_a[...]) == P(None, "fsdp", None)
  # Rules that keep the embed dimension whole reach the adapters too.
  no_fsdp = (("embed", None), *models.DEFAULT_RULES)
  model = models.from_pretrained(path, mesh=mesh, rules=no_fsdp)
  lr.apply_lora(model, lr.LoRAConfig(rank=2, target_modules=("up_proj",)), rngs=nnx.Rngs(0))
  assert _spec(model.model.layers.mlp.up_proj.lora.lora_a[...]) == P(None, None, None)
