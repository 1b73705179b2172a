"""alignax: JAX-native alignment for language models.

``import alignax as ax`` gives the whole public API: losses, advantages, KL estimators, reductions,
fused log-prob kernels and models.
"""

__version__ = "0.1.0"

# --- layer 1a: reductions, KL, advantages, policy-gradient losses ------------------------------
from alignax.aggregation import AGG_MODES as AGG_MODES
from alignax.aggregation import AggMode as AggMode
from alignax.aggregation import aggregate as aggregate
from alignax.aggregation import last_valid_token as last_valid_token
from alignax.aggregation import masked_count as masked_count
from alignax.aggregation import masked_mean as masked_mean
from alignax.aggregation import masked_sum as masked_sum
from alignax.aggregation import masked_var as masked_var
from alignax.aggregation import masked_whiten as masked_whiten
from alignax.kl import KL_ESTIMATORS as KL_ESTIMATORS
from alignax.kl import KLController as KLController
from alignax.kl import KLControllerState as KLControllerState
from alignax.kl import KLEstimator as KLEstimator
from alignax.kl import adaptive_kl_controller as adaptive_kl_controller
from alignax.kl import categorical_kl as categorical_kl
from alignax.kl import fixed_kl_controller as fixed_kl_controller
from alignax.kl import kl_estimate as kl_estimate
from alignax.kl import kl_penalized_rewards as kl_penalized_rewards
from alignax.advantages import GROUP_SCALES as GROUP_SCALES
from alignax.advantages import GroupScale as GroupScale
from alignax.advantages import gae as gae
from alignax.advantages import group_advantages as group_advantages
from alignax.advantages import informative_group_mask as informative_group_mask
from alignax.advantages import reinforce_pp_advantages as reinforce_pp_advantages
from alignax.advantages import select_informative_groups as select_informative_groups
from alignax.advantages import whiten as whiten
from alignax.losses.policy import IMPORTANCE_LEVELS as IMPORTANCE_LEVELS
from alignax.losses.policy import POLICY_LOSS_TYPES as POLICY_LOSS_TYPES
from alignax.losses.policy import ClipStats as ClipStats
from alignax.losses.policy import ImportanceLevel as ImportanceLevel
from alignax.losses.policy import PolicyLossType as PolicyLossType
from alignax.losses.policy import cispo_loss as cispo_loss
from alignax.losses.policy import clipped_surrogate as clipped_surrogate
from alignax.losses.policy import clipped_value_loss as clipped_value_loss
from alignax.losses.policy import dapo_loss as dapo_loss
from alignax.losses.policy import dr_grpo_loss as dr_grpo_loss
from alignax.losses.policy import grpo_loss as grpo_loss
from alignax.losses.policy import gspo_loss as gspo_loss
from alignax.losses.policy import ppo_loss as ppo_loss
# --- end layer 1a -------------------------------------------------------------------------------

# --- layer 1b: supervised, reward-model and direct-preference losses ---------------------------
from alignax.losses.supervised import sequence_logprobs as sequence_logprobs
from alignax.losses.supervised import sft_loss as sft_loss
from alignax.losses.reward import bradley_terry_loss as bradley_terry_loss
from alignax.losses.preference import DPO_LOSS_TYPES as DPO_LOSS_TYPES
from alignax.losses.preference import DpoLossType as DpoLossType
from alignax.losses.preference import cpo_loss as cpo_loss
from alignax.losses.preference import dpo_loss as dpo_loss
from alignax.losses.preference import kto_loss as kto_loss
from alignax.losses.preference import kto_reference_point as kto_reference_point
from alignax.losses.preference import orpo_loss as orpo_loss
from alignax.losses.preference import simpo_loss as simpo_loss
# --- end layer 1b -------------------------------------------------------------------------------

# --- layer 0: fused LM-head kernels ------------------------------------------------------------
from alignax.kernels import KLStats as KLStats
from alignax.kernels import TokenLogprobs as TokenLogprobs
from alignax.kernels import VocabStats as VocabStats
from alignax.kernels import token_kl as token_kl
from alignax.kernels import token_logprobs as token_logprobs
# --- end layer 0 --------------------------------------------------------------------------------

# --- layer 2: models ---------------------------------------------------------------------------
from alignax.models import CausalLM as CausalLM
from alignax.models import DecoderConfig as DecoderConfig
from alignax.models import LMHead as LMHead
from alignax.models import RewardModel as RewardModel
from alignax.models import ValueModel as ValueModel
from alignax.models import from_pretrained as from_pretrained
from alignax.models import save_pretrained as save_pretrained
from alignax.models import LoRAConfig as LoRAConfig
from alignax.models import LoRAParam as LoRAParam
from alignax.models import apply_lora as apply_lora
from alignax.models import load_lora as load_lora
from alignax.models import lora_disabled as lora_disabled
from alignax.models import merge_lora as merge_lora
from alignax.models import save_lora as save_lora
from alignax.models import unmerge_lora as unmerge_lora
from alignax.models import apply_chat_template as apply_chat_template
from alignax.models import build_tiny_tokenizer as build_tiny_tokenizer
from alignax.models import load_tokenizer as load_tokenizer
# --- end layer 2 --------------------------------------------------------------------------------
