"""Paper reproductions, each an experiment module for ``alignax.experiment`` (``alignax run
experiments/NAME.py``): ``kl_estimators`` (Schulman 2020), ``ipo_vs_dpo_bandit`` (Azar et al.
2023), ``dr_grpo_length_bias`` (Liu et al. 2025), ``dpo_frontier`` (Rafailov et al. 2023, Fig. 2),
``grpo_vs_rft`` (Shao et al. 2024, Fig. 5) and ``grpo_group_size`` (GRPO's group size at an equal
sample budget)."""
