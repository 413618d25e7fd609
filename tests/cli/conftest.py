"""Fixtures of the CLI tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if the CLI loads a model: the error must come before that."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad argument was reported")

    import owl_sparse.cli.demo
    import owl_sparse.models.load

    monkeypatch.setattr(owl_sparse.models.load, "load_model", refuse)
    monkeypatch.setattr(owl_sparse.cli.demo, "load_model", refuse)
