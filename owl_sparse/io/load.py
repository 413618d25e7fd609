"""`load_pretrained`: open a packed checkpoint, ours or a compressed-tensors one."""

from __future__ import annotations

from pathlib import Path

import torch

from ..args import parse_device, parse_dtype
from ..errors import InputError
from .compressed_tensors import is_compressed_tensors_dir, load_compressed_tensors
from .packed import RECORD, is_checkpoint, load_packed


def load_pretrained(path, device=None, dtype: torch.dtype | None = None):
    """Load a packed checkpoint written by `save_pretrained`.

    A compressed-tensors directory ("sparse-bitmask" / "sparse-24-bitmask", see
    :mod:`owl_sparse.io.compressed_tensors`) is imported instead when ``path`` has no sparsity.json.

    Args:
        path: the checkpoint directory.
        device: where to put the model (default CPU); tensors are read and checked on CPU.
            A torch.device or a string torch parses; it must exist on this machine.
        dtype: convert floating parameters and packed values to this dtype (default: as
            stored): ``torch.float16`` / ``bfloat16`` / ``float32`` or their names
            (``"float16"`` ...).  A value that does not fit float16 is refused.

    Returns:
        ``(model, tokenizer)``: the transformers model in eval mode with SparseLinear
        layers, and the saved tokenizer (None when none was saved).

    Raises:
        InputError: naming the file, tensor and problem, for anything missing, truncated,
        inconsistent, non-finite or not safetensors, and for a bad ``dtype`` / ``device``
        (checked before any file is read).  Nothing is ever unpickled.
    """
    path = Path(path)
    dtype, device = parse_dtype(dtype), parse_device(device)
    if not path.is_dir():
        raise InputError(f"{path}: not a directory")
    if is_checkpoint(path):
        return load_packed(path, device, dtype)
    if is_compressed_tensors_dir(path):
        return load_compressed_tensors(path, device=device, dtype=dtype)
    raise InputError(f"{path}: not an owl-sparse checkpoint (no {RECORD})")
