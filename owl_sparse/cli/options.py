"""Option values shared by the commands and the demo: device, dtype, --format vs --pattern.

Each raises InputError with the option's name, before any model is loaded.
"""

from __future__ import annotations


def resolve_device(name: str | None):
    """``--device``: a device torch parses and this machine has (InputError otherwise);
    default cuda when available, else cpu."""
    from ..args import default_device, parse_device

    return parse_device(name, "--device") if name else default_device()


def resolve_dtype(name: str | None):
    """``--dtype``: None or float32 / float16 / bfloat16 as a torch dtype."""
    from ..args import parse_dtype

    return parse_dtype(name, "--dtype")


def check_format(fmt: str, nm: tuple[int, int] | None, pattern: str) -> None:
    """``--format 2:4`` needs a ``--pattern`` whose masks 2:4 can store (checked before
    pruning); ``nm`` is the pattern as its parser gives it (None for unstructured)."""
    from ..errors import InputError
    from ..formats import fits_24

    if fmt == "2:4" and not fits_24(nm):
        raise InputError(
            f"--format 2:4 stores at most 2 of every 4 weights, which --pattern "
            f"{pattern} does not guarantee: use --pattern 2:4, or --format auto / "
            "bitmap (any mask)"
        )
