"""The training engine (``fit``, objectives, checkpoints, metrics) and the offline trainers.

``alignax.train.sft``, ``reward``, ``dpo``, ``kto``, ``orpo``, ``simpo`` and ``cpo`` each train a
model from a config (``SFTConfig``, ..., plus ``ModelConfig``, ``alignax.data.DataConfig`` and
``MeshConfig``) and write a TRL-style output directory; ``alignax <algorithm> --flags`` is the same
from the command line (``alignax.cli``). ``ppo`` (``PPOConfig``) is the online PPO trainer with a
critic (``alignax.train.ppo_trainer``). Names resolve lazily, so importing one engine module does
not import the trainers.
"""

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
  **{name: "alignax.train.config" for name in (
    "TrainingConfig", "SFTConfig", "RewardConfig", "DPOConfig", "KTOConfig", "ORPOConfig",
    "SimPOConfig", "CPOConfig", "ModelConfig", "MeshConfig")},
  **{name: "alignax.train.trainers" for name in (
    "sft", "reward", "dpo", "kto", "orpo", "simpo", "cpo", "run", "ALGORITHMS",
    "make_evaluator")},
  "ppo": "alignax.train.ppo_trainer",
  "PPOConfig": "alignax.train.ppo_trainer",
  "fit": "alignax.train.loop",
  "FitResult": "alignax.train.loop",
  "NonFiniteError": "alignax.train.step",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
  module = _EXPORTS.get(name)
  if module is None:
    raise AttributeError(f"module 'alignax.train' has no attribute {name!r}")
  value = getattr(importlib.import_module(module), name)
  globals()[name] = value
  return value


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(_EXPORTS))
