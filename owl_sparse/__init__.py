"""owl-sparse: prune causal LMs with OWL and serve them with sparse kernels.

The public entry points are imported lazily, so ``import owl_sparse`` stays cheap and
never touches a GPU.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "InputError": "owl_sparse.errors",
    "load_model": "owl_sparse.models",
    "find_decoder_blocks": "owl_sparse.models",
    "find_linears": "owl_sparse.models",
    "load_text": "owl_sparse.data",
    "eval_windows": "owl_sparse.data",
    "calibration_batches": "owl_sparse.data",
    "perplexity": "owl_sparse.evaluate",
    "SparseLinear": "owl_sparse.nn",
    "SparsifyReport": "owl_sparse.nn",
    "sparsify_": "owl_sparse.nn",
    "generate": "owl_sparse.serve",
    "GenerateResult": "owl_sparse.serve",
    "save_pretrained": "owl_sparse.checkpoint",
    "load_pretrained": "owl_sparse.checkpoint",
    "export_compressed_tensors": "owl_sparse.interchange",
    "prune": "owl_sparse.prune",
    "PruneConfig": "owl_sparse.prune",
    "PruneReport": "owl_sparse.prune",
}


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'owl_sparse' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__():
    return sorted(list(globals()) + list(_EXPORTS))


__all__ = sorted(_EXPORTS)
