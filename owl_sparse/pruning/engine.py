"""`prune(model, calibration, config)`: score -> allocate -> select mask, block by block.

Passes over the decoder blocks (each a layer-sequential walk, see `calibrate`):

1. *dense pass* (OWL and sensitivity only): one forward of each dense block collects the
   squared input norms of its linear layers; from them and the weights come the block's
   outlier ratio (OWL) and its error curve (sensitivity). The statistics can be
   saved as a `DenseProfile` and reused for other configs on the same calibration set.
2. *allocation*: a `Target` per linear layer (`allocate`).
3. *pruning pass*: for each block, one forward with the statistics hooks (skipped for
   magnitude), prune each linear layer with the scorer (weights zeroed in place, masks
   kept), then one forward of the pruned block to produce the next block's inputs
   (skipped after the last block and for magnitude).

So OWL + Wanda costs three forwards of each block over the calibration tokens.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..errors import InputError
from ..evaluate.perplexity import perplexity
from ..models.structure import conv1d_to_linear_, find_decoder_blocks, find_linears
from ..nn.memory import return_freed_memory
from . import allocate as alloc
from . import tune
from .calibrate import (
    BlockInputs,
    auto_batch_size,
    capture_block_inputs,
    check_calibration,
    forward_block,
)
from .checks import check_blocks, check_model, compute_device
from .config import PruneConfig, PruneError
from .mask_store import MaskStore
from .masks import Target, mask_sparsity
from .report import LayerRecord, PeakMemory, PruneReport
from .scores import NEEDS, SCORERS
from .stats import StatsAccumulator


@dataclass
class DenseProfile:
    """Input statistics of every block linear layer of the dense model, float64 CPU
    tensors [in] summed over ``tokens`` calibration tokens: ``colsq[fqn]`` (squared input
    norms) and ``wcolsq[fqn]`` (the same weighted by the inverse block-input energy)."""

    colsq: dict
    wcolsq: dict
    tokens: int

    def save(self, path) -> None:
        torch.save({"colsq": self.colsq, "wcolsq": self.wcolsq, "tokens": self.tokens}, path)

    @staticmethod
    def load(path) -> DenseProfile:
        data = torch.load(path, map_location="cpu", weights_only=True)
        if "wcolsq" not in data:
            raise InputError(f"{path}: a dense profile from an older owl-sparse (no wcolsq)")
        return DenseProfile(data["colsq"], data["wcolsq"], int(data["tokens"]))


@torch.no_grad()
def prune(
    model,
    calibration: torch.Tensor | None,
    config: PruneConfig | None = None,
    *,
    device=None,
    batch_size: int | None = None,
    inputs: BlockInputs | None = None,
    profile: DenseProfile | None = None,
    held_out: torch.Tensor | None = None,
    keep_masks: bool = True,
    progress: bool = False,
) -> PruneReport:
    """Prune the linear layers of ``model``'s decoder blocks in place.

    Args:
        model: a transformers causal LM (GPT-2 Conv1D layers are converted to nn.Linear).
        calibration: int64 token ids [n, seqlen] (`owl_sparse.data.calibration_batches`);
            may be None for uniform magnitude pruning.
        config: `PruneConfig` (default: Wanda, uniform, 70% unstructured).
        device: compute device (default: where the first block is). Blocks visit it one
            at a time; the rest of the model stays where it is.
        batch_size: calibration samples per block forward (default: `auto_batch_size`).
        inputs: block-0 inputs from `capture_block_inputs` to reuse (not modified).
        profile: a `DenseProfile` of this model on this calibration set, to skip the dense pass.
        held_out: allocation ``"tuned"`` only: int64 token ids [h, seqlen] to choose the
            allocation on (`owl_sparse.pruning.tune`). Default: the last quarter of
            ``calibration`` is held out and the rest feeds the statistics. With ``inputs``
            or ``profile`` given, ``held_out`` is required (they are then taken to be of
            ``calibration`` as passed) and ``report.allocation_search`` has the trials.
            Once chosen, the setting is pruned again on ``calibration`` and ``held_out``
            together (magnitude excepted: it reads no calibration), so the result is the
            plain run of the chosen setting on every window.
        keep_masks: keep the masks in ``report.masks`` (a `MaskStore`: name -> CPU bool
            [out, in], True = kept, stored one bit per weight).
        progress: show progress bars.

    Returns:
        `PruneReport` (per block / layer sparsities, outlier ratios, time, peak memory).

    Raises:
        TypeError: ``config`` not a `PruneConfig`, ``inputs`` not `BlockInputs`, ``profile``
            not a `DenseProfile`, ``model`` not an nn.Module.
        InputError: bad config (checked again here), calibration (`check_calibration`, also
            when it is not needed), ``batch_size``, widths not divisible by M, a model on the
            meta device or already packed (SparseLinear), NaN/Inf in any parameter or buffer
            of the blocks, or OWL block sparsities outside (0, 0.99]: all found before
            anything is pruned; likewise NaN/Inf activations.
        PruneError: a failure after some blocks were pruned; it names them.
    """
    if config is None:
        config = PruneConfig()
    elif not isinstance(config, PruneConfig):
        raise TypeError(f"config must be a PruneConfig, got {type(config).__name__}")
    config.validate()  # again: fields may have been assigned since construction
    check_model(model, batch_size)
    _check_types(inputs, profile)
    conv1d_to_linear_(model)
    structure = find_decoder_blocks(model)
    blocks = structure.blocks
    device = compute_device(device, blocks)
    check_blocks(structure, config)
    if calibration is not None or (config.needs_calibration and inputs is None):
        check_calibration(model, calibration)
    tuned = config.allocation == "tuned"
    if held_out is not None and not tuned:
        raise InputError("held_out is only used by allocation 'tuned'")
    if tuned:
        if held_out is None:
            if inputs is not None or profile is not None:
                raise InputError(
                    "allocation 'tuned' with inputs or profile needs held_out: the windows "
                    "held out must not be among those the statistics came from"
                )
            calibration, held_out = tune.split_calibration(calibration)
        elif calibration is None and NEEDS[config.method]:
            raise InputError(
                "allocation 'tuned' needs the calibration windows themselves, not only "
                "inputs or a profile: the chosen setting is pruned again on all of them "
                "(calibration + held_out)"
            )
        check_calibration(model, held_out)
        if NEEDS[config.method] and held_out.shape[1] != calibration.shape[1]:
            raise InputError(
                f"held_out windows are {held_out.shape[1]} tokens long but the calibration "
                f"windows {calibration.shape[1]}: the chosen setting is pruned again on both "
                "together, so they must match"
            )
    was_training = model.training
    model.eval()
    dense_needed = config.allocation != "uniform"
    forwards_needed = bool(NEEDS[config.method])
    timings: dict[str, float] = {}
    start = time.perf_counter()
    # Heap freed before pruning (tokenizing the calibration text: ~150 MiB for WikiText-2
    # valid) goes back to the system first, so pruning's peak does not sit on top of it.
    return_freed_memory()
    with PeakMemory(device) as mem:
        used = {"batch_size": batch_size}

        def get_inputs() -> BlockInputs:
            if inputs is not None:
                return inputs.clone()
            n, seqlen = calibration.shape
            dtype = next(blocks.parameters()).dtype
            used["batch_size"] = batch_size or auto_batch_size(model, n, seqlen, device, dtype)
            return capture_block_inputs(model, blocks, calibration, device, used["batch_size"])

        summaries, search = None, None
        if tuned:
            t = time.perf_counter()
            if profile is None:
                profile = _dense_pass(structure, get_inputs(), device, None, progress)[0]
            timings["dense_pass_s"] = _lap(t, device)
            t = time.perf_counter()

            def allocate_for(cand):
                summ = (
                    None
                    if cand.allocation == "uniform"
                    else _summaries_from_profile(structure, profile, device, cand)
                )
                return _allocate(structure, cand, summ), summ

            finalists, search = tune.search(
                model, structure, config, profile, held_out, device, allocate_for, progress=progress
            )
            timings["allocation_search_s"] = _lap(t, device)
        elif dense_needed:
            t = time.perf_counter()
            summaries = (
                _summaries_from_profile(structure, profile, device, config)
                if profile is not None
                else _dense_pass(structure, get_inputs(), device, config, progress)[1]
            )
            timings["dense_pass_s"] = _lap(t, device)
        if not tuned:
            t = time.perf_counter()
            finalists = [(config, _allocate(structure, config, summaries), summaries)]
            timings["allocate_s"] = _lap(t, device)
        if tuned and forwards_needed:
            t = time.perf_counter()
            chosen = _choose(
                model, structure, finalists, get_inputs, held_out, device, config, progress, search
            )
            timings["confirm_s"] = _lap(t, device)
            # tune step 5: the chosen setting, pruned again on every calibration window
            everything = torch.cat([calibration, held_out])
            t = time.perf_counter()
            records, masks, summaries = _prune_all_windows(
                model,
                structure,
                chosen,
                everything,
                device,
                batch_size,
                config,
                keep_masks,
                progress,
            )
            search["final_pass_windows"] = list(everything.shape)
            timings["prune_pass_s"] = _lap(t, device)
        else:
            t = time.perf_counter()
            records, masks, summaries = _prune_finalists(
                structure,
                finalists,
                get_inputs if forwards_needed else None,
                device,
                config,
                keep_masks,
                progress,
                search,
            )
            timings["prune_pass_s"] = _lap(t, device)
    model.train(was_training)
    report = PruneReport(
        config=config.to_dict(),
        model=type(model).__name__,
        device=str(device),
        calibration={
            "samples_x_seqlen": None if calibration is None else list(calibration.shape),
            "held_out": None if held_out is None else list(held_out.shape),
            "batch_size": used["batch_size"],
        },
        wall_time_s=time.perf_counter() - start,
        phase_time_s=timings,
        peak_memory_bytes=mem.peak_bytes,
        peak_memory_kind=mem.kind,
        masks=masks,
        allocation_search=search,
    )
    report.add_layers(records, summaries)
    return_freed_memory()  # calibration activations, scores, Hessians: back to the system
    return report


def dense_profile(
    model,
    calibration: torch.Tensor | None = None,
    *,
    inputs=None,
    device=None,
    batch_size: int | None = None,
    progress: bool = False,
) -> DenseProfile:
    """The dense pass alone: squared input norms of every block linear layer.

    Arguments as for `prune`; ``calibration`` is used only when ``inputs`` is None.
    """
    check_model(model, batch_size)
    _check_types(inputs, None)
    conv1d_to_linear_(model)
    structure = find_decoder_blocks(model)
    blocks = structure.blocks
    device = compute_device(device, blocks)
    if inputs is None:
        check_calibration(model, calibration)
        n, seqlen = calibration.shape
        bs = batch_size or auto_batch_size(
            model, n, seqlen, device, next(blocks.parameters()).dtype
        )
        inputs = capture_block_inputs(model, blocks, calibration, device, bs)
    else:
        inputs = inputs.clone()
    return _dense_pass(structure, inputs, device, None, progress)[0]


@contextmanager
def _visiting(block, device):
    """Move ``block`` to ``device`` for the duration, and back even on failure."""
    home = next(block.parameters()).device
    block.to(device)
    try:
        yield block
    finally:
        block.to(home)


def _dense_pass(structure, inputs: BlockInputs, device, config, progress):
    blocks = structure.blocks
    src, dst = inputs.hidden, torch.empty_like(inputs.hidden)
    profile = DenseProfile({}, {}, inputs.hidden.shape[0] * inputs.hidden.shape[1])
    summaries = []
    for i, block in enumerate(tqdm(blocks, desc="dense pass", disable=not progress)):
        with _visiting(block, device):
            linears = find_linears(block)
            prefix = f"{structure.path}.{i}."
            with StatsAccumulator(linears, colsq=True, weighted_colsq=True) as acc:
                last = i == len(blocks) - 1
                forward_block(block, inputs, src, None if last else dst, acc)
            acc.check_finite(prefix)
            colsq = {name: acc.colsq(name) for name in linears}
            wcolsq = {name: acc.wcolsq(name) for name in linears}
            if config is not None:
                summaries.append(alloc.summarize_block(linears, colsq, wcolsq, config))
        cpu = {}  # layers sharing an input share one CPU tensor
        for name in linears:
            for stat, store in ((colsq, profile.colsq), (wcolsq, profile.wcolsq)):
                store[prefix + name] = cpu.setdefault(id(stat[name]), stat[name].cpu())
        src, dst = dst, src
    return profile, summaries


def _summaries_from_profile(structure, profile: DenseProfile, device, config):
    summaries = []
    for i, block in enumerate(structure.blocks):
        linears = find_linears(block)
        prefix = f"{structure.path}.{i}."
        missing = [prefix + n for n in linears if prefix + n not in profile.colsq]
        if missing:
            raise InputError(f"the dense profile does not match this model: no {missing[0]}")
        with _visiting(block, device):
            colsq = {n: profile.colsq[prefix + n].to(device) for n in linears}
            wcolsq = {n: profile.wcolsq[prefix + n].to(device) for n in linears}
            summaries.append(alloc.summarize_block(linears, colsq, wcolsq, config))
    return summaries


def _allocate(structure, config, summaries) -> dict[tuple[int, str], Target]:
    """A `Target` for every linear layer, keyed by (block index, name inside the block)."""
    names = [
        (i, name, lin.weight.shape)
        for i, block in enumerate(structure.blocks)
        for name, lin in find_linears(block).items()
    ]
    nm = config.nm
    if config.allocation == "uniform":
        return {(i, n): Target.of(config.sparsity, nm) for i, n, _ in names}
    if config.allocation == "owl":
        s_b = alloc.owl_sparsities(
            [s["ratio"] for s in summaries], config.sparsity, config.owl_lambda
        )
        if nm is not None:
            sizes = [
                sum(lin.weight.numel() for lin in find_linears(b).values())
                for b in structure.blocks
            ]
            n_b = alloc.nm_levels(s_b, sizes, nm[0], nm[1])
            return {(i, n): Target.of(0.0, (n_b[i], nm[1])) for i, n, _ in names}
        return {(i, n): Target(s_b[i]) for i, n, _ in names}
    curves = [s["curve"] for s in summaries]
    levels = alloc.sensitivity_levels(curves, config.sparsity)
    return {(i, n): curves[i].target(levels[i], nm) for i, n, _ in names}


def _prune_finalists(
    structure, finalists, get_inputs, device, config, keep_masks, progress, search
):
    """Prune with the one finalist's targets (not tuned, or tuned magnitude, whose one-shot
    masks are the method). Returns (records, masks, summaries)."""
    ((cand, targets, summaries),) = finalists
    inputs = get_inputs() if get_inputs else None
    records, masks = _prune_pass(structure, inputs, device, config, targets, keep_masks, progress)
    if search is not None:
        search["chosen"] = tune.describe(cand)
    return records, masks, summaries


def _choose(model, structure, finalists, get_inputs, held_out, device, config, progress, search):
    """Tune step 4: with one finalist (uniform) that one; with two (uniform and the proxy's
    pick) prune with each on the statistics windows, score both on ``held_out`` and keep
    the pick only if it beats uniform beyond noise (`tune.paired_gain`). Records the
    choice in ``search``; returns the chosen `PruneConfig` with the dense weights back in
    place."""
    if len(finalists) == 1:
        search["chosen"] = tune.describe(finalists[0][0])
        return finalists[0][0]
    dense = tune.snapshot_weights(structure)
    nll = []
    try:
        for k, (_, targets, _) in enumerate(finalists):
            if k:
                tune.restore_weights(structure, dense)
            _prune_pass(structure, get_inputs(), device, config, targets, False, progress)
            window_nll = perplexity(model, held_out, batch_size=4, progress=False).window_nll
            nll.append(torch.tensor(window_nll, dtype=torch.float64))
    finally:
        tune.restore_weights(structure, dense)
    gain, se, beats = tune.paired_gain(nll[1], nll[0])
    search["confirmed"] = {"gain_over_uniform_nll": gain, "standard_error": se}
    cand = finalists[1 if beats else 0][0]
    search["chosen"] = tune.describe(cand)
    return cand


def _prune_all_windows(
    model, structure, chosen, calibration, device, batch_size, config, keep_masks, progress
):
    """Tune step 5: prune the dense model with the chosen setting exactly as a plain run of
    it on ``calibration`` (all windows, the held-out ones included) would: its own dense
    pass for the allocation's statistics, then the method. Returns (records, masks,
    summaries)."""
    blocks = structure.blocks
    n, seqlen = calibration.shape
    bs = batch_size or auto_batch_size(model, n, seqlen, device, next(blocks.parameters()).dtype)

    def inputs():
        return capture_block_inputs(model, blocks, calibration, device, bs)

    summaries = None
    if chosen.allocation != "uniform":
        summaries = _dense_pass(structure, inputs(), device, chosen, progress)[1]
    targets = _allocate(structure, chosen, summaries)
    records, masks = _prune_pass(structure, inputs(), device, config, targets, keep_masks, progress)
    return records, masks, summaries


def _prune_pass(structure, inputs, device, config, targets, keep_masks, progress):
    blocks = structure.blocks
    src = None if inputs is None else inputs.hidden
    dst = None if inputs is None else torch.empty_like(src)
    records, masks = [], MaskStore()
    for i, block in enumerate(tqdm(blocks, desc=f"{config.method}", disable=not progress)):
        touched: list[str] = []  # layers of this block already modified
        try:
            with _visiting(block, device):
                prefix = f"{structure.path}.{i}."
                for name, keep in _prune_block(block, inputs, src, config, targets, i, touched):
                    records.append(
                        LayerRecord(
                            name=prefix + name,
                            block=i,
                            shape=tuple(keep.shape),
                            target=targets[(i, name)].describe(),
                            target_sparsity=targets[(i, name)].sparsity,
                            achieved_sparsity=mask_sparsity(keep),
                        )
                    )
                    if keep_masks:
                        masks[prefix + name] = keep.cpu()
                if NEEDS[config.method] and i < len(blocks) - 1:
                    forward_block(block, inputs, src, dst)  # the pruned block's outputs
                    src, dst = dst, src
        except Exception as e:
            if i == 0 and not touched:
                raise  # nothing was modified: the original error is the clearest
            raise PruneError(_partial_message(structure, i, bool(touched), e)) from e
    return records, masks


def _prune_block(block, inputs, src, config, targets, i, touched):
    """Statistics forward (when the scorer needs one), then score, select and apply the
    mask of each linear layer; yields (name, keep mask on the device)."""
    scorer, needs = SCORERS[config.method], NEEDS[config.method]
    linears = find_linears(block)
    acc = StatsAccumulator(linears, colsq="colsq" in needs, hessian="hessian" in needs)
    if needs:
        with acc:
            forward_block(block, inputs, src, None, acc)
        acc.check_finite(f"block {i}: ")
    for name, lin in linears.items():
        target = targets[(i, name)]
        if target.sparsity == 0.0:
            new, keep = None, torch.ones_like(lin.weight, dtype=torch.bool)
        else:
            new, keep = scorer(lin.weight, acc, target, name)
        touched.append(name)
        if new is not None:
            lin.weight.copy_(new)
        else:
            lin.weight.masked_fill_(~keep, 0)
        yield name, keep


def _partial_message(structure, i: int, touched: bool, error: Exception) -> str:
    pruned = f"blocks 0-{i - 1} are pruned in place" if i else "no block is fully pruned"
    part = f"; block {i} is partly pruned" if touched else ""
    dense = i + 1 if touched else i
    rest = (
        f"; blocks {dense}-{len(structure.blocks) - 1} are dense"
        if dense < len(structure.blocks)
        else ""
    )
    return (
        f"pruning failed in block {i} ({structure.path}.{i}): {type(error).__name__}: {error}. "
        f"The model is left partly pruned: {pruned}{part}{rest}. Reload it before retrying."
    )


def _check_types(inputs, profile) -> None:
    for name, value, kind in (("inputs", inputs, BlockInputs), ("profile", profile, DenseProfile)):
        if value is not None and not isinstance(value, kind):
            raise TypeError(f"{name} must be a {kind.__name__} or None, got {type(value).__name__}")


def _lap(t: float, device) -> float:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return round(time.perf_counter() - t, 4)
