"""NumPy (float64) oracles for the supervised, reward-model and preference losses.

Written from the papers' equations, one function per loss and per DPO variant, sharing nothing with
the JAX code: the tests compare the two. Inputs are per-sequence log-probs (sums over completion
tokens) unless a function says otherwise; every function returns the per-pair (per-example) losses,
except where it says it returns a scalar.
"""

import numpy as np


def log_sigmoid(x):
  # log σ(x) = −log(1 + e^{−x}), via logaddexp so that large |x| neither overflows nor underflows.
  return -np.logaddexp(0.0, -np.asarray(x, np.float64))


def sigmoid(x):
  return np.exp(log_sigmoid(x))


def sequence_logprobs(token_logp, mask, average=False):
  token_logp = np.asarray(token_logp, np.float64)
  mask = np.asarray(mask, bool)
  totals = np.array([row[m].sum() for row, m in zip(token_logp.reshape(-1, token_logp.shape[-1]),
                                                     mask.reshape(-1, mask.shape[-1]))])
  if average:
    counts = mask.reshape(-1, mask.shape[-1]).sum(-1)
    totals = np.where(counts > 0, totals / np.maximum(counts, 1), 0.0)
  return totals.reshape(token_logp.shape[:-1])


def sft_token_mean(logp, mask):
  """Scalar: NLL over all valid tokens of the batch, one mean."""
  logp, mask = np.asarray(logp, np.float64), np.asarray(mask, bool)
  return -logp[mask].sum() / mask.sum()


def sft_seq_mean(logp, mask):
  """Scalar: per-sequence mean NLL, averaged over sequences."""
  logp, mask = np.asarray(logp, np.float64), np.asarray(mask, bool)
  return float(np.mean([-row[m].mean() for row, m in zip(logp, mask)]))


def bradley_terry(chosen, rejected, margin=0.0, center=0.0):
  chosen, rejected = np.asarray(chosen, np.float64), np.asarray(rejected, np.float64)
  return -log_sigmoid(chosen - rejected - margin) + center * (chosen + rejected) ** 2


# ---- DPO family ------------------------------------------------------------------------------
# pc, pr: policy log-probs of chosen / rejected; rc, rr: reference log-probs.


def dpo_sigmoid(pc, pr, rc, rr, beta, eps=0.0):
  """Rafailov et al. 2023 Eq. 7; cDPO: the expected loss when the label is flipped w.p. eps."""
  h = (pc - rc) - (pr - rr)
  return (1 - eps) * -log_sigmoid(beta * h) + eps * -log_sigmoid(-beta * h)


def dpo_hinge(pc, pr, rc, rr, beta):
  h = (pc - rc) - (pr - rr)
  return np.maximum(0.0, 1.0 - beta * h)


def dpo_ipo(pc, pr, rc, rr, beta, lc=None, lr=None):
  """Azar et al. 2024 Eq. 17; per-token averages when lengths are given."""
  if lc is None:
    h = (pc - rc) - (pr - rr)
  else:
    h = (pc - rc) / np.maximum(lc, 1) - (pr - rr) / np.maximum(lr, 1)
  return (h - 1.0 / (2.0 * beta)) ** 2


def dpo_robust(pc, pr, rc, rr, beta, eps):
  """Chowdhury et al. 2024 Eq. 8: the unbiased loss under flip rate eps."""
  h = (pc - rc) - (pr - rr)
  return ((1 - eps) * -log_sigmoid(beta * h) - eps * -log_sigmoid(-beta * h)) / (1 - 2 * eps)


def dpo_exo_pair(pc, pr, rc, rr, beta, eps):
  """Ji et al. 2024: KL between the model's pairwise preference p = σ(βh) and the target 1 − eps."""
  h = (pc - rc) - (pr - rr)
  p = sigmoid(beta * h)
  q = 1.0 - eps
  return p * (np.log(p) - np.log(q)) + (1 - p) * (np.log(1 - p) - np.log(1 - q))


def dpo_nca_pair(pc, pr, rc, rr, beta):
  rw, rl = beta * (pc - rc), beta * (pr - rr)
  return -np.log(sigmoid(rw)) - 0.5 * np.log(sigmoid(-rw)) - 0.5 * np.log(sigmoid(-rl))


def dpo_bco_pair(pc, pr, rc, rr, beta, shift=0.0):
  rw, rl = beta * (pc - rc), beta * (pr - rr)
  return -np.log(sigmoid(rw - shift)) - np.log(1.0 - sigmoid(rl - shift))


def dpo_sppo_hard(pc, pr, rc, rr, beta):
  a, b = pc - rc, pr - rr
  return (a - 0.5 / beta) ** 2 + (b + 0.5 / beta) ** 2


def dpo_aot(pc, pr, rc, rr, beta, eps=0.0):
  delta = np.sort(pc - pr) - np.sort(rc - rr)
  return (1 - eps) * -log_sigmoid(beta * delta) + eps * -log_sigmoid(-beta * delta)


def dpo_aot_unpaired(pc, pr, rc, rr, beta, eps=0.0):
  delta = np.sort(pc - rc) - np.sort(pr - rr)
  return (1 - eps) * -log_sigmoid(beta * delta) + eps * -log_sigmoid(-beta * delta)


def dpo_apo_zero(pc, pr, rc, rr, beta):
  return (1.0 - sigmoid(beta * (pc - rc))) + sigmoid(beta * (pr - rr))


def dpo_apo_down(pc, pr, rc, rr, beta):
  h = (pc - rc) - (pr - rr)
  return sigmoid(beta * (pc - rc)) + (1.0 - sigmoid(beta * h))


def dpo_discopop(pc, pr, rc, rr, beta, tau=0.05):
  """Lu et al. 2024, with the modulation computed directly (fine for moderate values)."""
  z = beta * ((pc - rc) - (pr - rr))
  m = sigmoid(z / tau)
  return (1 - m) * -log_sigmoid(z) + m * np.exp(-z)


def dpo_sigmoid_norm(pc, pr, rc, rr, beta, lc, lr, eps=0.0):
  h = (pc - rc) / np.maximum(lc, 1) - (pr - rr) / np.maximum(lr, 1)
  return (1 - eps) * -log_sigmoid(beta * h) + eps * -log_sigmoid(-beta * h)


# ---- unpaired and reference-free methods ----------------------------------------------------


def kto(policy, ref, desirable, beta, z0, w_d=1.0, w_u=1.0):
  """Ethayarajh et al. 2024 Eq. 8: λ_y − v(x, y)."""
  r = policy - ref
  value = np.where(desirable, w_d * sigmoid(beta * (r - z0)), w_u * sigmoid(beta * (z0 - r)))
  weight = np.where(desirable, w_d, w_u)
  return weight - value


def kto_z0(mismatched, ref_mismatched):
  return max(0.0, float(np.mean(mismatched - ref_mismatched)))


def orpo(pc, pr, lc, lr, lam):
  """Hong et al. 2024 Eqs. 6-7 on per-token-average log-probs; NLL as one token mean (scalar)."""
  ac, ar = pc / lc, pr / lr
  odds_c = np.exp(ac) / (1.0 - np.exp(ac))
  odds_r = np.exp(ar) / (1.0 - np.exp(ar))
  ratio_term = -np.log(sigmoid(np.log(odds_c / odds_r)))
  nll = -pc.sum() / lc.sum()
  return nll + lam * ratio_term.mean()


def simpo(pc, pr, lc, lr, beta, gamma, eps=0.0, hinge=False):
  """Meng et al. 2024 Eq. 6, gamma the target reward margin."""
  z = beta * pc / np.maximum(lc, 1) - beta * pr / np.maximum(lr, 1) - gamma
  if hinge:
    return np.maximum(0.0, 1.0 - z)
  return (1 - eps) * -log_sigmoid(z) + eps * -log_sigmoid(-z)


def cpo(pc, pr, lc, beta, alpha):
  """Xu et al. 2024 Eq. 7 with the NLL as one token mean over the chosen completions (scalar)."""
  pref = -log_sigmoid(beta * pc - beta * pr)
  return pref.mean() + alpha * (-pc.sum() / lc.sum())
