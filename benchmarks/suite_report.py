"""Merge the GPU suite's parts into ``<gpu>-<date>.json`` / ``.md`` plus the PNG plots.

``python -m benchmarks.suite_report --parts DIR [--out-dir benchmarks/results]`` reads
``DIR/kernels.json`` (bench_kernels), ``DIR/e2e.json`` (bench_e2e), ``DIR/prune.json``
(bench_prune), ``DIR/steps.txt`` (one ``name rc seconds`` line per suite step) and
``DIR/gpu_tests.log`` (pytest output), whichever exist, and checks the speed targets of
the issues against the measurements (PASS / FAIL / not measured; never estimated).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import bench_e2e, bench_kernels
from benchmarks.common import REPO, RESULTS_DIR, env_markdown, markdown_table, slug, write_json
from benchmarks.plots import best_rows, plot_kernels

BIG_MODELS = ("llama2-7b", "llama2-13b", "llama2-70b")
# reference rows, not owl-sparse kernels: never counted towards a kernel target
BASELINES = ("cublas", "torch_2:4")


def _load(path: Path):
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except ValueError:
        return None


def _kernel_rows(kernels, contenders=None, fmt=None, pattern=None, tokens=None):
    for r in (kernels or {}).get("rows", []):
        if not r.get("ok") or "speedup" not in r or r["model"] not in BIG_MODELS:
            continue
        if contenders is not None and r["contender"] not in contenders:
            continue
        if contenders is None and r["contender"] in BASELINES:
            continue
        if fmt and r["fmt"] != fmt or pattern and r["pattern"] != pattern:
            continue
        if tokens and not tokens[0] <= r["tokens"] <= tokens[1]:
            continue
        yield r


def _worst_best(rows, value="speedup") -> float | None:
    """Min over shapes/tokens of the best contender's value at each point."""
    best: dict[tuple, float] = {}
    for r in rows:
        key = (r["model"], r["layer"], r["dtype"], r["pattern"], r["tokens"])
        best[key] = max(best.get(key, 0.0), r[value])
    return min(best.values()) if best else None


def targets(kernels, e2e, env: dict) -> list[list]:
    """[target, measured, verdict] for each (GPU) target of issues 4, 5 and 6."""
    out = []
    on_gpu = env.get("device_type") == "cuda"

    def add(name, measured, goal, higher=True):
        if measured is None or not on_gpu:
            out.append([name, None, "not measured" + ("" if on_gpu else " (no GPU)")])
        else:
            ok = measured >= goal if higher else measured <= goal
            out.append([name, round(measured, 3), "PASS" if ok else "FAIL"])

    decode = (1, 16)
    add(
        "bitmap decode (1-16 tok): fraction of byte ceiling >= 0.85 (worst shape)",
        _worst_best(_kernel_rows(kernels, fmt="bitmap", tokens=decode), "frac_ceiling"),
        0.85,
    )
    for pattern, goal in (("50%", 1.5), ("70%", 2.3), ("80%", 3.2)):
        add(
            f"bitmap {pattern} decode speed-up >= {goal}x (worst shape)",
            _worst_best(_kernel_rows(kernels, fmt="bitmap", pattern=pattern, tokens=decode)),
            goal,
        )
    add(
        "2:4 decode speed-up >= 1.5x, Triton (worst shape)",
        _worst_best(_kernel_rows(kernels, contenders={"triton_gemv"}, fmt="2:4", tokens=decode)),
        1.5,
    )
    add(
        "2:4 decode speed-up >= 1.6x, CUDA mma.sp (worst shape)",
        _worst_best(_kernel_rows(kernels, contenders={"cuda_sp"}, fmt="2:4", tokens=decode)),
        1.6,
    )
    add(
        "2:4 prefill (>= 2048 tok) speed-up >= 1.15x, CUDA mma.sp / wgmma.sp (worst shape)",
        _worst_best(
            _kernel_rows(
                kernels, contenders={"cuda_sp", "cuda_sp_wgmma"}, fmt="2:4", tokens=(2048, 1 << 30)
            )
        ),
        1.15,
    )
    add(
        "bitmap 70% 16-128 tok speed-up >= 2x, CUDA kernels (worst shape)",
        _worst_best(
            _kernel_rows(
                kernels,
                contenders={"cuda_mma", "cuda_mma_wgmma", "cuda_gemv"},
                pattern="70%",
                tokens=(16, 128),
            )
        ),
        2.0,
    )
    picked = [e for e in (kernels or {}).get("dispatch", []) if e["backend"] != "dense"]
    worst = None
    if picked:
        worst = min(float(re.search(r"([\d.]+)x", e["why"]).group(1)) for e in picked)
    add("dispatch table: every kernel it picks >= 0.95x dense", worst, 0.95)
    for r in (e2e or {}).get("results", []):
        if r["model"] == "llama2-7b" and r["variant"] == "bitmap-70":
            add(
                "e2e LLaMA-2-7B shape, OWL 70% bitmap, batch 1 decode >= 2.0x dense",
                r.get("decode_speedup", {}).get("1"),
                2.0,
            )
            add(
                "e2e LLaMA-2-7B shape, OWL 70% bitmap, weight memory <= 0.40x dense",
                r.get("weight_ratio"),
                0.40,
                higher=False,
            )
    return out


def generic_table(doc) -> str:
    """A markdown table of the first list of flat dicts found in a document."""
    rows = (
        next(
            (v for v in doc.values() if isinstance(v, list) and v and isinstance(v[0], dict)), None
        )
        if isinstance(doc, dict)
        else None
    )
    if not rows:
        return "```\n" + json.dumps(doc, indent=1, default=str)[:4000] + "\n```"
    keys = [k for k, v in rows[0].items() if not isinstance(v, (dict, list))]
    return markdown_table(keys, [[r.get(k) for k in keys] for r in rows])


def pytest_summary(path: Path) -> str | None:
    if not path.is_file():
        return None
    lines = [
        ln
        for ln in path.read_text(errors="replace").splitlines()
        if re.search(r"\d+ (passed|failed|error|skipped)", ln)
    ]
    if lines:
        return lines[-1].strip("= ")
    text = path.read_text(errors="replace")
    crash = re.search(r"Fatal Python error: (.*)", text)
    if crash:
        where = re.findall(r'File "[^"]*/(tests/[^"]+)", line (\d+) in (\w+)', text)
        at = f" in {where[0][0]}:{where[0][1]} ({where[0][2]})" if where else ""
        return f"CRASHED ({crash.group(1).strip()}){at}: the tests after it did not run"
    return "no summary line (the step may have timed out)"


def build(parts: Path, out_dir: Path) -> dict:
    kernels, e2e = _load(parts / "kernels.json"), _load(parts / "e2e.json")
    prune = _load(parts / "prune.json")
    env = (kernels or e2e or {}).get("env", {})
    steps = []
    if (parts / "steps.txt").is_file():
        steps = [ln.split() for ln in (parts / "steps.txt").read_text().splitlines() if ln]
    doc = {
        "env": env,
        "steps": steps,
        "gpu_tests": pytest_summary(parts / "gpu_tests.log"),
        "targets": targets(kernels, e2e, env),
        "kernels": kernels,
        "e2e": e2e,
        "prune": prune,
    }
    date = (env.get("date") or "unknown")[:10]
    stem = out_dir / f"{slug(env.get('device', 'unknown'))}-{date}"
    write_json(stem.with_suffix(".json"), doc)
    plots = plot_kernels(kernels, stem) if kernels and best_rows(kernels["rows"]) else []
    md = [f"## owl-sparse GPU suite: {env.get('device', '?')}", "", env_markdown(env), ""]
    md += ["### Steps", "", markdown_table(["step", "exit code", "seconds"], steps), ""]
    md += [f"GPU tests (`pytest -m gpu`): {doc['gpu_tests'] or 'not run'}", ""]
    md += ["### Targets", "", markdown_table(["target", "measured", "verdict"], doc["targets"]), ""]
    md += [f"![{p.stem}]({p.name})" for p in plots] + [""]
    if e2e:
        md += [bench_e2e.to_markdown(e2e), ""]
    if kernels:
        md += [bench_kernels.to_markdown(kernels), ""]
    if prune:
        md += ["### Pruning cost (bench_prune)", "", generic_table(prune), ""]
    stem.with_suffix(".md").write_text("\n".join(md) + "\n")
    files = [stem.with_suffix(".json"), stem.with_suffix(".md"), *plots]
    table = REPO / "owl_sparse" / "ops" / "tables" / f"{slug(env.get('device', ''))}.json"
    if kernels and kernels.get("dispatch") and table.is_file():
        files.append(table)
    return {"files": [os.path.relpath(f, REPO) for f in files]}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="suite_report", description=__doc__.splitlines()[0])
    p.add_argument("--parts", required=True)
    p.add_argument("--out-dir", default=str(RESULTS_DIR))
    p.add_argument("--manifest", default=None, help="write the list of files produced here")
    args = p.parse_args(argv)
    out = build(Path(args.parts), Path(args.out_dir))
    if args.manifest:
        write_json(args.manifest, out)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
