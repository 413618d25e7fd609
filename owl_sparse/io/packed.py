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
  versions, the tied-weight map, the sha256 of config.json and the size and sha256 of the
  weights file (checked as the weights are read: one flipped bit is refused).

Saving checks first what loading will check (every floating tensor with the same
`skeleton.check_values`, each packed layer's invariants, every tensor's name, dtype and
shape against the model the config rebuilds), so a save that succeeds always loads.  It is
atomic (`owl_sparse.io.atomic.atomic_directory`): everything is written and fsynced in a hidden
directory beside the target, ``sparsity.json`` last, then renamed into place.  An
interrupted save leaves at most that hidden directory, which has no ``sparsity.json`` and
no ``model.safetensors``, so neither owl-sparse nor transformers loads it.  An existing
directory is replaced only when it is empty or an owl-sparse output holding nothing but
files our writers produce.

Loading (`load_pretrained`) never materialises a dense weight of a packed layer: the model
is rebuilt from its config with parameters on the meta device, the packed layers are
swapped for SparseLinear, and every tensor is checked (name, dtype, shape against the
config, finiteness, the format's own invariants) before any kernel can see it.  Weights
are read as safetensors only (`owl_sparse.io.safetensors`: header checked against the
file, then raw reads), never with ``torch.load`` or pickle.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from torch import nn

from ..args import DTYPES, parse_device, parse_dtype
from ..errors import InputError
from ..formats import FORMATS
from ..models.structure import conv1d_to_linear_
from ..nn.linear import SparseLinear
from . import skeleton, weights_check
from .atomic import atomic_directory, check_replaceable
from .record import (
    CHECKPOINT_VERSION,
    INDEX,
    calibration_hash,
    jsonable,
    plan_tensors,
    prune_record,
    quantization_config,
    read_record,
    versions,
    weight_index,
)
from .safetensors import (
    SafeReader,
    TensorEntry,
    file_sha256,
    read_header,
    write_safetensors,
)
from .state import finish, has_conv1d, packed_state, sparse_layers
from .tokenizer import load_tokenizer, save_tokenizer

RECORD = "sparsity.json"
WEIGHTS = "owl_sparse.safetensors"
REPORT = "prune_report.json"  # written beside a checkpoint by ``owl-sparse prune --out``
# What `save_dense` and `check_output_dir` may replace.
OUTPUT_KIND = "an owl-sparse output (a packed checkpoint or a dense prune output)"


# --------------------------------------------------------------------------------------
# saving
# --------------------------------------------------------------------------------------


def _main_dtype(model: nn.Module) -> torch.dtype:
    counts: dict[torch.dtype, int] = {}
    for t in [*model.parameters(), *(m.packed.values for m in sparse_layers(model).values())]:
        if t.is_floating_point():
            counts[t.dtype] = counts.get(t.dtype, 0) + t.numel()
    return max(counts, key=counts.get) if counts else torch.float32


def is_owl_sparse_output(path) -> bool:
    """True for a directory an owl-sparse save wrote: a packed checkpoint (``sparsity.json``)
    or the dense output of ``owl-sparse prune`` (``prune_report.json``).  Such a directory
    may be replaced by a later save (`owl_sparse.io.atomic.check_replaceable` also requires that it
    holds only files our writers produce)."""
    path = Path(path)
    return (path / RECORD).is_file() or (path / REPORT).is_file()


def save_pretrained(
    model: nn.Module,
    path,
    tokenizer=None,
    prune_report=None,
    calibration=None,
    write_report: bool = False,
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
        write_report: also write ``prune_report`` as ``prune_report.json`` (`REPORT`), inside
            the same atomic save (the command line does).

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
        skeleton.check_values(name, t, where)
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
    # transformers opens the checkpoint through our registered quantizer: it reads this
    # entry, and finds the weights through the index (transformers_integration).
    cfg["quantization_config"] = quantization_config(record)
    with atomic_directory(path, is_owl_sparse_output) as tmp:
        config_bytes = (json.dumps(cfg, indent=2, sort_keys=True) + "\n").encode()
        (tmp / "config.json").write_bytes(config_bytes)
        save_tokenizer(tokenizer, tmp)
        if write_report and prune_report is not None:
            (tmp / REPORT).write_text(prune_report.to_json(indent=1))
        digest = hashlib.sha256()
        size = write_safetensors(
            tmp / WEIGHTS, tensors, {"format": "pt", "owl_sparse": "1"}, hasher=digest
        )
        record["weights_bytes"] = size
        record["weights_sha256"] = digest.hexdigest()
        index = weight_index(tensors, WEIGHTS, size)
        (tmp / INDEX).write_text(json.dumps(index, indent=1) + "\n")
        record["config_sha256"] = hashlib.sha256(config_bytes).hexdigest()
        # Written last: its presence is what marks the directory as a complete checkpoint.
        part = tmp / (RECORD + ".part")
        with open(part, "w") as f:
            json.dump(record, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(part, tmp / RECORD)
    return path


def save_dense(model: nn.Module, path, tokenizer=None, prune_report=None) -> Path:
    """Save a (pruned) dense model as a plain transformers directory, atomically, with
    ``prune_report.json``: the same replace rules as `save_pretrained` (the report is what
    marks the directory as an owl-sparse output)."""
    path = Path(path)
    with atomic_directory(path, is_owl_sparse_output, OUTPUT_KIND) as tmp:
        model.save_pretrained(tmp)
        save_tokenizer(tokenizer, tmp)
        if prune_report is not None:
            (tmp / REPORT).write_text(prune_report.to_json(indent=1))
    return path


def check_output_dir(path) -> None:
    """InputError unless a save of ours may write ``path``: missing, empty, or an owl-sparse
    output holding only files our writers produce (checked before any work)."""
    if path is not None:
        check_replaceable(path, is_owl_sparse_output, OUTPUT_KIND)


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
    skeleton_model = skeleton.meta_model(config, DTYPES[record["dtype"]])
    # GPT-2's Conv1D layers were turned into nn.Linear before packing; the loader rebuilds
    # from config (Conv1D again) and must convert the same way.
    conv1d = not has_conv1d(model) and has_conv1d(skeleton_model)
    if conv1d:
        conv1d_to_linear_(skeleton_model)
    if type(skeleton_model) is not type(model):
        raise InputError(
            f"{where}: the config rebuilds a {type(skeleton_model).__name__}, not this "
            f"{type(model).__name__}; save the causal LM itself"
        )
    entries = {
        name: TensorEntry(name, t.dtype, tuple(t.shape), 0, t.numel() * t.element_size())
        for name, t in tensors.items()
    }
    expected = skeleton.expected_tensors(skeleton_model)
    plan_tensors(skeleton_model, expected, record, entries, where)
    return conv1d


# --------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------


def is_checkpoint(path) -> bool:
    """True when ``path`` is a directory holding an owl-sparse ``sparsity.json``."""
    return (Path(path) / RECORD).is_file()


def open_checkpoint(path) -> tuple[dict, Path]:
    """The checks every load of a packed checkpoint makes before reading tensor data:
    ``sparsity.json`` parsed and checked, ``config.json`` unchanged since the save (sha256),
    the weights file present with the recorded size.  Returns ``(record, weights path)``;
    raises InputError naming the file at fault."""
    path = Path(path)
    if not path.is_dir():
        raise InputError(f"{path}: not a directory")
    if not is_checkpoint(path):
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
    read_header(weights)  # its checks first: they name the tensor at fault
    size = weights.stat().st_size
    if size != record["weights_bytes"]:
        raise InputError(
            f"{weights}: {size} bytes but {RECORD} records {record['weights_bytes']} "
            "(truncated or replaced)"
        )
    return record, weights


def verify_weights(record: dict, weights: Path) -> None:
    """Hash the whole weights file (one extra read) against the record's sha256; for
    readers that do not go through `SafeReader` (transformers' own loader).  Raises
    InputError on a mismatch; a record without the hash (older saves) is not checked."""
    expected = record.get("weights_sha256")
    if expected is not None and file_sha256(weights) != expected:
        raise InputError(
            f"{weights}: contents differ from the saved file (sha256 mismatch): the weights "
            "are corrupted or were edited"
        )


def load_packed(path, device=None, dtype: torch.dtype | None = None):
    """Load the owl-sparse checkpoint in directory ``path``; arguments, result and errors as
    for `owl_sparse.io.load_pretrained`, which also opens compressed-tensors checkpoints."""
    path = Path(path)
    dtype, device = parse_dtype(dtype), parse_device(device)
    record, weights = open_checkpoint(path)
    reader = SafeReader(weights, sha256=record.get("weights_sha256"))
    config = skeleton.load_config(path)
    # The config hash only says the file is the one saved: anyone crafting a checkpoint can
    # recompute it. Its values (load_config) and layer count are checked before a model is
    # built.
    weights_check.check_layer_count(config, reader.entries, path)
    model = skeleton.meta_model(config, DTYPES[record["dtype"]], record["conv1d_to_linear"])
    if type(model).__name__ != record["model_class"]:
        raise InputError(
            f"{path}: config builds {type(model).__name__}, {RECORD} says {record['model_class']}"
        )
    with reader:
        fill_model(model, reader, record["layers"], record["tied"], weights)
        reader.verify()  # the sha256 of every byte just read against the record's
    return finish(model, device, dtype, path), load_tokenizer(path)


def fill_model(model: nn.Module, reader: SafeReader, layers: dict, tied: dict, where) -> None:
    """Load every tensor of ``reader`` into the meta ``model``, checked first.

    ``layers``: packed layer name -> {"format", "shape", "nnz", "bias"}; ``tied``: alias ->
    stored name.  Swaps the packed layers for SparseLinear.  Raises InputError.
    """
    expected = skeleton.expected_tensors(model)
    plan = plan_tensors(model, expected, {"layers": layers, "tied": tied}, reader.entries, where)
    # Read in file order (each byte once, hashed as it is read), then check and place.
    wanted = [*plan.dense, *(e.name for es in plan.packed.values() for e in es.values())]
    data = {n: reader.get(n) for n in reader.in_file_order(wanted)}
    for name in plan.dense:
        t = data.pop(name)
        skeleton.check_values(name, t, where)
        skeleton.place_tensor(model, name, t)
    for name, entries in plan.packed.items():
        state = {f"{name}.{key}": data.pop(e.name) for key, e in entries.items()}
        bias = state.pop(f"{name}.bias", None)
        try:
            packed = FORMATS[layers[name]["format"]].from_state_dict(state, f"{name}.")
        except InputError as e:
            raise InputError(f"{where}: layer {name!r}: {e}") from None
        if packed.shape != tuple(layers[name]["shape"]):
            raise InputError(f"{where}: layer {name!r}: shape tensor says {list(packed.shape)}")
        skeleton.check_values(f"{name}.values", packed.values, where)
        if bias is not None:
            skeleton.check_values(f"{name}.bias", bias, where)
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, SparseLinear(packed, bias))
    for alias, source in tied.items():
        skeleton.tie(model, alias, source)
    skeleton.check_materialised(model, where)
