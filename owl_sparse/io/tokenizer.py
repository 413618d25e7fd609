"""Saving and loading the tokenizer kept beside a model (transformers' or llama2.c's)."""

from __future__ import annotations

from pathlib import Path

from ..errors import InputError
from ..models.llama2c import Llama2cTokenizer
from .skeleton import config_errors

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "llama2c_tokenizer.json",
)


def save_tokenizer(tokenizer, directory: Path) -> None:
    """``tokenizer.save_pretrained(directory)``; nothing for None."""
    if tokenizer is None:
        return
    if not hasattr(tokenizer, "save_pretrained"):
        raise InputError(f"tokenizer {type(tokenizer).__name__} has no save_pretrained")
    tokenizer.save_pretrained(directory)


def load_tokenizer(directory: Path, required: bool = False):
    """The tokenizer saved in ``directory``: llama2.c's when ``llama2c_tokenizer.json`` is
    there, else transformers' AutoTokenizer (never remote code).

    Without any tokenizer file, None; with ``required=True`` transformers is asked anyway
    (it may build one from the config) and its failure is an InputError naming the folder.
    """
    if (directory / "llama2c_tokenizer.json").is_file():
        return Llama2cTokenizer.from_pretrained(directory)
    if not required and not any((directory / f).is_file() for f in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(directory, trust_remote_code=False)
    except config_errors() as e:
        raise InputError(f"{directory}: no usable tokenizer ({e})") from e
