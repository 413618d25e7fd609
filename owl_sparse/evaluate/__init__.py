"""Evaluation of a (pruned) model: perplexity by the papers' protocol, and agreement
(KL divergence, top-1) with a reference model."""

from .perplexity import AgreementResult, PerplexityResult, agreement, perplexity

__all__ = ["AgreementResult", "PerplexityResult", "agreement", "perplexity"]
