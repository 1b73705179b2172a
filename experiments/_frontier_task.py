r"""The "lexicon sentiment" task of ``dpo_frontier``: a word vocabulary, a grammar of short movie
reviews, and the VADER compound score as the ground-truth reward.

The stand-in for Rafailov et al.'s IMDb set-up (a GPT-2 continuing review prefixes, scored by a
sentiment classifier) that runs on a CPU:

* Vocabulary: 60 positive and 60 negative adjectives, each checked against the VADER lexicon
  (``vaderSentiment``'s ``vader_lexicon.txt``) for the sign of its valence; neutral adjectives,
  nouns, determiners, verbs and conjunctions that the lexicon does not score; VADER's negation
  ``not`` and booster ``very``; and the two specials ``<pad>`` and ``<eos>``.
* Reviews: one to three clauses (``the plot was very good``, ``i found the acting not great``,
  ``a dull film``, ``it seemed weird``) joined by ``and`` / ``but``, ending in ``<eos>``. Each
  review draws a sentiment, and each adjective agrees with it with probability
  ``AGREE`` (else it is the opposite polarity, or neutral), so the corpus is balanced and mixed.
* Reward: VADER's ``compound`` score of the detokenised text (prompt and completion, words joined
  by spaces, ``<eos>`` and padding dropped). It is not a sum over words: ``not`` flips the next
  adjective, ``very`` scales it, ``but`` down-weights the clauses before it, and the score
  saturates towards ±1 (``x / sqrt(x² + 15)``), which makes it a fair stand-in for a classifier.
"""

import functools
from collections.abc import Sequence

import numpy as np

PAD, EOS = "<pad>", "<eos>"

# Checked against the VADER lexicon by ``check_lexicon`` (and tests/test_experiments_frontier.py).
POSITIVE = (
    "good great excellent wonderful amazing awesome brilliant superb fantastic lovely beautiful "
    "delightful enjoyable fun funny charming clever smart engaging entertaining exciting fresh "
    "impressive inspiring pleasant perfect powerful remarkable satisfying solid sweet terrific "
    "thoughtful warm fine nice elegant gorgeous magnificent outstanding splendid stunning honest "
    "creative heartwarming hilarious marvelous compelling admirable cheerful fabulous fascinating "
    "glorious interesting intelligent lively pleasing rich sincere talented").split()
NEGATIVE = (
    "bad awful terrible horrible poor boring dull weak stupid ugly annoying disappointing lame "
    "painful pathetic sad worst worse wrong messy awkward confusing dreadful dumb empty failed "
    "frustrating irritating lousy miserable nasty offensive ridiculous rotten useless wasted "
    "worthless lazy gloomy grim harsh bitter horrid inferior insipid crude dismal disgusting "
    "feeble flawed foolish idiotic incompetent mindless obnoxious tragic trite unpleasant "
    "depressing embarrassing").split()
NEUTRAL_ADJECTIVES = "long short new old recent french quiet loud simple familiar typical".split()
NOUNS = ("movie film plot story acting cast ending music script director scene dialogue "
         "soundtrack performance pacing").split()
DETERMINERS = ("the", "this")
VERBS = ("was", "is", "felt", "seemed")
CONJUNCTIONS = ("and", "but")
FUNCTION_WORDS = ("a", "i", "found", "it", "not", "very")

WORDS: tuple[str, ...] = tuple(dict.fromkeys(
    [PAD, EOS, *DETERMINERS, *FUNCTION_WORDS, *VERBS, *CONJUNCTIONS, *NOUNS, *NEUTRAL_ADJECTIVES,
     *POSITIVE, *NEGATIVE]))
WORD_ID = {w: i for i, w in enumerate(WORDS)}
PAD_ID, EOS_ID = WORD_ID[PAD], WORD_ID[EOS]
VOCAB_SIZE = len(WORDS)

AGREE = 0.7  # P(an adjective has the review's polarity); else opposite (0.2) or neutral (0.1)
P_NOT, P_VERY = 0.12, 0.2


@functools.cache
def analyzer():
  """The VADER analyzer (its lexicon is read once)."""
  from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

  return SentimentIntensityAnalyzer()


def check_lexicon() -> None:
  """Raises ValueError naming a word whose VADER valence contradicts its role here: a positive
  adjective not > 0, a negative one not < 0, or a neutral word that VADER scores."""
  lexicon = analyzer().lexicon
  for word in POSITIVE:
    if not lexicon.get(word, 0.0) > 0:
      raise ValueError(f"positive word {word!r} has VADER valence {lexicon.get(word)}")
  for word in NEGATIVE:
    if not lexicon.get(word, 0.0) < 0:
      raise ValueError(f"negative word {word!r} has VADER valence {lexicon.get(word)}")
  scored = set(POSITIVE) | set(NEGATIVE)
  for word in WORDS[2:]:
    if word not in scored and word in lexicon:
      raise ValueError(f"neutral word {word!r} has VADER valence {lexicon[word]}")


@functools.lru_cache(maxsize=1 << 18)
def vader_compound(text: str) -> float:
  """VADER's compound score of ``text``, in [-1, 1] (cached: samples repeat)."""
  return float(analyzer().polarity_scores(text)["compound"])


def detokenize(ids: Sequence[int]) -> str:
  """Words joined by spaces, up to the first ``<eos>``; ``<pad>`` is skipped."""
  words = []
  for i in ids:
    i = int(i)
    if i == EOS_ID:
      break
    if i != PAD_ID:
      words.append(WORDS[i])
  return " ".join(words)


def rewards(rows: np.ndarray) -> np.ndarray:
  """VADER compound score of each row of token ids ``[N, L]`` (prompt then completion), ``[N]``."""
  return np.asarray([vader_compound(detokenize(row)) for row in np.asarray(rows)], np.float32)


def _adjective(rng: np.random.Generator, positive: bool) -> list[str]:
  u = rng.random()
  if u < AGREE:
    pool = POSITIVE if positive else NEGATIVE
  elif u < AGREE + 0.2:
    pool = NEGATIVE if positive else POSITIVE
  else:
    pool = NEUTRAL_ADJECTIVES
  modifier = []
  if rng.random() < P_NOT:
    modifier.append("not")
  if rng.random() < P_VERY:
    modifier.append("very")
  return [*modifier, pool[rng.integers(len(pool))]]


def _clause(rng: np.random.Generator, positive: bool) -> list[str]:
  det, noun = DETERMINERS[rng.integers(2)], NOUNS[rng.integers(len(NOUNS))]
  form = rng.integers(4)
  if form == 0:
    return [det, noun, VERBS[rng.integers(len(VERBS))], *_adjective(rng, positive)]
  if form == 1:
    return ["i", "found", det, noun, *_adjective(rng, positive)]
  if form == 2:
    adjective = _adjective(rng, positive)
    return ["a", adjective[-1], noun]  # no modifier before an attributive adjective
  return ["it", VERBS[rng.integers(len(VERBS))], *_adjective(rng, positive)]


def sample_reviews(rng: np.random.Generator, n: int, *, max_tokens: int) -> np.ndarray:
  """``n`` reviews as token ids ``[n, max_tokens]``: clauses while they fit, ``<eos>``, padding.

  Half the reviews are positive and half negative in expectation (the grammar's polarity is a
  fair coin per review); ``max_tokens`` counts the ``<eos>``.
  """
  out = np.full((n, max_tokens), PAD_ID, np.int32)
  for row in range(n):
    positive = bool(rng.random() < 0.5)
    words = _clause(rng, positive)
    for _ in range(2):
      if rng.random() < 0.5:
        break
      more = [CONJUNCTIONS[rng.integers(2)], *_clause(rng, positive)]
      if len(words) + len(more) + 1 > max_tokens:
        break
      words += more
    words = words[:max_tokens - 1] + [EOS]
    out[row, :len(words)] = [WORD_ID[w] for w in words]
  return out


def prompts_from(reviews: np.ndarray, rng: np.random.Generator, *, min_len: int, max_len: int
                 ) -> tuple[np.ndarray, np.ndarray]:
  """Prefixes of ``min_len..max_len`` tokens of each review, left-padded to ``max_len``.

  Returns:
    ``(prompt_ids, prompt_mask)``, both ``[n, max_len]``.
  """
  n = reviews.shape[0]
  # A prefix never reaches the review's <eos>: the policy always has something to write.
  lengths = np.minimum(rng.integers(min_len, max_len + 1, n), (reviews != EOS_ID).argmin(1) - 1)
  lengths = np.maximum(lengths, 1)
  ids = np.full((n, max_len), PAD_ID, np.int32)
  mask = np.zeros((n, max_len), bool)
  for row, length in enumerate(lengths):
    ids[row, max_len - length:] = reviews[row, :length]
    mask[row, max_len - length:] = True
  return ids, mask
