"""The engine's configuration: Hugging Face ``TrainingArguments``' names and meanings, so a TRL command
line carries over (``transformers.HfArgumentParser`` parses these dataclasses).

Batch sizes follow TRL: ``per_device_train_batch_size`` rows per data-parallel device (the devices
of the ``data`` and ``fsdp`` mesh axes; tensor-parallel devices share their rows), accumulated
``gradient_accumulation_steps`` times per optimizer step, so one step sees
``per_device_train_batch_size × (data × fsdp) × gradient_accumulation_steps`` rows.
"""

import dataclasses
from typing import Any

from alignax import _validate
from alignax.train.logger import resolve_report_to
from alignax.train.optim import LR_SCHEDULER_TYPES

EVAL_STRATEGIES = ("no", "steps", "epoch")


@dataclasses.dataclass
class TrainingConfig:
  """Options every trainer shares (TRL/transformers names; defaults are transformers' unless noted).

  Attributes:
    output_dir: where checkpoints, metrics and the final model go.
    learning_rate: peak learning rate (each trainer sets TRL's default for its algorithm).
    per_device_train_batch_size: rows per data-parallel device per micro-batch.
    gradient_accumulation_steps: micro-batches per optimizer step.
    max_steps: optimizer steps; -1 derives them from ``num_train_epochs``.
    num_train_epochs: passes over the training set when ``max_steps`` is -1.
    logging_steps: log every N steps (TRL: 10).
    save_steps: checkpoint every N steps (and at the end).
    save_total_limit: keep the newest N checkpoints (None: all).
    eval_strategy: ``no`` | ``steps`` (every ``eval_steps``) | ``epoch`` (once per epoch) on the
      data's ``dataset_test_split``.
    eval_steps: evaluate every N steps (None: ``logging_steps``'s value, as transformers).
    per_device_eval_batch_size: rows per data-parallel device per evaluation batch (prompts per
      sampler call in the generation evaluation).
    eval_num_prompts: every ``eval_steps``, sample from the policy on the first N prompts of the
      data's ``dataset_test_split`` and log ``eval/reward``, ``eval/win_rate`` (against the
      starting model), ``eval/kl`` (exact, to the starting model) and ``eval/tax``
      (``alignax.evaluation``); 0: off.
    eval_num_samples: completions per prompt in the generation evaluation.
    eval_max_completion_length: the most tokens per completion in the generation evaluation.
    eval_temperature: sampling temperature of the generation evaluation.
    eval_reward_funcs: reward functions of the generation evaluation: built-in names or
      ``module.function`` paths (online trainers default to their own rewards).
    eval_reward_model_name_or_path: reward models of the generation evaluation.
    eval_tax_dataset: held-out SFT rows whose NLL, policy minus starting model, is ``eval/tax``.
    seed: initialisation, shuffling and dropout randomness.
    lr_scheduler_type: ``linear`` | ``cosine`` | ``constant`` | ``constant_with_warmup``.
    warmup_steps, warmup_ratio: linear warmup (steps win when > 0).
    weight_decay: AdamW's decoupled weight decay.
    adam_beta1, adam_beta2, adam_epsilon: Adam's constants.
    max_grad_norm: global-norm gradient clipping (0: none).
    report_to: ``none`` | ``all`` | one or more of ``tensorboard``, ``wandb`` (``--report_to
      tensorboard wandb``, as transformers; ``metrics.jsonl`` is always written).
    run_name: the run's name in TensorBoard / W&B.
    resume_from_checkpoint: a ``checkpoint-N`` directory, or ``true`` for the latest in
      ``output_dir``.
    disable_tqdm: no progress bar.

  The compute dtype, remat policy and mesh belong to the model (``from_pretrained(path, mesh=,
  dtype="bf16", remat=)``), so they are not options here.
  """

  output_dir: str
  learning_rate: float = 5e-5
  per_device_train_batch_size: int = 8
  gradient_accumulation_steps: int = 1
  max_steps: int = -1
  num_train_epochs: float = 3.0
  logging_steps: int = 10
  save_steps: int = 500
  save_total_limit: int | None = None
  eval_strategy: str = dataclasses.field(default="no", metadata={"choices": EVAL_STRATEGIES})
  eval_steps: int | None = None
  per_device_eval_batch_size: int = 8
  eval_num_prompts: int = 0
  eval_num_samples: int = 2
  eval_max_completion_length: int = 64
  eval_temperature: float = 1.0
  eval_reward_funcs: list[str] | None = None
  eval_reward_model_name_or_path: list[str] | None = None
  eval_tax_dataset: str | None = None
  seed: int = 42
  lr_scheduler_type: str = "linear"
  warmup_steps: int = 0
  warmup_ratio: float = 0.0
  weight_decay: float = 0.0
  adam_beta1: float = 0.9
  adam_beta2: float = 0.999
  adam_epsilon: float = 1e-8
  max_grad_norm: float = 1.0
  # A factory default: HfArgumentParser drops a plain default of a list flag (it parses None).
  report_to: list[str] | str = dataclasses.field(default_factory=lambda: ["none"])
  run_name: str | None = None
  resume_from_checkpoint: str | None = None
  disable_tqdm: bool = False

  def __post_init__(self):
    for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "logging_steps",
                 "save_steps", "per_device_eval_batch_size"):
      _validate.positive_int(name, getattr(self, name))
    if self.eval_steps is not None:
      _validate.positive_int("eval_steps", self.eval_steps)
    if isinstance(self.eval_num_prompts, bool) or not isinstance(self.eval_num_prompts, int) or \
        self.eval_num_prompts < 0:
      raise ValueError(f"eval_num_prompts must be an int >= 0 (0: off), got "
                       f"{self.eval_num_prompts!r}")
    _validate.positive_int("eval_num_samples", self.eval_num_samples)
    _validate.positive_int("eval_max_completion_length", self.eval_max_completion_length)
    _validate.positive("eval_temperature", self.eval_temperature)
    if self.max_steps != -1:
      _validate.positive_int("max_steps", self.max_steps)
    _validate.positive("learning_rate", self.learning_rate)
    _validate.positive("num_train_epochs", self.num_train_epochs)
    _validate.choice("lr_scheduler_type", self.lr_scheduler_type, LR_SCHEDULER_TYPES)
    _validate.choice("eval_strategy", self.eval_strategy, EVAL_STRATEGIES)
    resolve_report_to(self.report_to)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


# --- per-algorithm configs: TRL's trainer configs extend TrainingArguments the same way ----------

# alignax.AGG_MODES less the one that needs a fixed length normaliser.
SFT_LOSS_AGG_MODES = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum")


@dataclasses.dataclass
class SFTConfig(TrainingConfig):
  """Supervised fine-tuning (TRL's ``SFTConfig``): the NLL of completion tokens.

  Attributes:
    loss_agg_mode: how token losses reduce (``alignax.sft_loss``): ``token_mean`` (TRL's: one
      mean over every completion token of the batch), ``seq_mean_token_mean`` or
      ``seq_mean_token_sum``.
  """

  learning_rate: float = 2e-5
  loss_agg_mode: str = dataclasses.field(default="token_mean",
                                         metadata={"choices": SFT_LOSS_AGG_MODES})

  def __post_init__(self):
    super().__post_init__()
    _validate.choice("loss_agg_mode", self.loss_agg_mode, SFT_LOSS_AGG_MODES)


@dataclasses.dataclass
class RewardConfig(TrainingConfig):
  """A Bradley-Terry reward model (TRL's ``RewardConfig``).

  Attributes:
    center_rewards_coefficient: weight of ``mean((r_c + r_r)^2)`` that keeps rewards centred
      (Eisenstein et al. 2023; TRL recommends 0.01); None disables it.
  """

  learning_rate: float = 1e-4
  center_rewards_coefficient: float | None = None

  def __post_init__(self):
    super().__post_init__()
    if self.center_rewards_coefficient is not None:
      _validate.non_negative("center_rewards_coefficient", self.center_rewards_coefficient)


@dataclasses.dataclass
class DPOConfig(TrainingConfig):
  """Direct preference optimisation (TRL's ``DPOConfig``; Rafailov et al. 2023).

  Attributes:
    beta: the KL coefficient β.
    loss_type: one or more of ``alignax.DPO_LOSS_TYPES`` (a list sums them, weighted by
      ``loss_weights``).
    loss_weights: one weight per loss type (None: all 1).
    label_smoothing: ε of the cDPO / robust / exo losses.
    rpo_alpha: weight of the chosen completions' NLL (RPO, Pang et al. 2024); None disables it.
    reference_free: compare against a uniform reference (no reference model).
    precompute_ref_log_probs: score the training set with the reference once before training, so
      no reference forward runs in the step.
  """

  learning_rate: float = 1e-6
  beta: float = 0.1
  loss_type: list[str] | str = dataclasses.field(default_factory=lambda: ["sigmoid"])
  loss_weights: list[float] | None = None
  label_smoothing: float = 0.0
  rpo_alpha: float | None = None
  reference_free: bool = False
  precompute_ref_log_probs: bool = False

  def __post_init__(self):
    super().__post_init__()
    from alignax.losses.preference import DPO_LOSS_TYPES

    self.loss_type = [self.loss_type] if isinstance(self.loss_type, str) else list(self.loss_type)
    if not self.loss_type:
      raise ValueError("loss_type must name at least one loss")
    for name in self.loss_type:
      _validate.choice("loss_type", name, DPO_LOSS_TYPES)
    if self.loss_weights is not None and len(self.loss_weights) != len(self.loss_type):
      raise ValueError(f"loss_weights has {len(self.loss_weights)} weights for "
                       f"{len(self.loss_type)} loss types {self.loss_type}")
    _validate.non_negative("label_smoothing", self.label_smoothing)
    if self.rpo_alpha is not None:
      _validate.non_negative("rpo_alpha", self.rpo_alpha)
    _validate.positive("beta", self.beta)
    if self.reference_free and self.precompute_ref_log_probs:
      raise ValueError("reference_free=True has no reference to precompute; drop "
                       "precompute_ref_log_probs")


KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")


@dataclasses.dataclass
class KTOConfig(TrainingConfig):
  """Kahneman-Tversky optimisation on unpaired, labelled completions (TRL's ``KTOConfig``;
  Ethayarajh et al. 2024).

  Attributes:
    beta: the KL coefficient β.
    loss_type: ``kto`` | ``apo_zero_unpaired``.
    desirable_weight, undesirable_weight: weights of the desirable / undesirable losses.
    precompute_ref_log_probs: score the training set with the reference once before training.
  """

  learning_rate: float = 1e-6
  beta: float = 0.1
  loss_type: str = dataclasses.field(default="kto", metadata={"choices": KTO_LOSS_TYPES})
  desirable_weight: float = 1.0
  undesirable_weight: float = 1.0
  precompute_ref_log_probs: bool = False

  def __post_init__(self):
    super().__post_init__()
    _validate.positive("beta", self.beta)
    _validate.choice("loss_type", self.loss_type, KTO_LOSS_TYPES)
    _validate.non_negative("desirable_weight", self.desirable_weight)
    _validate.non_negative("undesirable_weight", self.undesirable_weight)


@dataclasses.dataclass
class ORPOConfig(TrainingConfig):
  """Odds-ratio preference optimisation, no reference model (TRL's ``ORPOConfig``; Hong et al.
  2024).

  Attributes:
    beta: λ, the weight of the odds-ratio term (TRL's name).
  """

  learning_rate: float = 1e-6
  beta: float = 0.1

  def __post_init__(self):
    super().__post_init__()
    _validate.positive("beta", self.beta)


@dataclasses.dataclass
class SimPOConfig(TrainingConfig):
  """SimPO, length-normalised rewards with a target margin, no reference model (Meng et al.
  2024; the SimPO authors' names).

  Attributes:
    beta: the reward scale β.
    gamma_beta_ratio: the target margin γ over β.
    label_smoothing: ε of the cDPO-smoothed sigmoid loss.
    loss_type: ``sigmoid`` | ``hinge``.
  """

  learning_rate: float = 1e-6
  beta: float = 2.0
  gamma_beta_ratio: float = 0.25
  label_smoothing: float = 0.0
  loss_type: str = dataclasses.field(default="sigmoid", metadata={"choices": ("sigmoid", "hinge")})

  def __post_init__(self):
    super().__post_init__()
    _validate.positive("beta", self.beta)
    _validate.choice("loss_type", self.loss_type, ("sigmoid", "hinge"))
    _validate.non_negative("gamma_beta_ratio", self.gamma_beta_ratio)
    _validate.non_negative("label_smoothing", self.label_smoothing)


@dataclasses.dataclass
class CPOConfig(TrainingConfig):
  """Contrastive preference optimisation: reference-free DPO plus α·NLL of the chosen completions
  (TRL's ``CPOConfig``; Xu et al. 2024).

  Attributes:
    beta: the KL coefficient β.
    loss_type: ``sigmoid`` | ``hinge`` | ``ipo``.
    label_smoothing: ε of the cDPO-smoothed sigmoid loss.
    cpo_alpha: weight of the NLL term.
  """

  learning_rate: float = 1e-6
  beta: float = 0.1
  loss_type: str = dataclasses.field(default="sigmoid",
                                     metadata={"choices": ("sigmoid", "hinge", "ipo")})
  label_smoothing: float = 0.0
  cpo_alpha: float = 1.0

  def __post_init__(self):
    super().__post_init__()
    _validate.positive("beta", self.beta)
    _validate.choice("loss_type", self.loss_type, ("sigmoid", "hinge", "ipo"))
    _validate.non_negative("label_smoothing", self.label_smoothing)
    _validate.non_negative("cpo_alpha", self.cpo_alpha)


# --- the model and the devices -----------------------------------------------------------------


@dataclasses.dataclass
class ModelConfig:
  """Which checkpoint to train and how to run it (TRL's ``ModelConfig`` names where TRL has one).

  Attributes:
    model_name_or_path: a Hugging Face checkpoint directory or hub id.
    ref_model_name_or_path: the DPO/KTO reference (default: the policy's checkpoint).
    tokenizer_name_or_path: where the tokenizer is (default: ``model_name_or_path``).
    model_revision: hub branch, tag or commit.
    dtype: compute dtype (``float32``, ``bfloat16``, ...); parameters and optimizer state stay fp32.
    bf16: TRL's flag: compute in bfloat16 (same as ``dtype=bfloat16``). Off by default, where
      TRL 1.x turns it on: fp32 compute is what reproduces ``transformers``' logits exactly and
      what a CPU runs fastest; pass ``--bf16`` on accelerators.
    attention_impl: the attention kernel (``alignax.attention``'s ``impl``).
    remat: rematerialisation policy (``full``, ``dots``, ``dots_with_no_batch_dims``).
    gradient_checkpointing: TRL's flag: ``remat="full"`` when ``remat`` is unset. Off by default
      (TRL 1.x: on); it trades compute for memory and changes no result.
    use_peft: train LoRA adapters instead of the full model.
    lora_r, lora_alpha: the adapters' rank and α (scale α/r).
    lora_dropout: dropout on the adapters' input; only 0 is supported by the training step.
    lora_target_modules: projection names to adapt (None or PEFT's ``all-linear``: every
      linear projection of the decoder layers, the output head excluded).
    use_rslora: the rank-stabilised scale α/√r.
    merge_adapters: also write the merged model (base + adapters) to ``output_dir/merged``.
  """

  model_name_or_path: str | None = None
  ref_model_name_or_path: str | None = None
  tokenizer_name_or_path: str | None = None
  model_revision: str | None = None
  dtype: str = "float32"
  bf16: bool = False
  attention_impl: str = "auto"
  remat: str | None = None
  gradient_checkpointing: bool = False
  use_peft: bool = False
  lora_r: int = 16
  lora_alpha: float = 32.0
  lora_dropout: float = 0.0
  # A YAML scalar may be a string. In this order HfArgumentParser reads the union as a list flag
  # (``--lora_target_modules q_proj v_proj``).
  lora_target_modules: list[str] | None | str = None
  use_rslora: bool = False
  merge_adapters: bool = False

  def __post_init__(self):
    from alignax.models.decoder import REMAT_POLICIES
    from alignax.models.hub import parse_dtype

    parse_dtype(self.dtype, name="dtype")
    if self.bf16 and str(parse_dtype(self.dtype, name="dtype")) not in ("float32", "bfloat16"):
      raise ValueError(f"bf16=True conflicts with dtype={self.dtype!r}")
    if self.remat is not None:
      _validate.choice("remat", self.remat, REMAT_POLICIES)
    if isinstance(self.lora_target_modules, str):  # a YAML scalar, or PEFT's string form
      self.lora_target_modules = [self.lora_target_modules]
    if self.lora_target_modules is not None and "all-linear" in self.lora_target_modules:
      # PEFT's shorthand (TRL passes it through): every linear layer but the output head.
      if len(self.lora_target_modules) > 1:
        raise ValueError(f"lora_target_modules={self.lora_target_modules}: 'all-linear' already "
                         "names every projection; give it alone")
      self.lora_target_modules = None
    _validate.positive_int("lora_r", self.lora_r)
    _validate.positive("lora_alpha", self.lora_alpha)
    if self.lora_dropout != 0:
      raise ValueError(f"lora_dropout={self.lora_dropout}: the training step runs the model "
                       "without dropout randomness, so only lora_dropout=0 is supported")
    if self.merge_adapters and not self.use_peft:
      raise ValueError("merge_adapters=True needs use_peft=True (there are no adapters to merge)")

  @property
  def compute_dtype(self) -> str:
    return "bfloat16" if self.bf16 else self.dtype

  @property
  def remat_policy(self) -> str | None:
    return self.remat or ("full" if self.gradient_checkpointing else None)


@dataclasses.dataclass
class MeshConfig:
  """The device mesh and, for multi-host runs, the JAX distributed service.

  Attributes:
    mesh_data, mesh_fsdp, mesh_tensor: axis sizes of ``alignax.make_mesh`` (one may be -1: the
      remaining devices).
    coordinator_address: ``host:port`` of process 0 (None: JAX's environment variables, or a
      single process).
    num_processes: processes in the run.
    process_id: this process's index.
  """

  mesh_data: int = 1
  mesh_fsdp: int = -1
  mesh_tensor: int = 1
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None

  def __post_init__(self):
    sizes = {"mesh_data": self.mesh_data, "mesh_fsdp": self.mesh_fsdp,
             "mesh_tensor": self.mesh_tensor}
    for name, size in sizes.items():
      if size != -1:
        _validate.positive_int(name, size)
    if list(sizes.values()).count(-1) > 1:
      raise ValueError(f"only one of {list(sizes)} may be -1, got {sizes}")
    if self.num_processes is not None:
      _validate.positive_int("num_processes", self.num_processes)
    if self.process_id is not None and (self.process_id < 0 or (
        self.num_processes is not None and self.process_id >= self.num_processes)):
      raise ValueError(f"process_id={self.process_id} must lie in [0, num_processes="
                       f"{self.num_processes})")

  def make_mesh(self) -> Any:
    from alignax.sharding import make_mesh

    return make_mesh(data=self.mesh_data, fsdp=self.mesh_fsdp, tensor=self.mesh_tensor)
