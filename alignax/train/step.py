r"""The pure training step every trainer shares: ``step(state, batch) -> (state, metrics)``.

An algorithm supplies an :class:`Objective`: a loss of the trainable parameters on one micro-batch and
the micro-batch's *weight*, the count its loss is a mean over (completion tokens for a token-mean
loss, sequences or pairs for a per-example mean). With gradient accumulation over micro-batches
:math:`b_1..b_k` of weights :math:`w_i` the step minimises

.. math:: \mathcal{L} = \sum_i \frac{w_i}{\sum_j w_j}\,\mathcal{L}(b_i),

which is exactly the loss of the whole batch: a token-mean over micro-batches with different token
counts is the global token mean, not the mean of micro-batch means (the gradient-accumulation bug TRL
and verl both had, see ``/work/shared/reference/torch_peers.md`` §8.3). Gradients are summed in fp32
in a ``lax.scan``, clipped and applied once per step.

The step also returns ``grad_norm`` (before clipping), ``learning_rate`` and ``loss``, and the
objective's metrics averaged with the same weights: a metric that is a mean over the loss's unit
(a token-mean log-prob, a pair-mean accuracy) comes out as its mean over the whole batch. Counts
(``num_tokens``) are not means; the host loop takes them from the batch itself.
"""

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding

from alignax.train.optim import global_norm

Metrics = dict[str, jax.Array]


class Objective(NamedTuple):
  """What an algorithm contributes to the step.

  Attributes:
    loss: ``(params, frozen, micro_batch, key) -> (scalar loss, metrics)``; ``params`` is the
      trainable pytree (differentiated), ``frozen`` the rest of the model (e.g. the base weights
      under LoRA, passed as an argument so they are never baked into the program as constants);
      metrics are scalars.
    weight: ``micro_batch -> scalar``, the count the loss averages over (it depends on the batch
      only, so it is known before any forward pass).
    batch_axes: the axis that indexes rows, per batch key (default 0 for every key); preference
      batches are ``[2, B, T]`` (chosen, rejected) with their rows on axis 1.
    metric_weights: ``metric name -> (micro_batch -> scalar)`` for a metric that is a mean over
      another unit than the loss's (KTO's ``rewards/chosen`` over desirable rows, SFT's token
      means under a per-sequence loss): the step averages it over micro-batches with these
      counts, so it is the whole batch's mean. Other metrics use ``weight``.
    finalize_metrics: ``metrics -> metrics`` applied to the batch-averaged metrics, for a metric
      that is a function of others (KTO's ``rewards/margins`` = chosen − rejected), which an
      average of per-micro-batch values would get wrong.
  """

  loss: Callable[[Any, Any, Any, jax.Array], tuple[jax.Array, Metrics]]
  weight: Callable[[Any], jax.Array]
  batch_axes: Mapping[str, int] | None = None
  metric_weights: Mapping[str, Callable[[Any], jax.Array]] | None = None
  finalize_metrics: Callable[[Metrics], Metrics] | None = None


class TrainState(NamedTuple):
  """Trainable parameters, optimizer state, step count and RNG key (as key data), plus the frozen
  part of the model, which the step passes through unchanged."""

  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array
  frozen: Any = None


def init_state(params: Any, optimizer: optax.GradientTransformation, *, frozen: Any = None,
               seed: int = 0) -> TrainState:
  # Under jit the moments are created once, then laid out like the parameters they track.
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=_like_params(jax.jit(optimizer.init)(params), params),
                    rng=jax.random.key_data(jax.random.key(seed)), frozen=frozen)


def _like_params(opt_state: Any, params: Any) -> Any:
  """The optimizer's per-parameter moments placed as the parameters they track.

  ``optax``'s ``init`` makes them with ``zeros_like``, which under ``jit`` carries no sharding, so
  they come out replicated while the step's outputs follow the parameters: the second step would see
  new input shardings and compile the whole step again (and the moments would take a full copy of
  the model per device until then).
  """
  leaves = jax.tree.leaves(params)
  if not leaves or not all(isinstance(getattr(x, "sharding", None), NamedSharding) for x in leaves):
    return opt_state  # parameters not on a mesh: nothing to follow
  structure = jax.tree.structure(params)
  shardings = jax.tree.map(lambda x: x.sharding, params)

  def is_moments(node: Any) -> bool:
    return jax.tree.structure(node) == structure

  return jax.tree.map(lambda node: jax.device_put(node, shardings) if is_moments(node) else node,
                      opt_state, is_leaf=is_moments)


def split_micro_batches(batch: Mapping[str, Any], accumulation_steps: int, *,
                        batch_axes: Mapping[str, int] | None = None) -> dict[str, Any]:
  """Splits each array's row axis ``a`` into micro-batches, moved to the front:
  ``[..., B, ...] -> [k, ..., B/k, ...]`` (named error if B % k)."""
  batch_axes = batch_axes or {}

  def split(name, x):
    axis = batch_axes.get(name, 0)
    rows = x.shape[axis]
    if rows % accumulation_steps:
      raise ValueError(f"{name}: batch dimension {rows} (axis {axis}) is not divisible by "
                       f"gradient_accumulation_steps={accumulation_steps}")
    shape = (*x.shape[:axis], accumulation_steps, rows // accumulation_steps, *x.shape[axis + 1:])
    x = x.reshape(shape)
    if not axis:
      return x
    # Host batches stay NumPy (they are placed on the mesh afterwards), traced ones stay JAX.
    return (jnp if isinstance(x, jax.Array) else np).moveaxis(x, axis, 0)

  return {name: split(name, x) for name, x in batch.items()}


def make_train_step(objective: Objective, optimizer: optax.GradientTransformation, *,
                    schedule: optax.Schedule | None = None
                    ) -> Callable[[TrainState, Any], tuple[TrainState, Metrics]]:
  """Builds ``step(state, batch)`` for a batch laid out ``[k micro-batches, micro-batch, ...]``.

  Args:
    objective: the algorithm's loss and micro-batch weight.
    optimizer: e.g. from ``alignax.train.optim.make_optimizer``.
    schedule: the learning-rate schedule, to log ``learning_rate``.

  Returns:
    A pure function to ``jax.jit`` (with the state donated).
  """
  grad_fn = jax.value_and_grad(objective.loss, has_aux=True)

  def step(state: TrainState, batch: Any) -> tuple[TrainState, Metrics]:
    weights = jax.vmap(objective.weight)(batch).astype(jnp.float32)
    total = jnp.sum(weights)
    # An empty batch (no loss token at all) takes no step rather than dividing 0 by 0.
    shares = weights / jnp.where(total > 0, total, 1.0)
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    keys = jax.random.split(key, weights.shape[0])

    def micro(grads, xs):
      micro_batch, share, micro_key = xs
      (loss, metrics), g = grad_fn(state.params, state.frozen, micro_batch, micro_key)
      grads = jax.tree.map(lambda acc, gi: acc + share * gi.astype(jnp.float32), grads, g)
      return grads, (loss, metrics)

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
    grads, (losses, metrics) = jax.lax.scan(micro, zeros, (batch, shares, keys))
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    out = _average_metrics(objective, batch, shares, metrics)
    out["loss"] = jnp.sum(shares * losses)
    out["grad_norm"] = global_norm(grads)
    if schedule is not None:
      out["learning_rate"] = schedule(state.step)
    new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=state.rng,
                           frozen=state.frozen)
    return new_state, out

  return step


def _average_metrics(objective: Objective, batch: Any, shares: jax.Array,
                     metrics: Metrics) -> Metrics:
  """Per-micro-batch metrics ``[k]`` -> the batch's: weighted by the loss's shares, or by the
  objective's own count for the metrics it names."""
  own = objective.metric_weights or {}
  out = {}
  for name, value in metrics.items():
    if name in own:
      counts = jax.vmap(own[name])(batch).astype(jnp.float32)
      total = jnp.sum(counts)
      out[name] = jnp.sum(counts * value) / jnp.where(total > 0, total, 1.0)
    else:
      out[name] = jnp.sum(shares * value)
  return objective.finalize_metrics(out) if objective.finalize_metrics is not None else out


def make_eval_step(objective: Objective
                   ) -> Callable[[Any, Any, Any], tuple[jax.Array, Metrics, jax.Array]]:
  """Builds ``eval_step(params, frozen, batch) -> (loss, metrics, weight)`` for one batch (no
  gradient, no state change).

  Averaging ``loss`` and ``metrics`` over batches with ``weight`` (the objective's count: loss
  tokens, pairs) gives their value on the whole evaluation set, as accumulation does in training.
  The objectives draw no randomness, so a fixed key stands in for the step's.
  """

  def eval_step(params: Any, frozen: Any, batch: Any) -> tuple[jax.Array, Metrics, jax.Array]:
    loss, metrics = objective.loss(params, frozen, batch, jax.random.key(0))
    return loss, metrics, objective.weight(batch).astype(jnp.float32)

  return eval_step


class NonFiniteError(FloatingPointError):
  """A loss or gradient became NaN/Inf; the run stops and its last good checkpoint stays."""


def check_finite(step: int, metrics: dict[str, float]) -> None:
  """Raises ``NonFiniteError`` naming the step and the first non-finite metric."""
  for name, value in metrics.items():
    if not jnp.isfinite(value):
      raise NonFiniteError(f"step {step}: {name} = {value}; stopping (the last checkpoint before "
                           "this step is intact)")
