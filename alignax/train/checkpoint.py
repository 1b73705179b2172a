"""Checkpoints with orbax, laid out as a TRL run's: ``output_dir/checkpoint-N/``.

A checkpoint holds the train state (any pytree of arrays: parameters, optimizer state, step, RNG key
data), the data iterator's state, a small JSON of run metadata and the trainer state (the logged
history), and beside them the ``trainer_state.json`` that ``transformers`` tools read. Saves are
asynchronous and atomic: orbax writes to a temporary directory and renames it when complete, so a
process killed mid-save leaves the previous checkpoints usable and the half-written one invisible
(``latest_step`` never returns it). The trainer state is one of the checkpoint's own items, so every
finished checkpoint has it, even when the process dies before the ``trainer_state.json`` copy
(written once the save is known to have finished) reaches the directory. ``save_total_limit`` keeps
the newest N.

Multi-host: every process calls ``save``/``restore``/``close`` (orbax's saves are collective, each
host writing its own shards); process 0 alone writes ``trainer_state.json``.
"""

import dataclasses
import json
import os
import re
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

PREFIX = "checkpoint-"
TRAINER_STATE_ITEM = "trainer_state"
_NAME = re.compile(rf"^{re.escape(PREFIX)}(0|[1-9]\d*)$")


@dataclasses.dataclass(frozen=True)
class CheckpointNames(ocp.path.step.NameFormat):
  """orbax step names ``checkpoint-N`` (orbax's own standard format writes ``checkpoint_N``)."""

  def build_name(self, step: int) -> str:
    return f"{PREFIX}{step}"

  def _metadata(self, path: epath.Path, step: int | None = None) -> ocp.path.step.Metadata | None:
    match = _NAME.match(path.name)
    if match is None or not ocp.path.step.is_path_finalized(path):
      return None
    found = int(match.group(1))
    if step is not None and found != step:
      return None
    return ocp.path.step.Metadata(step=found, path=path)

  def find_all(self, base_path: epath.PathLike) -> Iterator[ocp.path.step.Metadata]:
    base = epath.Path(base_path)
    if not base.is_dir():
      return iter([])
    paths = [p for p in base.iterdir() if p.name.startswith(PREFIX)]
    return ocp.path.step.build_step_metadatas(paths, self._metadata)

  def find_step(self, base_path: epath.PathLike, step: int) -> ocp.path.step.Metadata:
    metadata = self._metadata(epath.Path(base_path) / self.build_name(step), step)
    if metadata is None:
      raise ValueError(f"no finished checkpoint {self.build_name(step)} under {base_path}")
    return metadata


@dataclasses.dataclass
class Restored:
  """What a checkpoint gives back: the state pytree, the data-iterator state, the metadata and the
  trainer state (``trainer_state.json``'s fields; None for a checkpoint saved without one)."""

  step: int
  state: Any
  data_state: Any
  metadata: dict[str, Any]
  trainer_state: dict[str, Any] | None = None


class Checkpointer:
  """Saves and restores ``checkpoint-N`` directories under ``output_dir``.

  Args:
    output_dir: the run directory.
    save_total_limit: keep at most this many checkpoints (the newest); None keeps all.
    async_save: write in a background thread while training goes on (orbax async checkpointing).
  """

  def __init__(self, output_dir: str | os.PathLike, *, save_total_limit: int | None = None,
               async_save: bool = True):
    if save_total_limit is not None and (isinstance(save_total_limit, bool)
                                         or not isinstance(save_total_limit, int)
                                         or save_total_limit < 1):
      raise ValueError(f"save_total_limit must be a positive int or None, got {save_total_limit!r}")
    self.output_dir = os.path.abspath(os.fspath(output_dir))
    options = ocp.CheckpointManagerOptions(
      max_to_keep=save_total_limit, enable_async_checkpointing=async_save,
      step_name_format=CheckpointNames(), create=True, cleanup_tmp_directories=True,
    )
    self.manager = ocp.CheckpointManager(self.output_dir, options=options)
    self._pending_state_files: dict[int, str] = {}
    self._is_writer = jax.process_index() == 0

  def path(self, step: int) -> str:
    return os.path.join(self.output_dir, f"{PREFIX}{step}")

  def latest_step(self) -> int | None:
    """The newest finished checkpoint's step, or None."""
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, state: Any, *, data_state: Any = None,
           metadata: Mapping[str, Any] | None = None,
           trainer_state: str | None = None) -> None:
    """Starts saving ``state`` (a pytree of arrays) as ``checkpoint-{step}``.

    Args:
      step: the optimizer step the state is at.
      state: parameters, optimizer state, RNG key data, ...: any pytree of (possibly sharded) arrays.
      data_state: the data iterator's state (JSON-serialisable), restored with the state so the
        batches after a resume are the batches the uninterrupted run saw.
      metadata: small JSON-serialisable extras (e.g. the KL controller's coefficient, the epoch).
      trainer_state: the text of ``trainer_state.json`` (a JSON object), taken now so later
        logging does not change it: saved as an item of the checkpoint (what a resume reads) and
        written as ``trainer_state.json`` into the checkpoint directory once the save has finished
        (as ``transformers`` lays checkpoints out).
    """
    self._flush_state_files()
    items = {"state": ocp.args.StandardSave(state),
             "data": ocp.args.JsonSave(data_state if data_state is not None else {}),
             "metadata": ocp.args.JsonSave(dict(metadata or {}))}
    if trainer_state is not None:
      items[TRAINER_STATE_ITEM] = ocp.args.JsonSave(json.loads(trainer_state))
    self.manager.save(step, args=ocp.args.Composite(**items))
    if trainer_state is not None and self._is_writer:
      self._pending_state_files[step] = trainer_state

  def restore(self, step: int | None, abstract_state: Any) -> Restored:
    """Restores ``checkpoint-{step}`` (None: the latest) onto ``abstract_state``'s shapes, dtypes and
    shardings (a pytree of ``jax.ShapeDtypeStruct`` with ``sharding``, or of arrays).

    Raises:
      FileNotFoundError: there is no finished checkpoint (for that step).
    """
    self.wait()
    if step is None:
      step = self.latest_step()
      if step is None:
        raise FileNotFoundError(f"no finished checkpoint-N directory under {self.output_dir}")
    elif step not in self.manager.all_steps():
      raise FileNotFoundError(f"no finished {PREFIX}{step} under {self.output_dir}; available: "
                              f"{self.all_steps()}")
    items = {"state": ocp.args.StandardRestore(abstract_state), "data": ocp.args.JsonRestore(),
             "metadata": ocp.args.JsonRestore()}
    # Checkpoints written before the trainer state became an item have only the file copy.
    has_trainer_state = os.path.isdir(os.path.join(self.path(step), TRAINER_STATE_ITEM))
    if has_trainer_state:
      items[TRAINER_STATE_ITEM] = ocp.args.JsonRestore()
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    trainer_state = dict(restored[TRAINER_STATE_ITEM]) if has_trainer_state else None
    return Restored(step=step, state=restored["state"], data_state=restored["data"],
                    metadata=dict(restored["metadata"]), trainer_state=trainer_state)

  def _flush_state_files(self) -> None:
    """Writes pending ``trainer_state.json`` texts into checkpoints whose save has finished."""
    finished = set(self.manager.all_steps())
    for step, text in list(self._pending_state_files.items()):
      if step in finished and os.path.isdir(self.path(step)):
        with open(os.path.join(self.path(step), "trainer_state.json"), "w") as f:
          f.write(text)
        del self._pending_state_files[step]

  def wait(self) -> None:
    """Blocks until every started save has been written (and renamed into place)."""
    self.manager.wait_until_finished()
    self._flush_state_files()

  def close(self) -> None:
    self.wait()
    self.manager.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def resolve_resume(resume_from_checkpoint: str | bool | None, output_dir: str | os.PathLike
                   ) -> tuple[str, int] | None:
  """TRL's ``--resume_from_checkpoint``: a ``checkpoint-N`` path, or ``true`` for the latest under
  ``output_dir``. Returns ``(run_dir, step)`` or None (start fresh).

  Raises:
    FileNotFoundError: the path is not a finished checkpoint, or ``true`` finds none.
  """
  if resume_from_checkpoint in (None, False, "false", "False", ""):
    return None
  if resume_from_checkpoint in (True, "true", "True"):
    names = CheckpointNames()
    steps = sorted(m.step for m in names.find_all(os.fspath(output_dir)))
    if not steps:
      raise FileNotFoundError(f"resume_from_checkpoint=true but {output_dir} holds no finished "
                              "checkpoint-N directory")
    return os.path.abspath(os.fspath(output_dir)), steps[-1]
  path = os.path.abspath(os.fspath(resume_from_checkpoint))
  if ocp.path.step.TMP_DIR_SUFFIX in os.path.basename(path):
    raise FileNotFoundError(f"{path} is an unfinished checkpoint (its save was interrupted); "
                            "resume from an earlier checkpoint-N or pass true for the latest")
  match = _NAME.match(os.path.basename(path))
  if match is None or not os.path.isdir(path):
    raise FileNotFoundError(f"resume_from_checkpoint={resume_from_checkpoint!r} is not a "
                            "checkpoint-N directory")
  return os.path.dirname(path), int(match.group(1))
