"""Perplexity, by the protocol of the Wanda / SparseGPT / OWL papers.

Each window of ``seqlen`` tokens is scored on its own (no context carried across windows);
the window's loss is the mean NLL of its ``seqlen - 1`` next-token predictions, and
perplexity is ``exp(mean over windows of the window loss)`` — the same number the
reference code computes as ``exp(sum(loss * seqlen) / (windows * seqlen))``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..args import is_int
from ..data.windows import check_token_ids
from ..errors import InputError


@dataclass
class PerplexityResult:
    """Perplexity and what it was computed on; ``window_nll`` holds each window's mean
    NLL (float, in window order; left out of `to_dict`)."""

    perplexity: float
    windows: int
    seqlen: int
    tokens: int
    mean_nll: float
    window_nll: list[float] = field(default_factory=list, repr=False)  # not in to_dict

    def to_dict(self) -> dict:
        out = asdict(self)
        del out["window_nll"]
        return out


@torch.no_grad()
def perplexity(
    model,
    windows: torch.Tensor,
    batch_size: int = 1,
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity of a causal LM over evaluation windows.

    Args:
        model: a transformers causal LM (dense or with SparseLinear layers); its device is
            taken from its parameters or buffers.
        windows: int64 (or int32) tensor [W, seqlen] from `owl_sparse.data.eval_windows`,
            every id in [0, vocab_size).
        batch_size: windows per forward pass, >= 1 (the result does not depend on it).
        progress: show a progress bar.

    Returns:
        `PerplexityResult`.

    Raises:
        InputError: windows that are not an int64/int32 tensor [W >= 1, seqlen >= 2], seqlen
            beyond the model's context length, ids outside the vocabulary (a tokenizer that
            does not match the model), or a bad ``batch_size``
            (`owl_sparse.data.windows.check_token_ids`, the same check as for calibration).
        FloatingPointError: NaN or Inf logits.
    """
    losses = [
        _token_nll(logits, batch).mean(dim=1).double().cpu()
        for batch, logits in _batched_logits(model, windows, batch_size, progress, "perplexity")
    ]
    return _result(torch.cat(losses), windows)


def _batched_logits(model, windows, batch_size, progress, desc):
    """Yield (window batch on the model's device, its logits [B, seqlen, V]) after checking
    the windows and batch size; the model is in eval mode meanwhile."""
    check_token_ids(model, windows, "windows", "W")
    if not is_int(batch_size) or batch_size < 1:
        raise InputError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    batch_size = int(batch_size)
    device = _device_of(model)
    was_training = model.training
    model.eval()
    try:
        batches = range(0, windows.shape[0], batch_size)
        for start in tqdm(batches, desc=desc, disable=not progress, leave=False):
            batch = windows[start : start + batch_size].to(device)
            yield batch, model(input_ids=batch, use_cache=False).logits
    finally:
        model.train(was_training)


def _token_nll(logits: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    """float32 [B, seqlen - 1]: NLL of each next-token prediction."""
    return F.cross_entropy(
        logits[:, :-1, :].float().reshape(-1, logits.shape[-1]),
        batch[:, 1:].reshape(-1),
        reduction="none",
    ).view(batch.shape[0], -1)


def _result(per_window: torch.Tensor, windows: torch.Tensor) -> PerplexityResult:
    mean_nll = per_window.mean().item()
    if not math.isfinite(mean_nll):
        raise FloatingPointError("perplexity is not finite: the model produced NaN or Inf logits")
    return PerplexityResult(
        perplexity=math.exp(mean_nll),
        windows=int(windows.shape[0]),
        seqlen=int(windows.shape[1]),
        tokens=int(windows.numel()),
        mean_nll=mean_nll,
        window_nll=per_window.tolist(),
    )


@dataclass
class AgreementResult:
    """How closely a model's next-token distributions follow a reference model's.

    Attributes:
        perplexity: the model's own `PerplexityResult` (the same forward passes).
        kl: mean over predicted tokens of KL(reference || model) in nats, the measure
            quantization tools report against the original model (llama.cpp's
            ``--kl-divergence``); 0 for identical distributions.
        kl_p99: the 99th percentile of the per-token KL (where the model breaks down).
        top1: fraction of predicted tokens whose most likely next token is the same in both.
    """

    perplexity: PerplexityResult
    kl: float
    kl_p99: float
    top1: float

    def to_dict(self) -> dict:
        return {**asdict(self), "perplexity": self.perplexity.to_dict()}


@torch.no_grad()
def agreement(
    model,
    reference,
    windows: torch.Tensor,
    batch_size: int = 1,
    progress: bool = True,
) -> AgreementResult:
    """Perplexity of ``model`` and its agreement with ``reference`` on the same windows.

    Both models see every window once; the model's perplexity, the KL divergence and the
    top-1 agreement all come from those forward passes (log-softmax in float32).

    Args:
        model: the causal LM to judge (e.g. pruned).
        reference: the causal LM to compare against (e.g. the dense original), same
            vocabulary; it may live on another device.
        windows, batch_size, progress: as for `perplexity`.

    Returns:
        `AgreementResult`.

    Raises:
        InputError: as for `perplexity` (checked for both models), or models whose logits
            differ in vocabulary size.
        FloatingPointError: NaN or Inf logits from either model.
    """
    check_token_ids(reference, windows, "windows", "W")
    ref_device = _device_of(reference)
    losses, kls = [], []
    agree = 0
    for batch, logits in _batched_logits(model, windows, batch_size, progress, "agreement"):
        was_training = reference.training
        reference.eval()
        try:
            ref = reference(input_ids=batch.to(ref_device), use_cache=False).logits
        finally:
            reference.train(was_training)
        if ref.shape[-1] != logits.shape[-1]:
            raise InputError(
                f"the reference's vocabulary ({ref.shape[-1]}) differs from the model's "
                f"({logits.shape[-1]})"
            )
        ref = ref[:, :-1].to(logits.device).float()
        own = logits[:, :-1].float()
        if not (torch.isfinite(ref).all() and torch.isfinite(own).all()):
            raise FloatingPointError("agreement: NaN or Inf logits")
        losses.append(_token_nll(logits, batch).mean(dim=1).double().cpu())
        ref_logp = torch.log_softmax(ref, dim=-1)
        own_logp = torch.log_softmax(own, dim=-1)
        kls.append((ref_logp.exp() * (ref_logp - own_logp)).sum(-1).clamp_min(0).flatten().cpu())
        agree += (ref.argmax(-1) == own.argmax(-1)).sum().item()
    kl = torch.cat(kls).double()
    return AgreementResult(
        perplexity=_result(torch.cat(losses), windows),
        kl=kl.mean().item(),
        kl_p99=torch.quantile(kl, 0.99).item(),
        top1=agree / kl.numel(),
    )


def _device_of(model) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")
