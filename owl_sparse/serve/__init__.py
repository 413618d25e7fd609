"""Serving in the same process as pruning: batched generation over a static KV cache, the
decode step replayed from a CUDA graph on GPUs."""

from .generate import GenerateResult, generate, generate_ids
from .sampling import sample_next

__all__ = ["GenerateResult", "generate", "generate_ids", "sample_next"]
