"""The package's layout rules, checked: layers point one way (import-linter), no import
cycle at any level, no environment read outside settings.py, no class-name strings."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import grimp
from factories import REPO

PACKAGE = REPO / "owl_sparse"


def test_import_linter_contracts_are_kept():
    lint = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run(
        [str(lint), "--no-cache", str(REPO / "pyproject.toml")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout


def test_no_module_level_import_cycle():
    graph = grimp.build_graph("owl_sparse", cache_dir=None)
    cycles = []
    for module in sorted(graph.modules):
        for imported in graph.find_modules_directly_imported_by(module):
            if imported.startswith("owl_sparse") and imported != module:
                back = graph.find_shortest_chain(importer=imported, imported=module)
                if back:
                    cycles.append(" -> ".join((module, *back)))
    assert not cycles, "\n".join(cycles)


def _sources():
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path, path.read_text()


def test_only_settings_reads_the_environment():
    readers = [
        str(path.relative_to(REPO))
        for path, text in _sources()
        if path.name != "settings.py" and re.search(r"os\.environ|os\.getenv|getenv\(", text)
    ]
    assert readers == []


def test_no_class_name_string_checks():
    pattern = re.compile(r"__name__\s*(==|!=|in)\s*[\"'(\[]")
    found = [
        f"{path.relative_to(REPO)}:{i}"
        for path, text in _sources()
        for i, line in enumerate(text.splitlines(), 1)
        if pattern.search(line) and "__main__" not in line
    ]
    assert found == []
