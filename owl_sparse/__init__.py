"""owl-sparse: prune causal LMs with OWL and serve them with sparse kernels.

The public entry points are imported lazily, so ``import owl_sparse`` stays cheap and
never touches a GPU.
"""

from __future__ import annotations

import importlib

from ._version import __version__  # noqa: F401

_EXPORTS = {
    "InputError": "owl_sparse.errors",
    "load_model": "owl_sparse.models.load",
    "find_decoder_blocks": "owl_sparse.models.structure",
    "find_linears": "owl_sparse.models.structure",
    "load_text": "owl_sparse.data.text",
    "eval_windows": "owl_sparse.data.windows",
    "calibration_batches": "owl_sparse.data.windows",
    "perplexity": "owl_sparse.evaluate.perplexity",
    "SparseLinear": "owl_sparse.nn.linear",
    "SparsifyReport": "owl_sparse.nn.sparsify",
    "sparsify_": "owl_sparse.nn.sparsify",
    "generate": "owl_sparse.serve.generate",
    "GenerateResult": "owl_sparse.serve.generate",
    "save_pretrained": "owl_sparse.io.packed",
    "load_pretrained": "owl_sparse.io.load",
    "export_compressed_tensors": "owl_sparse.io.compressed_tensors",
    "prune": "owl_sparse.pruning.engine",
    "PruneConfig": "owl_sparse.pruning.config",
    "PruneReport": "owl_sparse.pruning.report",
}


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'owl_sparse' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__():
    return sorted(list(globals()) + list(_EXPORTS))


__all__ = sorted(_EXPORTS)

# transformers opens our packed checkpoints (AutoModelForCausalLM.from_pretrained): the
# quantization method is registered when transformers' quantizer registry loads.
from ._hf_hook import install as _install_hf_hook  # noqa: E402

_install_hf_hook()
