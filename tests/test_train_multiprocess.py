"""Two processes joined by ``jax.distributed`` (localhost, CPU devices, gloo collectives) train the
same SFT run as one process with the same global batch and device count: the same per-step losses
and token counts, one set of files written by process 0, and the same exported model."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from alignax import distributed
from train_factories import tiny_tokenizer_and_llama

WORKER = os.path.join(os.path.dirname(__file__), "train_worker.py")
TIMEOUT_S = 300


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start(spec, **env_vars):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(env_vars)
  return subprocess.Popen([sys.executable, WORKER, json.dumps(spec)], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(processes):
  """Waits for every process (killing all of them past the timeout); returns their outputs."""
  outputs = []
  try:
    for p in processes:
      outputs.append(p.communicate(timeout=TIMEOUT_S)[0])
  except subprocess.TimeoutExpired:
    for p in processes:
      p.kill()
    pytest.fail(f"a worker ran past {TIMEOUT_S} s: {[p.args for p in processes]}")
  finally:
    for p in processes:
      if p.poll() is None:
        p.kill()
  for p, output in zip(processes, outputs):
    assert p.returncode == 0, output[-4000:]
  return outputs


def _two_processes(spec):
  port = _free_port()
  return [_start(dict(spec, devices=2, num_processes=2, process_id=i,
                      coordinator=f"localhost:{port}")) for i in range(2)]


def _metrics(run):
  return [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("multiprocess")
  tiny_tokenizer_and_llama(root)
  common = dict(root=str(root), rows=8, training=dict(max_steps=4, save_steps=2))
  one = str(root / "one")
  two = str(root / "two")
  port = _free_port()
  processes = [_start(dict(common, output_dir=one, devices=4))]
  # Process 0 gets its settings as arguments, process 1 from the environment, as launchers set it.
  processes.append(_start(dict(common, output_dir=two, devices=2, num_processes=2, process_id=0,
                               coordinator=f"localhost:{port}")))
  processes.append(_start(dict(common, output_dir=two, devices=2, init_from_env=True),
                          JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2",
                          JAX_PROCESS_ID="1"))
  _finish(processes)
  return root, one, two


def test_two_processes_log_what_one_process_logs(runs):
  _, one, two = runs
  first, second = _metrics(one), _metrics(two)
  assert [m["step"] for m in second] == [1, 2, 3, 4]  # one line per step: process 0 alone writes
  for a, b in zip(first, second):
    np.testing.assert_allclose(b["loss"], a["loss"], rtol=1e-5)
    np.testing.assert_allclose(b["grad_norm"], a["grad_norm"], rtol=1e-4)
    # Counted on the global batch, not as this host's tokens times the number of hosts.
    assert b["num_tokens"] == a["num_tokens"]
  for i in range(2):
    done = json.load(open(os.path.join(two, f"done-{i}.json")))
    assert done["process_count"] == 2
    assert [h["step"] for h in done["history"]] == [1, 2, 3, 4]
  state = json.load(open(os.path.join(two, "trainer_state.json")))
  assert [h["step"] for h in state["log_history"]] == [1, 2, 3, 4]
  run_config = json.load(open(os.path.join(two, "run_config.json")))
  assert run_config["process_count"] == 2 and run_config["mesh"]["fsdp"] == 4


def test_two_processes_checkpoint_and_export_the_same_model(runs):
  _, one, two = runs
  for step in (2, 4):
    assert os.path.isfile(os.path.join(two, f"checkpoint-{step}", "trainer_state.json"))
  assert not [n for n in os.listdir(two) if "tmp" in n]
  exported, reference = load_file(os.path.join(two, "model.safetensors")), \
    load_file(os.path.join(one, "model.safetensors"))
  assert sorted(exported) == sorted(reference)
  for name, value in reference.items():
    np.testing.assert_allclose(exported[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
  assert os.path.isfile(os.path.join(two, "tokenizer.json"))
  with open(os.path.join(two, "config.json")) as f:
    assert json.load(f)["architectures"] == ["LlamaForCausalLM"]


def test_two_processes_resume_a_two_process_checkpoint_exactly(runs):
  root, _, two = runs
  resumed = str(root / "resumed")
  checkpoint = os.path.join(two, "checkpoint-2")
  _finish(_two_processes(dict(root=str(root), rows=8, output_dir=resumed,
                              training=dict(max_steps=4, save_steps=2,
                                            resume_from_checkpoint=checkpoint))))
  # Restored collectively from each host's shards: steps 3 and 4 again, bitwise.
  fields = ("loss", "grad_norm", "num_tokens", "step")
  assert [{k: m[k] for k in fields} for m in _metrics(resumed)] == \
    [{k: m[k] for k in fields} for m in _metrics(two)[2:]]
  state = json.load(open(os.path.join(resumed, "trainer_state.json")))
  assert [h["step"] for h in state["log_history"]] == [1, 2, 3, 4]


@pytest.fixture
def no_launcher_env(monkeypatch):
  for name in (distributed.COORDINATOR_ENV, distributed.NUM_PROCESSES_ENV,
               distributed.PROCESS_ID_ENV, "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE",
               "TPU_WORKER_HOSTNAMES"):
    monkeypatch.delenv(name, raising=False)
  return monkeypatch


def test_initialize_is_a_no_op_without_settings(no_launcher_env):
  assert distributed.initialize() is False
  no_launcher_env.setenv("SLURM_NTASKS", "1")  # a one-task job is not a multi-host run
  assert distributed.initialize() is False
  assert jax.process_count() == 1


def test_a_multi_host_tpu_slice_is_detected_and_a_single_host_one_is_not(no_launcher_env):
  # On a TPU pod slice with no setting, initialize must join (JAX finds coordinator and index).
  assert not distributed._multi_task_cluster()
  no_launcher_env.setenv("TPU_WORKER_HOSTNAMES", "10.0.0.2")
  assert not distributed._multi_task_cluster()
  no_launcher_env.setenv("TPU_WORKER_HOSTNAMES", "10.0.0.2,10.0.0.3")
  assert distributed._multi_task_cluster()


def test_initialize_names_bad_settings(no_launcher_env):
  no_launcher_env.setenv(distributed.NUM_PROCESSES_ENV, "two")
  with pytest.raises(ValueError, match="JAX_NUM_PROCESSES='two' must be an integer"):
    distributed.initialize()
  no_launcher_env.setenv(distributed.NUM_PROCESSES_ENV, "2")
  no_launcher_env.setenv(distributed.PROCESS_ID_ENV, "2")
  with pytest.raises(ValueError, match=r"process_id=2 must lie in \[0, num_processes=2\)"):
    distributed.initialize(coordinator_address="localhost:1")
  with pytest.raises(ValueError, match="num_processes must be a positive int"):
    distributed.initialize(coordinator_address="localhost:1", num_processes=0, process_id=0)
  jax.devices()  # the backends of this test process exist: too late to join a run
  with pytest.raises(RuntimeError, match="before any JAX computation"):
    distributed.initialize(coordinator_address="localhost:1", num_processes=2, process_id=1)
