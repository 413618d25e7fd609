"""One statistics accumulator for every scorer: input statistics of linear layers.

While calibration samples pass through a decoder block, forward pre-hooks on its linear
layers accumulate, per layer, only what the configured method needs:

- ``colsq``: float64 [in], the sum over calibration tokens of x_j^2 (Wanda's ||X_j||^2,
  OWL's outlier scores);
- ``hessian``: float32 [in, in], the sum over tokens of x x^T (SparseGPT's H up to the 2/n
  factor, which cancels: its damping is relative to mean(diag H));
- ``wcolsq``: float64 [in], the sum over tokens t of x_tj^2 / mean(h_t^2), where h_t is the
  block's input (residual stream) at token t, told by `begin_batch` (the sensitivity
  allocation: a perturbation matters relative to the residual stream it is added to).

All are plain matmul / reduction work in float32 on the device of the inputs, over chunks
of at most ``chunk_tokens`` tokens so the float32 copy of a half-precision input stays
small. Linear layers that receive the *same* input tensor in one forward (q/k/v, gate/up)
share one entry: detected by object identity while the accumulator holds a reference to
the latest input, so the identity cannot be a recycled address.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import InputError
from .config import PruneError


class StatsAccumulator:
    """Accumulates input statistics of named linear layers; use as a context manager.

    Args:
        linears: {name: nn.Linear} (names are used in errors and as keys).
        colsq: accumulate squared column norms.
        hessian: accumulate X^T X.
        weighted_colsq: accumulate squared column norms weighted per token by the inverse
            energy of the block input (needs `begin_batch` before each batch).
        chunk_tokens: tokens per float32 chunk.
    """

    def __init__(
        self,
        linears: dict[str, nn.Module],
        colsq: bool = True,
        hessian: bool = False,
        weighted_colsq: bool = False,
        chunk_tokens: int = 8192,
    ):
        self.linears = linears
        self.want_colsq = colsq
        self.want_hessian = hessian
        self.want_wcolsq = weighted_colsq
        self._wcolsq: dict[str, torch.Tensor] = {}
        self._token_weight: torch.Tensor | None = None
        self.chunk_tokens = chunk_tokens
        self._colsq: dict[str, torch.Tensor] = {}
        self._hessian: dict[str, torch.Tensor] = {}
        self._tokens: dict[str, int] = {}
        self._alias: dict[str, str] = {}
        self._last: tuple[torch.Tensor, str] | None = None
        self._handles = []

    def __enter__(self):
        if self.want_colsq or self.want_hessian or self.want_wcolsq:
            for name, module in self.linears.items():
                self._handles.append(module.register_forward_pre_hook(self._make_hook(name)))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._last = None
        return False

    def _make_hook(self, name: str):
        def hook(module, args):
            x = args[0]
            if self._last is not None and self._last[0] is x:
                owner = self._last[1]
                if name in self._tokens or self._alias.setdefault(name, owner) != owner:
                    raise PruneError(f"{name}: its input is shared inconsistently across batches")
                return
            if name in self._alias:
                raise PruneError(f"{name}: its input is shared inconsistently across batches")
            self._last = (x, name)
            self._accumulate(name, x)

        return hook

    @torch.no_grad()
    def _accumulate(self, name: str, x: torch.Tensor) -> None:
        width = x.shape[-1]
        flat = x.reshape(-1, width)
        if name not in self._tokens:
            self._tokens[name] = 0
            if self.want_colsq:
                self._colsq[name] = torch.zeros(width, dtype=torch.float64, device=x.device)
            if self.want_hessian:
                self._hessian[name] = torch.zeros(
                    width, width, dtype=torch.float32, device=x.device
                )
            if self.want_wcolsq:
                self._wcolsq[name] = torch.zeros(width, dtype=torch.float64, device=x.device)
        if self.want_wcolsq and (
            self._token_weight is None or self._token_weight.numel() != flat.shape[0]
        ):
            raise PruneError(f"{name}: weighted statistics need begin_batch with the block input")
        start = 0
        for chunk in flat.split(self.chunk_tokens):
            c = chunk.float()
            sq = c * c
            if self.want_colsq:
                self._colsq[name] += sq.sum(dim=0, dtype=torch.float32)
            if self.want_wcolsq:
                w = self._token_weight[start : start + c.shape[0]].unsqueeze(1)
                self._wcolsq[name] += (sq * w).sum(dim=0)
            if self.want_hessian:
                self._hessian[name].addmm_(c.t(), c)
            start += c.shape[0]
        self._tokens[name] += flat.shape[0]

    def begin_batch(self, block_input: torch.Tensor) -> None:
        """Tell the accumulator the block's input for the coming batch ([b, seqlen, dim]):
        its per-token inverse mean energy weights ``wcolsq``."""
        if self.want_wcolsq:
            energy = block_input.float().square().mean(dim=-1).reshape(-1)
            self._token_weight = 1.0 / (energy + 1e-12)

    def end_batch(self) -> None:
        """Drop the reference to the last input (call after each batch's forward)."""
        self._last = None
        self._token_weight = None

    def _owner(self, name: str) -> str:
        owner = self._alias.get(name, name)
        if owner not in self._tokens:
            raise PruneError(f"{name}: no calibration input reached this layer")
        return owner

    def colsq(self, name: str) -> torch.Tensor:
        """float64 [in]: sum over tokens of the squared input features."""
        return self._colsq[self._owner(name)]

    def wcolsq(self, name: str) -> torch.Tensor:
        """float64 [in]: sum over tokens of x_j^2 / mean(h^2) (h: the block input)."""
        return self._wcolsq[self._owner(name)]

    def hessian(self, name: str) -> torch.Tensor:
        """float32 [in, in]: sum over tokens of x x^T (shared with same-input layers)."""
        return self._hessian[self._owner(name)]

    def tokens(self, name: str) -> int:
        return self._tokens[self._owner(name)]

    def shared_with(self, name: str) -> str:
        """The layer whose statistics ``name`` uses (itself unless its input is shared)."""
        return self._owner(name)

    def check_finite(self, prefix: str = "") -> None:
        """Raise InputError when a NaN/Inf activation entered any layer (a NaN or Inf in
        the inputs makes its squared-norm or Hessian sum non-finite)."""
        for name in self._tokens:
            stat = self._colsq.get(name)
            if stat is None:
                stat = self._hessian[name].diagonal()
            if not torch.isfinite(stat).all():
                raise InputError(f"non-finite activations (NaN or Inf) enter {prefix}{name}")
