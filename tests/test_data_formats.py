"""Data formats: every TRL format plain and conversational, exact completion masks, truncation,
sources (JSONL / JSON / Parquet / directories / saved datasets), and bad rows named by file, row and
field (or skipped and counted)."""

import json

import numpy as np
import pytest

from alignax import data as D
from alignax.models import tokenizer as tk


def cfg(**kwargs):
  return D.DataConfig(**{"max_length": 256, **kwargs})


def prep(rows, tok, task, **kwargs):
  return D.prepare_dataset(D.load_rows(rows), tok, task=task, config=cfg(**kwargs))


def decode(tok, ids):
  return tok.decode([int(i) for i in ids], skip_special_tokens=False)


def split_text(tok, ids, mask):
  """(text under mask 0, text under mask 1), checking the mask is one contiguous 0...01...1 run."""
  ids, mask = np.asarray(ids), np.asarray(mask)
  ones = np.flatnonzero(mask)
  assert ones.size and np.all(mask[ones[0] :] == 1), f"completion mask is not a suffix: {mask}"
  return decode(tok, ids[mask == 0]), decode(tok, ids[mask == 1])


EOS = tk.EOS_TOKEN
USER = [{"role": "user", "content": "What is two plus three?"}]
ANSWER = [{"role": "assistant", "content": "Two plus three is five."}]
WRONG = [{"role": "assistant", "content": "It is six."}]


def render(tok, messages, **kwargs):
  return tk.apply_chat_template(tok, messages, **kwargs)


# --- formats: masks cover exactly the completion -----------------------------------------------


def test_sft_prompt_completion_plain_mask_is_completion_plus_eos(tok):
  ds = prep([{"prompt": "What is two plus three?", "completion": " Five."}], tok, "sft")
  assert (ds.format, ds.conversational) == ("prompt_completion", False)
  (ex,) = ds.examples
  prompt, completion = split_text(tok, ex["input_ids"], ex["completion_mask"])
  assert (prompt, completion) == ("What is two plus three?", " Five." + EOS)


def test_sft_prompt_completion_conversational_mask_is_rendered_remainder(tok):
  ds = prep([{"prompt": USER, "completion": ANSWER}], tok, "sft")
  assert ds.conversational
  (ex,) = ds.examples
  prompt, completion = split_text(tok, ex["input_ids"], ex["completion_mask"])
  prompt_text = render(tok, USER, add_generation_prompt=True)
  assert prompt == prompt_text
  assert prompt + completion == render(tok, USER + ANSWER)
  assert completion.startswith("Two plus three is five." + EOS)


def test_sft_completion_only_loss_false_puts_prompt_in_mask(tok):
  ds = prep([{"prompt": "Hi", "completion": " there"}], tok, "sft", completion_only_loss=False)
  assert ds.examples[0]["completion_mask"].all()


def test_sft_language_modelling_text_and_custom_field(tok):
  ds = prep([{"text": "The quick brown fox."}], tok, "sft")
  (ex,) = ds.examples
  assert ds.format == "language_modeling"
  assert decode(tok, ex["input_ids"]) == "The quick brown fox." + EOS
  assert ex["completion_mask"].all()
  ds = prep([{"body": "A cat."}], tok, "sft", dataset_text_field="body")
  assert decode(tok, ds.examples[0]["input_ids"]) == "A cat." + EOS


def test_sft_messages_full_and_assistant_only(tok):
  conversation = USER + ANSWER
  full = prep([{"messages": conversation}], tok, "sft").examples[0]
  assert decode(tok, full["input_ids"]) == render(tok, conversation)
  assert full["completion_mask"].all()
  ex = prep([{"messages": conversation}], tok, "sft", assistant_only_loss=True).examples[0]
  np.testing.assert_array_equal(ex["input_ids"], full["input_ids"])
  assert decode(tok, ex["input_ids"][ex["completion_mask"] == 1]) == "Two plus three is five." + EOS


@pytest.mark.parametrize("conversational", [False, True])
def test_preference_explicit_prompt(tok, conversational):
  if conversational:
    row = {"prompt": USER, "chosen": ANSWER, "rejected": WRONG}
  else:
    row = {"prompt": "What is two plus three?", "chosen": " Five.", "rejected": " Six."}
  ds = prep([row], tok, "preference")
  assert (ds.format, ds.conversational) == ("preference", conversational)
  (ex,) = ds.examples
  p1, chosen = split_text(tok, ex["chosen_input_ids"], ex["chosen_completion_mask"])
  p2, rejected = split_text(tok, ex["rejected_input_ids"], ex["rejected_completion_mask"])
  assert p1 == p2
  if conversational:
    assert p1 == render(tok, USER, add_generation_prompt=True)
    assert p1 + chosen == render(tok, USER + ANSWER) and p1 + rejected == render(tok, USER + WRONG)
  else:
    assert (p1, chosen, rejected) == ("What is two plus three?", " Five." + EOS, " Six." + EOS)
  assert "margin" not in ex


def test_preference_implicit_prompt_conversational_is_common_message_prefix(tok):
  ds = prep([{"chosen": USER + ANSWER, "rejected": USER + WRONG, "margin": 2}], tok, "preference")
  assert ds.format == "implicit_preference"
  (ex,) = ds.examples
  prompt, chosen = split_text(tok, ex["chosen_input_ids"], ex["chosen_completion_mask"])
  assert prompt == render(tok, USER, add_generation_prompt=True)
  assert prompt + chosen == render(tok, USER + ANSWER)
  assert ex["margin"] == np.float32(2.0)


@pytest.mark.parametrize(
  ("chosen", "rejected", "prompt", "completions"),
  [
    ("Q: capital? A: Paris", "Q: capital? A: Rome", "Q: capital? A:", (" Paris", " Rome")),
    # Divergence inside a word backs off to the previous space, never splitting "Paris"/"Parma".
    ("Q: capital? A: Paris", "Q: capital? A: Parma", "Q: capital? A:", (" Paris", " Parma")),
  ],
)
def test_preference_implicit_prompt_plain_splits_at_whitespace(
  tok, chosen, rejected, prompt, completions
):
  (ex,) = prep([{"chosen": chosen, "rejected": rejected}], tok, "preference").examples
  assert split_text(tok, ex["chosen_input_ids"], ex["chosen_completion_mask"]) == (
    prompt,
    completions[0] + EOS,
  )
  assert split_text(tok, ex["rejected_input_ids"], ex["rejected_completion_mask"])[1] == (
    completions[1] + EOS
  )


@pytest.mark.parametrize("conversational", [False, True])
def test_unpaired_and_paired_preference_for_kto(tok, conversational):
  if conversational:
    rows = [
      {"prompt": USER, "completion": ANSWER, "label": True},
      {"prompt": USER, "completion": WRONG, "label": False},
    ]
  else:
    rows = [
      {"prompt": "2+3?", "completion": " 5", "label": True},
      {"prompt": "2+3?", "completion": " 6", "label": False},
    ]
  unpaired = prep(rows, tok, "unpaired")
  assert unpaired.format == "unpaired_preference"
  assert [bool(e["label"]) for e in unpaired.examples] == [True, False]
  paired_row = {"prompt": rows[0]["prompt"], "chosen": rows[0]["completion"]}
  paired_row["rejected"] = rows[1]["completion"]
  paired = prep([paired_row], tok, "unpaired")
  assert paired.format == "preference" and len(paired) == 2
  for a, b in zip(unpaired.examples, paired.examples):
    for key in ("input_ids", "completion_mask", "label"):
      np.testing.assert_array_equal(a[key], b[key])


@pytest.mark.parametrize("conversational", [False, True])
def test_prompt_only_passes_extra_columns_and_truncates_start(tok, conversational):
  prompt = USER if conversational else "What is two plus three?"
  ds = prep([{"prompt": prompt, "answer": "5", "level": 2}], tok, "prompt")
  (ex,) = ds.examples
  expected = render(tok, USER, add_generation_prompt=True) if conversational else prompt
  assert decode(tok, ex["prompt_ids"]) == expected
  assert ex["extras"] == {"prompt": prompt, "answer": "5", "level": 2}
  short = prep([{"prompt": prompt}], tok, "prompt", max_prompt_length=3)
  np.testing.assert_array_equal(short.examples[0]["prompt_ids"], ex["prompt_ids"][-3:])
  assert short.num_truncated == 1


# --- truncation ----------------------------------------------------------------------------------


def test_truncate_modes():
  ids, mask = [1, 2, 3, 4, 5], [0, 0, 1, 1, 1]
  assert D.truncate(ids, mask, max_length=3, truncation_mode="keep_start") == ([1, 2, 3], [0, 0, 1])
  assert D.truncate(ids, mask, max_length=3, truncation_mode="keep_end") == ([3, 4, 5], [1, 1, 1])
  assert D.truncate(ids, mask, max_length=None) == (ids, mask)
  assert D.truncate(ids, mask, max_length=9) == (ids, mask)


def test_truncation_keep_start_cuts_completion_end_keep_end_cuts_prompt_start(tok):
  row = {"prompt": "What is two plus three?", "completion": " Two plus three is five."}
  full = prep([row], tok, "sft").examples[0]
  n_prompt = int((full["completion_mask"] == 0).sum())
  limit = n_prompt + 2
  start = prep([row], tok, "sft", max_length=limit, truncation_mode="keep_start")
  end = prep([row], tok, "sft", max_length=limit, truncation_mode="keep_end")
  assert start.num_truncated == end.num_truncated == 1
  np.testing.assert_array_equal(start.examples[0]["input_ids"], full["input_ids"][:limit])
  np.testing.assert_array_equal(start.examples[0]["completion_mask"].sum(), 2)
  np.testing.assert_array_equal(end.examples[0]["input_ids"], full["input_ids"][-limit:])
  # keep_end drops the prompt's beginning first: the whole completion survives.
  assert end.examples[0]["completion_mask"].sum() == full["completion_mask"].sum()


def test_preference_truncation_keeps_pair_prompts_equal_under_keep_start(tok):
  row = {"prompt": "What is two plus three?", "chosen": " Five, it is five.", "rejected": " Six."}
  (ex,) = prep([row], tok, "preference", max_length=10).examples
  assert len(ex["chosen_input_ids"]) == 10 and len(ex["rejected_input_ids"]) <= 10
  n_prompt = int((ex["chosen_completion_mask"] == 0).sum())
  np.testing.assert_array_equal(
    ex["chosen_input_ids"][:n_prompt], ex["rejected_input_ids"][:n_prompt]
  )


# --- sources ----------------------------------------------------------------------------------

ROWS = [
  {"prompt": "What is two plus three?", "chosen": " Five.", "rejected": " Six."},
  {"prompt": "Capital of France?", "chosen": " Paris.", "rejected": " Rome."},
]


def _ids(ds):
  return [e["chosen_input_ids"].tolist() for e in ds.examples]


def test_sources_jsonl_json_and_directories_agree(tok, tmp_path):
  reference = _ids(prep(ROWS, tok, "preference"))
  (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS) + "\n\n")
  (tmp_path / "b.json").write_text(json.dumps(ROWS))
  (tmp_path / "c.json").write_text(json.dumps({k: [r[k] for r in ROWS] for k in ROWS[0]}))
  # JSON Lines under a .json name, as datasets' to_json writes it.
  (tmp_path / "d.json").write_text("\n".join(json.dumps(r) for r in ROWS))
  for name in ("a.jsonl", "b.json", "c.json", "d.json"):
    ds = D.prepare_dataset(D.load_rows(tmp_path / name), tok, task="preference", config=cfg())
    assert _ids(ds) == reference, name
  # A directory without split names is the train split; files are read in sorted order.
  whole = D.load_rows(tmp_path)
  names = [r.source.rsplit("/", 1)[-1] for r in whole]
  assert names == ["a.jsonl", "a.jsonl", "b.json", "b.json", "c.json", "c.json", "d.json", "d.json"]
  assert [r.index for r in whole] == [0, 1] * 4
  with pytest.raises(D.DataError, match="split 'test'"):
    D.load_rows(tmp_path, split="test")


def test_parquet_file(tok, tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq

  pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "d.parquet")
  ds = D.prepare_dataset(D.load_rows(tmp_path / "d.parquet"), tok, task="preference", config=cfg())
  assert _ids(ds) == _ids(prep(ROWS, tok, "preference"))


def test_directory_splits_by_file_name(tmp_path):
  (tmp_path / "train-00000-of-00001.jsonl").write_text(json.dumps(ROWS[0]))
  (tmp_path / "test.jsonl").write_text(json.dumps(ROWS[1]))
  assert [r.data for r in D.load_rows(tmp_path)] == [ROWS[0]]
  assert [r.data for r in D.load_rows(tmp_path, split="test")] == [ROWS[1]]
  with pytest.raises(D.DataError, match=r"no files for split 'validation'.*\['test', 'train'\]"):
    D.load_rows(tmp_path, split="validation")


def test_saved_hf_dataset_and_load_dataset_config(tok, tmp_path):
  import datasets
  dd = datasets.DatasetDict(
    {"train": datasets.Dataset.from_list(ROWS), "test": datasets.Dataset.from_list(ROWS[:1])}
  )
  dd.save_to_disk(tmp_path / "dd")
  config = cfg(dataset_name=str(tmp_path / "dd"))
  train = D.load_dataset(config, tok, task="preference")
  test = D.load_dataset(config, tok, task="preference", split="test")
  assert _ids(train) == _ids(prep(ROWS, tok, "preference"))
  assert len(test) == 1 and test.num_rows == 1
  datasets.Dataset.from_list(ROWS).save_to_disk(tmp_path / "single")
  assert len(D.load_rows(tmp_path / "single")) == 2


def test_hub_errors_are_named(monkeypatch):
  import datasets

  def unreachable(*args, **kwargs):
    raise ConnectionError("Couldn't reach 'org/prefs' on the Hub (OfflineModeIsEnabled)")

  def missing(*args, **kwargs):
    raise datasets.exceptions.DatasetNotFoundError("Dataset 'org/prefs' doesn't exist on the Hub")

  monkeypatch.setattr(datasets, "load_dataset", unreachable)
  with pytest.raises(D.DataError, match=r"^org/prefs: could not load 'org/prefs' \(config 'c', "):
    D.load_rows("org/prefs", config_name="c", split="test")
  monkeypatch.setattr(datasets, "load_dataset", missing)
  with pytest.raises(D.DataError, match=r"the hub has no such dataset"):
    D.load_rows("org/prefs")
  calls = []
  monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append((a, k)) or ROWS)
  assert [r.data for r in D.load_rows("org/prefs", config_name="c", split="dev")] == ROWS
  assert calls == [(("org/prefs", "c"), {"split": "dev"})]


def test_optional_packages_missing_give_install_hints(monkeypatch, tmp_path):
  import sys

  (tmp_path / "x.parquet").write_bytes(b"PAR1")
  monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
  with pytest.raises(ImportError, match="needs pyarrow: pip install pyarrow"):
    D.load_rows(tmp_path / "x.parquet")
  monkeypatch.setitem(sys.modules, "datasets", None)
  with pytest.raises(ImportError, match="needs the `datasets` package: pip install datasets"):
    D.load_rows("org/prefs")


def test_missing_local_path_is_not_sent_to_the_hub(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    D.load_rows(str(tmp_path / "nope.jsonl"))


# --- bad data: file, row and field named; or skipped and counted -------------------------------

GOOD = {"prompt": "Hi", "chosen": " Hello.", "rejected": " Go away."}
GOOD_CHAT = {"prompt": USER, "chosen": ANSWER, "rejected": WRONG}
BAD_PREFERENCE_ROWS = [
  ({"prompt": "Hi", "chosen": " Hello."}, "rejected", "missing", "missing_field"),
  ({**GOOD, "chosen": 3}, "chosen", "must be a string or a list", "wrong_type"),
  ({**GOOD, "rejected": ""}, "rejected", "empty string", "empty"),
  (
    {**GOOD, "prompt": [{"role": "user"}], "chosen": [], "rejected": []},
    "prompt[0].content",
    "must be a string",
    "bad_messages",
  ),
  (
    {**GOOD, "prompt": USER, "chosen": ["hi"], "rejected": WRONG},
    "chosen[0]",
    "must be an object",
    "bad_messages",
  ),
  ({**GOOD, "prompt": USER}, "chosen", "mixed", "wrong_type"),
  (
    {**GOOD, "prompt": [{"role": "robot", "content": "x"}], "chosen": ANSWER, "rejected": WRONG},
    "prompt",
    "role must be system, user or assistant",
    "bad_messages",
  ),
  ({**GOOD, "prompt": "Hi " * 40}, "chosen", "leaves no room", "no_room"),
]


@pytest.mark.parametrize(("row", "field", "message", "kind"), BAD_PREFERENCE_ROWS)
def test_bad_preference_row_names_file_row_and_field(tok, tmp_path, row, field, message, kind):
  good = GOOD_CHAT if isinstance(row.get("prompt"), list) else GOOD  # one style per dataset
  path = tmp_path / "prefs.jsonl"
  path.write_text("\n".join(json.dumps(r) for r in [good, good, row, good]))
  rows = D.load_rows(path)
  with pytest.raises(D.DataError) as info:
    D.prepare_dataset(rows, tok, task="preference", config=cfg(max_length=16))
  error = info.value
  assert isinstance(error, ValueError)
  assert (error.source, error.row, error.line, error.field, error.kind) == (
    str(path),
    2,
    3,
    field,
    kind,
  )
  assert str(error).startswith(f"{path}: row 2 (line 3): field {field!r}: ")
  assert message in str(error)
  skipped = D.prepare_dataset(
    rows, tok, task="preference", config=cfg(max_length=16, skip_invalid=True)
  )
  assert (len(skipped), skipped.num_rows, skipped.skipped) == (3, 4, {kind: 1})


def test_bad_json_line_names_file_and_row_and_can_be_skipped(tok, tmp_path):
  path = tmp_path / "prefs.jsonl"
  path.write_text(json.dumps(GOOD) + "\n\n" + '{"prompt": "Hi", "chosen": \n' + "[1, 2]\n")
  rows = D.load_rows(path)
  with pytest.raises(D.DataError, match=rf"^{path}: row 1 \(line 3\): invalid JSON"):
    D.prepare_dataset(rows, tok, task="preference", config=cfg())
  seen = []
  ds = D.prepare_dataset(
    rows, tok, task="preference", config=cfg(skip_invalid=True), on_skip=seen.append
  )
  assert ds.skipped == {"invalid_json": 1, "wrong_type": 1} and len(ds) == 1
  assert [e.row for e in seen] == [1, 2] and "must be a JSON object" in str(seen[1])


def test_bad_json_document(tmp_path):
  path = tmp_path / "broken.json"
  path.write_text('[{"prompt": "Hi",}]')
  with pytest.raises(D.DataError, match=rf"^{path}: invalid JSON: .* line 1"):
    D.load_rows(path)


@pytest.mark.parametrize("label", [1, "true", None])
def test_non_boolean_label(tok, label):
  rows = [{"prompt": "Hi", "completion": " there", "label": True}]
  rows.append({"prompt": "Hi", "completion": " you", "label": label})
  with pytest.raises(D.DataError, match=r"^<rows>: row 1: field 'label': ") as info:
    prep(rows, tok, "unpaired")
  assert info.value.kind == ("missing_field" if label is None else "bad_label")


def test_bad_margin_and_empty_completion(tok):
  with pytest.raises(D.DataError, match=r"row 0: field 'margin': must be a number"):
    prep([{**GOOD, "margin": "big"}], tok, "preference")
  with pytest.raises(D.DataError, match=r"row 0: field 'margin': must be finite"):
    prep([{**GOOD, "margin": float("nan")}], tok, "preference")
  assert len(prep([{**GOOD, "margin": "big"}], tok, "unpaired")) == 2  # KTO ignores margins
  with pytest.raises(D.DataError, match=r"row 0: field 'completion': empty string"):
    prep([{"prompt": "Hi", "completion": ""}], tok, "sft")
  with pytest.raises(D.DataError, match=r"row 0: field 'rejected': empty completion"):
    prep([{"chosen": USER + ANSWER, "rejected": USER}], tok, "preference")
  with pytest.raises(D.DataError, match=r"row 0: field 'chosen': no implicit prompt"):
    prep([{"chosen": "Yes.", "rejected": "No."}], tok, "preference")


def test_sft_prompt_filling_max_length_is_no_room_or_skipped(tok):
  rows = [{"prompt": "Hi " * 30, "completion": " ok"}, {"prompt": "Hi", "completion": " ok"}]
  with pytest.raises(D.DataError, match=r"row 0: field 'completion': the prompt leaves no room"):
    prep(rows, tok, "sft", max_length=8)
  ds = prep(rows, tok, "sft", max_length=8, skip_invalid=True)
  assert ds.skipped == {"no_room": 1} and len(ds) == 1
  # keep_end keeps the completion, so the same row is fine.
  assert len(prep(rows, tok, "sft", max_length=8, truncation_mode="keep_end")) == 2


def test_rows_mixing_plain_and_conversational(tok):
  rows = [{"prompt": "Hi", "completion": " there"}, {"prompt": USER, "completion": ANSWER}]
  with pytest.raises(D.DataError, match=r"row 1: field 'prompt': earlier rows hold strings"):
    prep(rows, tok, "sft")


@pytest.mark.parametrize(
  ("task", "expected"),
  [
    (
      "sft",
      "prompt_completion ('prompt' + 'completion'); language_modeling ('text' or 'messages')",
    ),
    ("preference", "preference ('prompt' + 'chosen' + 'rejected'); implicit_preference"),
    ("prompt", "prompt_only ('prompt')"),
  ],
)
def test_unknown_format_names_columns_and_expected_formats(tok, task, expected):
  with pytest.raises(D.DataError) as info:
    prep([{"question": "Hi", "answer": "Yo"}], tok, task)
  assert f"columns ['answer', 'question'] fit no {task} format" in str(info.value)
  assert expected in str(info.value)


def test_everything_skipped_is_an_error(tok):
  with pytest.raises(D.DataError, match=r"no usable row: all 1 were skipped \({'empty': 1}\)"):
    prep([{"text": ""}], tok, "sft", skip_invalid=True)


@pytest.mark.parametrize(
  ("kwargs", "message"),
  [
    ({"truncation_mode": "keep_middle"}, "truncation_mode='keep_middle' is not supported"),
    ({"max_length": 0}, "max_length must be a positive int"),
    ({"packing": True, "max_length": None}, "packing=True needs max_length"),
    ({"padding_buckets": "pow3"}, "padding_buckets='pow3' is not supported"),
    ({"pad_to_multiple_of": -8}, "pad_to_multiple_of must be a positive int"),
  ],
)
def test_bad_config_values(kwargs, message):
  with pytest.raises(ValueError, match=message):
    D.DataConfig(**kwargs)
