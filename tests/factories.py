"""Helpers shared by test files in several directories: tiny models and tokenizers, packed
models and weights, random masks, checkpoint and CLI helpers.  Import as
``from factories import ...`` (``tests/`` is on the path, see pyproject.toml).

Only the standard library and torch are imported at module level: the root conftest
imports this module before ``pytest_configure`` has set up the environment
(TRITON_INTERPRET, OWL_SPARSE_DATA), so owl_sparse is imported inside the helpers.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from owl_sparse.nn import SparseLinear

REPO = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------ tiny models
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


def pruned_llama(pattern="random", seed=0):
    model = tiny_model("llama", seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, nn.Linear) and "lm_head" not in name:
                if pattern == "2:4":
                    n, k = m.weight.shape
                    m.weight.view(n, k // 4, 4)[..., 2:] = 0
                else:
                    m.weight.mul_(torch.rand(m.weight.shape, generator=g) >= 0.5)
    return model


def _calibration(n=4, seqlen=16, seed=0):
    return torch.randint(0, 128, (n, seqlen), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ tokenizers
def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(128)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def _word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(128)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="w2", pad_token="w0")


# ------------------------------------------------------------------ packed models
Q0 = "model.layers.0.self_attn.q_proj"


def _packed_model(fmt: str = "bitmap", dtype=torch.float32):
    from owl_sparse.nn import sparsify_
    from owl_sparse.pruning import PruneConfig, prune

    model = tiny_model("llama").to(dtype)
    report = prune(model, None, PruneConfig(method="magnitude", allocation="uniform"))
    sparsify_(model, format=fmt, masks=report.masks)
    return model


def pruned_model(
    family: str, fmt: str, allocation: str = "uniform", dtype=torch.float32, **overrides
):
    """A tiny random model pruned with Wanda (70% or 2:4) and packed; returns (model, report)."""
    from owl_sparse.nn import sparsify_
    from owl_sparse.pruning import PruneConfig, prune

    model = tiny_model(family, **overrides).to(dtype)
    vocab = model.config.vocab_size
    calibration = torch.randint(0, vocab, (4, 32), generator=torch.Generator().manual_seed(0))
    pattern = "2:4" if fmt == "2:4" else "unstructured"
    report = prune(
        model, calibration, PruneConfig(method="wanda", pattern=pattern, allocation=allocation)
    )
    sparsify_(model, format=fmt, masks=report.masks)
    return model, report


def logits(model, vocab: int, seed: int = 1) -> torch.Tensor:
    ids = torch.randint(0, vocab, (2, 11), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids).logits


def packed_layers(model) -> dict[str, SparseLinear]:
    from owl_sparse.nn import SparseLinear

    return {n: m for n, m in model.named_modules() if isinstance(m, SparseLinear)}


def n_sparse(model) -> int:
    from owl_sparse.nn import SparseLinear

    return sum(isinstance(m, SparseLinear) for m in model.modules())


# ------------------------------------------------------------------ pruned layers, weights, masks
def pruned_linear(k=136, n=40, sparsity=0.6, bias=True, pattern="random", seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        if pattern == "2:4":
            m = torch.zeros(n, k // 4, 4, dtype=torch.bool)
            m.scatter_(-1, torch.rand(n, k // 4, 4).argsort(-1)[..., :2], True)
            lin.weight *= m.view(n, k)
        else:
            lin.weight *= torch.rand(n, k) >= sparsity
    return lin


def small_pruned_linear(k=64, n=32, pattern="random", seed=0):
    """64 -> 32 by default, from its own generator; 2:4 keeps the first two of each group.
    (Imported as ``pruned_linear`` where no other one is.)"""
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g))
        if pattern == "2:4":
            lin.weight.view(n, k // 4, 4)[..., 2:] = 0
        else:
            lin.weight.mul_(torch.rand(n, k, generator=g) >= 0.6)
    return lin


def bitmap_weight(n=20, k=136, sparsity=0.6, dtype=torch.float32, seed=0):
    from owl_sparse.formats import BitmapWeight

    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g).to(dtype)
    m = torch.rand(n, k, generator=g) >= sparsity
    return w * m, BitmapWeight.from_dense(w, m)


def sparse24_weight(n=20, k=136, dtype=torch.float32, seed=0):
    from owl_sparse.formats import Sparse24Weight

    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g).to(dtype)
    m = torch.zeros(n, k // 4, 4, dtype=torch.bool)
    m.scatter_(-1, torch.rand(n, k // 4, 4, generator=g).argsort(-1)[..., :2], True)
    m = m.view(n, k)
    return w * m, Sparse24Weight.from_dense(w, m)


DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def random_mask(n, k, sparsity, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, k, generator=g) >= sparsity


def mask_24(n, k, seed=0, drop=0.25):
    """A 2:4 mask with some groups holding fewer than two entries."""
    g = torch.Generator().manual_seed(seed)
    m = torch.zeros(n, k // 4, 4, dtype=torch.bool)
    m.scatter_(-1, torch.rand(n, k // 4, 4, generator=g).argsort(-1)[..., :2], True)
    return m.view(n, k) & (torch.rand(n, k, generator=g) >= drop)


# ------------------------------------------------------------------ files and the CLI
def digest(path: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.iterdir())
        if p.is_file()
    }


def hidden(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


class _Payload:
    """Unpickling this would create a marker file: the test checks it never appears."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def one_line_error(capsys, *fragments: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("owl-sparse: error:"), err
    for f in fragments:
        assert f in err, err
    return err


def _prune_argv(model: Path, text: Path, *extra: str) -> list[str]:
    return [
        "prune",
        "--model",
        str(model),
        "--method",
        "magnitude",
        "--allocation",
        "uniform",
        "--sparsity",
        "0.5",
        "--seqlen",
        "32",
        "--calib-samples",
        "2",
        "--calib-text",
        str(text),
        "--quiet",
        "--device",
        "cpu",
        *extra,
    ]
