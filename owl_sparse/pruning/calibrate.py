"""Layer-sequential calibration: capture the first block's inputs, then walk the blocks.

1. `capture_block_inputs` runs the model on the calibration ids with ``use_cache=False``
   until decoder block 0 is called: a forward pre-hook (with kwargs) on block 0 records the
   hidden states and *every* other argument the block receives (rotary ``position_embeddings``,
   attention mask, ``position_ids``, ``cache_position``...) and raises a private exception to
   stop the forward. Only the modules outside the decoder blocks visit the compute device.
2. `forward_block` runs one block over all calibration samples in batches of several
   samples (one forward per batch), optionally writing the outputs, which become the next
   block's inputs; a `StatsAccumulator` around it gathers the statistics.

Buffers are ``[n, seqlen, hidden]`` in the model's dtype on the compute device, sized from
the calibration tensor, never from ``max_position_embeddings``. Only the block being
processed needs to be on the compute device; the others may stay on the CPU.

The captured keyword arguments depend only on the batch shape (calibration windows are
full, unpadded sequences), so one copy per distinct batch size is kept; should two batches
of one size ever get different arguments, both copies are kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..data.windows import check_token_ids
from ..errors import InputError
from .config import PruneError


class _StopForward(Exception):
    """Raised by the capture hook to end the model's forward at block 0."""


@dataclass
class Batch:
    """One calibration batch: samples ``start:stop`` and the block's other arguments."""

    start: int
    stop: int
    args: tuple
    kwargs: dict
    hidden_key: str | None  # None: hidden states are the first positional argument


@dataclass
class BlockInputs:
    """Hidden states entering block 0, ``hidden`` [n, seqlen, dim], plus per-batch arguments."""

    hidden: torch.Tensor
    batches: list[Batch]

    def clone(self) -> BlockInputs:
        return BlockInputs(self.hidden.clone(), self.batches)

    def to(self, device) -> BlockInputs:
        return BlockInputs(
            self.hidden.to(device),
            [
                Batch(b.start, b.stop, _to(b.args, device), _to(b.kwargs, device), b.hidden_key)
                for b in self.batches
            ],
        )


CPU_ACTIVATION_BUDGET = 64 * 2**20  # bytes of live activations per block forward


def auto_batch_size(
    model: nn.Module, n: int, seqlen: int, device: torch.device, dtype: torch.dtype
) -> int:
    """Samples per block forward within a memory budget, balanced so that batches have
    nearly equal sizes.

    On CUDA the budget is 2 GiB or a quarter of the free memory. On a CPU it is 64 MiB:
    there the activations share the resident set with the model, and a bigger batch buys
    no speed (a few hundred token rows already fill the matrix units) but raises the
    process's peak memory above what serving the dense model needs (SmolLM2-135M, Wanda +
    OWL, 32 x 256 tokens: a 1 GiB budget took pruning's peak to 1453 MiB against dense
    serving's 1127; at 64 MiB, batch 4, it stays near 1127 and is as fast as batch 8)."""
    cfg = getattr(model, "config", None)
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", 1024)
    inter = (
        getattr(cfg, "intermediate_size", None)
        or getattr(cfg, "ffn_dim", None)
        or getattr(cfg, "n_inner", None)
        or 4 * hidden
    )
    heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", 16)
    eager = getattr(cfg, "_attn_implementation", "eager") == "eager" or device.type == "cpu"
    elem = max(torch.empty((), dtype=dtype).element_size(), 2)
    # Live activations of one sample: ~10 hidden-sized and ~4 intermediate-sized tensors,
    # plus attention weights when they are materialised (eager / CPU math kernels).
    per_sample = seqlen * (10 * hidden + 4 * inter + (heads * seqlen if eager else 0)) * elem
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = min(2 * 2**30, free // 4)
    else:
        budget = CPU_ACTIVATION_BUDGET
    b = max(1, min(n, budget // max(per_sample, 1)))
    batches = math.ceil(n / b)
    return math.ceil(n / batches)


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module,
    blocks: nn.ModuleList,
    calibration: torch.Tensor,
    device: torch.device,
    batch_size: int,
) -> BlockInputs:
    """Run the model's pre-block modules on ``calibration`` ([n, seqlen] int64) on ``device``
    and return the inputs of ``blocks[0]`` (see the module doc)."""
    n, seqlen = calibration.shape
    home = _outside_device(model, blocks)
    state: dict = {}

    def hook(module, args, kwargs):
        state["args"], state["kwargs"] = args, kwargs
        raise _StopForward

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    hidden, batches, seen = None, [], {}
    try:
        _move_outside(model, blocks, device)
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            try:
                model(input_ids=calibration[start:stop].to(device), use_cache=False)
            except _StopForward:
                pass
            else:
                raise PruneError("the model's forward never called its first decoder block")
            args, kwargs = state.pop("args"), dict(state.pop("kwargs"))
            key = None if args else "hidden_states"
            h = args[0] if args else kwargs.pop("hidden_states")
            if hidden is None:
                hidden = torch.empty((n, seqlen, *h.shape[2:]), dtype=h.dtype, device=device)
            hidden[start:stop] = h
            extra = (tuple(args[1:]), kwargs)
            previous = seen.get(stop - start)
            if previous is not None and _same(previous, extra):
                extra = previous  # share one copy per batch size
            seen[stop - start] = extra
            batches.append(Batch(start, stop, extra[0], extra[1], key))
    finally:
        handle.remove()
        _move_outside(model, blocks, home)
    if not torch.isfinite(hidden.sum(dtype=torch.float32)):  # NaN/Inf survive a sum
        raise InputError("non-finite activations (NaN or Inf) enter the first decoder block")
    return BlockInputs(hidden, batches)


@torch.no_grad()
def forward_block(
    block: nn.Module,
    inputs: BlockInputs,
    src: torch.Tensor,
    dst: torch.Tensor | None,
    stats=None,
) -> None:
    """Run ``block`` over all batches of ``src`` ([n, seqlen, dim]); write outputs to
    ``dst`` when given (may not alias ``src``). ``stats`` (a `StatsAccumulator`) is told
    when each batch begins (with its input) and ends. Outputs are not checked here: a
    NaN/Inf reaching the next block shows in its statistics
    (`StatsAccumulator.check_finite`), which costs nothing extra."""
    for b in inputs.batches:
        h = src[b.start : b.stop]
        if stats is not None:
            stats.begin_batch(h)
        if b.hidden_key is None:
            out = block(h, *b.args, **b.kwargs)
        else:
            out = block(*b.args, **{b.hidden_key: h}, **b.kwargs)
        if isinstance(out, (tuple, list)):
            out = out[0]
        if stats is not None:
            stats.end_batch()
        if dst is not None:
            dst[b.start : b.stop] = out


def check_calibration(model, calibration) -> None:
    """InputError unless ``calibration`` is torch.int64 / torch.int32 token ids
    [n >= 1, 2 <= seqlen <= context] within the vocabulary (`owl_sparse.data.check_token_ids`)."""
    check_token_ids(model, calibration, "calibration", "n")


def _outside_device(model: nn.Module, blocks: nn.ModuleList) -> torch.device:
    inside = {id(p) for p in blocks.parameters()}
    for p in model.parameters():
        if id(p) not in inside:
            return p.device
    return torch.device("cpu")


def _move_outside(model: nn.Module, blocks: nn.ModuleList, device: torch.device) -> None:
    """Move every parameter and buffer that is not inside ``blocks`` to ``device``."""
    for child in model.children():
        if child is blocks:
            continue
        if any(m is blocks for m in child.modules()):
            _move_outside(child, blocks, device)
        else:
            child.to(device)
    for p in model._parameters.values():
        if p is not None:
            p.data = p.data.to(device)
    for key, buf in model._buffers.items():
        if buf is not None:
            model._buffers[key] = buf.to(device)


def _same(a, b) -> bool:
    if torch.is_tensor(a) or torch.is_tensor(b):
        return (
            torch.is_tensor(a)
            and torch.is_tensor(b)
            and a.shape == b.shape
            and a.dtype == b.dtype
            and a.device == b.device
            and torch.equal(a, b)
        )
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if a is None or isinstance(a, (bool, int, float, str)):
        return a == b
    return a is b


def _to(obj, device):
    if torch.is_tensor(obj):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(x, device) for x in obj)
    if isinstance(obj, list):
        return [_to(x, device) for x in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj
