"""Tables from kernel benchmark rows: the dispatch table entries and the markdown summary."""

from __future__ import annotations

from pathlib import Path

from benchmarks.common import markdown_table

MARGIN = 0.97  # a kernel enters the dispatch table only when it takes <= 97% of dense time


def dispatch_entries(rows: list[dict]) -> list[dict]:
    """Best backend per (fmt, dtype, N, K, tokens, sparsity): a kernel only when it beats
    cuBLAS by `MARGIN`, else "dense"."""
    from owl_sparse.ops import dispatch

    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if "time_us" in r:
            key = (r["fmt"], r["dtype"], r["N"], r["K"], r["tokens"], r["pattern"])
            groups.setdefault(key, []).append(r)
    entries = []
    for (fmt, dtype, n, k, tokens, pattern), group in sorted(groups.items()):
        dense = next((r for r in group if r["contender"] == "cublas"), None)
        kernels = [
            r
            for r in group
            if r["ok"] and r["contender"] in dispatch.backends(fmt) and r["contender"] != "dense"
        ]
        if dense is None:
            continue
        best = min(kernels, key=lambda r: r["time_us"], default=None)
        sparsity = 0.5 if pattern == "2:4" else int(pattern.rstrip("%")) / 100
        entry = dict(
            fmt=fmt, dtype=dtype, N=n, K=k, tokens=dispatch.token_bucket(tokens), sparsity=sparsity
        )
        if best is not None and best["time_us"] <= MARGIN * dense["time_us"]:
            why = (
                f"{best['contender']} {dense['time_us'] / best['time_us']:.2f}x cuBLAS "
                f"({best['time_us']:.1f} vs {dense['time_us']:.1f} us)"
            )
            entries.append({**entry, "backend": best["contender"], "why": why})
        else:
            what = (
                "no kernel ran"
                if best is None
                else (
                    f"best kernel {best['contender']} only "
                    f"{dense['time_us'] / best['time_us']:.2f}x cuBLAS"
                )
            )
            entries.append({**entry, "backend": "dense", "why": what})
    return entries


def summary_rows(rows: list[dict]) -> list[list]:
    """One line per (shape, dtype, pattern, tokens): cuBLAS vs the best correct kernel."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        key = (r["model"], r["layer"], r["N"], r["K"], r["dtype"], r["pattern"], r["tokens"])
        groups.setdefault(key, []).append(r)
    out = []
    for key, group in groups.items():
        dense = next((r for r in group if r["contender"] == "cublas" and "time_us" in r), None)
        ours = [r for r in group if r.get("ok") and r["contender"] not in ("cublas", "torch_2:4")]
        best = min(ours, key=lambda r: r["time_us"], default=None)
        torch24 = next((r for r in group if r["contender"] == "torch_2:4"), None)
        wrong = [r["contender"] for r in group if r.get("ok") is False]
        out.append(
            [
                key[0],
                key[1],
                f"{key[2]}x{key[3]}",
                key[4],
                key[5],
                key[6],
                dense and dense["time_us"],
                best and best["contender"],
                best and best["time_us"],
                best and best.get("speedup"),
                best and best["ceiling"],
                best and best.get("frac_ceiling"),
                best and best["gbps"],
                torch24.get("speedup", torch24.get("error", "-")[:30]) if torch24 else None,
                ", ".join(wrong) or None,
            ]
        )
    return out


SUMMARY_HEADERS = [
    "model",
    "layer",
    "NxK",
    "dtype",
    "sparsity",
    "tokens",
    "cuBLAS us",
    "best",
    "best us",
    "speed-up",
    "ceiling",
    "of ceiling",
    "GB/s",
    "torch 2:4",
    "WRONG",
]


def to_markdown(doc: dict) -> str:
    lines = [
        "### Kernels: best backend against cuBLAS dense",
        "",
        markdown_table(SUMMARY_HEADERS, summary_rows(doc["rows"])),
    ]
    if doc["skipped"]:
        lines += ["", f"Not measured (time budget): {len(doc['skipped'])} shape/pattern groups."]
    return "\n".join(lines)


def update_table(path: Path, device: str, entries: list[dict]) -> Path:
    """Replace the entries of ``entries``' formats in the table at ``path`` (others kept)."""
    import json

    from owl_sparse.ops import dispatch

    fmts = {e["fmt"] for e in entries}
    kept = []
    if path.is_file():
        old = json.loads(path.read_text())
        if old.get("gpu") == device:
            kept = [e for e in old.get("entries", []) if e["fmt"] not in fmts]
    return dispatch.save_table(path, device, kept + entries)
