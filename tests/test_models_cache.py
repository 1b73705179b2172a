"""KV cache: prefill + one-step decode reproduces the full forward pass (static shapes, jitted)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from model_factories import padded_batch, run_lm, saved_checkpoint

from alignax import models


@nnx.jit
def _step(model, input_ids, attention_mask, cache):
  out = model(input_ids, attention_mask, cache=cache)
  return out.logits, out.cache


# llama: GQA + padding; mistral: sliding window 4 < 9 tokens; gemma2: soft-capped attention with
# alternating windows; gpt2: learned positions.
@pytest.mark.parametrize("family", ["llama", "mistral", "gemma2", "gpt2"])
def test_prefill_then_decode_matches_full_forward(tmp_path_factory, family):
  path, hf_model = saved_checkpoint(tmp_path_factory, family)
  ids, mask, _ = padded_batch(hf_model.config.vocab_size)
  ids, mask = jnp.asarray(ids), jnp.asarray(mask)
  model = models.from_pretrained(path)
  want = run_lm(model, ids, mask).logits
  prompt = 5

  cache = model.init_cache(batch=3, max_len=12)
  logits, cache = _step(model, ids[:, :prompt], mask[:, :prompt], cache)
  steps = [logits]
  for t in range(prompt, ids.shape[1]):
    logits, cache = _step(model, ids[:, t : t + 1], mask[:, t : t + 1], cache)
    steps.append(logits)
  got = jnp.concatenate(steps, axis=1)

  assert int(cache.index) == ids.shape[1]
  np.testing.assert_array_equal(cache.valid[:, : ids.shape[1]], mask)
  assert not cache.valid[:, ids.shape[1] :].any()
  np.testing.assert_allclose(np.asarray(got)[mask], np.asarray(want)[mask], atol=2e-5)


def test_decode_step_with_explicit_positions(tmp_path_factory):
  path, hf_model = saved_checkpoint(tmp_path_factory, "qwen3")
  ids, mask, positions = padded_batch(hf_model.config.vocab_size)
  ids, mask = jnp.asarray(ids[:2]), jnp.asarray(mask[:2])  # full and left-padded rows
  model = models.from_pretrained(path)
  want = run_lm(model, ids, mask).logits[:, -1]

  cache = model.init_cache(2, 16)
  _, cache = _step(model, ids[:, :-1], mask[:, :-1], cache)
  out = nnx.jit(lambda m, t, c, p: m.decode_step(t, c, p))(
    model, ids[:, -1], cache, jnp.asarray(positions[:2, -1])
  )

  assert out.logits.shape == (2, 1, hf_model.config.vocab_size)
  np.testing.assert_allclose(out.logits[:, 0], want, atol=2e-5)


def test_cache_rejects_packed_segments_and_oversized_input(tmp_path_factory):
  path, _ = saved_checkpoint(tmp_path_factory, "llama")
  model = models.from_pretrained(path)
  cache = model.init_cache(1, 4)
  ids = jnp.ones((1, 3), jnp.int32)
  with pytest.raises(ValueError, match="segment_ids"):
    model(ids, segment_ids=ids, cache=cache)
  with pytest.raises(ValueError, match="only 4 slots"):
    model(jnp.ones((1, 5), jnp.int32), cache=cache)
  with pytest.raises(ValueError, match="cache holds 1 rows"):
    model(jnp.ones((2, 3), jnp.int32), cache=cache)
  cache = model(ids, cache=cache).cache
  with pytest.raises(ValueError, match="cache is full: index 3"):
    model(ids[:, :2], cache=cache)


def test_jitted_write_past_the_cache_end_fails_instead_of_clamping(tmp_path_factory):
  path, _ = saved_checkpoint(tmp_path_factory, "llama")
  model = models.from_pretrained(path)
  ids = jnp.full((1, 2), 5, jnp.int32)
  mask = jnp.ones((1, 2), bool)
  cache = model.init_cache(1, 5)
  _, cache = _step(model, ids, mask, cache)
  _, cache = _step(model, ids, mask, cache)  # 4 of 5 slots used
  assert int(cache.index) == 4

  want = r"cache is full: index 4 \+ 2 tokens > 5 slots"
  with pytest.raises(jax.errors.JaxRuntimeError, match=want):  # raised by the device, not clamped
    jax.block_until_ready(_step(model, ids, mask, cache))


def test_a_decode_step_updates_the_stacked_cache_in_place():
  config = models.config_from_hf(dict(
    model_type="llama", vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=8,
    num_attention_heads=4, num_key_value_heads=2,
  ))
  model = models.CausalLM(config, rngs=nnx.Rngs(0))
  cache = model.init_cache(2, 1024)
  assert cache.keys.shape == (8, 2, 1024, 2, 16)  # [L, B, S, K, hd]
  graphdef, state = nnx.split(model)

  def step(state, tokens, cache):
    out = nnx.merge(graphdef, state).decode_step(tokens, cache)
    return out.logits, out.cache

  compiled = jax.jit(step, donate_argnums=(2,)).lower(
    state, jnp.ones((2,), jnp.int32), cache
  ).compile()
  memory = compiled.memory_analysis()
  cache_bytes = cache.keys.nbytes + cache.values.nbytes
  # The donated cache is the output buffer, and no temporary holds a copy of it (a layer loop that
  # read a layer's slice before writing into the carried cache copied all of it at every layer).
  assert memory.alias_size_in_bytes >= cache_bytes
  assert memory.temp_size_in_bytes < 0.5 * cache_bytes, (memory.temp_size_in_bytes, cache_bytes)
