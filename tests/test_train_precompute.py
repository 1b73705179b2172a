"""Precomputed reference log-probs (TRL's --precompute_ref_log_probs): the values equal a
materialised-logits forward whatever the chunking and padding, they ride through the batches (one
host or several), DPO and KTO give the same loss and gradients with them as with the reference
forward, which then leaves the step, and a policy with no reference trains on them alone."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import alignax as ax
from alignax import data
from alignax.data.pipeline import collate_preference, collate_sequences, pair_kl_examples
from alignax.sharding import make_mesh
from alignax.train.config import TrainingConfig
from alignax.train.loop import fit
from alignax.train.objectives import dpo_objective, kto_objective
from alignax.train.reference import precompute_reference_logps
from train_factories import tiny_tokenizer_and_llama

GOOD = ["great", "good", "wonderful"]
BAD = ["terrible", "bad", "boring"]
THINGS = ["film", "meal", "trip", "book"]


def _rows(n, seed):
  rng = np.random.default_rng(seed)
  return [{"prompt": f"How was the {THINGS[rng.integers(4)]}?",
           "chosen": f" It was {GOOD[rng.integers(3)]}.",
           "rejected": f" It was {BAD[rng.integers(3)]} and {BAD[rng.integers(3)]}."}
          for _ in range(n)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("precompute")
  tokenizer, base = tiny_tokenizer_and_llama(root)
  config = data.DataConfig(max_length=32, seed=0)
  rows = data.load_rows(_rows(10, 0))
  datasets = {task: data.prepare_dataset(rows, tokenizer, task=task, config=config)
              for task in ("preference", "unpaired")}
  mesh = make_mesh(fsdp=8)
  reference = ax.from_pretrained(base, mesh=mesh)
  # 10 pairs / 20 unpaired examples in chunks of 8 rows: the last chunk is part filler.
  precomputed = {task: precompute_reference_logps(reference, ds, batch_size=8, config=config,
                                                  mesh=mesh)
                 for task, ds in datasets.items()}
  return dict(tokenizer=tokenizer, base=base, config=config, datasets=datasets, mesh=mesh,
              precomputed=precomputed)


def _materialised_logps(model, ids, attention, completion):
  """Logits + log-softmax + gather, summed over completion tokens: no fused kernel."""
  logits = model(ids, attention).logits
  logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
  token = jnp.take_along_axis(logp, ids[:, 1:, None], -1)[..., 0]
  mask = (completion[:, 1:] == 1) & (attention[:, 1:] == 1)
  return jnp.sum(jnp.where(mask, token, 0.0), -1)


def test_values_equal_a_materialised_forward_of_every_example(setup):
  """One unsharded batch of all the examples (its own padding, no filler rows) against the
  chunked, sharded precomputation."""
  reference = ax.from_pretrained(setup["base"])
  config = dataclasses.replace(setup["config"], padding_buckets="max_length")
  score = jax.jit(lambda g, s, b: _materialised_logps(nnx.merge(g, s), *b))
  graphdef, state = nnx.split(reference)
  for task, ds in setup["datasets"].items():
    got = setup["precomputed"][task].examples
    assert len(got) == len(ds.examples)
    pad = ds.pad_token_id
    if task == "preference":
      batch = collate_preference(ds.examples, pad_token_id=pad, config=config)
      flat = [batch[k].reshape(2 * len(ds), -1)
              for k in ("input_ids", "attention_mask", "completion_mask")]
      want = np.asarray(score(graphdef, state, flat)).reshape(2, -1)
      np.testing.assert_allclose(np.stack([e["ref_logps"] for e in got], 1), want, rtol=1e-5)
      assert all(e["ref_logps"].dtype == np.float32 and e["ref_logps"].shape == (2,) for e in got)
    else:
      batch = collate_sequences(ds.examples, pad_token_id=pad, config=config)
      for prefix, key in (("", "ref_logps"), ("kl_", "kl_ref_logps")):
        flat = [batch[prefix + k] for k in ("input_ids", "attention_mask", "completion_mask")]
        want = np.asarray(score(graphdef, state, flat))
        np.testing.assert_allclose([e[key] for e in got], want, rtol=1e-5)
      # The KL rows are the dataset-level pairing make_batches uses.
      paired = pair_kl_examples(ds.examples, config=config)
      for e, p in zip(got, paired):
        np.testing.assert_array_equal(e["kl_input_ids"], p["kl_input_ids"])
  # The input dataset is left as it was.
  assert "ref_logps" not in setup["datasets"]["preference"].examples[0]


def _batch(setup, task, rows=4):
  ds = setup["precomputed"][task]
  batch = next(iter(data.make_batches(ds, batch_size=rows, config=setup["config"])))
  return {k: jnp.asarray(v) for k, v in batch.items()}


def _moved_policy(base):
  policy = ax.from_pretrained(base)
  nnx.update(policy, jax.tree.map(lambda x: x * 1.1, nnx.state(policy, nnx.Param)))
  return policy


def _dot_generals(fn, *args):
  return jax.jit(fn).lower(*args).as_text().count("dot_general")


@pytest.mark.parametrize("make_objective, task, keys", [
  (dpo_objective, "preference", ("ref_logps",)),
  (kto_objective, "unpaired", ("ref_logps", "kl_ref_logps")),
])
def test_loss_and_gradients_equal_the_reference_forward_which_leaves_the_step(
    setup, make_objective, task, keys):
  policy, reference = _moved_policy(setup["base"]), ax.from_pretrained(setup["base"])
  precomputed = _batch(setup, task)
  on_the_fly = {k: v for k, v in precomputed.items() if k not in keys}
  assert set(keys) <= precomputed.keys()
  graphdef, params, rest = nnx.split(policy, nnx.Param, ...)
  ref_graphdef, ref_state = nnx.split(reference)
  objective = make_objective(graphdef, reference_graphdef=ref_graphdef, beta=0.2)
  grad_fn = jax.jit(jax.value_and_grad(objective.loss, has_aux=True))
  args = (params, (rest, ref_state))
  (got, got_metrics), got_grads = grad_fn(*args, precomputed, jax.random.key(0))
  (want, want_metrics), want_grads = grad_fn(*args, on_the_fly, jax.random.key(0))
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert abs(float(want_metrics["rewards/margins"])) > 1e-3  # the reference matters here
  for name in want_metrics:
    np.testing.assert_allclose(got_metrics[name], want_metrics[name], rtol=1e-4, atol=1e-5)
  for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(g, w, rtol=2e-4, atol=1e-6)
  # No reference forward in the program: the matmuls of one model's forward and backward only.
  with_reference = _dot_generals(objective.loss, *args, on_the_fly, jax.random.key(0))
  without = _dot_generals(objective.loss, *args, precomputed, jax.random.key(0))
  policy_only = _dot_generals(
    make_objective(graphdef, reference_graphdef=None).loss, params, rest, precomputed,
    jax.random.key(0))
  assert without == policy_only < with_reference


def test_dpo_trains_a_policy_without_any_reference_model(setup, tmp_path):
  """No frozen copy, no adapters: the precomputed values are the whole reference (and without
  them the same run is the named error of test_train_kto)."""
  mesh = setup["mesh"]
  config = TrainingConfig(output_dir=str(tmp_path), learning_rate=3e-3,
                          per_device_train_batch_size=1, max_steps=6, logging_steps=1,
                          save_steps=100, lr_scheduler_type="constant", disable_tqdm=True)
  batches = data.make_batches(setup["precomputed"]["preference"], batch_size=8,
                              config=setup["config"])
  fit(ax.from_pretrained(setup["base"], mesh=mesh), dpo_objective, batches, config, mesh=mesh)
  lines = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  # Step 1's policy is the model the values were precomputed with: every margin is 0.
  np.testing.assert_allclose(lines[0]["loss"], np.log(2.0), rtol=1e-5)
  np.testing.assert_allclose(lines[0]["rewards/margins"], 0.0, atol=1e-5)
  assert lines[-1]["loss"] < lines[0]["loss"]
  assert lines[-1]["rewards/margins"] > lines[0]["rewards/margins"]


@pytest.mark.parametrize("task", ["preference", "unpaired"])
def test_hosts_blocks_of_precomputed_columns_make_the_one_host_batch(setup, task):
  ds, config = setup["precomputed"][task], setup["config"]
  one = next(iter(data.make_batches(ds, batch_size=8, config=config)))
  blocks = [next(iter(data.make_batches(ds, batch_size=4, config=config, process_index=i,
                                        process_count=2))) for i in range(2)]
  assert one["ref_logps"].shape == ((2, 8) if task == "preference" else (8,))
  for key in one:
    row_axis = 1 if task == "preference" and one[key].ndim > 1 else 0
    np.testing.assert_array_equal(
      np.concatenate([b[key] for b in blocks], axis=row_axis), one[key], err_msg=key)
  # Each row's values are its own example's, after the shuffle (among identical sequences, one
  # of theirs: a KTO example's KL value also depends on its partner).
  values = {}
  for e in ds.examples:
    ids = e["chosen_input_ids" if task == "preference" else "input_ids"]
    value = tuple(np.atleast_1d(e["ref_logps"])) + tuple(np.atleast_1d(e.get("kl_ref_logps", [])))
    values.setdefault(tuple(ids), []).append(value)
  ids = one["input_ids"][0] if task == "preference" else one["input_ids"]
  mask = one["attention_mask"][0] if task == "preference" else one["attention_mask"]
  for row, (seq, m) in enumerate(zip(ids, mask)):
    if task == "preference":
      got = tuple(one["ref_logps"][:, row])
    else:
      got = (one["ref_logps"][row], one["kl_ref_logps"][row])
    assert got in values[tuple(seq[m == 1])]


def test_bad_inputs_are_named(setup):
  tokenizer, config, mesh = setup["tokenizer"], setup["config"], setup["mesh"]
  sft = data.prepare_dataset(data.load_rows([{"prompt": "Hi", "completion": " there"}] * 2),
                             tokenizer, task="sft", config=config)
  with pytest.raises(ValueError, match="not to 'sft'"):
    precompute_reference_logps(ax.from_pretrained(setup["base"], mesh=mesh), sft, batch_size=2,
                               config=config, mesh=mesh)
  ds = setup["precomputed"]["preference"]
  partial = [ds.examples[0], {k: v for k, v in ds.examples[1].items() if k != "ref_logps"}]
  with pytest.raises(ValueError, match=r"'ref_logps' is on some examples .* rows \[1\]"):
    collate_preference(partial, pad_token_id=ds.pad_token_id, config=config)
  # The first row lacking them is the same error, not a batch silently without the column (which
  # would run the reference forward, or fail with no reference, depending on the shuffle).
  with pytest.raises(ValueError, match=r"'ref_logps' is on some examples .* rows \[0\]"):
    collate_preference(partial[::-1], pad_token_id=ds.pad_token_id, config=config)
  kto = setup["precomputed"]["unpaired"].examples[:2]
  kto = [{k: v for k, v in kto[0].items() if k != "kl_ref_logps"}, kto[1]]
  with pytest.raises(ValueError, match=r"'kl_ref_logps' is on some examples .* rows \[0\]"):
    collate_sequences(kto, pad_token_id=ds.pad_token_id, config=config)
  graphdef, params, rest = nnx.split(ax.from_pretrained(setup["base"]), nnx.Param, ...)
  unpaired = dict(_batch(setup, "unpaired"))
  del unpaired["kl_ref_logps"]
  with pytest.raises(ValueError, match="no 'kl_ref_logps'"):
    jax.jit(kto_objective(graphdef).loss)(params, rest, unpaired, jax.random.key(0))
  preference = {**_batch(setup, "preference"), "ref_logps": jnp.zeros((4,))}
  with pytest.raises(ValueError, match=r"ref_logps'\] has shape \[4\]"):
    jax.jit(dpo_objective(graphdef).loss)(params, rest, preference, jax.random.key(0))
