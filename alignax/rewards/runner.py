r"""Running reward sources over a batch of completions: TRL's contract, plus timeouts.

Every source, reward function or reward model, is called as in TRL's ``GRPOTrainer``::

  f(prompts=[N], completions=[N], completion_ids=[N], **columns,   # each column [N]
    trainer_state=..., log_extra=..., log_metric=...) -> list[float | None]

The batch is laid out ``[P, G]``: ``prompts`` and every dataset column hold ``P`` entries, one per
prompt, and ``completions`` holds ``N = P·G`` entries, prompt-major (prompt ``p``'s generations are
``p·G … p·G + G − 1``); the runner repeats each prompt and column value ``G`` times, so a function
sees one entry per completion. When the prompts are conversational (message lists), a completion
given as text reaches the functions as ``[{"role": "assistant", "content": text}]``.

What the sources return becomes a ``[N, S]`` matrix with NaN where a source returned None ("does not
score this sample"); the reward is TRL's weighted ``nansum`` over the sources, so a None drops only
that source's term, and a sample that every source skipped gets reward 0, is flagged in
``all_none`` and counted, with an :class:`AllRewardsNoneWarning`.

``async def`` sources are awaited concurrently (``asyncio.gather``) on one event loop that the
runner keeps on a background thread for its whole life, so async clients bound to a loop (HTTP
sessions, sandboxes) survive from step to step, and a runner works inside Jupyter's own running
loop.
Synchronous functions run one after another in the calling thread, as in TRL.

Timeouts (TRL has none): with ``timeout`` set, each call of a reward *function* gets that many
seconds. A coroutine is cancelled (``asyncio.wait``); a synchronous function runs in a daemon
thread that is abandoned when it overruns (Python cannot stop a thread; it finishes or dies with
the process). ``on_timeout="error"`` raises :class:`RewardTimeoutError`; ``on_timeout="none"``
scores the whole call as None, drops what it logged (``log_extra`` / ``log_metric``), and counts
it in ``rewards/{name}/timeouts``. An ``async def`` that blocks the loop (``time.sleep`` instead of
``await asyncio.sleep``) cannot be cancelled: when the async calls of a batch are still not done
at twice the timeout (at least one second more), the runner abandons that loop to finish on its
own, starts a fresh one for the next batch, and treats every async call of the batch as timed
out. Reward models and ensembles (jitted alignax code, whose first call compiles) are not timed.
"""

import asyncio
import concurrent.futures
import dataclasses
import importlib
import inspect
import math
import os
import sys
import threading
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from alignax import _validate
from alignax.rewards import builtins
from alignax.rewards.contract import (
  RewardFunctionError,
  RewardTimeoutError,
  check_rewards,
  completion_text,
  is_async_source,
  is_conversational,
  reward_name,
  source_label,
)

ON_TIMEOUT = ("error", "none")

# Built-in names accepted by `--reward_funcs`. The soft overlong penalty needs its two lengths;
# `get_soft_overlong_punishment` is TRL's CLI name for the same function.
BUILTIN_REWARDS = ("accuracy_reward", "think_format_reward", "soft_overlong_punishment",
                   "get_soft_overlong_punishment")

# Keywords the runner passes itself; a dataset column with one of these names would collide.
RESERVED_KWARGS = ("prompts", "completions", "completion_ids", "trainer_state", "log_extra",
                   "log_metric")
# Row fields TRL leaves out of the keyword arguments (they arrive as prompts / completions).
_DROPPED_COLUMNS = ("prompt", "completion")


_TIMED_OUT = object()


class AllRewardsNoneWarning(UserWarning):
  """Every reward source returned None for some sample, so its reward is 0 (TRL's ``nansum``)."""


def resolve_reward_funcs(
  specs: Sequence[Any],
  *,
  max_completion_len: int | None = None,
  soft_punish_cache: int | None = None,
) -> list[Callable[..., Any]]:
  """Turns ``--reward_funcs`` entries into callables.

  Each entry is a callable (kept), a built-in name (:data:`BUILTIN_REWARDS`), or a dotted path
  ``module.function`` (``my_rewards.length_reward``, ``pkg.sub.fn``) imported with the current
  working directory on ``sys.path``, so a ``my_rewards.py`` next to the command is found, as in
  TRL's CLI.

  Args:
    specs: the entries.
    max_completion_len: the completion budget for ``soft_overlong_punishment`` (tokens).
    soft_punish_cache: its ramp length (tokens).

  Returns:
    One callable per entry.

  Raises:
    ValueError: an entry that is neither a built-in nor a dotted path, a module or attribute that
      cannot be imported (the import error is chained), an attribute that is not callable, or
      ``soft_overlong_punishment`` without its two lengths.
  """
  funcs = []
  for i, spec in enumerate(specs):
    if callable(spec):
      funcs.append(spec)
    elif not isinstance(spec, str):
      raise ValueError(f"reward_funcs[{i}] must be a name or a callable, got {spec!r}")
    elif spec in ("soft_overlong_punishment", "get_soft_overlong_punishment"):
      if max_completion_len is None or soft_punish_cache is None:
        raise ValueError(
          f"reward_funcs[{i}]={spec!r} needs max_completion_len and soft_punish_cache (tokens), "
          f"got max_completion_len={max_completion_len}, soft_punish_cache={soft_punish_cache}"
        )
      funcs.append(builtins.soft_overlong_punishment(
        max_completion_len=max_completion_len, soft_punish_cache=soft_punish_cache))
    elif spec in BUILTIN_REWARDS:
      funcs.append(getattr(builtins, spec))
    elif "." in spec:
      funcs.append(_import_function(i, spec))
    else:
      raise ValueError(
        f"reward_funcs[{i}]={spec!r} is neither a built-in ({', '.join(BUILTIN_REWARDS)}) nor a "
        "dotted path 'module.function'"
      )
  return funcs


def _import_function(index: int, spec: str) -> Callable[..., Any]:
  module_name, _, attribute = spec.rpartition(".")
  cwd = os.getcwd()
  if cwd not in sys.path:
    sys.path.insert(0, cwd)
  try:
    module = importlib.import_module(module_name)
  except ImportError as e:
    raise ValueError(
      f"reward_funcs[{index}]={spec!r}: cannot import module {module_name!r} (searched the working "
      f"directory {cwd!r} and sys.path): {e}"
    ) from e
  if not hasattr(module, attribute):
    raise ValueError(f"reward_funcs[{index}]={spec!r}: module {module_name!r} has no {attribute!r}")
  func = getattr(module, attribute)
  if not callable(func):
    raise ValueError(
      f"reward_funcs[{index}]={spec!r} is a {type(func).__name__}, not a callable"
    )
  return func


@dataclasses.dataclass(frozen=True)
class RewardOutput:
  """The rewards of one batch.

  Attributes:
    rewards: ``[N]`` float32, the weighted ``nansum`` over the sources.
    per_source: ``[N, S]`` float32, each source's rewards, NaN where it returned None.
    names: ``S`` source names, the ``{name}`` of ``rewards/{name}/mean``.
    all_none: ``[N]`` bool, samples no source scored (their reward is 0).
    metrics: ``rewards/{name}/mean`` and ``/std`` (NaN-aware, Bessel-corrected as TRL's
      ``nanstd``; NaN when a source scored fewer than 1 / 2 samples), ``rewards/{name}/timeouts``
      with ``on_timeout="none"``, ``rewards/all_none_count``, and the mean of each value the
      sources passed to ``log_metric``.
    extra_columns: what the sources passed to ``log_extra``, per column (for the completions table).
  """

  rewards: np.ndarray
  per_source: np.ndarray
  names: tuple[str, ...]
  all_none: np.ndarray
  metrics: dict[str, float]
  extra_columns: dict[str, list[Any]]


def _nanstd(values: np.ndarray) -> float:
  finite = values[~np.isnan(values)]
  if finite.size < 2:
    return math.nan
  return float(np.std(finite, ddof=1))


class _Log:
  """The ``log_extra`` / ``log_metric`` callbacks of one call of one source.

  Each call logs into its own buffer; the runner merges the buffers of the calls that returned, in
  source order, so concurrent async sources cannot interleave a column, and a call that timed out
  leaves nothing behind: what it logged before the timeout is discarded with its rewards, and an
  abandoned thread that finishes later writes into a buffer nobody reads (``closed``).
  """

  def __init__(self):
    self._lock = threading.Lock()
    self.closed = False
    self.extra: dict[str, list[Any]] = {}
    self.metrics: dict[str, list[float]] = {}

  def log_extra(self, column: str, values: Any) -> None:
    with self._lock:
      if not self.closed:
        self.extra.setdefault(column, []).extend(values)

  def log_metric(self, name: str, value: Any) -> None:
    with self._lock:
      if not self.closed:
        self.metrics.setdefault(name, []).append(float(value))

  def close(self) -> None:
    with self._lock:
      self.closed = True


class RewardRunner:
  """Scores completions with reward functions and reward models, and combines them.

  Args:
    sources: reward functions (TRL's contract; ``def`` or ``async def``), reward models
      (:class:`~alignax.rewards.RewardModelScorer`) and ensembles
      (:class:`~alignax.rewards.RewardEnsemble`), or ``--reward_funcs`` strings
      (see :func:`resolve_reward_funcs`).
    weights: ``reward_weights``, one per source (default 1 each).
    names: logging names overriding each source's own (see
      :func:`~alignax.rewards.contract.reward_name`); names must be unique.
    timeout: seconds per call of a reward function (None: no limit).
    on_timeout: ``"error"`` (raise :class:`RewardTimeoutError`) or ``"none"`` (score the call as
      None for every sample and count it).
    max_completion_len, soft_punish_cache: for a ``soft_overlong_punishment`` string among
      ``sources``.

  Call it with a batch (see :meth:`__call__`); :meth:`close` stops the event loop of the async
  sources (also a context manager).
  """

  def __init__(
    self,
    sources: Sequence[Any] | Any,
    *,
    weights: Sequence[float] | np.ndarray | None = None,
    names: Sequence[str] | None = None,
    timeout: float | None = None,
    on_timeout: str = "error",
    max_completion_len: int | None = None,
    soft_punish_cache: int | None = None,
  ):
    if isinstance(sources, (str, bytes)) or callable(sources):
      sources = [sources]
    if not isinstance(sources, Sequence) or not sources:
      raise ValueError(
        f"sources must be a non-empty list of reward functions or reward models, got {sources!r}"
      )
    self.sources = resolve_reward_funcs(
      list(sources), max_completion_len=max_completion_len, soft_punish_cache=soft_punish_cache
    )
    if names is None:
      names = [reward_name(s) for s in self.sources]
    elif len(names) != len(self.sources):
      raise ValueError(f"names has {len(names)} entries for {len(self.sources)} reward sources")
    duplicates = sorted({n for n in names if list(names).count(n) > 1})
    if duplicates:
      raise ValueError(
        f"reward sources share the names {duplicates}, so their rewards/{{name}} metrics would "
        "collide; pass names=[...] to tell them apart"
      )
    self.names = tuple(names)
    if weights is None:
      weights = [1.0] * len(self.sources)
    if len(weights) != len(self.sources):
      raise ValueError(
        f"reward_weights has {len(weights)} entries for {len(self.sources)} reward sources "
        f"{list(self.names)}"
      )
    for name, weight in zip(self.names, weights):
      if not math.isfinite(float(weight)):
        raise ValueError(f"reward_weights for {name!r} must be finite, got {weight!r}")
    self.weights = np.asarray(weights, np.float64)
    _validate.choice("on_timeout", on_timeout, ON_TIMEOUT)
    if timeout is not None:
      _validate.positive("timeout", timeout)
    self.timeout = timeout
    self.on_timeout = on_timeout
    self._loop: asyncio.AbstractEventLoop | None = None
    self._loop_thread: threading.Thread | None = None

  # --- the event loop of the async sources ---------------------------------------------------

  def _event_loop(self) -> asyncio.AbstractEventLoop:
    if self._loop is None:
      loop = asyncio.new_event_loop()
      thread = threading.Thread(target=loop.run_forever, name="alignax-rewards", daemon=True)
      thread.start()
      self._loop, self._loop_thread = loop, thread
    return self._loop

  def _abandon_event_loop(self) -> None:
    """Leaves a blocked loop to stop once its blocking call returns (its thread is a daemon) and
    lets the next async call start a fresh one."""
    self._loop.call_soon_threadsafe(self._loop.stop)
    self._loop, self._loop_thread = None, None

  def close(self) -> None:
    """Stops the background event loop (a later async call starts a new one)."""
    if self._loop is not None:
      self._loop.call_soon_threadsafe(self._loop.stop)
      self._loop_thread.join()
      self._loop.close()
      self._loop, self._loop_thread = None, None

  def __enter__(self) -> "RewardRunner":
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()

  def __del__(self):
    loop = getattr(self, "_loop", None)
    if loop is not None and not loop.is_closed():
      loop.call_soon_threadsafe(loop.stop)

  # --- scoring -------------------------------------------------------------------------------

  def _timed(self, source: Any) -> bool:
    if self.timeout is None:
      return False
    # Without the models module imported no source can be a reward model (and the runner does
    # not import flax for plain functions).
    models = sys.modules.get("alignax.rewards.models")
    return models is None or not isinstance(
      source, (models.RewardModelScorer, models.RewardEnsemble)
    )

  def _call_sync(self, index: int, source: Any, kwargs: dict[str, Any]) -> Any:
    label = source_label(self.names[index], index)
    if not self._timed(source):
      try:
        output = source(**kwargs)
      except Exception as e:
        raise RewardFunctionError(f"{label} raised {type(e).__name__}: {e}") from e
    else:
      box: dict[str, Any] = {}

      def target():
        try:
          box["output"] = source(**kwargs)
        except BaseException as e:  # handed to the caller's thread below
          box["error"] = e

      thread = threading.Thread(target=target, name=f"reward:{self.names[index]}", daemon=True)
      thread.start()
      thread.join(self.timeout)
      if thread.is_alive():
        return self._timeout(index)
      if "error" in box:
        e = box["error"]
        raise RewardFunctionError(f"{label} raised {type(e).__name__}: {e}") from e
      output = box["output"]
    if inspect.isawaitable(output):
      if inspect.iscoroutine(output):
        output.close()
      raise RewardFunctionError(
        f"{label} returned an awaitable; declare it `async def` so the runner awaits it"
      )
    return output

  def _timeout(self, index: int) -> object:
    """Raises :class:`RewardTimeoutError`, or returns ``_TIMED_OUT`` under ``on_timeout="none"``."""
    if self.on_timeout == "error":
      raise RewardTimeoutError(
        f"{source_label(self.names[index], index)} did not return within timeout={self.timeout}s "
        "(on_timeout='none' scores such a call as None instead)"
      )
    return _TIMED_OUT

  def _call_async(self, calls: list[tuple[int, Any, dict[str, Any]]]) -> dict[int, Any]:
    timeout = self.timeout

    async def one(source: Any, kwargs: dict[str, Any], timed: bool) -> Any:
      if not timed:
        return await source(**kwargs)
      # asyncio.wait, not wait_for: a TimeoutError the function raises itself (an HTTP client's)
      # is its error, not the runner's timeout.
      task = asyncio.ensure_future(source(**kwargs))
      done, _ = await asyncio.wait({task}, timeout=timeout)
      if not done:
        task.cancel()
        return _TIMED_OUT
      return task.result()

    async def gather():
      # return_exceptions: one failing source must not leave the others running unobserved.
      return await asyncio.gather(
        *(one(source, kwargs, self._timed(source)) for _, source, kwargs in calls),
        return_exceptions=True,
      )

    future = asyncio.run_coroutine_threadsafe(gather(), self._event_loop())
    try:
      # The inner waits end every call by `timeout`; only a loop that stays blocked (a synchronous
      # call inside `async def`) keeps the gather past it, so past twice that (at least one
      # second more) it is blocked.
      results = future.result(None if timeout is None else timeout + max(timeout, 1.0))
    except concurrent.futures.TimeoutError:
      future.cancel()
      self._abandon_event_loop()
      names = [self.names[index] for index, _, _ in calls]
      if self.on_timeout == "error":
        raise RewardTimeoutError(
          f"the async reward functions {names} did not return within timeout={timeout}s and "
          "their event loop stayed blocked: one of them blocks it (time.sleep or a synchronous "
          "client inside `async def`), which cannot be cancelled; the runner moved to a fresh "
          "event loop (on_timeout='none' scores such calls as None instead)"
        ) from None
      return {index: _TIMED_OUT for index, _, _ in calls}
    outputs: dict[int, Any] = {}
    for (index, _, _), result in zip(calls, results):
      if result is _TIMED_OUT:
        outputs[index] = self._timeout(index)
      elif isinstance(result, BaseException):
        label = source_label(self.names[index], index)
        raise RewardFunctionError(f"{label} raised {type(result).__name__}: {result}") from result
      else:
        outputs[index] = result
    return outputs

  def __call__(
    self,
    prompts: Sequence[Any],
    completions: Sequence[Any],
    completion_ids: Sequence[Any] | np.ndarray | None = None,
    *,
    columns: Mapping[str, Any] | None = None,
    num_generations: int = 1,
    trainer_state: Any = None,
  ) -> RewardOutput:
    """Scores ``P·G`` completions of ``P`` prompts.

    Args:
      prompts: ``[P]`` prompt texts or conversations (message lists).
      completions: ``[P·G]`` completion texts (or conversational completions), prompt-major.
      completion_ids: ``[P·G]`` token-id lists without padding (from a sampler's ``tokens`` and
        ``lengths``: ``[row[:n] for row, n in zip(tokens, lengths)]``); passed to the sources as is
        (None when not given).
      columns: dataset columns, each ``[P]``; repeated ``G`` times and passed by name. ``prompt``
        and ``completion`` are left out, as in TRL.
      num_generations: ``G``.
      trainer_state: passed to every source as ``trainer_state`` (reward shaping by training
        progress).

    Returns:
      :class:`RewardOutput`.

    Raises:
      ValueError: inconsistent lengths (named), a column named like a reserved keyword, or mixed
        plain and conversational prompts.
      RewardFunctionError: a source raised, returned the wrong number of rewards or a non-number
        (names the source and the completion index).
      RewardTimeoutError: a function overran ``timeout`` with ``on_timeout="error"``.
    """
    _validate.positive_int("num_generations", num_generations)
    n = len(prompts) * num_generations
    if len(completions) != n:
      raise ValueError(
        f"completions has {len(completions)} entries; expected len(prompts) * num_generations = "
        f"{len(prompts)} * {num_generations} = {n}"
      )
    if completion_ids is not None and len(completion_ids) != n:
      raise ValueError(f"completion_ids has {len(completion_ids)} entries for {n} completions")
    columns = dict(columns or {})
    for key in _DROPPED_COLUMNS:
      columns.pop(key, None)
    for key, values in columns.items():
      if key in RESERVED_KWARGS:
        raise ValueError(
          f"dataset column {key!r} collides with the keyword the runner passes under that name; "
          "rename the column"
        )
      if len(values) != len(prompts):
        raise ValueError(
          f"dataset column {key!r} has {len(values)} entries for {len(prompts)} prompts"
        )
    conversational = [is_conversational(p) for p in prompts]
    if any(conversational) and not all(conversational):
      odd = conversational.index(not conversational[0])
      raise ValueError(
        f"prompts[{odd}] is {'a conversation' if conversational[odd] else 'plain text'} but "
        f"prompts[0] is {'a conversation' if conversational[0] else 'plain text'}; do not mix them"
      )
    if conversational and conversational[0]:
      completions = [
        c if is_conversational(c) else [{"role": "assistant", "content": completion_text(c)}]
        for c in completions
      ]
    else:
      completions = list(completions)
    repeated_prompts = [p for p in prompts for _ in range(num_generations)]
    repeated_columns = {k: [v for v in vs for _ in range(num_generations)]
                        for k, vs in columns.items()}
    ids = None if completion_ids is None else [[int(t) for t in row] for row in completion_ids]

    logs = [_Log() for _ in self.sources]

    def kwargs(index: int) -> dict[str, Any]:
      # Fresh lists per source: a function that edits its inputs cannot change another's.
      return dict(
        prompts=list(repeated_prompts), completions=list(completions),
        completion_ids=None if ids is None else [list(row) for row in ids],
        **{k: list(v) for k, v in repeated_columns.items()},
        trainer_state=trainer_state, log_extra=logs[index].log_extra,
        log_metric=logs[index].log_metric,
      )

    outputs: dict[int, Any] = {}
    async_calls = []
    try:
      for index, source in enumerate(self.sources):
        if is_async_source(source):
          async_calls.append((index, source, kwargs(index)))
        else:
          outputs[index] = self._call_sync(index, source, kwargs(index))
      if async_calls:
        outputs.update(self._call_async(async_calls))
    finally:
      # Abandoned threads and cancelled tasks may still call their callbacks: drop those writes.
      for log in logs:
        log.close()

    per_source = np.empty((n, len(self.sources)), np.float64)
    metrics: dict[str, float] = {}
    for index, name in enumerate(self.names):
      output = outputs[index]
      timed_out = output is _TIMED_OUT
      if self.on_timeout == "none" and self._timed(self.sources[index]):
        metrics[f"rewards/{name}/timeouts"] = float(timed_out)
      if timed_out:
        per_source[:, index] = math.nan
      else:  # a function that returned None itself (a missing `return`) is a named error here
        per_source[:, index] = check_rewards(
          output, count=n, label=source_label(name, index)
        )
      column = per_source[:, index]
      scored = ~np.isnan(column)
      metrics[f"rewards/{name}/mean"] = float(np.mean(column[scored])) if scored.any() else math.nan
      metrics[f"rewards/{name}/std"] = _nanstd(column)

    all_none = np.isnan(per_source).all(axis=1)
    metrics["rewards/all_none_count"] = float(all_none.sum())
    if all_none.any():
      row = int(np.argmax(all_none))
      warnings.warn(
        AllRewardsNoneWarning(
          f"all reward sources returned None for {int(all_none.sum())} of {n} completions, whose "
          f"reward is therefore 0; the first is completion {row} (prompt {row // num_generations}: "
          f"{_short(repeated_prompts[row])}, completion: {_short(completions[row])})"
        ),
        stacklevel=2,
      )
    rewards = np.nansum(per_source * self.weights[None, :], axis=1)
    logged_metrics: dict[str, list[float]] = {}
    extra_columns: dict[str, list[Any]] = {}
    for index, log in enumerate(logs):
      if outputs[index] is _TIMED_OUT:
        continue
      for name, values in log.metrics.items():
        logged_metrics.setdefault(name, []).extend(values)
      for column, values in log.extra.items():
        extra_columns.setdefault(column, []).extend(values)
    for name, values in logged_metrics.items():
      metrics[name] = float(np.mean(values))
    return RewardOutput(
      rewards=rewards.astype(np.float32),
      per_source=per_source.astype(np.float32),
      names=self.names,
      all_none=all_none,
      metrics=metrics,
      extra_columns=extra_columns,
    )


def _short(value: Any, limit: int = 80) -> str:
  text = repr(value)
  return text if len(text) <= limit else text[: limit - 3] + "..."


def compute_rewards(
  sources: Sequence[Any] | Any,
  prompts: Sequence[Any],
  completions: Sequence[Any],
  completion_ids: Sequence[Any] | np.ndarray | None = None,
  *,
  columns: Mapping[str, Any] | None = None,
  num_generations: int = 1,
  trainer_state: Any = None,
  weights: Sequence[float] | np.ndarray | None = None,
  names: Sequence[str] | None = None,
  timeout: float | None = None,
  on_timeout: str = "error",
  max_completion_len: int | None = None,
  soft_punish_cache: int | None = None,
) -> RewardOutput:
  """One-shot :class:`RewardRunner` call (builds a runner, scores, closes its event loop).

  The batch arguments are :meth:`RewardRunner.__call__`'s; ``weights``, ``names``, ``timeout``,
  ``on_timeout``, ``max_completion_len`` and ``soft_punish_cache`` are :class:`RewardRunner`'s.
  """
  with RewardRunner(sources, weights=weights, names=names, timeout=timeout,
                    on_timeout=on_timeout, max_completion_len=max_completion_len,
                    soft_punish_cache=soft_punish_cache) as runner:
    return runner(prompts, completions, completion_ids, columns=columns,
                  num_generations=num_generations, trainer_state=trainer_state)

