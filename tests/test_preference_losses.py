"""DPO family, KTO, ORPO, SimPO, CPO: golden values from the NumPy oracles, hand-derived numbers,
invariants (jit, gradients, symmetry, reference cancellation, extreme values, empty completions) and
trace-time errors."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import alignax as ax
from tests.reference import numpy_preference as ref

BETA = 0.1
SHAPE = (6,)


def unchecked(fn):
  """The function without the jaxtyping/beartype wrapper pytest adds (what users call): it shows
  alignax's own trace-time error rather than the type checker's."""
  return getattr(fn, "__wrapped__", fn)


def _batch(seed, shape=SHAPE):
  rng = np.random.default_rng(seed)
  pc = -rng.uniform(5.0, 40.0, shape)
  pr = -rng.uniform(5.0, 40.0, shape)
  rc = pc + rng.normal(0.0, 3.0, shape)
  rr = pr + rng.normal(0.0, 3.0, shape)
  lc = rng.integers(1, 30, shape).astype(np.float64)
  lr = rng.integers(1, 30, shape).astype(np.float64)
  return pc, pr, rc, rr, lc, lr


def _f32(*arrays):
  return tuple(jnp.asarray(a, jnp.float32) for a in arrays)


def _lengths(lc, lr):
  """The keyword-only lengths of the length-normalised losses, as float32 arrays."""
  lc, lr = _f32(lc, lr)
  return {"chosen_lengths": lc, "rejected_lengths": lr}


# (loss_type, extra dpo_loss kwargs, NumPy oracle on (pc, pr, rc, rr, lc, lr)).
DPO_CASES = [
    ("sigmoid", {}, lambda pc, pr, rc, rr, lc, lr: ref.dpo_sigmoid(pc, pr, rc, rr, BETA)),
    ("sigmoid", {"label_smoothing": 0.2},
     lambda pc, pr, rc, rr, lc, lr: ref.dpo_sigmoid(pc, pr, rc, rr, BETA, 0.2)),
    ("hinge", {}, lambda pc, pr, rc, rr, lc, lr: ref.dpo_hinge(pc, pr, rc, rr, BETA)),
    ("ipo", {}, lambda pc, pr, rc, rr, lc, lr: ref.dpo_ipo(pc, pr, rc, rr, BETA)),
    ("ipo", {"lengths": True},
     lambda pc, pr, rc, rr, lc, lr: ref.dpo_ipo(pc, pr, rc, rr, BETA, lc, lr)),
    ("robust", {"label_smoothing": 0.1},
     lambda pc, pr, rc, rr, lc, lr: ref.dpo_robust(pc, pr, rc, rr, BETA, 0.1)),
    ("exo_pair", {"label_smoothing": 1e-3},
     lambda pc, pr, rc, rr, lc, lr: ref.dpo_exo_pair(pc, pr, rc, rr, BETA, 1e-3)),
    ("nca_pair", {}, lambda pc, pr, rc, rr, lc, lr: ref.dpo_nca_pair(pc, pr, rc, rr, BETA)),
    ("bco_pair", {}, lambda pc, pr, rc, rr, lc, lr: ref.dpo_bco_pair(pc, pr, rc, rr, BETA)),
    ("bco_pair", {"bco_reward_shift": 0.3},
     lambda pc, pr, rc, rr, lc, lr: ref.dpo_bco_pair(pc, pr, rc, rr, BETA, 0.3)),
    ("sppo_hard", {}, lambda pc, pr, rc, rr, lc, lr: ref.dpo_sppo_hard(pc, pr, rc, rr, BETA)),
    ("aot", {}, lambda pc, pr, rc, rr, lc, lr: ref.dpo_aot(pc, pr, rc, rr, BETA)),
    ("aot", {"label_smoothing": 0.1},
     lambda pc, pr, rc, rr, lc, lr: ref.dpo_aot(pc, pr, rc, rr, BETA, 0.1)),
    ("aot_unpaired", {}, lambda pc, pr, rc, rr, lc, lr: ref.dpo_aot_unpaired(pc, pr, rc, rr, BETA)),
    ("apo_zero", {}, lambda pc, pr, rc, rr, lc, lr: ref.dpo_apo_zero(pc, pr, rc, rr, BETA)),
    ("apo_down", {}, lambda pc, pr, rc, rr, lc, lr: ref.dpo_apo_down(pc, pr, rc, rr, BETA)),
    ("discopop", {}, lambda pc, pr, rc, rr, lc, lr: ref.dpo_discopop(pc, pr, rc, rr, BETA)),
    ("discopop", {"discopop_tau": 0.5},
     lambda pc, pr, rc, rr, lc, lr: ref.dpo_discopop(pc, pr, rc, rr, BETA, 0.5)),
    ("sigmoid_norm", {"lengths": True},
     lambda pc, pr, rc, rr, lc, lr: ref.dpo_sigmoid_norm(pc, pr, rc, rr, BETA, lc, lr)),
]
DPO_IDS = [f"{t}-{'-'.join(map(str, kw.values())) or 'default'}" for t, kw, _ in DPO_CASES]


def _dpo_kwargs(loss_type, extra, lc, lr):
  extra = dict(extra)
  kwargs = {"beta": BETA, "loss_type": loss_type}
  if extra.pop("lengths", False):
    kwargs.update(chosen_lengths=lc, rejected_lengths=lr)
  return {**kwargs, **extra}


def test_every_loss_type_has_a_golden_case():
  assert {t for t, _, _ in DPO_CASES} == set(ax.DPO_LOSS_TYPES)


@pytest.mark.parametrize("loss_type,extra,oracle", DPO_CASES, ids=DPO_IDS)
def test_dpo_matches_numpy(loss_type, extra, oracle):
  pc, pr, rc, rr, lc, lr = _batch(0)
  args = _f32(pc, pr, rc, rr)
  kwargs = _dpo_kwargs(loss_type, extra, *_f32(lc, lr))
  loss, metrics = ax.dpo_loss(*args, **kwargs)
  losses, none_metrics = ax.dpo_loss(*args, **kwargs, reduction="none")
  expected = oracle(pc, pr, rc, rr, lc, lr)
  np.testing.assert_allclose(losses, expected, rtol=2e-5, atol=1e-6)
  assert set(none_metrics) == set(metrics)
  np.testing.assert_allclose(loss, expected.mean(), rtol=2e-5, atol=1e-6)
  # jit == eager, one compile per case.
  jit_loss, jit_metrics = jax.jit(functools.partial(ax.dpo_loss, **kwargs))(*args)
  np.testing.assert_allclose(jit_loss, loss, rtol=1e-6)
  for name in metrics:
    np.testing.assert_allclose(jit_metrics[name], metrics[name], rtol=1e-6, atol=1e-7)


def test_dpo_metrics_match_numpy():
  pc, pr, rc, rr, _, _ = _batch(1)
  _, metrics = ax.dpo_loss(*_f32(pc, pr, rc, rr), beta=BETA)
  chosen, rejected = BETA * (pc - rc), BETA * (pr - rr)
  expected = {
      "rewards/chosen": chosen.mean(), "rewards/rejected": rejected.mean(),
      "rewards/margins": (chosen - rejected).mean(),
      "rewards/accuracies": (chosen > rejected).mean(),
      "logps/chosen": pc.mean(), "logps/rejected": pr.mean(),
  }
  assert set(metrics) == set(expected)  # scalars only: per-pair losses come from reduction="none"
  for name, value in expected.items():
    np.testing.assert_allclose(metrics[name], value, rtol=1e-5, err_msg=name)
    assert metrics[name].shape == ()


def test_dpo_leading_batch_dims():
  pc, pr, rc, rr, lc, lr = _batch(2, (2, 3))
  loss, metrics = ax.dpo_loss(*_f32(pc, pr, rc, rr), beta=BETA, loss_type="sigmoid_norm",
                              chosen_lengths=lc, rejected_lengths=lr)
  losses, _ = ax.dpo_loss(*_f32(pc, pr, rc, rr), beta=BETA, loss_type="sigmoid_norm",
                          chosen_lengths=lc, rejected_lengths=lr, reduction="none")
  assert losses.shape == (2, 3) and all(v.shape == () for v in metrics.values())
  np.testing.assert_allclose(loss, ref.dpo_sigmoid_norm(pc, pr, rc, rr, BETA, lc, lr).mean(),
                             rtol=1e-5)


# ---- hand-derived values -----------------------------------------------------------------------

EPS_EXO = 1e-3
ZERO_MARGIN = {  # per-pair loss when every log-ratio is 0 (z = 0), derived by hand
    "sigmoid": math.log(2),
    "hinge": 1.0,
    "ipo": 1 / (2 * BETA) ** 2,
    "robust": math.log(2),  # ((1-ε) log 2 - ε log 2) / (1 - 2ε)
    "exo_pair": math.log(0.5) - 0.5 * math.log(EPS_EXO * (1 - EPS_EXO)),
    "nca_pair": 2 * math.log(2),
    "bco_pair": 2 * math.log(2),
    "sppo_hard": 2 / (2 * BETA) ** 2,
    "aot": math.log(2),
    "aot_unpaired": math.log(2),
    "apo_zero": 1.0,
    "apo_down": 1.0,
    "discopop": 0.5 * math.log(2) + 0.5,
    "sigmoid_norm": math.log(2),
}


@pytest.mark.parametrize("loss_type", ax.DPO_LOSS_TYPES)
def test_dpo_at_zero_log_ratios(loss_type):
  logps = jnp.full((4,), -7.0)
  kwargs = {"beta": BETA, "loss_type": loss_type}
  if loss_type == "sigmoid_norm":
    kwargs.update(chosen_lengths=jnp.full((4,), 3.0), rejected_lengths=jnp.full((4,), 5.0))
  if loss_type in ("exo_pair", "robust"):
    kwargs["label_smoothing"] = EPS_EXO
  loss, _ = ax.dpo_loss(logps, logps, logps, logps, **kwargs)
  np.testing.assert_allclose(loss, ZERO_MARGIN[loss_type], rtol=1e-6)


def test_ipo_is_zero_at_its_target_margin():
  beta = 0.25
  target = 1 / (2 * beta)
  chosen = jnp.array([-3.0, -10.0])
  loss, _ = ax.dpo_loss(chosen, chosen - target, jnp.zeros(2), jnp.zeros(2), beta=beta,
                        loss_type="ipo")
  np.testing.assert_allclose(loss, 0.0, atol=1e-10)
  # Length-normalised: δ̄ = s_c/|y_c| - s_r/|y_r| = 2·target/2 - 0 = target.
  loss, _ = ax.dpo_loss(jnp.array([2 * target]), jnp.array([0.0]), jnp.array([0.0]),
                        jnp.array([0.0]), beta=beta, loss_type="ipo",
                        chosen_lengths=jnp.array([2]), rejected_lengths=jnp.array([7]))
  np.testing.assert_allclose(loss, 0.0, atol=1e-10)


def test_hinge_is_zero_beyond_margin_one_over_beta():
  zeros = jnp.zeros(2)
  loss, _ = ax.dpo_loss(jnp.array([1 / BETA, 2 / BETA]), zeros, zeros, zeros, beta=BETA,
                        loss_type="hinge")
  assert loss == 0.0


def test_combined_loss_types_are_a_weighted_sum():
  pc, pr, rc, rr, _, _ = _batch(3)
  kwargs = dict(beta=BETA, loss_type=("sigmoid", "bco_pair"), loss_weights=(0.8, 0.2))
  loss, _ = ax.dpo_loss(*_f32(pc, pr, rc, rr), **kwargs)
  losses, _ = ax.dpo_loss(*_f32(pc, pr, rc, rr), **kwargs, reduction="none")
  expected = (0.8 * ref.dpo_sigmoid(pc, pr, rc, rr, BETA)
              + 0.2 * ref.dpo_bco_pair(pc, pr, rc, rr, BETA))
  np.testing.assert_allclose(losses, expected, rtol=1e-5)
  np.testing.assert_allclose(loss, expected.mean(), rtol=1e-5)
  default_weights, _ = ax.dpo_loss(*_f32(pc, pr, rc, rr), beta=BETA,
                                   loss_type=["sigmoid", "hinge"])
  np.testing.assert_allclose(default_weights, (ref.dpo_sigmoid(pc, pr, rc, rr, BETA)
                                               + ref.dpo_hinge(pc, pr, rc, rr, BETA)).mean(),
                             rtol=1e-5)


# ---- invariants --------------------------------------------------------------------------------


def _grad_kwargs(loss_type):
  kwargs = {"beta": BETA, "loss_type": loss_type}
  if loss_type in ("exo_pair",):
    kwargs["label_smoothing"] = EPS_EXO
  return kwargs


@pytest.mark.parametrize("loss_type", ax.DPO_LOSS_TYPES)
def test_dpo_check_grads(loss_type):
  pc, pr, rc, rr, lc, lr = _batch(4, (3,))
  kwargs = _grad_kwargs(loss_type)
  if loss_type in ("sigmoid_norm", "ipo"):
    kwargs.update(chosen_lengths=jnp.asarray(lc), rejected_lengths=jnp.asarray(lr))

  # Scale into the interesting range of βδ so the finite differences see curvature.
  pc, pr, rc, rr = _f32(pc / 4, pr / 4, rc / 4, rr / 4)

  def loss(pc, pr):
    return ax.dpo_loss(pc, pr, rc, rr, **kwargs)[0]

  check_grads(loss, (pc, pr), order=1, modes=("rev",), eps=1e-2, atol=5e-3, rtol=5e-3)
  # The reference is frozen: no gradient reaches its log-probs.
  ref_grads = jax.grad(lambda c, r: ax.dpo_loss(pc, pr, c, r, **kwargs)[0], argnums=(0, 1))(rc, rr)
  for grad in ref_grads:
    np.testing.assert_array_equal(grad, 0)


def test_swapping_chosen_and_rejected_flips_the_margin():
  pc, pr, rc, rr, _, _ = _batch(5)
  args = _f32(pc, pr, rc, rr)
  swapped = (args[1], args[0], args[3], args[2])
  _, metrics = ax.dpo_loss(*args, beta=BETA)
  _, metrics_swapped = ax.dpo_loss(*swapped, beta=BETA)
  np.testing.assert_allclose(metrics_swapped["rewards/margins"], -metrics["rewards/margins"],
                             rtol=1e-6)
  # cDPO at ε = 0.5 cannot tell chosen from rejected.
  loss, _ = ax.dpo_loss(*args, beta=BETA, label_smoothing=0.5)
  loss_swapped, _ = ax.dpo_loss(*swapped, beta=BETA, label_smoothing=0.5)
  np.testing.assert_allclose(loss_swapped, loss, rtol=1e-6)
  # ... while at ε < 0.5 the swap costs: the chosen answers win here on average.
  plain, _ = ax.dpo_loss(*args, beta=BETA, label_smoothing=0.1)
  plain_swapped, _ = ax.dpo_loss(*swapped, beta=BETA, label_smoothing=0.1)
  assert (plain - plain_swapped) * metrics["rewards/margins"] < 0


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo", "robust", "exo_pair", "aot",
                                       "discopop"])
def test_equal_reference_logps_give_the_reference_free_loss(loss_type):
  # These types see the reference only through log π_ref(y_c) − log π_ref(y_r) (aot: its sorted
  # values), which is 0 when both completions are equally likely under the reference.
  pc, pr, _, _, _, _ = _batch(6)
  kwargs = _grad_kwargs(loss_type)
  if loss_type == "robust":
    kwargs["label_smoothing"] = 0.2
  same_ref = jnp.asarray(np.random.default_rng(7).normal(-20.0, 5.0, SHAPE), jnp.float32)
  loss, _ = ax.dpo_loss(*_f32(pc, pr), same_ref, same_ref, **kwargs)
  free, free_metrics = ax.dpo_loss(*_f32(pc, pr), None, None, **kwargs)
  np.testing.assert_allclose(loss, free, rtol=1e-5)
  np.testing.assert_allclose(free_metrics["rewards/chosen"], BETA * pc.mean(), rtol=1e-5)


def test_small_beta_linearises_the_logistic_loss():
  # -log σ(βδ) = log 2 − βδ/2 + O(β²δ²): as β → 0 DPO is a margin-maximising linear loss.
  pc, pr, rc, rr, _, _ = _batch(8)
  delta = ((pc - rc) - (pr - rr)).mean()
  beta = 1e-3
  loss, _ = ax.dpo_loss(*_f32(pc, pr, rc, rr), beta=beta)
  np.testing.assert_allclose((float(loss) - math.log(2)) / beta, -delta / 2, rtol=2e-2)


@pytest.mark.parametrize("loss_type", ax.DPO_LOSS_TYPES)
def test_dpo_extreme_logps_stay_finite(loss_type):
  big = 1e4
  pc = jnp.array([-big, 0.0, -big, big, 0.0])
  pr = jnp.array([0.0, -big, -big, -big, big])
  rc = jnp.array([0.0, -big, big, 0.0, -big])
  rr = jnp.array([-big, 0.0, 0.0, big, -big])
  kwargs = _grad_kwargs(loss_type)
  if loss_type in ("sigmoid_norm", "ipo"):
    kwargs.update(chosen_lengths=jnp.array([1, 0, 3, 1, 2]),
                  rejected_lengths=jnp.array([0, 1, 1, 4, 1]))
  loss, grads = jax.value_and_grad(lambda *a: ax.dpo_loss(*a, **kwargs)[0], argnums=(0, 1, 2, 3))(
      pc, pr, rc, rr)
  assert np.isfinite(loss)
  for grad in grads:
    assert np.all(np.isfinite(grad))


@pytest.mark.parametrize("loss_type", ["sigmoid_norm", "ipo"])
def test_zero_length_completions_are_finite(loss_type):
  # An empty completion has log-prob sum 0; its normalised log-ratio is 0, never 0/0.
  pc, pr = jnp.array([0.0, -4.0]), jnp.array([-6.0, 0.0])
  lengths_c, lengths_r = jnp.array([0, 2]), jnp.array([3, 0])
  loss, grads = jax.value_and_grad(
      lambda pc, pr: ax.dpo_loss(pc, pr, None, None, beta=BETA, loss_type=loss_type,
                                 chosen_lengths=lengths_c, rejected_lengths=lengths_r)[0],
      argnums=(0, 1))(pc, pr)
  expected = (ref.dpo_sigmoid_norm if loss_type == "sigmoid_norm" else ref.dpo_ipo)(
      np.array([0.0, -4.0]), np.array([-6.0, 0.0]), 0.0, 0.0, BETA, np.array([0, 2]),
      np.array([3, 0]))
  np.testing.assert_allclose(loss, expected.mean(), rtol=1e-6)
  assert all(np.all(np.isfinite(g)) for g in grads)


def test_traced_beta_under_vmap():
  pc, pr, rc, rr, _, _ = _batch(9)
  with pytest.raises(ValueError, match="beta must be > 0"):  # a concrete array is still checked
    ax.dpo_loss(*_f32(pc, pr, rc, rr), beta=jnp.array(-0.1))
  betas = jnp.array([0.05, 0.1, 1.0])
  losses = jax.vmap(lambda b: ax.dpo_loss(*_f32(pc, pr, rc, rr), beta=b)[0])(betas)
  for beta, loss in zip([0.05, 0.1, 1.0], losses):
    np.testing.assert_allclose(loss, ref.dpo_sigmoid(pc, pr, rc, rr, beta).mean(), rtol=1e-5)


def test_reduction_none_keeps_the_per_pair_gradient():
  pc, pr, rc, rr, _, _ = _batch(10)
  weights = jnp.linspace(0.0, 1.0, SHAPE[0])
  args = _f32(pc, pr, rc, rr)
  grad_weighted = jax.grad(
      lambda c: jnp.sum(weights * ax.dpo_loss(c, *args[1:], reduction="none")[0]))(args[0])
  assert grad_weighted[0] == 0.0 and np.all(grad_weighted[1:] != 0.0)
  # "mean" is the mean of "none", value and gradient alike, for every pairwise objective.
  pc, pr, lc, lr = _avg_batch(10)
  calls = [
      lambda c, red: ax.dpo_loss(c, *args[1:], reduction=red),
      lambda c, red: ax.orpo_loss(c, *_f32(pr), **_lengths(lc, lr), reduction=red),
      lambda c, red: ax.simpo_loss(c, *_f32(pr), **_lengths(lc, lr), reduction=red),
      lambda c, red: ax.cpo_loss(c, *_f32(pr), **_lengths(lc, lr), reduction=red),
      lambda c, red: ax.kto_loss(c, *_f32(pr), jnp.arange(SHAPE[0]) % 2 == 0,
                                 reference_point=0.1, reduction=red),
      lambda c, red: ax.bradley_terry_loss(c, *_f32(pr), margin=0.5, reduction=red),
  ]
  for call in calls:
    c = _f32(pc)[0]
    mean, mean_metrics = call(c, "mean")
    losses, none_metrics = call(c, "none")
    assert mean.shape == () and losses.shape == c.shape
    np.testing.assert_allclose(jnp.mean(losses), mean, rtol=1e-6)
    np.testing.assert_allclose(jax.grad(lambda x: jnp.mean(call(x, "none")[0]))(c),
                               jax.grad(lambda x: call(x, "mean")[0])(c), rtol=1e-6, atol=1e-8)
    assert set(mean_metrics) == set(none_metrics)
    assert all(jnp.shape(v) == () for v in mean_metrics.values())


def test_sharded_batch_equals_unsharded(mesh8):
  # aot sorts across the batch and KTO averages over label subsets: both need the global batch.
  sharding = jax.sharding.NamedSharding(mesh8, jax.sharding.PartitionSpec("data"))
  pc, pr, rc, rr, _, _ = _batch(17, (16,))
  args = _f32(pc, pr, rc, rr)
  dpo = jax.jit(functools.partial(ax.dpo_loss, beta=BETA, loss_type=("sigmoid", "aot"),
                                  loss_weights=(1.0, 0.5)))
  kto = jax.jit(functools.partial(ax.kto_loss, reference_point=0.2, beta=BETA))
  desirable = jnp.arange(16) % 3 == 0
  for fn, inputs in ((dpo, args), (kto, (args[0], args[2], desirable))):
    loss, metrics = fn(*inputs)
    sharded_loss, sharded_metrics = fn(*(jax.device_put(x, sharding) for x in inputs))
    np.testing.assert_allclose(sharded_loss, loss, rtol=1e-6)
    for name in metrics:
      np.testing.assert_allclose(sharded_metrics[name], metrics[name], rtol=1e-6, atol=1e-7)


# ---- KTO ---------------------------------------------------------------------------------------


def _kto_batch(seed):
  rng = np.random.default_rng(seed)
  policy = -rng.uniform(5.0, 40.0, 8)
  reference = policy + rng.normal(0.0, 3.0, 8)
  desirable = np.array([True, False, True, True, False, False, True, False])
  return policy, reference, desirable


def test_kto_matches_numpy():
  policy, reference, desirable = _kto_batch(11)
  mismatched = policy[::-1] + 2.0
  z0 = ax.kto_reference_point(jnp.asarray(mismatched, jnp.float32),
                              jnp.asarray(reference, jnp.float32))
  np.testing.assert_allclose(z0, ref.kto_z0(mismatched, reference), rtol=1e-5)
  kwargs = {"reference_point": z0, "beta": 0.5, "desirable_weight": 1.0,
            "undesirable_weight": 1.33}
  loss, metrics = ax.kto_loss(*_f32(policy, reference), jnp.asarray(desirable), **kwargs)
  losses, _ = ax.kto_loss(*_f32(policy, reference), jnp.asarray(desirable), **kwargs,
                          reduction="none")
  expected = ref.kto(policy, reference, desirable, 0.5, float(z0), 1.0, 1.33)
  np.testing.assert_allclose(losses, expected, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(loss, expected.mean(), rtol=1e-5)
  rewards = 0.5 * (policy - reference)
  np.testing.assert_allclose(metrics["rewards/chosen"], rewards[desirable].mean(), rtol=1e-5)
  np.testing.assert_allclose(metrics["rewards/rejected"], rewards[~desirable].mean(), rtol=1e-5)
  np.testing.assert_allclose(metrics["logps/chosen"], policy[desirable].mean(), rtol=1e-5)
  np.testing.assert_allclose(metrics["kl"], z0)
  jit_loss, _ = jax.jit(functools.partial(ax.kto_loss, **kwargs))(
      *_f32(policy, reference), jnp.asarray(desirable))
  np.testing.assert_allclose(jit_loss, loss, rtol=1e-6)


def test_kto_reference_point_is_clamped_and_has_no_gradient():
  assert ax.kto_reference_point(jnp.array([-5.0, -6.0]), jnp.array([-1.0, -1.0])) == 0.0
  grad = jax.grad(lambda x: ax.kto_reference_point(x, jnp.zeros(2)))(jnp.array([1.0, 2.0]))
  np.testing.assert_array_equal(grad, 0.0)


def test_kto_with_zero_reference_point_is_apo_zero_unpaired():
  policy, reference, desirable = _kto_batch(12)
  losses, _ = ax.kto_loss(*_f32(policy, reference), jnp.asarray(desirable), reference_point=0.0,
                          beta=BETA, reduction="none")
  s = BETA * (policy - reference)
  apo = np.where(desirable, 1 - ref.sigmoid(s), ref.sigmoid(s))  # TRL apo_zero_unpaired
  np.testing.assert_allclose(losses, apo, rtol=1e-5)


def test_kto_check_grads_and_all_desirable_batch():
  policy, reference, _ = _kto_batch(13)
  desirable = jnp.ones(8, bool)
  loss, metrics = ax.kto_loss(*_f32(policy, reference), desirable, reference_point=0.3, beta=BETA)
  assert metrics["rewards/rejected"] == 0.0 and np.isfinite(loss)
  check_grads(lambda p: ax.kto_loss(p, jnp.asarray(reference / 4, jnp.float32),
                                    jnp.asarray(_kto_batch(13)[2]), reference_point=0.3,
                                    beta=0.5)[0],
              (jnp.asarray(policy / 4, jnp.float32),), order=1, modes=("rev",), eps=1e-2,
              atol=5e-3, rtol=5e-3)
  ref_grad = jax.grad(lambda r: ax.kto_loss(jnp.asarray(policy, jnp.float32), r, desirable,
                                            reference_point=0.3)[0])(jnp.asarray(reference))
  np.testing.assert_array_equal(ref_grad, 0)  # the reference is frozen


# ---- ORPO, SimPO, CPO --------------------------------------------------------------------------


def _avg_batch(seed):
  """Sequence sums whose per-token averages are valid log-probs in (-3, -0.05)."""
  rng = np.random.default_rng(seed)
  lc = rng.integers(1, 20, SHAPE).astype(np.float64)
  lr = rng.integers(1, 20, SHAPE).astype(np.float64)
  pc = -rng.uniform(0.05, 3.0, SHAPE) * lc
  pr = -rng.uniform(0.05, 3.0, SHAPE) * lr
  return pc, pr, lc, lr


def test_orpo_matches_numpy():
  pc, pr, lc, lr = _avg_batch(14)
  loss, metrics = ax.orpo_loss(*_f32(pc, pr), **_lengths(lc, lr), odds_ratio_weight=0.2)
  np.testing.assert_allclose(loss, ref.orpo(pc, pr, lc, lr, 0.2), rtol=1e-5)
  losses, _ = ax.orpo_loss(*_f32(pc, pr), **_lengths(lc, lr), odds_ratio_weight=0.2,
                           reduction="none")
  np.testing.assert_allclose(losses.mean(), loss, rtol=1e-6)
  np.testing.assert_allclose(metrics["nll_loss"], -pc.sum() / lc.sum(), rtol=1e-5)
  log_odds = np.log((np.exp(pc / lc) / (1 - np.exp(pc / lc)))
                    / (np.exp(pr / lr) / (1 - np.exp(pr / lr))))
  np.testing.assert_allclose(metrics["log_odds_chosen"], log_odds.mean(), rtol=1e-5)
  np.testing.assert_allclose(metrics["log_odds_ratio"], ref.log_sigmoid(log_odds).mean(),
                             rtol=1e-5)
  np.testing.assert_allclose(metrics["rewards/chosen"], 0.2 * (pc / lc).mean(), rtol=1e-5)
  jit_loss, _ = jax.jit(functools.partial(ax.orpo_loss, odds_ratio_weight=0.2))(
      *_f32(pc, pr), **_lengths(lc, lr))
  np.testing.assert_allclose(jit_loss, loss, rtol=1e-6)
  check_grads(lambda c, r: ax.orpo_loss(c, r, **_lengths(lc, lr), odds_ratio_weight=0.2)[0],
              _f32(pc, pr), order=1,
              modes=("rev",), eps=1e-2, atol=5e-3, rtol=5e-3)


def test_orpo_log_odds_are_stable_near_zero_and_for_empty_completions():
  # An average log-prob of 0 (an empty completion, or p = 1) would be log(0) without the guard;
  # -1e4 per token must not lose the odds to cancellation.
  pc = jnp.array([0.0, -1e-9, -1e4, -3.0])
  pr = jnp.array([-2.0, 0.0, -1e4 * 3, 0.0])
  lc, lr = jnp.array([0, 1, 1, 3]), jnp.array([1, 1, 3, 0])
  loss, grads = jax.value_and_grad(
      lambda c, r: ax.orpo_loss(c, r, chosen_lengths=lc, rejected_lengths=lr)[0],
      argnums=(0, 1))(pc, pr)
  assert np.isfinite(loss) and all(np.all(np.isfinite(g)) for g in grads)
  # Both averages −1e4: log odds ratio = (−1e4 − log1mexp(−1e4)) − (same) = 0.
  _, single = ax.orpo_loss(pc[2:3], pr[2:3], chosen_lengths=lc[2:3], rejected_lengths=lr[2:3],
                           odds_ratio_weight=1.0)
  np.testing.assert_allclose(single["log_odds_chosen"], 0.0, atol=1e-6)


@pytest.mark.parametrize("loss_type,eps", [("sigmoid", 0.0), ("sigmoid", 0.3), ("hinge", 0.0)])
def test_simpo_matches_numpy(loss_type, eps):
  pc, pr, lc, lr = _avg_batch(15)
  kwargs = {"beta": 2.5, "gamma_beta_ratio": 0.55, "label_smoothing": eps, "loss_type": loss_type}
  loss, metrics = ax.simpo_loss(*_f32(pc, pr), **_lengths(lc, lr), **kwargs)
  losses, _ = ax.simpo_loss(*_f32(pc, pr), **_lengths(lc, lr), **kwargs, reduction="none")
  expected = ref.simpo(pc, pr, lc, lr, 2.5, 2.5 * 0.55, eps, hinge=loss_type == "hinge")
  np.testing.assert_allclose(losses, expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(loss, expected.mean(), rtol=1e-5)
  np.testing.assert_allclose(metrics["rewards/margins"], 2.5 * (pc / lc - pr / lr).mean(),
                             rtol=1e-5)
  jit_loss, _ = jax.jit(functools.partial(ax.simpo_loss, **kwargs))(*_f32(pc, pr),
                                                                     **_lengths(lc, lr))
  np.testing.assert_allclose(jit_loss, loss, rtol=1e-6)


def test_simpo_hand_values_and_empty_completion():
  # Equal per-token averages: z = −γ, so the loss is −log σ(−γ) = log(1 + e^γ).
  loss, _ = ax.simpo_loss(jnp.array([-4.0]), jnp.array([-8.0]), chosen_lengths=jnp.array([2]),
                          rejected_lengths=jnp.array([4]), beta=2.0, gamma_beta_ratio=0.5)
  np.testing.assert_allclose(loss, math.log1p(math.e), rtol=1e-6)
  loss, grads = jax.value_and_grad(
      lambda c, r: ax.simpo_loss(c, r, chosen_lengths=jnp.array([0, 3]),
                                 rejected_lengths=jnp.array([2, 0]))[0], argnums=(0, 1))(
          jnp.array([0.0, -3.0]), jnp.array([-2.0, 0.0]))
  assert np.isfinite(loss) and all(np.all(np.isfinite(g)) for g in grads)


def test_simpo_defaults_are_the_paper_codes():
  # princeton-nlp/SimPO SimPOConfig: beta=2.0, gamma_beta_ratio=0.25, so gamma = 0.5 (TRL's
  # simpo_gamma). Equal per-token averages leave z = -gamma: the loss is log(1 + e^0.5).
  loss, _ = ax.simpo_loss(jnp.array([-4.0]), jnp.array([-8.0]), chosen_lengths=jnp.array([2]),
                          rejected_lengths=jnp.array([4]))
  np.testing.assert_allclose(loss, math.log1p(math.exp(0.5)), rtol=1e-6)


def test_cpo_matches_numpy():
  pc, pr, lc, lr = _avg_batch(16)
  loss, metrics = ax.cpo_loss(*_f32(pc, pr), **_lengths(lc, lr), beta=BETA, cpo_alpha=0.7)
  np.testing.assert_allclose(loss, ref.cpo(pc, pr, lc, BETA, 0.7), rtol=1e-5)
  losses, _ = ax.cpo_loss(*_f32(pc, pr), **_lengths(lc, lr), beta=BETA, cpo_alpha=0.7,
                          reduction="none")
  np.testing.assert_allclose(losses.mean(), loss, rtol=1e-6)
  np.testing.assert_allclose(metrics["nll_loss"], -pc.sum() / lc.sum(), rtol=1e-5)
  np.testing.assert_allclose(metrics["rewards/chosen"], BETA * pc.mean(), rtol=1e-5)
  # cpo_alpha = 0 is reference-free DPO; ipo length-normalises, as in TRL's CPO.
  no_nll, _ = ax.cpo_loss(*_f32(pc, pr), **_lengths(lc, lr), beta=BETA, loss_type="ipo",
                          cpo_alpha=0.0)
  np.testing.assert_allclose(no_nll, ref.dpo_ipo(pc, pr, 0.0, 0.0, BETA, lc, lr).mean(),
                             rtol=1e-5)
  jit_loss, _ = jax.jit(functools.partial(ax.cpo_loss, beta=BETA, cpo_alpha=0.7))(
      *_f32(pc, pr), **_lengths(lc, lr))
  np.testing.assert_allclose(jit_loss, loss, rtol=1e-6)


# ---- errors, raised at trace time (also under jit) --------------------------------------------


def _pairs(n=3):
  return tuple(jnp.full((n,), -5.0) for _ in range(4))


@pytest.mark.parametrize("kwargs,message", [
    ({"loss_type": "dpo"}, "loss_type='dpo' is not supported"),
    ({"loss_type": ("sigmoid", "sigmoid")}, "lists a type twice"),
    ({"loss_type": ("sigmoid", "hinge"), "loss_weights": (1.0,)}, "loss_weights has 1 entries"),
    ({"beta": -0.1}, "beta must be > 0"),
    ({"beta": 0.0}, "beta must be > 0"),
    ({"label_smoothing": 0.6}, r"\[0, 0.5\] for loss_type='sigmoid'"),
    ({"label_smoothing": 1.0, "loss_type": "exo_pair"}, r"label_smoothing must lie in \[0, 1\)"),
    ({"label_smoothing": -0.1}, r"label_smoothing must lie in \[0, 1\)"),
    ({"label_smoothing": 0.5, "loss_type": "robust"}, r"\[0, 0.5\) for loss_type='robust'"),
    ({"loss_type": "exo_pair"}, "exo_pair' needs label_smoothing"),
    ({"label_smoothing": 0.1, "loss_type": "hinge"}, "no effect for loss_type='hinge'"),
    ({"loss_type": "sigmoid_norm"}, "needs chosen_lengths and rejected_lengths"),
    ({"loss_type": "sigmoid", "chosen_lengths": jnp.ones(3), "rejected_lengths": jnp.ones(3)},
     "unused by loss_type"),
    ({"loss_type": "ipo", "chosen_lengths": jnp.ones(3)}, "must be given together"),
    ({"discopop_tau": 0.0, "loss_type": "discopop"}, "discopop_tau must be > 0"),
])
def test_dpo_bad_hyper_parameters(kwargs, message):
  dpo_loss = unchecked(ax.dpo_loss)
  with pytest.raises(ValueError, match=message):
    dpo_loss(*_pairs(), **kwargs)
  with pytest.raises(ValueError, match=message):  # the same call, traced under jit
    jax.jit(lambda *a: dpo_loss(*a, **kwargs))(*_pairs())
  with pytest.raises((ValueError, TypeError)):  # under pytest the type checker may see it first
    ax.dpo_loss(*_pairs(), **kwargs)


def test_mismatched_shapes_name_the_arguments():
  pc, pr, rc, _ = _pairs()
  rr = jnp.zeros(4)
  for fn in (ax.dpo_loss, unchecked(ax.dpo_loss), jax.jit(unchecked(ax.dpo_loss))):
    with pytest.raises((ValueError, TypeError), match="ref_rejected_logps"):
      fn(pc, pr, rc, rr)
  with pytest.raises(ValueError, match=r"chosen_logps\[3\].*ref_rejected_logps\[4\]"):
    unchecked(ax.dpo_loss)(pc, pr, rc, rr)
  with pytest.raises(ValueError, match=r"rejected_lengths\[2\]"):
    unchecked(ax.dpo_loss)(pc, pr, rc, rc, loss_type="ipo", chosen_lengths=jnp.ones(3),
                           rejected_lengths=jnp.ones(2))
  with pytest.raises(ValueError, match=r"chosen_lengths\[4\]"):
    jax.jit(unchecked(ax.orpo_loss))(pc, pr, chosen_lengths=jnp.ones(4),
                                     rejected_lengths=jnp.ones(3))
  with pytest.raises(ValueError, match=r"desirable\[2\]"):
    unchecked(ax.kto_loss)(pc, rc, jnp.ones(2, bool), reference_point=0.0)


def test_one_sided_reference_is_an_error():
  pc, pr, rc, _ = _pairs()
  with pytest.raises(ValueError, match="both be arrays or both be None"):
    ax.dpo_loss(pc, pr, rc, None)


def test_other_objectives_bad_hyper_parameters():
  pc, pr, _, _ = _pairs()
  lengths = jnp.ones(3)
  lengths = {"chosen_lengths": lengths, "rejected_lengths": lengths}
  with pytest.raises(ValueError, match="odds_ratio_weight must be > 0"):
    jax.jit(lambda c, r: ax.orpo_loss(c, r, **lengths, odds_ratio_weight=-1.0))(pc, pr)
  with pytest.raises(ValueError, match="gamma_beta_ratio must be >= 0"):
    ax.simpo_loss(pc, pr, **lengths, gamma_beta_ratio=-0.5)
  with pytest.raises(ValueError, match="no effect for loss_type='hinge'"):
    ax.simpo_loss(pc, pr, **lengths, loss_type="hinge", label_smoothing=0.1)
  with pytest.raises(ValueError, match="cpo_alpha must be >= 0"):
    ax.cpo_loss(pc, pr, **lengths, cpo_alpha=-1.0)
  with pytest.raises(ValueError, match="reduction='sum' is not supported"):
    unchecked(ax.dpo_loss)(pc, pr, None, None, reduction="sum")
  with pytest.raises(ValueError, match="undesirable_weight must be >= 0"):
    ax.kto_loss(pc, pr, jnp.ones(3, bool), reference_point=0.0, undesirable_weight=-1.0)
  with pytest.raises((TypeError, ValueError), match="desirable"):
    ax.kto_loss(pc, pr, jnp.ones(3), reference_point=0.0)
  with pytest.raises(TypeError, match="desirable must be a boolean array"):
    unchecked(ax.kto_loss)(pc, pr, jnp.ones(3), reference_point=0.0)
  with pytest.raises(ValueError, match="reference_point must be a scalar"):
    unchecked(ax.kto_loss)(pc, pr, jnp.ones(3, bool), reference_point=jnp.zeros(3))
