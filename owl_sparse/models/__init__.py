"""Models: load one by name or path (:mod:`.load`), find its decoder blocks and linear
layers (:mod:`.structure`), and read llama2.c checkpoints (:mod:`.llama2c`).

`load_model` is resolved on first use: :mod:`.load` sits above :mod:`owl_sparse.io` (it
opens packed checkpoints), while :mod:`.structure` sits below it.
"""

from __future__ import annotations

import importlib

from .structure import (
    DecoderStructure,
    conv1d_to_linear_,
    find_decoder_blocks,
    find_linears,
    is_linear,
    max_context,
    model_info,
)

_LAZY = {"load_model": ".load", "load_gguf": ".load", "BUILTIN_MODELS": ".load"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BUILTIN_MODELS",
    "DecoderStructure",
    "conv1d_to_linear_",
    "find_decoder_blocks",
    "find_linears",
    "is_linear",
    "load_gguf",
    "load_model",
    "max_context",
    "model_info",
]
