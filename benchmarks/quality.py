"""Quality table: WikiText-2 perplexity of SmolLM2-135M pruned every way owl-sparse can.

Rows: dense, then magnitude / Wanda / SparseGPT x uniform / OWL / sensitivity allocation;
columns: 50%, 60%, 70% unstructured and 2:4. Protocol:

- calibration: 64 windows x 512 tokens (seed 0) drawn from WikiText-2 *valid*, the
  tokenized version in the shared data (``wikitext-2-tokenized/valid.txt``: rare words
  appear as ``<unk>``), tokenized with the model's tokenizer;
- evaluation: the first 32 non-overlapping windows of 512 tokens of WikiText-2 raw test
  (``wikitext-2-raw/wiki.test.raw``), exp(mean window NLL), as in the Wanda/OWL papers;
- OWL: M = 5, lambda = 0.08; sensitivity: bound lambda = 0.08 as well.

Resumable: the JSON is rewritten after every config and configs already in it are skipped.
Shared work is cached: the block-0 inputs are captured once per process, and the dense
pass (per-layer input norms, which OWL's outlier ratios and the sensitivity curves derive
from) is computed once per model and calibration set and kept on disk.

Regenerate (hours on 2 CPU cores, minutes on a GPU)::

    OWL_SPARSE_DATA=../shared/data python -m benchmarks.quality
    python -m benchmarks.quality --only wanda-owl-0.7,dense   # a subset
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("magnitude", "wanda", "sparsegpt")
ALLOCATIONS = ("uniform", "owl", "sensitivity")
LEVELS = ("0.5", "0.6", "0.7", "2:4")


def all_configs() -> list[str]:
    return ["dense"] + [f"{m}-{a}-{lv}" for m in METHODS for a in ALLOCATIONS for lv in LEVELS]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="quality", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--out", default=str(RESULTS / "quality-smollm2"), help="path without suffix")
    p.add_argument("--only", default=None, help="comma list of configs (default: all)")
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=32)
    p.add_argument("--device", default=None)
    p.add_argument("--quiet", action="store_true")
    return p


def main(argv=None) -> dict:
    from owl_sparse import settings
    from owl_sparse.data import calibration_batches, eval_windows, load_text, tokenize
    from owl_sparse.evaluate import perplexity
    from owl_sparse.models import conv1d_to_linear_, find_decoder_blocks, load_model
    from owl_sparse.pruning import DenseProfile, PruneConfig, capture_block_inputs, dense_profile
    from owl_sparse.pruning import prune as prune_model

    args = build_parser().parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    root = settings.get().data_dir
    if root is None:
        raise SystemExit("the shared data directory is needed (set OWL_SPARSE_DATA)")
    calib_path = root / "wikitext-2-tokenized" / "valid.txt"
    eval_path = root / "wikitext-2-raw" / "wiki.test.raw"
    out_json = Path(args.out).with_suffix(".json")
    done = json.loads(out_json.read_text()) if out_json.is_file() else {}
    results = done.setdefault("results", {})
    wanted = args.only.split(",") if args.only else all_configs()
    unknown = set(wanted) - set(all_configs())
    if unknown:
        raise SystemExit(f"unknown configs {sorted(unknown)}; known: {all_configs()}")
    todo = [c for c in wanted if c not in results]
    print(f"{len(todo)} configs to run, {len(results)} already done ({out_json})")

    model, tokenizer = load_model(args.model)
    model.to(device)
    conv1d_to_linear_(model)  # pruning does it anyway; the saved dense state must match
    dense_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    calibration = calibration_batches(
        tokenize(tokenizer, load_text(calib_path)), args.samples, args.seqlen, seed=0
    )
    windows = eval_windows(
        tokenize(tokenizer, load_text(eval_path)), args.seqlen, args.eval_windows
    )
    done["protocol"] = {
        "model": args.model,
        "calibration": f"{args.samples} x {args.seqlen} tokens, seed 0, from {calib_path.name} "
        "(WikiText-2 valid, tokenized version)",
        "evaluation": f"first {windows.shape[0]} windows x {args.seqlen} tokens of {eval_path.name}",
        "owl": {"m": 5.0, "lambda": 0.08},
        "command": "OWL_SPARSE_DATA=../shared/data python -m benchmarks.quality",
    }
    blocks = find_decoder_blocks(model).blocks
    inputs = capture_block_inputs(model, blocks, calibration, device, batch_size=16)
    digest = hashlib.sha256(f"{args.model}:{tuple(calibration.shape)}".encode())
    digest.update(calibration.numpy().tobytes())
    key = digest.hexdigest()[:16]
    profile_path = settings.get().cache_dir / "quality" / f"dense-profile-v2-{key}.pt"
    profile = None

    for name in todo:
        model.load_state_dict(dense_state)
        start = time.perf_counter()
        row: dict = {"config": name}
        if name != "dense":
            method, allocation, level = name.split("-")
            pattern = level if ":" in level else "unstructured"
            config = PruneConfig(
                method=method,
                allocation=allocation,
                pattern=pattern,
                sparsity=None if ":" in level else float(level),
                owl_m=5.0,
                owl_lambda=0.08,
            )
            if allocation != "uniform" and profile is None:
                if profile_path.is_file():
                    profile = DenseProfile.load(profile_path)
                else:
                    profile = dense_profile(model, inputs=inputs, progress=not args.quiet)
                    profile_path.parent.mkdir(parents=True, exist_ok=True)
                    profile.save(profile_path)
            report = prune_model(
                model,
                None if not config.needs_calibration else calibration,
                config,
                device=device,
                inputs=inputs,
                profile=profile,
                keep_masks=False,
                progress=not args.quiet,
            )
            row.update(
                achieved_sparsity=report.achieved_sparsity,
                prune_s=round(report.wall_time_s, 2),
                block_targets=[round(b.target_sparsity, 4) for b in report.blocks],
                outlier_ratios=[b.outlier_ratio for b in report.blocks],
            )
        t = time.perf_counter()
        ppl = perplexity(model, windows, batch_size=4, progress=not args.quiet).perplexity
        row.update(
            perplexity=ppl,
            eval_s=round(time.perf_counter() - t, 2),
            total_s=round(time.perf_counter() - start, 2),
        )
        results[name] = row
        print(f"{name:>24}: perplexity {ppl:.3f} ({row['total_s']:.0f} s)")
        out_json.parent.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps(done, indent=1))
        Path(args.out).with_suffix(".md").write_text(render(done))
    Path(args.out).with_suffix(".md").write_text(render(done))
    return done


def render(done: dict) -> str:
    """The markdown table (missing configs show as '...')."""
    res, proto = done.get("results", {}), done.get("protocol", {})
    fmt = lambda r: "..." if r is None else f"{r['perplexity']:.2f}"  # noqa: E731
    lines = [
        f"# WikiText-2 perplexity of {proto.get('model', 'the model')}, pruned",
        "",
        f"- calibration: {proto.get('calibration')}",
        f"- evaluation: {proto.get('evaluation')}",
        f"- OWL M = {proto.get('owl', {}).get('m')}, lambda = {proto.get('owl', {}).get('lambda')}"
        "; sensitivity allocation bounded by the same lambda",
        f"- regenerate: `{proto.get('command')}`",
        "",
        "| method | allocation | "
        + " | ".join(f"{float(lv):.0%}" if ":" not in lv else lv for lv in LEVELS)
        + " |",
        "| --- | --- |" + " --- |" * len(LEVELS),
        f"| dense | - | {fmt(res.get('dense'))} |" + " |" * (len(LEVELS) - 1),
    ]
    for m in METHODS:
        for a in ALLOCATIONS:
            cells = [fmt(res.get(f"{m}-{a}-{lv}")) for lv in LEVELS]
            lines.append(f"| {m} | {a} | " + " | ".join(cells) + " |")
    for alloc in ("owl", "sensitivity"):
        lines += ["", f"## {alloc} against uniform (same method and sparsity)", ""]
        for m in METHODS:
            for lv in LEVELS:
                u, o = res.get(f"{m}-uniform-{lv}"), res.get(f"{m}-{alloc}-{lv}")
                if u and o and all(math.isfinite(r["perplexity"]) for r in (u, o)):
                    if o["perplexity"] == u["perplexity"]:
                        # N:M keeps M: a spread of +-lambda around 50% moves no block's N
                        why = (
                            f" (with M = {lv.split(':')[1]}, 50% +- lambda rounds to the same "
                            "N in every block)"
                            if ":" in lv
                            else ""
                        )
                        verdict = f"changes nothing{why}"
                    elif o["perplexity"] < u["perplexity"]:
                        verdict = "helps"
                    else:
                        verdict = "does not help"
                    lines.append(
                        f"- {m} at {lv}: {alloc} {verdict} ({o['perplexity']:.2f} vs "
                        f"{u['perplexity']:.2f} uniform)"
                    )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
