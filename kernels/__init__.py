"""Fused LM-head kernels, installed as ``alignax.kernels``.

pyproject.toml maps this folder to ``alignax.kernels``. Imported under any other name (as a top-level
``kernels`` from the repository root, say) it stays inert: an unrelated PyPI package is called
``kernels`` and ``transformers`` imports whatever answers to that name to probe its version.
"""

if __name__ == "alignax.kernels":
  from alignax.kernels.api import IMPLEMENTATIONS as IMPLEMENTATIONS
  from alignax.kernels.api import TokenLogprobs as TokenLogprobs
  from alignax.kernels.api import implementation as implementation
  from alignax.kernels.api import token_kl as token_kl
  from alignax.kernels.api import token_logprobs as token_logprobs
  from alignax.kernels.common import KLStats as KLStats
  from alignax.kernels.common import LMHead as LMHead
  from alignax.kernels.common import VocabStats as VocabStats
