"""DPO through the engine: the objective equals a hand-composed reference (model logits + dpo_loss),
and training raises the margins with a frozen-copy reference and with a LoRA-off reference."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import alignax as ax
from alignax import data
from alignax.sharding import make_mesh
from alignax.train.config import TrainingConfig
from alignax.train.loop import fit
from alignax.train.objectives import cpo_objective, dpo_objective, orpo_objective, simpo_objective
from train_factories import tiny_tokenizer_and_llama

GOOD = ["great", "good", "wonderful"]
BAD = ["terrible", "bad", "boring"]


def _pairs(n, seed):
  rng = np.random.default_rng(seed)
  return [{"prompt": "How was it?", "chosen": f" It was {GOOD[rng.integers(3)]}.",
           "rejected": f" It was {BAD[rng.integers(3)]}."} for _ in range(n)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("dpo")
  tokenizer, base = tiny_tokenizer_and_llama(root)
  data_config = data.DataConfig(max_length=32, seed=0)
  train = data.prepare_dataset(data.load_rows(_pairs(128, 0)), tokenizer, task="preference",
                               config=data_config)
  return tokenizer, base, data_config, train


def _batch(setup, rows=4):
  _, _, data_config, train = setup
  batch = next(iter(data.make_batches(train, batch_size=rows, config=data_config)))
  return {k: jnp.asarray(v) for k, v in batch.items()}


def _hand_composed(policy, reference, batch, beta):
  """Materialised logits + log-softmax + gather, then ax.dpo_loss: no engine, no fused kernel."""
  def sequence_logps(model):
    two, rows, length = batch["input_ids"].shape
    ids = batch["input_ids"].reshape(two * rows, length)
    logits = model(ids, batch["attention_mask"].reshape(two * rows, length)).logits
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    token = jnp.take_along_axis(logp, ids[:, 1:, None], -1)[..., 0]
    mask = (batch["completion_mask"].reshape(two * rows, length)[:, 1:] == 1) & (
      batch["attention_mask"].reshape(two * rows, length)[:, 1:] == 1)
    return jnp.sum(jnp.where(mask, token, 0.0), -1).reshape(two, rows)

  logps, ref = sequence_logps(policy), jax.lax.stop_gradient(sequence_logps(reference))
  return ax.dpo_loss(logps[0], logps[1], ref[0], ref[1], beta=beta)


def test_objective_equals_the_hand_composed_loss_and_gradients(setup):
  _, base, _, _ = setup
  policy, reference = ax.from_pretrained(base), ax.from_pretrained(base)
  # Move the policy away from the reference so the margins are not all zero.
  nnx.update(policy, jax.tree.map(lambda x: x * 1.1, nnx.state(policy, nnx.Param)))
  batch = _batch(setup)
  graphdef, params, rest = nnx.split(policy, nnx.Param, ...)
  ref_graphdef, ref_state = nnx.split(reference)
  objective = dpo_objective(graphdef, reference_graphdef=ref_graphdef, beta=0.3)
  (got, got_metrics), got_grads = jax.value_and_grad(objective.loss, has_aux=True)(
    params, (rest, ref_state), batch, jax.random.key(0))

  def hand(params):
    return _hand_composed(nnx.merge(graphdef, params, rest), reference, batch, 0.3)

  (want, want_metrics), want_grads = jax.value_and_grad(hand, has_aux=True)(params)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  # The margins are beta times differences of sequence log-probs near 30 in magnitude: float32
  # rounding of those sums (ulp 2e-6, a few ulps per sum) allows a few 1e-6 absolute.
  for name in ("rewards/margins", "rewards/accuracies", "logps/chosen"):
    np.testing.assert_allclose(got_metrics[name], want_metrics[name], rtol=1e-5, atol=5e-6)
  for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(g, w, rtol=2e-4, atol=1e-6)


def _train(setup, tmp_path, **kwargs):
  tokenizer, base, data_config, train = setup
  mesh = make_mesh(fsdp=8)
  config = TrainingConfig(output_dir=str(tmp_path), learning_rate=kwargs.pop("lr", 3e-3),
                          per_device_train_batch_size=1, max_steps=kwargs.pop("max_steps", 12),
                          logging_steps=1,
                          save_steps=100, lr_scheduler_type="constant", disable_tqdm=True)
  model = kwargs.pop("model")(base, mesh)
  fit(model, kwargs.pop("objective"), data.make_batches(train, batch_size=8, config=data_config),
      config, mesh=mesh, **kwargs)
  return [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]


def test_dpo_with_a_frozen_copy_raises_margins(setup, tmp_path):
  lines = _train(setup, tmp_path, model=lambda base, mesh: ax.from_pretrained(base, mesh=mesh),
                 objective=dpo_objective,
                 reference=ax.from_pretrained(setup[1], mesh=make_mesh(fsdp=8)))
  np.testing.assert_allclose(lines[0]["loss"], np.log(2.0), rtol=1e-5)  # policy == reference
  assert lines[-1]["rewards/margins"] > 0.5 and lines[-1]["rewards/accuracies"] == 1.0
  assert lines[-1]["loss"] < 0.5 * lines[0]["loss"]


def test_dpo_with_lora_and_the_adapters_off_as_reference(setup, tmp_path):
  def lora_model(base, mesh):
    model = ax.from_pretrained(base, mesh=mesh)
    ax.apply_lora(model, ax.LoRAConfig(rank=4, alpha=8.0), rngs=nnx.Rngs(1))
    return model

  lines = _train(setup, tmp_path, model=lora_model, objective=dpo_objective,
                 trainable=ax.LoRAParam, lr=2e-2)
  np.testing.assert_allclose(lines[0]["loss"], np.log(2.0), rtol=1e-5)  # B = 0: policy == base
  assert lines[-1]["rewards/margins"] > lines[0]["rewards/margins"] + 0.2
  assert lines[-1]["loss"] < lines[0]["loss"]


@pytest.mark.parametrize("make_objective, margin", [
  (orpo_objective, "log_odds_chosen"), (simpo_objective, "rewards/margins"),
  (functools.partial(cpo_objective, cpo_alpha=0.1), "rewards/margins"),
])
def test_reference_free_objectives_lower_their_loss_and_move_margins(setup, tmp_path,
                                                                      make_objective, margin):
  tokenizer, base, data_config, train = setup
  fixed = _batch(setup, rows=16)

  def evaluate(model):  # the objective's own loss and metrics on one fixed batch
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return make_objective(graphdef).loss(params, rest, fixed, jax.random.key(0))

  mesh = make_mesh(fsdp=8)
  model = ax.from_pretrained(base, mesh=mesh)
  before_loss, before = evaluate(model)
  config = TrainingConfig(output_dir=str(tmp_path), learning_rate=3e-3,
                          per_device_train_batch_size=1, max_steps=10, logging_steps=5,
                          save_steps=100, lr_scheduler_type="constant", disable_tqdm=True)
  fit(model, make_objective, data.make_batches(train, batch_size=8, config=data_config), config,
      mesh=mesh)
  after_loss, after = evaluate(model)
  assert after_loss < before_loss
  assert after[margin] > before[margin]
  assert after["rewards/accuracies"] >= before["rewards/accuracies"]
