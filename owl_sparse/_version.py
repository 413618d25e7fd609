"""The package version, in a module of its own so any module can read it without
importing the package's ``__init__`` (and the transformers hook it installs)."""

__version__ = "0.1.0"
