"""Scalar heads on the decoder body: per-token values (PPO critic) and sequence scores (rewards).

Both use one bias-free ``score`` projection ``[d, num_labels]`` on the final hidden states, the
layout of Hugging Face ``*ForSequenceClassification`` checkpoints (``score.weight``), so either
loads from and saves to such a checkpoint; a critic is the ``num_labels = 1`` case read at every
token, as in TRL.
"""

from typing import NamedTuple

import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int, Shaped

from alignax.aggregation import last_valid_token
from alignax.models.config import DecoderConfig
from alignax.models.decoder import IntLike, Transformer
from alignax.models.hub import parse_dtype
from alignax.models.layers import DType, Linear


class ScoreOutput(NamedTuple):
  """Head outputs.

  Attributes:
    scores: ``[B, T]`` values (:class:`ValueModel`) or ``[B, num_labels]`` (:class:`RewardModel`).
    hidden_states: ``[B, T, d]`` after the final norm.
  """

  scores: Float[Array, "..."]
  hidden_states: Float[Array, "B T d"]


class _ScoredDecoder(nnx.Module):
  def __init__(
    self,
    config: DecoderConfig,
    *,
    num_labels: int,
    dtype: DType = jnp.float32,
    param_dtype: DType = jnp.float32,
    remat: str | None = None,
    attention_impl: str = "auto",
    rngs: nnx.Rngs,
  ):
    dtype = parse_dtype(dtype, name="dtype")
    param_dtype = parse_dtype(param_dtype, name="param_dtype")
    self.config = config
    self.model = Transformer(
      config, dtype=dtype, param_dtype=param_dtype, remat=remat, attention_impl=attention_impl,
      rngs=rngs,
    )
    self.score = Linear(
      config.hidden_size,
      num_labels,
      use_bias=False,
      dtype=dtype,
      param_dtype=param_dtype,
      kernel_axes=("embed", None),
      rngs=rngs,
    )

  def _hidden_and_scores(
    self,
    input_ids: Int[IntLike, "B T"],
    attention_mask: Shaped[IntLike, "B T"] | None,
    positions: Int[IntLike, "B T"] | None,
    segment_ids: Int[IntLike, "B T"] | None,
  ) -> tuple[Float[Array, "B T d"], Float[Array, "B T L"]]:
    hidden, _ = self.model(input_ids, attention_mask, positions, segment_ids)
    # Accumulated in fp32 from compute-dtype inputs, as the LM head: a bf16 output would round a
    # value or reward to ~3 significant digits. An adapter on the head adds its term as usual.
    score = self.score
    scores = jnp.einsum(
      "...d,dl->...l", hidden.astype(score.dtype), score.kernel[...].astype(score.dtype),
      preferred_element_type=jnp.float32,
    )
    if score.lora is not None:
      scores = scores + score.lora(hidden).astype(jnp.float32)
    return hidden, scores


class ValueModel(_ScoredDecoder):
  """``V(s_t) = wᵀ h_t`` for every token: the critic of PPO (Schulman et al., 2017)."""

  def __init__(self, config: DecoderConfig, **kwargs):
    super().__init__(config, num_labels=1, **kwargs)

  def __call__(
    self,
    input_ids: Int[IntLike, "B T"],
    attention_mask: Shaped[IntLike, "B T"] | None = None,
    positions: Int[IntLike, "B T"] | None = None,
    segment_ids: Int[IntLike, "B T"] | None = None,
  ) -> ScoreOutput:
    """Values ``[B, T]`` (fp32) and final hidden states; arguments as :class:`CausalLM`."""
    hidden, scores = self._hidden_and_scores(input_ids, attention_mask, positions, segment_ids)
    return ScoreOutput(scores[..., 0], hidden)


class RewardModel(_ScoredDecoder):
  """``r(x) = W h_last``: the score of the last real token, as ``*ForSequenceClassification``.

  The last real token is the last one that the attention mask keeps and that is not the config's
  ``pad_token_id`` (transformers' rule, so a checkpoint scores the same in both libraries).

  A Bradley-Terry reward model (Ouyang et al., 2022) is the ``num_labels = 1`` case.
  """

  def __init__(self, config: DecoderConfig, **kwargs):
    super().__init__(config, num_labels=config.num_labels, **kwargs)

  def __call__(
    self,
    input_ids: Int[IntLike, "B T"],
    attention_mask: Shaped[IntLike, "B T"] | None = None,
    positions: Int[IntLike, "B T"] | None = None,
    segment_ids: Int[IntLike, "B T"] | None = None,
  ) -> ScoreOutput:
    """Scores ``[B, num_labels]`` (fp32) of each row's last real token, and final hidden states."""
    hidden, scores = self._hidden_and_scores(input_ids, attention_mask, positions, segment_ids)
    b, t = hidden.shape[:2]
    mask = jnp.ones((b, t), bool) if attention_mask is None else jnp.asarray(attention_mask, bool)
    if self.config.pad_token_id is not None:
      # transformers reads the last token that is not the pad id. Where pad == EOS (TRL's usual
      # set-up) that is the token before a trailing EOS: reading the EOS instead would score
      # differently from the exported checkpoint in transformers.
      mask = mask & (jnp.asarray(input_ids) != self.config.pad_token_id)
    # The read-out as a one-hot contraction: an empty row scores 0 instead of reading a pad.
    last = last_valid_token(mask).astype(scores.dtype)
    return ScoreOutput(jnp.einsum("bt,btl->bl", last, scores), hidden)
