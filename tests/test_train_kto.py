"""KTO through the engine: the objective (kto and apo_zero_unpaired) equals a hand-composed
reference (materialised logits + ax.kto_loss with the KL reference point computed by hand),
training lowers the loss and raises the margins, and a policy with no reference is a named
error."""

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
from alignax.train.objectives import dpo_objective, kto_objective
from train_factories import tiny_tokenizer_and_llama

GOOD = ["great", "good", "wonderful"]
BAD = ["terrible", "bad", "boring"]
THINGS = ["film", "meal", "trip", "book"]


def _rows(n, seed):
  """Paired rows with varied prompts; task='unpaired' splits each into a desirable and an
  undesirable example (TRL's unpair_preference_dataset)."""
  rng = np.random.default_rng(seed)
  return [{"prompt": f"How was the {THINGS[rng.integers(4)]}?",
           "chosen": f" It was {GOOD[rng.integers(3)]}.",
           "rejected": f" It was {BAD[rng.integers(3)]}."} for _ in range(n)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("kto")
  tokenizer, base = tiny_tokenizer_and_llama(root)
  data_config = data.DataConfig(max_length=32, seed=0)
  train = data.prepare_dataset(data.load_rows(_rows(64, 0)), tokenizer, task="unpaired",
                               config=data_config)
  return tokenizer, base, data_config, train


def _batch(setup, rows=8):
  _, _, data_config, train = setup
  batch = next(iter(data.make_batches(train, batch_size=rows, config=data_config)))
  return {k: jnp.asarray(v) for k, v in batch.items()}


def _sequence_logps(model, ids, attention, completion):
  """Materialised logits + log-softmax + gather, summed over the completion tokens."""
  logits = model(ids, attention).logits
  logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
  token = jnp.take_along_axis(logp, ids[:, 1:, None], -1)[..., 0]
  mask = (completion[:, 1:] == 1) & (attention[:, 1:] == 1)
  return jnp.sum(jnp.where(mask, token, 0.0), -1)


def _hand_composed(policy, reference, batch, *, beta, desirable_weight, loss_type="kto"):
  def logps(model, prefix=""):
    return _sequence_logps(model, batch[f"{prefix}input_ids"], batch[f"{prefix}attention_mask"],
                           batch[f"{prefix}completion_mask"])

  policy_logps, reference_logps = logps(policy), jax.lax.stop_gradient(logps(reference))
  if loss_type == "kto":
    shift = logps(policy, "kl_") - logps(reference, "kl_")
    reference_point = jax.lax.stop_gradient(jnp.maximum(jnp.mean(shift), 0.0))
  else:
    reference_point = 0.0
  return ax.kto_loss(policy_logps, reference_logps, batch["label"],
                     reference_point=reference_point, beta=beta,
                     desirable_weight=desirable_weight)


def _moved_policy_and_reference(base):
  policy, reference = ax.from_pretrained(base), ax.from_pretrained(base)
  # Move the policy away from the reference so rewards and the KL estimate are not all zero.
  nnx.update(policy, jax.tree.map(lambda x: x * 1.1, nnx.state(policy, nnx.Param)))
  return policy, reference


def _objective_and_hand(setup, loss_type):
  _, base, _, _ = setup
  policy, reference = _moved_policy_and_reference(base)
  batch = _batch(setup)
  assert 0 < int(batch["label"].sum()) < batch["label"].shape[0]  # both kinds of example
  graphdef, params, rest = nnx.split(policy, nnx.Param, ...)
  ref_graphdef, ref_state = nnx.split(reference)
  objective = kto_objective(graphdef, reference_graphdef=ref_graphdef, beta=0.3,
                            desirable_weight=1.2, loss_type=loss_type)

  def got(params):
    return objective.loss(params, (rest, ref_state), batch, jax.random.key(0))

  def hand(params):
    return _hand_composed(nnx.merge(graphdef, params, rest), nnx.merge(ref_graphdef, ref_state),
                          batch, beta=0.3, desirable_weight=1.2, loss_type=loss_type)

  return got, hand, params, objective, batch


def _assert_metrics_equal(got_metrics, want_metrics):
  for name in ("kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen",
               "logps/rejected"):
    np.testing.assert_allclose(got_metrics[name], want_metrics[name], rtol=1e-5, atol=1e-5)
  assert np.isfinite(got_metrics["entropy"]) and got_metrics["entropy"] > 0


def test_objective_equals_the_hand_composed_loss_and_gradients(setup):
  got, hand, params, objective, batch = _objective_and_hand(setup, "kto")
  (value, metrics), grads = jax.jit(jax.value_and_grad(got, has_aux=True))(params)
  (want, want_metrics), want_grads = jax.jit(jax.value_and_grad(hand, has_aux=True))(params)
  assert want_metrics["kl"] > 0.01  # the reference point is not clamped to 0: it is exercised
  np.testing.assert_allclose(value, want, rtol=1e-5)
  _assert_metrics_equal(metrics, want_metrics)
  for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(g, w, rtol=2e-4, atol=1e-6)
  np.testing.assert_allclose(objective.weight(batch), batch["input_ids"].shape[0])


def test_apo_zero_unpaired_equals_the_hand_composed_loss(setup):
  got, hand, params, _, _ = _objective_and_hand(setup, "apo_zero_unpaired")
  (value, metrics), (want, want_metrics) = jax.jit(got)(params), jax.jit(hand)(params)
  assert float(metrics["kl"]) == 0.0
  np.testing.assert_allclose(value, want, rtol=1e-5)
  _assert_metrics_equal(metrics, want_metrics)


def _fit(setup, tmp_path, *, model, objective, max_steps, lr, **kwargs):
  _, base, data_config, train = setup
  mesh = make_mesh(fsdp=8)
  config = TrainingConfig(output_dir=str(tmp_path), learning_rate=lr,
                          per_device_train_batch_size=1, max_steps=max_steps, logging_steps=1,
                          save_steps=100, lr_scheduler_type="constant", disable_tqdm=True)
  fit(model(base, mesh), objective, data.make_batches(train, batch_size=8, config=data_config),
      config, mesh=mesh, **kwargs)
  return [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]


def test_kto_with_lora_and_the_adapters_off_as_reference_learns(setup, tmp_path):
  """A short run lowers the loss and separates the rewards (the frozen-copy reference is the
  hand-composed test's, and apo_zero_unpaired's)."""
  def lora_model(base, mesh):
    model = ax.from_pretrained(base, mesh=mesh)
    ax.apply_lora(model, ax.LoRAConfig(rank=4, alpha=8.0), rngs=nnx.Rngs(1))
    return model

  def objective(graphdef, **kwargs):  # a larger β than TRL's 0.1 so that 8 steps show it
    return kto_objective(graphdef, beta=1.0, **kwargs)

  lines = _fit(setup, tmp_path, model=lora_model, objective=objective,
               trainable=ax.LoRAParam, lr=2e-2, max_steps=8)
  # B = 0 at step 1: policy == reference, every reward and the KL estimate 0, each loss σ(0).
  np.testing.assert_allclose(lines[0]["loss"], 0.5, rtol=1e-5)
  np.testing.assert_allclose(lines[0]["kl"], 0.0, atol=1e-6)
  for name in ("kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen",
               "logps/rejected", "entropy", "grad_norm", "learning_rate"):
    assert name in lines[-1]
  last = lines[-3:]  # each step sees another batch: judge the last few together
  assert np.mean([line["loss"] for line in last]) < 0.85 * lines[0]["loss"]
  assert np.mean([line["rewards/margins"] for line in last]) > 0.5
  assert all(line["rewards/chosen"] > line["rewards/rejected"] for line in last)


def test_bad_loss_type_is_named(setup):
  graphdef, _, _ = nnx.split(ax.from_pretrained(setup[1]), nnx.Param, ...)
  with pytest.raises(ValueError, match="loss_type"):
    kto_objective(graphdef, loss_type="sigmoid")


@pytest.mark.parametrize("make_objective", [kto_objective, dpo_objective])
def test_a_policy_without_adapters_and_no_reference_is_a_named_error(setup, make_objective):
  """The LoRA-off view of a model without adapters would be the policy itself: every implicit
  reward 0 and nothing learnt, silently."""
  tokenizer, base, data_config, _ = setup
  task = "unpaired" if make_objective is kto_objective else "preference"
  train = data.prepare_dataset(data.load_rows(_rows(8, 1)), tokenizer, task=task,
                               config=data_config)
  batch = next(iter(data.make_batches(train, batch_size=4, config=data_config)))
  graphdef, params, rest = nnx.split(ax.from_pretrained(base), nnx.Param, ...)
  objective = make_objective(graphdef)
  with pytest.raises(ValueError, match="no reference model: the policy has no LoRA adapters"):
    jax.jit(objective.loss)(params, rest, batch, jax.random.key(0))  # at trace time
  if make_objective is dpo_objective:  # reference_free needs no reference
    value, _ = jax.jit(dpo_objective(graphdef, reference_free=True).loss)(params, rest, batch,
                                                                         jax.random.key(0))
    assert np.isfinite(value)


def test_kl_rows_run_no_backward_pass(setup):
  """z0 carries no gradient, so the policy's KL forward needs no backward (TRL: torch.no_grad).
  With a frozen-copy reference, counting F for one forward over B rows and 3F for forward and
  backward: kto = 3F + F (KL rows) + 2F (reference, both halves) = 6F against apo_zero_unpaired's
  3F + F = 4F. Before, completion and KL rows ran one [2B, T] forward with gradient, whose
  backward covers all 2B rows: 8F, twice apo_zero_unpaired (and twice its activations)."""
  _, base, _, _ = setup
  policy, reference = _moved_policy_and_reference(base)
  batch = _batch(setup)
  graphdef, params, rest = nnx.split(policy, nnx.Param, ...)
  ref_graphdef, ref_state = nnx.split(reference)

  def flops(loss_type):
    objective = kto_objective(graphdef, reference_graphdef=ref_graphdef, loss_type=loss_type)
    step = jax.jit(jax.value_and_grad(objective.loss, has_aux=True))
    compiled = step.lower(params, (rest, ref_state), batch, jax.random.key(0)).compile()
    return compiled.cost_analysis()["flops"]

  ratio = flops("kto") / flops("apo_zero_unpaired")
  assert 1.3 < ratio < 1.7, ratio


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
def test_accumulated_metrics_are_the_whole_batchs_means_over_their_own_rows(setup, loss_type):
  # Desirable rows first: the first micro-batch holds most of them, the second few or none, so a
  # row-weighted average of per-micro-batch means (the old step) halves rewards/chosen.
  from alignax.train.step import init_state, make_train_step, split_micro_batches

  _, base, _, _ = setup
  policy, reference = _moved_policy_and_reference(base)
  batch = _batch(setup)
  order = np.argsort(~np.asarray(batch["label"], bool), kind="stable")
  batch = {k: v[order] for k, v in batch.items()}
  graphdef, params, rest = nnx.split(policy, nnx.Param, ...)
  ref_graphdef, ref_state = nnx.split(reference)
  objective = kto_objective(graphdef, reference_graphdef=ref_graphdef, beta=0.3,
                            loss_type=loss_type)
  step = jax.jit(make_train_step(objective, optax_sgd()))
  state = init_state(params, optax_sgd(), frozen=(rest, ref_state))
  _, whole = step(state, split_micro_batches(batch, 1))
  _, split = step(state, split_micro_batches(batch, 2))
  names = ["rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen",
           "logps/rejected", "entropy"]
  if loss_type == "apo_zero_unpaired":  # z0 = 0: the loss itself is the same too
    names.append("loss")
  for name in names:
    np.testing.assert_allclose(split[name], whole[name], rtol=2e-5, atol=2e-5, err_msg=name)


def optax_sgd():
  import optax

  return optax.sgd(1e-3)
