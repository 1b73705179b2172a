"""Sharded over the 8 fake CPU devices (fsdp × tensor) the model computes what it does unsharded."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P
from model_factories import padded_batch, run_head, run_lm, saved_checkpoint

from alignax import models


@pytest.fixture(scope="module")
def mesh():
  return jax.make_mesh((2, 4), ("fsdp", "tensor"), devices=jax.devices())


def test_logical_to_mesh_drops_axes_that_are_absent_reused_or_do_not_divide(mesh):
  rules = models.DEFAULT_RULES
  assert models.logical_to_mesh(("embed", "mlp"), (48, 72), mesh, rules) == P("fsdp", "tensor")
  assert models.logical_to_mesh(("vocab", "embed"), (97, 48), mesh, rules) == P(None, "fsdp")
  assert models.logical_to_mesh(("heads", "kv_heads"), (8, 8), mesh, rules) == P("tensor", None)
  assert models.logical_to_mesh(("embed", None), (48, 1), mesh, rules) == P("fsdp", None)
  data_mesh = jax.make_mesh((8,), ("data",), devices=jax.devices())
  assert models.logical_to_mesh(("embed", "mlp"), (48, 72), data_mesh, rules) == P(None, None)
  with pytest.raises(ValueError, match="do not match shape"):
    models.logical_to_mesh(("embed",), (4, 4), mesh, rules)
  assert models.batch_sharding(mesh, ndim=3).spec == P("fsdp", None, None)
  assert models.batch_sharding(data_mesh).spec == P("data", None)
  # The first rule of a name wins, for batches as for parameters.
  first_wins = (("batch", "fsdp"), ("embed", "tensor"), ("batch", "tensor"), ("embed", "fsdp"))
  assert models.batch_sharding(mesh, rules=first_wins).spec == P("fsdp", None)
  assert models.logical_to_mesh(("embed",), (48,), mesh, first_wins) == P("tensor")


def test_iter_linears_names_every_projection(tmp_path_factory):
  path, _ = saved_checkpoint(tmp_path_factory, "gpt2")
  names = [name for name, _ in models.iter_linears(models.from_pretrained(path))]
  assert sorted(names) == sorted(
    f"model.layers.{i}.{name}"
    for i in range(2)
    for name in ("attn.qkv_proj", "attn.o_proj", "mlp.up_proj", "mlp.down_proj")
  )


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_sharded_load_matches_unsharded_logits(tmp_path_factory, mesh, family):
  path, hf_model = saved_checkpoint(tmp_path_factory, family)
  ids, mask, _ = padded_batch(hf_model.config.vocab_size)
  want = run_lm(models.from_pretrained(path), jnp.asarray(ids), jnp.asarray(mask)).logits

  model = models.from_pretrained(path, mesh=mesh)
  got = run_lm(model, jnp.asarray(ids), jnp.asarray(mask)).logits

  block = model.model.layers[0]
  assert block.mlp.up_proj.kernel[...].sharding.spec == P("fsdp", "tensor")
  assert block.mlp.down_proj.kernel[...].sharding.spec == P("tensor", "fsdp")
  assert block.attn.q_proj.kernel[...].sharding.spec == P("fsdp", "tensor")
  assert model.model.embed.embedding[...].sharding.spec == P(None, "fsdp")  # odd vocab: replicated
  shard_shape = block.mlp.up_proj.kernel[...].addressable_shards[0].data.shape
  assert shard_shape == (hf_model.config.hidden_size // 2, hf_model.config.intermediate_size // 4)
  np.testing.assert_allclose(np.asarray(got)[mask], np.asarray(want)[mask], atol=1e-5)


def test_shard_model_places_an_existing_model_and_heads_follow(tmp_path_factory, mesh):
  path, hf_model = saved_checkpoint(tmp_path_factory, "qwen2", head="score")
  ids, mask, _ = padded_batch(hf_model.config.vocab_size)
  model = models.from_pretrained(path, head="score")
  want = run_head(model, jnp.asarray(ids), jnp.asarray(mask)).scores

  models.shard_model(model, mesh)
  got = run_head(model, jnp.asarray(ids), jnp.asarray(mask)).scores

  specs = {v[...].sharding.spec for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  assert P("fsdp", "tensor") in specs
  assert model.score.kernel[...].sharding.spec[0] == "fsdp"  # [d, num_labels=2]
  np.testing.assert_allclose(got, want, atol=1e-5)
