"""Interchange with compressed-tensors checkpoints ("sparse-bitmask", "sparse-24-bitmask").

These are the sparse layouts of the ``compressed-tensors`` library, written by older
llm-compressor releases (the compressors were dropped in compressed-tensors 0.15).  A
directory holds a transformers ``config.json`` whose ``quantization_config`` (older files:
``compression_config``) has ``"quant_method": "compressed-tensors"`` and a
``sparsity_config`` with the format; ``model.safetensors`` (or shards listed in
``model.safetensors.index.json``) holds every compressed weight as ``<layer>.shape``,
``<layer>.compressed``, ``<layer>.bitmask`` (+ ``<layer>.row_offsets`` for sparse-bitmask)
and every other tensor densely (tied weights once, as transformers saves them).  The
per-weight layouts are in :mod:`owl_sparse.formats.compressed_tensors`.

- `export_compressed_tensors(model_or_dir, out_dir)` writes that layout (atomically):
  sparse-24-bitmask when every packed layer is 2:4, else sparse-bitmask.
- `load_compressed_tensors(dir)` imports one: sparse-bitmask layers become bitmap
  SparseLinear, sparse-24-bitmask layers 2:4.  Quantized (config_groups) checkpoints and
  GPT-2's transposed Conv1D layout are refused with InputError.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from ..args import DTYPES, parse_device, parse_dtype
from ..errors import InputError
from ..formats import BitmapWeight, from_compressed_tensors, to_compressed_tensors
from ..nn.linear import SparseLinear, is_conv1d
from . import skeleton
from .atomic import atomic_directory
from .packed import load_packed
from .safetensors import SafeReader, write_safetensors
from .state import converted_conv1d, finish, packed_state, sparse_layers
from .tokenizer import load_tokenizer, save_tokenizer

CT_FORMATS = {"sparse-bitmask": "bitmap", "sparse-24-bitmask": "2:4"}
CT_VERSION = "0.9.4"  # the layout of this release (unchanged until the compressors' removal)


def _compression_config(cfg: dict) -> dict | None:
    qc = cfg.get("quantization_config") or cfg.get("compression_config")
    return qc if isinstance(qc, dict) else None


def _read_config(path: Path) -> dict:
    try:
        cfg = json.loads((path / "config.json").read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise InputError(f"{path}/config.json: unreadable ({e})") from e
    if not isinstance(cfg, dict):
        raise InputError(f"{path}/config.json: must be a JSON object")
    return cfg


def is_compressed_tensors_dir(path) -> bool:
    """True when ``path/config.json`` declares a compressed-tensors sparsity config."""
    path = Path(path)
    if not (path / "config.json").is_file():
        return False
    try:
        qc = _compression_config(_read_config(path))
    except InputError:
        return False
    return qc is not None and isinstance(qc.get("sparsity_config"), dict)


# --------------------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------------------


def export_compressed_tensors(model_or_dir, out_dir, tokenizer=None) -> Path:
    """Write a model with SparseLinear layers (or an owl-sparse checkpoint directory) as a
    compressed-tensors checkpoint in ``out_dir``; returns ``out_dir``.

    Bitmap layers are exported as sparse-bitmask (bitmask = the packed mask, values in
    row-major order, row offsets); when every packed layer is 2:4 the whole model uses
    sparse-24-bitmask.  A mixed model stores its 2:4 layers as sparse-bitmask too
    (compressed-tensors has one sparsity format per model).  Raises InputError for a model
    without packed layers or with GPT-2 Conv1D layers (stored transposed there), and for an
    existing ``out_dir`` that is neither empty nor a compressed-tensors checkpoint holding
    only files our writers produce (`owl_sparse.io.atomic.check_replaceable`; nothing is written).
    """

    if isinstance(model_or_dir, (str, Path)):
        model, saved_tok = load_packed(Path(model_or_dir))
        tokenizer = tokenizer if tokenizer is not None else saved_tok
    else:
        model = model_or_dir
    layers = sparse_layers(model)
    if not layers:
        raise InputError("export_compressed_tensors: the model has no SparseLinear layers")
    if converted_conv1d(model, model.config):
        raise InputError(
            "export_compressed_tensors: GPT-2 Conv1D layers are stored transposed in "
            "compressed-tensors checkpoints; exporting them is not supported"
        )
    fmts = {layer.packed.fmt for layer in layers.values()}
    ct_format = "sparse-24-bitmask" if fmts == {"2:4"} else "sparse-bitmask"
    dense, _tied = packed_state(model)
    tensors: dict[str, torch.Tensor] = {}
    kept = total = 0
    for name, layer in layers.items():
        packed = layer.packed
        if ct_format == "sparse-bitmask" and packed.fmt == "2:4":
            packed = BitmapWeight.from_dense(packed.to_dense(), packed.to_dense() != 0)
        tensors.update(to_compressed_tensors(packed, name))
        kept += int(torch.count_nonzero(packed.to_dense()))
        total += packed.N * packed.K
        if layer.bias is not None:
            tensors[f"{name}.bias"] = layer.bias.detach()
    prefixes = tuple(f"{n}." for n in layers)
    tensors.update({k: v for k, v in dense.items() if not k.startswith(prefixes)})
    cfg = json.loads(model.config.to_json_string(use_diff=False))
    cfg["quantization_config"] = {
        "quant_method": "compressed-tensors",
        "version": CT_VERSION,
        "sparsity_config": {
            "format": ct_format,
            "global_sparsity": 1.0 - kept / total,
            "sparsity_structure": "2:4" if ct_format == "sparse-24-bitmask" else "unstructured",
            "targets": sorted(layers),
            "ignore": [],
        },
    }
    # An existing directory is replaced only when it is empty or a compressed-tensors
    # checkpoint holding nothing but files our writers produce.
    with atomic_directory(
        out_dir, is_compressed_tensors_dir, "a compressed-tensors checkpoint"
    ) as tmp:
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        save_tokenizer(tokenizer, tmp)
        write_safetensors(tmp / "model.safetensors", tensors, {"format": "pt"})
    return Path(out_dir)


# --------------------------------------------------------------------------------------
# import
# --------------------------------------------------------------------------------------


def load_compressed_tensors(path, device=None, dtype: torch.dtype | None = None):
    """Import a compressed-tensors sparse checkpoint; returns ``(model, tokenizer)``.

    Every tensor is checked like an owl-sparse checkpoint's (names, dtypes, shapes against
    the config, bitmask popcounts vs values, row offsets, 2 per group for 2:4).
    """

    path = Path(path)
    dtype, device = parse_dtype(dtype), parse_device(device)
    cfg = _read_config(path)
    qc = _compression_config(cfg) or {}
    sc = qc.get("sparsity_config")
    if not isinstance(sc, dict) or sc.get("format") not in CT_FORMATS:
        fmt = sc.get("format") if isinstance(sc, dict) else None
        raise InputError(f"{path}: sparsity format {fmt!r} is not one of {sorted(CT_FORMATS)}")
    if qc.get("config_groups"):
        raise InputError(f"{path}: quantized compressed-tensors checkpoints are not supported")
    # Without its quantization_config the rest is an ordinary dense config (transformers
    # would otherwise insist on its own compressed-tensors integration).
    plain = {k: v for k, v in cfg.items() if k not in ("quantization_config", "compression_config")}
    config = skeleton.load_config(path, plain)
    readers = [SafeReader(f) for f in skeleton.weight_files(path)]
    dtype_name = cfg.get("dtype") or cfg.get("torch_dtype")
    if dtype_name is None:  # older configs: the dtype the weights are stored in
        floats = [e.dtype for r in readers for e in r.entries.values() if e.dtype.is_floating_point]
        dtype_name = str(floats[0]).replace("torch.", "") if floats else "float32"
    if dtype_name not in DTYPES:
        raise InputError(f"{path}/config.json: unsupported dtype {dtype_name!r}")
    model = skeleton.meta_model(config, DTYPES[dtype_name])
    owner: dict[str, SafeReader] = {}
    for r in readers:
        for name in r.entries:
            if name in owner:
                raise InputError(f"{r.path}: tensor {name!r} also stored in {owner[name].path}")
            owner[name] = r
    for r in readers:
        r.__enter__()
    try:
        _fill(model, owner, CT_FORMATS[sc["format"]], path)
    finally:
        for r in readers:
            r.__exit__(None, None, None)
    return finish(model, device, dtype, path), load_tokenizer(path)


def _fill(model: nn.Module, owner: dict[str, SafeReader], fmt: str, where) -> None:

    expected = skeleton.expected_tensors(model)
    modules = dict(model.named_modules())
    prefixes = sorted(n[: -len(".bitmask")] for n in owner if n.endswith(".bitmask"))
    for prefix in prefixes:
        layer = modules.get(prefix)
        if is_conv1d(layer):
            raise InputError(f"{where}: layer {prefix!r} is a Conv1D (GPT-2); not supported")
        if not isinstance(layer, nn.Linear):
            raise InputError(
                f"{where}: compressed tensor {prefix!r} names no linear layer of the model"
            )
        r, c = layer.weight.shape
        keys = {"shape": None, "compressed": None, "bitmask": (torch.uint8, (r, -(-c // 8)))}
        if fmt == "bitmap":
            keys["row_offsets"] = None
        state = {}
        for key, want in keys.items():
            name = f"{prefix}.{key}"
            entry = owner[name].entries[name] if name in owner else None
            if entry is None:
                raise InputError(f"{where}: missing tensor {name!r}")
            if want is not None and (entry.dtype, entry.shape) != want:
                raise InputError(
                    f"{where}: tensor {name!r} is {entry.dtype} {list(entry.shape)}, "
                    f"expected {want[0]} {list(want[1])}"
                )
            if key == "compressed" and (
                entry.dtype != layer.weight.dtype or math.prod(entry.shape) > r * c
            ):
                raise InputError(
                    f"{where}: tensor {name!r} is {entry.dtype} {list(entry.shape)}; expected "
                    f"{layer.weight.dtype} with at most {r * c} values"
                )
            state[name] = owner[name].get(name)
        try:
            packed = from_compressed_tensors(state, prefix)
        except InputError as e:
            raise InputError(f"{where}: layer {prefix!r}: {e}") from None
        if packed.shape != (r, c):
            raise InputError(
                f"{where}: layer {prefix!r}: shape {list(packed.shape)}, config gives [{r}, {c}]"
            )
        skeleton.check_values(f"{prefix}.compressed", packed.values, where)
        bias = None
        if layer.bias is not None:
            bias = _dense(owner, f"{prefix}.bias", layer.bias, where)
        parent, _, leaf = prefix.rpartition(".")
        setattr(model.get_submodule(parent), leaf, SparseLinear(packed, bias))
        for key in ("weight", "bias"):
            expected.pop(f"{prefix}.{key}", None)
        for key in keys:
            owner.pop(f"{prefix}.{key}")
        owner.pop(f"{prefix}.bias", None)
    groups: dict[int, list[str]] = {}
    for name, t in expected.items():
        groups.setdefault(id(t), []).append(name)
    for names in groups.values():
        stored = [n for n in names if n in owner]
        if not stored:
            raise InputError(f"{where}: missing tensor {names[0]!r}")
        value = _dense(owner, stored[0], expected[stored[0]], where)
        skeleton.place_tensor(model, stored[0], value)
        for alias in names:
            if alias in stored[1:]:
                skeleton.place_tensor(model, alias, _dense(owner, alias, expected[alias], where))
            elif alias != stored[0]:
                skeleton.tie(model, alias, stored[0])
        for n in stored:
            owner.pop(n)
    if owner:
        raise InputError(
            f"{where}: unexpected tensor(s) {sorted(owner)[:5]} (not part of this model)"
        )
    skeleton.check_materialised(model, where)


def _dense(owner: dict[str, SafeReader], name: str, like: torch.Tensor, where) -> torch.Tensor:
    if name not in owner:
        raise InputError(f"{where}: missing tensor {name!r}")
    entry = owner[name].entries[name]
    if entry.dtype != like.dtype or entry.shape != tuple(like.shape):
        raise InputError(
            f"{where}: tensor {name!r} is {entry.dtype} {list(entry.shape)}, the config implies "
            f"{like.dtype} {list(like.shape)}"
        )
    t = owner[name].get(name)
    skeleton.check_values(name, t, where)
    return t
