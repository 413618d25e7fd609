"""CPU kernel benchmark: the packed CPU backends against torch's dense linear, LLaMA shapes.

For every (layer shape, dtype, pattern, token count) it times, on the same machine in one run:

- ``torch_dense``: ``F.linear`` on the dense weight in the same dtype (the baseline);
- ``torch_fp32``: ``F.linear`` in fp32 (what a user without bf16 support runs);
- ``cpu_sparse``: the owl-sparse kernels on the packed bytes (:mod:`owl_sparse.ops.cpu`);
- ``dense``: the owl-sparse dense backend (panels unpacked into a reused buffer, then GEMM);

and reports median time, GB/s (weights + activations moved), the fraction of this
machine's read bandwidth (measured in the same run, `read_bandwidth`), the speed-up over
``torch_dense`` and ``torch_fp32``, and the byte ceiling.  Each contender's output is
checked against an fp32 reference first.  Every contender cycles through enough copies of
its weights to cover 3x the last-level cache the machine reports (`common.llc_bytes`), so
no weight is ever read from cache.  The faster of the two owl-sparse backends per (dtype,
N, K, token bucket, sparsity) goes to the dispatch table ``owl_sparse/ops/tables/
cpu-<isa>.json``.

``python -m benchmarks.bench_cpu`` (grid "quick": LLaMA-2-7B shapes), ``--grid tiny`` (the
reduced mode the tests run), ``--out benchmarks/results/cpu-kernels-<date>`` writes JSON,
Markdown and a plot.
"""

from __future__ import annotations

import argparse
import math
import statistics
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
    llc_bytes,
    markdown_table,
    time_calls,
    write_json,
)
from benchmarks.kernel_tables import update_table

SHAPES = {
    "llama2-7b": [("q/k/v/o", 4096, 4096), ("gate/up", 11008, 4096), ("down", 4096, 11008)],
    "tiny": [("a", 40, 200), ("b", 48, 256)],
}
PATTERNS = {"50%": 0.5, "60%": 0.6, "70%": 0.7, "80%": 0.8, "2:4": None}
BF16, F32 = torch.bfloat16, torch.float32
GRIDS = {  # (models, tokens, patterns, dtypes), most important first
    "quick": [
        (["llama2-7b"], (1, 2, 4, 8, 16, 64, 256), ("50%", "60%", "70%", "80%", "2:4"), [BF16]),
        (["llama2-7b"], (1, 4, 16, 64), ("70%", "2:4"), [F32]),
    ],
    "tiny": [(["tiny"], (1, 3, 20), ("70%", "2:4"), [BF16, F32])],
}
CONTENDERS = ("torch_dense", "torch_fp32", "cpu_sparse", "dense")
TOLERANCE = {BF16: 2e-2, F32: 1e-4}  # relative L2 error against fp32
ROUNDS = 3


def read_bandwidth(nbytes: int) -> float:
    """GB/s reading a buffer of ``nbytes`` with every thread (the best of 5 passes)."""
    buf = torch.ones(max(nbytes, 2**20) // 8, dtype=torch.float64)
    return float(torch.ops.owl_sparse_cpu.read_bandwidth(buf, 5))


def copies_for(nbytes: int, llc: int, factor: float = 3.0, cap: int = 64) -> int:
    """How many copies of an ``nbytes`` weight cover ``factor`` x the last-level cache."""
    return max(2, min(cap, math.ceil(factor * llc / max(nbytes, 1))))


def packed_copies(packed, count: int) -> list:
    """``packed`` and ``count - 1`` copies of it in memory of their own: the same values at
    other addresses defeat the caches as well as new weights, without packing again."""
    state = packed.state_dict()
    return [packed] + [
        type(packed).from_state_dict({k: v.clone() for k, v in state.items()}, validate=False)
        for _ in range(count - 1)
    ]


def random_weight(n: int, k: int, pattern: str, gen) -> tuple[torch.Tensor, torch.Tensor]:
    w = torch.randn(n, k, generator=gen) * 0.02
    if PATTERNS[pattern] is None:
        groups = w.abs().view(n, -1, 4)
        keep = groups.topk(2, dim=-1).indices
        mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True).view(n, k)
    else:
        mask = torch.rand(n, k, generator=gen) >= PATTERNS[pattern]
    return w * mask, mask


def _packed_op(p, x):
    if p.fmt == "bitmap":
        return torch.ops.owl_sparse.bitmap_linear(
            x, p.bitmap, p.values, p.tile_offsets, None, p.N, p.K
        )
    return torch.ops.owl_sparse.sparse24_linear(x, p.values, p.meta, None)


def _calls(name: str, fmt: str, x, denses, packs) -> list:
    """One zero-argument call per weight copy, for a contender."""
    from owl_sparse.ops import dispatch

    if name in ("torch_dense", "torch_fp32"):
        xd = x if name == "torch_dense" else x.float()
        return [lambda d=d: F.linear(xd, d) for d in denses]

    def run(p):
        with dispatch.force_backend(fmt, name):
            return _packed_op(p, x)

    return [lambda p=p: run(p) for p in packs]


def measure_point(
    model, layer, n, k, dtype, pattern, tokens_list, gen, llc, bw, target_s, deadline
):
    """All contenders at all token counts for one (shape, dtype, pattern)."""
    from owl_sparse.formats import pack

    fmt = "2:4" if PATTERNS[pattern] is None else "bitmap"
    w, mask = random_weight(n, k, pattern, gen)
    elem = torch.empty((), dtype=dtype).element_size()
    packed0 = pack(w.to(dtype), mask, fmt)
    dense0 = w.to(dtype)
    packs = packed_copies(packed0, copies_for(packed0.nbytes, llc))
    denses = [dense0] + [dense0.clone() for _ in range(copies_for(n * k * elem, llc) - 1)]
    fp32s = [w] + [w.clone() for _ in range(copies_for(n * k * 4, llc) - 1)]
    rows = []
    for tokens in tokens_list:
        if deadline.expired():
            break
        x = torch.randn(tokens, k, generator=gen).to(dtype)
        x32 = x.float()
        ref = F.linear(x32, packed0.to_dense().float())
        calls, errors, rounds = {}, {}, {}
        with torch.inference_mode():
            for name in CONTENDERS:
                if name == "torch_fp32" and dtype == F32:
                    continue
                fns = _calls(name, fmt, x, denses if name == "torch_dense" else fp32s, packs)
                y = fns[0]().float()
                errors[name] = ((y - ref).norm() / ref.norm().clamp_min(1e-30)).item()
                calls[name], rounds[name] = fns, []
            # The contenders take turns (ROUNDS rounds, the median of their medians), so a
            # slow spell of a shared machine does not land on one of them only.
            for _ in range(ROUNDS):
                for name, fns in calls.items():
                    t = time_calls(fns, "cpu", target_s / ROUNDS, min_reps=5, max_reps=40)
                    rounds[name].append(t.seconds)
        times = {name: statistics.median(ts) for name, ts in rounds.items()}
        act = (tokens * k + tokens * n) * elem
        for name, t in times.items():
            weight = (
                packed0.nbytes
                if name in ("cpu_sparse", "dense")
                else n * k * (4 if name == "torch_fp32" else elem)
            )
            moved = weight + act
            rows.append(
                dict(
                    model=model,
                    layer=layer,
                    N=n,
                    K=k,
                    dtype=str(dtype).removeprefix("torch."),
                    pattern=pattern,
                    fmt=fmt,
                    sparsity=round(packed0.sparsity if fmt == "bitmap" else 0.5, 4),
                    tokens=tokens,
                    contender=name,
                    time_us=t * 1e6,
                    gbps=gbps(moved, t),
                    frac_read_bw=gbps(moved, t) / bw,
                    rel_err=errors[name],
                    ok=errors[name] <= TOLERANCE[dtype],
                    speedup=times["torch_dense"] / t,
                    speedup_fp32=times["torch_fp32"] / t if "torch_fp32" in times else None,
                    ceiling=byte_ceiling(n * k * elem + act, packed0.nbytes + act),
                    copies=len(packs) if name in ("cpu_sparse", "dense") else len(denses),
                )
            )
    return rows


def dispatch_entries(rows: list[dict]) -> list[dict]:
    """The faster correct owl-sparse backend per (fmt, dtype, N, K, tokens, sparsity)."""
    from owl_sparse.ops.table import token_bucket

    best: dict[tuple, dict] = {}
    for r in rows:
        if r["contender"] not in ("cpu_sparse", "dense") or not r["ok"]:
            continue
        key = (r["fmt"], r["dtype"], r["N"], r["K"], token_bucket(r["tokens"]), r["sparsity"])
        if key not in best or r["time_us"] < best[key]["time_us"]:
            best[key] = r
    return [
        dict(
            fmt=f,
            dtype=d,
            N=n,
            K=k,
            tokens=t,
            sparsity=s,
            backend=r["contender"],
            why=f"{r['speedup']:.2f}x torch dense ({r['time_us']:.0f} us)",
        )
        for (f, d, n, k, t, s), r in sorted(best.items())
    ]


def run(
    grid: str = "quick",
    budget_s: float | None = None,
    target_s: float = 0.3,
    seed: int = 0,
    patterns: list[str] | None = None,
    layers: list[str] | None = None,
):
    """Measure a grid (optionally only some patterns / layer names of it)."""
    from owl_sparse.ops import cpu

    if not cpu.available():
        raise SystemExit(f"the CPU kernels are unavailable: {cpu.status()['error']}")
    gen = torch.Generator().manual_seed(seed)
    llc = llc_bytes()
    bw = read_bandwidth(3 * llc)
    deadline = Deadline(budget_s)
    doc = {
        "env": environment("cpu"),
        "grid": grid,
        "read_bandwidth_gbps": bw,
        "llc_bytes": llc,
        "rows": [],
        "skipped": [],
    }
    for models, tokens, grid_patterns, dtypes in GRIDS[grid]:
        for dtype in dtypes:
            for model in models:
                for layer, n, k in SHAPES[model]:
                    if layers and layer not in layers:
                        continue
                    for pattern in grid_patterns:
                        if patterns and pattern not in patterns:
                            continue
                        if deadline.expired():
                            doc["skipped"].append(f"{model} {layer} {dtype} {pattern}")
                            continue
                        doc["rows"] += measure_point(
                            model,
                            layer,
                            n,
                            k,
                            dtype,
                            pattern,
                            tokens,
                            gen,
                            llc,
                            bw,
                            target_s,
                            deadline,
                        )
    doc["dispatch"] = dispatch_entries(doc["rows"])
    return doc


def to_markdown(doc: dict) -> str:
    """Speed-up of the best owl-sparse backend over torch dense, per shape / pattern / tokens."""
    best: dict[tuple, dict] = {}
    for r in doc["rows"]:
        if r["contender"] in ("cpu_sparse", "dense") and r["ok"]:
            key = (r["dtype"], r["layer"], r["N"], r["K"], r["pattern"], r["tokens"])
            if key not in best or r["time_us"] < best[key]["time_us"]:
                best[key] = r
    tokens = sorted({k[-1] for k in best})
    groups = sorted({k[:-1] for k in best})
    rows = []
    for g in groups:
        cells = []
        for t in tokens:
            r = best.get((*g, t))
            cells.append(f"{r['speedup']:.2f}x ({r['contender']})" if r else "-")
        one = best.get((*g, 1))
        extra = f"{one['frac_read_bw']:.0%}" if one else "-"
        rows.append([g[0], f"{g[1]} {g[2]}x{g[3]}", g[4], *cells, extra])
    head = ["dtype", "layer", "pattern", *[f"{t} tok" for t in tokens], "read BW @1"]
    return markdown_table(head, rows)


def plot(doc: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), sharey=True)
    layers = [s[0] for s in SHAPES["llama2-7b"]] if doc["grid"] == "quick" else ["a", "b"]
    for ax, layer in zip(axes, layers):
        for pattern in PATTERNS:
            pts = {}
            for r in doc["rows"]:
                if r["layer"] == layer and r["pattern"] == pattern and r["dtype"] == "bfloat16":
                    if r["contender"] in ("cpu_sparse", "dense") and r["ok"]:
                        pts[r["tokens"]] = max(pts.get(r["tokens"], 0), r["speedup"])
            if pts:
                ts = sorted(pts)
                ax.plot(ts, [pts[t] for t in ts], marker="o", label=pattern)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{layer} (bf16)")
        ax.set_xlabel("tokens")
    axes[0].set_ylabel("speed-up over torch dense bf16")
    axes[0].legend()
    env = doc["env"]
    fig.suptitle(
        f"owl-sparse CPU kernels, {env['device']}, {env['cpu_isa']}, {env['commit']}, {env['date']}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench_cpu", description=__doc__.splitlines()[0])
    p.add_argument("--grid", choices=sorted(GRIDS), default="quick")
    p.add_argument("--budget-s", type=float, default=None, help="stop starting new shapes after")
    csv = lambda s: [x for x in s.split(",") if x]
    p.add_argument("--patterns", type=csv, default=None, help="only these, e.g. 70%%,2:4")
    p.add_argument("--layers", type=csv, default=None, help="only these, e.g. q/k/v/o")
    p.add_argument("--target-s", type=float, default=0.3, help="seconds of timing per measurement")
    p.add_argument("--out", default=None, help="write <out>.json, <out>.md and <out>.png")
    p.add_argument(
        "--table-out",
        default=None,
        help="the dispatch table (default: owl_sparse/ops/tables/cpu-<isa>.json with the quick "
        "grid, none otherwise; 'none' to skip)",
    )
    return p


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    doc = run(args.grid, args.budget_s, args.target_s, patterns=args.patterns, layers=args.layers)
    doc["command"] = "python -m benchmarks.bench_cpu " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    from owl_sparse.ops import cpu

    table = args.table_out
    if table is None and args.grid == "quick":
        table = str(REPO / "owl_sparse" / "ops" / "tables" / f"cpu-{cpu.isa()}.json")
    if table and table != "none" and doc["dispatch"]:
        # the packed formats' entries; the "dense" ones (cpu_dense_layers) are kept
        update_table(Path(table), cpu.device_key(), doc["dispatch"])
        doc["table"] = table
    md = env_markdown(doc["env"]) + f"\n- command: `{doc['command']}`"
    md += f"\n\nread bandwidth {doc['read_bandwidth_gbps']:.1f} GB/s; "
    md += f"weights rotated over >= 3 x {doc['llc_bytes'] / 2**20:.0f} MiB\n\n" + to_markdown(doc)
    if args.out:
        out = Path(args.out)
        write_json(out.with_suffix(".json"), doc)
        out.with_suffix(".md").write_text(md + "\n")
        plot(doc, out.with_suffix(".png"))
    print(md)
    return doc


if __name__ == "__main__":
    main()
