"""Bad checkpoints and bad calls fail before any compute, with messages that name the culprit."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from model_factories import saved_checkpoint
from safetensors.numpy import load_file, save_file

from alignax import models
from alignax.models import checkpoint


@pytest.fixture
def ckpt(tmp_path_factory, tmp_path, monkeypatch):
  """A writable copy of a tiny Llama checkpoint; reading any tensor data fails the test."""
  path, _ = saved_checkpoint(tmp_path_factory, "llama")
  target = tmp_path / "ckpt"
  shutil.copytree(path, target)

  def no_reads(self, name):
    raise AssertionError(f"tensor {name} was read before validation finished")

  monkeypatch.setattr(checkpoint._Checkpoint, "read", no_reads)
  return target


def _edit_config(path, **changes):
  with open(path / "config.json") as f:
    config = json.load(f)
  config.update(changes)
  for key in [k for k, v in changes.items() if v is None]:
    del config[key]
  with open(path / "config.json", "w") as f:
    json.dump(config, f)


def _edit_tensors(path, edit):
  tensors = load_file(path / "model.safetensors")
  edit(tensors)
  save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_unsupported_model_type_names_itself_and_the_supported_ones(ckpt):
  _edit_config(ckpt, model_type="falcon")
  with pytest.raises(ValueError, match="'falcon'") as info:
    models.from_pretrained(ckpt)
  for name in models.SUPPORTED_MODEL_TYPES:
    assert name in str(info.value)


def test_unsupported_rope_type_and_a_missing_key_are_named(ckpt):
  _edit_config(ckpt, rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0})
  with pytest.raises(ValueError, match="rope_type='yarn'"):
    models.from_pretrained(ckpt)
  # An absent key takes the transformers class default (Llama: intermediate_size 11008), so the
  # weights no longer fit, which is reported before any tensor is read.
  _edit_config(ckpt, rope_parameters=None, intermediate_size=None)
  want = r"model.layers.0.mlp.up_proj.weight: checkpoint \[72, 48\], config \[11008, 48\]"
  with pytest.raises(ValueError, match=want):
    models.from_pretrained(ckpt)


def test_a_config_transformers_rejects_is_a_value_error_with_its_message():
  bad = dict(model_type="llama", vocab_size=11, hidden_size=10, intermediate_size=16,
             num_hidden_layers=1, num_attention_heads=4)
  want = r"(?s)model_type='llama'\) is invalid: .*hidden size \(10\)"
  with pytest.raises(ValueError, match=want):
    models.config_from_hf(bad)


def test_missing_tensor_is_named(ckpt):
  _edit_tensors(ckpt, lambda t: t.pop("model.layers.1.mlp.down_proj.weight"))
  with pytest.raises(ValueError, match=r"missing tensors: \['model.layers.1.mlp.down_proj.weight"):
    models.from_pretrained(ckpt)


def test_unexpected_tensor_is_named(ckpt):
  def add(tensors):
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(4, np.float32)

  _edit_tensors(ckpt, add)
  with pytest.raises(ValueError, match=r"unexpected tensors: \['model.layers.0.self_attn.rotary"):
    models.from_pretrained(ckpt)


def test_misshaped_tensor_is_named_with_both_shapes(ckpt):
  def shrink(tensors):
    tensors["model.layers.0.self_attn.k_proj.weight"] = tensors[
      "model.layers.0.self_attn.k_proj.weight"
    ][:8]

  _edit_tensors(ckpt, shrink)
  want = r"model.layers.0.self_attn.k_proj.weight: checkpoint \[8, 48\], config \[16, 48\]"
  with pytest.raises(ValueError, match=want):
    models.from_pretrained(ckpt)


def test_config_weights_mismatch_fails_before_any_tensor_is_read(ckpt):
  _edit_config(ckpt, num_hidden_layers=3, vocab_size=99)
  with pytest.raises(ValueError) as info:
    models.from_pretrained(ckpt)
  message = str(info.value)
  assert "missing tensors: ['model.layers.2." in message
  assert "model.embed_tokens.weight: checkpoint [97, 48], config [99, 48]" in message
  assert "lm_head.weight: checkpoint [97, 48], config [99, 48]" in message


def test_missing_files_and_bad_options_are_named(ckpt, tmp_path):
  os.remove(ckpt / "model.safetensors")
  with pytest.raises(FileNotFoundError, match="model.safetensors"):
    models.from_pretrained(ckpt)
  with pytest.raises(FileNotFoundError, match="no such directory"):
    models.from_pretrained(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match="config.json"):
    models.from_pretrained(tmp_path)  # a directory without a checkpoint
  with pytest.raises(ValueError, match="head='critic'"):
    models.from_pretrained(ckpt, head="critic")
  with pytest.raises(ValueError, match="num_labels=3 applies to head='score' only"):
    models.from_pretrained(ckpt, head="value", num_labels=3)


def test_bad_call_arguments_are_named(tmp_path_factory):
  path, _ = saved_checkpoint(tmp_path_factory, "llama")
  with pytest.raises(ValueError, match="remat='everything'"):
    models.from_pretrained(path, remat="everything")
  model = models.from_pretrained(path)
  # Under pytest the jaxtyping hook (a TypeError) fires first; without it the ValueError does.
  with pytest.raises((ValueError, TypeError), match="input_ids"):
    model(jnp.ones((4,), jnp.int32))
  with pytest.raises((ValueError, TypeError), match="attention_mask"):
    model(jnp.ones((2, 4), jnp.int32), jnp.ones((2, 5), bool))
  with pytest.raises(ValueError, match="max_len must be >= 1"):
    model.init_cache(2, 0)


def test_out_of_range_token_ids_are_named_eagerly_and_fail_on_device_under_jit(tmp_path_factory):
  path, hf_model = saved_checkpoint(tmp_path_factory, "llama")
  vocab = hf_model.config.vocab_size
  model = models.from_pretrained(path)
  ids = np.full((2, 5), 3, np.int32)
  ids[1, 3] = vocab  # one past the vocabulary: NaN logits for the whole row before
  with pytest.raises(ValueError, match=rf"input_ids\[1, 3\] = {vocab} is outside the vocabulary"):
    model(jnp.asarray(ids))
  negative = np.full((2, 5), 3, np.int32)
  negative[0, 2] = -1
  with pytest.raises(ValueError, match=r"input_ids\[0, 2\] = -1"):
    model(jnp.asarray(negative))

  run = nnx.jit(lambda m, ids: m(ids).logits)
  assert np.isfinite(np.asarray(run(model, jnp.full((2, 5), 3, jnp.int32)))).all()
  with pytest.raises(jax.errors.JaxRuntimeError, match=r"input_ids\[1, 3\] = 97"):
    jax.block_until_ready(run(model, jnp.asarray(ids)))


def test_float_input_ids_are_a_named_type_error(tmp_path_factory):
  path, _ = saved_checkpoint(tmp_path_factory, "llama")
  model = models.from_pretrained(path)
  with pytest.raises(TypeError, match="input_ids must hold integer token ids, got dtype float32"):
    model(jnp.ones((2, 4), jnp.float32))
  # Attention masks take booleans or the tokenizer's 0/1 integers alike.
  ids = jnp.full((2, 4), 3, jnp.int32)
  as_ints = model(ids, jnp.array([[0, 1, 1, 1], [1, 1, 1, 1]], jnp.int32)).logits
  as_bools = model(ids, jnp.array([[0, 1, 1, 1], [1, 1, 1, 1]], bool)).logits
  np.testing.assert_array_equal(as_ints, as_bools)


def test_dtype_strings_are_checked_at_load(ckpt):
  with pytest.raises(ValueError, match=r"dtype='bf17' is not a dtype"):
    models.from_pretrained(ckpt, dtype="bf17")
  with pytest.raises(ValueError, match=r"param_dtype must be a floating-point dtype, got int8"):
    models.from_pretrained(ckpt, param_dtype=jnp.int8)
