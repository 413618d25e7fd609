"""Pruning benchmark: wall time, CPU time and peak memory of each method on one model.

Modes:

- ``--model SPEC`` (default ``smollm2-135m``): a real model, calibration windows from
  ``--calib-text`` (default: WikiText-2 valid, tokenized version, from the shared data).
  ``--baseline`` also times plain forward passes of the whole model over the same tokens,
  the yardstick for OWL + Wanda (its floor is three forwards of every block).
- ``--llama7b-shape``: a LLaMA-2-7B-shaped model (32 x 4096, MLP 11008) with random fp16
  weights, kept on the CPU while its blocks visit the GPU one at a time; random calibration
  tokens, 128 x 2048. Targets on one H100: OWL + Wanda < 60 s, OWL + SparseGPT < 8 min,
  peak GPU memory < 12 GB (checked and printed).
- ``--small``: a small random LLaMA (8 x 512) for a quick CPU run.

Examples::

    python -m benchmarks.bench_prune --baseline --methods owl+wanda
    python -m benchmarks.bench_prune --llama7b-shape --device cuda --json-out results.json
    owl-sparse bench prune --small

Times are ``time.perf_counter`` (wall) and ``time.process_time`` (CPU seconds of this
process, all threads: less disturbed by other processes on a shared machine).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

TARGETS_7B = {"owl+wanda": 60.0, "owl+sparsegpt": 480.0}
PEAK_7B_BYTES = 12e9


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench_prune", description=__doc__.splitlines()[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--llama7b-shape", action="store_true")
    mode.add_argument("--small", action="store_true")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--calib-text", default=None)
    p.add_argument("--samples", type=int, default=None)
    p.add_argument("--seqlen", type=int, default=None)
    p.add_argument(
        "--methods",
        default="owl+wanda,uniform+wanda,owl+sparsegpt,owl+magnitude",
        help="comma list of ALLOCATION+METHOD",
    )
    p.add_argument("--sparsity", type=float, default=0.7)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--baseline", action="store_true", help="time plain model forwards too")
    p.add_argument("--baseline-batch", type=int, default=8)
    p.add_argument("--device", default=None)
    p.add_argument("--json-out", default=None)
    return p


def _llama7b(device):
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
        max_position_embeddings=4096,
    )
    torch.manual_seed(0)
    # Random initialisation of 6.7e9 fp16 weights takes minutes on a CPU and a second on a
    # GPU: build where the blocks will be pruned, then park the model in CPU memory.
    build_on = device if device.type == "cuda" else torch.device("cpu")
    t0 = time.perf_counter()
    with build_on:
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float16)
    model.to("cpu")
    if device.type == "cuda":
        torch.cuda.empty_cache()
    print(f"built the LLaMA-2-7B-shaped model on {build_on} in {time.perf_counter() - t0:.1f} s")
    return model.eval(), "llama-2-7b shape, random fp16 weights"


def _small():
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=1000,
        max_position_embeddings=1024,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval(), "small random LLaMA (8 x 512)"


def _calibration(args, model, tokenizer, n, seqlen):
    from owl_sparse import settings
    from owl_sparse.data import calibration_batches, load_text, tokenize

    if tokenizer is None:
        gen = torch.Generator().manual_seed(0)
        return torch.randint(0, model.config.vocab_size, (n, seqlen), generator=gen), "random ids"
    spec = args.calib_text
    if spec is None:
        root = settings.get().data_dir
        if root is None:
            raise SystemExit("no --calib-text and no shared data directory (OWL_SPARSE_DATA)")
        spec = root / "wikitext-2-tokenized" / "valid.txt"
        shown = "$OWL_SPARSE_DATA/wikitext-2-tokenized/valid.txt (WikiText-2 valid, tokenized)"
    else:
        shown = str(spec)
    ids = tokenize(tokenizer, load_text(spec))
    return calibration_batches(ids, n, seqlen, seed=0), f"{n} x {seqlen}, seed 0, from {shown}"


@torch.no_grad()
def _plain_forwards(model, calibration, batch, device):
    model.to(device)
    start_w, start_c = time.perf_counter(), time.process_time()
    for s in range(0, calibration.shape[0], batch):
        model(input_ids=calibration[s : s + batch].to(device), use_cache=False)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start_w, time.process_time() - start_c


def main(argv=None) -> dict:
    from owl_sparse.models import load_model
    from owl_sparse.pruning import PruneConfig, prune

    args = build_parser().parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tokenizer = None
    if args.llama7b_shape:
        model, what = _llama7b(device)
        n, seqlen = args.samples or 128, args.seqlen or 2048
    elif args.small:
        model, what = _small()
        n, seqlen = args.samples or 16, args.seqlen or 256
    else:
        model, tokenizer = load_model(args.model)
        what = args.model
        n, seqlen = args.samples or 64, args.seqlen or 512
    calibration, calib_what = _calibration(args, model, tokenizer, n, seqlen)
    methods = [m for m in args.methods.split(",") if m]
    # a second method needs the dense weights back (a 7B copy: only when asked for)
    dense = {k: v.clone() for k, v in model.state_dict().items()} if len(methods) > 1 else None
    result = {
        "model": what,
        "device": str(device),
        "calibration": calib_what,
        "torch_threads": torch.get_num_threads(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "runs": [],
    }
    print(f"{what} on {device}; calibration {calib_what}; {torch.get_num_threads()} threads")
    if args.baseline:
        wall, cpu = _plain_forwards(model, calibration, args.baseline_batch, device)
        result["plain_forward"] = {"batch": args.baseline_batch, "wall_s": wall, "cpu_s": cpu}
        print(
            f"one plain forward of the model: {wall:.1f} s wall, {cpu:.1f} s CPU "
            f"(x3: {3 * wall:.1f} s wall, {3 * cpu:.1f} s CPU)"
        )
        model.to("cpu")  # pruning keeps the model on the CPU; its blocks visit the device
    for spec in methods:
        allocation, method = spec.split("+")
        if dense is not None:
            model.load_state_dict(dense)
        config = PruneConfig(method=method, allocation=allocation, sparsity=args.sparsity)
        start_c = time.process_time()
        report = prune(
            model, calibration, config, device=device, batch_size=args.batch_size, keep_masks=False
        )
        run = {
            "method": spec,
            "wall_s": report.wall_time_s,
            "cpu_s": time.process_time() - start_c,
            "phases": report.phase_time_s,
            "peak_memory_bytes": report.peak_memory_bytes,
            "peak_memory_kind": report.peak_memory_kind,
            "achieved_sparsity": report.achieved_sparsity,
        }
        if "plain_forward" in result:
            run["x_three_plain_forwards_wall"] = run["wall_s"] / (
                3 * result["plain_forward"]["wall_s"]
            )
            run["x_three_plain_forwards_cpu"] = run["cpu_s"] / (
                3 * result["plain_forward"]["cpu_s"]
            )
        if args.llama7b_shape and spec in TARGETS_7B:
            run["target_s"] = TARGETS_7B[spec]
            run["meets_time"] = run["wall_s"] < TARGETS_7B[spec]
            run["meets_memory"] = report.peak_memory_bytes < PEAK_7B_BYTES
        result["runs"].append(run)
        extra = "".join(f", {k} {v}" for k, v in run.items() if k.startswith(("x_", "meets")))
        print(
            f"{spec:>16}: {run['wall_s']:.1f} s wall, {run['cpu_s']:.1f} s CPU, peak "
            f"{run['peak_memory_bytes'] / 2**20:.0f} MiB ({run['peak_memory_kind']}){extra}"
        )
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
