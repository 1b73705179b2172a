"""Where a checkpoint comes from and what dtype it runs in: hub ids and dtype names, checked early.

``resolve_pretrained`` turns a local directory or a Hugging Face hub id (``org/name``) into a local
directory, fetching only the files a model load needs (config, safetensors weights and their index,
tokenizer files, generation config) through :func:`huggingface_hub.snapshot_download` and its cache.
``HF_HUB_OFFLINE=1`` (or ``TRANSFORMERS_OFFLINE=1``) is honoured even when set after import: the
cache is then the only source. An id that is neither cached nor reachable is a plain error that
names the id and what to do, never a ``config.json does not exist`` from a directory that was never
there.

``parse_dtype`` turns ``"bf16"``, ``"float32"``, ``jnp.bfloat16``, ``np.dtype("float16")``, ... into
a :class:`numpy.dtype`, so a typo fails when the model is built instead of at its first call.
"""

import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# Always fetched with a model: what ``read_config``, ``load_tokenizer`` and generation read. Weights
# are chosen afterwards from the index (see ``resolve_pretrained``), so repositories that also ship
# ``consolidated.safetensors`` or ``original/*.pth`` copies do not download them.
CONFIG_FILES: tuple[str, ...] = ("config.json", "generation_config.json")
TOKENIZER_FILES: tuple[str, ...] = (
  "tokenizer.json",
  "tokenizer_config.json",
  "special_tokens_map.json",
  "added_tokens.json",
  "tokenizer.model",
  "spiece.model",
  "vocab.json",
  "vocab.txt",
  "merges.txt",
  "chat_template.jinja",
  "chat_template.json",
)
SINGLE_WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"

_TRUE = ("1", "on", "yes", "true")

# Every spelling accepted for a dtype given as a string (lower-cased before lookup).
DTYPE_NAMES: dict[str, Any] = {
  "float32": jnp.float32,
  "fp32": jnp.float32,
  "f32": jnp.float32,
  "bfloat16": jnp.bfloat16,
  "bf16": jnp.bfloat16,
  "float16": jnp.float16,
  "fp16": jnp.float16,
  "f16": jnp.float16,
  "half": jnp.float16,
  "float64": jnp.float64,
  "fp64": jnp.float64,
  "f64": jnp.float64,
}


def parse_dtype(value: Any, *, name: str) -> np.dtype:
  """The floating-point dtype that ``value`` names, or a ValueError naming the argument.

  Args:
    value: a dtype (``jnp.bfloat16``, ``np.float32``, ``np.dtype("float16")``, ...) or one of the
      strings of :data:`DTYPE_NAMES` (``"float32"``/``"fp32"``, ``"bfloat16"``/``"bf16"``,
      ``"float16"``/``"fp16"``, ...), any case.
    name: the argument's name, for the error (``"dtype"``, ``"param_dtype"``).

  Returns:
    The :class:`numpy.dtype` (``bfloat16`` is ml_dtypes', as ``jnp.bfloat16``).

  Raises:
    ValueError: ``"auto"`` (the checkpoint's ``torch_dtype`` is never guessed), an unknown name, a
      non-floating dtype, or float64 without ``jax_enable_x64`` (jax would silently run float32).
  """
  if isinstance(value, str):
    key = value.strip().lower()
    if key == "auto":
      raise ValueError(
        f"{name}='auto' is not supported: alignax does not take the dtype from the checkpoint; "
        f"pass {name}='bfloat16' or {name}='float32'"
      )
    if key not in DTYPE_NAMES:
      raise ValueError(
        f"{name}={value!r} is not a dtype; use one of {sorted(DTYPE_NAMES)} or a jnp dtype"
      )
    dtype = np.dtype(DTYPE_NAMES[key])
  elif value is None or isinstance(value, bool):
    raise ValueError(f"{name}={value!r} is not a dtype; pass e.g. jnp.bfloat16 or 'float32'")
  else:
    try:
      dtype = jnp.dtype(value)
    except TypeError as error:
      raise ValueError(
        f"{name}={value!r} is not a dtype; pass e.g. jnp.bfloat16 or 'float32'"
      ) from error
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"{name} must be a floating-point dtype, got {dtype.name}")
  if dtype.itemsize == 8 and not jax.config.read("jax_enable_x64"):
    raise ValueError(
      f"{name}={dtype.name} needs jax.config.update('jax_enable_x64', True); without it jax "
      "computes in float32"
    )
  return dtype


def _offline() -> bool:
  """Whether the hub must not be contacted (read now, not at import as huggingface_hub does)."""
  from huggingface_hub import constants

  return bool(constants.HF_HUB_OFFLINE) or any(
    os.environ.get(var, "").strip().lower() in _TRUE
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
  )


def is_hub_id(value: str) -> bool:
  """Whether ``value`` has the shape of a hub model id, ``org/name`` (one slash, no path syntax)."""
  from huggingface_hub.errors import HFValidationError
  from huggingface_hub.utils import validate_repo_id

  if value.count("/") != 1:
    return False
  try:
    validate_repo_id(value)
  except HFValidationError:
    return False
  return True


def _weight_files(directory: str) -> list[str]:
  """The weight files a snapshot holding ``directory``'s index (or none) needs."""
  index = os.path.join(directory, WEIGHTS_INDEX)
  if not os.path.exists(index):
    return [SINGLE_WEIGHTS]
  with open(index) as f:
    return sorted(set(json.load(f)["weight_map"].values()))


def resolve_pretrained(
  path_or_id: str | os.PathLike,
  *,
  revision: str | None = None,
  allow_patterns: Sequence[str] | None = None,
  cache_dir: str | os.PathLike | None = None,
) -> str:
  """A local directory holding the checkpoint ``path_or_id`` names, fetched from the hub if needed.

  A local directory is returned as is (``revision`` then does not apply). Otherwise
  ``path_or_id`` must be a hub id ``org/name``: its files are taken from the Hugging Face cache, or
  downloaded into it. With ``allow_patterns=None`` the files are the config and generation config,
  the tokenizer files, the weight index, and then exactly the safetensors shards the index names
  (``model.safetensors`` when there is no index).

  Args:
    path_or_id: a directory, or a hub model id such as ``"meta-llama/Llama-3.1-8B"``.
    revision: hub branch, tag or commit (default: ``main``).
    allow_patterns: glob patterns of the files to fetch, instead of the model's files (e.g.
      :data:`TOKENIZER_FILES` for a tokenizer alone).
    cache_dir: the hub cache directory (default: ``HF_HUB_CACHE``).

  Returns:
    The directory (for a hub id, its snapshot in the cache).

  Raises:
    FileNotFoundError: ``path_or_id`` is a file, or neither a directory nor a hub id.
    OSError: a hub id that is not in the cache while the hub is offline or unreachable, or that
      the hub does not have (or refuses: gated, private) — each says which and what to do.
  """
  path = os.fspath(path_or_id)
  if os.path.isdir(path):
    return path
  if os.path.exists(path):
    raise FileNotFoundError(f"{path!r} is a file; pass the checkpoint directory that holds it")
  if not is_hub_id(path):
    raise FileNotFoundError(
      f"no such directory: {path!r} is not a directory, nor a Hugging Face hub id of the form "
      "'org/name'"
    )

  from huggingface_hub import errors, snapshot_download

  offline = _offline()

  def fetch(patterns: Sequence[str]) -> str:
    return snapshot_download(
      path,
      revision=revision,
      allow_patterns=list(patterns),
      cache_dir=None if cache_dir is None else os.fspath(cache_dir),
      local_files_only=offline,
    )

  where = path if revision is None else f"{path}@{revision}"
  try:
    if allow_patterns is not None:
      return fetch(allow_patterns)
    directory = fetch((*CONFIG_FILES, *TOKENIZER_FILES, WEIGHTS_INDEX))
    return fetch((*CONFIG_FILES, *TOKENIZER_FILES, WEIGHTS_INDEX, *_weight_files(directory)))
  except errors.GatedRepoError as error:
    raise OSError(
      f"hub id {where!r} is gated: accept its licence on huggingface.co and log in "
      f"(`hf auth login` or HF_TOKEN), or pass a directory that holds it ({error})"
    ) from error
  except errors.RepositoryNotFoundError as error:
    raise OSError(
      f"{path!r} is not a local directory, and the hub has no model {path!r} (or it is private: "
      f"log in with `hf auth login` or HF_TOKEN)"
    ) from error
  except errors.RevisionNotFoundError as error:
    raise OSError(f"hub model {path!r} has no revision {revision!r}") from error
  except errors.IncompleteSnapshotError as error:
    raise OSError(
      f"the cached snapshot of hub id {where!r} is incomplete and the hub cannot complete it now: "
      f"{error} Download it again where the hub is reachable, or pass a directory that holds it."
    ) from error
  except errors.LocalEntryNotFoundError as error:
    reason = (
      "the hub is not contacted because HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE is set"
      if offline
      else f"the hub could not be reached ({error})"
    )
    raise OSError(
      f"{path!r} is not a local directory, and as a Hugging Face hub id {where!r} it was not "
      f"found locally (no snapshot in the cache) and {reason}. Download it where the hub is "
      f"reachable (`hf download {path}`) and pass the directory, or copy it into the hub cache."
    ) from error
