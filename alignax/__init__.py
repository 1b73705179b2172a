"""alignax: JAX-native alignment for language models.

``import alignax as ax`` gives the whole public API: losses, advantages, KL estimators, reductions,
fused log-prob kernels and models.
"""

__version__ = "0.1.0"

# --- layer 1: reductions, KL, advantages, losses (foundation) ---------------------------------
# (filled by the layer-1 work)
# --- end layer 1 --------------------------------------------------------------------------------

# --- layer 0: fused LM-head kernels ------------------------------------------------------------
# (filled by the kernels work)
# --- end layer 0 --------------------------------------------------------------------------------

# --- layer 2: models ---------------------------------------------------------------------------
# (filled by the models work)
# --- end layer 2 --------------------------------------------------------------------------------
