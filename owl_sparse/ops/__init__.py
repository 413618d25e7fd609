"""The sparse linear ops (``torch.ops.owl_sparse.*``) and what runs them.

- :mod:`.library`: the op schemas, fake implementations, the CPU reference, autograd, and
  :func:`linear`, the entry that takes a packed format object;
- :mod:`.dispatch`: the backend registry and the measured dispatch table;
- :mod:`.dense`: the dense backend (cached dense copies); :mod:`.cache`: derived values
  cached until their source tensors change;
- :mod:`.cuda`: the CUDA extension built from ``csrc/`` and its backends.

Importing this package registers the ops; it never needs a GPU or a compiler.
"""

from .library import bitmap_linear, linear, sparse24_linear

__all__ = ["bitmap_linear", "linear", "sparse24_linear"]
