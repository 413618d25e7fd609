"""Dense layers on a CPU at decode sizes: torch's ``F.linear`` against owl-sparse's dense
kernel (``owl_sparse::dense_linear`` forced to ``cpu_kernel``: the weight streamed once for
all tokens), the faster of the two per shape and token count going into the CPU dispatch
table (format "dense").

For each layer shape of SmolLM2-135M (its decoder linears and the tied 49152 x 576 head)
and LLaMA-2-7B, and each token count, both contenders cycle through enough copies of their
weights to cover 3x the last-level cache the machine reports (capped at 2048 copies: the
smallest layers' sets may then still fit the cache, noted per row), take turns over 3
rounds, and report the median time and GB/s of weight bytes.

    python -m benchmarks.cpu_dense_layers --out benchmarks/results/cpu-dense-layers-<date>

writes the table's "dense" entries into ``owl_sparse/ops/tables/cpu-<isa>.json`` (the
packed formats' entries there are kept; ``--table-out none`` skips it).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.nn.functional as F

from benchmarks.bench_cpu import copies_for
from benchmarks.common import (
    REPO,
    env_markdown,
    environment,
    gbps,
    llc_bytes,
    markdown_table,
    time_calls,
    write_json,
)
from benchmarks.kernel_tables import update_table

SHAPES = {  # SmolLM2-135M: hidden 576, 9 query / 3 key-value heads of 64, MLP 1536
    "q/o 576x576": (576, 576),
    "k/v 192x576": (192, 576),
    "gate/up 1536x576": (1536, 576),
    "down 576x1536": (576, 1536),
    "lm_head 49152x576": (49152, 576),
    "7B q/k/v/o 4096x4096": (4096, 4096),
    "7B gate/up 11008x4096": (11008, 4096),
    "7B down 4096x11008": (4096, 11008),
}
CONTENDERS = ("torch", "cpu_kernel")
ROUNDS = 3
MAX_COPIES = 2048


def run(tokens: list[int], target_s: float) -> dict:
    from owl_sparse.ops import cpu

    if not cpu.available():
        raise SystemExit(f"the CPU kernels are unavailable: {cpu.status()['error']}")
    llc = llc_bytes()
    gen = torch.Generator().manual_seed(0)
    rows = []
    with torch.inference_mode():
        for layer, (n, k) in SHAPES.items():
            w = (torch.randn(n, k, generator=gen) * 0.02).bfloat16()
            copies = copies_for(n * k * 2, llc, cap=MAX_COPIES)
            weights = [w] + [w.clone() for _ in range(copies - 1)]
            for t in tokens:
                x = torch.randn(t, k, generator=gen).bfloat16()
                ref = F.linear(x.float(), w.float())

                def ours(d, x=x):
                    with cpu.force_dense("cpu_kernel"):
                        return torch.ops.owl_sparse.dense_linear(x, d, None)

                calls = {
                    "torch": [lambda d=d, x=x: F.linear(x, d) for d in weights],
                    "cpu_kernel": [lambda d=d: ours(d) for d in weights],
                }
                errors = {
                    name: ((fns[0]().float() - ref).norm() / ref.norm()).item()
                    for name, fns in calls.items()
                }
                times = {name: [] for name in calls}
                for _ in range(ROUNDS):
                    for name, fns in calls.items():
                        times[name].append(
                            time_calls(
                                fns, "cpu", target_s / ROUNDS, min_reps=5, max_reps=200
                            ).seconds
                        )
                med = {name: statistics.median(ts) for name, ts in times.items()}
                for name, sec in med.items():
                    rows.append(
                        dict(
                            layer=layer,
                            N=n,
                            K=k,
                            tokens=t,
                            contender=name,
                            time_us=sec * 1e6,
                            gbps=gbps(n * k * 2, sec),
                            speedup=med["torch"] / sec,
                            rel_err=errors[name],
                            copies=copies,
                            rotation_fits_llc=copies * n * k * 2 <= llc,
                        )
                    )
    return {"env": environment("cpu"), "llc_bytes": llc, "rows": rows}


def dispatch_entries(rows: list[dict]) -> list[dict]:
    """The faster contender per (N, K, token bucket), as CPU table entries of fmt "dense"."""
    from owl_sparse.ops.table import token_bucket

    cells: dict[tuple, dict] = {}
    for r in rows:
        cells.setdefault((r["N"], r["K"], token_bucket(r["tokens"])), {})[r["contender"]] = r
    out = []
    for (n, k, t), c in sorted(cells.items()):
        best = min(c.values(), key=lambda r: r["time_us"])
        why = f"cpu_kernel {c['cpu_kernel']['speedup']:.2f}x torch ({best['time_us']:.0f} us)"
        out.append(
            dict(
                fmt="dense",
                dtype="bfloat16",
                N=n,
                K=k,
                tokens=t,
                sparsity=0.0,
                backend=best["contender"],
                why=why,
            )
        )
    return out


def to_markdown(doc: dict) -> str:
    rows = {}
    for r in doc["rows"]:
        cell = rows.setdefault((r["layer"], r["tokens"]), {})
        cell[r["contender"]] = r
    out = []
    for (layer, t), c in rows.items():
        d, o = c["torch"], c["cpu_kernel"]
        out.append(
            [
                layer,
                t,
                f"{d['time_us']:.1f} ({d['gbps']:.1f} GB/s)",
                f"{o['time_us']:.1f} ({o['gbps']:.1f} GB/s)",
                f"{o['speedup']:.2f}x",
                "yes" if d["rotation_fits_llc"] or o["rotation_fits_llc"] else "no",
            ]
        )
    return markdown_table(
        ["layer", "tokens", "torch bf16 us", "owl dense kernel us", "speed-up", "fits LLC"],
        out,
    )


def _token_counts(text: str) -> list[int]:
    try:
        counts = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers like 1,4, got {text!r}")
    return counts


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="cpu_dense_layers", description=__doc__.splitlines()[0])
    p.add_argument(
        "--tokens", type=_token_counts, default="1,2,4,8,16", help="comma list, e.g. 1,4"
    )
    p.add_argument("--target-s", type=float, default=0.3, help="seconds of timing per point")
    p.add_argument("--out", default=None, help="write <out>.json and <out>.md")
    p.add_argument(
        "--table-out",
        default=None,
        help="dispatch table to update (default: owl_sparse/ops/tables/cpu-<isa>.json when "
        "--out is given; 'none' to skip)",
    )
    args = p.parse_args(argv)
    doc = run(args.tokens, args.target_s)
    doc["dispatch"] = dispatch_entries(doc["rows"])
    from owl_sparse.ops import cpu

    table = args.table_out
    if table is None and args.out:
        table = str(REPO / "owl_sparse" / "ops" / "tables" / f"cpu-{cpu.isa()}.json")
    if table and table != "none":
        doc["table"] = str(update_table(Path(table), cpu.device_key(), doc["dispatch"]))
    doc["command"] = "python -m benchmarks.cpu_dense_layers " + " ".join(argv or sys.argv[1:])
    md = "\n".join(
        [
            "# Dense bf16 layers at decode sizes: torch F.linear vs owl-sparse's dense kernel",
            "",
            env_markdown(doc["env"]),
            f"- command: `{doc['command']}`",
            f"- weights rotated over 3 x {doc['llc_bytes'] / 2**20:.0f} MiB (last-level cache "
            f"reported), at most {MAX_COPIES} copies",
            "",
            to_markdown(doc),
            "",
        ]
    )
    if args.out:
        out = Path(args.out)
        write_json(out.with_suffix(".json"), doc)
        out.with_suffix(".md").write_text(md)
    print(md)
    return doc


if __name__ == "__main__":
    main()
