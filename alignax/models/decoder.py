"""One NNX decoder for the Llama, Mistral, Qwen2/3, Gemma/Gemma 2 and GPT-2 families.

The architecture comes from a :class:`~alignax.models.config.DecoderConfig`; family differences are
options of one implementation (norm kind and offset, gated MLP, fused QKV, q/k norm, RoPE or learned
positions, soft-capping, sliding windows, sandwich norms, embedding scale).

Conventions:

* ``attention_mask`` is boolean ``[B, T]`` (True = real token); padding may be left or right.
* Default ``positions`` are ``cumsum(mask) - 1`` clipped at 0 (so a left-padded row starts at
  position 0 on its first real token; pads get position 0), restarted at every segment boundary when
  ``segment_ids`` is given. ``transformers`` only matches this when it is given the same
  ``position_ids`` (its own default is ``arange(T)`` whatever the padding).
* Sliding windows act on sequence (cache slot) indices like ``transformers``: query ``i`` sees keys
  ``j`` with ``i - W < j <= i``.
* Attention runs through :func:`jax.nn.dot_product_attention` (cuDNN / TPU paths available) with a
  boolean mask combining causal, padding, segment and sliding-window terms. Gemma 2 soft-caps the
  scores (``c · tanh(s / c)`` before the mask), which ``dot_product_attention`` cannot express, so
  soft-capped layers take an explicit einsum path with an fp32 softmax.
"""

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Bool, Float, Int, Shaped

from alignax import _validate
from alignax.models.config import DecoderConfig
from alignax.models.layers import DType, Embed, LayerNorm, Linear, RMSNorm

IntLike = np.ndarray | Array

REMAT_POLICIES: dict[str, Callable[..., bool] | None] = {
  "full": None,  # save nothing: recompute the whole block in the backward pass
  "dots": jax.checkpoint_policies.checkpoint_dots,
  "dots_with_no_batch_dims": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class KVCache(NamedTuple):
  """Static-shape key/value cache.

  Attributes:
    keys, values: one ``[B, S, K, hd]`` array per layer (``S`` = ``max_len`` slots).
    valid: ``[B, S]`` True where a slot holds a real (non-pad) token.
    index: scalar int32, the next slot to write; every row writes the same slots (left padding).
  """

  keys: tuple[Array, ...]
  values: tuple[Array, ...]
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


class LMHead(NamedTuple):
  """The LM head as arrays: ``z = softcap · tanh((logit_scale · h Wᵀ + b) / softcap)``.

  ``weight`` is ``[V, d]`` (the embedding matrix when tied), ``bias`` ``[V]`` or None, ``softcap``
  None for no capping. These are the keyword arguments of ``alignax.token_logprobs``.
  """

  weight: Float[Array, "V d"]
  bias: Float[Array, " V"] | None
  softcap: float | None
  logit_scale: float


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


def attention_mask_for(
  query_index: Int[Array, " T"],
  key_valid: Bool[Array, "B S"],
  *,
  window: int | None,
  query_segments: Int[Array, "B T"] | None = None,
  key_segments: Int[Array, "B S"] | None = None,
) -> Bool[Array, "B T S"]:
  """``allowed[b, i, j] = j <= q_i ∧ valid[b, j] ∧ (q_i - W < j) ∧ seg[b, i] = seg[b, j]``.

  ``query_index`` holds each query's slot index (``arange(T)`` without a cache).
  """
  key_index = jnp.arange(key_valid.shape[-1])
  allowed = key_index[None, :] <= query_index[:, None]
  if window is not None:
    allowed &= key_index[None, :] > query_index[:, None] - window
  allowed = allowed[None] & key_valid[:, None, :]
  if query_segments is not None:
    allowed &= query_segments[:, :, None] == key_segments[:, None, :]
  return allowed


def attend(
  q: Float[Array, "B T H hd"],
  k: Float[Array, "B S K hd"],
  v: Float[Array, "B S K hd"],
  mask: Bool[Array, "B T S"],
  *,
  scale: float,
  softcap: float | None,
) -> Float[Array, "B T H hd"]:
  """``softmax(cap(scale · q kᵀ) + mask) v`` with grouped KV heads (``H`` a multiple of ``K``)."""
  if softcap is None:
    return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], scale=scale)
  b, t, h, hd = q.shape
  kv_heads = k.shape[2]
  grouped = q.reshape(b, t, kv_heads, h // kv_heads, hd)
  scores = jnp.einsum("btkgd,bskd->bkgts", grouped, k).astype(jnp.float32) * scale
  scores = softcap * jnp.tanh(scores / softcap)
  # A finite fill keeps fully masked rows (pad queries) finite instead of NaN.
  scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  return jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, h, hd)


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


class Attention(nnx.Module):
  """Multi-head attention with grouped KV heads, optional fused QKV, q/k norm, RoPE and cache."""

  def __init__(
    self, config: DecoderConfig, layer: int, *, dtype: DType, param_dtype: DType, rngs: nnx.Rngs
  ):
    c = config
    self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
    self.scale = c.layer_attention_scale(layer)
    self.softcap = c.attn_softcap
    self.use_rope = c.position_embedding == "rope"
    self.fused_qkv = c.fused_qkv
    linear = functools.partial(Linear, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    q_size, kv_size = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    if c.fused_qkv:
      self.qkv_proj = linear(
        c.hidden_size, q_size + 2 * kv_size, use_bias=c.qkv_bias, kernel_axes=("embed", "heads")
      )
    else:
      self.q_proj = linear(
        c.hidden_size, q_size, use_bias=c.qkv_bias, kernel_axes=("embed", "heads")
      )
      self.k_proj = linear(
        c.hidden_size, kv_size, use_bias=c.qkv_bias, kernel_axes=("embed", "kv_heads")
      )
      self.v_proj = linear(
        c.hidden_size, kv_size, use_bias=c.qkv_bias, kernel_axes=("embed", "kv_heads")
      )
    self.o_proj = linear(q_size, c.hidden_size, use_bias=c.out_bias, kernel_axes=("heads", "embed"))
    if c.qk_norm:
      norm_kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs, axis_name="head_dim")
      self.q_norm = _norm(c, c.head_dim, **norm_kw)
      self.k_norm = _norm(c, c.head_dim, **norm_kw)
    else:
      self.q_norm = self.k_norm = None

  def __call__(
    self,
    x: Float[Array, "B T d"],
    rotary: tuple[Array, Array] | None,
    mask: Bool[Array, "B T S"],
    kv: tuple[Array, Array] | None = None,
    index: Int[Array, ""] | None = None,
  ) -> tuple[Float[Array, "B T d"], tuple[Array, Array] | None]:
    b, t, _ = x.shape
    q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
    if self.fused_qkv:
      q, k, v = jnp.split(self.qkv_proj(x), [q_size, q_size + kv_size], axis=-1)
    else:
      q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
    q = q.reshape(b, t, self.num_heads, self.head_dim)
    k = k.reshape(b, t, self.num_kv_heads, self.head_dim)
    v = v.reshape(b, t, self.num_kv_heads, self.head_dim)
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    if rotary is not None:
      q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
    new_kv = None
    if kv is not None:
      start = (0, index, 0, 0)
      keys = jax.lax.dynamic_update_slice(kv[0], k.astype(kv[0].dtype), start)
      values = jax.lax.dynamic_update_slice(kv[1], v.astype(kv[1].dtype), start)
      new_kv = (keys, values)
      k, v = keys.astype(q.dtype), values.astype(q.dtype)
    out = attend(q, k, v, mask, scale=self.scale, softcap=self.softcap)
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

  def __call__(self, x: Float[Array, "B T d"]) -> Float[Array, "B T d"]:
    act = _activation(self.activation)
    if self.gate_proj is not None:
      return self.down_proj(act(self.gate_proj(x)) * self.up_proj(x))
    return self.down_proj(act(self.up_proj(x)))


class Block(nnx.Module):
  """Pre-norm residual block; Gemma 2 adds norms on the attention and MLP outputs (sandwich)."""

  def __init__(
    self, config: DecoderConfig, layer: int, *, dtype: DType, param_dtype: DType, rngs: nnx.Rngs
  ):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.window = config.sliding_windows[layer]
    self.input_norm = _norm(config, config.hidden_size, **kw)
    self.attn = Attention(config, layer, **kw)
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
    rotary: tuple[Array, Array] | None,
    mask: Bool[Array, "B T S"],
    kv: tuple[Array, Array] | None = None,
    index: Int[Array, ""] | None = None,
  ) -> tuple[Float[Array, "B T d"], tuple[Array, Array] | None]:
    h, new_kv = self.attn(self.input_norm(x), rotary, mask, kv, index)
    if self.post_attn_norm is not None:
      h = self.post_attn_norm(h)
    x = x + h
    h = self.mlp(self.pre_mlp_norm(x))
    if self.post_mlp_norm is not None:
      h = self.post_mlp_norm(h)
    return x + h, new_kv


def _run_block(block: Block, x: Array, rotary: Any, mask: Array) -> Array:
  return block(x, rotary, mask)[0]


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


class Transformer(nnx.Module):
  """The decoder body: embeddings, blocks and the final norm (no head).

  Args:
    config: the architecture.
    dtype: compute dtype (e.g. ``jnp.bfloat16`` with fp32 parameters).
    param_dtype: parameter dtype.
    remat: ``None`` or a policy name in :data:`REMAT_POLICIES` applied to every block (training
      without a cache only).
    rngs: initialisation randomness.
  """

  def __init__(
    self,
    config: DecoderConfig,
    *,
    dtype: DType = jnp.float32,
    param_dtype: DType = jnp.float32,
    remat: str | None = None,
    rngs: nnx.Rngs,
  ):
    if remat is not None:
      _validate.choice("remat", remat, REMAT_POLICIES)
    self.config = config
    self.dtype = dtype
    self.remat = remat
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.embed = Embed(config.vocab_size, config.hidden_size, **kw)
    self.pos_embed = (
      Embed(config.max_position_embeddings, config.hidden_size, axes=(None, "embed"), **kw)
      if config.position_embedding == "learned"
      else None
    )
    self.layers = nnx.List([Block(config, i, **kw) for i in range(config.num_layers)])
    self.final_norm = _norm(config, config.hidden_size, **kw)

  def init_cache(self, batch: int, max_len: int, dtype: DType | None = None) -> KVCache:
    """An empty cache of ``max_len`` slots per row, keys/values in ``dtype`` (default: compute)."""
    for name, value in (("batch", batch), ("max_len", max_len)):
      if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    c = self.config
    if self.pos_embed is not None and max_len > c.max_position_embeddings:
      raise ValueError(
        f"max_len={max_len} exceeds the learned position table ({c.max_position_embeddings})"
      )
    dtype = self.dtype if dtype is None else dtype
    shape = (batch, max_len, c.num_kv_heads, c.head_dim)

    def empty() -> tuple[Array, ...]:
      return tuple(jnp.zeros(shape, dtype) for _ in range(c.num_layers))

    return KVCache(
      keys=empty(),
      values=empty(),
      valid=jnp.zeros((batch, max_len), bool),
      index=jnp.zeros((), jnp.int32),
    )

  def __call__(
    self,
    input_ids: Int[IntLike, "B T"],
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
    if positions is None:
      offset = 0 if cache is None else jnp.sum(cache.valid, axis=-1, dtype=jnp.int32)
      positions = default_positions(mask, segment_ids, offset)
    positions = jnp.asarray(positions)
    _validate.same_shape({"input_ids": input_ids, "positions": positions})

    x = self.embed(input_ids)
    if c.embed_scale is not None:
      x = x * jnp.asarray(c.embed_scale, x.dtype)
    rotary = None
    if self.pos_embed is not None:
      x = x + self.pos_embed(positions)
    else:
      rotary = rotary_tables(positions, rope_inverse_frequencies(c), self.dtype)

    if cache is None:
      query_index, key_valid, index = jnp.arange(t), mask, None
    else:
      index = cache.index
      key_valid = jax.lax.dynamic_update_slice(cache.valid, mask, (0, index))
      query_index = index + jnp.arange(t)
    masks = {
      w: attention_mask_for(
        query_index, key_valid, window=w, query_segments=segment_ids, key_segments=segment_ids
      )
      for w in set(c.sliding_windows)
    }

    new_keys, new_values = [], []
    for i, block in enumerate(self.layers):
      if cache is not None:
        x, (k, v) = block(x, rotary, masks[block.window], (cache.keys[i], cache.values[i]), index)
        new_keys.append(k)
        new_values.append(v)
      elif self.remat is not None:
        run = nnx.remat(_run_block, policy=REMAT_POLICIES[self.remat])
        x = run(block, x, rotary, masks[block.window])
      else:
        x = _run_block(block, x, rotary, masks[block.window])
    hidden = self.final_norm(x)
    if cache is None:
      return hidden, None
    return hidden, KVCache(tuple(new_keys), tuple(new_values), key_valid, index + t)


class CausalLM(nnx.Module):
  """Decoder body plus the LM head (tied to the embeddings or its own ``[d, V]`` projection)."""

  def __init__(
    self,
    config: DecoderConfig,
    *,
    dtype: DType = jnp.float32,
    param_dtype: DType = jnp.float32,
    remat: str | None = None,
    rngs: nnx.Rngs,
  ):
    self.config = config
    self.model = Transformer(config, dtype=dtype, param_dtype=param_dtype, remat=remat, rngs=rngs)
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
    """The LM head as arrays for the fused log-prob kernel (parameter dtype, weight ``[V, d]``)."""
    if self.lm_head is None:
      weight = self.model.embed.embedding[...]
    else:
      if self.lm_head.lora is not None:
        raise ValueError("get_lm_head: lm_head carries a LoRA adapter; merge it first")
      weight = self.lm_head.kernel[...].T
    return LMHead(weight=weight, bias=None, softcap=self.config.final_softcap, logit_scale=1.0)

  def logits(self, hidden: Float[Array, "*b d"]) -> Float[Array, "*b V"]:
    """``softcap · tanh(h Wᵀ / softcap)`` in fp32 (no capping when the family has none)."""
    if self.lm_head is None:
      embedding = self.model.embed.embedding[...].astype(hidden.dtype)
      logits = jnp.dot(hidden, embedding.T)
    else:
      logits = self.lm_head(hidden)
    logits = logits.astype(jnp.float32)
    cap = self.config.final_softcap
    return logits if cap is None else cap * jnp.tanh(logits / cap)

  def __call__(
    self,
    input_ids: Int[IntLike, "B T"],
    attention_mask: Shaped[IntLike, "B T"] | None = None,
    positions: Int[IntLike, "B T"] | None = None,
    segment_ids: Int[IntLike, "B T"] | None = None,
    *,
    cache: KVCache | None = None,
    compute_logits: bool = True,
  ) -> DecoderOutput:
    """Runs the decoder; prefill and decode are this call with a cache.

    Args:
      input_ids: ``[B, T]`` token ids.
      attention_mask: ``[B, T]`` True (or 1) for real tokens; default all real.
      positions: ``[B, T]`` position ids; default see the module docstring.
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
