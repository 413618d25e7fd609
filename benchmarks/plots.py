"""Plots of the kernel benchmark (matplotlib, PNG): speed-up over cuBLAS dense against
sparsity and against token count, with the byte ceiling drawn in.

``python -m benchmarks.plots RESULTS.json [--out-stem PATH]`` reads a `bench_kernels`
document (or a suite document with a ``"kernels"`` key) and writes
``<stem>-speedup-vs-sparsity.png`` and ``<stem>-speedup-vs-tokens.png``.

The speed-up plotted is that of the best correct kernel (of all backends timed); the
ceiling is bytes moved by dense / bytes moved by the format at that token count.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def best_rows(rows: list[dict]) -> dict[tuple, dict]:
    """Best correct non-baseline contender per (model, layer, dtype, pattern, tokens)."""
    best: dict[tuple, dict] = {}
    for r in rows:
        if not r.get("ok") or r["contender"] in ("cublas", "torch_2:4") or "speedup" not in r:
            continue
        key = (r["model"], r["layer"], r["dtype"], r["pattern"], r["tokens"])
        if key not in best or r["speedup"] > best[key]["speedup"]:
            best[key] = r
    return best


def _pick_series(best: dict) -> tuple[str, str, list[str]]:
    """The model and dtype with the most points, and its layers in first-seen order."""
    counts: dict[tuple, int] = {}
    for model, _, dtype, _, _ in best:
        counts[(model, dtype)] = counts.get((model, dtype), 0) + 1
    model, dtype = max(counts, key=counts.get)
    layers = list(dict.fromkeys(k[1] for k in best if k[0] == model and k[2] == dtype))
    return model, dtype, layers


def _stamp(env: dict) -> str:
    return f"{env.get('device', '?')} | commit {env.get('commit', '?')} | {env.get('date', '?')}"


def _save(fig, doc: dict, stem: Path, suffix: str) -> Path:
    """Stamp, lay out, write and close ``fig`` as ``<stem><suffix>``; returns the path."""
    import matplotlib.pyplot as plt

    fig.suptitle(_stamp(doc["env"]), fontsize=8)
    fig.tight_layout()
    path = stem.with_name(stem.name + suffix)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_kernels(doc: dict, stem: str | Path) -> list[Path]:
    """Write the two PNGs for a kernel document; returns their paths (empty: no data)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best = best_rows(doc["rows"])
    if not best:
        return []
    model, dtype, layers = _pick_series(best)
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = []

    # 1. speed-up against sparsity, one line per token count, decode ceiling dashed
    fig, axes = plt.subplots(1, len(layers), figsize=(4.2 * len(layers), 3.8), squeeze=False)
    for ax, layer in zip(axes[0], layers):
        pts = {k: r for k, r in best.items() if k[:3] == (model, layer, dtype)}
        tokens = sorted({k[4] for k in pts})[:4]
        for t in tokens:
            series = sorted(
                (r["sparsity"], r["speedup"])
                for k, r in pts.items()
                if k[4] == t and r["fmt"] == "bitmap"
            )
            if series:
                ax.plot(
                    [100 * s for s, _ in series],
                    [v for _, v in series],
                    "o-",
                    label=f"bitmap, {t} tok",
                )
            two4 = [r for k, r in pts.items() if k[4] == t and r["fmt"] == "2:4"]
            if two4:
                ax.plot([50], [two4[0]["speedup"]], "s", label=f"2:4, {t} tok")
        ceil = sorted(
            (r["sparsity"], r["ceiling"])
            for k, r in pts.items()
            if k[4] == min(tokens) and r["fmt"] == "bitmap"
        )
        if ceil:
            ax.plot(
                [100 * s for s, _ in ceil],
                [c for _, c in ceil],
                "k--",
                label=f"byte ceiling, {min(tokens)} tok",
            )
        ax.axhline(1.0, color="grey", lw=0.8)
        first = next(iter(pts.values()))
        ax.set(
            title=f"{model} {layer} ({first['N']}x{first['K']}, {dtype})",
            xlabel="sparsity (%)",
            ylabel="speed-up over cuBLAS",
        )
        ax.legend(fontsize=7)
    paths.append(_save(fig, doc, stem, "-speedup-vs-sparsity.png"))

    # 2. speed-up against token count, one line per pattern, its ceiling dashed
    fig, axes = plt.subplots(1, len(layers), figsize=(4.2 * len(layers), 3.8), squeeze=False)
    for ax, layer in zip(axes[0], layers):
        pts = {k: r for k, r in best.items() if k[:3] == (model, layer, dtype)}
        for i, pattern in enumerate(sorted({k[3] for k in pts})):
            series = sorted(
                (k[4], r["speedup"], r["ceiling"]) for k, r in pts.items() if k[3] == pattern
            )
            color = f"C{i}"
            ax.plot(
                [t for t, _, _ in series],
                [s for _, s, _ in series],
                "o-",
                color=color,
                label=pattern,
            )
            ax.plot([t for t, _, _ in series], [c for _, _, c in series], "--", color=color, lw=0.8)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set(
            title=f"{model} {layer} ({dtype}); dashed: byte ceiling",
            xlabel="tokens",
            ylabel="speed-up over cuBLAS",
        )
        ax.legend(fontsize=7)
    paths.append(_save(fig, doc, stem, "-speedup-vs-tokens.png"))
    return paths


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="plots", description=__doc__.splitlines()[0])
    p.add_argument("results", help="bench_kernels JSON (or a suite JSON)")
    p.add_argument("--out-stem", default=None, help="default: the results path without .json")
    args = p.parse_args(argv)
    doc = json.loads(Path(args.results).read_text())
    kernels = doc.get("kernels", doc)
    stem = args.out_stem or str(Path(args.results).with_suffix(""))
    paths = plot_kernels(kernels, stem)
    for path in paths:
        print(path)
    return {"plots": [str(p) for p in paths]}


if __name__ == "__main__":
    main()
