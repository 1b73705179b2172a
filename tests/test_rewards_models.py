"""Reward models as reward sources (alignax.rewards.models): scores equal a direct forward of the
model, an HF-saved LlamaForSequenceClassification scores as transformers does, and an ensemble's
`min` mode penalises a completion that only one member likes."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import alignax as ax
from alignax import rewards
from alignax.rewards import RewardEnsemble, RewardFunctionError, RewardModelScorer
from alignax.sharding import make_mesh
from train_factories import tiny_tokenizer_and_llama

PROMPTS = ["How was the movie?", "What is two plus three?", "Say something."]
COMPLETIONS = [" It was wonderful.", " Five.", " The weather today is sunny with a light breeze."]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """The tiny tokenizer and a random 2-layer Llama reward model (one label) on its vocabulary."""
  root = tmp_path_factory.mktemp("rm")
  tokenizer, base = tiny_tokenizer_and_llama(root)
  model = ax.from_pretrained(base, head="score", num_labels=1)
  return tokenizer, base, model


def _right_padded(sequences, pad_id):
  width = max(map(len, sequences))
  ids = np.full((len(sequences), width), pad_id, np.int32)
  mask = np.zeros((len(sequences), width), np.int32)
  for i, row in enumerate(sequences):
    ids[i, : len(row)], mask[i, : len(row)] = row, 1
  return jnp.asarray(ids), jnp.asarray(mask)


def _direct(model, sequences, pad_id=0):
  """One eager forward of the model over all sequences, right-padded to the longest (no buckets,
  no fixed batch size, no filler rows): the scores ``[B]`` and last hidden states ``[B, d]``."""
  ids, mask = _right_padded(sequences, pad_id)
  out = model(ids, mask)
  last = np.asarray(mask).sum(axis=1) - 1
  hidden = np.asarray(out.hidden_states)[np.arange(len(sequences)), last]
  return np.asarray(out.scores[:, 0]), hidden.astype(np.float64)


def test_plain_text_scores_equal_a_direct_forward_of_each_sequence(tiny):
  tokenizer, _, model = tiny
  scorer = RewardModelScorer(model, tokenizer, name="rm", batch_size=2)
  ids = [scorer.encode(p, c) for p, c in zip(PROMPTS, COMPLETIONS)]
  # Laid out as the data pipeline lays out a training pair: prompt, completion, EOS.
  assert ids[0] == (tokenizer(PROMPTS[0])["input_ids"]
                    + tokenizer(COMPLETIONS[0], add_special_tokens=False)["input_ids"]
                    + [tokenizer.eos_token_id])
  assert len({len(i) for i in ids}) == 3  # three lengths, two batches, one filler row
  expected, _ = _direct(model, ids)
  np.testing.assert_allclose(scorer(prompts=PROMPTS, completions=COMPLETIONS), expected,
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(scorer.score_ids(ids), expected, rtol=1e-5, atol=1e-5)
  # An EOS already at the end is not doubled.
  assert scorer.encode("Hi", " there" + tokenizer.eos_token) == ids_of(tokenizer, "Hi", " there")
  without = RewardModelScorer(model, tokenizer, append_eos=False)
  assert without.encode("Hi", " there") == ids_of(tokenizer, "Hi", " there")[:-1]


def ids_of(tokenizer, prompt, completion):
  return (tokenizer(prompt)["input_ids"]
          + tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])


def test_conversational_scores_use_the_chat_template(tiny):
  tokenizer, _, model = tiny
  scorer = RewardModelScorer(model, tokenizer, name="rm", batch_size=4)
  prompts = [[{"role": "user", "content": p}] for p in PROMPTS[:2]]
  texts = [ax.apply_chat_template(tokenizer, p + [{"role": "assistant", "content": c}])
           for p, c in zip(prompts, COMPLETIONS[:2])]
  expected, _ = _direct(model, [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts])
  # Through the runner, which wraps text completions of conversational prompts as messages.
  out = rewards.compute_rewards([scorer], prompts, COMPLETIONS[:2])
  assert out.names == ("rm",)
  np.testing.assert_allclose(out.per_source[:, 0], expected, rtol=1e-5, atol=1e-5)


def test_the_runner_weights_a_reward_model_with_a_function(tiny):
  tokenizer, _, model = tiny
  scorer = RewardModelScorer(model, tokenizer, name="rm")

  def brevity(completions, **kwargs):
    return [-len(c) / 10 for c in completions]

  out = rewards.compute_rewards([scorer, brevity], PROMPTS[:1], [COMPLETIONS[0], COMPLETIONS[2]],
                                num_generations=2, weights=[2.0, 0.5])
  model_scores = scorer.score(PROMPTS[:1] * 2, [COMPLETIONS[0], COMPLETIONS[2]])
  lengths = np.array([len(COMPLETIONS[0]), len(COMPLETIONS[2])])
  np.testing.assert_allclose(out.rewards, 2.0 * model_scores + 0.5 * (-lengths / 10), rtol=1e-5)
  assert {"rewards/rm/mean", "rewards/rm/std", "rewards/brevity/mean"} <= set(out.metrics)


def test_bad_sequences_are_named_errors(tiny):
  tokenizer, _, model = tiny
  scorer = RewardModelScorer(model, tokenizer, max_length=8)
  with pytest.raises(ValueError, match="sequence 1 has 9 tokens, more than max_length=8"):
    scorer.score_ids([[5, 6], list(range(3, 12))])
  with pytest.raises(ValueError, match="sequence 0 is empty"):
    scorer.score_ids([[]])
  with pytest.raises(ValueError, match="batch_size must be a positive int"):
    RewardModelScorer(model, tokenizer, batch_size=0)


def test_an_exported_reward_model_loads_and_scores_as_before(tiny, tmp_path):
  tokenizer, _, model = tiny
  ax.save_pretrained(model, tmp_path / "my_rm")
  tokenizer.save_pretrained(tmp_path / "my_rm")
  loaded = rewards.load_reward_model(tmp_path / "my_rm", batch_size=4)
  assert loaded.name == "my_rm"  # the directory's name, as TRL names reward models
  expected = RewardModelScorer(model, tokenizer).score(PROMPTS, COMPLETIONS)
  np.testing.assert_allclose(loaded.score(PROMPTS, COMPLETIONS), expected, rtol=1e-5, atol=1e-6)
  # Sharded == unsharded: parameters over fsdp=8, each batch of 8 rows split over it.
  sharded = rewards.load_reward_model(tmp_path / "my_rm", mesh=make_mesh(fsdp=8), batch_size=8)
  assert sharded._input_sharding.spec[0] == "fsdp"
  np.testing.assert_allclose(sharded.score(PROMPTS, COMPLETIONS), expected, rtol=1e-5, atol=1e-5)


def test_an_hf_sequence_classifier_scores_as_transformers(tmp_path):
  tokenizer = ax.build_tiny_tokenizer(tmp_path / "hf_rm")
  config = transformers.LlamaConfig(
    vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, num_labels=1,
    pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
    eos_token_id=tokenizer.eos_token_id, initializer_range=0.2,
  )
  torch.manual_seed(0)
  hf = transformers.LlamaForSequenceClassification(config).eval()
  hf.save_pretrained(tmp_path / "hf_rm")

  scorer = rewards.load_reward_model(tmp_path / "hf_rm", batch_size=2)
  ids = [scorer.encode(p, c) for p, c in zip(PROMPTS, COMPLETIONS)]
  width = max(map(len, ids))
  padded = torch.tensor([i + [tokenizer.pad_token_id] * (width - len(i)) for i in ids])
  mask = (torch.arange(width)[None, :] < torch.tensor([len(i) for i in ids])[:, None]).long()
  with torch.no_grad():
    theirs = hf(input_ids=padded, attention_mask=mask).logits[:, 0].numpy()
  ours = scorer(prompts=PROMPTS, completions=COMPLETIONS)
  assert np.std(theirs) > 1e-3  # the rows score differently, so a mix-up would show
  np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)


def _member(base, hidden_x, hidden_y, score_x, score_y):
  """A reward model whose score head gives exactly `score_x` / `score_y` to the two sequences whose
  last hidden states are `hidden_x` / `hidden_y` (least-norm solution of two linear equations)."""
  model = ax.from_pretrained(base, head="score", num_labels=1)
  w, *_ = np.linalg.lstsq(np.stack([hidden_x, hidden_y]), np.array([score_x, score_y]), rcond=None)
  model.score.kernel.set_value(jnp.asarray(w[:, None], jnp.float32))
  return model


def test_ensemble_min_penalises_a_completion_only_one_member_likes(tiny):
  tokenizer, base, model = tiny
  prompt, liked_by_one, fine_for_both = "How was the movie?", " It was wonderful!", " It was good."
  probe = RewardModelScorer(model, tokenizer)
  _, hidden = _direct(model, [probe.encode(prompt, c) for c in (liked_by_one, fine_for_both)])
  # Member A loves the first completion (10 vs 1); member B dislikes it (-2 vs 1).
  a = RewardModelScorer(_member(base, *hidden, 10.0, 1.0), tokenizer, name="a")
  b = RewardModelScorer(_member(base, *hidden, -2.0, 1.0), tokenizer, name="b")
  prompts, completions = [prompt, prompt], [liked_by_one, fine_for_both]
  np.testing.assert_allclose(a.score(prompts, completions), [10.0, 1.0], atol=1e-3)
  np.testing.assert_allclose(b.score(prompts, completions), [-2.0, 1.0], atol=1e-3)

  def ensemble(mode, **kw):
    return np.array(RewardEnsemble([a, b], mode=mode, name=mode, **kw)(
      prompts=prompts, completions=completions))

  mean, worst = ensemble("mean"), ensemble("min")
  penalised = ensemble("mean_minus_std", k=1.0)
  np.testing.assert_allclose(mean, [4.0, 1.0], atol=1e-3)
  np.testing.assert_allclose(worst, [-2.0, 1.0], atol=1e-3)
  np.testing.assert_allclose(penalised, [4.0 - 6.0, 1.0], atol=1e-3)  # population std of {10, -2}
  np.testing.assert_allclose(ensemble("mean_minus_std", k=0.25), [4.0 - 1.5, 1.0], atol=1e-3)
  assert mean[0] > mean[1]  # the mean is fooled by the one enthusiastic member ...
  assert worst[0] < worst[1] and penalised[0] < penalised[1]  # ... min and mean - k·std are not


def test_ensemble_skips_none_members_and_names_bad_ones():
  def half(completions, **kwargs):
    return [None, 1.0, None]

  def ones(completions, **kwargs):
    return [3.0, 5.0, None]

  combined = RewardEnsemble([half, ones], mode="min")
  assert combined(prompts=["p"] * 3, completions=["a", "b", "c"]) == [3.0, 1.0, None]

  def short(completions, **kwargs):
    return [1.0]

  with pytest.raises(RewardFunctionError, match=r"'short' \(reward source 1\) of ensemble 'ens'"):
    RewardEnsemble([ones, short], name="ens")(prompts=["p"] * 3, completions=["a", "b", "c"])
  with pytest.raises(ValueError, match="mode='median' is not supported"):
    RewardEnsemble([ones], mode="median")
  with pytest.raises(ValueError, match="k must be >= 0"):
    RewardEnsemble([ones], mode="mean_minus_std", k=-1.0)
  with pytest.raises(ValueError, match="members must hold at least one"):
    RewardEnsemble([])

  async def judge(completions, **kwargs):
    return [1.0] * len(completions)

  # An async member used to reach the combination as an unawaited coroutine.
  with pytest.raises(ValueError, match=r"members\[1\] \('judge'\) is an async function"):
    RewardEnsemble([ones, judge])
