"""The demo's defaults, in one place (no torch import: ``owl-sparse --help`` reads them).

Chosen from our own quality table (``benchmarks/results/quality-smollm2.md``, SmolLM2-135M,
WikiText-2): at 50% the best cell is SparseGPT scores with the sensitivity-aware allocation
(perplexity 48.21 against 49.27 uniform and 49.89 OWL; dense 28.14), and the
sensitivity allocation beats uniform in every unstructured cell of the table. The demo says
which cell it runs and why.
"""

from __future__ import annotations

DEMO_DEFAULTS = {
    "method": "sparsegpt",
    "allocation": "sensitivity",
    "sparsity": 0.5,
    "calib_samples": 32,
    "calib_seqlen": 256,
    "max_new_tokens": 32,
}

# Where the defaults come from, printed by the demo beside the configuration it runs.
DEMO_DEFAULTS_SOURCE = (
    "the best 50% cell of benchmarks/results/quality-smollm2.md (SparseGPT + sensitivity "
    "allocation: perplexity 48.21, uniform 49.27, OWL 49.89, dense 28.14)"
)
