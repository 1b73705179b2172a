"""Composed objectives: supervised, reward-model, direct-preference and policy-gradient losses.

Everything here is re-exported from ``alignax``; import from there.
"""
