"""Shared test setup: markers, the shared data directory, the checkpoints and files that
test files in several directories use.  Plain helpers live in factories.py."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

# Generation in the tests runs eagerly unless a test asks for the compiled decode step
# (tests/serve/test_compiled_decode.py): compiling every tiny model would cost minutes.
os.environ.setdefault("OWL_SPARSE_COMPILE_DECODE", "0")

# The shared helper modules hold assertions: rewrite them like the test modules' own.
pytest.register_assert_rewrite("factories", "cuda_checks")

from factories import REPO, _packed_model, _tokenizer, tiny_model  # noqa: E402


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


# ------------------------------------------------------------------ checkpoints and files
# (models/, io/ and cli/ tests; a test module's own fixture of the same name wins there)
@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    """A dense HF directory (tiny LLaMA + word-level tokenizer), as a user would have."""
    path = tmp_path_factory.mktemp("hf") / "model"
    tiny_model("llama").save_pretrained(path)
    _tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def base_ck(tmp_path_factory) -> Path:
    from owl_sparse.io import save_pretrained

    path = tmp_path_factory.mktemp("ck") / "ck"
    save_pretrained(_packed_model(), path, tokenizer=_tokenizer())
    return path


@pytest.fixture
def ck(tmp_path, base_ck) -> Path:
    shutil.copytree(base_ck, tmp_path / "ck")
    return tmp_path / "ck"


@pytest.fixture
def text_file(tmp_path) -> Path:
    path = tmp_path / "text.txt"
    path.write_text(" ".join(f"w{(i * 7) % 128}" for i in range(900)))
    return path
