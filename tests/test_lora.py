"""LoRA adapters: zero start, merging into a new model, the disabled reference view, adapter-only
gradients, the LoRA'd LM head, PEFT-layout save/load (checked against transformers with the adapters
folded in by hand) and sharding; adapters on the decoder's stacked layers are stacked too."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import safetensors.numpy
import torch
from flax import nnx
from model_factories import padded_batch, save_hf_model, torch_forward

import alignax as ax
from alignax.models import checkpoint
from alignax.models import lora as lr
from alignax.models.layers import Linear, iter_linears
from alignax.models.sharding import shard_model
from alignax.sharding import make_mesh

LLAMA_TARGETS = lr.LLAMA_TARGETS
GPT2_TARGETS = ("qkv_proj", "o_proj", "up_proj", "down_proj")


@nnx.jit
def _logits(model, ids, mask, positions):
  return model(ids, mask, positions).logits


def logits(model, batch):
  return np.asarray(_logits(model, *batch))


def randomize_adapters(model, seed, scale=0.05):
  """Replaces every adapter factor (B included) with N(0, scale²) draws."""
  state = nnx.state(model, lr.LoRAParam)
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  new = [scale * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves, strict=True)]
  nnx.update(model, jax.tree.unflatten(treedef, new))


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
  """``(checkpoint dir, transformers model, padded batch)`` of a tiny Llama (GQA, biases)."""
  path = tmp_path_factory.mktemp("llama")
  hf_model = save_hf_model("llama", path)
  return path, hf_model, padded_batch(hf_model.config.vocab_size)


def adapted(path, *, seed=1, config=lr.LoRAConfig(rank=4, alpha=8.0)):
  model = checkpoint.from_pretrained(path)
  lr.apply_lora(model, config, rngs=nnx.Rngs(seed))
  return model


class TwoProjections(nnx.Module):
  """The smallest model with projections: ``down(up(x))``."""

  def __init__(self, d_in, *, rngs):
    kw = dict(use_bias=False, dtype=jnp.float32, param_dtype=jnp.float32, rngs=rngs)
    self.up_proj = Linear(d_in, 8, kernel_axes=("embed", "mlp"), **kw)
    self.down_proj = Linear(8, d_in, kernel_axes=("mlp", "embed"), **kw)

  def __call__(self, x):
    return self.down_proj(self.up_proj(x))


def test_zero_initialised_adapters_change_nothing(llama):
  path, _, batch = llama
  base = logits(checkpoint.from_pretrained(path), batch)
  model = adapted(path)
  for _, linear in iter_linears(model):
    if linear.lora is not None:
      assert not np.any(linear.lora.lora_b[...]) and np.all(np.abs(linear.lora.lora_a[...]) > 0)
  np.testing.assert_array_equal(logits(model, batch), base)


def test_apply_lora_targets_every_named_projection(llama):
  path, hf_model, _ = llama
  model = checkpoint.from_pretrained(path)
  config = lr.LoRAConfig(target_modules=("q_proj", "mlp.down_proj"))
  paths = lr.apply_lora(model, config, rngs=nnx.Rngs(0))
  layers = hf_model.config.num_hidden_layers
  assert sorted(paths) == sorted(
    [f"model.layers.{i}.attn.q_proj" for i in range(layers)]
    + [f"model.layers.{i}.mlp.down_proj" for i in range(layers)]
  )
  # One stacked adapter per projection: A [L, in, r], B [L, r, out].
  assert len(jax.tree.leaves(nnx.state(model, lr.LoRAParam))) == 2 * len(paths) // layers
  lora = model.model.layers.attn.q_proj.lora
  assert lora.lora_a[...].shape == (layers, hf_model.config.hidden_size, 8)
  assert lora.lora_b[...].shape == (layers, 8, hf_model.config.hidden_size)


def test_adapter_dtype_defaults_to_the_kernel_dtype():
  model = TwoProjections(6, rngs=nnx.Rngs(0))
  lr.apply_lora(model, lr.LoRAConfig(target_modules=("up_proj",)), rngs=nnx.Rngs(0))
  assert model.up_proj.lora.lora_a[...].dtype == jnp.float32
  bf16 = TwoProjections(6, rngs=nnx.Rngs(0))
  nnx.update(bf16, jax.tree.map(lambda x: x.astype(jnp.bfloat16), nnx.state(bf16)))
  config = lr.LoRAConfig(target_modules=("up_proj",), param_dtype=jnp.float32)
  lr.apply_lora(bf16, config, rngs=nnx.Rngs(0))
  assert bf16.up_proj.kernel[...].dtype == jnp.bfloat16
  assert bf16.up_proj.lora.lora_a[...].dtype == bf16.up_proj.lora.lora_b[...].dtype == jnp.float32


def test_lora_module_matches_the_formula():
  config = lr.LoRAConfig(rank=4, alpha=16.0, target_modules=("up_proj",))
  assert config.scale == 4.0
  assert lr.LoRAConfig(rank=4, alpha=16.0, use_rslora=True).scale == 8.0
  layer = lr.LoRA(6, 5, config, rngs=nnx.Rngs(0))
  bound = 1 / np.sqrt(6)  # A ~ U(-1/sqrt(in), 1/sqrt(in))
  assert np.all(np.abs(layer.lora_a[...]) <= bound)
  layer.lora_b[...] = jax.random.normal(jax.random.key(1), (4, 5))
  x = np.asarray(jax.random.normal(jax.random.key(2), (3, 2, 6)))
  a, b = np.asarray(layer.lora_a[...]), np.asarray(layer.lora_b[...])
  np.testing.assert_allclose(layer(jnp.asarray(x)), 4.0 * x @ a @ b, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(layer.delta_kernel(), 4.0 * a @ b, rtol=1e-6)


def test_dropout_acts_on_the_adapter_input_only_in_training():
  config = lr.LoRAConfig(rank=2, dropout=0.5, target_modules=("up_proj",))
  model = TwoProjections(6, rngs=nnx.Rngs(0))
  lr.apply_lora(model, config, rngs=nnx.Rngs(params=1, dropout=2))
  randomize_adapters(model, 3, scale=1.0)
  x = jax.random.normal(jax.random.key(4), (16, 6))
  first, second = model(x), model(x)
  assert not np.allclose(first, second)  # a fresh mask per call
  evaluation = nnx.view(model, deterministic=True)
  lora = model.up_proj.lora
  up = x @ model.up_proj.kernel[...] + config.scale * x @ lora.lora_a[...] @ lora.lora_b[...]
  np.testing.assert_allclose(evaluation(x), up @ model.down_proj.kernel[...], rtol=1e-5, atol=1e-5)


def test_merge_returns_a_new_model_and_leaves_the_policy_and_its_reference_alone(llama):
  path, _, batch = llama
  base = logits(checkpoint.from_pretrained(path), batch)
  model = adapted(path)
  randomize_adapters(model, 7)
  reference = lr.lora_disabled(model)
  kernels = jax.tree.map(np.asarray, nnx.state(model, nnx.All(nnx.Param, nnx.Not(lr.LoRAParam))))
  policy = logits(model, batch)

  merged = lr.merge_lora(model)

  scale = np.abs(policy).max()
  np.testing.assert_allclose(logits(merged, batch), policy, rtol=1e-5, atol=1e-5 * scale)
  assert not jax.tree.leaves(nnx.state(merged, lr.LoRAParam))  # no adapters left
  q_kernel = kernels["model"]["layers"]["attn"]["q_proj"]["kernel"]
  assert not np.allclose(merged.model.layers.attn.q_proj.kernel[...], q_kernel)
  # The input model is untouched: its kernels, its logits, and its reference view (which merging
  # in place used to turn into the policy).
  after = nnx.state(model, nnx.All(nnx.Param, nnx.Not(lr.LoRAParam)))
  jax.tree.map(np.testing.assert_array_equal, after, kernels)
  np.testing.assert_array_equal(logits(model, batch), policy)
  np.testing.assert_array_equal(logits(reference, batch), base)
  with pytest.raises(ValueError, match="carries no LoRA adapters"):
    lr.lora_disabled(merged)


def test_restoring_a_merged_state_into_an_adapted_model_counts_the_update_once(llama):
  path, _, batch = llama
  model = adapted(path)
  randomize_adapters(model, 7)
  merged = lr.merge_lora(model)
  fresh = adapted(path, seed=3)  # B = 0: adds nothing until trained
  nnx.update(fresh, nnx.state(merged))
  np.testing.assert_allclose(logits(fresh, batch), logits(merged, batch), rtol=1e-6, atol=1e-6)


def test_a_lora_adapted_lm_head_gives_the_kernel_its_effective_weight(llama):
  path, _, batch = llama
  model = adapted(path, config=lr.LoRAConfig(rank=4, alpha=8.0, target_modules=("lm_head",)))
  randomize_adapters(model, 7, scale=0.5)
  ids, mask, positions = (jnp.asarray(x) for x in batch)
  out = nnx.jit(lambda m: m(ids, mask, positions))(model)
  head = model.get_lm_head()
  lora = model.lm_head.lora
  want = model.lm_head.kernel[...] + 2.0 * lora.lora_a[...] @ lora.lora_b[...]  # s = alpha / r
  np.testing.assert_allclose(head.weight, want.T, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(out.hidden_states @ head.weight.T, out.logits, rtol=1e-5, atol=1e-5)
  targets = jnp.roll(ids, -1, axis=1)
  fused = ax.token_logprobs(out.hidden_states, head, targets, mask=mask).logp
  logp = jnp.take_along_axis(jax.nn.log_softmax(out.logits), targets[..., None], -1)[..., 0]
  np.testing.assert_allclose(np.asarray(fused)[batch[1]], np.asarray(logp)[batch[1]], atol=2e-5)
  base = lr.lora_disabled(model).get_lm_head().weight
  np.testing.assert_array_equal(base, model.lm_head.kernel[...].T)


def test_lora_disabled_is_the_base_model_on_shared_weights(llama):
  path, _, batch = llama
  base = logits(checkpoint.from_pretrained(path), batch)
  model = adapted(path)
  randomize_adapters(model, 7)
  reference = lr.lora_disabled(model)
  policy = logits(model, batch)
  assert np.abs(policy - base).max() > 1e-2
  np.testing.assert_array_equal(logits(reference, batch), base)
  # No copy: the view holds the policy's own variables, adapters included.
  for module in ("q_proj", "o_proj"):
    ours = getattr(reference.model.layers.attn, module)
    theirs = getattr(model.model.layers.attn, module)
    assert ours.kernel is theirs.kernel and ours.lora.lora_b is theirs.lora.lora_b
  assert model.model.layers.attn.q_proj.lora.enabled  # the policy keeps its adapters on

  @nnx.jit
  def policy_and_reference(policy, reference, ids, mask, positions):
    return policy(ids, mask, positions).logits, reference(ids, mask, positions).logits

  jit_policy, jit_reference = policy_and_reference(model, reference, *batch)
  np.testing.assert_allclose(jit_policy, policy, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(jit_reference, base, rtol=1e-6, atol=1e-6)


def test_only_adapters_receive_gradients_and_updates(llama):
  path, _, batch = llama
  model = adapted(path)
  randomize_adapters(model, 7)
  ids, mask, positions = batch

  def loss_fn(model):
    return jnp.mean(jax.nn.logsumexp(model(ids, mask, positions).logits, axis=-1))

  frozen = nnx.All(nnx.Param, nnx.Not(lr.LoRAParam))
  base_before = jax.tree.map(np.asarray, nnx.state(model, frozen))
  adapters_before = jax.tree.map(np.asarray, nnx.state(model, lr.LoRAParam))
  optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=lr.LoRAParam)

  @nnx.jit
  def step(model, optimizer):
    grads = nnx.grad(loss_fn, argnums=nnx.DiffState(0, lr.LoRAParam))(model)
    optimizer.update(model, grads)
    return grads

  flat = nnx.to_flat_state(step(model, optimizer))
  assert {str(p[-1]) for p, _ in flat} == {"lora_a", "lora_b"}
  assert len(flat) == len(jax.tree.leaves(adapters_before))
  assert all(np.any(v.get_value() != 0) for _, v in flat)
  jax.tree.map(np.testing.assert_array_equal, nnx.state(model, frozen), base_before)
  adapters_after = nnx.state(model, lr.LoRAParam)
  moved = jax.tree.map(lambda a, b: bool(np.any(a != b)), adapters_after, adapters_before)
  assert all(jax.tree.leaves(moved))


@pytest.mark.parametrize(
  "family, targets", [("llama", LLAMA_TARGETS), ("gpt2", GPT2_TARGETS)], ids=["llama", "gpt2"]
)
def test_saved_adapters_are_peft_tensors_transformers_agrees_with(family, targets, tmp_path):
  """Folding the saved ``lora_B @ lora_A`` into the torch weights by hand gives alignax's logits."""
  hf_model = save_hf_model(family, tmp_path / "base")
  batch = padded_batch(hf_model.config.vocab_size)
  config = lr.LoRAConfig(rank=3, alpha=6.0, target_modules=targets)
  model = adapted(tmp_path / "base", config=config)
  randomize_adapters(model, 11, scale=0.2)
  lr.save_lora(model, tmp_path / "adapter")

  peft_config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
  assert (peft_config["peft_type"], peft_config["r"], peft_config["lora_alpha"]) == ("LORA", 3, 6.0)
  assert peft_config["fan_in_fan_out"] == (family == "gpt2")
  tensors = safetensors.numpy.load_file(tmp_path / "adapter" / "adapter_model.safetensors")
  modules = {k.removesuffix(".lora_A.weight") for k in tensors if k.endswith(".lora_A.weight")}
  layers = hf_model.config.num_hidden_layers  # one tensor per layer of each stacked adapter
  assert len(tensors) == 2 * len(modules) == layers * len(
    jax.tree.leaves(nnx.state(model, lr.LoRAParam))
  )
  state_dict = hf_model.state_dict()
  assert {m.removeprefix("base_model.model.") + ".weight" for m in modules} <= set(state_dict)
  assert {m.rsplit(".", 1)[-1] for m in modules} == set(peft_config["target_modules"])
  with torch.no_grad():
    for module in modules:
      a, b = tensors[module + ".lora_A.weight"], tensors[module + ".lora_B.weight"]
      weight = state_dict[module.removeprefix("base_model.model.") + ".weight"]
      assert a.shape[0] == b.shape[1] == 3  # [r, in] and [out, r]
      delta = torch.as_tensor(2.0 * b @ a)  # scale = alpha / r
      weight += delta.T if family == "gpt2" else delta  # Conv1D stores [in, out]
  expected = torch_forward(hf_model, *batch)
  got = logits(model, batch)
  mask = batch[1]
  np.testing.assert_allclose(got[mask], expected[mask], rtol=0, atol=1e-4 * np.abs(expected).max())
  assert np.abs(got - logits(checkpoint.from_pretrained(tmp_path / "base"), batch)).max() > 1e-2


def test_adapter_only_round_trip(llama, tmp_path):
  path, _, batch = llama
  model = adapted(path, config=lr.LoRAConfig(rank=4, alpha=8.0, use_rslora=True))
  randomize_adapters(model, 5)
  lr.save_lora(model, tmp_path)
  files = sorted(p.name for p in tmp_path.iterdir())
  assert files == ["adapter_config.json", "adapter_model.safetensors"]
  expected = logits(model, batch)

  fresh = checkpoint.from_pretrained(path)
  paths = lr.load_lora(fresh, tmp_path)
  assert len(paths) == 7 * 2
  np.testing.assert_array_equal(logits(fresh, batch), expected)
  # Into a model that already has (other) adapters on the same projections: overwritten.
  again = adapted(path, seed=9, config=lr.LoRAConfig(rank=4, alpha=8.0, use_rslora=True))
  lr.load_lora(again, tmp_path)
  np.testing.assert_array_equal(logits(again, batch), expected)


def test_sharded_base_and_adapters_equal_unsharded(llama):
  path, _, batch = llama
  model = adapted(path)
  randomize_adapters(model, 7)
  expected = logits(model, batch)
  mesh = make_mesh(fsdp=2, tensor=4)
  shard_model(model, mesh)
  lora = model.model.layers.mlp.up_proj.lora  # kernel axes (layers, embed, mlp)
  assert lora.lora_a[...].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", None)
  assert lora.lora_b[...].sharding.spec == jax.sharding.PartitionSpec(None, None, "tensor")
  np.testing.assert_allclose(logits(model, batch), expected, rtol=1e-5, atol=1e-5)
  sharding = model.model.layers.mlp.up_proj.kernel[...].sharding
  merged = lr.merge_lora(model)
  # Merging keeps the kernel where the mesh put it, and the merged model keeps the mesh.
  assert merged.model.layers.mlp.up_proj.kernel[...].sharding == sharding
  assert merged.model.mesh is mesh
  np.testing.assert_allclose(logits(merged, batch), expected, rtol=1e-5, atol=1e-5)


def test_misuse_is_reported():
  model = TwoProjections(6, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="carries no LoRA adapters"):
    lr.lora_disabled(model)
  with pytest.raises(
    ValueError, match=r"\['q_proj'\] match no projection; the model has \['down_proj', 'up_proj'\]"
  ):
    lr.apply_lora(model, lr.LoRAConfig(target_modules=("up_proj", "q_proj")), rngs=nnx.Rngs(0))
  lr.apply_lora(model, lr.LoRAConfig(target_modules=("up_proj",)), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="up_proj already carries a LoRA adapter"):
    lr.apply_lora(model, lr.LoRAConfig(target_modules=("up_proj",)), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="up_proj: adapter is disabled"):
    lr.merge_lora(lr.lora_disabled(model))
  merged = lr.merge_lora(model)
  assert model.up_proj.lora is not None and merged.up_proj.lora is None
  with pytest.raises(ValueError, match="carries no LoRA adapters"):
    lr.merge_lora(merged)
  with pytest.raises(ValueError, match="carries no LoRA adapters"):
    lr.lora_disabled(merged)


@pytest.mark.parametrize(
  "kwargs, match",
  [
    (dict(rank=0), "rank must be a positive int"),
    (dict(alpha=0.0), "alpha must be > 0"),
    (dict(dropout=1.0), r"dropout must lie in \[0, 1\)"),
    (dict(target_modules=()), "target_modules must be a non-empty"),
  ],
)
def test_config_validation(kwargs, match):
  with pytest.raises(ValueError, match=match):
    lr.LoRAConfig(**kwargs)


def test_loading_a_mismatched_adapter_names_the_tensors(tmp_path):
  source = TwoProjections(6, rngs=nnx.Rngs(0))
  both = ("up_proj", "down_proj")
  lr.apply_lora(source, lr.LoRAConfig(rank=2, target_modules=both), rngs=nnx.Rngs(1))
  lr.save_lora(source, tmp_path)
  with pytest.raises(
    ValueError,
    match=r"mis-shaped tensors: base_model\.model\.down_proj\.lora_B\.weight: file \[6, 2\], "
    r"model \[5, 2\]; base_model\.model\.up_proj\.lora_A\.weight: file \[2, 6\], model \[2, 5\]",
  ):
    lr.load_lora(TwoProjections(5, rngs=nnx.Rngs(0)), tmp_path)

  tensors = safetensors.numpy.load_file(tmp_path / "adapter_model.safetensors")
  extra = {**tensors, "base_model.model.gate_proj.lora_A.weight": np.zeros((2, 6), np.float32)}
  safetensors.numpy.save_file(extra, tmp_path / "adapter_model.safetensors")
  with pytest.raises(ValueError, match=r"of the model: \['base_model\.model\.gate_proj"):
    lr.load_lora(TwoProjections(6, rngs=nnx.Rngs(0)), tmp_path)

  del tensors["base_model.model.up_proj.lora_B.weight"]
  safetensors.numpy.save_file(tensors, tmp_path / "adapter_model.safetensors")
  with pytest.raises(ValueError, match=r"missing tensors: \['base_model\.model\.up_proj\.lora_B\."):
    lr.load_lora(TwoProjections(6, rngs=nnx.Rngs(0)), tmp_path)

  target = TwoProjections(6, rngs=nnx.Rngs(0))
  lr.apply_lora(target, lr.LoRAConfig(rank=2, alpha=3.0, target_modules=both), rngs=nnx.Rngs(1))
  lr.save_lora(source, tmp_path)
  with pytest.raises(ValueError, match=r"up_proj: \(rank, alpha, rslora\) \(2, 3\.0, False\) in"):
    lr.load_lora(target, tmp_path)

  config = json.loads((tmp_path / "adapter_config.json").read_text())
  (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
  with pytest.raises(ValueError, match="use_dora=True is not supported"):
    lr.load_lora(TwoProjections(6, rngs=nnx.Rngs(0)), tmp_path)
  (tmp_path / "adapter_config.json").unlink()
  with pytest.raises(FileNotFoundError, match="adapter_config.json does not exist"):
    lr.load_lora(TwoProjections(6, rngs=nnx.Rngs(0)), tmp_path)


def test_dropout_on_stacked_adapters_runs_inside_the_layer_scan(llama):
  path, _, batch = llama
  config = lr.LoRAConfig(rank=2, alpha=4.0, dropout=0.5)
  model = checkpoint.from_pretrained(path)
  lr.apply_lora(model, config, rngs=nnx.Rngs(params=1, dropout=2))
  randomize_adapters(model, 3, scale=0.3)
  ids, mask, positions = (jnp.asarray(x) for x in batch)
  run = nnx.jit(lambda m: m(ids, mask, positions).logits)
  first, second = np.asarray(run(model)), np.asarray(run(model))
  assert not np.allclose(first, second)  # the dropout stream advances through the scan
  evaluation = nnx.view(model, deterministic=True)
  no_dropout = checkpoint.from_pretrained(path)
  lr.apply_lora(no_dropout, dataclasses.replace(config, dropout=0.0), rngs=nnx.Rngs(0))
  nnx.update(no_dropout, nnx.state(model, lr.LoRAParam))
  np.testing.assert_allclose(run(evaluation), run(no_dropout), rtol=1e-6, atol=1e-6)
