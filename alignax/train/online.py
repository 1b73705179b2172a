"""What the online trainers (GRPO, PPO) share: the host loop of rounds (:func:`run_rounds`),
placing a host-built generation batch on the mesh, the no-gradient log-probs of stored completions,
the sampler's per-round key, the prompt data and its position budget, and the completions written
to ``output_dir/completions/``.

The rollout of an online trainer is built on the host in NumPy (rewards come from Python
functions); these helpers move it onto the engine's mesh with rows over ``(data, fsdp)`` and back.

An online run is a sequence of *rounds*: one rollout (sample, score, store the old log-probs),
then ``updates_per_round`` optimizer steps on it (GRPO's ``num_iterations``; PPO's epochs ×
minibatches). :func:`run_rounds` is the loop around them that every online trainer shares, as
``alignax.train.loop.fit`` is for the offline ones: progress bar, ``num_tokens``, timing, metrics
averaged over the logging window, completions, checkpoints at round boundaries, exact resume,
Ctrl-C, the in-training evaluation and the final export. A trainer supplies two callables, the
rollout and the update (and optionally a third, the evaluation).

Multi-host: :func:`run_rounds` writes from process 0 and checkpoints collectively; a rollout
moves its host data between hosts with :func:`gather_rows` (each host's rows, concatenated in
process order, on every host), :func:`gather_objects` (JSON values: texts, metric dicts) and
:func:`fetch` (a global array, whole, on every host), and places a batch every host holds whole
with ``place_micro_batches(..., global_batch=True)``.
"""

import dataclasses
import functools
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from alignax import _validate
from alignax.train.step import TrainState

logger = logging.getLogger("alignax.train")

COMPLETIONS_DIR = "completions"
# Folded into the state's RNG for the sampler's keys: a stream apart from dropout's.
SAMPLER_STREAM = 0x5A3


def completion_logprobs(model: nnx.Module, batch: dict[str, Any], *, temperature: float = 1.0,
                        impl: str = "auto"):
  """Per-token log-probs and entropy of a batch's next tokens under ``softmax(logits / T)``.

  ``alignax.train.objectives.model_logprobs`` with the sampling temperature (TRL divides the
  training logits by it, so the ratio compares the distribution the sampler drew from).

  Returns:
    ``(TokenLogprobs over [B, L], loss mask [B, L])``.
  """
  from alignax.kernels import token_logprobs
  from alignax.losses.supervised import next_token_targets

  targets, loss_mask = next_token_targets(batch["input_ids"], batch["attention_mask"],
                                          completion_mask=batch["completion_mask"])
  hidden = model(batch["input_ids"], batch["attention_mask"], compute_logits=False).hidden_states
  out = token_logprobs(hidden, model.get_lm_head(), targets, mask=loss_mask,
                       temperature=temperature, impl=impl)
  return out, loss_mask


def shard_rows(batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
  """Host arrays (one host) as global arrays whose rows are split over ``(data, fsdp)``."""
  def place(x):
    spec = PartitionSpec(("data", "fsdp"), *([None] * (x.ndim - 1)))
    return jax.make_array_from_process_local_data(NamedSharding(mesh, spec), np.asarray(x))

  return {k: place(v) for k, v in batch.items()}


def place_micro_batches(batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh,
                         accumulation: int, *, global_batch: bool = False
                         ) -> dict[str, jax.Array]:
  """``[B, ...]`` host arrays -> ``[k, B/k, ...]`` global arrays, rows over ``(data, fsdp)``.

  ``global_batch=False``: each host passes its own block of rows (``B`` is this host's share);
  ``True``: every host passes the whole batch, the same on each, and keeps the rows its devices
  hold (so the micro-batches are those of a one-host run of the same batch).
  """
  from alignax.train.step import split_micro_batches

  micro = split_micro_batches(batch, accumulation)

  def place(x):
    spec = PartitionSpec(None, ("data", "fsdp"), *([None] * (x.ndim - 2)))
    return jax.make_array_from_process_local_data(NamedSharding(mesh, spec), x,
                                                  x.shape if global_batch else None)

  return {k: place(v) for k, v in micro.items()}


def gather_rows(tree: Any) -> Any:
  """Each host's arrays (a pytree of ``[n, ...]`` NumPy arrays, the same shapes on every host)
  concatenated along their first axis in process order: the rows of every host, on every host.
  A collective (every process calls it, in the same order); a one-host run gets ``tree`` back."""
  if jax.process_count() == 1:
    return tree
  from jax.experimental import multihost_utils

  return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


def fetch(tree: Any) -> Any:
  """A pytree of arrays as NumPy on this host, whole: arrays with shards on other hosts are
  gathered (one ``process_allgather`` for the tree, a collective every process must call)."""
  leaves = jax.tree.leaves(tree)
  if all(not isinstance(x, jax.Array) or x.is_fully_addressable for x in leaves):
    return jax.tree.map(np.asarray, jax.device_get(tree))
  from jax.experimental import multihost_utils

  return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


def gather_objects(value: Any) -> list[Any]:
  """Every host's ``value`` (JSON-serialisable), in process order, on every host: two small
  collectives (the payload lengths, then the padded payloads). A one-host run gets ``[value]``."""
  if jax.process_count() == 1:
    return [value]
  from jax.experimental import multihost_utils

  payload = np.frombuffer(json.dumps(value).encode(), np.uint8)
  lengths = np.asarray(multihost_utils.process_allgather(np.asarray([payload.size], np.int64)))
  lengths = lengths.reshape(-1)
  padded = np.zeros(int(lengths.max()), np.uint8)
  padded[:payload.size] = payload
  gathered = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(lengths), -1)
  return [json.loads(bytes(row[:n]).decode()) for row, n in zip(gathered, lengths)]


def to_token_positions(per_completion: np.ndarray, prompt_length: int, total: int) -> np.ndarray:
  """``[N, M]`` values of completion tokens -> ``[N, L]`` in next-token alignment: token ``j`` of a
  completion sits at position ``prompt_length + j`` and is scored at the position before it."""
  out = np.zeros((per_completion.shape[0], total), per_completion.dtype)
  out[:, prompt_length - 1:prompt_length - 1 + per_completion.shape[1]] = per_completion
  return out


def as_text(x: Any) -> str:
  """A prompt or completion as logged text (conversations as JSON)."""
  return x if isinstance(x, str) else json.dumps(x)


def sampler_key(state: TrainState, round_index: int) -> jax.Array:
  """The sampler's key of a round, derived from the checkpointed RNG: a resumed run replays it."""
  key = jax.random.wrap_key_data(jax.device_get(state.rng))
  return jax.random.fold_in(jax.random.fold_in(key, SAMPLER_STREAM), round_index)


def check_prompt_budget(dataset: Any, *, max_completion_length: int, limit: int) -> None:
  """Names the first prompt whose length plus ``max_completion_length`` exceeds the position budget."""
  for index, example in enumerate(dataset.examples):
    length = len(example["prompt_ids"])
    if length + max_completion_length > limit:
      raise ValueError(
        f"prompt {index} has {length} tokens; with max_completion_length={max_completion_length} "
        f"that is {length + max_completion_length} positions, more than the model's "
        f"max_position_embeddings={limit}; set DataConfig.max_prompt_length (at most "
        f"{limit - max_completion_length}) or lower max_completion_length")


def prompt_dataset(train_dataset: Any, data: Any, tokenizer: Any, *, trainer: str = "grpo") -> Any:
  """The prompts of an online trainer as a prepared ``task="prompt"`` dataset (rows, a prepared
  dataset, or ``data``'s files)."""
  from alignax.data import DataConfig, PreparedDataset, load_dataset, load_rows, prepare_dataset

  if isinstance(train_dataset, PreparedDataset):
    dataset = train_dataset
  elif train_dataset is not None:
    dataset = prepare_dataset(load_rows(list(train_dataset)), tokenizer, task="prompt",
                              config=data or DataConfig())
  elif data is not None:
    dataset = load_dataset(data, tokenizer, task="prompt")
  else:
    raise ValueError(f"{trainer} needs prompts: pass train_dataset (rows with a 'prompt' column, or a "
                     "PreparedDataset of task 'prompt') or data=DataConfig(dataset_name=...)")
  if dataset.task != "prompt":
    raise ValueError(f"{trainer} trains on 'prompt' data, got a {dataset.task!r} dataset")
  return dataset


@functools.partial(jax.jit, static_argnames=("graphdef", "temperature", "adapters_off"))
def stored_logprobs(graphdef: nnx.GraphDef, states: tuple, batch: dict[str, jax.Array], *,
                     temperature: float, adapters_off: bool = False) -> jax.Array:
  """Log-probs ``[B, L]`` of a batch's completion tokens (0 elsewhere), no gradient: the old and
  reference log-probs of a rollout. Jitted at module level, so runs with the same model structure
  and shapes share the compiled program."""
  from alignax.models.lora import lora_disabled

  model = nnx.merge(graphdef, *states)
  if adapters_off:
    model = lora_disabled(model)
  out, mask = completion_logprobs(model, batch, temperature=temperature)
  return jnp.where(mask, out.logp, 0.0)


@functools.partial(jax.jit, static_argnames=("graphdef", "temperature", "adapters_off"))
def micro_batched_logprobs(graphdef: nnx.GraphDef, states: tuple, batch: dict[str, jax.Array], *,
                           temperature: float, adapters_off: bool = False) -> jax.Array:
  """:func:`stored_logprobs` of a batch laid out as training takes it, ``[k, B/k, L]`` (from
  :func:`place_micro_batches`), one micro-batch after another (``lax.map``): the forward's
  activations are a micro-batch's, as in the training step, not the whole generation batch's.

  Returns:
    ``[k, B/k, L]`` log-probs (0 off the completion tokens).
  """
  from alignax.models.lora import lora_disabled

  def one(micro_batch):
    model = nnx.merge(graphdef, *states)
    if adapters_off:
      model = lora_disabled(model)
    out, mask = completion_logprobs(model, micro_batch, temperature=temperature)
    return jnp.where(mask, out.logp, 0.0)

  keys = ("input_ids", "attention_mask", "completion_mask")
  return jax.lax.map(one, {k: batch[k] for k in keys})


def write_completions(output_dir: str, step: int, table: Sequence[dict[str, Any]]) -> str:
  """``output_dir/completions/completions_{step:06d}.jsonl``: one row per completion."""
  directory = os.path.join(output_dir, COMPLETIONS_DIR)
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, f"completions_{step:06d}.jsonl")
  with open(path, "w") as f:
    for row in table:
      f.write(json.dumps({"step": step, **row}) + "\n")
  return path



# --- the host loop of rounds --------------------------------------------------------------------


@dataclasses.dataclass
class Round:
  """One round's rollout, as :func:`run_rounds` consumes it.

  Attributes:
    batch: what ``update`` takes (typically the generation batch placed on the mesh as
      ``[gradient_accumulation_steps, rows, ...]`` micro-batches).
    metrics: the round's scalar metrics (rewards, lengths, timings), passed to ``on_step`` with
      each of its updates and counted once per round in the logging window's mean.
    tokens: the round's real tokens (prompt + completion), added to ``num_tokens`` once, however
      many updates reuse them.
    completions: rows written to ``output_dir/completions/completions_{step}.jsonl`` at the
      first logging step that falls in this round (None: nothing to write).
    trainable: False when no update could change the policy (no loss token left, or every
      advantage zero with no KL or entropy term): the round's updates are skipped instead of
      stepping the optimizer with a zero gradient (whose Adam moments, bias correction and
      weight decay would still move), and counted in ``skipped_updates``.
  """

  batch: Any
  metrics: dict[str, float]
  tokens: int
  completions: Sequence[dict[str, Any]] | None = None
  trainable: bool = True


@dataclasses.dataclass
class RoundsResult:
  """What :func:`run_rounds` leaves: the final state and the logged history."""

  state: TrainState
  history: list[dict[str, Any]]


# State, not measurements of a step: logged as the latest value, not the window's mean
# (transformers' Trainer logs learning_rate, grad_norm and epoch so; TRL's PPO its lr, episode and
# kl_coef of the update it logs).
_LATEST = ("learning_rate", "lr", "grad_norm", "num_tokens", "episode", "epoch",
           "objective/kl_coef")
# Summed over the logging window rather than averaged.
_COUNTS = ("skipped_updates",)
# Charged to a round's first update only (the others reuse its generation batch).
_ROUND_ONCE = ("time/rollout",)


def _advance_schedules(opt_state: Any) -> Any:
  """``opt_state`` with every ``optax.ScaleByScheduleState.count`` one step on, the rest as it is:
  a skipped update keeps the learning-rate schedule in step with ``state.step`` while Adam's own
  count (its bias correction) still sees the first real update as its first."""
  import optax

  def is_schedule(node: Any) -> bool:
    return isinstance(node, optax.ScaleByScheduleState)

  def advance(node: Any) -> Any:
    if not is_schedule(node):
      return node
    count = node.count + 1
    if isinstance(node.count, jax.Array):
      count = jax.device_put(count, node.count.sharding)
    return node._replace(count=count)

  return jax.tree.map(advance, opt_state, is_leaf=is_schedule)


def _crosses_save(step: int, *, save_steps: int, updates_per_round: int) -> bool:
  """Whether the round that ends at ``step`` reached a multiple of ``save_steps``: checkpoints go
  at the first round boundary at or after each multiple (a round is never cut)."""
  return step // save_steps > (step - updates_per_round) // save_steps


def run_rounds(config: Any, *, state: TrainState, mesh: jax.sharding.Mesh, iterator: Any,
               rollout: Callable[..., Round],
               update: Callable[[TrainState, Any, int], tuple[TrainState, dict[str, Any]]],
               max_steps: int, updates_per_round: int, algorithm: str,
               run_config: dict[str, Any] | None = None,
               export: Callable[[TrainState], None] | None = None,
               on_step: Callable[[int, dict[str, float]], None] | None = None,
               on_close: Callable[[], None] | None = None,
               host_state: Any = None,
               evaluate: Callable[[TrainState], dict[str, float]] | None = None) -> RoundsResult:
  """Runs an online trainer's rounds: ``max_steps / updates_per_round`` × (one rollout, then
  ``updates_per_round`` optimizer steps on it), and writes a TRL-style ``output_dir``.

  Every optimizer step is one step of ``max_steps``, ``logging_steps`` and ``save_steps``. Per
  step, the update's metrics plus the round's are logged with ``num_tokens`` (cumulative real
  tokens, each round counted once), ``time/train`` (the update), ``time/rollout`` and
  ``step_time`` (the update, plus the rollout on a round's first update). A logged line holds each
  update metric's mean over the steps since the previous line (as ``fit`` and ``transformers``
  log), each round metric's mean over the rounds whose updates fall in that window, each round
  once (TRL appends its reward metrics once per generation); state rather than measurements
  (``learning_rate``, ``lr``, ``grad_norm``, ``num_tokens``, ``episode``, ``epoch``,
  ``objective/kl_coef``) is the latest value, ``skipped_updates`` the window's count. A round's
  completions go to ``output_dir/completions/`` once, at the first logged line in it.

  Checkpoints are taken at round boundaries only (a checkpoint inside a round would need the
  generation batch, which is not saved): at the first boundary at or after every multiple of
  ``save_steps`` (which need not be a multiple of ``updates_per_round``), at ``max_steps``, and
  when a Ctrl-C stops the run. A resumed run (``config.resume_from_checkpoint``) regenerates nothing; the
  rollout's key is derived from the checkpointed RNG and the round index
  (:func:`sampler_key`), so it replays the same trajectory. Ctrl-C (single process, main thread)
  finishes the current round's updates, saves a checkpoint and raises ``KeyboardInterrupt`` (in
  the last round the run is complete: it saves, exports and returns); a second Ctrl-C stops at
  once (``alignax.train.loop.fit``'s mechanism).

  Args:
    config: the run's ``TrainingConfig`` (``output_dir``, ``logging_steps``, ``save_steps``,
      ``save_total_limit``, ``resume_from_checkpoint``, ``report_to``, ``run_name``,
      ``disable_tqdm``; ``log_completions`` when it has one).
    state: the initial train state, on ``mesh``.
    mesh: the device mesh (for ``run_config.json``).
    iterator: the prompt batches, an iterator with ``get_state()``/``set_state()`` (a grain
      iterator from ``alignax.data.make_batches``); one batch is drawn per round.
    rollout: ``rollout(state, prompts, *, key, step) -> Round``: the round's generation batch
      from the policy in ``state``; ``key`` is the round's sampler key and ``step`` the number of
      optimizer steps done before it.
    update: ``update(state, batch, index) -> (state, metrics)``: the ``index``-th
      (``0 <= index < updates_per_round``) optimizer step on the round's ``batch``; metrics may be
      device arrays; ``loss`` and ``grad_norm``, when present, are checked to be finite.
    max_steps: optimizer steps in the run, a multiple of ``updates_per_round``.
    updates_per_round: optimizer steps per rollout.
    algorithm: the progress bar's label and ``run_config.json``'s ``algorithm``.
    run_config: more fields for ``run_config.json``.
    export: ``state -> None``, called once the last step is done (writes the final model).
    on_step: called after every step with its metrics.
    on_close: called when the loop ends, normally or not (closes reward runners).
    host_state: host-side state that a resumed run needs and the train state does not hold (PPO's
      adaptive KL coefficient): an object with ``state_dict() -> dict`` (JSON-serialisable) and
      ``load_state_dict(dict)``, saved in every checkpoint beside the prompt iterator's position
      and loaded on resume.
    evaluate: ``state -> metrics``, the in-training evaluation (e.g. an
      ``alignax.evaluation.trainer_generation_eval`` on the model updated from ``state``), run
      after every ``eval_steps``-th step (``logging_steps`` when unset) and the last, on every
      process (sampling on the mesh is collective); its metrics are logged on a line of their own
      at that step, under their own keys (``eval/reward``, ``eval/win_rate``, ``eval/kl``, ...).

  Returns:
    :class:`RoundsResult`.

  Raises:
    ValueError: ``max_steps`` not a multiple of ``updates_per_round``, a resume
      checkpoint inside a round, or prompts that run out before ``max_steps``.
    alignax.train.step.NonFiniteError: a NaN/Inf loss or gradient norm.
    KeyboardInterrupt: after a Ctrl-C, once the checkpoint is saved.
  """
  from tqdm.auto import tqdm

  from alignax.train.checkpoint import Checkpointer, resolve_resume
  from alignax.train.logger import MetricsLogger
  from alignax.train.loop import _StopRequest, restore_checkpoint, write_run_config
  from alignax.train.step import check_finite

  _validate.positive_int("updates_per_round", updates_per_round)
  _validate.positive_int("max_steps", max_steps)
  _validate.positive_int("save_steps", config.save_steps)
  if max_steps % updates_per_round:
    raise ValueError(
      f"max_steps={max_steps} must be a multiple of the {updates_per_round} optimizer steps per "
      f"generation batch of {algorithm}: every generation batch gets all its updates (round "
      f"max_steps up to {-(-max_steps // updates_per_round) * updates_per_round} or down)")

  main = jax.process_index() == 0
  metrics_logger = MetricsLogger(
    config.output_dir, report_to=config.report_to, run_name=config.run_name,
    config=config.to_dict(), is_main_process=main,
    trainer_state={"max_steps": max_steps, "logging_steps": config.logging_steps,
                   "eval_steps": config.eval_steps or config.logging_steps,
                   "save_steps": config.save_steps,
                   "train_batch_size": config.per_device_train_batch_size,
                   "num_train_epochs": config.num_train_epochs})
  checkpointer = Checkpointer(config.output_dir, save_total_limit=config.save_total_limit)
  write_run_config(config, mesh, {"max_steps": max_steps, "algorithm": algorithm,
                                  **(run_config or {})})

  if host_state is not None:
    iterator = _WithHostState(iterator, host_state)
  step = 0
  interrupt = _StopRequest()
  progress = None
  try:
    resume = resolve_resume(config.resume_from_checkpoint, config.output_dir)
    if resume is not None:
      run_dir, saved_step = resume
      if saved_step % updates_per_round:
        raise ValueError(f"checkpoint-{saved_step} is inside a generation batch "
                         f"({updates_per_round} updates each); resume from a multiple of "
                         f"{updates_per_round}")
      state = restore_checkpoint(state, run_dir, saved_step, checkpointer=checkpointer,
                                 iterator=iterator, logger=metrics_logger)
      step = saved_step
    progress = tqdm(total=max_steps, initial=step, disable=config.disable_tqdm or not main,
                    desc=algorithm, dynamic_ncols=True)
    tokens_seen = int(metrics_logger.state.num_input_tokens_seen)
    window = _Window()
    log_completions = getattr(config, "log_completions", True) and main
    eval_every = config.eval_steps or config.logging_steps
    written_round = None
    interrupt.install()
    while step < max_steps:
      try:
        prompts = next(iterator)
      except StopIteration:
        raise ValueError(f"the prompts ran out before step {step + 1} of max_steps={max_steps}; "
                         "lower max_steps") from None
      round_index = step // updates_per_round
      start = time.perf_counter()
      generated = rollout(state, prompts, key=sampler_key(state, round_index), step=step)
      round_metrics = {k: float(v) for k, v in generated.metrics.items()}
      round_metrics["time/rollout"] = time.perf_counter() - start
      tokens_seen += int(generated.tokens)
      if not generated.trainable:
        logger.info("round %d (steps %d-%d) has nothing to learn from (no loss token, or every "
                    "advantage zero without a KL or entropy term): its %d updates are skipped",
                    round_index, step + 1, step + updates_per_round, updates_per_round)
      for index in range(updates_per_round):
        step += 1
        start = time.perf_counter()
        if generated.trainable:
          state, metrics = update(state, generated.batch, index)
          metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
          check_finite(step, {k: metrics[k] for k in ("loss", "grad_norm") if k in metrics})
        else:
          # The optimizer does not move; the step counter and the learning-rate schedule do, so
          # the step's key and the rate the next update applies are where an update would have
          # left them.
          state = state._replace(step=jax.device_put(state.step + 1, state.step.sharding),
                                 opt_state=_advance_schedules(state.opt_state))
          metrics = {"skipped_updates": 1.0}
        metrics["time/train"] = time.perf_counter() - start
        of_round = {k: v for k, v in round_metrics.items() if k not in _ROUND_ONCE}
        metrics = {k: v for k, v in metrics.items() if k not in of_round}
        if index == 0:
          metrics.update({k: v for k, v in round_metrics.items() if k in _ROUND_ONCE})
        metrics["step_time"] = metrics["time/train"] + metrics.get("time/rollout", 0.0)
        metrics["num_tokens"] = tokens_seen
        window.add(metrics, round_index=round_index, round_metrics=of_round)
        metrics.update(of_round)
        progress.update(1)
        progress.set_postfix({k.split("/")[-1]: f"{metrics[k]:.4f}"
                              for k in ("loss", "reward", "objective/rlhf_reward")
                              if k in metrics})
        if on_step is not None:
          on_step(step, metrics)
        if step % config.logging_steps == 0 or step == max_steps:
          metrics_logger.update_state(num_input_tokens_seen=tokens_seen)
          metrics_logger.log(step, window.flush())
          if log_completions and generated.completions is not None and \
              written_round != round_index:  # a round's completions once, at its first line
            write_completions(config.output_dir, step, generated.completions)
            written_round = round_index
        if evaluate is not None and (step % eval_every == 0 or step == max_steps):
          metrics_logger.log(step, {k: float(v) for k, v in evaluate(state).items()})
      # A Ctrl-C in the last round stops nothing: the run is complete, and exports.
      stopping = interrupt.requested and step < max_steps
      if interrupt.requested and not stopping:
        logger.info("Ctrl-C in the last round: the run is complete at step %d; exporting", step)
      if stopping and window.steps:  # the partial window's line, saved with the checkpoint
        metrics_logger.log(step, window.flush())
      if _crosses_save(step, save_steps=config.save_steps, updates_per_round=updates_per_round) \
          or step == max_steps or stopping:
        metrics_logger.update_state(num_input_tokens_seen=tokens_seen)
        checkpointer.save(step, state._replace(frozen=None), data_state=iterator.get_state(),
                          trainer_state=metrics_logger.state_json())
      if stopping:
        raise KeyboardInterrupt(f"stopped after step {step}; {checkpointer.path(step)} holds it "
                                "(--resume_from_checkpoint true continues)")
  finally:
    if progress is not None:
      progress.close()
    try:
      checkpointer.close()  # finishes in-flight saves: the last good checkpoint is complete
    finally:
      interrupt.uninstall()  # after the wait: a first Ctrl-C in it must not break orbax's threads
      metrics_logger.save_state()
      metrics_logger.close()
      if on_close is not None:
        on_close()

  if export is not None:
    export(state)
  return RoundsResult(state=state, history=list(metrics_logger.state.log_history))


class _WithHostState:
  """The prompt iterator with the trainer's host state riding in its checkpointed state, so
  ``restore_checkpoint`` (which restores the iterator) restores both."""

  def __init__(self, iterator: Any, host_state: Any):
    self.iterator, self.host_state = iterator, host_state

  def __next__(self) -> Any:
    return next(self.iterator)

  def get_state(self) -> dict[str, Any]:
    return {"iterator": self.iterator.get_state(), "host": self.host_state.state_dict()}

  def set_state(self, state: dict[str, Any]) -> None:
    self.iterator.set_state(state["iterator"])
    self.host_state.load_state_dict(state["host"])


class _Window:
  """The metrics of the steps since the last logged line: each metric's mean over the steps that
  reported it (a skipped update reports no loss), a round's own metrics (rewards, lengths) once
  per round whose updates fall in the window however many updates it took (TRL appends them once
  per generation), the latest value of ``_LATEST`` and the sum of ``_COUNTS``."""

  def __init__(self):
    self.totals: dict[str, float] = {}
    self.counts: dict[str, int] = {}
    self.latest: dict[str, float] = {}
    self.rounds: set[int] = set()
    self.steps = 0

  def add(self, metrics: dict[str, float], *, round_index: int | None = None,
          round_metrics: dict[str, float] | None = None) -> None:
    self.steps += 1
    entries = dict(metrics)
    if round_metrics is not None and round_index not in self.rounds:
      self.rounds.add(round_index)
      entries.update(round_metrics)
    for name, value in entries.items():
      self.totals[name] = self.totals.get(name, 0.0) + value
      self.counts[name] = self.counts.get(name, 0) + 1
      self.latest[name] = value

  def flush(self) -> dict[str, float]:
    out = {name: total / self.counts[name] for name, total in self.totals.items()}
    out.update({name: self.latest[name] for name in _LATEST if name in self.latest})
    out.update({name: self.totals[name] for name in _COUNTS if name in self.totals})
    if "skipped_updates" not in out:
      out["skipped_updates"] = 0.0
    self.__init__()
    return out


# Truncated importance sampling over the sampler/trainer log-prob difference (TRL's
# vllm_importance_sampling_* options): how the ratio old/sampler weighs the policy term.
IMPORTANCE_SAMPLING_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


def importance_weights(old_logp: np.ndarray, sampler_logp: np.ndarray, valid: np.ndarray, *,
                       mode: str, cap: float) -> np.ndarray:
  r"""Weights :math:`w` of the policy term for tokens the sampler drew from a distribution slightly
  apart from the trainer's: :math:`\rho = \pi_\text{train}(y) / \pi_\text{sampler}(y)` per token
  (``token_*``) or per sequence (``sequence_*``, the product over the row's tokens), then
  :math:`\min(\rho, C)` (``*_truncate``) or :math:`\rho\,[\rho \le C]` (``*_mask``).

  Args:
    old_logp, sampler_logp: ``[B, L]`` log-probs of the stored tokens under the trainer's forward
      and the sampler.
    valid: ``[B, L]`` the loss's tokens (weights are 0 elsewhere).
    mode: one of :data:`IMPORTANCE_SAMPLING_MODES`.
    cap: :math:`C > 0`.

  Returns:
    ``[B, L]`` float32 weights.
  """
  log_ratio = np.where(valid, old_logp - sampler_logp, 0.0)
  if mode.startswith("sequence"):
    log_ratio = np.broadcast_to(log_ratio.sum(axis=1, keepdims=True), log_ratio.shape)
  ratio = np.exp(np.minimum(log_ratio, 50.0))
  if mode.endswith("truncate"):
    weights = np.minimum(ratio, cap)
  else:  # masking keeps the ratio within the cap and drops the token (or sequence) beyond it
    weights = np.where(ratio <= cap, ratio, 0.0)
  return np.where(valid, weights, 0.0).astype(np.float32)


def importance_metrics(weights: np.ndarray, valid: np.ndarray, *, mode: str) -> dict[str, float]:
  """``sampling/importance_sampling_ratio/{min,mean,max}``: over the loss's tokens, or in a
  ``sequence_*`` mode over its rows, one value each (TRL reduces the ``[B, 1]`` ratios; a
  token-weighted mean would count a long completion's ratio once per token)."""
  if mode.startswith("sequence"):  # every valid token of a row carries the row's weight
    values = np.max(np.where(valid, weights, -np.inf), axis=1)[valid.any(axis=1)]
  else:
    values = weights[valid]
  return {f"sampling/importance_sampling_ratio/{name}": (float(fn(values)) if values.size
                                                           else 0.0)
          for name, fn in (("min", np.min), ("mean", np.mean), ("max", np.max))}

