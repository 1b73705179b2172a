"""Flax NNX decoders with Hugging Face checkpoint parity, value/reward heads, LoRA and tokenizers."""

# --- core: decoder, families, checkpoint I/O, heads, sharding ----------------------------------
# --- end core -----------------------------------------------------------------------------------

# --- adapters and tokenizers: LoRA, tokenizer helpers ------------------------------------------
# --- end adapters and tokenizers ----------------------------------------------------------------
