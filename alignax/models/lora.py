"""Low-rank adapters (LoRA, Hu et al. 2021) on the decoder's projections.

A frozen projection ``W [in, out]`` becomes ``x ↦ x W + s · dropout(x) A B`` with ``A [in, r]``
random, ``B [r, out]`` zero at initialisation (so the adapted model starts as the base model) and
``s = α / r`` (``α / √r`` with rsLoRA, Kalajdzievski 2023).

Trainable adapters, frozen base: adapter weights are :class:`LoRAParam` (flax's ``nnx.LoRAParam``, a
subclass of ``nnx.Param``), so the optimiser selects them by type and leaves the base alone::

  optimizer = nnx.Optimizer(model, optax.adamw(1e-4), wrt=LoRAParam)
  grads = nnx.grad(loss_fn, argnums=nnx.DiffState(0, LoRAParam))(model, batch)
  lora_state = nnx.state(model, LoRAParam)                      # adapters only
  base_state = nnx.state(model, nnx.All(nnx.Param, nnx.Not(LoRAParam)))  # frozen weights

The reference model of DPO/PPO is ``lora_disabled(model)``: a view that shares every weight with the
policy and skips the adapters, so it costs no second copy of the base. Adapters save and load alone,
in the PEFT layout (``adapter_model.safetensors`` + ``adapter_config.json``).

Whether an adapter counts is never hidden state: :func:`merge_lora` returns a *new* model whose
kernels hold ``W + s · A B`` and which has no adapters (the input is untouched), so a reference view
of the policy stays the base model, a view of a merged model raises ("no adapters"), and restoring a
merged state cannot add the update twice. The only switch, ``enabled``, belongs to a
:func:`lora_disabled` view, never to the model.

On the decoder's stacked (scanned) projections the adapters are stacked too: ``A [L, in, r]``,
``B [L, r, out]``; saved and loaded per layer under the checkpoint's ``model.layers.{i}.…`` names.
"""

import dataclasses
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.flax
from flax import nnx
from jax.sharding import NamedSharding
from jaxtyping import Array, Float
from safetensors import safe_open

from alignax import _validate
from alignax.models import checkpoint
from alignax.models.config import DecoderConfig
from alignax.models.decoder import CausalLM, Transformer
from alignax.models.layers import LAYERS, DType, Linear, iter_linears
from alignax.models.sharding import DEFAULT_RULES, Rules, state_shardings

LoRAParam = nnx.LoRAParam

LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_CONFIG_NAME = "adapter_config.json"
# PEFT wraps the base model twice (PeftModel → LoraModel), hence the doubled prefix on every key.
PEFT_PREFIX = "base_model.model."


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
  """Which projections get adapters, and their shape.

  Attributes:
    rank: ``r``, the inner dimension of ``A [in, r]`` and ``B [r, out]``.
    alpha: ``α``; the update is scaled by ``α / r`` (``α / √r`` when ``use_rslora``).
    dropout: dropout rate on the adapter's input (PEFT's ``lora_dropout``); 0 disables it.
    target_modules: projection names; a projection matches when its dotted path equals a name or
      ends with ``"." + name`` (``"q_proj"`` or ``"attn.q_proj"``).
    use_rslora: rank-stabilised scale ``α / √r``.
    param_dtype: dtype of ``A`` and ``B``; None takes the kernel's. ``jnp.float32`` adapters on a
      ``bfloat16`` base keep the optimiser's updates exact while the frozen weights stay small.
  """

  rank: int = 8
  alpha: float = 16.0
  dropout: float = 0.0
  target_modules: tuple[str, ...] = LLAMA_TARGETS
  use_rslora: bool = False
  param_dtype: DType | None = None

  def __post_init__(self):
    _validate.positive_int("rank", self.rank)
    _validate.positive("alpha", self.alpha)
    _validate.in_unit_interval("dropout", self.dropout)
    targets = self.target_modules
    named = not isinstance(targets, str) and all(isinstance(t, str) and t for t in targets)
    if not targets or not named:
      raise ValueError(f"target_modules must be a non-empty sequence of names, got {targets!r}")
    object.__setattr__(self, "target_modules", tuple(targets))

  @property
  def scale(self) -> float:
    """``s = α / r``, or ``α / √r`` with rsLoRA."""
    return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


class LoRA(nnx.Module):
  """The low-rank update of one projection: ``Δy = s · dropout(x) A B`` (Hu et al., 2021).

  ``A`` is drawn from ``U(-1/√in, 1/√in)`` (the PyTorch ``nn.Linear`` default that PEFT and the
  reference implementation use; the paper says "random Gaussian"), ``B`` is zero. The adapter
  carries the logical axes of its projection (``A``: ``(in_axis, None)``, ``B``: ``(None,
  out_axis)``) so the sharding rules place it next to the kernel it updates.

  ``layers`` stacks the factors over a leading axis (``A [L, in, r]``, ``B [L, r, out]``) for the
  decoder's scanned projections; the scan hands each layer its slice. The static ``enabled`` is
  False only in a :func:`lora_disabled` view, where the call adds nothing.
  """

  def __init__(
    self,
    in_features: int,
    out_features: int,
    config: LoRAConfig,
    *,
    dtype: DType = jnp.float32,
    param_dtype: DType = jnp.float32,
    kernel_axes: tuple[str | None, str | None] = (None, None),
    kernel_units: tuple[int, int] = (1, 1),
    layers: int | None = None,
    rngs: nnx.Rngs,
  ):
    self.config = config
    self.out_features = out_features
    self.dtype = dtype
    lead = () if layers is None else (layers,)
    lead_axes = () if layers is None else (LAYERS,)
    # fan_in is `in` per layer: the stacked axis is a batch axis, not part of the fan-in.
    a_init = jax.nn.initializers.variance_scaling(
      1 / 3, "fan_in", "uniform", batch_axis=tuple(range(len(lead)))
    )
    self.lora_a = LoRAParam(
      a_init(rngs.params(), (*lead, in_features, config.rank), param_dtype),
      out_sharding=(*lead_axes, kernel_axes[0], None),
      sharding_units=(*(1,) * len(lead), kernel_units[0], 1),
      eager_sharding=False,
    )
    self.lora_b = LoRAParam(
      jnp.zeros((*lead, config.rank, out_features), param_dtype),
      out_sharding=(*lead_axes, None, kernel_axes[1]),
      sharding_units=(*(1,) * len(lead), 1, kernel_units[1]),
      eager_sharding=False,
    )
    self.dropout = nnx.Dropout(config.dropout, rngs=rngs if config.dropout > 0 else None)
    self.enabled = True

  def set_view(self, lora_enabled: bool | None = None):
    """Hook of ``nnx.view``: ``nnx.view(model, lora_enabled=False)`` switches adapters off."""
    if lora_enabled is not None:
      self.enabled = lora_enabled

  def delta_kernel(self) -> Float[Array, "*l d_in d_out"]:
    """``ΔW = s · A B`` in fp32 (per layer when stacked), the update :func:`merge_lora` folds in."""
    a = self.lora_a[...].astype(jnp.float32)
    b = self.lora_b[...].astype(jnp.float32)
    return self.config.scale * (a @ b)

  def __call__(self, x: Float[Array, "*b d_in"]) -> Float[Array, "*b d_out"]:
    if not self.enabled:
      return jnp.zeros((*x.shape[:-1], self.out_features), self.dtype)
    h = self.dropout(x).astype(self.dtype)
    return (h @ self.lora_a[...].astype(self.dtype)) @ self.lora_b[...].astype(self.dtype) * (
      jnp.asarray(self.config.scale, self.dtype)
    )


def _matches(path: str, targets: Sequence[str]) -> str | None:
  return next((t for t in targets if path == t or path.endswith("." + t)), None)


def apply_lora(model: nnx.Module, config: LoRAConfig, *, rngs: nnx.Rngs) -> tuple[str, ...]:
  """Attaches a zero-initialised :class:`LoRA` to every :class:`Linear` named in the config.

  The model is changed in place and computes exactly what it computed before (``B = 0``) until the
  adapters are trained. Adapters compute in the projection's dtype; their parameters are in
  ``config.param_dtype`` (default: the kernel's). On a model placed on a mesh
  (``from_pretrained(mesh=...)``, ``shard_model``) each adapter is placed on its kernel's mesh,
  split like the kernel by the rules the model was placed with. An adapter on a
  :class:`~alignax.models.CausalLM`'s ``lm_head`` acts through the effective weight ``W + s · A B``
  (what :meth:`~alignax.models.CausalLM.get_lm_head` gives the fused log-prob kernel), so its
  dropout is not applied.

  Args:
    model: any NNX module built from :class:`~alignax.models.layers.Linear` projections.
    config: rank, scale, dropout and target names.
    rngs: randomness for ``A`` (``params`` stream) and, with dropout, the ``dropout`` stream.

  Returns:
    The dotted paths of the adapted projections, in graph order; a stacked projection gives one
    per layer (``model.layers.{i}.attn.q_proj``).

  Raises:
    ValueError: a target name matches no projection (the message lists the available names), or a
      matched projection already carries an adapter.
  """
  linears = list(iter_linears(model))
  adapted, used = [], set()
  for path, linear in linears:
    target = _matches(path, config.target_modules)
    if target is None:
      continue
    if linear.lora is not None:
      raise ValueError(f"{path} already carries a LoRA adapter")
    used.add(target)
    adapted.append((path, linear))
  unused = [t for t in config.target_modules if t not in used]
  if unused:
    names = sorted({p.rsplit(".", 1)[-1] for p, _ in linears})
    raise ValueError(f"target_modules {unused} match no projection; the model has {names}")
  # The rules the model was placed with (shard_model / from_pretrained(rules=)), else the default.
  rules = next(
    (node.rules for _, node in nnx.iter_graph(model) if isinstance(node, Transformer)),
    DEFAULT_RULES,
  )
  for _, linear in adapted:
    kernel = linear.kernel
    stacked = kernel.ndim == 3
    axes = tuple(kernel.get_metadata().get("out_sharding") or (None,) * kernel.ndim)
    units = tuple(kernel.get_metadata().get("sharding_units") or (1,) * kernel.ndim)
    linear.lora = LoRA(
      linear.in_features,
      linear.out_features,
      config,
      dtype=linear.dtype,
      param_dtype=kernel.dtype if config.param_dtype is None else config.param_dtype,
      kernel_axes=axes[-2:],
      kernel_units=units[-2:],
      layers=kernel.shape[0] if stacked else None,
      rngs=rngs,
    )
    _place_like_kernel(linear, rules)
  return tuple(name for path, linear in adapted for name, _ in _per_layer(path, linear))


def _place_like_kernel(linear: Linear, rules: Rules) -> None:
  """Puts a new adapter on the mesh its kernel lives on, split by ``rules`` as the kernel is.

  Without this, adapters attached to a model loaded with ``from_pretrained(mesh=...)`` (the only
  way an 8B model fits) would sit whole on one device, and so would their optimiser state.
  """
  value = linear.kernel[...]
  if isinstance(value, jax.core.Tracer) or not isinstance(
    getattr(value, "sharding", None), NamedSharding
  ):
    return
  state = nnx.state(linear.lora, LoRAParam)
  shardings = state_shardings(state, value.sharding.mesh, rules)
  nnx.update(linear.lora, jax.tree.map(jax.device_put, state, shardings))


def _per_layer(path: str, linear: Linear) -> list[tuple[str, int | None]]:
  """``(name, layer)`` of each layer a projection holds: its path, or one per stacked layer with
  the index after ``layers`` (``model.layers.attn.q_proj`` → ``model.layers.3.attn.q_proj``)."""
  if linear.kernel.ndim == 2:
    return [(path, None)]
  parts = path.split(".")
  at = parts.index(LAYERS) + 1 if LAYERS in parts else len(parts)
  return [
    (".".join([*parts[:at], str(i), *parts[at:]]), i) for i in range(linear.kernel.shape[0])
  ]


def _adapters(model: nnx.Module) -> list[tuple[str, Linear, LoRA]]:
  found = [(p, lin, lin.lora) for p, lin in iter_linears(model) if isinstance(lin.lora, LoRA)]
  if not found:
    raise ValueError("the model carries no LoRA adapters; call apply_lora first")
  return found


def merge_lora(model: nnx.Module) -> nnx.Module:
  """A new model whose kernels are ``W + s · A B`` and which carries no adapters.

  The input model is untouched (the returned one shares every array it does not change), so a
  :func:`lora_disabled` reference of the input keeps seeing the base weights. The result runs at
  the base model's cost and ``save_pretrained`` writes the fine-tuned weights; a view or a restore
  of it cannot count the update twice (it has no adapters). The sum is formed in fp32 and rounded
  once to the kernel dtype; kernels keep their sharding.

  Raises:
    ValueError: the model has no adapters, or is a :func:`lora_disabled` view (merge the policy).
  """
  for path, _, lora in _adapters(model):
    if not lora.enabled:
      raise ValueError(
        f"{path}: adapter is disabled (a lora_disabled view); merge the model itself"
      )
  merged = nnx.clone(model)  # new Variables over the same arrays: the input stays as it is
  for _, linear, _ in _adapters(merged):
    old = linear.kernel[...]
    value = linear.effective_kernel()
    if isinstance(old, jax.Array) and not isinstance(old, jax.core.Tracer):
      value = jax.device_put(value, old.sharding)  # keep the kernel where the mesh put it
    linear.kernel[...] = value
    linear.lora = None
  return merged


def lora_disabled(model: nnx.Module) -> nnx.Module:
  """A view of ``model`` with every adapter switched off: the base model, sharing its weights.

  Built with ``nnx.view``: the view holds the same ``Variable`` objects as the model (no copy), so
  optimiser updates to the base or the adapters are seen by both, and both can be passed to one
  ``nnx.jit`` step (DPO/PPO: the policy is ``model``, the reference ``lora_disabled(model)``). The
  switch is a static attribute of the view only, so the disabled forward compiles without any
  adapter matmul and the model itself keeps its adapters on. :func:`merge_lora` never changes the
  model, so the view stays the base model.

  Raises:
    ValueError: the model has no adapters (the "reference" would silently be the policy itself,
      e.g. a merged model).
  """
  _adapters(model)
  return nnx.view(model, only=LoRA, lora_enabled=False)


def _module_names(model: nnx.Module) -> dict[str, str]:
  """Per-layer projection path → module name in saved adapters.

  Decoders built from a Hugging Face config use the checkpoint's module names
  (``model.layers.0.attn.q_proj`` → ``model.layers.0.self_attn.q_proj``), so PEFT and
  ``transformers`` find the adapted layers; any other module keeps its NNX paths.
  """
  config = getattr(model, "config", None)
  paths = [name for p, linear in iter_linears(model) for name, _ in _per_layer(p, linear)]
  if not isinstance(config, DecoderConfig):
    return {path: path for path in paths}
  return {
    path: checkpoint.hf_name(config, (*path.split("."), "kernel")).removesuffix(".weight")
    for path in paths
  }


def _delta_settings(config: LoRAConfig) -> tuple[int, float, bool]:
  """What defines ``ΔW`` besides the factors: ``(r, α, rsLoRA)``."""
  return (config.rank, config.alpha, config.use_rslora)


def save_lora(model: nnx.Module, path: str | os.PathLike[str]) -> None:
  """Writes the adapters alone, in PEFT's layout, to a directory.

  ``adapter_model.safetensors`` holds ``base_model.model.<module>.lora_A.weight`` ``[r, in]`` and
  ``<...>.lora_B.weight`` ``[out, r]`` (the ``nn.Linear`` layout: the transposes of ``A`` and
  ``B``) in the parameter dtype. ``adapter_config.json`` holds ``r``, ``lora_alpha``,
  ``lora_dropout``, ``use_rslora`` and the adapted ``target_modules`` under their checkpoint names.
  Sharded adapters are gathered to the host; stacked adapters are written per layer
  (``model.layers.{i}.…``).

  Args:
    model: a model with adapters (see :func:`apply_lora`).
    path: output directory, created if needed.

  Raises:
    ValueError: no adapters, or adapters whose rank, alpha, dropout or rsLoRA differ (a PEFT config
      has one of each).
  """
  adapters = _adapters(model)
  settings = {(*_delta_settings(lora.config), lora.config.dropout) for _, _, lora in adapters}
  if len(settings) > 1:
    raise ValueError(f"adapters disagree on (rank, alpha, rslora, dropout): {sorted(settings)}")
  rank, alpha, use_rslora, dropout = settings.pop()
  names = _module_names(model)
  tensors = {}
  modules = []
  for module_path, linear, lora in adapters:
    a, b = lora.lora_a[...], lora.lora_b[...]
    for name, layer in _per_layer(module_path, linear):
      key = PEFT_PREFIX + names[name]
      modules.append(names[name])
      tensors[f"{key}.lora_A.weight"] = (a if layer is None else a[layer]).T
      tensors[f"{key}.lora_B.weight"] = (b if layer is None else b[layer]).T
  config = getattr(model, "config", None)
  peft_config = {
    "peft_type": "LORA",
    "task_type": "CAUSAL_LM" if isinstance(model, CausalLM) else None,
    "r": rank,
    "lora_alpha": alpha,
    "lora_dropout": dropout,
    "use_rslora": use_rslora,
    "target_modules": sorted({m.rsplit(".", 1)[-1] for m in modules}),
    "bias": "none",
    # PEFT's flag for base weights stored [in, out], as GPT-2's Conv1D.
    "fan_in_fan_out": isinstance(config, DecoderConfig) and config.model_type == "gpt2",
    "init_lora_weights": True,
    "modules_to_save": None,
    "base_model_name_or_path": None,
    "inference_mode": True,
  }
  from alignax.distributed import is_writer, to_host

  # Every process gathers (a collective on several hosts); only the writer touches the disk.
  host = {k: jnp.asarray(np.ascontiguousarray(to_host(v))) for k, v in sorted(tensors.items())}
  if not is_writer():
    return
  directory = Path(path)
  directory.mkdir(parents=True, exist_ok=True)
  safetensors.flax.save_file(host, directory / ADAPTER_WEIGHTS_NAME, metadata={"format": "pt"})
  (directory / ADAPTER_CONFIG_NAME).write_text(json.dumps(peft_config, indent=2, sort_keys=True))


# PEFT options that change what the tensors mean; only their neutral values can be loaded.
_NEUTRAL_PEFT_OPTIONS = {
  "use_dora": (False, None),
  "bias": ("none", None),
  "modules_to_save": (None, []),
  "rank_pattern": ({}, None),
  "alpha_pattern": ({}, None),
}


def _read_adapter_config(directory: Path) -> LoRAConfig:
  """The adapter settings of ``adapter_config.json`` (targets filled in by the caller)."""
  for name in (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME):
    if not (directory / name).is_file():
      raise FileNotFoundError(f"{directory / name} does not exist; save_lora writes both files")
  peft = json.loads((directory / ADAPTER_CONFIG_NAME).read_text())
  if peft.get("peft_type", "LORA") != "LORA":
    raise ValueError(f"adapter_config.json: peft_type={peft['peft_type']!r}; only LORA loads")
  for key, neutral in _NEUTRAL_PEFT_OPTIONS.items():
    if key in peft and peft[key] not in neutral:
      raise ValueError(f"adapter_config.json: {key}={peft[key]!r} is not supported")
  return LoRAConfig(
    rank=int(peft["r"]),
    alpha=float(peft.get("lora_alpha", 8)),  # PEFT's default
    dropout=float(peft.get("lora_dropout", 0.0)),
    use_rslora=bool(peft.get("use_rslora", False)),
  )


def load_lora(
  model: nnx.Module, path: str | os.PathLike[str], *, rngs: nnx.Rngs | None = None
) -> tuple[str, ...]:
  """Loads adapters written by :func:`save_lora` (or by PEFT) into ``model``, in place.

  The adapted projections are those the file has tensors for. A model without adapters gets them
  (as from :func:`apply_lora`, then overwritten); a model that has adapters must have them on the
  same projections with the same rank, alpha and rsLoRA. Every name and shape is checked before any
  value is written; values are cast to the parameter dtype and keep the existing sharding.

  Args:
    model: the base model the adapters were trained on (same architecture).
    path: directory with ``adapter_model.safetensors`` and ``adapter_config.json``.
    rngs: dropout randomness of new adapters (default ``nnx.Rngs(0)``; ``A`` is overwritten).

  Returns:
    The dotted paths of the adapted projections.

  Raises:
    FileNotFoundError: a file is missing.
    ValueError: PEFT options other than plain LoRA (DoRA, per-module ranks, trained biases, extra
      modules); tensors that name no projection, missing or mis-shaped tensors (listed by name);
      existing adapters on other projections or with other settings.
  """
  directory = Path(path)
  settings = _read_adapter_config(directory)
  weights_path = directory / ADAPTER_WEIGHTS_NAME
  with safe_open(weights_path, framework="flax") as f:
    shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
  linears = dict(iter_linears(model))
  names = _module_names(model)
  layer_paths = {p: _per_layer(p, linear) for p, linear in linears.items()}
  # A stacked projection is adapted on every layer or none: any layer named in the file adapts it
  # (its other layers are then reported missing).
  adapted = [
    p for p in linears
    if any(f"{PEFT_PREFIX}{names[n]}.lora_A.weight" in shapes for n, _ in layer_paths[p])
  ]

  wanted = {}
  for p in adapted:
    linear = linears[p]
    for n, layer in layer_paths[p]:
      key = PEFT_PREFIX + names[n]
      wanted[f"{key}.lora_A.weight"] = (p, layer, "lora_a", (settings.rank, linear.in_features))
      wanted[f"{key}.lora_B.weight"] = (p, layer, "lora_b", (linear.out_features, settings.rank))
  problems = [] if adapted else ["no lora_A tensor names a projection of the model"]
  if unexpected := sorted(set(shapes) - set(wanted)):
    problems.append(f"tensors that name no projection of the model: {unexpected}")
  if missing := sorted(set(wanted) - set(shapes)):
    problems.append(f"missing tensors: {missing}")
  if misshaped := [
    f"{k}: file {list(shapes[k])}, model {list(shape)}"
    for k, (_, _, _, shape) in sorted(wanted.items())
    if k in shapes and shapes[k] != shape
  ]:
    problems.append("mis-shaped tensors: " + "; ".join(misshaped))
  existing = [p for p, linear in linears.items() if isinstance(linear.lora, LoRA)]
  if existing and existing != adapted:
    problems.append(
      f"the model's adapters sit on {existing}, the file's on {adapted}; load into the base model"
    )
  for p in existing:
    if _delta_settings(linears[p].lora.config) != _delta_settings(settings):
      problems.append(
        f"{p}: (rank, alpha, rslora) {_delta_settings(linears[p].lora.config)} in the model, "
        f"{_delta_settings(settings)} in the file"
      )
  if problems:
    raise ValueError(f"{weights_path} does not fit the model: " + " | ".join(problems))

  if not existing:
    config = dataclasses.replace(settings, target_modules=tuple(adapted))
    apply_lora(model, config, rngs=nnx.Rngs(0) if rngs is None else rngs)
  grouped: dict[tuple[str, str], list[tuple[int | None, str]]] = {}
  for key, (p, layer, attr, _) in wanted.items():
    grouped.setdefault((p, attr), []).append((layer, key))
  with safe_open(weights_path, framework="flax") as f:
    for (p, attr), keys in grouped.items():
      variable = getattr(linears[p].lora, attr)
      old = variable[...]
      parts = [f.get_tensor(key).T.astype(old.dtype) for _, key in sorted(keys, key=_layer_order)]
      value = parts[0] if keys[0][0] is None else jnp.stack(parts)
      variable[...] = jax.device_put(value, old.sharding)
  return tuple(n for p in adapted for n, _ in layer_paths[p])


def _layer_order(entry: tuple[int | None, str]) -> int:
  return -1 if entry[0] is None else entry[0]
