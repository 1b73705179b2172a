"""Batched KV-cache sampling from alignax decoders (layer 2): :func:`generate` and its processors.

``generate`` prefills left-padded prompts once, then runs a jitted ``lax.while_loop`` of decode
steps with static shapes, per-row stop flags and the batch sharded over ``(data, fsdp)``;
``process_logits`` is the distribution it samples from (temperature, top-k, top-p, min-p, in
``transformers``' order).
"""

from alignax.sampling.sampler import SampleOutput as SampleOutput
from alignax.sampling.sampler import bucket_length as bucket_length
from alignax.sampling.sampler import checkpoint_stop_token_ids as checkpoint_stop_token_ids
from alignax.sampling.sampler import default_stop_token_ids as default_stop_token_ids
from alignax.sampling.sampler import generate as generate
from alignax.sampling.processors import process_logits as process_logits

__all__ = ["SampleOutput", "bucket_length", "checkpoint_stop_token_ids", "default_stop_token_ids", "generate", "process_logits"]
