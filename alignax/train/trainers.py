"""The offline trainers: ``sft``, ``reward``, ``dpo``, ``kto``, ``orpo``, ``simpo`` and ``cpo``.

Each is one call that resolves everything a TRL trainer resolves and then runs the shared host loop
(``alignax.train.loop.fit``)::

  from alignax import train
  from alignax.data import DataConfig

  result = train.dpo(train.DPOConfig(output_dir="out", max_steps=100, beta=0.1),
                     model=train.ModelConfig(model_name_or_path="path/to/llama", use_peft=True),
                     data=DataConfig(dataset_name="prefs.jsonl", max_length=512))

All seven share one code path (:func:`run`): the mesh (``MeshConfig``), the model
(``from_pretrained``; ``head="score"`` for the reward model) with LoRA adapters when ``use_peft``
(then only ``LoRAParam``s train), the tokenizer (from the model's directory unless
``tokenizer_name_or_path``), the data (``alignax.data.load_dataset`` with the algorithm's task;
skipped and truncated rows are logged), the objective (``alignax.train.objectives``), the reference
for DPO and KTO (a frozen copy of ``ref_model_name_or_path`` or of the policy's checkpoint; with
LoRA the adapters-off view of the policy and no copy; none when ``reference_free``; with
``precompute_ref_log_probs`` log-probs computed once over the data), evaluation on the test split
(``eval_strategy``: the objective's loss and metrics; ``eval_num_prompts``: samples scored against
the starting model, ``eval/reward``, ``eval/win_rate``, ``eval/kl``, ``eval/tax``, see
``alignax.evaluation``) and the export:

- without LoRA, the trained model in Hugging Face format (config, safetensors, tokenizer) at the
  root of ``output_dir`` (``*ForCausalLM``; ``*ForSequenceClassification`` for the reward model);
- with LoRA, the adapter in PEFT's layout (``adapter_config.json``, ``adapter_model.safetensors``,
  whose ``base_model_name_or_path`` is the checkpoint trained from) and the tokenizer at the root,
  as TRL writes it; with ``merge_adapters`` also the merged model in ``output_dir/merged``. (Not at
  the root: ``transformers`` with PEFT installed loads a directory holding both a model and an
  adapter config as model + adapter, which would count the update twice.)
"""

import dataclasses
import functools
import json
import logging
import os
import shutil
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from alignax.data import DataConfig, PreparedDataset, load_dataset, make_batches, steps_per_epoch
from alignax.train import objectives
from alignax.train.config import (CPOConfig, DPOConfig, KTOConfig, MeshConfig, ModelConfig,
                                  ORPOConfig, RewardConfig, SFTConfig, SimPOConfig,
                                  TrainingConfig)
from alignax.train.loop import RUN_CONFIG_FILE, FitResult, data_parallel_size, fit
from alignax.train.step import make_eval_step

logger = logging.getLogger("alignax.train")

MERGED_DIR = "merged"
GENERATION_CONFIG_NAME = "generation_config.json"


class Algorithm(NamedTuple):
  """What distinguishes one trainer from another.

  Attributes:
    config: its config class.
    task: the data task (``alignax.data.TASKS``).
    head: ``from_pretrained``'s head.
    objective: ``config -> (graphdef, **options) -> Objective``.
    reference: whether it compares against a reference model.
  """

  config: type[TrainingConfig]
  task: str
  head: str | None
  objective: Callable[[Any], Callable[..., Any]]
  reference: bool = False


def _kto_objective(config: KTOConfig) -> Callable[..., Any]:
  return functools.partial(objectives.kto_objective, beta=config.beta,
                           desirable_weight=config.desirable_weight,
                           undesirable_weight=config.undesirable_weight,
                           loss_type=config.loss_type)


ALGORITHMS: dict[str, Algorithm] = {
  "sft": Algorithm(SFTConfig, "sft", None, lambda c: functools.partial(
    objectives.sft_objective, loss_agg_mode=c.loss_agg_mode)),
  "reward": Algorithm(RewardConfig, "preference", "score", lambda c: functools.partial(
    objectives.reward_objective, center_rewards_coefficient=c.center_rewards_coefficient)),
  "dpo": Algorithm(DPOConfig, "preference", None, lambda c: functools.partial(
    objectives.dpo_objective, beta=c.beta, loss_type=tuple(c.loss_type),
    loss_weights=None if c.loss_weights is None else tuple(c.loss_weights),
    label_smoothing=c.label_smoothing, rpo_alpha=c.rpo_alpha, reference_free=c.reference_free),
    reference=True),
  "kto": Algorithm(KTOConfig, "unpaired", None, _kto_objective, reference=True),
  "orpo": Algorithm(ORPOConfig, "preference", None, lambda c: functools.partial(
    objectives.orpo_objective, odds_ratio_weight=c.beta)),
  "simpo": Algorithm(SimPOConfig, "preference", None, lambda c: functools.partial(
    objectives.simpo_objective, beta=c.beta, gamma_beta_ratio=c.gamma_beta_ratio,
    label_smoothing=c.label_smoothing, loss_type=c.loss_type)),
  "cpo": Algorithm(CPOConfig, "preference", None, lambda c: functools.partial(
    objectives.cpo_objective, beta=c.beta, loss_type=c.loss_type,
    label_smoothing=c.label_smoothing, cpo_alpha=c.cpo_alpha)),
}


def _load_data(data: DataConfig, tokenizer: Any, *, task: str, split: str) -> PreparedDataset:
  dataset = load_dataset(data, tokenizer, task=task, split=split)
  split_name = data.dataset_train_split if split == "train" else data.dataset_test_split
  logger.info("%s[%s]: %d examples from %d rows, %d truncated to max_length=%s",
              data.dataset_name, split_name, len(dataset), dataset.num_rows,
              dataset.num_truncated, data.max_length)
  if dataset.num_skipped:
    logger.warning("%s[%s]: skipped %d invalid rows (%s)", data.dataset_name, split_name,
                   dataset.num_skipped,
                   ", ".join(f"{kind}: {n}" for kind, n in sorted(dataset.skipped.items())))
  return dataset


def resolve_mesh(mesh: MeshConfig | jax.sharding.Mesh | None) -> jax.sharding.Mesh:
  if isinstance(mesh, jax.sharding.Mesh):
    return mesh
  return (mesh or MeshConfig()).make_mesh()


def load_model(path: str, model: ModelConfig, *, mesh: jax.sharding.Mesh, head: str | None,
                seed: int) -> nnx.Module:
  from alignax.models import from_pretrained

  return from_pretrained(path, dtype=model.compute_dtype, mesh=mesh, head=head,
                         num_labels=1 if head == "score" else None, remat=model.remat_policy,
                         attention_impl=model.attention_impl, seed=seed,
                         revision=model.model_revision)


def _place(batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh,
           batch_axes: dict[str, int]) -> dict[str, jax.Array]:
  """A host batch as global arrays, rows split over the data-parallel axes (as the loop does)."""

  def place(name, x):
    spec = [None] * x.ndim
    spec[batch_axes.get(name, 0)] = ("data", "fsdp")
    return jax.make_array_from_process_local_data(NamedSharding(mesh, PartitionSpec(*spec)), x)

  return {name: place(name, np.asarray(x)) for name, x in batch.items()}


def make_evaluator(objective_fn: Callable[..., Any], dataset: PreparedDataset, *,
                   data: DataConfig, batch_size: int, mesh: jax.sharding.Mesh,
                   trainable: Any = nnx.Param, reference: nnx.Module | None = None
                   ) -> Callable[[nnx.Module], dict[str, float]]:
  """``model -> {"loss": ..., metric: ...}``: the objective's loss and metrics over a whole
  evaluation set, each batch weighted by the objective's count (tokens, pairs), so the result is
  the value on the set, not a mean of batch means. No gradient, no state change.

  Args:
    objective_fn: ``(graphdef, **options) -> Objective``, as given to ``fit``.
    dataset: the prepared evaluation set. Its examples are cut to a multiple of the data-parallel
      devices (at most ``devices - 1`` dropped, logged), so every batch splits evenly.
    data: the data config (shuffling and packing are turned off for evaluation).
    batch_size: rows per evaluation batch per data-parallel device.
    mesh: the training mesh.
    trainable: the filter ``fit`` trains (so the objective sees the same ``params``/``frozen``).
    reference: the frozen reference model ``fit`` gets, if any.

  Returns:
    The evaluation function for ``fit(eval_fn=...)`` (its keys get an ``eval_`` prefix there).
  """
  devices = data_parallel_size(mesh)
  hosts = jax.process_count()
  usable = len(dataset) - len(dataset) % devices
  if usable == 0:
    raise ValueError(f"the evaluation split has {len(dataset)} examples, fewer than the {devices} "
                     "data-parallel devices it is split over")
  if usable < len(dataset):
    logger.info("evaluation: %d of %d examples (a multiple of the %d data-parallel devices)",
                usable, len(dataset), devices)
  dataset = dataclasses.replace(dataset, examples=dataset.examples[:usable])
  config = dataclasses.replace(data, shuffle=False, packing=False, dataloader_drop_last=False)
  compiled: dict[str, Any] = {}

  def evaluate(model: nnx.Module) -> dict[str, float]:
    graphdef, params, frozen = nnx.split(model, trainable, ...)
    options = {}
    if reference is not None:
      reference_graphdef, reference_state = nnx.split(reference)
      frozen = (frozen, reference_state)
      options["reference_graphdef"] = reference_graphdef
    if "step" not in compiled:  # the model's structure is fixed for the run: compile once
      objective = objective_fn(graphdef, **options)
      compiled["step"] = jax.jit(make_eval_step(objective))
      compiled["batch_axes"] = dict(objective.batch_axes or {})
    batches = make_batches(
      dataset, batch_size=batch_size * devices // hosts, config=config, num_epochs=1,
      process_index=jax.process_index(), process_count=hosts)
    total, sums = 0.0, {}
    for host_batch in batches:
      loss, metrics, weight = jax.device_get(compiled["step"](
        params, frozen, _place(host_batch, mesh, compiled["batch_axes"])))
      weight = float(weight)
      total += weight
      for name, value in {"loss": loss, **metrics}.items():
        sums[name] = sums.get(name, 0.0) + weight * float(value)
    if total == 0:
      raise ValueError("the evaluation split has nothing the loss counts (no completion token)")
    return {name: value / total for name, value in sums.items()}

  return evaluate


def make_export(model_config: ModelConfig, tokenizer: Any) -> Callable[[nnx.Module, str], None]:
  def export(model: nnx.Module, output_dir: str) -> None:
    from alignax.models import merge_lora, save_lora, save_pretrained

    if not model_config.use_peft:
      save_pretrained(model, output_dir)
    else:
      save_lora(model, output_dir)  # collective: every process calls the savers
      if model_config.merge_adapters:
        merged = os.path.join(output_dir, MERGED_DIR)
        save_pretrained(merge_lora(model), merged)
      if jax.process_index() != 0:
        return
      if model_config.merge_adapters:
        tokenizer.save_pretrained(merged)
      config_path = os.path.join(output_dir, "adapter_config.json")
      with open(config_path) as f:
        adapter = json.load(f)
      base = model_config.model_name_or_path
      # PEFT and transformers load the base model from here: a local directory as an absolute path.
      adapter["base_model_name_or_path"] = os.path.abspath(base) if os.path.isdir(base) else base
      with open(config_path, "w") as f:
        json.dump(adapter, f, indent=2, sort_keys=True)
    if jax.process_index() == 0:
      tokenizer.save_pretrained(output_dir)
      _copy_generation_config(model_config.model_name_or_path, output_dir)
      if model_config.use_peft and model_config.merge_adapters:
        _copy_generation_config(model_config.model_name_or_path,
                                os.path.join(output_dir, MERGED_DIR))

  return export


def _copy_generation_config(source: str, output_dir: str) -> None:
  """Carries a local checkpoint's ``generation_config.json`` into an export: its EOS ids (several
  in Llama-3 / Qwen chat checkpoints) are where ``transformers`` ``generate`` and
  ``alignax.sampling.checkpoint_stop_token_ids`` stop."""
  if os.path.isdir(source):
    path = os.path.join(source, GENERATION_CONFIG_NAME)
    if os.path.isfile(path):
      shutil.copyfile(path, os.path.join(output_dir, GENERATION_CONFIG_NAME))
    return
  from transformers import GenerationConfig

  try:  # a hub id: the file is in the local cache when the model was loaded from the hub
    GenerationConfig.from_pretrained(source).save_pretrained(output_dir)
  except OSError:  # the checkpoint has none (or it cannot be fetched): nothing to carry over
    pass


def _record(output_dir: str, algorithm: str, model: ModelConfig, data: DataConfig,
            mesh: MeshConfig | jax.sharding.Mesh | None) -> None:
  """Adds the model, data and mesh options to the ``run_config.json`` that ``fit`` wrote."""
  path = os.path.join(output_dir, RUN_CONFIG_FILE)
  if jax.process_index() != 0 or not os.path.exists(path):
    return
  with open(path) as f:
    record = json.load(f)
  record.update(algorithm=algorithm, model_config=dataclasses.asdict(model),
                data_config=dataclasses.asdict(data))
  if isinstance(mesh, MeshConfig):
    record["mesh_config"] = dataclasses.asdict(mesh)
  with open(path, "w") as f:
    json.dump(record, f, indent=2, default=str)


def run(algorithm: str, config: TrainingConfig, *, model: ModelConfig, data: DataConfig,
        mesh: MeshConfig | jax.sharding.Mesh | None = None,
        train_dataset: PreparedDataset | None = None,
        eval_dataset: PreparedDataset | None = None) -> FitResult:
  """Trains with one of :data:`ALGORITHMS` and writes a TRL-style ``output_dir``.

  Args:
    algorithm: ``sft`` | ``reward`` | ``dpo`` | ``kto`` | ``orpo`` | ``simpo`` | ``cpo``.
    config: the algorithm's config (``DPOConfig`` for ``dpo``, ...).
    model: the checkpoint and how to run it (LoRA included).
    data: where the data is and how it is batched (its ``dataset_test_split`` is evaluated when
      ``config.eval_strategy`` is not ``no``).
    mesh: a ``MeshConfig``, a mesh from ``alignax.make_mesh``, or None (every device on ``fsdp``).
    train_dataset, eval_dataset: already prepared data, used instead of loading ``data``'s splits.

  Returns:
    ``fit``'s result: the trained model, its final state and the logged history.

  Raises:
    ValueError: a config of the wrong class, no ``model_name_or_path``, or an option this
      algorithm cannot use (``use_peft`` for the reward model).
    alignax.data.DataError: a bad row (file, row and field named), unless ``skip_invalid``.
    NonFiniteError: a NaN/Inf loss or gradient (step and metric named).
  """
  from alignax.models import LoRAConfig, LoRAParam, apply_lora, lora_disabled
  from alignax.models.lora import LLAMA_TARGETS
  from alignax.models.tokenizer import load_tokenizer

  if algorithm not in ALGORITHMS:
    raise ValueError(f"algorithm={algorithm!r} is not supported; choose one of "
                     f"{sorted(ALGORITHMS)}")
  spec = ALGORITHMS[algorithm]
  if not isinstance(config, spec.config):
    raise ValueError(f"{algorithm} takes a {spec.config.__name__}, got "
                     f"{type(config).__name__}")
  if not model.model_name_or_path:
    raise ValueError("model_name_or_path is required (--model_name_or_path): a checkpoint "
                     "directory or a hub id")
  if model.use_peft and spec.head == "score":
    raise ValueError("use_peft=True is not supported for the reward model: its new score head "
                     "must train with the adapters, and the PEFT export writes adapters only; "
                     "train the full model")
  device_mesh = resolve_mesh(mesh)
  tokenizer = load_tokenizer(model.tokenizer_name_or_path or model.model_name_or_path)
  # The data first: a bad row stops the run before any model is loaded.
  train = (_load_data(data, tokenizer, task=spec.task, split="train") if train_dataset is None
           else train_dataset)
  if train.task != spec.task:
    raise ValueError(f"{algorithm} trains on {spec.task!r} data, got a {train.task!r} dataset")
  test = None
  if config.eval_strategy != "no":
    test = (_load_data(data, tokenizer, task=spec.task, split="test") if eval_dataset is None
            else eval_dataset)
  policy = load_model(model.model_name_or_path, model, mesh=device_mesh, head=spec.head,
                       seed=config.seed)
  trainable: Any = nnx.Param
  if model.use_peft:
    apply_lora(policy, LoRAConfig(rank=model.lora_r, alpha=model.lora_alpha,
                                  dropout=model.lora_dropout,
                                  target_modules=tuple(model.lora_target_modules or LLAMA_TARGETS),
                                  use_rslora=model.use_rslora), rngs=nnx.Rngs(config.seed))
    trainable = LoRAParam

  devices, hosts = data_parallel_size(device_mesh), jax.process_count()
  rows = config.per_device_train_batch_size * devices // hosts * config.gradient_accumulation_steps

  reference = None
  if spec.reference and not getattr(config, "reference_free", False):
    if not model.use_peft:
      reference = load_model(model.ref_model_name_or_path or model.model_name_or_path, model,
                              mesh=device_mesh, head=None, seed=config.seed)
    if config.precompute_ref_log_probs:
      from alignax.train.reference import precompute_reference_logps

      # Every host scores every example, in global batches (the reference module's contract).
      precompute = functools.partial(
        precompute_reference_logps, reference if reference is not None else lora_disabled(policy),
        batch_size=config.per_device_eval_batch_size * devices, config=data, mesh=device_mesh)
      train = precompute(train)
      test = None if test is None else precompute(test)
      # The step reads the batches' ref_logps instead: drop every handle on the reference so its
      # weights are freed before training (an fp32 8B reference is 32 GB over the mesh).
      del precompute
      reference = None

  batches = make_batches(train, batch_size=rows, config=data, process_index=jax.process_index(),
                         process_count=hosts)
  if data.packing:  # packed rows per epoch depend on the lengths: count them
    epoch_steps = sum(1 for _ in make_batches(train, batch_size=rows, config=data, num_epochs=1,
                                              process_index=jax.process_index(),
                                              process_count=hosts))
  else:
    epoch_steps = steps_per_epoch(len(train), batch_size=rows, process_count=hosts,
                                  drop_last=data.dataloader_drop_last)
  if epoch_steps == 0 and config.max_steps == -1:
    raise ValueError(f"{len(train)} training examples make no full batch of {rows * hosts} rows "
                     "(per_device_train_batch_size x data-parallel devices x "
                     "gradient_accumulation_steps); lower them or set max_steps")

  objective_fn = spec.objective(config)
  eval_fn = None
  if config.eval_strategy != "no":
    if config.eval_strategy == "epoch":
      config = dataclasses.replace(config, eval_steps=max(1, epoch_steps))
    eval_fn = make_evaluator(objective_fn, test, data=data,
                             batch_size=config.per_device_eval_batch_size, mesh=device_mesh,
                             trainable=trainable, reference=reference)

  generation_eval = _generation_eval(algorithm, config, model=model, data=data,
                                     tokenizer=tokenizer, reference=reference, mesh=device_mesh,
                                     policy=policy)
  try:
    result = fit(policy, objective_fn, batches, config, mesh=device_mesh,
                 steps_per_epoch=max(1, epoch_steps), trainable=trainable, reference=reference,
                 tokenizer=tokenizer, export=make_export(model, tokenizer),
                 eval_fn=_merged(eval_fn, generation_eval))
  finally:
    if generation_eval is not None:
      generation_eval.close()
  _record(config.output_dir, algorithm, model, data, mesh)
  return result


def _generation_eval(algorithm: str, config: TrainingConfig, *, model: ModelConfig,
                     data: DataConfig, tokenizer: Any, reference: nnx.Module | None,
                     mesh: jax.sharding.Mesh, policy: nnx.Module) -> Any:
  """``alignax.evaluation``'s in-training evaluation when ``config.eval_num_prompts`` is set:
  the policy against its starting point (the reference when there is one, the adapters-off view
  with LoRA, else a frozen copy of the checkpoint). Both stop on the checkpoint's EOS ids (else
  the tokenizer's), and the prompts and the tax set are checked against the policy's position
  table here, before the first step."""
  if not config.eval_num_prompts:
    return None
  if ALGORITHMS[algorithm].head == "score":
    raise ValueError(f"eval_num_prompts={config.eval_num_prompts}: the reward model does not "
                     "generate; its evaluation is eval_strategy's pair accuracy")
  from alignax.evaluation import resolve_stop_token_ids, trainer_generation_eval
  from alignax.models import lora_disabled

  stop_token_ids, _ = resolve_stop_token_ids(
    getattr(config, "stop_token_ids", None), model_name_or_path=model.model_name_or_path,
    revision=model.model_revision, tokenizer=tokenizer)
  if model.use_peft:
    baseline = lora_disabled
  elif reference is not None:
    baseline = reference
  else:
    baseline = load_model(model.model_name_or_path, model, mesh=mesh, head=None, seed=config.seed)
  return trainer_generation_eval(config, tokenizer=tokenizer, data=data, baseline=baseline,
                                 mesh=mesh, stop_token_ids=stop_token_ids,
                                 max_position_embeddings=policy.config.max_position_embeddings)


def _merged(*eval_fns: Callable[[nnx.Module], dict[str, float]] | None
            ) -> Callable[[nnx.Module], dict[str, float]] | None:
  """One ``eval_fn`` running each given one and merging their metrics (None: none given)."""
  given = [fn for fn in eval_fns if fn is not None]
  if not given:
    return None
  return lambda model: {k: v for fn in given for k, v in fn(model).items()}


def _trainer(algorithm: str) -> Callable[..., FitResult]:
  spec = ALGORITHMS[algorithm]

  def trainer(config: TrainingConfig, *, model: ModelConfig, data: DataConfig,
              mesh: MeshConfig | jax.sharding.Mesh | None = None,
              train_dataset: PreparedDataset | None = None,
              eval_dataset: PreparedDataset | None = None) -> FitResult:
    return run(algorithm, config, model=model, data=data, mesh=mesh, train_dataset=train_dataset,
               eval_dataset=eval_dataset)

  trainer.__name__ = trainer.__qualname__ = algorithm
  trainer.__doc__ = (f"Trains with ``{spec.config.__name__}`` on {spec.task!r} data: "
                     f"``run({algorithm!r}, config, model=, data=, mesh=)`` (see :func:`run`).")
  return trainer


sft = _trainer("sft")
reward = _trainer("reward")
dpo = _trainer("dpo")
kto = _trainer("kto")
orpo = _trainer("orpo")
simpo = _trainer("simpo")
cpo = _trainer("cpo")
