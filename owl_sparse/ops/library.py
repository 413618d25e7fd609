"""The sparse linear ops, as torch.library custom ops (torch.compile and CUDA-graph friendly).

``owl_sparse::bitmap_linear(x, bitmap, values, tile_offsets, bias, out_features, in_features)``
    ``y = x @ W^T + bias`` with ``W`` [N, K] packed as a :class:`BitmapWeight`.
``owl_sparse::bitmap_linear_group(x, bitmaps, values, tile_offsets, out_features, in_features)``
    several bitmap weights that read the same ``x``, their outputs side by side (no bias).
``owl_sparse::sparse24_linear(x, values, meta, bias)``
    the same with ``W`` packed as a :class:`Sparse24Weight` (K = 2 * values.shape[1]).
``owl_sparse::dense_linear(x, weight, bias)``
    the same with a dense ``W`` [N, K] (an ``nn.Linear`` weight): ``F.linear``, except on the
    CPU, where decode-sized calls stream the weight row after row, once for all tokens (the
    same instruction sets as the packed kernels), and the CPU dispatch table sends token
    counts where torch's GEMM is faster (and all beyond 16) to it.

Arguments: ``x`` ``[..., K]`` in the values' dtype (fp16 / bf16 / fp32); the packed tensors
exactly as the format modules document them; ``bias`` ``[N]`` in the same dtype or None.
Result: ``[..., N]`` in ``x``'s dtype.

Implementations
- fake (meta): shape and dtype checks with ``torch._check``, for torch.compile;
- CPU: the compiled kernels of csrc/cpu (:mod:`owl_sparse.ops.cpu`), registered for the CPU
  dispatch key when they load; they read the packed bytes and keep no dense copy;
- default (any device without a kernel, and the CPU until its kernels load): the reference,
  ``x @ to_dense()^T`` computed in fp32 and cast back, unpacking on every call (it keeps no
  dense copy either);
- CUDA: :func:`owl_sparse.ops.dispatch.run` picks a backend (Triton, CUDA extension, dense);
  ``dense_linear`` is ``F.linear`` there.
- autograd: gradients flow to ``x`` and ``bias`` (and a dense ``weight``); a packed weight
  is frozen.

:func:`linear` is the convenience entry that takes a packed format object.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import InputError
from ..formats.bitmap import TILE_K, TILE_N, BitmapWeight, padded_shape
from ..formats.sparse24 import Sparse24Weight
from . import cpu, dispatch


def _check_activation(x: Tensor, packed, bias: Tensor | None) -> None:
    """Eager checks of x and bias against a packed weight; raises InputError."""
    if not isinstance(x, Tensor):
        raise InputError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1 or x.shape[-1] != packed.K:
        raise InputError(
            f"x has shape {list(x.shape)} but the {packed.fmt} weight is [{packed.N}, {packed.K}]: "
            f"the last dim must be {packed.K}"
        )
    if x.dtype != packed.dtype:
        raise InputError(f"x dtype {x.dtype} does not match the packed weight dtype {packed.dtype}")
    if x.device != packed.device:
        raise InputError(f"x is on {x.device} but the packed weight is on {packed.device}")
    if bias is not None:
        if bias.shape != (packed.N,) or bias.dtype != packed.dtype or bias.device != packed.device:
            raise InputError(
                f"bias must be [{packed.N}] {packed.dtype} on {packed.device}, got "
                f"{list(bias.shape)} {bias.dtype} on {bias.device}"
            )


def _reference(x: Tensor, dense: Tensor, bias: Tensor | None) -> Tensor:
    """fp32 accumulation reference: (x @ W^T + b) computed in fp32, cast to x.dtype."""
    y = torch.matmul(x.float(), dense.float().t())
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def _compiled_cpu_kernel(op: str, x: Tensor) -> bool:
    """True when the CPU kernels serve ``op`` now: they are loaded on the first CPU call (a
    JIT build where no prebuilt library exists), after which calls go straight to them."""
    return (
        x.device.type == "cpu"
        and cpu.load()
        and torch._C._dispatch_has_kernel_for_dispatch_key(f"owl_sparse::{op}", "CPU")
    )


def _run_cuda(packed, x: Tensor, bias: Tensor | None) -> Tensor:
    _check_activation(x, packed, bias)
    x2d = x.reshape(-1, packed.K)
    if not x2d.is_contiguous():
        x2d = x2d.contiguous()
    if x2d.shape[0] == 0:
        return x.new_empty((*x.shape[:-1], packed.N))
    y2d = dispatch.run(packed.fmt, x2d, packed, bias)
    return y2d.view(*x.shape[:-1], packed.N)


def _fake_output(op: str, x: Tensor, bias: Tensor | None, n: int) -> Tensor:
    """The fake kernels' bias checks (torch._check) and their [..., N] result."""
    if bias is not None:
        torch._check(bias.dim() == 1 and bias.shape[0] == n, lambda: f"{op}: bias must be [{n}]")
        torch._check(bias.dtype == x.dtype, lambda: f"{op}: bias dtype must match x")
    return x.new_empty((*x.shape[:-1], n))


# ---------------------------------------------------------------------------- bitmap
@torch.library.custom_op("owl_sparse::bitmap_linear", mutates_args=())
def bitmap_linear(
    x: Tensor,
    bitmap: Tensor,
    values: Tensor,
    tile_offsets: Tensor,
    bias: Tensor | None,
    out_features: int,
    in_features: int,
) -> Tensor:
    """y [..., N] = x [..., K] @ W^T + bias, W packed in the bitmap format (reference impl)."""
    packed = BitmapWeight(bitmap, values, tile_offsets, out_features, in_features)
    _check_activation(x, packed, bias)
    if _compiled_cpu_kernel("bitmap_linear", x):
        return torch.ops.owl_sparse.bitmap_linear(
            x, bitmap, values, tile_offsets, bias, out_features, in_features
        )
    return _reference(x, packed.to_dense(), bias)


@bitmap_linear.register_kernel("cuda")
def _bitmap_linear_cuda(x, bitmap, values, tile_offsets, bias, out_features, in_features):
    packed = BitmapWeight(bitmap, values, tile_offsets, out_features, in_features)
    return _run_cuda(packed, x, bias)


@bitmap_linear.register_fake
def _bitmap_linear_fake(x, bitmap, values, tile_offsets, bias, out_features, in_features):
    n, k = out_features, in_features
    np_, kp = padded_shape(n, k)
    torch._check(n >= 1 and k >= 1, lambda: f"bitmap_linear: bad shape N={n}, K={k}")
    torch._check(x.shape[-1] == k, lambda: f"bitmap_linear: x {list(x.shape)} needs last dim {k}")
    torch._check(
        x.dtype == values.dtype, lambda: f"bitmap_linear: x {x.dtype} vs values {values.dtype}"
    )
    torch._check(
        bitmap.dtype == torch.int32,
        lambda: f"bitmap_linear: bitmap must be int32, got {bitmap.dtype}",
    )
    torch._check(
        bitmap.dim() == 2, lambda: f"bitmap_linear: bitmap must be 2-D, got {list(bitmap.shape)}"
    )
    torch._check(bitmap.shape[0] == np_, lambda: f"bitmap_linear: bitmap rows must be {np_}")
    torch._check(
        bitmap.shape[1] == kp // 32, lambda: f"bitmap_linear: bitmap words/row must be {kp // 32}"
    )
    torch._check(values.dim() == 1, lambda: "bitmap_linear: values must be 1-D")
    n_tiles = (np_ // TILE_N) * (kp // TILE_K)
    torch._check(
        tile_offsets.dtype == torch.int32, lambda: "bitmap_linear: tile_offsets must be int32"
    )
    torch._check(
        tile_offsets.dim() == 1 and tile_offsets.shape[0] == n_tiles + 1,
        lambda: f"bitmap_linear: tile_offsets must be [{n_tiles + 1}]",
    )
    return _fake_output("bitmap_linear", x, bias, n)


@torch.library.custom_op("owl_sparse::bitmap_linear_group", mutates_args=())
def bitmap_linear_group(
    x: Tensor,
    bitmaps: list[Tensor],
    values: list[Tensor],
    tile_offsets: list[Tensor],
    out_features: list[int],
    in_features: int,
) -> Tensor:
    """y [..., sum(out_features)] = the bitmap weights W_i [out_features[i], in_features] that
    read the same x, each one's x @ W_i^T in its columns after the ones before (no bias).

    Equal, bit for bit, to concatenating `bitmap_linear` of each weight; on the CPU one call
    converts x once and runs every weight's rows in one parallel region (the decode step's
    graph pass, :mod:`owl_sparse.serve.fusion`, puts a layer's q/k/v and its gate/up here).
    """
    _check_group(bitmaps, values, tile_offsets, out_features)
    outs = [
        bitmap_linear(x, b, v, t, None, n, in_features)
        for b, v, t, n in zip(bitmaps, values, tile_offsets, out_features)
    ]
    return torch.cat(outs, dim=-1)


def _check_group(bitmaps, values, tile_offsets, out_features) -> None:
    counts = (len(bitmaps), len(values), len(tile_offsets), len(out_features))
    if counts[0] < 1 or len(set(counts)) != 1:
        raise InputError(
            "bitmap_linear_group: bitmaps, values, tile_offsets and out_features need one "
            f"entry per weight (at least one), got {list(counts)}"
        )


@bitmap_linear_group.register_fake
def _bitmap_linear_group_fake(x, bitmaps, values, tile_offsets, out_features, in_features):
    _check_group(bitmaps, values, tile_offsets, out_features)  # list lengths: plain ints
    for b, v, t, n in zip(bitmaps, values, tile_offsets, out_features):
        _bitmap_linear_fake(x, b, v, t, None, n, in_features)
    return x.new_empty((*x.shape[:-1], sum(out_features)))


# ---------------------------------------------------------------------------- 2:4
@torch.library.custom_op("owl_sparse::sparse24_linear", mutates_args=())
def sparse24_linear(x: Tensor, values: Tensor, meta: Tensor, bias: Tensor | None) -> Tensor:
    """y [..., N] = x [..., K] @ W^T + bias, W packed in the 2:4 format (reference impl)."""
    packed = Sparse24Weight(values, meta)
    _check_activation(x, packed, bias)
    if _compiled_cpu_kernel("sparse24_linear", x):
        return torch.ops.owl_sparse.sparse24_linear(x, values, meta, bias)
    return _reference(x, packed.to_dense(), bias)


@sparse24_linear.register_kernel("cuda")
def _sparse24_linear_cuda(x, values, meta, bias):
    return _run_cuda(Sparse24Weight(values, meta), x, bias)


@sparse24_linear.register_fake
def _sparse24_linear_fake(x, values, meta, bias):
    torch._check(
        values.dim() == 2, lambda: f"sparse24_linear: values must be 2-D, got {list(values.shape)}"
    )
    n, k = values.shape[0], 2 * values.shape[1]
    torch._check(x.shape[-1] == k, lambda: f"sparse24_linear: x {list(x.shape)} needs last dim {k}")
    torch._check(
        x.dtype == values.dtype, lambda: f"sparse24_linear: x {x.dtype} vs values {values.dtype}"
    )
    torch._check(
        meta.dtype == torch.uint8, lambda: f"sparse24_linear: meta must be uint8, got {meta.dtype}"
    )
    torch._check(
        meta.dim() == 2 and meta.shape[0] == n and meta.shape[1] == (k + 7) // 8,
        lambda: f"sparse24_linear: meta must be [{n}, {(k + 7) // 8}], got {list(meta.shape)}",
    )
    return _fake_output("sparse24_linear", x, bias, n)


# ---------------------------------------------------------------------------- dense
@torch.library.custom_op("owl_sparse::dense_linear", mutates_args=())
def dense_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """y [..., N] = x [..., K] @ weight^T + bias, weight [N, K] dense (any device: F.linear)."""
    if _compiled_cpu_kernel("dense_linear", x) and weight.device.type == "cpu":
        return torch.ops.owl_sparse.dense_linear(x, weight, bias)
    return torch.nn.functional.linear(x, weight, bias)


@dense_linear.register_fake
def _dense_linear_fake(x, weight, bias):
    torch._check(weight.dim() == 2, lambda: f"dense_linear: weight must be 2-D, got {weight.dim()}")
    n, k = weight.shape
    torch._check(x.shape[-1] == k, lambda: f"dense_linear: x {list(x.shape)} needs last dim {k}")
    torch._check(x.dtype == weight.dtype, lambda: f"dense_linear: x {x.dtype} vs {weight.dtype}")
    return _fake_output("dense_linear", x, bias, n)


# ---------------------------------------------------------------------------- autograd
def _grad_input(grad: Tensor, dense: Tensor) -> Tensor:
    return torch.matmul(grad.float(), dense.float()).to(grad.dtype)


def _grad_bias(grad: Tensor, bias_needs_grad: bool) -> Tensor | None:
    return grad.reshape(-1, grad.shape[-1]).sum(0) if bias_needs_grad else None


def _setup_bitmap(ctx, inputs, output):
    x, bitmap, values, tile_offsets, bias, n, k = inputs
    ctx.save_for_backward(bitmap, values, tile_offsets)
    ctx.nk = (n, k)
    ctx.bias_grad = bias is not None and bias.requires_grad


def _backward_bitmap(ctx, grad):
    bitmap, values, tile_offsets = ctx.saved_tensors
    dense = BitmapWeight(bitmap, values, tile_offsets, *ctx.nk).to_dense()
    return _grad_input(grad, dense), None, None, None, _grad_bias(grad, ctx.bias_grad), None, None


def _setup_24(ctx, inputs, output):
    x, values, meta, bias = inputs
    ctx.save_for_backward(values, meta)
    ctx.bias_grad = bias is not None and bias.requires_grad


def _backward_24(ctx, grad):
    values, meta = ctx.saved_tensors
    dense = Sparse24Weight(values, meta).to_dense()
    return _grad_input(grad, dense), None, None, _grad_bias(grad, ctx.bias_grad)


def _setup_dense(ctx, inputs, output):
    x, weight, bias = inputs
    ctx.save_for_backward(x if weight.requires_grad else None, weight)
    ctx.bias_grad = bias is not None and bias.requires_grad


def _backward_dense(ctx, grad):
    x, weight = ctx.saved_tensors
    grad_w = None
    if x is not None:
        g2, x2 = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1])
        grad_w = torch.matmul(g2.float().t(), x2.float()).to(weight.dtype)
    return _grad_input(grad, weight), grad_w, _grad_bias(grad, ctx.bias_grad)


def _setup_group(ctx, inputs, output):
    x, bitmaps, values, tile_offsets, ns, k = inputs
    ctx.save_for_backward(*bitmaps, *values, *tile_offsets)
    ctx.shapes = (list(ns), k)


def _backward_group(ctx, grad):
    (ns, k), m = ctx.shapes, len(ctx.shapes[0])
    saved = ctx.saved_tensors
    dense = torch.cat(
        [
            BitmapWeight(saved[i], saved[m + i], saved[2 * m + i], ns[i], k).to_dense()
            for i in range(m)
        ]
    )
    none = [None] * m
    return _grad_input(grad, dense), none, none, none, None, None


bitmap_linear.register_autograd(_backward_bitmap, setup_context=_setup_bitmap)
bitmap_linear_group.register_autograd(_backward_group, setup_context=_setup_group)
dense_linear.register_autograd(_backward_dense, setup_context=_setup_dense)
sparse24_linear.register_autograd(_backward_24, setup_context=_setup_24)


# ---------------------------------------------------------------------------- entry
def linear(x: Tensor, packed: BitmapWeight | Sparse24Weight, bias: Tensor | None = None) -> Tensor:
    """``x [..., K] @ W^T + bias`` for a packed weight ``W`` [N, K]; calls the matching op."""
    if isinstance(packed, (BitmapWeight, Sparse24Weight)):
        # Before the op: the compiled kernels' own checks raise a plain ValueError.
        _check_activation(x, packed, bias)
    if isinstance(packed, BitmapWeight):
        return torch.ops.owl_sparse.bitmap_linear(
            x, packed.bitmap, packed.values, packed.tile_offsets, bias, packed.N, packed.K
        )
    if isinstance(packed, Sparse24Weight):
        return torch.ops.owl_sparse.sparse24_linear(x, packed.values, packed.meta, bias)
    raise InputError(
        f"linear: expected BitmapWeight or Sparse24Weight, got {type(packed).__name__}"
    )


# A prebuilt CPU library registers its kernels now (cheap); a JIT build waits for a call.
cpu.load(jit=False)
