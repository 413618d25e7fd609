"""Data: text sources (:mod:`.text`) and the token windows cut from them for calibration and
evaluation (:mod:`.windows`)."""

from .text import DATASET_NAMES, load_text, pydoc_text, read_text
from .windows import (
    TOKEN_ID_DTYPES,
    calibration_batches,
    check_token_ids,
    eval_windows,
    sample_from_model,
    tokenize,
)

__all__ = [
    "DATASET_NAMES",
    "TOKEN_ID_DTYPES",
    "calibration_batches",
    "check_token_ids",
    "eval_windows",
    "load_text",
    "pydoc_text",
    "read_text",
    "sample_from_model",
    "tokenize",
]
