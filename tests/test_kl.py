"""KL estimators (Schulman 2020), exact categorical KL, KL-penalised rewards and KL controllers."""

import functools
import inspect
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import alignax as ax
from tests.reference import numpy_rl as ref

ESTIMATORS = ax.KL_ESTIMATORS


def _logps(seed=0, shape=(2, 3, 5)):
  rng = np.random.default_rng(seed)
  logp = np.log(rng.uniform(0.05, 1.0, size=shape)).astype(np.float32)
  ref_logp = np.log(rng.uniform(0.05, 1.0, size=shape)).astype(np.float32)
  return logp, ref_logp


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_estimators_match_reference(estimator):
  logp, ref_logp = _logps()
  got = ax.kl_estimate(logp, ref_logp, kl_estimator=estimator)
  np.testing.assert_allclose(got, ref.kl_estimator(logp, ref_logp, estimator), rtol=1e-5,
                             atol=1e-6)
  jitted = jax.jit(functools.partial(ax.kl_estimate, kl_estimator=estimator))
  np.testing.assert_allclose(jitted(logp, ref_logp), got, rtol=1e-6)


def test_hand_derived_values():
  # pi = 1/2, pi_ref = 1/4: Delta = log 2, r = 1/2.
  logp, ref_logp = jnp.log(jnp.array([0.5])), jnp.log(jnp.array([0.25]))
  ln2 = math.log(2)
  want = {"k1": ln2, "k2": 0.5 * ln2 ** 2, "k3": (0.5 - 1) + ln2, "abs": ln2}
  for estimator, value in want.items():
    got = ax.kl_estimate(logp, ref_logp, kl_estimator=estimator)[0]
    assert got == pytest.approx(value, rel=1e-6)
  # Swapping the policies flips k1's sign, keeps k2, and k3 = r - 1 - log r with r = 2.
  assert ax.kl_estimate(ref_logp, logp, kl_estimator="k1")[0] == pytest.approx(-ln2, rel=1e-6)
  assert ax.kl_estimate(ref_logp, logp, kl_estimator="k3")[0] == pytest.approx(1 - ln2, rel=1e-6)


def test_k3_is_non_negative_and_zero_at_equality():
  logp, ref_logp = _logps(1)
  assert jnp.all(ax.kl_estimate(logp, ref_logp, kl_estimator="k3") >= 0)
  np.testing.assert_array_equal(ax.kl_estimate(logp, logp, kl_estimator="k3"), 0)


def test_clamp_bounds_value_and_keeps_gradients_finite():
  logp = jnp.array([-200.0, 0.0, -1.0, 100.0])
  ref_logp = jnp.array([0.0, -200.0, -1.5, -100.0])
  f = functools.partial(ax.kl_estimate, kl_estimator="k3", kl_clamp=10.0)
  value = f(logp, ref_logp)
  # Delta = -200 gives exp(200) unclamped; Delta = 200 gives 199; Delta = 0.5 is inside the range.
  np.testing.assert_allclose(value, [10.0, 10.0, math.expm1(-0.5) + 0.5, 10.0], rtol=1e-6)
  grad = jax.grad(lambda lp: f(lp, ref_logp).sum())(logp)
  np.testing.assert_allclose(grad, [0.0, 0.0, 1 - math.exp(-0.5), 0.0], rtol=1e-6)
  unclamped = ax.kl_estimate(logp, ref_logp, kl_estimator="k3")
  assert jnp.isinf(unclamped[0])
  k1 = ax.kl_estimate(logp, ref_logp, kl_estimator="k1", kl_clamp=10.0)
  np.testing.assert_allclose(k1, [-10.0, 10.0, 0.5, 10.0])


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_check_grads(estimator):
  logp, ref_logp = _logps(2, shape=(4,))
  logp = logp + 0.3  # keep |Delta| away from 0, where abs has a kink
  check_grads(lambda a, b: ax.kl_estimate(a, b, kl_estimator=estimator), (logp, ref_logp), order=1,
              modes=("fwd", "rev"), eps=1e-3, atol=1e-2, rtol=1e-2)


def test_gradient_identities_exact_expectation():
  """As losses: E[grad k1] = 0, E[grad k2] = grad KL(pi||ref), E[grad k3] = grad KL(ref||pi).

  Expectations are exact sums over a 10-way categorical, with the sampling weights held fixed
  (samples are data; the gradient flows through log pi only).
  """
  rng = np.random.default_rng(3)
  theta = jnp.asarray(rng.normal(size=10), jnp.float32)
  ref_logits = jnp.asarray(rng.normal(size=10), jnp.float32)
  ref_logp = jax.nn.log_softmax(ref_logits)

  def expected_estimate(th, estimator):
    logp = jax.nn.log_softmax(th)
    weights = jax.lax.stop_gradient(jnp.exp(logp))
    return jnp.sum(weights * ax.kl_estimate(logp, ref_logp, kl_estimator=estimator))

  grad = {e: jax.grad(expected_estimate)(theta, e) for e in ("k1", "k2", "k3")}
  reverse_kl = jax.grad(lambda th: ax.categorical_kl(th, ref_logits))(theta)
  forward_kl = jax.grad(lambda th: ax.categorical_kl(ref_logits, th))(theta)
  np.testing.assert_allclose(grad["k1"], 0, atol=1e-6)
  np.testing.assert_allclose(grad["k2"], reverse_kl, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(grad["k3"], forward_kl, rtol=1e-5, atol=1e-6)
  assert np.max(np.abs(forward_kl - reverse_kl)) > 1e-2  # the identities are distinguishable
  # k1 in the reward (score function, REINFORCE) gives the reverse-KL gradient.
  logp = jax.nn.log_softmax(theta)
  k1 = jax.lax.stop_gradient(ax.kl_estimate(logp, ref_logp, kl_estimator="k1"))
  reinforce = jax.grad(
      lambda th: jnp.sum(jnp.exp(jax.lax.stop_gradient(logp)) * k1 * jax.nn.log_softmax(th)))(theta)
  np.testing.assert_allclose(reinforce, reverse_kl, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_estimator_statistics_on_a_categorical():
  """k1 and k3 are unbiased within 4 standard errors; k2 is biased upwards here; fixed seed."""
  probs = np.array([0.4, 0.3, 0.2, 0.1])
  ref_probs = np.array([0.1, 0.2, 0.3, 0.4])
  true_kl = float(np.sum(probs * np.log(probs / ref_probs)))
  tokens = jax.random.categorical(jax.random.key(7), jnp.log(probs), shape=(400_000,))
  logp, ref_logp = jnp.log(probs)[tokens], jnp.log(ref_probs)[tokens]
  for estimator in ("k1", "k3"):
    k = np.asarray(ax.kl_estimate(logp, ref_logp, kl_estimator=estimator), np.float64)
    se = k.std() / math.sqrt(k.size)
    assert abs(k.mean() - true_kl) < 4 * se, (estimator, k.mean(), true_kl, se)
  k2 = np.asarray(ax.kl_estimate(logp, ref_logp, kl_estimator="k2"), np.float64)
  exact_k2 = float(np.sum(probs * 0.5 * np.log(probs / ref_probs) ** 2))
  assert abs(k2.mean() - exact_k2) < 4 * k2.std() / math.sqrt(k2.size)
  assert exact_k2 > true_kl


def test_categorical_kl_matches_reference_and_properties():
  rng = np.random.default_rng(4)
  p = rng.normal(size=(2, 3, 7)).astype(np.float32)
  q = rng.normal(size=(2, 3, 7)).astype(np.float32)
  got = ax.categorical_kl(p, q)
  np.testing.assert_allclose(got, ref.categorical_kl(p, q), rtol=1e-5, atol=1e-6)
  assert jnp.all(got >= 0)
  np.testing.assert_allclose(ax.categorical_kl(p, p), 0, atol=1e-6)
  np.testing.assert_allclose(ax.categorical_kl(p, p + 3.0), 0, atol=1e-6)  # shift invariant
  np.testing.assert_allclose(ax.categorical_kl(np.moveaxis(p, -1, 0), np.moveaxis(q, -1, 0),
                                               axis=0), got, rtol=1e-6)
  check_grads(ax.categorical_kl, (p[0], q[0]), order=1, modes=("fwd", "rev"), eps=1e-2,
              atol=1e-2, rtol=1e-2)


def test_categorical_kl_large_logits():
  p = jnp.array([[1e4, -1e4, 0.0], [1e4, 1e4 - 1.0, -1e4]], jnp.float32)
  q = jnp.array([[-1e4, 1e4, 0.0], [1e4 - 1.0, 1e4, 1e4]], jnp.float32)
  got = ax.categorical_kl(p, q)
  np.testing.assert_allclose(got, ref.categorical_kl(p, q), rtol=1e-5)
  assert got[0] == pytest.approx(2e4, rel=1e-6)
  grads = jax.grad(lambda a, b: ax.categorical_kl(a, b).sum(), argnums=(0, 1))(p, q)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads)


def test_categorical_kl_masked_vocabulary():
  p = jnp.array([0.0, 1.0, -jnp.inf])
  q = jnp.array([1.0, 0.0, -jnp.inf])
  want = ref.categorical_kl(np.array([[0.0, 1.0]]), np.array([[1.0, 0.0]]))[0]
  assert ax.categorical_kl(p, q) == pytest.approx(want, rel=1e-6)
  grad = jax.grad(lambda a: ax.categorical_kl(a, q))(p)
  assert bool(jnp.all(jnp.isfinite(grad)))


def test_kl_penalized_rewards_matches_reference():
  logp, ref_logp = _logps(5, shape=(4, 6))
  mask = np.array([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0],
                   [1, 0, 1, 1, 0, 0]], bool)
  scores = np.array([1.0, -2.0, 3.0, 0.5], np.float32)
  got = ax.kl_penalized_rewards(logp, ref_logp, scores, mask, beta=0.1)
  np.testing.assert_allclose(got, ref.kl_penalized_rewards(scores, logp, ref_logp, mask, 0.1),
                             rtol=1e-5, atol=1e-7)
  np.testing.assert_array_equal(got[2], 0)  # no valid token: no score, no penalty
  assert got[3, 3] == pytest.approx(0.5 - 0.1 * (logp[3, 3] - ref_logp[3, 3]), rel=1e-5)
  # beta may be traced (an adaptive coefficient); leading batch dims are fine.
  jitted = jax.jit(lambda b: ax.kl_penalized_rewards(logp[None], ref_logp[None], scores[None],
                                                     mask[None], beta=b, kl_estimator="k3"))
  k3 = ref.kl_estimator(logp, ref_logp, "k3")
  want = np.where(mask, -0.2 * k3, 0) + np.where(np.asarray(ax.last_valid_token(mask)),
                                                 scores[:, None], 0)
  np.testing.assert_allclose(jitted(jnp.float32(0.2))[0], want, rtol=1e-5, atol=1e-7)


def test_kl_penalized_rewards_clamp():
  logp = jnp.array([[-1.0, -9.0, -2.0]])
  ref_logp = jnp.array([[-1.5, -1.0, -2.0]])
  mask = jnp.array([[True, True, False]])
  got = ax.kl_penalized_rewards(logp, ref_logp, jnp.array([2.0]), mask, beta=0.5, kl_clamp=1.0)
  # k1 = [0.5, -8 -> clamped to -1]; the score sits on the last valid token (index 1).
  np.testing.assert_allclose(got, [[-0.5 * 0.5, 0.5 * 1.0 + 2.0, 0.0]], rtol=1e-6)


def test_adaptive_kl_controller_matches_reference():
  controller = ax.adaptive_kl_controller(init_kl_coef=0.2, target=6.0, horizon=10_000.0)
  observed = [(12.0, 256), (6.5, 256), (1.0, 512), (5.9, 128)]
  state = controller.init()
  update = jax.jit(controller.update)
  got = []
  for kl, n in observed:
    state = update(state, kl, n)
    got.append(float(state.kl_coef))
  np.testing.assert_allclose(got, ref.adaptive_kl(0.2, 6.0, 10_000.0, observed), rtol=1e-6)
  # Hand-derived first step: e = clip(12/6 - 1) = 0.2 -> 0.2 * (1 + 0.2 * 256 / 1e4).
  assert got[0] == pytest.approx(0.2 * (1 + 0.2 * 256 / 10_000), rel=1e-6)
  fixed = ax.fixed_kl_controller(kl_coef=0.05)
  assert float(fixed.update(fixed.init(), 100.0, 10).kl_coef) == pytest.approx(0.05)


def test_bad_input_messages():
  logp = jnp.zeros((2, 3))
  kl_estimate = inspect.unwrap(ax.kl_estimate)
  with pytest.raises(ValueError, match="kl_estimator='k4' is not supported"):
    kl_estimate(logp, logp, kl_estimator="k4")
  with pytest.raises(ValueError, match=r"logp\[2, 3\], ref_logp\[3, 2\]"):
    kl_estimate(logp, jnp.zeros((3, 2)), kl_estimator="k1")
  with pytest.raises(ValueError, match="clamp must be > 0"):
    kl_estimate(logp, logp, kl_estimator="k3", kl_clamp=-1.0)
  rewards = inspect.unwrap(ax.kl_penalized_rewards)
  with pytest.raises(ValueError, match="beta must be >= 0"):
    rewards(logp, logp, jnp.zeros(2), jnp.ones((2, 3), bool), beta=-0.1)
  with pytest.raises(ValueError, match=r"scores must have shape"):
    rewards(logp, logp, jnp.zeros(3), jnp.ones((2, 3), bool), beta=0.1)
  with pytest.raises(TypeError, match="mask must be a boolean array"):  # a 0/1 int mask
    rewards(logp, logp, jnp.zeros(2), jnp.ones((2, 3), jnp.int32), beta=0.1)
  with pytest.raises(ValueError, match="logits_p"):
    inspect.unwrap(ax.categorical_kl)(jnp.zeros((2, 3)), jnp.zeros((2, 4)))
  with pytest.raises(ValueError, match="target must be > 0"):
    ax.adaptive_kl_controller(init_kl_coef=0.1, target=0.0, horizon=1.0)
  with pytest.raises(ValueError, match="kl_coef must be >= 0"):
    ax.fixed_kl_controller(kl_coef=-1.0)


def test_bad_input_raises_at_trace_time_under_jit():
  logp = jnp.zeros((2, 3))
  with pytest.raises((ValueError, TypeError), match="estimator"):
    jax.jit(functools.partial(ax.kl_estimate, kl_estimator="k4"))(logp, logp)
  with pytest.raises(ValueError, match="beta must be >= 0"):
    jax.jit(functools.partial(ax.kl_penalized_rewards, beta=-1.0))(
        logp, logp, jnp.zeros(2), jnp.ones((2, 3), bool))
