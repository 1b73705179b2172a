"""Logical axis names → mesh axes, and helpers that place a model's parameters on a mesh.

Parameters carry logical names in their ``out_sharding`` metadata (see
:mod:`alignax.models.layers`). One rules table maps each name to a mesh axis (``data``, ``fsdp``,
``tensor``) or to None (replicated).
A mesh axis that the mesh lacks, that is already used by another dimension of the same parameter, or
whose size does not divide the dimension (odd vocabularies such as 97) leaves that dimension
replicated, so any mesh works with any checkpoint.

The decoder relies on the compiler's sharding propagation (``AxisType.Auto``). ``jax.make_mesh``
defaults to ``Explicit`` axes, under which every contraction of two sharded dimensions must name its
output sharding; parameters are therefore placed on the ``Auto`` twin of the mesh given (same
devices and axis names).
"""

from collections.abc import Mapping, Sequence
from typing import Any

import jax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MeshAxes = str | tuple[str, ...] | None
Rules = Sequence[tuple[str, MeshAxes]]

# Megatron-style tensor parallelism over heads / MLP / vocab, ZeRO-3-style FSDP over the model dim.
DEFAULT_RULES: tuple[tuple[str, MeshAxes], ...] = (
  ("batch", ("data", "fsdp")),
  ("vocab", "tensor"),
  ("embed", "fsdp"),
  ("mlp", "tensor"),
  ("heads", "tensor"),
  ("kv_heads", "tensor"),
  ("head_dim", None),
)


def logical_to_mesh(
  axes: Sequence[str | None],
  shape: Sequence[int],
  mesh: Mesh,
  rules: Rules = DEFAULT_RULES,
) -> PartitionSpec:
  """The :class:`PartitionSpec` of an array with logical ``axes`` and ``shape`` on ``mesh``.

  Args:
    axes: one logical name (or None) per dimension.
    shape: the array shape (a mesh axis that does not divide its dimension is dropped).
    mesh: the device mesh.
    rules: ``(logical name, mesh axis | tuple of mesh axes | None)`` pairs; the first match wins.

  Returns:
    The partition spec.
  """
  if len(axes) != len(shape):
    raise ValueError(f"axes {tuple(axes)} do not match shape {tuple(shape)}")
  table: Mapping[str, MeshAxes] = {}
  for name, target in rules:
    table.setdefault(name, target)
  used: set[str] = set()
  spec: list[MeshAxes] = []
  for name, size in zip(axes, shape):
    target = table.get(name) if name is not None else None
    targets = (target,) if isinstance(target, str) else tuple(target or ())
    kept = []
    for axis in targets:
      if axis not in mesh.shape or axis in used or mesh.shape[axis] == 1:
        continue
      if size % (mesh.shape[axis] * _product(mesh.shape[a] for a in kept)):
        continue
      kept.append(axis)
    used.update(kept)
    spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  return PartitionSpec(*spec)


def _product(values) -> int:
  out = 1
  for v in values:
    out *= v
  return out


def auto_axes(mesh: Mesh) -> Mesh:
  """``mesh`` with every axis of type ``AxisType.Auto`` (itself when it already is)."""
  if all(t == AxisType.Auto for t in mesh.axis_types):
    return mesh
  return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))


def state_shardings(state: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
  """A :class:`NamedSharding` for every variable of an ``nnx.State`` (abstract or concrete).

  Returns:
    An ``nnx.State`` of the same structure whose variables hold :class:`NamedSharding`s.
  """

  mesh = auto_axes(mesh)

  def one(variable: nnx.Variable) -> nnx.Variable:
    axes = variable.get_metadata().get("out_sharding") or (None,) * len(variable.shape)
    return variable.replace(NamedSharding(mesh, logical_to_mesh(axes, variable.shape, mesh, rules)))

  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_model(model: nnx.Module, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> nnx.Module:
  """Moves every parameter of ``model`` onto ``mesh`` per ``rules``, in place; returns ``model``."""
  state = nnx.state(model)
  shardings = state_shardings(state, mesh, rules)
  nnx.update(model, jax.tree.map(lambda x, s: jax.device_put(x, s), state, shardings))
  return model


def batch_sharding(mesh: Mesh, ndim: int = 2, rules: Rules = DEFAULT_RULES) -> NamedSharding:
  """Sharding of a ``[batch, ...]`` input: the batch dimension over the ``batch`` rule's axes."""
  targets = next((target for name, target in rules if name == "batch"), None)  # first match wins
  targets = (targets,) if isinstance(targets, str) else tuple(targets or ())
  kept = tuple(a for a in targets if a in mesh.shape)
  first = None if not kept else kept[0] if len(kept) == 1 else kept
  return NamedSharding(auto_axes(mesh), PartitionSpec(first, *([None] * (ndim - 1))))
