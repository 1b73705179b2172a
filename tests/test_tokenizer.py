"""Tokenizer helpers: the tiny BPE tokenizer, offline loading, and chat-template rendering."""

import jinja2
import pytest
import transformers

from alignax.models import tokenizer as tk

CONVERSATION = [
  {"role": "user", "content": "What is 2+3?"},
  {"role": "assistant", "content": "It is 5."},
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("tiny_tokenizer")
  tk.build_tiny_tokenizer(path, vocab_size=400)
  return path


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
  return tk.load_tokenizer(tiny_dir)


def test_saved_directory_loads_offline_with_auto_tokenizer(tiny_dir, monkeypatch):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  loaded = transformers.AutoTokenizer.from_pretrained(tiny_dir, local_files_only=True)
  assert len(loaded) == 400
  assert (loaded.pad_token, loaded.bos_token, loaded.eos_token) == ("<|pad|>", "<|bos|>", "<|eos|>")
  assert (loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id) == (0, 1, 2)
  assert loaded.convert_tokens_to_ids(["<|system|>", "<|user|>", "<|assistant|>"]) == [3, 4, 5]
  assert loaded.chat_template == tk.TINY_CHAT_TEMPLATE


@pytest.mark.parametrize(
  "text", ["The quick brown fox.", "unseen wörds, émojis 😀 and\ttabs\n", "  12 + 7 = 19  "]
)
def test_encode_decode_round_trip(tokenizer, text):
  ids = tokenizer(text)["input_ids"]
  assert tokenizer.decode(ids) == text
  # Plain encoding adds no special tokens: only the chat template writes BOS/EOS.
  assert not set(ids) & {tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id}


def test_merges_compress_the_training_corpus(tokenizer):
  text = "The reference model stays frozen and anchors the policy."
  assert len(tokenizer(text)["input_ids"]) < len(text.encode()) // 2


def test_build_is_deterministic_and_bounded():
  first = tk.build_tiny_tokenizer(vocab_size=300)
  second = tk.build_tiny_tokenizer(vocab_size=300)
  assert first.get_vocab() == second.get_vocab()
  # The built-in corpus runs out of pairs long before 10k merges.
  assert len(tk.build_tiny_tokenizer(vocab_size=10_000)) < 10_000


def test_custom_corpus_is_learned():
  tokenizer = tk.build_tiny_tokenizer(vocab_size=300, corpus=["zebra zebra zebra"] * 4)
  assert tokenizer.convert_ids_to_tokens(tokenizer("zebra")["input_ids"]) == ["zebra"]


def test_vocab_smaller_than_bytes_is_rejected():
  with pytest.raises(ValueError, match="vocab_size must be >= 262"):
    tk.build_tiny_tokenizer(vocab_size=100)


def test_chat_template_two_turns(tokenizer):
  text = tk.apply_chat_template(tokenizer, CONVERSATION)
  assert text == "<|bos|><|user|>\nWhat is 2+3?<|eos|>\n<|assistant|>\nIt is 5.<|eos|>\n"


def test_chat_template_generation_prompt(tokenizer):
  prompt = tk.apply_chat_template(tokenizer, CONVERSATION[:1], add_generation_prompt=True)
  assert prompt == "<|bos|><|user|>\nWhat is 2+3?<|eos|>\n<|assistant|>\n"
  # The prompt is a prefix of the full conversation, so completion tokens can be split off it.
  assert tk.apply_chat_template(tokenizer, CONVERSATION).startswith(prompt)


def test_chat_template_continue_final_message(tokenizer):
  partial = [*CONVERSATION[:1], {"role": "assistant", "content": "It is"}]
  text = tk.apply_chat_template(tokenizer, partial, continue_final_message=True)
  assert text == "<|bos|><|user|>\nWhat is 2+3?<|eos|>\n<|assistant|>\nIt is"


def test_chat_template_batch(tokenizer):
  texts = tk.apply_chat_template(tokenizer, [CONVERSATION, CONVERSATION[:1]])
  assert texts == [
    tk.apply_chat_template(tokenizer, CONVERSATION),
    tk.apply_chat_template(tokenizer, CONVERSATION[:1]),
  ]


def test_rendered_chat_tokenises_with_one_bos_and_assistant_mask(tokenizer):
  ids = tokenizer(tk.apply_chat_template(tokenizer, CONVERSATION), add_special_tokens=False)[
    "input_ids"
  ]
  assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id
  assert ids.count(tokenizer.eos_token_id) == 2
  encoded = tokenizer.apply_chat_template(
    CONVERSATION, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
  )
  assert encoded["input_ids"] == ids
  masked = [i for i, m in zip(ids, encoded["assistant_masks"], strict=True) if m]
  assert tokenizer.decode(masked) == "It is 5.<|eos|>"


def test_padding_side_and_pad_id(tiny_dir):
  left = tk.load_tokenizer(tiny_dir, padding_side="left")
  batch = left(["hi", "a longer sentence here"], padding=True)
  short_ids, short_mask = batch["input_ids"][0], batch["attention_mask"][0]
  n_pad = short_mask.count(0)
  assert n_pad > 0 and short_mask == [0] * n_pad + [1] * (len(short_mask) - n_pad)
  assert short_ids[:n_pad] == [left.pad_token_id] * n_pad


def test_missing_pad_token_falls_back_to_eos(tmp_path):
  tokenizer = tk.build_tiny_tokenizer(vocab_size=300)
  tokenizer.pad_token = None
  tokenizer.save_pretrained(tmp_path)
  loaded = tk.load_tokenizer(tmp_path)
  assert loaded.pad_token == "<|eos|>" and loaded.pad_token_id == loaded.eos_token_id


def test_directory_without_tokenizer_is_a_clear_error(tmp_path):
  (tmp_path / "config.json").write_text("{}")
  with pytest.raises(FileNotFoundError, match=r"no tokenizer in .*tokenizer\.json.*config\.json"):
    tk.load_tokenizer(tmp_path)
  with pytest.raises(FileNotFoundError, match="is not a directory"):
    tk.load_tokenizer(tmp_path / "missing")


def test_bad_arguments_are_named(tokenizer, tiny_dir):
  with pytest.raises(ValueError, match="padding_side"):
    tk.load_tokenizer(tiny_dir, padding_side="middle")
  with pytest.raises(ValueError, match=r"messages\[1\]\['content'\]"):
    tk.apply_chat_template(tokenizer, [CONVERSATION[0], {"role": "assistant", "content": 5}])
  with pytest.raises(ValueError, match=r"messages\[1\]\[0\]\['role'\]"):
    tk.apply_chat_template(tokenizer, [CONVERSATION, [{"content": "no role"}]])
  with pytest.raises(ValueError, match="non-empty list"):
    tk.apply_chat_template(tokenizer, [])
  with pytest.raises(ValueError, match="mutually exclusive"):
    tk.apply_chat_template(
      tokenizer, CONVERSATION, add_generation_prompt=True, continue_final_message=True
    )


def test_unknown_role_is_rejected_by_the_template(tokenizer):
  with pytest.raises(jinja2.TemplateError, match="must be system, user or assistant, got tool"):
    tk.apply_chat_template(tokenizer, [{"role": "tool", "content": "42"}])


def test_tokenizer_without_chat_template_is_a_clear_error(tmp_path):
  tokenizer = tk.build_tiny_tokenizer(vocab_size=300)
  tokenizer.chat_template = None
  with pytest.raises(ValueError, match="has no chat template"):
    tk.apply_chat_template(tokenizer, CONVERSATION)
  plain = "{% for m in messages %}{{ m['content'] }};{% endfor %}"
  text = tk.apply_chat_template(tokenizer, CONVERSATION, chat_template=plain)
  assert text == "What is 2+3?;It is 5.;"
