"""Dense ``nn.Linear`` layers through owl-sparse's own CPU kernel while serving.

At decode sizes torch's CPU GEMV reaches a fraction of the machine's read bandwidth (and
pays a fixed cost per call that dominates a small model's layers); the
``owl_sparse::dense_linear`` op streams the weight once for all tokens with the same loops
as the packed kernels (see :mod:`owl_sparse.ops.library`). :func:`native_linears` routes a
model's remaining dense linear layers (a dense model's, or a packed model's LM head)
through it for the duration of a block:

>>> with native_linears(model):
...     model(input_ids=ids)

Inside the block every module whose type is exactly ``nn.Linear`` is a `NativeLinear` (the
same object, its class swapped: parameters, tied weights, hooks and state dict untouched);
subclasses of ``nn.Linear`` (other libraries' layers) are left alone. On leaving, every
swapped module gets its class back. Outside the CPU, or for a dtype the kernels do not take,
`NativeLinear` is plain ``nn.Linear``.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops as _ops  # noqa: F401  (registers torch.ops.owl_sparse.*)

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class NativeLinear(nn.Linear):
    """``nn.Linear`` whose CPU forward calls ``owl_sparse::dense_linear``.

    Input ``[..., in_features]`` in the weight's dtype, output ``[..., out_features]``;
    numerics: fp32 accumulation, like torch's CPU GEMM for these dtypes.
    """

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        if (
            x.device.type == "cpu"
            and w.device.type == "cpu"
            and x.dtype == w.dtype
            and w.dtype in KERNEL_DTYPES
        ):
            return torch.ops.owl_sparse.dense_linear(x, w, self.bias)
        return F.linear(x, w, self.bias)


@contextlib.contextmanager
def native_linears(model: nn.Module, enabled: bool = True):
    """Inside the block, ``model``'s ``nn.Linear`` modules on the CPU run `NativeLinear`.

    Args:
        model: any module; only submodules whose type is exactly ``nn.Linear`` with a CPU
            weight are swapped.
        enabled: False makes the block a no-op (the caller's switch).

    Yields the number of modules swapped. Nested blocks over the same model are fine (the
    inner one finds nothing left to swap).
    """
    swapped: list[nn.Module] = []
    if enabled:
        for module in model.modules():
            if type(module) is nn.Linear and module.weight.device.type == "cpu":
                module.__class__ = NativeLinear
                swapped.append(module)
    try:
        yield len(swapped)
    finally:
        for module in swapped:
            module.__class__ = nn.Linear
