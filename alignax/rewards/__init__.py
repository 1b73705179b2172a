"""Rewards for online RL: reward functions with TRL's contract, built-ins, reward models, ensembles.

- :mod:`alignax.rewards.contract`: the contract, the named errors and the output check.
- :mod:`alignax.rewards.builtins`: ``accuracy_reward`` (math answers), ``think_format_reward``,
  ``soft_overlong_punishment`` (DAPO, in tokens).
- :mod:`alignax.rewards.runner`: :class:`RewardRunner` (columns repeated per generation, None
  handling, async sources gathered on one loop, per-call timeouts, weighted sum, metrics) and
  :func:`resolve_reward_funcs` for ``--reward_funcs``.
- :mod:`alignax.rewards.models`: :class:`RewardModelScorer`, :func:`load_reward_model`,
  :class:`RewardEnsemble` (imported on first use, so reward functions alone import neither flax
  nor transformers).
"""

import importlib
from typing import Any

from alignax.rewards.builtins import THINK_FORMAT as THINK_FORMAT
from alignax.rewards.builtins import accuracy_reward as accuracy_reward
from alignax.rewards.builtins import answers_match as answers_match
from alignax.rewards.builtins import extract_answer as extract_answer
from alignax.rewards.builtins import extract_boxed as extract_boxed
from alignax.rewards.builtins import parse_number as parse_number
from alignax.rewards.builtins import soft_overlong_punishment as soft_overlong_punishment
from alignax.rewards.builtins import think_format_reward as think_format_reward
from alignax.rewards.contract import RewardFunctionError as RewardFunctionError
from alignax.rewards.contract import RewardTimeoutError as RewardTimeoutError
from alignax.rewards.contract import reward_name as reward_name
from alignax.rewards.runner import BUILTIN_REWARDS as BUILTIN_REWARDS
from alignax.rewards.runner import AllRewardsNoneWarning as AllRewardsNoneWarning
from alignax.rewards.runner import RewardOutput as RewardOutput
from alignax.rewards.runner import RewardRunner as RewardRunner
from alignax.rewards.runner import compute_rewards as compute_rewards
from alignax.rewards.runner import resolve_reward_funcs as resolve_reward_funcs

_MODEL_NAMES = ("ENSEMBLE_MODES", "RewardEnsemble", "RewardModelScorer", "load_reward_model")

__all__ = [
  "AllRewardsNoneWarning", "BUILTIN_REWARDS", "RewardFunctionError", "RewardOutput", "RewardRunner",
  "RewardTimeoutError", "THINK_FORMAT", "accuracy_reward", "answers_match", "compute_rewards",
  "extract_answer", "extract_boxed", "parse_number", "resolve_reward_funcs", "reward_name",
  "soft_overlong_punishment", "think_format_reward", *_MODEL_NAMES,
]


def __getattr__(name: str) -> Any:
  if name in _MODEL_NAMES:
    return getattr(importlib.import_module("alignax.rewards.models"), name)
  raise AttributeError(f"module 'alignax.rewards' has no attribute {name!r}")


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(_MODEL_NAMES))
