"""Review of issue 7's layer-1 changes, mutation-test style: every option that a composed loss
forwards (``ppo_loss`` -> ``grpo_loss``, the GRPO-family partials, ``cpo_loss`` -> ``dpo_loss``,
``kl_penalized_rewards`` -> ``kl_estimate``) changes the result exactly as an independent NumPy
reference says; ``axis`` / ``ddof`` / ``eps`` at non-default values; ties are not wins; padding
never reaches a composed loss; metrics are stop-gradient scalars; and the edge cases of
``next_token_targets``.

Tests marked "fails on the old code" reproduce a defect of commit 3145ab9. The others kill mutants
(a dropped keyword, a removed stop_gradient or padding guard); the docstrings name those that
survived every earlier layer-1 test.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import alignax as ax
from tests.reference import numpy_preference as pref
from tests.reference import numpy_rl as ref
from tests.reference import numpy_tokens


def unchecked(fn):
  """The function without the jaxtyping/beartype wrapper pytest adds: alignax's own errors."""
  return getattr(fn, "__wrapped__", fn)


# --- ppo_loss forwards every keyword ----------------------------------------------------------

def _rollout():
  """Ratios far from 1 on both sides (both clips, the dual clip), a reference far enough for the
  KL clamp to bite, values that move further than the value clip, ragged rows and a hole."""
  rng = np.random.default_rng(7)
  shape = (4, 6)
  logp = np.log(rng.uniform(0.05, 0.95, shape))
  old_logp = logp + rng.normal(0.0, 0.6, shape)
  ref_logp = logp + rng.normal(0.0, 0.8, shape)
  adv = rng.normal(0.0, 1.0, shape)
  entropy = rng.uniform(0.0, 3.0, shape)
  values = rng.normal(0.0, 1.0, shape)
  old_values = values + rng.normal(0.0, 0.5, shape)
  returns = values + rng.normal(0.0, 1.0, shape)
  mask = np.arange(6) < np.array([6, 4, 2, 5])[:, None]
  mask[0, 3] = False
  arrays = dict(logp=logp, old_logp=old_logp, ref_logp=ref_logp, adv=adv, entropy=entropy,
                values=values, old_values=old_values, returns=returns)
  return {k: v.astype(np.float32) for k, v in arrays.items()}, mask


PPO_DEFAULTS = dict(clip_eps_low=0.2, clip_eps_high=None, dual_clip=None, vf_coef=0.1,
                    value_clip_eps=0.2, beta=0.0, kl_estimator="k3", kl_clamp=None,
                    loss_agg_mode="token_mean", max_len=None, entropy_coef=0.0)


def _ppo_reference(a, mask, *, clip_eps_low, clip_eps_high, dual_clip, vf_coef, value_clip_eps,
                   beta, kl_estimator, kl_clamp, loss_agg_mode, max_len, entropy_coef):
  """PPO's objective token by token in float64, from the per-token references."""
  eps_high = clip_eps_low if clip_eps_high is None else clip_eps_high
  f64 = {k: np.asarray(v, np.float64) for k, v in a.items()}
  kl = ref.kl_estimator(f64["logp"], f64["ref_logp"], kl_estimator)
  if kl_clamp is not None:
    kl = np.clip(kl, -kl_clamp, kl_clamp)
  policy = np.zeros(mask.shape)
  value = np.zeros(mask.shape)
  for idx in zip(*np.nonzero(mask)):
    policy[idx] = ref.ppo_clip_token(f64["logp"][idx], f64["old_logp"][idx], f64["adv"][idx],
                                     clip_eps_low, eps_high, dual_clip)
    policy[idx] += beta * kl[idx] - entropy_coef * f64["entropy"][idx]
    value[idx] = ref.clipped_value_token(f64["values"][idx], f64["old_values"][idx],
                                         f64["returns"][idx], value_clip_eps)
  return (ref.aggregate(policy, mask, loss_agg_mode, max_len)
          + vf_coef * ref.aggregate(value, mask, loss_agg_mode, max_len))


PPO_OVERRIDES = [
    dict(clip_eps_low=0.1),
    dict(clip_eps_high=0.5),
    dict(dual_clip=1.5),
    dict(vf_coef=0.7),
    dict(value_clip_eps=0.05),
    dict(beta=0.3),
    dict(beta=0.3, kl_estimator="k1"),
    dict(beta=0.3, kl_estimator="k2"),
    dict(beta=0.3, kl_estimator="abs"),
    dict(beta=0.3, kl_clamp=0.05),
    dict(loss_agg_mode="seq_mean_token_mean"),
    dict(loss_agg_mode="seq_mean_token_sum"),
    dict(loss_agg_mode="seq_mean_token_sum_norm", max_len=9),
    dict(entropy_coef=0.2),
]


@pytest.mark.parametrize("override", PPO_OVERRIDES, ids=lambda o: "-".join(map(str, o.items())))
def test_ppo_loss_forwards_every_keyword(override):
  """Mutants that survived the earlier tests: ``ppo_loss`` passing ``grpo_loss`` a constant instead
  of its ``kl_clamp``, ``dual_clip``, ``clip_eps_high``, ``clip_eps_low`` or ``kl_estimator``, or
  giving ``clipped_value_loss`` a constant instead of ``value_clip_eps``."""
  a, mask = _rollout()
  options = {**PPO_DEFAULTS, **override}
  loss, _ = ax.ppo_loss(a["logp"], a["old_logp"], a["adv"], mask, ref_logp=a["ref_logp"],
                        values=a["values"], old_values=a["old_values"], returns=a["returns"],
                        entropy=a["entropy"], **options)
  np.testing.assert_allclose(loss, _ppo_reference(a, mask, **options), rtol=2e-5)
  # The option must matter on this data, or the comparison above proves nothing about it.
  default = _ppo_reference(a, mask, **{**PPO_DEFAULTS, "beta": options["beta"],
                                       "max_len": options["max_len"]})
  if set(override) - {"beta", "max_len"}:
    assert abs(float(loss) - default) > 1e-3


def test_ppo_value_metrics_follow_the_aggregation_and_clip():
  a, mask = _rollout()
  _, metrics = ax.ppo_loss(a["logp"], a["old_logp"], a["adv"], mask, values=a["values"],
                           old_values=a["old_values"], returns=a["returns"],
                           value_clip_eps=0.05, loss_agg_mode="seq_mean_token_mean")
  value = np.zeros(mask.shape)
  clipped = np.zeros(mask.shape, bool)
  for idx in zip(*np.nonzero(mask)):
    v, v_old, ret = (float(a[k][idx]) for k in ("values", "old_values", "returns"))
    value[idx] = ref.clipped_value_token(v, v_old, ret, 0.05)
    clipped[idx] = value[idx] > 0.5 * (v - ret) ** 2
  np.testing.assert_allclose(metrics["loss/value"],
                             ref.aggregate(value, mask, "seq_mean_token_mean"), rtol=1e-5)
  np.testing.assert_allclose(metrics["val/clipfrac"], clipped[mask].mean(), rtol=1e-6)
  assert 0 < clipped[mask].mean() < 1


# --- the GRPO-family partials ---------------------------------------------------------------

def _group_rollout():
  """Enough tokens with ratios in every clip band that each partial's defaults matter."""
  rng = np.random.default_rng(11)
  shape = (8, 16)
  logp = np.log(rng.uniform(0.05, 0.95, shape))
  old_logp = logp + rng.normal(0.0, 0.3, shape)
  adv = np.abs(rng.normal(0.0, 1.0, shape[0])) * np.tile([1.0, -1.0], shape[0] // 2)
  mask = np.arange(16) < rng.integers(4, 17, shape[0])[:, None]
  return logp.astype(np.float32), old_logp.astype(np.float32), adv.astype(np.float32), mask


@pytest.mark.parametrize("name,defaults,override", [
    ("dapo_loss", dict(clip_eps_low=0.2, clip_eps_high=0.28, loss_agg_mode="token_mean"),
     dict(clip_eps_high=0.4)),
    ("dr_grpo_loss", dict(loss_agg_mode="seq_mean_token_sum_norm", max_len=11),
     dict(loss_agg_mode="token_mean")),
    ("gspo_loss", dict(importance_level="sequence", clip_eps_low=3e-4, clip_eps_high=4e-4,
                       loss_agg_mode="seq_mean_token_mean"), dict(clip_eps_low=0.1)),
    ("cispo_loss", dict(loss_type="cispo", loss_agg_mode="token_mean"),
     dict(cispo_max_weight=1.2)),
])
def test_partials_are_grpo_with_the_papers_defaults_and_stay_overridable(name, defaults,
                                                                         override):
  logp, old_logp, adv, mask = _group_rollout()
  variant = getattr(ax, name)
  extra = {"max_len": 11} if name == "dr_grpo_loss" else {}
  got, _ = variant(logp, old_logp, adv, mask, **extra)
  want, _ = ax.grpo_loss(logp, old_logp, adv, mask, **defaults)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  got, _ = variant(logp, old_logp, adv, mask, **{**extra, **override})
  want_override, _ = ax.grpo_loss(logp, old_logp, adv, mask, **{**defaults, **override})
  np.testing.assert_allclose(got, want_override, rtol=1e-6)
  assert abs(float(want_override) - float(want)) > 1e-4
  # Each default of the partial matters on this data (a mutated default would be caught).
  for key in defaults:
    if key == "max_len":
      continue
    plain = {**defaults, key: _ALTERNATIVE[key]}
    changed, _ = ax.grpo_loss(logp, old_logp, adv, mask, **plain)
    assert abs(float(changed) - float(want)) > 1e-5, key


_ALTERNATIVE = dict(clip_eps_low=0.25, clip_eps_high=0.2, loss_agg_mode="seq_mean_token_sum",
                    importance_level="token", loss_type="clip")


def test_cispo_rejects_clip_eps_high():
  """Fails on the old code: ``cispo_loss(..., clip_eps_high=5.0)`` (TRL's ``epsilon_high`` for
  CISPO, renamed) was accepted and silently ignored, leaving the cap at ``cispo_max_weight``."""
  logp, old_logp, adv, mask = _group_rollout()
  with pytest.raises(ValueError, match="clip_eps_high=.*cispo_max_weight"):
    unchecked(ax.cispo_loss)(logp, old_logp, adv, mask, clip_eps_high=2.0)
  with pytest.raises(ValueError, match="clip_eps_high=.*cispo_max_weight"):
    unchecked(ax.grpo_loss)(logp, old_logp, adv, mask, loss_type="cispo", clip_eps_high=0.28)


def test_cispo_matches_trl_absolute_cap_token_by_token():
  logp, old_logp, adv, mask = _group_rollout()
  for cap in (1.1, 5.0):
    loss, metrics = ax.cispo_loss(logp, old_logp, adv, mask, cispo_max_weight=cap)
    per_token = np.zeros(mask.shape)
    clipped = np.zeros(mask.shape, bool)
    for i, t in zip(*np.nonzero(mask)):
      per_token[i, t] = ref.cispo_token(float(logp[i, t]), float(old_logp[i, t]), float(adv[i]),
                                        cap)
      clipped[i, t] = np.exp(float(logp[i, t] - old_logp[i, t])) > cap and adv[i] > 0
    np.testing.assert_allclose(loss, ref.aggregate(per_token, mask, "token_mean"), rtol=1e-5)
    np.testing.assert_allclose(metrics["cispo_clip_ratio"], clipped[mask].mean(), rtol=1e-6)


# --- cpo_loss forwards to dpo_loss ------------------------------------------------------------

def _pairs():
  rng = np.random.default_rng(3)
  pc = rng.normal(-30.0, 6.0, 8).astype(np.float32)
  pr = rng.normal(-32.0, 6.0, 8).astype(np.float32)
  lc = rng.integers(5, 40, 8).astype(np.float32)
  lr = rng.integers(5, 40, 8).astype(np.float32)
  return pc, pr, lc, lr


@pytest.mark.parametrize("loss_type,label_smoothing", [("sigmoid", 0.0), ("sigmoid", 0.2),
                                                       ("hinge", 0.0), ("ipo", 0.0)])
def test_cpo_forwards_beta_loss_type_smoothing_and_lengths(loss_type, label_smoothing):
  """A mutant passing ``dpo_loss`` ``label_smoothing=0`` for ``sigmoid`` survived the earlier
  tests."""
  pc, pr, lc, lr = _pairs()
  beta, alpha = 0.05, 0.7
  loss, metrics = ax.cpo_loss(pc, pr, chosen_lengths=lc, rejected_lengths=lr, beta=beta,
                              loss_type=loss_type, label_smoothing=label_smoothing,
                              cpo_alpha=alpha)
  pc64, pr64, lc64, lr64 = (x.astype(np.float64) for x in (pc, pr, lc, lr))
  z = beta * (pc64 - pr64)
  if loss_type == "sigmoid":
    pair = -(1 - label_smoothing) * pref.log_sigmoid(z) - label_smoothing * pref.log_sigmoid(-z)
  elif loss_type == "hinge":
    pair = np.maximum(0.0, 1.0 - z)
  else:  # TRL's CPO averages the log-probs for IPO
    pair = (pc64 / lc64 - pr64 / lr64 - 1 / (2 * beta)) ** 2
  nll = -pc64.sum() / lc64.sum()
  np.testing.assert_allclose(loss, pair.mean() + alpha * nll, rtol=1e-5)
  np.testing.assert_allclose(metrics["nll_loss"], nll, rtol=1e-6)
  np.testing.assert_allclose(metrics["rewards/chosen"], beta * pc64.mean(), rtol=1e-5)


# --- kl_penalized_rewards forwards to kl_estimate ----------------------------------------------

@pytest.mark.parametrize("kl_estimator", ["k1", "k2", "k3", "abs"])
def test_kl_penalized_rewards_forwards_estimator_and_clamp(kl_estimator):
  a, mask = _rollout()
  scores = np.array([1.0, -0.5, 2.0, 0.25], np.float32)
  got = ax.kl_penalized_rewards(a["logp"], a["ref_logp"], scores, mask, beta=0.4,
                                kl_estimator=kl_estimator, kl_clamp=0.1)
  kl = np.clip(ref.kl_estimator(a["logp"], a["ref_logp"], kl_estimator), -0.1, 0.1)
  want = np.where(mask, -0.4 * kl, 0.0)
  last = np.asarray(ax.last_valid_token(mask))
  want = want + np.where(last, scores[:, None], 0.0)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  unclamped = ax.kl_penalized_rewards(a["logp"], a["ref_logp"], scores, mask, beta=0.4,
                                      kl_estimator=kl_estimator)
  assert not np.allclose(got, unclamped)  # the clamp bites on this data


# --- axis, ddof, eps at non-default values ----------------------------------------------------

def test_masked_var_with_no_more_entries_than_ddof_is_zero():
  """Fails on the old code: with n <= ddof valid entries the documented result is 0, but
  ``masked_var([1, 3], ddof=2)`` returned 2.0 (the squared deviations over max(0, 1) = 1)."""
  x = jnp.array([[1.0, 3.0, 5.0], [2.0, 4.0, 8.0]])
  mask = jnp.array([[True, True, False], [True, True, True]])
  np.testing.assert_allclose(ax.masked_var(x, mask, axis=-1, ddof=2),
                             [0.0, np.var([2, 4, 8], ddof=2)], rtol=1e-6)
  np.testing.assert_array_equal(ax.masked_var(x[:1], mask[:1], ddof=2), 0.0)
  grad = jax.grad(lambda v: ax.masked_var(v, mask, axis=-1, ddof=2)[0])(x)
  np.testing.assert_array_equal(grad, 0.0)
  # Whitening a row whose variance is undefined scales its deviations by 0 (numpy's x / inf),
  # instead of by 1/sqrt(eps); the defined row is whitened as numpy does.
  white = ax.masked_whiten(x, mask, axis=-1, ddof=2)
  row = np.array([2.0, 4.0, 8.0])
  np.testing.assert_allclose(white, [[0.0, 0.0, 0.0],
                                     (row - row.mean()) / np.sqrt(np.var(row, ddof=2) + 1e-8)],
                             rtol=1e-5)
  np.testing.assert_allclose(ax.masked_whiten(x, mask, axis=-1, ddof=2, shift_mean=False)[0],
                             [2.0, 2.0, 0.0])


def test_axis_ddof_eps_reach_the_statistics():
  rng = np.random.default_rng(4)
  x = rng.normal(size=(3, 4, 5)).astype(np.float32)
  mask = rng.uniform(size=x.shape) < 0.7
  mask[:, :, 0] = True
  for axis, ddof in itertools.product([0, -1, (0, 2), None], [0, 1, 2]):
    got = ax.masked_var(x, mask, axis=axis, ddof=ddof)
    want = np.ma.var(np.ma.masked_array(x, ~mask), axis=axis, ddof=ddof)
    np.testing.assert_allclose(got, np.ma.filled(want, 0.0), rtol=1e-5, atol=1e-6)
  # masked_whiten: ddof and eps reach the variance; axis reaches both statistics.
  for axis, ddof, eps in [(None, 0, 0.5), (-1, 2, 1e-8), ((0, 1), 0, 2.0)]:
    got = ax.masked_whiten(x, mask, axis=axis, ddof=ddof, eps=eps)
    masked = np.ma.masked_array(x.astype(np.float64), ~mask)
    mean = np.ma.mean(masked, axis=axis, keepdims=True)
    var = np.ma.var(masked, axis=axis, ddof=ddof, keepdims=True)
    want = np.where(mask, (x - mean) / np.sqrt(var + eps), 0.0)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("scale", ["group", "batch"])
def test_group_advantages_forwards_ddof_and_eps(scale):
  rewards = np.array([[1.0, 0.0, 0.5, 2.0], [0.0, 0.0, 1.0, 1.0]], np.float32)
  for ddof, eps in [(0, 0.3), (1, 0.3), (2, 1e-6)]:
    got = ax.group_advantages(rewards, scale=scale, ddof=ddof, eps=eps)
    std = (rewards.std(axis=-1, ddof=ddof, keepdims=True) if scale == "group"
           else rewards.std(ddof=ddof))
    want = (rewards - rewards.mean(-1, keepdims=True)) / (std + eps)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(got, ref.group_advantages(rewards, scale, ddof=ddof, eps=eps),
                               rtol=1e-5)


def test_reinforce_pp_forwards_gamma_and_eps():
  rng = np.random.default_rng(5)
  rewards = rng.normal(size=(3, 5)).astype(np.float32)
  mask = np.arange(5) < np.array([5, 3, 4])[:, None]
  returns = ref.discounted_returns(rewards, mask, 0.5)
  got = ax.reinforce_pp_advantages(rewards, mask, gamma=0.5, eps=3.0)
  np.testing.assert_allclose(got, ref.masked_whiten(returns, mask, eps=3.0), rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(ax.reinforce_pp_advantages(rewards, mask, gamma=0.5,
                                                        whiten_advantages=False),
                             returns, rtol=1e-5, atol=1e-6)


# --- ties are not wins --------------------------------------------------------------------------

def test_ties_are_not_counted_as_wins():
  tied = jnp.array([-3.0, -3.0, -2.0, -4.0])
  rejected = jnp.array([-3.0, -3.0, -3.0, -3.0])
  lengths = jnp.ones(4)
  _, metrics = ax.dpo_loss(tied, rejected, None, None)
  assert float(metrics["rewards/accuracies"]) == 0.25
  _, metrics = ax.bradley_terry_loss(tied, rejected)
  assert float(metrics["accuracy"]) == 0.25
  for loss in (ax.simpo_loss, ax.cpo_loss, ax.orpo_loss):
    _, metrics = loss(tied, rejected, chosen_lengths=lengths, rejected_lengths=lengths)
    assert float(metrics["rewards/accuracies"]) == 0.25, loss


# --- next_token_targets ------------------------------------------------------------------------

def _random_batch(rng, rows, length):
  """Left-padded, right-padded, all-padding and packed rows in one batch."""
  ids = rng.integers(1, 1000, size=(rows, length)).astype(np.int32)
  attention = np.zeros((rows, length), np.int32)
  completion = np.zeros((rows, length), np.int32)
  segments = np.zeros((rows, length), np.int32)
  for i in range(rows):
    kind = i % 4
    n = int(rng.integers(1, length + 1))
    span = slice(0, n) if kind in (0, 3) else slice(length - n, length)
    if kind == 2:
      span = slice(0, 0)  # all padding
    attention[i, span] = 1
    real = np.arange(length)[span]
    if len(real):
      prompt = int(rng.integers(0, len(real) + 1))
      completion[i, real[prompt:]] = 1
    if kind == 3 and len(real):  # packing: consecutive segments 1, 2, ...
      cuts = np.sort(rng.choice(np.arange(1, length), size=min(2, length - 1), replace=False))
      segments[i, real] = 1 + np.searchsorted(cuts, real, side="right")
  return ids, attention, completion, segments


@pytest.mark.parametrize("length", [1, 2, 7])
def test_next_token_targets_matches_the_loop(length):
  rng = np.random.default_rng(length)
  ids, attention, completion, segments = _random_batch(rng, 8, length)
  for kwargs in ({}, {"completion": completion}, {"segments": segments},
                 {"completion": completion, "segments": segments}):
    targets, loss_mask = ax.next_token_targets(
        ids, attention.astype(bool) if kwargs else attention,
        completion_mask=kwargs.get("completion"), segment_ids=kwargs.get("segments"))
    want_targets, want_mask = numpy_tokens.next_token_targets(ids, attention, kwargs.get("completion"),
                                          kwargs.get("segments"))
    np.testing.assert_array_equal(targets, want_targets)
    np.testing.assert_array_equal(loss_mask, want_mask)
    assert not np.asarray(loss_mask)[2].any()  # the all-padding row trains nothing
    assert not np.asarray(loss_mask)[:, -1].any()  # the last column predicts nothing


def test_next_token_targets_only_attention_style_masks_may_be_integers():
  ids = np.array([[4, 5, 6]], np.int32)
  shift = unchecked(ax.next_token_targets)
  with pytest.raises(TypeError, match="input_ids must be an integer array"):
    shift(ids.astype(bool), np.ones((1, 3), np.int32))
  with pytest.raises(TypeError, match="completion_mask must be a boolean or 0/1 integer"):
    shift(ids, np.ones((1, 3), np.int32), completion_mask=np.ones((1, 3), np.float32))
  with pytest.raises(TypeError, match="segment_ids must be an integer array"):
    shift(ids, np.ones((1, 3), np.int32), segment_ids=np.ones((1, 3), bool))
  # The returned loss mask is boolean, so the losses take it without conversion...
  _, loss_mask = shift(ids, np.ones((1, 3), np.int64))
  ax.sft_loss(jnp.zeros((1, 3)), loss_mask)
  # ...while the losses still refuse the 0/1 attention mask itself.
  with pytest.raises(TypeError, match="mask must be a boolean array"):
    unchecked(ax.sft_loss)(jnp.zeros((1, 3)), np.ones((1, 3), np.int32))


# --- padding never reaches a composed loss ------------------------------------------------------

def _composed(a, mask, adv_tokens):
  """Every composed objective, as f(logp, values, dirty) -> (loss, metrics): the per-token inputs
  other than the differentiated ones are passed through ``dirty`` (which fills their padding)."""
  seq_adv = a["adv"][:, 0]
  b = mask.shape[0] // 2

  def dpo(lp, v, d):
    logps = ax.sequence_logprobs(lp, mask)
    ref_logps = ax.sequence_logprobs(d(a["ref_logp"]), mask)
    lengths = ax.masked_count(mask, axis=-1)
    dpo_loss, dpo_metrics = ax.dpo_loss(logps[:b], logps[b:], ref_logps[:b], ref_logps[b:],
                                        loss_type="ipo", chosen_lengths=lengths[:b],
                                        rejected_lengths=lengths[b:])
    orpo_loss, _ = ax.orpo_loss(logps[:b], logps[b:], chosen_lengths=lengths[:b],
                                rejected_lengths=lengths[b:])
    return dpo_loss + orpo_loss + ax.bradley_terry_loss(v[:b, 0], v[b:, 0])[0], dpo_metrics

  return {
      "grpo_kl_entropy": lambda lp, v, d: ax.grpo_loss(
          lp, d(a["old_logp"]), seq_adv, mask, ref_logp=d(a["ref_logp"]), beta=0.1,
          kl_clamp=5.0, entropy=d(a["entropy"]), entropy_coef=0.01),
      "grpo_token_advantages": lambda lp, v, d: ax.grpo_loss(
          lp, d(a["old_logp"]), d(adv_tokens), mask, ref_logp=d(a["ref_logp"]), beta=0.1,
          kl_estimator="k2"),
      "gspo": lambda lp, v, d: ax.gspo_loss(lp, d(a["old_logp"]), seq_adv, mask),
      "cispo": lambda lp, v, d: ax.cispo_loss(lp, d(a["old_logp"]), seq_adv, mask),
      "dual_clip": lambda lp, v, d: ax.dapo_loss(lp, d(a["old_logp"]), seq_adv, mask,
                                                 dual_clip=2.0),
      "ppo_critic": lambda lp, v, d: ax.ppo_loss(
          lp, d(a["old_logp"]), d(adv_tokens), mask, ref_logp=d(a["ref_logp"]), beta=0.05,
          values=v, old_values=d(a["old_values"]), returns=d(a["returns"]),
          entropy=d(a["entropy"]), entropy_coef=0.01, loss_agg_mode="seq_mean_token_mean"),
      "ppo_gae_pipeline": lambda lp, v, d: ax.ppo_loss(
          lp, d(a["old_logp"]),
          ax.masked_whiten(ax.gae(ax.kl_penalized_rewards(lp, d(a["ref_logp"]), seq_adv, mask,
                                                          beta=0.1),
                                  v, mask, gamma=1.0, lambda_=0.95)[0], mask),
          mask, values=v, old_values=d(a["old_values"]),
          returns=ax.gae(d(a["returns"]), v, mask, gamma=1.0, lambda_=0.95)[1]),
      "preference": dpo,
  }


@pytest.mark.parametrize("fill", [np.inf, -np.inf, np.nan])
@pytest.mark.parametrize("name", ["grpo_kl_entropy", "grpo_token_advantages", "gspo", "cispo",
                                  "dual_clip", "ppo_critic", "ppo_gae_pipeline", "preference"])
def test_padding_reaches_no_composed_loss(name, fill):
  """Padding holding inf / NaN in every per-token input (log-probs, reference, behaviour policy,
  entropy, values, returns, per-token advantages) changes neither the loss, the metrics nor the
  gradients of the valid entries of a composed objective. Removing ``ppo_loss``'s zeroing of the
  critic's padding (NaN value gradients) survived the earlier tests."""
  a, mask = _rollout()
  adv_tokens = a["adv"]
  fn = _composed(a, mask, adv_tokens)[name]

  def run(fill_value):
    def dirty(x):
      return jnp.asarray(np.where(mask, x, fill_value).astype(np.float32))

    def objective(lp, v):
      return fn(lp, v, dirty)

    (loss, metrics), grads = jax.value_and_grad(objective, argnums=(0, 1), has_aux=True)(
        dirty(a["logp"]), dirty(a["values"]))
    return loss, metrics, grads

  loss, metrics, grads = run(fill)
  want_loss, want_metrics, want_grads = run(0.0)
  assert np.isfinite(float(loss))
  np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
  assert set(metrics) == set(want_metrics)
  for key in metrics:
    np.testing.assert_allclose(metrics[key], want_metrics[key], rtol=1e-6, err_msg=key)
  for grad, want in zip(grads, want_grads):
    assert np.all(np.isfinite(grad))
    np.testing.assert_allclose(grad, want, rtol=1e-6, atol=1e-8)
    np.testing.assert_array_equal(np.asarray(grad)[~mask], 0.0)


def test_metrics_are_stop_gradient_scalars_for_every_objective():
  a, mask = _rollout()
  composed = _composed(a, mask, a["adv"])
  b = mask.shape[0] // 2
  desirable = np.array([True, False, True, True])
  lengths = ax.masked_count(mask, axis=-1)

  def pairwise(fn, **kwargs):
    def call(lp, v, d):
      logps = ax.sequence_logprobs(lp, mask)
      return fn(logps[:b], logps[b:], chosen_lengths=lengths[:b], rejected_lengths=lengths[b:],
                **kwargs)
    return call

  composed.update({
      "sft": lambda lp, v, d: ax.sft_loss(lp, mask),
      "kto": lambda lp, v, d: ax.kto_loss(ax.sequence_logprobs(lp, mask),
                                          ax.sequence_logprobs(d(a["ref_logp"]), mask), desirable,
                                          reference_point=0.2),
      "simpo": pairwise(ax.simpo_loss),
      "cpo": pairwise(ax.cpo_loss),
      "orpo": pairwise(ax.orpo_loss),
      "bradley_terry": lambda lp, v, d: ax.bradley_terry_loss(v[:b, 0], v[b:, 0], margin=0.1),
  })

  def dirty(x):
    return jnp.asarray(np.where(mask, x, 0.0).astype(np.float32))

  for name, fn in composed.items():
    _, metrics = fn(dirty(a["logp"]), dirty(a["values"]), dirty)
    assert metrics, name
    for key, value in metrics.items():
      assert jnp.shape(value) == (), (name, key)
    grads = jax.grad(lambda lp, v: sum(jnp.sum(m) for m in fn(lp, v, dirty)[1].values()),
                     argnums=(0, 1))(dirty(a["logp"]), dirty(a["values"]))
    for grad in grads:
      np.testing.assert_array_equal(grad, 0.0, err_msg=name)


def test_masked_count_takes_a_boolean_mask_like_every_reduction():
  """Fails on the old code: ``masked_count`` was the one reduction without the bool-mask check, so
  ``masked_count(jnp.array([0.5, 1.0]))`` returned 1.5 "tokens" instead of a TypeError."""
  with pytest.raises(TypeError, match="mask must be a boolean array"):
    unchecked(ax.masked_count)(jnp.array([0.5, 1.0]))
  with pytest.raises(TypeError, match="mask must be a boolean array"):
    unchecked(ax.masked_count)(jnp.array([[0, 1, 1]]), axis=-1)
  np.testing.assert_array_equal(ax.masked_count(jnp.array([[True, False, True]]), axis=-1), [2.0])
