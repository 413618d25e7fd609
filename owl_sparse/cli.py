"""The ``owl-sparse`` command line: a thin shell over the library (argparse lives only here).

Every subcommand returns a JSON-able dict; with ``--json`` it is printed as one JSON object
on the last line of standard output. Bad input prints one line ``owl-sparse: error: ...``
and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from .errors import InputError


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
    parser = argparse.ArgumentParser(prog="owl-sparse", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("eval", help="perplexity of a model on a text")
    _add_model(p)
    p.add_argument("--text", default="wikitext2", help="text file or dataset name")
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--max-windows", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=1)
    _add_common(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("info", help="model structure: decoder blocks and linear layers")
    _add_model(p)
    _add_common(p)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("demo", help="the main job: load, evaluate and report")
    _add_model(p, required=False)
    p.add_argument(
        "--text",
        default=None,
        help="evaluation text (default: WikiText-2 test "
        "from the shared data if present, else Python's own documentation prose)",
    )
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--max-windows", type=int, default=16)
    _add_common(p)
    p.set_defaults(func=cmd_demo)
    return parser


def resolve_device(name: str | None):
    import torch

    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(name: str | None):
    import torch

    return None if name is None else getattr(torch, name)


def cmd_eval(args) -> dict:
    from .data import eval_windows, load_text, tokenize
    from .evaluate import perplexity
    from .models import load_model

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
    from .models import load_model, model_info

    model, _ = load_model(args.model, dtype=resolve_dtype(args.dtype))
    info = model_info(model)
    print(
        f"{info['class']}: {info['parameters']:,} parameters, {info['num_blocks']} blocks "
        f"at '{info['blocks_path']}'"
    )
    for name, shape in info["block_linears"].items():
        print(f"  {name:<28} {shape[0]} x {shape[1]}")
    return info


def cmd_demo(args) -> dict:
    from .demo import run_demo

    return run_demo(args)


def _quiet_transformers() -> None:
    """transformers' weight-loading bars and advisory warnings drown the report."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="owl-sparse: %(message)s")
    _quiet_transformers()
    try:
        result = args.func(args)
    except InputError as e:
        print(f"owl-sparse: error: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"owl-sparse: error: {e.filename or e}: no such file", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
