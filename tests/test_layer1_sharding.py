"""Sharded == unsharded for the reductions, advantages and GRPO loss on 8 fake CPU devices.

The batch (prompt) axis is sharded with ``NamedSharding`` under ``jax.jit``; every reduction must be
global, so in particular ``token_mean`` is the token mean of the whole batch, not a mean of
per-device means.
"""

import functools

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import alignax as ax

NUM_PROMPTS, G, T = 8, 2, 5


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(NUM_PROMPTS, G, T)).astype(np.float32)
  # Very uneven lengths across shards, so that local and global normalisers differ.
  lengths = rng.integers(0, T + 1, size=(NUM_PROMPTS, G))
  lengths[0] = T
  lengths[1] = 1
  mask = np.arange(T) < lengths[..., None]
  return x, mask


def _sharded(f, mesh, num_args):
  sharding = NamedSharding(mesh, P("data"))
  return jax.jit(f, in_shardings=(sharding,) * num_args)


def _assert_same(sharded, unsharded):
  for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(unsharded)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ax.AGG_MODES)
def test_aggregate(mesh8, mode):
  x, mask = _batch()
  f = functools.partial(ax.aggregate, loss_agg_mode=mode, max_len=T)
  _assert_same(_sharded(f, mesh8, 2)(x, mask), f(x, mask))


def test_token_mean_is_global(mesh8):
  x, mask = _batch(1)
  value = _sharded(functools.partial(ax.aggregate, loss_agg_mode="token_mean"), mesh8, 2)(x, mask)
  assert float(value) == pytest.approx(x[mask].mean(), rel=1e-5)
  local_means = [x[i][mask[i]].mean() for i in range(NUM_PROMPTS) if mask[i].any()]
  assert abs(np.mean(local_means) - x[mask].mean()) > 1e-3  # the two readings really differ


def test_whiten_and_masked_stats(mesh8):
  x, mask = _batch(2)
  for f in (ax.masked_whiten, ax.masked_mean, ax.masked_var):
    _assert_same(_sharded(f, mesh8, 2)(x, mask), f(x, mask))


def test_gae(mesh8):
  rewards, mask = _batch(3)
  values, _ = _batch(4)
  f = functools.partial(ax.gae, gamma=0.99, lambda_=0.95)
  _assert_same(_sharded(f, mesh8, 3)(rewards, values, mask), f(rewards, values, mask))


@pytest.mark.parametrize("scale", ax.GROUP_SCALES)
def test_group_advantages(mesh8, scale):
  rewards = np.random.default_rng(5).integers(0, 2, size=(NUM_PROMPTS, 4)).astype(np.float32)
  for leave_one_out in (False, True):
    f = functools.partial(ax.group_advantages, scale=scale, leave_one_out=leave_one_out)
    _assert_same(_sharded(f, mesh8, 1)(rewards), f(rewards))
  _assert_same(_sharded(ax.informative_group_mask, mesh8, 1)(rewards),
               ax.informative_group_mask(rewards))
  select = functools.partial(ax.select_informative_groups, k=5)
  _assert_same(_sharded(select, mesh8, 1)(rewards), select(rewards))


def test_reinforce_pp(mesh8):
  rewards, mask = _batch(6)
  scores = rewards[..., 0]
  f = ax.reinforce_pp_advantages
  _assert_same(_sharded(f, mesh8, 2)(rewards, mask), f(rewards, mask))
  _assert_same(_sharded(f, mesh8, 2)(scores, mask), f(scores, mask))


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_mean"])
def test_grpo_loss_and_gradient(mesh8, mode):
  logp, mask = _batch(7)
  logp = -np.abs(logp)
  old_logp = logp + 0.1 * _batch(8)[0]
  ref_logp = logp + 0.1 * _batch(9)[0]
  adv = np.asarray(ax.group_advantages(np.random.default_rng(10).normal(size=(NUM_PROMPTS, G))))

  def f(lp, old, ref, a, m):
    return jax.value_and_grad(ax.grpo_loss, has_aux=True)(lp, old, a, m, ref_logp=ref, beta=0.04,
                                                          clip_eps_high=0.28, loss_agg_mode=mode)

  _assert_same(_sharded(f, mesh8, 5)(logp, old_logp, ref_logp, adv, mask),
               f(logp, old_logp, ref_logp, adv, mask))
