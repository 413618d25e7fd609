"""owl-sparse demo: bad options reported before the model is loaded."""

from __future__ import annotations

import pytest
from factories import one_line_error

from owl_sparse.cli.main import main


@pytest.mark.parametrize(
    "extra, fragments",
    [
        (["--sparsity", "1.5"], ["sparsity"]),
        (["--pattern", "1:4"], ["contradicts"]),
        (["--format", "2:4"], ["--format 2:4", "--pattern"]),
        (["--out", "{file}"], ["{file}", "exists"]),
    ],
)
def test_cli_demo_checks_before_loading(extra, fragments, tmp_path, capsys, no_model_load):
    (tmp_path / "afile").write_text("x")
    extra = [a.format(file=tmp_path / "afile") for a in extra]
    assert main(["demo", "--model", "stories260k", "--quiet", *extra]) == 2
    one_line_error(capsys, *[f.format(file=tmp_path / "afile") for f in fragments])
