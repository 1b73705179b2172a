r"""The models and training programs of ``dpo_frontier``, written with alignax's layer-1 pieces.

Every program is a pure function of parameter *states* (``nnx.split``), so a set of runs with
different hyper-parameters is one ``jax.vmap`` over stacked states and coefficients:

* ``pretrain``: the reference LM, maximum likelihood (``ax.sft_loss``) on grammar reviews.
* ``make_offline_train``: DPO, Unlikelihood and Preferred-FT as one loss with per-run
  coefficients, :math:`c_{dpo}\,\ell_{DPO}(\beta) + c_{nll}\,\ell_{NLL}(y_w) +
  c_{ul}\,\ell_{UL}(y_l)`, a ``lax.scan`` of optimizer steps vmapped over the runs (the β sweep
  included); the caller evaluates the runs between calls.
* ``train_reward_model``: a Bradley-Terry reward model (``ax.bradley_terry_loss``) on the pairs.
* ``make_ppo``: PPO's update of a sampled batch (``ax.kl_penalized_rewards`` with k1,
  ``ax.gae``, ``ax.masked_whiten``, ``ax.ppo_loss`` with a critic), vmapped over the KL
  coefficients; the ground-truth (VADER) scores come from the host between sampling and update.

Sampling is ``alignax.sampling.generate`` (KV cache, stop at ``<eos>``), one run at a time, in
fixed-size chunks of prompts so that every call reuses one compiled program; a vmapped sampler
would compile a second copy of the decode loop per program that samples (pair generation,
evaluation, PPO rollouts), which is most of the CI budget on a 2-core machine.

Shapes: prompts ``[B, P]`` left-padded, completions ``[B, M]``, sequences ``[B, P + M]``.
Per-token arrays follow ``ax.next_token_targets``: position ``t`` holds the log-prob of token
``t + 1``, and the mask is true where token ``t + 1`` is a completion token.
"""

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import alignax as ax
from alignax.kernels import token_kl, token_logprobs
from alignax.models import CausalLM, RewardModel, ValueModel
from alignax.models.config import config_from_hf
from alignax.sampling import generate
from experiments import _frontier_task as task


# Sequences of 16 tokens and a 162-word vocabulary: the fused, chunked kernels (attention and LM
# head) would split nothing and cost several times the compile time of the plain ones.
ATTENTION_IMPL = "reference"
LOGPROB_IMPL = "reference"


class Seq(NamedTuple):
  """Token sequences ``[B, L]``: ids, real-token mask, completion-token mask."""

  ids: jax.Array
  attention: jax.Array
  completion: jax.Array


class Nets(NamedTuple):
  """The graph definitions (static structure) of the three networks."""

  lm: Any
  reward: Any
  value: Any


def build_nets(*, hidden_size: int, num_layers: int, max_positions: int, seed: int):
  """Randomly initialised policy LM, reward model and critic (Llama-style decoders).

  Returns:
    ``(Nets, lm_state, reward_state)``; the critic has no state of its own here (PPO starts it
    from the trained reward model, as InstructGPT does).
  """
  hf = dict(model_type="llama", vocab_size=task.VOCAB_SIZE, hidden_size=hidden_size,
            intermediate_size=2 * hidden_size, num_hidden_layers=num_layers,
            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=max_positions,
            rms_norm_eps=1e-5, tie_word_embeddings=False, pad_token_id=task.PAD_ID,
            eos_token_id=task.EOS_ID, bos_token_id=task.EOS_ID, num_labels=1)
  config = config_from_hf(hf)
  options = dict(attention_impl=ATTENTION_IMPL)
  lm_graph, lm_state = nnx.split(CausalLM(config, rngs=nnx.Rngs(seed), **options))
  reward_graph, reward_state = nnx.split(RewardModel(config, rngs=nnx.Rngs(seed + 1), **options))
  value_graph, _ = nnx.split(ValueModel(config, rngs=nnx.Rngs(seed + 2), **options))
  return Nets(lm_graph, reward_graph, value_graph), lm_state, reward_state


def with_body(scored_state, lm_state):
  """A reward model / critic state whose decoder body is the LM's (its head unchanged)."""
  merged = nnx.State({**scored_state})
  merged["model"] = lm_state["model"]
  return merged


def join(prompt_ids, prompt_mask, tokens, completion_mask) -> Seq:
  """Prompt ``[B, P]`` and completion ``[B, M]`` as one sequence ``[B, P + M]``."""
  ids = jnp.concatenate([prompt_ids, tokens], axis=-1)
  attention = jnp.concatenate([prompt_mask, completion_mask], axis=-1)
  completion = jnp.concatenate([jnp.zeros_like(prompt_mask), completion_mask], axis=-1)
  return Seq(ids, attention, completion)


def lm_forward(graph, state, seq: Seq):
  """Final hidden states ``[B, L, d]`` and the LM head."""
  model = nnx.merge(graph, state)
  hidden = model(seq.ids, seq.attention, compute_logits=False).hidden_states
  return hidden, model.get_lm_head()


def token_logps(graph, state, seq: Seq):
  """Per-token log-probs of the completion tokens and their mask, both ``[B, L]``."""
  targets, mask = ax.next_token_targets(seq.ids, seq.attention, completion_mask=seq.completion)
  hidden, head = lm_forward(graph, state, seq)
  return token_logprobs(hidden, head, targets, mask=mask, impl=LOGPROB_IMPL).logp, mask


def sequence_kl(graph, state, ref_state, seq: Seq):
  r"""Exact :math:`\sum_t \mathrm{KL}(\pi(\cdot|s_t)\,\|\,\pi_{ref}(\cdot|s_t))` along each
  completion (``alignax.token_kl`` over the full vocabulary at every completion step), ``[B]``."""
  _, mask = ax.next_token_targets(seq.ids, seq.attention, completion_mask=seq.completion)
  hidden_p, head_p = lm_forward(graph, state, seq)
  hidden_q, head_q = lm_forward(graph, ref_state, seq)
  kl = token_kl(hidden_p, head_p, hidden_q, head_q, mask=mask, impl=LOGPROB_IMPL)
  return jnp.sum(kl, axis=-1)


def sample(graph, state, prompt_ids, prompt_mask, key, *, max_new: int, batch: int):
  """Completions ``y ~ π(·|x)`` at temperature 1 with ``alignax.sampling.generate``.

  Args:
    prompt_ids, prompt_mask: ``[N, P]`` left-padded prompts (NumPy).
    key: the sampling key; chunk ``c`` of ``batch`` prompts uses ``fold_in(key, c)``.
    max_new: ``M``.
    batch: prompts per ``generate`` call; the last chunk is filled with repeated prompts (whose
      completions are dropped), so every call has the same shape.

  Returns:
    NumPy ``(tokens [N, M], completion_mask [N, M])``; the mask is true up to and including the
    first ``<eos>``, the tokens after it are ``<pad>``.
  """
  model = nnx.merge(graph, state)
  n = len(prompt_ids)
  tokens, masks = [], []
  for chunk, start in enumerate(range(0, n, batch)):
    rows = np.arange(start, start + batch) % n
    out = generate(model, prompt_ids[rows], prompt_mask[rows], max_new_tokens=max_new,
                   stop_token_ids=(task.EOS_ID,), pad_token_id=task.PAD_ID,
                   key=jax.random.fold_in(key, chunk))
    keep = min(batch, n - start)
    tokens.append(np.asarray(out.tokens)[:keep])
    masks.append(np.asarray(out.completion_mask)[:keep])
  return np.concatenate(tokens), np.concatenate(masks)


def _adam(lr: float, grad_clip: float = 1.0):
  return optax.chain(optax.clip_by_global_norm(grad_clip), optax.adam(lr))


# --- the reference LM -------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("graph", "steps", "batch_size", "lr"))
def pretrain(graph, state, reviews, key, *, steps: int, batch_size: int, lr: float):
  """Maximum likelihood on the reviews ``[N, T]``: returns ``(state, final-100-step mean NLL)``."""
  optimizer = _adam(lr)

  def loss(state, ids):
    attention = ids != task.PAD_ID
    logp, mask = token_logps(graph, state, Seq(ids, attention, attention))
    return ax.sft_loss(logp, mask)[0]

  def step(carry, t):
    state, opt_state = carry
    rows = jax.random.randint(jax.random.fold_in(key, t), (batch_size,), 0, reviews.shape[0])
    value, grads = jax.value_and_grad(loss)(state, reviews[rows])
    updates, opt_state = optimizer.update(grads, opt_state, state)
    return (optax.apply_updates(state, updates), opt_state), value

  (state, _), losses = jax.lax.scan(step, (state, optimizer.init(state)), jnp.arange(steps))
  return state, jnp.mean(losses[-min(steps, 100):])


def sequence_logps(graph, state, seq: Seq):
  """Sequence log-probs ``[B]`` of the completions."""
  logp, mask = token_logps(graph, state, seq)
  return ax.sequence_logprobs(logp, mask)


# The reference's sequence log-probs, precomputed once for DPO.
reference_logps = jax.jit(sequence_logps, static_argnames=("graph",))


# --- DPO, Unlikelihood and Preferred-FT -------------------------------------------------------


class Pairs(NamedTuple):
  """Preference pairs: chosen and rejected sequences ``[N, L]`` and their reference log-probs."""

  chosen: Seq
  rejected: Seq
  ref_chosen: jax.Array
  ref_rejected: jax.Array


class OfflineCoefs(NamedTuple):
  """Per-run loss coefficients, each ``[R]`` (or a scalar inside the vmapped program)."""

  dpo: jax.Array
  beta: jax.Array
  nll: jax.Array
  ul: jax.Array


def offline_loss(graph, state, pairs: Pairs, coefs: OfflineCoefs):
  r""":math:`c_{dpo}\,\ell_{DPO} + c_{nll}\,\ell_{NLL} + c_{ul}\,\ell_{UL}` on a batch of pairs.

  * :math:`\ell_{DPO}`: ``ax.dpo_loss`` (sigmoid) with the run's β on sequence log-probs.
  * :math:`\ell_{NLL}`: token-mean negative log-likelihood of the chosen completions
    (``ax.sft_loss``): Preferred-FT alone, and Unlikelihood's likelihood term.
  * :math:`\ell_{UL} = -\mathrm{mean}_t \log(1 - \pi(y_{l,t}|x, y_{l,<t}))` over the rejected
    completion's tokens, the token-level unlikelihood of Welleck et al. (2020) that Rafailov et
    al. use as a baseline. (The sequence form :math:`\log(1 - \pi(y_l|x))` has almost no gradient
    here, where :math:`\pi(y_l|x) \ll 1`.)

  Returns:
    ``(loss, dpo metrics)``.
  """
  both = Seq(*(jnp.concatenate([c, r]) for c, r in zip(pairs.chosen, pairs.rejected)))
  logp, mask = token_logps(graph, state, both)
  n = pairs.ref_chosen.shape[0]
  seq_logp = ax.sequence_logprobs(logp, mask)
  dpo, metrics = ax.dpo_loss(seq_logp[:n], seq_logp[n:], pairs.ref_chosen, pairs.ref_rejected,
                             beta=coefs.beta)
  nll, _ = ax.sft_loss(logp[:n], mask[:n])
  # log(1 - p) = log(-expm1(logp)); the clip keeps a certain token (p = 1) finite.
  unlikely = jnp.log(-jnp.expm1(jnp.minimum(logp[n:], -1e-6)))
  ul = -ax.masked_mean(unlikely, mask[n:])
  return coefs.dpo * dpo + coefs.nll * nll + coefs.ul * ul, metrics


def offline_step(graph, optimizer, state, opt_state, batch: Pairs, coefs: OfflineCoefs):
  """One optimizer step of ``offline_loss``: ``(state, opt_state, loss)``."""
  value, grads = jax.value_and_grad(
      lambda s: offline_loss(graph, s, batch, coefs)[0])(state)
  updates, opt_state = optimizer.update(grads, opt_state, state)
  return optax.apply_updates(state, updates), opt_state, value


def take(tree, rows):
  """The rows ``rows`` of every array of ``tree`` (a mini-batch of pairs or of a rollout)."""
  return jax.tree.map(lambda x: x[rows], tree)


def make_offline_train(graph, *, steps: int, batch_size: int, lr: float):
  """``(init, train)`` for ONE offline run, to be vmapped over runs.

  ``init(state) -> opt_state``; ``train(state, opt_state, coefs, pairs, key, start) -> (state,
  opt_state, mean loss)`` takes ``steps`` optimizer steps on mini-batches of ``batch_size`` pairs
  drawn with ``fold_in(key, start + t)``: they depend only on the key and the step, so runs
  vmapped over ``coefs`` see the same data in the same order.
  """
  optimizer = _adam(lr)

  def train(state, opt_state, coefs, pairs, key, start):
    n_pairs = pairs.ref_chosen.shape[0]

    def step(carry, t):
      state, opt_state = carry
      rows = jax.random.randint(jax.random.fold_in(key, t), (batch_size,), 0, n_pairs)
      state, opt_state, value = offline_step(graph, optimizer, state, opt_state,
                                             take(pairs, rows), coefs)
      return (state, opt_state), value

    (state, opt_state), losses = jax.lax.scan(step, (state, opt_state),
                                              start + jnp.arange(steps))
    return state, opt_state, jnp.mean(losses)

  return optimizer.init, train


# --- the Bradley-Terry reward model -----------------------------------------------------------


def reward_scores(graph, state, seq: Seq):
  """The reward model's score of each full sequence (its last real token), ``[B]``."""
  return nnx.merge(graph, state)(seq.ids, seq.attention).scores[:, 0]


@functools.partial(jax.jit, static_argnames=("graph", "steps", "batch_size", "lr"))
def train_reward_model(graph, state, pairs: Pairs, held_out: Pairs, key, *, steps: int,
                       batch_size: int, lr: float):
  """``ax.bradley_terry_loss`` on the pairs: ``(state, held-out pairwise accuracy)``."""
  optimizer = _adam(lr)
  n_pairs = pairs.ref_chosen.shape[0]

  def loss(state, batch):
    both = Seq(*(jnp.concatenate([c, r]) for c, r in zip(batch.chosen, batch.rejected)))
    scores = reward_scores(graph, state, both)
    n = batch.ref_chosen.shape[0]
    return ax.bradley_terry_loss(scores[:n], scores[n:])[0]

  def step(carry, t):
    state, opt_state = carry
    rows = jax.random.randint(jax.random.fold_in(key, t), (batch_size,), 0, n_pairs)
    grads = jax.grad(loss)(state, take(pairs, rows))
    updates, opt_state = optimizer.update(grads, opt_state, state)
    return (optax.apply_updates(state, updates), opt_state), None

  (state, _), _ = jax.lax.scan(step, (state, optimizer.init(state)), jnp.arange(steps))
  accuracy = jnp.mean(reward_scores(graph, state, held_out.chosen)
                      > reward_scores(graph, state, held_out.rejected), dtype=jnp.float32)
  return state, accuracy


# --- PPO ----------------------------------------------------------------------------------------


class Rollout(NamedTuple):
  """One PPO batch: sequences, behaviour and reference log-probs, critic values, scores."""

  seq: Seq
  logp: jax.Array
  ref_logp: jax.Array
  mask: jax.Array
  values: jax.Array
  scores: jax.Array


def make_ppo(nets: Nets, *, lr: float, epochs: int, minibatches: int, gae_lambda: float,
             vf_coef: float, clip_eps: float):
  r"""``(init, update)`` for one PPO run, to be vmapped over runs.

  ``init(policy, value) -> opt_state`` (one Adam over policy and critic).
  ``update(policy, value, opt_state, ref, reward, seq, host_scores, use_host, kl_coef, key) ->
  (policy, value, opt_state, metrics)`` scores the sampled sequences ``seq`` (behaviour and
  reference log-probs, critic values, and the sequence score: ``host_scores`` (VADER) where
  ``use_host``, else the reward model's), pays the per-token rewards
  :math:`-\beta_{KL}\,k_1 + [t = last]\,s` (InstructGPT), takes GAE with :math:`\gamma = 1`,
  whitens the advantages, then makes ``epochs`` passes over ``minibatches`` shuffled mini-batches
  of ``ax.ppo_loss`` (clipped surrogate and clipped value loss, token mean). ``metrics`` holds
  ``score``, the mean sequence score the run optimised.
  """
  optimizer = _adam(lr)

  def values_of(value_state, seq):
    return nnx.merge(nets.value, value_state)(seq.ids, seq.attention).scores

  def loss(params, batch: Rollout, advantages, returns):
    policy, value = params
    logp, _ = token_logps(nets.lm, policy, batch.seq)
    return ax.ppo_loss(logp, batch.logp, advantages, batch.mask,
                       values=values_of(value, batch.seq), old_values=batch.values,
                       returns=returns, vf_coef=vf_coef, clip_eps_low=clip_eps,
                       value_clip_eps=clip_eps)

  def update(policy, value, opt_state, ref, reward, seq, host_scores, use_host, kl_coef, key):
    logp, mask = token_logps(nets.lm, policy, seq)
    ref_logp, _ = token_logps(nets.lm, ref, seq)
    scores = jnp.where(use_host, host_scores, reward_scores(nets.reward, reward, seq))
    batch = Rollout(seq, logp, ref_logp, mask, values_of(value, seq) * mask, scores)
    rewards = ax.kl_penalized_rewards(logp, ref_logp, scores, mask, beta=kl_coef,
                                      kl_estimator="k1")
    advantages, returns = ax.gae(rewards, batch.values, mask, gamma=1.0, lambda_=gae_lambda)
    advantages = ax.masked_whiten(advantages, mask)
    n = scores.shape[0]
    size = n // minibatches

    def minibatch(carry, rows):
      params, opt_state = carry
      (_, metrics), grads = jax.value_and_grad(loss, has_aux=True)(
          params, take(batch, rows), advantages[rows], returns[rows])
      updates, opt_state = optimizer.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), metrics

    def epoch(carry, e):
      order = jax.random.permutation(jax.random.fold_in(key, e), n)[:size * minibatches]
      return jax.lax.scan(minibatch, carry, order.reshape(minibatches, size))

    ((policy, value), opt_state), metrics = jax.lax.scan(
        epoch, ((policy, value), opt_state), jnp.arange(epochs))
    metrics = {**jax.tree.map(jnp.mean, metrics), "score": jnp.mean(scores)}
    return policy, value, opt_state, metrics

  def init(policy, value):
    return optimizer.init((policy, value))

  return init, update


# Exact sequence KL of one run's samples.
sequence_kl_program = jax.jit(sequence_kl, static_argnames=("graph",))


def stack(states, n: int):
  """``n`` copies of a state tree, stacked on a new leading axis (the runs of a vmap)."""
  return jax.tree.map(lambda x: jnp.broadcast_to(x, (n, *x.shape)), states)


def host_rewards(prompt_ids: np.ndarray, tokens: np.ndarray) -> np.ndarray:
  """VADER rewards of prompts ``[..., P]`` continued by completions ``[..., M]``, ``[...]``."""
  prompt_ids, tokens = np.asarray(prompt_ids), np.asarray(tokens)
  batch = np.broadcast_shapes(prompt_ids.shape[:-1], tokens.shape[:-1])
  rows = np.concatenate([np.broadcast_to(prompt_ids, (*batch, prompt_ids.shape[-1])),
                         np.broadcast_to(tokens, (*batch, tokens.shape[-1]))], axis=-1)
  return task.rewards(rows.reshape(-1, rows.shape[-1])).reshape(batch)
