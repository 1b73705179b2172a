"""Placing a model's parameters on a mesh by their logical axis names.

The mesh policy itself (the ``(data, fsdp, tensor)`` mesh with Auto axes, the rules table,
activation constraints) lives in :mod:`alignax.sharding`, which the whole library uses; the names
are re-exported here. Parameters carry logical names and unit sizes in their metadata
(``out_sharding``, ``sharding_units``; see :mod:`alignax.models.layers`), so a ``[d, K·hd]`` key
projection is split over ``tensor`` only when the ``K`` heads divide it.

A model placed on a mesh remembers it (``model.model.mesh``, static) and constrains its activations
there without a context mesh. Meshes with Explicit axes are refused by name: the models do not
convert them to a private Auto twin, so arrays from models, kernels and trainers share one mesh.
"""

from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from alignax.sharding import DEFAULT_RULES as DEFAULT_RULES
from alignax.sharding import MeshAxes as MeshAxes
from alignax.sharding import Rules as Rules
from alignax.sharding import batch_sharding as batch_sharding
from alignax.sharding import check_auto
from alignax.sharding import logical_to_mesh as logical_to_mesh
from alignax.sharding import make_mesh as make_mesh


def variable_spec(variable: nnx.Variable, mesh: Mesh, rules: Rules = DEFAULT_RULES):
  """The :class:`PartitionSpec` of one variable from its logical axes and unit sizes."""
  meta = variable.get_metadata()
  axes = meta.get("out_sharding") or (None,) * len(variable.shape)
  units = meta.get("sharding_units") or (1,) * len(variable.shape)
  return logical_to_mesh(axes, variable.shape, mesh, rules, units=units)


def state_shardings(state: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
  """A :class:`NamedSharding` for every variable of an ``nnx.State`` (abstract or concrete).

  Returns:
    An ``nnx.State`` of the same structure whose variables hold :class:`NamedSharding`s.

  Raises:
    ValueError: ``mesh`` has Explicit axes (build it with :func:`alignax.sharding.make_mesh`).
  """
  check_auto(mesh)

  def one(variable: nnx.Variable) -> nnx.Variable:
    return variable.replace(NamedSharding(mesh, variable_spec(variable, mesh, rules)))

  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def set_mesh(model: nnx.Module, mesh: Mesh | None, rules: Rules = DEFAULT_RULES) -> None:
  """Records ``mesh`` and ``rules`` on every module of ``model`` that constrains activations
  (``.mesh``, ``.rules``): its activations and KV cache then follow the rules its parameters did."""
  from alignax.models.decoder import Transformer

  rules = tuple((name, tuple(t) if isinstance(t, list) else t) for name, t in rules)
  for _, node in nnx.iter_graph(model):
    if isinstance(node, Transformer):
      node.mesh = mesh
      node.rules = rules


def shard_model(model: nnx.Module, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> nnx.Module:
  """Moves every parameter of ``model`` onto ``mesh`` per ``rules``, in place; returns ``model``.

  The model then constrains its activations on ``mesh`` by the same ``rules`` (by default batch
  over ``(data, fsdp)``), so a jitted step needs no ``jax.set_mesh`` context.

  Raises:
    ValueError: ``mesh`` has Explicit axes.
  """
  state = nnx.state(model)
  shardings = state_shardings(state, mesh, rules)
  nnx.update(model, jax.tree.map(lambda x, s: jax.device_put(x, s), state, shardings))
  set_mesh(model, mesh, rules)
  return model
