"""The ``sparsity.json`` record of a packed checkpoint: building it, and the checks a
checkpoint passes before any tensor data is read.

`jsonable`, `calibration_hash`, `prune_record` and `versions` build the record's fields.
`read_record` validates ``sparsity.json`` field by field; `plan_tensors` compares the
safetensors header (names, dtypes, shapes) with the model rebuilt from config.json and the
record, so a missing, extra, mistyped or misshapen tensor is reported by name before a
byte of tensor data is touched.  The formats' own ``validate()`` (popcounts, offsets,
index order) runs afterwards, on the data, still before any kernel sees it.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import re
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path

import torch
from torch import nn

from .._version import __version__
from ..args import DTYPES, is_int
from ..errors import InputError
from ..formats.bitmap import TILE_K, TILE_N, VALUES_PAD, padded_shape
from ..nn.linear import is_conv1d
from .safetensors import TensorEntry

CHECKPOINT_VERSION = 1
MAX_RECORD_BYTES = 64 * 2**20
FORMAT_KEYS = {
    "bitmap": ("bitmap", "values", "tile_offsets", "shape"),
    "2:4": ("values", "meta", "shape"),
}
_FILE_NAME = re.compile(r"^[A-Za-z0-9_.-]+\.safetensors$")
_NAME = re.compile(r"^[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*$")


def jsonable(obj):
    """A JSON-compatible copy of settings: dataclasses, mappings, sequences, tensors."""
    if hasattr(obj, "to_dict"):
        obj = obj.to_dict()
    elif is_dataclass(obj) and not isinstance(obj, type):
        obj = asdict(obj)
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items() if k != "masks"}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return {"tensor": list(obj.shape), "dtype": str(obj.dtype).replace("torch.", "")}
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return str(obj)


def calibration_hash(calibration) -> str | None:
    """sha256 of the calibration settings (canonical JSON) or of calibration tensors' bytes."""
    if calibration is None:
        return None
    h = hashlib.sha256()
    items = calibration if isinstance(calibration, (list, tuple)) else [calibration]
    if all(isinstance(t, torch.Tensor) for t in items):
        for t in items:
            t = t.detach().to("cpu").contiguous()
            h.update(f"{t.dtype}{list(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()
    h.update(json.dumps(jsonable(calibration), sort_keys=True, separators=(",", ":")).encode())
    return h.hexdigest()


def versions() -> dict:
    import transformers

    return {
        "owl_sparse": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def prune_record(report) -> dict | None:
    if report is None:
        return None
    rep = jsonable(report)
    cfg = rep.get("config", {}) if isinstance(rep, dict) else {}
    params = {k: cfg[k] for k in ("sparsity", "pattern", "owl_m", "owl_lambda", "seed") if k in cfg}
    return {
        "method": cfg.get("method"),
        "allocation": cfg.get("allocation"),
        "allocation_params": params,
        "report": rep,
    }


def _need(cond: bool, where, msg: str) -> None:
    if not cond:
        raise InputError(f"{where}: {msg}")


def read_record(path: Path) -> dict:
    """Load and check ``path`` (a sparsity.json); raises InputError naming the bad field."""
    where = path
    size = path.stat().st_size
    _need(size <= MAX_RECORD_BYTES, where, f"{size} bytes, larger than any real record")
    try:
        rec = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise InputError(f"{where}: not valid JSON ({e})") from e
    _need(isinstance(rec, dict), where, "must be a JSON object")
    _need(
        rec.get("owl_sparse_checkpoint") == CHECKPOINT_VERSION,
        where,
        f"owl_sparse_checkpoint must be {CHECKPOINT_VERSION}, got {rec.get('owl_sparse_checkpoint')!r}",
    )
    wf = rec.get("weights_file")
    _need(
        isinstance(wf, str) and bool(_FILE_NAME.match(wf)),
        where,
        f"weights_file must be a plain *.safetensors file name, got {wf!r}",
    )
    _need(
        is_int(rec.get("weights_bytes")) and rec["weights_bytes"] >= 8,
        where,
        f"weights_bytes must be an int >= 8, got {rec.get('weights_bytes')!r}",
    )
    wsha = rec.get("weights_sha256")  # absent from older checkpoints: then not checked
    _need(
        wsha is None or (isinstance(wsha, str) and bool(re.fullmatch(r"[0-9a-f]{64}", wsha))),
        where,
        "weights_sha256 must be 64 hex digits",
    )
    sha = rec.get("config_sha256")
    _need(
        isinstance(sha, str) and bool(re.fullmatch(r"[0-9a-f]{64}", sha)),
        where,
        "config_sha256 must be 64 hex digits",
    )
    _need(isinstance(rec.get("model_class"), str), where, "model_class must be a string")
    _need(
        rec.get("dtype") in DTYPES,
        where,
        f"dtype must be one of {sorted(DTYPES)}, got {rec.get('dtype')!r}",
    )
    _need(
        isinstance(rec.get("conv1d_to_linear"), bool),
        where,
        "conv1d_to_linear must be true or false",
    )
    tied = rec.get("tied")
    _need(
        isinstance(tied, dict)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in tied.items()),
        where,
        "tied must map tensor names to tensor names",
    )
    layers = rec.get("layers")
    _need(isinstance(layers, dict), where, "layers must be an object")
    for name, spec in layers.items():
        at = f"{where}: layer {name!r}"
        _need(bool(_NAME.match(name)), at, "not a module name")
        _need(isinstance(spec, dict), at, "entry must be an object")
        _need(
            spec.get("format") in FORMAT_KEYS,
            at,
            f"format must be one of {sorted(FORMAT_KEYS)}, got {spec.get('format')!r}",
        )
        shape = spec.get("shape")
        _need(
            isinstance(shape, list)
            and len(shape) == 2
            and all(is_int(d) and d >= 1 for d in shape),
            at,
            f"shape must be [N, K] of positive ints, got {shape!r}",
        )
        nnz = spec.get("nnz")
        _need(is_int(nnz) and 0 <= nnz <= shape[0] * shape[1], at, f"nnz {nnz!r} not in [0, N*K]")
        _need(isinstance(spec.get("bias"), bool), at, "bias must be true or false")
    return rec


@dataclass
class Plan:
    """What to read: dense tensors by name, packed layers by name (expected key -> entry)."""

    dense: dict[str, TensorEntry] = field(default_factory=dict)
    packed: dict[str, dict[str, TensorEntry]] = field(default_factory=dict)


def _expect(where, entry: TensorEntry | None, name: str, dtype, shape) -> TensorEntry:
    if entry is None:
        raise InputError(f"{where}: missing tensor {name!r}")
    if entry.dtype != dtype:
        raise InputError(f"{where}: tensor {name!r} has dtype {entry.dtype}, expected {dtype}")
    if shape is not None and entry.shape != tuple(shape):
        raise InputError(
            f"{where}: tensor {name!r} has shape {list(entry.shape)}, the config implies {list(shape)}"
        )
    return entry


def _packed_specs(fmt: str, n: int, k: int, nnz: int, dtype) -> dict[str, tuple]:
    """Expected (dtype, shape) of each tensor of a packed [N, K] weight."""
    if fmt == "bitmap":
        np_, kp = padded_shape(n, k)
        tiles = (np_ // TILE_N) * (kp // TILE_K)
        return {
            "bitmap": (torch.int32, (np_, kp // 32)),
            "values": (dtype, (nnz + VALUES_PAD,)),
            "tile_offsets": (torch.int32, (tiles + 1,)),
            "shape": (torch.int64, (2,)),
        }
    return {
        "values": (dtype, (n, k // 2)),
        "meta": (torch.uint8, (n, -(-k // 8))),
        "shape": (torch.int64, (2,)),
    }


def plan_tensors(
    model: nn.Module, expected: dict, record: dict, entries: dict[str, TensorEntry], where
) -> Plan:
    """Match the header ``entries`` with the meta ``model`` and the ``record``.

    ``expected``: the model's parameters and persistent buffers by name (tied ones under
    every name).  Raises InputError for a layer the config lacks or shapes differently, a
    missing or unexpected tensor, a wrong dtype or shape, or a bad tied-weight entry.
    """
    plan = Plan()
    remaining = dict(expected)
    modules = dict(model.named_modules())
    for name, spec in record["layers"].items():
        layer = modules.get(name)
        conv1d = is_conv1d(layer)  # GPT-2 layer packed directly: weight [in, out]
        if not (isinstance(layer, nn.Linear) or conv1d):
            raise InputError(
                f"{where}: layer {name!r} is not a linear layer of this {type(model).__name__}"
            )
        n, k = spec["shape"]
        config_shape = tuple(layer.weight.shape[::-1] if conv1d else layer.weight.shape)
        if config_shape != (n, k):
            raise InputError(
                f"{where}: layer {name!r} is recorded as [{n}, {k}] but the config gives "
                f"{list(config_shape)}"
            )
        if spec["format"] == "2:4" and k % 4:
            raise InputError(f"{where}: layer {name!r}: 2:4 needs K % 4 == 0, K = {k}")
        if spec["bias"] != (layer.bias is not None):
            raise InputError(
                f"{where}: layer {name!r}: bias recorded as {spec['bias']}, config disagrees"
            )
        remaining.pop(f"{name}.weight", None)
        remaining.pop(f"{name}.bias", None)
        tensors = {}
        specs = _packed_specs(spec["format"], n, k, spec["nnz"], layer.weight.dtype)
        if layer.bias is not None:
            specs["bias"] = (layer.bias.dtype, (n,))
        for key, (dtype, shape) in specs.items():
            full = f"{name}.{key}"
            tensors[key] = _expect(where, entries.get(full), full, dtype, shape)
        plan.packed[name] = tensors
    for alias, source in record["tied"].items():
        if alias not in remaining or source not in remaining or alias == source:
            raise InputError(
                f"{where}: tied entry {alias!r} -> {source!r} names no tensor pair of this model"
            )
        a, s = remaining[alias], remaining[source]
        if a.shape != s.shape or a.dtype != s.dtype:
            raise InputError(
                f"{where}: tied {alias!r} {list(a.shape)} and {source!r} {list(s.shape)} differ"
            )
        if alias in entries:
            raise InputError(
                f"{where}: tensor {alias!r} is stored although recorded as tied to {source!r}"
            )
        del remaining[alias]
    for name, t in remaining.items():
        plan.dense[name] = _expect(where, entries.get(name), name, t.dtype, t.shape)
    known = set(plan.dense) | {e.name for tensors in plan.packed.values() for e in tensors.values()}
    extra = sorted(set(entries) - known)
    if extra:
        raise InputError(f"{where}: unexpected tensor(s) {extra[:5]} (not part of this model)")
    return plan


# transformers integration (owl_sparse.io.transformers_integration): what config.json and
# the weight index carry so that AutoModelForCausalLM.from_pretrained finds our quantizer.
QUANT_METHOD = "owl_sparse"
INDEX = "model.safetensors.index.json"  # what transformers looks for beside config.json


def quantization_config(record: dict) -> dict:
    """The ``quantization_config`` entry `save_pretrained` writes into ``config.json``."""
    return {
        "quant_method": QUANT_METHOD,
        "checkpoint_version": record["owl_sparse_checkpoint"],
        "weights_file": record["weights_file"],
        "formats": sorted({spec["format"] for spec in record["layers"].values()}),
    }


def weight_index(tensors: dict[str, torch.Tensor], weights_file: str, total: int) -> dict:
    """``model.safetensors.index.json``: every stored tensor in ``weights_file``."""
    return {
        "metadata": {"total_size": total, "format": QUANT_METHOD},
        "weight_map": dict.fromkeys(sorted(tensors), weights_file),
    }
