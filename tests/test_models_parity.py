"""Logits parity with ``transformers`` (PyTorch, fp32, eager attention) for every family."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from flax import nnx
from model_factories import (
  FAMILIES,
  max_error,
  padded_batch,
  run_lm,
  saved_checkpoint,
  torch_forward,
)

import alignax
from alignax import models
from alignax.models.decoder import default_positions

TOL = 1e-4  # max abs error relative to the logit scale, fp32


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers_on_left_and_right_padded_rows(tmp_path_factory, family):
  path, hf_model = saved_checkpoint(tmp_path_factory, family)
  ids, mask, positions = padded_batch(hf_model.config.vocab_size)
  want = torch_forward(hf_model, ids, mask, positions)

  model = models.from_pretrained(path)
  out = run_lm(model, jnp.asarray(ids), jnp.asarray(mask))

  assert out.logits.shape == want.shape and out.logits.dtype == jnp.float32
  assert max_error(out.logits, want, mask) <= TOL
  explicit = run_lm(model, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(positions)).logits
  np.testing.assert_array_equal(explicit, out.logits)


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2"])
def test_stopping_before_the_head_and_lm_head_arrays_reproduce_logits(tmp_path_factory, family):
  path, hf_model = saved_checkpoint(tmp_path_factory, family)
  ids, mask, _ = padded_batch(hf_model.config.vocab_size)
  model = models.from_pretrained(path)
  full = run_lm(model, jnp.asarray(ids), jnp.asarray(mask))

  hidden_only = run_lm(model, jnp.asarray(ids), jnp.asarray(mask), compute_logits=False)
  head = model.get_lm_head()
  z = head.logit_scale * hidden_only.hidden_states @ head.weight.T
  if head.bias is not None:
    z = z + head.bias
  if head.softcap is not None:
    z = head.softcap * jnp.tanh(z / head.softcap)

  assert hidden_only.logits is None
  assert head.weight.shape == (hf_model.config.vocab_size, hidden_only.hidden_states.shape[-1])
  assert (head.softcap is not None) == (family == "gemma2")
  np.testing.assert_allclose(z, full.logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_fused_token_logprobs_from_the_lm_head_equal_log_softmax_of_logits(
  tmp_path_factory, family
):
  path, hf_model = saved_checkpoint(tmp_path_factory, family)
  ids, mask, _ = padded_batch(hf_model.config.vocab_size)
  model = models.from_pretrained(path)
  out = run_lm(model, jnp.asarray(ids), jnp.asarray(mask))
  targets = jnp.roll(jnp.asarray(ids), -1, axis=1)
  head = model.get_lm_head()

  got = alignax.token_logprobs(out.hidden_states, head, targets).logp

  want = jnp.take_along_axis(jax.nn.log_softmax(out.logits), targets[..., None], -1)[..., 0]
  np.testing.assert_allclose(np.asarray(got)[mask], np.asarray(want)[mask], atol=2e-5)


def test_default_positions_follow_the_mask_and_restart_per_segment():
  mask = jnp.array([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]], bool)
  segments = jnp.array([[0, 0, 1, 1, 2], [1, 1, 2, 2, 2]])
  np.testing.assert_array_equal(default_positions(mask), [[0, 0, 0, 1, 2], [0, 1, 2, 2, 2]])
  np.testing.assert_array_equal(
    default_positions(mask, segments), [[0, 0, 0, 1, 0], [0, 1, 0, 0, 0]]
  )


@pytest.mark.parametrize("family", ["mistral", "gpt2"])
def test_packed_segments_equal_separately_run_sequences(tmp_path_factory, family):
  path, hf_model = saved_checkpoint(tmp_path_factory, family)
  model = models.from_pretrained(path)
  rng = np.random.default_rng(1)
  a, b = rng.integers(3, hf_model.config.vocab_size, 4), rng.integers(3, 50, 6)
  packed = jnp.asarray(np.concatenate([a, b]))[None]
  segments = jnp.asarray([[1] * 4 + [2] * 6])

  out = run_lm(model, packed, segment_ids=segments).logits[0]

  np.testing.assert_allclose(out[:4], run_lm(model, jnp.asarray(a)[None]).logits[0], atol=1e-5)
  np.testing.assert_allclose(out[4:], run_lm(model, jnp.asarray(b)[None]).logits[0], atol=1e-5)


def test_bf16_compute_with_fp32_params_stays_close(tmp_path_factory):
  path, hf_model = saved_checkpoint(tmp_path_factory, "qwen3")
  ids, mask, positions = padded_batch(hf_model.config.vocab_size)
  want = torch_forward(hf_model, ids, mask, positions)

  model = models.from_pretrained(path, dtype=jnp.bfloat16)
  out = run_lm(model, jnp.asarray(ids), jnp.asarray(mask))

  assert model.model.layers.attn.q_proj.kernel[...].dtype == jnp.float32
  assert out.hidden_states.dtype == jnp.bfloat16
  assert max_error(out.logits, want, mask) <= 3e-2


def test_remat_policies_keep_logits_and_gradients(tmp_path_factory):
  path, hf_model = saved_checkpoint(tmp_path_factory, "gemma2")
  ids, mask, _ = padded_batch(hf_model.config.vocab_size)

  def loss(model):
    return jnp.mean(model(jnp.asarray(ids), jnp.asarray(mask)).logits ** 2)

  value_and_grad = nnx.jit(nnx.value_and_grad(loss))
  want_loss, want_grads = value_and_grad(models.from_pretrained(path))
  for policy in ("full", "dots"):
    got_loss, got_grads = value_and_grad(models.from_pretrained(path, remat=policy))
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
    for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
      np.testing.assert_allclose(g, w, atol=1e-6, rtol=1e-4)


def test_linear_rope_scaling_matches_transformers(tmp_path_factory):
  rope = dict(rope_type="linear", rope_theta=10000.0, factor=3.0)
  path, hf_model = saved_checkpoint(tmp_path_factory, "llama", rope_parameters=rope)
  ids, mask, positions = padded_batch(hf_model.config.vocab_size)
  out = run_lm(models.from_pretrained(path), jnp.asarray(ids), jnp.asarray(mask))
  assert max_error(out.logits, torch_forward(hf_model, ids, mask, positions), mask) <= TOL


def test_legacy_rope_keys_read_like_rope_parameters():
  base = dict(
    model_type="llama", vocab_size=11, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
    num_attention_heads=2,
  )
  scaling = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                 original_max_position_embeddings=64)
  legacy = models.config_from_hf(
    {**base, "rope_theta": 5e5, "rope_scaling": {"rope_type": "llama3", **scaling}}
  )
  current = models.config_from_hf(
    {**base, "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, **scaling}}
  )
  fields = ("rope_type", "rope_theta", "rope_factor", "rope_original_max_positions")
  assert [getattr(legacy, f) for f in fields] == [getattr(current, f) for f in fields]
  assert legacy.rope_type == "llama3" and legacy.rope_factor == 8.0
  assert legacy.num_kv_heads == 2 and legacy.head_dim == 4 and legacy.sliding_windows == (None,)


_MINIMAL = {
  **{f: dict(vocab_size=11, hidden_size=64, intermediate_size=24, num_hidden_layers=30,
             num_attention_heads=32) for f in ("llama", "mistral", "qwen3", "gemma2")},
  "qwen2": dict(vocab_size=11, hidden_size=64, intermediate_size=24, num_hidden_layers=30,
                num_attention_heads=32, use_sliding_window=True),
  "gemma": dict(vocab_size=11, hidden_size=64, intermediate_size=24, num_hidden_layers=3,
                num_attention_heads=32, hidden_act="gelu"),  # legacy value of the releases
  "gpt2": dict(vocab_size=11, n_embd=16, n_head=2, n_layer=2),
}


@pytest.mark.parametrize("model_type", sorted(_MINIMAL))
def test_absent_config_keys_take_the_transformers_defaults(model_type):
  """A ``config.json`` with only the sizes reads as ``transformers`` reads it (class defaults)."""
  spec = _MINIMAL[model_type]
  ours = models.config_from_hf({"model_type": model_type, **spec})
  theirs = transformers.AutoConfig.for_model(model_type, **spec)

  head_dim = getattr(theirs, "head_dim", None) or theirs.hidden_size // theirs.num_attention_heads
  kv_heads = getattr(theirs, "num_key_value_heads", theirs.num_attention_heads)
  layer_types = getattr(theirs, "layer_types", None) or (
    ["sliding_attention" if model_type == "mistral" else "full_attention"]
    * theirs.num_hidden_layers
  )
  windows = tuple(theirs.sliding_window if t == "sliding_attention" else None for t in layer_types)
  activation = getattr(theirs, "hidden_activation", None) or getattr(
    theirs, "hidden_act", getattr(theirs, "activation_function", None)
  )
  assert (ours.head_dim, ours.num_kv_heads) == (head_dim, kv_heads)
  assert ours.sliding_windows == windows
  assert ours.activation == activation
  assert ours.max_position_embeddings == theirs.max_position_embeddings
  assert ours.tie_word_embeddings == theirs.tie_word_embeddings
  if model_type == "gemma2":
    assert ours.attention_scale == theirs.query_pre_attn_scalar**-0.5
    assert (ours.attn_softcap, ours.final_softcap) == (
      theirs.attn_logit_softcapping, theirs.final_logit_softcapping
    )


# Scanned layers: gemma2 with 4 layers alternates windows with period 2 (two scan steps of two
# blocks with static windows); qwen2's max_window_layers split (full, sliding, sliding) has no
# shorter period, so the window is scanned as data; gpt2's inverse-layer scale is scanned as data.
@pytest.mark.parametrize(
  "family, overrides",
  [
    ("gemma2", dict(num_hidden_layers=4)),
    ("qwen2", dict(num_hidden_layers=3, use_sliding_window=True, sliding_window=3,
                   max_window_layers=1)),
    ("gpt2", dict(scale_attn_by_inverse_layer_idx=True)),
  ],
)
def test_scanned_layers_with_per_layer_options_match_transformers(
  tmp_path_factory, family, overrides
):
  path, hf_model = saved_checkpoint(tmp_path_factory, family, **overrides)
  ids, mask, positions = padded_batch(hf_model.config.vocab_size)
  model = models.from_pretrained(path)
  if family == "qwen2":
    assert model.config.sliding_windows == (None, 3, 3)
  out = run_lm(model, jnp.asarray(ids), jnp.asarray(mask))
  assert max_error(out.logits, torch_forward(hf_model, ids, mask, positions), mask) <= TOL


def test_layer_parameters_are_stacked_and_the_program_does_not_grow_with_depth():
  def program_size(layers):
    config = models.config_from_hf(dict(
      model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=48,
      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
    ))
    model = models.CausalLM(config, rngs=nnx.Rngs(0))
    assert model.model.layers.mlp.up_proj.kernel[...].shape == (layers, 32, 48)
    graphdef, state = nnx.split(model)

    def loss(state, ids):
      return jnp.mean(nnx.merge(graphdef, state)(ids).logits)

    ids = jnp.ones((2, 16), jnp.int32)
    return len(jax.jit(jax.grad(loss)).lower(state, ids).as_text())

  two, twelve = program_size(2), program_size(12)
  # One scanned block body: a Python loop over layers made 12 layers ~6x the size of 2.
  assert twelve < 1.1 * two, (two, twelve)


def test_the_forward_never_materialises_a_sequence_by_sequence_array():
  config = models.config_from_hf(dict(
    model_type="gemma2", vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=300,
  ))
  model = models.CausalLM(config, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  t = 1024  # two blocks of the attention kernel; a dense mask or score tensor is [..., T, T]

  def loss(state, ids, mask):
    return jnp.mean(nnx.merge(graphdef, state)(ids, mask).hidden_states)

  ids, mask = jnp.ones((2, t), jnp.int32), jnp.ones((2, t), bool)
  hlo = jax.jit(jax.grad(loss)).lower(state, ids, mask).as_text()
  assert f"{t}x{t}x" not in hlo  # StableHLO spells a [.., T, T] tensor "...x1024x1024xf32"
