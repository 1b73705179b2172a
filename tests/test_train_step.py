"""The shared training step: gradient accumulation equals the large batch, sharded equals unsharded."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

import alignax as ax
from alignax.train.optim import make_optimizer
from alignax.train.step import (NonFiniteError, Objective, check_finite, init_state,
                                make_train_step, split_micro_batches)

D, V, T = 8, 11, 6


def _token_mean_objective():
  """A bigram softmax model with a token-mean NLL over a boolean loss mask: the SFT loss shape."""
  def loss(params, frozen, batch, key):
    del frozen, key
    logits = params["emb"][batch["x"]] @ params["out"]
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits), batch["y"][..., None], -1)[..., 0]
    mask = batch["mask"]
    value, metrics = ax.sft_loss(logp, mask)
    return value, {**metrics, "logp": ax.masked_mean(logp, mask)}

  return Objective(loss=loss, weight=lambda batch: jnp.sum(batch["mask"]))


def _batch(seed, rows=8):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(0, T + 1, rows)  # very different token counts per row, one row may be empty
  return {"x": jnp.asarray(rng.integers(0, V, (rows, T))),
          "y": jnp.asarray(rng.integers(0, V, (rows, T))),
          "mask": jnp.asarray(np.arange(T) < lengths[:, None])}


def _params():
  k1, k2 = jax.random.split(jax.random.key(0))
  return {"emb": jax.random.normal(k1, (V, D)), "out": jax.random.normal(k2, (D, V)) * 0.3}


@pytest.mark.parametrize("accumulation", [2, 4])
def test_accumulation_equals_one_large_batch(accumulation):
  objective = _token_mean_objective()
  optimizer, schedule = make_optimizer(1e-2, max_steps=10, lr_scheduler_type="constant")
  step = jax.jit(make_train_step(objective, optimizer, schedule=schedule))
  batch = _batch(0)
  whole, whole_metrics = step(init_state(_params(), optimizer), split_micro_batches(batch, 1))
  parts, parts_metrics = step(init_state(_params(), optimizer),
                              split_micro_batches(batch, accumulation))
  # The global token mean, not the mean of micro-batch means.
  logits = _params()["emb"][batch["x"]] @ _params()["out"]
  logp = jnp.take_along_axis(jax.nn.log_softmax(logits), batch["y"][..., None], -1)[..., 0]
  want_loss = -jnp.sum(jnp.where(batch["mask"], logp, 0.0)) / jnp.sum(batch["mask"])
  np.testing.assert_allclose(whole_metrics["loss"], want_loss, rtol=1e-6)
  np.testing.assert_allclose(parts_metrics["loss"], want_loss, rtol=1e-6)
  np.testing.assert_allclose(parts_metrics["grad_norm"], whole_metrics["grad_norm"], rtol=1e-5)
  np.testing.assert_allclose(parts_metrics["logp"], whole_metrics["logp"], rtol=1e-5)
  for got, want in zip(jax.tree.leaves(parts.params), jax.tree.leaves(whole.params)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  assert int(parts.step) == 1 and parts_metrics["learning_rate"] == pytest.approx(1e-2)


def test_a_batch_without_loss_tokens_takes_a_finite_zero_step():
  objective = _token_mean_objective()
  optimizer, _ = make_optimizer(1e-2, max_steps=10, lr_scheduler_type="constant")
  batch = {**_batch(1), "mask": jnp.zeros((8, T), bool)}
  state, metrics = jax.jit(make_train_step(objective, optimizer))(
    init_state(_params(), optimizer), split_micro_batches(batch, 2))
  assert all(np.isfinite(v) for v in jax.device_get(metrics).values())
  assert metrics["grad_norm"] == 0.0
  for got, want in zip(jax.tree.leaves(state.params), jax.tree.leaves(_params())):
    np.testing.assert_array_equal(got, want)


def test_sharded_step_equals_unsharded():
  # alignax's mesh policy: Auto axes (sharding propagated by the compiler), as ax.make_mesh builds.
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  objective = _token_mean_objective()
  optimizer, _ = make_optimizer(1e-2, max_steps=10, lr_scheduler_type="constant")
  step = make_train_step(objective, optimizer)
  batch = split_micro_batches(_batch(2, rows=16), 2)
  want_state, want_metrics = jax.jit(step)(init_state(_params(), optimizer), batch)
  sharded = jax.tree.map(
    lambda x: jax.device_put(x, NamedSharding(mesh, PartitionSpec(None, "data"))), batch)
  got_state, got_metrics = jax.jit(step, donate_argnums=0)(init_state(_params(), optimizer), sharded)
  np.testing.assert_allclose(got_metrics["loss"], want_metrics["loss"], rtol=1e-6)
  for got, want in zip(jax.tree.leaves(got_state.params), jax.tree.leaves(want_state.params)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_bad_accumulation_and_non_finite_metrics_are_named():
  with pytest.raises(ValueError, match="not divisible by gradient_accumulation_steps=3"):
    split_micro_batches(_batch(0), 3)
  check_finite(4, {"loss": 1.0, "grad_norm": 2.0})
  with pytest.raises(NonFiniteError, match="step 7: grad_norm = nan"):
    check_finite(7, {"loss": 1.0, "grad_norm": float("nan")})
