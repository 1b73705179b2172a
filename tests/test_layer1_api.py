"""Layer-1 conventions: padding never reaches values or gradients, per-example arguments match
exactly, one mask rule, errors name the argument passed, the next-token shift, the KL controller's
clamp at 0, traced hyper-parameters, and the metric names."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import alignax as ax
from alignax import _validate
from tests.reference import numpy_rl as ref
from tests.reference import numpy_tokens


def unchecked(fn):
  """The function without the jaxtyping/beartype wrapper pytest adds: alignax's own errors."""
  return getattr(fn, "__wrapped__", fn)


# --- padding never reaches any reduction -------------------------------------------------------

def _padded_batch():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(3, 6)).astype(np.float32)
  mask = np.arange(6) < np.array([4, 6, 2])[:, None]
  mask[1, 2] = False  # a hole in the middle, as tool-output tokens leave
  return x, mask


REDUCTIONS = {
    "masked_sum": lambda x, m: ax.masked_sum(x, m),
    "masked_sum_rows": lambda x, m: ax.masked_sum(x, m, axis=-1),
    "masked_mean": lambda x, m: ax.masked_mean(x, m),
    "masked_mean_rows": lambda x, m: ax.masked_mean(x, m, axis=-1),
    "masked_var": lambda x, m: ax.masked_var(x, m),
    "masked_var_rows": lambda x, m: ax.masked_var(x, m, axis=-1),
    "masked_whiten": lambda x, m: ax.masked_whiten(x, m),
    "masked_whiten_rows_scale_only": lambda x, m: ax.masked_whiten(x, m, axis=-1,
                                                                   shift_mean=False),
    **{f"aggregate_{mode}": functools.partial(
        lambda x, m, mode: ax.aggregate(x, m, loss_agg_mode=mode, max_len=8), mode=mode)
       for mode in ax.AGG_MODES},
    "sequence_logprobs": lambda x, m: ax.sequence_logprobs(x, m),
    "sequence_logprobs_average": lambda x, m: ax.sequence_logprobs(x, m, average=True),
    "sft_loss": lambda x, m: ax.sft_loss(x, m)[0],
    "sft_loss_seq_mean": lambda x, m: ax.sft_loss(x, m, loss_agg_mode="seq_mean_token_mean")[0],
    "reinforce_pp_advantages": lambda x, m: ax.reinforce_pp_advantages(x, m, gamma=0.9),
    "gae_advantages": lambda x, m: ax.gae(x, x, m, gamma=0.9, lambda_=0.95)[0],
    "kl_penalized_rewards": lambda x, m: ax.kl_penalized_rewards(
        x, jnp.zeros_like(x), jnp.ones(x.shape[:-1]), m, beta=0.1, kl_estimator="k3"),
}


@pytest.mark.parametrize("fill", [np.inf, -np.inf, np.nan])
@pytest.mark.parametrize("name", sorted(REDUCTIONS))
def test_padding_reaches_neither_values_nor_gradients(name, fill):
  """Defect 1 of issue 7: masked_var / masked_whiten took ``x - mean`` before masking, so an inf in
  a padded slot made every valid entry's gradient NaN."""
  f = REDUCTIONS[name]
  x, mask = _padded_batch()
  clean = np.where(mask, x, 0.0).astype(np.float32)
  dirty = np.where(mask, x, fill).astype(np.float32)

  def objective(v):
    return jnp.sum(jnp.sin(f(v, mask)))  # a smooth, non-linear read-out of every output

  value, grad = jax.value_and_grad(objective)(jnp.asarray(dirty))
  want_value, want_grad = jax.value_and_grad(objective)(jnp.asarray(clean))
  assert bool(jnp.isfinite(value)) and bool(jnp.all(jnp.isfinite(grad)))
  np.testing.assert_allclose(value, want_value, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(grad, want_grad, rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(np.asarray(grad)[~mask], 0)


# --- per-example arguments match exactly ------------------------------------------------------

def test_per_example_arguments_must_match_exactly():
  b = jnp.full((3,), -2.0)
  column = jnp.ones((3, 1))
  with pytest.raises(ValueError, match=r"chosen_lengths\[3, 1\]"):
    unchecked(ax.dpo_loss)(b, b, b, b, loss_type="ipo", chosen_lengths=column,
                           rejected_lengths=jnp.ones(3))
  for loss in (ax.orpo_loss, ax.simpo_loss, ax.cpo_loss):
    with pytest.raises(ValueError, match=r"rejected_lengths\[3, 1\]"):
      unchecked(loss)(b, b, chosen_lengths=jnp.ones(3), rejected_lengths=column)
  with pytest.raises(ValueError, match=r"desirable\[3, 1\]"):
    unchecked(ax.kto_loss)(b, b, column.astype(bool), reference_point=0.0)
  with pytest.raises(ValueError, match="reference_point must be a scalar"):
    unchecked(ax.kto_loss)(b, b, jnp.ones(3, bool), reference_point=jnp.zeros((3, 1)))
  with pytest.raises(ValueError, match="bco_reward_shift must be a scalar"):
    unchecked(ax.dpo_loss)(b, b, b, b, loss_type="bco_pair", bco_reward_shift=jnp.zeros(3))
  with pytest.raises(ValueError, match="beta must be a scalar"):
    unchecked(ax.dpo_loss)(b, b, b, b, beta=jnp.full(3, 0.1))
  tokens, mask = jnp.zeros((3, 4)), jnp.ones((3, 4), bool)
  with pytest.raises(ValueError, match="bootstrap_value must have shape"):
    unchecked(ax.gae)(tokens, tokens, mask, gamma=1.0, lambda_=1.0, bootstrap_value=column)
  with pytest.raises(ValueError, match="scores must have shape"):
    unchecked(ax.kl_penalized_rewards)(tokens, tokens, column, mask, beta=0.1)
  with pytest.raises(ValueError, match="rewards must have shape"):
    unchecked(ax.reinforce_pp_advantages)(column, mask)
  with pytest.raises(ValueError, match="advantages must have shape"):
    unchecked(ax.grpo_loss)(tokens, None, column, mask)


# --- one mask rule -----------------------------------------------------------------------------

def test_loss_masks_must_be_boolean_everywhere():
  x = jnp.zeros((2, 3))
  int_mask = jnp.ones((2, 3), jnp.int32)
  # The unwrapped functions, so that the message checked is alignax's own, not the type checker's.
  calls = {
      "masked_sum": lambda: unchecked(ax.masked_sum)(x, int_mask),
      "masked_mean": lambda: unchecked(ax.masked_mean)(x, int_mask),
      "masked_var": lambda: unchecked(ax.masked_var)(x, int_mask),
      "masked_whiten": lambda: unchecked(ax.masked_whiten)(x, int_mask),
      "aggregate": lambda: unchecked(ax.aggregate)(x, int_mask, loss_agg_mode="token_mean"),
      "sequence_logprobs": lambda: unchecked(ax.sequence_logprobs)(x, int_mask),
      "sft_loss": lambda: unchecked(ax.sft_loss)(x, int_mask),
      "gae": lambda: unchecked(ax.gae)(x, x, int_mask, gamma=1.0, lambda_=1.0),
      "reinforce_pp_advantages": lambda: unchecked(ax.reinforce_pp_advantages)(x, int_mask),
      "kl_penalized_rewards": lambda: unchecked(ax.kl_penalized_rewards)(
          x, x, jnp.zeros(2), int_mask, beta=0.1),
      "grpo_loss": lambda: unchecked(ax.grpo_loss)(x, None, jnp.zeros(2), int_mask),
      "ppo_loss": lambda: unchecked(ax.ppo_loss)(x, None, x, int_mask),
  }
  for name, call in calls.items():
    with pytest.raises(TypeError, match="mask must be a boolean array"):
      call()
  with pytest.raises(TypeError, match="desirable must be a boolean array"):
    unchecked(ax.kto_loss)(jnp.zeros(2), jnp.zeros(2), jnp.ones(2), reference_point=0.0)


def test_attention_masks_accept_0_1_integers():
  mask = np.array([[0, 1, 1, 0], [1, 1, 1, 1]], np.int32)
  np.testing.assert_array_equal(ax.last_valid_token(mask), ax.last_valid_token(mask.astype(bool)))
  np.testing.assert_array_equal(ax.last_valid_token(mask),
                                [[False, False, True, False], [False, False, False, True]])
  with pytest.raises(TypeError, match="mask must be a boolean or 0/1 integer array"):
    unchecked(ax.last_valid_token)(mask.astype(np.float32))


# --- next_token_targets ------------------------------------------------------------------------

def test_next_token_targets_right_and_left_padding():
  ids = np.array([[5, 6, 7, 8, 0, 0], [0, 0, 3, 4, 5, 9]], np.int32)
  attention = np.array([[1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1]], np.int32)  # right / left padded
  completion = np.array([[0, 0, 1, 1, 0, 0], [0, 0, 0, 1, 1, 1]], np.int32)
  for kwargs in ({}, {"completion": completion}):
    targets, loss_mask = ax.next_token_targets(
        ids, attention, completion_mask=kwargs.get("completion"))
    want_targets, want_mask = numpy_tokens.next_token_targets(ids, attention, kwargs.get("completion"))
    assert targets.dtype == jnp.int32 and loss_mask.dtype == jnp.bool_
    np.testing.assert_array_equal(targets, want_targets)
    np.testing.assert_array_equal(loss_mask, want_mask)
  # By hand: row 0 trains positions 1, 2 (predicting 7, 8); row 1 positions 2, 3, 4 (4, 5, 9).
  targets, loss_mask = ax.next_token_targets(ids, attention.astype(bool),
                                             completion_mask=completion.astype(bool))
  np.testing.assert_array_equal(loss_mask, [[0, 1, 1, 0, 0, 0], [0, 0, 1, 1, 1, 0]])
  np.testing.assert_array_equal(np.asarray(targets)[np.asarray(loss_mask)], [7, 8, 4, 5, 9])


def test_next_token_targets_packing_and_leading_dims():
  rng = np.random.default_rng(1)
  ids = rng.integers(1, 50, size=(2, 3, 9)).astype(np.int32)
  attention = np.ones((2, 3, 9), np.int32)
  attention[..., 7:] = 0
  segments = np.array([1, 1, 1, 2, 2, 3, 3, 0, 0])[None, None].repeat(2, 0).repeat(3, 1)
  completion = rng.integers(0, 2, size=(2, 3, 9))
  targets, loss_mask = ax.next_token_targets(ids, attention, completion_mask=completion,
                                             segment_ids=segments)
  want_targets, want_mask = numpy_tokens.next_token_targets(ids.reshape(6, 9), attention.reshape(6, 9),
                                        completion.reshape(6, 9), segments.reshape(6, 9))
  np.testing.assert_array_equal(np.asarray(targets).reshape(6, 9), want_targets)
  np.testing.assert_array_equal(np.asarray(loss_mask).reshape(6, 9), want_mask)
  # The last token of a packed sequence never predicts the first token of the next one.
  _, plain = ax.next_token_targets(ids, attention, segment_ids=segments)
  assert not np.asarray(plain)[..., [2, 4]].any() and np.asarray(plain)[..., [0, 1, 3, 5]].all()
  # jit == eager; the loss mask feeds the losses directly.
  jitted = jax.jit(ax.next_token_targets)(ids, attention, completion_mask=completion,
                                          segment_ids=segments)
  np.testing.assert_array_equal(jitted[1], loss_mask)
  ax.sft_loss(jnp.zeros(ids.shape), loss_mask)


def test_next_token_targets_bad_input():
  ids, attention = jnp.zeros((2, 4), jnp.int32), jnp.ones((2, 4), jnp.int32)
  shift = unchecked(ax.next_token_targets)
  with pytest.raises(TypeError, match="input_ids must be an integer array"):
    shift(ids.astype(jnp.float32), attention)
  with pytest.raises(TypeError, match="attention_mask must be a boolean or 0/1 integer array"):
    shift(ids, attention.astype(jnp.float32))
  with pytest.raises(ValueError, match=r"completion_mask\[2, 3\]"):
    shift(ids, attention, completion_mask=jnp.ones((2, 3), bool))
  with pytest.raises(TypeError, match="segment_ids must be an integer array"):
    shift(ids, attention, segment_ids=jnp.ones((2, 4)))


# --- errors name the argument that was passed -------------------------------------------------

def test_grpo_shape_error_names_only_the_arrays_passed():
  logp, mask, adv = jnp.zeros((2, 5)), jnp.ones((2, 5), bool), jnp.zeros(2)
  with pytest.raises(ValueError, match=r"ref_logp\[2, 4\]") as err:
    unchecked(ax.grpo_loss)(logp, None, adv, mask, ref_logp=jnp.zeros((2, 4)), beta=0.04)
  assert "old_logp" not in str(err.value)  # it was None, so it cannot be the culprit


# --- defaults, metric names -------------------------------------------------------------------

def test_policy_defaults_need_no_reference_and_metrics_are_scalars():
  rng = np.random.default_rng(2)
  logp = np.log(rng.uniform(0.1, 0.9, size=(2, 3, 5))).astype(np.float32)
  mask = np.arange(5) < np.array([[5, 3, 1], [2, 4, 0]])[..., None]
  adv = rng.normal(size=(2, 3)).astype(np.float32)
  loss, metrics = ax.grpo_loss(logp, None, adv, mask)  # TRL's default beta=0.0: no reference
  assert "kl" not in metrics and loss.shape == ()
  values = rng.normal(size=logp.shape).astype(np.float32)
  token_adv = np.broadcast_to(adv[..., None], logp.shape)
  _, metrics = ax.ppo_loss(logp, logp - 0.1, token_adv, mask, values=values,
                           old_values=values + 0.5, returns=values - 0.3, value_clip_eps=0.2)
  assert {"loss/value", "val/clipfrac"} <= set(metrics)
  assert not {"value_loss", "vf_clipfrac", "losses"} & set(metrics)
  assert metrics["val/clipfrac"] == pytest.approx(float(mask[mask].mean()))  # every token clips
  for value in metrics.values():
    assert value.shape == ()


def test_cispo_cap_is_absolute():
  logp, old_logp = jnp.log(jnp.array([[3.0, 1.0]])), jnp.zeros((1, 2))
  mask, adv = jnp.ones((1, 2), bool), jnp.array([1.0])
  grad = jax.grad(lambda lp: ax.cispo_loss(lp, old_logp, adv, mask, cispo_max_weight=2.5)[0])(
      logp)
  # weights min(3, 2.5) and min(1, 2.5), token mean over 2 tokens, loss = -w A log pi.
  np.testing.assert_allclose(grad, [[-2.5 / 2, -1.0 / 2]], rtol=1e-6)
  _, metrics = ax.cispo_loss(logp, old_logp, adv, mask)  # default cap 5.0 (TRL epsilon_high=5)
  assert metrics["cispo_clip_ratio"] == 0.0
  _, metrics = ax.cispo_loss(logp, old_logp, adv, mask, cispo_max_weight=2.5)
  assert metrics["cispo_clip_ratio"] == pytest.approx(0.5)


# --- KL controller, traced hyper-parameters ---------------------------------------------------

def test_adaptive_kl_coefficient_is_clamped_at_zero():
  """Defect 3 of issue 7: with kl = 0 an update covering n > 5 * horizon samples made beta < 0."""
  controller = ax.adaptive_kl_controller(init_kl_coef=0.2, target=6.0, horizon=100.0)
  update = jax.jit(controller.update)
  state = update(controller.init(), 0.0, 1000)  # 1 + (-0.2) * 1000 / 100 = -1
  assert float(state.kl_coef) == 0.0
  assert float(update(state, 100.0, 1000).kl_coef) == 0.0  # multiplicative: 0 stays 0
  # Many short updates at kl = 0 shrink beta geometrically but never below 0.
  state, history = controller.init(), []
  for _ in range(200):
    state = update(state, 0.0, 50)
    history.append(float(state.kl_coef))
  assert all(b >= 0 for b in history) and history == sorted(history, reverse=True)
  np.testing.assert_allclose(history[-1], 0.2 * 0.9 ** 200, rtol=1e-3)


def test_one_rule_for_traced_hyper_parameters():
  with pytest.raises(ValueError, match="beta must be > 0"):
    _validate.positive("beta", jnp.float32(-1.0))  # a concrete array is checked
  with pytest.raises(ValueError, match="beta must be a scalar"):
    _validate.non_negative("beta", np.ones(2))
  jax.jit(lambda b: _validate.positive("beta", b))(jnp.float32(-1.0))  # a tracer is not
  logp, mask, adv = jnp.zeros((2, 3)), jnp.ones((2, 3), bool), jnp.zeros(2)
  for fn, kwargs in ((ax.grpo_loss, dict(ref_logp=logp)), ):
    with pytest.raises(ValueError, match="beta must be >= 0"):
      unchecked(fn)(logp, None, adv, mask, beta=jnp.float32(-0.1), **kwargs)
  with pytest.raises(ValueError, match="beta must be >= 0"):
    unchecked(ax.kl_penalized_rewards)(logp, logp, jnp.zeros(2), mask, beta=jnp.float32(-0.1))
  with pytest.raises(ValueError, match="odds_ratio_weight must be > 0"):
    unchecked(ax.orpo_loss)(jnp.full(2, -3.0), jnp.full(2, -4.0), chosen_lengths=jnp.ones(2),
                            rejected_lengths=jnp.ones(2), odds_ratio_weight=jnp.float32(0.0))
  # Traced coefficients (vmapped sweeps) are accepted by every loss that takes one.
  betas = jnp.array([0.0, 0.05, 0.1])
  grpo = jax.vmap(lambda b: ax.grpo_loss(logp - 0.1, logp, adv + 1.0, mask, ref_logp=logp,
                                         beta=b)[0])(betas)
  assert grpo.shape == (3,) and bool(jnp.all(jnp.isfinite(grpo)))


# --- REINFORCE++-baseline vs TRL's batch scaling -----------------------------------------------

def test_batch_scale_is_trls_and_differs_from_reinforce_pp_baseline():
  scores = np.array([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 1.0]], np.float32)
  got = ax.group_advantages(scores, scale="batch", eps=1e-4)
  centred = scores - scores.mean(-1, keepdims=True)
  # TRL scale_rewards="batch": rewards.std() over the whole batch (Bessel), then + 1e-4.
  want = centred / (scores.std(ddof=1) + 1e-4)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  np.testing.assert_allclose(got, ref.group_advantages(scores, "batch", eps=1e-4), rtol=1e-6)
  # REINFORCE++-baseline: group-centred scores broadcast over tokens, then token-level whitening.
  mask = np.arange(3) < np.array([[3, 1, 2, 3], [2, 3, 3, 1]])[..., None]
  baseline = ax.reinforce_pp_advantages(ax.group_advantages(scores, scale="none"), mask)
  np.testing.assert_allclose(
      baseline, ref.masked_whiten(np.where(mask, centred[..., None], 0.0), mask), rtol=1e-5,
      atol=1e-6)
  assert not np.allclose(np.asarray(baseline)[..., 0], np.asarray(got))
