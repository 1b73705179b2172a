"""Tiny randomly initialised ``transformers`` models, one per supported family, with awkward sizes.

Shared by the model tests (``from model_factories import ...``; pytest puts ``tests/`` on sys.path).
Sizes are odd on purpose: vocabularies that no mesh axis divides, GQA and MQA ratios, a head_dim
that is not hidden/heads, sliding windows shorter than the test sequences, tied and untied LM heads.
Parameters are perturbed after initialisation so that biases and norm weights are not at their
initial zeros/ones (which would hide a wrong convention, e.g. Gemma's ``1 + w``).
"""

import functools
import json
import os

import numpy as np
import torch
import transformers
from flax import nnx

FAMILIES = ("llama", "llama3", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gpt2")
PAD_ID = 0

_COMMON = dict(initializer_range=0.1, pad_token_id=PAD_ID, bos_token_id=1, eos_token_id=2)

CONFIGS = {
  # Llama 2 style, GQA 6:2, untied, biases on every projection.
  "llama": dict(
    model_type="llama", vocab_size=97, hidden_size=48, intermediate_size=72, num_hidden_layers=2,
    num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=False, attention_bias=True,
    mlp_bias=True, rms_norm_eps=1e-5,
  ),
  # Llama 3.1 style: MQA, tied, llama3 RoPE scaling; the original context sits between the
  # wavelengths so all three regimes (kept, interpolated, divided) occur.
  "llama3": dict(
    model_type="llama", vocab_size=131, hidden_size=32, intermediate_size=56, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True,
    rope_parameters=dict(
      rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
      high_freq_factor=4.0, original_max_position_embeddings=256,
    ),
  ),
  # Sliding window 4 over sequences of 9, GQA 5:1, head_dim 8.
  "mistral": dict(
    model_type="mistral", vocab_size=101, hidden_size=40, intermediate_size=64,
    num_hidden_layers=2, num_attention_heads=5, num_key_value_heads=1, head_dim=8,
    sliding_window=4, tie_word_embeddings=False,
  ),
  # QKV bias, tied (as Qwen2.5 small models).
  "qwen2": dict(
    model_type="qwen2", vocab_size=113, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
  ),
  # q/k norm, head_dim 16 != hidden / heads.
  "qwen3": dict(
    model_type="qwen3", vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False,
  ),
  "gemma": dict(
    model_type="gemma", vocab_size=103, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=2, num_key_value_heads=1, head_dim=16,
  ),
  # Small soft-caps so tanh is far from linear; layer 0 slides (window 3), layer 1 is global.
  "gemma2": dict(
    model_type="gemma2", vocab_size=107, hidden_size=32, intermediate_size=48,
    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
    query_pre_attn_scalar=12, sliding_window=3, attn_logit_softcapping=0.5,
    final_logit_softcapping=2.0,
  ),
  "gpt2": dict(
    model_type="gpt2", vocab_size=97, n_embd=36, n_head=3, n_layer=2, n_positions=32,
  ),
}


def hf_config(family: str, **overrides) -> transformers.PretrainedConfig:
  """The ``transformers`` config of a tiny ``family`` model (``overrides`` replace entries)."""
  spec = {**_COMMON, **CONFIGS[family], **overrides}
  model_type = spec.pop("model_type")
  return transformers.AutoConfig.for_model(model_type, **spec)


def make_hf_model(family: str, *, head: str | None = None, seed: int = 0, **overrides):
  """A randomly initialised fp32 ``transformers`` model in eval mode, eager attention.

  ``head=None`` gives the ``*ForCausalLM`` / ``GPT2LMHeadModel``; ``"score"`` the
  ``*ForSequenceClassification`` (``num_labels`` from ``overrides``, default 2).
  """
  torch.manual_seed(seed)
  if head is not None:
    overrides.setdefault("num_labels", 2)
  config = hf_config(family, **overrides)
  auto = (
    transformers.AutoModelForSequenceClassification
    if head is not None
    else transformers.AutoModelForCausalLM
  )
  model = auto.from_config(config, attn_implementation="eager", dtype=torch.float32)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  return model.eval()


def save_hf_model(
  family: str, path: os.PathLike | str, *, head: str | None = None, seed: int = 0,
  max_shard_size: str | int | None = None, **overrides,
):
  """Saves a fresh tiny model to ``path`` (sharded if ``max_shard_size`` is given); returns it."""
  model = make_hf_model(family, head=head, seed=seed, **overrides)
  kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
  model.save_pretrained(os.fspath(path), **kwargs)
  return model


def padded_batch(vocab_size: int, *, seed: int = 0, length: int = 9):
  """Three rows: full, left-padded by 3, right-padded by 2; pads are ``PAD_ID``, real ids never are.

  Returns:
    ``(input_ids, attention_mask, positions)`` int64/bool/int64 NumPy arrays ``[3, length]``, with
    positions ``cumsum(mask) - 1`` clipped at 0 (alignax's default, given explicitly to torch).
  """
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, vocab_size, size=(3, length))
  mask = np.ones((3, length), bool)
  mask[1, :3] = False
  mask[2, -2:] = False
  ids = np.where(mask, ids, PAD_ID)
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
  return ids, mask, positions


def torch_forward(model, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray) -> np.ndarray:
  """``logits`` of a ``transformers`` model as a NumPy fp32 array."""
  with torch.no_grad():
    out = model(
      input_ids=torch.as_tensor(ids),
      attention_mask=torch.as_tensor(mask.astype(np.int64)),
      position_ids=torch.as_tensor(positions),
    )
  return out.logits.float().numpy()


_SAVED: dict[tuple, tuple[str, object]] = {}


def saved_checkpoint(tmp_path_factory, family: str, *, head: str | None = None, **kwargs):
  """:func:`save_hf_model` once per process and argument set; returns ``(path, torch_model)``."""
  key = (family, head, json.dumps(kwargs, sort_keys=True))
  if key not in _SAVED:
    path = tmp_path_factory.mktemp(f"{family}_{head or 'lm'}")
    _SAVED[key] = (os.fspath(path), save_hf_model(family, path, head=head, **kwargs))
  return _SAVED[key]


def max_error(got: np.ndarray, want: np.ndarray, mask: np.ndarray | None = None) -> float:
  """``max |got - want|`` over ``mask`` relative to the logit scale ``max(1, max |want|)``."""
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  if mask is not None:
    got, want = got[mask], want[mask]
  return float(np.abs(got - want).max() / max(1.0, float(np.abs(want).max())))


@functools.partial(nnx.jit, static_argnames=("compute_logits",))
def run_lm(model, input_ids, attention_mask=None, positions=None, segment_ids=None, *,
           compute_logits=True):
  """A jitted :class:`alignax.models.CausalLM` call (one compile per shape, not one per op)."""
  return model(input_ids, attention_mask, positions, segment_ids, compute_logits=compute_logits)


@nnx.jit
def run_head(model, input_ids, attention_mask=None):
  """A jitted :class:`alignax.models.ValueModel` / :class:`alignax.models.RewardModel` call."""
  return model(input_ids, attention_mask)
