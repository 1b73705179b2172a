"""The reward-model objective through the host loop: Bradley-Terry on preference pairs reaches high
held-out accuracy on a decidable synthetic set, and exports a *ForSequenceClassification checkpoint
that transformers scores identically."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import alignax as ax
from alignax import data
from alignax.sharding import make_mesh
from alignax.train.config import TrainingConfig
from alignax.train.loop import fit
from alignax.train.objectives import PREFERENCE_BATCH_AXES, reward_objective
from alignax.train.step import split_micro_batches
from train_factories import tiny_tokenizer_and_llama

GOOD = ["great", "good", "wonderful", "happy", "nice"]
BAD = ["terrible", "bad", "boring", "sad", "awful"]
TOPICS = ["the movie", "the song", "the book", "the weather", "the train", "the answer"]


def _pairs(n, seed, topics):
  rng = np.random.default_rng(seed)
  return [{"prompt": f"How was {topics[rng.integers(len(topics))]}?",
           "chosen": f" It was {GOOD[rng.integers(len(GOOD))]}.",
           "rejected": f" It was {BAD[rng.integers(len(BAD))]}."} for _ in range(n)]


def test_preference_micro_batches_split_the_pair_rows():
  batch = {"input_ids": np.arange(2 * 4 * 3).reshape(2, 4, 3), "margin": np.arange(4.0)}
  micro = split_micro_batches(batch, 2, batch_axes=PREFERENCE_BATCH_AXES)
  assert micro["input_ids"].shape == (2, 2, 2, 3) and micro["margin"].shape == (2, 2)
  np.testing.assert_array_equal(micro["input_ids"][1, :, 0], batch["input_ids"][:, 2])
  np.testing.assert_array_equal(micro["margin"][1], [2.0, 3.0])
  with pytest.raises(ValueError, match=r"input_ids: batch dimension 4 \(axis 1\)"):
    split_micro_batches(batch, 3, batch_axes=PREFERENCE_BATCH_AXES)


def test_reward_model_learns_a_decidable_preference_and_exports_for_transformers(tmp_path):
  tokenizer, base = tiny_tokenizer_and_llama(tmp_path)
  mesh = make_mesh(fsdp=8)
  model = ax.from_pretrained(base, head="score", num_labels=1, mesh=mesh)
  data_config = data.DataConfig(max_length=32, seed=0)
  # Held-out pairs ask about topics the training pairs never mention.
  train = data.prepare_dataset(data.load_rows(_pairs(256, 0, TOPICS[:4])), tokenizer,
                               task="preference", config=data_config)
  heldout = data.prepare_dataset(data.load_rows(_pairs(64, 1, TOPICS[4:])), tokenizer,
                                 task="preference", config=data_config)
  batch = next(iter(data.make_batches(heldout, batch_size=64, config=data_config, num_epochs=1)))
  two, rows, length = batch["input_ids"].shape

  def heldout_accuracy(reward_model):
    scores = reward_model(jnp.asarray(batch["input_ids"].reshape(two * rows, length)),
                          jnp.asarray(batch["attention_mask"].reshape(two * rows, length)))
    return float(jnp.mean(scores.scores[:rows, 0] > scores.scores[rows:, 0]))

  assert heldout_accuracy(model) < 0.8  # the fresh score head knows nothing yet
  config = TrainingConfig(output_dir=str(tmp_path / "rm"), learning_rate=3e-3,
                          per_device_train_batch_size=2, max_steps=40, logging_steps=10,
                          save_steps=40, lr_scheduler_type="constant", disable_tqdm=True)
  result = fit(model, reward_objective, data.make_batches(train, batch_size=16, config=data_config),
               config, mesh=mesh, tokenizer=tokenizer)

  accuracy = heldout_accuracy(result.model)
  assert accuracy >= 0.9, accuracy
  lines = [json.loads(line) for line in open(tmp_path / "rm" / "metrics.jsonl")]
  assert {"loss", "accuracy", "margin", "mean_reward"} <= set(lines[-1])

  exported = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm")
  assert type(exported).__name__ == "LlamaForSequenceClassification"
  ids = batch["input_ids"][0, :4]
  mask = batch["attention_mask"][0, :4]
  with torch.no_grad():
    theirs = exported(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits[:, 0]
  ours = ax.from_pretrained(str(tmp_path / "rm"), head="score")(ids, mask).scores[:, 0]
  np.testing.assert_allclose(np.asarray(ours), theirs.numpy(), rtol=1e-4, atol=1e-4)
