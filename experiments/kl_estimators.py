r"""Reproduces the table of Schulman's "Approximating KL Divergence" (2020) with ``kl_estimate``.

Setup of the post: :math:`q = N(0, 1)` is the sampling distribution, :math:`p = N(\mu, 1)` with
:math:`\mu \in \{0.1, 1\}` (true :math:`\mathrm{KL}(q\|p) = \mu^2/2` = 0.005 and 0.5), and
:math:`x \sim q`. For each estimator it reports bias/true and stdev/true of the single-sample
estimate. Schulman's ratio is :math:`r = p(x)/q(x)`; in alignax's convention the sampling policy is
``logp = log q(x)`` and the reference is ``ref_logp = log p(x)``, so ``kl_estimate(logp, ref_logp)``
targets :math:`\mathrm{KL}(q\|p)`.

A cell passes when the measured value is within ``tolerance = rounding + Z * standard_error`` of the
published one: ``rounding`` is half a unit in the last printed digit (values printed as integers,
which are exact here, take their column's finest precision) and the standard error is that of our
own estimate, measured from the samples. The closed-form values are printed alongside:
:math:`\log r \sim N(-\mu^2/2, \mu^2)` gives bias/true 0, :math:`\mu^2/4`, 0 and
:math:`\mathrm{Var}[k_1] = \mu^2`, :math:`\mathrm{Var}[k_2] = \mu^6/4 + \mu^4/2`,
:math:`\mathrm{Var}[k_3] = e^{\mu^2} - 1 - \mu^2`.

Usage: ``python -m experiments.kl_estimators [--samples N] [--seed S] [--json]``; exits 1 if a cell
fails.
"""

import argparse
import json
import math
import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

import alignax as ax

# Schulman (2020), as printed: {mu: {estimator: (bias/true, stdev/true)}}.
PUBLISHED: dict[float, dict[str, tuple[str, str]]] = {
    0.1: {"k1": ("0", "20"), "k2": ("0.002", "1.42"), "k3": ("0", "1.42")},
    1.0: {"k1": ("0", "2"), "k2": ("0.25", "1.73"), "k3": ("0", "1.7")},
}
ESTIMATORS = ("k1", "k2", "k3")
Z = 4.0  # standard errors allowed on top of the published rounding


def _decimals(printed: str) -> int:
  return len(printed.split(".")[1]) if "." in printed else 0


def _rounding(printed: str, column: Sequence[str]) -> float:
  decimals = _decimals(printed) or max(_decimals(p) for p in column)
  return 0.5 * 10.0 ** -decimals


def _closed_form(mu: float, estimator: str) -> tuple[float, float]:
  true_kl = mu ** 2 / 2
  var = {"k1": mu ** 2, "k2": mu ** 6 / 4 + mu ** 4 / 2, "k3": math.expm1(mu ** 2) - mu ** 2}
  bias = {"k1": 0.0, "k2": mu ** 2 / 4, "k3": 0.0}
  return bias[estimator], math.sqrt(var[estimator]) / true_kl


@jax.jit
def _log_densities(x: jax.Array, mu: float) -> tuple[jax.Array, jax.Array]:
  log_q = -0.5 * jnp.square(x) - 0.5 * jnp.log(2 * jnp.pi)
  log_p = -0.5 * jnp.square(x - mu) - 0.5 * jnp.log(2 * jnp.pi)
  return log_q, log_p


def run(*, samples: int = 4_000_000, seed: int = 0) -> list[dict]:
  """Measures every cell of the table; returns one dict per (mu, estimator)."""
  x = jax.random.normal(jax.random.key(seed), (samples,), jnp.float32)
  rows = []
  for mu, published in PUBLISHED.items():
    true_kl = mu ** 2 / 2
    log_q, log_p = _log_densities(x, mu)
    bias_column = [published[e][0] for e in ESTIMATORS]
    std_column = [published[e][1] for e in ESTIMATORS]
    for estimator in ESTIMATORS:
      k = np.asarray(ax.kl_estimate(log_q, log_p, kl_estimator=estimator), np.float64)
      mean, std = k.mean(), k.std(ddof=1)
      fourth = np.mean((k - mean) ** 4)
      # Standard errors of the sample mean and of the sample std (delta method).
      se_bias = std / math.sqrt(samples) / true_kl
      se_std = math.sqrt(max(fourth - std ** 4, 0.0) / samples) / (2 * std) / true_kl
      bias_pub, std_pub = published[estimator]
      cells = {}
      for name, value, printed, column, se in (
          ("bias/true", (mean - true_kl) / true_kl, bias_pub, bias_column, se_bias),
          ("stdev/true", std / true_kl, std_pub, std_column, se_std)):
        tolerance = _rounding(printed, column) + Z * se
        cells[name] = {"measured": float(value), "published": float(printed),
                       "tolerance": float(tolerance),
                       "pass": bool(abs(value - float(printed)) <= tolerance)}
      exact_bias, exact_std = _closed_form(mu, estimator)
      cells["bias/true"]["closed_form"] = exact_bias
      cells["stdev/true"]["closed_form"] = exact_std
      rows.append({"mu": mu, "true_kl": true_kl, "estimator": estimator, **cells})
  return rows


def _table(rows: list[dict], samples: int, seed: int) -> str:
  lines = [f"Schulman (2020) KL estimators, q = N(0,1), x ~ q, {samples:,} samples, seed {seed}",
           f"{'p':<10}{'est':<5}{'bias/true':>11}{'paper':>8}{'exact':>9}{'tol':>8}  "
           f"{'std/true':>10}{'paper':>8}{'exact':>9}{'tol':>8}  result"]
  for r in rows:
    b, s = r["bias/true"], r["stdev/true"]
    ok = "pass" if b["pass"] and s["pass"] else "FAIL"
    label = f"N({r['mu']:g},1)"
    lines.append(f"{label:<10}{r['estimator']:<5}{b['measured']:>11.4f}"
                 f"{b['published']:>8g}{b['closed_form']:>9.4f}{b['tolerance']:>8.4f}  "
                 f"{s['measured']:>10.4f}{s['published']:>8g}{s['closed_form']:>9.4f}"
                 f"{s['tolerance']:>8.4f}  {ok}")
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--samples", type=int, default=4_000_000, help="samples from q")
  parser.add_argument("--seed", type=int, default=0, help="PRNG seed")
  parser.add_argument("--json", action="store_true", help="print the cells as JSON")
  args = parser.parse_args(argv)
  if args.samples < 2:
    parser.error(f"--samples must be >= 2, got {args.samples}")
  rows = run(samples=args.samples, seed=args.seed)
  passed = all(r["bias/true"]["pass"] and r["stdev/true"]["pass"] for r in rows)
  if args.json:
    print(json.dumps({"samples": args.samples, "seed": args.seed, "z": Z, "pass": passed,
                      "cells": rows}, indent=1))
  else:
    print(_table(rows, args.samples, args.seed))
    print("all cells within tolerance" if passed else "SOME CELLS FAILED")
  return 0 if passed else 1


if __name__ == "__main__":
  sys.exit(main())
