"""Flax NNX decoders with Hugging Face checkpoint parity, value/reward heads, LoRA and tokenizers."""

# --- core: decoder, families, checkpoint I/O, heads, sharding ----------------------------------
from alignax.models.checkpoint import from_pretrained as from_pretrained
from alignax.models.checkpoint import save_pretrained as save_pretrained
from alignax.models.config import SUPPORTED_MODEL_TYPES as SUPPORTED_MODEL_TYPES
from alignax.models.config import DecoderConfig as DecoderConfig
from alignax.models.config import config_from_hf as config_from_hf
from alignax.models.decoder import CausalLM as CausalLM
from alignax.models.decoder import DecoderOutput as DecoderOutput
from alignax.models.decoder import KVCache as KVCache
from alignax.models.decoder import LMHead as LMHead
from alignax.models.decoder import Transformer as Transformer
from alignax.models.heads import RewardModel as RewardModel
from alignax.models.heads import ScoreOutput as ScoreOutput
from alignax.models.heads import ValueModel as ValueModel
from alignax.models.layers import Linear as Linear
from alignax.models.layers import iter_linears as iter_linears
from alignax.models.sharding import DEFAULT_RULES as DEFAULT_RULES
from alignax.models.sharding import batch_sharding as batch_sharding
from alignax.models.sharding import logical_to_mesh as logical_to_mesh
from alignax.models.sharding import make_mesh as make_mesh
from alignax.models.sharding import shard_model as shard_model
from alignax.models.sharding import state_shardings as state_shardings
# --- end core -----------------------------------------------------------------------------------

# --- adapters and tokenizers: LoRA, tokenizer helpers ------------------------------------------
from alignax.models.lora import LoRA as LoRA
from alignax.models.lora import LoRAConfig as LoRAConfig
from alignax.models.lora import LoRAParam as LoRAParam
from alignax.models.lora import apply_lora as apply_lora
from alignax.models.lora import load_lora as load_lora
from alignax.models.lora import lora_disabled as lora_disabled
from alignax.models.lora import merge_lora as merge_lora
from alignax.models.lora import save_lora as save_lora
from alignax.models.tokenizer import TINY_CHAT_TEMPLATE as TINY_CHAT_TEMPLATE
from alignax.models.tokenizer import apply_chat_template as apply_chat_template
from alignax.models.tokenizer import build_tiny_tokenizer as build_tiny_tokenizer
from alignax.models.tokenizer import load_tokenizer as load_tokenizer
# --- end adapters and tokenizers ----------------------------------------------------------------
