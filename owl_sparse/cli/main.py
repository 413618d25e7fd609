"""The ``owl-sparse`` command line: a thin shell over the library (argparse lives only here).

Every subcommand returns a JSON-able dict; with ``--json`` it is printed as one JSON object
on the last line of standard output. Bad input (a bad argument, a file that cannot be read
or written) prints one line ``owl-sparse: error: ...`` and exits with status 2; arguments
that need no model (``--out``, ``--format`` against ``--pattern``, the pruning config) are
checked before the model is loaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

from ..errors import InputError
from ..pruning.config import ALLOCATIONS, METHODS
from .demo_defaults import DEMO_DEFAULTS
from .options import check_format, resolve_device, resolve_dtype

# The library is imported by the commands that need it, so `owl-sparse --help` and argument
# errors answer without loading torch and transformers.


class _Parser(argparse.ArgumentParser):
    """argparse with the documented one-line error (no usage block), exit status 2."""

    def error(self, message: str):
        self.exit(2, f"owl-sparse: error: {message} (see '{self.prog} --help')\n")


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (sizes and counts)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _add_model(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument(
        "--model",
        required=required,
        default=None if required else "smollm2-135m",
        help="built-in name (smollm2-135m, stories260k), HF model directory, .gguf or "
        "llama2.c .bin file",
    )


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    p.add_argument("--quiet", action="store_true", help="no progress bars")


# One vocabulary for every subcommand: the same option name for the same thing. The older
# spellings stay as aliases (listed in --help) so existing scripts keep working.
def _add_eval(p, *, seqlen: int, windows: int | None, text: str | None, text_help: str) -> None:
    """Perplexity evaluation: --eval-text, --eval-windows, --seqlen."""
    p.add_argument("--eval-text", "--text", dest="eval_text", default=text, help=text_help)
    p.add_argument(
        "--eval-windows",
        "--max-windows",
        dest="eval_windows",
        type=_positive_int,
        default=windows,
        help=f"evaluate on at most this many windows (default: {windows or 'all'})",
    )
    p.add_argument(
        "--seqlen",
        type=_positive_int,
        default=seqlen,
        help=f"evaluation window length in tokens (default {seqlen})",
    )


def _add_calibration(p, *, samples: int, seqlen: int | None, text_help: str) -> None:
    """Calibration data: --calib-text, --calib-samples, --calib-seqlen."""
    p.add_argument("--calib-text", default=None, help=text_help)
    p.add_argument(
        "--calib-samples",
        type=_positive_int,
        default=samples,
        help=f"calibration windows (default {samples})",
    )
    p.add_argument(
        "--calib-seqlen",
        type=_positive_int,
        default=seqlen,
        help=f"calibration window length in tokens (default: {seqlen or 'the --seqlen value'})",
    )


def _add_pruning(p, *, sparsity_help: str, sparsity: float | None) -> None:
    """What to prune and how: --method, --allocation, --sparsity, --pattern, OWL knobs, seed."""
    p.add_argument(
        "--method",
        default="wanda",
        choices=list(METHODS),
        help="importance score (default wanda)",
    )
    p.add_argument(
        "--allocation",
        default="tuned",
        choices=list(ALLOCATIONS),
        help="layerwise sparsity allocation (default tuned: uniform unless an OWL or "
        "sensitivity setting beats it on a held-out quarter of the calibration windows; "
        "about 2-3x the time of owl; see benchmarks/results/quality-smollm2-seeds.md)",
    )
    p.add_argument("--sparsity", type=float, default=sparsity, help=sparsity_help)
    p.add_argument("--pattern", default="unstructured", help="unstructured or N:M, e.g. 2:4")
    p.add_argument("--owl-m", type=float, default=5.0, help="OWL outlier threshold M")
    p.add_argument("--owl-lambda", type=float, default=0.08, help="OWL / sensitivity spread")
    p.add_argument("--seed", type=int, default=0, help="calibration sampling seed")


_FORMAT_HELP = (
    "checkpoint layout: auto (default) = packed owl-sparse checkpoint, 2:4 where the mask "
    "allows, else bitmap; bitmap or 2:4 to force one"
)


def _sub(sub, name: str, help: str, example: str):
    return sub.add_parser(
        name,
        help=help,
        description=help,
        epilog=f"example:\n  {example}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="owl-sparse", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = _sub(
        sub,
        "eval",
        "perplexity of a model on a text",
        "owl-sparse eval --model smollm2-135m --eval-text wikitext2 --seqlen 512 --eval-windows 32",
    )
    _add_model(p)
    _add_eval(
        p,
        seqlen=2048,
        windows=None,
        text="wikitext2",
        text_help="text file or dataset name (default wikitext2)",
    )
    p.add_argument(
        "--batch-size", type=_positive_int, default=1, help="windows per forward pass (default 1)"
    )
    _add_common(p)
    p.set_defaults(func=cmd_eval)

    p = _sub(
        sub,
        "info",
        "model structure: decoder blocks and linear layers",
        "owl-sparse info --model smollm2-135m",
    )
    _add_model(p)
    _add_common(p)
    p.set_defaults(func=cmd_info)

    p = _sub(
        sub,
        "demo",
        "the main job: prune with OWL, pack, run, save, report",
        "owl-sparse demo --sparsity 0.7 --out ./smollm2-owl70",
    )
    _add_model(p, required=False)
    _add_eval(
        p,
        seqlen=512,
        windows=16,
        text=None,
        text_help="evaluation text (default: WikiText-2 test from the shared data if "
        "present, else Python's own documentation prose)",
    )
    _add_calibration(
        p,
        samples=DEMO_DEFAULTS["calib_samples"],
        seqlen=DEMO_DEFAULTS["calib_seqlen"],
        text_help="calibration text file, or 'self' to sample from the model (default: "
        "WikiText-2 valid from the shared data if present, else 'self')",
    )
    _add_pruning(
        p,
        sparsity=DEMO_DEFAULTS["sparsity"],
        sparsity_help=f"target sparsity (default {DEMO_DEFAULTS['sparsity']})",
    )
    p.set_defaults(method=DEMO_DEFAULTS["method"], allocation=DEMO_DEFAULTS["allocation"])
    p.add_argument("--format", default="auto", choices=["auto", "bitmap", "2:4"], help=_FORMAT_HELP)
    p.add_argument(
        "--max-new-tokens",
        "--new-tokens",
        dest="max_new_tokens",
        type=_positive_int,
        default=DEMO_DEFAULTS["max_new_tokens"],
        help="tokens generated per sample",
    )
    _add_repetition_penalty(p, DEMO_DEFAULTS["repetition_penalty"])
    p.add_argument("--out", default=None, help="where to save the packed checkpoint")
    p.add_argument(
        "--torch-baseline",
        action="store_true",
        help="also serve the dense model through torch's F.linear, the speed a user has "
        "without owl-sparse (one more compiled decode step: about a minute more, cold)",
    )
    _add_common(p)
    p.set_defaults(func=cmd_demo)

    p = _sub(
        sub,
        "generate",
        "generate text (static KV cache; compiled step on CPU, CUDA graphs on GPU)",
        "owl-sparse generate ./smollm2-owl70 --prompt 'Once upon a time' --max-new-tokens 64",
    )
    p.add_argument(
        "model",
        help="built-in name, HF or owl-sparse packed model directory, .gguf or llama2.c .bin file",
    )
    p.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for several)")
    p.add_argument(
        "--batch-size",
        "--batch",
        dest="batch_size",
        type=_positive_int,
        default=None,
        help="sequences per forward pass; prompts are repeated to fill one batch "
        "when fewer are given (default: all prompts at once)",
    )
    p.add_argument("--max-new-tokens", "--new-tokens", dest="max_new_tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    _add_repetition_penalty(p, 1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ignore-eos", action="store_true", help="always generate max-new-tokens")
    p.add_argument("--no-cuda-graphs", action="store_true", help="decode eagerly on CUDA")
    _add_common(p)
    p.set_defaults(func=cmd_generate)

    p = _sub(
        sub,
        "prune",
        "prune a model (OWL, Wanda, SparseGPT...), report, and save it packed",
        "owl-sparse prune --model smollm2-135m --sparsity 0.7 --calib-text wikitext2 "
        "--out ./smollm2-owl70",
    )
    _add_model(p)
    _add_pruning(
        p,
        sparsity=None,
        sparsity_help="target sparsity in [0, 1) (default 0.7; with N:M it is 1 - N/M)",
    )
    _add_calibration(
        p,
        samples=128,
        seqlen=None,
        text_help="calibration text file or dataset name (train split), or 'self' to "
        "sample from the model; not needed for uniform magnitude",
    )
    p.add_argument(
        "--batch-size",
        type=_positive_int,
        default=None,
        help="calibration samples per block forward (default: by memory budget)",
    )
    _add_eval(
        p,
        seqlen=2048,
        windows=None,
        text=None,
        text_help="evaluate perplexity on this text after pruning",
    )
    p.add_argument(
        "--out",
        default=None,
        help="write the pruned model (see --format) and prune_report.json",
    )
    p.add_argument(
        "--format",
        default=None,
        choices=["auto", "bitmap", "2:4", "dense"],
        help=_FORMAT_HELP + "; dense = a plain Hugging Face checkpoint with the zeros "
        "stored (only with --format dense). Needs --out",
    )
    _add_common(p)
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser(
        "bench", help="benchmarks (source checkout): kernels, e2e or prune", add_help=False
    )
    p.add_argument("suite", choices=["kernels", "e2e", "prune", "cpu"])
    p.add_argument(
        "rest",
        nargs=argparse.REMAINDER,
        help="arguments of the benchmark (see owl-sparse bench SUITE --help)",
    )
    p.set_defaults(func=cmd_bench, json=False)
    return parser


def cmd_eval(args) -> dict:
    from ..data import eval_windows, load_text, tokenize
    from ..evaluate import perplexity
    from ..models.load import load_model

    text = load_text(args.eval_text)  # a bad text path fails before the model loads
    model, tokenizer = load_model(
        args.model, dtype=resolve_dtype(args.dtype), device=resolve_device(args.device)
    )
    windows = eval_windows(tokenize(tokenizer, text), args.seqlen, args.eval_windows)
    start = time.perf_counter()
    result = perplexity(model, windows, batch_size=args.batch_size, progress=not args.quiet)
    out = {
        "eval_text": str(args.eval_text),
        "perplexity": {**result.to_dict(), "seconds": round(time.perf_counter() - start, 3)},
    }
    print(
        f"perplexity {result.perplexity:.3f} over {result.windows} windows of "
        f"{result.seqlen} tokens"
    )
    return out


def cmd_info(args) -> dict:
    from ..models.load import load_model
    from ..models.structure import model_info

    model, _ = load_model(args.model, dtype=resolve_dtype(args.dtype))
    info = model_info(model)
    print(
        f"{info['class']}: {info['parameters']:,} parameters, {info['num_blocks']} blocks "
        f"at '{info['blocks_path']}'"
    )
    for name, shape in info["block_linears"].items():
        packed = info["block_packed"].get(name)
        extra = (
            f"  {packed['format']}, {packed['sparsity']:.1%} sparse, "
            f"{packed['bytes'] / 2**10:.1f} KiB packed"
            if packed
            else ""
        )
        print(f"  {name:<28} {shape[0]} x {shape[1]}{extra}")
    if info["packed"]["layers"]:
        p = info["packed"]
        print(
            f"{p['layers']} packed layers: {p['bytes'] / 2**20:.2f} MiB "
            f"({p['dense_bytes'] / 2**20:.2f} MiB dense)"
        )
    return {"info": info}


def _add_repetition_penalty(p, default: float) -> None:
    p.add_argument(
        "--repetition-penalty",
        type=float,
        default=default,
        help="transformers' repetition penalty: the logit of every token already in the "
        f"sequence is divided by it where positive, multiplied where negative (1 = off; "
        f"default {default})",
    )


def cmd_demo(args) -> dict:
    from .demo import DemoConfig, run_demo

    fields = {f.name: getattr(args, f.name) for f in dataclasses.fields(DemoConfig)}
    return run_demo(DemoConfig(**fields))


def _quiet_transformers() -> None:
    """transformers' weight-loading bars and advisory warnings drown the report."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def cmd_generate(args) -> dict:
    from ..models.load import load_model
    from ..serve import generate

    model, tokenizer = load_model(
        args.model, dtype=resolve_dtype(args.dtype), device=resolve_device(args.device)
    )
    prompts = list(args.prompt)
    if args.batch_size is not None and args.batch_size > len(prompts):
        prompts = [prompts[i % len(prompts)] for i in range(args.batch_size)]
    result = generate(
        model,
        tokenizer,
        prompts,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        batch_size=args.batch_size,
        stop_at_eos=not args.ignore_eos,
        cuda_graphs=False if args.no_cuda_graphs else None,
    )
    if not args.json:
        for prompt, text in zip(prompts, result.texts):
            print(f"--- {prompt!r}\n{prompt}{text}")
    print(
        f"prefill {result.prefill_s * 1e3:.1f} ms, decode {result.decode_tokens_per_s:.1f} "
        f"tokens/s (batch {result.batch_size}, CUDA graph: {result.cuda_graph})",
        file=sys.stderr if args.json else sys.stdout,
    )
    return {
        "prompts": prompts,
        "repetition_penalty": args.repetition_penalty,
        "generation": result.to_dict(),
    }


def cmd_prune(args) -> dict:
    from ..data import calibration_batches, eval_windows, load_text, sample_from_model, tokenize
    from ..evaluate import perplexity
    from ..io.packed import check_output_dir, save_dense, save_pretrained
    from ..models.load import load_model
    from ..nn import sparsify_
    from ..pruning import PruneConfig, PruneError, prune

    config = PruneConfig(
        method=args.method,
        sparsity=args.sparsity,
        allocation=args.allocation,
        owl_m=args.owl_m,
        owl_lambda=args.owl_lambda,
        pattern=args.pattern,
        seed=args.seed,
    )
    if config.needs_calibration and args.calib_text is None:
        raise InputError(
            f"{config.method} with {config.allocation} allocation needs "
            "--calib-text (a text file, a dataset name, or 'self')"
        )
    if args.format is not None and not args.out:
        raise InputError(f"--format {args.format} sets the layout of --out: give --out DIR too")
    fmt = args.format or "auto"
    if args.out:
        check_output_dir(args.out)
        if fmt != "dense":
            check_format(fmt, config.nm, config.pattern)
    calib_seqlen = args.calib_seqlen or args.seqlen
    # bad text paths and devices fail before the model loads
    calib_text = (
        None if args.calib_text in (None, "self") else load_text(args.calib_text, split="train")
    )
    eval_text = load_text(args.eval_text) if args.eval_text else None
    device = resolve_device(args.device)
    # The model stays on the CPU: decoder blocks visit the device one at a time.
    model, tokenizer = load_model(args.model, dtype=resolve_dtype(args.dtype))
    calibration = None
    if config.needs_calibration and calib_text is None:
        calibration = sample_from_model(
            model.to(device), tokenizer, args.calib_samples, calib_seqlen, args.seed
        )
    elif config.needs_calibration:
        calibration = calibration_batches(
            tokenize(tokenizer, calib_text), args.calib_samples, calib_seqlen, args.seed
        )
    try:
        report = prune(
            model,
            calibration,
            config,
            device=device,
            batch_size=args.batch_size,
            progress=not args.quiet,
        )
    except PruneError as e:
        raise InputError(str(e)) from e
    print(report)
    out = {"calib_text": args.calib_text, "prune": report.to_dict()}
    if eval_text is not None:
        windows = eval_windows(tokenize(tokenizer, eval_text), args.seqlen, args.eval_windows)
        result = perplexity(model.to(device), windows, progress=not args.quiet)
        out["perplexity"] = result.to_dict()
        print(
            f"perplexity {result.perplexity:.3f} over {result.windows} windows of "
            f"{result.seqlen} tokens"
        )
    if args.out:
        path = Path(args.out)
        if fmt == "dense":
            save_dense(model, path, tokenizer, prune_report=report)
        else:
            sparsify_(model, format=fmt, masks=report.masks)
            report.masks.clear()  # the packed layers hold them now (a bool per weight otherwise)
            settings = {
                "calib_text": args.calib_text,
                "calib_samples": args.calib_samples,
                "seqlen": calib_seqlen,
                "seed": args.seed,
            }
            save_pretrained(
                model,
                path,
                tokenizer,
                prune_report=report,
                calibration=settings,
                write_report=True,
            )
        out["out"] = str(path)
        print(f"saved the pruned ({fmt}) checkpoint to {path}")
    return out


def cmd_bench(args) -> dict:
    """Run a benchmark module of the source checkout's ``benchmarks/`` folder."""
    import importlib

    root = Path(__file__).resolve().parent.parent.parent
    if not (root / "benchmarks" / f"bench_{args.suite}.py").is_file():
        raise InputError(
            f"benchmarks/bench_{args.suite}.py not found beside the package "
            f"({root}): the benchmarks ship with the source checkout"
        )
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    module = importlib.import_module(f"benchmarks.bench_{args.suite}")
    return module.main(args.rest)


def _error(message) -> int:
    """Print the one-line error (a multi-line message is joined) and return status 2."""
    text = " ".join(line.strip() for line in str(message).splitlines() if line.strip())
    print(f"owl-sparse: error: {text}", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    """Run the command line; returns the exit status (2 for bad input, 0 on success)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0), or an argument error already printed (2)
        return 0 if e.code is None else e.code if isinstance(e.code, int) else 2
    logging.basicConfig(level=logging.WARNING, format="owl-sparse: %(message)s")
    _quiet_transformers()
    start = time.perf_counter()
    try:
        result = args.func(args)
    except InputError as e:
        return _error(e)
    except FileNotFoundError as e:
        return _error(f"{e.filename or e}: no such file")
    except FloatingPointError as e:  # NaN / Inf logits: the model's numbers, not a crash
        return _error(f"numerical failure: {e}")
    except MemoryError:
        return _error("out of memory (try a smaller --batch-size, --seqlen or model)")
    except OSError as e:  # permissions, a full disk, a path through a file: not a traceback
        return _error(e)
    if args.json:
        print(json.dumps(json_envelope(args, result, time.perf_counter() - start), default=str))
    return 0


# The top-level keys of every subcommand's --json object, for the same thing everywhere.
JSON_KEYS = {
    "command": "the subcommand",
    "model": "the model as given",
    "seconds": "wall time of the whole command",
    "eval_text": "the evaluation text as given (eval, prune, demo)",
    "calib_text": "the calibration text as given (prune, demo)",
    "perplexity": "{perplexity, windows, seqlen, tokens, mean_nll[, seconds]} (eval, prune)",
    "prune": "the pruning report: config, blocks, layers, times, memory (prune, demo)",
    "generation": "texts, token ids, prefill and decode timings (generate)",
    "prompts": "the prompts as run (generate, demo)",
    "repetition_penalty": "the repetition penalty decoding used (generate, demo)",
    "info": "the model's structure and packed layers (info)",
    "out": "the checkpoint written (prune --out, demo --out)",
    "dtype": "the dtype the model ran in (demo)",
}


def json_envelope(args, result: dict, seconds: float) -> dict:
    """``result`` of a subcommand with the keys every subcommand shares (`JSON_KEYS`)."""
    return {
        "command": args.command,
        "model": None if getattr(args, "model", None) is None else str(args.model),
        **result,
        "seconds": round(seconds, 3),
    }


if __name__ == "__main__":
    sys.exit(main())
