"""A small SFT run in its own process, for the tests that need real processes: a run SIGKILLed
after a checkpoint (tests/test_train_resume_kill.py) and two processes joined by
``jax.distributed`` (tests/test_train_multiprocess.py).

Usage: ``python tests/train_worker.py '<json spec>'`` with the spec keys

* ``root``: where ``tiny_tokenizer_and_llama`` built ``tok/`` and ``base/``;
* ``output_dir``: the run directory;
* ``devices``: CPU devices of this process (``jax_num_cpu_devices``);
* ``fsdp`` / ``tensor``: the mesh (``fsdp=-1`` takes the rest);
* ``rows``: the global batch (rows per optimizer step);
* ``training``: ``TrainingConfig`` overrides (``max_steps``, ``save_steps``, ...);
* ``coordinator``, ``num_processes``, ``process_id``: a multi-process run (else one process);
* ``init_from_env``: join the run through ``alignax.distributed.initialize()`` without arguments,
  the settings coming from ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``;
* ``kill_at_step``, ``kill_after_checkpoint``: SIGKILL this process from the ``on_step`` hook of
  step ``kill_at_step`` once ``checkpoint-{kill_after_checkpoint}`` is complete on disk.

Every process writes ``done-{process_id}.json`` (the last step's metrics and the process count) into
``output_dir`` when the run returns.
"""

import json
import os
import signal
import sys
import time

WORDS = ["one", "two", "three", "four", "five", "six"]


def rows(n, seed):
  import numpy as np

  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    start = int(rng.integers(0, 3))
    out.append({"prompt": f"count from {WORDS[start]}:",
                "completion": " " + " ".join(WORDS[start:start + 3])})
  return out


def main(spec):
  import jax

  jax.config.update("jax_num_cpu_devices", int(spec["devices"]))
  from alignax import distributed

  if spec.get("init_from_env"):
    # The launcher's way: the settings come from JAX_COORDINATOR_ADDRESS & co.
    assert distributed.initialize(), "the JAX_* environment variables were not honoured"
  elif spec.get("num_processes", 1) > 1:
    distributed.initialize(coordinator_address=spec["coordinator"],
                           num_processes=spec["num_processes"], process_id=spec["process_id"])

  import alignax as ax
  from alignax import data
  from alignax.models import tokenizer as tokenizers
  from alignax.sharding import make_mesh
  from alignax.train.checkpoint import resolve_resume
  from alignax.train.config import TrainingConfig
  from alignax.train.loop import fit
  from alignax.train.objectives import sft_objective

  out = spec["output_dir"]
  tokenizer = tokenizers.load_tokenizer(os.path.join(spec["root"], "tok"))
  data_config = data.DataConfig(max_length=32, seed=0)
  train = data.prepare_dataset(data.load_rows(rows(64, 0)), tokenizer, task="sft",
                               config=data_config)
  mesh = make_mesh(fsdp=spec.get("fsdp", -1), tensor=spec.get("tensor", 1))
  model = ax.from_pretrained(os.path.join(spec["root"], "base"), mesh=mesh)
  options = dict(output_dir=out, learning_rate=3e-3, gradient_accumulation_steps=1, max_steps=4,
                 logging_steps=1, save_steps=2, lr_scheduler_type="constant", disable_tqdm=True,
                 seed=0)
  options.update(spec.get("training", {}))
  data_parallel = mesh.shape["data"] * mesh.shape["fsdp"]
  options["per_device_train_batch_size"] = spec["rows"] // (
    data_parallel * options["gradient_accumulation_steps"])
  config = TrainingConfig(**options)
  count = jax.process_count()
  batches = data.make_batches(train, batch_size=spec["rows"] // count, config=data_config,
                              process_index=jax.process_index(), process_count=count)

  def on_step(step, metrics):
    if step != spec.get("kill_at_step"):
      return
    wanted = spec["kill_after_checkpoint"]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
      try:
        if resolve_resume(True, out)[1] >= wanted:
          break
      except FileNotFoundError:  # no finished checkpoint yet
        pass
      time.sleep(0.05)
    else:
      raise TimeoutError(f"checkpoint-{wanted} did not appear under {out}")
    os.kill(os.getpid(), signal.SIGKILL)

  result = fit(model, sft_objective, batches, config, mesh=mesh, tokenizer=tokenizer,
               on_step=on_step)
  done = {"process_count": count, "history": result.history}
  with open(os.path.join(out, f"done-{jax.process_index()}.json"), "w") as f:
    json.dump(done, f)
  distributed.shutdown()


if __name__ == "__main__":
  os.environ["JAX_PLATFORMS"] = "cpu"
  # The parent (pytest) forces 8 host devices through XLA_FLAGS; the spec decides here.
  os.environ.pop("XLA_FLAGS", None)
  main(json.loads(sys.argv[1]))
