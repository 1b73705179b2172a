"""alignax: JAX-native alignment for language models.

``import alignax as ax`` gives the whole public API: losses, advantages, KL estimators, reductions,
fused log-prob kernels and models. The names are resolved lazily (PEP 562 module ``__getattr__``):
``import alignax`` and the pure layer-1 modules (``alignax.losses``, ``alignax.aggregation``,
``alignax.kl``, ``alignax.advantages``) import neither flax, transformers nor tokenizers; the first
use of a model name (``ax.CausalLM``, say) imports ``alignax.models``.
"""

import importlib
from typing import Any

from alignax import _hf_logging

__version__ = "0.1.0"

# Before any alignax module imports transformers: drop its "PyTorch was not found" advice, which
# does not apply to alignax's models (they need no torch). Imports only `logging`.
_hf_logging.install()

# public name -> module that defines it, by layer.
_EXPORTS: dict[str, str] = {}


def _export(module: str, *names: str) -> None:
  for name in names:
    _EXPORTS[name] = module


# --- layer 1a: reductions, KL, advantages, policy-gradient losses
_export("alignax.aggregation", "AGG_MODES", "AggMode", "aggregate", "last_valid_token",
        "masked_count", "masked_mean", "masked_sum", "masked_var", "masked_whiten")
_export("alignax.kl", "KL_ESTIMATORS", "KLController", "KLControllerState", "KLEstimator",
        "adaptive_kl_controller", "categorical_kl", "fixed_kl_controller", "kl_estimate",
        "kl_penalized_rewards")
_export("alignax.advantages", "GROUP_SCALES", "GroupScale", "gae", "group_advantages",
        "informative_group_mask", "reinforce_pp_advantages", "select_informative_groups")
_export("alignax.losses.policy", "IMPORTANCE_LEVELS", "POLICY_LOSS_TYPES", "ClipStats",
        "ImportanceLevel", "PolicyLossType", "cispo_loss", "clipped_surrogate",
        "clipped_value_loss", "dapo_loss", "dr_grpo_loss", "grpo_loss", "gspo_loss", "ppo_loss")
# --- layer 1b: supervised, reward-model and direct-preference losses
_export("alignax.losses.supervised", "next_token_targets", "sequence_logprobs", "sft_loss")
_export("alignax.losses.reward", "bradley_terry_loss")
_export("alignax.losses.preference", "DPO_LOSS_TYPES", "DpoLossType", "cpo_loss", "dpo_loss",
        "kto_loss", "kto_reference_point", "orpo_loss", "simpo_loss")
# --- layer 0: fused LM-head kernels
_export("alignax.kernels", "KLStats", "LMHead", "TokenLogprobs", "VocabStats", "token_kl",
        "token_logprobs")
_export("alignax.kernels.attention", "attention")
# --- the mesh policy shared by models, kernels and trainers
_export("alignax.sharding", "make_mesh", "constrain", "batch_sharding")
# --- layer 2: models
_export("alignax.models", "CausalLM", "DecoderConfig", "RewardModel", "ValueModel",
        "from_pretrained", "save_pretrained", "LoRAConfig", "LoRAParam", "apply_lora", "load_lora",
        "lora_disabled", "merge_lora", "save_lora", "apply_chat_template", "build_tiny_tokenizer",
        "load_tokenizer")
# --- rewards for online RL: reward functions with TRL's contract, reward models, ensembles
_export("alignax.rewards", "AllRewardsNoneWarning", "RewardEnsemble", "RewardFunctionError",
        "RewardModelScorer", "RewardOutput", "RewardRunner", "RewardTimeoutError",
        "accuracy_reward", "compute_rewards", "load_reward_model", "resolve_reward_funcs",
        "soft_overlong_punishment", "think_format_reward")
# --- layers 3-4: the engine's reference log-probs, precomputed once over a dataset
_export("alignax.train.reference", "precompute_reference_logps")
# --- evaluation: reward, win rate, KL to the reference and alignment tax (``alignax eval``)
_export("alignax.evaluation", "EvalConfig", "evaluate", "win_rate", "length_controlled_win_rate")

# Subpackages reached as attributes (``ax.train.dpo(...)``, ``ax.sampling.generate(...)``), imported
# on first use like the names above.
_SUBPACKAGES = ("data", "distributed", "evaluation", "rewards", "sampling", "train")

__all__ = ["__version__", *_EXPORTS, *_SUBPACKAGES]


def __getattr__(name: str) -> Any:
  if name in _SUBPACKAGES:
    return importlib.import_module(f"alignax.{name}")
  module = _EXPORTS.get(name)
  if module is None:
    raise AttributeError(f"module 'alignax' has no attribute {name!r}")
  value = getattr(importlib.import_module(module), name)
  globals()[name] = value  # resolve once; later lookups skip __getattr__
  return value


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(_EXPORTS) | set(_SUBPACKAGES))

