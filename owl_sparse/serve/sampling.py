"""Choosing the next token (greedy, or sampled with temperature, top-k, top-p) and the
checks of the generation settings and prompts, all made before any model work."""

from __future__ import annotations

import math
import operator

import torch

from ..args import as_int, as_real
from ..errors import InputError


def sample_next(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
):
    """Pick the next token of each row.

    Args:
        logits: ``[B, V]`` any float dtype.
        temperature: 0 = greedy (argmax); > 0 (finite) divides the logits before sampling.
        top_k: keep the k most likely tokens (sampling only).
        top_p: keep the smallest set of tokens whose probability reaches p (sampling only).
        generator: a generator on the logits' device (seeded sampling).

    Returns:
        int64 ``[B]``.  Bad settings (a nan temperature, top_k 2.5, ...) raise InputError.
        Sampling uses the exponential-race trick (argmax of p / E with
        E ~ Exp(1)), which draws from p without a host synchronisation.
    """
    temperature, top_k, top_p = sampling_settings(temperature, top_k, top_p)
    if temperature == 0.0:
        return greedy(logits)
    scores = logits.float() / temperature
    if top_k is not None and top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        ordered, order = torch.sort(scores, dim=-1, descending=True)
        probs = torch.softmax(ordered, dim=-1)
        # drop a token when the tokens before it already reach top_p (the first stays)
        drop = (probs.cumsum(dim=-1) - probs) >= top_p
        ordered = ordered.masked_fill(drop, float("-inf"))
        scores = torch.full_like(scores, float("-inf")).scatter(-1, order, ordered)
    probs = torch.softmax(scores, dim=-1)
    race = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return (probs / race).argmax(dim=-1)


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """``logits.argmax(dim=-1)`` (int64 ``[B]`` of ``[B, V]``; the first of equal maxima,
    NaN counting as the largest), computed on the CPU from an fp32 copy, one row at a time:
    torch's CPU argmax over a 49152-entry bf16 row took ~175 us there, over fp32 ~57 us along
    a dim and ~32 us over a flat row (SmolLM2-135M decodes a token in ~7 ms).  The fp32 copy
    is exact, so the result is the same."""
    if logits.device.type != "cpu" or logits.dim() != 2:
        return logits.argmax(dim=-1)
    rows = logits.float() if logits.dtype in (torch.bfloat16, torch.float16) else logits
    if rows.shape[0] == 1:
        return rows.reshape(-1).argmax().reshape(1)
    return rows.argmax(dim=-1)


def check_penalty(repetition_penalty) -> float:
    """``repetition_penalty`` as a Python float: finite and > 0 (1.0 = off); raises
    InputError."""
    rule = "a finite number > 0 (1 = off)"
    penalty = as_real("repetition_penalty", repetition_penalty, rule)
    if not math.isfinite(penalty) or penalty <= 0:
        raise InputError(f"repetition_penalty must be {rule}, got {penalty}")
    return penalty


def seen_tokens(ids: torch.Tensor, lengths: torch.Tensor, vocab: int) -> torch.Tensor:
    """bool ``[B, vocab]``: True where a token occurs in a row's prompt.  ``ids`` int64
    ``[B, W]`` left-padded (row ``b``'s prompt is its last ``lengths[b]`` entries; the
    padding in front is not counted)."""
    b, width = ids.shape
    seen = torch.zeros((b, vocab), dtype=torch.bool, device=ids.device)
    real = torch.arange(width, device=ids.device) >= (width - lengths.to(ids.device)).view(b, 1)
    rows = torch.arange(b, device=ids.device).view(b, 1).expand(b, width)
    seen[rows[real], ids[real]] = True
    return seen


def penalize(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """transformers' repetition penalty (CTRL, Keskar et al. 2019): the logit of every token
    already seen in the row (``seen`` bool ``[B, V]``) is divided by ``penalty`` where
    positive and multiplied where negative, in fp32.  ``logits`` ``[B, V]`` any float
    dtype; returns fp32 ``[B, V]`` (the logits themselves are not changed)."""
    scores = logits.float()
    hit = torch.where(scores < 0, scores * penalty, scores / penalty)
    return torch.where(seen, hit, scores)


def sampling_settings(temperature, top_k, top_p) -> tuple[float, int | None, float | None]:
    """Checked (temperature, top_k, top_p) as Python numbers; raises InputError."""
    rule = "a finite number >= 0 (0 = greedy)"
    temperature = as_real("temperature", temperature, rule)
    if not math.isfinite(temperature) or temperature < 0:
        raise InputError(f"temperature must be {rule}, got {temperature}")
    if top_k is not None:
        top_k = as_int("top_k", top_k, minimum=1)
    if top_p is not None:
        rule = "a number in (0, 1]"
        top_p = as_real("top_p", top_p, rule)
        if not 0.0 < top_p <= 1.0:  # also refuses nan
            raise InputError(f"top_p must be {rule}, got {top_p}")
    return temperature, top_k, top_p


def check_sampling(max_new_tokens, temperature, top_k, top_p, batch_size, seed) -> tuple:
    """The generation settings, checked and as Python numbers, in argument order."""
    max_new_tokens = as_int("max_new_tokens", max_new_tokens, minimum=1)
    temperature, top_k, top_p = sampling_settings(temperature, top_k, top_p)
    if batch_size is not None:
        batch_size = as_int("batch_size", batch_size, minimum=1)
    return max_new_tokens, temperature, top_k, top_p, batch_size, as_int("seed", seed)


def check_ids(seqs, vocab: int) -> list[list[int]]:
    """``seqs`` as lists of Python ints in ``[0, vocab)``; raises InputError naming the
    prompt (and position) of the first bad one.  Float ids are refused, never truncated."""
    if isinstance(seqs, str | bytes) or not hasattr(seqs, "__iter__"):
        raise InputError(f"seqs must be a list of token id lists, got {type(seqs).__name__}")
    out = []
    for i, s in enumerate(seqs):
        if isinstance(s, torch.Tensor):
            if s.dim() != 1 or s.is_floating_point() or s.is_complex() or s.dtype == torch.bool:
                raise InputError(
                    f"prompt {i}: token id must be an integer, got a {s.dtype} tensor of "
                    f"shape {list(s.shape)}"
                )
            s = s.tolist()
        if isinstance(s, str | bytes) or not hasattr(s, "__iter__"):
            raise InputError(f"prompt {i} must be a list of token ids, got {type(s).__name__}")
        ids = []
        for j, t in enumerate(s):
            try:
                if isinstance(t, bool):  # True is not token 1
                    raise TypeError
                ids.append(operator.index(t))
            except TypeError:
                raise InputError(
                    f"prompt {i}, position {j}: token id must be an integer, got {t!r}"
                ) from None
        if not ids:
            raise InputError(f"prompt {i} tokenized to zero tokens")
        if min(ids) < 0 or max(ids) >= vocab:
            raise InputError(f"prompt {i} has token ids outside [0, {vocab})")
        out.append(ids)
    if not out:
        raise InputError("no prompts given")
    return out
