"""Files: packed checkpoints (safetensors + a JSON record), the compressed-tensors
interchange, and the checked readers and atomic writers they share.

- :mod:`.packed`: `save_pretrained` (packed), `save_dense` (the CLI's dense output);
- :mod:`.load`: `load_pretrained` (ours, or compressed-tensors);
- :mod:`.compressed_tensors`: `export_compressed_tensors` and its importer;
- :mod:`.record`: the ``sparsity.json`` record and the header checks made before any data;
- :mod:`.safetensors`, :mod:`.skeleton`, :mod:`.state`, :mod:`.atomic`, :mod:`.tokenizer`:
  the pieces they share.
"""

from .compressed_tensors import export_compressed_tensors, is_compressed_tensors_dir
from .load import load_pretrained
from .packed import RECORD, REPORT, WEIGHTS, is_checkpoint, save_dense, save_pretrained

__all__ = [
    "RECORD",
    "REPORT",
    "WEIGHTS",
    "export_compressed_tensors",
    "is_checkpoint",
    "is_compressed_tensors_dir",
    "load_pretrained",
    "save_dense",
    "save_pretrained",
]
