"""Architecture of the supported decoder families, read from a Hugging Face ``config.json``.

One frozen :class:`DecoderConfig` describes every family; :func:`config_from_hf` translates the
family-specific Hugging Face keys into it and rejects what the decoder does not implement, naming
the key, before any weight is read. The ``config.json`` is first resolved by the family's
``transformers`` config class, so absent keys take that class's defaults (Mistral's
``sliding_window=4096``, Gemma's ``head_dim=256``, Gemma 2's soft-caps, ...) and legacy spellings
(``rope_scaling``, Gemma's ``hidden_act="gelu"``) mean what they mean to ``transformers``.

Dropout rates (``attention_dropout``, GPT-2's ``*_pdrop``) are accepted and not applied: the decoder
has no dropout (alignment trainers switch it off, e.g. TRL's ``disable_dropout``); LoRA adapters
have their own.
"""

import copy
import dataclasses
import json
import math
from collections.abc import Mapping
from typing import Any

from huggingface_hub.errors import StrictDataclassError
from transformers import CONFIG_MAPPING

from alignax import _validate

SUPPORTED_MODEL_TYPES = ("gemma", "gemma2", "gpt2", "llama", "mistral", "qwen2", "qwen3")
ROPE_TYPES = ("default", "linear", "llama3")
ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "silu", "swish")


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """Everything the decoder needs to know about an architecture (hashable, so it can be static).

  Attributes:
    model_type: Hugging Face ``model_type`` (one of :data:`SUPPORTED_MODEL_TYPES`).
    vocab_size, hidden_size, intermediate_size, num_layers: sizes.
    num_heads, num_kv_heads, head_dim: attention heads; ``num_kv_heads < num_heads`` is GQA/MQA.
    norm: ``"rms"`` or ``"layer"``; ``norm_eps`` its epsilon; ``norm_offset`` 1 for Gemma's
      ``1 + w``.
    sandwich_norm: Gemma 2's extra norms after attention and after the MLP.
    activation: MLP non-linearity; ``gated_mlp`` selects ``down(act(gate(x)) · up(x))`` over
      ``down(act(up(x)))``.
    qkv_bias, out_bias, mlp_bias: which projections carry a bias.
    fused_qkv: one ``[d, 3·H·hd]`` projection (GPT-2's ``c_attn``) instead of three.
    qk_norm: per-head RMSNorm on queries and keys before RoPE (Qwen3).
    position_embedding: ``"rope"`` or ``"learned"`` (GPT-2); ``max_position_embeddings`` bounds the
      learned table.
    rope_theta, rope_type, rope_factor, rope_low_freq_factor, rope_high_freq_factor,
      rope_original_max_positions: rotary embedding parameters (``rope_type`` in
      :data:`ROPE_TYPES`).
    attention_scale: multiplier of ``q·k`` (``head_dim ** -0.5`` unless the family says otherwise).
    scale_attn_by_inverse_layer_idx: GPT-2 option dividing the scale by ``layer + 1``.
    sliding_windows: per layer, the window ``W`` (a query at ``i`` sees keys ``j`` with
      ``i - W < j <= i``) or ``None`` for full causal attention.
    attn_softcap, final_softcap: ``c · tanh(x / c)`` on attention scores / final logits (Gemma 2).
    embed_scale: multiplier of the token embeddings (``sqrt(hidden_size)`` for Gemma).
    tie_word_embeddings: the LM head reuses the token embedding matrix.
    pad_token_id: used by sequence-classification checkpoints; ``num_labels`` their output size.
    hf_config_json: the source ``config.json`` (sorted JSON), written back by ``save_pretrained``.
  """

  model_type: str
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  norm: str
  norm_eps: float
  activation: str
  gated_mlp: bool
  tie_word_embeddings: bool
  hf_config_json: str
  norm_offset: float = 0.0
  sandwich_norm: bool = False
  qkv_bias: bool = False
  out_bias: bool = False
  mlp_bias: bool = False
  fused_qkv: bool = False
  qk_norm: bool = False
  position_embedding: str = "rope"
  max_position_embeddings: int = 2048
  rope_theta: float = 10000.0
  rope_type: str = "default"
  rope_factor: float = 1.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_positions: int = 8192
  attention_scale: float | None = None
  scale_attn_by_inverse_layer_idx: bool = False
  sliding_windows: tuple[int | None, ...] = ()
  attn_softcap: float | None = None
  final_softcap: float | None = None
  embed_scale: float | None = None
  pad_token_id: int | None = None
  num_labels: int = 1

  @property
  def hf_config(self) -> dict[str, Any]:
    return json.loads(self.hf_config_json)

  def layer_attention_scale(self, layer: int) -> float:
    scale = self.head_dim**-0.5 if self.attention_scale is None else self.attention_scale
    return scale / (layer + 1) if self.scale_attn_by_inverse_layer_idx else scale


def _get(hf: Mapping[str, Any], key: str, *aliases: str, default: Any = ...) -> Any:
  for k in (key, *aliases):
    if hf.get(k) is not None:
      return hf[k]
  if default is ...:
    raise ValueError(f"config.json of model_type={hf.get('model_type')!r}: {key!r} is null")
  return default


def _rope(hf: Mapping[str, Any]) -> dict[str, Any]:
  """RoPE settings from ``rope_parameters`` (transformers folds legacy ``rope_scaling`` into it)."""
  params = dict(hf.get("rope_parameters") or {})
  rope_type = params.get("rope_type", params.get("type", "default"))
  if rope_type not in ROPE_TYPES:
    raise ValueError(
      f"rope_type={rope_type!r} (config.json rope_parameters/rope_scaling) is not supported; "
      f"choose one of {list(ROPE_TYPES)}"
    )
  if params.get("partial_rotary_factor", 1.0) != 1.0:
    raise ValueError("partial_rotary_factor != 1 (config.json rope_parameters) is not supported")
  out: dict[str, Any] = {"rope_theta": float(params["rope_theta"]), "rope_type": rope_type}
  if rope_type in ("linear", "llama3"):
    out["rope_factor"] = float(params["factor"])
  if rope_type == "llama3":
    out["rope_low_freq_factor"] = float(params["low_freq_factor"])
    out["rope_high_freq_factor"] = float(params["high_freq_factor"])
    out["rope_original_max_positions"] = int(params["original_max_position_embeddings"])
  return out


def _windows(
  hf: Mapping[str, Any], num_layers: int, *, default_all: bool
) -> tuple[int | None, ...]:
  """Per-layer sliding windows from ``layer_types`` (or all layers when ``default_all``)."""
  window = hf.get("sliding_window")
  layer_types = hf.get("layer_types")
  if layer_types is not None:
    if len(layer_types) != num_layers:
      raise ValueError(
        f"config.json layer_types has {len(layer_types)} entries for num_hidden_layers={num_layers}"
      )
    for i, kind in enumerate(layer_types):
      _validate.choice(f"layer_types[{i}]", kind, ("full_attention", "sliding_attention"))
    if window is None and "sliding_attention" in layer_types:
      raise ValueError("config.json layer_types has sliding_attention but sliding_window is null")
    return tuple(window if kind == "sliding_attention" else None for kind in layer_types)
  return tuple(window if default_all else None for _ in range(num_layers))


def _activation(hf: Mapping[str, Any], key: str) -> str:
  act = _get(hf, key)
  _validate.choice(key, act, ACTIVATIONS)
  return act


def _llama_like(hf: Mapping[str, Any]) -> dict[str, Any]:
  model_type = hf["model_type"]
  hidden = int(_get(hf, "hidden_size"))
  heads = int(_get(hf, "num_attention_heads"))
  layers = int(_get(hf, "num_hidden_layers"))
  # Only these families read attention_bias / mlp_bias; Qwen2 hard-codes its biases.
  attention_bias = model_type in ("llama", "qwen3", "gemma", "gemma2") and bool(
    hf.get("attention_bias", False)
  )
  fields: dict[str, Any] = dict(
    vocab_size=int(_get(hf, "vocab_size")),
    hidden_size=hidden,
    intermediate_size=int(_get(hf, "intermediate_size")),
    num_layers=layers,
    num_heads=heads,
    num_kv_heads=int(_get(hf, "num_key_value_heads", default=heads)),
    head_dim=int(_get(hf, "head_dim", default=hidden // heads)),
    norm="rms",
    norm_eps=float(_get(hf, "rms_norm_eps")),
    gated_mlp=True,
    qkv_bias=attention_bias,
    out_bias=attention_bias,
    mlp_bias=model_type == "llama" and bool(hf.get("mlp_bias", False)),
    max_position_embeddings=int(_get(hf, "max_position_embeddings")),
    tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
    sliding_windows=(None,) * layers,
    **_rope(hf),
  )
  # Gemma 2 reads hidden_activation; every other family hidden_act (Gemma's legacy "gelu" is
  # already the tanh approximation after transformers' resolution).
  act_key = "hidden_activation" if model_type == "gemma2" else "hidden_act"
  fields["activation"] = _activation(hf, act_key)
  if model_type == "mistral":
    if hf.get("layer_types") is not None:
      raise ValueError("mistral config.json with layer_types (Ministral) is not supported")
    fields["sliding_windows"] = _windows(hf, layers, default_all=True)
  if model_type in ("qwen2", "qwen3", "gemma2"):
    # transformers derives layer_types (Qwen: use_sliding_window / max_window_layers; Gemma 2:
    # alternating) and nulls Qwen's sliding_window when use_sliding_window is false.
    fields["sliding_windows"] = _windows(hf, layers, default_all=False)
  if model_type == "qwen2":
    fields["qkv_bias"], fields["out_bias"] = True, False
  if model_type == "qwen3":
    fields["qk_norm"] = True
  if model_type in ("gemma", "gemma2"):
    fields["norm_offset"] = 1.0
    fields["embed_scale"] = math.sqrt(hidden)
  if model_type == "gemma2":
    fields["sandwich_norm"] = True
    fields["attention_scale"] = float(_get(hf, "query_pre_attn_scalar")) ** -0.5
    for key, field in (("attn_logit_softcapping", "attn_softcap"),
                       ("final_logit_softcapping", "final_softcap")):
      fields[field] = None if hf.get(key) is None else float(hf[key])
  if hf.get("use_bidirectional_attention"):
    raise ValueError("use_bidirectional_attention=true (config.json) is not supported")
  return fields


def _gpt2(hf: Mapping[str, Any]) -> dict[str, Any]:
  hidden = int(_get(hf, "n_embd", "hidden_size"))
  heads = int(_get(hf, "n_head", "num_attention_heads"))
  layers = int(_get(hf, "n_layer", "num_hidden_layers"))
  if hf.get("reorder_and_upcast_attn", False):
    raise ValueError("reorder_and_upcast_attn=true (config.json) is not supported")
  if hf.get("add_cross_attention", False):
    raise ValueError("add_cross_attention=true (config.json) is not supported")
  return dict(
    vocab_size=int(_get(hf, "vocab_size")),
    hidden_size=hidden,
    intermediate_size=int(hf.get("n_inner") or 4 * hidden),
    num_layers=layers,
    num_heads=heads,
    num_kv_heads=heads,
    head_dim=hidden // heads,
    norm="layer",
    norm_eps=float(_get(hf, "layer_norm_epsilon")),
    activation=_activation(hf, "activation_function"),
    gated_mlp=False,
    qkv_bias=True,
    out_bias=True,
    mlp_bias=True,
    fused_qkv=True,
    position_embedding="learned",
    max_position_embeddings=int(_get(hf, "n_positions", "max_position_embeddings")),
    attention_scale=(hidden // heads) ** -0.5 if hf.get("scale_attn_weights", True) else 1.0,
    scale_attn_by_inverse_layer_idx=bool(hf.get("scale_attn_by_inverse_layer_idx", False)),
    sliding_windows=(None,) * layers,
    tie_word_embeddings=bool(_get(hf, "tie_word_embeddings")),
  )


def config_from_hf(hf: Mapping[str, Any]) -> DecoderConfig:
  """Builds a :class:`DecoderConfig` from a parsed Hugging Face ``config.json``.

  The keys are read after the family's ``transformers`` config class has resolved them (class
  defaults for absent keys, legacy spellings converted), exactly as
  ``transformers.AutoModelForCausalLM.from_pretrained`` would see them; ``hf_config_json`` keeps the
  source as given.

  Raises:
    ValueError: ``model_type`` is missing or not one of :data:`SUPPORTED_MODEL_TYPES` (the
      message names it and lists the supported ones), ``transformers`` rejects the config (its
      message is kept), a required key is null, or a feature the decoder does not implement is
      switched on (named by its key).
  """
  model_type = hf.get("model_type")
  if model_type not in SUPPORTED_MODEL_TYPES:
    raise ValueError(
      f"model_type={model_type!r} (config.json) is not supported; "
      f"supported model types: {list(SUPPORTED_MODEL_TYPES)}"
    )
  source = dict(hf)
  try:
    resolved = CONFIG_MAPPING[model_type].from_dict(copy.deepcopy(source)).to_dict()
  except (ValueError, TypeError, StrictDataclassError) as error:
    raise ValueError(f"config.json (model_type={model_type!r}) is invalid: {error}") from error
  hf = {**resolved, "model_type": model_type}
  fields = _gpt2(hf) if model_type == "gpt2" else _llama_like(hf)
  if fields["num_heads"] % fields["num_kv_heads"]:
    raise ValueError(
      f"num_attention_heads={fields['num_heads']} is not a multiple of "
      f"num_key_value_heads={fields['num_kv_heads']}"
    )
  # transformers omits the default labels from config.json and then assumes two.
  num_labels = hf.get("num_labels") or len(hf.get("id2label") or {}) or 2
  return DecoderConfig(
    model_type=model_type,
    pad_token_id=hf.get("pad_token_id"),
    num_labels=int(num_labels),
    hf_config_json=json.dumps(source, sort_keys=True),
    **fields,
  )
