"""Building blocks of the decoder: projections, normalisations and embeddings.

Every parameter carries logical axis names in its ``out_sharding`` metadata (``vocab``,
``embed``, ``mlp``, ``heads``, ``kv_heads``, ``head_dim``, ...). They are created with
``eager_sharding=False`` so a model can be built without a mesh; :mod:`alignax.sharding` maps the
names to mesh axes. A dimension made of indivisible units (the ``H·hd`` columns of a query
projection are ``H`` heads of ``hd``) also carries ``sharding_units`` so that no device ever holds
part of a head. The decoder stacks its blocks' parameters over a leading ``layers`` axis
(:func:`stack_modules`) and scans over it.
"""

from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

DType = Any
Initializer = Callable[..., Array]


def param(
  rngs: nnx.Rngs,
  init: Initializer,
  shape: tuple[int, ...],
  param_dtype: DType,
  axes: tuple[str | None, ...],
  units: tuple[int, ...] | None = None,
) -> nnx.Param:
  """A parameter initialised with ``init``, tagged with logical ``axes`` and ``units`` per dim."""
  if len(axes) != len(shape):
    raise ValueError(f"axes {axes} do not match the parameter shape {shape}")
  units = (1,) * len(shape) if units is None else tuple(units)
  return nnx.Param(
    init(rngs.params(), shape, param_dtype),
    out_sharding=tuple(axes),
    sharding_units=units,
    eager_sharding=False,
  )


LAYERS = "layers"


def stack_modules(modules: list[nnx.Module]) -> nnx.Module:
  """One module whose every variable is the stack of the ``modules``' over a new leading axis.

  The modules must share their structure (same graph, shapes and static attributes). The stacked
  variables' logical axes gain a leading ``"layers"`` name (never sharded) and unit 1.
  """
  graphdef, _ = nnx.split(modules[0])
  states = [nnx.state(m) for m in modules]

  def stack(*variables: nnx.Variable) -> nnx.Variable:
    meta = variables[0].get_metadata()
    axes = meta.get("out_sharding") or (None,) * variables[0].ndim
    units = meta.get("sharding_units") or (1,) * variables[0].ndim
    value = jnp.stack([v[...] for v in variables])
    return type(variables[0])(
      value, **{**meta, "out_sharding": (LAYERS, *axes), "sharding_units": (1, *units)}
    )

  stacked = jax.tree.map(stack, *states, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return nnx.merge(graphdef, stacked)


def is_stacked(path: tuple, x: object) -> bool:
  """NNX filter: a variable stacked over layers (first logical axis ``"layers"``)."""
  del path
  if not isinstance(x, nnx.Variable):
    return False
  axes = x.get_metadata().get("out_sharding") or ()
  return len(axes) > 0 and axes[0] == LAYERS


@jax.custom_vjp
def matmul(
  x: Float[Array, "*b d_in"], kernel: Float[Array, "d_in d_out"]
) -> Float[Array, "*b d_out"]:
  """``y = x W``, with the backward written out as ``dx = dy Wᵀ`` and ``dW = xᵀ dy``.

  Same values as ``jnp.dot`` and the same gradients up to summation order. The VJP is explicit
  because XLA:CPU, given autodiff's version inside the decoder's layer scan, fused the elementwise
  backward (SiLU, the gating product) with the read of the scan's saved activations and a transpose
  of the ``[tokens, features]`` cotangent into loops over a transposed layout that cost more than
  the matmuls: a 6-layer d=384 decoder's forward+backward took 7-8x its forward, 4.4x with the
  products kept apart (``benchmarks/decoder_backward.py``). Forward-mode autodiff (``jax.jvp``)
  through it is not defined (a ``custom_vjp``).

  Args:
    x: ``[*b, d_in]`` inputs.
    kernel: ``[d_in, d_out]``.

  Returns:
    ``[*b, d_out]``, in the inputs' dtype.
  """
  return jnp.dot(x, kernel)


def _matmul_fwd(x: Array, kernel: Array) -> tuple[Array, tuple[Array, Array]]:
  return jnp.dot(x, kernel), (x, kernel)


def _matmul_bwd(residuals: tuple[Array, Array], dy: Array) -> tuple[Array, Array]:
  x, kernel = residuals
  dx = jax.lax.dot_general(dy, kernel, (((dy.ndim - 1,), (1,)), ((), ())))
  dkernel = jax.lax.dot_general(  # contracts every leading (batch, time) axis at once
    x, dy, ((tuple(range(x.ndim - 1)), tuple(range(dy.ndim - 1))), ((), ()))
  )
  return dx.astype(x.dtype), dkernel.astype(kernel.dtype)


matmul.defvjp(_matmul_fwd, _matmul_bwd)


class Linear(nnx.Module):
  """Affine projection ``y = x W (+ b)`` with an optional low-rank adapter added on top.

  ``kernel`` is stored ``[in_features, out_features]`` (the transpose of a PyTorch ``nn.Linear``
  weight, the same layout as GPT-2's ``Conv1D``). The product is computed in ``dtype`` whatever the
  parameter dtype, so fp32 parameters can run in bf16. When ``lora`` is set (see
  :mod:`alignax.models.lora`) its output is added: ``y + lora(x)``.
  """

  def __init__(
    self,
    in_features: int,
    out_features: int,
    *,
    use_bias: bool,
    dtype: DType,
    param_dtype: DType,
    kernel_axes: tuple[str | None, str | None],
    rngs: nnx.Rngs,
    kernel_units: tuple[int, int] = (1, 1),
    kernel_init: Initializer = nnx.initializers.normal(0.02),
  ):
    self.in_features = in_features
    self.out_features = out_features
    self.dtype = dtype
    self.kernel = param(
      rngs, kernel_init, (in_features, out_features), param_dtype, kernel_axes, kernel_units
    )
    self.bias = (
      param(
        rngs, nnx.initializers.zeros, (out_features,), param_dtype, kernel_axes[1:],
        kernel_units[1:],
      )
      if use_bias
      else None
    )
    # Declared as data (not a static attribute) so an adapter assigned later is part of the graph.
    self.lora: nnx.Module | None = nnx.data(None)

  def __call__(self, x: Float[Array, "*b d_in"]) -> Float[Array, "*b d_out"]:
    y = matmul(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
    return self._finish(x, y)

  def effective_kernel(self) -> Float[Array, "*l d_in d_out"]:
    """``W + s · A B`` (fp32 sum, rounded to the parameter dtype) with an enabled adapter; else W."""
    kernel = self.kernel[...]
    lora = self.lora
    if lora is None or not getattr(lora, "enabled", True):
      return kernel
    return (kernel.astype(jnp.float32) + lora.delta_kernel()).astype(kernel.dtype)

  def _finish(self, x: Array, y: Array) -> Array:
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    if self.lora is not None:
      y = y + self.lora(x)
    return y


class RMSNorm(nnx.Module):
  """``y = x / sqrt(mean(x²) + eps) · (offset + w)``, Zhang & Sennrich (2019).

  Llama-style models use ``offset=0`` with ``w`` initialised to one; Gemma stores ``w`` around zero
  and scales by ``1 + w`` (``offset=1``). The statistics are computed in fp32 and the scale is
  applied before casting back, as Gemma does (Llama casts first; in fp32 the two agree exactly).
  """

  def __init__(
    self,
    features: int,
    *,
    eps: float,
    offset: float = 0.0,
    dtype: DType,
    param_dtype: DType,
    axis_name: str = "embed",
    rngs: nnx.Rngs,
  ):
    self.eps = eps
    self.offset = offset
    self.dtype = dtype
    init = nnx.initializers.zeros if offset else nnx.initializers.ones
    self.scale = param(rngs, init, (features,), param_dtype, (axis_name,))

  def __call__(self, x: Float[Array, "*b d"]) -> Float[Array, "*b d"]:
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (normed * (self.offset + self.scale[...].astype(jnp.float32))).astype(self.dtype)


class LayerNorm(nnx.Module):
  """``y = (x - mean(x)) / sqrt(var(x) + eps) · w + b``, Ba et al. (2016); statistics in fp32."""

  def __init__(
    self, features: int, *, eps: float, dtype: DType, param_dtype: DType, rngs: nnx.Rngs
  ):
    self.eps = eps
    self.dtype = dtype
    self.scale = param(rngs, nnx.initializers.ones, (features,), param_dtype, ("embed",))
    self.bias = param(rngs, nnx.initializers.zeros, (features,), param_dtype, ("embed",))

  def __call__(self, x: Float[Array, "*b d"]) -> Float[Array, "*b d"]:
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    normed = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    out = normed * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
    return out.astype(self.dtype)


class Embed(nnx.Module):
  """Token (or position) embedding table ``[num_embeddings, features]``; lookup by integer ids."""

  def __init__(
    self,
    num_embeddings: int,
    features: int,
    *,
    dtype: DType,
    param_dtype: DType,
    axes: tuple[str | None, str | None] = ("vocab", "embed"),
    rngs: nnx.Rngs,
  ):
    self.dtype = dtype
    self.embedding = param(
      rngs, nnx.initializers.normal(0.02), (num_embeddings, features), param_dtype, axes
    )

  def __call__(self, ids: Array) -> Array:
    return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)


def iter_linears(module: nnx.Module) -> Iterator[tuple[str, Linear]]:
  """Yields ``(dotted path, Linear)`` for every :class:`Linear` in ``module``, in graph order.

  A decoder's stacked projection is one ``Linear`` (``model.layers.attn.q_proj``, kernel
  ``[L, in, out]``) for all its layers.
  """
  for path, node in nnx.iter_graph(module):
    if isinstance(node, Linear):
      yield ".".join(str(p) for p in path), node
