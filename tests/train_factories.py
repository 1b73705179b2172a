"""A tiny tokenizer and a matching random Llama checkpoint for the engine tests (offline, seconds)."""

import os

from flax import nnx

import alignax as ax
from alignax.models.config import config_from_hf


def tiny_tokenizer_and_llama(root: str | os.PathLike, **overrides):
  """Builds the offline BPE tokenizer in ``root/tok`` and a 2-layer Llama whose vocabulary and pad id
  are the tokenizer's in ``root/base``; returns ``(tokenizer, checkpoint_path)``. (transformers'
  sequence classifiers find each row's last token through the pad id.)"""
  tokenizer = ax.build_tiny_tokenizer(os.path.join(root, "tok"))
  hf = dict(model_type="llama", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=False,
            pad_token_id=tokenizer.pad_token_id, **overrides)
  base = os.path.join(root, "base")
  ax.save_pretrained(ax.CausalLM(config_from_hf(hf), rngs=nnx.Rngs(0)), base)
  return tokenizer, base
