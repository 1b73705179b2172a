"""NumPy reference implementations of layer 1a, written from the papers' equations with explicit
loops and float64, sharing nothing with the JAX code. Per-token arrays are 2-D ``[rows, T]``
(callers flatten leading dims); group arrays are ``[P, G]``.
"""

import math

import numpy as np

# ---------------------------------------------------------------------------------------------
# Reductions


def aggregate(per_token, mask, mode, max_len=None):
  """GRPO / DAPO / Dr. GRPO loss normalisations, one sequence at a time."""
  per_token, mask = np.asarray(per_token, np.float64), np.asarray(mask, bool)
  rows, length = per_token.shape
  seq_sums, seq_counts = [], []
  for i in range(rows):
    s, n = 0.0, 0
    for t in range(length):
      if mask[i, t]:
        s += per_token[i, t]
        n += 1
    seq_sums.append(s)
    seq_counts.append(n)
  if mode == "token_mean":  # DAPO Eq. 8: one normaliser, the total token count
    total = sum(seq_counts)
    return sum(seq_sums) / total if total else 0.0
  if mode == "seq_mean_token_mean":  # GRPO Eq. 3: 1/G sum_i 1/|o_i| sum_t
    return sum(s / n if n else 0.0 for s, n in zip(seq_sums, seq_counts)) / rows
  if mode == "seq_mean_token_sum":
    return sum(seq_sums) / rows
  if mode == "seq_mean_token_sum_norm":  # Dr. GRPO: constant normaliser
    return sum(seq_sums) / (rows * max_len)
  raise ValueError(mode)


def masked_whiten(x, mask, shift_mean=True, eps=1e-8):
  """(x - mean) / sqrt(var + eps) over the valid entries, Bessel-corrected variance."""
  x, mask = np.asarray(x, np.float64), np.asarray(mask, bool)
  vals = [v for v, m in zip(x.ravel(), mask.ravel()) if m]
  n = len(vals)
  mean = sum(vals) / n if n else 0.0
  var = sum((v - mean) ** 2 for v in vals) / max(n - 1, 1)
  out = np.zeros_like(x)
  for idx in np.ndindex(x.shape):
    if mask[idx]:
      w = (x[idx] - mean) / math.sqrt(var + eps)
      out[idx] = w if shift_mean else w + mean
  return out


# ---------------------------------------------------------------------------------------------
# Advantages


def gae(rewards, values, mask, gamma, lam, bootstrap=None):
  """GAE (Schulman et al. 2016 Eq. 16) over the valid tokens of each row, by an explicit loop."""
  rewards = np.asarray(rewards, np.float64)
  values = np.asarray(values, np.float64)
  mask = np.asarray(mask, bool)
  rows, length = rewards.shape
  adv = np.zeros_like(rewards)
  for i in range(rows):
    steps = [t for t in range(length) if mask[i, t]]
    next_value = 0.0 if bootstrap is None else float(bootstrap[i])
    running = 0.0
    for t in reversed(steps):
      delta = rewards[i, t] + gamma * next_value - values[i, t]
      running = delta + gamma * lam * running
      adv[i, t] = running
      next_value = values[i, t]
  returns = np.where(mask, adv + values, 0.0)
  return adv, returns


def discounted_returns(rewards, mask, gamma):
  """G_t = sum_{s >= t, valid} gamma^(#valid steps between) r_s."""
  rewards, mask = np.asarray(rewards, np.float64), np.asarray(mask, bool)
  out = np.zeros_like(rewards)
  for i in range(rewards.shape[0]):
    steps = [t for t in range(rewards.shape[1]) if mask[i, t]]
    for k, t in enumerate(steps):
      out[i, t] = sum(gamma ** j * rewards[i, s] for j, s in enumerate(steps[k:]))
  return out


def group_advantages(rewards, scale="group", leave_one_out=False, ddof=1, eps=1e-6):
  """GRPO (group z-score), Dr. GRPO (no std), RLOO (leave-one-out), TRL batch-std scaling."""
  rewards = np.asarray(rewards, np.float64)
  num_prompts, group = rewards.shape
  centred = np.zeros_like(rewards)
  group_std = np.zeros(num_prompts)
  for p in range(num_prompts):
    row = list(rewards[p])
    mean = sum(row) / group
    group_std[p] = math.sqrt(sum((r - mean) ** 2 for r in row) / max(group - ddof, 1))
    for g in range(group):
      if leave_one_out:
        baseline = (sum(row) - row[g]) / (group - 1)
      else:
        baseline = mean
      centred[p, g] = row[g] - baseline
  if scale == "none":
    return centred
  if scale == "group":
    return centred / (group_std[:, None] + eps)
  # TRL scale_rewards="batch": the group-centred rewards over the std of the raw rewards.
  flat = list(rewards.ravel())
  mean = sum(flat) / len(flat)
  batch_std = math.sqrt(sum((a - mean) ** 2 for a in flat) / max(len(flat) - ddof, 1))
  return centred / (batch_std + eps)


# ---------------------------------------------------------------------------------------------
# KL


def kl_estimator(logp, ref_logp, estimator):
  """Schulman (2020) with q = policy (sampler), p = reference, r = p(x)/q(x)."""
  out = np.zeros(np.shape(logp))
  for idx in np.ndindex(out.shape):
    log_r = float(ref_logp[idx]) - float(logp[idx])
    r = math.exp(log_r)
    out[idx] = {"k1": -log_r, "k2": 0.5 * log_r ** 2, "k3": (r - 1) - log_r,
                "abs": abs(log_r)}[estimator]
  return out


def categorical_kl(logits_p, logits_q):
  """sum_v p_v log(p_v / q_v) over the last axis, softmax by max-subtraction in float64."""
  logits_p, logits_q = np.asarray(logits_p, np.float64), np.asarray(logits_q, np.float64)
  out = np.zeros(logits_p.shape[:-1])
  for idx in np.ndindex(out.shape):
    a, b = logits_p[idx], logits_q[idx]
    la = a - a.max() - math.log(sum(math.exp(v - a.max()) for v in a))
    lb = b - b.max() - math.log(sum(math.exp(v - b.max()) for v in b))
    out[idx] = sum(math.exp(x) * (x - y) for x, y in zip(la, lb))
  return out


def kl_penalized_rewards(scores, logp, ref_logp, mask, beta):
  """InstructGPT per-token reward: -beta * k1 on valid tokens, + score on the last valid token."""
  out = np.zeros(np.shape(logp))
  for i in range(out.shape[0]):
    last = None
    for t in range(out.shape[1]):
      if mask[i, t]:
        out[i, t] = -beta * (logp[i, t] - ref_logp[i, t])
        last = t
    if last is not None:
      out[i, last] += scores[i]
  return out


def adaptive_kl(init_coef, target, horizon, observed):
  """Ziegler et al. (2019) proportional controller over a sequence of (kl, n_steps)."""
  coef = init_coef
  history = []
  for kl, n in observed:
    error = min(max(kl / target - 1, -0.2), 0.2)
    coef *= 1 + error * n / horizon
    history.append(coef)
  return history


# ---------------------------------------------------------------------------------------------
# Policy-gradient per-token losses


def ppo_clip_token(logp, old_logp, adv, eps_low, eps_high, dual_clip=None):
  """-min(r A, clip(r, 1-eps_low, 1+eps_high) A); dual clip caps it at -c A when A < 0."""
  r = math.exp(logp - old_logp)
  clipped = min(max(r, 1 - eps_low), 1 + eps_high)
  loss = -min(r * adv, clipped * adv)
  if dual_clip is not None and adv < 0:
    loss = min(loss, -dual_clip * adv)
  return loss


def clipped_value_token(v, v_old, ret, eps):
  v_clipped = v_old + min(max(v - v_old, -eps), eps)
  return 0.5 * max((v - ret) ** 2, (v_clipped - ret) ** 2)


def sequence_ratio(logp, old_logp, mask_row):
  """GSPO's s_i = (pi(y_i)/pi_old(y_i))^(1/|y_i|)."""
  terms = [logp[t] - old_logp[t] for t in range(len(mask_row)) if mask_row[t]]
  return math.exp(sum(terms) / len(terms))


def gspo_sequence_objective(logp, old_logp, adv, mask, eps_low, eps_high):
  """GSPO Eq. 7: mean over sequences of -min(s_i A_i, clip(s_i) A_i) (no tokens involved)."""
  losses = []
  for i in range(logp.shape[0]):
    if not any(mask[i]):  # an empty completion has no tokens to contribute
      losses.append(0.0)
      continue
    s = sequence_ratio(logp[i], old_logp[i], mask[i])
    losses.append(-min(s * adv[i], min(max(s, 1 - eps_low), 1 + eps_high) * adv[i]))
  return sum(losses) / len(losses)


def cispo_token(logp, old_logp, adv, max_weight):
  """MiniMax-M1 Eq. 4, value only, with TRL's absolute cap: -min(r, max_weight) * A * log pi."""
  r = math.exp(logp - old_logp)
  return -min(r, max_weight) * adv * logp


def grpo_objective(logp, old_logp, ref_logp, adv, mask, eps_low, eps_high, beta, mode,
                   max_len=None):
  """GRPO Eq. 3 with k3 (Eq. 4): per-token clipped loss + beta * k3, then the chosen reduction.

  ``adv`` is per sequence ``[rows]``.
  """
  rows, length = logp.shape
  per_token = np.zeros((rows, length))
  for i in range(rows):
    for t in range(length):
      if mask[i, t]:
        per_token[i, t] = ppo_clip_token(logp[i, t], old_logp[i, t], adv[i], eps_low, eps_high)
        per_token[i, t] += beta * kl_estimator(logp[i:i + 1, t:t + 1], ref_logp[i:i + 1, t:t + 1],
                                               "k3")[0, 0]
  return aggregate(per_token, mask, mode, max_len)
