r"""The experiment runner: typed overrides, sweeps, seeds (one compiled program when pure JAX), and
one ``results.json`` schema for every reproduction.

``alignax run experiments/NAME.py --set key=value --sweep key=v1,v2,v3 --seeds N --output_dir DIR``
(``main(argv)`` here, with ``argv`` the arguments after ``run``) loads the module, builds its config
from the defaults and the ``--set`` overrides (parsed by the dataclass field types), measures every
sweep point on every seed, checks the module's pass criteria on the measurements and writes
``DIR/results.json``, the raw measurements ``DIR/measurements.npz`` and the module's PNG plots.

An experiment module defines:

* ``CLAIM``: the paper's claim, in a sentence or two; ``PAPER``: authors, year, title, arXiv id.
* ``Config``: a dataclass whose fields all have defaults. Field types the command line can set:
  ``int``, ``float``, ``bool``, ``str``, ``tuple[T, ...]`` of those (comma-separated values) and
  ``T | None`` (the word ``none``).
* One way to measure a seed:

  - ``make_train(config) -> train``, with ``train(key) -> dict[str, Array]`` pure JAX. The runner
    compiles ``jit(vmap(train))`` over the seeds' keys (``jax.random.key(seed)``), so N seeds are
    one program; the fields listed in ``VMAP_FIELDS`` (scalar hyper-parameters ``make_train``
    accepts as traced arrays) are swept inside that program too, by a second ``vmap``.
  - ``run(config) -> dict[str, array-like]``, any Python; the config's ``seed`` field (required
    then) is set to each seed in turn.

* ``criteria(config, measured) -> list[dict]``, each dict made by ``criterion``; ``measured`` maps
  each name ``train`` / ``run`` returned to a NumPy array with a leading seed axis ``[S, ...]``.
* Optionally ``plot(config, measured, out_dir)`` (writes PNGs with matplotlib; the runner skips it,
  saying so, when matplotlib is not installed) and ``DEFAULT_SEEDS`` (``--seeds`` when not given).

``results.json`` (``validate_results`` checks it; keys are exactly these)::

  {"claim": str, "paper": str,
   "config": {<every Config field>, "seeds": [int, ...], "sweep": {field: [values]}  (sweeps only)},
   "criteria": [{"name": str,             # unique in the file; prefixed "field=value: " in sweeps
                 "paper_value": float,    # the paper's number, or the closed form its claim implies
                 "measured": {"mean": float | null, "std": float | null,  # std over seeds (ddof 1)
                              "values": [float | null, ...]},  # one per seed; null = not finite
                 "tolerance": float,      # >= 0
                 "rule": "within" | "at_least" | "at_most",
                 "statistic": "each_seed" | "mean",
                 "passed": bool}, ...],
   "passed": bool}                        # every criterion passed

A criterion passes when its ``statistic`` (every seed's value, or the mean over seeds) satisfies its
``rule``: ``|x - paper_value| <= tolerance`` (within), ``x >= paper_value - tolerance`` (at_least)
or ``x <= paper_value + tolerance`` (at_most); a non-finite value never passes.
"""

import argparse
import dataclasses
import functools
import importlib
import importlib.util
import itertools
import json
import logging
import math
import os
import sys
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

RULES: tuple[str, ...] = ("within", "at_least", "at_most")
STATISTICS: tuple[str, ...] = ("each_seed", "mean")
_TOP_KEYS = ("claim", "paper", "config", "criteria", "passed")
_CRITERION_KEYS = ("name", "paper_value", "measured", "tolerance", "rule", "statistic", "passed")
_MEASURED_KEYS = ("mean", "std", "values")


class ExperimentError(ValueError):
  """A bad experiment module, override, sweep or seed count; the message names which."""


class ResultsSchemaError(ValueError):
  """A results dict that does not follow the schema; the message names the offending path."""


# ---------------------------------------------------------------------------------------------
# criteria and the schema


def _finite_or_none(x: float) -> float | None:
  return float(x) if math.isfinite(x) else None


def _satisfies(x: float | None, paper_value: float, tolerance: float, rule: str) -> bool:
  if x is None or not math.isfinite(x):
    return False
  if rule == "within":
    return abs(x - paper_value) <= tolerance
  if rule == "at_least":
    return x >= paper_value - tolerance
  return x <= paper_value + tolerance


def _spread(values: Sequence[Any]) -> tuple[float | None, float | None]:
  """Mean and std (ddof 1; 0 for one seed) over seeds, or ``(None, None)`` if any is not finite."""
  if any(v is None for v in values):
    return None, None
  array = np.asarray(values, np.float64)
  std = float(array.std(ddof=1)) if array.size > 1 else 0.0
  return float(array.mean()), std


def _decide(measured: Mapping[str, Any], paper_value: float | int, tolerance: float | int,
            rule: str, statistic: str) -> bool:
  def as_float(x):  # JSON may hold an int where a float was written
    return None if x is None else float(x)

  paper_value, tolerance = float(paper_value), float(tolerance)
  if statistic == "mean":
    return _satisfies(as_float(measured["mean"]), paper_value, tolerance, rule)
  return all(_satisfies(as_float(v), paper_value, tolerance, rule) for v in measured["values"])


def criterion(name: str, *, paper_value: float, values: Any, tolerance: float,
              rule: str = "within", statistic: str = "each_seed") -> dict[str, Any]:
  """One pass criterion of ``results.json``: each seed's measured value checked against the paper's.

  Args:
    name: what is measured, e.g. ``"D1 tau=1 IPO pi(ya)"``.
    paper_value: the paper's number, or the closed-form value its claim implies.
    values: the measurement on each seed, shape ``[S]``.
    tolerance: the allowed deviation, ``>= 0``.
    rule: ``"within"`` (``|x - paper_value| <= tolerance``), ``"at_least"``
      (``x >= paper_value - tolerance``) or ``"at_most"`` (``x <= paper_value + tolerance``).
    statistic: ``"each_seed"`` (every seed must satisfy the rule) or ``"mean"`` (their mean must).

  Returns:
    The criterion dict, ``passed`` decided.
  """
  if rule not in RULES:
    raise ExperimentError(f"criterion {name!r}: rule={rule!r} is not one of {list(RULES)}")
  if statistic not in STATISTICS:
    raise ExperimentError(f"criterion {name!r}: statistic={statistic!r} is not one of "
                          f"{list(STATISTICS)}")
  if not (math.isfinite(tolerance) and tolerance >= 0):
    raise ExperimentError(f"criterion {name!r}: tolerance must be a finite number >= 0, "
                          f"got {tolerance!r}")
  if not math.isfinite(paper_value):
    raise ExperimentError(f"criterion {name!r}: paper_value must be finite, got {paper_value!r}")
  array = np.asarray(values, np.float64)
  if array.ndim != 1 or array.size == 0:
    raise ExperimentError(f"criterion {name!r}: values must have shape [seeds] with at least one "
                          f"seed, got shape {list(array.shape)}")
  seed_values = [_finite_or_none(v) for v in array.tolist()]
  mean, std = _spread(seed_values)
  measured = {"mean": mean, "std": std, "values": seed_values}
  return {"name": name, "paper_value": float(paper_value), "measured": measured,
          "tolerance": float(tolerance), "rule": rule, "statistic": statistic,
          "passed": _decide(measured, float(paper_value), float(tolerance), rule, statistic)}


def _is_number(x: Any) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_keys(where: str, obj: Any, keys: Sequence[str]) -> None:
  if not isinstance(obj, dict):
    raise ResultsSchemaError(f"{where}: expected an object, got {type(obj).__name__}")
  missing = [k for k in keys if k not in obj]
  extra = sorted(k for k in obj if k not in keys)
  if missing or extra:
    raise ResultsSchemaError(f"{where}: missing keys {missing}, unexpected keys {extra}; the keys "
                             f"are {list(keys)}")


def _validate_criterion(where: str, c: Any) -> None:
  _check_keys(where, c, _CRITERION_KEYS)
  if not isinstance(c["name"], str) or not c["name"]:
    raise ResultsSchemaError(f"{where}.name: expected a non-empty string, got {c['name']!r}")
  if not _is_number(c["paper_value"]):
    raise ResultsSchemaError(f"{where}.paper_value: expected a finite number, "
                             f"got {c['paper_value']!r}")
  if not (_is_number(c["tolerance"]) and c["tolerance"] >= 0):
    raise ResultsSchemaError(f"{where}.tolerance: expected a finite number >= 0, "
                             f"got {c['tolerance']!r}")
  if c["rule"] not in RULES:
    raise ResultsSchemaError(f"{where}.rule: expected one of {list(RULES)}, got {c['rule']!r}")
  if c["statistic"] not in STATISTICS:
    raise ResultsSchemaError(f"{where}.statistic: expected one of {list(STATISTICS)}, "
                             f"got {c['statistic']!r}")
  if not isinstance(c["passed"], bool):
    raise ResultsSchemaError(f"{where}.passed: expected a bool, got {c['passed']!r}")
  measured = c["measured"]
  _check_keys(f"{where}.measured", measured, _MEASURED_KEYS)
  values = measured["values"]
  if not isinstance(values, list) or not values:
    raise ResultsSchemaError(f"{where}.measured.values: expected a non-empty list (one value per "
                             f"seed), got {values!r}")
  for i, v in enumerate(values):
    if v is not None and not _is_number(v):
      raise ResultsSchemaError(f"{where}.measured.values[{i}]: expected a finite number or null, "
                               f"got {v!r}")
  mean, std = _spread(values)
  for key, expected in (("mean", mean), ("std", std)):
    got = measured[key]
    if expected is None:
      if got is not None:
        raise ResultsSchemaError(f"{where}.measured.{key}: must be null when a value is null, "
                                 f"got {got!r}")
    elif not _is_number(got) or not math.isclose(got, expected, rel_tol=1e-9, abs_tol=1e-12):
      raise ResultsSchemaError(f"{where}.measured.{key}: {got!r} is not the {key} of the values "
                               f"({expected!r})")
  decided = _decide(measured, c["paper_value"], c["tolerance"], c["rule"], c["statistic"])
  if c["passed"] != decided:
    raise ResultsSchemaError(f"{where}.passed: says {c['passed']} but the values give {decided} "
                             f"under rule={c['rule']!r}, statistic={c['statistic']!r}")


def validate_results(results: Any) -> None:
  """Raises ResultsSchemaError, naming the path, unless ``results`` follows the results schema.

  Besides types and keys it checks consistency: each ``measured.mean`` / ``std`` is that of its
  ``values``, each criterion's ``passed`` follows from its rule, and the top-level ``passed`` is
  the conjunction of the criteria's.
  """
  _check_keys("results", results, _TOP_KEYS)
  for key in ("claim", "paper"):
    if not isinstance(results[key], str) or not results[key].strip():
      raise ResultsSchemaError(f"results.{key}: expected a non-empty string, got {results[key]!r}")
  config = results["config"]
  if not isinstance(config, dict):
    raise ResultsSchemaError(f"results.config: expected an object, got {type(config).__name__}")
  seeds = config.get("seeds")
  if (not isinstance(seeds, list) or not seeds
      or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)):
    raise ResultsSchemaError(f"results.config.seeds: expected a non-empty list of ints, "
                             f"got {seeds!r}")
  criteria = results["criteria"]
  if not isinstance(criteria, list) or not criteria:
    raise ResultsSchemaError("results.criteria: expected a non-empty list")
  names = set()
  for i, c in enumerate(criteria):
    where = f"results.criteria[{i}]"
    _validate_criterion(where, c)
    if c["name"] in names:
      raise ResultsSchemaError(f"{where}.name: {c['name']!r} appears twice")
    names.add(c["name"])
    if len(c["measured"]["values"]) != len(seeds):
      raise ResultsSchemaError(f"{where}.measured.values: {len(c['measured']['values'])} values "
                               f"for {len(seeds)} seeds")
  if not isinstance(results["passed"], bool):
    raise ResultsSchemaError(f"results.passed: expected a bool, got {results['passed']!r}")
  if results["passed"] != all(c["passed"] for c in criteria):
    raise ResultsSchemaError(f"results.passed: says {results['passed']} but the criteria say "
                             f"{all(c['passed'] for c in criteria)}")


# ---------------------------------------------------------------------------------------------
# modules, configs, overrides


def load_experiment(spec: str) -> types.ModuleType:
  """Imports an experiment from a file path (``experiments/NAME.py``) or a module name."""
  if spec.endswith(".py") or os.sep in spec:
    path = os.path.abspath(spec)
    if not os.path.isfile(path):
      raise ExperimentError(f"experiment file {spec!r} does not exist")
    stem = os.path.splitext(os.path.basename(path))[0]
    name = f"alignax_experiment_{stem}"
    folder = os.path.dirname(path)
    if os.path.isfile(os.path.join(folder, "__init__.py")):
      # A file of a package (experiments/NAME.py) imports its siblings as `experiments.helper`, as
      # under `python -m experiments.NAME`: put the package's parent on the path (a console
      # script does not put the working directory there).
      root = os.path.dirname(folder)
      if root not in sys.path:
        sys.path.insert(0, root)
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # dataclasses resolve their module by name while it executes
    try:
      module_spec.loader.exec_module(module)
    except BaseException:
      del sys.modules[name]
      raise
  else:
    try:
      module = importlib.import_module(spec)
    except ModuleNotFoundError as e:
      raise ExperimentError(f"no experiment module {spec!r} ({e})") from e
  check_module(module)
  return module


def experiment_name(module: types.ModuleType) -> str:
  """``NAME`` of ``experiments/NAME.py``, however it was loaded (by path, by name, or as __main__)."""
  spec = getattr(module, "__spec__", None)  # `python -m experiments.NAME` runs it as __main__
  full_name = spec.name if spec is not None else module.__name__
  return full_name.rpartition(".")[2].removeprefix("alignax_experiment_")


def check_module(module: types.ModuleType) -> None:
  """Raises ExperimentError naming what ``module`` lacks to be an experiment."""
  name = module.__name__
  for attr in ("CLAIM", "PAPER"):
    if not isinstance(getattr(module, attr, None), str):
      raise ExperimentError(f"experiment {name}: needs a string {attr}")
  config_cls = getattr(module, "Config", None)
  if not (isinstance(config_cls, type) and dataclasses.is_dataclass(config_cls)):
    raise ExperimentError(f"experiment {name}: needs a dataclass named Config")
  if not callable(getattr(module, "criteria", None)):
    raise ExperimentError(f"experiment {name}: needs criteria(config, measured)")
  has_train, has_run = callable(getattr(module, "make_train", None)), callable(
      getattr(module, "run", None))
  if not (has_train or has_run):
    raise ExperimentError(f"experiment {name}: needs make_train(config) or run(config)")
  fields = {f.name for f in dataclasses.fields(config_cls)}
  if not has_train and "seed" not in fields:
    raise ExperimentError(f"experiment {name}: run(config) needs a `seed` field in Config")
  for field in getattr(module, "VMAP_FIELDS", ()):
    if field not in fields:
      raise ExperimentError(f"experiment {name}: VMAP_FIELDS names {field!r}, not a Config field")


def _config_name(config_cls: type) -> str:
  module = config_cls.__module__.removeprefix("alignax_experiment_")
  return f"{module}.{config_cls.__name__}"


def _field_types(config_cls: type) -> dict[str, Any]:
  hints = typing.get_type_hints(config_cls)
  return {f.name: hints[f.name] for f in dataclasses.fields(config_cls)}


def _parse_scalar(text: str, kind: Any) -> Any:
  if kind is bool:
    lowered = text.strip().lower()
    if lowered in ("true", "1", "yes"):
      return True
    if lowered in ("false", "0", "no"):
      return False
    raise ValueError("expected true or false")
  if kind is int:
    try:
      return int(text.replace("_", ""))
    except ValueError:
      as_float = float(text)  # "1e6" names an int too, if it is one
      if not as_float.is_integer():
        raise ValueError("expected an integer") from None
      return int(as_float)
  if kind is float:
    return float(text)
  if kind is str:
    return text
  raise ValueError(f"fields of type {kind!r} cannot be set from the command line")


def parse_value(config_cls: type, key: str, text: str) -> Any:
  """``text`` parsed as the type of ``config_cls``'s field ``key`` (ExperimentError names it)."""
  types_ = _field_types(config_cls)
  if key not in types_:
    raise ExperimentError(f"unknown key {key!r} for {_config_name(config_cls)}; its fields are "
                          f"{sorted(types_)}")
  kind = types_[key]
  origin, args = typing.get_origin(kind), typing.get_args(kind)
  try:
    if origin in (typing.Union, types.UnionType) and type(None) in args:
      if text.strip().lower() == "none":
        return None
      (kind,) = [a for a in args if a is not type(None)]
      origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is tuple:
      element = args[0]
      return tuple(_parse_scalar(part.strip(), element) for part in text.split(",")
                   if part.strip())
    return _parse_scalar(text, kind)
  except ValueError as e:
    raise ExperimentError(f"{key}={text!r}: field {key!r} of {config_cls.__name__} has type "
                          f"{getattr(kind, '__name__', kind)}; {e}") from None


def _split_assignment(flag: str, item: str) -> tuple[str, str]:
  key, sep, value = item.partition("=")
  if not sep or not key.strip():
    raise ExperimentError(f"{flag} {item!r}: expected key=value")
  return key.strip(), value.strip()


def parse_overrides(config_cls: type, items: Sequence[str]) -> dict[str, Any]:
  """``--set key=value`` items as ``{field: typed value}``."""
  overrides = {}
  for item in items:
    key, text = _split_assignment("--set", item)
    overrides[key] = parse_value(config_cls, key, text)
  return overrides


def parse_sweep(config_cls: type, items: Sequence[str]) -> dict[str, list[Any]]:
  """``--sweep key=v1,v2,...`` items as ``{field: [typed values]}`` (scalar fields only)."""
  sweep = {}
  for item in items:
    key, text = _split_assignment("--sweep", item)
    kind = _field_types(config_cls).get(key)
    if typing.get_origin(kind) is tuple:
      raise ExperimentError(f"--sweep {item!r}: {key!r} is a tuple field; set it with --set "
                            f"{key}=v1,v2 instead")
    values = [parse_value(config_cls, key, part.strip())
              for part in text.split(",") if part.strip()]
    if not values:
      raise ExperimentError(f"--sweep {item!r}: no values")
    if key in sweep:
      raise ExperimentError(f"--sweep {key!r} is given twice")
    sweep[key] = values
  return sweep


def make_config(config_cls: type, overrides: Mapping[str, Any]) -> Any:
  """The default config with ``overrides``; the dataclass's own checks name a bad value."""
  known = {f.name for f in dataclasses.fields(config_cls)}
  unknown = sorted(set(overrides) - known)
  if unknown:
    raise ExperimentError(f"unknown keys {unknown} for {_config_name(config_cls)}; its fields are "
                          f"{sorted(known)}")
  try:
    return config_cls(**overrides)
  except (TypeError, ValueError) as e:
    raise ExperimentError(f"{config_cls.__name__}: {e}") from e


def _sweep_points(sweep: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
  keys = list(sweep)
  return [dict(zip(keys, combo)) for combo in itertools.product(*(sweep[k] for k in keys))]


def _point_label(point: Mapping[str, Any]) -> str:
  """``field=value,...``, also the point's sub-directory name (so no path separators)."""
  return ",".join(f"{k}={v}" for k, v in point.items()).replace(os.sep, "_")


# ---------------------------------------------------------------------------------------------
# measuring


def _as_numpy(tree: Mapping[str, Any]) -> dict[str, np.ndarray]:
  return {k: np.asarray(v) for k, v in tree.items()}


def _stack_seeds(per_seed: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
  keys = set(per_seed[0])
  for i, m in enumerate(per_seed):
    if set(m) != keys:
      raise ExperimentError(f"seed {i} returned measurements {sorted(m)}, seed 0 {sorted(keys)}")
  return {k: np.stack([np.asarray(m[k]) for m in per_seed]) for k in sorted(keys)}


def measure(module: types.ModuleType, config: Any, seeds: Sequence[int], *,
            vmap: bool = True) -> dict[str, np.ndarray]:
  """Every seed's measurements, stacked on a leading seed axis ``[S, ...]``.

  With ``make_train`` and ``vmap=True`` the seeds run as one ``jit(vmap(train))`` program over the
  keys ``jax.random.key(seed)``; ``vmap=False`` loops over the seeds in Python (one compile), the
  reference the vmapped program must equal. Modules with only ``run`` always loop.
  """
  return measure_points(module, config, [{}], seeds, vmap=vmap)[0]


def _build_program(make_train: Any, base: Any, swept: tuple[str, ...], over_seeds: bool) -> Any:
  import jax

  def one(values, key):
    return make_train(dataclasses.replace(base, **values) if values else base)(key)

  if not over_seeds:
    return jax.jit(one)
  if not swept:
    return jax.jit(lambda values, keys: jax.vmap(lambda k: one({}, k))(keys))
  return jax.jit(lambda values, keys: jax.vmap(
      lambda v: jax.vmap(lambda k: one(v, k))(keys))(values))


_cached_program = functools.lru_cache(maxsize=8)(_build_program)


def _program(make_train: Any, base: Any, swept: tuple[str, ...], over_seeds: bool) -> Any:
  """The jitted ``train`` of ``base`` (vmapped over seeds, and over ``swept`` field values), built
  once per (``make_train``, config) so repeated runs of one config compile once."""
  try:
    return _cached_program(make_train, base, swept, over_seeds)
  except TypeError:  # an unhashable (non-frozen) Config: build it every time
    return _build_program(make_train, base, swept, over_seeds)


def measure_points(module: types.ModuleType, base: Any, points: Sequence[Mapping[str, Any]],
                   seeds: Sequence[int], *, vmap: bool = True) -> list[dict[str, np.ndarray]]:
  """Measurements ``[S, ...]`` for each sweep point (a dict of field overrides of ``base``).

  Points that differ only in ``VMAP_FIELDS`` share one compiled program, which takes those fields
  as arrays: with ``vmap=True`` it is vmapped over their values and over the seeds; with
  ``vmap=False`` it is called once per (point, seed) from a Python loop.
  """
  if not seeds or not all(0 <= int(s) < 2 ** 32 for s in seeds):
    raise ExperimentError(f"seeds: need at least one seed, each in [0, 2**32); got {list(seeds)}")
  configs = [dataclasses.replace(base, **point) for point in points]
  make_train = getattr(module, "make_train", None)
  if make_train is None:
    return [_stack_seeds([module.run(dataclasses.replace(c, seed=s)) for s in seeds])
            for c in configs]
  import jax
  import jax.numpy as jnp

  vmap_fields = tuple(getattr(module, "VMAP_FIELDS", ()))
  groups: dict[tuple, list[int]] = {}
  for i, point in enumerate(points):
    fixed = tuple(sorted((k, repr(v)) for k, v in point.items() if k not in vmap_fields))
    groups.setdefault(fixed, []).append(i)
  results: list[dict[str, np.ndarray] | None] = [None] * len(points)
  for members in groups.values():
    swept = tuple(sorted({k for i in members for k in points[i] if k in vmap_fields}))
    group_base = configs[members[0]]
    # Swept values travel as arrays (NumPy first, so vmapped and looped runs see one dtype).
    values = [{k: np.asarray(getattr(configs[i], k)) for k in swept} for i in members]
    if not vmap:
      program = _program(make_train, group_base, swept, False)
      for i, point_values in zip(members, values):
        results[i] = _stack_seeds([_as_numpy(program(point_values, jax.random.key(s)))
                                   for s in seeds])
      continue
    keys = jax.vmap(jax.random.key)(jnp.asarray(seeds, jnp.uint32))
    program = _program(make_train, group_base, swept, True)
    if not swept:
      out = _as_numpy(program({}, keys))
      for i in members:
        results[i] = out
      continue
    stacked = {k: np.stack([v[k] for v in values]) for k in swept}
    out = _as_numpy(program(stacked, keys))
    for j, i in enumerate(members):
      results[i] = {k: v[j] for k, v in out.items()}
  return results


# ---------------------------------------------------------------------------------------------
# running and writing


def _config_json(config: Any) -> dict[str, Any]:
  def plain(x: Any) -> Any:
    if isinstance(x, (tuple, list)):
      return [plain(v) for v in x]
    if isinstance(x, dict):
      return {k: plain(v) for k, v in x.items()}
    return x
  return plain(dataclasses.asdict(config))


def _check_config_json(config: Any) -> None:
  """Raises ExperimentError naming a field that results.json (strict JSON) cannot hold, such as
  ``inf`` or ``nan``, before anything is measured rather than after the whole run."""
  for name, value in _config_json(config).items():
    try:
      json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as e:
      raise ExperimentError(f"{_config_name(type(config))}.{name}={value!r} cannot be written to "
                            f"results.json ({e})") from None


def _plot(module: types.ModuleType, config: Any, measured: Mapping[str, np.ndarray],
          out_dir: str) -> None:
  plot = getattr(module, "plot", None)
  if plot is None:
    return
  try:
    import matplotlib
  except ImportError:
    logger.warning("matplotlib is not installed: no plots written to %s (pip install matplotlib)",
                   out_dir)
    return
  matplotlib.use("Agg")
  plot(config, measured, out_dir)


def _write(out_dir: str, results: Mapping[str, Any],
           measured: Mapping[str, np.ndarray] | None) -> None:
  validate_results(results)
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "results.json"), "w") as f:
    json.dump(results, f, indent=1, allow_nan=False)
    f.write("\n")
  if measured is not None:
    np.savez(os.path.join(out_dir, "measurements.npz"), **measured)


def run_experiment(module: types.ModuleType, *, overrides: Mapping[str, Any] | None = None,
                   sweep: Mapping[str, Sequence[Any]] | None = None, seeds: Sequence[int] = (0,),
                   output_dir: str | None = None, vmap: bool = True,
                   plots: bool = True) -> dict[str, Any]:
  """Measures ``module`` on every sweep point and seed, checks its criteria, writes the results.

  Args:
    module: an experiment module (``load_experiment``).
    overrides: config fields to change from their defaults.
    sweep: ``{field: [values]}``; the cartesian product of the values is run.
    seeds: the seeds; every measurement is reported as mean, std and per-seed values.
    output_dir: where ``results.json``, ``measurements.npz`` and the plots go (None: nowhere). A
      sweep writes one sub-directory per point (``field=value,...``) and, at the top, one
      ``results.json`` whose criteria are every point's, prefixed by the point.
    vmap: vmap the seeds (and ``VMAP_FIELDS`` sweep values) of a ``make_train`` experiment.
    plots: call the module's ``plot`` (when matplotlib is installed).

  Returns:
    The results dict (the schema of ``validate_results``).
  """
  seeds = [int(s) for s in seeds]
  if not seeds or len(set(seeds)) != len(seeds):
    raise ExperimentError(f"seeds: need at least one seed, each once; got {seeds}")
  base = make_config(module.Config, overrides or {})
  sweep = dict(sweep or {})
  fields = {f.name for f in dataclasses.fields(module.Config)}
  for key, values in sweep.items():
    if key not in fields:
      raise ExperimentError(f"sweep: unknown key {key!r} for {module.Config.__name__}; its fields "
                            f"are {sorted(fields)}")
    if not values:
      raise ExperimentError(f"sweep: no values for {key!r}")
  points = _sweep_points(sweep) if sweep else [{}]
  configs = [make_config(module.Config, {**(overrides or {}), **point}) for point in points]
  for config in configs:
    _check_config_json(config)
  logger.info("%s: %d point(s) x %d seed(s)%s", experiment_name(module), len(points), len(seeds),
              " (vmapped)" if vmap and hasattr(module, "make_train") else "")
  measured_points = measure_points(module, base, points, seeds, vmap=vmap)
  all_criteria, point_results = [], []
  for point, config, measured in zip(points, configs, measured_points):
    criteria = list(module.criteria(config, measured))
    result = {"claim": module.CLAIM, "paper": module.PAPER,
              "config": {**_config_json(config), "seeds": seeds}, "criteria": criteria,
              "passed": all(c["passed"] for c in criteria)}
    validate_results(result)  # the module's criteria follow the schema even if nothing is written
    point_results.append(result)
    if sweep:
      label = _point_label(point)
      all_criteria += [{**c, "name": f"{label}: {c['name']}"} for c in criteria]
      if output_dir is not None:
        point_dir = os.path.join(output_dir, label)
        _write(point_dir, result, measured)
        if plots:
          _plot(module, config, measured, point_dir)
    elif output_dir is not None:
      _write(output_dir, result, measured)
      if plots:
        _plot(module, config, measured, output_dir)
  if not sweep:
    return point_results[0]
  results = {"claim": module.CLAIM, "paper": module.PAPER,
             "config": {**_config_json(base), "seeds": seeds,
                        "sweep": {k: list(v) for k, v in sweep.items()}},
             "criteria": all_criteria, "passed": all(c["passed"] for c in all_criteria)}
  if output_dir is not None:
    _write(output_dir, results, None)
  return results


def _fmt(x: float | None) -> str:
  return "nan" if x is None else f"{x:.4g}"


def format_results(results: Mapping[str, Any]) -> str:
  """A plain-text table of the criteria: paper value, measured mean ± std, tolerance, verdict."""
  width = max(len(c["name"]) for c in results["criteria"])
  symbol = {"within": "±", "at_least": "≥ -", "at_most": "≤ +"}
  lines = [results["claim"], f"({results['paper']}; seeds {results['config']['seeds']})", "",
           f"{'criterion':<{width}}  {'paper':>9}  {'measured (mean ± std)':>23}  "
           f"{'tolerance':>12}  result"]
  for c in results["criteria"]:
    m = c["measured"]
    measured = f"{_fmt(m['mean'])} ± {_fmt(m['std'])}"
    tol = f"{symbol[c['rule']]}{c['tolerance']:.3g}"
    scope = "" if c["statistic"] == "each_seed" else " (mean)"
    lines.append(f"{c['name']:<{width}}  {c['paper_value']:>9.4g}  {measured:>23}  {tol:>12}  "
                 f"{'pass' if c['passed'] else 'FAIL'}{scope}")
  n_pass = sum(c["passed"] for c in results["criteria"])
  lines.append(f"\n{n_pass}/{len(results['criteria'])} criteria passed: "
               f"{'REPRODUCED' if results['passed'] else 'NOT REPRODUCED'}")
  return "\n".join(lines)


def _parser(with_experiment: bool) -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="alignax run", description="Run an experiment module over sweeps and seeds; write "
      "results.json (claim, paper, config, criteria with per-seed values, passed) and plots.")
  if with_experiment:
    parser.add_argument("experiment", help="experiments/NAME.py, or a module name")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override a Config field (typed by the field; tuples comma-separated)")
  parser.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2,...",
                      help="run every value (several --sweep: the cartesian product)")
  parser.add_argument("--seeds", type=int, default=None,
                      help="number of seeds (default: the experiment's DEFAULT_SEEDS, else 1)")
  parser.add_argument("--seed", type=int, default=0, help="first seed (seeds are seed..seed+N-1)")
  parser.add_argument("--output_dir", default=None,
                      help="where results.json and the plots go (default: results/NAME)")
  parser.add_argument("--no_vmap", action="store_true",
                      help="loop over seeds in Python instead of one vmapped program")
  parser.add_argument("--no_plots", action="store_true", help="write no PNG plots")
  parser.add_argument("--json", action="store_true", help="print results.json instead of a table")
  return parser


def main(argv: Sequence[str] | None = None, *, module: types.ModuleType | None = None) -> int:
  """``alignax run``: returns 0 when every criterion passed, 1 when one failed, 2 on bad input.

  ``argv`` is what follows ``run`` (the experiment first); pass ``module`` instead of the
  experiment argument to run an already imported module (``python -m experiments.NAME``).
  """
  args = _parser(module is None).parse_args(argv)
  if not logging.getLogger().handlers:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
  try:
    if module is None:
      module = load_experiment(args.experiment)
    else:
      check_module(module)
    n_seeds = args.seeds if args.seeds is not None else getattr(module, "DEFAULT_SEEDS", 1)
    if n_seeds < 1:
      raise ExperimentError(f"--seeds must be >= 1, got {n_seeds}")
    overrides = parse_overrides(module.Config, args.set)
    sweep = parse_sweep(module.Config, args.sweep)
    output_dir = args.output_dir or os.path.join("results", experiment_name(module))
    results = run_experiment(module, overrides=overrides, sweep=sweep,
                             seeds=range(args.seed, args.seed + n_seeds), output_dir=output_dir,
                             vmap=not args.no_vmap, plots=not args.no_plots)
  except ExperimentError as e:
    print(f"alignax run: error: {e}", file=sys.stderr)
    return 2
  if args.json:
    print(json.dumps(results, indent=1))
  else:
    print(format_results(results))
    print(f"\nwrote {os.path.join(output_dir, 'results.json')}")
  return 0 if results["passed"] else 1



if __name__ == "__main__":
  # `python -m alignax.experiment experiments/NAME.py ...`: run the imported module's main, so the
  # experiment and the runner share one copy of this module (and its ExperimentError).
  from alignax.experiment import main as _main

  sys.exit(_main())
