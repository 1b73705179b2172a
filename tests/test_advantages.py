"""GAE, group advantages (GRPO / Dr. GRPO / RLOO / batch std), REINFORCE++ and whitening."""

import functools
import inspect
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import alignax as ax
from tests.reference import numpy_rl as ref


def _rollout(seed=0, shape=(2, 3, 6)):
  """Rewards, values and masks [*b, T]: right padding, one empty row and one row with a hole."""
  rng = np.random.default_rng(seed)
  rewards = rng.normal(size=shape).astype(np.float32)
  values = rng.normal(size=shape).astype(np.float32)
  lengths = rng.integers(1, shape[-1] + 1, size=shape[:-1])
  lengths.flat[0] = 0
  mask = np.arange(shape[-1]) < lengths[..., None]
  flat = mask.reshape(-1, shape[-1])
  flat[1] = [True, True, False, False, True, False][:shape[-1]]
  return rewards, values, flat.reshape(mask.shape)


def _flat(x):
  return np.asarray(x).reshape(-1, np.shape(x)[-1])


GAE = jax.jit(ax.gae, static_argnames=("gamma", "lambda_"))


@pytest.mark.parametrize("bootstrap", [False, True])
def test_gae_matches_reference(bootstrap):
  rewards, values, mask = _rollout()
  boot = np.linspace(-1, 1, 6).reshape(2, 3).astype(np.float32) if bootstrap else None
  adv, ret = GAE(rewards, values, mask, gamma=0.9, lambda_=0.8, bootstrap_value=boot)
  want_adv, want_ret = ref.gae(_flat(rewards), _flat(values), _flat(mask), 0.9, 0.8,
                               None if boot is None else boot.ravel())
  np.testing.assert_allclose(_flat(adv), want_adv, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(_flat(ret), want_ret, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(adv)[~mask], 0)
  eager = ax.gae(rewards, values, mask, gamma=0.9, lambda_=0.8, bootstrap_value=boot)
  np.testing.assert_allclose(eager[0], adv, rtol=1e-6, atol=1e-7)


def test_gae_hand_derived():
  rewards = jnp.array([[0.0, 0.0, 1.0]])
  values = jnp.array([[0.5, 0.5, 0.5]])
  mask = jnp.ones((1, 3), bool)
  adv, ret = ax.gae(rewards, values, mask, gamma=1.0, lambda_=1.0)
  np.testing.assert_allclose(adv, [[0.5, 0.5, 0.5]])  # Monte-Carlo return 1 minus V
  np.testing.assert_allclose(ret, [[1.0, 1.0, 1.0]])
  adv, _ = ax.gae(rewards, values, mask, gamma=1.0, lambda_=0.0)
  np.testing.assert_allclose(adv, [[0.0, 0.0, 0.5]])  # one-step TD errors
  adv, _ = ax.gae(rewards, values, mask, gamma=0.5, lambda_=1.0, bootstrap_value=jnp.array([2.0]))
  np.testing.assert_allclose(adv, [[0.5 * 0.5 * 2.0 - 0.5, 0.5 * 2.0 - 0.5, 1.0 + 1.0 - 0.5]])


def test_gae_masked_equals_sliced():
  rewards, values, mask = _rollout(1, shape=(4, 5))
  mask = np.arange(5) < np.array([5, 3, 1, 0])[:, None]
  pad = np.full((4, 3), np.nan, np.float32)
  padded = [np.concatenate([x, pad], -1) for x in (rewards, values)]
  padded_mask = np.concatenate([mask, np.zeros((4, 3), bool)], -1)
  adv, ret = GAE(rewards, values, mask, gamma=0.95, lambda_=0.9)
  padded_adv, padded_ret = GAE(*padded, padded_mask, gamma=0.95, lambda_=0.9)
  np.testing.assert_allclose(padded_adv[:, :5], adv, rtol=1e-6)
  np.testing.assert_allclose(padded_ret[:, :5], ret, rtol=1e-6)
  np.testing.assert_array_equal(padded_adv[:, 5:], 0)


def test_gae_gradients_finite_with_empty_rows():
  rewards, values, mask = _rollout(2, shape=(3, 4))
  mask[0] = False

  def f(r, v):
    adv, ret = ax.gae(r, v, mask, gamma=0.9, lambda_=0.95)
    return jnp.sum(adv ** 2) + jnp.sum(ret)

  grads = jax.grad(f, argnums=(0, 1))(rewards, values)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads)
  np.testing.assert_array_equal(grads[0][0], 0)
  check_grads(lambda r, v: ax.gae(r, v, mask, gamma=0.9, lambda_=0.95)[0], (rewards, values),
              order=1, modes=("fwd", "rev"), eps=1e-2, atol=1e-2, rtol=1e-2)


SCALES = ax.GROUP_SCALES


@pytest.mark.parametrize("scale,leave_one_out", list(itertools.product(SCALES, [False, True])))
def test_group_advantages_match_reference(scale, leave_one_out):
  rewards = np.random.default_rng(3).integers(0, 3, size=(5, 4)).astype(np.float32)
  rewards[0] = 1.0  # an uninformative group
  got = ax.group_advantages(rewards, scale=scale, leave_one_out=leave_one_out)
  want = ref.group_advantages(rewards, scale, leave_one_out)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.sum(got, axis=-1), 0, atol=1e-5)  # zero-sum per group
  np.testing.assert_array_equal(got[0], 0)
  batched = ax.group_advantages(rewards.reshape(1, 5, 4), scale=scale,
                                leave_one_out=leave_one_out)
  np.testing.assert_allclose(batched[0], got, rtol=1e-6)


def test_group_advantages_hand_derived():
  rewards = jnp.array([[1.0, 0.0, 0.0, 1.0]])
  std = np.sqrt(1 / 3)  # Bessel: sum of squares 1, G - 1 = 3
  a = 0.5 / (std + 1e-6)
  np.testing.assert_allclose(ax.group_advantages(rewards, eps=1e-6), [[a, -a, -a, a]], rtol=1e-6)
  np.testing.assert_allclose(ax.group_advantages(rewards, scale="none"), [[0.5, -0.5, -0.5, 0.5]])
  # RLOO: the baseline of completion 0 is mean(0, 0, 1) = 1/3.
  np.testing.assert_allclose(ax.group_advantages(rewards, scale="none", leave_one_out=True),
                             [[2 / 3, -2 / 3, -2 / 3, 2 / 3]], rtol=1e-6)
  np.testing.assert_allclose(ax.group_advantages(rewards, ddof=0, eps=1e-6),
                             [[1, -1, -1, 1]], rtol=1e-5)


def test_group_advantages_gradients_finite_on_equal_rewards():
  rewards = jnp.array([[1.0, 1.0, 1.0], [0.0, 1.0, 2.0]])
  for scale in SCALES:
    grad = jax.grad(lambda r, s=scale: jnp.sum(ax.group_advantages(r, scale=s) ** 2))(rewards)
    assert bool(jnp.all(jnp.isfinite(grad)))
  check_grads(lambda r: ax.group_advantages(r, scale="group"), (rewards[1:],), order=1,
              modes=("fwd", "rev"), eps=1e-2, atol=1e-2, rtol=1e-2)


def test_informative_group_mask():
  rewards = jnp.array([[[1.0, 1.0, 1.0], [0.0, 1.0, 0.0]], [[0.0, 0.0, 0.0], [0.5, 0.5, 0.25]]])
  np.testing.assert_array_equal(ax.informative_group_mask(rewards), [[False, True], [False, True]])


def _informative_first(rewards, k):
  """DAPO's buffer, by a loop: informative prompts in order, then the others in order."""
  informative = [len(set(row.tolist())) > 1 for row in rewards]
  order = [p for p, keep in enumerate(informative) if keep]
  return (order + [p for p, keep in enumerate(informative) if not keep])[:k]


def test_select_informative_groups():
  rewards = np.array([[1, 1, 1], [0, 1, 0], [0, 0, 0], [1, 0, 1], [1, 1, 1]], np.float32)
  select = ax.select_informative_groups
  np.testing.assert_array_equal(select(rewards, k=2), [1, 3])
  np.testing.assert_array_equal(select(rewards, k=4), [1, 3, 0, 2])  # padded with uninformative
  np.testing.assert_array_equal(select(rewards[[0, 2, 4]], k=2), [0, 1])  # none informative
  jitted = jax.jit(select, static_argnames="k")
  rng = np.random.default_rng(6)
  for k in (1, 5, 12):
    batch = rng.integers(0, 2, size=(12, 3)).astype(np.float32)
    got = jitted(batch, k=k)
    assert got.shape == (k,) and got.dtype == jnp.int32
    np.testing.assert_array_equal(got, _informative_first(batch, k))


def test_masked_whiten_without_mask():
  x = np.random.default_rng(4).normal(2.0, 3.0, size=(3, 5)).astype(np.float32)
  mask = np.ones_like(x, bool)
  np.testing.assert_allclose(ax.masked_whiten(x), ax.masked_whiten(x, mask), rtol=1e-6)
  np.testing.assert_allclose(ax.masked_whiten(x), ref.masked_whiten(x, mask), rtol=1e-5, atol=1e-6)
  kept = np.asarray(ax.masked_whiten(x, shift_mean=False))
  assert kept.mean() == pytest.approx(x.mean(), rel=1e-5)
  assert kept.std(ddof=1) == pytest.approx(1.0, rel=1e-4)


def test_reinforce_pp_matches_reference():
  rewards, _, mask = _rollout(5, shape=(4, 6))
  got = ax.reinforce_pp_advantages(rewards, mask, gamma=0.9)
  returns = ref.discounted_returns(rewards, mask, 0.9)
  np.testing.assert_allclose(got, ref.masked_whiten(returns, mask), rtol=1e-5, atol=1e-5)
  raw = ax.reinforce_pp_advantages(rewards, mask, gamma=0.9, whiten_advantages=False)
  np.testing.assert_allclose(raw, returns, rtol=1e-5, atol=1e-6)


def test_reinforce_pp_scores_equal_last_token_rewards():
  """Sequence scores go on the last valid token; REINFORCE++-baseline = group-centred scores."""
  scores = jnp.array([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 1.0, 1.0]])
  mask = jnp.arange(5) < jnp.array([[5, 2, 3, 4], [1, 5, 5, 2]])[..., None]
  per_token = ax.kl_penalized_rewards(jnp.zeros(mask.shape), jnp.zeros(mask.shape), scores, mask,
                                      beta=0.0)
  np.testing.assert_allclose(ax.reinforce_pp_advantages(scores, mask),
                             ax.reinforce_pp_advantages(per_token, mask), rtol=1e-6)
  baseline = ax.reinforce_pp_advantages(ax.group_advantages(scores, scale="none"), mask)
  centred = np.asarray(ax.group_advantages(scores, scale="none"))
  want = ref.masked_whiten(np.where(mask, centred[..., None], 0.0), mask)
  np.testing.assert_allclose(baseline, want, rtol=1e-5, atol=1e-6)


def test_bad_input_messages():
  rewards, values, mask = jnp.zeros((2, 3)), jnp.zeros((2, 3)), jnp.ones((2, 3), bool)
  gae = inspect.unwrap(ax.gae)
  with pytest.raises(ValueError, match=r"gamma must lie in \[0, 1\]"):
    gae(rewards, values, mask, gamma=1.5, lambda_=0.9)
  with pytest.raises(ValueError, match=r"lambda_ must lie in \[0, 1\]"):
    gae(rewards, values, mask, gamma=1.0, lambda_=-0.1)
  with pytest.raises(ValueError, match=r"rewards\[2, 3\], values\[2, 4\]"):
    gae(rewards, jnp.zeros((2, 4)), mask, gamma=1.0, lambda_=0.9)
  with pytest.raises(ValueError, match="bootstrap_value must have shape"):
    gae(rewards, values, mask, gamma=1.0, lambda_=0.9, bootstrap_value=jnp.zeros(3))
  group = inspect.unwrap(ax.group_advantages)
  with pytest.raises(ValueError, match="scale='std' is not supported"):
    group(rewards, scale="std")
  with pytest.raises(ValueError, match="leave_one_out needs a group size G >= 2"):
    group(jnp.zeros((4, 1)), leave_one_out=True)
  with pytest.raises(ValueError, match="eps must be > 0"):
    group(rewards, eps=0.0)
  with pytest.raises(ValueError, match="rewards must have shape"):
    inspect.unwrap(ax.reinforce_pp_advantages)(jnp.zeros((3,)), mask)
  select = inspect.unwrap(ax.select_informative_groups)
  for k in (0, 3):
    with pytest.raises(ValueError, match=rf"k must lie in \[1, P\] = \[1, 2\], got {k}"):
      select(rewards, k=k)
  for k in (1.0, True):
    with pytest.raises(TypeError, match="k must be a Python int"):
      select(rewards, k=k)
  with pytest.raises(ValueError, match=r"rewards must have shape \[P, G\], got \[2, 2, 3\]"):
    select(jnp.zeros((2, 2, 3)), k=1)


def test_bad_input_raises_at_trace_time_under_jit():
  mask = jnp.ones((2, 3), bool)
  with pytest.raises(ValueError, match="gamma"):
    jax.jit(functools.partial(ax.gae, gamma=2.0, lambda_=0.9))(jnp.zeros((2, 3)), jnp.zeros((2, 3)),
                                                               mask)
  with pytest.raises((ValueError, TypeError), match="scale"):
    jax.jit(functools.partial(ax.group_advantages, scale="std"))(jnp.zeros((2, 3)))
