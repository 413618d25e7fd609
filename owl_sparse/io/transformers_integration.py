"""transformers integration: ``AutoModelForCausalLM.from_pretrained(packed_dir)``.

After ``import owl_sparse.io`` (``owl_sparse.load_pretrained`` / ``save_pretrained`` import
it; ``import owl_sparse`` registers it too), transformers opens our packed checkpoints itself,
so everything built on transformers (pipelines, ``lm_eval --model hf``, PEFT) can use them::

    import owl_sparse  # registers the "owl_sparse" quantization method
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained("ckpt/", dtype="bfloat16", device_map="cpu")

How: `save_pretrained` writes ``quantization_config = {"quant_method": "owl_sparse", ...}``
into ``config.json`` and a ``model.safetensors.index.json`` that maps every stored tensor to
``owl_sparse.safetensors`` (so transformers finds the file). On load, transformers builds the
model on the meta device and hands it to `OwlSparseQuantizer`, registered through the public
``register_quantization_config`` / ``register_quantizer`` API, which

1. before any tensor data is read, makes the same checks as `load_pretrained`: the record,
   the config's sha256, the weights file's size, and every tensor's name, dtype and shape in
   the safetensors header against the model the config builds (nothing missing, nothing
   unexpected); then swaps each packed layer for a `SparseLinear` whose buffers are meta
   tensors of the stored shapes (no dense weight is ever materialised);
2. lets transformers read the tensors (its ``dtype`` and ``device_map`` apply: packed
   values take the model dtype, the bitmap / 2:4 indices stay integers);
3. afterwards checks every packed layer's invariants (popcounts, offsets, index order, the
   values' padding), finiteness of every floating tensor, the recorded tied weights, and that
   nothing is left on the meta device.

Any failure raises `owl_sparse.errors.InputError` naming the file and tensor.
``model.save_pretrained(dir)`` on such a model, or on one `owl_sparse.nn.sparsify_` packed,
writes our packed layout atomically (`owl_sparse.io.save_pretrained`).
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch
from torch import nn

from ..args import DTYPES
from ..errors import InputError
from ..formats import FORMATS
from ..models.structure import conv1d_to_linear_
from ..nn import SparseLinear
from ..nn.linear import NoDenseWeightError
from ..nn.sparsify import register_after_sparsify
from . import skeleton
from .packed import RECORD, open_checkpoint, save_pretrained, verify_weights
from .record import QUANT_METHOD, plan_tensors
from .safetensors import read_header

log = logging.getLogger(__name__)

_registered = False


def _meta_packed(fmt: str, entries: dict, shape: tuple[int, int], dtype: torch.dtype):
    """A packed [N, K] weight with the stored tensor shapes on the meta device, values in
    ``dtype`` (construction checks dtypes and shapes only: no data exists yet)."""
    meta = {
        key: torch.empty(e.shape, dtype=dtype if key == "values" else e.dtype, device="meta")
        for key, e in entries.items()
        if key not in ("bias", "shape")
    }
    if fmt == "bitmap":
        return FORMATS[fmt](meta["bitmap"], meta["values"], meta["tile_offsets"], *shape)
    return FORMATS[fmt](meta["values"], meta["meta"])


def _install(model: nn.Module, record: dict, entries: dict, where) -> None:
    """Check the header against the model the config builds; swap the packed layers for
    SparseLinear modules with meta buffers (the model's own dtype for values and bias)."""
    if type(model).__name__ != record["model_class"]:
        raise InputError(
            f"{where}: config builds {type(model).__name__}, {RECORD} says {record['model_class']}"
        )
    if record["conv1d_to_linear"]:
        conv1d_to_linear_(model)
    # The header is checked against the model at the stored dtype; transformers may then
    # convert floating tensors to the dtype the caller asked for.
    stored = skeleton.meta_model(model.config, DTYPES[record["dtype"]], record["conv1d_to_linear"])
    plan = plan_tensors(stored, skeleton.expected_tensors(stored), record, entries, where)
    for name, tensors in plan.packed.items():
        layer = model.get_submodule(name)
        dtype = layer.weight.dtype
        spec = record["layers"][name]
        packed = _meta_packed(spec["format"], tensors, tuple(spec["shape"]), dtype)
        bias = None
        if "bias" in tensors:
            bias = torch.empty(tensors["bias"].shape, dtype=dtype, device="meta")
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, SparseLinear(packed, bias))
    # transformers runs each model's _init_weights over every module after loading (for
    # non-persistent buffers; loaded tensors are skipped). Some reach into a linear child's
    # .weight (GPT-2's c_proj): there is none to initialise on a packed layer.
    for module in model.modules():
        if hasattr(module, "_init_weights") and hasattr(module, "config"):
            module.__dict__["_init_weights"] = _skip_packed(module._init_weights)


def _skip_packed(init_weights):
    @functools.wraps(init_weights)
    def init(module):
        try:
            init_weights(module)
        except NoDenseWeightError:
            pass

    return init


def _check_loaded(model: nn.Module, record: dict, where) -> None:
    for name, module in model.named_modules():
        if isinstance(module, SparseLinear):
            try:
                module.packed.validate()
            except InputError as e:
                raise InputError(f"{where}: layer {name!r}: {e}") from None
            if tuple(module.shape.tolist()) != (module.out_features, module.in_features):
                raise InputError(f"{where}: layer {name!r}: shape tensor says {module.shape}")
    for alias, source in record["tied"].items():
        skeleton.tie(model, alias, source)
    skeleton.check_materialised(model, where)
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_floating_point():
            skeleton.check_values(name, t, where)


def enable_save_pretrained(model: nn.Module) -> nn.Module:
    """Make ``model.save_pretrained(dir, ...)`` write the packed layout (atomically) for
    this model instance: `owl_sparse.io.save_pretrained` with the same arguments."""

    @functools.wraps(save_pretrained)
    def save(path, tokenizer=None, prune_report=None, calibration=None, **ignored):
        unknown = sorted(k for k in ignored if k not in _HF_SAVE_KWARGS)
        if unknown:
            raise InputError(
                f"save_pretrained of a packed owl-sparse model does not take {unknown}"
            )
        return save_pretrained(model, path, tokenizer, prune_report, calibration)

    model.__dict__["save_pretrained"] = save
    return model


# transformers' own save_pretrained keywords that mean nothing for one packed file.
_HF_SAVE_KWARGS = {"safe_serialization", "max_shard_size", "is_main_process", "state_dict"}


def register() -> bool:
    """Register the quantization method with transformers (once); False where this
    transformers has no public registration API (then only `load_pretrained` opens our
    checkpoints, and a one-line warning says so)."""
    global _registered
    if _registered:
        return True
    try:
        from transformers.quantizers.auto import (
            register_quantization_config,
            register_quantizer,
        )
        from transformers.quantizers.base import HfQuantizer
        from transformers.utils.quantization_config import QuantizationConfigMixin
    except ImportError as e:
        log.warning("transformers cannot open owl-sparse checkpoints itself here (%s)", e)
        return False

    class OwlSparseConfig(QuantizationConfigMixin):
        """``quantization_config`` of an owl-sparse packed checkpoint (see module doc)."""

        def __init__(self, checkpoint_version=1, weights_file="owl_sparse.safetensors", **kw):
            self.quant_method = QUANT_METHOD
            self.checkpoint_version = checkpoint_version
            self.weights_file = weights_file
            self.formats = kw.pop("formats", [])

    class OwlSparseQuantizer(HfQuantizer):
        """Loads a packed owl-sparse checkpoint through ``from_pretrained`` (module doc)."""

        requires_calibration = True  # only checkpoints packed by owl-sparse load

        def __init__(self, quantization_config, **kwargs):
            super().__init__(quantization_config, **kwargs)
            self._record = None
            self._where = None

        def validate_environment(self, *args, **kwargs):
            return None

        def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kw):
            files = [Path(f) for f in checkpoint_files or []]
            if len(files) != 1:
                raise InputError(
                    f"an owl-sparse checkpoint has one weights file, transformers found {files}"
                )
            record, weights = open_checkpoint(files[0].parent)
            if weights.resolve() != files[0].resolve():
                raise InputError(
                    f"{files[0]}: not the weights file {weights.name} its record names"
                )
            verify_weights(record, weights)  # transformers reads the file itself
            entries, _ = read_header(weights)
            _install(model, record, entries, weights)
            self._record, self._where = record, weights
            return model

        def _process_model_after_weight_loading(self, model, **kw):
            _check_loaded(model, self._record, self._where)
            return enable_save_pretrained(model.eval())

        def is_serializable(self, *args, **kwargs):
            return True

        @property
        def is_trainable(self):
            return False

        @property
        def is_compileable(self):
            return True

    try:
        register_quantization_config(QUANT_METHOD)(OwlSparseConfig)
        register_quantizer(QUANT_METHOD)(OwlSparseQuantizer)
    except ValueError:  # registered by an earlier import of this module under another name
        pass
    register_after_sparsify(enable_save_pretrained)
    _registered = True
    return True
