"""Hostile and broken checkpoints: every one is refused with an InputError naming the
tensor and the problem, before any kernel runs; plus a hypothesis fuzz of the loader."""

from __future__ import annotations

import json
import pickle
import shutil
import struct
from pathlib import Path

import pytest
import torch
from factories import _Payload, tiny_model
from fuzzing import mutate_bytes, mutate_header_json
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from owl_sparse.errors import InputError
from owl_sparse.io import RECORD, WEIGHTS, load_pretrained, save_pretrained
from owl_sparse.io.compressed_tensors import export_compressed_tensors
from owl_sparse.io.safetensors import (
    SafeReader,
    file_sha256,
    parse_header,
    read_header,
    write_safetensors,
)
from owl_sparse.nn import sparsify_

Q0 = "model.layers.0.self_attn.q_proj"  # a bitmap layer of the base checkpoint
U1 = "model.layers.1.mlp.up_proj"  # a 2:4 layer


def _masks(model, gen):
    """Block 0 layers: random 70% masks (bitmap); block 1: random 2:4 masks."""
    out = {}
    for name, m in model.named_modules():
        if not isinstance(m, torch.nn.Linear) or name == "lm_head":
            continue
        n, k = m.weight.shape
        if ".layers.0." in name:
            out[name] = torch.rand(n, k, generator=gen) >= 0.7
        else:
            idx = torch.rand(n, k // 4, 4, generator=gen).topk(2, -1).indices
            out[name] = (
                torch.zeros(n, k // 4, 4, dtype=torch.bool).scatter_(-1, idx, True).view(n, k)
            )
    return out


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny LLaMA checkpoint mixing bitmap and 2:4 layers, and its logits."""
    model = tiny_model("llama")
    sparsify_(model, format="auto", masks=_masks(model, torch.Generator().manual_seed(0)))
    path = tmp_path_factory.mktemp("base") / "ck"
    save_pretrained(model, path)
    return path


@pytest.fixture
def ck(tmp_path, base) -> Path:
    shutil.copytree(base, tmp_path / "ck")
    return tmp_path / "ck"


def _sync_size(ck: Path) -> None:
    """Record the weights file's current size and sha256 (a hostile file that is
    self-consistent: only the checks behind the hash can catch it)."""
    rec = json.loads((ck / RECORD).read_text())
    rec["weights_bytes"] = (ck / WEIGHTS).stat().st_size
    rec["weights_sha256"] = file_sha256(ck / WEIGHTS)
    (ck / RECORD).write_text(json.dumps(rec))


def _rewrite_file(path: Path, fn) -> None:
    tensors = load_file(path)  # our own, trusted file (memory-mapped: write beside it)
    fn(tensors)
    write_safetensors(path.with_suffix(".new"), tensors)
    path.with_suffix(".new").replace(path)


def rewrite(ck: Path, fn) -> None:
    _rewrite_file(ck / WEIGHTS, fn)
    _sync_size(ck)


def edit_header(ck: Path, fn) -> None:
    raw = (ck / WEIGHTS).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    fn(header)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    (ck / WEIGHTS).write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n :])
    _sync_size(ck)


def edit_record(ck: Path, fn) -> None:
    rec = json.loads((ck / RECORD).read_text())
    fn(rec)
    (ck / RECORD).write_text(json.dumps(rec))


def refused(ck: Path, *fragments: str) -> str:
    with pytest.raises(InputError) as info:
        load_pretrained(ck)
    msg = str(info.value)
    for f in fragments:
        assert f in msg, msg
    return msg


def test_base_checkpoint_loads(base):
    model, _ = load_pretrained(base)
    formats = {m.format for m in model.modules() if type(m).__name__ == "SparseLinear"}
    assert formats == {"bitmap", "2:4"}


def test_truncated_file(ck):
    data = (ck / WEIGHTS).read_bytes()
    (ck / WEIGHTS).write_bytes(data[: len(data) // 2])
    refused(ck, "data ends at byte", "truncated")
    _sync_size(ck)  # even when the record agrees, the header gives it away
    refused(ck, "truncated")
    (ck / WEIGHTS).write_bytes(data[:100])
    refused(ck, "truncated: header declares")
    (ck / WEIGHTS).write_bytes(data[:5])
    refused(ck, "truncated: 5 bytes")


@pytest.mark.parametrize("kind", ["pickle", "torch.save"])
def test_pickle_is_refused_never_unpickled(ck, tmp_path, kind):
    marker = tmp_path / "unpickled"
    if kind == "pickle":
        (ck / WEIGHTS).write_bytes(pickle.dumps({"w": _Payload(marker)}, protocol=4))
        refused(ck, "pickle", "never unpickles")
    else:
        torch.save({"w": torch.zeros(3)}, ck / WEIGHTS)
        refused(ck, "torch.save", "never unpickles")
    assert not marker.exists()


def test_bitmap_popcount_not_matching_values(ck):
    def add_bit(t):
        bitmap = t[f"{Q0}.bitmap"]
        words = bitmap[0, : 64 // 32].to(torch.int64) & 0xFFFFFFFF  # K = 64: words 0 and 1
        col = int((words != 0xFFFFFFFF).nonzero()[0])
        word = int(words[col])
        bit = next(b for b in range(32) if not word >> b & 1)
        bitmap[0, col] = torch.tensor(word | (1 << bit), dtype=torch.int64).to(torch.int32)
        # Offsets follow the new bitmap, so only the count of values is wrong.
        t[f"{Q0}.tile_offsets"][1:] += 1

    rewrite(ck, add_bit)
    refused(ck, Q0, "kept entries")


def test_offsets_inconsistent_or_out_of_range(ck):
    rewrite(ck, lambda t: t[f"{Q0}.tile_offsets"].__setitem__(-1, 2**31 - 1))
    refused(ck, Q0, "tile_offsets")
    rewrite(ck, lambda t: t[f"{Q0}.tile_offsets"].__setitem__(1, -7))
    refused(ck, Q0, "tile_offsets[1] = -7")


def test_2_4_indices_out_of_order(ck):
    rewrite(ck, lambda t: t[f"{U1}.meta"].__setitem__((0, 0), 0b0101_0101))
    refused(ck, U1, "strictly increasing")


def test_shapes_not_matching_the_config(ck):
    rewrite(ck, lambda t: t.__setitem__("model.embed_tokens.weight", torch.zeros(128, 63)))
    refused(ck, "model.embed_tokens.weight", "[128, 63]", "[128, 64]")


def test_shape_tensor_disagrees(ck):
    rewrite(ck, lambda t: t[f"{Q0}.shape"].__setitem__(1, 192))
    refused(ck, Q0, "shape")


def test_absurd_declared_shape(ck):
    def huge(header):
        header["model.norm.weight"]["shape"] = [2**40, 2**40]

    edit_header(ck, huge)
    refused(ck, "model.norm.weight", "needs", "data span")

    def huge_span(header):
        e = header["model.norm.weight"]
        e["shape"] = [2**20, 2**20]
        e["data_offsets"] = [e["data_offsets"][0], e["data_offsets"][0] + 4 * 2**40]

    edit_header(ck, huge_span)
    refused(ck, "model.norm.weight", "data section holds only")


def test_wrong_dtypes(ck):
    rewrite(ck, lambda t: t.__setitem__(f"{Q0}.values", t[f"{Q0}.values"].double()))
    refused(ck, f"{Q0}.values", "torch.float64", "expected torch.float32")


def test_wrong_index_dtype(ck):
    rewrite(ck, lambda t: t.__setitem__(f"{U1}.meta", t[f"{U1}.meta"].to(torch.int32)))
    refused(ck, f"{U1}.meta", "torch.int32", "expected torch.uint8")


@pytest.mark.parametrize("name", ["model.norm.weight", f"{Q0}.tile_offsets", f"{U1}.values"])
def test_missing_tensor(ck, name):
    rewrite(ck, lambda t: t.pop(name))
    refused(ck, "missing tensor", name)


def test_unexpected_tensor(ck):
    rewrite(ck, lambda t: t.__setitem__("backdoor", torch.zeros(2)))
    refused(ck, "unexpected tensor", "backdoor")


@pytest.mark.parametrize(
    "value, what", [(float("nan"), "NaN"), (float("inf"), "Inf"), (1e30, "magnitude")]
)
def test_non_finite_or_absurd_values(ck, value, what):
    rewrite(ck, lambda t: t[f"{Q0}.values"].__setitem__(3, value))
    refused(ck, f"{Q0}.values", what)


def test_config_changed_after_save(ck):
    cfg = json.loads((ck / "config.json").read_text())
    cfg["hidden_size"] = 4096
    (ck / "config.json").write_text(json.dumps(cfg))
    refused(ck, "config.json", "sha256")


@pytest.mark.parametrize(
    "edit, fragment",
    [
        (lambda r: r.update(weights_file="../../outside.safetensors"), "plain"),
        (lambda r: r["layers"][Q0].update(format="csr"), "format must be"),
        (lambda r: r["layers"][Q0].update(nnz=-1), "nnz"),
        (lambda r: r["layers"][Q0].update(shape=[64, 65]), "config gives [64, 64]"),
        (
            lambda r: r["layers"].update({"model.layers.0.input_layernorm": r["layers"][Q0]}),
            "not a linear layer",
        ),
        (lambda r: r.update(tied={"lm_head.weight": "model.norm.weight"}), "tied"),
        (lambda r: r.update(dtype="int8"), "dtype must be"),
    ],
)
def test_bad_record_fields(ck, edit, fragment):
    edit_record(ck, edit)
    refused(ck, fragment)


def test_record_not_json(ck):
    (ck / RECORD).write_bytes(b"\xff{not json")
    refused(ck, RECORD, "not valid JSON")


@pytest.mark.parametrize(
    "edit, fragment",
    [
        (lambda h: h["model.norm.weight"].update(dtype="F8_E9M9"), "unsupported dtype"),
        (lambda h: h["model.norm.weight"].update(shape=[64.0]), "shape"),
        (lambda h: h["model.norm.weight"].update(data_offsets=[0, 100]), "data span"),
        (lambda h: h["model.norm.weight"].update(data_offsets=[8, 264]), "overlaps"),
        (
            lambda h: h.update(extra={"dtype": "F32", "shape": [], "data_offsets": [0, 4]}),
            "overlaps",
        ),
    ],
)
def test_bad_headers(ck, edit, fragment):
    edit_header(ck, edit)
    refused(ck, fragment)


def test_header_length_and_trailing_bytes(ck, tmp_path):
    data = (ck / WEIGHTS).read_bytes()
    (tmp_path / "a.safetensors").write_bytes(struct.pack("<Q", 2**40) + data[8:])
    with pytest.raises(InputError, match="exceeds"):
        read_header(tmp_path / "a.safetensors")
    (tmp_path / "b.safetensors").write_bytes(data + b"\0" * 8)
    with pytest.raises(InputError, match="8 trailing bytes"):
        read_header(tmp_path / "b.safetensors")
    head = b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    (tmp_path / "c.safetensors").write_bytes(struct.pack("<Q", len(head)) + head + b"\0" * 4)
    with pytest.raises(InputError, match="duplicate key"):
        read_header(tmp_path / "c.safetensors")


# ------------------------------------------------------------------ compressed-tensors
@pytest.fixture
def ct_dir(tmp_path, base):
    model, _ = load_pretrained(base)
    # 2:4 layers are exported as sparse-bitmask too (one format per model there).
    return export_compressed_tensors(model, tmp_path / "ct")


def test_compressed_tensors_hostile(ct_dir):
    load_pretrained(ct_dir)  # the untouched export loads
    _rewrite_file(ct_dir / "model.safetensors", lambda t: t[f"{Q0}.row_offsets"].__setitem__(2, 0))
    refused(ct_dir, Q0, "row_offsets")
    _rewrite_file(
        ct_dir / "model.safetensors",
        lambda t: t.__setitem__(f"{Q0}.compressed", t[f"{Q0}.compressed"][:-1].clone()),
    )
    refused(ct_dir, Q0, "values but the bitmask keeps")
    (ct_dir / "model.safetensors").write_bytes(pickle.dumps({"w": 1}, protocol=2))
    refused(ct_dir, "pickle")


# ------------------------------------------------------------------ fuzz
FUZZ_LOGIT_IDS = torch.tensor([[1, 5, 9, 33, 2, 77, 100, 3]])


@st.composite
def mutations(draw):
    target = draw(st.sampled_from([WEIGHTS] * 5 + [RECORD]))
    kind = draw(
        st.sampled_from(["bytes", "bytes", "header_bytes", "truncate", "insert", "header_json"])
    )
    return (
        target,
        kind,
        draw(st.integers(0, 2**32)),
        draw(st.lists(st.integers(0, 255), min_size=1, max_size=8)),
        draw(st.booleans()),
    )


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(mutation=mutations())
def test_fuzz_loader_loads_finite_or_raises_input_error(base, tmp_path_factory, mutation):
    """Mutated real checkpoints: the loader either returns a model whose logits are finite
    or raises InputError; any other exception is a bug."""
    target, kind, seed, payload, sync = mutation
    ck = tmp_path_factory.mktemp("fuzz") / "ck"
    shutil.copytree(base, ck)
    data = (ck / target).read_bytes()
    header_len = struct.unpack("<Q", data[:8])[0] if target == WEIGHTS else len(data)
    if kind == "header_json" and target == WEIGHTS:
        data = mutate_header_json(data, seed, payload)
    else:
        data = mutate_bytes(
            data, kind if kind != "header_json" else "bytes", seed, payload, header_len
        )
    (ck / target).write_bytes(data)
    if sync and target == WEIGHTS:
        _sync_size(ck)  # a self-consistent attacker also fixes the recorded size
    try:
        try:
            model, _ = load_pretrained(ck)
        except InputError:
            return
        with torch.no_grad():
            out = model(FUZZ_LOGIT_IDS).logits
        assert torch.isfinite(out).all()
    finally:
        shutil.rmtree(ck.parent, ignore_errors=True)


def _flip_bit(path: Path, offset: int, bit: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ (1 << bit)]))


def _data_offset(path: Path, name: str) -> int:
    entries, _, start = parse_header(path)
    return start + entries[name].begin


def test_one_flipped_value_bit_is_refused(ck):
    """Corruption no structural check can see: one bit of one value (size unchanged)."""
    name = next(n for n in parse_header(ck / WEIGHTS)[0] if n.endswith("q_proj.values"))
    _flip_bit(ck / WEIGHTS, _data_offset(ck / WEIGHTS, name) + 1, 0)
    with pytest.raises(InputError, match="sha256 mismatch"):
        load_pretrained(ck)


def test_bitmap_bit_swap_keeping_the_popcount_is_refused(ck):
    """Two bitmap bits exchanged (one set, one cleared): every count still matches."""
    reader = SafeReader(ck / WEIGHTS)
    name = next(n for n in reader.entries if n.endswith(".bitmap"))
    with reader:
        words = reader.get(name).reshape(-1).view(torch.int32)
    w = int(words[0]) & 0xFFFFFFFF
    on = next(b for b in range(32) if w >> b & 1)
    off = next(b for b in range(32) if not w >> b & 1)
    at = _data_offset(ck / WEIGHTS, name)
    for b in (on, off):  # little-endian: bit b of word 0 is bit b % 8 of byte b // 8
        _flip_bit(ck / WEIGHTS, at + b // 8, b % 8)
    with pytest.raises(InputError, match="sha256 mismatch"):
        load_pretrained(ck)


def test_intact_checkpoint_records_and_matches_its_hash(ck):
    rec = json.loads((ck / RECORD).read_text())
    assert rec["weights_sha256"] == file_sha256(ck / WEIGHTS)
    load_pretrained(ck)  # verifies


def test_checkpoint_without_a_hash_still_loads(ck):
    """Checkpoints saved before the hash was recorded load (unchecked), as before."""
    rec = json.loads((ck / RECORD).read_text())
    del rec["weights_sha256"]
    (ck / RECORD).write_text(json.dumps(rec))
    load_pretrained(ck)


def test_malformed_hash_is_named(ck):
    rec = json.loads((ck / RECORD).read_text())
    rec["weights_sha256"] = "xyz"
    (ck / RECORD).write_text(json.dumps(rec))
    with pytest.raises(InputError, match="weights_sha256 must be 64 hex digits"):
        load_pretrained(ck)
