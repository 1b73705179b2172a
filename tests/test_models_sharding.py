"""Sharded over the 8 fake CPU devices (fsdp × tensor) the model computes what it does unsharded.

One mesh policy (``alignax.sharding``): Auto axes from ``make_mesh``, parameters by logical names
(whole heads only), activations data-parallel over ``(data, fsdp)``, the KV cache on the model's
mesh, and arrays from the models and the kernels on one mesh.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P
from model_factories import padded_batch, run_head, run_lm, saved_checkpoint

import alignax as ax
from alignax import models
from alignax import sharding as axs


@pytest.fixture(scope="module")
def mesh():
  return axs.make_mesh(fsdp=2, tensor=4)


def _spec(array):
  """The partition spec of ``array`` with one entry per dimension (trailing Nones kept)."""
  spec = tuple(array.sharding.spec)
  return P(*spec, *([None] * (array.ndim - len(spec))))


def _batch(vocab_size, rows=4, length=9, seed=0):
  """``rows`` rows (a multiple of the fsdp size) of padded ids and masks, as jax arrays."""
  ids, mask, _ = padded_batch(vocab_size, seed=seed, length=length)
  ids, mask = np.resize(ids, (rows, length)), np.resize(mask, (rows, length))
  return jnp.asarray(ids), jnp.asarray(mask)


def test_make_mesh_fills_the_free_axis_and_names_bad_sizes():
  mesh = axs.make_mesh(tensor=2)
  assert dict(mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 2}
  assert all(t == AxisType.Auto for t in mesh.axis_types)
  assert dict(axs.make_mesh(data=2, fsdp=2, tensor=2).shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  with pytest.raises(ValueError, match=r"data\*fsdp\*tensor = 2\*2\*1 = 4, but there are 8"):
    axs.make_mesh(data=2, fsdp=2)
  with pytest.raises(ValueError, match="not divisible"):
    axs.make_mesh(tensor=3)
  with pytest.raises(ValueError, match="only one axis size may be -1"):
    axs.make_mesh(data=-1, fsdp=-1)
  with pytest.raises(ValueError, match="tensor=0"):
    axs.make_mesh(tensor=0)


def test_logical_to_mesh_drops_axes_that_are_absent_reused_or_do_not_divide(mesh):
  rules = models.DEFAULT_RULES
  assert models.logical_to_mesh(("embed", "mlp"), (48, 72), mesh, rules) == P("fsdp", "tensor")
  assert models.logical_to_mesh(("vocab", "embed"), (97, 48), mesh, rules) == P(None, "fsdp")
  assert models.logical_to_mesh(("heads", "kv_heads"), (8, 8), mesh, rules) == P("tensor", None)
  assert models.logical_to_mesh(("embed", None), (48, 1), mesh, rules) == P("fsdp", None)
  stacked = ("layers", "embed", "mlp")
  assert models.logical_to_mesh(stacked, (2, 48, 72), mesh, rules) == P(None, "fsdp", "tensor")
  data_mesh = axs.make_mesh(data=8, fsdp=1)
  assert models.logical_to_mesh(("embed", "mlp"), (48, 72), data_mesh, rules) == P(None, None)
  with pytest.raises(ValueError, match="do not match shape"):
    models.logical_to_mesh(("embed",), (4, 4), mesh, rules)
  assert models.batch_sharding(mesh, ndim=3).spec == P("fsdp", None, None)
  assert models.batch_sharding(data_mesh).spec == P("data", None)
  # The first rule of a name wins, for batches as for parameters.
  first_wins = (("batch", "fsdp"), ("embed", "tensor"), ("batch", "tensor"), ("embed", "fsdp"))
  assert models.batch_sharding(mesh, rules=first_wins).spec == P("fsdp", None)
  assert models.logical_to_mesh(("embed",), (48,), mesh, first_wins) == P("tensor")


def test_activations_and_parameters_use_distinct_rules(mesh):
  # A parameter's embed dimension is split over fsdp; an activation's is not (its batch is).
  assert axs.logical_to_mesh(("embed",), (48,), mesh) == P("fsdp")
  btd = ("activation_batch", "activation_length", "activation_embed")
  assert axs.logical_to_mesh(btd, (4, 9, 48), mesh) == P("fsdp", None, None)
  x = jnp.ones((4, 9, 48))
  assert axs.constrain(x, btd) is x  # no mesh anywhere: a no-op
  got = jax.jit(lambda x: axs.constrain(2 * x, btd, mesh))(x)
  assert _spec(got) == P("fsdp", None, None)
  with jax.set_mesh(mesh):  # the context mesh when none is given
    got = jax.jit(lambda x: axs.constrain(2 * x, btd))(x)
  assert _spec(got) == P("fsdp", None, None)


def test_gqa_heads_are_never_split_across_devices(tmp_path_factory, mesh):
  # llama: 6 query heads and 2 KV heads of head_dim 8; tensor=4 divides neither head count, but it
  # divides the 16 columns of k_proj and the 48 of q_proj: splitting those would cut heads.
  path, _ = saved_checkpoint(tmp_path_factory, "llama")
  model = models.from_pretrained(path, mesh=mesh)
  attn = model.model.layers.attn
  assert attn.k_proj.kernel[...].sharding.spec == P(None, "fsdp", None)
  assert attn.q_proj.kernel[...].sharding.spec == P(None, "fsdp", None)
  assert attn.o_proj.kernel[...].sharding.spec == P(None, None, "fsdp")
  two_heads = (("embed", "kv_heads"), (48, 16))
  assert axs.logical_to_mesh(*two_heads, axs.make_mesh(fsdp=4, tensor=2), units=(1, 8)) == P(
    "fsdp", "tensor"
  )


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_sharded_load_matches_unsharded_logits_and_gradients(tmp_path_factory, mesh, family):
  path, hf_model = saved_checkpoint(tmp_path_factory, family)
  ids, mask = _batch(hf_model.config.vocab_size)

  def loss(model, ids, mask):
    out = model(ids, mask)
    return jnp.sum(jnp.where(mask[..., None], jax.nn.log_softmax(out.logits), 0.0)), out

  step = nnx.jit(nnx.value_and_grad(loss, has_aux=True))
  (want_loss, want_out), want_grads = step(models.from_pretrained(path), ids, mask)

  model = models.from_pretrained(path, mesh=mesh)
  batch = models.batch_sharding(mesh)
  (got_loss, got_out), got_grads = step(
    model, jax.device_put(ids, batch), jax.device_put(mask, batch)
  )

  layers = model.model.layers
  assert layers.mlp.up_proj.kernel[...].sharding.spec == P(None, "fsdp", "tensor")
  assert layers.mlp.down_proj.kernel[...].sharding.spec == P(None, "tensor", "fsdp")
  assert model.model.embed.embedding[...].sharding.spec == P(None, "fsdp")  # odd vocab: replicated
  shard_shape = layers.mlp.up_proj.kernel[...].addressable_shards[0].data.shape
  config = hf_model.config
  assert shard_shape == (2, config.hidden_size // 2, config.intermediate_size // 4)
  # Data parallelism: the batch of the activations stays split over fsdp (finding 2).
  assert got_out.hidden_states.sharding.spec[0] == "fsdp"
  assert got_out.logits.sharding.spec[0] == "fsdp"
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
  np.testing.assert_allclose(
    np.asarray(got_out.logits)[np.asarray(mask)],
    np.asarray(want_out.logits)[np.asarray(mask)],
    atol=1e-5,
  )
  # Sharded and unsharded programs sum the same terms in different orders: float32 rounding
  # relative to each gradient's own scale (its largest entry), not an absolute floor.
  for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
    w = np.asarray(w)
    np.testing.assert_allclose(g, w, atol=1e-4 * float(np.abs(w).max()), rtol=1e-4)


def test_shard_model_places_an_existing_model_and_heads_follow(tmp_path_factory, mesh):
  path, hf_model = saved_checkpoint(tmp_path_factory, "qwen2", head="score")
  ids, mask = _batch(hf_model.config.vocab_size)
  model = models.from_pretrained(path, head="score")
  want = run_head(model, ids, mask).scores

  models.shard_model(model, mesh)
  got = run_head(model, ids, mask)

  specs = {v[...].sharding.spec for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  assert P(None, "fsdp", "tensor") in specs
  assert model.score.kernel[...].sharding.spec[0] == "fsdp"  # [d, num_labels=2]
  assert model.model.mesh is mesh
  assert got.hidden_states.sharding.spec[0] == "fsdp"
  np.testing.assert_allclose(got.scores, want, atol=1e-5)


def test_explicit_axis_meshes_are_refused_by_name(tmp_path_factory):
  path, _ = saved_checkpoint(tmp_path_factory, "qwen2")
  explicit = jax.make_mesh((2, 4), ("fsdp", "tensor"), axis_types=(AxisType.Explicit,) * 2)
  with pytest.raises(ValueError, match=r"Explicit axes .*alignax.sharding.make_mesh"):
    models.from_pretrained(path, mesh=explicit)
  with pytest.raises(ValueError, match="Explicit axes"):
    models.shard_model(models.from_pretrained(path), explicit)


def test_model_and_kernel_arrays_combine_outside_jit(tmp_path_factory, mesh):
  path, hf_model = saved_checkpoint(tmp_path_factory, "llama")
  ids, mask = _batch(hf_model.config.vocab_size, rows=8)
  targets = jnp.roll(ids, -1, axis=1)
  model = models.from_pretrained(path, mesh=mesh)
  batch = models.batch_sharding(mesh)
  out = run_lm(model, jax.device_put(ids, batch), jax.device_put(mask, batch))
  model_logp = jnp.take_along_axis(jax.nn.log_softmax(out.logits), targets[..., None], -1)[..., 0]

  kernel_logp = ax.token_logprobs(
    out.hidden_states, model.get_lm_head(), targets, mask=mask, mesh=mesh
  ).logp

  difference = jnp.where(mask, model_logp - kernel_logp, 0.0)  # finding 1: two meshes raised here
  assert float(jnp.max(jnp.abs(difference))) < 1e-4


def test_kv_cache_is_created_on_the_model_mesh_with_whole_heads(tmp_path_factory, mesh):
  # qwen2: 2 KV heads; tensor=4 does not divide them, so heads stay whole (replicated).
  path, hf_model = saved_checkpoint(tmp_path_factory, "qwen2")
  ids, mask = _batch(hf_model.config.vocab_size)
  model = models.from_pretrained(path, mesh=mesh)
  cache = model.init_cache(batch=4, max_len=12)
  assert isinstance(cache.keys.sharding, NamedSharding) and cache.keys.sharding.mesh == mesh
  assert _spec(cache.keys) == P(None, "fsdp", None, None, None)
  assert _spec(cache.valid) == P("fsdp", None)
  # Two KV heads on tensor=2: one whole head per device.
  mesh2 = axs.make_mesh(fsdp=4, tensor=2)
  cache2 = models.from_pretrained(path, mesh=mesh2).init_cache(batch=4, max_len=12)
  assert _spec(cache2.keys) == P(None, "fsdp", None, "tensor", None)
  head_dim = hf_model.config.hidden_size // hf_model.config.num_attention_heads
  assert cache2.keys.addressable_shards[0].data.shape == (2, 1, 12, 1, head_dim)

  want = run_lm(models.from_pretrained(path), ids, mask).logits
  step = nnx.jit(lambda m, i, a, c: m(i, a, cache=c))
  out = step(model, ids, mask, cache)
  assert _spec(out.cache.keys) == P(None, "fsdp", None, None, None)
  np.testing.assert_allclose(
    np.asarray(out.logits)[np.asarray(mask)], np.asarray(want)[np.asarray(mask)], atol=1e-5
  )


def test_iter_linears_names_every_stacked_projection(tmp_path_factory):
  path, _ = saved_checkpoint(tmp_path_factory, "gpt2")
  linears = dict(models.iter_linears(models.from_pretrained(path)))
  names = ("attn.qkv_proj", "attn.o_proj", "mlp.up_proj", "mlp.down_proj")
  assert sorted(linears) == sorted(f"model.layers.{name}" for name in names)
  assert linears["model.layers.mlp.up_proj"].kernel[...].shape[0] == 2  # [L, in, out]
