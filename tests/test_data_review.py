"""Review of alignax.data as a user meets it: JSONL files through load_dataset and make_batches,
and the defects found (each test here failed before its fix): splits of single files, empty and
unreadable sources, empty conversational completions, completions cut away under
completion_only_loss=False, config types, and multi-host batches that must share one shape and add
up to the one-host batch."""

import json

import numpy as np
import pytest

from alignax import data as D
from alignax.models import tokenizer as tk

EOS = tk.EOS_TOKEN
USER = [{"role": "user", "content": "What is two plus three?"}]
ANSWER = [{"role": "assistant", "content": "Two plus three is five."}]
WRONG = [{"role": "assistant", "content": "It is six."}]
WORDS = "the quick brown fox jumps over a lazy dog while cats sleep in the sun".split()


def write_jsonl(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return path


def decode(tok, ids):
  return tok.decode([int(i) for i in ids], skip_special_tokens=False)


def render(tok, messages, **kwargs):
  return tk.apply_chat_template(tok, messages, **kwargs)


# --- end to end: files -> load_dataset -> make_batches -> decoded completions ---------------------


def _completions(tok, batch):
  """Decoded completion-mask tokens of each row of a [B, T] batch, checking the mask lies inside
  the attention mask and is one run at the end of the real tokens."""
  out = []
  columns = (batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
  for ids, attention, mask in zip(*columns):
    assert np.all(mask <= attention)
    real = np.flatnonzero(attention)
    ones = np.flatnonzero(mask)
    assert ones.size and ones[-1] == real[-1] and np.all(np.diff(ones) == 1)
    out.append(decode(tok, ids[mask == 1]))
  return out


@pytest.mark.parametrize("conversational", [False, True])
def test_every_format_from_jsonl_decodes_back_to_its_completions(tok, tmp_path, conversational):
  prompt = USER if conversational else "What is two plus three?"
  good, bad = (ANSWER, WRONG) if conversational else (" Five.", " Six.")

  def expected(completion):
    if conversational:
      return render(tok, USER + completion)[len(render(tok, USER, add_generation_prompt=True)) :]
    return completion + EOS  # plain completions get EOS appended

  config = D.DataConfig(max_length=64, shuffle=False, padding_buckets="max_length")
  cases = {
    "sft": [{"prompt": prompt, "completion": good}],
    "preference": [{"prompt": prompt, "chosen": good, "rejected": bad, "margin": 1.5}],
    "unpaired": [
      {"prompt": prompt, "completion": good, "label": True},
      {"prompt": prompt, "completion": bad, "label": False},
    ],
  }
  for task, rows in cases.items():
    path = write_jsonl(tmp_path / f"{task}.jsonl", rows)
    ds = D.load_dataset(D.DataConfig(dataset_name=str(path), max_length=64), tok, task=task)
    batch = next(iter(D.make_batches(ds, batch_size=len(ds), config=config)))
    if task == "preference":
      assert batch["input_ids"].shape == (2, 1, 64)
      sides = [{k: batch[k][i] for k in ("input_ids", "attention_mask", "completion_mask")}
               for i in range(2)]
      assert [_completions(tok, side)[0] for side in sides] == [expected(good), expected(bad)]
      assert batch["margin"].tolist() == [1.5]
    else:
      want = [expected(good)] if task == "sft" else [expected(good), expected(bad)]
      assert _completions(tok, batch) == want
    if task == "unpaired":
      assert batch["label"].tolist() == [True, False]
      # KL rows: each prompt with the other row's completion.
      kl = {k[3:]: batch[k] for k in batch if k.startswith("kl_")}
      assert _completions(tok, kl) == [expected(bad), expected(good)]
  # Implicit-prompt conversations and message-list language modelling.
  if conversational:
    row = {"chosen": USER + ANSWER, "rejected": USER + WRONG}
    path = write_jsonl(tmp_path / "implicit.jsonl", [row])
    ds = D.load_dataset(D.DataConfig(dataset_name=str(path)), tok, task="preference")
    ex = ds.examples[0]
    prompt_ids = ex["chosen_input_ids"][ex["chosen_completion_mask"] == 0]
    assert decode(tok, prompt_ids) == render(tok, USER, add_generation_prompt=True)
    # The prompt's tokens are a prefix of the tokenised whole conversation (no merge across).
    whole = tok(render(tok, USER + ANSWER), add_special_tokens=False)["input_ids"]
    assert ex["chosen_input_ids"].tolist() == whole


# --- sources ------------------------------------------------------------------------------------


def test_a_single_file_or_saved_dataset_has_only_a_train_split(tok, tmp_path):
  # Before: split="test" of a single file returned the training rows, so evaluation ran on them.
  path = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "Hi", "completion": " there"}])
  assert len(D.load_rows(path)) == len(D.load_rows(path, split="train")) == 1
  with pytest.raises(D.DataError, match=rf"^{path}: split 'test' requested, but a single") as info:
    D.load_rows(path, split="test")
  assert info.value.kind == "missing_split"
  config = D.DataConfig(dataset_name=str(path))
  with pytest.raises(D.DataError, match="split 'test' requested"):
    D.load_dataset(config, tok, task="sft", split="test")
  import datasets

  datasets.Dataset.from_list([{"text": "a"}]).save_to_disk(tmp_path / "saved")
  with pytest.raises(D.DataError, match="split 'test' requested, but a saved Dataset"):
    D.load_rows(tmp_path / "saved", split="test")


@pytest.mark.parametrize(
  ("name", "text"), [("empty.jsonl", ""), ("blank.jsonl", "\n\n"), ("empty.json", "[]")]
)
def test_an_empty_file_is_named(tok, tmp_path, name, text):
  # Before: "<rows>: the dataset has no rows", without the file.
  path = tmp_path / name
  path.write_text(text)
  with pytest.raises(D.DataError, match=rf"^{path}: no rows") as info:
    D.load_dataset(D.DataConfig(dataset_name=str(path)), tok, task="sft")
  assert info.value.kind == "empty_dataset"
  folder = tmp_path / "folder"
  folder.mkdir()
  (folder / name).write_text(text)
  with pytest.raises(D.DataError, match=rf"^{folder}: no rows"):
    D.load_rows(folder)


def test_a_file_of_unreadable_rows_reports_their_errors(tok, tmp_path):
  # Before: "columns [] fit no sft format", hiding the bad JSON, and skip_invalid counted nothing.
  path = tmp_path / "bad.jsonl"
  path.write_text('{"prompt": "Hi",\n[1, 2]\n')
  with pytest.raises(D.DataError, match=rf"^{path}: row 0 \(line 1\): invalid JSON"):
    D.load_dataset(D.DataConfig(dataset_name=str(path)), tok, task="sft")
  seen = []
  config = D.DataConfig(dataset_name=str(path), skip_invalid=True)
  with pytest.raises(D.DataError, match=r"no usable row: all 2 were skipped") as info:
    D.load_dataset(config, tok, task="sft", on_skip=seen.append)
  assert "'invalid_json': 1" in str(info.value) and "'wrong_type': 1" in str(info.value)
  assert [(e.row, e.kind) for e in seen] == [(0, "invalid_json"), (1, "wrong_type")]


def test_hidden_files_in_a_directory_are_not_data(tmp_path):
  # Before: Jupyter's .ipynb_checkpoints/train-checkpoint.jsonl was read as a second train file,
  # duplicating every row.
  write_jsonl(tmp_path / "train.jsonl", [{"text": "a"}, {"text": "b"}])
  (tmp_path / ".ipynb_checkpoints").mkdir()
  write_jsonl(tmp_path / ".ipynb_checkpoints" / "train-checkpoint.jsonl", [{"text": "a"}])
  (tmp_path / "__pycache__").mkdir()
  write_jsonl(tmp_path / "__pycache__" / "x.json", [{"text": "c"}])
  write_jsonl(tmp_path / ".hidden.jsonl", [{"text": "d"}])
  assert [r.data["text"] for r in D.load_rows(tmp_path)] == ["a", "b"]


def test_a_split_named_exactly_is_found(tmp_path):
  # Before: a hub snapshot's train_sft/train_gen files both counted as "train", and
  # --dataset_train_split train_sft found no files.
  data = tmp_path / "data"
  data.mkdir()
  for name in ("train_sft", "train_gen", "test_sft"):
    write_jsonl(data / f"{name}-00000-of-00001.jsonl", [{"text": name}])
  assert [r.data["text"] for r in D.load_rows(tmp_path, split="train_sft")] == ["train_sft"]
  assert [r.data["text"] for r in D.load_rows(tmp_path, split="test_sft")] == ["test_sft"]
  # Keywords decide the keyword splits, as `datasets` does: train* files are all "train".
  assert {r.data["text"] for r in D.load_rows(tmp_path)} == {"train_sft", "train_gen"}
  write_jsonl(data / "train.jsonl", [{"text": "train"}])
  assert len(D.load_rows(tmp_path, split="train")) == 3


def test_a_home_relative_path_is_expanded(tmp_path, monkeypatch):
  # Before: "~/..." (as a YAML config holds it) was reported as missing although it exists.
  monkeypatch.setenv("HOME", str(tmp_path))
  write_jsonl(tmp_path / "sft.jsonl", [{"text": "a"}])
  assert [r.data for r in D.load_rows("~/sft.jsonl")] == [{"text": "a"}]


# --- rows ---------------------------------------------------------------------------------------


EMPTY_ANSWER = [{"role": "assistant", "content": ""}]


@pytest.mark.parametrize(
  ("task", "row", "field"),
  [
    ("sft", {"prompt": USER, "completion": EMPTY_ANSWER}, "completion"),
    ("preference", {"prompt": USER, "chosen": ANSWER, "rejected": EMPTY_ANSWER}, "rejected"),
    ("preference", {"chosen": USER + EMPTY_ANSWER, "rejected": USER + WRONG}, "chosen"),
    ("unpaired", {"prompt": USER, "completion": EMPTY_ANSWER, "label": False}, "completion"),
  ],
)
def test_an_empty_conversational_completion_is_an_error(tok, tmp_path, task, row, field):
  # Before: accepted, training on an answer of nothing but the end-of-turn tokens, while the plain
  # "" was an error.
  if task == "sft":
    good = {"prompt": USER, "completion": ANSWER}
  elif task == "unpaired":
    good = {"prompt": USER, "completion": ANSWER, "label": True}
  elif "prompt" in row:
    good = {"prompt": USER, "chosen": ANSWER, "rejected": WRONG}
  else:
    good = {"chosen": USER + ANSWER, "rejected": USER + WRONG}
  path = write_jsonl(tmp_path / "rows.jsonl", [good, row])
  config = D.DataConfig(dataset_name=str(path))
  where = rf"^{path}: row 1 \(line 2\): field '{field}': empty completion"
  with pytest.raises(D.DataError, match=where) as info:
    D.load_dataset(config, tok, task=task)
  assert info.value.kind == "empty"
  skipping = D.DataConfig(dataset_name=str(path), skip_invalid=True)
  assert D.load_dataset(skipping, tok, task=task).skipped == {"empty": 1}


def test_completion_cut_away_is_no_room_even_when_the_prompt_is_in_the_loss(tok):
  # Before: with completion_only_loss=False a prompt filling max_length left a row of prompt
  # tokens only, silently dropping the whole completion.
  rows = D.load_rows(
    [{"prompt": "Hi " * 30, "completion": " ok"}, {"prompt": "Hi", "completion": " ok"}]
  )
  config = D.DataConfig(max_length=8, completion_only_loss=False)
  with pytest.raises(D.DataError, match=r"row 0: field 'completion': the prompt leaves no room"):
    D.prepare_dataset(rows, tok, task="sft", config=config)
  skipping = D.DataConfig(max_length=8, completion_only_loss=False, skip_invalid=True)
  ds = D.prepare_dataset(rows, tok, task="sft", config=skipping)
  assert ds.skipped == {"no_room": 1}
  (ex,) = ds.examples
  assert ex["completion_mask"].all() and decode(tok, ex["input_ids"]) == "Hi ok" + EOS
  # keep_end keeps the completion; the prompt stays in the loss.
  keep_end = D.DataConfig(max_length=8, completion_only_loss=False, truncation_mode="keep_end")
  ex = D.prepare_dataset(rows, tok, task="sft", config=keep_end).examples[0]
  assert len(ex["input_ids"]) == 8 and ex["completion_mask"].all()
  assert decode(tok, ex["input_ids"]).endswith("Hi  ok" + EOS)


def test_messages_column_must_hold_a_message_list(tok):
  # Before: a string under `messages` was silently trained on as plain text.
  rows = D.load_rows([{"messages": USER + ANSWER}, {"messages": "Hello there"}])
  with pytest.raises(D.DataError, match=r"row 1: field 'messages': must be a list of") as info:
    D.prepare_dataset(rows, tok, task="sft", config=D.DataConfig())
  assert info.value.kind == "bad_messages"


def test_assistant_only_loss_on_plain_text_is_an_error(tok):
  # Before: plain text silently put every token in the loss, as if the option were off.
  rows = D.load_rows([{"text": "The quick brown fox."}])
  config = D.DataConfig(assistant_only_loss=True)
  with pytest.raises(D.DataError, match=r"row 0: field 'text': assistant_only_loss=True needs"):
    D.prepare_dataset(rows, tok, task="sft", config=config)


def test_truncate_rejects_what_it_cannot_honour():
  # Before: max_length=0 under keep_end returned every token (ids[-0:]), an unknown mode passed
  # when nothing needed cutting, and a mask of another length was cut out of step with the ids.
  with pytest.raises(ValueError, match="max_length must be a positive int"):
    D.truncate([1, 2, 3], [0, 1, 1], max_length=0, truncation_mode="keep_end")
  with pytest.raises(ValueError, match="truncation_mode must be 'keep_start' or 'keep_end'"):
    D.truncate([1], [1], max_length=4, truncation_mode="keep_middle")
  with pytest.raises(ValueError, match=r"input_ids \(3 tokens\) and completion_mask \(2\)"):
    D.truncate([1, 2, 3], [0, 1], max_length=2)


# --- config -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  ("kwargs", "message"),
  [
    ({"packing": "false", "max_length": 8}, "packing must be a bool, got 'false'"),
    ({"shuffle": "no"}, "shuffle must be a bool"),
    ({"skip_invalid": 1}, "skip_invalid must be a bool"),
    ({"dataloader_drop_last": None}, "dataloader_drop_last must be a bool"),
    ({"assistant_only_loss": "yes"}, "assistant_only_loss must be a bool"),
    ({"completion_only_loss": "true"}, "completion_only_loss must be a bool or None"),
    ({"dataset_name": 3}, "dataset_name must be a path, a name or None"),
    ({"dataset_config": ["a"]}, "dataset_config must be a string or None"),
    ({"dataset_test_split": ""}, "dataset_test_split must be a non-empty string"),
    ({"dataset_text_field": None}, "dataset_text_field must be a non-empty string"),
    ({"seed": -1}, r"seed must lie in \[0, 2\*\*32\)"),
    ({"seed": 2**32}, r"seed must lie in \[0, 2\*\*32\)"),
  ],
)
def test_config_rejects_wrong_types(kwargs, message):
  # Before: all accepted; packing="false" (a quoted YAML value) is truthy and packed, a negative
  # seed failed later inside grain. Under pytest the jaxtyping import hook already type-checks
  # __init__; users run without it, so the values are set on a valid config and __post_init__ (what
  # __init__ runs) is called directly.
  config = D.DataConfig(max_length=8)
  for name, value in kwargs.items():
    setattr(config, name, value)
  with pytest.raises(ValueError, match=message):
    config.__post_init__()


def test_prompt_batches_padded_to_max_length_need_max_prompt_length(tok):
  # Before: the error came from inside the iterator, at the first batch, naming max_length.
  ds = D.prepare_dataset(D.load_rows([{"prompt": "Hi"}]), tok, task="prompt", config=D.DataConfig())
  config = D.DataConfig(max_length=32, padding_buckets="max_length")
  with pytest.raises(ValueError, match="pads prompts to max_prompt_length, which is not set"):
    D.make_batches(ds, batch_size=1, config=config)
  fixed = D.DataConfig(max_length=32, max_prompt_length=16, padding_buckets="max_length")
  assert next(iter(D.make_batches(ds, batch_size=1, config=fixed)))["input_ids"].shape == (1, 16)


# --- hosts --------------------------------------------------------------------------------------


def _rows(task, n):
  rng = np.random.default_rng(1)
  rows = []
  for i in range(n):
    prompt = f"{i}: " + " ".join(rng.choice(WORDS, rng.integers(1, 6)))
    answer = " " + " ".join(rng.choice(WORDS, rng.integers(1, 25)))
    if task == "sft":
      rows.append({"prompt": prompt, "completion": answer})
    elif task == "preference":
      rows.append({"prompt": prompt, "chosen": answer, "rejected": " no", "margin": float(i)})
    elif task == "unpaired":
      rows.append({"prompt": prompt, "completion": answer, "label": bool(i % 2)})
    else:
      rows.append({"prompt": prompt + answer, "id": i})
  return rows


def _concat(parts):
  """Host batches joined along the batch axis (axis 1 for the [2, B, T] preference arrays)."""
  out = {}
  for key in parts[0]:
    if key == "extras":
      out[key] = {name: sum((p[key][name] for p in parts), []) for name in parts[0][key]}
    else:
      out[key] = np.concatenate([p[key] for p in parts], axis=1 if parts[0][key].ndim == 3 else 0)
  return out


def _assert_same(a, b):
  assert a.keys() == b.keys()
  for key in a:
    if key == "extras":
      assert a[key] == b[key]
    else:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.mark.parametrize("task", ["sft", "preference", "unpaired", "prompt"])
@pytest.mark.parametrize("drop_last", [True, False])
def test_hosts_share_one_shape_and_add_up_to_the_one_host_batch(tok, task, drop_last):
  # Before: each host padded to the bucket of its own longest row, so hosts' arrays differed in
  # shape (no global array can be built from them), and each host shuffled only its own slice, so
  # a 2-host run saw other batches than a 1-host run.
  config = D.DataConfig(max_length=64, dataloader_drop_last=drop_last)
  ds = D.prepare_dataset(D.load_rows(_rows(task, 13)), tok, task=task, config=config)
  # 3 epochs of 13: 39 examples, an odd count, so the last global batch is trimmed to split.
  one_host = list(D.make_batches(ds, batch_size=4, config=config, num_epochs=3))
  hosts = [
    list(
      D.make_batches(
        ds, batch_size=2, config=config, num_epochs=3, process_index=h, process_count=2
      )
    )
    for h in range(2)
  ]
  n = len(ds) * 3
  assert len(hosts[0]) == len(hosts[1]) == (9 if drop_last else 10)
  assert len(hosts[0]) == D.steps_per_epoch(n, batch_size=2, process_count=2, drop_last=drop_last)
  if drop_last:
    assert len(one_host) == len(hosts[0])
  for k, (a, b) in enumerate(zip(*hosts)):
    assert {key: np.shape(v) for key, v in a.items() if key != "extras"} == {
      key: np.shape(v) for key, v in b.items() if key != "extras"
    }
    if drop_last or k < len(hosts[0]) - 1:
      _assert_same(_concat([a, b]), one_host[k])
    else:  # the one-host last batch has 3 rows; each host gets 1 of its first 2
      assert len(a["input_ids" if task != "preference" else "margin"]) == 1


def test_data_smaller_than_one_batch_is_an_error_not_an_empty_epoch(tok):
  # Before: make_batches yielded nothing, and a one-epoch run trained no step without a word.
  config = D.DataConfig(max_length=64)
  ds = D.prepare_dataset(D.load_rows(_rows("sft", 5)), tok, task="sft", config=config)
  with pytest.raises(ValueError, match=r"5 examples \(1 epoch\(s\) of 5\) make no full batch"):
    D.make_batches(ds, batch_size=8, config=config, num_epochs=1)
  assert len(list(D.make_batches(ds, batch_size=4, config=config, num_epochs=2))) == 2
  keep = D.DataConfig(max_length=64, dataloader_drop_last=False)
  assert len(list(D.make_batches(ds, batch_size=8, config=keep, num_epochs=1))) == 1


def test_host_iterators_resume_exactly_across_an_epoch(tok):
  config = D.DataConfig(max_length=64)
  ds = D.prepare_dataset(D.load_rows(_rows("unpaired", 11)), tok, task="unpaired", config=config)

  def make():
    return iter(
      D.make_batches(
        ds, batch_size=2, config=config, num_epochs=3, process_index=1, process_count=2
      )
    )

  it = make()
  full = [next(it) for _ in range(7)]
  for stop in (1, 3, 5):  # 11 examples = 2.75 global batches of 4: stops 3 and 5 cross epochs
    it = make()
    head = [next(it) for _ in range(stop)]
    resumed = make()
    resumed.set_state(json.loads(json.dumps(it.get_state())))
    for a, b in zip(head + [next(resumed) for _ in range(7 - stop)], full):
      _assert_same(a, b)


def test_packed_hosts_take_disjoint_examples_that_change_every_epoch(tok):
  config = D.DataConfig(
    max_length=32,
    packing=True,
    packing_bins=2,
    truncation_mode="keep_end",
    dataloader_drop_last=False,
  )
  ds = D.prepare_dataset(D.load_rows(_rows("sft", 21)), tok, task="sft", config=config)
  examples = {tuple(e["input_ids"].tolist()) for e in ds.examples}

  def segments(host, epochs):
    found = []
    batches = D.make_batches(
      ds, batch_size=2, config=config, num_epochs=epochs, process_index=host, process_count=2
    )
    for b in batches:
      for ids, seg in zip(b["input_ids"], b["segment_ids"]):
        found += [tuple(ids[seg == s].tolist()) for s in range(1, seg.max() + 1)]
    return found

  first = [segments(h, 1) for h in range(2)]
  assert not set(first[0]) & set(first[1])
  assert len(first[0]) == len(first[1]) == 10 and set(first[0]) | set(first[1]) <= examples
  both = [segments(h, 2) for h in range(2)]
  assert set(both[0][10:]) != set(first[0])  # the second epoch draws another share
