"""Shared test setup: markers, the shared data directory, tiny model factories."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def pytest_configure(config):
    # Triton kernels run on the CPU only under its interpreter; it must be chosen before
    # triton is imported, so decide it here (no CUDA context is created by this query).
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("OWL_SPARSE_DATA", str(REPO.parent / "shared" / "data"))


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_settings():
    """Each test reads the environment anew (owl_sparse.settings caches what it read)."""
    from owl_sparse import settings

    settings.reload()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared data directory; skips the test when it is absent."""
    path = Path(os.environ.get("OWL_SPARSE_DATA", REPO.parent / "shared" / "data"))
    if not path.is_dir():
        pytest.skip(f"shared data not found at {path} (set OWL_SPARSE_DATA)")
    return path


def tiny_config(family: str, **overrides):
    """A tiny randomly initialised transformers config of a model family (no download)."""
    import transformers as tf

    common = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    if family == "llama":
        cfg = tf.LlamaConfig(**common)
    elif family == "mistral":
        cfg = tf.MistralConfig(**common, sliding_window=None)
    elif family == "qwen2":
        cfg = tf.Qwen2Config(**common)
    elif family == "qwen3":
        cfg = tf.Qwen3Config(**common, head_dim=16)
    elif family == "opt":
        cfg = tf.OPTConfig(
            vocab_size=128,
            hidden_size=64,
            ffn_dim=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=256,
            word_embed_proj_dim=64,
        )
    elif family == "gpt2":
        cfg = tf.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=256)
    else:
        raise ValueError(family)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "opt", "gpt2")


def tiny_model(family: str, seed: int = 0, **overrides):
    """A tiny random causal LM of the family, in eval mode, float32."""
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(tiny_config(family, **overrides))
    return model.eval()
