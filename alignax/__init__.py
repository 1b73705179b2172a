"""alignax: JAX-native alignment for language models.

``import alignax as ax`` gives the whole public API: losses, advantages, KL estimators, reductions,
fused log-prob kernels and models.
"""

__version__ = "0.1.0"

# --- layer 1a: reductions, KL, advantages, policy-gradient losses ------------------------------
# --- end layer 1a -------------------------------------------------------------------------------

# --- layer 1b: supervised, reward-model and direct-preference losses ---------------------------
# --- end layer 1b -------------------------------------------------------------------------------

# --- layer 0: fused LM-head kernels ------------------------------------------------------------
# --- end layer 0 --------------------------------------------------------------------------------

# --- layer 2: models ---------------------------------------------------------------------------
# --- end layer 2 --------------------------------------------------------------------------------
