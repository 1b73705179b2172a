"""Masked reductions and the loss-aggregation modes (GRPO / DAPO / Dr. GRPO normalisation)."""

import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import alignax as ax
from tests.reference import numpy_rl as ref

MODES = ax.AGG_MODES
MAX_LEN = 7


def _batch(seed=0, shape=(2, 3, 6)):
  """Per-token values [P, G, T] with right-padded masks, one row fully masked."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=shape).astype(np.float32)
  lengths = rng.integers(1, shape[-1] + 1, size=shape[:-1])
  lengths.flat[1] = 0
  mask = np.arange(shape[-1]) < lengths[..., None]
  return x, mask


def test_hand_derived_modes():
  x = jnp.array([[1.0, 2.0, 3.0, 9.0], [4.0, 9.0, 9.0, 9.0]])
  m = jnp.array([[True, True, True, False], [True, False, False, False]])
  assert ax.aggregate(x, m, loss_agg_mode="token_mean") == pytest.approx(10 / 4)
  assert ax.aggregate(x, m, loss_agg_mode="seq_mean_token_mean") == pytest.approx((2 + 4) / 2)
  assert ax.aggregate(x, m, loss_agg_mode="seq_mean_token_sum") == pytest.approx((6 + 4) / 2)
  norm = ax.aggregate(x, m, loss_agg_mode="seq_mean_token_sum_norm", max_len=5)
  assert norm == pytest.approx(10 / 10)
  assert ax.masked_sum(x, m) == 10
  np.testing.assert_allclose(ax.masked_mean(x, m, axis=-1), [2, 4])
  np.testing.assert_allclose(ax.masked_count(m, axis=-1), [3, 1])
  np.testing.assert_allclose(ax.masked_var(x, m, axis=-1), [1, 0])


@pytest.mark.parametrize("mode", MODES)
def test_modes_match_numpy_reference(mode):
  x, mask = _batch()
  got = ax.aggregate(x, mask, loss_agg_mode=mode, max_len=MAX_LEN)
  want = ref.aggregate(x.reshape(-1, x.shape[-1]), mask.reshape(-1, x.shape[-1]), mode, MAX_LEN)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_dr_grpo_mode_is_sum_over_rows_times_max_len():
  x, mask = _batch(shape=(5, 6))
  got = ax.aggregate(x, mask, loss_agg_mode="seq_mean_token_sum_norm", max_len=MAX_LEN)
  np.testing.assert_allclose(got, np.sum(np.where(mask, x, 0)) / (5 * MAX_LEN), rtol=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_masked_equals_sliced(mode):
  """Padding (even NaN or inf) changes neither the value nor the gradient of the kept tokens."""
  x, mask = _batch(shape=(4, 5))
  padded_x = np.concatenate([x, np.full((4, 3), np.nan, np.float32)], axis=-1)
  padded_x[0, -1] = np.inf
  padded_mask = np.concatenate([mask, np.zeros((4, 3), bool)], axis=-1)

  def f(values, m):
    return ax.aggregate(values, m, loss_agg_mode=mode, max_len=MAX_LEN)

  value, grad = jax.value_and_grad(f)(jnp.asarray(x), mask)
  padded_value, padded_grad = jax.value_and_grad(f)(jnp.asarray(padded_x), padded_mask)
  np.testing.assert_allclose(padded_value, value, rtol=1e-6)
  np.testing.assert_allclose(padded_grad[:, :5], grad, rtol=1e-6)
  np.testing.assert_array_equal(padded_grad[:, 5:], 0)


@pytest.mark.parametrize("mode", MODES)
def test_jit_equals_eager(mode):
  x, mask = _batch(1)
  jitted = jax.jit(functools.partial(ax.aggregate, loss_agg_mode=mode, max_len=MAX_LEN))
  np.testing.assert_allclose(jitted(x, mask),
                             ax.aggregate(x, mask, loss_agg_mode=mode, max_len=MAX_LEN), rtol=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_all_masked_is_zero_with_finite_gradient(mode):
  x = jnp.ones((3, 4))
  mask = jnp.zeros((3, 4), bool)
  value, grad = jax.value_and_grad(
      lambda v: ax.aggregate(v, mask, loss_agg_mode=mode, max_len=4))(x)
  assert value == 0
  np.testing.assert_array_equal(grad, 0)
  empty_row = jnp.zeros((2, 0))
  assert ax.aggregate(empty_row, empty_row.astype(bool), loss_agg_mode=mode, max_len=4) == 0


def test_masked_mean_of_empty_slice_has_zero_gradient():
  x = jnp.array([[1.0, 2.0], [3.0, 4.0]])
  mask = jnp.array([[True, False], [False, False]])
  np.testing.assert_array_equal(ax.masked_mean(x, mask, axis=-1), [1.0, 0.0])
  grad = jax.grad(lambda v: ax.masked_mean(v, mask, axis=-1).sum())(x)
  np.testing.assert_array_equal(grad, [[1.0, 0.0], [0.0, 0.0]])


def test_masked_mean_over_tuple_axes_and_leading_dims():
  x, mask = _batch(2)
  got = ax.masked_mean(x, mask, axis=(-2, -1))
  want = [np.mean(x[p][mask[p]]) for p in range(x.shape[0])]
  np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.parametrize("shift_mean", [True, False])
def test_masked_whiten_matches_reference(shift_mean):
  x, mask = _batch(3)
  got = ax.masked_whiten(x, mask, shift_mean=shift_mean)
  np.testing.assert_allclose(got, ref.masked_whiten(x, mask, shift_mean), rtol=1e-5, atol=1e-6)
  valid = np.asarray(got)[mask]
  if shift_mean:
    assert abs(valid.mean()) < 1e-6
    assert valid.std(ddof=1) == pytest.approx(1.0, abs=1e-5)


def test_masked_var_matches_numpy():
  x, mask = _batch(4, shape=(5, 6))
  for ddof in (0, 1):
    got = ax.masked_var(x, mask, ddof=ddof)
    np.testing.assert_allclose(got, np.var(x[mask], ddof=ddof), rtol=1e-5)


def test_check_grads():
  x, mask = _batch(5, shape=(3, 5))
  x = jnp.asarray(x, jnp.float32)
  for mode in MODES:
    check_grads(lambda v, mode=mode: ax.aggregate(v, mask, loss_agg_mode=mode, max_len=MAX_LEN),
                (x,), order=1, modes=("fwd", "rev"), eps=1e-2)
  check_grads(lambda v: ax.masked_whiten(v, mask), (x,), order=1, modes=("fwd", "rev"),
              eps=1e-2, atol=2e-2, rtol=2e-2)


def test_last_valid_token():
  mask = jnp.array([[True, True, False, False], [True, False, True, False],
                    [False, False, False, False]])
  np.testing.assert_array_equal(ax.last_valid_token(mask),
                                [[False, True, False, False], [False, False, True, False],
                                 [False, False, False, False]])


# --- bad input --------------------------------------------------------------------------------
# Under pytest the jaxtyping hook checks annotations first; inspect.unwrap reaches our own checks,
# which are what a user sees outside pytest.

def test_bad_input_messages():
  aggregate = inspect.unwrap(ax.aggregate)
  x, mask = jnp.ones((2, 3)), jnp.ones((2, 3), bool)
  with pytest.raises(ValueError, match="loss_agg_mode='mean' is not supported"):
    aggregate(x, mask, loss_agg_mode="mean")
  with pytest.raises(ValueError, match="max_len is required"):
    aggregate(x, mask, loss_agg_mode="seq_mean_token_sum_norm")
  with pytest.raises(ValueError, match="max_len must be > 0"):
    aggregate(x, mask, loss_agg_mode="seq_mean_token_sum_norm", max_len=0)
  with pytest.raises(ValueError, match=r"per_token\[2, 3\], mask\[2, 4\]"):
    aggregate(x, jnp.ones((2, 4), bool), loss_agg_mode="token_mean")
  with pytest.raises(TypeError, match="mask must be a boolean"):
    inspect.unwrap(ax.masked_sum)(x, jnp.ones((2, 3)))
  with pytest.raises(ValueError, match="eps must be > 0"):
    inspect.unwrap(ax.masked_whiten)(x, mask, eps=0.0)


def test_bad_input_raises_at_trace_time_under_jit():
  x, mask = jnp.ones((2, 3)), jnp.ones((2, 3), bool)
  with pytest.raises((ValueError, TypeError), match="mode"):
    jax.jit(functools.partial(ax.aggregate, loss_agg_mode="mean"))(x, mask)
  with pytest.raises(ValueError, match="max_len"):
    jax.jit(functools.partial(ax.aggregate, loss_agg_mode="seq_mean_token_sum_norm"))(x, mask)
  with pytest.raises((ValueError, TypeError), match="mask"):
    jax.jit(ax.masked_mean)(x, jnp.ones((3, 2), bool))
