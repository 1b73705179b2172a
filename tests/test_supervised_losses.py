"""sequence_logprobs and sft_loss: NumPy golden values, masked == sliced, empty rows, jit, grads,
errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import alignax as ax
from tests.reference import numpy_preference as ref


def unchecked(fn):
  """The function without the jaxtyping/beartype wrapper pytest adds: alignax's own errors."""
  return getattr(fn, "__wrapped__", fn)


def _tokens(seed, shape=(3, 7)):
  rng = np.random.default_rng(seed)
  logp = np.log(rng.uniform(0.01, 1.0, shape))
  lengths = rng.integers(1, shape[-1] + 1, shape[:-1])
  mask = np.arange(shape[-1]) < lengths[..., None]
  return logp, mask, lengths


@pytest.mark.parametrize("average", [False, True])
def test_sequence_logprobs_matches_numpy(average):
  logp, mask, _ = _tokens(0, (2, 3, 7))
  out = ax.sequence_logprobs(jnp.asarray(logp, jnp.float32), jnp.asarray(mask), average=average)
  assert out.shape == (2, 3)
  np.testing.assert_allclose(out, ref.sequence_logprobs(logp, mask, average), rtol=1e-5)
  jitted = jax.jit(ax.sequence_logprobs, static_argnames="average")(
      jnp.asarray(logp, jnp.float32), jnp.asarray(mask), average=average)
  np.testing.assert_allclose(jitted, out, rtol=1e-6)


@pytest.mark.parametrize("average", [False, True])
def test_sequence_logprobs_masked_equals_sliced(average):
  logp, mask, lengths = _tokens(1)
  # Padding holds garbage that must not leak into values or gradients.
  padded = np.where(mask, logp, np.nan)
  out = ax.sequence_logprobs(jnp.asarray(padded, jnp.float32), jnp.asarray(mask), average=average)
  for row, length in enumerate(lengths):
    sliced = ax.sequence_logprobs(jnp.asarray(logp[row, :length], jnp.float32),
                                  jnp.ones(length, bool), average=average)
    np.testing.assert_allclose(out[row], sliced, rtol=1e-6)
  grad = jax.grad(lambda x: jnp.sum(ax.sequence_logprobs(x, jnp.asarray(mask), average=average)))(
      jnp.asarray(padded, jnp.float32))
  expected = np.where(mask, 1.0 / (lengths[:, None] if average else 1), 0.0)
  np.testing.assert_allclose(grad, expected, rtol=1e-6)


def test_empty_completion_has_zero_logprob_and_finite_gradient():
  logp = jnp.log(jnp.full((2, 4), 0.5))
  mask = jnp.array([[True, True, False, False], [False] * 4])
  for average in (False, True):
    out = ax.sequence_logprobs(logp, mask, average=average)
    assert out[1] == 0.0
    grad = jax.grad(lambda x: jnp.sum(ax.sequence_logprobs(x, mask, average=average)))(logp)
    assert np.all(np.isfinite(grad)) and np.all(grad[1] == 0.0)


def test_sft_loss_values():
  logp, mask, _ = _tokens(2)
  args = jnp.asarray(logp, jnp.float32), jnp.asarray(mask)
  loss, metrics = ax.sft_loss(*args)
  np.testing.assert_allclose(loss, ref.sft_token_mean(logp, mask), rtol=1e-5)
  assert metrics["num_tokens"] == mask.sum()
  seq_loss, _ = ax.sft_loss(*args, loss_agg_mode="seq_mean_token_mean")
  np.testing.assert_allclose(seq_loss, ref.sft_seq_mean(logp, mask), rtol=1e-5)
  # Hand value: every target token has probability 1/2.
  half, _ = ax.sft_loss(jnp.log(jnp.full((2, 3), 0.5)), jnp.ones((2, 3), bool))
  np.testing.assert_allclose(half, math.log(2), rtol=1e-6)
  jitted, _ = jax.jit(ax.sft_loss, static_argnames="loss_agg_mode")(
      *args, loss_agg_mode="seq_mean_token_mean")
  np.testing.assert_allclose(jitted, seq_loss, rtol=1e-6)


def test_sft_loss_masked_equals_sliced():
  logp, mask, lengths = _tokens(3)
  padded = jnp.asarray(np.where(mask, logp, np.inf), jnp.float32)
  loss, _ = ax.sft_loss(padded, jnp.asarray(mask))
  flat = jnp.asarray(np.concatenate([logp[i, :n] for i, n in enumerate(lengths)]), jnp.float32)
  sliced, _ = ax.sft_loss(flat[None], jnp.ones((1, flat.size), bool))
  np.testing.assert_allclose(loss, sliced, rtol=1e-6)
  grad = jax.grad(lambda x: ax.sft_loss(x, jnp.asarray(mask))[0])(padded)
  np.testing.assert_allclose(grad, np.where(mask, -1.0 / mask.sum(), 0.0), rtol=1e-6)


def test_sft_loss_check_grads():
  logp, mask, _ = _tokens(4)
  for mode in ("token_mean", "seq_mean_token_mean"):
    check_grads(lambda x: ax.sft_loss(x, jnp.asarray(mask), loss_agg_mode=mode)[0],
                (jnp.asarray(logp, jnp.float32),), order=1, modes=("rev",))


def test_bad_inputs():
  logp = jnp.zeros((2, 3))
  with pytest.raises(TypeError, match="mask must be a boolean array"):
    unchecked(ax.sequence_logprobs)(logp, jnp.ones((2, 3)))
  with pytest.raises(TypeError, match="mask"):
    ax.sequence_logprobs(logp, jnp.ones((2, 3)))
  with pytest.raises(ValueError, match=r"logp\[2, 3\].*mask\[3, 2\]"):
    jax.jit(unchecked(ax.sft_loss))(logp, jnp.ones((3, 2), bool))
  with pytest.raises(ValueError, match=r"token_logp\[2, 3\].*mask\[2, 4\]"):
    unchecked(ax.sequence_logprobs)(logp, jnp.ones((2, 4), bool))
  with pytest.raises(ValueError, match="token_logp must have at least 1 dims"):
    unchecked(ax.sequence_logprobs)(jnp.zeros(()), jnp.ones((), bool))
  with pytest.raises(ValueError, match="loss_agg_mode='sum' is not supported"):
    jax.jit(lambda x, m: unchecked(ax.sft_loss)(x, m, loss_agg_mode="sum"))(
        logp, jnp.ones((2, 3), bool))
  with pytest.raises(ValueError, match="max_len is required"):
    ax.sft_loss(logp, jnp.ones((2, 3), bool), loss_agg_mode="seq_mean_token_sum_norm")
