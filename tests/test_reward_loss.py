"""bradley_terry_loss: NumPy golden values, hand values, metrics, invariants and errors."""

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


def _scores(seed, shape=(8,)):
  rng = np.random.default_rng(seed)
  return rng.normal(0.5, 2.0, shape), rng.normal(0.0, 2.0, shape)


@pytest.mark.parametrize("margin,center", [(None, 0.0), (0.7, 0.0), ("per_pair", 0.01)])
def test_matches_numpy(margin, center):
  chosen, rejected = _scores(0)
  if margin == "per_pair":
    margin = np.linspace(0.0, 2.0, chosen.size)
  kwargs = dict(margin=None if margin is None else jnp.asarray(margin, jnp.float32),
                center_coefficient=center)
  args = jnp.asarray(chosen, jnp.float32), jnp.asarray(rejected, jnp.float32)
  loss, metrics = ax.bradley_terry_loss(*args, **kwargs)
  losses, _ = ax.bradley_terry_loss(*args, **kwargs, reduction="none")
  expected = ref.bradley_terry(chosen, rejected, 0.0 if margin is None else margin, center)
  np.testing.assert_allclose(losses, expected, rtol=1e-5)
  assert set(metrics) == {"accuracy", "margin", "min_reward", "mean_reward", "max_reward"}
  np.testing.assert_allclose(loss, expected.mean(), rtol=1e-5)
  np.testing.assert_allclose(metrics["accuracy"], (chosen > rejected).mean())
  np.testing.assert_allclose(metrics["margin"], (chosen - rejected).mean(), rtol=1e-5)
  both = np.concatenate([chosen, rejected])
  np.testing.assert_allclose(metrics["min_reward"], both.min(), rtol=1e-6)
  np.testing.assert_allclose(metrics["mean_reward"], both.mean(), rtol=1e-5)
  np.testing.assert_allclose(metrics["max_reward"], both.max(), rtol=1e-6)


def test_hand_values():
  equal = jnp.array([1.5, -2.0])
  loss, metrics = ax.bradley_terry_loss(equal, equal)
  np.testing.assert_allclose(loss, math.log(2), rtol=1e-6)
  assert metrics["accuracy"] == 0.0  # ties are not wins, as in TRL
  # A margin equal to the score gap puts the pair back at log 2; centring adds c·(r_c + r_r)².
  loss, _ = ax.bradley_terry_loss(jnp.array([3.0]), jnp.array([1.0]), margin=2.0,
                                  center_coefficient=0.5)
  np.testing.assert_allclose(loss, math.log(2) + 0.5 * 16.0, rtol=1e-6)


def test_jit_grads_and_leading_dims():
  chosen, rejected = _scores(1, (2, 4))
  args = jnp.asarray(chosen, jnp.float32), jnp.asarray(rejected, jnp.float32)
  loss, _ = ax.bradley_terry_loss(*args, margin=0.3, center_coefficient=0.01)
  losses, _ = ax.bradley_terry_loss(*args, margin=jnp.full((2, 4), 0.3), center_coefficient=0.01,
                                    reduction="none")
  assert losses.shape == (2, 4)
  np.testing.assert_allclose(jnp.mean(losses), loss, rtol=1e-6)
  jitted, _ = jax.jit(lambda c, r: ax.bradley_terry_loss(c, r, margin=0.3,
                                                         center_coefficient=0.01))(*args)
  np.testing.assert_allclose(jitted, loss, rtol=1e-6)
  check_grads(lambda c, r: ax.bradley_terry_loss(c, r, margin=0.3, center_coefficient=0.01)[0],
              args, order=1, modes=("rev",))


def test_swap_and_extreme_scores():
  chosen, rejected = _scores(2)
  args = jnp.asarray(chosen, jnp.float32), jnp.asarray(rejected, jnp.float32)
  _, metrics = ax.bradley_terry_loss(*args)
  _, swapped = ax.bradley_terry_loss(*args[::-1])
  np.testing.assert_allclose(swapped["accuracy"], 1 - metrics["accuracy"])
  np.testing.assert_allclose(swapped["margin"], -metrics["margin"], rtol=1e-6)
  big = jnp.array([1e4, -1e4, 0.0])
  loss, grads = jax.value_and_grad(lambda c, r: ax.bradley_terry_loss(c, r)[0], argnums=(0, 1))(
      big, -big)
  # The pair (−1e4, 1e4) costs 2e4, the tie (0, 0) log 2, the won pair nothing.
  np.testing.assert_allclose(loss, (2e4 + math.log(2)) / 3, rtol=1e-6)
  assert all(np.all(np.isfinite(g)) for g in grads)


def test_bad_inputs():
  scores = jnp.zeros(3)
  with pytest.raises(ValueError, match=r"chosen_scores\[3\], rejected_scores\[4\]"):
    unchecked(ax.bradley_terry_loss)(scores, jnp.zeros(4))
  with pytest.raises((ValueError, TypeError), match="rejected_scores"):
    ax.bradley_terry_loss(scores, jnp.zeros(4))
  with pytest.raises(ValueError, match=r"margin must be a scalar or have the shape of the scores"):
    jax.jit(lambda c, r: unchecked(ax.bradley_terry_loss)(c, r, margin=jnp.ones(2)))(scores, scores)
  with pytest.raises(ValueError, match="reduction='sum' is not supported"):
    unchecked(ax.bradley_terry_loss)(scores, scores, reduction="sum")
  with pytest.raises(ValueError, match="center_coefficient must be >= 0"):
    ax.bradley_terry_loss(scores, scores, center_coefficient=-0.01)


def test_margin_must_match_the_scores_exactly():
  """A [B, 1] margin against [B] scores once broadcast to a [B, B] loss (0.438 instead of 0.313)."""
  chosen, rejected = jnp.array([2.0, 0.0, 1.0]), jnp.array([0.0, 1.0, -1.0])
  margin = jnp.array([0.5, 0.0, 1.0])
  want = np.mean([-ref.log_sigmoid(c - r - m) for c, r, m in zip(
      np.asarray(chosen, np.float64), np.asarray(rejected, np.float64), np.asarray(margin))])
  loss, _ = ax.bradley_terry_loss(chosen, rejected, margin=margin)
  np.testing.assert_allclose(loss, want, rtol=1e-6)
  for fn in (ax.bradley_terry_loss, unchecked(ax.bradley_terry_loss)):
    with pytest.raises(ValueError, match=r"margin .*\[3\]; got \[3, 1\]"):
      fn(chosen, rejected, margin=margin[:, None])
  # Python and 0-d scalars still apply to every pair.
  scalar, _ = ax.bradley_terry_loss(chosen, rejected, margin=0.5)
  zero_d, _ = ax.bradley_terry_loss(chosen, rejected, margin=jnp.float32(0.5))
  np.testing.assert_allclose(scalar, zero_d)
  np.testing.assert_allclose(
      scalar, ax.bradley_terry_loss(chosen, rejected, margin=jnp.full(3, 0.5))[0], rtol=1e-7)
