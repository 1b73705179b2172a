"""Row sources: local JSONL / JSON / Parquet files or directories of them, Hugging Face ``datasets``
saved to disk or named on the hub, and in-memory lists of dicts.

Every row keeps where it came from (file and 0-based row index, plus the line for JSON Lines), so a
bad row is reported as ``data/train.jsonl: row 41 (line 42): field 'chosen': ...`` instead of a
traceback from deep inside tokenisation. A line that is not valid JSON does not stop loading: it
becomes a :class:`Row` carrying its :class:`DataError`, raised or skipped later by the format step
(``skip_invalid``), so every kind of bad row is handled in one place.
"""

import dataclasses
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

# File suffixes read from a directory, in the order a directory listing is merged (by file name).
_JSON_SUFFIXES = (".jsonl", ".json")
_PARQUET_SUFFIXES = (".parquet",)
# Split names recognised in file names, as the `datasets` library's data-files patterns do.
_KNOWN_SPLITS = ("train", "test", "validation", "valid", "dev", "eval")
_IN_MEMORY = "<rows>"


class DataError(ValueError):
  """A bad dataset row (or source), naming the file, the 0-based row index and the field.

  Attributes:
    source: file path, ``"<rows>"`` for in-memory rows, or ``"name[split]"`` for a ``datasets``
      dataset.
    row: 0-based index of the row in ``source`` (None when the whole source is at fault).
    field: the column (with a message index, e.g. ``chosen[1].content``), or None for the row.
    reason: what is wrong.
    kind: a short category used to count skipped rows (``invalid_json``, ``missing_field``,
      ``wrong_type``, ``empty``, ``no_room``, ``bad_messages``, ``unknown_format``, ...).
    line: 1-based line in a JSON Lines file, when known.
  """

  def __init__(
    self,
    reason: str,
    *,
    source: str,
    row: int | None = None,
    field: str | None = None,
    kind: str = "invalid",
    line: int | None = None,
  ):
    self.reason = reason
    self.source = source
    self.row = row
    self.field = field
    self.kind = kind
    self.line = line
    where = str(source)
    if row is not None:
      where += f": row {row}"
      if line is not None:
        where += f" (line {line})"
    if field is not None:
      where += f": field {field!r}"
    super().__init__(f"{where}: {reason}")


@dataclasses.dataclass(frozen=True)
class Row:
  """One dataset row and its origin; ``data`` is None when the row could not be read (``error``)."""

  source: str
  index: int
  data: Mapping[str, Any] | None
  error: DataError | None = None
  line: int | None = None


def _rows_from_records(source: str, records: Iterable[Any]) -> list[Row]:
  rows = []
  for index, record in enumerate(records):
    if isinstance(record, Mapping):
      rows.append(Row(source, index, record))
    else:
      error = DataError(
        f"a row must be an object of columns, got {type(record).__name__}",
        source=source,
        row=index,
        kind="wrong_type",
      )
      rows.append(Row(source, index, None, error))
  return rows


def _read_json_lines(path: Path, text: str) -> list[Row]:
  rows = []
  index = 0
  for line_number, line in enumerate(text.splitlines(), start=1):
    if not line.strip():
      continue  # blank lines (a trailing newline, say) are not rows
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      error = DataError(
        f"invalid JSON: {e.msg} at column {e.colno}",
        source=str(path),
        row=index,
        kind="invalid_json",
        line=line_number,
      )
      rows.append(Row(str(path), index, None, error, line_number))
    else:
      if isinstance(record, Mapping):
        rows.append(Row(str(path), index, record, None, line_number))
      else:
        error = DataError(
          f"a row must be a JSON object, got {type(record).__name__}",
          source=str(path),
          row=index,
          kind="wrong_type",
          line=line_number,
        )
        rows.append(Row(str(path), index, None, error, line_number))
    index += 1
  return rows


def _read_json(path: Path) -> list[Row]:
  text = path.read_text(encoding="utf-8")
  if path.suffix == ".jsonl":
    return _read_json_lines(path, text)
  # A `.json` file is either one JSON document (a list of rows, or a dict of equal-length columns)
  # or JSON Lines under a .json name, which is what `datasets.Dataset.to_json` writes.
  try:
    document = json.loads(text)
  except json.JSONDecodeError as e:
    if e.msg == "Extra data":
      return _read_json_lines(path, text)
    raise DataError(
      f"invalid JSON: {e.msg} at line {e.lineno}, column {e.colno}",
      source=str(path),
      kind="invalid_json",
    ) from None
  if isinstance(document, list):
    return _rows_from_records(str(path), document)
  if isinstance(document, Mapping) and all(isinstance(v, list) for v in document.values()):
    lengths = {k: len(v) for k, v in document.items()}
    if len(set(lengths.values())) > 1:
      raise DataError(
        f"columns have different lengths {lengths}", source=str(path), kind="wrong_type"
      )
    n = next(iter(lengths.values()), 0)
    return _rows_from_records(str(path), ({k: v[i] for k, v in document.items()} for i in range(n)))
  raise DataError(
    "a JSON file must hold a list of row objects or an object of equal-length column lists "
    f"(or one object per line), got {type(document).__name__}",
    source=str(path),
    kind="wrong_type",
  )


def _read_parquet(path: Path) -> list[Row]:
  try:
    import pyarrow.parquet as pq  # noqa: PLC0415 (optional dependency, imported on use)
  except ImportError:
    raise ImportError(
      f"reading {str(path)!r} needs pyarrow: pip install pyarrow (or datasets, which includes it)"
    ) from None
  return _rows_from_records(str(path), pq.read_table(path).to_pylist())


def _read_file(path: Path) -> list[Row]:
  if path.suffix in _JSON_SUFFIXES:
    return _read_json(path)
  if path.suffix in _PARQUET_SUFFIXES:
    return _read_parquet(path)
  raise DataError(
    f"unsupported file type {path.suffix!r}; expected one of "
    f"{list(_JSON_SUFFIXES + _PARQUET_SUFFIXES)}",
    source=str(path),
    kind="unsupported_source",
  )


def _split_names(path: Path, root: Path) -> set[str]:
  """The names a file is filed under: its folders and its name up to the first ``-`` or ``.``
  (``data/train_sft-00000-of-00003.parquet`` -> ``{"data", "train_sft"}``)."""
  relative = path.relative_to(root)
  return {*relative.parent.parts, path.name.split(".")[0].split("-")[0]}


def _split_of(path: Path, root: Path) -> str | None:
  """The split a file belongs to by its name or folder (``train.jsonl``, ``test-00000.parquet``,
  ``validation/part0.json``), or None."""
  parts = [*path.relative_to(root).parent.parts, path.name.split(".")[0]]
  for part in reversed(parts):
    match = re.match(r"^([a-z]+)(?:[-_].*)?$", part.lower())
    if match and match.group(1) in _KNOWN_SPLITS:
      return match.group(1)
  return None


def _is_hidden(relative: Path) -> bool:
  """Files under ``.``- or ``__``-prefixed names (``.ipynb_checkpoints/train-checkpoint.jsonl``,
  ``.cache/``, ``__pycache__``) are not data, as ``datasets`` also skips them: read, they would
  duplicate rows silently."""
  return any(part.startswith((".", "__")) for part in relative.parts)


def _split_files(directory: Path, split: str | None) -> list[Path]:
  suffixes = _JSON_SUFFIXES + _PARQUET_SUFFIXES
  files = sorted(
    p
    for p in directory.rglob("*")
    if p.is_file() and p.suffix in suffixes and not _is_hidden(p.relative_to(directory))
  )
  if not files:
    raise DataError(
      f"no data files ({', '.join(suffixes)}) in the directory",
      source=str(directory),
      kind="unsupported_source",
    )
  if split is not None and split not in _KNOWN_SPLITS:
    # A split that is no keyword is looked up by its exact name (a hub snapshot's
    # data/train_sft-00000-of-00003.parquet for --dataset_train_split train_sft); the keyword
    # match below would read train_sft and train_gen both as "train" and find no "train_sft".
    exact = [p for p in files if split in _split_names(p, directory)]
    if exact:
      return exact
  splits = {p: _split_of(p, directory) for p in files}
  if all(s is None for s in splits.values()):
    # No file is named after a split: the whole directory is the training split.
    if split in (None, "train"):
      return files
    raise DataError(
      f"split {split!r} requested, but no file is named after a split (train*, test*, "
      "validation*, ...); the directory holds only a train split",
      source=str(directory),
      kind="missing_split",
    )
  wanted = split or "train"
  chosen = [p for p, s in splits.items() if s == wanted]
  if not chosen:
    found = sorted({s for s in splits.values() if s is not None})
    raise DataError(
      f"no files for split {wanted!r}; splits found: {found}",
      source=str(directory),
      kind="missing_split",
    )
  return chosen


def _import_datasets(what: str):
  try:
    import datasets  # noqa: PLC0415 (optional dependency, imported on use)
  except ImportError:
    raise ImportError(f"{what} needs the `datasets` package: pip install datasets") from None
  return datasets


def _rows_from_hf(dataset: Any, source: str) -> list[Row]:
  return _rows_from_records(source, iter(dataset))


def _only_train_split(source: Path, split: str | None, what: str) -> None:
  """A single file (or a saved single ``Dataset``) is the train split, as ``datasets`` makes it;
  reading it for another split would silently evaluate on the training rows."""
  if split not in (None, "train"):
    raise DataError(
      f"split {split!r} requested, but {what} holds only a train split; give a directory with "
      "files named after their splits (train.jsonl, test.jsonl, ...)",
      source=str(source),
      kind="missing_split",
    )


def _load_from_disk(directory: Path, split: str | None) -> list[Row]:
  datasets = _import_datasets(f"reading the saved dataset {str(directory)!r}")
  loaded = datasets.load_from_disk(str(directory))
  if isinstance(loaded, datasets.DatasetDict):
    wanted = split or "train"
    if wanted not in loaded:
      raise DataError(
        f"no split {wanted!r}; splits found: {sorted(loaded)}",
        source=str(directory),
        kind="missing_split",
      )
    return _rows_from_hf(loaded[wanted], f"{directory}[{wanted}]")
  _only_train_split(directory, split, "a saved Dataset (not a DatasetDict)")
  return _rows_from_hf(loaded, str(directory))


def _load_from_hub(name: str, config_name: str | None, split: str | None) -> list[Row]:
  datasets = _import_datasets(f"loading the dataset {name!r} from the Hugging Face hub")
  wanted = split or "train"
  try:
    loaded = datasets.load_dataset(name, config_name, split=wanted)
  except datasets.exceptions.DatasetNotFoundError as e:
    raise DataError(
      f"no local file or directory {name!r}, and the hub has no such dataset (or it is "
      f"private): {e}",
      source=name,
      kind="unsupported_source",
    ) from e
  except (ConnectionError, OSError) as e:
    raise DataError(
      f"could not load {name!r} (config {config_name!r}, split {wanted!r}): it is not a local "
      f"file or directory, and the hub did not answer ({type(e).__name__}: {e})",
      source=name,
      kind="unreachable",
    ) from e
  return _rows_from_hf(loaded, f"{name}[{wanted}]")


def _is_saved_hf_dataset(directory: Path) -> bool:
  return (directory / "dataset_dict.json").is_file() or (
    (directory / "state.json").is_file() and (directory / "dataset_info.json").is_file()
  )


def load_rows(
  source: str | os.PathLike[str] | Sequence[Mapping[str, Any]],
  *,
  split: str | None = None,
  config_name: str | None = None,
) -> list[Row]:
  """Reads the rows of a dataset, each tagged with its file and row index.

  Args:
    source: one of
      - a list of dicts (in-memory rows; reported as ``<rows>``);
      - a ``.jsonl`` / ``.json`` / ``.parquet`` file (the train split only);
      - a directory of such files (``.``- and ``__``-prefixed names skipped, as ``datasets``
        does): with files named after splits (``train.jsonl``,
        ``test-00000-of-00001.parquet``, or a ``validation/`` folder) the ``split`` picks them
        and files named after no split are ignored (as ``datasets`` does; a split that is no
        keyword, like ``train_sft``, is matched by its exact name); otherwise every file is the
        train split; files are read in sorted path order;
      - a directory written by ``datasets.Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``;
      - anything else is a hub dataset name, loaded with ``datasets.load_dataset(source,
        config_name, split=split)`` where a network exists.
    split: which split (``--dataset_train_split`` / ``--dataset_test_split``); None means train.
    config_name: the hub dataset's configuration (``--dataset_config``).

  Returns:
    The rows in order. A JSON Lines line that does not parse (or is not an object) becomes a row
    whose ``error`` says so, so that ``skip_invalid`` can skip it like any other bad row.

  Raises:
    DataError: a whole-file problem (a ``.json`` document that does not parse, a missing split,
      a source with no rows, an unreachable hub).
    ImportError: Parquet without ``pyarrow``, a saved or hub dataset without ``datasets``.
  """
  if not isinstance(source, (str, os.PathLike)):
    if isinstance(source, Mapping) or not isinstance(source, Sequence):
      raise TypeError(
        f"source must be a path, a dataset name or a list of dicts, got {type(source).__name__}"
      )
    return _rows_from_records(_IN_MEMORY, source)
  path = Path(source).expanduser()  # a YAML config's "~/data" reaches us unexpanded
  if path.is_file():
    _only_train_split(path, split, "a single file")
    rows = _read_file(path)
  elif path.is_dir():
    if _is_saved_hf_dataset(path):
      rows = _load_from_disk(path, split)
    else:
      rows = [row for file in _split_files(path, split) for row in _read_file(file)]
  else:
    looks_local = str(source).startswith((".", "/", "~")) or path.suffix in (
      _JSON_SUFFIXES + _PARQUET_SUFFIXES
    )
    if looks_local:
      raise FileNotFoundError(f"dataset path {str(source)!r} does not exist")
    rows = _load_from_hub(str(source), config_name, split)
  if not rows:
    # Named here: past this point an empty list no longer knows which source it came from.
    raise DataError("no rows (the source is empty)", source=str(source), kind="empty_dataset")
  return rows
