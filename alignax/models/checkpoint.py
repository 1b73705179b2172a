"""Hugging Face checkpoint I/O: ``config.json`` + safetensors (one file, or shards with an index).

Loading validates everything that can be known from the file headers before reading any data: the
``model_type``, and every tensor name and shape against the model the config describes (missing,
unexpected and mis-shaped tensors are all reported by name in one error). Tensors are then read one
at a time and placed onto their devices; with a mesh each tensor (each layer of a stacked
parameter) goes straight to its shards per the logical-axis rules, so host memory never holds more
than one tensor; without one, a stacked parameter is assembled on the host (its ``L`` layers).

Name mapping: alignax uses one set of module names for every family (``attn.q_proj``,
``mlp.gate_proj``, ``input_norm``, ...); :func:`hf_name` translates a parameter path to the family's
Hugging Face name. PyTorch ``nn.Linear`` weights are ``[out, in]`` and are transposed; GPT-2's
``Conv1D`` weights are already ``[in, out]``. Block parameters are stacked over layers
(``[L, ...]``, see :mod:`alignax.models.decoder`); the checkpoint's ``model.layers.{i}.…`` tensor is
slice ``i`` of the stacked parameter, read and written one layer at a time.
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
from alignax.distributed import to_host
from alignax.models.config import DecoderConfig, config_from_hf
from alignax.models.decoder import CausalLM
from alignax.models.heads import RewardModel, ValueModel
from alignax.models.hub import parse_dtype, resolve_pretrained
from alignax.models.layers import DType, is_stacked
from alignax.models.sharding import DEFAULT_RULES, Rules, set_mesh, state_shardings
from alignax.sharding import check_auto

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


def hf_name(config: DecoderConfig, path: tuple[Any, ...], layer: int | None = None) -> str:
  """The Hugging Face tensor name of the parameter at ``path`` (an NNX state path).

  ``layer`` is the index into a parameter stacked over layers; it follows the ``layers`` module
  (``model.layers.attn.q_proj.kernel``, layer 3 → ``model.layers.3.self_attn.q_proj.weight``).
  """
  names = {"gpt2": _GPT2_NAMES, "gemma2": _GEMMA2_NAMES}.get(config.model_type, _LLAMA_NAMES)
  *modules, leaf = (str(p) for p in path)
  parts = []
  for m in modules:
    parts.append(names.get(m, m))
    if m == "layers" and layer is not None:
      parts.append(str(layer))
  return ".".join(parts + [_LEAF_NAMES[leaf]])


def _expected_tensors(
  config: DecoderConfig, state: Any
) -> dict[str, tuple[tuple[Any, ...], nnx.Variable, int | None]]:
  """Checkpoint name → (state path, variable, layer index into the stack or None)."""
  expected = {}
  for p, v in _flat_params(state):
    if is_stacked(p, v):
      for i in range(v.shape[0]):
        expected[hf_name(config, p, i)] = (p, v, i)
    else:
      expected[hf_name(config, p)] = (p, v, None)
  return expected


def _tensor_shape(variable: nnx.Variable, layer: int | None) -> tuple[int, ...]:
  return tuple(variable.shape[1:] if layer is not None else variable.shape)


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
  attention_impl: str = "auto",
  num_labels: int | None = None,
  seed: int = 0,
  revision: str | None = None,
) -> nnx.Module:
  """Loads a Hugging Face checkpoint (a directory or a hub id) into an alignax model.

  Args:
    path: directory with ``config.json`` and ``model.safetensors`` or
      ``model.safetensors.index.json`` plus its shards, or a hub id ``org/name`` (fetched through
      the Hugging Face cache, see :func:`alignax.models.hub.resolve_pretrained`).
    dtype: compute dtype: a dtype or a name such as ``"bfloat16"`` / ``"bf16"``, checked here.
    param_dtype: parameter dtype (tensors are cast on load), given the same way.
    mesh: when given, every parameter is placed directly with its sharding on this mesh (a
      mesh with Auto axes, from :func:`alignax.sharding.make_mesh`), and the model constrains its
      activations there.
    rules: logical-axis rules (default :data:`alignax.models.sharding.DEFAULT_RULES`), for the
      parameters and, on the mesh, the activations and KV cache.
    head: None for a :class:`CausalLM`, ``"value"`` for a :class:`ValueModel` (per-token critic),
      ``"score"`` for a :class:`RewardModel` (``*ForSequenceClassification``). A head missing from a
      causal-LM checkpoint is initialised from ``seed`` (normal, std 0.02), and that checkpoint's
      ``lm_head.weight`` is not used.
    remat: rematerialisation policy name (see :data:`alignax.models.decoder.REMAT_POLICIES`).
    attention_impl: the attention kernel (``impl`` of :func:`alignax.kernels.attention.attention`).
    num_labels: outputs of a ``"score"`` head, overriding ``config.json`` (whose default, as in
      ``transformers``, is 2); use 1 for a reward model read from a causal-LM checkpoint.
    seed: seed of the parameters the checkpoint does not hold (a fresh head).
    revision: hub branch, tag or commit of a hub id.

  Returns:
    The model, parameters in ``param_dtype``.

  Raises:
    ValueError: unsupported ``model_type``/feature (from ``config.json``), or tensors that do not
      match the model the config describes (listed by name: missing, unexpected, mis-shaped), all
      before any tensor data is read.
  """
  _validate.choice("head", head, HEADS)
  dtype = parse_dtype(dtype, name="dtype")
  param_dtype = parse_dtype(param_dtype, name="param_dtype")
  if mesh is not None:
    check_auto(mesh, "from_pretrained(mesh=...)")
  path = resolve_pretrained(path, revision=revision)
  config = read_config(path)
  if num_labels is not None:
    if head != "score":
      raise ValueError(f"num_labels={num_labels} applies to head='score' only, got head={head!r}")
    _validate.positive_int("num_labels", num_labels)
    config = dataclasses.replace(config, num_labels=num_labels)
  checkpoint = _Checkpoint(path)
  cls = _model_class(head)
  abstract = nnx.eval_shape(
    lambda: cls(
      config, dtype=dtype, param_dtype=param_dtype, remat=remat, attention_impl=attention_impl,
      rngs=nnx.Rngs(seed),
    )
  )
  graphdef, state = nnx.split(abstract)
  expected = _expected_tensors(config, state)
  fresh = _plan_and_validate(config, head, expected, checkpoint)

  shardings = state_shardings(state, mesh, rules or DEFAULT_RULES) if mesh is not None else None
  flat_shardings = dict(nnx.to_flat_state(shardings)) if shardings is not None else {}
  by_path: dict[tuple[Any, ...], list[tuple[str, int | None]]] = {}
  for name, (p, _, layer) in expected.items():
    by_path.setdefault(p, []).append((name, layer))
  for p, names in by_path.items():
    variable = expected[names[0][0]][1]
    sharding = flat_shardings[p].get_value() if p in flat_shardings else None
    # A stacked parameter is read one layer at a time; each layer goes to its devices at once.
    layer_sharding = (
      None if sharding is None or names[0][1] is None
      else jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*sharding.spec[1:]))
    )
    parts = []
    for name, layer in names:
      if name in fresh:
        array = nnx.initializers.normal(0.02)(
          jax.random.key(seed), _tensor_shape(variable, layer), param_dtype
        )
      else:
        array = checkpoint.read(name)
        if _transposed(config, p):
          array = array.T
      array = np.asarray(array).astype(param_dtype)
      if layer is None:
        parts.append(array)
      else:
        parts.append(array if layer_sharding is None else jax.device_put(array, layer_sharding))
    if names[0][1] is None:
      value = parts[0]
    else:
      value = np.stack(parts) if layer_sharding is None else jnp.stack(parts)
    if sharding is not None:
      variable.set_value(jax.device_put(value, sharding))
    else:
      variable.set_value(jnp.asarray(value))
  model = nnx.merge(graphdef, state)
  if mesh is not None:
    set_mesh(model, mesh, rules or DEFAULT_RULES)
  return model


def _plan_and_validate(
  config: DecoderConfig,
  head: str | None,
  expected: Mapping[str, tuple[tuple[Any, ...], nnx.Variable, int | None]],
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
    p, variable, layer = expected[name]
    want = _tensor_shape(variable, layer)
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

  In a multi-host run (``alignax.distributed.initialize``) every process must call it: each
  tensor is gathered from the hosts that hold its shards (a collective), and process 0 alone
  writes the files.

  ``config.json`` is the source config with ``architectures`` (``*ForCausalLM``, ``GPT2LMHeadModel``
  or ``*ForSequenceClassification``), labels and ``dtype`` updated; weights go to
  ``model.safetensors``, or to ``model-0000i-of-0000n.safetensors`` shards plus
  ``model.safetensors.index.json`` when they exceed ``max_shard_size``. LoRA adapters are not
  written (save ``merge_lora(model)`` to include them). Sharded parameters are gathered one layer at
  a time.

  Args:
    model: a :class:`CausalLM`, :class:`ValueModel` or :class:`RewardModel`.
    path: output directory (created if needed).
    max_shard_size: bytes per shard, as an int or a string such as ``"500MB"``.
  """
  head = _head_of(model)
  limit = _parse_size(max_shard_size)
  path = os.fspath(path)
  writer = jax.process_index() == 0
  if writer:
    os.makedirs(path, exist_ok=True)
  config: DecoderConfig = model.config
  tensors: dict[str, np.ndarray] = {}
  dtypes = set()
  for name, (p, variable, layer) in _expected_tensors(config, nnx.state(model)).items():
    array = variable[...] if layer is None else variable[...][layer]
    array = to_host(array)
    dtypes.add(array.dtype)
    if writer:
      tensors[name] = np.ascontiguousarray(array.T if _transposed(config, p) else array)
  if not writer:
    return

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
