"""One mesh policy for the whole library: the mesh, the logical-axis rules, activation constraints.

* **One mesh helper.** :func:`make_mesh` builds a ``(data, fsdp, tensor)`` mesh with
  ``AxisType.Auto`` axes (as tunix and MaxText do): the compiler propagates shardings from the
  parameters and from the constraints below. Make it current with ``jax.set_mesh(mesh)`` (not the
  deprecated ``with mesh:``) or hand it to the models (``from_pretrained(mesh=...)``,
  ``shard_model``), which then constrain their activations on it without a context mesh. Meshes with
  ``Explicit`` axes (``jax.make_mesh``'s default) are refused by name: arrays of two meshes that
  differ only in axis types do not combine outside ``jit``.
* **One rules table.** Every array dimension carries a logical name; :data:`DEFAULT_RULES` maps it
  to mesh axes. Parameters and activations use distinct names: a parameter's ``embed`` dimension is
  split over ``fsdp`` (ZeRO-3: each device stores ``1/fsdp`` of every weight and the compiler
  all-gathers it per layer), while activations split their *batch* over ``(data, fsdp)`` and keep
  ``activation_embed`` whole, so FSDP is data parallelism with sharded weights (gradients come back
  reduce-scattered). Heads, MLP and vocabulary are split over ``tensor`` in both (Megatron-style).
* **Whole units only.** A dimension is split only when its number of *units* divides the mesh
  axes: a ``[d, K·hd]`` key projection carries ``sharding_unit=hd`` and is replicated when ``K`` KV
  heads do not divide ``tensor``, so no head is ever cut across devices. An absent, size-1 or
  already-used mesh axis, or one that does not divide, leaves the dimension replicated, so any mesh
  works with any checkpoint.

Pure JAX (no flax import): the losses, kernels, models and trainers all use this module.
"""

from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding, PartitionSpec

MeshAxes = str | tuple[str, ...] | None
Rules = Sequence[tuple[str, MeshAxes]]
MESH_AXES = ("data", "fsdp", "tensor")

# The first rule of a name wins.
DEFAULT_RULES: tuple[tuple[str, MeshAxes], ...] = (
  # Activations: data parallel over (data, fsdp); heads / MLP / vocab over tensor.
  ("activation_batch", ("data", "fsdp")),
  ("activation_length", None),  # an optional sequence-parallel axis maps here
  ("activation_embed", None),
  ("activation_heads", "tensor"),
  ("activation_kv_heads", "tensor"),
  ("activation_mlp", "tensor"),
  ("activation_vocab", "tensor"),
  ("activation_head_dim", None),
  # Inputs ([batch, ...] token arrays): as activation_batch.
  ("batch", ("data", "fsdp")),
  # Parameters: ZeRO-3 over the model dimension, Megatron tensor parallelism over the rest.
  ("layers", None),  # the stacked (scanned) layer axis
  ("vocab", "tensor"),
  ("embed", "fsdp"),
  ("mlp", "tensor"),
  ("heads", "tensor"),
  ("kv_heads", "tensor"),
  ("head_dim", None),
)

EXPLICIT_MESH_MESSAGE = (
  "{what} has Explicit axes {axes}; alignax uses one mesh with Auto axes for every array (models, "
  "kernels, trainers), so that their outputs combine outside jit. Build it with "
  "alignax.sharding.make_mesh(data=..., fsdp=..., tensor=...) (or jax.make_mesh(..., "
  "axis_types=(jax.sharding.AxisType.Auto,) * n))"
)


def make_mesh(
  *, data: int = 1, fsdp: int = -1, tensor: int = 1, devices: Sequence[jax.Device] | None = None
) -> Mesh:
  """A ``(data, fsdp, tensor)`` mesh with ``Auto`` axes over ``devices`` (default: all).

  Args:
    data: pure data-parallel replicas (parameters replicated across them).
    fsdp: devices that split the batch *and* every parameter's ``embed`` dimension (ZeRO-3).
    tensor: devices that split heads, MLP and vocabulary (Megatron tensor parallelism).
    devices: the devices, in mesh order. One of the sizes may be ``-1``: the remaining devices.

  Returns:
    The mesh; use it with ``jax.set_mesh(mesh)`` or pass it to the models.

  Raises:
    ValueError: a size below 1 (other than one ``-1``), or sizes whose product is not the number of
      devices (the message gives both).
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
  free = [name for name, size in sizes.items() if size == -1]
  if len(free) > 1:
    raise ValueError(f"make_mesh: only one axis size may be -1, got {free} ({sizes})")
  for name, size in sizes.items():
    if size != -1 and (not isinstance(size, (int, np.integer)) or size < 1):
      raise ValueError(f"make_mesh: {name}={size!r} must be a positive int or -1")
  fixed = int(np.prod([s for s in sizes.values() if s != -1]))
  if free:
    if len(devices) % fixed:
      raise ValueError(
        f"make_mesh: {len(devices)} devices are not divisible by the fixed axes {sizes} "
        f"(product {fixed}) to fill {free[0]}=-1"
      )
    sizes[free[0]] = len(devices) // fixed
  if int(np.prod(list(sizes.values()))) != len(devices):
    raise ValueError(
      f"make_mesh: data*fsdp*tensor = {sizes['data']}*{sizes['fsdp']}*{sizes['tensor']} = "
      f"{int(np.prod(list(sizes.values())))}, but there are {len(devices)} devices"
    )
  shape = tuple(sizes[a] for a in MESH_AXES)
  return jax.make_mesh(
    shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices
  )


def check_auto(mesh: Mesh | AbstractMesh, what: str = "mesh") -> None:
  """Raises ``ValueError`` (pointing to :func:`make_mesh`) when ``mesh`` has an Explicit axis."""
  explicit = [a for a, t in zip(mesh.axis_names, mesh.axis_types) if t == AxisType.Explicit]
  if explicit:
    raise ValueError(EXPLICIT_MESH_MESSAGE.format(what=what, axes=explicit))


def _rule_table(rules: Rules) -> Mapping[str, MeshAxes]:
  table: dict[str, MeshAxes] = {}
  for name, target in rules:
    table.setdefault(name, target)
  return table


def logical_to_mesh(
  axes: Sequence[str | None],
  shape: Sequence[int],
  mesh: Mesh | AbstractMesh,
  rules: Rules = DEFAULT_RULES,
  *,
  units: Sequence[int] | None = None,
) -> PartitionSpec:
  """The :class:`PartitionSpec` of an array with logical ``axes`` and ``shape`` on ``mesh``.

  A dimension of size ``n`` with unit ``u`` is split over mesh axes of total size ``m`` only when
  ``m`` divides ``n / u`` (whole units per device: a ``[d, K·hd]`` projection with unit ``hd``
  splits only when ``m`` divides ``K``).

  Args:
    axes: one logical name (or None) per dimension.
    shape: the array shape.
    mesh: the device mesh (concrete or abstract).
    rules: ``(logical name, mesh axis | tuple of mesh axes | None)`` pairs; the first match wins.
    units: per dimension, the size of one indivisible unit (default 1).

  Returns:
    The partition spec.
  """
  if len(axes) != len(shape):
    raise ValueError(f"axes {tuple(axes)} do not match shape {tuple(shape)}")
  units = (1,) * len(shape) if units is None else tuple(units)
  if len(units) != len(shape):
    raise ValueError(f"units {units} do not match shape {tuple(shape)}")
  table = _rule_table(rules)
  used: set[str] = set()
  spec: list[MeshAxes] = []
  for name, size, unit in zip(axes, shape, units):
    target = table.get(name) if name is not None else None
    targets = (target,) if isinstance(target, str) else tuple(target or ())
    count = size // unit if unit and size % unit == 0 else size
    kept: list[str] = []
    for axis in targets:
      if axis not in mesh.shape or axis in used or mesh.shape[axis] == 1:
        continue
      if count % (mesh.shape[axis] * int(np.prod([mesh.shape[a] for a in kept]))):
        continue
      kept.append(axis)
    used.update(kept)
    spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  return PartitionSpec(*spec)


def batch_sharding(
  mesh: Mesh, ndim: int = 2, rules: Rules = DEFAULT_RULES, *, batch_size: int | None = None
) -> NamedSharding:
  """Sharding of a ``[batch, ...]`` input: the batch dimension over the ``batch`` rule's axes.

  With ``batch_size`` the axes that do not divide it are dropped (as for parameters).
  """
  check_auto(mesh)
  table = _rule_table(rules)
  targets = table.get("batch")
  targets = (targets,) if isinstance(targets, str) else tuple(targets or ())
  kept: list[str] = []
  for axis in targets:
    if axis not in mesh.shape or mesh.shape[axis] == 1:
      continue
    if batch_size is not None and batch_size % (
      mesh.shape[axis] * int(np.prod([mesh.shape[a] for a in kept]))
    ):
      continue
    kept.append(axis)
  first = None if not kept else kept[0] if len(kept) == 1 else tuple(kept)
  return NamedSharding(mesh, PartitionSpec(first, *([None] * (ndim - 1))))


def current_mesh(mesh: Mesh | AbstractMesh | None = None) -> Mesh | AbstractMesh | None:
  """``mesh`` if given, else the context mesh of ``jax.set_mesh`` (None when there is none)."""
  if mesh is not None:
    return mesh
  context = jax.sharding.get_abstract_mesh()
  if context is None or context.empty:
    return None
  return context


def constrain(
  x: jax.Array,
  logical_axes: Sequence[str | None],
  mesh: Mesh | AbstractMesh | None = None,
  rules: Rules = DEFAULT_RULES,
  *,
  units: Sequence[int] | None = None,
) -> jax.Array:
  """``with_sharding_constraint(x, rule spec of logical_axes)``; a no-op without a mesh.

  The mesh is ``mesh`` when given, else the context mesh of ``jax.set_mesh``; with neither (a
  single-device run) ``x`` comes back unchanged.

  Args:
    x: the array (usually an activation inside ``jit``).
    logical_axes: one logical name (or None) per dimension, e.g.
      ``("activation_batch", "activation_length", "activation_embed")``.
    mesh: the mesh (a model stores the one it was placed on).
    rules: the rules table.
    units: per dimension, the size of one indivisible unit (see :func:`logical_to_mesh`).

  Raises:
    ValueError: the mesh has Explicit axes.
  """
  mesh = current_mesh(mesh)
  if mesh is None:
    return x
  check_auto(mesh)
  spec = logical_to_mesh(logical_axes, x.shape, mesh, rules, units=units)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))

