"""Paper reproductions, each an experiment module for ``alignax.experiment`` (``alignax run
experiments/NAME.py``): ``kl_estimators`` (Schulman 2020) and ``ipo_vs_dpo_bandit`` (Azar et al.
2023)."""
