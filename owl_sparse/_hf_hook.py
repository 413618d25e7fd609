"""Register owl-sparse's quantization method with transformers the moment transformers'
quantizer registry is imported, so ``import owl_sparse`` stays cheap (no transformers
import) and ``AutoModelForCausalLM.from_pretrained(packed_dir)`` still works after it.

A finder on ``sys.meta_path`` waits for ``transformers.quantizers.auto`` (imported by every
``from_pretrained`` before it reads a ``quantization_config``), lets it load normally, then
calls `owl_sparse.io.transformers_integration.register`. When that module is already
imported, registration happens at once.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import logging
import sys

_TARGET = "transformers.quantizers.auto"


def _register() -> None:
    try:
        from .io.transformers_integration import register

        register()
    except Exception as e:  # never break transformers' own import
        logging.getLogger(__name__).warning(
            "owl-sparse could not register with transformers: %s: %s", type(e).__name__, e
        )


class _Loader(importlib.abc.Loader):
    def __init__(self, inner):
        self.inner = inner

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        self.inner.exec_module(module)
        _register()


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != _TARGET:
            return None
        sys.meta_path.remove(self)  # once; the real finders resolve the module
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _Loader(spec.loader)
        return spec


def install() -> None:
    """Register now if transformers' registry is loaded, else when it is."""
    if _TARGET in sys.modules:
        _register()
    elif not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
