"""The KV-cache sampler: parity with transformers, cache == full forward, sampling distributions
(chi-square against transformers' own logits warpers), stop tokens, layout, sharding, bad input."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
import torch
import transformers
from model_factories import PAD_ID, run_lm, saved_checkpoint, torch_forward

from alignax import models
from alignax.sampling import bucket_length, default_stop_token_ids, generate, process_logits
from alignax.sampling import sampler as sampler_module
from alignax.sampling.sampler import checkpoint_stop_token_ids
from alignax.sharding import make_mesh

EOS_ID = 2  # model_factories' eos_token_id


def prompts(vocab_size: int, lengths=(9, 6, 3), *, seed: int = 0, side: str = "left"):
  """Rows of the given real lengths padded to the longest on ``side``; ids avoid pad and eos."""
  rng = np.random.default_rng(seed)
  width = max(lengths)
  ids = np.full((len(lengths), width), PAD_ID, np.int64)
  mask = np.zeros((len(lengths), width), bool)
  for row, n in enumerate(lengths):
    cols = slice(width - n, width) if side == "left" else slice(0, n)
    ids[row, cols] = rng.integers(3, vocab_size, size=n)
    mask[row, cols] = True
  return ids, mask


def hf_greedy(hf_model, ids, mask, max_new_tokens):
  """transformers' greedy completions ``[B, k]`` and its raw logits at each step ``[B, k, V]``."""
  with torch.no_grad():
    out = hf_model.generate(
      input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask.astype(np.int64)),
      do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=PAD_ID, eos_token_id=EOS_ID,
      temperature=None, top_p=None, top_k=None, output_logits=True, return_dict_in_generate=True,
    )
  logits = torch.stack(out.logits, dim=1).float().numpy()
  return out.sequences[:, ids.shape[1]:].numpy(), logits


# llama: GQA, untied; gemma2: soft-caps and a sliding window shorter than the sequence; gpt2:
# learned positions (the bucket must stay inside its table of 32).
@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2"])
def test_greedy_matches_transformers_with_left_padding(tmp_path_factory, family):
  path, hf_model = saved_checkpoint(tmp_path_factory, family)
  vocab = hf_model.config.vocab_size
  ids, mask = prompts(vocab)
  max_new = 10
  want, want_logits = hf_greedy(hf_model, ids, mask, max_new)
  model = models.from_pretrained(path)

  got = generate(model, ids, mask, max_new_tokens=max_new, greedy=True)

  tokens = np.asarray(got.tokens)
  np.testing.assert_array_equal(tokens[:, : want.shape[1]], want)
  assert (tokens[:, want.shape[1]:] == PAD_ID).all()
  # transformers pads after EOS too; the mask and lengths end at each row's EOS (inclusive).
  for row in range(len(ids)):
    hits = np.flatnonzero(want[row] == EOS_ID)
    length = hits[0] + 1 if len(hits) else max_new
    assert int(got.lengths[row]) == length
    assert bool(got.stopped[row]) == bool(len(hits))
    np.testing.assert_array_equal(got.completion_mask[row], np.arange(max_new) < length)
    # Greedy log-probs are under the unprocessed model distribution.
    want_logprobs = torch.log_softmax(torch.as_tensor(want_logits[row, :length]), -1).numpy()
    np.testing.assert_allclose(
      got.logprobs[row, :length], want_logprobs[np.arange(length), want[row, :length]], atol=1e-4
    )

  # Right padding is re-packed on the host: the same completions.
  right_ids, right_mask = prompts(vocab, side="right")
  again = generate(model, right_ids, right_mask, max_new_tokens=max_new, greedy=True)
  np.testing.assert_array_equal(again.tokens, got.tokens)


def _full_forward_logits(model, out):
  """Logits predicting each completion token, from one forward over prompt + completion."""
  ids = jnp.concatenate([out.prompt_ids, out.tokens], axis=1)
  mask = jnp.concatenate([out.prompt_mask, out.completion_mask], axis=1)
  logits = run_lm(model, ids, mask).logits
  p = out.prompt_ids.shape[1]
  return np.asarray(logits[:, p - 1 : -1])


@pytest.mark.parametrize(
  "settings",
  [
    dict(temperature=0.7),
    dict(temperature=1.3, top_k=7, top_p=0.8, min_p=0.05),
  ],
  ids=["temperature", "filters"],
)
def test_cache_decode_logprobs_equal_a_full_forward(tmp_path_factory, settings):
  path, hf_model = saved_checkpoint(tmp_path_factory, "qwen3")
  ids, mask = prompts(hf_model.config.vocab_size, (5, 9, 2))
  model = models.from_pretrained(path)

  out = generate(
    model, ids, mask, max_new_tokens=8, num_samples=2, key=jax.random.key(3), **settings
  )

  logits = _full_forward_logits(model, out)
  processed = jax.nn.log_softmax(process_logits(jnp.asarray(logits), **settings), axis=-1)
  want = np.take_along_axis(np.asarray(processed), np.asarray(out.tokens)[..., None], -1)[..., 0]
  m = np.asarray(out.completion_mask)
  assert m.sum() > 20
  np.testing.assert_allclose(np.asarray(out.logprobs)[m], want[m], atol=2e-5)
  assert (np.asarray(out.logprobs)[~m] == 0).all()


def _hf_processed_probs(logits: np.ndarray, settings: dict) -> np.ndarray:
  """The distribution transformers samples from with these settings, by its own warpers."""
  warpers = transformers.LogitsProcessorList()
  if "temperature" in settings:
    warpers.append(transformers.TemperatureLogitsWarper(settings["temperature"]))
  if "top_k" in settings:
    warpers.append(transformers.TopKLogitsWarper(settings["top_k"]))
  if "top_p" in settings:
    warpers.append(transformers.TopPLogitsWarper(settings["top_p"]))
  if "min_p" in settings:
    warpers.append(transformers.MinPLogitsWarper(settings["min_p"]))
  scores = warpers(None, torch.as_tensor(logits, dtype=torch.float64)[None])
  return torch.softmax(scores, dim=-1)[0].numpy()


@pytest.mark.parametrize(
  "settings",
  [
    dict(temperature=0.5, top_k=5),
    dict(top_p=0.3),
    dict(temperature=2.0, min_p=0.2),
    dict(temperature=0.7, top_k=30, top_p=0.6, min_p=0.1),
    dict(top_k=3, top_p=1.0, min_p=0.0),
  ],
  ids=["top_k", "top_p", "min_p", "all", "neutral"],
)
def test_process_logits_equals_transformers_warpers(settings):
  logits = np.random.default_rng(0).normal(scale=3.0, size=(4, 50)).astype(np.float32)
  want = np.stack([_hf_processed_probs(row, settings) for row in logits])

  got = np.asarray(jax.nn.softmax(process_logits(jnp.asarray(logits), **settings), axis=-1))

  np.testing.assert_array_equal(got > 0, want > 0)
  np.testing.assert_allclose(got, want, atol=1e-6)


@pytest.mark.parametrize(
  "settings",
  [
    dict(temperature=0.5),
    dict(temperature=0.5, top_k=6),
    dict(temperature=0.5, top_p=0.6),
    dict(temperature=0.5, min_p=0.3),
    dict(temperature=0.8, top_k=20, top_p=0.7, min_p=0.1),
  ],
  ids=["temperature", "top_k", "top_p", "min_p", "all"],
)
def test_sampling_frequencies_match_the_processed_distribution(tmp_path_factory, settings):
  path, hf_model = saved_checkpoint(tmp_path_factory, "qwen2")
  ids, mask = prompts(hf_model.config.vocab_size, (6,), seed=1)
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
  probs = _hf_processed_probs(torch_forward(hf_model, ids, mask, positions)[0, -1], settings)
  model = models.from_pretrained(path)
  draws = 4000

  out = generate(
    model, ids, mask, max_new_tokens=1, num_samples=draws, key=jax.random.key(7),
    stop_token_ids=(), **settings,
  )

  tokens = np.asarray(out.tokens[:, 0])
  assert (probs[tokens] > 0).all(), "sampled a token the processed distribution removes"
  np.testing.assert_allclose(np.asarray(out.logprobs[:, 0]), np.log(probs[tokens]), atol=1e-4)
  # Chi-square over the support, pooling categories expected fewer than 5 times.
  expected = probs * draws
  counts = np.bincount(tokens, minlength=len(probs)).astype(float)
  support = probs > 0
  big = support & (expected >= 5)
  observed = np.append(counts[big], counts[support & ~big].sum())
  expect = np.append(expected[big], expected[support & ~big].sum())
  if expect[-1] == 0:
    observed, expect = observed[:-1], expect[:-1]
  assert len(expect) >= 3, "the distribution is too peaked to test"
  p_value = scipy.stats.chisquare(observed, expect * observed.sum() / expect.sum()).pvalue
  assert p_value > 1e-3, (p_value, observed, expect)


# The llama tests below share these settings, so they share compiled sampling loops.
LLAMA_PROMPTS = (4, 7, 7, 2)
GREEDY = dict(max_new_tokens=12, greedy=True, stop_token_ids=())
SAMPLED = dict(max_new_tokens=6, num_samples=2, temperature=0.8, top_p=0.9, stop_token_ids=())


def test_stop_tokens_end_rows_and_pad_after(tmp_path_factory):
  path, hf_model = saved_checkpoint(tmp_path_factory, "llama")
  ids, mask = prompts(hf_model.config.vocab_size, LLAMA_PROMPTS, seed=3)
  model = models.from_pretrained(path)
  assert default_stop_token_ids(model) == (EOS_ID,)
  free = generate(model, ids, mask, **GREEDY)
  free_tokens = np.asarray(free.tokens)
  assert (np.asarray(free.lengths) == 12).all() and not np.asarray(free.stopped).any()
  stops = (int(free_tokens[0, 3]), int(free_tokens[1, 5]))

  out = generate(model, ids, mask, **{**GREEDY, "stop_token_ids": stops}, pad_token_id=1)

  for row in range(len(ids)):
    hits = np.flatnonzero(np.isin(free_tokens[row], stops))
    length = hits[0] + 1 if len(hits) else 12
    assert int(out.lengths[row]) == length
    assert bool(out.stopped[row]) == bool(len(hits))
    np.testing.assert_array_equal(out.tokens[row, :length], free_tokens[row, :length])
    assert (np.asarray(out.tokens[row, length:]) == 1).all()
    np.testing.assert_array_equal(out.completion_mask[row], np.arange(12) < length)
    assert (np.asarray(out.logprobs[row, length:]) == 0).all()
  assert int(out.lengths[0]) <= 4 and int(out.lengths[1]) <= 6


def test_generation_config_eos_ids_stop_rows_as_transformers_does(tmp_path_factory, tmp_path):
  # A chat checkpoint lists several EOS ids in generation_config.json and one in config.json
  # (Llama-3-Instruct: <|eot_id|> beside <|end_of_text|>); transformers stops on all of them.
  source, hf_model = saved_checkpoint(tmp_path_factory, "llama")
  path = tmp_path / "chat"
  shutil.copytree(source, path)
  ids, mask = prompts(hf_model.config.vocab_size, LLAMA_PROMPTS, seed=3)
  model = models.from_pretrained(path)
  free = np.asarray(generate(model, ids, mask, **GREEDY).tokens)
  turn_end = int(free[0, 3])  # a token the greedy model emits: the chat's end-of-turn id
  assert turn_end != EOS_ID
  generation_config = json.loads((path / "generation_config.json").read_text())
  generation_config["eos_token_id"] = [turn_end, EOS_ID]
  (path / "generation_config.json").write_text(json.dumps(generation_config))

  stops = checkpoint_stop_token_ids(path)

  assert stops == (turn_end, EOS_ID)
  assert default_stop_token_ids(model) == (EOS_ID,)  # what config.json alone gives
  with torch.no_grad():
    want = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).generate(
      input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask.astype(np.int64)),
      do_sample=False, max_new_tokens=12, temperature=None, top_p=None, top_k=None,
    )[:, ids.shape[1]:].numpy()
  got = generate(model, ids, mask, max_new_tokens=12, greedy=True, stop_token_ids=stops)
  tokens = np.asarray(got.tokens)
  np.testing.assert_array_equal(tokens[:, :want.shape[1]], want)
  assert (tokens[:, want.shape[1]:] == PAD_ID).all()
  assert int(got.lengths[0]) <= 4 and bool(got.stopped[0])
  for row in range(len(ids)):
    hits = np.flatnonzero(np.isin(free[row], stops))
    assert int(got.lengths[row]) == (hits[0] + 1 if len(hits) else 12)

  # config.json's ids stay in the set; without any eos entry nothing stops a row.
  generation_config["eos_token_id"] = turn_end
  (path / "generation_config.json").write_text(json.dumps(generation_config))
  assert checkpoint_stop_token_ids(path) == (turn_end, EOS_ID)
  (path / "generation_config.json").unlink()
  assert checkpoint_stop_token_ids(path) == (EOS_ID,)
  config = json.loads((path / "config.json").read_text())
  (path / "config.json").write_text(json.dumps({**config, "eos_token_id": None}))
  assert checkpoint_stop_token_ids(path) == ()
  (path / "config.json").write_text(json.dumps({**config, "eos_token_id": [2, "</s>"]}))
  with pytest.raises(ValueError, match=r"config\.json: eos_token_id must be a non-negative int"):
    checkpoint_stop_token_ids(path)


def test_samples_of_a_prompt_are_contiguous_rows(tmp_path_factory):
  path, hf_model = saved_checkpoint(tmp_path_factory, "llama")
  ids, mask = prompts(hf_model.config.vocab_size, LLAMA_PROMPTS, seed=3)
  model = models.from_pretrained(path)
  single = generate(model, ids, mask, **GREEDY)

  grouped = generate(model, ids, mask, **GREEDY, num_samples=3)

  # Greedy samples of one prompt are identical: row b·G + g is prompt b's completion.
  np.testing.assert_array_equal(grouped.tokens, np.repeat(single.tokens, 3, axis=0))
  np.testing.assert_array_equal(grouped.prompt_ids, np.repeat(single.prompt_ids, 3, axis=0))
  np.testing.assert_array_equal(grouped.prompt_mask, np.repeat(single.prompt_mask, 3, axis=0))
  sampled = generate(model, ids, mask, **SAMPLED, key=jax.random.key(0))
  tokens = np.asarray(sampled.tokens).reshape(len(ids), 2, -1)
  assert (tokens[:, 0] != tokens[:, 1]).any(axis=-1).all()  # the two samples of a prompt differ


def test_prompt_buckets_and_new_temperatures_reuse_the_compiled_loop(tmp_path_factory):
  assert [bucket_length(n) for n in (1, 16, 17, 600, 1025)] == [16, 16, 32, 1024, 2048]
  path, hf_model = saved_checkpoint(tmp_path_factory, "llama")
  model = models.from_pretrained(path)
  ids, mask = prompts(hf_model.config.vocab_size, LLAMA_PROMPTS, seed=5)
  generate(model, ids, mask, **SAMPLED, key=jax.random.key(0))
  compiled = sampler_module._generate._cache_size()

  longer, longer_mask = prompts(hf_model.config.vocab_size, (11, 3, 16, 9), seed=6)  # bucket 16
  generate(model, longer, longer_mask, **{**SAMPLED, "temperature": 0.5}, key=jax.random.key(1))
  generate(model, ids, mask, **{**SAMPLED, "top_p": 0.5}, key=jax.random.key(2))

  assert sampler_module._generate._cache_size() == compiled


def test_sharded_generation_equals_unsharded(tmp_path_factory):
  path, hf_model = saved_checkpoint(tmp_path_factory, "llama")
  ids, mask = prompts(hf_model.config.vocab_size, LLAMA_PROMPTS, seed=8)
  key = jax.random.key(11)
  want = generate(models.from_pretrained(path), ids, mask, **SAMPLED, key=key)
  mesh = make_mesh(data=2, fsdp=4)
  sharded_model = models.from_pretrained(path, mesh=mesh)

  got = generate(sharded_model, ids, mask, **SAMPLED, key=key)

  assert got.tokens.sharding.spec[0] == ("data", "fsdp")
  np.testing.assert_array_equal(got.tokens, want.tokens)
  np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-5)


def test_bad_input_is_named(tmp_path_factory):
  path, hf_model = saved_checkpoint(tmp_path_factory, "gpt2")  # 32 learned positions
  model = models.from_pretrained(path)
  ids, mask = prompts(hf_model.config.vocab_size, (5, 3))
  key = jax.random.key(0)
  with pytest.raises(ValueError, match="max_new_tokens must be a positive int"):
    generate(model, ids, mask, max_new_tokens=0, key=key)
  with pytest.raises(ValueError, match="num_samples must be a positive int"):
    generate(model, ids, mask, max_new_tokens=2, num_samples=0, key=key)
  for top_p in (0.0, 1.5):
    with pytest.raises(ValueError, match=r"top_p must lie in \(0, 1\]"):
      generate(model, ids, mask, max_new_tokens=2, top_p=top_p, key=key)
  with pytest.raises(ValueError, match="top_k must be a positive int"):
    generate(model, ids, mask, max_new_tokens=2, top_k=0, key=key)
  with pytest.raises(ValueError, match="min_p must lie in"):
    generate(model, ids, mask, max_new_tokens=2, min_p=-0.1, key=key)
  with pytest.raises(ValueError, match="temperature must be > 0"):
    generate(model, ids, mask, max_new_tokens=2, temperature=0.0, key=key)
  with pytest.raises(ValueError, match="key is required"):
    generate(model, ids, mask, max_new_tokens=2)
  mismatch = r"shape mismatch: input_ids\[2, 5\], attention_mask\[2, 4\]"
  with pytest.raises(ValueError, match=mismatch):
    generate(model, ids, mask[:, 1:], max_new_tokens=2, key=key)
  with pytest.raises(ValueError, match="attention_mask row 1 has no real token"):
    generate(model, ids, np.array([[True] * 5, [False] * 5]), max_new_tokens=2, key=key)
  with pytest.raises(ValueError, match="prompt row 0 has 30 tokens; with max_new_tokens=4"):
    long_ids, long_mask = prompts(hf_model.config.vocab_size, (30,))
    generate(model, long_ids, long_mask, max_new_tokens=4, key=key)
  bad = ids.copy()
  bad[1, 4] = 10_000
  with pytest.raises(ValueError, match=r"input_ids\[1, 4\] = 10000 is outside the vocabulary"):
    generate(model, bad, mask, max_new_tokens=2, key=key)
  with pytest.raises(TypeError, match="input_ids must be an integer array"):
    generate(model, ids.astype(np.float32), mask, max_new_tokens=2, key=key)
  with pytest.raises(TypeError, match="alignax CausalLM"):
    generate(models.from_pretrained(path, head="value"), ids, mask, max_new_tokens=2, key=key)
