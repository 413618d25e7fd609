"""Argument checks shared by every stage: integers, real numbers, devices and dtypes.

One rule each, so that the library and the command line accept and refuse the same things:
an integer is any integral number (Python, numpy, a 0-d integer tensor) but never a bool or
a float (never truncated); a device is one torch parses and this machine has; a dtype is
one of float16, bfloat16, float32 or their names.
"""

from __future__ import annotations

import math
import numbers
import operator

import torch

from .errors import InputError

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def is_int(value) -> bool:
    """True for an integral number (numpy ones too), never for a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value) -> bool:
    """True for a real number that is not NaN (ints, floats, numpy scalars), never a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and not math.isnan(value)


def as_int(name: str, value, minimum: int | None = None) -> int:
    """``value`` as a Python int: any integer (int, numpy integer, 0-d integer tensor), not a
    bool or a float (never truncated), and at least ``minimum`` when given; raises
    InputError naming ``name``."""
    try:
        if isinstance(value, bool):
            raise TypeError
        number = operator.index(value)
    except TypeError:
        number = None
    if number is None or (minimum is not None and number < minimum):
        bound = "" if minimum is None else f" >= {minimum}"
        raise InputError(f"{name} must be an integer{bound}, got {value!r}")
    return number


def as_real(name: str, value, rule: str) -> float:
    """``value`` as a float: any real number (int, float, numpy scalar), not a bool;
    ``rule`` says what is expected, for the message."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InputError(f"{name} must be {rule}, got {value!r}")
    return float(value)


def parse_dtype(dtype, arg: str = "dtype") -> torch.dtype | None:
    """None, ``torch.float16`` / ``bfloat16`` / ``float32`` or one of their names
    ``"float16"``, ``"bfloat16"``, ``"float32"``; InputError for anything else."""
    if dtype is None:
        return None
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    raise InputError(
        f"{arg} must be one of torch.float16, torch.bfloat16, torch.float32 or their names "
        f"{sorted(DTYPES)}, got {dtype!r}"
    )


def parse_device(device, arg: str = "device") -> torch.device | None:
    """A device on which tensors can live here, as a torch.device (None stays None).

    InputError for a value torch cannot parse, the meta device (it holds no data), and a
    device this machine does not have (CUDA without a GPU, an index beyond the count).
    """
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as e:
        raise InputError(f"{arg} {device!r} is not a torch device ({e})") from None
    if dev.type == "meta":
        raise InputError(f"{arg}: the meta device holds no data; use cpu or cuda")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(
                f"{arg} {device!r}: CUDA is not available on this machine (torch sees no "
                "CUDA device)"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(
                f"{arg}: {dev} is not available ({torch.cuda.device_count()} CUDA devices)"
            )
    elif dev.type != "cpu":
        try:
            torch.empty(0, device=dev)
        except (RuntimeError, AssertionError, NotImplementedError, ValueError) as e:
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise InputError(f"{arg}: {dev} is not available ({first})") from None
    return dev


def default_device() -> torch.device:
    """cuda when torch sees a GPU, else cpu."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
