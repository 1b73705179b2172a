"""The fused log-prob kernel on real decoders: per-token log-probs from final hidden states and the
model's LM head equal ``transformers``' log-softmax of its logits, and gradients into the model
(tied embeddings and Gemma 2's final soft-cap included) equal those of the materialised-logits path.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from model_factories import max_error, padded_batch, run_lm, saved_checkpoint, torch_forward

import alignax as ax
from alignax import models


def _next_tokens(ids):
  return np.concatenate([ids[:, 1:], ids[:, :1]], axis=1)


def _fused_logprobs(model, ids, mask, targets):
  hidden = model(ids, mask, compute_logits=False).hidden_states
  head = model.get_lm_head()
  return ax.token_logprobs(hidden, head, targets, mask=mask).logp


# llama: untied head; qwen2: tied; gemma2: tied, embedding scaling and final-logit soft-cap.
@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2"])
def test_fused_logprobs_match_transformers(tmp_path_factory, family):
  path, hf_model = saved_checkpoint(tmp_path_factory, family)
  ids, mask, positions = padded_batch(hf_model.config.vocab_size, seed=5)
  targets = _next_tokens(ids)
  logits = torch_forward(hf_model, ids, mask, positions).astype(np.float64)
  log_softmax = logits - logits.max(-1, keepdims=True)
  log_softmax -= np.log(np.exp(log_softmax).sum(-1, keepdims=True))
  want = np.take_along_axis(log_softmax, targets[..., None], -1)[..., 0]

  model = models.from_pretrained(path)
  got = nnx.jit(_fused_logprobs)(model, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(targets))

  assert max_error(got, want, mask) <= 1e-4
  np.testing.assert_array_equal(np.asarray(got)[~mask], 0.0)


def test_fused_logprob_gradients_match_the_logits_path(tmp_path_factory):
  path, hf_model = saved_checkpoint(tmp_path_factory, "gemma2")
  ids, mask, _ = padded_batch(hf_model.config.vocab_size, seed=6)
  ids, mask = jnp.asarray(ids), jnp.asarray(mask)
  targets = jnp.asarray(_next_tokens(np.asarray(ids)))
  model = models.from_pretrained(path)

  def fused(model):
    return jnp.sum(_fused_logprobs(model, ids, mask, targets))

  def materialised(model):
    logp = jax.nn.log_softmax(run_lm(model, ids, mask).logits)
    return jnp.sum(jnp.where(mask, jnp.take_along_axis(logp, targets[..., None], -1)[..., 0], 0.0))

  got = nnx.jit(nnx.grad(fused))(model)
  want = nnx.jit(nnx.grad(materialised))(model)
  got_leaves, want_leaves = jax.tree.leaves(got), jax.tree.leaves(want)
  assert len(got_leaves) == len(want_leaves) > 0
  for g, w in zip(got_leaves, want_leaves):
    g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
    assert np.abs(w).max() > 0
    np.testing.assert_allclose(g, w, rtol=0, atol=1e-4 * np.abs(w).max())


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # untied and tied heads
def test_bf16_logits_agree_with_the_fused_kernel(tmp_path_factory, family):
  # Large logits (the head scaled up) make any bf16 rounding of the logits visible: rounded before
  # the cast to fp32 they were off by up to ~0.1 nats from the kernel's fp32 accumulation.
  path, hf_model = saved_checkpoint(tmp_path_factory, family)
  ids, mask, _ = padded_batch(hf_model.config.vocab_size, seed=7)
  targets = jnp.asarray(_next_tokens(ids))
  ids, mask = jnp.asarray(ids), jnp.asarray(mask)
  model = models.from_pretrained(path, dtype=jnp.bfloat16)
  head = model.lm_head.kernel if model.lm_head is not None else model.model.embed.embedding
  head[...] = head[...] * 40.0

  out = run_lm(model, ids, mask)
  model_logp = jnp.take_along_axis(jax.nn.log_softmax(out.logits), targets[..., None], -1)[..., 0]
  kernel_logp = ax.token_logprobs(out.hidden_states, model.get_lm_head(), targets, mask=mask).logp

  assert out.logits.dtype == jnp.float32
  assert float(jnp.max(jnp.abs(out.logits))) > 20.0  # the regime where bf16 rounding shows
  diff = np.abs(np.asarray(model_logp) - np.asarray(kernel_logp))[np.asarray(mask)]
  assert diff.max() <= 1e-3, diff.max()
