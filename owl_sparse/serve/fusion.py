"""A graph pass of the compiled CPU decode step: packed layers that read the same activations
become one call.

A transformer block's q/k/v projections read the same normed hidden state, and so do its
gate/up projections. Packed in the bitmap format, each is an ``owl_sparse::bitmap_linear``
call, and at one token a call is short (SmolLM2-135M: 80-650 KB of packed weights), so the
fixed part of each call (converting x for the kernels, a fork and join of the threads, the
output allocation) is a visible share of a decode step. `group_bitmap_linears` replaces
every set of such calls on one input by one ``owl_sparse::bitmap_linear_group`` call whose
output holds theirs side by side, and gives each former call's users its slice of that
output (a view, strided where there is more than one row: inductor's kernels read it in
place; a contiguous copy of each slice cost what the grouping saved). The result is bit for
bit the same.

It runs on inductor's post-grad graph (`GroupSharedInput`, inductor's
``post_grad_custom_pre_pass`` option, set by `owl_sparse.serve.kv_cache.compile_options` for
CPU models), where the model's tensors are graph inputs, so no weight is copied or
concatenated: the grouped op reads each weight where it is. Calls with a bias are left
alone.
"""

from __future__ import annotations

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

from ..ops import library  # noqa: F401  (defines torch.ops.owl_sparse.*)

_ARGS = ("x", "bitmap", "values", "tile_offsets", "bias", "out_features", "in_features")


def _call_args(node: torch.fx.Node) -> dict | None:
    """The arguments of a ``bitmap_linear`` call node by name, or None if it is not one."""
    if node.op != "call_function" or node.target is not torch.ops.owl_sparse.bitmap_linear.default:
        return None
    args = dict(zip(_ARGS, node.args))
    args.update(node.kwargs)
    return args if set(args) == set(_ARGS) else None


def group_bitmap_linears(graph: torch.fx.Graph) -> int:
    """Rewrite ``graph`` in place: the bias-free ``bitmap_linear`` calls on the same ``x``
    node (two or more) become one ``bitmap_linear_group`` call placed where the first of
    them was, each former call's users reading its columns (a slice). Returns the number of
    groups made."""
    order = {node: i for i, node in enumerate(graph.nodes)}
    groups: dict[tuple, list[tuple[torch.fx.Node, dict]]] = {}
    for node in graph.nodes:
        args = _call_args(node)
        if args is None or args["bias"] is not None or not isinstance(args["x"], torch.fx.Node):
            continue
        groups.setdefault((args["x"], args["in_features"]), []).append((node, args))
    made = 0
    for (x, k), members in groups.items():
        first = members[0][0]
        # Every weight must exist where the group call goes (graph inputs in practice).
        weights = [a[name] for _, a in members for name in ("bitmap", "values", "tile_offsets")]
        if len(members) < 2 or any(
            not isinstance(w, torch.fx.Node) or order[w] >= order[first] for w in weights
        ):
            continue
        ns = [a["out_features"] for _, a in members]
        with graph.inserting_before(first):
            fused = graph.call_function(
                torch.ops.owl_sparse.bitmap_linear_group.default,
                (
                    x,
                    [a["bitmap"] for _, a in members],
                    [a["values"] for _, a in members],
                    [a["tile_offsets"] for _, a in members],
                    ns,
                    k,
                ),
            )
            val = first.meta.get("val")
            if val is not None:
                fused.meta["val"] = val.new_empty((*val.shape[:-1], sum(ns)))
            col = 0
            for (node, _), n in zip(members, ns):
                piece = graph.call_function(torch.ops.aten.slice.Tensor, (fused, -1, col, col + n))
                if "val" in fused.meta:
                    piece.meta["val"] = fused.meta["val"][..., col : col + n]
                node.replace_all_uses_with(piece)
                col += n
        for node, _ in members:
            graph.erase_node(node)
        made += 1
    if made:
        graph.lint()
    return made


class GroupSharedInput(CustomGraphPass):
    """`group_bitmap_linears` as an inductor custom graph pass (its uuid: this file's hash,
    so inductor's graph cache keys on it)."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        group_bitmap_linears(graph)

    def uuid(self) -> bytes:
        return get_hash_for_files((__file__,))
