"""Resident memory of dense against pruned-and-packed serving on a CPU (Linux).

Each variant runs in a fresh process (a process's resident set never shrinks back to what
another run would have had): dense = load -> generate; packed = load -> prune ->
``sparsify_`` -> generate. Reported per stage: the resident set (``/proc/self/statm``) after
the stage and the process's lifetime peak (``ru_maxrss``) so far; the freed-but-kept heap
(glibc ``mallinfo2``) at the end.

    OWL_SPARSE_DATA=../shared/data python -m benchmarks.memory --method wanda \
        --allocation owl --sparsity 0.7 --out benchmarks/results/cpu-memory-smollm2
"""

from __future__ import annotations

import argparse
import ctypes
import json
import resource
import subprocess
import sys
from pathlib import Path

from .common import env_markdown, environment, markdown_table, write_json

PROMPT = "The history of the city begins"


def _rss_mib() -> float:
    import os

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _free_heap_mib() -> float | None:
    class MallInfo2(ctypes.Structure):
        _fields_ = [
            (n, ctypes.c_size_t)
            for n in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks "
            "keepcost".split()
        ]

    try:
        fn = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = MallInfo2
    return fn().fordblks / 2**20


def run_variant(args) -> dict:
    """One variant in this process; returns its stages."""
    from owl_sparse import settings
    from owl_sparse.data import calibration_batches, load_text, tokenize
    from owl_sparse.models import load_model
    from owl_sparse.nn import sparsify_
    from owl_sparse.pruning import PruneConfig, prune
    from owl_sparse.serve import generate

    stages = []

    def stage(name):
        stages.append({"stage": name, "rss_mib": _rss_mib(), "peak_mib": _peak_mib()})

    stage("start")
    model, tokenizer = load_model(args.model, dtype=args.dtype)
    stage("loaded")
    if args.variant == "packed":
        root = settings.get().data_dir
        if root is None:
            raise SystemExit("calibration needs the shared data (set OWL_SPARSE_DATA)")
        ids = tokenize(tokenizer, load_text(root / "wikitext-2-tokenized" / "valid.txt"))
        calibration = calibration_batches(ids, args.samples, args.seqlen, seed=0)
        config = PruneConfig(method=args.method, allocation=args.allocation, sparsity=args.sparsity)
        report = prune(model, calibration, config, progress=False)
        stage("pruned")
        sparsify_(model, format="auto", masks=report.masks)
        report.masks.clear()
        stage("packed")
    gen = generate(model, tokenizer, PROMPT, max_new_tokens=args.new_tokens)
    stage("served")
    return {
        "variant": args.variant,
        "stages": stages,
        "free_heap_mib": _free_heap_mib(),
        "decode_tokens_per_s": gen.decode_tokens_per_s,
        "compiled": gen.compiled,
    }


def build_parser():
    p = argparse.ArgumentParser(prog="memory", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default=None, help="as stored by default")
    p.add_argument("--method", default="wanda")
    p.add_argument("--allocation", default="owl")
    p.add_argument("--sparsity", type=float, default=0.7)
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--out", default=None, help="path without suffix (.json and .md)")
    p.add_argument("--variant", choices=["dense", "packed"], help=argparse.SUPPRESS)
    return p


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.variant:  # the child: one variant, its result as the last line of stdout
        print(json.dumps(run_variant(args)))
        return {}
    results = {}
    for variant in ("dense", "packed"):
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks.memory", *argv, "--variant", variant],
            capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parent.parent,
        )
        if proc.returncode != 0:
            raise SystemExit(f"{variant} run failed:\n{proc.stderr[-3000:]}")
        results[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
    doc = {
        "environment": environment("cpu"),
        "command": "python -m benchmarks.memory " + " ".join(argv),
        "config": {k: v for k, v in vars(args).items() if k not in ("variant", "out")},
        "results": results,
    }
    rows = [
        [v, s["stage"], s["rss_mib"], s["peak_mib"]]
        for v, r in results.items()
        for s in r["stages"]
    ]
    text = "\n".join(
        [
            f"# Resident memory, {args.model}: dense against {args.method} + "
            f"{args.allocation} {args.sparsity:.0%} packed",
            "",
            env_markdown(doc["environment"]),
            f"- command: `{doc['command']}`",
            "",
            markdown_table(["variant", "after", "RSS MiB", "lifetime peak MiB"], rows),
            "",
            "free heap kept by glibc at the end (MiB): "
            + ", ".join(f"{v} {r['free_heap_mib']:.0f}" for v, r in results.items()),
            "",
        ]
    )
    print(text)
    if args.out:
        write_json(Path(args.out).with_suffix(".json"), doc)
        Path(args.out).with_suffix(".md").write_text(text)
    return doc


if __name__ == "__main__":
    main()
