"""Perplexity, by the protocol of the Wanda / SparseGPT / OWL papers.

Each window of ``seqlen`` tokens is scored on its own (no context carried across windows);
the window's loss is the mean NLL of its ``seqlen - 1`` next-token predictions, and
perplexity is ``exp(mean over windows of the window loss)`` — the same number the
reference code computes as ``exp(sum(loss * seqlen) / (windows * seqlen))``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..args import is_int
from ..data.windows import check_token_ids
from ..errors import InputError


@dataclass
class PerplexityResult:
    """Perplexity and what it was computed on."""

    perplexity: float
    windows: int
    seqlen: int
    tokens: int
    mean_nll: float

    def to_dict(self) -> dict:
        return asdict(self)


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
    """
    check_token_ids(model, windows, "windows", "W")
    if not is_int(batch_size) or batch_size < 1:
        raise InputError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    batch_size = int(batch_size)
    seqlen = windows.shape[1]
    device = _device_of(model)
    was_training = model.training
    model.eval()
    losses = []
    batches = range(0, windows.shape[0], batch_size)
    for start in tqdm(batches, desc="perplexity", disable=not progress, leave=False):
        batch = windows[start : start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits
        loss = F.cross_entropy(
            logits[:, :-1, :].float().reshape(-1, logits.shape[-1]),
            batch[:, 1:].reshape(-1),
            reduction="none",
        ).view(batch.shape[0], -1)
        losses.append(loss.mean(dim=1).double().cpu())
    model.train(was_training)
    per_window = torch.cat(losses)
    mean_nll = per_window.mean().item()
    if not math.isfinite(mean_nll):
        raise FloatingPointError("perplexity is not finite: the model produced NaN or Inf logits")
    return PerplexityResult(
        perplexity=math.exp(mean_nll),
        windows=int(windows.shape[0]),
        seqlen=int(seqlen),
        tokens=int(windows.numel()),
        mean_nll=mean_nll,
    )


def _device_of(model) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")
