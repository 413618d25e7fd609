"""Pieces shared by the Triton kernels: popcount, accumulate / store helpers, config tuning.

Triton runs on the CPU only under ``TRITON_INTERPRET=1``, which must be set before this
module is imported (``triton.jit`` decides at decoration time).  Two interpreter gaps are
bridged by constexpr switches the launchers set: ``HW_POPC`` (inline PTX ``popc`` on the
GPU, a SWAR popcount in the interpreter) and ``DOT_FP32`` (``tl.dot`` on fp32 operands,
because the interpreter's bf16 dot is wrong; also used for fp32 weights on the GPU).
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable

import torch
import triton
import triton.language as tl

from owl_sparse import settings

log = logging.getLogger("owl_sparse.kernels")

# The interpreter has no SM count; a small one makes split-K kick in on tiny test shapes.
INTERPRETER_SM_COUNT = 4


def interpreting() -> bool:
    """True when Triton kernels run in the interpreter (CPU tensors)."""
    return settings.get().triton_interpret


@functools.lru_cache(maxsize=16)
def _sm_count_cuda(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return INTERPRETER_SM_COUNT
    return _sm_count_cuda(device.index if device.index is not None else torch.cuda.current_device())


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def split_k_for(programs: int, k_steps: int, sms: int, min_steps: int = 2) -> int:
    """Split the K loop so that ~4 programs per SM exist, keeping >= min_steps steps each."""
    if programs >= 4 * sms or k_steps < 2 * min_steps:
        return 1
    return max(1, min(math.ceil(4 * sms / programs), k_steps // min_steps, 16))


def dot_fp32(dtype: torch.dtype) -> bool:
    """Whether tl.dot must run on fp32 operands (fp32 weights, or the interpreter)."""
    return dtype == torch.float32 or interpreting()


def check_launch(name: str, x2d: torch.Tensor, packed, bias) -> None:
    """The launcher contract of the dispatch backends; raises ValueError naming the problem."""
    from owl_sparse.errors import InputError

    if x2d.dim() != 2 or x2d.shape[1] != packed.K:
        raise InputError(f"{name}: x must be [T, {packed.K}], got {list(x2d.shape)}")
    if not x2d.is_contiguous():
        raise InputError(f"{name}: x must be contiguous, got strides {x2d.stride()}")
    if x2d.dtype != packed.dtype or x2d.device != packed.device:
        raise InputError(
            f"{name}: x is {x2d.dtype} on {x2d.device}, weight is {packed.dtype} on {packed.device}"
        )
    if bias is not None and (
        bias.shape != (packed.N,) or bias.dtype != packed.dtype or not bias.is_contiguous()
    ):
        raise InputError(
            f"{name}: bias must be a contiguous [{packed.N}] {packed.dtype} tensor, got {list(bias.shape)} {bias.dtype}"
        )
    if x2d.device.type != "cuda" and not interpreting():
        raise InputError(
            f"{name}: Triton needs a CUDA tensor (or TRITON_INTERPRET=1), got {x2d.device}"
        )


def workspace(shape: tuple[int, ...], device) -> torch.Tensor:
    """fp32 split-K workspace; every element is written by the kernel (tests poison it)."""
    return torch.empty(shape, dtype=torch.float32, device=device)


def output(out, t: int, n: int, x2d: torch.Tensor) -> torch.Tensor:
    """The [T, N] result buffer: a new one, or the caller's ``out`` after checking it."""
    from owl_sparse.errors import InputError

    if out is None:
        return torch.empty((t, n), dtype=x2d.dtype, device=x2d.device)
    if (
        out.shape != (t, n)
        or out.dtype != x2d.dtype
        or out.device != x2d.device
        or not out.is_contiguous()
    ):
        raise InputError(
            f"out must be a contiguous [{t}, {n}] {x2d.dtype} tensor on {x2d.device}, got {list(out.shape)} {out.dtype}"
        )
    return out


def split_plan(n_steps: int, split_k: int) -> tuple[int, int]:
    """(steps per split, number of splits) for ``n_steps`` K steps and a SPLIT_K upper bound.

    Rounding the per-split size up can leave trailing splits empty; they are dropped.
    """
    per_split = -(-n_steps // split_k)
    return per_split, -(-n_steps // per_split)


def finish_split(partial: torch.Tensor, bias, out: torch.Tensor) -> torch.Tensor:
    """Sum the fp32 split-K partials [S, T, N] (+ bias) into ``out`` (deterministic order)."""
    res = partial.sum(0)
    if bias is not None:
        res += bias.float()
    return out.copy_(res)


# ---------------------------------------------------------------------------- tuning
class Tuner:
    """Per-shape config choice for one kernel: candidates benchmarked once per key on CUDA.

    The first candidate is the heuristic default; it is used under the interpreter, while
    a CUDA graph is being captured, and when ``OWL_SPARSE_AUTOTUNE=0``.
    """

    def __init__(self, name: str):
        self.name = name
        self.best: dict[tuple, triton.Config] = {}

    def pick(
        self,
        key: tuple,
        make_candidates: Callable[[], list[triton.Config]],
        run: Callable[[triton.Config], object],
    ):
        # The cache is consulted first so that a tuned shape does not rebuild its candidate
        # list on every call (hot path: one call per layer per decode step).  Keys are only
        # stored below, for lists of more than one candidate outside the interpreter.
        if key in self.best:
            return self.best[key]
        candidates = make_candidates()
        if len(candidates) == 1 or interpreting():
            return candidates[0]
        if not settings.get().autotune or torch.cuda.is_current_stream_capturing():
            return candidates[0]
        timings = []
        for cfg in candidates:
            try:
                ms = triton.testing.do_bench(lambda cfg=cfg: run(cfg), warmup=5, rep=20)
            except Exception as exc:  # out of shared memory / registers: skip the config
                log.debug("%s: config %s failed: %s", self.name, cfg, exc)
                ms = float("inf")
            timings.append(ms)
        best = candidates[min(range(len(candidates)), key=timings.__getitem__)]
        log.info("%s %s -> %s (%.4f ms)", self.name, key, best, min(timings))
        self.best[key] = best
        return best


def run_launcher(
    name: str,
    tuner: Tuner,
    make_candidates: Callable[[int], list[triton.Config]],
    launch: Callable,
    x2d: torch.Tensor,
    packed,
    bias,
    config,
    out,
) -> torch.Tensor:
    """The common body of the public launchers: check, allocate, pick a config, launch.

    ``make_candidates(t)`` lists the kernel's configs for ``t`` tokens (heuristic default
    first); ``launch(cfg, x2d, packed, bias, out)`` runs one and returns the [T, N] result.
    """
    check_launch(name, x2d, packed, bias)
    t = x2d.shape[0]
    out = output(out, t, packed.N, x2d)
    if t == 0:
        return out
    if config is None:
        key = (packed.N, packed.K, next_pow2(t), x2d.dtype, x2d.device)
        config = tuner.pick(
            key, lambda: make_candidates(t), lambda c: launch(c, x2d, packed, bias, out)
        )
    return launch(config, x2d, packed, bias, out)


# ---------------------------------------------------------------------------- device code
@triton.jit
def popc32(x, HW_POPC: tl.constexpr):
    """Popcount of int32 words (any shape)."""
    if HW_POPC:
        out = tl.inline_asm_elementwise(
            "popc.b32 $0, $1;", "=r,r", [x], dtype=tl.int32, is_pure=True, pack=1
        )
    else:
        # SWAR; arithmetic shifts are harmless because every mask clears the sign bits.
        y = x - ((x >> 1) & 0x55555555)
        y = (y & 0x33333333) + ((y >> 2) & 0x33333333)
        y = (y + (y >> 4)) & 0x0F0F0F0F
        y = y + (y >> 8)
        y = y + (y >> 16)
        out = y & 0x3F
    return out


@triton.jit
def accumulate(acc, w, xt, USE_DOT: tl.constexpr, DOT_FP32: tl.constexpr):
    """acc += contribution of weight tile w [BN, BK] and activation tile xt [BT, BK].

    USE_DOT: acc is [BN, BT] and the tile goes through tl.dot (tensor cores).
    Otherwise acc is [BN, BT, BK] fp32 and gets one FMA per element; the K reduction is
    deferred to the end of the loop (no per-step cross-thread reduction).
    """
    if USE_DOT:
        if DOT_FP32:
            acc += tl.dot(w.to(tl.float32), tl.trans(xt.to(tl.float32)), input_precision="ieee")
        else:
            acc += tl.dot(w, tl.trans(xt))
    else:
        acc += w.to(tl.float32)[:, None, :] * xt.to(tl.float32)[None, :, :]
    return acc


@triton.jit
def load_x_tile(x_rows, tok_ok, k_idx, K):
    """Activation tile [BT, len(k_idx)]: row pointers x_rows [BT, 1], zeros past T and K."""
    return tl.load(x_rows + k_idx[None, :], mask=tok_ok & (k_idx < K)[None, :], other=0.0)


@triton.jit
def reduce_acc(acc, USE_DOT: tl.constexpr):
    """The [BN, BT] result of :func:`accumulate`'s accumulator (sums the deferred K axis)."""
    if USE_DOT:
        res = acc
    else:
        res = tl.sum(acc, axis=2)
    return res


@triton.jit
def store_output(
    out_ptr, bias_ptr, res, rows, toks, pid_k, T, N, HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr
):
    """Write res [BN, BT] (fp32) to out[t, n] (+bias, cast), or to partial[pid_k, t, n] (fp32)."""
    ok = (rows < N)[:, None] & (toks < T)[None, :]
    offs = toks.to(tl.int64)[None, :] * N + rows[:, None]
    if PARTIAL:
        tl.store(out_ptr + pid_k.to(tl.int64) * T * N + offs, res, mask=ok)
    else:
        if HAS_BIAS:
            res += tl.load(bias_ptr + rows, mask=rows < N, other=0.0).to(tl.float32)[:, None]
        tl.store(out_ptr + offs, res.to(out_ptr.dtype.element_ty), mask=ok)
