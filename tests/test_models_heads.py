"""Value and reward heads: parity with ``*ForSequenceClassification``; heads on causal LMs."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from model_factories import FAMILIES, max_error, padded_batch, run_head, run_lm, saved_checkpoint

import alignax as ax
from alignax import models


def _torch_scores(hf_model, ids, mask, positions):
  with torch.no_grad():
    return hf_model(
      input_ids=torch.as_tensor(ids),
      attention_mask=torch.as_tensor(mask.astype(np.int64)),
      position_ids=torch.as_tensor(positions),
    ).logits.numpy()


def test_reward_read_out_uses_the_last_real_token_and_scores_an_empty_row_zero(tmp_path_factory):
  path, hf_model = saved_checkpoint(tmp_path_factory, "llama", head="score", num_labels=3)
  ids, mask, _ = padded_batch(hf_model.config.vocab_size, seed=2)
  mask[2] = False  # an empty row: no real token to read
  model = models.from_pretrained(path, head="score")
  hidden = run_head(model, jnp.asarray(ids), jnp.asarray(mask)).hidden_states
  per_token = np.asarray(hidden @ model.score.kernel[...])
  scores = np.asarray(run_head(model, jnp.asarray(ids), jnp.asarray(mask)).scores)
  np.testing.assert_allclose(scores[0], per_token[0, -1], atol=1e-6)  # full row
  np.testing.assert_allclose(scores[1], per_token[1, -1], atol=1e-6)  # left-padded row
  np.testing.assert_array_equal(scores[2], 0.0)


@pytest.mark.parametrize("family", FAMILIES)
def test_reward_model_matches_sequence_classification(tmp_path_factory, family):
  path, hf_model = saved_checkpoint(tmp_path_factory, family, head="score", num_labels=3)
  ids, mask, positions = padded_batch(hf_model.config.vocab_size, seed=2)
  want = _torch_scores(hf_model, ids, mask, positions)

  model = models.from_pretrained(path, head="score")  # num_labels from config.json
  out = run_head(model, jnp.asarray(ids), jnp.asarray(mask))

  assert isinstance(model, models.RewardModel)
  assert out.scores.shape == (3, 3)
  assert max_error(out.scores, want) <= 1e-4


def test_reward_read_out_skips_a_trailing_eos_when_pad_is_eos(tmp_path_factory):
  """TRL's usual reward models pad with EOS and end every sequence with EOS; transformers then
  scores the token before that EOS. alignax must read the same token."""
  path, hf_model = saved_checkpoint(tmp_path_factory, "llama", head="score", num_labels=1,
                                    pad_token_id=2)  # == eos_token_id
  ids, mask, positions = padded_batch(hf_model.config.vocab_size, seed=3)
  ids = np.where(ids == 0, 2, ids)  # padded_batch pads with id 0
  last = mask.shape[1] - 1 - np.argmax(mask[:, ::-1], axis=1)
  ids[np.arange(3), last] = 2  # every row ends with EOS
  want = _torch_scores(hf_model, ids, mask, positions)
  got = run_head(models.from_pretrained(path, head="score"), jnp.asarray(ids), jnp.asarray(mask))
  assert max_error(got.scores, want) <= 1e-4


@pytest.mark.parametrize("family", ["llama3", "gpt2"])
def test_value_model_reads_a_one_label_classifier_at_every_token(tmp_path_factory, family):
  path, hf_model = saved_checkpoint(tmp_path_factory, family, head="score", num_labels=1)
  ids, mask, positions = padded_batch(hf_model.config.vocab_size, seed=3)
  want_last = _torch_scores(hf_model, ids, mask, positions)[:, 0]

  ids, mask = jnp.asarray(ids), jnp.asarray(mask)
  values = run_head(models.from_pretrained(path, head="value"), ids, mask)
  rewards = run_head(models.from_pretrained(path, head="score"), ids, mask)

  assert values.scores.shape == ids.shape
  last = np.argmax(np.asarray(ax.last_valid_token(mask)), axis=-1)
  np.testing.assert_allclose(np.asarray(values.scores)[np.arange(3), last], want_last, atol=1e-5)
  np.testing.assert_allclose(rewards.scores[:, 0], want_last, atol=1e-5)


def test_heads_on_a_causal_lm_checkpoint_start_fresh_and_keep_the_body(tmp_path_factory):
  path, hf_model = saved_checkpoint(tmp_path_factory, "llama")  # untied: lm_head.weight is unused
  ids, mask, _ = padded_batch(hf_model.config.vocab_size)
  lm = models.from_pretrained(path)
  critic = models.from_pretrained(path, head="value", seed=1)
  reward = models.from_pretrained(path, head="score", num_labels=1, seed=1)

  values = run_head(critic, jnp.asarray(ids), jnp.asarray(mask))
  hidden = run_lm(lm, jnp.asarray(ids), jnp.asarray(mask)).hidden_states

  kernel = np.asarray(critic.score.kernel[...])
  assert kernel.shape == (hf_model.config.hidden_size, 1)
  assert 0.01 < kernel.std() < 0.04  # normal(0, 0.02) initialisation, not zeros
  np.testing.assert_array_equal(kernel, reward.score.kernel[...])  # same seed, same head
  np.testing.assert_allclose(values.hidden_states, hidden, atol=1e-6)
  np.testing.assert_allclose(values.scores, (hidden @ kernel)[..., 0], atol=1e-5)
