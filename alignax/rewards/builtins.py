r"""Built-in reward functions: math answer accuracy, a think-tag format check, and DAPO's soft
overlong penalty. Each follows the TRL contract (:mod:`alignax.rewards.contract`) and takes its
inputs by keyword, ignoring the rest through ``**kwargs``.

Answer extraction (:func:`extract_answer`), first rule that applies:

1. the content of the last ``\boxed{...}`` (or ``\fbox{...}``), braces matched so nested groups such
   as ``\boxed{\frac{1}{2}}`` survive; ``\boxed 5`` (no braces) takes the next token;
2. the rest of the line after the last ``####`` (GSM8K's convention);
3. the last number in the text (``-3``, ``1,000``, ``2.5``, ``3/4``).

The Unicode minus sign (U+2212, ``−5``) counts as ``-`` throughout, so it is neither dropped from
an answer (which would turn ``−5`` into ``5``) nor left to fail a numeric comparison.

Numeric equivalence (:func:`parse_number`, exact, with :class:`fractions.Fraction`): thousands
separators (``1,000`` and LaTeX ``1{,}000`` / ``1\,000``), a leading ``+``, ``$`` signs, ``\left`` /
``\right``, ``\text{...}`` wrappers and a trailing period are dropped; ``0.5``, ``1/2``,
``\frac{1}{2}``, ``\dfrac12`` and ``.5`` are equal, and so are ``2``, ``2.0`` and ``2.00``. A
trailing percent sign is dropped, so ``50%`` equals ``50`` (datasets write a percentage's gold
answer as the number of percent) and is *not* equal to ``0.5``. Answers that are not numbers are
compared as strings after the same clean-up with all whitespace removed.
"""

import re
from collections.abc import Callable, Sequence
from fractions import Fraction
from typing import Any

from alignax import _validate
from alignax.rewards.contract import completion_text

# --- answer extraction -----------------------------------------------------------------------

_BOX_COMMANDS = ("\\boxed", "\\fbox")
_UNICODE_MINUS = "\u2212"
# A number in running text: thousands-grouped or plain integer part, optional decimals, optional
# "/denominator". The look-behind keeps "x2" and "v1.5" from yielding numbers out of identifiers.
_NUMBER = re.compile(
  r"(?<![\w.])[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+(?:\.\d+)?)?"
  r"|(?<![\w.])[-+]?\.\d+"
)


def _braced(text: str, start: int) -> tuple[str, int] | None:
  """The content of the brace group opening at ``text[start] == '{'`` and the index after it."""
  depth = 0
  for i in range(start, len(text)):
    if text[i] == "{":
      depth += 1
    elif text[i] == "}":
      depth -= 1
      if depth == 0:
        return text[start + 1 : i], i + 1
  return None  # unbalanced: a truncated completion


def extract_boxed(text: str) -> str | None:
  r"""The content of the last ``\boxed{...}`` / ``\fbox{...}`` in ``text``, or None.

  Nested braces are matched; an unclosed box (a truncated completion) gives None.
  """
  best = -1
  command = ""
  for name in _BOX_COMMANDS:
    at = text.rfind(name)
    if at > best:
      best, command = at, name
  if best < 0:
    return None
  i = best + len(command)
  while i < len(text) and text[i].isspace():
    i += 1
  if i < len(text) and text[i] == "{":
    group = _braced(text, i)
    return None if group is None else group[0].strip()
  token = re.match(r"[^\s$]+", text[i:])
  return token.group(0) if token else None


def extract_answer(text: str) -> str | None:
  r"""A completion's final answer: the last ``\boxed{}``, else after ``####``, else the last number.

  Returns None when none of the rules finds anything. See the module docstring for the rules.
  """
  text = text.replace(_UNICODE_MINUS, "-")
  boxed = extract_boxed(text)
  if boxed is not None:
    return boxed
  at = text.rfind("####")
  if at >= 0:
    rest = text[at + 4 :].strip().split("\n", 1)[0].strip()
    if rest:
      first = _NUMBER.search(rest)
      # "#### 72 apples", "#### $1,000": a leading number is the answer; "#### x + 1" stays whole.
      leads = first is not None and not rest[: first.start()].strip(" $\\")
      if parse_number(rest) is None and leads:
        return first.group(0)
      return rest
  numbers = _NUMBER.findall(text)
  return numbers[-1] if numbers else None


# --- normalisation and numeric equivalence -----------------------------------------------------

_UNWRAP = re.compile(r"\\(?:text|textbf|mathrm|mathbf|mbox)\s*\{([^{}]*)\}")
_FRAC = re.compile(r"^([-+]?)\\[dt]?frac\s*(\{[^{}]*\}|\d)\s*(\{[^{}]*\}|\d)$")
_THOUSANDS = re.compile(r"^[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")


def normalize_answer(answer: str) -> str:
  r"""An answer with presentation removed: ``$``, ``\left``/``\right``, ``\displaystyle``, ``\!``,
  ``\text{..}``-style wrappers (their content kept), LaTeX thousands separators, a trailing period,
  ``\dfrac``/``\tfrac`` spelled ``\frac``, the Unicode minus spelled ``-``, and surrounding
  whitespace."""
  text = answer.strip().replace(_UNICODE_MINUS, "-")
  previous = None
  while previous != text:  # wrappers can nest: \text{\textbf{5}}
    previous = text
    text = _UNWRAP.sub(r"\1", text)
  for token in ("\\left", "\\right", "\\displaystyle", "\\!", "\\$", "$"):
    text = text.replace(token, "")
  text = text.replace("{,}", ",").replace("\\,", ",").replace("\\dfrac", "\\frac")
  text = text.replace("\\tfrac", "\\frac")
  return text.strip().rstrip(".").strip()


def parse_number(answer: str) -> Fraction | None:
  r"""The exact value of a numeric answer, or None when it is not a number.

  Accepts integers, decimals (``.5``, ``2.0``), ``a/b``, ``\frac{a}{b}`` (also ``\dfrac``,
  ``\tfrac``, ``\frac12``), thousands separators, a leading sign and a trailing percent sign
  (dropped, see the module docstring).
  """
  text = normalize_answer(answer)
  if text.endswith("\\%"):
    text = text[:-2].strip()
  elif text.endswith("%"):
    text = text[:-1].strip()
  frac = _FRAC.match(text)
  if frac is not None:
    sign, numerator, denominator = frac.groups()
    top = parse_number(numerator.strip("{}"))
    bottom = parse_number(denominator.strip("{}"))
    if top is None or bottom is None or bottom == 0:
      return None
    value = top / bottom
    return -value if sign == "-" else value
  if _THOUSANDS.match(text):
    text = text.replace(",", "")
  if "," in text or "_" in text:  # a list "1,2" or a digit group Fraction would accept: no number
    return None
  parts = [p.strip() for p in text.split("/")]
  if len(parts) > 2 or not all(re.fullmatch(r"[-+]?(?:\d+\.?\d*|\.\d+)", p) for p in parts):
    return None
  try:
    value = Fraction(parts[0])
    return value / Fraction(parts[1]) if len(parts) == 2 else value
  except ZeroDivisionError:
    return None


def answers_match(predicted: str, gold: str) -> bool:
  """True when two answers are equal numbers (exactly, see :func:`parse_number`) or, when either is
  not a number, equal strings after :func:`normalize_answer` with all whitespace removed."""
  p, g = parse_number(predicted), parse_number(gold)
  if p is not None and g is not None:
    return p == g
  def squash(text: str) -> str:
    return re.sub(r"\s+", "", normalize_answer(text))
  return squash(predicted) == squash(gold)


def gold_answer(gold: Any) -> str | None:
  r"""The reference answer in a dataset column: its ``\boxed{}`` or ``####`` answer when it has one
  (MATH's ``solution``, GSM8K's ``answer``), else the whole value as text; None when empty."""
  if gold is None:
    return None
  text = str(gold).strip()
  if not text:
    return None
  if extract_boxed(text) is not None or "####" in text:
    return extract_answer(text)
  return text


# --- the reward functions ----------------------------------------------------------------------

# Keywords every reward function receives that are not dataset columns.
_RUNNER_KWARGS = ("prompts", "completion_ids", "trainer_state", "log_extra", "log_metric")


def accuracy_reward(
  completions: Sequence[Any],
  solution: Sequence[Any] | None = None,
  answer: Sequence[Any] | None = None,
  **kwargs: Any,
) -> list[float | None]:
  r"""1.0 when a completion's final answer equals the reference answer, else 0.0.

  The completion's answer is :func:`extract_answer`'s; the reference is the ``solution`` column
  (TRL's name, MATH-style) or else the ``answer`` column (GSM8K's), read with :func:`gold_answer`.
  A sample whose reference is empty gets None (not scored), as TRL does for an unparseable gold.

  Args:
    completions: ``[N]`` completion texts or conversational completions.
    solution: ``[N]`` reference solutions (a dataset column, repeated per generation).
    answer: ``[N]`` reference answers, used when there is no ``solution`` column.

  Returns:
    ``[N]`` rewards in {0.0, 1.0}, or None for a sample without a reference.

  Raises:
    ValueError: neither a ``solution`` nor an ``answer`` column was passed.
  """
  references = solution if solution is not None else answer
  if references is None:
    raise ValueError(
      "accuracy_reward needs a 'solution' or an 'answer' dataset column with the reference "
      f"answers; the columns passed were {sorted(k for k in kwargs if k not in _RUNNER_KWARGS)}"
    )
  rewards: list[float | None] = []
  for completion, reference in zip(completions, references, strict=True):
    gold = gold_answer(reference)
    if gold is None:
      rewards.append(None)
      continue
    predicted = extract_answer(completion_text(completion))
    rewards.append(1.0 if predicted is not None and answers_match(predicted, gold) else 0.0)
  return rewards


# Exactly one think block with non-blank reasoning, then a non-blank answer, no other think tag. The
# two groups must also contain a non-whitespace character (checked in think_format_reward).
THINK_FORMAT = re.compile(
  r"\A\s*<think>(?P<thought>(?:(?!</?think>).)*)</think>(?P<answer>(?:(?!</?think>).)*)\Z",
  re.DOTALL,
)


def think_format_reward(completions: Sequence[Any], **kwargs: Any) -> list[float]:
  r"""1.0 when a completion is ``<think>reasoning</think>answer``, else 0.0 (DeepSeek-R1's format
  reward, Guo et al., 2025).

  The whole completion must match :data:`THINK_FORMAT`,
  ``\A\s*<think>(?P<thought>(?:(?!</?think>).)*)</think>(?P<answer>(?:(?!</?think>).)*)\Z`` with
  ``re.DOTALL``, and both ``thought`` and ``answer`` must contain a non-whitespace character:
  leading whitespace is allowed, the reasoning and the answer may span lines, and a second or
  nested ``<think>`` / ``</think>`` tag fails. A chat template that opens ``<think>`` in the
  prompt leaves the completion without its opening tag, which fails too.

  Args:
    completions: ``[N]`` completion texts or conversational completions.

  Returns:
    ``[N]`` rewards in {0.0, 1.0}.
  """
  rewards = []
  for completion in completions:
    match = THINK_FORMAT.match(completion_text(completion))
    ok = match is not None and match["thought"].strip() and match["answer"].strip()
    rewards.append(1.0 if ok else 0.0)
  return rewards


def soft_overlong_punishment(
  *, max_completion_len: int, soft_punish_cache: int
) -> Callable[..., list[float]]:
  r"""DAPO's soft overlong punishment (Yu et al., 2025, eq. 13), counted in tokens:

  .. math::
    R(y) = \begin{cases} 0 & |y| \le L_{max} - L_{cache} \\
      \frac{(L_{max} - L_{cache}) - |y|}{L_{cache}} & L_{max} - L_{cache} < |y| \le L_{max} \\
      -1 & |y| > L_{max} \end{cases}

  ``|y|`` is the number of completion tokens (``len(completion_ids[i])``), not characters: a
  character count would punish a tokenizer's long tokens differently from its short ones.

  Args:
    max_completion_len: :math:`L_{max}`, the completion budget in tokens (TRL's name).
    soft_punish_cache: :math:`L_{cache}`, the length of the linear ramp before the budget (TRL's
      name), ``0 <= soft_punish_cache <= max_completion_len``; 0 (allowed by TRL too) means no
      ramp: only a completion over the budget gets -1.

  Returns:
    A reward function ``f(completion_ids, **kwargs) -> list[float]`` named
    ``soft_overlong_punishment``.
  """
  _validate.positive_int("max_completion_len", max_completion_len)
  if (not isinstance(soft_punish_cache, int) or isinstance(soft_punish_cache, bool)
      or soft_punish_cache < 0):
    raise ValueError(f"soft_punish_cache must be an int >= 0, got {soft_punish_cache!r}")
  if soft_punish_cache > max_completion_len:
    raise ValueError(
      f"soft_punish_cache={soft_punish_cache} must be <= max_completion_len={max_completion_len}"
    )
  free = max_completion_len - soft_punish_cache

  def soft_overlong_punishment(
    completion_ids: Sequence[Sequence[int]] | None = None, **kwargs: Any
  ) -> list[float]:
    if completion_ids is None:
      raise ValueError(
        "soft_overlong_punishment counts completion tokens and needs completion_ids; pass them to "
        "the reward runner"
      )
    rewards = []
    for ids in completion_ids:
      length = len(ids)
      if length <= free:
        rewards.append(0.0)
      elif length <= max_completion_len:
        rewards.append((free - length) / soft_punish_cache)
      else:
        rewards.append(-1.0)
    return rewards

  return soft_overlong_punishment
