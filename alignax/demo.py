"""``alignax demo``: the whole post-training pipeline, offline, on a task a tiny model learns fast.

The task is single-digit addition: the prompt ``"3+4="`` has the one correct completion ``" 7"``,
so every policy's answers can be graded exactly. The demonstrations are imperfect, as human ones
are: on prompts with a carry (``"7+5="``) most demonstrators forget it and write ``" 2"``. The demo
builds, under ``--output_dir``:

1. ``tokenizer/`` and ``base/``: the offline byte-level BPE tokenizer
   (:func:`alignax.build_tiny_tokenizer`) and a randomly initialised Llama-style decoder;
2. ``sft/``: supervised fine-tuning on the demonstrations
   (``alignax.train.objectives.sft_objective``): the policy learns the task and the mistake;
3. ``reward/``: a Bradley-Terry reward model (``reward_objective``, initialised from the SFT
   policy, as in Ouyang et al. 2022) on generated preference pairs: the correct answer against the
   SFT policy's own sampled wrong answers (and plausible wrong numbers where it has none);
4. ``dpo/``: DPO (Rafailov et al. 2023; ``dpo_objective``) on the same pairs, with the SFT policy
   as the frozen reference and the NLL of the chosen answers added (RPO, Pang et al. 2024;
   ``--rpo_alpha 0`` for plain DPO, which on this task learns to run on past the answer);
5. ``grpo/``: GRPO (Shao et al. 2024; ``alignax.train.grpo``) from the SFT policy, on the task's
   verifiable reward (1 for the right number), with a KL penalty to the SFT policy;
6. ``ppo/``: PPO with a critic (Schulman et al. 2017, as Ouyang et al. 2022 and Huang et al. 2024
   run it; ``alignax.train.ppo``) from the SFT policy against the reward model of step 3, frozen,
   with a per-token KL penalty to the SFT policy; the critic starts from the reward model;

then grades the base, SFT, DPO, GRPO and PPO policies' greedy answers on every prompt and prints
a table: task accuracy, the reward model's score, the exact KL to the SFT reference along the
policy's own completion (summed over completion tokens) and the mean completion length. The
answers and their KL come from the library's evaluation
(:func:`alignax.evaluation.sample_completions`, ``alignax.token_kl``), the scores from its
reward-model scorer (:class:`alignax.rewards.RewardModelScorer`, which PPO trains against).
Each stage's directory is a normal ``fit`` output directory (``metrics.jsonl``,
``trainer_state.json``, the Hugging Face checkpoint); ``summary.json`` and the PNG plots
(``training_curves.png``, ``before_after.png``) sit at the root.

A stage is one function ``(run) -> dict`` (:data:`STAGES`); a policy stage returns its checkpoint
under ``"policy"`` and is graded with the others, so another stage plugs in as one more entry.

Usage::

  alignax demo --output_dir alignax-demo          # a few minutes on 2 CPU cores
  alignax demo --quick --output_dir /tmp/demo     # the CI budget

or from Python::

  from alignax.demo import DemoConfig, run_demo
  summary = run_demo(DemoConfig(output_dir="alignax-demo", quick=True))
  summary["policies"]["dpo"]["accuracy"]
"""

import dataclasses
import functools
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import transformers
from flax import nnx

from alignax import _validate, data
from alignax.data import DataConfig
from alignax.evaluation import PromptSet, SamplingOptions, load_prompts, sample_completions
from alignax.models import CausalLM, build_tiny_tokenizer, from_pretrained, save_pretrained
from alignax.models.config import config_from_hf
from alignax.rewards import RewardModelScorer
from alignax.sharding import make_mesh
from alignax.train.config import TrainingConfig
from alignax.train.loop import data_parallel_size, fit
from alignax.train.objectives import dpo_objective, reward_objective, sft_objective

SUMMARY_FILE = "summary.json"
CURVES_FILE = "training_curves.png"
BARS_FILE = "before_after.png"

# Optimizer steps per stage, and how often DPO grades its policy.
BUDGETS = {
  "full": {"sft": 400, "reward": 150, "dpo": 150, "grpo": 200, "ppo": 160, "eval_every": 25},
  "quick": {"sft": 400, "reward": 60, "dpo": 100, "grpo": 60, "ppo": 60, "eval_every": 20},
}

MAX_OPERAND = 9  # prompts a+b= with 0 <= a, b <= MAX_OPERAND


@dataclasses.dataclass
class DemoConfig:
  """Options of ``alignax demo`` (each is also a ``--flag``).

  Attributes:
    output_dir: where every stage, ``summary.json`` and the plots are written.
    quick: the CI budget (fewer reward, DPO, GRPO and PPO steps).
    seed: model initialisation, data order, sampling and the wrong answers.
    sft_steps, reward_steps, dpo_steps, grpo_steps, ppo_steps: optimizer steps per stage (None:
      the budget's, :data:`BUDGETS`); ``ppo_steps`` a multiple of ``ppo_epochs``.
    batch_size: rows (SFT), pairs (reward, DPO) or sampled answers (GRPO, PPO) per optimizer
      step.
    sft_learning_rate, reward_learning_rate, dpo_learning_rate, grpo_learning_rate,
      ppo_learning_rate: the learning rates (constant after a warmup over the first tenth of the
      steps; PPO's trains the policy and its critic).
    beta: DPO's β.
    rpo_alpha: weight of the chosen answers' NLL added to the DPO loss (RPO, Pang et al. 2024;
      TRL's ``rpo_alpha``); 0 gives plain DPO. Plain DPO lowers the likelihood of the chosen
      answers too, and on this task that of the stop token after them, so its completions run
      on past the answer as training goes on (the KL and length columns show it).
    grpo_beta: GRPO's KL coefficient (k3 estimator, to the SFT policy; 0: no reference).
    ppo_kl_coef: PPO's β, the per-token KL penalty (k1) to the SFT policy in its reward. With
      TRL's 0.05 (and a learning rate of 5e-4) the policy also learned where the quick budget's
      reward model is wrong (it scores some wrong answers, and the bare stop token, above the
      right one): the reward model's score rose and the task accuracy fell.
    ppo_epochs: PPO's passes over each rollout of ``batch_size`` answers (one optimizer step
      each).
    ppo_temperature: the temperature PPO samples at (and divides its training logits by).
    demos_per_prompt: SFT demonstrations per prompt.
    carry_error_rate: share of the demonstrations of a prompt with a carry (sum >= 10) that
      forget it (the systematic mistake SFT imitates and preference learning removes).
    pairs_per_prompt: preference pairs per prompt (one correct answer against as many wrong).
    samples_per_prompt: completions sampled from the SFT policy per prompt to find its mistakes;
      also GRPO's group size.
    hidden_size, num_layers: the decoder's width and depth.
    devices: devices to train on (the first N; -1: all). The model is tiny, so one device is
      fastest; more shard the batch and the parameters (fsdp) over them.
    eval_every: grade the DPO policy every N steps (None: the budget's).
    plots: write the PNG plots (needs matplotlib).
    progress: show progress bars.
  """

  output_dir: str = "alignax-demo"
  quick: bool = False
  seed: int = 0
  sft_steps: int | None = None
  reward_steps: int | None = None
  dpo_steps: int | None = None
  grpo_steps: int | None = None
  ppo_steps: int | None = None
  batch_size: int = 32
  sft_learning_rate: float = 3e-3
  reward_learning_rate: float = 1e-3
  dpo_learning_rate: float = 1e-3
  grpo_learning_rate: float = 5e-4
  ppo_learning_rate: float = 3e-4
  beta: float = 0.1
  rpo_alpha: float = 1.0
  grpo_beta: float = 0.04
  ppo_kl_coef: float = 0.1
  ppo_epochs: int = 4
  ppo_temperature: float = 1.0
  demos_per_prompt: int = 5
  carry_error_rate: float = 0.6
  pairs_per_prompt: int = 4
  samples_per_prompt: int = 8
  hidden_size: int = 64
  num_layers: int = 2
  devices: int = 1
  eval_every: int | None = None
  plots: bool = True
  progress: bool = True

  def __post_init__(self):
    if not isinstance(self.output_dir, str) or not self.output_dir:
      raise ValueError(f"output_dir must be a non-empty path, got {self.output_dir!r}")
    for name in ("quick", "plots", "progress"):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
    for name in ("sft_steps", "reward_steps", "dpo_steps", "grpo_steps", "ppo_steps",
                 "eval_every"):
      if getattr(self, name) is not None:
        _validate.positive_int(name, getattr(self, name))
    for name in ("batch_size", "demos_per_prompt", "pairs_per_prompt", "samples_per_prompt",
                 "hidden_size", "num_layers", "ppo_epochs"):
      _validate.positive_int(name, getattr(self, name))
    for name in ("sft_learning_rate", "reward_learning_rate", "dpo_learning_rate",
                 "grpo_learning_rate", "ppo_learning_rate", "beta", "ppo_temperature"):
      _validate.positive(name, getattr(self, name))
    _validate.non_negative("grpo_beta", self.grpo_beta)
    _validate.non_negative("ppo_kl_coef", self.ppo_kl_coef)
    # Checkpoints and the step count fall between PPO's rollouts.
    ppo_steps = self.steps()["ppo"]
    if ppo_steps % self.ppo_epochs:
      raise ValueError(f"ppo_steps={ppo_steps} must be a multiple of ppo_epochs={self.ppo_epochs}"
                       " (each rollout gets all its optimizer steps)")
    _validate.non_negative("rpo_alpha", self.rpo_alpha)
    if not isinstance(self.carry_error_rate, (int, float)) or not (
        0 <= self.carry_error_rate <= 1):
      raise ValueError(f"carry_error_rate must lie in [0, 1], got {self.carry_error_rate!r}")
    if self.devices != -1:
      _validate.positive_int("devices", self.devices)
    if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
      raise ValueError(f"seed must be a non-negative int, got {self.seed!r}")
    # 4 query heads of equal width, 2 KV heads.
    if self.hidden_size % 8:
      raise ValueError(f"hidden_size must be a multiple of 8 (4 attention heads of an even "
                       f"width), got {self.hidden_size}")

  def steps(self) -> dict[str, int]:
    """The resolved step counts: ``sft``, ``reward``, ``dpo``, ``grpo``, ``ppo`` and
    ``eval_every``."""
    budget = BUDGETS["quick" if self.quick else "full"]
    given = {"sft": self.sft_steps, "reward": self.reward_steps, "dpo": self.dpo_steps,
             "grpo": self.grpo_steps, "ppo": self.ppo_steps, "eval_every": self.eval_every}
    return {name: given[name] or budget[name] for name in budget}


# --- the task ----------------------------------------------------------------------------------


def addition_task() -> tuple[list[str], list[int]]:
  """Every prompt ``"a+b="`` (``0 <= a, b <= 9``) and its answer ``a + b``."""
  pairs = [(a, b) for a in range(MAX_OPERAND + 1) for b in range(MAX_OPERAND + 1)]
  return [f"{a}+{b}=" for a, b in pairs], [a + b for a, b in pairs]


def answer_text(n: int) -> str:
  return f" {n}"


def demonstrations(prompts: Sequence[str], answers: Sequence[int], *, per_prompt: int,
                   carry_error_rate: float) -> list[dict[str, str]]:
  """SFT rows from demonstrators who forget the carry: on a prompt whose sum is 10 or more,
  ``round(carry_error_rate * per_prompt)`` of its ``per_prompt`` demonstrations write the sum less
  ten (``"7+5="`` -> ``" 2"``); the rest, and every demonstration of the other prompts, are right.
  An imitating policy learns the mistake; a judge that checks answers does not reward it."""
  wrong = round(carry_error_rate * per_prompt)
  rows = []
  for prompt, answer in zip(prompts, answers):
    for k in range(per_prompt):
      shown = answer - 10 if answer >= 10 and k < wrong else answer
      rows.append({"prompt": prompt, "completion": answer_text(shown)})
  return rows


def parse_answer(text: str) -> int | None:
  """The integer a completion states, or None when it is not exactly one number."""
  text = text.strip()
  return int(text) if text.isdigit() else None


def plausible_wrong_answers(a: int, b: int) -> list[int]:
  """Mistakes a student makes on ``a + b``: off by one or two, ten or the other operation."""
  right = a + b
  candidates = [right - 1, right + 1, right - 2, right + 2, right + 10, right - 10, a * b,
                abs(a - b), a, b]
  out = []
  for c in candidates:
    if 0 <= c <= 2 * MAX_OPERAND + 10 and c != right and c not in out:
      out.append(c)
  return out


# --- building the tokenizer and the base model --------------------------------------------------


def build_base(output_dir: str, *, hidden_size: int, num_layers: int, seed: int):
  """The offline tokenizer in ``output_dir/tokenizer`` and a random Llama-style decoder with its
  vocabulary in ``output_dir/base``; returns ``(tokenizer, base_path)``."""
  tokenizer = build_tiny_tokenizer(os.path.join(output_dir, "tokenizer"))
  hf = dict(model_type="llama", vocab_size=len(tokenizer), hidden_size=hidden_size,
            intermediate_size=2 * hidden_size, num_hidden_layers=num_layers,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
            rms_norm_eps=1e-5, tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
  base = os.path.join(output_dir, "base")
  save_pretrained(CausalLM(config_from_hf(hf), rngs=nnx.Rngs(seed)), base)
  tokenizer.save_pretrained(base)
  return tokenizer, base


# --- grading a policy ---------------------------------------------------------------------------


def prompt_set(tokenizer, prompts: Sequence[str], answers: Sequence[int]) -> PromptSet:
  """The task's prompts tokenised as every prompt trainer reads them (``task="prompt"``), with
  their answers as a column."""
  return load_prompts([{"prompt": p, "answer": a} for p, a in zip(prompts, answers)], tokenizer,
                      what="prompts")


def reward_scorer(reward_model, tokenizer, *, batch_size: int) -> RewardModelScorer:
  """The demo's reward model as the library scores reward models (the PPO trainer's scorer): on
  the token ids of prompt + completion, read at the last real token."""
  return RewardModelScorer(reward_model, tokenizer, name="reward_model", batch_size=batch_size)


def evaluate_policy(policy, *, reference, reward_model: RewardModelScorer, tokenizer,
                    prompts: PromptSet, max_new_tokens: int = 4) -> dict[str, float]:
  """Grades ``policy``'s greedy answer to every prompt of ``prompts`` (:func:`prompt_set`: the
  right answers in its ``answer`` column), through the library's evaluation
  (:func:`alignax.evaluation.sample_completions`: the sampler, then along each completion the
  exact sequence KL ``Σ_t KL(π(·|x, y_<t) ‖ π_ref(·|x, y_<t))`` over the whole vocabulary,
  ``alignax.token_kl``).

  Returns:
    ``accuracy`` (share of exactly correct answers), ``reward`` (mean reward-model score of
    prompt + completion), ``kl`` (mean over prompts of the exact sequence KL to ``reference``) and
    ``length`` (mean completion tokens, the stop token included).
  """
  options = SamplingOptions(max_new_tokens=max_new_tokens, greedy=True,
                            stop_token_ids=(tokenizer.eos_token_id,))
  # Greedy decoding ignores the key.
  samples = sample_completions(policy, prompts, tokenizer=tokenizer, num_samples=1,
                               options=options, key=jax.random.key(0), batch_size=len(prompts),
                               reference=reference)
  correct = [parse_answer(t) == a for t, a in zip(samples.texts, prompts.columns["answer"])]
  scores = reward_model.score_ids([[*map(int, p), *c]
                                   for p, c in zip(prompts.ids, samples.completion_ids)])
  return {"accuracy": float(np.mean(correct)), "reward": float(np.mean(scores)),
          "kl": float(np.mean(samples.kl[:, 0])), "length": float(np.mean(samples.lengths))}


# --- the run ------------------------------------------------------------------------------------


@dataclasses.dataclass
class DemoRun:
  """What the stages share: the config, the mesh, the tokenizer, the task and the results so far
  (``checkpoints`` maps a stage name to its model directory)."""

  config: DemoConfig
  mesh: Any
  tokenizer: Any
  prompts: list[str]
  answers: list[int]
  checkpoints: dict[str, str]
  stages: dict[str, dict[str, Any]]
  pairs: list[dict[str, str]] | None = None

  def path(self, *parts: str) -> str:
    return os.path.join(self.config.output_dir, *parts)

  def load(self, name: str, **options):
    return from_pretrained(self.checkpoints[name], mesh=self.mesh, **options)

  def batch_rows(self) -> tuple[int, int]:
    """``(per-device rows, host rows)`` of one step: ``batch_size`` split over the data axes
    (``run_demo`` checks that it divides)."""
    return self.config.batch_size // data_parallel_size(self.mesh), self.config.batch_size

  def training_config(self, stage: str, *, steps: int, learning_rate: float, **options):
    per_device, _ = self.batch_rows()
    return TrainingConfig(
      output_dir=self.path(stage), learning_rate=learning_rate,
      per_device_train_batch_size=per_device, max_steps=steps, logging_steps=max(1, steps // 30),
      save_steps=steps, save_total_limit=1, lr_scheduler_type="constant_with_warmup",
      warmup_steps=max(1, steps // 10), seed=self.config.seed,
      disable_tqdm=not self.config.progress, **options)

  def data_config(self):
    return DataConfig(max_length=16, seed=self.config.seed)

  @functools.cached_property
  def prompt_set(self) -> PromptSet:
    return prompt_set(self.tokenizer, self.prompts, self.answers)

  def grader(self, reference, reward_model) -> Callable[[Any], dict[str, float]]:
    """:func:`evaluate_policy` on every prompt, against ``reference``, scored by ``reward_model``
    (a ``RewardModel``)."""
    scorer = reward_scorer(reward_model, self.tokenizer, batch_size=len(self.prompts))
    return functools.partial(evaluate_policy, reference=reference, reward_model=scorer,
                             tokenizer=self.tokenizer, prompts=self.prompt_set)


def _history(result) -> list[dict[str, Any]]:
  return [dict(entry) for entry in result.history]


def _announce(run: DemoRun, text: str) -> None:
  if run.config.progress:
    print(f"\n== {text}", file=sys.stderr, flush=True)


def sft_stage(run: DemoRun) -> dict[str, Any]:
  """Supervised fine-tuning on the demonstrations (:func:`demonstrations`)."""
  steps = run.config.steps()
  rows = demonstrations(run.prompts, run.answers, per_prompt=run.config.demos_per_prompt,
                        carry_error_rate=run.config.carry_error_rate)
  config = run.data_config()
  dataset = data.prepare_dataset(data.load_rows(rows), run.tokenizer, task="sft", config=config)
  model = run.load("base")
  _, host_rows = run.batch_rows()
  training = run.training_config("sft", steps=steps["sft"],
                                 learning_rate=run.config.sft_learning_rate)
  result = fit(model, sft_objective, data.make_batches(dataset, batch_size=host_rows,
                                                       config=config),
               training, mesh=run.mesh, tokenizer=run.tokenizer)
  return {"policy": training.output_dir, "history": _history(result)}


def make_preference_pairs(run: DemoRun, policy, *, seed: int) -> list[dict[str, str]]:
  """``pairs_per_prompt`` pairs per prompt: the correct answer (chosen) against the policy's own
  wrong answers, found by sampling ``samples_per_prompt`` completions at temperature 1 (most
  frequent first), topped up with :func:`plausible_wrong_answers` in random order."""
  config = run.config
  options = SamplingOptions(max_new_tokens=4, stop_token_ids=(run.tokenizer.eos_token_id,))
  texts = sample_completions(policy, run.prompt_set, tokenizer=run.tokenizer,
                             num_samples=config.samples_per_prompt, options=options,
                             key=jax.random.key(seed), batch_size=len(run.prompts)).texts
  rng = np.random.default_rng(seed)
  pairs = []
  for i, (prompt, answer) in enumerate(zip(run.prompts, run.answers)):
    drawn = texts[i * config.samples_per_prompt:(i + 1) * config.samples_per_prompt]
    counts: dict[str, int] = {}
    for text in drawn:
      # An empty completion (the stop token alone) is no answer to put in a pair.
      if text.strip() and parse_answer(text) != answer:
        counts[text] = counts.get(text, 0) + 1
    wrong = sorted(counts, key=lambda t: -counts[t])[:config.pairs_per_prompt]
    a, b = (int(x) for x in prompt[:-1].split("+"))
    extra = [answer_text(int(n)) for n in rng.permutation(plausible_wrong_answers(a, b))]
    wrong += [t for t in extra if t not in wrong][:config.pairs_per_prompt - len(wrong)]
    pairs += [{"prompt": prompt, "chosen": answer_text(answer), "rejected": t} for t in wrong]
  return pairs


def reward_stage(run: DemoRun) -> dict[str, Any]:
  """A Bradley-Terry reward model, initialised from the SFT policy, on preference pairs made of
  the SFT policy's mistakes; its accuracy is then measured on fresh pairs (one random plausible
  mistake per prompt, drawn anew, so some pairs may repeat training pairs)."""
  steps = run.config.steps()
  run.pairs = make_preference_pairs(run, run.load("sft"), seed=run.config.seed)
  config = run.data_config()
  dataset = data.prepare_dataset(data.load_rows(run.pairs), run.tokenizer, task="preference",
                                 config=config)
  model = run.load("sft", head="score", num_labels=1, seed=run.config.seed)
  _, host_rows = run.batch_rows()
  training = run.training_config("reward", steps=steps["reward"],
                                 learning_rate=run.config.reward_learning_rate)
  result = fit(model, reward_objective, data.make_batches(dataset, batch_size=host_rows,
                                                          config=config),
               training, mesh=run.mesh, tokenizer=run.tokenizer)

  rng = np.random.default_rng(run.config.seed + 1)
  fresh = []
  for prompt, answer in zip(run.prompts, run.answers):
    a, b = (int(x) for x in prompt[:-1].split("+"))
    fresh.append({"prompt": prompt, "chosen": answer_text(answer),
                    "rejected": answer_text(int(rng.choice(plausible_wrong_answers(a, b))))})
  fresh_set = data.prepare_dataset(data.load_rows(fresh), run.tokenizer, task="preference",
                                     config=config)
  batch = next(iter(data.make_batches(fresh_set, batch_size=len(fresh), config=config,
                                      num_epochs=1)))
  two, rows, length = batch["input_ids"].shape
  scores = result.model(jnp.asarray(batch["input_ids"].reshape(two * rows, length)),
                        jnp.asarray(batch["attention_mask"].reshape(two * rows, length))).scores
  accuracy = float(jnp.mean(scores[:rows, 0] > scores[rows:, 0]))
  return {"reward_model": training.output_dir, "history": _history(result),
          "num_pairs": len(run.pairs), "fresh_pair_accuracy": accuracy}


def dpo_stage(run: DemoRun) -> dict[str, Any]:
  """DPO on the reward stage's pairs, the SFT policy as the frozen reference, with ``rpo_alpha``
  times the chosen answers' NLL (RPO); the policy is graded every ``eval_every`` steps (accuracy,
  reward-model score, KL to the reference)."""
  steps = run.config.steps()
  if run.pairs is None:
    run.pairs = make_preference_pairs(run, run.load("sft"), seed=run.config.seed)
  config = run.data_config()
  dataset = data.prepare_dataset(data.load_rows(run.pairs), run.tokenizer, task="preference",
                                 config=config)
  policy, reference = run.load("sft"), run.load("sft")
  reward_model = run.load("reward", head="score", num_labels=1)
  _, host_rows = run.batch_rows()
  training = run.training_config("dpo", steps=steps["dpo"],
                                 learning_rate=run.config.dpo_learning_rate,
                                 eval_steps=steps["eval_every"])
  result = fit(policy, functools.partial(dpo_objective, beta=run.config.beta,
                                         rpo_alpha=run.config.rpo_alpha or None),
               data.make_batches(dataset, batch_size=host_rows, config=config), training,
               mesh=run.mesh, reference=reference, tokenizer=run.tokenizer,
               eval_fn=run.grader(reference, reward_model))
  return {"policy": training.output_dir, "history": _history(result)}


def task_reward(completions: Sequence[Any], answer: Sequence[int], **kwargs: Any) -> list[float]:
  """The verifiable reward (TRL's reward-function contract): 1 for exactly the right number."""
  del kwargs
  return [1.0 if parse_answer(str(c)) == int(a) else 0.0 for c, a in zip(completions, answer)]


def grpo_stage(run: DemoRun) -> dict[str, Any]:
  """GRPO (Shao et al. 2024) from the SFT policy with the verifiable :func:`task_reward`: groups
  of ``samples_per_prompt`` sampled answers per prompt and a k3 KL penalty to the SFT policy."""
  # Imported here: the online trainer pulls in the reward runner, which no other stage needs.
  from alignax.train.grpo import GRPOConfig, grpo

  steps = run.config.steps()
  group = run.config.samples_per_prompt
  per_device, _ = run.batch_rows()  # whole groups per device: checked by demo_mesh
  training = GRPOConfig(
    output_dir=run.path("grpo"), learning_rate=run.config.grpo_learning_rate,
    per_device_train_batch_size=per_device, max_steps=steps["grpo"],
    logging_steps=max(1, steps["grpo"] // 30), save_steps=steps["grpo"], save_total_limit=1,
    lr_scheduler_type="constant_with_warmup", warmup_steps=max(1, steps["grpo"] // 10),
    seed=run.config.seed, disable_tqdm=not run.config.progress, num_generations=group,
    max_completion_length=4, stop_token_ids=[run.tokenizer.eos_token_id],
    beta=run.config.grpo_beta, loss_type="grpo", log_completions=False)
  rows = [{"prompt": p, "answer": a} for p, a in zip(run.prompts, run.answers)]
  result = grpo(training, model=run.load("sft"), reward_funcs=[task_reward],
                tokenizer=run.tokenizer, train_dataset=rows, data=run.data_config(),
                mesh=run.mesh, reference=run.load("sft") if run.config.grpo_beta > 0 else None)
  return {"policy": training.output_dir, "history": _history(result)}


def ppo_stage(run: DemoRun) -> dict[str, Any]:
  """PPO (Schulman et al. 2017; as Ouyang et al. 2022 and Huang et al. 2024 run it for RLHF;
  :func:`alignax.train.ppo`) from the SFT policy against the reward stage's Bradley-Terry model,
  frozen: each round ``batch_size`` prompts get one sampled answer each, scored by the reward model
  at the end of the answer with a per-token k1 KL penalty to the SFT policy; the critic starts
  from the reward model's weights, advantages are GAE and whitened, and ``ppo_epochs`` clipped
  updates follow each rollout."""
  # Imported here: the PPO trainer is only this stage's.
  from alignax.train.ppo_trainer import PPOConfig, ppo

  steps = run.config.steps()
  per_device, _ = run.batch_rows()
  epochs = run.config.ppo_epochs
  training = PPOConfig(
    output_dir=run.path("ppo"), learning_rate=run.config.ppo_learning_rate,
    per_device_train_batch_size=per_device, max_steps=steps["ppo"], num_ppo_epochs=epochs,
    num_mini_batches=1, logging_steps=epochs, save_steps=steps["ppo"], save_total_limit=1,
    lr_scheduler_type="constant_with_warmup", warmup_steps=max(1, steps["ppo"] // 10),
    seed=run.config.seed, disable_tqdm=not run.config.progress, response_length=4,
    stop_token="eos", temperature=run.config.ppo_temperature, kl_coef=run.config.ppo_kl_coef,
    log_completions=False)
  rows = [{"prompt": p} for p in run.prompts]
  result = ppo(training, model=run.load("sft"),
               reward_model=run.load("reward", head="score", num_labels=1),
               tokenizer=run.tokenizer, train_dataset=rows, data=run.data_config(), mesh=run.mesh)
  return {"policy": training.output_dir, "history": _history(result)}


# name -> (stage function, what it does). Policy stages return {"policy": checkpoint dir}.
STAGES: dict[str, tuple[Callable[[DemoRun], dict[str, Any]], str]] = {
  "sft": (sft_stage, "supervised fine-tuning on demonstrations that often forget the carry"),
  "reward": (reward_stage, "a Bradley-Terry reward model on the SFT policy's mistakes"),
  "dpo": (dpo_stage, "DPO (+ RPO's NLL term) on the same pairs, the SFT policy as reference"),
  "grpo": (grpo_stage, "GRPO from the SFT policy on the task's verifiable reward"),
  "ppo": (ppo_stage, "PPO from the SFT policy against the frozen reward model"),
}


# --- reporting ----------------------------------------------------------------------------------

# Bar colours, one per policy in the table's order (base, sft, dpo, grpo, ppo).
_COLORS = ("#999999", "#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3")
_COLUMNS = (("accuracy", "task accuracy", "{:.1%}"), ("reward", "RM score", "{:+.3f}"),
            ("kl", "KL to SFT", "{:.3f}"), ("length", "mean length", "{:.2f}"))


def format_table(policies: dict[str, dict[str, float]]) -> str:
  """The before/after table, one row per policy."""
  header = ["policy", *(title for _, title, _ in _COLUMNS)]
  rows = [[name, *(fmt.format(metrics[key]) for key, _, fmt in _COLUMNS)]
          for name, metrics in policies.items()]
  widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
  line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths)))
  return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def write_plots(output_dir: str, stages: dict[str, dict[str, Any]],
                policies: dict[str, dict[str, float]]) -> list[str]:
  """``training_curves.png`` (each stage's loss and its key metrics: DPO's graded accuracy,
  reward-model score and KL during training, GRPO's task reward and KL, PPO's reward-model score
  of its sampled answers and KL) and ``before_after.png`` (the table as bars)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  panels = []
  for name, stage in stages.items():
    history = stage.get("history", [])
    panels.append((f"{name}: loss", name, history, ["loss"]))
    if name == "sft":
      panels.append((f"{name}: token accuracy", name, history, ["mean_token_accuracy"]))
    elif name == "reward":
      panels.append((f"{name}: pair accuracy", name, history, ["accuracy"]))
    elif name == "dpo":
      panels.append((f"{name}: implicit reward", name, history,
                     ["rewards/margins", "rewards/chosen", "rewards/rejected"]))
      panels.append((f"{name}: graded accuracy, RM score", name, history,
                     ["eval_accuracy", "eval_reward"]))
      panels.append((f"{name}: graded KL to SFT", name, history, ["eval_kl"]))
    elif name == "grpo":
      panels.append((f"{name}: task reward", name, history, ["reward"]))
      panels.append((f"{name}: KL to SFT (k3, per token)", name, history, ["kl"]))
    elif name == "ppo":
      panels.append((f"{name}: RM score of sampled answers", name, history,
                     ["objective/scores"]))
      panels.append((f"{name}: KL to SFT (k1, per answer)", name, history, ["objective/kl"]))
  columns = 3
  rows = -(-len(panels) // columns)
  fig, axes = plt.subplots(rows, columns, figsize=(4.5 * columns, 3.2 * rows), squeeze=False)
  for ax, (title, _, history, keys) in zip(axes.flat, panels):
    for key in keys:
      points = [(h["step"], h[key]) for h in history if key in h]
      if points:
        ax.plot(*zip(*points), marker="." if len(points) < 20 else None, label=key)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    if len(keys) > 1:
      ax.legend(fontsize=7)
  for ax in list(axes.flat)[len(panels):]:
    ax.axis("off")
  fig.tight_layout()
  curves = os.path.join(output_dir, CURVES_FILE)
  fig.savefig(curves, dpi=110)
  plt.close(fig)

  fig, axes = plt.subplots(1, len(_COLUMNS), figsize=(3.6 * len(_COLUMNS), 3.2))
  names = list(policies)
  for ax, (key, title, fmt) in zip(axes, _COLUMNS):
    values = [policies[n][key] for n in names]
    bars = ax.bar(names, values, color=[_COLORS[i % len(_COLORS)] for i in range(len(names))])
    for bar, value in zip(bars, values):
      ax.annotate(fmt.format(value), (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                  ha="center", va="bottom", fontsize=8)
    ax.set_title(title)
    ax.axhline(0, color="black", linewidth=0.5)
  fig.suptitle("before / after alignment (greedy answers to every prompt)")
  fig.tight_layout()
  bars_path = os.path.join(output_dir, BARS_FILE)
  fig.savefig(bars_path, dpi=110)
  plt.close(fig)
  return [curves, bars_path]


def demo_mesh(config: DemoConfig) -> jax.sharding.Mesh:
  """The first ``config.devices`` devices on the ``fsdp`` axis.

  Raises:
    ValueError: more devices than exist, or a ``batch_size`` they cannot split into whole GRPO
      groups.
  """
  available = jax.devices()
  count = len(available) if config.devices == -1 else config.devices
  if count > len(available):
    raise ValueError(f"devices={config.devices}, but only {len(available)} devices are available")
  if config.batch_size % count:
    raise ValueError(f"batch_size={config.batch_size} must be a multiple of the {count} "
                     f"data-parallel devices (devices={config.devices})")
  if (config.batch_size // count) % config.samples_per_prompt:
    raise ValueError(f"batch_size={config.batch_size} over {count} devices leaves "
                     f"{config.batch_size // count} rows per device, which hold no whole GRPO "
                     f"groups of samples_per_prompt={config.samples_per_prompt}")
  return make_mesh(fsdp=count, devices=available[:count])


def check_plotting(config: DemoConfig) -> None:
  """Fails before any training when plots are asked for and matplotlib is missing."""
  if config.plots:
    try:
      import matplotlib  # noqa: F401
    except ImportError as e:
      raise ValueError("plots=True needs matplotlib (pip install matplotlib); or pass "
                       "--plots false") from e


def run_demo(config: DemoConfig) -> dict[str, Any]:
  """Runs every stage of :data:`STAGES`, grades the base and every policy, writes ``summary.json``
  and the plots under ``config.output_dir``, and returns the summary.

  Returns:
    ``{"config", "steps", "stages": {name: {...}}, "policies": {name: {accuracy, reward, kl,
    length}}, "reward_model": {...}, "plots": [...], "wall_seconds"}``.
  """
  start = time.perf_counter()
  mesh = demo_mesh(config)
  check_plotting(config)
  os.makedirs(config.output_dir, exist_ok=True)
  # A rerun into the same directory starts afresh: fit appends to an existing metrics.jsonl.
  for name in ("tokenizer", "base", *STAGES):
    shutil.rmtree(os.path.join(config.output_dir, name), ignore_errors=True)
  tokenizer, base = build_base(config.output_dir, hidden_size=config.hidden_size,
                               num_layers=config.num_layers, seed=config.seed)
  prompts, answers = addition_task()
  run = DemoRun(config=config, mesh=mesh, tokenizer=tokenizer, prompts=prompts, answers=answers,
                checkpoints={"base": base}, stages={})
  for name, (stage, what) in STAGES.items():
    _announce(run, f"{name}: {what}")
    t0 = time.perf_counter()
    out = stage(run)
    run.stages[name] = {**out, "seconds": time.perf_counter() - t0}
    for key in ("policy", "reward_model"):
      if key in out:
        run.checkpoints[name] = out[key]

  _announce(run, f"grading the base and the {', '.join(n for n in run.stages if n != 'reward')} "
                 "policies")
  reference, reward_model = run.load("sft"), run.load("reward", head="score", num_labels=1)
  grade = run.grader(reference, reward_model)
  policy_names = ["base", *(n for n, s in run.stages.items() if "policy" in s)]
  policies = {name: grade(run.load(name)) for name in policy_names}

  summary = {
    "task": ("single-digit addition: 'a+b=' -> ' <a+b>', graded on all 100 prompts (greedy); "
             "the SFT demonstrations forget the carry"),
    "config": dataclasses.asdict(config), "steps": config.steps(),
    "stages": {name: {k: v for k, v in s.items() if k != "history"}
               for name, s in run.stages.items()},
    "policies": policies,
    "reward_model": {"path": run.checkpoints["reward"],
                     "fresh_pair_accuracy": run.stages["reward"]["fresh_pair_accuracy"]},
    "table": format_table(policies),
  }
  summary["plots"] = (write_plots(config.output_dir, run.stages, policies) if config.plots
                      else [])
  summary["wall_seconds"] = time.perf_counter() - start
  with open(os.path.join(config.output_dir, SUMMARY_FILE), "w") as f:
    json.dump(summary, f, indent=2)
  return summary


def main(argv: Sequence[str] | None = None) -> int:
  """``alignax demo [--quick] [--output_dir DIR] [...]``: returns 0 when the run finished, 2 on a
  bad flag or value."""
  argv = list(sys.argv[1:] if argv is None else argv)
  parser = transformers.HfArgumentParser(DemoConfig, prog="alignax demo",
                                         description=__doc__.split("\n\n")[0])
  try:
    (config,) = parser.parse_args_into_dataclasses(argv)
    demo_mesh(config)
    check_plotting(config)
  except SystemExit as e:  # --help (0) or argparse's own message (2)
    return int(e.code or 0)
  except (ValueError, TypeError) as e:
    print(f"alignax demo: error: {e}", file=sys.stderr)
    return 2
  summary = run_demo(config)
  stages = ",".join(summary["stages"])
  print(f"\nalignax demo: single-digit addition, {len(addition_task()[0])} prompts, greedy "
        f"answers; RM = the reward model's score, KL = to the SFT policy\n")
  print(summary["table"])
  print(f"\nreward model accuracy on fresh pairs (correct vs a random plausible mistake): "
        f"{summary['reward_model']['fresh_pair_accuracy']:.1%}")
  print(f"summary: {os.path.join(config.output_dir, SUMMARY_FILE)}")
  for path in summary["plots"]:
    print(f"plot:    {path}")
  print(f"stages:  {os.path.join(config.output_dir, '{' + stages + '}')}/ (metrics.jsonl, "
        f"checkpoints)")
  print(f"done in {summary['wall_seconds']:.0f} s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
