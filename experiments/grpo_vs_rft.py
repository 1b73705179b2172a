r"""Shao et al. (2024), "DeepSeekMath", §5.2.1 and Figs. 5 and 7: at an equal sample budget GRPO is
at least as good as online rejection-sampling fine-tuning (online RFT), which beats offline RFT by
a margin that grows over training; RL sharpens the output distribution (Pass@1 and Maj@k rise)
rather than adding coverage (Pass@k barely moves).

Task (synthetic addition, the protocol of B.3 scaled to 2 CPU cores). A prompt is ``terms``
two-digit operands, ``"a1 a0 + b1 b0 ="`` (one token per digit, ``+`` and ``=``); the answer is
the sum's three digits, least significant first (Lee et al. 2023, "Teaching Arithmetic to Small
Transformers": the reversed order makes each digit a function of the digits already written and a
carry). The protocol's three terms are ``terms=3``; the default is two, because on three terms
this decoder's SFT loss was still on its plateau (1.70 nats per digit, Pass@1 6 %) after 1500
steps of 128 problems, more than the 2-core budget allows, while on two terms 500 steps reach the
protocol's 30--40 % band. Answers have a fixed length of 3
tokens, so a completion needs no stop token and the reward is exact: 1 if the three digits are the
sum, else 0. The ``100**terms`` problems are numbered by :math:`i \mapsto (937 i + 12345) \bmod
100^{terms}` (a bijection: 937 is coprime to 10), and the last ``eval_problems`` indices are the
held-out set, which no method ever trains on.

Model: alignax's Llama decoder (``alignax.models.CausalLM``), ``hidden_size`` 64, 2 layers, 4
heads, a 12-token vocabulary. The SFT policy is trained on a noisy teacher: with probability
``noise`` (0.3) the target has one digit replaced by a different random digit, so even the
converged SFT policy puts at most 0.7 on the right answer; ``sft_steps`` is chosen so that its
Pass@1 at temperature 1 lands in the protocol's 30--40 % band (31.7 % at the defaults; its
greedy accuracy is 82 %: the noise flattens the distribution more than it moves the mode). Every
method starts from this one SFT policy (``sft_policy``: trained from ``sft_seed``, not from the
experiment's seed, computed eagerly once and cached), so the seeds differ only in the RL phase, as
every run of the paper starts from one DeepSeekMath-Instruct checkpoint.

Methods, at one sample budget of ``rl_steps * prompts_per_step * group_size`` completions each:

* RFT (Yuan et al. 2023): ``rft_samples`` completions per prompt from the SFT policy, once, for
  ``budget / rft_samples`` prompts; the correct ones are the data of ``rft_epochs`` epochs of SFT
  (``alignax.sft_loss`` on the correct completions of each shuffled minibatch of ``prompts_per_step
  * group_size`` samples, so every correct completion is seen once per epoch).
* Online RFT: each step samples ``group_size`` completions for each of ``prompts_per_step``
  prompts from the current policy and takes one SFT step on the correct ones.
* GRPO: the same samples, ``alignax.group_advantages`` (group mean and std), ``alignax.grpo_loss``
  with the k3 KL to the SFT policy in the loss, ``beta`` 0.04, and one update per batch (the
  ratio is 1: "the policy model only has a single update following each exploration stage").
* PPO (``ppo=True``): the same samples, a critic (``alignax.models.ValueModel``: the SFT policy's
  decoder with a fresh scalar head, as large as the policy), per-token rewards
  ``alignax.kl_penalized_rewards`` (k1, ``beta`` 0.04, the score on the last token),
  ``alignax.gae`` with :math:`\gamma = 1`, :math:`\lambda = 0.95`, whitened advantages and
  ``alignax.ppo_loss``, one update per batch.

All four share the optimiser and its learning rate (Adam, ``rl_lr`` 3e-4, not tuned per method; the
paper's 1e-6 is for a 7B model). The equal sample budget gives RFT ``rft_epochs`` (3) times the
updates of the online methods, as the protocol prescribes; ``--set rft_epochs=1`` equalises the
updates too.

The seeds' program is built to compile fast on CPU, one traced forward pass per role: online RFT,
GRPO and PPO are three lanes of one ``vmap`` over a method index; the checkpoints of every
learning curve are graded together after training. Sampling is a pure-JAX loop over the three
digits of one full forward pass (``sample_answers``), not
``alignax.sampling.generate``: ``generate`` arranges prompts on the host and runs its own jitted
loop, so it cannot sit inside the one ``jit(vmap(train))`` program that runs every seed, while a
3-token answer after a fixed-length prompt needs no cache, padding or stop handling.

Metrics on the ``eval_problems`` held-out problems: greedy accuracy; Pass@1 at temperature 1,
computed exactly as the mean probability of the correct answer (its three-token log-prob under
teacher forcing, so learning curves carry no sampling noise); Pass@k exactly as
:math:`E[1 - (1 - p)^k]`; Maj@k from ``eval_samples`` = k samples per problem (majority vote,
``maj_at_k``), with the sampled Pass@1 and Pass@k (``pass_at_k``, Chen et al. 2021) beside it.
Learning curves record the exact Pass@1 at ``curve_points`` points of each method's updates.

Criteria (B.3; points are percentage points of the held-out set, SE the standard error of the mean
over seeds, std(ddof=1)/sqrt(S)):

* (i) online RFT − RFT final Pass@1 ≥ 2 SE (paper: +2.4 on GSM8K, Fig. 5, read off the figure),
  and the gap grows: its mean over the last quarter of the curve exceeds that over the first.
* (ii) GRPO − online RFT final Pass@1 ≥ −1 SE (paper: +0.8, within one SE of one run).
* (iii) GRPO raises Pass@1 and Maj@k by ≥ 5 points over the SFT policy while Pass@k rises by ≤ 2
  points (Fig. 7: "RL enhances Maj@K but not Pass@K").
* (iv) ``ppo=True``: |PPO − GRPO| final Pass@1 ≤ 2 SE. GRPO's advantage is memory: the
  measurements ``policy_params`` and ``critic_params`` hold the parameter counts (PPO trains
  both). With ``ppo=False`` no PPO criterion is written and ``config.ppo`` says so.

Result at the defaults, 3 seeds (``alignax run experiments/grpo_vs_rft.py --seeds 3``; held-out
percentages, mean ± std over seeds): SFT Pass@1 31.7, Maj@16 65.5, Pass@16 98.1; RFT 88.2 ± 2.5 /
96.0 / 99.3; online RFT 59.9 ± 1.8 / 84.0 / 96.9; GRPO 54.5 ± 2.4 / 80.5 / 97.6; PPO 56.5 ± 0.9 /
81.1 / 97.6. (iii) and (iv) pass: RL sharpens (Pass@1 +23, Maj@16 +15, Pass@16 −0.5) and PPO
matches GRPO. (i) and (ii) fail: offline RFT is far ahead, and still ahead (69.0 vs 61.4, one
seed) with ``rft_epochs=1``, i.e. at equal updates too. The likely reason is the task, not the
methods: an answer without a scratchpad has exactly one correct completion, so RFT's filtered
samples are clean-teacher labels for the 98 % of prompts where 16 SFT samples hold the answer
(Pass@16), and there are no stale reasoning chains for online sampling to improve on; online RFT
also sees 16 prompts per step against RFT's 128. A scratchpad task with many correct chains is the
next step toward the paper's regime.

Run: ``alignax run experiments/grpo_vs_rft.py [--seeds 5] [--set rl_steps=200]`` or
``python -m experiments.grpo_vs_rft`` (same flags).
"""

import dataclasses
import functools
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import alignax as ax
from alignax import experiment
from alignax.models.config import config_from_hf

CLAIM = ("At an equal sample budget, GRPO >= online RFT > RFT (the online-vs-offline gap growing "
         "over training); RL raises Pass@1 and Maj@k but not Pass@k.")
PAPER = ("Z. Shao, P. Wang, Q. Zhu, R. Xu, J. Song, X. Bi, H. Zhang, M. Zhang, Y. K. Li, Y. Wu, "
         "D. Guo, DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language "
         "Models, 2024, arXiv:2402.03300, section 5.2 and Figs. 5 and 7")
DEFAULT_SEEDS = 5

PLUS, EQUALS = 10, 11
VOCAB_SIZE = 12
ANSWER_DIGITS = 3
OPERAND_BASE = 100  # two-digit operands
_MIX, _OFFSET = 937, 12_345  # i -> (937 i + 12345) mod 100**terms numbers the problems

METHODS = ("rft", "online_rft", "grpo", "ppo")
POLICIES = ("sft",) + METHODS
METRICS = ("pass1", "passk", "maj", "greedy", "pass1_sampled", "passk_sampled")

# What the paper reports (Fig. 5, Instruct 1.3B, GSM8K; a third party's reading of the figure).
PAPER_ONLINE_RFT_GAIN = 2.4
PAPER_GRPO_GAIN = 0.8


@dataclasses.dataclass(frozen=True)
class Config:
  """terms: operands per prompt (2-digit each); noise: the teacher's corruption rate.
  hidden_size, num_layers, num_heads: the decoder. sft_*: the SFT stage (shared by every seed,
  trained from ``sft_seed``). rl_steps x prompts_per_step x group_size: each method's sample
  budget; rl_lr: Adam's learning rate for every method. rft_samples, rft_epochs: RFT's samples
  per prompt and epochs. beta: the KL coefficient (GRPO k3 in the loss, PPO k1 in the reward);
  gae_lambda, vf_coef: PPO's. ppo: run PPO. eval_problems: held-out problems; eval_samples: the
  k of Maj@k and Pass@k. curve_points: points per learning curve."""
  terms: int = 2
  noise: float = 0.3
  hidden_size: int = 64
  num_layers: int = 2
  num_heads: int = 4
  sft_steps: int = 500
  sft_batch: int = 128
  sft_lr: float = 1e-3
  sft_seed: int = 0
  rl_steps: int = 200
  prompts_per_step: int = 16
  group_size: int = 8
  rl_lr: float = 3e-4
  rft_samples: int = 16
  rft_epochs: int = 3
  beta: float = 0.04
  gae_lambda: float = 0.95
  vf_coef: float = 0.1
  ppo: bool = True
  eval_problems: int = 1000
  eval_samples: int = 16
  curve_points: int = 10

  def __post_init__(self):
    if not 1 <= self.terms <= 3:
      raise ValueError(f"terms must be 1, 2 or 3 (three answer digits hold at most 3 * 99), got "
                       f"{self.terms}")
    if not 0 <= self.noise < 1:
      raise ValueError(f"noise must lie in [0, 1), got {self.noise}")
    for name in ("hidden_size", "num_layers", "num_heads", "sft_steps", "sft_batch", "rl_steps",
                 "prompts_per_step", "rft_samples", "rft_epochs", "eval_problems",
                 "eval_samples", "curve_points"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
    if self.group_size < 2:
      raise ValueError(f"group_size must be >= 2 (GRPO's group std), got {self.group_size}")
    if self.hidden_size % self.num_heads:
      raise ValueError(f"hidden_size={self.hidden_size} must be a multiple of "
                       f"num_heads={self.num_heads}")
    if self.rl_steps % self.curve_points:
      raise ValueError(f"rl_steps={self.rl_steps} must be a multiple of "
                       f"curve_points={self.curve_points}")
    budget = self.rl_steps * self.prompts_per_step * self.group_size
    if budget % self.rft_samples:
      raise ValueError(f"the sample budget rl_steps * prompts_per_step * group_size = {budget} "
                       f"must be a multiple of rft_samples={self.rft_samples}")
    if self.eval_problems >= OPERAND_BASE ** self.terms // 2:
      raise ValueError(f"eval_problems={self.eval_problems} must leave most of the "
                       f"{OPERAND_BASE ** self.terms} problems of terms={self.terms} for training")
    for name in ("sft_lr", "rl_lr"):
      if not getattr(self, name) > 0:
        raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
    if self.beta < 0 or self.vf_coef < 0 or not 0 <= self.gae_lambda <= 1:
      raise ValueError(f"need beta >= 0, vf_coef >= 0 and gae_lambda in [0, 1]; got "
                       f"beta={self.beta}, vf_coef={self.vf_coef}, gae_lambda={self.gae_lambda}")

  @property
  def methods(self) -> tuple[str, ...]:
    return METHODS if self.ppo else METHODS[:-1]


# ---------------------------------------------------------------------------------------------
# the task


def problem_operands(index: jax.Array, *, terms: int) -> jax.Array:
  """Operands ``[..., terms]`` of problems ``index`` (``[...]``, in ``[0, 100**terms)``)."""
  problem = (index * _MIX + _OFFSET) % OPERAND_BASE ** terms
  powers = OPERAND_BASE ** jnp.arange(terms)
  return (problem[..., None] // powers) % OPERAND_BASE


def train_problems(key: jax.Array, count: int, config: Config) -> jax.Array:
  """``count`` operand rows ``[count, terms]`` drawn uniformly from the training problems."""
  total = OPERAND_BASE ** config.terms
  index = jax.random.randint(key, (count,), 0, total - config.eval_problems)
  return problem_operands(index, terms=config.terms)


def eval_problems(config: Config) -> jax.Array:
  """The held-out operands ``[eval_problems, terms]``: the last indices of the numbering."""
  total = OPERAND_BASE ** config.terms
  return problem_operands(jnp.arange(total - config.eval_problems, total), terms=config.terms)


def encode_prompts(operands: jax.Array) -> jax.Array:
  """``[n, terms]`` operands -> prompt tokens ``[n, 3 * terms]``: ``a1 a0 + b1 b0 ... =``."""
  n, terms = operands.shape
  digits = jnp.stack([operands // 10, operands % 10], axis=-1)  # [n, terms, 2]
  signs = jnp.full((n, terms, 1), PLUS).at[:, -1].set(EQUALS)
  return jnp.concatenate([digits, signs], axis=-1).reshape(n, 3 * terms)


def answer_digits(total: jax.Array) -> jax.Array:
  """The answer tokens ``[..., 3]`` of sums ``[...]``: ones, tens, hundreds."""
  return jnp.stack([total % 10, (total // 10) % 10, total // 100], axis=-1)


def answer_value(digits: jax.Array) -> jax.Array:
  """The number that answer tokens ``[..., 3]`` (least significant first) spell."""
  return digits[..., 0] + 10 * digits[..., 1] + 100 * digits[..., 2]


def noisy_answers(key: jax.Array, answers: jax.Array, *, noise: float) -> jax.Array:
  """The noisy teacher: with probability ``noise`` one uniformly chosen digit of each answer
  ``[n, 3]`` is replaced by a different uniformly chosen digit."""
  k_bad, k_where, k_shift = jax.random.split(key, 3)
  n = answers.shape[0]
  bad = jax.random.bernoulli(k_bad, noise, (n,))
  where = jax.nn.one_hot(jax.random.randint(k_where, (n,), 0, ANSWER_DIGITS), ANSWER_DIGITS,
                         dtype=answers.dtype)
  shift = jax.random.randint(k_shift, (n, 1), 1, 10)
  return (answers + where * shift * bad[:, None]) % 10


# ---------------------------------------------------------------------------------------------
# metrics


def pass_at_k(num_samples: int, num_correct: jax.Array, k: int) -> jax.Array:
  r"""Unbiased Pass@k from ``num_samples`` samples of which ``num_correct`` (``[...]``) are correct
  (Chen et al. 2021, "Evaluating Large Language Models Trained on Code", Eq. 1):
  :math:`1 - \binom{n-c}{k} / \binom{n}{k} = 1 - \prod_{i=n-c+1}^{n} (1 - k/i)`.

  Args:
    num_samples: n, the samples per problem.
    num_correct: c, integer ``[...]`` in ``[0, n]``.
    k: ``1 <= k <= n``.

  Returns:
    Pass@k per problem, ``[...]``.
  """
  if not 1 <= k <= num_samples:
    raise ValueError(f"k must lie in [1, num_samples={num_samples}], got {k}")
  i = jnp.arange(1, num_samples + 1, dtype=jnp.float32)
  factors = jnp.where(i > num_samples - jnp.asarray(num_correct)[..., None], 1 - k / i, 1.0)
  return 1 - jnp.prod(factors, axis=-1)


def maj_at_k(answers: jax.Array, truth: jax.Array) -> jax.Array:
  """Whether the majority vote of ``answers`` ``[..., k]`` equals ``truth`` ``[...]`` (Maj@k, as in
  Lewkowycz et al. 2022 and DeepSeekMath). A tie goes to the tied answer sampled first, which for
  i.i.d. samples is a uniformly random tie-break."""
  votes = jnp.sum(answers[..., :, None] == answers[..., None, :], axis=-1)
  winner = jnp.take_along_axis(answers, jnp.argmax(votes, axis=-1)[..., None], axis=-1)[..., 0]
  return winner == truth


def standard_error(values: np.ndarray) -> float:
  """Standard error of the mean over seeds, std(ddof=1)/sqrt(S); 0 for one seed."""
  values = np.asarray(values, np.float64)
  return float(values.std(ddof=1) / math.sqrt(values.size)) if values.size > 1 else 0.0


# ---------------------------------------------------------------------------------------------
# the experiment


def decoder_config(config: Config):
  hf = dict(model_type="llama", vocab_size=VOCAB_SIZE, hidden_size=config.hidden_size,
            intermediate_size=2 * config.hidden_size, num_hidden_layers=config.num_layers,
            num_attention_heads=config.num_heads, num_key_value_heads=config.num_heads,
            max_position_embeddings=4 * config.terms + 4, rms_norm_eps=1e-5,
            tie_word_embeddings=False)
  return config_from_hf(hf)


def _count(tree) -> int:
  return int(sum(x.size for x in jax.tree.leaves(tree)))


def _sft_fields(config: Config) -> Config:
  """``config`` with every field the SFT stage ignores at its default, so the SFT cache is shared
  by configurations (sweeps, the runner's vmapped and looped programs) that differ only there."""
  used = {"terms", "noise", "hidden_size", "num_layers", "num_heads", "sft_steps", "sft_batch",
          "sft_lr", "sft_seed", "eval_problems"}
  defaults = Config(terms=config.terms, eval_problems=config.eval_problems)
  return dataclasses.replace(defaults, **{f: getattr(config, f) for f in used})


@functools.lru_cache(maxsize=8)
def model_defs(config: Config) -> tuple[nnx.GraphDef, nnx.State, nnx.GraphDef, nnx.State]:
  """The policy's and the critic's graph definitions and parameter shapes (nothing allocated: an
  eager init would compile every initialiser op by op)."""
  decoder = decoder_config(config)
  policy = nnx.split(nnx.eval_shape(lambda: ax.CausalLM(decoder, rngs=nnx.Rngs(0))))
  critic = nnx.split(nnx.eval_shape(lambda: ax.ValueModel(decoder, rngs=nnx.Rngs(0))))
  return (*policy, *critic)


@functools.lru_cache(maxsize=4)
def _sft_policy_cached(config: Config) -> nnx.State:
  policy_def = model_defs(config)[0]
  decoder = decoder_config(config)
  optimizer = optax.adam(config.sft_lr)

  def loss(params, prompts, targets):
    ids = jnp.concatenate([prompts, targets], axis=1)
    logits = nnx.merge(policy_def, params)(ids[:, :-1]).logits[:, -ANSWER_DIGITS:]
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], axis=-1)[..., 0]
    return ax.sft_loss(logp, jnp.ones(targets.shape, bool))[0]

  def step(state, key):
    params, opt_state = state
    k_problems, k_noise = jax.random.split(key)
    operands = train_problems(k_problems, config.sft_batch, config)
    targets = noisy_answers(k_noise, answer_digits(operands.sum(-1)), noise=config.noise)
    grad = jax.grad(loss)(params, encode_prompts(operands), targets)
    updates, opt_state = optimizer.update(grad, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), None

  @jax.jit
  def train(key):
    params = nnx.state(ax.CausalLM(decoder, rngs=nnx.Rngs(config.sft_seed)))
    state = (params, optimizer.init(params))
    return jax.lax.scan(step, state, jax.random.split(key, config.sft_steps))[0][0]

  return train(jax.random.key(config.sft_seed))


def sft_policy(config: Config) -> nnx.State:
  """The SFT policy's weights: ``sft_steps`` Adam steps of ``alignax.sft_loss`` on the noisy
  teacher's answers to random training problems, from the random init of ``sft_seed``.

  Computed eagerly (also when ``make_train`` is called inside the runner's ``jit``) and cached:
  it does not depend on the seed, so every seed, and the vmapped and looped programs, start from
  the same weights, and the seeds' program carries no SFT loop.
  """
  with jax.ensure_compile_time_eval():
    return _sft_policy_cached(_sft_fields(config))


def make_train(config: Config):
  """``train(key)``: every method's final metrics and learning curve from one SFT policy.

  The program is built to compile fast (one model forward per role): online RFT, GRPO and PPO are
  three lanes of one ``vmap`` over a method index, whose shared step samples, scores and takes one
  Adam step on a loss that selects the lane's objective (every lane carries a critic; only PPO's
  receives a gradient); the five policies are graded by one ``vmap`` over their stacked weights.
  """
  decoder = decoder_config(config)
  policy_def, policy_shapes, critic_def, critic_shapes = model_defs(config)
  online = tuple(m for m in config.methods if m != "rft")
  batch = config.prompts_per_step * config.group_size
  group_shape = (config.prompts_per_step, config.group_size, ANSWER_DIGITS)
  optimizer = optax.adam(config.rl_lr)
  eval_operands = eval_problems(config)
  eval_prompts = encode_prompts(eval_operands)
  eval_truth = eval_operands.sum(-1)
  eval_answers = answer_digits(eval_truth)
  mask = jnp.ones((batch, ANSWER_DIGITS), bool)

  def answer_logprobs(params, prompts, answers):
    """log π(answer token | prefix), ``[n, 3]``, by teacher forcing."""
    ids = jnp.concatenate([prompts, answers], axis=1)
    logits = nnx.merge(policy_def, params)(ids[:, :-1]).logits[:, -ANSWER_DIGITS:]
    logp = jax.nn.log_softmax(logits)
    return jnp.take_along_axis(logp, answers[..., None], axis=-1)[..., 0]

  def sample_answers(params, key, prompts, greedy):
    """Answers ``[n, 3]`` at temperature 1, or greedy where ``greedy`` (``[n]``) is set. Each digit
    is one forward pass over the whole fixed-length row: causal attention keeps the not yet
    written slots from mattering, and one traced forward serves all three digits."""
    model = nnx.merge(policy_def, params)
    n, prompt_len = prompts.shape
    ids = jnp.concatenate([prompts, jnp.zeros((n, ANSWER_DIGITS), prompts.dtype)], axis=1)

    def digit(t, ids):
      logits = jax.lax.dynamic_index_in_dim(model(ids[:, :-1]).logits, prompt_len - 1 + t,
                                            axis=1, keepdims=False)
      drawn = jax.random.categorical(jax.random.fold_in(key, t), logits)
      token = jnp.where(greedy, jnp.argmax(logits, -1), drawn).astype(ids.dtype)
      return jax.lax.dynamic_update_index_in_dim(ids, token, prompt_len + t, axis=1)

    return jax.lax.fori_loop(0, ANSWER_DIGITS, digit, ids)[:, prompt_len:]

  def p_correct(params):
    """π(correct answer) on each held-out problem, ``[eval_problems]``: the exact T=1 Pass@1."""
    return jnp.exp(answer_logprobs(params, eval_prompts, eval_answers).sum(-1))

  def with_checkpoints(step, state, key, updates):
    """Runs ``updates`` steps ``step(state, key_t) -> state``; returns the policy ``state[0]`` after
    each of ``curve_points`` equal chunks, stacked (the last is the final policy). They are graded
    together after training, so the program holds one held-out forward pass, not one per loop."""
    inner = updates // config.curve_points

    def chunk(state, chunk_key):
      state = jax.lax.fori_loop(0, inner, lambda t, s: step(s, jax.random.fold_in(chunk_key, t)),
                                state)
      return state, state[0]

    return jax.lax.scan(chunk, state, jax.random.split(key, config.curve_points))[1]

  def rft(sft_params, key):
    k_problems, k_sample, k_train = jax.random.split(key, 3)
    pool = config.rl_steps * batch
    operands = train_problems(k_problems, pool // config.rft_samples, config)
    prompts = jnp.repeat(encode_prompts(operands), config.rft_samples, axis=0)
    answers = sample_answers(sft_params, k_sample, prompts, jnp.zeros((pool,), bool))
    correct = answer_value(answers) == jnp.repeat(operands.sum(-1), config.rft_samples)
    epoch_keys = jax.random.split(k_train, config.rft_epochs)

    def step(state, key):
      params, opt_state, t = state
      # Minibatch t % rl_steps of the epoch's shuffle: each sample once per epoch.
      order = jax.random.permutation(epoch_keys[t // config.rl_steps], pool)
      rows = jax.lax.dynamic_slice(order, ((t % config.rl_steps) * batch,), (batch,))
      keep = jnp.broadcast_to(correct[rows][:, None], (batch, ANSWER_DIGITS))
      grad = jax.grad(lambda p: ax.sft_loss(answer_logprobs(p, prompts[rows], answers[rows]),
                                            keep)[0])(params)
      updates, opt_state = optimizer.update(grad, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, t + 1

    state = (sft_params, optimizer.init(sft_params), jnp.zeros((), jnp.int32))
    return with_checkpoints(step, state, key, config.rft_epochs * config.rl_steps)

  def values(critic, prompts, answers):
    """V(s_t) of the state before each answer token, ``[n, 3]``."""
    ids = jnp.concatenate([prompts, answers], axis=1)
    return nnx.merge(critic_def, critic)(ids[:, :-1]).scores[:, -ANSWER_DIGITS:]

  def online_lane(sft_params, method, key):
    """One online method (``method`` indexes ``online``) for ``rl_steps`` steps."""

    def step(state, key):
      params, critic, opt_state = state
      k_problems, k_sample = jax.random.split(key)
      operands = train_problems(k_problems, config.prompts_per_step, config)
      prompts = jnp.repeat(encode_prompts(operands), config.group_size, axis=0)
      answers = sample_answers(params, k_sample, prompts, jnp.zeros((batch,), bool))
      correct = answer_value(answers) == jnp.repeat(operands.sum(-1), config.group_size)
      score = correct.astype(jnp.float32)
      ref_logp = answer_logprobs(sft_params, prompts, answers)

      def loss(both):
        logp = answer_logprobs(both[0], prompts, answers)
        value = None if both[1] is None else values(both[1], prompts, answers)
        # One update per batch: pi_old = sg[pi] and V_old = sg[V] (ratio 1, value clip inactive).
        losses = {"online_rft": lambda: ax.sft_loss(
            logp, jnp.broadcast_to(correct[:, None], logp.shape))[0]}
        losses["grpo"] = lambda: ax.grpo_loss(
            logp.reshape(group_shape), None,
            ax.group_advantages(score.reshape(group_shape[:2])), mask.reshape(group_shape),
            ref_logp=ref_logp.reshape(group_shape), beta=config.beta, kl_estimator="k3")[0]

        def ppo():
          rewards = ax.kl_penalized_rewards(jax.lax.stop_gradient(logp), ref_logp, score, mask,
                                            beta=config.beta, kl_estimator="k1")
          old_value = jax.lax.stop_gradient(value)
          advantages, returns = ax.gae(rewards, old_value, mask, gamma=1.0,
                                       lambda_=config.gae_lambda)
          return ax.ppo_loss(logp, None, ax.masked_whiten(advantages, mask), mask, values=value,
                             old_values=old_value, returns=returns, vf_coef=config.vf_coef)[0]

        losses["ppo"] = ppo
        return jnp.stack([losses[m]() for m in online])[method]

      grad = jax.grad(loss)((params, critic))
      updates, opt_state = optimizer.update(grad, opt_state, (params, critic))
      params, critic = optax.apply_updates((params, critic), updates)
      return params, critic, opt_state

    # The critic is the SFT decoder with a fresh scalar head (PPO only: other runs carry none).
    if "ppo" in online:
      critic_head = nnx.state(ax.ValueModel(decoder, rngs=nnx.Rngs(config.sft_seed + 1)))
      critic = nnx.State({**critic_head, "model": sft_params["model"]})
    else:
      critic = None
    state = (sft_params, critic, optimizer.init((sft_params, critic)))
    return with_checkpoints(step, state, key, config.rl_steps)

  def sampled_metrics(params, key):
    """Held-out greedy accuracy and the metrics of ``eval_samples`` samples per problem."""
    k = config.eval_samples
    n = config.eval_problems
    prompts = jnp.concatenate([eval_prompts, jnp.repeat(eval_prompts, k, axis=0)])
    greedy = jnp.arange(n * (k + 1)) < n
    answers = answer_value(sample_answers(params, key, prompts, greedy))
    sampled = answers[n:].reshape(n, k)
    num_correct = jnp.sum(sampled == eval_truth[:, None], axis=-1)
    return {"maj": maj_at_k(sampled, eval_truth).mean(),
            "greedy": (answers[:n] == eval_truth).mean(),
            "pass1_sampled": pass_at_k(k, num_correct, 1).mean(),
            "passk_sampled": pass_at_k(k, num_correct, k).mean()}

  def train(key):
    sft_params = sft_policy(config)
    k_rft, k_online, k_eval = jax.random.split(key, 3)
    rft_checkpoints = rft(sft_params, k_rft)  # [C, ...]
    online_checkpoints = jax.vmap(online_lane, in_axes=(None, 0, 0))(  # [L, C, ...]
        sft_params, jnp.arange(len(online)), jax.random.split(k_online, len(online)))
    names = ("sft", "rft") + online
    checkpoints = jax.tree.map(  # [1 + (1 + L) C, ...]: the SFT policy, then each run's curve
        lambda s, r, o: jnp.concatenate([s[None], r, o.reshape(-1, *o.shape[2:])]),
        sft_params, rft_checkpoints, online_checkpoints)
    # lax.map, not vmap: one policy's activations at a time.
    p_correct_all = jax.lax.map(p_correct, checkpoints)  # [1 + (1 + L) C, eval_problems]
    pass1_all = 100 * p_correct_all.mean(-1)
    curves = pass1_all[1:].reshape(len(names) - 1, config.curve_points)
    last = jnp.concatenate([jnp.zeros((1,), jnp.int32),
                            (1 + jnp.arange(len(names) - 1)) * config.curve_points])
    finals = jax.tree.map(lambda c: c[last], checkpoints)  # [len(names), ...]
    metrics = jax.lax.map(lambda pk: sampled_metrics(*pk),
                          (finals, jax.random.split(k_eval, len(names))))
    metrics = {name: 100 * value for name, value in metrics.items()}
    metrics["pass1"] = pass1_all[last]
    metrics["passk"] = 100 * jnp.mean(1 - (1 - p_correct_all[last]) ** config.eval_samples, -1)
    out = {f"{name}_{metric}": value[i] for metric, value in metrics.items()
           for i, name in enumerate(names)}
    out.update({f"{name}_curve": curves[i] for i, name in enumerate(names[1:])})
    out["policy_params"] = jnp.asarray(_count(policy_shapes))
    out["critic_params"] = jnp.asarray(_count(critic_shapes))
    return out

  return train


def _final_gap(measured, a: str, b: str, metric: str = "pass1") -> np.ndarray:
  return measured[f"{a}_{metric}"] - measured[f"{b}_{metric}"]


def quarter_gaps(config: Config, measured: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
  """Online RFT − RFT Pass@1 averaged over the first and over the last quarter of the learning
  curves (at least one curve point each), ``[S]`` each."""
  gap = measured["online_rft_curve"] - measured["rft_curve"]  # [S, curve_points]
  quarter = max(1, config.curve_points // 4)
  return gap[:, :quarter].mean(-1), gap[:, -quarter:].mean(-1)


def criteria(config: Config, measured: dict[str, np.ndarray]) -> list[dict]:
  online_vs_offline = _final_gap(measured, "online_rft", "rft")
  first, last = quarter_gaps(config, measured)
  grpo_vs_online = _final_gap(measured, "grpo", "online_rft")
  two_se = 2 * standard_error(online_vs_offline)
  out = [
      experiment.criterion(
          f"(i) online RFT - RFT, final Pass@1 [points] >= 2 SE = {two_se:.3g} (paper: "
          f"+{PAPER_ONLINE_RFT_GAIN} on GSM8K)", paper_value=two_se, values=online_vs_offline,
          tolerance=0.0, rule="at_least", statistic="mean"),
      experiment.criterion(
          "(i) the online RFT - RFT gap grows: last-quarter minus first-quarter gap [points] > 0",
          paper_value=0.0, values=last - first, tolerance=0.0, rule="at_least",
          statistic="mean"),
      experiment.criterion(
          f"(ii) GRPO - online RFT, final Pass@1 [points] >= -1 SE (paper: "
          f"+{PAPER_GRPO_GAIN})", paper_value=0.0, values=grpo_vs_online,
          tolerance=standard_error(grpo_vs_online), rule="at_least", statistic="mean"),
      experiment.criterion(
          "(iii) GRPO - SFT, Pass@1 [points] >= 5", paper_value=5.0,
          values=_final_gap(measured, "grpo", "sft"), tolerance=0.0, rule="at_least",
          statistic="mean"),
      experiment.criterion(
          f"(iii) GRPO - SFT, Maj@{config.eval_samples} [points] >= 5", paper_value=5.0,
          values=_final_gap(measured, "grpo", "sft", "maj"), tolerance=0.0, rule="at_least",
          statistic="mean"),
      experiment.criterion(
          f"(iii) GRPO - SFT, Pass@{config.eval_samples} [points] <= +2", paper_value=2.0,
          values=_final_gap(measured, "grpo", "sft", "passk"), tolerance=0.0, rule="at_most",
          statistic="mean"),
  ]
  if config.ppo:
    ppo_vs_grpo = _final_gap(measured, "ppo", "grpo")
    out.append(experiment.criterion(
        "(iv) |PPO - GRPO|, final Pass@1 [points] <= 2 SE", paper_value=0.0, values=ppo_vs_grpo,
        tolerance=2 * standard_error(ppo_vs_grpo), statistic="mean"))
  return out


def plot(config: Config, measured: dict[str, np.ndarray], out_dir: str) -> None:
  """``curves.png``: exact held-out Pass@1 over each method's updates (mean over seeds, band =
  min..max), from the SFT policy's; ``final.png``: Pass@1, Maj@k and Pass@k of every policy."""
  import matplotlib.pyplot as plt

  fig, axis = plt.subplots(figsize=(6.5, 4))
  progress = np.arange(config.curve_points + 1) / config.curve_points
  for i, method in enumerate(config.methods):
    curve = np.concatenate([measured["sft_pass1"][:, None], measured[f"{method}_curve"]], axis=1)
    axis.plot(progress, curve.mean(0), color=f"C{i}", label=method)
    axis.fill_between(progress, curve.min(0), curve.max(0), color=f"C{i}", alpha=0.15)
  axis.set_xlabel("fraction of the method's updates (equal sample budget)")
  axis.set_ylabel("held-out Pass@1 (T=1, exact) [%]")
  axis.legend()
  fig.tight_layout()
  fig.savefig(os.path.join(out_dir, "curves.png"), dpi=120)
  plt.close(fig)

  policies = ("sft",) + config.methods
  labels = ("Pass@1", f"Maj@{config.eval_samples}", f"Pass@{config.eval_samples}")
  fig, axis = plt.subplots(figsize=(7, 3.5))
  xs = np.arange(len(policies))
  width = 0.8 / len(labels)
  for j, (metric, label) in enumerate(zip(("pass1", "maj", "passk"), labels)):
    means = [measured[f"{p}_{metric}"].mean() for p in policies]
    axis.bar(xs + (j - 1) * width, means, width, label=label)
  axis.set_xticks(xs, policies)
  axis.set_ylabel("held-out accuracy [%]")
  axis.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(os.path.join(out_dir, "final.png"), dpi=120)
  plt.close(fig)


if __name__ == "__main__":
  sys.exit(experiment.main(sys.argv[1:], module=sys.modules[__name__]))
