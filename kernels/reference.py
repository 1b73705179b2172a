"""Naive LM-head statistics: materialise the [N, V] logits and use plain autodiff.

This is the oracle the chunked and Pallas implementations are tested against. It needs N·V·4 bytes
of logits (and more for their gradient), so use it only on small shapes.
"""

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float, Int

from alignax.kernels import common
from alignax.kernels.common import KLStats, VocabStats


def _logits(
  hidden: Array,
  weight: Array,
  bias: Array | None,
  *,
  temperature: float,
  softcap: float | None,
  logit_scale: float,
  vocab_offset: int,
  valid_vocab: int | None,
) -> tuple[Array, Array]:
  """Returns z [N, Vs] (−inf at excluded columns) and the bool column mask [Vs]."""
  dot = jnp.einsum("nd,vd->nv", hidden, weight, preferred_element_type=jnp.float32)
  valid = common.valid_columns(
    jnp.arange(weight.shape[0]), shard_vocab=weight.shape[0], vocab_offset=vocab_offset,
    valid_vocab=valid_vocab,
  )
  z, _ = common.transform_logits(
    dot, bias, valid, logit_scale=logit_scale, softcap=softcap, temperature=temperature
  )
  return z, valid


def _lse_and_softmax(z: Array) -> tuple[Array, Array]:
  # logsumexp / softmax of an all −inf row give −inf / NaN; an empty slice must give −inf / 0.
  nonempty = jnp.any(jnp.isfinite(z), axis=-1, keepdims=True)
  z_safe = jnp.where(nonempty, z, 0.0)
  lse = jnp.where(nonempty[:, 0], jax.nn.logsumexp(z_safe, axis=-1), -jnp.inf)
  probs = jnp.where(nonempty, jax.nn.softmax(z_safe, axis=-1), 0.0)
  return lse, probs


def vocab_stats(
  hidden: Float[Array, "N d"],
  weight: Float[Array, "V d"],
  targets: Int[Array, "N"],
  *,
  bias: Float[Array, "V"] | None = None,
  temperature: float = 1.0,
  softcap: float | None = None,
  logit_scale: float = 1.0,
  vocab_offset: int = 0,
  valid_vocab: int | None = None,
) -> VocabStats:
  """lse = log Σ_j e^{z_j}, target_logit = z_target, expected_logit = Σ_j softmax(z)_j z_j,
  max_logit = max_j z_j.

  z = cap(logit_scale · h Wᵀ + b) / temperature over the slice [vocab_offset, vocab_offset + V) of
  the vocabulary (see ``alignax.kernels.common``); the target logit is 0 when the target lies
  outside the slice. Materialises the logits. ``max_logit`` is stop-gradient.

  Args:
    hidden: hidden states [N, d].
    weight: LM-head rows of the slice [V, d].
    targets: global target ids [N].
    bias: LM-head bias of the slice [V], optional.
    temperature, softcap, logit_scale: the logit transform.
    vocab_offset: global id of the slice's first row.
    valid_vocab: global ids >= this are padding and excluded.

  Returns:
    ``VocabStats`` of [N] fp32 arrays.
  """
  common.check_head_inputs(hidden, weight, targets, bias)
  common.check_options(
    temperature=temperature, softcap=softcap, logit_scale=logit_scale, vocab_offset=vocab_offset,
    valid_vocab=valid_vocab,
  )
  z, valid = _logits(
    hidden, weight, bias, temperature=temperature, softcap=softcap, logit_scale=logit_scale,
    vocab_offset=vocab_offset, valid_vocab=valid_vocab,
  )
  lse, probs = _lse_and_softmax(z)
  z_finite = jnp.where(valid, z, 0.0)  # keeps 0 · (−inf) out of the products and their gradients
  local = targets.astype(jnp.int32) - vocab_offset
  in_slice = (local >= 0) & (local < weight.shape[0])
  index = jnp.clip(local, 0, weight.shape[0] - 1)
  picked = jnp.take_along_axis(z_finite, index[:, None], axis=-1)[:, 0]
  target_logit = jnp.where(in_slice & valid[index], picked, 0.0)
  max_logit = lax.stop_gradient(jnp.max(z, axis=-1))
  return VocabStats(lse, target_logit, jnp.sum(probs * z_finite, axis=-1), max_logit)


def kl_stats(
  hidden_p: Float[Array, "N d"],
  weight_p: Float[Array, "V d"],
  hidden_q: Float[Array, "N dq"],
  weight_q: Float[Array, "V dq"],
  *,
  bias_p: Float[Array, "V"] | None = None,
  bias_q: Float[Array, "V"] | None = None,
  temperature: float = 1.0,
  softcap: float | None = None,
  logit_scale: float = 1.0,
  vocab_offset: int = 0,
  valid_vocab: int | None = None,
) -> KLStats:
  """lse_p, lse_q, expected_diff = Σ_j p_j (z^p_j − z^q_j); KL(p‖q) = expected_diff − lse_p + lse_q.

  Both heads use the same logit transform and vocabulary slice; the q side is stop-gradient.
  Materialises both sets of logits.

  Args:
    hidden_p, weight_p, bias_p: the differentiated policy's hidden states [N, d], head [V, d], [V].
    hidden_q, weight_q, bias_q: the reference policy's (any hidden width dq).
    temperature, softcap, logit_scale, vocab_offset, valid_vocab: as in ``vocab_stats``.

  Returns:
    ``KLStats`` of [N] fp32 arrays.
  """
  common.check_head_inputs(hidden_p, weight_p, None, bias_p, prefix="_p")
  common.check_head_inputs(hidden_q, weight_q, None, bias_q, prefix="_q")
  common.check_options(
    temperature=temperature, softcap=softcap, logit_scale=logit_scale, vocab_offset=vocab_offset,
    valid_vocab=valid_vocab,
  )
  options = dict(
    temperature=temperature, softcap=softcap, logit_scale=logit_scale, vocab_offset=vocab_offset,
    valid_vocab=valid_vocab,
  )
  z_p, valid = _logits(hidden_p, weight_p, bias_p, **options)
  hidden_q, weight_q, bias_q = lax.stop_gradient((hidden_q, weight_q, bias_q))
  z_q, _ = _logits(hidden_q, weight_q, bias_q, **options)
  lse_p, probs_p = _lse_and_softmax(z_p)
  lse_q, _ = _lse_and_softmax(z_q)
  diff = jnp.where(valid, z_p, 0.0) - jnp.where(valid, z_q, 0.0)
  return KLStats(lse_p, lse_q, jnp.sum(probs_p * diff, axis=-1))
