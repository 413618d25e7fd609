"""Packing gives the dense weights' memory back: nothing of a weight file's mapping survives
`sparsify_`, ties stay tied, values stay the same."""

from pathlib import Path

import pytest
import torch

from owl_sparse.models import load_model
from owl_sparse.nn import SparseLinear, sparsify_
from owl_sparse.nn.memory import external_memory, own_memory_, return_freed_memory


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
    model, _ = load_model(hf_dir)
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
