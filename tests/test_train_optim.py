"""Learning-rate schedules equal transformers' (the numbers a TRL user's run uses), and the AdamW chain."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from transformers import get_scheduler

from alignax.train.optim import global_norm, learning_rate_schedule, make_optimizer


@pytest.mark.parametrize("kind, warmup", [
  ("linear", 0), ("linear", 3), ("cosine", 0), ("cosine", 3), ("constant_with_warmup", 0),
  ("constant_with_warmup", 3), ("constant", 0),  # constant + warmup is an error, tested below
])
def test_schedules_equal_transformers(kind, warmup):
  max_steps, lr = 20, 3e-4
  ours = learning_rate_schedule(lr, max_steps=max_steps, lr_scheduler_type=kind,
                                warmup_steps=warmup)
  optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
  theirs = get_scheduler(kind, optimizer, num_warmup_steps=warmup, num_training_steps=max_steps)
  for step in range(max_steps + 1):
    np.testing.assert_allclose(float(ours(step)), optimizer.param_groups[0]["lr"], rtol=1e-6,
                               atol=lr * 1e-6, err_msg=f"step {step}")
    optimizer.step()
    theirs.step()


def test_warmup_ratio_and_bad_settings():
  schedule = learning_rate_schedule(1.0, max_steps=10, warmup_ratio=0.25)  # ceil(2.5) = 3 steps
  np.testing.assert_allclose([float(schedule(t)) for t in range(4)], [0, 1 / 3, 2 / 3, 1.0],
                             rtol=1e-6)
  for kwargs, message in [
    (dict(lr_scheduler_type="cosine_with_restarts"), "lr_scheduler_type"),
    (dict(lr_scheduler_type="constant", warmup_steps=2), "constant_with_warmup"),
    (dict(warmup_steps=11), "exceeds max_steps"),
    (dict(warmup_ratio=1.5), "warmup_ratio"),
  ]:
    with pytest.raises(ValueError, match=message):
      learning_rate_schedule(1.0, max_steps=10, **kwargs)
  with pytest.raises(ValueError, match="max_steps"):
    learning_rate_schedule(1.0, max_steps=0)


def test_clipping_then_adamw_matches_a_hand_written_step():
  params = {"w": jnp.asarray([1.0, -2.0]), "b": jnp.asarray(0.5)}
  grads = {"w": jnp.asarray([3.0, 4.0]), "b": jnp.asarray(0.0)}  # global norm 5
  optimizer, schedule = make_optimizer(0.1, max_steps=10, lr_scheduler_type="constant",
                                       weight_decay=0.01, max_grad_norm=1.0)
  updates, _ = optimizer.update(grads, optimizer.init(params), params)
  np.testing.assert_allclose(global_norm(grads), 5.0)
  clipped = jax.tree.map(lambda g: g / 5.0, grads)
  # First Adam step: m̂ = g, v̂ = g², update = −lr (g/(|g| + ε) + wd·p).
  want = jax.tree.map(lambda g, p: -0.1 * (g / (jnp.abs(g) + 1e-8) + 0.01 * p), clipped, params)
  # rtol: Adam's bias correction 1 − 0.999 is 1.3e-5 off in fp32 (6e-6 after the square root).
  for got, expected in zip(jax.tree.leaves(updates), jax.tree.leaves(want)):
    np.testing.assert_allclose(got, expected, rtol=2e-5)
  unclipped, _ = make_optimizer(0.1, max_steps=10, lr_scheduler_type="constant", max_grad_norm=None)
  assert not any(isinstance(t, optax.ClipByGlobalNormState) for t in
                 jax.tree.leaves(unclipped.init(params), is_leaf=lambda x: isinstance(x, tuple)))
