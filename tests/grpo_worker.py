"""A small GRPO run in its own process, for tests/test_train_grpo_multiprocess.py: one process
with every device, or one of several processes joined by ``jax.distributed`` (localhost, CPU).

Usage: ``python tests/grpo_worker.py '<json spec>'`` with the spec keys

* ``root``: where ``tiny_tokenizer_and_llama`` built ``tok/`` and ``base/``;
* ``output_dir``: the run directory;
* ``devices``: CPU devices of this process (``jax_num_cpu_devices``);
* ``training``: ``GRPOConfig`` overrides;
* ``coordinator``, ``num_processes``, ``process_id``: a multi-process run (else one process).

The reward function appends the prompts it scored to ``scored-{process_id}.jsonl`` in
``output_dir`` (which host scored which rows), and every process writes
``done-{process_id}.json`` (its history and the process count) when the run returns.
"""

import json
import os
import sys

PROMPTS = [{"prompt": f"count {i} apples"} for i in range(16)]


def main(spec):
  import jax

  jax.config.update("jax_num_cpu_devices", int(spec["devices"]))
  from alignax import distributed

  if spec.get("num_processes", 1) > 1:
    distributed.initialize(coordinator_address=spec["coordinator"],
                           num_processes=spec["num_processes"], process_id=spec["process_id"])

  import numpy as np

  import alignax as ax
  from alignax.models import tokenizer as tokenizers
  from alignax.sharding import make_mesh
  from alignax.train.grpo import GRPOConfig, grpo

  out = spec["output_dir"]
  os.makedirs(out, exist_ok=True)
  process = jax.process_index()

  def even_fraction(prompts, completion_ids, **kwargs):
    """The share of even token ids; records which prompts this process scored."""
    with open(os.path.join(out, f"scored-{process}.jsonl"), "a") as f:
      f.write(json.dumps(prompts) + "\n")
    return [float(np.mean([t % 2 == 0 for t in ids])) for ids in completion_ids]

  tokenizer = tokenizers.load_tokenizer(os.path.join(spec["root"], "tok"))
  mesh = make_mesh(fsdp=-1)
  model = ax.from_pretrained(os.path.join(spec["root"], "base"), mesh=mesh)
  options = dict(output_dir=out, max_steps=2, learning_rate=3e-2, lr_scheduler_type="constant",
                 per_device_train_batch_size=4, num_generations=4, max_completion_length=6,
                 stop_token_ids=[], logging_steps=1, save_steps=1, disable_tqdm=True, seed=0)
  options.update(spec.get("training", {}))
  result = grpo(GRPOConfig(**options), model=model, reward_funcs=[even_fraction],
                tokenizer=tokenizer, train_dataset=PROMPTS, mesh=mesh)
  with open(os.path.join(out, f"done-{process}.json"), "w") as f:
    json.dump({"process_count": jax.process_count(), "history": result.history}, f)
  distributed.shutdown()


if __name__ == "__main__":
  os.environ["JAX_PLATFORMS"] = "cpu"
  # The parent (pytest) forces 8 host devices through XLA_FLAGS; the spec decides here.
  os.environ.pop("XLA_FLAGS", None)
  main(json.loads(sys.argv[1]))
