"""Interchange with the compressed-tensors sparse layouts (llm-compressor checkpoints).

"sparse-bitmask" (one weight, keys joined to the layer name with "."):

- ``shape``: int64 ``[2]`` = ``[R, C]``
- ``compressed``: 1-D, the kept values in row-major order
- ``bitmask``: uint8 ``[R, ceil(C/8)]`` = ``numpy.packbits(mask, axis=-1, bitorder="little")``
  (bit j of byte b of row r is column 8b + j)
- ``row_offsets``: int64 ``[R]``, start of each row in ``compressed``

"sparse-24-bitmask": ``shape`` (int64 ``[2, 1]``), ``compressed`` ``[R, C/2]`` (exactly two
stored values per group of 4, in column order) and ``bitmask`` as above; no row_offsets.

:func:`to_compressed_tensors` writes a :class:`BitmapWeight` as "sparse-bitmask" and a
:class:`Sparse24Weight` as "sparse-24-bitmask"; :func:`from_compressed_tensors` reads
either back, validating every tensor.  Both directions are exact: tensors come back
``torch.equal`` to what went in.  A 2:4 group with fewer than 2 kept entries is exported
with its zero-valued filler positions marked in the bitmask (compressed-tensors needs
exactly two per group); ``to_dense()`` is unchanged by this.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import InputError
from ._common import FLOAT_DTYPES, MAX_DIM, check_tensor
from .bitmap import BitmapWeight
from .sparse24 import Sparse24Weight

INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def _key(prefix: str, name: str) -> str:
    """compressed-tensors' naming: ``<layer>.<name>``; a trailing ``.weight`` is dropped."""
    if prefix.endswith(".weight"):
        prefix = prefix[: -len(".weight")]
    if prefix and not prefix.endswith("."):
        prefix += "."
    return prefix + name


def pack_bitmask(mask: Tensor) -> Tensor:
    """bool ``[R, C]`` -> uint8 ``[R, ceil(C/8)]``, little bit order (numpy.packbits)."""
    r, c = mask.shape
    padded = torch.zeros(r, -(-c // 8) * 8, dtype=torch.int32, device=mask.device)
    padded[:, :c] = mask
    shifts = torch.arange(8, device=mask.device, dtype=torch.int32)
    return (padded.view(r, -1, 8) << shifts).sum(-1, dtype=torch.int32).to(torch.uint8)


def unpack_bitmask(bitmask: Tensor, cols: int) -> Tensor:
    """uint8 ``[R, ceil(C/8)]`` -> bool ``[R, C]`` (inverse of :func:`pack_bitmask`)."""
    shifts = torch.arange(8, device=bitmask.device, dtype=torch.int32)
    bits = (bitmask.to(torch.int32).unsqueeze(-1) >> shifts) & 1
    return bits.view(bitmask.shape[0], -1)[:, :cols].bool()


def to_compressed_tensors(
    fmt: BitmapWeight | Sparse24Weight, prefix: str = ""
) -> dict[str, Tensor]:
    """Export ``fmt`` in the compressed-tensors layout (see the module docstring).

    ``prefix`` is the layer name (``"model.layers.0.mlp.up_proj"``, with or without a trailing
    ``.weight``); keys are ``<prefix>.shape`` etc.
    """
    if isinstance(fmt, BitmapWeight):
        mask = fmt.mask()
        counts = mask.sum(dim=1, dtype=torch.int64)
        return {
            _key(prefix, "shape"): torch.tensor(
                [fmt.N, fmt.K], dtype=torch.int64, device=fmt.device
            ),
            _key(prefix, "compressed"): fmt.to_dense()[mask],
            _key(prefix, "bitmask"): pack_bitmask(mask),
            _key(prefix, "row_offsets"): torch.cumsum(counts, 0) - counts,
        }
    if isinstance(fmt, Sparse24Weight):
        # The stored pairs are already the row-major kept values (idx0 < idx1 in each group).
        return {
            _key(prefix, "shape"): torch.tensor(
                [[fmt.N], [fmt.K]], dtype=torch.int64, device=fmt.device
            ),
            _key(prefix, "compressed"): fmt.values.clone(),
            _key(prefix, "bitmask"): pack_bitmask(fmt.mask()),
        }
    raise InputError(
        f"to_compressed_tensors: expected BitmapWeight or Sparse24Weight, got {type(fmt).__name__}"
    )


def _read_shape(t, name: str) -> tuple[int, int]:
    if not isinstance(t, Tensor) or t.dtype not in INT_DTYPES or t.numel() != 2:
        raise InputError(f"{name} must be an integer tensor with 2 elements, got {t!r:.80}")
    r, c = (int(v) for v in t.flatten().tolist())
    if not (1 <= r <= MAX_DIM and 1 <= c <= MAX_DIM):
        raise InputError(f"{name} = [{r}, {c}] is not a valid weight shape")
    return r, c


def _read_mask(tensors, prefix: str, r: int, c: int) -> tuple[Tensor, Tensor]:
    """(mask [R, C], per-row kept counts) from a validated ``bitmask``."""
    name = _key(prefix, "bitmask")
    bitmask = tensors[name]
    check_tensor(name, bitmask, (torch.uint8,), (r, -(-c // 8)))
    if c % 8 and bool((bitmask[:, -1].to(torch.int32) >> (c % 8)).any()):
        raise InputError(f"{name} sets bits past column {c} (padding bits must be 0)")
    mask = unpack_bitmask(bitmask, c)
    return mask, mask.sum(dim=1, dtype=torch.int64)


def from_compressed_tensors(
    tensors: dict[str, Tensor], prefix: str = "", format: str | None = None
) -> BitmapWeight | Sparse24Weight:
    """Import one weight from a compressed-tensors state dict.

    The layout is recognised by its keys (``row_offsets`` -> "sparse-bitmask", otherwise
    "sparse-24-bitmask").  ``format`` ("bitmap" or "2:4") picks the owl-sparse format to
    build; default bitmap for "sparse-bitmask" and 2:4 for "sparse-24-bitmask".
    Every tensor is validated (dtype, shape, popcounts, offsets); bad input raises InputError.
    """
    missing = [n for n in ("shape", "compressed", "bitmask") if _key(prefix, n) not in tensors]
    if missing:
        raise InputError(
            f"compressed-tensors weight {prefix!r} lacks {[_key(prefix, n) for n in missing]}"
        )
    is_24 = _key(prefix, "row_offsets") not in tensors
    r, c = _read_shape(tensors[_key(prefix, "shape")], _key(prefix, "shape"))
    mask, counts = _read_mask(tensors, prefix, r, c)
    cname = _key(prefix, "compressed")
    compressed = tensors[cname]
    if is_24:
        if c % 4:
            raise InputError(f"sparse-24-bitmask {prefix!r}: columns C={c} not divisible by 4")
        check_tensor(cname, compressed, FLOAT_DTYPES, (r, c // 2))
        per_group = mask.view(r, c // 4, 4).sum(-1)
        if bool((per_group != 2).any()):
            row, g = (int(i) for i in (per_group != 2).nonzero()[0])
            raise InputError(
                f"sparse-24-bitmask {prefix!r}: row {row}, group {g} marks "
                f"{int(per_group[row, g])} entries, expected exactly 2"
            )
        flat = compressed.reshape(-1)
    else:
        check_tensor(cname, compressed, FLOAT_DTYPES, None, ndim=1)
        if compressed.numel() != int(counts.sum()):
            raise InputError(
                f"{cname} has {compressed.numel()} values but the bitmask keeps {int(counts.sum())}"
            )
        oname = _key(prefix, "row_offsets")
        check_tensor(oname, tensors[oname], INT_DTYPES, (r,))
        expected = torch.cumsum(counts, 0) - counts
        if not torch.equal(tensors[oname].to(torch.int64), expected):
            raise InputError(f"{oname} does not match the bitmask's per-row counts")
        flat = compressed
    dense = torch.zeros(r, c, dtype=compressed.dtype, device=compressed.device)
    mask = mask.to(compressed.device)
    dense[mask] = flat
    target = format or ("2:4" if is_24 else "bitmap")
    if target == "bitmap":
        return BitmapWeight.from_dense(dense, mask)
    if target == "2:4":
        return Sparse24Weight.from_dense(dense, mask)
    raise InputError(f"from_compressed_tensors: format must be 'bitmap' or '2:4', got {format!r}")
