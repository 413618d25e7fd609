"""Helpers of the CUDA kernel tests (kernels/test_cuda_kernels.py, kernels/test_cuda_wgmma.py):
random packed weights on the GPU, NaN poisoning of reused memory, and the check against
fp64 with the tolerances described in test_cuda_kernels.py."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from owl_sparse.formats.bitmap import BitmapWeight
from owl_sparse.formats.sparse24 import Sparse24Weight

DTYPES = [torch.float16, torch.bfloat16]
REL_TOL = {torch.float16: 2e-3, torch.bfloat16: 1.2e-2}


def make_24(n, k, dtype, seed, pattern="random"):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    keep = torch.rand(n, k // 4, 4, generator=g).argsort(-1)[..., :2]
    mask = torch.zeros(n, k // 4, 4, dtype=torch.bool).scatter_(-1, keep, True)
    mask &= torch.rand(n, k // 4, 4, generator=g) > 0.1  # some groups keep 0 or 1
    mask = mask.view(n, k)
    mask[n // 3] = False  # an empty row
    if pattern == "zero":
        mask[:] = False
    return Sparse24Weight.from_dense(w.to(dtype).cuda(), mask.cuda())


def make_bitmap(n, k, dtype, seed, density=0.3, pattern="random"):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    mask = torch.rand(n, k, generator=g) < density
    mask[n // 3] = False  # an empty row
    if n > 16 and k > 128:
        mask[16:32, 128:256] = False  # an all-zero tile
    if pattern == "zero":
        mask[:] = False
    elif pattern == "full":
        mask[:] = True
    return BitmapWeight.from_dense(w.to(dtype).cuda(), mask.cuda())


def poison(numel: int, dtype) -> None:
    """Fill soon-to-be-reused allocator memory with NaN (unwritten outputs then fail)."""
    t = torch.full((numel + 4096,), float("nan"), dtype=dtype, device="cuda")
    del t


def check(y, x, dense, bias):
    assert y.shape == (x.shape[0], dense.shape[0]) and y.dtype == x.dtype
    assert not torch.isnan(y).any(), "NaN in output (unwritten or bad metadata)"
    ref = x.double() @ dense.double().t()
    if bias is not None:
        ref += bias.double()
    torch_y = F.linear(x, dense.to(x.dtype), bias).double()
    err = (y.double() - ref).abs().max().item()
    torch_err = (torch_y - ref).abs().max().item()
    scale = ref.abs().max().item() + 1e-6
    assert err <= 2 * torch_err + 1e-4 * scale, f"max error {err:.3e} vs torch {torch_err:.3e}"
    rel = ((y.double() - ref).norm() / (ref.norm() + 1e-12)).item()
    assert rel < REL_TOL[x.dtype], f"relative error {rel:.3e}"
