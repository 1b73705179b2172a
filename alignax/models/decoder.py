"""One NNX decoder for the Llama, Mistral, Qwen2/3, Gemma/Gemma 2 and GPT-2 families.

The architecture comes from a :class:`~alignax.models.config.DecoderConfig`; family differences are
options of one implementation (norm kind and offset, gated MLP, fused QKV, q/k norm, RoPE or learned
positions, soft-capping, sliding windows, sandwich norms, embedding scale).

Conventions:

* ``attention_mask`` is ``[B, T]`` booleans or 0/1 integers (True / 1 = real token); padding may be
  left or right.
* Default ``positions`` are ``cumsum(mask) - 1`` clipped at 0 (so a left-padded row starts at
  position 0 on its first real token; pads get position 0), restarted at every segment boundary when
  ``segment_ids`` is given. ``transformers`` only matches this when it is given the same
  ``position_ids`` (its own default is ``arange(T)`` whatever the padding).
* Sliding windows act on sequence (cache slot) indices like ``transformers``: query ``i`` sees keys
  ``j`` with ``i - W < j <= i``.
* Attention is memory-efficient: causality, windows, padding, packing (segment ids) and the cache's
  filled slots are computed from indices inside the attention kernel; no ``[B, T, S]`` mask or score
  tensor is built by the decoder.
* Layers are scanned: every block parameter is stacked over a leading ``layers`` axis and the
  blocks run under one ``lax.scan`` (one compiled block body, the remat policy applied per layer).
  Layers whose static options differ repeat with a period ``p`` (Gemma 2 alternates sliding and
  global windows, ``p = 2``): the scan then runs ``L / p`` steps of ``p`` blocks with static
  windows. A pattern without a shorter period (a Qwen2 ``max_window_layers`` split) scans with the
  per-layer window as data. The KV cache is stacked the same way, ``[L, B, S, K, hd]``.
* The LM head accumulates in fp32 (``preferred_element_type``) from compute-dtype inputs, exactly as
  the fused log-prob kernel does with :meth:`CausalLM.get_lm_head`, so the two agree.
* Activations carry sharding constraints (:func:`alignax.sharding.constrain`): batch over
  ``(data, fsdp)``, heads / MLP / vocabulary over ``tensor``, on the mesh the model was placed on or
  the context mesh of ``jax.set_mesh``.
"""

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from jaxtyping import Array, Bool, Float, Int, Shaped

from alignax import _validate
from alignax.kernels import LMHead
from alignax.kernels.attention import IMPLEMENTATIONS as ATTENTION_IMPLEMENTATIONS
from alignax.kernels.attention import attention
from alignax.models.config import DecoderConfig
from alignax.models.hub import parse_dtype
from alignax.models.layers import (
  LAYERS,
  DType,
  Embed,
  LayerNorm,
  Linear,
  RMSNorm,
  is_stacked,
  stack_modules,
)
from alignax.sharding import DEFAULT_RULES, Rules, constrain, logical_to_mesh


IntLike = np.ndarray | Array

REMAT_POLICIES: dict[str, Callable[..., bool] | None] = {
  "full": None,  # save nothing: recompute the whole block in the backward pass
  "dots": jax.checkpoint_policies.checkpoint_dots,
  "dots_with_no_batch_dims": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

# "No window" as data (a per-layer window scanned as an int): larger than any sequence.
NO_WINDOW = 2**30

BTD = ("activation_batch", "activation_length", "activation_embed")
BTHD = ("activation_batch", "activation_length", "activation_heads", "activation_head_dim")
BTKD = ("activation_batch", "activation_length", "activation_kv_heads", "activation_head_dim")
BTF = ("activation_batch", "activation_length", "activation_mlp")
BTV = ("activation_batch", "activation_length", "activation_vocab")


class KVCache(NamedTuple):
  """Static-shape key/value cache, stacked over layers.

  Attributes:
    keys, values: ``[L, B, S, K, hd]`` (``S`` = ``max_len`` slots).
    valid: ``[B, S]`` True where a slot holds a real (non-pad) token.
    index: scalar int32, the next slot to write; every row writes the same slots (left padding).
  """

  keys: Float[Array, "L B S K hd"]
  values: Float[Array, "L B S K hd"]
  valid: Bool[Array, "B S"]
  index: Int[Array, ""]


class DecoderOutput(NamedTuple):
  """Decoder outputs.

  Attributes:
    logits: ``[B, T, V]`` fp32, None when ``compute_logits=False``.
    hidden_states: ``[B, T, d]`` after the final norm (the LM head's input).
    cache: the updated :class:`KVCache`, None without one.
  """

  logits: Float[Array, "B T V"] | None
  hidden_states: Float[Array, "B T d"]
  cache: KVCache | None


class AttentionInputs(NamedTuple):
  """What every layer's attention needs besides q, k, v (computed once per call).

  Attributes:
    rotary: ``(cos, sin)`` ``[B, T, hd]`` or None (learned positions).
    q_index: ``[T]`` slot index of each query (``arange(T)``, offset by the cache index).
    kv_valid: ``[B, S]`` real token / filled slot.
    segment_ids: ``[B, T]`` packed-sequence ids (queries and keys alike) or None.
    kv_len: scalar, slots at or past it are empty (cache only) or None.
  """

  rotary: tuple[Array, Array] | None
  q_index: Int[Array, " T"]
  kv_valid: Bool[Array, "B S"]
  segment_ids: Int[Array, "B T"] | None
  kv_len: Int[Array, ""] | None


def default_positions(
  attention_mask: Bool[Array, "B T"],
  segment_ids: Int[Array, "B T"] | None = None,
  offset: Int[Array, " B"] | int = 0,
) -> Int[Array, "B T"]:
  """``positions = offset + cumsum(mask) - 1`` (clipped at 0), restarted at segment boundaries.

  Args:
    attention_mask: ``[B, T]`` True for real tokens.
    segment_ids: optional ``[B, T]`` packed-sequence ids; a position restarts at 0 where it changes.
    offset: ``[B]`` or scalar number of real tokens already in a cache.

  Returns:
    ``[B, T]`` int32 positions.
  """
  mask = attention_mask.astype(jnp.int32)
  counts = jnp.cumsum(mask, axis=1)
  if segment_ids is not None:
    starts = jnp.concatenate(
      [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1
    )
    # Real tokens before the latest segment start; counts never decrease, so cummax carries it.
    counts = counts - jax.lax.cummax(jnp.where(starts, counts - mask, 0), axis=1)
  positions = counts - 1 + jnp.asarray(offset, jnp.int32)[..., None]
  return jnp.maximum(positions, 0).astype(jnp.int32)


def rope_inverse_frequencies(config: DecoderConfig) -> np.ndarray:
  """``θ_i = base^(-2i/hd)`` (Su et al., 2021), rescaled by the config's ``rope_type``.

  ``linear`` divides every frequency by ``factor``; ``llama3`` (Llama 3.1) divides the low
  frequencies (wavelength above ``original_max / low_freq_factor``) by ``factor``, keeps the high
  ones and interpolates smoothly in between.
  """
  dim = config.head_dim
  inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
  inv_freq = inv_freq.astype(np.float32)
  if config.rope_type == "linear":
    inv_freq = inv_freq / config.rope_factor
  elif config.rope_type == "llama3":
    factor = config.rope_factor
    low, high = config.rope_low_freq_factor, config.rope_high_freq_factor
    old_len = config.rope_original_max_positions
    wavelen = 2 * np.pi / inv_freq
    scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    inv_freq = np.where(medium, smoothed, scaled)
  return inv_freq.astype(np.float32)


def rotary_tables(
  positions: Int[Array, "B T"], inv_freq: np.ndarray, dtype: DType
) -> tuple[Float[Array, "B T hd"], Float[Array, "B T hd"]]:
  """``cos``/``sin`` of ``position · θ`` in fp32, duplicated over both halves of the head."""
  angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
  angles = jnp.concatenate([angles, angles], axis=-1)
  return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def apply_rotary(
  x: Float[Array, "B T N hd"], cos: Float[Array, "B T hd"], sin: Float[Array, "B T hd"]
) -> Float[Array, "B T N hd"]:
  """``x · cos + rotate_half(x) · sin``, ``rotate_half([a, b]) = [-b, a]`` (half-split layout)."""
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


def attend(
  q: Float[Array, "B T H hd"],
  k: Float[Array, "B S K hd"],
  v: Float[Array, "B S K hd"],
  inputs: AttentionInputs,
  *,
  scale: float,
  window: int | Array | None,
  softcap: float | None,
  impl: str = "auto",
) -> Float[Array, "B T H hd"]:
  """One layer's attention through :func:`alignax.kernels.attention.attention` (indices, validity,
  segment ids and the cache's fill level; never a dense mask)."""
  return attention(
    q, k, v, scale=scale, q_index=inputs.q_index, kv_valid=inputs.kv_valid,
    q_segment_ids=inputs.segment_ids, kv_segment_ids=inputs.segment_ids, causal=True,
    window=window, softcap=softcap, kv_len=inputs.kv_len, impl=impl,
  )


def _activation(name: str) -> Callable[[Array], Array]:
  if name in ("gelu_new", "gelu_pytorch_tanh"):
    return functools.partial(jax.nn.gelu, approximate=True)
  if name == "gelu":
    return functools.partial(jax.nn.gelu, approximate=False)
  if name == "relu":
    return jax.nn.relu
  return jax.nn.silu  # "silu" / "swish"


def _norm(
  config: DecoderConfig, features: int, *, axis_name: str = "embed", **kw: Any
) -> nnx.Module:
  if config.norm == "layer":
    return LayerNorm(features, eps=config.norm_eps, **kw)
  return RMSNorm(
    features, eps=config.norm_eps, offset=config.norm_offset, axis_name=axis_name, **kw
  )


def uniform_attention_scale(config: DecoderConfig) -> float | None:
  """The attention scale when every layer shares it, else None (GPT-2's inverse-layer option)."""
  scales = {config.layer_attention_scale(i) for i in range(config.num_layers)}
  return scales.pop() if len(scales) == 1 else None


def window_period(windows: tuple[int | None, ...]) -> int | None:
  """Smallest ``p < L`` with ``windows[i] = windows[i mod p]`` and ``p | L`` (1 when uniform).

  None when the pattern does not repeat (the scan then takes the window as data).
  """
  num_layers = len(windows)
  if len(set(windows)) <= 1:
    return 1
  for p in range(2, num_layers):
    if num_layers % p == 0 and all(windows[i] == windows[i % p] for i in range(num_layers)):
      return p
  return None


class Attention(nnx.Module):
  """Multi-head attention with grouped KV heads, optional fused QKV, q/k norm, RoPE and cache."""

  def __init__(
    self, config: DecoderConfig, *, dtype: DType, param_dtype: DType, rngs: nnx.Rngs
  ):
    c = config
    self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
    self.scale = uniform_attention_scale(c)
    self.softcap = c.attn_softcap
    self.fused_qkv = c.fused_qkv
    linear = functools.partial(Linear, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    q_size, kv_size = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    units = (1, c.head_dim)  # a head is never split across devices
    if c.fused_qkv:
      self.qkv_proj = linear(
        c.hidden_size, q_size + 2 * kv_size, use_bias=c.qkv_bias, kernel_axes=("embed", "heads"),
        kernel_units=units,
      )
    else:
      self.q_proj = linear(
        c.hidden_size, q_size, use_bias=c.qkv_bias, kernel_axes=("embed", "heads"),
        kernel_units=units,
      )
      self.k_proj = linear(
        c.hidden_size, kv_size, use_bias=c.qkv_bias, kernel_axes=("embed", "kv_heads"),
        kernel_units=units,
      )
      self.v_proj = linear(
        c.hidden_size, kv_size, use_bias=c.qkv_bias, kernel_axes=("embed", "kv_heads"),
        kernel_units=units,
      )
    self.o_proj = linear(
      q_size, c.hidden_size, use_bias=c.out_bias, kernel_axes=("heads", "embed"),
      kernel_units=(c.head_dim, 1),
    )
    if c.qk_norm:
      norm_kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs, axis_name="head_dim")
      self.q_norm = _norm(c, c.head_dim, **norm_kw)
      self.k_norm = _norm(c, c.head_dim, **norm_kw)
    else:
      self.q_norm = self.k_norm = None

  def __call__(
    self,
    x: Float[Array, "B T d"],
    inputs: AttentionInputs,
    kv: tuple[Array, Array, Array] | None = None,
    index: Int[Array, ""] | None = None,
    *,
    window: int | Array | None,
    scale: Array | None = None,
    mesh: Mesh | None = None,
    rules: Rules = DEFAULT_RULES,
    impl: str = "auto",
  ) -> tuple[Float[Array, "B T d"], tuple[Array, Array] | None]:
    b, t, _ = x.shape
    q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
    if self.fused_qkv:
      q, k, v = jnp.split(self.qkv_proj(x), [q_size, q_size + kv_size], axis=-1)
    else:
      q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
    q = constrain(q.reshape(b, t, self.num_heads, self.head_dim), BTHD, mesh, rules)
    k = constrain(k.reshape(b, t, self.num_kv_heads, self.head_dim), BTKD, mesh, rules)
    v = constrain(v.reshape(b, t, self.num_kv_heads, self.head_dim), BTKD, mesh, rules)
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    if inputs.rotary is not None:
      q, k = apply_rotary(q, *inputs.rotary), apply_rotary(k, *inputs.rotary)
    new_kv = None
    if kv is not None:
      # kv = (keys [L, B, S, K, hd], values, this layer's index). The new tokens are written into
      # the stacked cache first and the layer's slice is read after, so the write is in place (a
      # read before the write would make XLA copy the whole cache every layer).
      keys, values, layer = kv
      start = (layer, 0, index, 0, 0)
      keys = jax.lax.dynamic_update_slice(keys, k.astype(keys.dtype)[None], start)
      values = jax.lax.dynamic_update_slice(values, v.astype(values.dtype)[None], start)
      new_kv = (keys, values)
      k = jax.lax.dynamic_index_in_dim(keys, layer, keepdims=False).astype(q.dtype)
      v = jax.lax.dynamic_index_in_dim(values, layer, keepdims=False).astype(q.dtype)
    if scale is None:
      layer_scale = self.scale
    else:  # a per-layer scale scanned as data: applied to q, which the soft-cap sees the same
      q = (q * scale.astype(q.dtype)).astype(q.dtype)
      layer_scale = 1.0
    out = attend(
      q, k, v, inputs, scale=layer_scale, window=window, softcap=self.softcap, impl=impl
    )
    out = constrain(out, BTHD, mesh, rules)
    return self.o_proj(out.reshape(b, t, q_size)), new_kv


class MLP(nnx.Module):
  """``down(act(gate(x)) · up(x))`` (SwiGLU / GeGLU) or ``down(act(up(x)))`` (GPT-2)."""

  def __init__(self, config: DecoderConfig, *, dtype: DType, param_dtype: DType, rngs: nnx.Rngs):
    c = config
    linear = functools.partial(
      Linear, use_bias=c.mlp_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs
    )
    self.activation = c.activation
    self.gate_proj = (
      linear(c.hidden_size, c.intermediate_size, kernel_axes=("embed", "mlp"))
      if c.gated_mlp
      else None
    )
    self.up_proj = linear(c.hidden_size, c.intermediate_size, kernel_axes=("embed", "mlp"))
    self.down_proj = linear(c.intermediate_size, c.hidden_size, kernel_axes=("mlp", "embed"))

  def __call__(
    self, x: Float[Array, "B T d"], *, mesh: Mesh | None = None, rules: Rules = DEFAULT_RULES
  ) -> Float[Array, "B T d"]:
    act = _activation(self.activation)
    if self.gate_proj is not None:
      hidden = act(self.gate_proj(x)) * self.up_proj(x)
    else:
      hidden = act(self.up_proj(x))
    return self.down_proj(constrain(hidden, BTF, mesh, rules))


class Block(nnx.Module):
  """Pre-norm residual block; Gemma 2 adds norms on the attention and MLP outputs (sandwich).

  One class for every layer: what differs between layers (the window, GPT-2's per-layer scale) is
  an argument of the call, so the blocks stack and scan.
  """

  def __init__(self, config: DecoderConfig, *, dtype: DType, param_dtype: DType, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.input_norm = _norm(config, config.hidden_size, **kw)
    self.attn = Attention(config, **kw)
    self.pre_mlp_norm = _norm(config, config.hidden_size, **kw)
    self.mlp = MLP(config, **kw)
    if config.sandwich_norm:
      self.post_attn_norm = _norm(config, config.hidden_size, **kw)
      self.post_mlp_norm = _norm(config, config.hidden_size, **kw)
    else:
      self.post_attn_norm = self.post_mlp_norm = None

  def __call__(
    self,
    x: Float[Array, "B T d"],
    inputs: AttentionInputs,
    kv: tuple[Array, Array, Array] | None = None,
    index: Int[Array, ""] | None = None,
    *,
    window: int | Array | None,
    scale: Array | None = None,
    mesh: Mesh | None = None,
    rules: Rules = DEFAULT_RULES,
    impl: str = "auto",
  ) -> tuple[Float[Array, "B T d"], tuple[Array, Array] | None]:
    h, new_kv = self.attn(
      self.input_norm(x), inputs, kv, index, window=window, scale=scale, mesh=mesh, rules=rules,
      impl=impl,
    )
    if self.post_attn_norm is not None:
      h = self.post_attn_norm(h)
    x = x + h
    h = self.mlp(self.pre_mlp_norm(x), mesh=mesh, rules=rules)
    if self.post_mlp_norm is not None:
      h = self.post_mlp_norm(h)
    return constrain(x + h, BTD, mesh, rules), new_kv


def _cache_full_message(index: int, tokens: int, slots: int) -> str:
  return f"cache is full: index {index} + {tokens} tokens > {slots} slots"


def _raise_cache_full(index: IntLike, *, tokens: int, slots: int) -> None:
  index = np.asarray(index)
  if np.any(index + tokens > slots):  # any: the predicate is batched under vmap
    raise ValueError(_cache_full_message(int(np.max(index)), tokens, slots))


def _fail_on_device_if_full(index: Int[Array, ""], tokens: int, slots: int) -> None:
  """Raises (as a ``JaxRuntimeError``) when a traced write would run past the cache's end.

  ``dynamic_update_slice`` would otherwise clamp the write onto the last slots. The host callback
  sits in the taken branch of a ``cond`` only, so a decode loop that stays within ``max_len``
  never leaves the device.
  """
  overflow = index + tokens > slots
  report = functools.partial(_raise_cache_full, tokens=tokens, slots=slots)
  jax.lax.cond(overflow, lambda: jax.debug.callback(report, index), lambda: None)


_TOKEN_ID_HINT = (
  "a tokenizer with a larger vocabulary than the checkpoint, or a negative pad id, gives NaN logits"
)
_POSITION_HINT = "a learned position table gives NaN outside it"


def _index_message(
  name: str, row: int, position: int, value: int, count: int, bound: int, what: str, hint: str
) -> str:
  return (
    f"{name}[{row}, {position}] = {value} is outside {what} [0, {bound}) "
    f"({count} id(s) out of range); {hint}"
  )


def _raise_bad_index(row, position, value, count, **message: Any) -> None:
  if np.any(np.asarray(count) > 0):  # any: the arguments are batched under vmap
    first = lambda a: int(np.asarray(a).ravel()[0])  # noqa: E731
    raise ValueError(
      _index_message(
        row=first(row), position=first(position), value=first(value), count=first(count),
        **message,
      )
    )


def check_index_range(
  array: Array, bound: int, *, name: str, what: str, hint: str
) -> None:
  """Integers in ``[0, bound)``, or a named error (an embedding lookup outside gives silent NaN).

  Concrete entries out of range are a ``ValueError`` naming ``name``, the first row and position;
  traced ones (under ``jit``) are checked on the device, and only the first bad entry's
  coordinates (scalars) reach a host callback, which raises (a ``JaxRuntimeError``) in the taken
  branch of a ``cond``: a valid batch never leaves the device.
  """
  message = dict(name=name, bound=bound, what=what, hint=hint)
  t = array.shape[-1]
  if not isinstance(array, jax.core.Tracer):
    values = np.asarray(array)
    bad = np.argwhere((values < 0) | (values >= bound))
    if len(bad):
      row, position = (int(i) for i in bad[0])
      raise ValueError(
        _index_message(row=row, position=position, value=int(values[row, position]),
                       count=len(bad), **message)
      )
    return
  bad = ((array < 0) | (array >= bound)).reshape(-1)
  first = jnp.argmax(bad)
  count = jnp.sum(bad, dtype=jnp.int32)
  value = array.reshape(-1)[first]
  report = functools.partial(_raise_bad_index, **message)
  jax.lax.cond(
    count > 0,
    lambda: jax.debug.callback(report, first // t, first % t, value, count),
    lambda: None,
  )


def check_token_ids(input_ids: Array, vocab_size: int) -> None:
  """Integer ids in ``[0, vocab_size)``, or a named error (no silent NaN logits).

  A float array is a ``TypeError``; ids out of range are checked by :func:`check_index_range`.
  """
  if not jnp.issubdtype(input_ids.dtype, jnp.integer):
    raise TypeError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
  check_index_range(
    input_ids, vocab_size, name="input_ids", what="the vocabulary", hint=_TOKEN_ID_HINT
  )


class Transformer(nnx.Module):
  """The decoder body: embeddings, scanned blocks and the final norm (no head).

  Args:
    config: the architecture.
    dtype: compute dtype (e.g. ``jnp.bfloat16`` with fp32 parameters), a dtype or a name such as
      ``"bf16"`` (see :func:`alignax.models.hub.parse_dtype`; a bad one is a ValueError naming it).
    param_dtype: parameter dtype, given the same way.
    remat: ``None`` or a policy name in :data:`REMAT_POLICIES` applied to every block (training
      without a cache only).
    attention_impl: ``impl`` of :func:`alignax.kernels.attention.attention` (``"auto"``: the
      memory-efficient kernel the backend has been validated with; ``"reference"``: the dense
      oracle).
    rngs: initialisation randomness.

  Attributes:
    layers: one :class:`Block` whose parameters are stacked ``[L, ...]`` (layer ``i`` is index
      ``i``).
    mesh: the mesh the model was placed on (set by ``shard_model`` / ``from_pretrained(mesh=)``),
      on which the activations are constrained; None uses the context mesh, if any.
    rules: the logical-axis rules the model was placed with (``shard_model(rules=)``,
      ``from_pretrained(rules=)``), which its activations and KV cache follow too.
  """

  def __init__(
    self,
    config: DecoderConfig,
    *,
    dtype: DType = jnp.float32,
    param_dtype: DType = jnp.float32,
    remat: str | None = None,
    attention_impl: str = "auto",
    rngs: nnx.Rngs,
  ):
    if remat is not None:
      _validate.choice("remat", remat, REMAT_POLICIES)
    _validate.choice("attention_impl", attention_impl, ATTENTION_IMPLEMENTATIONS)
    dtype = parse_dtype(dtype, name="dtype")
    param_dtype = parse_dtype(param_dtype, name="param_dtype")
    self.config = config
    self.dtype = dtype
    self.remat = remat
    self.attention_impl = attention_impl
    self.mesh: Mesh | None = None
    self.rules: Rules = DEFAULT_RULES
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.embed = Embed(config.vocab_size, config.hidden_size, **kw)
    self.pos_embed = (
      Embed(config.max_position_embeddings, config.hidden_size, axes=(None, "embed"), **kw)
      if config.position_embedding == "learned"
      else None
    )
    self.layers = stack_modules([Block(config, **kw) for _ in range(config.num_layers)])
    self.final_norm = _norm(config, config.hidden_size, **kw)

  def init_cache(self, batch: int, max_len: int, dtype: DType | None = None) -> KVCache:
    """An empty cache of ``max_len`` slots per row, keys/values in ``dtype`` (default: compute).

    On a model placed on a mesh the cache is created sharded there: batch over ``(data, fsdp)``, KV
    heads over ``tensor`` when their number divides it (replicated otherwise: never a split head).
    """
    for name, value in (("batch", batch), ("max_len", max_len)):
      if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    c = self.config
    if self.pos_embed is not None and max_len > c.max_position_embeddings:
      raise ValueError(
        f"max_len={max_len} exceeds the learned position table ({c.max_position_embeddings})"
      )
    dtype = self.dtype if dtype is None else parse_dtype(dtype, name="dtype")
    shape = (c.num_layers, batch, max_len, c.num_kv_heads, c.head_dim)
    kv_axes = (LAYERS, *BTKD)
    valid_axes = ("activation_batch", "activation_length")

    def zeros(shape: tuple[int, ...], dtype: DType, axes: tuple[str | None, ...]) -> Array:
      if self.mesh is None:
        return jnp.zeros(shape, dtype)
      spec = logical_to_mesh(axes, shape, self.mesh, self.rules)
      return jnp.zeros(shape, dtype, device=jax.sharding.NamedSharding(self.mesh, spec))

    return KVCache(
      keys=zeros(shape, dtype, kv_axes),
      values=zeros(shape, dtype, kv_axes),
      valid=zeros((batch, max_len), bool, valid_axes),
      index=zeros((), jnp.int32, ()),
    )

  def _run_layers(
    self,
    x: Array,
    inputs: AttentionInputs,
    cache_kv: tuple[Array, Array] | None,
    index: Array | None,
  ) -> tuple[Array, tuple[Array, Array] | None]:
    """The blocks under one ``lax.scan`` over ``L / p`` groups of ``p`` blocks."""
    c = self.config
    num_layers, mesh, rules, impl = c.num_layers, self.mesh, self.rules, self.attention_impl
    period = window_period(c.sliding_windows)
    if period is None:  # no repeating pattern: the window is scanned data
      period, static_windows = 1, None
      windows = jnp.asarray(
        [NO_WINDOW if w is None else w for w in c.sliding_windows], jnp.int32
      ).reshape(num_layers, 1)
    else:
      static_windows, windows = c.sliding_windows[:period], None
    groups = num_layers // period
    scales = None
    if uniform_attention_scale(c) is None:
      scales = jnp.asarray(
        [c.layer_attention_scale(i) for i in range(num_layers)], jnp.float32
      ).reshape(groups, period)

    graphdef, stacked, rest = nnx.split(self.layers, is_stacked, ...)

    def regroup(a: Array) -> Array:
      return a.reshape(groups, period, *a.shape[1:])

    def layer(params, rest, x, inputs, kv, window, scale, *, static_window):
      block = nnx.merge(graphdef, params, rest)
      x, new_kv = block(
        x, inputs, kv, index,
        window=static_window if window is None else window, scale=scale, mesh=mesh, rules=rules,
        impl=impl,
      )
      return x, new_kv, nnx.split(block, is_stacked, ...)[2]

    use_remat = self.remat is not None and cache_kv is None
    layer_fns = []
    for j in range(period):
      fn = functools.partial(
        layer, static_window=None if static_windows is None else static_windows[j]
      )
      # prevent_cse=False: inside a scan the recomputation cannot be CSE'd with the forward
      # anyway, and the optimisation barriers the default adds only block fusion (jax.checkpoint
      # docs; MaxText does the same for scanned layers).
      if use_remat:
        fn = jax.checkpoint(fn, policy=REMAT_POLICIES[self.remat], prevent_cse=False)
      layer_fns.append(fn)

    def body(carry, xs):
      # The stacked cache rides in the carry; each layer writes its new tokens in place, so a
      # decode step never copies the cache.
      x, rest, cache = carry
      params, group, window, scale = xs
      for j in range(period):
        x, cache, rest = layer_fns[j](
          jax.tree.map(lambda a: a[j], params),
          rest,
          x,
          inputs,
          None if cache is None else (*cache, group * period + j),
          None if window is None else window[j],
          None if scale is None else scale[j],
        )
      return (x, rest, cache), None

    xs = (jax.tree.map(regroup, stacked), jnp.arange(groups), windows, scales)
    (x, rest, cache_kv), _ = jax.lax.scan(body, (x, rest, cache_kv), xs)
    nnx.update(self.layers, rest)
    return x, cache_kv

  def __call__(
    self,
    input_ids: Shaped[IntLike, "B T"],
    attention_mask: Shaped[IntLike, "B T"] | None = None,
    positions: Int[IntLike, "B T"] | None = None,
    segment_ids: Int[IntLike, "B T"] | None = None,
    *,
    cache: KVCache | None = None,
  ) -> tuple[Float[Array, "B T d"], KVCache | None]:
    """Final hidden states ``[B, T, d]`` (after the final norm) and the updated cache."""
    c = self.config
    input_ids = jnp.asarray(input_ids)
    if input_ids.ndim != 2:
      raise ValueError(f"input_ids must be [batch, time], got shape {list(input_ids.shape)}")
    check_token_ids(input_ids, c.vocab_size)
    b, t = input_ids.shape
    mask = (
      jnp.ones((b, t), bool) if attention_mask is None else jnp.asarray(attention_mask).astype(bool)
    )
    _validate.same_shape({"input_ids": input_ids, "attention_mask": mask})
    if segment_ids is not None:
      segment_ids = jnp.asarray(segment_ids)
      _validate.same_shape({"input_ids": input_ids, "segment_ids": segment_ids})
      if cache is not None:
        raise ValueError("segment_ids (packed sequences) cannot be combined with a KV cache")
    if cache is not None:
      slots = cache.valid.shape[1]
      if cache.valid.shape[0] != b:
        raise ValueError(f"cache holds {cache.valid.shape[0]} rows but input_ids has {b}")
      if t > slots:
        raise ValueError(f"input_ids has {t} tokens but the cache only {slots} slots")
      if isinstance(cache.index, jax.core.Tracer):
        _fail_on_device_if_full(cache.index, t, slots)
      elif int(cache.index) + t > slots:
        raise ValueError(_cache_full_message(int(cache.index), t, slots))
    elif self.pos_embed is not None and t > c.max_position_embeddings:
      raise ValueError(
        f"input_ids has {t} tokens, more than the learned position table "
        f"({c.max_position_embeddings})"
      )
    given_positions = positions is not None
    if positions is None:
      offset = 0 if cache is None else jnp.sum(cache.valid, axis=-1, dtype=jnp.int32)
      positions = default_positions(mask, segment_ids, offset)
    positions = jnp.asarray(positions)
    _validate.same_shape({"input_ids": input_ids, "positions": positions})
    if self.pos_embed is not None and given_positions:  # default ones stay below max_len
      check_index_range(
        positions, c.max_position_embeddings, name="positions",
        what="the learned position table", hint=_POSITION_HINT,
      )

    x = self.embed(input_ids)
    if c.embed_scale is not None:
      x = x * jnp.asarray(c.embed_scale, x.dtype)
    rotary = None
    if self.pos_embed is not None:
      x = x + self.pos_embed(positions)
    else:
      rotary = rotary_tables(positions, rope_inverse_frequencies(c), self.dtype)
    x = constrain(x, BTD, self.mesh, self.rules)

    if cache is None:
      inputs = AttentionInputs(rotary, jnp.arange(t), mask, segment_ids, None)
      x, _ = self._run_layers(x, inputs, None, None)
      return constrain(self.final_norm(x), BTD, self.mesh, self.rules), None
    index = cache.index
    key_valid = jax.lax.dynamic_update_slice(cache.valid, mask, (0, index))
    inputs = AttentionInputs(rotary, index + jnp.arange(t), key_valid, None, index + t)
    x, (keys, values) = self._run_layers(x, inputs, (cache.keys, cache.values), index)
    hidden = constrain(self.final_norm(x), BTD, self.mesh, self.rules)
    return hidden, KVCache(keys, values, key_valid, index + t)


class CausalLM(nnx.Module):
  """Decoder body plus the LM head (tied to the embeddings or its own ``[d, V]`` projection)."""

  def __init__(
    self,
    config: DecoderConfig,
    *,
    dtype: DType = jnp.float32,
    param_dtype: DType = jnp.float32,
    remat: str | None = None,
    attention_impl: str = "auto",
    rngs: nnx.Rngs,
  ):
    dtype = parse_dtype(dtype, name="dtype")
    param_dtype = parse_dtype(param_dtype, name="param_dtype")
    self.config = config
    self.dtype = dtype
    self.model = Transformer(
      config, dtype=dtype, param_dtype=param_dtype, remat=remat, attention_impl=attention_impl,
      rngs=rngs,
    )
    self.lm_head = (
      None
      if config.tie_word_embeddings
      else Linear(
        config.hidden_size,
        config.vocab_size,
        use_bias=False,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_axes=("embed", "vocab"),
        rngs=rngs,
      )
    )

  def init_cache(self, batch: int, max_len: int, dtype: DType | None = None) -> KVCache:
    return self.model.init_cache(batch, max_len, dtype)

  def get_lm_head(self) -> LMHead:
    """The LM head as arrays for the fused log-prob kernel: exactly what :meth:`logits` computes.

    ``weight`` is ``[V, d]`` in the compute dtype: the embedding matrix when tied, else the head's
    effective kernel ``W + s · A B`` when it carries an (enabled) LoRA adapter. The kernel and
    :meth:`logits` both multiply it with compute-dtype hidden states, accumulating in fp32.
    """
    if self.lm_head is None:
      weight = self.model.embed.embedding[...]
    else:
      weight = self.lm_head.effective_kernel().T
    return LMHead(
      weight=weight.astype(self.dtype), bias=None, softcap=self.config.final_softcap,
      logit_scale=1.0,
    )

  def logits(self, hidden: Float[Array, "*b d"]) -> Float[Array, "*b V"]:
    """``softcap · tanh(h Wᵀ / softcap)``, accumulated and returned in fp32 (no cap when the family
    has none), from compute-dtype inputs: what the fused kernel computes with :meth:`get_lm_head`."""
    head = self.get_lm_head()
    logits = jnp.einsum(
      "...d,vd->...v", hidden.astype(self.dtype), head.weight, preferred_element_type=jnp.float32
    )
    if logits.ndim == 3:
      logits = constrain(logits, BTV, self.model.mesh, self.model.rules)
    cap = head.softcap
    return logits if cap is None else cap * jnp.tanh(logits / cap)

  def __call__(
    self,
    input_ids: Shaped[IntLike, "B T"],
    attention_mask: Shaped[IntLike, "B T"] | None = None,
    positions: Int[IntLike, "B T"] | None = None,
    segment_ids: Int[IntLike, "B T"] | None = None,
    *,
    cache: KVCache | None = None,
    compute_logits: bool = True,
  ) -> DecoderOutput:
    """Runs the decoder; prefill and decode are this call with a cache.

    Args:
      input_ids: ``[B, T]`` integer token ids in ``[0, V)`` (a float array is a ``TypeError``; an
        id out of range a ``ValueError`` naming its row and position, or under ``jit`` a
        ``JaxRuntimeError`` raised from the device).
      attention_mask: ``[B, T]`` True (or 1) for real tokens; default all real.
      positions: ``[B, T]`` position ids; default see the module docstring. With learned
        positions (GPT-2) they must lie in the table, checked as ``input_ids`` are.
      segment_ids: ``[B, T]`` packed-sequence ids; tokens attend only within their segment.
      cache: a :class:`KVCache`; the ``T`` new tokens are written at ``cache.index``. A write
        past ``max_len`` raises: a ``ValueError`` when the index is concrete, a
        ``JaxRuntimeError`` (raised from the device, without a host sync on the normal path)
        under ``jit``.
      compute_logits: False stops before the LM head (``logits`` is None), for the fused kernel.

    Returns:
      :class:`DecoderOutput`.
    """
    hidden, cache = self.model(input_ids, attention_mask, positions, segment_ids, cache=cache)
    return DecoderOutput(self.logits(hidden) if compute_logits else None, hidden, cache)

  def decode_step(
    self, tokens: Int[IntLike, " B"], cache: KVCache, positions: Int[IntLike, " B"] | None = None
  ) -> DecoderOutput:
    """One generation step: ``tokens`` ``[B]`` at ``positions`` ``[B]``; logits ``[B, 1, V]``."""
    tokens = jnp.asarray(tokens)[:, None]
    positions = None if positions is None else jnp.asarray(positions)[:, None]
    return self(tokens, jnp.ones_like(tokens, bool), positions, cache=cache)
