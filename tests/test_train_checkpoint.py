"""orbax checkpoints as checkpoint-N directories: sharded round trip, keep-N, atomicity, resume paths."""

import os
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from alignax.train.checkpoint import Checkpointer, resolve_resume


def _state(mesh, scale=1.0):
  sharding = NamedSharding(mesh, PartitionSpec("data", None))
  return {
    "params": {"w": jax.device_put(scale * jnp.arange(32.0).reshape(8, 4), sharding)},
    "step": jnp.asarray(3, jnp.int32),
    "rng": jax.random.key_data(jax.random.key(7)),
  }


def test_sharded_round_trip_with_data_state_and_metadata(tmp_path, mesh8):
  state = _state(mesh8)
  with Checkpointer(tmp_path) as ckpt:
    ckpt.save(5, state, data_state={"epoch": 1, "position": 17}, metadata={"kl_coef": 0.05},
              trainer_state='{"global_step": 5}')
  assert sorted(os.listdir(tmp_path)) == ["checkpoint-5"]
  assert (tmp_path / "checkpoint-5" / "trainer_state.json").read_text() == '{"global_step": 5}'
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          state)
  with Checkpointer(tmp_path) as ckpt:
    restored = ckpt.restore(None, abstract)
  assert restored.step == 5
  assert restored.data_state == {"epoch": 1, "position": 17}
  assert restored.metadata == {"kl_coef": 0.05}
  np.testing.assert_array_equal(restored.state["params"]["w"], state["params"]["w"])
  assert restored.state["params"]["w"].sharding.spec == PartitionSpec("data", None)
  assert jax.random.wrap_key_data(restored.state["rng"]) is not None


def test_keeps_the_newest_and_ignores_unfinished_saves(tmp_path, mesh8):
  with Checkpointer(tmp_path, save_total_limit=2) as ckpt:
    for step in (1, 2, 3):
      ckpt.save(step, _state(mesh8, scale=step))
  # What a save killed half-way leaves behind: orbax's temporary directory, never renamed.
  (tmp_path / "checkpoint-4.orbax-checkpoint-tmp-1234").mkdir()
  with Checkpointer(tmp_path) as ckpt:
    assert ckpt.all_steps() == [2, 3]
    assert ckpt.latest_step() == 3
    with pytest.raises(FileNotFoundError, match=r"available: \[2, 3\]"):
      ckpt.restore(1, _state(mesh8))
  assert resolve_resume(True, tmp_path) == (str(tmp_path), 3)
  assert resolve_resume(str(tmp_path / "checkpoint-2"), tmp_path) == (str(tmp_path), 2)
  assert resolve_resume(None, tmp_path) is None
  with pytest.raises(FileNotFoundError, match="unfinished"):
    resolve_resume(str(tmp_path / "checkpoint-4.orbax-checkpoint-tmp-1234"), tmp_path)
  with pytest.raises(FileNotFoundError, match="no finished"):
    resolve_resume(True, tmp_path / "empty")
  with pytest.raises(ValueError, match="save_total_limit"):
    Checkpointer(tmp_path, save_total_limit=0)


def test_a_kill_during_a_save_leaves_the_previous_checkpoint_usable(tmp_path):
  script = textwrap.dedent(f"""
    import os, signal, sys
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax, jax.numpy as jnp
    from alignax.train.checkpoint import Checkpointer
    ckpt = Checkpointer({str(tmp_path)!r})
    ckpt.save(1, {{"w": jnp.ones((4, 4))}})
    ckpt.wait()
    big = {{"w%d" % i: jnp.full((512, 1024), float(i)) for i in range(64)}}  # ~128 MiB
    ckpt.save(2, big)
    os.kill(os.getpid(), signal.SIGKILL)  # mid-save: the async write is still running
  """)
  result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == -signal.SIGKILL, result.stderr
  with Checkpointer(tmp_path) as ckpt:
    assert ckpt.latest_step() == 1
    restored = ckpt.restore(None, {"w": jax.ShapeDtypeStruct((4, 4), jnp.float32)})
  np.testing.assert_array_equal(restored.state["w"], np.ones((4, 4)))
