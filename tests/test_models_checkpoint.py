"""Checkpoint I/O: alignax → ``transformers`` round trips and sharded safetensors with an index."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from model_factories import (
  FAMILIES,
  max_error,
  padded_batch,
  run_head,
  run_lm,
  saved_checkpoint,
  torch_forward,
)

from alignax import models


def _load_torch(path, auto=transformers.AutoModelForCausalLM):
  model = auto.from_pretrained(os.fspath(path), attn_implementation="eager", dtype=torch.float32)
  return model.eval()


def _params(model):
  return {k: np.asarray(v[...]) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.mark.parametrize("family", FAMILIES)
def test_save_pretrained_loads_in_transformers_with_identical_logits(
  tmp_path_factory, tmp_path, family
):
  path, hf_model = saved_checkpoint(tmp_path_factory, family)
  ids, mask, positions = padded_batch(hf_model.config.vocab_size, seed=4)
  model = models.from_pretrained(path)
  ours = run_lm(model, jnp.asarray(ids), jnp.asarray(mask)).logits

  models.save_pretrained(model, tmp_path)
  reloaded = _load_torch(tmp_path)

  assert type(reloaded) is type(hf_model)
  assert max_error(torch_forward(reloaded, ids, mask, positions), ours, mask) <= 1e-4
  assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]


def test_sharded_transformers_checkpoint_with_index_loads(tmp_path_factory):
  path, hf_model = saved_checkpoint(tmp_path_factory, "qwen3", max_shard_size="20KB")
  ids, mask, positions = padded_batch(hf_model.config.vocab_size)
  with open(os.path.join(path, "model.safetensors.index.json")) as f:
    files = set(json.load(f)["weight_map"].values())

  model = models.from_pretrained(path)

  assert len(files) > 2
  want = torch_forward(hf_model, ids, mask, positions)
  assert max_error(run_lm(model, jnp.asarray(ids), jnp.asarray(mask)).logits, want, mask) <= 1e-4


def test_save_pretrained_shards_with_an_index_that_both_libraries_read(tmp_path_factory, tmp_path):
  path, hf_model = saved_checkpoint(tmp_path_factory, "gemma2")
  ids, mask, positions = padded_batch(hf_model.config.vocab_size)
  model = models.from_pretrained(path)

  models.save_pretrained(model, tmp_path, max_shard_size="16KB")

  shards = [f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]
  assert len(shards) > 2 and "model.safetensors.index.json" in os.listdir(tmp_path)
  again = models.from_pretrained(tmp_path)
  for (k, want), (k2, got) in zip(_params(model).items(), _params(again).items()):
    assert k == k2
    np.testing.assert_array_equal(got, want)
  reloaded = _load_torch(tmp_path)
  want = run_lm(model, jnp.asarray(ids), jnp.asarray(mask)).logits
  assert max_error(torch_forward(reloaded, ids, mask, positions), want, mask) <= 1e-4


@pytest.mark.parametrize("head", ["score", "value"])
def test_heads_save_as_sequence_classification(tmp_path_factory, tmp_path, head):
  path, hf_model = saved_checkpoint(tmp_path_factory, "mistral", head="score", num_labels=1)
  ids, mask, positions = padded_batch(hf_model.config.vocab_size)
  model = models.from_pretrained(path, head=head)
  scores = run_head(model, jnp.asarray(ids), jnp.asarray(mask)).scores

  models.save_pretrained(model, tmp_path)
  reloaded = _load_torch(tmp_path, transformers.AutoModelForSequenceClassification)

  with torch.no_grad():
    want = reloaded(
      input_ids=torch.as_tensor(ids),
      attention_mask=torch.as_tensor(mask.astype(np.int64)),
      position_ids=torch.as_tensor(positions),
    ).logits.numpy()
  assert reloaded.config.num_labels == 1
  if head == "value":
    scores = scores[np.arange(3), mask.shape[1] - 1 - np.argmax(mask[:, ::-1], axis=1)][:, None]
  np.testing.assert_allclose(scores, want, atol=1e-5)


def test_bf16_parameters_round_trip(tmp_path_factory, tmp_path):
  path, hf_model = saved_checkpoint(tmp_path_factory, "gpt2")
  model = models.from_pretrained(path, param_dtype=jnp.bfloat16, dtype=jnp.bfloat16)

  models.save_pretrained(model, tmp_path)
  again = models.from_pretrained(tmp_path, param_dtype=jnp.bfloat16)

  with open(os.path.join(tmp_path, "config.json")) as f:
    assert json.load(f)["dtype"] == "bfloat16"
  for leaf in jax.tree.leaves(nnx.state(again, nnx.Param)):
    assert leaf.dtype == jnp.bfloat16
  for want, got in zip(_params(model).values(), _params(again).values()):
    np.testing.assert_array_equal(got, want)
  expected = hf_model.state_dict()["transformer.h.0.attn.c_attn.weight"].to(torch.bfloat16)
  np.testing.assert_array_equal(
    np.asarray(model.model.layers.attn.qkv_proj.kernel[...][0], np.float32),
    expected.float().numpy(),
  )


def test_max_shard_size_is_validated(tmp_path_factory, tmp_path):
  path, _ = saved_checkpoint(tmp_path_factory, "gpt2")
  model = models.from_pretrained(path)
  with pytest.raises(ValueError, match="max_shard_size"):
    models.save_pretrained(model, tmp_path, max_shard_size="lots")
  with pytest.raises(ValueError, match="max_shard_size"):
    models.save_pretrained(model, tmp_path, max_shard_size=0)
  with pytest.raises(TypeError, match="CausalLM, ValueModel or RewardModel"):
    models.save_pretrained(model.model, tmp_path)
