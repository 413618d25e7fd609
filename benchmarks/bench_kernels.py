"""Kernel benchmark: sparse linear backends against cuBLAS dense on LLaMA layer shapes.

For every (layer shape, dtype, format/sparsity, token count) it times

- ``cublas``: ``F.linear`` on the dense weight (the baseline);
- ``torch_2:4``: ``torch.sparse.to_sparse_semi_structured`` (2:4 only, where it runs);
- every registered backend of the format (``owl_sparse.ops.dispatch``: Triton, CUDA extension),
  each forced explicitly through the public op ``owl_sparse.ops.linear``;

and reports median time, achieved GB/s, effective TFLOP/s (2*T*N*K / time), speed-up over
cuBLAS and the fraction of the byte ceiling reached (ceiling = bytes dense moves / bytes the
format moves, weights plus activations).  Every contender's output is checked against an
fp32 reference first; a wrong one is reported and never chosen.  The best backend per
(GPU, dtype, N, K, token bucket, sparsity) goes to a dispatch table in the schema of
``owl_sparse/dispatch.py`` ("dense" wherever no kernel beats cuBLAS by 3%).

Weights are random (N(0, 0.02)); masks are Bernoulli at the sparsity (2:4: the larger two
of every four).  Usage: ``python -m benchmarks.bench_kernels --grid quick`` (GPU suite),
``--grid full``, or ``--grid cpu`` (tiny shapes, the reduced mode the tests run).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.nn.functional as F

from benchmarks.common import (
    REPO,
    Deadline,
    byte_ceiling,
    env_markdown,
    environment,
    gbps,
    rotation_count,
    slug,
    tflops,
    time_calls,
    write_json,
)
from benchmarks.kernel_tables import dispatch_entries, to_markdown

SHAPES = {  # (layer, N = out_features, K = in_features)
    "llama2-7b": [("q/k/v/o", 4096, 4096), ("gate/up", 11008, 4096), ("down", 4096, 11008)],
    "llama2-13b": [("q/k/v/o", 5120, 5120), ("gate/up", 13824, 5120), ("down", 5120, 13824)],
    "llama3-8b": [
        ("q/o", 4096, 4096),
        ("k/v", 1024, 4096),
        ("gate/up", 14336, 4096),
        ("down", 4096, 14336),
    ],
    "llama2-70b": [
        ("q/o", 8192, 8192),
        ("k/v", 1024, 8192),
        ("gate/up", 28672, 8192),
        ("down", 8192, 28672),
    ],
    "tiny": [("a", 48, 256), ("b", 40, 200)],
}
TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 512, 2048)
PATTERNS = {"50%": 0.5, "60%": 0.6, "70%": 0.7, "80%": 0.8, "2:4": None}
F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32
# Each grid is a list of blocks measured in order (most important first), so a time budget
# cuts the least important measurements.
GRIDS = {
    "quick": [
        (["llama2-7b"], (1, 8, 16, 32, 128, 512, 2048), ("50%", "60%", "70%", "80%", "2:4"), [F16]),
        (["llama2-13b", "llama2-70b"], (1, 16), ("50%", "70%", "80%", "2:4"), [F16]),
        (["llama2-7b"], (1, 16, 2048), ("70%", "2:4"), [BF16]),
        (["llama3-8b"], (1, 16), ("70%", "2:4"), [F16]),
    ],
    "full": [
        (
            ["llama2-7b", "llama2-13b", "llama3-8b", "llama2-70b"],
            TOKENS,
            tuple(PATTERNS),
            [F16, BF16],
        )
    ],
    "cpu": [(["tiny"], (1, 5), ("70%", "2:4"), [F32])],
}
TOLERANCE = {F16: 1e-2, BF16: 3e-2, F32: 5e-3}  # relative L2 error against fp32


def random_weight(n: int, k: int, pattern: str, dtype, device, gen) -> tuple:
    """(dense weight with the mask applied, bool mask) for a pattern of `PATTERNS`."""
    w = (torch.randn(n, k, generator=gen, device=device) * 0.02).to(dtype)
    if PATTERNS[pattern] is None:
        groups = w.float().abs().view(n, -1, 4)
        keep = groups.topk(2, dim=-1).indices
        mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True).view(n, k)
    else:
        mask = torch.rand(n, k, generator=gen, device=device) >= PATTERNS[pattern]
    return w * mask, mask


def _contenders(fmt: str, tokens: int, only: list[str] | None) -> list[str]:
    from owl_sparse.ops import dispatch

    names = ["cublas"] + (["torch_2:4"] if fmt == "2:4" else [])
    for name in dispatch.backends(fmt, only_available=True):
        if name == "dense" or ("gemv" in name and tokens > 64):
            continue  # the dense backend is cuBLAS; GEMV kernels are for decode sizes
        if name == "cuda_gemv" and tokens > 8:
            continue  # beyond 8 tokens that backend runs cuda_mma (timed on its own)
        if name == "cuda_sp_wgmma" and tokens < 33:
            continue  # below 33 tokens that backend runs cuda_sp (timed on its own)
        if name == "cuda_mma_wgmma" and not 33 <= tokens <= 128:
            continue  # elsewhere that backend runs cuda_mma (timed on its own)
        names.append(name)
    return [n for n in names if only is None or n in only or n == "cublas"]


def _make_fn(name: str, fmt: str, x, dense, packed, semi):
    from owl_sparse import ops
    from owl_sparse.ops import dispatch

    if name == "cublas":
        return lambda: F.linear(x, dense)
    if name == "torch_2:4":
        return lambda: F.linear(x, semi)

    def run():
        with dispatch.force_backend(fmt, name):
            return ops.linear(x, packed)

    return run


def measure_point(
    model, layer, n, k, dtype, pattern, device, tokens_list, only, gen, deadline, target_s
) -> list[dict]:
    """All contenders at all token counts for one (shape, dtype, pattern)."""
    from owl_sparse.formats import pack

    fmt = "2:4" if PATTERNS[pattern] is None else "bitmap"
    elem = torch.empty((), dtype=dtype).element_size()
    w0, m0 = random_weight(n, k, pattern, dtype, device, gen)
    rot = rotation_count(n * k * elem, device)
    sets = [(w0, m0)] + [random_weight(n, k, pattern, dtype, device, gen) for _ in range(rot - 1)]
    packed = [pack(w, m, fmt) for w, m in sets]
    semi, semi_error = [None] * rot, None
    if fmt == "2:4":
        try:
            from torch.sparse import to_sparse_semi_structured

            semi = [to_sparse_semi_structured(w) for w, _ in sets]
        except Exception as e:  # noqa: BLE001 - unsupported dtype/device/arch: say so
            semi_error = f"{type(e).__name__}: {e}"[:200]
    rows = []
    for tokens in tokens_list:
        if deadline.expired():
            break
        xs = [torch.randn(tokens, k, generator=gen, device=device).to(dtype) for _ in range(rot)]
        ref = F.linear(xs[0].float(), sets[0][0].float())
        dense_bytes = (n * k + tokens * k + tokens * n) * elem
        base = None
        for name in _contenders(fmt, tokens, only):
            row = dict(
                model=model,
                layer=layer,
                N=n,
                K=k,
                dtype=str(dtype).removeprefix("torch."),
                pattern=pattern,
                fmt=fmt,
                sparsity=round(packed[0].sparsity, 4),
                tokens=tokens,
                contender=name,
            )
            if name == "torch_2:4" and semi_error:
                rows.append({**row, "error": semi_error})
                continue
            fns = [_make_fn(name, fmt, xs[i], sets[i][0], packed[i], semi[i]) for i in range(rot)]
            try:
                y = fns[0]().float()
                err = ((y - ref).norm() / ref.norm().clamp_min(1e-30)).item()
                t = time_calls(fns, device, target_s=target_s)
            except Exception as e:  # noqa: BLE001 - record the failure, keep benchmarking
                rows.append({**row, "error": f"{type(e).__name__}: {e}"[:200]})
                continue
            weight_bytes = n * k * elem if name == "cublas" else packed[0].nbytes
            moved = weight_bytes + (tokens * k + tokens * n) * elem
            if name == "cublas":
                base = t.seconds
            row.update(
                time_us=t.seconds * 1e6,
                spread=round(t.spread, 3),
                method=t.method,
                rotation=t.rotation,
                rel_err=err,
                ok=err <= TOLERANCE[dtype],
                bytes=moved,
                gbps=gbps(moved, t.seconds),
                tflops=tflops(2 * tokens * n * k, t.seconds),
                ceiling=byte_ceiling(dense_bytes, moved),
            )
            if base:
                row["speedup"] = base / t.seconds
                row["frac_ceiling"] = row["speedup"] / row["ceiling"]
            rows.append(row)
    return rows


def run(
    grid: str = "quick",
    device=None,
    budget_s: float | None = None,
    only=None,
    target_s: float = 0.05,
    seed: int = 0,
    checkpoint=None,
) -> dict:
    """Run a grid; returns ``{"env", "grid", "rows", "dispatch", "skipped"}``.

    ``checkpoint(doc)`` is called after every shape/pattern with the results so far (the
    suite saves them, so a step killed at its time limit keeps what it measured)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gen = torch.Generator(device=device).manual_seed(seed)
    deadline = Deadline(budget_s)
    rows, skipped = [], []
    doc = {
        "env": environment(device),
        "grid": grid,
        "rows": rows,
        "dispatch": [],
        "skipped": skipped,
    }
    for models, tokens, patterns, dtypes in GRIDS[grid]:
        for dtype in dtypes:
            for model in models:
                for layer, n, k in SHAPES[model]:
                    for pattern in patterns:
                        if deadline.expired():
                            skipped.append(f"{model} {layer} {dtype} {pattern} (budget)")
                            continue
                        rows += measure_point(
                            model,
                            layer,
                            n,
                            k,
                            dtype,
                            pattern,
                            device,
                            tokens,
                            only,
                            gen,
                            deadline,
                            target_s,
                        )
                        if device.type == "cuda":
                            torch.cuda.empty_cache()
                        doc["dispatch"] = dispatch_entries(rows)
                        if checkpoint is not None:
                            checkpoint(doc)
    return doc


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench_kernels", description=__doc__.splitlines()[0])
    p.add_argument(
        "--grid",
        choices=sorted(GRIDS),
        default=None,
        help="quick (GPU suite), full, cpu (tiny shapes); default: quick on CUDA, cpu elsewhere",
    )
    p.add_argument("--device", default=None)
    p.add_argument("--budget-s", type=float, default=None, help="stop starting new shapes after")
    p.add_argument("--only", default=None, help="comma-separated contenders (cublas always runs)")
    p.add_argument("--target-s", type=float, default=0.05, help="seconds of timing per measurement")
    p.add_argument("--json-out", default=None, help="write all rows here")
    p.add_argument(
        "--table-out",
        default=None,
        help="write the dispatch table here (default on CUDA: "
        "owl_sparse/ops/tables/<gpu>.json; 'none' to skip)",
    )
    p.add_argument("--json", action="store_true", help="print the result as one JSON line")
    return p


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    grid = args.grid or ("quick" if device.type == "cuda" else "cpu")
    only = args.only.split(",") if args.only else None
    table = args.table_out
    if table is None and device.type == "cuda":
        name = slug(torch.cuda.get_device_name(device))
        table = str(REPO / "owl_sparse" / "ops" / "tables" / f"{name}.json")

    def save(doc: dict) -> None:
        if args.json_out:
            write_json(args.json_out, doc)
        if table and table != "none" and doc["dispatch"]:
            from owl_sparse.ops import dispatch

            Path(table).parent.mkdir(parents=True, exist_ok=True)
            dispatch.save_table(table, doc["env"]["device"], doc["dispatch"])

    doc = run(grid, device, args.budget_s, only, args.target_s, checkpoint=save)
    save(doc)
    print(env_markdown(doc["env"]) + "\n")
    print(to_markdown(doc))
    if table and table != "none" and doc["dispatch"]:
        print(f"dispatch table: {table} ({len(doc['dispatch'])} entries)")
    if args.json:
        import json

        print(json.dumps(doc, default=str))
    return doc


if __name__ == "__main__":
    main()
