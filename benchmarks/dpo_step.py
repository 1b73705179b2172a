r"""A DPO training step, alignax beside TRL's ``DPOTrainer``, in one run on CPU (issue 9, Performance).

One parent process builds the inputs once and starts one worker process per framework:

* a ~10M-parameter Llama (d 384, 6 layers, 6 heads, MLP 1024, the tiny tokenizer's 512-token
  vocabulary; then the same with a 32k vocabulary) from a ``transformers.LlamaConfig`` with random
  weights, saved to a temporary directory with ``save_pretrained``, and the offline BPE tokenizer
  (``alignax.build_tiny_tokenizer``) beside it; both frameworks load both from there;
* synthetic preference pairs: a 41-48-token prompt and two 38-47-token completions (+ EOS), about
  90 tokens per sequence, in a JSONL file both frameworks read.

Both train with DPO (sigmoid loss, beta 0.1), batch 8 pairs, ``max_length`` 128, a frozen copy
of the model as the reference, AdamW (lr 1e-6, betas 0.9/0.999, eps 1e-8, no weight decay) on a
linear schedule, gradient clipping at 1.0, fp32 parameters and compute, ``logging_steps`` 10, no
activation recomputation (TRL's ``DPOConfig`` turns ``gradient_checkpointing`` on by default, which
recomputes the forward in the backward; ``--trl_gradient_checkpointing`` keeps that), and the same
padding: each batch padded to a multiple of ``--pad_to_multiple_of`` (32: every batch
here pads to 96 tokens; 0 leaves each framework its default, TRL the batch's longest row, alignax
a power-of-two bucket). alignax runs ``alignax.train.loop.fit`` with ``dpo_objective`` (the engine's
jitted step with buffer donation, exactly as the ``alignax dpo`` trainer runs it); TRL runs
``DPOTrainer.train()``. Each worker pins itself to the same ``--threads`` CPUs
(``os.sched_setaffinity``, which sizes XLA's intra-op pool, and ``torch.set_num_threads``).

Timing. A callback at the end of every optimizer step (``fit``'s ``on_step``, a transformers
``TrainerCallback.on_step_end``) lets the parent drive both workers: start-up, compilation and
``--warmup`` steps first, then ``--rounds`` rounds of ``--steps`` timed steps, alternating alignax,
TRL, alignax, TRL ..., so load from other processes on a shared machine hits both alike. A timed
block covers whole training-loop iterations (data, forward, backward, clipping, optimizer, logging).
Each round also times a 2-thread fp32 matmul, ``[n, n] @ [n, n]`` in a loop, jitted in the alignax
worker (XLA) and ``torch.mm`` in the TRL worker; the larger median of the two is the machine's
matmul rate that model FLOP/s are compared with.

Model FLOPs per step, with N the parameters that multiply activations (attention and MLP
projections and the LM head, not the embedding gather), S = 2·B padded sequences of T tokens,
n_h·d_h the attention width and L layers:

.. math::

   F = \underbrace{6 N S T + 12 L S T^2 n_h d_h}_{\text{policy forward + backward}}
     + \underbrace{2 N S T + 4 L S T^2 n_h d_h}_{\text{reference forward}},

(attention counted at full T, PaLM's convention); the reference forward is a quarter of it, and
``--precompute_ref_log_probs`` removes it. ``useful`` figures count non-pad tokens only.

Memory. Each framework runs in its own process. ``peak_rss_mib`` is the peak resident set (Linux
``VmHWM``) during the timed steps, its high-water mark reset after warm-up (``/proc/self/clear_refs``),
minus the RSS right after the framework's imports: parameters, reference, optimizer state, data,
the runtime's own resident memory and the step's transient peak, without compilation. It splits
into ``resident_before_steps_mib`` (the RSS after warm-up, freed heap returned with glibc's
``malloc_trim``) and ``step_transient_mib`` (the peak above that during the timed steps). ``peak_rss_with_startup_mib`` keeps the
high-water mark from start-up on (model loading and, for alignax, XLA compilation). For alignax the
compiled step's ``memory_analysis()`` is reported too (PyTorch on CPU has no allocator statistics).

``--precompute_ref_log_probs``: after the side-by-side rounds, the alignax worker times the engine's
step on the same placed batches with the reference forward and reading ``batch["ref_logps"]``
(``[2, B]``, scored once by the reference) instead, interleaved the same way.

Prints one JSON object. TRL is not a dependency of alignax: run this from a benchmark environment::

  python3 -m venv .venv-bench && .venv-bench/bin/pip install -e . torch==2.13.0 trl==1.16.0
  .venv-bench/bin/python benchmarks/dpo_step.py            # full run (several minutes)
  .venv-bench/bin/python benchmarks/dpo_step.py --quick    # smoke run, small model
"""

import argparse
import collections
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

FULL_MODEL = dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=6,
                  num_attention_heads=6, num_key_value_heads=6)
QUICK_MODEL = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                   num_attention_heads=2, num_key_value_heads=2)
# Long enough that the linear schedule never reaches zero while the benchmark runs.
MAX_STEPS = 1_000_000
WORDS = ("the model learns to prefer answers that are helpful honest and kind while the reference "
         "stays fixed so every step moves the policy away from it by a small amount measured in "
         "nats across tokens of chosen and rejected completions with prompts about weather cats "
         "trains rivers music numbers colours gardens books").split()


# ---------------------------------------------------------------------------------------------
# Measurements shared by the workers.

def _status_kib(field: str) -> int:
  with open("/proc/self/status") as f:
    return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1))


def _reset_peak_rss() -> bool:
  """Returns freed heap to the OS (glibc ``malloc_trim``, so start-up leftovers such as the
  compiler's scratch do not count as resident), then resets ``VmHWM`` to the current RSS
  (Linux >= 4.0); False where the kernel refuses."""
  import ctypes

  try:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except (OSError, AttributeError):
    pass
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def _pin_threads(threads: int) -> list[int]:
  cpus = sorted(os.sched_getaffinity(0))[:threads]
  os.sched_setaffinity(0, cpus)
  return cpus


class _Stop(Exception):
  """Raised from ``fit``'s ``on_step`` to end the run when the parent says so."""


class _Channel:
  """JSON lines to the parent on a private copy of stdout; the libraries' prints go to stderr."""

  def __init__(self):
    self._out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = os.fdopen(1, "w", buffering=1)

  def send(self, **message) -> None:
    self._out.write(json.dumps(message) + "\n")

  def receive(self) -> dict:
    line = sys.stdin.readline()
    if not line:
      raise SystemExit("the parent closed the pipe")
    return json.loads(line)


class _Controller:
  """Runs at the end of every optimizer step: counts warm-up, answers the parent's commands
  (``run`` k steps, ``matmul``, ``stop``) and times blocks of steps."""

  def __init__(self, channel: _Channel, *, warmup: int, matmul, baseline_kib: int, started: float):
    self.channel, self.warmup, self.matmul = channel, warmup, matmul
    self.baseline_kib, self.started = baseline_kib, started
    self.steps = 0
    self.remaining = 0
    self.pending = collections.deque()  # (real tokens, padded tokens) of the batches in flight
    self.startup_peak_kib = None
    self.resident_kib = None
    self.block = None

  def record_batch(self, real: int, padded: int) -> None:
    self.pending.append((real, padded))

  def on_step(self) -> bool:
    """Returns True when the run should stop."""
    self.steps += 1
    real, padded = self.pending.popleft() if self.pending else (0, 0)
    if self.steps < self.warmup:
      return False
    if self.steps == self.warmup:
      self.startup_peak_kib = _status_kib("VmHWM")
      reset = _reset_peak_rss()
      self.resident_kib = _status_kib("VmRSS")
      self.channel.send(event="ready", startup_s=time.perf_counter() - self.started,
                        peak_reset=reset)
      return self._serve()
    self.block["real"] += real
    self.block["padded"] += padded
    self.remaining -= 1
    if self.remaining:
      return False
    seconds = time.perf_counter() - self.block["start"]
    self.channel.send(event="block", steps=self.block["steps"], seconds=seconds,
                      real_tokens=self.block["real"], padded_tokens=self.block["padded"])
    return self._serve()

  def _serve(self) -> bool:
    while True:
      message = self.channel.receive()
      if message["cmd"] == "matmul":
        self.channel.send(event="matmul", gflops=self.matmul())
      elif message["cmd"] == "run":
        self.remaining = message["steps"]
        self.block = {"steps": self.remaining, "real": 0, "padded": 0,
                      "start": time.perf_counter()}
        return False
      elif message["cmd"] == "stop":
        return True
      else:
        raise ValueError(f"unknown command {message!r}")

  def memory(self) -> dict:
    peak = _status_kib("VmHWM")
    return {"peak_rss_mib": (peak - self.baseline_kib) / 1024,
            "resident_before_steps_mib": (self.resident_kib - self.baseline_kib) / 1024,
            "step_transient_mib": (peak - self.resident_kib) / 1024,
            "peak_rss_with_startup_mib": (max(peak, self.startup_peak_kib or 0)
                                          - self.baseline_kib) / 1024,
            "baseline_rss_mib": self.baseline_kib / 1024}


# ---------------------------------------------------------------------------------------------
# The alignax worker.

def _alignax_worker(spec: dict, channel: _Channel) -> None:
  started = time.perf_counter()
  cpus = _pin_threads(spec["threads"])
  import functools

  import jax
  import jax.numpy as jnp
  import numpy as np
  import transformers
  from flax import nnx

  import alignax as ax
  from alignax import data
  from alignax.losses.supervised import sequence_logprobs
  from alignax.sharding import make_mesh
  from alignax.train import objectives
  from alignax.train.config import TrainingConfig
  from alignax.train.loop import place_on_mesh, _place_batch, fit
  from alignax.train.optim import make_optimizer
  from alignax.train.step import init_state, make_train_step

  baseline = _status_kib("VmRSS")
  n = spec["matmul_n"]
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32) / n**0.5

  @jax.jit
  def chained_matmuls(x, y):
    return jax.lax.fori_loop(0, spec["matmul_reps"], lambda _, c: c @ y, x)

  jax.block_until_ready(chained_matmuls(a, b))

  def matmul() -> float:
    start = time.perf_counter()
    jax.block_until_ready(chained_matmuls(a, b))
    return spec["matmul_reps"] * 2 * n**3 / (time.perf_counter() - start) / 1e9

  controller = _Controller(channel, warmup=spec["warmup"], matmul=matmul, baseline_kib=baseline,
                           started=started)
  tokenizer = transformers.AutoTokenizer.from_pretrained(spec["tokenizer"])
  data_config = data.DataConfig(max_length=spec["max_length"], seed=spec["seed"],
                                pad_to_multiple_of=spec["pad_to_multiple_of"] or None)
  train = data.prepare_dataset(data.load_rows(spec["data"]), tokenizer, task="preference",
                               config=data_config)

  class Recording:
    """The grain batches, noting each batch's token counts for the controller."""

    def __init__(self, dataset):
      self.dataset = dataset

    def __iter__(self):
      iterator = iter(self.dataset)

      class It:
        def __next__(self):
          batch = next(iterator)
          controller.record_batch(int(np.sum(batch["attention_mask"])),
                                  int(np.prod(batch["input_ids"].shape)))
          return batch

        def get_state(self):
          return iterator.get_state()

        def set_state(self, state):
          iterator.set_state(state)

      return It()

  mesh = make_mesh()
  model = ax.from_pretrained(spec["checkpoint"], mesh=mesh)
  reference = ax.from_pretrained(spec["checkpoint"], mesh=mesh)
  config = TrainingConfig(output_dir=os.path.join(spec["workdir"], "alignax"),
                          learning_rate=spec["learning_rate"],
                          per_device_train_batch_size=spec["batch_size"], max_steps=MAX_STEPS,
                          logging_steps=10, save_steps=MAX_STEPS, lr_scheduler_type="linear",
                          max_grad_norm=1.0, weight_decay=0.0, seed=spec["seed"],
                          disable_tqdm=True)
  batches = Recording(data.make_batches(train, batch_size=spec["batch_size"], config=data_config))

  def on_step(step, metrics):
    if controller.on_step():
      raise _Stop

  try:
    fit(model, functools.partial(objectives.dpo_objective, beta=0.1, loss_type="sigmoid"), batches,
        config, mesh=mesh, reference=reference, on_step=on_step)
  except _Stop:
    pass
  memory = controller.memory()

  # The step fit ran, rebuilt the same way (fit donated the arrays above), for memory_analysis and
  # for the precomputed-reference comparison on fixed placed batches.
  del model, reference
  optimizer, schedule = make_optimizer(spec["learning_rate"], max_steps=MAX_STEPS,
                                       lr_scheduler_type="linear", max_grad_norm=1.0)
  fresh = iter(batches.dataset)
  host = [next(fresh) for _ in range(4)]
  reference = ax.from_pretrained(spec["checkpoint"], mesh=mesh)
  ref_graphdef, ref_state = nnx.split(reference)

  @jax.jit
  def score_reference(state, batch):
    out, mask = objectives._pair_logprobs(nnx.merge(ref_graphdef, state), batch, impl="auto")
    return sequence_logprobs(out.logp, mask)

  precompute_key = getattr(objectives, "REFERENCE_LOGPS_KEY", None)
  with_ref = []
  for batch in host:
    extra = {}
    if precompute_key is not None:
      extra[precompute_key] = np.asarray(score_reference(
        ref_state, {k: jnp.asarray(batch[k]) for k in objectives._SEQUENCE_KEYS}))
    with_ref.append({**batch, **extra})

  def build(precomputed: bool):
    model = ax.from_pretrained(spec["checkpoint"], mesh=mesh)
    graphdef, params, frozen = nnx.split(model, nnx.Param, ...)
    if precomputed:  # no reference model at all, as --precompute_ref_log_probs trains
      objective = objectives.dpo_objective(graphdef, beta=0.1)
      source = with_ref
    else:
      objective = objectives.dpo_objective(graphdef, reference_graphdef=ref_graphdef, beta=0.1)
      frozen = (frozen, ref_state)
      source = host
    state = place_on_mesh(init_state(params, optimizer, frozen=frozen, seed=spec["seed"]), mesh)
    step = jax.jit(make_train_step(objective, optimizer, schedule=schedule), donate_argnums=0)
    placed = [_place_batch({k: v for k, v in b.items()}, mesh, 1, objective.batch_axes)
              for b in source]
    compiled = step.lower(state, placed[0]).compile()
    analysis = compiled.memory_analysis()
    return {"state": state, "step": step, "batches": placed, "memory": analysis}

  def analysis_dict(analysis) -> dict | None:
    if analysis is None:
      return None
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
              "temp_size_in_bytes", "generated_code_size_in_bytes")
    out = {f.replace("_size_in_bytes", "_mib"): getattr(analysis, f) / 2**20 for f in fields}
    out["peak_mib"] = (out["argument_mib"] + out["output_mib"] - out["alias_mib"]
                       + out["temp_mib"])
    return out

  variants = {"reference_forward": build(False)}
  if precompute_key is not None:
    variants["precomputed"] = build(True)

  def run_variant(name: str, steps: int) -> float:
    variant = variants[name]
    start = time.perf_counter()
    for i in range(steps):
      variant["state"], metrics = variant["step"](variant["state"],
                                                  variant["batches"][i % len(variant["batches"])])
      jax.device_get(metrics["loss"])  # fit reads the metrics every step
    return time.perf_counter() - start

  for name in variants:
    run_variant(name, 2)  # the first call of the jitted function (compiled above) and one more
  channel.send(event="stopped", memory=memory,
               step_memory_analysis=analysis_dict(variants["reference_forward"]["memory"]),
               precomputed_memory_analysis=(analysis_dict(variants["precomputed"]["memory"])
                                            if "precomputed" in variants else None),
               precompute_supported=precompute_key is not None, cpus=cpus,
               versions={"jax": jax.__version__, "alignax": getattr(ax, "__version__", "?")},
               padded_length=int(host[0]["input_ids"].shape[-1]))
  while True:
    message = channel.receive()
    if message["cmd"] == "variant":
      seconds = run_variant(message["name"], message["steps"])
      channel.send(event="variant", name=message["name"], steps=message["steps"], seconds=seconds)
    elif message["cmd"] == "exit":
      return


# ---------------------------------------------------------------------------------------------
# The TRL worker.

def _trl_worker(spec: dict, channel: _Channel) -> None:
  started = time.perf_counter()
  cpus = _pin_threads(spec["threads"])
  import torch

  torch.set_num_threads(spec["threads"])
  import datasets
  import transformers
  import trl

  baseline = _status_kib("VmRSS")
  n = spec["matmul_n"]
  generator = torch.Generator().manual_seed(0)
  a = torch.randn(n, n, generator=generator)
  b = torch.randn(n, n, generator=generator) / n**0.5

  def chained_matmuls():
    c = a
    for _ in range(spec["matmul_reps"]):
      c = torch.mm(c, b)
    return c

  chained_matmuls()

  def matmul() -> float:
    start = time.perf_counter()
    chained_matmuls()
    return spec["matmul_reps"] * 2 * n**3 / (time.perf_counter() - start) / 1e9

  controller = _Controller(channel, warmup=spec["warmup"], matmul=matmul, baseline_kib=baseline,
                           started=started)
  tokenizer = transformers.AutoTokenizer.from_pretrained(spec["tokenizer"])
  model = transformers.AutoModelForCausalLM.from_pretrained(spec["checkpoint"],
                                                            dtype=torch.float32)
  with open(spec["data"]) as f:
    rows = [json.loads(line) for line in f]
  args = trl.DPOConfig(
    output_dir=os.path.join(spec["workdir"], "trl"), per_device_train_batch_size=spec["batch_size"],
    max_length=spec["max_length"], beta=0.1, loss_type=["sigmoid"],
    learning_rate=spec["learning_rate"], lr_scheduler_type="linear", max_steps=MAX_STEPS,
    weight_decay=0.0, max_grad_norm=1.0, logging_steps=10, save_strategy="no", report_to="none",
    use_cpu=True, bf16=False, fp16=False, seed=spec["seed"], disable_tqdm=True,
    dataloader_num_workers=0, pad_to_multiple_of=spec["pad_to_multiple_of"] or None,
    gradient_checkpointing=spec["trl_gradient_checkpointing"],
  )

  class Steps(transformers.TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
      if controller.on_step():
        control.should_training_stop = True

  trainer = trl.DPOTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                           processing_class=tokenizer, callbacks=[Steps()])
  collate = trainer.data_collator

  def recording_collate(examples):
    batch = collate(examples)
    controller.record_batch(int(batch["attention_mask"].sum()), int(batch["input_ids"].numel()))
    return batch

  trainer.data_collator = recording_collate
  trainer.train()
  channel.send(event="stopped", memory=controller.memory(), cpus=cpus,
               torch_threads=torch.get_num_threads(),
               optimizer=type(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer")
                              else trainer.optimizer).__name__,
               attention=model.config._attn_implementation,
               versions={"torch": torch.__version__, "trl": trl.__version__,
                         "transformers": transformers.__version__})
  channel.receive()


# ---------------------------------------------------------------------------------------------
# The parent: inputs, the interleaved schedule, the figures.

def _make_rows(tokenizer, count: int, seed: int) -> list[dict]:
  import random

  rng = random.Random(seed)

  def text(lo: int, hi: int, lead: str) -> str:
    # Words split at spaces before BPE, so a text's token count is the sum of its words'; a word
    # that would pass `hi` is skipped, so every pair fits the 96-token bucket (with EOS).
    target, words, tokens = rng.randint(lo, hi), [], 0
    while tokens < target:
      word = (" " if words or lead else "") + rng.choice(WORDS)
      count = len(tokenizer("".join(words + [word]), add_special_tokens=False)["input_ids"])
      if count <= hi:
        words, tokens = words + [word], count
    return "".join(words)

  return [{"prompt": text(41, 48, ""), "chosen": text(38, 47, " "),
           "rejected": text(38, 47, " ")} for _ in range(count)]


def _build_inputs(root: str, model_shape: dict, vocab_sizes: list[int], seed: int) -> dict:
  import torch
  import transformers

  import alignax as ax

  tokenizer = ax.build_tiny_tokenizer(os.path.join(root, "tokenizer"))
  rows = _make_rows(tokenizer, 256, seed)
  data_path = os.path.join(root, "pairs.jsonl")
  with open(data_path, "w") as f:
    f.writelines(json.dumps(row) + "\n" for row in rows)
  lengths = [len(tokenizer(r["prompt"] + r[side])["input_ids"]) + 1 for r in rows
             for side in ("chosen", "rejected")]
  checkpoints = {}
  for vocab in vocab_sizes:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
      vocab_size=vocab, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False,
      pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
      eos_token_id=tokenizer.eos_token_id, **model_shape)
    path = os.path.join(root, f"llama_v{vocab}")
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    checkpoints[vocab] = path
  return {"tokenizer": os.path.join(root, "tokenizer"), "data": data_path,
          "checkpoints": checkpoints, "sequence_tokens": {
            "min": min(lengths), "mean": statistics.mean(lengths), "max": max(lengths)}}


def _matmul_params(model_shape: dict, vocab: int) -> int:
  d, layers = model_shape["hidden_size"], model_shape["num_hidden_layers"]
  head_dim = d // model_shape["num_attention_heads"]
  attention = d * head_dim * (2 * model_shape["num_attention_heads"]
                              + 2 * model_shape["num_key_value_heads"])
  mlp = 3 * d * model_shape["intermediate_size"]
  return layers * (attention + mlp) + vocab * d


def _step_flops(model_shape: dict, vocab: int, *, sequences: int, length: int,
                reference: bool = True) -> float:
  n = _matmul_params(model_shape, vocab)
  tokens = sequences * length
  attention = (model_shape["num_hidden_layers"] * tokens * length * model_shape["hidden_size"])
  policy = 6 * n * tokens + 12 * attention
  return policy + (2 * n * tokens + 4 * attention if reference else 0)


class _Worker:
  def __init__(self, name: str, spec: dict, log_path: str):
    self.name, self.log_path = name, log_path
    self.log = open(log_path, "w")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "JAX_PLATFORMS": "cpu",
           "WANDB_DISABLED": "true"}
    env.pop("XLA_FLAGS", None)  # no fake devices: one CPU device, as a user's run has
    self.process = subprocess.Popen(
      [sys.executable, os.path.abspath(__file__), "--worker", name, "--spec", json.dumps(spec)],
      stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True, env=env)

  def send(self, **message) -> None:
    self.process.stdin.write(json.dumps(message) + "\n")
    self.process.stdin.flush()

  def receive(self, event: str) -> dict:
    line = self.process.stdout.readline()
    if not line:
      self.process.wait()
      with open(self.log_path) as f:
        tail = f.read()[-6000:]
      raise RuntimeError(f"the {self.name} worker exited ({self.process.returncode}) before "
                         f"sending {event!r}; its stderr ends:\n{tail}")
    message = json.loads(line)
    if message.get("event") != event:
      raise RuntimeError(f"{self.name} worker: expected {event!r}, got {message!r}")
    return message

  def close(self) -> None:
    try:
      self.process.wait(timeout=60)
    except subprocess.TimeoutExpired:
      self.process.kill()
    self.log.close()


def _summary(blocks: list[dict], flops_per_padded_token: float) -> dict:
  rates = [b["steps"] / b["seconds"] for b in blocks]
  steps = sum(b["steps"] for b in blocks)
  seconds = sum(b["seconds"] for b in blocks)
  padded = sum(b["padded_tokens"] for b in blocks)
  real = sum(b["real_tokens"] for b in blocks)
  model_flops = flops_per_padded_token * padded / seconds
  return {"steps_per_s": statistics.median(rates), "steps_per_s_min": min(rates),
          "steps_per_s_max": max(rates), "timed_steps": steps,
          "tokens_per_s": real / seconds, "padded_tokens_per_s": padded / seconds,
          "padded_length": padded / steps / (2 * blocks[0]["pairs"]),
          "model_gflops": model_flops / 1e9,
          "useful_gflops": flops_per_padded_token * real / seconds / 1e9}


def _side_by_side(args, inputs: dict, vocab: int, root: str, shape: dict) -> dict:
  spec = {"checkpoint": inputs["checkpoints"][vocab], "tokenizer": inputs["tokenizer"],
          "data": inputs["data"], "threads": args.threads, "warmup": args.warmup,
          "batch_size": args.batch_size, "max_length": args.max_length,
          "pad_to_multiple_of": args.pad_to_multiple_of, "learning_rate": 1e-6, "seed": args.seed,
          "matmul_n": args.matmul_n, "matmul_reps": args.matmul_reps,
          "trl_gradient_checkpointing": args.trl_gradient_checkpointing}
  load_before = os.getloadavg()
  workers = {}
  for name in ("alignax", "trl"):
    workdir = os.path.join(root, f"run_{name}_v{vocab}")
    os.makedirs(workdir)
    workers[name] = _Worker(name, {**spec, "workdir": workdir},
                            os.path.join(root, f"{name}_v{vocab}.log"))
  try:
    ready = {name: w.receive("ready") for name, w in workers.items()}
    blocks = {name: [] for name in workers}
    matmul = {name: [] for name in workers}
    order = list(workers)
    for round_index in range(args.rounds):
      # Alternate which framework goes first, so neither always follows the other.
      for name in order if round_index % 2 == 0 else order[::-1]:
        workers[name].send(cmd="run", steps=args.steps)
        blocks[name].append({**workers[name].receive("block"), "pairs": args.batch_size})
        workers[name].send(cmd="matmul")
        matmul[name].append(workers[name].receive("matmul")["gflops"])
    for w in workers.values():
      w.send(cmd="stop")
    stopped = {name: w.receive("stopped") for name, w in workers.items()}
    workers["trl"].send(cmd="exit")

    precompute = None
    if args.precompute_ref_log_probs and stopped["alignax"]["precompute_supported"]:
      times = {"reference_forward": [], "precomputed": []}
      for round_index in range(args.rounds):
        names = list(times) if round_index % 2 == 0 else list(times)[::-1]
        for name in names:
          workers["alignax"].send(cmd="variant", name=name, steps=args.steps)
          reply = workers["alignax"].receive("variant")
          times[name].append(reply["steps"] / reply["seconds"])
      precompute = {name: {"steps_per_s": statistics.median(rates), "min": min(rates),
                           "max": max(rates)} for name, rates in times.items()}
      length = stopped["alignax"]["padded_length"]
      sequences = 2 * args.batch_size
      full = _step_flops(shape, vocab, sequences=sequences, length=length)
      without = _step_flops(shape, vocab, sequences=sequences, length=length, reference=False)
      precompute["speedup"] = (precompute["precomputed"]["steps_per_s"]
                               / precompute["reference_forward"]["steps_per_s"])
      precompute["flops_ratio"] = full / without
      precompute["what"] = ("the engine's jitted step alone (no data pipeline), on 4 placed "
                            "batches, with the frozen-copy reference forward vs reading "
                            "batch['ref_logps'] [2, B] and holding no reference model")
      precompute["memory_analysis"] = stopped["alignax"]["precomputed_memory_analysis"]
    elif args.precompute_ref_log_probs:
      precompute = {"skipped": "alignax.train.objectives has no REFERENCE_LOGPS_KEY: the "
                               "precomputed reference log-probs have not landed in this tree"}
    workers["alignax"].send(cmd="exit")
  finally:
    for w in workers.values():
      w.close()

  result = {}
  for name in workers:
    length = blocks[name][0]["padded_tokens"] / blocks[name][0]["steps"] / (2 * args.batch_size)
    flops = _step_flops(shape, vocab, sequences=2 * args.batch_size, length=round(length))
    per_token = flops / (2 * args.batch_size * round(length))
    entry = _summary(blocks[name], per_token)
    entry["model_gflop_per_step"] = flops / 1e9
    entry["startup_s"] = ready[name]["startup_s"]
    entry.update(stopped[name]["memory"])
    entry["peak_rss_reset_after_warmup"] = ready[name]["peak_reset"]
    for key in ("step_memory_analysis", "optimizer", "attention", "torch_threads", "cpus",
                "versions"):
      if key in stopped[name]:
        entry[key] = stopped[name][key]
    result[name] = entry
  result["matmul_gflops"] = {"xla": matmul["alignax"], "torch": matmul["trl"]}
  # Each round's blocks ran back to back, so their ratio is the least disturbed by outside load.
  paired = [(a["steps"] / a["seconds"]) / (t["steps"] / t["seconds"])
            for a, t in zip(blocks["alignax"], blocks["trl"])]
  result["alignax_over_trl"] = {
    "steps_per_s": result["alignax"]["steps_per_s"] / result["trl"]["steps_per_s"],
    "steps_per_s_paired_median": statistics.median(paired),
    "steps_per_s_paired": paired,
    "peak_rss": result["alignax"]["peak_rss_mib"] / result["trl"]["peak_rss_mib"]}
  result["load_average_1min"] = {"before": load_before[0], "after": os.getloadavg()[0]}
  result["params"] = {"matmul_N": _matmul_params(shape, vocab),
                      "total": _matmul_params(shape, vocab) + vocab * shape["hidden_size"]}
  if precompute is not None:
    result["precompute_ref_log_probs"] = precompute
  return result


def _parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true",
                      help="smoke run: a 2-layer d-128 model, vocabularies 512 and 4096, 2 rounds")
  parser.add_argument("--vocab_sizes", default=None,
                      help="comma-separated model vocabularies (default 512,32000)")
  parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 6)")
  parser.add_argument("--steps", type=int, default=None, help="timed steps per block (default 5)")
  parser.add_argument("--warmup", type=int, default=None,
                      help="untimed steps before timing, compilation included (default 3)")
  parser.add_argument("--batch_size", type=int, default=8, help="preference pairs per step")
  parser.add_argument("--max_length", type=int, default=128)
  parser.add_argument("--pad_to_multiple_of", type=int, default=32,
                      help="pad every batch to a multiple of this in both frameworks; 0 = each "
                           "framework's default")
  parser.add_argument("--threads", type=int, default=2)
  parser.add_argument("--trl_gradient_checkpointing", action="store_true",
                      help="keep TRL's DPOConfig default gradient_checkpointing=True (a forward "
                           "recomputed in the backward); off by default, as alignax remats "
                           "nothing unless asked")
  parser.add_argument("--matmul_n", type=int, default=None, help="matmul size (default 2048)")
  parser.add_argument("--matmul_reps", type=int, default=4)
  parser.add_argument("--no_precompute_ref_log_probs", dest="precompute_ref_log_probs",
                      action="store_false", help="skip the precomputed-reference comparison")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--keep", default=None,
                      help="build the checkpoints and keep them and the workers' logs in this "
                           "directory (default: a temporary one, removed at the end)")
  parser.add_argument("--worker", choices=["alignax", "trl"], help=argparse.SUPPRESS)
  parser.add_argument("--spec", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  defaults = ({"vocab_sizes": "512,4096", "rounds": 2, "steps": 2, "warmup": 2, "matmul_n": 1024}
              if args.quick else
              {"vocab_sizes": "512,32000", "rounds": 6, "steps": 5, "warmup": 3,
               "matmul_n": 2048})
  for key, value in defaults.items():
    if getattr(args, key) is None:
      setattr(args, key, value)
  for key in ("rounds", "steps", "warmup", "batch_size", "max_length", "threads", "matmul_n",
              "matmul_reps"):
    if getattr(args, key) < 1:
      parser.error(f"--{key} must be >= 1, got {getattr(args, key)}")
  if args.pad_to_multiple_of < 0:
    parser.error(f"--pad_to_multiple_of must be >= 0, got {args.pad_to_multiple_of}")
  return args


def main(argv=None) -> None:
  args = _parse_args(argv)
  if args.worker:
    channel = _Channel()
    {"alignax": _alignax_worker, "trl": _trl_worker}[args.worker](json.loads(args.spec), channel)
    return
  try:
    import trl  # noqa: F401
  except ImportError:
    sys.exit("TRL is not installed in this environment. It is not an alignax dependency: create "
             "the benchmark environment with\n  python3 -m venv .venv-bench && "
             ".venv-bench/bin/pip install -e . torch==2.13.0 trl==1.16.0\nand run "
             ".venv-bench/bin/python benchmarks/dpo_step.py")
  shape = QUICK_MODEL if args.quick else FULL_MODEL
  vocab_sizes = [int(v) for v in args.vocab_sizes.split(",")]
  root = args.keep or tempfile.mkdtemp(prefix="dpo_step_")
  os.makedirs(root, exist_ok=True)
  inputs = _build_inputs(root, shape, vocab_sizes, args.seed)
  report = {"settings": {
    "model": {**shape, "vocab_sizes": vocab_sizes}, "batch_pairs": args.batch_size,
    "max_length": args.max_length, "pad_to_multiple_of": args.pad_to_multiple_of,
    "sequence_tokens": inputs["sequence_tokens"], "threads": args.threads, "rounds": args.rounds,
    "steps_per_block": args.steps, "warmup_steps": args.warmup, "dtype": "float32",
    "loss": "DPO sigmoid, beta 0.1, frozen-copy reference",
    "trl_gradient_checkpointing": args.trl_gradient_checkpointing, "alignax_remat": None,
    "optimizer": "AdamW lr 1e-6 linear schedule, clip 1.0, no weight decay",
    "matmul": f"[{args.matmul_n}, {args.matmul_n}] @ [{args.matmul_n}, {args.matmul_n}] x "
              f"{args.matmul_reps}", "machine": platform.processor() or platform.machine(),
    "cpu_count": os.cpu_count()}}
  # The 32k case only compares memory and speed; the precompute comparison runs on the first.
  for i, vocab in enumerate(vocab_sizes):
    run_args = argparse.Namespace(**{**vars(args), "precompute_ref_log_probs":
                                     args.precompute_ref_log_probs and i == 0})
    report[f"vocab_{vocab}"] = _side_by_side(run_args, inputs, vocab, root, shape)
  every = [g for key in report if key.startswith("vocab_")
           for side in ("xla", "torch") for g in report[key]["matmul_gflops"][side]]
  xla = [g for key in report if key.startswith("vocab_") for g in report[key]["matmul_gflops"]["xla"]]
  torch_rates = [g for key in report if key.startswith("vocab_")
                 for g in report[key]["matmul_gflops"]["torch"]]
  reference = max(statistics.median(xla), statistics.median(torch_rates))
  report["matmul"] = {"xla_median_gflops": statistics.median(xla),
                      "torch_median_gflops": statistics.median(torch_rates),
                      "reference_gflops": reference, "samples": len(every)}
  for key in [k for k in report if k.startswith("vocab_")]:
    for name in ("alignax", "trl"):
      report[key][name]["fraction_of_matmul"] = report[key][name]["model_gflops"] / reference
  if args.keep:
    report["logs"] = root
  else:
    shutil.rmtree(root, ignore_errors=True)
  print(json.dumps(report, indent=2))


if __name__ == "__main__":
  main()
