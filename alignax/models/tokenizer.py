"""Tokenizers: load a Hugging Face tokenizer from a local directory, render chat templates, and
build a tiny byte-level BPE tokenizer for tests and demos (the hub is never contacted).

Conversational rows follow the TRL convention: a list of ``{"role": ..., "content": ...}`` messages,
rendered to text with the tokenizer's Jinja chat template and then tokenised with
``add_special_tokens=False`` (the template already writes the special tokens it wants).
"""

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import tokenizers
import transformers
from tokenizers import decoders, models, pre_tokenizers, trainers

from alignax import _validate
from alignax.models.hub import TOKENIZER_FILES, resolve_pretrained

Message = Mapping[str, Any]

# Files of which at least one marks a directory as holding a tokenizer (fast JSON, SentencePiece, or
# GPT-2 / BERT style vocabularies).
_TOKENIZER_FILES = (
  "tokenizer.json",
  "tokenizer_config.json",
  "tokenizer.model",
  "spiece.model",
  "vocab.json",
  "vocab.txt",
)

PAD_TOKEN = "<|pad|>"
BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"
CHAT_ROLES = ("system", "user", "assistant")

# Every turn is ``<|role|>\n{content}<|eos|>\n``; the assistant's text (and its <|eos|>) sits inside
# a {% generation %} block so ``return_assistant_tokens_mask=True`` can find the completion tokens.
# The template runs under transformers' Jinja settings (trim_blocks, lstrip_blocks), hence one line.
TINY_CHAT_TEMPLATE = (
  "{{ bos_token }}"
  "{% for message in messages %}"
  "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
  "{{ raise_exception('role must be system, user or assistant, got ' + message['role']) }}"
  "{% endif %}"
  "{{ '<|' + message['role'] + '|>\n' }}"
  "{% if message['role'] == 'assistant' %}"
  "{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}{{ '\n' }}"
  "{% else %}"
  "{{ message['content'] + eos_token + '\n' }}"
  "{% endif %}"
  "{% endfor %}"
  "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

# A small English corpus with digits and arithmetic, so the merges cover the words the demos use.
_TINY_CORPUS = (
  "The quick brown fox jumps over the lazy dog.",
  "A language model assigns a probability to every sequence of tokens.",
  "Alignment tunes a pretrained model so that its answers follow human preferences.",
  "Supervised fine-tuning imitates demonstrations written by people.",
  "A reward model scores a completion; the policy learns to earn a higher score.",
  "Direct preference optimisation compares a chosen and a rejected answer to the same prompt.",
  "The reference model stays frozen and anchors the policy with a penalty on the divergence.",
  "Group relative policy optimisation samples several answers per prompt and ranks them.",
  "What is the capital of France? The capital of France is Paris.",
  "What is two plus three? Two plus three is five.",
  "Compute 12 + 7 = 19, 45 - 18 = 27, 6 * 8 = 48 and 81 / 9 = 9.",
  "The numbers are 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 100 1000.",
  "Please answer briefly and explain your reasoning step by step.",
  "Thank you! You are welcome. I am happy to help with your question.",
  "The weather today is sunny with a light breeze and a few clouds in the afternoon.",
  "She read a good book about the history of science, mathematics and music.",
  "This movie was wonderful, the acting was great and the story was moving.",
  "This movie was terrible, the plot was boring and the ending made no sense.",
  "I love this song; it is not bad at all, in fact it is very good.",
  "Water boils at one hundred degrees Celsius at sea level.",
  "The train leaves the station at nine in the morning and arrives at noon.",
  "Cats sleep for most of the day, while dogs like to run and play outside.",
  "Write a short poem about the sea, the wind and the stars at night.",
  "Summarise the following text in one sentence for a busy reader.",
  "Translate the sentence into French: the cat is on the table.",
  "def add(a, b):\n    return a + b\n",
  "for i in range(10):\n    print(i * i)\n",
  "User: Hello, who are you?\nAssistant: I am a helpful assistant.\n",
  "Is the answer correct? Yes, the answer is correct. No, the answer is wrong.",
  "Every token in the completion gets a log-probability under the policy and the reference.",
)


def load_tokenizer(
  path: str | os.PathLike[str], *, padding_side: str | None = None
) -> transformers.PreTrainedTokenizerBase:
  """Loads ``transformers.AutoTokenizer`` from a local directory or a hub id (``org/name``, taken from
  the Hugging Face cache, or downloaded into it where a network exists).

  Many base-model tokenizers (Llama, Mistral) define no pad token; then the EOS token is used for
  padding, the usual convention in alignment trainers. Padding positions are always masked out by
  ``attention_mask``, so the choice never changes a loss.

  Args:
    path: directory holding ``tokenizer.json`` / ``tokenizer_config.json`` (or a SentencePiece or
      vocabulary file), as written by ``save_pretrained``; or a hub id.
    padding_side: ``"left"`` (generation: prompts end at the same column) or ``"right"`` (training);
      None keeps the tokenizer's own setting.

  Returns:
    The tokenizer.

  Raises:
    FileNotFoundError: ``path`` is neither a directory nor a hub id, or holds no tokenizer file.
    OSError: a hub id that is not cached while the hub is unreachable (the message says so).
    ValueError: ``padding_side`` is invalid, or the tokenizer has neither a pad nor an EOS token.
  """
  if padding_side is not None:
    _validate.choice("padding_side", padding_side, ("left", "right"))
  directory = Path(resolve_pretrained(path, allow_patterns=TOKENIZER_FILES))
  if not any((directory / name).is_file() for name in _TOKENIZER_FILES):
    present = sorted(p.name for p in directory.iterdir())
    raise FileNotFoundError(
      f"no tokenizer in {str(directory)!r}: expected one of {list(_TOKENIZER_FILES)}, "
      f"found {present}"
    )
  tokenizer = transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True)
  if tokenizer.pad_token is None:
    if tokenizer.eos_token is None:
      raise ValueError(f"tokenizer in {str(directory)!r} has neither a pad nor an eos token")
    tokenizer.pad_token = tokenizer.eos_token
  if padding_side is not None:
    tokenizer.padding_side = padding_side
  return tokenizer


def _check_messages(name: str, messages: Any) -> None:
  if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
    raise ValueError(f"{name} must be a non-empty list of {{role, content}} messages")
  for i, message in enumerate(messages):
    if not isinstance(message, Mapping):
      raise ValueError(f"{name}[{i}] must be a mapping with 'role' and 'content', got {message!r}")
    for field in ("role", "content"):
      if not isinstance(message.get(field), str):
        raise ValueError(f"{name}[{i}][{field!r}] must be a string, got {message.get(field)!r}")


def apply_chat_template(
  tokenizer: transformers.PreTrainedTokenizerBase,
  messages: Sequence[Message] | Sequence[Sequence[Message]],
  *,
  add_generation_prompt: bool = False,
  continue_final_message: bool = False,
  chat_template: str | None = None,
) -> str | list[str]:
  """Renders one conversation (or a batch of them) to text with the tokenizer's chat template.

  Tokenise the result with ``tokenizer(text, add_special_tokens=False)``: the template has already
  written BOS and the turn markers, and a second BOS would shift every position.

  Args:
    tokenizer: a tokenizer with a chat template (``tokenizer.chat_template``).
    messages: ``[{"role": ..., "content": ...}, ...]``, or a list of such conversations.
    add_generation_prompt: append the header that opens an assistant turn (for prompts the policy
      completes).
    continue_final_message: leave the last message open (no end-of-turn token) so a partial
      assistant answer can be continued; exclusive with ``add_generation_prompt``.
    chat_template: a Jinja template overriding the tokenizer's own.

  Returns:
    The rendered text, or a list of texts for a batch of conversations.

  Raises:
    ValueError: a message is malformed (names its index), both flags are set, or the tokenizer has
      no chat template and none is given.
  """
  if add_generation_prompt and continue_final_message:
    raise ValueError("add_generation_prompt and continue_final_message are mutually exclusive")
  if chat_template is None and getattr(tokenizer, "chat_template", None) is None:
    raise ValueError(
      f"{type(tokenizer).__name__} has no chat template; pass chat_template= or use a tokenizer "
      "saved with one"
    )
  batched = (
    isinstance(messages, Sequence)
    and bool(messages)
    and not isinstance(messages[0], Mapping)
    and not isinstance(messages, (str, bytes))
  )
  conversations = list(messages) if batched else [messages]
  for b, conversation in enumerate(conversations):
    _check_messages(f"messages[{b}]" if batched else "messages", conversation)
  texts = tokenizer.apply_chat_template(
    [[dict(m) for m in c] for c in conversations],
    chat_template=chat_template,
    add_generation_prompt=add_generation_prompt,
    continue_final_message=continue_final_message,
    tokenize=False,
  )
  return list(texts) if batched else texts[0]


def build_tiny_tokenizer(
  path: str | os.PathLike[str] | None = None,
  *,
  vocab_size: int = 512,
  chat_template: str = TINY_CHAT_TEMPLATE,
  corpus: Iterable[str] | None = None,
) -> transformers.PreTrainedTokenizerFast:
  """Trains a small byte-level BPE tokenizer (Sennrich et al., 2016; GPT-2 byte alphabet).

  Every byte is in the vocabulary, so any text round-trips. Special tokens come first: ids
  ``0, 1, 2`` are ``<|pad|>``, ``<|bos|>``, ``<|eos|>``, followed by the role markers
  ``<|system|>``, ``<|user|>``, ``<|assistant|>`` used by :data:`TINY_CHAT_TEMPLATE`. Plain
  ``tokenizer(text)`` adds no special tokens (like Qwen); the chat template writes BOS and EOS.
  Training is deterministic, so the same arguments give the same tokenizer.

  Args:
    path: directory to ``save_pretrained`` into (created if needed), loadable offline with
      ``AutoTokenizer.from_pretrained(path)``; None keeps the tokenizer in memory only.
    vocab_size: upper bound on the vocabulary (bytes + special tokens + merges). The merges stop
      early when the corpus has no more pairs, so ``len(tokenizer) <= vocab_size``; size the model's
      embedding with ``vocab_size`` (a larger embedding than vocabulary is the usual padding).
    chat_template: Jinja chat template stored with the tokenizer.
    corpus: training texts; None uses a small built-in English corpus.

  Returns:
    The tokenizer (right padding, ``model_max_length`` unset).
  """
  special = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN] + [f"<|{role}|>" for role in CHAT_ROLES]
  alphabet = pre_tokenizers.ByteLevel.alphabet()
  if vocab_size < len(alphabet) + len(special):
    raise ValueError(
      f"vocab_size must be >= {len(alphabet) + len(special)} (256 bytes + {len(special)} special "
      f"tokens), got {vocab_size}"
    )
  backend = tokenizers.Tokenizer(models.BPE())
  backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  backend.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=vocab_size,
    min_frequency=1,
    special_tokens=special,
    initial_alphabet=alphabet,
    show_progress=False,
  )
  backend.train_from_iterator(list(_TINY_CORPUS if corpus is None else corpus), trainer=trainer)
  tokenizer = transformers.PreTrainedTokenizerFast(
    tokenizer_object=backend,
    pad_token=PAD_TOKEN,
    bos_token=BOS_TOKEN,
    eos_token=EOS_TOKEN,
    additional_special_tokens=special[3:],
    chat_template=chat_template,
    padding_side="right",
  )
  if path is not None:
    Path(path).mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(path)
  return tokenizer
