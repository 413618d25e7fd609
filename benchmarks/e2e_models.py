"""Models for the end-to-end benchmark: random LLaMA shapes with OWL-profiled random masks,
and real checkpoints pruned for real (OWL + Wanda, Wanda 2:4).  See bench_e2e's doc."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import LLAMA2_7B_SHAPE, random_llama

RANDOM_CONFIGS = {
    "llama2-7b": dict(LLAMA2_7B_SHAPE),
    "smollm2-135m-shape": dict(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        rope_theta=100000.0,
    ),
    "tiny": dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    ),
}
REAL_MODELS = ("smollm2-135m", "stories260k")
TARGET, OWL_LAMBDA = 0.7, 0.08


def ramp_profile(blocks: int, target: float = TARGET, lam: float = OWL_LAMBDA) -> list[float]:
    """OWL per-block sparsities for outlier ratios falling linearly with depth."""
    from owl_sparse.pruning.allocate import owl_sparsities

    return owl_sparsities(np.linspace(1.0, 0.0, blocks).tolist(), target, lam)


def block_linears(model) -> list[dict[str, torch.nn.Module]]:
    """Per decoder block: {fully qualified name: linear module}."""
    from owl_sparse.models import find_decoder_blocks, find_linears

    s = find_decoder_blocks(model)
    return [
        {f"{s.path}.{i}.{n}": m for n, m in find_linears(b).items()} for i, b in enumerate(s.blocks)
    ]


def random_masks(model, variant: str, profile: list[float] | None, gen) -> dict:
    """Masks for a random-weight model: Bernoulli at each block's sparsity, or 2:4."""
    masks = {}
    blocks = block_linears(model)
    profile = profile or ramp_profile(len(blocks))
    if len(profile) != len(blocks):
        profile = np.interp(
            np.linspace(0, 1, len(blocks)), np.linspace(0, 1, len(profile)), profile
        ).tolist()
    for sparsity, linears in zip(profile, blocks):
        for name, lin in linears.items():
            w = lin.weight
            if variant == "2:4":
                groups = w.detach().float().abs().view(w.shape[0], -1, 4)
                keep = groups.topk(2, dim=-1).indices
                mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
                masks[name] = mask.view_as(w)
            else:
                masks[name] = torch.rand(w.shape, generator=gen, device=w.device) >= sparsity
    return masks


def build(model_name: str, variant: str, device, dtype, args) -> tuple:
    """(model, notes) for one model/variant, pruned and packed when sparse."""
    from owl_sparse.nn import sparsify_

    notes = {}
    if model_name in RANDOM_CONFIGS:
        model = random_llama(RANDOM_CONFIGS[model_name], dtype=dtype, device=device, seed=args.seed)
        if variant != "dense":
            profile = _load_profile(args.owl_profile) if "smollm2" in model_name else None
            gen = torch.Generator(device=device).manual_seed(args.seed)
            masks = random_masks(model, variant, profile, gen)
            notes["masks"] = (
                "random 2:4 (larger 2 of 4)"
                if variant == "2:4"
                else "random, OWL per-block sparsities from "
                + ("a real OWL run" if profile else "a ramp")
            )
            sparsify_(model, format="bitmap" if variant != "2:4" else "2:4", masks=masks)
        return model, notes
    from owl_sparse.models import load_model

    model, tokenizer = load_model(model_name, dtype=dtype, device=device)
    if variant != "dense":
        from owl_sparse.pruning import PruneConfig, prune

        cfg = (
            PruneConfig(method="wanda", allocation="owl", sparsity=TARGET, owl_lambda=OWL_LAMBDA)
            if variant == "bitmap-70"
            else PruneConfig(method="wanda", pattern="2:4")
        )
        calib = _calibration(tokenizer, args)
        report = prune(model, calib, cfg, device=device)
        notes["masks"] = f"real {cfg.allocation} + {cfg.method}, {list(calib.shape)} calibration"
        notes["prune_s"] = round(report.wall_time_s, 2)
        notes["block_sparsities"] = [round(b.target_sparsity, 4) for b in report.blocks]
        sparsify_(model, format="bitmap" if variant != "2:4" else "2:4", masks=report.masks)
    return model, notes


def _calibration(tokenizer, args) -> torch.Tensor:
    from owl_sparse import settings
    from owl_sparse.data import calibration_batches, load_text, tokenize

    shared = settings.get().data_dir
    has_wiki = shared and (shared / "wikitext-2-raw" / "wiki.test.raw").is_file()
    text = load_text("wikitext2" if has_wiki else "pydoc")
    ids = tokenize(tokenizer, text[:2_000_000])
    return calibration_batches(ids, args.calib_samples, args.calib_seqlen, seed=args.seed)


def _load_profile(path) -> list[float] | None:
    if not path or not Path(path).is_file():
        return None
    return list(json.loads(Path(path).read_text())["block_sparsities"])
