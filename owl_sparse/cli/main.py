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


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="owl-sparse", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("eval", help="perplexity of a model on a text")
    _add_model(p)
    p.add_argument("--text", default="wikitext2", help="text file or dataset name")
    p.add_argument("--seqlen", type=_positive_int, default=2048)
    p.add_argument("--max-windows", type=_positive_int, default=None)
    p.add_argument("--batch-size", type=_positive_int, default=1)
    _add_common(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("info", help="model structure: decoder blocks and linear layers")
    _add_model(p)
    _add_common(p)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("demo", help="the main job: prune with OWL, pack, run, save, report")
    _add_model(p, required=False)
    p.add_argument(
        "--text",
        default=None,
        help="evaluation text (default: WikiText-2 test "
        "from the shared data if present, else Python's own documentation prose)",
    )
    p.add_argument("--seqlen", type=_positive_int, default=512)
    p.add_argument("--max-windows", type=_positive_int, default=16)
    p.add_argument(
        "--calib-text",
        default=None,
        help="calibration text file, or 'self' to sample from the model (default: "
        "WikiText-2 valid from the shared data if present, else 'self')",
    )
    p.add_argument("--calib-samples", type=_positive_int, default=32)
    p.add_argument("--calib-seqlen", type=_positive_int, default=256)
    p.add_argument("--method", default="wanda", choices=["magnitude", "wanda", "sparsegpt"])
    p.add_argument("--allocation", default="owl", choices=["uniform", "owl", "sensitivity"])
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--pattern", default="unstructured", help="unstructured or N:M, e.g. 2:4")
    p.add_argument("--format", default="auto", choices=["auto", "bitmap", "2:4"])
    p.add_argument(
        "--new-tokens", type=_positive_int, default=24, help="tokens generated per sample"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="where to save the packed checkpoint")
    _add_common(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("generate", help="generate text (static KV cache, CUDA graphs on GPU)")
    p.add_argument(
        "model",
        help="built-in name, HF or owl-sparse packed model directory, .gguf or llama2.c .bin file",
    )
    p.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for several)")
    p.add_argument(
        "--batch",
        type=_positive_int,
        default=None,
        help="sequences per forward pass; prompts are repeated to fill one batch "
        "when fewer are given (default: all prompts at once)",
    )
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ignore-eos", action="store_true", help="always generate max-new-tokens")
    p.add_argument("--no-cuda-graphs", action="store_true", help="decode eagerly on CUDA")
    _add_common(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("prune", help="prune a model (OWL, Wanda, SparseGPT...) and report")
    _add_model(p)
    p.add_argument("--method", default="wanda", choices=["magnitude", "wanda", "sparsegpt"])
    p.add_argument("--allocation", default="owl", choices=["uniform", "owl", "sensitivity"])
    p.add_argument(
        "--sparsity",
        type=float,
        default=None,
        help="target sparsity in [0, 1) (default 0.7; with N:M it is 1 - N/M)",
    )
    p.add_argument("--pattern", default="unstructured", help="unstructured or N:M, e.g. 2:4")
    p.add_argument("--owl-m", type=float, default=5.0, help="OWL outlier threshold M")
    p.add_argument("--owl-lambda", type=float, default=0.08, help="OWL / sensitivity spread")
    p.add_argument(
        "--calib-text",
        default=None,
        help="calibration text file or dataset name (train split), or 'self' to "
        "sample from the model; not needed for uniform magnitude",
    )
    p.add_argument("--calib-samples", type=_positive_int, default=128)
    p.add_argument(
        "--seqlen", type=_positive_int, default=2048, help="calibration (and evaluation) length"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--batch-size",
        type=_positive_int,
        default=None,
        help="calibration samples per block forward (default: by memory budget)",
    )
    p.add_argument("--eval-text", default=None, help="evaluate perplexity on this text after")
    p.add_argument("--eval-windows", type=_positive_int, default=None)
    p.add_argument(
        "--out",
        default=None,
        help="write the pruned model (see --format) and prune_report.json",
    )
    p.add_argument(
        "--format",
        default="dense",
        choices=["dense", "bitmap", "2:4", "auto"],
        help="--out layout: dense HF checkpoint, or a packed owl-sparse checkpoint "
        "(bitmap, 2:4, or auto = 2:4 where the mask allows, else bitmap)",
    )
    _add_common(p)
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser(
        "bench", help="benchmarks (source checkout): kernels, e2e or prune", add_help=False
    )
    p.add_argument("suite", choices=["kernels", "e2e", "prune"])
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

    text = load_text(args.text)  # a bad text path fails before the model loads
    model, tokenizer = load_model(
        args.model, dtype=resolve_dtype(args.dtype), device=resolve_device(args.device)
    )
    windows = eval_windows(tokenize(tokenizer, text), args.seqlen, args.max_windows)
    start = time.perf_counter()
    result = perplexity(model, windows, batch_size=args.batch_size, progress=not args.quiet)
    out = {
        "model": str(args.model),
        "text": str(args.text),
        **result.to_dict(),
        "seconds": round(time.perf_counter() - start, 3),
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
    return info


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
    if args.batch is not None and args.batch > len(prompts):
        prompts = [prompts[i % len(prompts)] for i in range(args.batch)]
    result = generate(
        model,
        tokenizer,
        prompts,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        batch_size=args.batch,
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
    return {"model": str(args.model), "prompts": prompts, **result.to_dict()}


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
    if args.out:
        check_output_dir(args.out)
        if args.format != "dense":
            check_format(args.format, config.nm, config.pattern)
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
            model.to(device), tokenizer, args.calib_samples, args.seqlen, args.seed
        )
    elif config.needs_calibration:
        calibration = calibration_batches(
            tokenize(tokenizer, calib_text), args.calib_samples, args.seqlen, args.seed
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
    out = {"model": str(args.model), "calib_text": args.calib_text, **report.to_dict()}
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
        if args.format == "dense":
            save_dense(model, path, tokenizer, prune_report=report)
        else:
            sparsify_(model, format=args.format, masks=report.masks)
            settings = {
                k: getattr(args, k) for k in ("calib_text", "calib_samples", "seqlen", "seed")
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
        print(f"saved the pruned ({args.format}) checkpoint to {path}")
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
    try:
        result = args.func(args)
    except InputError as e:
        return _error(e)
    except FileNotFoundError as e:
        return _error(f"{e.filename or e}: no such file")
    except OSError as e:  # permissions, a full disk, a path through a file: not a traceback
        return _error(e)
    if args.json:
        print(json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
