"""Reward models as reward sources, and ensembles of them.

:class:`RewardModelScorer` wraps an alignax :class:`~alignax.models.RewardModel` (trained with
alignax's reward objective, or any Hugging Face ``*ForSequenceClassification`` checkpoint loaded
with ``from_pretrained(path, head="score")``, see :func:`load_reward_model`) and its tokenizer. It
is a reward function under TRL's contract, taking **text**: each prompt + completion is tokenised
with the reward model's own tokenizer (which need not be the policy's), so a reward model with
another vocabulary works. The tokenisation is the one the alignax data pipeline gives a preference
pair, so a reward model scores sequences laid out as it was trained on:

- plain text: ``tokenizer(prompt)`` (with the tokenizer's special tokens, BOS where it adds one) +
  ``tokenizer(completion, add_special_tokens=False)`` + EOS (``append_eos``, skipped when the
  completion already ends with it);
- conversational: the chat template over ``prompt + [assistant completion]``, tokenised without
  special tokens.

Callers that hold token ids in the reward model's vocabulary use
:meth:`RewardModelScorer.score_ids`.
Rows are right-padded into fixed-size batches (``batch_size`` rows, lengths rounded up to a power of
two, at least 16), so a run compiles the jitted forward once per length bucket, not once per batch.
The score is column 0 of the head (TRL's ``logits[:, 0]``) at each row's last real token.

:class:`RewardEnsemble` combines several reward sources per sample by ``mean``, ``min`` (the
worst-case optimisation of Coste et al., 2024) or ``mean - k·std`` (an uncertainty penalty in the
spirit of their uncertainty-weighted optimisation, with the standard deviation instead of the
variance so ``k`` is in reward units): a completion that only one member likes gets a low ``min``
and a large spread.
"""

import functools
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import transformers
from flax import nnx

from alignax import _validate
from alignax.models.checkpoint import from_pretrained
from alignax.models.heads import RewardModel
from alignax.models.layers import DType
from alignax.models.tokenizer import apply_chat_template, load_tokenizer
from alignax.rewards.contract import (
  RewardFunctionError,
  check_rewards,
  completion_text,
  is_async_source,
  is_conversational,
  reward_name,
  source_label,
)
from alignax.sharding import DEFAULT_RULES, batch_sharding

ENSEMBLE_MODES = ("mean", "min", "mean_minus_std")
MIN_BUCKET = 16


def _bucket(length: int, max_length: int | None) -> int:
  size = MIN_BUCKET
  while size < length:
    size *= 2
  return size if max_length is None else min(size, max(max_length, length))


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef: Any, state: Any, input_ids: jax.Array, attention_mask: jax.Array
             ) -> jax.Array:
  # The graph definition is static, so scorers of one architecture (an ensemble's members) share
  # each length bucket's compilation.
  return nnx.merge(graphdef, state)(input_ids, attention_mask).scores[:, 0]


class RewardModelScorer:
  """A reward model (and its tokenizer) as a batched, jitted reward function.

  Args:
    model: a :class:`~alignax.models.RewardModel`; its parameters are captured when the scorer is
      built (reward models are frozen during RL).
    tokenizer: the reward model's tokenizer (needs a pad or EOS token).
    name: the logging name (``rewards/{name}/mean``).
    batch_size: rows per forward; the last batch is filled up with one-token rows.
    max_length: longest sequence accepted (tokens); a longer prompt + completion is a named error
      rather than a silent truncation that would drop the last token the score is read at. None:
      no limit.
    append_eos: end plain-text completions with EOS, as the data pipeline does for training pairs.
    chat_template: a Jinja template overriding the tokenizer's, for conversational rows.
  """

  def __init__(
    self,
    model: RewardModel,
    tokenizer: transformers.PreTrainedTokenizerBase,
    *,
    name: str = "reward_model",
    batch_size: int = 8,
    max_length: int | None = None,
    append_eos: bool = True,
    chat_template: str | None = None,
  ):
    if not isinstance(model, RewardModel):
      raise TypeError(
        f"model must be an alignax RewardModel (from_pretrained(path, head='score')), got "
        f"{type(model).__name__}"
      )
    _validate.positive_int("batch_size", batch_size)
    if max_length is not None:
      _validate.positive_int("max_length", max_length)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
      raise ValueError("the reward model's tokenizer has neither a pad nor an EOS token")
    self.name = name
    self.tokenizer = tokenizer
    self.batch_size = batch_size
    self.max_length = max_length
    self.append_eos = append_eos
    self.chat_template = chat_template
    self.pad_id = int(pad)
    # A model placed on a mesh (from_pretrained(mesh=...)) gets its batches split over the batch
    # axes that divide batch_size; the activations then stay where the parameters' rules put them.
    mesh = getattr(model.model, "mesh", None)
    self._input_sharding = None if mesh is None else batch_sharding(
      mesh, 2, getattr(model.model, "rules", DEFAULT_RULES), batch_size=batch_size
    )
    self._graphdef, self._state = nnx.split(model)

  # --- tokenisation --------------------------------------------------------------------------

  def encode(self, prompt: Any, completion: Any) -> list[int]:
    """Token ids of one prompt + completion, as the module docstring describes."""
    tokenizer = self.tokenizer
    if is_conversational(prompt):
      reply = (completion if is_conversational(completion)
               else [{"role": "assistant", "content": completion_text(completion)}])
      text = apply_chat_template(
        tokenizer, [dict(m) for m in prompt] + [dict(m) for m in reply],
        chat_template=self.chat_template,
      )
      return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if not isinstance(prompt, str):
      raise ValueError(f"a prompt must be a string or a list of messages, got {prompt!r}")
    ids = list(tokenizer(prompt)["input_ids"])
    ids += list(tokenizer(completion_text(completion), add_special_tokens=False)["input_ids"])
    eos = tokenizer.eos_token_id
    if self.append_eos and eos is not None and (not ids or ids[-1] != eos):
      ids.append(eos)
    return ids

  # --- scoring -------------------------------------------------------------------------------

  def score_ids(self, sequences: Sequence[Any] | np.ndarray) -> np.ndarray:
    """Scores ``[B]`` (float32) of token-id sequences (no padding; one list per row).

    Raises:
      ValueError: an empty row, or a row longer than ``max_length`` (named by index).
    """
    rows = [list(map(int, s)) for s in sequences]
    for i, row in enumerate(rows):
      if not row:
        raise ValueError(f"sequence {i} is empty; a reward model needs at least one token")
      if self.max_length is not None and len(row) > self.max_length:
        raise ValueError(
          f"sequence {i} has {len(row)} tokens, more than max_length={self.max_length}"
        )
    scores = np.empty(len(rows), np.float32)
    for start in range(0, len(rows), self.batch_size):
      chunk = rows[start : start + self.batch_size]
      width = _bucket(max(len(r) for r in chunk), self.max_length)
      ids = np.full((self.batch_size, width), self.pad_id, np.int32)
      mask = np.zeros((self.batch_size, width), np.int32)
      for j, row in enumerate(chunk):
        ids[j, : len(row)] = row
        mask[j, : len(row)] = 1
      mask[len(chunk) :, 0] = 1  # filler rows: one pad token, so no row is empty
      ids, mask = jnp.asarray(ids), jnp.asarray(mask)
      if self._input_sharding is not None:
        ids, mask = jax.device_put((ids, mask), self._input_sharding)
      out = _forward(self._graphdef, self._state, ids, mask)
      scores[start : start + len(chunk)] = np.asarray(out)[: len(chunk)]
    return scores

  def score(self, prompts: Sequence[Any], completions: Sequence[Any]) -> np.ndarray:
    """Scores ``[N]`` (float32) of ``N`` (prompt, completion) pairs given as text or messages."""
    if len(prompts) != len(completions):
      raise ValueError(f"{len(prompts)} prompts for {len(completions)} completions")
    return self.score_ids([self.encode(p, c) for p, c in zip(prompts, completions)])

  def __call__(
    self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any
  ) -> list[float]:
    """TRL's reward-function contract: one float per completion."""
    return self.score(prompts, completions).astype(float).tolist()


def load_reward_model(
  path: str | os.PathLike[str],
  *,
  tokenizer: transformers.PreTrainedTokenizerBase | str | os.PathLike[str] | None = None,
  name: str | None = None,
  dtype: DType = jnp.float32,
  mesh: jax.sharding.Mesh | None = None,
  batch_size: int = 8,
  max_length: int | None = None,
  append_eos: bool = True,
) -> RewardModelScorer:
  """Loads ``--reward_model_name_or_path``: an alignax-exported reward model or any Hugging Face
  ``*ForSequenceClassification`` checkpoint, via ``from_pretrained(path, head="score")``.

  Args:
    path: checkpoint directory (or hub id).
    tokenizer: a tokenizer or its directory; None loads the one saved with the checkpoint.
    name: logging name; default the checkpoint directory's base name (TRL's rule).
    dtype, mesh: as :func:`alignax.models.from_pretrained`.
    batch_size, max_length, append_eos: as :class:`RewardModelScorer`.

  Returns:
    The scorer.
  """
  model = from_pretrained(path, head="score", dtype=dtype, mesh=mesh)
  if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
    tokenizer = load_tokenizer(path if tokenizer is None else tokenizer)
  if name is None:
    name = os.path.basename(os.path.normpath(os.fspath(path))) or "reward_model"
  return RewardModelScorer(model, tokenizer, name=name, batch_size=batch_size,
                           max_length=max_length, append_eos=append_eos)


class RewardEnsemble:
  """Several reward sources combined per sample into one reward.

  With member rewards :math:`r_1 \\dots r_M` of a sample: ``mean`` gives :math:`\\bar r`, ``min``
  gives :math:`\\min_m r_m` (worst-case optimisation, Coste et al., 2024, "Reward Model Ensembles
  Help Mitigate Overoptimization"), ``mean_minus_std`` gives :math:`\\bar r - k\\,\\sigma` with the
  population standard deviation :math:`\\sigma` over members. Members that return None for a sample
  are left out of its statistics; a sample no member scores is None.

  Args:
    members: reward sources (usually :class:`RewardModelScorer`\\ s; any synchronous reward
      function works), each called with the ensemble's arguments.
    mode: ``"mean"``, ``"min"`` or ``"mean_minus_std"``.
    k: the standard-deviation coefficient of ``mean_minus_std`` (>= 0).
    name: the logging name.
  """

  def __init__(
    self, members: Sequence[Any], *, mode: str = "mean", k: float = 1.0,
    name: str = "reward_ensemble",
  ):
    _validate.choice("mode", mode, ENSEMBLE_MODES)
    _validate.non_negative("k", k)
    if not members:
      raise ValueError("members must hold at least one reward source")
    for i, member in enumerate(members):
      if not callable(member):
        raise ValueError(f"members[{i}] is a {type(member).__name__}, not a reward source")
      if is_async_source(member):
        # The members are called one after another and their lists combined at once; a coroutine
        # would reach the combination unawaited.
        raise ValueError(
          f"members[{i}] ({reward_name(member)!r}) is an async function; an ensemble calls its "
          "members synchronously, so pass it to the RewardRunner as a source of its own"
        )
    self.members = list(members)
    self.mode = mode
    self.k = float(k)
    self.name = name

  def member_rewards(
    self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any
  ) -> np.ndarray:
    """``[M, N]`` float64 member rewards (NaN where a member returned None)."""
    rows = []
    for i, member in enumerate(self.members):
      label = f"{source_label(reward_name(member), i)} of ensemble {self.name!r}"
      try:
        output = member(prompts=prompts, completions=completions, **kwargs)
      except Exception as e:
        raise RewardFunctionError(f"{label} raised {type(e).__name__}: {e}") from e
      rows.append(check_rewards(output, count=len(completions), label=label))
    return np.stack(rows)

  def __call__(
    self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any
  ) -> list[float | None]:
    """TRL's reward-function contract: one reward (or None) per completion."""
    values = self.member_rewards(prompts, completions, **kwargs)
    scored = ~np.isnan(values)
    rewards: list[float | None] = []
    for j in range(values.shape[1]):
      column = values[scored[:, j], j]
      if column.size == 0:
        rewards.append(None)
      elif self.mode == "mean":
        rewards.append(float(column.mean()))
      elif self.mode == "min":
        rewards.append(float(column.min()))
      else:
        rewards.append(float(column.mean() - self.k * column.std()))
    return rewards
