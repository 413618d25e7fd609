"""The ``"tuned"`` allocation: OWL's (M, lambda) or the sensitivity bound chosen on held-out
calibration loss, falling back to uniform when no setting beats it.

OWL's spread (lambda) and outlier threshold (M) were tuned per model in the paper, and the
quality table shows a fixed setting can lose to uniform (SparseGPT 60% on SmolLM2-135M).
This mode searches a small grid instead and keeps a setting only when it does better than
uniform on calibration windows that the statistics never saw:

1. The calibration set is split: the statistics (dense pass, the pruning itself) use the
   first part, the last quarter (at least one window) is held out
   (`split_calibration`; or the caller passes ``held_out``).
2. Every candidate of `candidates` (uniform, OWL over `OWL_M` x `OWL_LAMBDA`, sensitivity
   over `SENSITIVITY_BOUND`; those that cannot meet the target skipped, those whose
   per-layer targets equal an earlier candidate's dropped, and those whose row-wise
   rounding would put the parameter-weighted sparsity more than `BUDGET_TOLERANCE` away
   from both the target and uniform's own rounded sparsity skipped) gets its per-layer targets from the dense statistics, is applied as
   **one-shot masks** (the method's own scores
   for magnitude and Wanda; Wanda's for SparseGPT, whose weight updates need the
   layer-sequential pass) and is scored by the model's mean next-token loss on the
   held-out windows; the weights are restored after each.
3. The candidate with the lowest held-out loss goes on only if it beats uniform beyond
   noise: uniform's per-window loss minus its own (the same windows, so the difference
   is paired) must average more than 2 standard errors of that difference
   (`paired_gain`). Otherwise, and always with a single held-out window, uniform is used.
4. A finalist is confirmed with the real method (magnitude needs no confirmation: its
   one-shot masks are the method): the engine prunes layer-sequentially
   with uniform's targets, then with the finalist's, scores both on the held-out windows
   and keeps the finalist only if it again beats uniform beyond noise.
5. The chosen setting is pruned again, from the dense weights, on **all** calibration
   windows (the statistics part and the held-out part), exactly as a plain run of that
   setting would (its own dense pass when it is OWL or sensitivity). Without this the
   result would lose the held-out quarter's statistics: at SparseGPT 50% on
   SmolLM2-135M that cost more perplexity than the allocation could win (tuned 87.46 +-
   1.15 against uniform 85.09 +- 1.65 with uniform chosen for every seed). Magnitude
   reads no calibration, so its step-3 pick is the result.
So tuning costs one pruning run (plus the grid) when the proxy finds nothing, and three
(plus up to two dense passes) when it passes a finalist on.

So a grid candidate costs one masking of every layer and one forward over the held-out
windows, not a full pruning run. The one-shot proxy only ranks allocations; step 4 keeps
a proxy winner that the real method does not confirm from being used, and
``benchmarks/quality.py`` measures whether the choice holds on test text.

Memory: the search and the confirmation keep a CPU copy of the dense block weights, so
tuning needs the block weights once more in host memory beyond the model.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from tqdm.auto import tqdm

from ..errors import InputError
from ..evaluate.perplexity import perplexity
from ..models.structure import find_linears
from .masks import pruned_per_row, select_mask
from .scores import magnitude_scores, wanda_scores

OWL_M = (3.0, 5.0, 7.0)
OWL_LAMBDA = (0.04, 0.08, 0.15)
SENSITIVITY_BOUND = (0.04, 0.08, 0.15)
HELD_OUT_FRACTION = 0.25
BUDGET_TOLERANCE = 0.001  # a candidate's parameter-weighted sparsity within 0.1% of the target


def split_calibration(calibration: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(statistics part, held-out part) of calibration windows [n, seqlen]: the last
    ``max(1, round(n * HELD_OUT_FRACTION))`` windows are held out.

    Raises:
        InputError: fewer than 2 windows (nothing would be left for one of the parts).
    """
    if calibration is None or calibration.ndim != 2 or calibration.shape[0] < 2:
        shape = None if calibration is None else tuple(calibration.shape)
        raise InputError(
            "allocation 'tuned' needs at least 2 calibration windows [n, seqlen] (a part is "
            f"held out to choose the allocation), got {shape}"
        )
    n = calibration.shape[0]
    held = max(1, int(math.floor(n * HELD_OUT_FRACTION + 0.5)))
    return calibration[: n - held], calibration[n - held :]


def candidates(config) -> tuple[list, list[dict]]:
    """The grid around ``config`` (a `PruneConfig` with allocation ``"tuned"``).

    Returns (list of `PruneConfig` to try, uniform first; list of skipped settings with
    the reason).
    """
    settings = [{"allocation": "uniform"}]
    settings += [
        {"allocation": "owl", "owl_m": m, "owl_lambda": lam} for m in OWL_M for lam in OWL_LAMBDA
    ]
    settings += [{"allocation": "sensitivity", "owl_lambda": b} for b in SENSITIVITY_BOUND]
    configs, skipped = [], []
    for s in settings:
        try:
            configs.append(dataclasses.replace(config, **s))
        except InputError as e:
            skipped.append({**s, "skipped": str(e)})
    return configs, skipped


def describe(config) -> dict:
    """The allocation settings of a candidate, for reports."""
    if config.allocation == "uniform":
        return {"allocation": "uniform"}
    if config.allocation == "owl":
        return {"allocation": "owl", "owl_m": config.owl_m, "owl_lambda": config.owl_lambda}
    return {"allocation": "sensitivity", "owl_lambda": config.owl_lambda}


@torch.no_grad()
def search(
    model, structure, config, profile, held_out, device, allocate, batch_size=None, progress=False
):
    """Run the grid (module doc, steps 2-3).

    Args:
        model: the causal LM (dense); its weights are restored before returning.
        structure: its `DecoderStructure` (`find_decoder_blocks`).
        config: the tuned `PruneConfig`.
        profile: the `DenseProfile` of the statistics part.
        held_out: int64 token ids [h, seqlen].
        device: compute device for the masking.
        allocate: ``allocate(candidate_config) -> (targets, summaries)`` (the engine's
            allocation for one candidate).
        batch_size: held-out windows per forward (default 4).
        progress: one progress bar over the settings tried.

    Returns:
        (finalists, report): finalists is ``[(uniform config, targets, summaries)]``, plus
        the best candidate's triple when its one-shot held-out loss beats uniform's beyond
        noise (`paired_gain`); report has every trial and the skipped settings.
    """
    tried, skipped = candidates(config)
    originals = snapshot_weights(structure)  # the dense weights, restored after each trial
    shapes = {k: tuple(w.shape) for k, w in originals.items()}
    trials, seen, losses = [], [], []
    try:
        for cand in tqdm(tried, desc="allocation search", disable=not progress):
            targets, summaries = allocate(cand)
            key = sorted((k, t.sparsity, t.nm) for k, t in targets.items())
            if key in seen:
                skipped.append({**describe(cand), "skipped": "same targets as an earlier setting"})
                continue
            planned = planned_sparsity(targets, shapes)
            if cand.allocation == "uniform":
                uniform_planned = planned
            elif min(abs(planned - config.sparsity), abs(planned - uniform_planned)) > (
                BUDGET_TOLERANCE
            ):
                skipped.append(
                    {
                        **describe(cand),
                        "skipped": f"misses the budget: {planned:.4%} planned, uniform "
                        f"{uniform_planned:.4%}, target {config.sparsity:.4%}",
                    }
                )
                continue
            seen.append(key)
            _apply_one_shot(structure, config.method, profile, targets, device)
            loss = perplexity(model, held_out, batch_size=batch_size or 4, progress=False)
            restore_weights(structure, originals)
            trials.append({**describe(cand), "held_out_nll": loss.mean_nll})
            losses.append(
                (torch.tensor(loss.window_nll, dtype=torch.float64), cand, targets, summaries)
            )
    finally:
        restore_weights(structure, originals)
    uniform, others = losses[0], losses[1:]
    if not others:  # every other setting skipped
        best, (gain, se, beats) = uniform, (0.0, math.inf, False)
    else:
        best = min(others, key=lambda t: t[0].mean().item())
        gain, se, beats = paired_gain(best[0], uniform[0])
    report = {
        "best_trial": describe(best[1]),
        "proxy_gain_over_uniform_nll": gain,
        "proxy_gain_standard_error": se,
        "held_out_windows": list(held_out.shape),
        "proxy": "one-shot " + ("magnitude" if config.method == "magnitude" else "wanda"),
        "trials": trials,
        "skipped": skipped,
    }
    if config.method == "magnitude":  # one-shot magnitude masks are the method itself
        return [best[1:] if beats else uniform[1:]], report
    finalists = [uniform[1:]] + ([best[1:]] if beats else [])
    return finalists, report


def paired_gain(candidate: torch.Tensor, baseline: torch.Tensor) -> tuple[float, float, bool]:
    """(mean of baseline - candidate per-window NLL, its standard error, whether the gain
    exceeds two standard errors); with one window the error is infinite and nothing beats."""
    diff = baseline - candidate
    n = diff.numel()
    se = diff.std().item() / math.sqrt(n) if n > 1 else math.inf
    return diff.mean().item(), se, n > 1 and diff.mean().item() > 2 * se


def snapshot_weights(structure) -> dict:
    """CPU copies of every block linear weight, {(block, name): tensor}."""
    return {
        (i, name): lin.weight.detach().to("cpu", copy=True)
        for i, block in enumerate(structure.blocks)
        for name, lin in find_linears(block).items()
    }


def restore_weights(structure, snapshot: dict) -> None:
    """Copy a `snapshot_weights` back in place."""
    for i, block in enumerate(structure.blocks):
        for name, lin in find_linears(block).items():
            lin.weight.copy_(snapshot[(i, name)])


def planned_sparsity(targets: dict, shapes: dict) -> float:
    """Parameter-weighted sparsity that ``targets`` ({key: Target}) will reach on layers of
    ``shapes`` ({key: (out, in)}), with the row-wise rounding of `pruned_per_row`."""
    total = pruned = 0
    for key, (rows, cols) in shapes.items():
        t = targets[key]
        per_row = cols * (1 - t.nm[0] / t.nm[1]) if t.nm else pruned_per_row(t.sparsity, cols)
        total += rows * cols
        pruned += rows * per_row
    return pruned / total


def _apply_one_shot(structure, method, profile, targets, device) -> None:
    for i, block in enumerate(structure.blocks):
        prefix = f"{structure.path}.{i}."
        for name, lin in find_linears(block).items():
            target = targets[(i, name)]
            if target.sparsity == 0.0:
                continue
            w = lin.weight.detach().to(device)
            if method == "magnitude":
                scores = magnitude_scores(w)
            else:
                scores = wanda_scores(w, profile.colsq[prefix + name].to(device))
            keep = select_mask(scores, target).to(lin.weight.device)
            lin.weight.masked_fill_(~keep, 0)
