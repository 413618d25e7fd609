"""Packing gives the dense weights' memory back: nothing of a weight file's mapping survives
`sparsify_`, ties stay tied, values stay the same."""

from pathlib import Path

import pytest
import torch

from owl_sparse.models import load_model
from owl_sparse.nn import SparseLinear, memory, sparsify_
from owl_sparse.nn.memory import (
    external_memory,
    own_memory_,
    release_pages,
    return_freed_memory,
)


def _mapped(path: Path) -> bool:
    """Whether ``path`` is mapped into this process (Linux)."""
    return str(path.resolve()) in Path("/proc/self/maps").read_text()


def _prune_in_place(model, keep=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and "lm_head" not in name:
            with torch.no_grad():
                m.weight.mul_((torch.rand(m.weight.shape, generator=g) < keep).to(m.weight.dtype))


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="needs Linux /proc")
def test_sparsify_releases_the_weight_file_mapping(hf_dir):
    from transformers import AutoModelForCausalLM

    # Loaded by transformers itself (load_model would own the memory at once).
    model = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    weights = hf_dir / "model.safetensors"
    if not any(external_memory(p) for p in model.parameters()):
        pytest.skip("this transformers copies weights on load: nothing is mapped")
    assert _mapped(weights)
    _prune_in_place(model)
    probe = torch.randint(0, model.config.vocab_size, (2, 7))
    with torch.no_grad():
        before = model(probe).logits
    report = sparsify_(model, format="bitmap")
    assert report.swapped
    assert not any(external_memory(t) for t in [*model.parameters(), *model.buffers()])
    import gc

    gc.collect()
    assert not _mapped(weights), "the weight file is still mapped after packing"
    with torch.no_grad():
        torch.testing.assert_close(model(probe).logits, before, rtol=1e-5, atol=1e-5)
    assert any(isinstance(m, SparseLinear) for m in model.modules())


def test_own_memory_keeps_ties_values_and_parameters():
    buf = bytearray(torch.arange(12, dtype=torch.float32).numpy().tobytes())
    shared = torch.frombuffer(buf, dtype=torch.float32).view(3, 4)
    emb = torch.nn.Embedding(3, 4)
    head = torch.nn.Linear(4, 3, bias=False)
    emb.weight.data = shared
    head.weight = emb.weight  # tied: one Parameter
    other = torch.nn.Linear(4, 3, bias=False)
    other.weight.data = torch.frombuffer(buf, dtype=torch.float32).view(3, 4)  # a second view
    model = torch.nn.ModuleDict({"emb": emb, "head": head, "other": other})
    param = emb.weight
    assert external_memory(param)
    assert own_memory_(model) == 1  # the same view, copied once
    assert emb.weight is param and head.weight is emb.weight  # the Parameter object is kept
    assert emb.weight.data_ptr() == other.weight.data_ptr()  # views of one buffer stay one
    assert not external_memory(emb.weight)
    buf[:4] = b"\0\0\0\0"  # the copy no longer sees the buffer
    assert torch.equal(emb.weight, torch.arange(12, dtype=torch.float32).view(3, 4))
    assert own_memory_(model) == 0


def test_own_memory_leaves_meta_and_owned_tensors_alone():
    lin = torch.nn.Linear(4, 4)
    with torch.device("meta"):
        meta = torch.nn.Linear(4, 4)
    ptr = lin.weight.data_ptr()
    assert own_memory_(torch.nn.ModuleList([lin, meta])) == 0
    assert lin.weight.data_ptr() == ptr and meta.weight.is_meta


def test_return_freed_memory_asks_glibc():
    import platform

    assert return_freed_memory() is (platform.libc_ver()[0] == "glibc")


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="needs Linux /proc")
def test_load_model_owns_cpu_memory_and_unmaps_the_file(hf_dir):
    import gc

    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    expected = {k: v.clone() for k, v in reference.state_dict().items()}
    del reference
    gc.collect()
    model, _ = load_model(hf_dir)
    gc.collect()
    assert not any(external_memory(t) for t in [*model.parameters(), *model.buffers()])
    assert not _mapped(hf_dir / "model.safetensors")
    got = model.state_dict()
    assert got.keys() == expected.keys()
    for k, v in expected.items():
        assert torch.equal(got[k], v), k


def _mapped_tensor(tmp_path, numel, seed=0):
    """A float32 tensor of ``numel`` random values in a private mapping of a file."""
    import mmap

    values = torch.randn(numel, generator=torch.Generator().manual_seed(seed))
    path = tmp_path / f"w{seed}.bin"
    path.write_bytes(values.numpy().tobytes())
    with open(path, "r+b") as f:
        mm = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE)
    return torch.frombuffer(mm, dtype=torch.float32), values, mm


@pytest.mark.parametrize("numel", [1, 1000, 3 * 4096 + 5, 300_001])
def test_own_memory_copies_piece_by_piece(tmp_path, monkeypatch, numel):
    monkeypatch.setattr(memory, "_COPY_CHUNK_BYTES", 4096 * 3)  # several pieces, odd ends
    t, values, _mm = _mapped_tensor(tmp_path, numel)
    lin = torch.nn.Linear(1, 1, bias=False)
    lin.weight.data = t.view(numel, 1)
    assert external_memory(lin.weight)
    assert own_memory_(lin) == 1
    assert not external_memory(lin.weight)
    assert torch.equal(lin.weight.view(-1), values)
    # The source, its pages handed back, still reads the same values.
    assert torch.equal(t, values)


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="needs Linux /proc")
def test_release_pages_never_changes_contents(tmp_path):
    t, values, _mm = _mapped_tensor(tmp_path, 64 * 1024, seed=1)
    t[:10].zero_()  # a private page written through the mapping: must survive
    expected = values.clone()
    expected[:10] = 0
    released = release_pages(t)
    assert isinstance(released, bool)
    assert torch.equal(t, expected)
    assert release_pages(t[:3]) is False  # smaller than a page: nothing to hand back
    assert release_pages(t.view(256, 256).t()) is False  # not contiguous
