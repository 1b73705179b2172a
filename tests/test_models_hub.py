"""Hub ids resolve through the Hugging Face cache (nothing is downloaded); dtypes parse at load.

The network is never used: hub look-ups run with ``HF_HUB_OFFLINE=1`` against a cache directory the
test builds in the hub's own layout (``models--org--name/refs/main`` + ``snapshots/<commit>/``), or
with ``snapshot_download`` replaced by one that fails as an unreachable hub does.
"""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from huggingface_hub import errors
from model_factories import padded_batch, run_lm, saved_checkpoint

from alignax import models
from alignax.models import hub

FAKE_ID = "alignax-tests/no-such-model"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _cached_snapshot(cache_dir, repo_id, source):
  """Copies the checkpoint directory ``source`` into ``cache_dir`` as the hub's snapshot of main."""
  repo = cache_dir / ("models--" + repo_id.replace("/", "--"))
  (repo / "refs").mkdir(parents=True)
  (repo / "refs" / "main").write_text(COMMIT)
  snapshot = repo / "snapshots" / COMMIT
  shutil.copytree(source, snapshot)
  return snapshot


@pytest.fixture
def offline(monkeypatch):
  # Set after huggingface_hub was imported, as a user exporting it in a notebook would.
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def recorded_downloads(monkeypatch):
  """Calls the real ``snapshot_download``, recording the arguments of each call."""
  import huggingface_hub

  calls = []
  real = huggingface_hub.snapshot_download

  def recording(repo_id, **kwargs):
    calls.append(kwargs)
    return real(repo_id, **kwargs)

  monkeypatch.setattr(huggingface_hub, "snapshot_download", recording)
  return calls


def test_local_directory_is_returned_as_is(tmp_path):
  assert hub.resolve_pretrained(tmp_path) == os.fspath(tmp_path)
  assert hub.resolve_pretrained(os.fspath(tmp_path)) == os.fspath(tmp_path)


def test_a_path_that_is_neither_directory_nor_hub_id_is_no_such_directory(tmp_path):
  with pytest.raises(FileNotFoundError, match="no such directory"):
    hub.resolve_pretrained(tmp_path / "missing")
  with pytest.raises(FileNotFoundError, match="no such directory"):
    hub.resolve_pretrained("no-slash-model")
  with pytest.raises(FileNotFoundError, match="no such directory"):
    hub.resolve_pretrained("a/b/c")
  file = tmp_path / "model.safetensors"
  file.write_bytes(b"")
  with pytest.raises(FileNotFoundError, match="is a file"):
    hub.resolve_pretrained(file)


def test_hub_id_offline_and_not_cached_says_so(tmp_path, offline):
  with pytest.raises(OSError) as info:
    hub.resolve_pretrained(FAKE_ID, cache_dir=tmp_path)
  message = str(info.value)
  assert FAKE_ID in message
  assert "not found locally" in message
  assert "HF_HUB_OFFLINE" in message
  assert "pass the directory" in message
  assert "config.json" not in message


def test_hub_id_unreachable_hub_says_so(tmp_path, monkeypatch):
  import huggingface_hub

  monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
  monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)

  def unreachable(repo_id, **kwargs):
    assert kwargs["local_files_only"] is False
    raise errors.LocalEntryNotFoundError("Got: ConnectError: [Errno -2] Name or service not known")

  monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
  with pytest.raises(OSError, match="could not be reached") as info:
    hub.resolve_pretrained(FAKE_ID, revision="v1", cache_dir=tmp_path)
  assert f"{FAKE_ID}@v1" in str(info.value)
  assert "Name or service not known" in str(info.value)


def test_cached_hub_id_resolves_offline_to_its_snapshot_and_fetches_only_indexed_shards(
  tmp_path_factory, tmp_path, offline, recorded_downloads
):
  source, hf_model = saved_checkpoint(tmp_path_factory, "qwen3", max_shard_size="20KB")
  shards = sorted(f for f in os.listdir(source) if f.endswith(".safetensors"))
  assert len(shards) > 1
  snapshot = _cached_snapshot(tmp_path, "org/tiny-qwen3", source)
  # A second copy of the weights, as Mistral repositories ship: not named by the index.
  shutil.copy(os.path.join(source, shards[0]), snapshot / "consolidated.safetensors")

  resolved = hub.resolve_pretrained("org/tiny-qwen3", cache_dir=tmp_path)

  assert resolved == os.fspath(snapshot)
  assert all(call["local_files_only"] for call in recorded_downloads)
  weights = [p for p in recorded_downloads[-1]["allow_patterns"] if p.endswith(".safetensors")]
  assert sorted(weights) == shards
  ids, mask, _ = padded_batch(hf_model.config.vocab_size)
  want = run_lm(models.from_pretrained(source), jnp.asarray(ids), jnp.asarray(mask)).logits
  got = run_lm(models.from_pretrained(resolved), jnp.asarray(ids), jnp.asarray(mask)).logits
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_cached_single_file_hub_id_asks_for_model_safetensors(
  tmp_path_factory, tmp_path, offline, recorded_downloads
):
  source, _ = saved_checkpoint(tmp_path_factory, "llama")
  _cached_snapshot(tmp_path, "org/tiny-llama", source)
  hub.resolve_pretrained("org/tiny-llama", cache_dir=tmp_path)
  weights = [p for p in recorded_downloads[-1]["allow_patterns"] if p.endswith(".safetensors")]
  assert weights == ["model.safetensors"]
  # Explicit patterns are passed through in one call (a tokenizer alone, say).
  recorded_downloads.clear()
  hub.resolve_pretrained(
    "org/tiny-llama", cache_dir=tmp_path, allow_patterns=hub.TOKENIZER_FILES
  )
  assert [call["allow_patterns"] for call in recorded_downloads] == [list(hub.TOKENIZER_FILES)]


@pytest.mark.parametrize(
  ("value", "want"),
  [
    ("float32", jnp.float32), ("fp32", jnp.float32), ("FP32", jnp.float32),
    ("bfloat16", jnp.bfloat16), ("bf16", jnp.bfloat16), (" BF16 ", jnp.bfloat16),
    ("float16", jnp.float16), ("fp16", jnp.float16),
    (jnp.bfloat16, jnp.bfloat16), (np.float32, jnp.float32), (np.dtype("float16"), jnp.float16),
    (jnp.dtype("bfloat16"), jnp.bfloat16),
  ],
)
def test_parse_dtype_accepts_names_and_dtypes(value, want):
  got = hub.parse_dtype(value, name="dtype")
  assert got == jnp.dtype(want)
  assert isinstance(got, np.dtype)
  assert jnp.zeros((2,), got).dtype == jnp.dtype(want)


@pytest.mark.parametrize(
  ("value", "match"),
  [
    ("bf17", r"dtype='bf17' is not a dtype"),
    ("auto", r"dtype='auto' is not supported"),
    ("int32", r"dtype='int32' is not a dtype"),
    (jnp.int32, r"dtype must be a floating-point dtype, got int32"),
    (None, r"dtype=None is not a dtype"),
    (True, r"dtype=True is not a dtype"),
    ("float64", r"dtype=float64 needs jax.config.update\('jax_enable_x64'"),
    (object(), r"dtype=<object object"),
  ],
)
def test_parse_dtype_rejects_with_the_argument_named(value, match):
  assert not jax.config.read("jax_enable_x64")
  with pytest.raises(ValueError, match=match):
    hub.parse_dtype(value, name="dtype")


def test_parse_dtype_names_the_argument_it_checks():
  with pytest.raises(ValueError, match=r"param_dtype='bf17'"):
    hub.parse_dtype("bf17", name="param_dtype")




def test_from_pretrained_parses_string_dtypes_at_load(tmp_path_factory):
  path, hf_model = saved_checkpoint(tmp_path_factory, "llama")
  ids, mask, _ = padded_batch(hf_model.config.vocab_size)
  model = models.from_pretrained(path, dtype="bf16", param_dtype="fp32")
  assert model.model.layers.mlp.up_proj.kernel[...].dtype == jnp.float32
  out = run_lm(model, jnp.asarray(ids), jnp.asarray(mask))
  assert out.hidden_states.dtype == jnp.bfloat16
  with pytest.raises(ValueError, match=r"param_dtype='bf17'"):
    models.from_pretrained(path, param_dtype="bf17")


def test_from_pretrained_with_an_uncached_hub_id_offline_says_so(tmp_path, offline, monkeypatch):
  monkeypatch.setenv("HF_HUB_CACHE", os.fspath(tmp_path))
  import huggingface_hub

  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", os.fspath(tmp_path))
  with pytest.raises(OSError, match="not found locally") as info:
    models.from_pretrained(FAKE_ID)
  assert FAKE_ID in str(info.value)


def test_load_tokenizer_reads_a_cached_hub_id_offline(tmp_path, offline, monkeypatch):
  import huggingface_hub

  source = tmp_path / "source"
  models.build_tiny_tokenizer(source, vocab_size=300)
  cache = tmp_path / "cache"
  _cached_snapshot(cache, "org/tiny-tokenizer", source)
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", os.fspath(cache))
  tokenizer = models.load_tokenizer("org/tiny-tokenizer")
  assert tokenizer("the cat").input_ids == models.load_tokenizer(source)("the cat").input_ids
