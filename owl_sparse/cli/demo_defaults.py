"""The demo's defaults, in one place (no torch import: ``owl-sparse --help`` reads them).

Chosen from our own quality table with three calibration seeds per cell
(``benchmarks/results/quality-smollm2-seeds.md``, SmolLM2-135M, WikiText-2): at 50% the
lowest mean perplexity and KL is SparseGPT scores with the sensitivity-aware allocation
(84.40 +- 0.83, KL 0.693; uniform 85.09 +- 1.65, OWL 85.99 +- 0.57, tuned 84.76 +- 0.51;
dense 45.65): within noise of uniform at 50%, while at 60% and 70% sensitivity (and tuned)
are clearly ahead.  The demo says which cell it runs and why.  Decoding is greedy with
transformers' repetition penalty 1.2 for both models (a pruned 135M model repeats itself
under plain greedy decoding; see `owl_sparse.cli.demo.PROMPT`).
"""

from __future__ import annotations

DEMO_DEFAULTS = {
    "method": "sparsegpt",
    "allocation": "sensitivity",
    "sparsity": 0.5,
    "calib_samples": 32,
    "calib_seqlen": 256,
    "max_new_tokens": 32,
    "repetition_penalty": 1.2,
}

# Where the defaults come from, printed by the demo beside the configuration it runs.
DEMO_DEFAULTS_SOURCE = (
    "the lowest mean perplexity among the 50% cells of "
    "benchmarks/results/quality-smollm2-seeds.md (SparseGPT + sensitivity allocation: "
    "84.40 +- 0.83 over 3 calibration seeds; uniform 85.09 +- 1.65, OWL 85.99 +- 0.57, "
    "so within noise of uniform at 50%; dense 45.65)"
)
