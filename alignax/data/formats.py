"""Dataset formats (TRL's conventions) and their tokenisation into examples with completion masks.

A row is one of these formats, each plain text (strings) or conversational (lists of
``{"role", "content"}`` messages rendered with the tokenizer's chat template):

==========================  =================================  ==========================
format                      columns                            tasks
==========================  =================================  ==========================
``language_modeling``       ``text`` (or ``messages``)         ``sft``
``prompt_completion``       ``prompt``, ``completion``         ``sft``
``preference``              ``prompt``, ``chosen``,            ``preference``, ``unpaired``
                            ``rejected`` [, ``margin``]
``implicit_preference``     ``chosen``, ``rejected``           ``preference``, ``unpaired``
                            [, ``margin``]
``unpaired_preference``     ``prompt``, ``completion``,        ``unpaired``
                            ``label`` (bool)
``prompt_only``             ``prompt`` [+ any columns]         ``prompt``
==========================  =================================  ==========================

Tokenisation follows TRL: a conversational prompt is rendered with ``add_generation_prompt=True``
and the completion is the rest of the rendered conversation (the template writes the end-of-turn
tokens); a plain prompt is tokenised with the tokenizer's special tokens (BOS where it adds one) and
a plain completion gets the EOS token appended. Prompt and completion are tokenised separately, so
the completion mask is exact: 1 on every completion token, 0 on the prompt, and the prompt's ids
are a prefix of the example's (before truncation). Where a BPE merge would cross the boundary (a
completion that continues the prompt's last word) the example's ids differ from tokenising the
joined text, as in TRL's DPO; a chat template that renders the prompt differently once the
completion follows is an error naming the row.

Implicit prompts: for conversations the prompt is the longest common prefix of the two message
lists (TRL's ``extract_prompt``); for plain text it is the longest common character prefix, moved
back to a whitespace so no word is split (``"...A: Paris"`` / ``"...A: Rome"`` give the prompt
``"...A:"`` and the completions ``" Paris"`` / ``" Rome"``).
"""

import dataclasses
import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, NoReturn

import numpy as np
import transformers

from alignax import _validate
from alignax.data.config import DataConfig
from alignax.data.sources import DataError, Row

Task = Literal["sft", "preference", "unpaired", "prompt"]
TASKS = ("sft", "preference", "unpaired", "prompt")

# Required columns per format; `language_modeling` is special-cased (`messages` or the text field).
FORMAT_COLUMNS = {
  "unpaired_preference": ("prompt", "completion", "label"),
  "preference": ("prompt", "chosen", "rejected"),
  "implicit_preference": ("chosen", "rejected"),
  "prompt_completion": ("prompt", "completion"),
  "language_modeling": ("text",),
  "prompt_only": ("prompt",),
}
# Formats each task accepts, most specific first (detection takes the first that fits).
TASK_FORMATS = {
  "sft": ("prompt_completion", "language_modeling"),
  "preference": ("preference", "implicit_preference"),
  "unpaired": ("unpaired_preference", "preference", "implicit_preference"),
  "prompt": ("prompt_only",),
}

Example = dict[str, Any]


@dataclasses.dataclass
class PreparedDataset:
  """Tokenised examples, ready for :func:`alignax.data.make_batches`.

  Attributes:
    examples: one dict of NumPy arrays per example (see :func:`prepare_dataset` for the keys).
    task: ``sft`` | ``preference`` | ``unpaired`` | ``prompt``.
    format: the detected row format (``prompt_completion``, ``implicit_preference``, ...).
    conversational: rows were message lists rendered with the chat template.
    pad_token_id: the tokenizer's pad id, used to pad batches.
    num_rows: rows read from the source (including skipped ones).
    skipped: rows skipped under ``skip_invalid``, by reason (``missing_field``, ``empty``,
      ``no_room``, ...), for the trainer to log.
    num_truncated: sequences shortened to ``max_length`` (or ``max_prompt_length``).
  """

  examples: list[Example]
  task: str
  format: str
  conversational: bool
  pad_token_id: int
  num_rows: int
  skipped: dict[str, int]
  num_truncated: int

  def __len__(self) -> int:
    return len(self.examples)

  @property
  def num_skipped(self) -> int:
    return sum(self.skipped.values())


def truncate(
  input_ids: Sequence[int],
  completion_mask: Sequence[int],
  *,
  max_length: int | None,
  truncation_mode: str = "keep_start",
) -> tuple[list[int], list[int]]:
  """Cuts a sequence to ``max_length`` tokens: ``keep_start`` keeps ``[:max_length]``,
  ``keep_end`` keeps ``[-max_length:]`` (TRL's modes). The mask is cut with the ids.

  Args:
    input_ids: ``[n]`` token ids (prompt then completion).
    completion_mask: ``[n]``, 1 on loss tokens.
    max_length: the most tokens kept; None keeps all.
    truncation_mode: ``keep_start`` | ``keep_end``.

  Returns:
    ``(input_ids, completion_mask)``, each at most ``max_length`` long.
  """
  if truncation_mode not in ("keep_start", "keep_end"):
    raise ValueError(
      f"truncation_mode must be 'keep_start' or 'keep_end', got {truncation_mode!r}"
    )
  if max_length is not None:
    # max_length=0 would make keep_end's ids[-0:] keep everything.
    _validate.positive_int("max_length", max_length)
  if len(input_ids) != len(completion_mask):
    raise ValueError(
      f"input_ids ({len(input_ids)} tokens) and completion_mask ({len(completion_mask)}) differ "
      "in length"
    )
  ids, mask = list(input_ids), list(completion_mask)
  if max_length is None or len(ids) <= max_length:
    return ids, mask
  if truncation_mode == "keep_start":
    return ids[:max_length], mask[:max_length]
  return ids[-max_length:], mask[-max_length:]


def _columns(rows: Sequence[Row]) -> set[str]:
  columns: set[str] = set()
  for row in rows:
    if row.data is not None:
      columns.update(k for k, v in row.data.items() if v is not None)
  return columns


def _format_label(fmt: str, config: DataConfig) -> str:
  if fmt == "language_modeling":
    return f"{config.dataset_text_field!r} or 'messages'"
  return " + ".join(repr(c) for c in FORMAT_COLUMNS[fmt])


def detect_format(columns: set[str], task: str, *, config: DataConfig, source: str) -> str:
  """The first format of ``task`` whose columns are all present (see the module table).

  Raises:
    DataError: no format fits; the message lists the columns found and the formats expected.
  """
  for fmt in TASK_FORMATS[task]:
    if fmt == "language_modeling":
      if "messages" in columns or config.dataset_text_field in columns:
        return fmt
    elif set(FORMAT_COLUMNS[fmt]) <= columns:
      return fmt
  expected = "; ".join(f"{f} ({_format_label(f, config)})" for f in TASK_FORMATS[task])
  raise DataError(
    f"columns {sorted(columns)} fit no {task} format; expected one of: {expected}",
    source=source,
    kind="unknown_format",
  )


class _RowContext:
  """Raises DataErrors that name the row's file, index and line."""

  def __init__(self, row: Row):
    self.row = row

  def fail(self, field: str | None, reason: str, kind: str) -> NoReturn:
    raise DataError(
      reason, source=self.row.source, row=self.row.index, field=field, kind=kind, line=self.row.line
    )

  def get(self, field: str) -> Any:
    assert self.row.data is not None
    value = self.row.data.get(field)
    if value is None:
      self.fail(field, "missing (or null)", "missing_field")
    return value


def _check_messages(ctx: _RowContext, field: str, value: Sequence[Any]) -> list[dict[str, str]]:
  if not value:
    ctx.fail(field, "empty message list", "empty")
  messages = []
  for i, message in enumerate(value):
    if not isinstance(message, Mapping):
      ctx.fail(
        f"{field}[{i}]",
        f"a message must be an object with 'role' and 'content', got {type(message).__name__}",
        "bad_messages",
      )
    for key in ("role", "content"):
      if not isinstance(message.get(key), str):
        got = "missing" if message.get(key) is None else f"a {type(message.get(key)).__name__}"
        ctx.fail(f"{field}[{i}].{key}", f"must be a string, got {got}", "bad_messages")
    messages.append(dict(message))
  return messages


def _text_or_messages(ctx: _RowContext, field: str) -> str | list[dict[str, str]]:
  """A field's value as a non-empty string or a valid message list."""
  value = ctx.get(field)
  if isinstance(value, str):
    if not value:
      ctx.fail(field, "empty string", "empty")
    return value
  if isinstance(value, (list, tuple, np.ndarray)):
    return _check_messages(ctx, field, list(value))
  ctx.fail(
    field,
    f"must be a string or a list of {{role, content}} messages, got {type(value).__name__}",
    "wrong_type",
  )


def _same_style(ctx: _RowContext, values: Mapping[str, Any]) -> bool:
  """True when every value is a message list; fails when plain and conversational are mixed."""
  styles = {f: isinstance(v, list) for f, v in values.items()}
  if len(set(styles.values())) > 1:
    first, *rest = values
    odd = next(f for f in rest if styles[f] != styles[first])
    want = "a message list" if styles[first] else "a string"
    ctx.fail(
      odd, f"must be {want} like {first!r} (plain and conversational are mixed)", "wrong_type"
    )
  return next(iter(styles.values()))


def _common_prefix_split(chosen: str, rejected: str) -> int:
  k = 0
  for a, b in zip(chosen, rejected):
    if a != b:
      break
    k += 1
  if k > 0 and chosen[k - 1].isspace():
    return k - 1  # the completion starts with its separating space (TRL's convention)
  # Divergence inside a word ("Paris" / "Parma"): back off to the previous whitespace.
  spaces = [i for i in range(k) if chosen[i].isspace()]
  return spaces[-1] if spaces else 0


class _Encoder:
  """Tokenises prompts and completions as TRL does (see the module docstring)."""

  def __init__(self, tokenizer: transformers.PreTrainedTokenizerBase, config: DataConfig):
    self.tokenizer = tokenizer
    self.config = config
    if tokenizer.eos_token_id is None:
      raise ValueError("the tokenizer has no EOS token, which plain completions end with")

  def _template(self, ctx: _RowContext, field: str, messages: list, **kwargs) -> str:
    try:
      return self.tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
    except Exception as e:  # Jinja's TemplateError and the template's own raise_exception
      ctx.fail(field, f"the chat template rejected the messages: {e}", "bad_messages")

  def _ids(self, text: str, *, special: bool) -> list[int]:
    return list(self.tokenizer(text, add_special_tokens=special)["input_ids"])

  def prompt(self, ctx: _RowContext, field: str, prompt: str | list) -> list[int]:
    if isinstance(prompt, str):
      return self._ids(prompt, special=True)
    text = self._template(ctx, field, prompt, add_generation_prompt=True)
    return self._ids(text, special=False)

  def pair(
    self, ctx: _RowContext, prompt: str | list, completion: str | list, field: str
  ) -> tuple[list[int], list[int]]:
    """``(prompt_ids, completion_ids)``."""
    if isinstance(prompt, str):
      completion_ids = self._ids(completion, special=False) + [self.tokenizer.eos_token_id]
      return self._ids(prompt, special=True), completion_ids
    prompt_text = self._template(ctx, "prompt", prompt, add_generation_prompt=True)
    full_text = self._template(ctx, field, prompt + completion)
    if not full_text.startswith(prompt_text):
      ctx.fail(
        field,
        "the chat template renders the prompt differently with and without the completion, so "
        "the completion cannot be separated from it",
        "bad_messages",
      )
    completion_text = full_text[len(prompt_text) :]
    if not completion_text:
      ctx.fail(field, "renders to no text", "empty")
    return self._ids(prompt_text, special=False), self._ids(completion_text, special=False)

  def sequence(
    self, ctx: _RowContext, field: str, value: str | list, *, assistant_only: bool
  ) -> tuple[list[int], list[int]]:
    """A language-modelling row as ``(input_ids, loss_mask)``."""
    if isinstance(value, str):
      if assistant_only:
        ctx.fail(
          field,
          "assistant_only_loss=True needs conversational rows ('messages'), but this row is "
          "plain text, which has no assistant turns",
          "wrong_type",
        )
      ids = self._ids(value, special=True) + [self.tokenizer.eos_token_id]
      return ids, [1] * len(ids)
    if not assistant_only:
      ids = self._ids(self._template(ctx, field, value), special=False)
      return ids, [1] * len(ids)
    try:
      encoded = self.tokenizer.apply_chat_template(
        value, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
      )
    except Exception as e:
      ctx.fail(field, f"the chat template rejected the messages: {e}", "bad_messages")
    mask = list(encoded["assistant_masks"])
    if not any(mask):
      ctx.fail(
        field,
        "assistant_only_loss=True, but the chat template marks no assistant token (it needs "
        "{% generation %} blocks, and the conversation an assistant turn)",
        "empty",
      )
    return list(encoded["input_ids"]), mask


def _as_array(ids: Sequence[int]) -> np.ndarray:
  return np.asarray(ids, dtype=np.int32)


def _check_label(ctx: _RowContext) -> bool:
  label = ctx.get("label")
  if not isinstance(label, (bool, np.bool_)):
    ctx.fail("label", f"must be a boolean (true/false), got {label!r}", "bad_label")
  return bool(label)


def _check_margin(ctx: _RowContext) -> float:
  margin = ctx.get("margin")
  if isinstance(margin, bool) or not isinstance(margin, (int, float, np.integer, np.floating)):
    ctx.fail("margin", f"must be a number, got {margin!r}", "wrong_type")
  if not math.isfinite(float(margin)):
    ctx.fail("margin", f"must be finite, got {margin!r}", "wrong_type")
  return float(margin)


class _Builder:
  """Turns validated rows into examples, counting truncations."""

  def __init__(self, encoder: _Encoder, config: DataConfig, fmt: str, columns: set[str]):
    self.encoder = encoder
    self.config = config
    self.format = fmt
    self.columns = columns
    self.num_truncated = 0
    self.conversational: bool | None = None

  def _style(self, ctx: _RowContext, values: Mapping[str, Any]) -> bool:
    conversational = _same_style(ctx, values)
    if self.conversational is None:
      self.conversational = conversational
    elif conversational != self.conversational:
      field = next(iter(values))
      want = "message lists" if self.conversational else "strings"
      ctx.fail(field, f"earlier rows hold {want}; one dataset cannot mix the two", "wrong_type")
    return conversational

  def _cut(
    self,
    ctx: _RowContext,
    field: str,
    ids: list[int],
    mask: list[int],
    completion: list[int] | None = None,
  ) -> tuple[np.ndarray, np.ndarray]:
    """Truncates ``ids`` and the loss ``mask``; fails when no ``completion`` token (default: no
    loss token) is left. The two differ under ``completion_only_loss=False``, where the prompt is
    in the loss but a row cut down to its prompt has still lost its whole completion."""
    max_length = self.config.max_length
    completion = mask if completion is None else completion
    if max_length is not None and len(ids) > max_length:
      self.num_truncated += 1
      mode = self.config.truncation_mode
      _, completion = truncate(ids, completion, max_length=max_length, truncation_mode=mode)
      ids, mask = truncate(ids, mask, max_length=max_length, truncation_mode=mode)
    if not any(completion):
      ctx.fail(
        field,
        f"the prompt leaves no room for any completion token within max_length={max_length} "
        f"(truncation_mode={self.config.truncation_mode!r})",
        "no_room",
      )
    return _as_array(ids), _as_array(mask)

  def _pair_example(
    self, ctx: _RowContext, prompt: Any, completion: Any, field: str, *, completion_only: bool
  ) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(completion, list) and all(
      not m["content"] and not m.get("tool_calls") for m in completion
    ):
      # The template would still write the end-of-turn tokens: an answer of nothing but those.
      ctx.fail(field, "empty completion: every message has empty content", "empty")
    prompt_ids, completion_ids = self.encoder.pair(ctx, prompt, completion, field)
    if not completion_ids:
      ctx.fail(field, "tokenises to no token", "empty")
    is_completion = [0] * len(prompt_ids) + [1] * len(completion_ids)
    mask = is_completion if completion_only else [1] * len(is_completion)
    return self._cut(ctx, field, prompt_ids + completion_ids, mask, is_completion)

  def _preference_triple(self, ctx: _RowContext) -> tuple[Any, Any, Any]:
    """``(prompt, chosen, rejected)``, extracting an implicit prompt."""
    if self.format == "preference":
      values = {f: _text_or_messages(ctx, f) for f in ("prompt", "chosen", "rejected")}
      self._style(ctx, values)
      return values["prompt"], values["chosen"], values["rejected"]
    values = {f: _text_or_messages(ctx, f) for f in ("chosen", "rejected")}
    chosen, rejected = values["chosen"], values["rejected"]
    if self._style(ctx, values):
      k = 0
      while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
        k += 1
    else:
      k = _common_prefix_split(chosen, rejected)
    if k == 0:
      ctx.fail(
        "chosen",
        "no implicit prompt: 'chosen' and 'rejected' share no leading "
        + ("message" if isinstance(chosen, list) else "text")
        + "; add a 'prompt' column",
        "no_prompt",
      )
    for field, value in (("chosen", chosen), ("rejected", rejected)):
      if len(value) == k:
        ctx.fail(field, "empty completion after removing the implicit prompt", "empty")
    return chosen[:k], chosen[k:], rejected[k:]

  def build(self, row: Row, task: str) -> list[Example]:
    ctx = _RowContext(row)
    fmt = self.format
    if fmt == "language_modeling":
      field = "messages" if "messages" in self.columns else self.config.dataset_text_field
      value = _text_or_messages(ctx, field)
      if field == "messages" and isinstance(value, str):
        ctx.fail(field, "must be a list of {role, content} messages, got a string", "bad_messages")
      self._style(ctx, {field: value})
      ids, mask = self.encoder.sequence(
        ctx, field, value, assistant_only=self.config.assistant_only_loss
      )
      input_ids, completion_mask = self._cut(ctx, field, ids, mask)
      return [{"input_ids": input_ids, "completion_mask": completion_mask}]
    if fmt == "prompt_completion":
      values = {f: _text_or_messages(ctx, f) for f in ("prompt", "completion")}
      self._style(ctx, values)
      completion_only = self.config.completion_only_loss is not False
      input_ids, completion_mask = self._pair_example(
        ctx, values["prompt"], values["completion"], "completion", completion_only=completion_only
      )
      return [{"input_ids": input_ids, "completion_mask": completion_mask}]
    if fmt == "unpaired_preference":
      values = {f: _text_or_messages(ctx, f) for f in ("prompt", "completion")}
      self._style(ctx, values)
      label = _check_label(ctx)
      input_ids, completion_mask = self._pair_example(
        ctx, values["prompt"], values["completion"], "completion", completion_only=True
      )
      return [
        {"input_ids": input_ids, "completion_mask": completion_mask, "label": np.bool_(label)}
      ]
    if fmt == "prompt_only":
      prompt = _text_or_messages(ctx, "prompt")
      self._style(ctx, {"prompt": prompt})
      ids = self.encoder.prompt(ctx, "prompt", prompt)
      limit = self.config.max_prompt_length
      if limit is not None and len(ids) > limit:
        self.num_truncated += 1
        ids = ids[-limit:]  # a prompt keeps its end, next to where generation starts (TRL)
      assert row.data is not None
      extras = {k: v for k, v in row.data.items()}
      return [{"prompt_ids": _as_array(ids), "extras": extras}]
    # Paired preference, for the preference task or split into two unpaired examples (KTO).
    prompt, chosen, rejected = self._preference_triple(ctx)
    # KTO has no use for a margin, so a bad one only fails preference (reward-model) data.
    margin = _check_margin(ctx) if "margin" in self.columns and task == "preference" else None
    chosen_ids, chosen_mask = self._pair_example(
      ctx, prompt, chosen, "chosen", completion_only=True
    )
    rejected_ids, rejected_mask = self._pair_example(
      ctx, prompt, rejected, "rejected", completion_only=True
    )
    if task == "unpaired":
      return [
        {"input_ids": chosen_ids, "completion_mask": chosen_mask, "label": np.bool_(True)},
        {"input_ids": rejected_ids, "completion_mask": rejected_mask, "label": np.bool_(False)},
      ]
    example = {
      "chosen_input_ids": chosen_ids,
      "chosen_completion_mask": chosen_mask,
      "rejected_input_ids": rejected_ids,
      "rejected_completion_mask": rejected_mask,
    }
    if margin is not None:
      example["margin"] = np.float32(margin)
    return [example]


def prepare_dataset(
  rows: Sequence[Row],
  tokenizer: transformers.PreTrainedTokenizerBase,
  *,
  task: str,
  config: DataConfig,
  on_skip: Callable[[DataError], None] | None = None,
) -> PreparedDataset:
  """Validates and tokenises every row, up front (as TRL's ``_prepare_dataset`` does), so a bad row
  fails before the first step and skip counts are known before training starts.

  Examples (NumPy, ``int32`` ids and masks):
    - ``sft`` and ``unpaired``: ``input_ids [n]``, ``completion_mask [n]`` (1 on the tokens in the
      loss); ``unpaired`` adds ``label`` (bool). A paired preference row under ``unpaired`` gives
      two examples: chosen (label True) and rejected (label False), as TRL's KTO does.
    - ``preference``: ``chosen_input_ids``, ``chosen_completion_mask``, ``rejected_input_ids``,
      ``rejected_completion_mask`` and, when the data has a ``margin`` column, ``margin`` (float32).
    - ``prompt``: ``prompt_ids [n]`` and ``extras`` (the row's columns, ``prompt`` included, for
      reward functions).

  Args:
    rows: from :func:`alignax.data.load_rows`.
    tokenizer: a ``transformers`` tokenizer (with a chat template for conversational data).
    task: ``sft`` | ``preference`` (DPO, reward model, ORPO, SimPO, CPO) | ``unpaired`` (KTO) |
      ``prompt`` (GRPO, PPO).
    config: truncation, loss-mask and skipping options.
    on_skip: called with each skipped row's error (``skip_invalid=True``), e.g. to log it.

  Returns:
    The examples, with the counts of skipped and truncated rows.

  Raises:
    DataError: a bad row (naming the file, row and field) unless ``config.skip_invalid``; columns
      that fit no format of ``task``; no usable row at all.
  """
  if task not in TASKS:
    raise ValueError(f"task={task!r} is not supported; choose one of {list(TASKS)}")
  source = rows[0].source if rows else "<rows>"
  if not rows:
    raise DataError("the dataset has no rows", source=source, kind="empty_dataset")
  columns = _columns(rows)
  unreadable = [row.error for row in rows if row.error is not None]
  if not columns and unreadable:
    # No row could be read, so there are no columns to detect a format from: the rows' own errors
    # (bad JSON, ...) are the news, not "columns [] fit no format".
    if not config.skip_invalid:
      raise unreadable[0]
    if len(unreadable) == len(rows):
      for error in unreadable:
        if on_skip is not None:
          on_skip(error)
      counts = dict(Counter(error.kind for error in unreadable))
      raise DataError(
        f"no usable row: all {len(rows)} were skipped ({counts})",
        source=source,
        kind="empty_dataset",
      )
  fmt = detect_format(columns, task, config=config, source=source)
  pad_token_id = tokenizer.pad_token_id
  if pad_token_id is None:
    pad_token_id = tokenizer.eos_token_id
  if pad_token_id is None:
    raise ValueError("the tokenizer has neither a pad nor an EOS token to pad batches with")
  builder = _Builder(_Encoder(tokenizer, config), config, fmt, columns)
  examples: list[Example] = []
  skipped: Counter[str] = Counter()
  for row in rows:
    try:
      if row.error is not None:
        raise row.error
      examples.extend(builder.build(row, task))
    except DataError as e:
      if not config.skip_invalid:
        raise
      skipped[e.kind] += 1
      if on_skip is not None:
        on_skip(e)
  if not examples:
    raise DataError(
      f"no usable row: all {len(rows)} were skipped ({dict(skipped)})",
      source=source,
      kind="empty_dataset",
    )
  return PreparedDataset(
    examples=examples,
    task=task,
    format=fmt,
    conversational=bool(builder.conversational),
    pad_token_id=int(pad_token_id),
    num_rows=len(rows),
    skipped=dict(skipped),
    num_truncated=builder.num_truncated,
  )
