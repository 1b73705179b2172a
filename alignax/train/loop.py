"""The host loop every trainer runs: placement on the mesh, the jitted step, logging, checkpoints,
exact resume, the NaN guard and the final export. An algorithm contributes only its ``Objective``
(``alignax.train.objectives``) and its batches (``alignax.data``); adding one never touches this loop.

Resume is exact: a checkpoint holds the parameters, the optimizer state, the step, the RNG key,
the data iterator's position and the logged history, so a resumed run sees the same batches and
logs the same per-step losses as an uninterrupted one (bitwise on CPU), even after a SIGKILL.

Multi-host (after ``alignax.distributed.initialize``): every process runs ``fit`` with the same
arguments and its own share of the batch (``make_batches(..., process_index=, process_count=)``);
the global batch is assembled on the mesh, metrics are global, checkpoints are collective and
process 0 alone writes ``metrics.jsonl``, ``trainer_state.json`` and ``run_config.json``. The final
export is collective too (``save_pretrained`` gathers each tensor; process 0 writes).
"""

import dataclasses
import json
import math
import os
import platform
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from alignax.train.checkpoint import Checkpointer, resolve_resume
from alignax.train.config import TrainingConfig
from alignax.train.logger import TRAINER_STATE_FILE, MetricsLogger
from alignax.train.optim import OptimizerOptions
from alignax.train.step import (Objective, TrainState, check_finite, init_state, make_train_step,
                                split_micro_batches)

RUN_CONFIG_FILE = "run_config.json"


@dataclasses.dataclass
class FitResult:
  """What ``fit`` leaves behind: the trained model (updated in place) and the logged history."""

  model: nnx.Module
  state: TrainState
  history: list[dict[str, Any]]


def data_parallel_size(mesh: jax.sharding.Mesh) -> int:
  """Devices that hold different rows of the batch (the ``data`` and ``fsdp`` axes)."""
  return int(np.prod([mesh.shape.get(a, 1) for a in ("data", "fsdp")]))


def _versions() -> dict[str, str]:
  import flax
  import optax
  import orbax.checkpoint
  import transformers

  return {"python": platform.python_version(), "jax": jax.__version__, "flax": flax.__version__,
          "optax": optax.__version__, "orbax-checkpoint": orbax.checkpoint.__version__,
          "transformers": transformers.__version__}


def write_run_config(config: TrainingConfig, mesh: jax.sharding.Mesh,
                     extra: dict[str, Any] | None = None) -> str:
  """``run_config.json``: the resolved configuration, library versions and the mesh."""
  record = {"config": config.to_dict(), **(extra or {}), "versions": _versions(),
            "mesh": {name: int(size) for name, size in mesh.shape.items()},
            "devices": [str(d) for d in jax.devices()], "process_count": jax.process_count()}
  path = os.path.join(config.output_dir, RUN_CONFIG_FILE)
  if jax.process_index() == 0:
    os.makedirs(config.output_dir, exist_ok=True)
    with open(path, "w") as f:
      json.dump(record, f, indent=2, default=str)
  return path


def _place_batch(batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh, accumulation: int,
                 batch_axes: dict[str, int] | None = None) -> dict[str, jax.Array]:
  """Host arrays with ``B_host`` rows on their row axis -> global ``[k, ..., B_global/k, ...]``
  arrays, the rows split over the data-parallel axes."""
  batch_axes = batch_axes or {}
  micro = split_micro_batches({k: np.asarray(v) for k, v in batch.items()}, accumulation,
                              batch_axes=batch_axes)

  def sharding(name, x):
    spec = [None] * x.ndim
    spec[batch_axes.get(name, 0) + 1] = ("data", "fsdp")
    return NamedSharding(mesh, PartitionSpec(*spec))

  return {k: jax.make_array_from_process_local_data(sharding(k, v), v) for k, v in micro.items()}


def fit(model: nnx.Module, objective_fn: Callable[[nnx.GraphDef], Objective],
        batches: Any, config: TrainingConfig, *, mesh: jax.sharding.Mesh,
        steps_per_epoch: int | None = None, trainable: Any = nnx.Param,
        reference: nnx.Module | None = None,
        tokenizer: Any = None, export: Callable[[nnx.Module, str], None] | None = None,
        eval_fn: Callable[[nnx.Module], dict[str, float]] | None = None,
        on_step: Callable[[int, dict[str, float]], None] | None = None) -> FitResult:
  """Trains ``model`` in place and writes a TRL-style ``output_dir``.

  Args:
    model: the policy, already on ``mesh`` (``from_pretrained(..., mesh=mesh)``).
    objective_fn: ``graphdef -> Objective`` (e.g. ``functools.partial(sft_objective, ...)``).
    batches: an iterable whose iterator yields host batches (dicts of ``[B_host, ...]`` arrays,
      ``B_host`` = per-device batch × data-parallel devices on this host × accumulation) and has
      ``get_state()``/``set_state()`` (a grain iterator, from ``alignax.data.make_batches``).
    config: the run's options.
    mesh: the device mesh (``alignax.make_mesh``).
    steps_per_epoch: optimizer steps per epoch, to turn ``num_train_epochs`` into ``max_steps``.
    trainable: an nnx filter of the parameters to train (``alignax.LoRAParam`` for LoRA).
    reference: a frozen reference model (a separate copy, e.g. for DPO); its weights ride in the
      step's frozen argument and ``objective_fn`` is called with ``reference_graphdef=``.
    tokenizer: saved beside the final model (by process 0).
    export: ``(model, output_dir) -> None`` writes the final model (default ``save_pretrained``).
      It is called on every process, as ``save_pretrained`` must be in a multi-host run (it
      gathers sharded tensors collectively); files should be written by process 0 only.
    eval_fn: ``model -> metrics`` run every ``eval_steps`` (logged with an ``eval_`` prefix,
      except keys that already start with ``eval/``, as the generation evaluation's do).
    on_step: called after every step with its metrics (tests use it to stop a run on purpose).

  Returns:
    A ``FitResult``.

  Raises:
    NonFiniteError: a NaN/Inf loss or gradient (the step and the metric are named; the run stops
      before saving the bad state).
  """
  max_steps = config.max_steps
  if max_steps == -1:
    if steps_per_epoch is None:
      raise ValueError("max_steps=-1 needs steps_per_epoch to derive the steps from "
                       "num_train_epochs")
    max_steps = max(1, math.ceil(config.num_train_epochs * steps_per_epoch))
  graphdef, params, frozen = nnx.split(model, trainable, ...)
  if not jax.tree.leaves(params):
    raise ValueError(f"trainable={trainable!r} selects no parameter of the model")
  objective_options = {}
  if reference is not None:
    reference_graphdef, reference_state = nnx.split(reference)
    frozen = (frozen, reference_state)
    objective_options["reference_graphdef"] = reference_graphdef
  optimizer, schedule = OptimizerOptions.of(config, max_steps).build()
  state = place_on_mesh(init_state(params, optimizer, frozen=frozen, seed=config.seed), mesh)
  objective = objective_fn(graphdef, **objective_options)
  step_fn = jax.jit(_counting_tokens(make_train_step(objective, optimizer, schedule=schedule)),
                    donate_argnums=0)

  main = jax.process_index() == 0
  logger = MetricsLogger(config.output_dir, report_to=config.report_to, run_name=config.run_name,
                         config=config.to_dict(), is_main_process=main,
                         trainer_state={"max_steps": max_steps,
                                        "logging_steps": config.logging_steps,
                                        "eval_steps": config.eval_steps or config.logging_steps,
                                        "save_steps": config.save_steps,
                                        "train_batch_size": config.per_device_train_batch_size,
                                        "num_train_epochs": config.num_train_epochs})
  checkpointer = Checkpointer(config.output_dir, save_total_limit=config.save_total_limit)
  write_run_config(config, mesh, {"max_steps": max_steps})
  iterator: Iterator = iter(batches)

  start = 0
  resume = resolve_resume(config.resume_from_checkpoint, config.output_dir)
  if resume is not None:
    run_dir, start = resume
    state = restore_checkpoint(state, run_dir, start, checkpointer=checkpointer,
                               iterator=iterator, logger=logger)

  from tqdm.auto import tqdm

  progress = tqdm(total=max_steps, initial=start, disable=config.disable_tqdm or not main,
                  desc="train", dynamic_ncols=True)
  tokens_seen = int(logger.state.num_input_tokens_seen)
  window_start, window_tokens = time.perf_counter(), 0
  window: dict[str, float] = {}
  window_steps = 0
  interrupt = _StopRequest()
  try:
    interrupt.install()
    for step in range(start + 1, max_steps + 1):
      try:
        host_batch = next(iterator)
      except StopIteration:
        raise ValueError(f"the training data ran out before step {step} of max_steps={max_steps}; "
                         "make the batches repeat (num_epochs=None) or lower max_steps") from None
      batch = _place_batch(host_batch, mesh, config.gradient_accumulation_steps,
                           objective.batch_axes)
      state, metrics = step_fn(state, batch)
      metrics = jax.device_get(metrics)
      # Counted on the global batch: hosts hold different numbers of real tokens.
      tokens = int(metrics.pop(_BATCH_TOKENS))
      metrics = {k: float(v) for k, v in metrics.items()}
      check_finite(step, {k: metrics[k] for k in ("loss", "grad_norm")})
      tokens_seen += tokens
      window_tokens += tokens
      for name, value in metrics.items():
        window[name] = window.get(name, 0.0) + value
      window_steps += 1
      progress.update(1)
      progress.set_postfix(_progress_metrics(metrics))
      if on_step is not None:
        on_step(step, metrics)
      stopping = interrupt.requested
      if step % config.logging_steps == 0 or step == max_steps or stopping:
        # As transformers and TRL log: each metric's mean over the steps since the last line;
        # the learning rate and gradient norm are the latest step's.
        logged = {name: total / window_steps for name, total in window.items()}
        logged.update({name: metrics[name] for name in _LATEST if name in metrics})
        elapsed = time.perf_counter() - window_start
        logged["num_tokens"] = tokens_seen
        logged["train_tokens_per_second"] = window_tokens / max(elapsed, 1e-9)
        logger.update_state(num_input_tokens_seen=tokens_seen)
        epoch = step / steps_per_epoch if steps_per_epoch else None
        logger.log(step, logged, epoch=epoch)
        window_start, window_tokens = time.perf_counter(), 0
        window, window_steps = {}, 0
      eval_every = config.eval_steps or config.logging_steps
      if eval_fn is not None and (step % eval_every == 0 or step == max_steps):
        _sync(model, reference, state)
        logger.log(step, {k if k.startswith("eval/") else f"eval_{k}": v
                          for k, v in eval_fn(model).items()})
      if step % config.save_steps == 0 or step == max_steps or stopping:
        logger.update_state(num_input_tokens_seen=tokens_seen)
        checkpointer.save(step, _checkpointed(state), data_state=iterator.get_state(),
                          trainer_state=logger.state_json())
      if stopping:
        raise KeyboardInterrupt(f"stopped after step {step}; {checkpointer.path(step)} holds it "
                                "(--resume_from_checkpoint true continues)")
  finally:
    progress.close()
    try:
      checkpointer.close()  # finishes in-flight saves: the last good checkpoint is complete
    finally:
      interrupt.uninstall()  # after the wait: a first Ctrl-C in it must not break orbax's threads
    logger.save_state()
    logger.close()

  _sync(model, reference, state)
  (export or default_export(tokenizer))(model, config.output_dir)
  return FitResult(model=model, state=state, history=list(logger.state.log_history))


_BATCH_TOKENS = "_batch_tokens"
# Logged as the latest step's value, not the window's mean (transformers' Trainer does the same).
_LATEST = ("learning_rate", "grad_norm")
# The progress bar's metrics, those a run has: the loss, then each algorithm's headline numbers.
_PROGRESS = ("loss", "rewards/margins", "rewards/accuracies", "accuracy", "mean_token_accuracy",
             "kl", "learning_rate")


def _progress_metrics(metrics: dict[str, float]) -> dict[str, str]:
  return {name.split("/")[-1]: (f"{metrics[name]:.2e}" if name == "learning_rate"
                                else f"{metrics[name]:.4f}")
          for name in _PROGRESS if name in metrics}


class _StopRequest:
  """Ctrl-C as a request to stop between steps: the step under way finishes, a checkpoint of it
  is saved and in-flight saves complete, then ``KeyboardInterrupt`` is raised. An interrupt that
  lands inside orbax's save threads instead can leave them running at exit (a crash, and no
  checkpoint of the last steps). A second Ctrl-C interrupts at once.

  Only a single-process run on the main thread with Python's default handler installs it: in a
  multi-host run one process stopping alone would leave the others waiting in a collective.
  """

  def __init__(self):
    self.requested = False
    self._previous = None

  def install(self) -> None:
    if (jax.process_count() != 1 or threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
      return
    self._previous = signal.signal(signal.SIGINT, self._handle)

  def _handle(self, signum, frame) -> None:
    if self.requested:  # the second Ctrl-C: stop now
      signal.signal(signal.SIGINT, signal.default_int_handler)
      raise KeyboardInterrupt
    self.requested = True
    print("\ninterrupt: stopping after this step and saving a checkpoint (Ctrl-C again to stop "
          "at once)", file=sys.stderr, flush=True)

  def uninstall(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGINT, self._previous)
      self._previous = None


def _counting_tokens(step: Callable[[TrainState, Any], tuple[TrainState, dict[str, jax.Array]]]
                     ) -> Callable[[TrainState, Any], tuple[TrainState, dict[str, jax.Array]]]:
  """Adds the global batch's real-token count (its ``attention_mask`` sum) to the step's outputs."""

  def counted(state: TrainState, batch: Any) -> tuple[TrainState, dict[str, jax.Array]]:
    state, metrics = step(state, batch)
    return state, {**metrics, _BATCH_TOKENS: jnp.sum(batch["attention_mask"], dtype=jnp.int32)}

  return counted


def restore_checkpoint(state: TrainState, run_dir: str, step: int, *, checkpointer: Checkpointer,
                       iterator: Any, logger: MetricsLogger) -> TrainState:
  """``state`` with ``run_dir/checkpoint-{step}``'s step, parameters, optimizer state and RNG; the
  data iterator and the logged history restored in place. ``checkpointer`` is this run's (reused
  when ``run_dir`` is its own output directory)."""
  saved = Checkpointer(run_dir) if run_dir != checkpointer.output_dir else checkpointer
  restored = saved.restore(step, jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), _checkpointed(state)))
  state = state._replace(step=restored.state.step, params=restored.state.params,
                         opt_state=restored.state.opt_state, rng=restored.state.rng)
  iterator.set_state(restored.data_state)
  state_file = os.path.join(saved.path(step), TRAINER_STATE_FILE)
  if restored.trainer_state is not None:
    logger.restore_history(restored.trainer_state)
  elif os.path.exists(state_file):
    logger.restore_history(state_file)
  if saved is not checkpointer:
    saved.close()
  return state


def _sync(model: nnx.Module, reference: nnx.Module | None, state: TrainState) -> None:
  """Points the model (and reference) at the state's arrays: the step donates its input, so the
  arrays the modules held before it, frozen ones included, no longer exist."""
  frozen = state.frozen
  if reference is not None:
    frozen, reference_state = frozen
    nnx.update(reference, reference_state)
  nnx.update(model, state.params, frozen)


def place_on_mesh(tree: Any, mesh: jax.sharding.Mesh) -> Any:
  """Every array on ``mesh``: those already there keep their layout (parameters, Adam moments),
  the rest (step counters, the RNG key) are replicated, so one jitted step takes them all."""
  replicated = NamedSharding(mesh, PartitionSpec())

  def place(x):
    sharding = getattr(x, "sharding", None)
    if isinstance(sharding, NamedSharding) and sharding.mesh == mesh:
      return x
    return jax.device_put(x, replicated)

  return jax.tree.map(place, tree)


def _checkpointed(state: TrainState) -> TrainState:
  """What a checkpoint holds: everything but the frozen weights (they come from the base model)."""
  return state._replace(frozen=None)


def default_export(tokenizer: Any) -> Callable[[nnx.Module, str], None]:
  def export(model: nnx.Module, output_dir: str) -> None:
    from alignax.models import save_pretrained

    save_pretrained(model, output_dir)  # collective: every process gathers, process 0 writes
    if tokenizer is not None and jax.process_index() == 0:
      tokenizer.save_pretrained(output_dir)

  return export
