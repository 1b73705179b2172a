"""Batched KV-cache generation: one prefill, then a jitted ``lax.while_loop`` of decode steps.

Shapes are static inside the compiled function: prompts are left-packed on the host and padded to a
bucketed length (:func:`bucket_length`), the cache has ``bucket + max_new_tokens`` slots, and the
output buffers are ``[B·G, max_new_tokens]``. The loop stops as soon as every row has emitted a stop
token (or after ``max_new_tokens``). One compiled function serves every call with the same model
structure, batch size, prompt bucket and static settings (``max_new_tokens``, ``num_samples``,
``top_k``, ``greedy``, which filters are on, the stop ids); temperature, top-p and min-p values are
traced, so changing them does not recompile.
"""

import dataclasses
import functools
import json
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from alignax import _validate
from alignax.models.decoder import BTKD, CausalLM, KVCache
from alignax.models.layers import LAYERS
from alignax.sampling.processors import check_sampling_args, min_p_keep, top_p_keep_sorted
from alignax.sharding import batch_sharding, constrain, current_mesh

# Prompt buckets: powers of two from MIN_BUCKET, then multiples of LARGE_BUCKET_STEP.
MIN_BUCKET = 16
LARGE_BUCKET_STEP = 1024


class SampleOutput(NamedTuple):
  """What :func:`generate` returns, rows ``b·G + g`` (prompt ``b``, sample ``g``).

  Attributes:
    tokens: ``[N, M]`` completion ids (``N = B·num_samples``, ``M = max_new_tokens``), the stop
      token included, ``pad_token_id`` after it.
    completion_mask: ``[N, M]`` True on generated tokens (up to and including the stop token).
    logprobs: ``[N, M]`` fp32 log-probability of each generated token under the processed
      distribution it was drawn from (0 on padding).
    lengths: ``[N]`` int32 number of generated tokens.
    stopped: ``[N]`` True where the row ended on a stop token (False: truncated at ``M``).
    prompt_ids: ``[N, P]`` the prompts, left-padded to the bucket length ``P`` and repeated per
      sample; ``concat([prompt_ids, tokens], 1)`` is the full sequence.
    prompt_mask: ``[N, P]`` True on real prompt tokens.
  """

  tokens: Int[Array, "N M"]
  completion_mask: Bool[Array, "N M"]
  logprobs: Float[Array, "N M"]
  lengths: Int[Array, " N"]
  stopped: Bool[Array, " N"]
  prompt_ids: Int[Array, "N P"]
  prompt_mask: Bool[Array, "N P"]


@dataclasses.dataclass(frozen=True)
class _Static:
  """The settings that fix the compiled function (hashable: a ``jit`` static argument)."""

  max_new_tokens: int
  num_samples: int
  greedy: bool
  top_k: int | None
  use_top_p: bool
  use_min_p: bool
  stop_token_ids: tuple[int, ...]
  pad_token_id: int


def bucket_length(length: int) -> int:
  """The padded prompt length: the next power of two (at least 16) up to 1024, then the next
  multiple of 1024, so a run compiles a handful of prompt shapes rather than one per batch."""
  _validate.positive_int("length", length)
  if length <= LARGE_BUCKET_STEP:
    return max(MIN_BUCKET, 1 << (length - 1).bit_length())
  return -(-length // LARGE_BUCKET_STEP) * LARGE_BUCKET_STEP


def default_stop_token_ids(model: CausalLM) -> tuple[int, ...]:
  """``eos_token_id`` of the model's ``config.json`` (an int or a list); ``()`` when it has none.

  A loaded model carries its ``config.json`` only; the ``generation_config.json`` beside it, which
  is where Llama-3 and Qwen chat checkpoints list all their EOS ids, is read from the checkpoint
  by :func:`checkpoint_stop_token_ids`.
  """
  eos = model.config.hf_config.get("eos_token_id")
  if eos is None:
    return ()
  return tuple(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]))


def _eos_ids(path: str) -> tuple[int, ...] | None:
  """The ``eos_token_id`` entry of a JSON config file as ids; None without the file or entry."""
  if not os.path.exists(path):
    return None
  with open(path) as f:
    eos = json.load(f).get("eos_token_id")
  if eos is None:
    return None
  values = eos if isinstance(eos, list) else [eos]
  for value in values:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
      raise ValueError(f"{path}: eos_token_id must be a non-negative int or a list of them, got "
                       f"{eos!r}")
  return tuple(values)


def checkpoint_stop_token_ids(
  path_or_id: str | os.PathLike, *, revision: str | None = None
) -> tuple[int, ...]:
  """The ids that end a completion of a checkpoint: every ``eos_token_id`` of its
  ``generation_config.json``, then those of its ``config.json`` not already listed.

  ``transformers``' ``generate`` stops on all of ``generation_config.json``'s ids, and chat
  checkpoints list several there while ``config.json`` (what :func:`default_stop_token_ids` reads)
  may hold one: Llama-3-Instruct ends a turn with ``<|eot_id|>`` (128009) beside ``<|end_of_text|>``
  (128001), Qwen2.5-Instruct with ``<|im_end|>`` (151645) beside ``<|endoftext|>`` (151643). A
  sampler that stops on the ``config.json`` id alone runs past the end of the turn until
  ``max_new_tokens``. ``config.json``'s ids are kept as well, so the set is never smaller than
  that default.

  Args:
    path_or_id: a checkpoint directory or a hub id (only its two config files are fetched).
    revision: hub branch, tag or commit of a hub id.

  Returns:
    The ids, without repeats; ``()`` when neither file names one. Pass them as
    ``generate(..., stop_token_ids=...)``.

  Raises:
    ValueError: an ``eos_token_id`` that is not a non-negative int or a list of them (the file
      named).
    FileNotFoundError, OSError: a directory or hub id that cannot be resolved (see
      :func:`alignax.models.hub.resolve_pretrained`).
  """
  from alignax.models.hub import CONFIG_FILES, resolve_pretrained

  directory = resolve_pretrained(path_or_id, revision=revision, allow_patterns=CONFIG_FILES)
  generation = _eos_ids(os.path.join(directory, "generation_config.json")) or ()
  model = _eos_ids(os.path.join(directory, "config.json")) or ()
  return tuple(dict.fromkeys((*generation, *model)))


def _left_pack(
  ids: np.ndarray, mask: np.ndarray, length: int, pad: int
) -> tuple[np.ndarray, np.ndarray]:
  """Each row's real tokens moved to the right end of a ``[B, length]`` row (left padding).

  Equivalent for the decoder: default positions count real tokens only and pads are never
  attended, so removing pads between real tokens changes nothing.
  """
  b = ids.shape[0]
  counts = mask.sum(axis=1)
  packed_ids = np.full((b, length), pad, np.int32)
  packed_mask = np.zeros((b, length), bool)
  for row in range(b):
    n = int(counts[row])
    packed_ids[row, length - n :] = ids[row][mask[row]]
    packed_mask[row, length - n :] = True
  return packed_ids, packed_mask


def _repeat_cache(cache: KVCache, repeats: int, model: CausalLM) -> KVCache:
  """Each row of the prefilled cache ``repeats`` times in a row (``b·G + g``), sharded as before."""
  mesh, rules = model.model.mesh, model.model.rules
  kv_axes = (LAYERS, *BTKD)

  def repeat(a: Array, axes: tuple[str | None, ...], axis: int) -> Array:
    return constrain(jnp.repeat(a, repeats, axis=axis), axes, mesh, rules)

  return KVCache(
    keys=repeat(cache.keys, kv_axes, 1),
    values=repeat(cache.values, kv_axes, 1),
    valid=repeat(cache.valid, ("activation_batch", "activation_length"), 0),
    index=cache.index,
  )


def _sample(
  logits: Float[Array, "N V"],
  key: Array,
  temperature: Float[Array, ""],
  top_p: Float[Array, ""],
  min_p: Float[Array, ""],
  static: _Static,
) -> tuple[Int[Array, " N"], Float[Array, " N"]]:
  """One token per row and its log-probability under the processed distribution."""
  logits = logits.astype(jnp.float32)
  if static.greedy:
    token = jnp.argmax(logits, axis=-1)
    logprob = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), token[:, None], -1)[:, 0]
    return token.astype(jnp.int32), logprob
  x = logits / temperature
  vocab = x.shape[-1]
  if static.top_k is not None and static.top_k < vocab:
    # Work among the k candidates only: already sorted, so top-p needs no sort over V.
    candidates, index = jax.lax.top_k(x, static.top_k)
  elif static.use_top_p:
    index = jnp.argsort(-x, axis=-1)
    candidates = jnp.take_along_axis(x, index, -1)
  else:
    candidates, index = x, None
  if static.use_top_p:
    candidates = top_p_keep_sorted(candidates, top_p)
  if static.use_min_p:
    candidates = min_p_keep(candidates, min_p)
  choice = jax.random.categorical(key, candidates, axis=-1)
  logprob = jnp.take_along_axis(jax.nn.log_softmax(candidates, -1), choice[:, None], -1)[:, 0]
  token = choice if index is None else jnp.take_along_axis(index, choice[:, None], -1)[:, 0]
  return token.astype(jnp.int32), logprob


@functools.partial(jax.jit, static_argnames=("graphdef", "static"))
def _generate(
  graphdef: nnx.GraphDef,
  state: Any,
  input_ids: Int[Array, "B P"],
  attention_mask: Bool[Array, "B P"],
  key: Array,
  temperature: Float[Array, ""],
  top_p: Float[Array, ""],
  min_p: Float[Array, ""],
  *,
  static: _Static,
) -> SampleOutput:
  model = nnx.merge(graphdef, state)
  mesh, rules = model.model.mesh, model.model.rules
  b, p = input_ids.shape
  g, m = static.num_samples, static.max_new_tokens
  n = b * g
  stop_ids = jnp.asarray(static.stop_token_ids or (-1,), jnp.int32)

  # Prefill each prompt once, then copy its cache per sample (rows b·G + g).
  cache = model.init_cache(b, p + m)
  prefill = model(input_ids, attention_mask, cache=cache, compute_logits=False)
  logits = model.logits(prefill.hidden_states[:, -1])  # left padding: the last column is real
  cache = prefill.cache
  if g > 1:
    cache = _repeat_cache(cache, g, model)
    logits = jnp.repeat(logits, g, axis=0)

  def emit(carry, logits):
    step, tokens, logprobs, lengths, finished, cache = carry
    token, logprob = _sample(logits, jax.random.fold_in(key, step), temperature, top_p, min_p,
                             static)
    live = ~finished
    token = jnp.where(live, token, static.pad_token_id)
    logprob = jnp.where(live, logprob, 0.0)
    tokens = jax.lax.dynamic_update_slice(tokens, token[:, None], (0, step))
    logprobs = jax.lax.dynamic_update_slice(logprobs, logprob[:, None], (0, step))
    hit_stop = live & jnp.isin(token, stop_ids)
    # A row finishes only on a stop token, so `finished` at the end is also "stopped".
    return step + 1, tokens, logprobs, lengths + live, finished | hit_stop, cache

  batch_axes = ("activation_batch", "activation_length")
  tokens = constrain(jnp.full((n, m), static.pad_token_id, jnp.int32), batch_axes, mesh, rules)
  logprobs = constrain(jnp.zeros((n, m), jnp.float32), batch_axes, mesh, rules)
  carry = (jnp.int32(0), tokens, logprobs, jnp.zeros((n,), jnp.int32), jnp.zeros((n,), bool), cache)
  carry = emit(carry, logits)

  def not_done(carry):
    step, *_, finished, _ = carry
    return (step < m) & ~jnp.all(finished)

  def decode(carry):
    step, tokens, *_, cache = carry
    # Merged inside the loop body: the module's variables belong to this trace.
    body_model = nnx.merge(graphdef, state)
    previous = jax.lax.dynamic_index_in_dim(tokens, step - 1, axis=1, keepdims=False)
    out = body_model.decode_step(previous, cache)
    return emit((*carry[:-1], out.cache), out.logits[:, 0])

  if m > 1:  # one token needs no decode step (and no compiled loop body)
    carry = jax.lax.while_loop(not_done, decode, carry)
  _, tokens, logprobs, lengths, stopped, _ = carry
  completion_mask = jnp.arange(m)[None, :] < lengths[:, None]
  prompt_ids = jnp.repeat(input_ids, g, axis=0)
  prompt_mask = jnp.repeat(attention_mask, g, axis=0)
  return SampleOutput(tokens, completion_mask, logprobs, lengths, stopped, prompt_ids, prompt_mask)


def generate(
  model: nnx.Module,
  input_ids: Any,
  attention_mask: Any,
  *,
  max_new_tokens: int,
  temperature: float | int = 1.0,
  top_k: int | None = None,
  top_p: float | int | None = None,
  min_p: float | int | None = None,
  greedy: bool = False,
  stop_token_ids: tuple[int, ...] | list[int] | None = None,
  pad_token_id: int | None = None,
  num_samples: int = 1,
  key: Array | None = None,
) -> SampleOutput:
  """Samples ``y_t ~ softmax(process(logits_t))`` autoregressively with a KV cache.

  ``process`` is temperature, then top-k, top-p (Holtzman et al., 2020) and min-p (Nguyen et al.,
  2024), the order of ``transformers`` (see :func:`alignax.sampling.process_logits`); ``greedy``
  takes ``argmax logits_t`` instead (``transformers``' ``do_sample=False``). The prompt is
  prefilled once per prompt and its cache copied to the ``num_samples`` rows ``b·G + g`` (GRPO's
  ``[P, G, T]`` layout); a jitted ``lax.while_loop`` then decodes one token per step for every row,
  ending when all rows have produced a stop token or after ``max_new_tokens``. On a model placed on
  a mesh (``from_pretrained(mesh=...)``) the batch is split over ``(data, fsdp)``.

  Args:
    model: a :class:`alignax.models.CausalLM` (LoRA adapters included as they are).
    input_ids: ``[B, T]`` integer prompt ids; left, right or inner padding (real tokens are moved
      to the right end on the host, then the row is left-padded to :func:`bucket_length`).
    attention_mask: ``[B, T]`` True / 1 on real tokens; every row needs at least one.
    max_new_tokens: ``M``, the most tokens generated per row (> 0).
    temperature: divides the logits (> 0); ignored when ``greedy``.
    top_k, top_p, min_p: the filters (None: off); ``top_p`` in ``(0, 1]``, ``min_p`` in ``[0, 1]``.
    greedy: take the most likely token (ties: the lowest id); the filters are then ignored.
    stop_token_ids: ids that end a row (kept in the completion). None (default) takes the
      ``eos_token_id`` of the model's ``config.json`` (an int or a list); ``()`` never stops early.
      The model does not carry its ``generation_config.json``: pass
      ``checkpoint_stop_token_ids(path)`` here to stop on all of its EOS ids, as ``transformers``
      does.
    pad_token_id: filler after a row's end; default the config's ``pad_token_id``, else the first
      stop id, else 0.
    num_samples: ``G`` completions per prompt (>= 1).
    key: a ``jax.random`` key, required unless ``greedy`` (step ``t`` uses ``fold_in(key, t)``).

  Returns:
    :class:`SampleOutput` with ``N = B·G`` rows; ``logprobs`` are under the processed distribution
    (the temperature-scaled, filtered one), or under the plain model distribution when ``greedy``.

  Raises:
    ValueError: ``max_new_tokens`` or ``num_samples`` below 1, a hyper-parameter out of range,
      ``attention_mask`` of another shape than ``input_ids``, a row without real tokens, a prompt
      plus ``max_new_tokens`` longer than the model's ``max_position_embeddings``, a token id
      outside the vocabulary, or no ``key`` for sampling; each names the argument (and the row).
    TypeError: ``model`` is not a :class:`CausalLM`, or the ids / mask have the wrong dtype.
  """
  if not isinstance(model, CausalLM):
    raise TypeError(f"model must be an alignax CausalLM, got {type(model).__name__}")
  _validate.positive_int("max_new_tokens", max_new_tokens)
  _validate.positive_int("num_samples", num_samples)
  if not greedy:
    check_sampling_args(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    if key is None:
      raise ValueError("key is required when sampling (greedy=False): pass jax.random.key(seed)")
  ids = np.asarray(_validate.integer_array("input_ids", input_ids))
  mask = np.asarray(_validate.attention_mask("attention_mask", attention_mask))
  if ids.ndim != 2:
    raise ValueError(f"input_ids must be [batch, time], got shape {list(ids.shape)}")
  _validate.same_shape({"input_ids": ids, "attention_mask": mask})
  config = model.config
  counts = mask.sum(axis=1)
  if ids.shape[0] == 0:
    raise ValueError("input_ids has no rows")
  empty = np.flatnonzero(counts == 0)
  if len(empty):
    raise ValueError(
      f"attention_mask row {int(empty[0])} has no real token; every prompt needs one"
    )
  bad = np.argwhere(mask & ((ids < 0) | (ids >= config.vocab_size)))
  if len(bad):
    row, col = (int(i) for i in bad[0])
    raise ValueError(
      f"input_ids[{row}, {col}] = {int(ids[row, col])} is outside the vocabulary "
      f"[0, {config.vocab_size})"
    )
  longest = int(counts.max())
  limit = config.max_position_embeddings
  if longest + max_new_tokens > limit:
    row = int(np.argmax(counts))
    raise ValueError(
      f"prompt row {row} has {longest} tokens; with max_new_tokens={max_new_tokens} that is "
      f"{longest + max_new_tokens} positions, more than the model's max_position_embeddings={limit}"
    )

  stops = default_stop_token_ids(model) if stop_token_ids is None else tuple(
    int(s) for s in stop_token_ids
  )
  for s in stops:
    if not 0 <= s < config.vocab_size:
      raise ValueError(f"stop_token_ids holds {s}, outside the vocabulary [0, {config.vocab_size})")
  if pad_token_id is None:
    pad_token_id = (
      config.pad_token_id if config.pad_token_id is not None else (stops[0] if stops else 0)
    )
  if not 0 <= int(pad_token_id) < config.vocab_size:
    raise ValueError(
      f"pad_token_id={pad_token_id} is outside the vocabulary [0, {config.vocab_size})"
    )

  # The bucket never runs past the position table (a learned one cannot hold more slots).
  length = min(bucket_length(longest), limit - max_new_tokens)
  ids, mask = _left_pack(ids, mask, length, int(pad_token_id))
  static = _Static(
    max_new_tokens=max_new_tokens, num_samples=num_samples, greedy=bool(greedy),
    top_k=None if greedy else top_k, use_top_p=not greedy and top_p is not None,
    use_min_p=not greedy and min_p is not None, stop_token_ids=stops,
    pad_token_id=int(pad_token_id),
  )
  mesh = current_mesh(model.model.mesh)
  if mesh is not None and not isinstance(mesh, jax.sharding.AbstractMesh):
    sharding = batch_sharding(mesh, 2, model.model.rules, batch_size=ids.shape[0])
    ids, mask = jax.device_put(ids, sharding), jax.device_put(mask, sharding)
  graphdef, state = nnx.split(model)
  return _generate(
    graphdef, state, jnp.asarray(ids), jnp.asarray(mask),
    jax.random.key(0) if key is None else key,
    jnp.float32(1.0 if greedy else temperature),
    jnp.float32(1.0 if top_p is None else top_p),
    jnp.float32(0.0 if min_p is None else min_p),
    static=static,
  )
