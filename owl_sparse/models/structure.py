"""Find a causal LM's decoder blocks and linear layers without attribute paths.

The decoder blocks are the longest ``nn.ModuleList`` of identical modules that contain
linear layers (preferring one whose length equals ``config.num_hidden_layers``), which covers
LLaMA, Mistral, Qwen2/3, OPT, GPT-2 and most other decoder-only families. A linear layer is
an ``nn.Linear`` or transformers' GPT-2 ``Conv1D`` (`owl_sparse.nn.is_linear`), which
`conv1d_to_linear_` turns into ``nn.Linear`` so pruning and packing handle one kind.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import InputError
from ..nn.linear import SparseLinear, is_conv1d, is_linear


@dataclass(frozen=True)
class DecoderStructure:
    """Where a model keeps its decoder blocks.

    Attributes:
        path: fully qualified name of the ``nn.ModuleList`` (e.g. ``model.layers``).
        blocks: the blocks, in order.
    """

    path: str
    blocks: nn.ModuleList


def _is_linear_like(module: nn.Module) -> bool:
    """A linear layer, dense or packed (SparseLinear), for block discovery."""
    return is_linear(module) or isinstance(module, SparseLinear)


def find_decoder_blocks(model: nn.Module) -> DecoderStructure:
    """Find the decoder blocks of a causal LM without attribute paths.

    Candidates are ``nn.ModuleList`` s whose children all have the same class and contain
    at least one linear layer; a list whose length equals ``config.num_hidden_layers`` wins,
    otherwise the longest.

    Raises:
        InputError: when no such list exists.
    """
    expected = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    best = None
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        kinds = {type(b) for b in mod}
        if len(kinds) != 1 or not any(_is_linear_like(m) for m in mod[0].modules()):
            continue
        score = (len(mod) == expected, len(mod))
        if best is None or score > best[0]:
            best = (score, name, mod)
    if best is None:
        raise InputError(
            f"{type(model).__name__}: no decoder blocks found (no nn.ModuleList of identical "
            "modules containing linear layers)"
        )
    return DecoderStructure(path=best[1], blocks=best[2])


def find_linears(module: nn.Module) -> dict[str, nn.Module]:
    """All linear layers inside ``module`` by their names relative to it, in module order."""
    return {name: m for name, m in module.named_modules() if name and is_linear(m)}


def conv1d_to_linear_(model: nn.Module) -> int:
    """Replace transformers ``Conv1D`` layers (GPT-2 family) by equivalent ``nn.Linear``.

    Conv1D stores its weight as [in, out]; nn.Linear as [out, in]. After this call every
    linear layer of the model is an ``nn.Linear``, so pruning and packing handle one kind.
    Returns the number of layers replaced. Outputs are unchanged (same math).
    """
    replaced = 0
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if not is_conv1d(child):
                continue
            weight = child.weight  # [in, out]
            lin = nn.Linear(
                weight.shape[0],
                weight.shape[1],
                bias=child.bias is not None,
                device=weight.device,
                dtype=weight.dtype,
            )
            with torch.no_grad():
                lin.weight.copy_(weight.t())
                if child.bias is not None:
                    lin.bias.copy_(child.bias)
            setattr(parent, child_name, lin)
            replaced += 1
    return replaced


def model_info(model: nn.Module) -> dict:
    """A JSON-able summary: class, parameters, dtype, decoder blocks and their linears.

    ``parameters`` counts a packed (SparseLinear) layer's weight as its logical N*K, so a
    model reports the same count before and after packing. ``block_linears`` maps each
    linear layer of the first block, dense or packed, to ``[out, in]``; ``block_packed``
    gives the packed ones' format, sparsity and bytes; ``packed`` totals the whole model's
    packed layers (``layers``, ``bytes``, ``dense_bytes``: the same weights stored dense).
    """
    structure = find_decoder_blocks(model)
    linears = {n: m for n, m in structure.blocks[0].named_modules() if n and _is_linear_like(m)}
    packed = [m for m in model.modules() if isinstance(m, SparseLinear)]
    cfg = getattr(model, "config", None)
    return {
        "class": type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters())
        + sum(m.out_features * m.in_features for m in packed),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "blocks_path": structure.path,
        "num_blocks": len(structure.blocks),
        "block_linears": {n: list(_weight_shape(m)) for n, m in linears.items()},
        "block_packed": {
            n: {"format": m.format, "sparsity": round(float(m.sparsity), 6), "bytes": m.nbytes}
            for n, m in linears.items()
            if isinstance(m, SparseLinear)
        },
        "packed": {
            "layers": len(packed),
            "bytes": sum(m.nbytes for m in packed),
            "dense_bytes": sum(
                m.out_features * m.in_features * m.values.element_size() for m in packed
            ),
        },
        "max_position_embeddings": max_context(model),
        "vocab_size": getattr(cfg, "vocab_size", None),
    }


def _weight_shape(m: nn.Module) -> tuple[int, int]:
    """[out, in] for nn.Linear, Conv1D and SparseLinear alike."""
    if isinstance(m, SparseLinear):
        return (m.out_features, m.in_features)
    w = m.weight
    return tuple(w.shape) if isinstance(m, nn.Linear) else (w.shape[1], w.shape[0])


def max_context(model: nn.Module) -> int | None:
    """The longest sequence the model accepts, from its config (None when unknown)."""
    cfg = getattr(model, "config", None)
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(cfg, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def cache_kwarg(model: nn.Module) -> str:
    """The name the model's forward takes its KV cache under: ``cache`` in transformers
    releases that renamed it, ``past_key_values`` before (and where the forward is opaque)."""
    import inspect

    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"
