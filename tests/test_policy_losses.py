"""Clipped surrogate, value loss, and the PPO / GRPO / Dr. GRPO / DAPO / GSPO / CISPO objectives."""

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

P, G, T = 2, 3, 6
MAX_LEN = 8


def _group_batch(seed=0, spread=0.3):
  """log-probs [P, G, T], per-sequence advantages [P, G], masks with an empty completion."""
  rng = np.random.default_rng(seed)
  logp = np.log(rng.uniform(0.05, 0.95, size=(P, G, T))).astype(np.float32)
  old_logp = (logp + rng.normal(0, spread, size=logp.shape)).astype(np.float32)
  ref_logp = (logp + rng.normal(0, spread, size=logp.shape)).astype(np.float32)
  advantages = rng.normal(size=(P, G)).astype(np.float32)
  lengths = rng.integers(1, T + 1, size=(P, G))
  lengths[1, 2] = 0
  mask = np.arange(T) < lengths[..., None]
  return logp, old_logp, ref_logp, advantages, mask


def _flat(x):
  return np.asarray(x).reshape(-1, np.shape(x)[-1])


# --- clipped surrogate ------------------------------------------------------------------------

@pytest.mark.parametrize("eps_high,dual_clip", [(None, None), (0.28, None), (0.28, 3.0)])
def test_clipped_surrogate_matches_reference(eps_high, dual_clip):
  logp, old_logp, _, adv, _ = _group_batch(1, spread=0.5)
  adv = np.broadcast_to(adv[..., None], logp.shape)
  loss, stats = ax.clipped_surrogate(logp, old_logp, adv, clip_eps_low=0.2, clip_eps_high=eps_high,
                                     dual_clip=dual_clip)
  high = 0.2 if eps_high is None else eps_high
  want = np.vectorize(lambda a, b, c: ref.ppo_clip_token(a, b, c, 0.2, high, dual_clip))(
      logp, old_logp, adv)
  np.testing.assert_allclose(loss, want, rtol=1e-5, atol=1e-6)
  ratio = np.exp(logp.astype(np.float64) - old_logp)
  np.testing.assert_allclose(stats.ratio, ratio, rtol=1e-5)
  np.testing.assert_allclose(stats.approx_kl, ratio - 1 - np.log(ratio), rtol=1e-3, atol=1e-6)


def test_clipped_surrogate_at_ratio_one_is_minus_advantage():
  logp, _, _, adv, _ = _group_batch(2)
  adv = np.broadcast_to(adv[..., None], logp.shape)
  loss, stats = ax.clipped_surrogate(logp, logp, adv, clip_eps_high=0.28, dual_clip=3.0)
  np.testing.assert_allclose(loss, -adv, rtol=1e-6)
  grad = jax.grad(lambda lp: ax.clipped_surrogate(lp, logp, adv)[0].sum())(jnp.asarray(logp))
  np.testing.assert_allclose(grad, -adv, rtol=1e-6)
  assert not jnp.any(stats.is_region_clipped)
  np.testing.assert_array_equal(stats.approx_kl, 0)


def test_clip_flags_and_zeroed_gradients():
  ratio = jnp.array([0.5, 1.0, 1.5, 1.5, 0.5])
  adv = jnp.array([-1.0, 1.0, 1.0, -1.0, 1.0])
  old_logp = jnp.zeros(5)
  loss, stats = ax.clipped_surrogate(jnp.log(ratio), old_logp, adv, clip_eps_low=0.2)
  np.testing.assert_allclose(loss, [-0.8 * -1, -1.0, -1.2, 1.5, -0.5], rtol=1e-6)
  np.testing.assert_array_equal(stats.is_low_clipped, [True, False, False, False, False])
  np.testing.assert_array_equal(stats.is_high_clipped, [False, False, True, False, False])
  np.testing.assert_array_equal(stats.is_region_clipped, [True, False, True, False, False])
  grad = jax.grad(lambda lp: ax.clipped_surrogate(lp, old_logp, adv)[0].sum())(jnp.log(ratio))
  np.testing.assert_allclose(grad, [0.0, -1.0, 0.0, 1.5, -0.5], rtol=1e-6)  # d(-rA)/dlogp = -rA


def test_dual_clip():
  ratio = jnp.array([5.0, 2.0, 5.0, 0.1])
  adv = jnp.array([-1.0, -1.0, 1.0, -2.0])
  f = functools.partial(ax.clipped_surrogate, clip_eps_low=0.2, dual_clip=3.0)
  loss, stats = f(jnp.log(ratio), jnp.zeros(4), adv)
  # A < 0 and r = 5: max(5, 1.2) = 5 is capped at -cA = 3; r = 2 stays 2; A > 0 is unaffected.
  np.testing.assert_allclose(loss, [3.0, 2.0, -1.2, 1.6], rtol=1e-6)
  np.testing.assert_array_equal(stats.is_dual_clipped, [True, False, False, False])
  grad = jax.grad(lambda lp: f(lp, jnp.zeros(4), adv)[0].sum())(jnp.log(ratio))
  np.testing.assert_allclose(grad, [0.0, 2.0, 0.0, 0.0], rtol=1e-6)
  plain, _ = ax.clipped_surrogate(jnp.log(ratio), jnp.zeros(4), adv, clip_eps_low=0.2)
  np.testing.assert_allclose(plain, [5.0, 2.0, -1.2, 1.6], rtol=1e-6)


def test_huge_log_ratio_stays_finite():
  logp = jnp.array([0.0, -0.1, 0.0])
  old_logp = jnp.array([-500.0, -0.1, 500.0])
  adv = jnp.array([1.0, -1.0, -1.0])
  value, grad = jax.value_and_grad(
      lambda lp: ax.clipped_surrogate(lp, old_logp, adv, dual_clip=3.0)[0].sum())(logp)
  assert bool(jnp.isfinite(value)) and bool(jnp.all(jnp.isfinite(grad)))


def test_kl_clamp_keeps_a_diverged_token_finite():
  # The policy has moved 100 nats below the reference on one valid token: k3 = e^100 overflows.
  logp, ref_logp = jnp.array([[-101.0, -1.0]]), jnp.array([[-1.0, -1.5]])
  mask, adv = jnp.ones((1, 2), bool), jnp.array([1.0])
  f = functools.partial(ax.grpo_loss, old_logp=None, ref_logp=ref_logp, advantages=adv, mask=mask,
                        beta=0.04)
  assert not np.isfinite(f(logp)[0])
  value, grad = jax.value_and_grad(lambda lp: f(lp, kl_clamp=10.0)[0])(logp)
  k3 = math.exp(-0.5) - 1 + 0.5  # the second token, by hand
  # seq_mean_token_mean over one sequence: mean of (-A + 0.04 * clipped k3) over its two tokens.
  assert float(value) == pytest.approx(-1.0 + 0.04 * (10.0 + k3) / 2, rel=1e-6)
  assert bool(jnp.all(jnp.isfinite(grad)))
  with pytest.raises(ValueError, match="kl_clamp must be > 0"):
    inspect.unwrap(ax.grpo_loss)(logp, None, adv, mask, ref_logp=ref_logp, beta=0.04, kl_clamp=0.0)


def test_clipped_value_loss():
  values = jnp.array([1.0, 0.1, 1.5, 0.9])
  old_values = jnp.array([0.0, 0.0, 1.0, 1.0])
  returns = jnp.array([0.0, 1.0, 2.0, 0.0])
  got = ax.clipped_value_loss(values, old_values, returns, clip_eps=0.2)
  want = [ref.clipped_value_token(v, o, r, 0.2) for v, o, r in zip(values.tolist(),
                                                                   old_values.tolist(),
                                                                   returns.tolist())]
  np.testing.assert_allclose(got, want, rtol=1e-6)
  # 0.5 * max((V - R)^2, (clip(V, V_old +- 0.2) - R)^2), by hand.
  np.testing.assert_allclose(got, [0.5 * max(1.0, 0.04), 0.5 * 0.81, 0.5 * max(0.25, 0.64),
                                   0.5 * 0.81], rtol=1e-6)


# --- GRPO family ------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ax.AGG_MODES)
def test_grpo_loss_matches_reference(mode):
  logp, old_logp, ref_logp, adv, mask = _group_batch(3)
  loss, metrics = ax.grpo_loss(logp, old_logp, adv, mask, ref_logp=ref_logp, clip_eps_low=0.2,
                               clip_eps_high=0.28, beta=0.04, loss_agg_mode=mode, max_len=MAX_LEN)
  want = ref.grpo_objective(_flat(logp), _flat(old_logp), _flat(ref_logp), adv.ravel(),
                            _flat(mask), 0.2, 0.28, 0.04, mode, MAX_LEN)
  np.testing.assert_allclose(loss, want, rtol=1e-5, atol=1e-6)
  k3 = ref.kl_estimator(logp, ref_logp, "k3")
  assert metrics["kl"] == pytest.approx(k3[mask].mean(), rel=1e-5)


def test_metric_names_and_values():
  logp, old_logp, ref_logp, adv, mask = _group_batch(4, spread=0.6)
  entropy = np.abs(logp)
  _, metrics = ax.grpo_loss(logp, old_logp, adv, mask, ref_logp=ref_logp, beta=0.04,
                            entropy=entropy)
  assert set(metrics) == {"policy_loss", "kl", "approx_kl", "entropy", "clip_ratio/low_mean",
                          "clip_ratio/low_min", "clip_ratio/high_mean", "clip_ratio/high_max",
                          "clip_ratio/region_mean"}
  ratio = np.exp(logp.astype(np.float64) - old_logp)
  a = np.broadcast_to(adv[..., None], logp.shape)
  low, high = (ratio < 0.8) & (a < 0), (ratio > 1.2) & (a > 0)
  assert metrics["clip_ratio/low_mean"] == pytest.approx(low[mask].mean(), rel=1e-6)
  assert metrics["clip_ratio/high_mean"] == pytest.approx(high[mask].mean(), rel=1e-6)
  assert metrics["clip_ratio/region_mean"] == pytest.approx((low | high)[mask].mean(), rel=1e-6)
  rows = [i for i in range(P * G) if _flat(mask)[i].any()]
  low_rows = [_flat(low)[i][_flat(mask)[i]].mean() for i in rows]
  high_rows = [_flat(high)[i][_flat(mask)[i]].mean() for i in rows]
  assert metrics["clip_ratio/low_min"] == pytest.approx(min(low_rows), rel=1e-6)
  assert metrics["clip_ratio/high_max"] == pytest.approx(max(high_rows), rel=1e-6)
  assert metrics["entropy"] == pytest.approx(entropy[mask].mean(), rel=1e-6)
  assert metrics["approx_kl"] == pytest.approx((ratio - 1 - np.log(ratio))[mask].mean(), rel=1e-4)
  _, no_kl = ax.grpo_loss(logp, old_logp, -adv, mask, dual_clip=1.25)
  assert "kl" not in no_kl and "entropy" not in no_kl
  dual = (-a < 0) & (ratio > 1.25)  # max(r, clip(r)) |A| exceeds the cap 1.25 |A| iff r > 1.25
  assert no_kl["clip_ratio/dual_mean"] == pytest.approx(dual[mask].mean(), rel=1e-6)
  assert dual[mask].any()


def test_on_policy_loss_is_minus_mean_advantage():
  logp, _, _, adv, mask = _group_batch(5)
  f = functools.partial(ax.grpo_loss, beta=0.0, loss_agg_mode="token_mean")
  loss, metrics = f(logp, None, adv, mask)
  a = np.broadcast_to(adv[..., None], logp.shape)
  assert loss == pytest.approx(-a[mask].mean(), rel=1e-5)
  assert metrics["clip_ratio/region_mean"] == 0
  grad = jax.grad(lambda lp: f(lp, None, adv, mask)[0])(jnp.asarray(logp))
  np.testing.assert_allclose(grad, np.where(mask, -a / mask.sum(), 0), rtol=1e-5, atol=1e-8)
  np.testing.assert_allclose(grad, jax.grad(lambda lp: f(lp, logp, adv, mask)[0])(logp),
                             rtol=1e-6)


def test_sequence_and_token_advantages_agree():
  logp, old_logp, ref_logp, adv, mask = _group_batch(6)
  per_seq = ax.grpo_loss(logp, old_logp, adv, mask, ref_logp=ref_logp, beta=0.04)[0]
  per_token = ax.grpo_loss(logp, old_logp, np.broadcast_to(adv[..., None], logp.shape), mask,
                           ref_logp=ref_logp, beta=0.04)[0]
  assert float(per_seq) == pytest.approx(float(per_token), rel=1e-6)


@pytest.mark.parametrize("loss_type,level", [("clip", "token"), ("clip", "sequence"),
                                             ("cispo", "token")])
def test_masked_equals_sliced_and_padding_garbage(loss_type, level):
  logp, old_logp, ref_logp, adv, mask = _group_batch(7)
  mask[0, 0] = False  # a second empty completion

  def padded(x, fill):
    return np.concatenate([x, np.full((P, G, 3), fill, x.dtype)], axis=-1)

  f = functools.partial(ax.grpo_loss, loss_type=loss_type, importance_level=level, beta=0.04,
                        loss_agg_mode="seq_mean_token_sum_norm", max_len=MAX_LEN)
  (value, _), grad = jax.value_and_grad(f, has_aux=True)(jnp.asarray(logp), old_logp, adv, mask,
                                                      ref_logp=ref_logp)
  big = [padded(x, v) for x, v in ((logp, np.nan), (old_logp, -np.inf), (ref_logp, np.inf))]
  (big_value, _), big_grad = jax.value_and_grad(f, has_aux=True)(
      jnp.asarray(big[0]), big[1], adv, padded(mask, False), ref_logp=big[2])
  np.testing.assert_allclose(big_value, value, rtol=1e-6)
  np.testing.assert_allclose(big_grad[..., :T], grad, rtol=1e-6, atol=1e-8)
  np.testing.assert_array_equal(big_grad[..., T:], 0)
  np.testing.assert_array_equal(grad[0, 0], 0)
  assert bool(jnp.all(jnp.isfinite(grad)))


def test_all_masked_batch_is_finite():
  logp, old_logp, ref_logp, adv, _ = _group_batch(8)
  mask = np.zeros_like(logp, bool)
  for mode in ax.AGG_MODES:
    (value, _), grad = jax.value_and_grad(ax.grpo_loss, has_aux=True)(
        jnp.asarray(logp), old_logp, adv, mask, ref_logp=ref_logp, beta=0.04, loss_agg_mode=mode,
        max_len=MAX_LEN)
    assert value == 0
    np.testing.assert_array_equal(grad, 0)


def test_jit_equals_eager():
  logp, old_logp, ref_logp, adv, mask = _group_batch(9)
  f = functools.partial(ax.grpo_loss, clip_eps_high=0.28, dual_clip=3.0, beta=0.04)
  eager = f(logp, old_logp, adv, mask, ref_logp=ref_logp)
  jitted = jax.jit(f)(logp, old_logp, adv, mask, ref_logp=ref_logp)
  np.testing.assert_allclose(jitted[0], eager[0], rtol=1e-6)
  for name in eager[1]:
    np.testing.assert_allclose(jitted[1][name], eager[1][name], rtol=1e-6, atol=1e-7)


def test_traced_beta():
  logp, old_logp, ref_logp, adv, mask = _group_batch(10)
  f = jax.jit(lambda b: ax.grpo_loss(logp, old_logp, adv, mask, ref_logp=ref_logp, beta=b)[0])
  want = ax.grpo_loss(logp, old_logp, adv, mask, ref_logp=ref_logp, beta=0.1)[0]
  assert float(f(jnp.float32(0.1))) == pytest.approx(float(want), rel=1e-6)


def test_check_grads():
  logp, old_logp, ref_logp, adv, mask = _group_batch(11, spread=0.05)  # ratios away from kinks
  for level in ("token", "sequence"):
    check_grads(lambda lp, lv=level: ax.grpo_loss(lp, old_logp, adv, mask, ref_logp=ref_logp,
                                                  beta=0.04, importance_level=lv)[0],
                (jnp.asarray(logp),), order=1, modes=("fwd", "rev"), eps=1e-3, atol=1e-2,
                rtol=1e-2)


def test_gspo_gradient_identity():
  """GSPO-token with sequence advantages has the value and gradient of the sequence objective."""
  logp, old_logp, _, adv, mask = _group_batch(12, spread=0.15)
  eps = 0.05  # some sequences clip, some do not
  loss, metrics = ax.gspo_loss(logp, old_logp, adv, mask, clip_eps_low=eps, clip_eps_high=eps)

  def sequence_objective(lp):
    log_s = ax.masked_mean(lp - old_logp, mask, axis=-1)
    s = jnp.exp(log_s)
    per_seq = jnp.maximum(-s * adv, -jnp.clip(s, 1 - eps, 1 + eps) * adv)
    return jnp.mean(jnp.where(mask.any(-1), per_seq, 0.0))  # empty completions contribute 0

  want = ref.gspo_sequence_objective(_flat(logp), _flat(old_logp), adv.ravel(), _flat(mask), eps,
                                     eps)
  assert loss == pytest.approx(want, rel=1e-5)
  assert float(sequence_objective(logp)) == pytest.approx(want, rel=1e-5)
  clipped = metrics["clip_ratio/region_mean"]
  assert 0 < clipped < 1
  grad = jax.grad(lambda lp: ax.gspo_loss(lp, old_logp, adv, mask, clip_eps_low=eps,
                                          clip_eps_high=eps)[0])(jnp.asarray(logp))
  np.testing.assert_allclose(grad, jax.grad(sequence_objective)(jnp.asarray(logp)), rtol=1e-5,
                             atol=1e-7)


def test_cispo():
  logp, old_logp, _, adv, mask = _group_batch(13, spread=1.0)
  loss, metrics = ax.cispo_loss(logp, old_logp, adv, mask, cispo_max_weight=2.0)
  a = np.broadcast_to(adv[..., None], logp.shape)
  per_token = np.vectorize(lambda x, y, z: ref.cispo_token(x, y, z, 2.0))(logp, old_logp, a)
  assert loss == pytest.approx(per_token[mask].mean(), rel=1e-5)
  grad = jax.grad(lambda lp: ax.cispo_loss(lp, old_logp, adv, mask,
                                           cispo_max_weight=2.0)[0])(jnp.asarray(logp))
  weight = np.minimum(np.exp(logp.astype(np.float64) - old_logp), 2.0)
  # The capped weight is a constant: every token keeps the gradient -w A / N, even if capped.
  np.testing.assert_allclose(grad, np.where(mask, -weight * a / mask.sum(), 0), rtol=1e-4,
                             atol=1e-7)
  capped = (np.exp(logp.astype(np.float64) - old_logp) > 2.0) & (a > 0)
  assert capped[mask].any()
  # TRL logs CISPO's capping as `cispo_clip_ratio`, not the PPO `clip_ratio/*` family.
  assert set(metrics) == {"policy_loss", "approx_kl", "cispo_clip_ratio"}
  assert metrics["cispo_clip_ratio"] == pytest.approx(capped[mask].mean(), rel=1e-6)


def test_variants_are_the_papers_defaults():
  logp, old_logp, ref_logp, adv, mask = _group_batch(14, spread=0.4)
  args = (logp, old_logp, adv, mask)
  cases = [
      (ax.dapo_loss, dict(clip_eps_low=0.2, clip_eps_high=0.28, beta=0.0,
                          loss_agg_mode="token_mean")),
      (functools.partial(ax.dr_grpo_loss, max_len=MAX_LEN),
       dict(beta=0.0, loss_agg_mode="seq_mean_token_sum_norm", max_len=MAX_LEN)),
      (ax.gspo_loss, dict(importance_level="sequence", clip_eps_low=3e-4, clip_eps_high=4e-4,
                          beta=0.0)),
      (ax.cispo_loss, dict(loss_type="cispo", beta=0.0, loss_agg_mode="token_mean")),
  ]
  for variant, explicit in cases:
    assert float(variant(*args)[0]) == pytest.approx(float(ax.grpo_loss(*args, **explicit)[0]),
                                                    rel=1e-6)
  for variant in (ax.dapo_loss, ax.dr_grpo_loss, ax.gspo_loss, ax.cispo_loss):
    assert variant.func is ax.grpo_loss
    assert "``grpo_loss(logp, old_logp, advantages, mask" in variant.__doc__
  dr = ax.dr_grpo_loss(logp, None, adv, mask, max_len=MAX_LEN)[0]
  a = np.broadcast_to(adv[..., None], logp.shape)
  assert dr == pytest.approx(np.sum(np.where(mask, -a, 0)) / (P * G * MAX_LEN), rel=1e-5)


# --- PPO --------------------------------------------------------------------------------------

def test_ppo_loss_composes_policy_value_and_entropy():
  logp, old_logp, ref_logp, _, mask = _group_batch(15)
  rng = np.random.default_rng(15)
  adv = rng.normal(size=logp.shape).astype(np.float32)
  values, old_values, returns = (rng.normal(size=logp.shape).astype(np.float32) for _ in range(3))
  entropy = rng.uniform(0, 2, size=logp.shape).astype(np.float32)
  loss, metrics = ax.ppo_loss(logp, old_logp, adv, mask, values=values, old_values=old_values,
                              returns=returns, ref_logp=ref_logp, beta=0.05, vf_coef=0.1,
                              value_clip_eps=0.2, entropy=entropy, entropy_coef=0.01)
  pg = np.vectorize(lambda a, b, c: ref.ppo_clip_token(a, b, c, 0.2, 0.2))(logp, old_logp, adv)
  vf = np.vectorize(lambda v, o, r: ref.clipped_value_token(v, o, r, 0.2))(values, old_values,
                                                                            returns)
  kl = ref.kl_estimator(logp, ref_logp, "k3")
  want = (pg[mask].mean() + 0.1 * vf[mask].mean() + 0.05 * kl[mask].mean()
          - 0.01 * entropy[mask].mean())
  assert loss == pytest.approx(want, rel=1e-5)
  assert metrics["policy_loss"] == pytest.approx(pg[mask].mean(), rel=1e-5)
  assert metrics["loss/value"] == pytest.approx(vf[mask].mean(), rel=1e-5)
  v, o, r = (x.astype(np.float64) for x in (values, old_values, returns))
  is_clipped = (np.clip(v, o - 0.2, o + 0.2) - r) ** 2 > (v - r) ** 2
  assert metrics["val/clipfrac"] == pytest.approx(is_clipped[mask].mean(), rel=1e-6)
  grads = jax.grad(lambda lp, v: ax.ppo_loss(lp, old_logp, adv, mask, values=v,
                                             old_values=old_values, returns=returns)[0],
                   argnums=(0, 1))(jnp.asarray(logp), jnp.asarray(values))
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads)
  policy_only, _ = ax.ppo_loss(logp, old_logp, adv, mask)
  assert policy_only == pytest.approx(pg[mask].mean(), rel=1e-5)


def test_only_logp_and_values_are_differentiated():
  """Advantages and value targets from the live critic, and reference log-probs, leak no gradient.

  PPO with GAE computed inside the differentiated function from the critic's own values must give
  the gradient of the same numbers passed in as constants (rlax stops these gradients too).
  """
  logp, old_logp, ref_logp, seq_adv, mask = _group_batch(18)
  rng = np.random.default_rng(18)
  rewards = rng.normal(size=logp.shape).astype(np.float32)
  old_values = rng.normal(size=logp.shape).astype(np.float32)
  gae = functools.partial(ax.gae, rewards, mask=mask, gamma=1.0, lambda_=0.95)
  ppo = functools.partial(ax.ppo_loss, old_values=old_values, ref_logp=ref_logp, beta=0.05)

  def live(lp, v):
    adv, ret = gae(v)
    return ppo(lp, old_logp, adv, mask, values=v, returns=ret)[0]

  args = (jnp.asarray(logp), jnp.asarray(old_values + 0.05))
  adv, ret = gae(args[1])

  def constant(lp, v):
    return ppo(lp, old_logp, adv, mask, values=v, returns=ret)[0]

  for got, want in zip(jax.grad(live, argnums=(0, 1))(*args),
                       jax.grad(constant, argnums=(0, 1))(*args)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  grads = jax.grad(lambda o, r, a: ax.grpo_loss(logp, o, a, mask, ref_logp=r, beta=0.04)[0],
                   argnums=(0, 1, 2))(old_logp, ref_logp, seq_adv)
  for grad in grads:
    np.testing.assert_array_equal(grad, 0)


# --- bad input --------------------------------------------------------------------------------

def test_bad_input_messages():
  logp, old_logp, ref_logp, adv, mask = _group_batch(16)
  grpo = functools.partial(inspect.unwrap(ax.grpo_loss), logp, old_logp, adv, mask,
                           ref_logp=ref_logp)
  cases = [
      (dict(loss_type="ppo"), "loss_type='ppo' is not supported"),
      (dict(importance_level="group"), "importance_level='group' is not supported"),
      (dict(kl_estimator="k5"), "kl_estimator='k5' is not supported"),
      (dict(loss_agg_mode="sum"), "loss_agg_mode='sum' is not supported"),
      (dict(beta=-0.1), "beta must be >= 0"),
      (dict(clip_eps_low=-0.1), r"clip_eps_low must lie in \[0, 1\)"),
      (dict(clip_eps_low=1.0), r"clip_eps_low must lie in \[0, 1\)"),
      (dict(clip_eps_high=-0.2), "clip_eps_high must be >= 0"),
      (dict(loss_type="cispo", cispo_max_weight=0.0), "cispo_max_weight must be > 0"),
      (dict(dual_clip=1.0), "dual_clip must be > 1"),
      (dict(loss_type="cispo", dual_clip=3.0), "dual_clip applies to loss_type='clip' only"),
      (dict(loss_agg_mode="seq_mean_token_sum_norm"), "max_len is required"),
      (dict(entropy_coef=0.1), "entropy is required"),
  ]
  for kwargs, message in cases:
    with pytest.raises(ValueError, match=message):
      grpo(**kwargs)
  raw = inspect.unwrap(ax.grpo_loss)
  with pytest.raises(ValueError, match="ref_logp is required"):
    raw(logp, old_logp, adv, mask, beta=0.04)
  with pytest.raises(ValueError, match="advantages must have shape"):
    raw(logp, old_logp, adv[:, :2], mask, ref_logp=ref_logp)
  with pytest.raises(ValueError, match=r"logp\[2, 3, 6\], old_logp\[2, 3, 5\]"):
    raw(logp, old_logp[..., :5], adv, mask, ref_logp=ref_logp)
  with pytest.raises(ValueError, match="max_len is required"):
    inspect.unwrap(ax.dr_grpo_loss.func)(logp, old_logp, adv, mask, **ax.dr_grpo_loss.keywords)
  ppo = inspect.unwrap(ax.ppo_loss)
  token_adv = np.broadcast_to(adv[..., None], logp.shape)
  with pytest.raises(ValueError, match=r"missing \['old_values', 'returns'\]"):
    ppo(logp, old_logp, token_adv, mask, values=logp)
  with pytest.raises(ValueError, match="advantages must be per token"):
    ppo(logp, old_logp, adv, mask)
  with pytest.raises(ValueError, match="value_clip_eps must be >= 0"):
    ppo(logp, old_logp, token_adv, mask, value_clip_eps=-1.0)
  with pytest.raises(ValueError, match="clip_eps must be >= 0"):
    inspect.unwrap(ax.clipped_value_loss)(logp, logp, logp, clip_eps=-0.1)
  with pytest.raises(ValueError, match="dual_clip must be > 1"):
    inspect.unwrap(ax.clipped_surrogate)(logp, old_logp, token_adv, dual_clip=0.5)


def test_bad_input_raises_at_trace_time_under_jit():
  logp, old_logp, ref_logp, adv, mask = _group_batch(17)
  for kwargs, name in ((dict(loss_type="ppo"), "loss_type"),
                       (dict(importance_level="group"), "importance_level"),
                       (dict(beta=-1.0), "beta"), (dict(clip_eps_low=-0.2), "clip_eps_low")):
    with pytest.raises((ValueError, TypeError), match=name):
      jax.jit(functools.partial(ax.grpo_loss, **kwargs))(logp, old_logp, adv, mask,
                                                         ref_logp=ref_logp)
  with pytest.raises(ValueError, match="max_len"):
    jax.jit(ax.dr_grpo_loss)(logp, old_logp, adv, mask, ref_logp=ref_logp)
