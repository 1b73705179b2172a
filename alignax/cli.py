"""``alignax sft|reward|dpo|kto|orpo|simpo|cpo|grpo|ppo [flags]``: the trainers from the command
line.

Flags are TRL's (``transformers.HfArgumentParser`` over the algorithm's config, ``ModelConfig``,
``alignax.data.DataConfig`` and ``MeshConfig``), so a TRL command line carries over::

  alignax dpo --model_name_or_path path/to/llama --dataset_name prefs.jsonl --output_dir out \\
    --per_device_train_batch_size 2 --max_steps 100 --beta 0.1 --use_peft --lora_r 16

``--config FILE.yaml`` reads the same options from a YAML mapping; flags given on the command line
override the file. ``alignax dpo --help`` lists every option with its default. ``--seed`` seeds the
data order as well as the run.

A bad flag, value or config file prints one message and exits with 2; an error while running (a bad
dataset row, a missing checkpoint, a NaN loss) prints one message and exits with 1. ``--debug`` or
``ALIGNAX_TRACEBACK=1`` prints the traceback as well.
"""

import argparse
import dataclasses
import difflib
import logging
import os
import re
import sys
import traceback
from collections.abc import Sequence
from typing import Any

import transformers

from alignax.data import DataConfig
from alignax.train.config import MeshConfig, ModelConfig
from alignax.train.grpo import GRPOConfig
from alignax.train.ppo_trainer import PPOConfig
from alignax.train.trainers import ALGORITHMS

# Every training command and its config class (GRPO and PPO run their own generate-score-update
# loops).
TRAINERS = {**{name: spec.config for name, spec in ALGORITHMS.items()}, "grpo": GRPOConfig,
            "ppo": PPOConfig}
# Online trainers: command -> (module, function).
ONLINE_TRAINERS = {"grpo": ("alignax.train.grpo", "grpo"),
                   "ppo": ("alignax.train.ppo_trainer", "ppo")}

USAGE = f"""usage: alignax {{{",".join(TRAINERS)}}} [flags] [--config FILE.yaml] [--debug]

Trains a model with one algorithm and writes a Hugging Face / TRL-style output directory.

commands:
  sft      supervised fine-tuning (prompt/completion, text or messages data)
  reward   a Bradley-Terry reward model (preference data)
  dpo      direct preference optimisation (preference data)
  kto      Kahneman-Tversky optimisation (unpaired prompt/completion/label data)
  orpo     odds-ratio preference optimisation (preference data, no reference)
  simpo    SimPO (preference data, no reference)
  cpo      contrastive preference optimisation (preference data, no reference)
  grpo     group relative policy optimisation and its variants (prompt data, reward functions)
  ppo      PPO with a critic, a frozen reward model and a KL-penalised reward (prompt data)

other commands:
  demo     the end-to-end demo: SFT, reward model, DPO, GRPO and PPO on a tiny model (no downloads)
  eval     reward, win rate, KL to the reference and alignment tax of a policy against a baseline
  run      an experiment module: alignax run experiments/NAME.py [--set k=v] [--sweep k=a,b] [--seeds N]

`alignax COMMAND --help` lists the command's flags."""

# Commands that are not trainers: their module's ``main(argv)`` parses its own flags.
TOOLS = {"run": "alignax.experiment", "demo": "alignax.demo", "eval": "alignax.evaluation"}


class UsageError(Exception):
  """A bad command line or config file (exit status 2)."""


class _Parser(transformers.HfArgumentParser):
  """Raises ``UsageError`` instead of printing the whole usage and exiting."""

  def error(self, message: str):
    raise UsageError(message)


def _without_seed(cls: type) -> type:
  """``cls``'s fields minus ``seed``: the training config's ``--seed`` seeds the data too (one
  flag, as in TRL), and argparse rejects two ``--seed`` options."""
  fields = []
  for f in dataclasses.fields(cls):
    if f.name == "seed":
      continue
    factory = f.default_factory is not dataclasses.MISSING
    default = {"default_factory": f.default_factory} if factory else {"default": f.default}
    fields.append((f.name, f.type, dataclasses.field(metadata=f.metadata, **default)))
  return dataclasses.make_dataclass("DataArguments", fields)


_ATTRIBUTE = re.compile(r"^ {4}([a-z_][a-z0-9_, ]*):\s*(.*)$")


def _attribute_help(cls: type) -> dict[str, str]:
  """Per-field help from the ``Attributes:`` sections of ``cls`` and its bases' docstrings."""
  helps: dict[str, str] = {}
  for klass in reversed(cls.__mro__):
    doc = klass.__dict__.get("__doc__") or ""
    lines = doc.splitlines()
    if "  Attributes:" not in lines:
      continue
    names, text = [], []
    for line in lines[lines.index("  Attributes:") + 1:]:
      match = _ATTRIBUTE.match(line)
      if match or not line.startswith("      "):
        for name in names:
          helps[name] = " ".join(text)
        names, text = [], []
      if match:
        names = [n.strip() for n in match.group(1).split(",")]
        text = [match.group(2).strip()]
      elif line.startswith("      "):
        text.append(line.strip())
      else:
        break
    for name in names:
      helps[name] = " ".join(text)
  return {name: text.replace("%", "%%").replace("``", "") for name, text in helps.items()}


def build_parser(command: str) -> _Parser:
  """The parser of ``alignax COMMAND``: the algorithm's config, ``ModelConfig``, the data options
  and ``MeshConfig``, each flag named as its field."""
  config_cls = TRAINERS[command]
  classes = (config_cls, ModelConfig, _without_seed(DataConfig), MeshConfig)
  parser = _Parser(classes, prog=f"alignax {command}",
                   description=f"{config_cls.__doc__.splitlines()[0]} Flags override --config.")
  parser.add_argument("--config", metavar="FILE.yaml",
                      help="read options from a YAML mapping (flags on the command line win)")
  parser.add_argument("--debug", action="store_true",
                      help="print the traceback of an error (also ALIGNAX_TRACEBACK=1)")
  helps = {**_attribute_help(DataConfig), **_attribute_help(MeshConfig),
           **_attribute_help(ModelConfig), **_attribute_help(config_cls)}
  for action in parser._actions:
    if action.dest in helps and not action.help:
      action.help = helps[action.dest]
  return parser


def _option_names(parser: argparse.ArgumentParser) -> list[str]:
  return [s for action in parser._actions for s in action.option_strings if s.startswith("--")]


def _read_yaml(path: str, parser: argparse.ArgumentParser) -> dict[str, Any]:
  import yaml

  if not os.path.isfile(path):
    raise UsageError(f"--config {path}: no such file")
  try:
    with open(path) as f:
      values = yaml.safe_load(f)
  except yaml.YAMLError as e:
    raise UsageError(f"--config {path}: not valid YAML ({e})") from None
  values = {} if values is None else values
  if not isinstance(values, dict):
    raise UsageError(f"--config {path}: expected a mapping of option names to values, got "
                     f"{type(values).__name__}")
  known = {action.dest for action in parser._actions}
  for key in values:
    if key not in known or key in ("help", "config", "debug"):
      close = difflib.get_close_matches(str(key), sorted(known), n=1)
      hint = f" (did you mean {close[0]!r}?)" if close else ""
      raise UsageError(f"--config {path}: unknown option {key!r}{hint}")
  return values


def _split_config_flag(argv: list[str]) -> tuple[str | None, list[str]]:
  """``--config FILE`` / ``--config=FILE`` out of the arguments."""
  rest, path = [], None
  i = 0
  while i < len(argv):
    arg = argv[i]
    if arg == "--config":
      if i + 1 >= len(argv):
        raise UsageError("argument --config: expected one argument")
      path, i = argv[i + 1], i + 2
      continue
    if arg.startswith("--config="):
      path = arg.split("=", 1)[1]
    else:
      rest.append(arg)
    i += 1
  return path, rest


def parse(command: str, argv: Sequence[str]) -> tuple[Any, ModelConfig, DataConfig, MeshConfig]:
  """``alignax COMMAND argv`` -> ``(algorithm config, ModelConfig, DataConfig, MeshConfig)``.

  Raises:
    UsageError: an unknown flag (the closest known one suggested), a value of the wrong type, an
      unknown key or bad YAML in ``--config``.
    ValueError: a value a config rejects (the message names the field).
  """
  parser = build_parser(command)
  path, args = _split_config_flag([a for a in argv if a != "--debug"])
  if path is not None:
    values = _read_yaml(path, parser)
    parser.set_defaults(**values)
    for action in parser._actions:
      if action.dest in values:
        action.required = False  # given by the file
  # The dataclasses, then a namespace of --config/--debug, then the strings nothing parsed.
  outputs = parser.parse_args_into_dataclasses(args=args, return_remaining_strings=True)
  (config, model, data_args, mesh), remaining = outputs[:4], outputs[-1]
  if remaining:
    unknown = next((a for a in remaining if a.startswith("-")), remaining[0])
    close = difflib.get_close_matches(unknown.split("=", 1)[0], _option_names(parser), n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    raise UsageError(f"unrecognised argument {unknown}{hint}")
  # PPO names its policy TRL's way, --sft_model_path; --model_name_or_path may stand in for it.
  if not model.model_name_or_path and not getattr(config, "sft_model_path", None):
    raise UsageError("--model_name_or_path is required: a checkpoint directory or a hub id")
  data = DataConfig(**dataclasses.asdict(data_args), seed=config.seed)
  return config, model, data, mesh


def _initialize_distributed(mesh: MeshConfig) -> None:
  """Joins the multi-host run before any JAX work (a no-op on one host without JAX's cluster
  environment variables)."""
  from alignax import distributed

  distributed.initialize(coordinator_address=mesh.coordinator_address,
                         num_processes=mesh.num_processes, process_id=mesh.process_id)


def _log_to_stderr() -> None:
  """The trainers' INFO lines (data sizes, skipped rows) on stderr, whatever the root logger
  does."""
  log = logging.getLogger("alignax")
  if not log.handlers:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def _say(command: str | None, message: str) -> None:
  prog = "alignax" if command is None else f"alignax {command}"
  print(f"{prog}: error: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
  """Runs ``alignax COMMAND [flags]``; returns the exit status (0 done, 1 failed, 2 bad usage)."""
  argv = list(sys.argv[1:] if argv is None else argv)
  debug = "--debug" in argv or os.environ.get("ALIGNAX_TRACEBACK", "") not in ("", "0")
  if not argv or argv[0] in ("-h", "--help"):
    print(USAGE, file=sys.stdout if argv else sys.stderr)
    return 0 if argv else 2
  command, rest = argv[0], argv[1:]
  if command in TOOLS:
    import importlib

    return importlib.import_module(TOOLS[command]).main(rest)
  if command not in TRAINERS:
    choices = [*TRAINERS, *TOOLS]
    close = difflib.get_close_matches(command, choices, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    _say(None, f"unknown command {command!r}{hint}; choose one of {', '.join(choices)}")
    return 2
  try:
    config, model, data, mesh = parse(command, rest)
  except SystemExit as e:  # --help
    return int(e.code or 0)
  except (UsageError, ValueError, TypeError) as e:
    if debug:
      traceback.print_exc()
    _say(command, f"{e}\n(`alignax {command} --help` lists the flags)")
    return 2

  _log_to_stderr()
  from alignax.train.trainers import run

  try:
    _initialize_distributed(mesh)
    if command in ONLINE_TRAINERS:
      import importlib

      module, name = ONLINE_TRAINERS[command]
      getattr(importlib.import_module(module), name)(config, model=model, data=data, mesh=mesh)
    else:
      run(command, config, model=model, data=data, mesh=mesh)
  except KeyboardInterrupt as e:
    _say(command, f"interrupted: {e}" if str(e) else "interrupted")
    return 130
  except Exception as e:  # one readable line instead of a traceback wall
    if debug:
      traceback.print_exc()
    known = isinstance(e, (ValueError, OSError, FloatingPointError, RuntimeError))
    hint = "" if known or debug else " (--debug or ALIGNAX_TRACEBACK=1 shows the traceback)"
    message = str(e) if known else f"{type(e).__name__}: {e}"
    _say(command, message + hint)
    return 1
  print(f"alignax {command}: done; the model is in {config.output_dir}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
