"""Evaluation of a (pruned) model: perplexity by the papers' protocol."""

from .perplexity import PerplexityResult, perplexity

__all__ = ["PerplexityResult", "perplexity"]
