"""Token streams, calibration batches and evaluation windows.

Evaluation follows the protocol of the Wanda / SparseGPT / OWL papers: the text is tokenized
once, cut into non-overlapping windows of ``seqlen`` tokens (the tail is dropped), and
perplexity is exp(mean over windows of the mean next-token NLL in the window).
Calibration draws ``n`` random windows of ``seqlen`` tokens (seeded) from a token stream.
"""

from __future__ import annotations

import torch

from ..args import is_int
from ..errors import InputError
from ..models.structure import cache_kwarg, max_context
from ..nn.memory import return_freed_memory

TOKEN_ID_DTYPES = (torch.int64, torch.int32)  # what nn.Embedding accepts as indices


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """Tokenize the whole text once, as the perplexity protocol does.

    Returns a 1-D int64 tensor. Special tokens are added as the tokenizer does by default
    (for LLaMA-style tokenizers: one BOS at the start of the stream).
    """
    if tokenizer is None or not callable(tokenizer):
        raise InputError(
            "the model has no tokenizer (its directory holds no tokenizer files): save one "
            "beside the weights"
            if tokenizer is None
            else f"tokenizer {type(tokenizer).__name__} is not callable"
        )
    enc = tokenizer(text, return_tensors="pt")
    ids = enc["input_ids"] if isinstance(enc, dict) or hasattr(enc, "keys") else enc
    ids = torch.as_tensor(ids).reshape(-1).to(torch.int64)
    del enc
    # A fast tokenizer's buffers for a long text (~150 MiB for WikiText-2 valid's 1.1 MB)
    # are freed by now; hand them back instead of leaving them under whatever runs next.
    return_freed_memory()
    if ids.numel() == 0:
        raise InputError("the text tokenized to zero tokens")
    return ids


def eval_windows(ids: torch.Tensor, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """Cut a token stream into non-overlapping windows.

    Args:
        ids: 1-D int64 token stream.
        seqlen: tokens per window (>= 2).
        max_windows: keep only the first this many windows.

    Returns:
        int64 tensor [W, seqlen] with W = min(len(ids) // seqlen, max_windows).
    """
    _check_seqlen(seqlen)
    ids = _check_stream(ids)
    count = ids.numel() // seqlen
    if count == 0:
        raise InputError(
            f"the text has {ids.numel()} tokens, shorter than one window of {seqlen} tokens"
        )
    if max_windows is not None:
        if not is_int(max_windows) or max_windows < 1:
            raise InputError(f"max_windows must be an integer >= 1, got {max_windows!r}")
        count = min(count, max_windows)
    return ids[: count * seqlen].reshape(count, seqlen).clone()


def calibration_batches(ids: torch.Tensor, n: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """Draw ``n`` random windows of ``seqlen`` tokens from a token stream (seeded).

    Windows may overlap each other (as in the reference code, which samples random
    positions); the same seed gives the same windows on every machine.

    Returns:
        int64 tensor [n, seqlen].
    """
    _check_seqlen(seqlen)
    if not is_int(n) or n < 1:
        raise InputError(f"the number of calibration samples must be an integer >= 1, got {n!r}")
    ids = _check_stream(ids)
    if ids.numel() <= seqlen:
        raise InputError(
            f"calibration text has {ids.numel()} tokens, too short for windows of {seqlen}"
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (n,), generator=gen)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])


def check_token_ids(model, ids, name: str = "calibration", rows: str = "n") -> None:
    """Check token ids about to enter ``model``: the one check shared by calibration
    (`owl_sparse.pruning.prune`) and evaluation windows (`owl_sparse.evaluate.perplexity`).

    Args:
        model: the causal LM (its config gives the context length and ``vocab_size``).
        ids: should be a torch.int64 or torch.int32 tensor [rows >= 1, 2 <= seqlen <= context]
            with every id in [0, vocab_size).
        name: what the ids are, for the messages (``"calibration"``, ``"windows"``).
        rows: the name of the first dimension in the messages (``"n"``, ``"W"``).

    Raises:
        InputError: naming ``name``, the type / dtype / shape found and the bound broken.
    """
    if not torch.is_tensor(ids):
        raise InputError(
            f"{name} must be an integer tensor [{rows}, seqlen] of token ids, "
            f"got {type(ids).__name__}"
        )
    # dtype first: a bool / uint8 / int16 tensor would wrap or fail inside the embedding
    if ids.dtype not in TOKEN_ID_DTYPES:
        raise InputError(
            f"{name} must be an integer tensor [{rows}, seqlen] of torch.int64 or torch.int32 "
            f"token ids, got dtype {ids.dtype} (shape {tuple(ids.shape)})"
        )
    if ids.ndim != 2:
        raise InputError(
            f"{name} must be an integer tensor [{rows}, seqlen], got shape {tuple(ids.shape)}"
        )
    count, seqlen = ids.shape
    if count < 1 or seqlen < 2:
        raise InputError(
            f"{name} too short: shape {tuple(ids.shape)}, need a [{rows}, seqlen>=2] tensor "
            f"with {rows} >= 1"
        )
    limit = max_context(model)
    if limit is not None and seqlen > limit:
        raise InputError(f"{name} seqlen {seqlen} exceeds the model's context length {limit}")
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    lo, hi = int(ids.min()), int(ids.max())
    if vocab and (lo < 0 or hi >= vocab):
        raise InputError(
            f"{name} token ids must lie in [0, {vocab}), got [{lo}, {hi}] "
            "(does the tokenizer match the model?)"
        )


@torch.no_grad()
def sample_from_model(model, tokenizer, n: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """Calibration data that needs no text: sequences sampled from the model itself.

    Starts from the BOS token (or token 0) and samples with temperature 1 (top-k 50) —
    the data-free calibration idea used when no corpus is at hand.

    Args:
        n: sequences to sample (an integer >= 1).
        seqlen: tokens per sequence, BOS included (2 <= seqlen <= the model's context).

    Returns:
        int64 tensor [n, seqlen] on the CPU.

    Raises:
        InputError: bad ``n`` or ``seqlen``, checked before anything is sampled.
    """
    _check_seqlen(seqlen)
    if not is_int(n) or n < 1:
        raise InputError(f"the number of samples must be an integer >= 1, got {n!r}")
    n = int(n)
    limit = max_context(model)
    if limit is not None and seqlen > limit:
        raise InputError(f"calibration seqlen {seqlen} exceeds the model's context length {limit}")
    device = next(model.parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    bos = getattr(tokenizer, "bos_token_id", None)
    start = torch.full((n, 1), 0 if bos is None else bos, dtype=torch.int64)
    ids = start
    past = None
    step_input = start
    cache_name = cache_kwarg(model)
    for _ in range(seqlen - 1):
        out = model(input_ids=step_input.to(device), use_cache=True, **{cache_name: past})
        past = out.past_key_values
        logits = out.logits[:, -1, :].float().cpu()
        top = torch.topk(logits, k=min(50, logits.shape[-1]), dim=-1)
        probs = torch.softmax(top.values, dim=-1)
        choice = torch.multinomial(probs, 1, generator=gen)
        step_input = top.indices.gather(-1, choice)
        ids = torch.cat([ids, step_input], dim=1)
    return ids


def _check_seqlen(seqlen: int) -> None:
    if not is_int(seqlen) or seqlen < 2:
        raise InputError(f"seqlen must be an integer >= 2, got {seqlen!r}")


def _check_stream(ids) -> torch.Tensor:
    """A token stream (any shape, flattened) of integer ids; returns it 1-D."""
    if not torch.is_tensor(ids) or ids.dtype not in TOKEN_ID_DTYPES:
        kind = ids.dtype if torch.is_tensor(ids) else type(ids).__name__
        raise InputError(f"token ids must be a torch.int64 or torch.int32 tensor, got {kind}")
    return ids.reshape(-1)
