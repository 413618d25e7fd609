"""The static KV cache: left padding and prefill masks, a decode step without host
synchronisation (capturable in a CUDA graph), the memory check."""

from __future__ import annotations

import pytest
import torch
from factories import tiny_model
from torch.overrides import TorchFunctionMode

from owl_sparse.errors import InputError
from owl_sparse.serve.kv_cache import (
    DecodeStep,
    check_memory,
    left_pad,
    new_static_cache,
    prefill_inputs,
)


class _SyncSpy(TorchFunctionMode):
    """Records torch calls that would force the host to wait for the device."""

    SYNCING = {
        "item",
        "tolist",
        "__bool__",
        "__int__",
        "__float__",
        "__index__",
        "nonzero",
        "cpu",
        "numpy",
        "tensor",
        "masked_select",
    }

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        if name in self.SYNCING:
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


def test_decode_step_has_no_host_synchronisation():
    """What makes the step capturable in a CUDA graph, checked on the CPU."""
    model = tiny_model("llama")
    ids, lengths = left_pad([[1, 2, 3], [4, 5]], pad_id=0)
    cache = new_static_cache(model, 10)
    pos, mask = prefill_inputs(lengths, 3, 10, torch.float32, torch.device("cpu"))
    with torch.no_grad():
        model(input_ids=ids, position_ids=pos, attention_mask=mask, past_key_values=cache)
    step = DecodeStep(model, cache, lengths, 3, 10, torch.float32, "cpu", False, True)
    token = torch.tensor([7, 8])
    with _SyncSpy() as spy:
        logits = step(token, 0)
    assert spy.seen == [] and logits.shape == (2, 128)


def test_prefill_mask_left_padding():
    lengths = torch.tensor([3, 1])
    pos, mask = prefill_inputs(lengths, 3, 5, torch.float32, torch.device("cpu"))
    assert pos.tolist() == [[0, 1, 2], [0, 0, 0]]
    allowed = (mask == 0)[:, 0]
    assert allowed[0].tolist() == [
        [True, False, False, False, False],
        [True, True, False, False, False],
        [True, True, True, False, False],
    ]
    # the padded row: pad queries see only themselves, the real query only itself
    assert allowed[1].tolist() == [
        [True, False, False, False, False],
        [False, True, False, False, False],
        [False, False, True, False, False],
    ]


def test_memory_check_names_the_sizes(llama64, monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1 << 20, 1 << 30))
    with pytest.raises(InputError, match=r"batch 64 x 200 tokens does not fit .*GiB are free"):
        check_memory(llama64, 64, 100, 200, torch.float16, "cuda")
    ok = check_memory(llama64, 1, 4, 8, torch.float16, "cuda")
    assert ok["kv_cache_bytes"] == 2 * 2 * 1 * 2 * 8 * 16 * 2
