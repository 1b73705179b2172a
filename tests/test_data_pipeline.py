"""grain pipelines: padding buckets, batch layouts, packing, shuffling and epochs, host sharding,
and exact resume from a JSON-serialised iterator state."""

import json

import numpy as np
import pytest

from alignax import data as D
from alignax.data.pipeline import kl_partners

WORDS = "the quick brown fox jumps over a lazy dog while cats sleep in the sun".split()


def sft_rows(n, seed=0):
  """Prompt-completion rows of varied lengths, each unique (row i's prompt starts with 'i:')."""
  rng = np.random.default_rng(seed)
  rows = []
  for i in range(n):
    prompt = f"{i}: " + " ".join(rng.choice(WORDS, rng.integers(1, 8)))
    rows.append(
      {"prompt": prompt, "completion": " " + " ".join(rng.choice(WORDS, rng.integers(1, 6)))}
    )
  return rows


def prepared(tok, rows, task="sft", **kwargs):
  config = D.DataConfig(**{"max_length": 64, **kwargs})
  return D.prepare_dataset(D.load_rows(rows), tok, task=task, config=config), config


def take(it, n):
  return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      if k == "extras":
        assert x[k] == y[k]
      else:
        np.testing.assert_array_equal(x[k], y[k])


def unpad(batch):
  """The real (unpadded) sequences of a right-padded [B, T] batch, as tuples."""
  return [
    tuple(ids[m == 1].tolist()) for ids, m in zip(batch["input_ids"], batch["attention_mask"])
  ]


# --- buckets --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  ("length", "kwargs", "expected"),
  [
    (1, {}, 1),
    (5, {}, 8),
    (8, {}, 8),
    (9, {"max_length": 12}, 12),
    (100, {"max_length": 1024}, 128),
    (5, {"pad_to_multiple_of": 64, "max_length": 100}, 64),
    (65, {"pad_to_multiple_of": 64, "max_length": 100}, 100),
    (65, {"pad_to_multiple_of": 64}, 128),
    (3, {"padding_buckets": "max_length", "max_length": 40}, 40),
  ],
)
def test_bucket_length(length, kwargs, expected):
  assert D.bucket_length(length, **kwargs) == expected


def test_bucket_length_rejects_too_long():
  with pytest.raises(ValueError, match="length=9 exceeds max_length=8"):
    D.bucket_length(9, max_length=8)


def test_batches_only_take_bucket_shapes_and_keep_every_token(tok):
  ds, config = prepared(tok, sft_rows(40), max_length=24)
  batches = list(D.make_batches(ds, batch_size=4, config=config, num_epochs=1))
  lengths = {b["input_ids"].shape[1] for b in batches}
  assert lengths <= {1, 2, 4, 8, 16, 24}
  seen = [s for b in batches for s in unpad(b)]
  assert sorted(seen) == sorted(tuple(e["input_ids"].tolist()) for e in ds.examples)
  for b in batches:  # the completion mask is inside the attention mask and right-padded
    assert np.all(b["completion_mask"] <= b["attention_mask"])
    assert b["input_ids"].dtype == np.int32
    np.testing.assert_array_equal(b["input_ids"][b["attention_mask"] == 0], ds.pad_token_id)


def test_pad_to_multiple_of_gives_one_shape(tok):
  ds, config = prepared(tok, sft_rows(12), max_length=64, pad_to_multiple_of=32)
  shapes = {
    b["input_ids"].shape for b in D.make_batches(ds, batch_size=3, config=config, num_epochs=1)
  }
  assert shapes == {(3, 32)}


# --- batch layouts -------------------------------------------------------------------------------


def test_preference_batch_is_pair_axis_first_chosen_at_zero(tok):
  rows = [
    {"prompt": f"{i}: what?", "chosen": " yes " * (i + 1), "rejected": " no", "margin": float(i)}
    for i in range(6)
  ]
  ds, config = prepared(tok, rows, task="preference", shuffle=False)
  (batch, *_) = list(D.make_batches(ds, batch_size=3, config=config, num_epochs=1))
  assert batch["input_ids"].shape[:2] == (2, 3) and batch["margin"].tolist() == [0.0, 1.0, 2.0]
  for b in range(3):
    ex = ds.examples[b]
    for side, index in (("chosen", 0), ("rejected", 1)):
      n = len(ex[f"{side}_input_ids"])
      np.testing.assert_array_equal(batch["input_ids"][index, b, :n], ex[f"{side}_input_ids"])
      np.testing.assert_array_equal(
        batch["completion_mask"][index, b, :n], ex[f"{side}_completion_mask"]
      )
      assert batch["attention_mask"][index, b].sum() == n
  # reshape(2B, T) is TRL's concatenated chosen-first layout.
  flat = batch["input_ids"].reshape(6, -1)
  np.testing.assert_array_equal(flat[:3], batch["input_ids"][0])


def test_unpaired_batch_has_labels(tok):
  rows = [
    {"prompt": f"{i}?" * (i + 1), "completion": " ok" * (4 - i), "label": i % 2 == 0}
    for i in range(4)
  ]
  ds, config = prepared(tok, rows, task="unpaired", shuffle=False)
  (batch,) = list(D.make_batches(ds, batch_size=4, config=config, num_epochs=1))
  assert batch["label"].dtype == np.bool_ and batch["label"].tolist() == [True, False, True, False]
  # KTO's KL rows: row i's prompt followed by row i-1's completion (cyclically).
  assert batch["kl_input_ids"].shape == batch["input_ids"].shape
  split = [
    (e["input_ids"][e["completion_mask"] == 0], e["input_ids"][e["completion_mask"] == 1])
    for e in ds.examples
  ]
  for i in range(4):
    expected = np.concatenate([split[i][0], split[i - 1][1]])
    n = batch["kl_attention_mask"][i].sum()
    np.testing.assert_array_equal(batch["kl_input_ids"][i, :n], expected)
    assert batch["kl_completion_mask"][i, :n].tolist() == [0] * len(split[i][0]) + [1] * len(
      split[i - 1][1]
    )


def test_kl_rows_are_paired_once_over_the_dataset_with_another_prompt(tok):
  """A paired row gives two adjacent unpaired examples with one prompt; each example's KL row
  takes the completion of the same side of the previous row (a rotation by two in dataset order),
  so it does not depend on the shuffle or the batch size (and can be precomputed per example)."""
  rows = [{"prompt": f"{i}: what?", "chosen": " yes" * (i % 3 + 1), "rejected": " no"}
          for i in range(6)]
  ds, config = prepared(tok, rows, task="unpaired")
  # Examples 2k and 2k + 1 share row k's prompt; they pair with 2k - 2 and 2k - 1 (row k - 1).
  assert kl_partners(ds.examples) == [10, 11, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9]

  def split(e):
    mask = e["completion_mask"]
    return tuple(e["input_ids"][mask == 0].tolist()), tuple(e["input_ids"][mask == 1].tolist())

  expected = {}
  for e, partner in zip(ds.examples, kl_partners(ds.examples)):
    expected[tuple(e["input_ids"].tolist())] = split(e)[0] + split(ds.examples[partner])[1]
  for batch_size in (2, 4):
    for batch in D.make_batches(ds, batch_size=batch_size, config=config, num_epochs=2):
      for i, seq in enumerate(unpad(batch)):
        n = batch["kl_attention_mask"][i].sum()
        assert tuple(batch["kl_input_ids"][i, :n].tolist()) == expected[seq]


def _prompt_of(example):
  mask = example["completion_mask"]
  return tuple(example["input_ids"][: int(np.argmax(mask))].tolist())


@pytest.mark.parametrize("prompts", [
  "ABCDEFGH",  # one example per prompt: a rotation by one
  "AABBCCDD",  # paired rows unpaired (chosen, rejected): a rotation by two
  "AAABABBC",  # no rotation of the dataset order separates the prompts: grouped by prompt
  "AAABCADB",  # irregular, the largest prompt holding half of the examples
])
def test_kl_rows_use_every_completion_once_under_another_prompt(tok, prompts):
  """The KL rows' completions are the dataset's own completions, each used once (TRL: "the same
  set as the matched outputs"), never under their own prompt. Before, a paired dataset gave both
  examples of a row the previous row's rejected completion: every KL row held an undesirable
  completion and no desirable one."""
  rows = [{"prompt": f"{p} what?", "completion": f" answer {i}", "label": i % 2 == 0}
          for i, p in enumerate(prompts)]
  ds, _ = prepared(tok, rows, task="unpaired")
  partners = kl_partners(ds.examples)
  assert sorted(partners) == list(range(len(prompts)))
  for i, j in enumerate(partners):
    assert _prompt_of(ds.examples[i]) != _prompt_of(ds.examples[j]), (i, j)
  # The labels of the KL completions are the dataset's labels: half desirable here.
  assert sum(bool(ds.examples[j]["label"]) for j in partners) == len(prompts) // 2


def test_kl_partners_of_paired_rows_take_both_sides(tok):
  rows = [{"prompt": f"{i}: what?", "chosen": " yes", "rejected": " no"} for i in range(5)]
  ds, _ = prepared(tok, rows, task="unpaired")
  kl_labels = [bool(ds.examples[j]["label"]) for j in kl_partners(ds.examples)]
  assert kl_labels == [True, False] * 5


def test_kl_partners_when_one_prompt_holds_most_examples_take_another_prompt(tok):
  # No permutation can give every "A" example another prompt's completion: completions repeat.
  rows = [{"prompt": f"{p} what?", "completion": f" answer {i}", "label": True}
          for i, p in enumerate("AAAAB")]
  ds, _ = prepared(tok, rows, task="unpaired")
  partners = kl_partners(ds.examples)
  assert partners == [4, 4, 4, 4, 3]


def test_kl_partners_with_one_prompt_fall_back_to_the_previous_example(tok):
  rows = [{"prompt": "same?", "completion": " a" * (i + 1), "label": True} for i in range(3)]
  ds, _ = prepared(tok, rows, task="unpaired")
  assert kl_partners(ds.examples) == [2, 0, 1]


def test_prompt_batch_is_left_padded_with_extras(tok):
  rows = [{"prompt": "Hi", "answer": 1}, {"prompt": "What is two plus three?", "answer": 5}]
  ds, config = prepared(tok, rows, task="prompt", shuffle=False)
  (batch,) = list(D.make_batches(ds, batch_size=2, config=config, num_epochs=1))
  short = ds.examples[0]["prompt_ids"]
  assert batch["attention_mask"][0, -len(short) :].all() and not batch["attention_mask"][0, 0]
  np.testing.assert_array_equal(batch["input_ids"][0, -len(short) :], short)
  assert batch["attention_mask"][:, -1].all()  # every prompt ends at the last column
  assert batch["extras"] == {"prompt": ["Hi", "What is two plus three?"], "answer": [1, 5]}


# --- packing -------------------------------------------------------------------------------------


def test_packing_segments_never_cross_positions_restart_no_token_lost(tok):
  ds, config = prepared(
    tok, sft_rows(30), max_length=32, packing=True, packing_bins=3, dataloader_drop_last=False
  )
  batches = list(D.make_batches(ds, batch_size=2, config=config, num_epochs=1))
  assert all(b["input_ids"].shape == (2, 32) for b in batches[:-1])
  examples = {tuple(e["input_ids"].tolist()): e["completion_mask"].tolist() for e in ds.examples}
  segments = []
  for b in batches:
    for row in range(b["input_ids"].shape[0]):
      seg = b["segment_ids"][row]
      np.testing.assert_array_equal(b["attention_mask"][row], seg > 0)
      np.testing.assert_array_equal(b["input_ids"][row][seg == 0], 0)
      assert np.all(b["completion_mask"][row][seg == 0] == 0)
      ids = [s for s in np.unique(seg) if s > 0]
      assert ids == list(range(1, len(ids) + 1))
      for s in ids:
        where = np.flatnonzero(seg == s)
        assert np.all(np.diff(where) == 1), "a segment is not contiguous"
        np.testing.assert_array_equal(b["positions"][row][where], np.arange(len(where)))
        tokens = tuple(b["input_ids"][row][where].tolist())
        assert tokens in examples, "a packed segment is not a whole example"
        assert b["completion_mask"][row][where].tolist() == examples[tokens]
        segments.append(tokens)
  assert sorted(segments) == sorted(examples)
  # Packing fills rows: fewer rows than examples.
  assert sum(b["input_ids"].shape[0] for b in batches) < len(ds)


def test_packing_needs_sft(tok):
  ds, config = prepared(tok, [{"prompt": "a", "chosen": " b", "rejected": " c"}], task="preference")
  config.packing = True
  with pytest.raises(ValueError, match="packing applies to SFT data only"):
    D.make_batches(ds, batch_size=1, config=config)


# --- shuffling, epochs, sharding, resume ---------------------------------------------------------


def test_seeded_shuffle_and_epochs(tok):
  ds, config = prepared(tok, sft_rows(10), max_length=64)
  first = [unpad(b)[0] for b in D.make_batches(ds, batch_size=1, config=config, num_epochs=2)]
  again = [unpad(b)[0] for b in D.make_batches(ds, batch_size=1, config=config, num_epochs=2)]
  assert first == again and len(first) == 20
  epoch1, epoch2 = first[:10], first[10:]
  original = [tuple(e["input_ids"].tolist()) for e in ds.examples]
  assert sorted(epoch1) == sorted(epoch2) == sorted(original)
  assert epoch1 != original and epoch1 != epoch2  # shuffled, and anew each epoch
  other = D.DataConfig(max_length=64, seed=config.seed + 1)
  assert [
    unpad(b)[0] for b in D.make_batches(ds, batch_size=1, config=other, num_epochs=1)
  ] != epoch1
  ordered = D.DataConfig(max_length=64, shuffle=False)
  assert [
    unpad(b)[0] for b in D.make_batches(ds, batch_size=1, config=ordered, num_epochs=1)
  ] == original


def test_drop_last_and_steps_per_epoch(tok):
  ds, config = prepared(tok, sft_rows(10), max_length=64)
  assert len(list(D.make_batches(ds, batch_size=3, config=config, num_epochs=1))) == 3
  assert D.steps_per_epoch(10, batch_size=3) == 3
  keep = D.DataConfig(max_length=64, dataloader_drop_last=False)
  batches = list(D.make_batches(ds, batch_size=3, config=keep, num_epochs=1))
  assert [b["input_ids"].shape[0] for b in batches] == [3, 3, 3, 1]
  assert D.steps_per_epoch(10, batch_size=3, drop_last=False) == 4
  assert D.steps_per_epoch(10, batch_size=2, process_count=3) == 1


def test_host_sharding_partitions_the_data(tok):
  ds, config = prepared(tok, sft_rows(11), max_length=64)
  shards = []
  for host in range(3):
    batches = D.make_batches(
      ds, batch_size=1, config=config, num_epochs=1, process_index=host, process_count=3
    )
    shards.append([unpad(b)[0] for b in batches])
  assert [len(s) for s in shards] == [3, 3, 3]  # 11 % 3 = 2 examples dropped so hosts stay in step
  flat = [s for shard in shards for s in shard]
  assert len(set(flat)) == 9
  # The hosts' batches together are the one-host batches of 3 rows (the last 2 of its order form
  # no full global batch).
  one_host = [s for b in D.make_batches(ds, batch_size=3, config=config, num_epochs=1)
              for s in unpad(b)]
  assert sorted(flat) == sorted(one_host) and len(one_host) == 9
  assert D.host_slice(11, process_index=1, process_count=3) == slice(1, 9, 3)
  with pytest.raises(ValueError, match=r"process_index=3 must lie in \[0, process_count=3\)"):
    D.host_slice(11, process_index=3, process_count=3)


@pytest.mark.parametrize(
  ("task", "kwargs"),
  [
    ("sft", {}),
    ("sft", {"packing": True, "max_length": 32, "packing_bins": 2}),
    ("preference", {}),
    ("prompt", {}),
    ("sft", {"prefetch_batches": 3}),
  ],
  ids=["sft", "sft-packed", "preference", "prompt", "sft-prefetch"],
)
def test_resume_from_json_state_is_exact(tok, task, kwargs):
  prefetch = kwargs.pop("prefetch_batches", 0)
  rows = sft_rows(13)
  if task == "preference":
    rows = [{"prompt": r["prompt"], "chosen": r["completion"], "rejected": " no"} for r in rows]
  elif task == "prompt":
    rows = [{"prompt": r["prompt"], "id": i} for i, r in enumerate(rows)]
  ds, config = prepared(tok, rows, task=task, **kwargs)
  make = lambda: D.make_batches(  # noqa: E731
    ds, batch_size=2, config=config, num_epochs=3, prefetch_batches=prefetch
  )
  uninterrupted = take(iter(make()), 14)  # crosses epoch boundaries
  for stop in (0, 5, 9):
    it = iter(make())
    head = take(it, stop)
    state = json.loads(json.dumps(it.get_state()))
    resumed = iter(make())
    resumed.set_state(state)
    assert_batches_equal(head + take(resumed, 14 - stop), uninterrupted)


def test_iterator_state_round_trips_through_an_orbax_checkpoint(tok, tmp_path):
  import grain
  import orbax.checkpoint as ocp
  ds, config = prepared(tok, sft_rows(20), max_length=32, packing=True)
  make = lambda: iter(D.make_batches(ds, batch_size=2, config=config))  # noqa: E731
  it = make()
  take(it, 3)
  with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
    manager.save(3, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(it)))
    manager.wait_until_finished()
    expected = take(it, 4)
    resumed = make()
    manager.restore(
      3, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointRestore(resumed))
    )
  assert_batches_equal(take(resumed, 4), expected)
