"""Save and load packed sparse models: safetensors weights plus a ``sparsity.json`` record.

A checkpoint directory holds

- ``config.json``: the transformers config (any ``quantization_config`` dropped);
- the tokenizer files, when a tokenizer was given;
- ``owl_sparse.safetensors``: every SparseLinear layer in its format's flat layout
  (``<layer>.bitmap`` / ``.values`` / ``.tile_offsets`` / ``.shape`` for bitmap,
  ``<layer>.values`` / ``.meta`` / ``.shape`` for 2:4, plus ``<layer>.bias``) and every other
  parameter and persistent buffer as in a dense checkpoint; tied weights are stored once.
  The name is deliberately not ``model.safetensors``, so plain transformers never loads a
  packed file as if it were dense;
- ``sparsity.json`` (`RECORD`): format, shape, nnz and sparsity per layer, the pruning
  method, allocation and its parameters, a hash of the calibration settings, package
  versions, the tied-weight map, the sha256 of config.json and the size of the weights.

Saving checks first what loading will check (every floating tensor with the same
`model_io.check_values`, each packed layer's invariants, every tensor's name, dtype and
shape against the model the config rebuilds), so a save that succeeds always loads.  It is
atomic (`model_io.atomic_directory`): everything is written and fsynced in a hidden
directory beside the target, ``sparsity.json`` last, then renamed into place.  An
interrupted save leaves at most that hidden directory, which has no ``sparsity.json`` and
no ``model.safetensors``, so neither owl-sparse nor transformers loads it.  An existing
directory is replaced only when it is empty or an owl-sparse output holding nothing but
files our writers produce.

Loading (`load_pretrained`) never materialises a dense weight of a packed layer: the model
is rebuilt from its config with parameters on the meta device, the packed layers are
swapped for SparseLinear, and every tensor is checked (name, dtype, shape against the
config, finiteness, the format's own invariants) before any kernel can see it.  Weights
are read as safetensors only (`owl_sparse.safetensors_io`: header checked against the
file, then raw reads), never with ``torch.load`` or pickle.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from torch import nn

from . import model_io
from .checkpoint_record import (
    CHECKPOINT_VERSION,
    DTYPES,
    calibration_hash,
    jsonable,
    plan_tensors,
    prune_record,
    read_record,
    versions,
)
from .errors import InputError
from .safetensors_io import SafeReader, TensorEntry, write_safetensors

RECORD = "sparsity.json"
WEIGHTS = "owl_sparse.safetensors"
REPORT = "prune_report.json"  # written beside a checkpoint by ``owl-sparse prune --out``


# --------------------------------------------------------------------------------------
# saving
# --------------------------------------------------------------------------------------


def sparse_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The model's SparseLinear modules by fully qualified name."""
    from .nn import SparseLinear

    return {n: m for n, m in model.named_modules() if isinstance(m, SparseLinear)}


def packed_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors to store (packed layers in their flat layout) and the tied-weight map.

    Returns ``(tensors by name, {alias: stored name})``; a tensor reachable under several
    names (tied embeddings) is stored under the first and listed as an alias of it.
    """
    layers = sparse_layers(model)
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        tensors.update(layer.packed.state_dict(f"{name}."))
        if layer.bias is not None:
            tensors[f"{name}.bias"] = layer.bias
    prefixes = tuple(f"{n}." for n in layers)
    for name, t in model_io.expected_tensors(model).items():
        if not name.startswith(prefixes):
            tensors[name] = t
    tied: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, t in list(tensors.items()):
        key = (
            t.untyped_storage().data_ptr(),
            t.storage_offset(),
            tuple(t.shape),
            t.stride(),
            t.dtype,
        )
        if t.numel() and key in seen:
            tied[name] = seen[key]
            del tensors[name]
        else:
            seen[key] = name
    return {k: v.detach() for k, v in tensors.items()}, tied


def _main_dtype(model: nn.Module) -> torch.dtype:
    counts: dict[torch.dtype, int] = {}
    for t in [*model.parameters(), *(m.packed.values for m in sparse_layers(model).values())]:
        if t.is_floating_point():
            counts[t.dtype] = counts.get(t.dtype, 0) + t.numel()
    return max(counts, key=counts.get) if counts else torch.float32


def is_owl_sparse_output(path) -> bool:
    """True for a directory an owl-sparse save wrote: a packed checkpoint (``sparsity.json``)
    or the dense output of ``owl-sparse prune`` (``prune_report.json``).  Such a directory
    may be replaced by a later save (`model_io.check_replaceable` also requires that it
    holds only files our writers produce)."""
    path = Path(path)
    return (path / RECORD).is_file() or (path / REPORT).is_file()


def save_pretrained(
    model: nn.Module, path, tokenizer=None, prune_report=None, calibration=None
) -> Path:
    """Save a model with SparseLinear layers as a packed checkpoint directory, atomically.

    Args:
        model: a transformers causal LM whose pruned layers were swapped for SparseLinear
            (``owl_sparse.nn.sparsify_``); GPT-2 models after ``conv1d_to_linear_``.
        path: target directory; an existing one is replaced only if it is empty, or an
            owl-sparse output (`is_owl_sparse_output`) holding only files our writers
            produce (otherwise InputError listing the others, nothing written).
        tokenizer: saved beside the weights when given (``save_pretrained`` interface).
        prune_report: the ``PruneReport`` of the run (method, allocation, per-layer targets).
        calibration: the calibration settings (dict / dataclass) or token tensors; only
            their sha256 (and JSON-able settings) are recorded.

    Returns the checkpoint path.

    Raises:
        InputError: for a model the loader would refuse (a NaN or Inf value, a packed layer
        violating its format's invariants, a tensor whose dtype or shape differs from the
        model its config rebuilds), naming the tensor; or a ``path`` it may not replace.
    """
    path = Path(path)
    layers = sparse_layers(model)
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_json_string"):
        raise InputError(f"{type(model).__name__} has no transformers config to save")
    tensors, tied = packed_state(model)
    targets = {r.name: r.target_sparsity for r in getattr(prune_report, "layers", None) or []}
    for name, t in tensors.items():
        if t.device.type == "meta":
            raise InputError(f"cannot save: tensor {name!r} is on the meta device")
    dtype = str(_main_dtype(model)).replace("torch.", "")
    if dtype not in DTYPES:
        raise InputError(f"cannot save a {dtype} model: use one of {sorted(DTYPES)}")
    where = f"cannot save to {path}"
    for name, layer in layers.items():
        try:
            layer.packed.validate()
        except InputError as e:
            raise InputError(f"{where}: layer {name!r}: {e}") from None
    for name, t in tensors.items():
        model_io.check_values(name, t, where)
    record = {
        "owl_sparse_checkpoint": CHECKPOINT_VERSION,
        "weights_file": WEIGHTS,
        "model_class": type(model).__name__,
        "dtype": dtype,
        "conv1d_to_linear": False,  # set by _check_loadable
        "tied": tied,
        "layers": {
            name: {
                "format": layer.packed.fmt,
                "shape": [layer.packed.N, layer.packed.K],
                "nnz": _nnz(layer.packed),
                "sparsity": 1.0 - _nnz(layer.packed) / (layer.packed.N * layer.packed.K),
                "bias": layer.bias is not None,
                "nbytes": layer.packed.nbytes,
                "target_sparsity": targets.get(name),
            }
            for name, layer in layers.items()
        },
        "prune": prune_record(prune_report),
        "calibration": None,
        "versions": versions(),
    }
    settings = (
        calibration if calibration is not None else getattr(prune_report, "calibration", None)
    )
    if settings is not None:
        record["calibration"] = {
            "sha256": calibration_hash(settings),
            "settings": jsonable(settings),
        }
    cfg = json.loads(config.to_json_string(use_diff=False))
    cfg.pop("quantization_config", None)
    try:  # the loader rebuilds the model from the JSON written here: so does the check
        saved_config = type(config).from_dict(cfg)
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise InputError(f"{where}: the config does not rebuild from its JSON ({e})") from e
    record["conv1d_to_linear"] = _check_loadable(model, saved_config, record, tensors, where)
    with model_io.atomic_directory(path, is_owl_sparse_output) as tmp:
        config_bytes = (json.dumps(cfg, indent=2, sort_keys=True) + "\n").encode()
        (tmp / "config.json").write_bytes(config_bytes)
        model_io.save_tokenizer(tokenizer, tmp)
        size = write_safetensors(tmp / WEIGHTS, tensors, {"format": "pt", "owl_sparse": "1"})
        record["weights_bytes"] = size
        record["config_sha256"] = hashlib.sha256(config_bytes).hexdigest()
        # Written last: its presence is what marks the directory as a complete checkpoint.
        part = tmp / (RECORD + ".part")
        with open(part, "w") as f:
            json.dump(record, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(part, tmp / RECORD)
    return path


def _nnz(packed) -> int:
    """Kept entries of a packed weight (2:4: the nonzero stored values)."""
    if packed.fmt == "2:4":
        return int(torch.count_nonzero(packed.values))
    return int(packed.nnz)


def _check_loadable(model: nn.Module, config, record: dict, tensors: dict, where) -> bool:
    """Match what is about to be saved with the model `load_pretrained` will rebuild.

    The same `plan_tensors` the loader runs on the file's header, here on the tensors:
    class, names, dtypes and shapes (a layer converted to another dtype, a buffer the
    config does not build). Raises InputError; returns the record's ``conv1d_to_linear``.
    """
    skeleton = model_io.meta_model(config, DTYPES[record["dtype"]])
    # GPT-2's Conv1D layers were turned into nn.Linear before packing; the loader rebuilds
    # from config (Conv1D again) and must convert the same way.
    conv1d = not _has_conv1d(model) and _has_conv1d(skeleton)
    if conv1d:
        from .models import conv1d_to_linear_

        conv1d_to_linear_(skeleton)
    if type(skeleton).__name__ != type(model).__name__:
        raise InputError(
            f"{where}: the config rebuilds a {type(skeleton).__name__}, not this "
            f"{type(model).__name__}; save the causal LM itself"
        )
    entries = {
        name: TensorEntry(name, t.dtype, tuple(t.shape), 0, t.numel() * t.element_size())
        for name, t in tensors.items()
    }
    expected = model_io.expected_tensors(skeleton)
    plan_tensors(skeleton, expected, record, entries, where)
    return conv1d


def _has_conv1d(model: nn.Module) -> bool:
    return any(type(m).__name__ == "Conv1D" for m in model.modules())


def _converted_conv1d(model: nn.Module, config) -> bool:
    """True when the model has no Conv1D but its config builds one (GPT-2 after
    ``conv1d_to_linear_``): the loader must convert the same way."""
    if _has_conv1d(model):
        return False
    return _has_conv1d(model_io.meta_model(config, torch.float32))


# --------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------


def is_checkpoint(path) -> bool:
    """True when ``path`` is a directory holding an owl-sparse ``sparsity.json``."""
    return (Path(path) / RECORD).is_file()


def load_pretrained(path, device=None, dtype: torch.dtype | None = None):
    """Load a packed checkpoint written by `save_pretrained`.

    A compressed-tensors directory ("sparse-bitmask" / "sparse-24-bitmask", see
    :mod:`owl_sparse.interchange`) is imported instead when ``path`` has no sparsity.json.

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
    dtype, device = model_io.resolve_dtype(dtype), model_io.resolve_device(device)
    if not path.is_dir():
        raise InputError(f"{path}: not a directory")
    if not is_checkpoint(path):
        from .interchange import is_compressed_tensors_dir, load_compressed_tensors

        if is_compressed_tensors_dir(path):
            return load_compressed_tensors(path, device=device, dtype=dtype)
        raise InputError(f"{path}: not an owl-sparse checkpoint (no {RECORD})")
    record = read_record(path / RECORD)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise InputError(f"{path}: no config.json")
    if hashlib.sha256(config_file.read_bytes()).hexdigest() != record["config_sha256"]:
        raise InputError(f"{config_file}: changed since the checkpoint was saved (sha256 mismatch)")
    weights = path / record["weights_file"]
    if not weights.is_file():
        raise InputError(f"{path}: missing weights file {record['weights_file']}")
    reader = SafeReader(weights)  # header checks first: they name the tensor at fault
    size = weights.stat().st_size
    if size != record["weights_bytes"]:
        raise InputError(
            f"{weights}: {size} bytes but {RECORD} records {record['weights_bytes']} "
            "(truncated or replaced)"
        )
    model = model_io.meta_model(
        model_io.load_config(path), DTYPES[record["dtype"]], record["conv1d_to_linear"]
    )
    if type(model).__name__ != record["model_class"]:
        raise InputError(
            f"{path}: config builds {type(model).__name__}, {RECORD} says {record['model_class']}"
        )
    with reader:
        fill_model(model, reader, record["layers"], record["tied"], weights)
    return finish(model, device, dtype, path), model_io.load_tokenizer(path)


def fill_model(model: nn.Module, reader: SafeReader, layers: dict, tied: dict, where) -> None:
    """Load every tensor of ``reader`` into the meta ``model``, checked first.

    ``layers``: packed layer name -> {"format", "shape", "nnz", "bias"}; ``tied``: alias ->
    stored name.  Swaps the packed layers for SparseLinear.  Raises InputError.
    """
    from .formats import FORMATS
    from .nn import SparseLinear

    expected = model_io.expected_tensors(model)
    plan = plan_tensors(model, expected, {"layers": layers, "tied": tied}, reader.entries, where)
    for name in plan.dense:
        t = reader.get(name)
        model_io.check_values(name, t, where)
        model_io.place_tensor(model, name, t)
    for name, entries in plan.packed.items():
        state = {f"{name}.{key}": reader.get(e.name) for key, e in entries.items()}
        bias = state.pop(f"{name}.bias", None)
        try:
            packed = FORMATS[layers[name]["format"]].from_state_dict(state, f"{name}.")
        except InputError as e:
            raise InputError(f"{where}: layer {name!r}: {e}") from None
        if packed.shape != tuple(layers[name]["shape"]):
            raise InputError(f"{where}: layer {name!r}: shape tensor says {list(packed.shape)}")
        model_io.check_values(f"{name}.values", packed.values, where)
        if bias is not None:
            model_io.check_values(f"{name}.bias", bias, where)
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, SparseLinear(packed, bias))
    for alias, source in tied.items():
        model_io.tie(model, alias, source)
    model_io.check_materialised(model, where)


def finish(
    model: nn.Module, device=None, dtype: torch.dtype | None = None, where="model"
) -> nn.Module:
    """Convert floating parameters and packed values to ``dtype``, move to ``device``, eval.

    ``dtype`` / ``device`` as for `load_pretrained` (InputError otherwise, and for a value
    that float16 cannot hold, named with ``where``).  Buffers outside SparseLinear (rotary
    inv_freq tables) keep their dtype, as when transformers loads a model in half precision.
    """
    from .nn import SparseLinear

    dtype, device = model_io.resolve_dtype(dtype), model_io.resolve_device(device)
    model_io.check_fits(model, dtype, where)
    if dtype is not None:
        for module in model.modules():
            if isinstance(module, SparseLinear):
                module.to(dtype)  # values and bias; the bitmap / meta stay integers
        for param in model.parameters():
            if param.is_floating_point() and param.dtype != dtype:
                param.data = param.data.to(dtype)
    if device is not None:
        model = model.to(device)
    return model.eval()
