"""Test set-up: JAX on CPU with 8 fake devices, so sharding is exercised for real."""

import os

# Must be set before jax initialises its backends.
os.environ["JAX_PLATFORMS"] = "cpu"
# XLA:CPU without its expensive passes (LLVM at -O0): compiling is most of the suite's CPU time and
# becomes 35-40% cheaper; the programs compute the same values up to float rounding. Inherited by
# the tests' subprocesses; set it to 0 to test optimised code.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import jaxtyping  # noqa: E402
import pytest  # noqa: E402

# Check every jaxtyping annotation in alignax at call time (tests/_typecheck.py says how). Installed
# here, before any test module imports alignax, so the hook sees every alignax module.
jaxtyping.install_import_hook("alignax", "_typecheck.typechecker")

jax.config.update("jax_platforms", "cpu")


@pytest.fixture
def key():
  return jax.random.key(0)


@pytest.fixture(scope="session")
def mesh8():
  """A 1-D mesh over the 8 fake CPU devices, batch axis named ``data``."""
  devices = jax.devices()
  assert len(devices) == 8, f"expected 8 fake CPU devices, got {len(devices)}"
  return jax.make_mesh((8,), ("data",), devices=devices)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  """The offline tiny BPE tokenizer (with its chat template), saved and loaded back, per module."""
  from alignax.models import tokenizer

  path = tmp_path_factory.mktemp("tok")
  tokenizer.build_tiny_tokenizer(path)
  return tokenizer.load_tokenizer(path)
