"""Hugging Face checkpoint I/O: ``config.json`` + safetensors (one file, or shards with an index).

Loading validates everything that can be known from the file headers before reading any data: the
``model_type``, and every tensor name and shape against the model the config describes (missing,
unexpected and mis-shaped tensors are all reported by name in one error). Tensors are then read one
at a time and placed straight onto their devices (sharded per the logical-axis rules when a mesh is
given), so host memory never holds more than one tensor.

Name mapping: alignax uses one set of module names for every family (``attn.q_proj``,
``mlp.gate_proj``, ``input_norm``, ...); :func:`hf_name` translates a parameter path to the family's
Hugging Face name. PyTorch ``nn.Linear`` weights are ``[out, in]`` and are transposed; GPT-2's
``Conv1D`` weights are already ``[in, out]``.
"""

import dataclasses
import json
import os
import re
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from safetensors import safe_open
from safetensors.numpy import save_file

from alignax import _validate
from alignax.models.config import DecoderConfig, config_from_hf
from alignax.models.decoder import CausalLM
from alignax.models.heads import RewardModel, ValueModel
from alignax.models.layers import DType
from alignax.models.sharding import DEFAULT_RULES, Rules, state_shardings

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
HEADS = (None, "value", "score")

_CLASS_PREFIX = {
  "llama": "Llama",
  "mistral": "Mistral",
  "qwen2": "Qwen2",
  "qwen3": "Qwen3",
  "gemma": "Gemma",
  "gemma2": "Gemma2",
  "gpt2": "GPT2",
}

# alignax module name → Hugging Face module name, per naming scheme.
_LLAMA_NAMES = {
  "attn": "self_attn",
  "input_norm": "input_layernorm",
  "pre_mlp_norm": "post_attention_layernorm",
  "embed": "embed_tokens",
  "final_norm": "norm",
}
_GEMMA2_NAMES = {
  **_LLAMA_NAMES,
  "post_attn_norm": "post_attention_layernorm",
  "pre_mlp_norm": "pre_feedforward_layernorm",
  "post_mlp_norm": "post_feedforward_layernorm",
}
_GPT2_NAMES = {
  "model": "transformer",
  "layers": "h",
  "embed": "wte",
  "pos_embed": "wpe",
  "input_norm": "ln_1",
  "pre_mlp_norm": "ln_2",
  "final_norm": "ln_f",
  "qkv_proj": "c_attn",
  "o_proj": "c_proj",
  "up_proj": "c_fc",
  "down_proj": "c_proj",
}
_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}


def hf_name(config: DecoderConfig, path: tuple[Any, ...]) -> str:
  """The Hugging Face tensor name of the parameter at ``path`` (an NNX state path)."""
  names = {"gpt2": _GPT2_NAMES, "gemma2": _GEMMA2_NAMES}.get(config.model_type, _LLAMA_NAMES)
  *modules, leaf = (str(p) for p in path)
  return ".".join([names.get(m, m) for m in modules] + [_LEAF_NAMES[leaf]])


def _transposed(config: DecoderConfig, path: tuple[Any, ...]) -> bool:
  """Whether the stored tensor is the transpose of ours (``nn.Linear`` yes, GPT-2 ``Conv1D`` no)."""
  if str(path[-1]) != "kernel":
    return False
  return config.model_type != "gpt2" or str(path[0]) != "model"


def _model_class(head: str | None) -> type[nnx.Module]:
  return {None: CausalLM, "value": ValueModel, "score": RewardModel}[head]


def architecture_name(config: DecoderConfig, head: str | None) -> str:
  prefix = _CLASS_PREFIX[config.model_type]
  if head is not None:
    return f"{prefix}ForSequenceClassification"
  return "GPT2LMHeadModel" if config.model_type == "gpt2" else f"{prefix}ForCausalLM"


def _head_of(model: nnx.Module) -> str | None:
  for head in HEADS:
    if type(model) is _model_class(head):
      return head
  raise TypeError(
    f"model must be a CausalLM, ValueModel or RewardModel, got {type(model).__name__}"
  )


def _flat_params(state: Any) -> Iterator[tuple[tuple[Any, ...], nnx.Variable]]:
  for path, variable in nnx.to_flat_state(state):
    if path and str(path[-1]) in _LEAF_NAMES and "lora" not in (str(p) for p in path):
      yield path, variable


class _Checkpoint:
  """The tensors of a safetensors checkpoint directory: names, shapes, and one-at-a-time reads."""

  def __init__(self, path: str):
    index_path = os.path.join(path, INDEX_FILE)
    single_path = os.path.join(path, SINGLE_FILE)
    if os.path.exists(index_path):
      with open(index_path) as f:
        weight_map = json.load(f)["weight_map"]
      self.files = {name: os.path.join(path, file) for name, file in weight_map.items()}
    elif os.path.exists(single_path):
      with safe_open(single_path, framework="np") as f:
        self.files = {name: single_path for name in f.keys()}
    else:
      raise FileNotFoundError(f"{path} holds neither {SINGLE_FILE} nor {INDEX_FILE}")
    self.shapes: dict[str, tuple[int, ...]] = {}
    for file in sorted(set(self.files.values())):
      if not os.path.exists(file):
        raise FileNotFoundError(f"{INDEX_FILE} names {os.path.basename(file)}, which is missing")
      with safe_open(file, framework="np") as f:
        for name in f.keys():
          if self.files.get(name) == file:
            self.shapes[name] = tuple(f.get_slice(name).get_shape())
    absent = sorted(set(self.files) - set(self.shapes))
    if absent:
      raise ValueError(f"{INDEX_FILE} maps tensors that their files do not contain: {absent}")

  def read(self, name: str) -> np.ndarray:
    with safe_open(self.files[name], framework="np") as f:
      return f.get_tensor(name)


def read_config(path: str) -> DecoderConfig:
  """Parses ``path/config.json`` into a :class:`DecoderConfig` (see :func:`config_from_hf`)."""
  config_path = os.path.join(path, "config.json")
  if not os.path.exists(config_path):
    raise FileNotFoundError(f"{config_path} does not exist")
  with open(config_path) as f:
    return config_from_hf(json.load(f))


def from_pretrained(
  path: str | os.PathLike,
  *,
  dtype: DType = jnp.float32,
  param_dtype: DType = jnp.float32,
  mesh: Mesh | None = None,
  rules: Rules | None = None,
  head: str | None = None,
  remat: str | None = None,
  num_labels: int | None = None,
  seed: int = 0,
) -> nnx.Module:
  """Loads a Hugging Face checkpoint directory into an alignax model.

  Args:
    path: directory with ``config.json`` and ``model.safetensors`` or
      ``model.safetensors.index.json`` plus its shards.
    dtype: compute dtype.
    param_dtype: parameter dtype (tensors are cast on load).
    mesh: when given, every parameter is placed directly with its sharding on this mesh.
    rules: logical-axis rules (default :data:`alignax.models.sharding.DEFAULT_RULES`).
    head: None for a :class:`CausalLM`, ``"value"`` for a :class:`ValueModel` (per-token critic),
      ``"score"`` for a :class:`RewardModel` (``*ForSequenceClassification``). A head missing from a
      causal-LM checkpoint is initialised from ``seed`` (normal, std 0.02), and that checkpoint's
      ``lm_head.weight`` is not used.
    remat: rematerialisation policy name (see :data:`alignax.models.decoder.REMAT_POLICIES`).
    num_labels: outputs of a ``"score"`` head, overriding ``config.json`` (whose default, as in
      ``transformers``, is 2); use 1 for a reward model read from a causal-LM checkpoint.
    seed: seed of the parameters the checkpoint does not hold (a fresh head).

  Returns:
    The model, parameters in ``param_dtype``.

  Raises:
    ValueError: unsupported ``model_type``/feature (from ``config.json``), or tensors that do not
      match the model the config describes (listed by name: missing, unexpected, mis-shaped), all
      before any tensor data is read.
  """
  _validate.choice("head", head, HEADS)
  path = os.fspath(path)
  config = read_config(path)
  if num_labels is not None:
    if head != "score":
      raise ValueError(f"num_labels={num_labels} applies to head='score' only, got head={head!r}")
    _validate.positive_int("num_labels", num_labels)
    config = dataclasses.replace(config, num_labels=num_labels)
  checkpoint = _Checkpoint(path)
  cls = _model_class(head)
  abstract = nnx.eval_shape(
    lambda: cls(config, dtype=dtype, param_dtype=param_dtype, remat=remat, rngs=nnx.Rngs(seed))
  )
  graphdef, state = nnx.split(abstract)
  expected = {hf_name(config, p): (p, v) for p, v in _flat_params(state)}
  fresh = _plan_and_validate(config, head, expected, checkpoint)

  shardings = state_shardings(state, mesh, rules or DEFAULT_RULES) if mesh is not None else None
  flat_shardings = dict(nnx.to_flat_state(shardings)) if shardings is not None else {}
  for name, (p, variable) in expected.items():
    if name in fresh:
      array = nnx.initializers.normal(0.02)(jax.random.key(seed), variable.shape, param_dtype)
    else:
      array = checkpoint.read(name)
      if _transposed(config, p):
        array = array.T
    array = np.asarray(array).astype(param_dtype)
    if p in flat_shardings:
      variable.set_value(jax.device_put(array, flat_shardings[p].get_value()))
    else:
      variable.set_value(jnp.asarray(array))
  return nnx.merge(graphdef, state)


def _plan_and_validate(
  config: DecoderConfig,
  head: str | None,
  expected: Mapping[str, tuple[tuple[Any, ...], nnx.Variable]],
  checkpoint: _Checkpoint,
) -> set[str]:
  """Checks names and shapes; returns the head tensors to initialise fresh (missing head only)."""
  stored = set(checkpoint.shapes)
  ignorable = set()
  if config.tie_word_embeddings or head is not None:
    # A tied copy of the embeddings, or the LM head of a causal LM whose body a head model reads.
    ignorable.add("lm_head.weight")
  missing = sorted(set(expected) - stored)
  # A head read on top of a causal-LM checkpoint starts fresh; anything else missing is an error.
  fresh = {"score.weight"} & set(missing) if head is not None else set()
  missing = sorted(set(missing) - fresh)
  unexpected = sorted(stored - set(expected) - ignorable)
  misshaped = []
  for name in sorted(set(expected) & stored):
    p, variable = expected[name]
    want = tuple(variable.shape)
    if _transposed(config, p):
      want = want[::-1]
    if checkpoint.shapes[name] != want:
      misshaped.append(f"{name}: checkpoint {list(checkpoint.shapes[name])}, config {list(want)}")
  problems = []
  if missing:
    problems.append(f"missing tensors: {missing}")
  if unexpected:
    problems.append(f"unexpected tensors: {unexpected}")
  if misshaped:
    problems.append("mis-shaped tensors: " + "; ".join(misshaped))
  if problems:
    raise ValueError(
      f"checkpoint does not match its config.json (model_type={config.model_type!r}): "
      + " | ".join(problems)
    )
  return fresh


def _parse_size(size: int | str) -> int:
  if isinstance(size, int):
    if size < 1:
      raise ValueError(f"max_shard_size must be >= 1 byte, got {size}")
    return size
  match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B)\s*", size.upper())
  if match is None:
    raise ValueError(f"max_shard_size={size!r} must be bytes or a string like '500MB' or '5GB'")
  unit = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}[match.group(2)]
  return int(float(match.group(1)) * unit)


def save_pretrained(
  model: nnx.Module, path: str | os.PathLike, *, max_shard_size: int | str = "5GB"
) -> None:
  """Writes ``model`` as a Hugging Face checkpoint directory.

  ``config.json`` is the source config with ``architectures`` (``*ForCausalLM``, ``GPT2LMHeadModel``
  or ``*ForSequenceClassification``), labels and ``dtype`` updated; weights go to
  ``model.safetensors``, or to ``model-0000i-of-0000n.safetensors`` shards plus
  ``model.safetensors.index.json`` when they exceed ``max_shard_size``. LoRA adapters are not
  written (merge them first to include them). Sharded parameters are gathered one at a time.

  Args:
    model: a :class:`CausalLM`, :class:`ValueModel` or :class:`RewardModel`.
    path: output directory (created if needed).
    max_shard_size: bytes per shard, as an int or a string such as ``"500MB"``.
  """
  head = _head_of(model)
  limit = _parse_size(max_shard_size)
  path = os.fspath(path)
  os.makedirs(path, exist_ok=True)
  config: DecoderConfig = model.config
  tensors: dict[str, np.ndarray] = {}
  dtypes = set()
  for p, variable in _flat_params(nnx.state(model)):
    array = np.asarray(jax.device_get(variable[...]))
    dtypes.add(array.dtype)
    tensors[hf_name(config, p)] = np.ascontiguousarray(array.T if _transposed(config, p) else array)

  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for name, array in tensors.items():
    if shards[-1] and size + array.nbytes > limit:
      shards.append({})
      size = 0
    shards[-1][name] = array
    size += array.nbytes
  metadata = {"format": "pt"}
  if len(shards) == 1:
    save_file(shards[0], os.path.join(path, SINGLE_FILE), metadata=metadata)
  else:
    weight_map = {}
    for i, shard in enumerate(shards):
      file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
      save_file(shard, os.path.join(path, file), metadata=metadata)
      weight_map.update({name: file for name in shard})
    index = {"metadata": {"total_size": sum(a.nbytes for a in tensors.values())},
             "weight_map": weight_map}
    with open(os.path.join(path, INDEX_FILE), "w") as f:
      json.dump(index, f, indent=2)

  hf = config.hf_config
  hf["architectures"] = [architecture_name(config, head)]
  hf["dtype"] = str(next(iter(dtypes))) if len(dtypes) == 1 else "float32"
  if head is not None:
    num_labels = model.score.out_features
    hf["id2label"] = {str(i): f"LABEL_{i}" for i in range(num_labels)}
    hf["label2id"] = {f"LABEL_{i}": i for i in range(num_labels)}
    hf["num_labels"] = num_labels
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(hf, f, indent=2, sort_keys=True)
