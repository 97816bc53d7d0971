"""Graph-level (Relax) passes of tvm-nested, in pipeline order (see tvm_nested/pipeline.py)."""

from .fold_batchnorm import FoldBatchNorm
from .level_guard import LevelGuard
from .lower_nested import INFO_ATTR, LowerNestedLayers, NestedLoweringWarning, read_nested_info

__all__ = ["FoldBatchNorm", "LowerNestedLayers", "LevelGuard", "INFO_ATTR", "NestedLoweringWarning",
           "read_nested_info"]
