"""Fused LM-head kernels, installed as ``alignax.kernels``.

pyproject.toml maps this folder to ``alignax.kernels``. Imported under any other name (as a top-level
``kernels`` from the repository root, say) it stays inert: an unrelated PyPI package is called
``kernels`` and ``transformers`` imports whatever answers to that name to probe its version.
"""

if __name__ == "alignax.kernels":
  pass  # public kernel API re-exported here
