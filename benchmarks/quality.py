"""Quality table: how much pruning costs a model, with the spread over calibration draws.

Rows: dense, then magnitude / Wanda / SparseGPT x uniform / OWL / sensitivity / tuned
allocation; columns: 50%, 60%, 70% unstructured and 2:4. Every pruned cell is run once per
calibration seed (``--seeds``, default 0,1,2: different calibration windows) and reported
as mean +- standard deviation. Protocol:

- calibration: ``--samples`` windows x ``--seqlen`` tokens drawn (with the seed) from
  WikiText-2 *valid*, the tokenized version in the shared data
  (``wikitext-2-tokenized/valid.txt``), tokenized with the model's tokenizer. The tuned
  allocation holds the last quarter of them out to choose its setting
  (`owl_sparse.pruning.tune`) and computes its statistics on the rest;
- evaluation: the first ``--eval-windows`` non-overlapping windows of ``--seqlen`` tokens of
  WikiText-2 raw test (``wikitext-2-raw/wiki.test.raw``): perplexity (exp of the mean
  window NLL, as in the Wanda/OWL papers) and, from the same forward passes, the mean
  KL(dense || pruned) of the next-token distributions and the top-1 agreement with dense
  (`owl_sparse.evaluate.agreement`);
- budgets: each cell records the parameter-weighted sparsity achieved over the pruned
  layers; an allocation more than 0.1% (absolute) off the target is flagged;
- verdicts (against uniform, same method and level): "helps" / "hurts" only where the
  difference of the mean perplexities exceeds two standard errors
  (sqrt(sd_a^2 / n_a + sd_u^2 / n_u)), else "within noise";
- OWL M = 5, lambda = 0.08; sensitivity: bound lambda = 0.08 as well.

Resumable: the JSON is rewritten after every cell and cells already in it are skipped.
The block-0 inputs and the dense pass (input norms: OWL's outlier ratios and the
sensitivity curves) are computed once per seed and model.

Regenerate (SmolLM2-135M: hours on 2 CPU cores; stories260K: minutes)::

    OWL_SPARSE_DATA=../shared/data python -m benchmarks.quality
    OWL_SPARSE_DATA=../shared/data python -m benchmarks.quality --model stories260k \\
        --out benchmarks/results/quality-stories260k
    python -m benchmarks.quality --methods wanda --levels 0.7 --seeds 0,1,2   # a subset
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import statistics
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("magnitude", "wanda", "sparsegpt")
ALLOCATIONS = ("uniform", "owl", "sensitivity", "tuned")
LEVELS = ("0.5", "0.6", "0.7", "2:4")
BUDGET_TOLERANCE = 0.001  # achieved sparsity within 0.1% (absolute) of the target
MEASURES = {"perplexity": "{:.2f}", "kl": "{:.3f}", "top1": "{:.3f}"}


def configs(methods=METHODS, allocations=ALLOCATIONS, levels=LEVELS) -> list[str]:
    return [f"{m}-{a}-{lv}" for m in methods for a in allocations for lv in levels]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="quality", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="smollm2-135m, stories260k or a path")
    p.add_argument("--out", default=str(RESULTS / "quality-smollm2"), help="path without suffix")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--allocations", default=",".join(ALLOCATIONS))
    p.add_argument("--levels", default=",".join(LEVELS))
    p.add_argument("--seeds", default="0,1,2", help="calibration seeds (one run per seed)")
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=32)
    p.add_argument("--device", default=None)
    p.add_argument("--quiet", action="store_true")
    return p


def _choice(text: str, known: tuple, what: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in known]
    if bad or not items:
        raise SystemExit(f"--{what}: unknown {bad or 'empty list'}; known: {list(known)}")
    return items


def main(argv=None) -> dict:
    from owl_sparse import settings
    from owl_sparse.data import calibration_batches, eval_windows, load_text, tokenize
    from owl_sparse.evaluate import agreement, perplexity
    from owl_sparse.models import conv1d_to_linear_, find_decoder_blocks, load_model
    from owl_sparse.pruning import DenseProfile, PruneConfig, capture_block_inputs, dense_profile
    from owl_sparse.pruning import prune as prune_model

    from .common import environment

    args = build_parser().parse_args(argv)
    wanted = configs(
        _choice(args.methods, METHODS, "methods"),
        _choice(args.allocations, ALLOCATIONS, "allocations"),
        _choice(args.levels, LEVELS, "levels"),
    )
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise SystemExit(f"--seeds must be a comma list of integers, got {args.seeds!r}") from None
    if not seeds:
        raise SystemExit("--seeds is empty")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    root = settings.get().data_dir
    if root is None:
        raise SystemExit("the shared data directory is needed (set OWL_SPARSE_DATA)")
    calib_path = root / "wikitext-2-tokenized" / "valid.txt"
    eval_path = root / "wikitext-2-raw" / "wiki.test.raw"
    out_json = Path(args.out).with_suffix(".json")
    done = json.loads(out_json.read_text()) if out_json.is_file() else {}
    results = done.setdefault("results", {})
    todo = [k for k in ["dense"] + [f"{c}@{s}" for s in seeds for c in wanted] if k not in results]
    print(f"{len(todo)} cells to run, {len(results)} already done ({out_json})")

    model, tokenizer = load_model(args.model)
    model.to(device)
    conv1d_to_linear_(model)  # pruning does it anyway; the saved dense state must match
    reference = copy.deepcopy(model).eval()
    dense_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    calib_ids = tokenize(tokenizer, load_text(calib_path))
    windows = eval_windows(
        tokenize(tokenizer, load_text(eval_path)), args.seqlen, args.eval_windows
    )
    done["protocol"] = {
        "model": args.model,
        "calibration": f"{args.samples} x {args.seqlen} tokens from {calib_path.name} "
        "(WikiText-2 valid, tokenized version), one draw per seed; tuned holds the last "
        "quarter out to choose, then prunes its choice on all the windows",
        "evaluation": f"first {windows.shape[0]} windows x {args.seqlen} tokens of {eval_path.name}",
        "owl": {"m": 5.0, "lambda": 0.08},
        "environment": environment(device),
        "command": "OWL_SPARSE_DATA=../shared/data python -m benchmarks.quality "
        + " ".join(argv if argv is not None else __import__("sys").argv[1:]),
    }
    blocks = find_decoder_blocks(model).blocks
    per_seed: dict[int, tuple] = {}

    def seed_data(seed: int):
        if seed not in per_seed:
            per_seed.clear()  # one seed's block inputs at a time
            calibration = calibration_batches(calib_ids, args.samples, args.seqlen, seed=seed)
            inputs = capture_block_inputs(model, blocks, calibration, device, batch_size=16)
            digest = hashlib.sha256(f"{args.model}:{tuple(calibration.shape)}".encode())
            digest.update(calibration.numpy().tobytes())
            path = (
                settings.get().cache_dir
                / "quality"
                / f"dense-profile-v2-{digest.hexdigest()[:16]}.pt"
            )
            per_seed[seed] = (calibration, inputs, path, {})
        return per_seed[seed]

    for key in todo:
        model.load_state_dict(dense_state)
        start = time.perf_counter()
        row: dict = {"config": key}
        if key == "dense":
            ppl = perplexity(model, windows, batch_size=4, progress=not args.quiet)
            row.update(perplexity=ppl.perplexity, kl=0.0, top1=1.0)
        else:
            name, seed = key.split("@")
            method, allocation, level = name.split("-")
            config = PruneConfig(
                method=method,
                allocation=allocation,
                pattern=level if ":" in level else "unstructured",
                sparsity=None if ":" in level else float(level),
                owl_m=5.0,
                owl_lambda=0.08,
                seed=int(seed),
            )
            calibration, inputs, profile_path, cache = seed_data(int(seed))
            extra = {}
            if allocation == "tuned":
                extra = {}  # prune splits the calibration itself: statistics on 3/4 only
            else:
                extra = {"inputs": inputs}
                if allocation != "uniform":
                    if "profile" not in cache:
                        if profile_path.is_file():
                            cache["profile"] = DenseProfile.load(profile_path)
                        else:
                            cache["profile"] = dense_profile(
                                model, inputs=inputs, progress=not args.quiet
                            )
                            profile_path.parent.mkdir(parents=True, exist_ok=True)
                            cache["profile"].save(profile_path)
                    extra["profile"] = cache["profile"]
            report = prune_model(
                model,
                None if not config.needs_calibration else calibration,
                config,
                device=device,
                keep_masks=False,
                progress=not args.quiet,
                **extra,
            )
            t = time.perf_counter()
            judged = agreement(model, reference, windows, batch_size=4, progress=not args.quiet)
            row.update(
                perplexity=judged.perplexity.perplexity,
                kl=judged.kl,
                kl_p99=judged.kl_p99,
                top1=judged.top1,
                target_sparsity=config.sparsity,
                achieved_sparsity=report.achieved_sparsity,
                prune_s=round(report.wall_time_s, 2),
                eval_s=round(time.perf_counter() - t, 2),
                block_targets=[round(b.target_sparsity, 4) for b in report.blocks],
                outlier_ratios=[b.outlier_ratio for b in report.blocks],
            )
            if report.allocation_search is not None:
                row["allocation_search"] = report.allocation_search
        row["total_s"] = round(time.perf_counter() - start, 2)
        results[key] = row
        print(
            f"{key:>28}: perplexity {row['perplexity']:.3f}, KL {row['kl']:.4f}, "
            f"top-1 {row['top1']:.3f} ({row['total_s']:.0f} s)"
        )
        out_json.parent.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps(done, indent=1))
        Path(args.out).with_suffix(".md").write_text(render(done))
    Path(args.out).with_suffix(".md").write_text(render(done))
    return done


def cell(results: dict, name: str) -> dict | None:
    """Every seed's run of config ``name`` folded into {measure: [values]}, or None."""
    runs = [r for k, r in results.items() if k.split("@")[0] == name and "@" in k]
    if not runs:
        return None
    out = {m: [r[m] for r in runs] for m in (*MEASURES, "achieved_sparsity", "total_s")}
    out["target_sparsity"] = runs[0]["target_sparsity"]
    out["chosen"] = [r["allocation_search"]["chosen"] for r in runs if "allocation_search" in r]
    return out


def spread(values: list[float]) -> tuple[float, float]:
    """(mean, sample standard deviation; 0 for one value)."""
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else 0.0


def verdict(candidate: list[float], baseline: list[float]) -> str:
    """'helps' / 'hurts' (lower / higher is the candidate's perplexity) when the difference
    of the means exceeds two standard errors, else 'within noise'; with fewer than two runs
    on either side no spread is known: 'one seed'."""
    if len(candidate) < 2 or len(baseline) < 2:
        return "one seed"
    (ma, sa), (mb, sb) = spread(candidate), spread(baseline)
    se = math.sqrt(sa**2 / len(candidate) + sb**2 / len(baseline))
    if ma < mb - 2 * se:
        return "helps"
    if ma > mb + 2 * se:
        return "hurts"
    return "within noise"


def _fmt(values: list[float] | None, spec: str) -> str:
    if not values:
        return "..."
    mean, sd = spread(values)
    if not math.isfinite(mean):
        return "inf"
    return (spec.format(mean) + (" ± " + spec.format(sd) if len(values) > 1 else "")).strip()


def render(done: dict) -> str:
    """The markdown report (cells not run show as '...')."""
    res, proto = done.get("results", {}), done.get("protocol", {})
    names = sorted({k.split("@")[0] for k in res if "@" in k}, key=_order)
    methods = [m for m in METHODS if any(n.startswith(m + "-") for n in names)]
    allocations = [a for a in ALLOCATIONS if any(f"-{a}-" in n for n in names)]
    levels = [lv for lv in LEVELS if any(n.endswith("-" + lv) for n in names)]
    seeds = sorted({int(k.split("@")[1]) for k in res if "@" in k})
    total_s = sum(r.get("total_s", 0) for r in res.values())
    head = lambda: (  # noqa: E731
        "| method | allocation | "
        + " | ".join(f"{float(lv):.0%}" if ":" not in lv else lv for lv in levels)
        + " |\n| --- | --- |"
        + " --- |" * len(levels)
    )
    lines = [
        f"# Pruning quality of {proto.get('model', 'the model')}",
        "",
        f"- calibration: {proto.get('calibration')}; seeds {seeds}",
        f"- evaluation: {proto.get('evaluation')}",
        f"- OWL M = {proto.get('owl', {}).get('m')}, lambda = {proto.get('owl', {}).get('lambda')}"
        "; sensitivity bounded by the same lambda; tuned: `owl_sparse.pruning.tune`",
        "- cells: mean ± standard deviation over the seeds",
        f"- compute: {total_s / 3600:.2f} h for the {len(res)} runs below "
        f"({total_s / max(len(res), 1):.0f} s per run)",
        f"- regenerate: `{proto.get('command')}`",
    ]
    if proto.get("environment"):
        env = proto["environment"]
        lines.insert(
            -1, f"- run: {env.get('device')}, commit {env.get('commit')}, {env.get('date')}"
        )
    dense = res.get("dense")
    for measure, title in (
        ("perplexity", "WikiText-2 perplexity (lower is better)"),
        ("kl", "mean KL(dense || pruned) per token, nats (lower is better)"),
        ("top1", "top-1 agreement with dense (higher is better)"),
    ):
        spec = MEASURES[measure]
        lines += ["", f"## {title}", "", head()]
        if dense is not None:
            lines.append(
                f"| dense | - | {spec.format(dense[measure])} |" + " |" * (len(levels) - 1)
            )
        for m in methods:
            for a in allocations:
                cells = [cell(res, f"{m}-{a}-{lv}") for lv in levels]
                lines.append(
                    f"| {m} | {a} | "
                    + " | ".join(_fmt(c and c[measure], spec) for c in cells)
                    + " |"
                )
    lines += [
        "",
        "## achieved sparsity (parameter-weighted over the pruned layers; ✗ = more than "
        f"{BUDGET_TOLERANCE:.1%} off the target)",
        "",
        head(),
    ]
    off = []
    for m in methods:
        for a in allocations:
            row = []
            for lv in levels:
                c = cell(res, f"{m}-{a}-{lv}")
                if c is None:
                    row.append("...")
                    continue
                worst = max(abs(x - c["target_sparsity"]) for x in c["achieved_sparsity"])
                bad = worst > BUDGET_TOLERANCE
                if bad:
                    off.append(f"{m}-{a}-{lv}")
                row.append(
                    f"{statistics.fmean(c['achieved_sparsity']):.2%}" + (" ✗" if bad else "")
                )
            lines.append(f"| {m} | {a} | " + " | ".join(row) + " |")
    lines += ["", "every allocation within the budget" if not off else f"off budget: {off}"]
    for alloc in [a for a in allocations if a != "uniform"]:
        lines += ["", f"## {alloc} against uniform (same method and level)", ""]
        for m in methods:
            for lv in levels:
                u, o = cell(res, f"{m}-uniform-{lv}"), cell(res, f"{m}-{alloc}-{lv}")
                if not (u and o):
                    continue
                if o["perplexity"] == u["perplexity"]:
                    why = (
                        f" (with M = {lv.split(':')[1]}, 50% +- lambda rounds to the same N "
                        "in every block)"
                        if ":" in lv and alloc != "tuned"
                        else ""
                    )
                    text = f"changes nothing{why}"
                else:
                    text = verdict(o["perplexity"], u["perplexity"])
                chosen = ""
                if o["chosen"]:
                    chosen = "; chose " + "; ".join(_setting(c) for c in o["chosen"])
                lines.append(
                    f"- {m} at {lv}: {alloc} {text} ({_fmt(o['perplexity'], '{:.2f}')} vs "
                    f"{_fmt(u['perplexity'], '{:.2f}')} uniform{chosen})"
                )
    if "tuned" in allocations and "owl" in allocations:
        lines += ["", "## tuned against OWL's default (M 5, lambda 0.08)", ""]
        for m in methods:
            for lv in levels:
                t, o = cell(res, f"{m}-tuned-{lv}"), cell(res, f"{m}-owl-{lv}")
                if t and o:
                    extra = statistics.fmean(t["total_s"]) - statistics.fmean(o["total_s"])
                    lines.append(
                        f"- {m} at {lv}: tuned {verdict(t['perplexity'], o['perplexity'])} "
                        f"({_fmt(t['perplexity'], '{:.2f}')} vs {_fmt(o['perplexity'], '{:.2f}')}"
                        f" OWL; {extra:+.0f} s per run over OWL)"
                    )
    return "\n".join(lines) + "\n"


def _setting(chosen: dict) -> str:
    if chosen["allocation"] == "owl":
        return f"owl M {chosen['owl_m']:g} lambda {chosen['owl_lambda']:g}"
    if chosen["allocation"] == "sensitivity":
        return f"sensitivity bound {chosen['owl_lambda']:g}"
    return "uniform"


def _order(name: str) -> tuple:
    m, a, lv = name.split("-")
    return (METHODS.index(m), ALLOCATIONS.index(a), LEVELS.index(lv))


if __name__ == "__main__":
    main()
