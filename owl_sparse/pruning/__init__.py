"""Pruning: score -> allocate -> select mask, fed by one statistics accumulator.

``prune(model, calibration, PruneConfig(...)) -> PruneReport`` zeroes weights in place and
keeps the masks (``report.masks``: {module name: CPU bool [out, in], True = kept}, stored
one bit per weight by `mask_store.MaskStore`).
See `engine` for the passes, `scores` / `allocate` / `masks` for the three steps and
`stats` for the accumulator.

The public function is also ``owl_sparse.prune``.
"""

from .calibrate import BlockInputs, capture_block_inputs
from .config import PruneConfig, PruneError, parse_pattern
from .engine import DenseProfile, dense_profile, prune
from .mask_store import MaskStore
from .masks import Target
from .report import BlockRecord, LayerRecord, PruneReport

__all__ = [
    "BlockInputs",
    "BlockRecord",
    "DenseProfile",
    "LayerRecord",
    "MaskStore",
    "PruneConfig",
    "PruneError",
    "PruneReport",
    "Target",
    "capture_block_inputs",
    "dense_profile",
    "parse_pattern",
    "prune",
]
